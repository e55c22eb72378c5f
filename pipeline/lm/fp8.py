"""The frozen base's linear layers in FP8 (train.fp8_base, opt-in: GPUs with FP8 tensor cores, Ada and newer).

    fp8_base(model) -> int          replace every frozen linear layer of the decoder (4-bit or plain, LoRA's
                                    base layers included; not the output head) by an Fp8Linear; returns how many
    fp8_unsupported(device) -> str  why this device cannot run it ("" when it can)

Why. With LoRA the frozen base's matmuls are most of a training step (bench/NOTES.md: ~80% of the q_proj,v_proj
step), and a bitsandbytes 4-bit layer makes each of them a bf16 matmul after dequantizing its whole weight: in
the forward, again in the checkpoint's recomputation, and for the input gradient. An FP8 copy of the weight (one
byte a weight, one scale per output channel) feeds torch._scaled_mm directly, at twice the bf16 tensor-core
rate, for the forward and the recomputation. Written by hand because what exists does not fit: torchao's
float8 training converts trained nn.Linear weights (here the weights are frozen, 4-bit, and sit under PEFT's
LoRA layers), and Transformer Engine is a heavy CUDA build our users do not have.

Numbers, per layer with weight W [out, in] and input rows x [tokens, in]:

    once      s_w = max|W[o, :]| / 448 per output channel;  W8 = e4m3(W / s_w)
    forward   s_x = max|x[t, :]| / 448 per token;  y = (e4m3(x / s_x) @ W8^T) * s_x * s_w^T   (fp32 sums, bf16 out)
    backward  gx = g @ (W8 * s_w)   in the compute dtype (bf16): only the forward's operands are rounded to FP8

W is the 4-bit weight dequantized, so the FP8 copy rounds NF4 values a second time. The adapter trained on it is
served on the 4-bit base (the evaluation stage and servers load NF4): the difference between the two bases'
outputs is what the opt-in costs, measured by bench/train_throughput.py's loss comparison (bench/NOTES.md).
Memory: 1 byte a weight against ~0.53 for NF4, +3.3 GB for a 7B; the checkpoint budget measures the model after
the swap, so it keeps fewer layers' activations.
"""
from __future__ import annotations

import functools
import logging

from pipeline.errors import UserFacingError

log = logging.getLogger(__name__)

E4M3_MAX = 448.0          # the largest finite float8_e4m3fn
MIN_CAPABILITY = (8, 9)   # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer


class Fp8UnsupportedError(UserFacingError):
    """train.fp8_base is on but the worker's device cannot run FP8 matmuls (a fatal, per-domain failure)."""


def fp8_unsupported(device: str) -> str:
    """Why `device` cannot run the FP8 base ("" when it can). The CPU can (PyTorch's reference kernels: slow,
    for tests); a CUDA GPU needs FP8 tensor cores."""
    import torch
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no float8 matmul"
    if device.startswith("cuda"):
        cap = torch.cuda.get_device_capability(torch.device(device))
        if cap < MIN_CAPABILITY:
            return (f"{torch.cuda.get_device_name(torch.device(device))} (compute capability {cap[0]}.{cap[1]}) has no "
                    f"FP8 tensor cores: train.fp8_base needs {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper)")
    return ""


def quantize_rows(x2):
    """(e4m3(x2 / s), s) with s = max|row| / 448 per row, as [rows, 1] fp32 (all-zero rows: s tiny, values 0).
    One Triton pass on CUDA (read once, written as FP8), PyTorch's ops elsewhere."""
    import torch
    if x2.is_cuda:
        return _triton_quantize_rows()(x2)
    s = x2.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / E4M3_MAX
    return (x2.float() / s).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), s


@functools.cache
def _triton_quantize_rows():
    """The CUDA quantizer (Triton imported only here: where it runs)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _quantize_rows(X, Y, S, K, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):          # pass 1: the row's largest magnitude
            v = tl.load(X + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        s = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
        tl.store(S + row, s)
        inv = 1.0 / s
        for k0 in range(0, K, BLOCK):          # pass 2: the row again (from L2: 8-28 KB), scaled and rounded
            v = tl.load(X + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32) * inv
            v = tl.minimum(tl.maximum(v, -448.0), 448.0)
            tl.store(Y + row * K + k0 + cols, v.to(tl.float8e4nv), mask=k0 + cols < K)

    def run(x2):
        M, K = x2.shape
        y = torch.empty((M, K), device=x2.device, dtype=torch.float8_e4m3fn)
        s = torch.empty((M, 1), device=x2.device, dtype=torch.float32)
        if M:
            _quantize_rows[(M,)](x2, y, s, K, x2.stride(0), BLOCK=1024, num_warps=4)
        return y, s

    return run


def _scaled_matmul(x2, w8, s_w_row):
    """x2 [M, K] (compute dtype) @ (W8 * s_w)^T -> [M, N] in x2's dtype, the operands in FP8. On CUDA the rows are
    padded to a multiple of 16 (the FP8 kernels' tile)."""
    import torch
    M = x2.shape[0]
    pad = (-M) % 16 if x2.is_cuda else 0
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    x8, s_x = quantize_rows(x2.contiguous())
    out_dtype = x2.dtype if x2.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    y = torch._scaled_mm(x8, w8.t(), scale_a=s_x, scale_b=s_w_row, out_dtype=out_dtype,
                         use_fast_accum=x2.is_cuda)
    return (y[:M] if pad else y).to(x2.dtype)


@functools.cache
def _fp8_fn():
    import torch

    class Fp8Matmul(torch.autograd.Function):
        """y = x @ W^T (+ bias) with the forward's operands in FP8; gx = g @ W in the compute dtype."""

        @staticmethod
        def forward(ctx, x, layer):
            ctx.layer = layer
            K = x.shape[-1]
            y = _scaled_matmul(x.reshape(-1, K), layer.weight8, layer.scale_row)
            if layer.bias is not None:
                y = y + layer.bias.to(y.dtype)
            return y.view(*x.shape[:-1], y.shape[-1])

        @staticmethod
        def backward(ctx, gy):
            if not ctx.needs_input_grad[0]:
                return None, None
            g = gy.reshape(-1, gy.shape[-1])
            gx = g @ ctx.layer.dense_weight(g.dtype)
            return gx.view(*gy.shape[:-1], gx.shape[-1]), None

    return Fp8Matmul


def _module_class():
    import torch

    class Fp8Linear(torch.nn.Module):
        """A frozen linear layer with an FP8 weight (e4m3, [out, in]) and a scale per output channel. Buffers,
        not parameters: nothing here is trained, and the optimizer never sees it."""

        def __init__(self, weight8, scale, bias=None):
            super().__init__()
            self.out_features, self.in_features = weight8.shape
            self.register_buffer("weight8", weight8)
            self.register_buffer("scale_row", scale.reshape(1, -1).float().contiguous())   # [1, out] fp32
            self.register_buffer("bias", None if bias is None else bias.detach())

        def dense_weight(self, dtype):
            """W8 * s_w as a dense [out, in] matrix in `dtype` (the input gradient's matmul)."""
            return (self.weight8.to(dtype) * self.scale_row.t().to(dtype))

        def forward(self, x):
            return _fp8_fn().apply(x, self)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3, scale=per channel"

    return Fp8Linear


@functools.cache
def fp8_linear_class():
    """The Fp8Linear class (made on first use: torch is imported lazily, as in the rest of train/)."""
    return _module_class()


def to_fp8(linear):
    """An Fp8Linear of a frozen nn.Linear or bitsandbytes 4-bit Linear (its weight dequantized first)."""
    import torch
    from pipeline.lm.lora_fused import dense_weight
    # the weight's rows are its output channels: rounded as the inputs' rows are, one scale each
    w8, scale = quantize_rows(dense_weight(linear, torch.float32).contiguous())
    return fp8_linear_class()(w8, scale, getattr(linear, "bias", None))


def _convertible(m) -> bool:
    """A frozen plain nn.Linear, or a bitsandbytes 4-bit Linear (lora_fused.base_supported's rule), whose sizes
    the FP8 kernels take (multiples of 16)."""
    from pipeline.lm.lora_fused import base_supported
    import torch
    try:
        import bitsandbytes as bnb
        kinds = (torch.nn.Linear, bnb.nn.Linear4bit)
    except ImportError:
        kinds = (torch.nn.Linear,)
    if not isinstance(m, kinds) or not base_supported(m):
        return False
    return m.in_features % 16 == 0 and m.out_features % 16 == 0


def fp8_base(model) -> int:
    """Replace each frozen linear layer of `model` (call after add_lora: LoRA's base layers are swapped under
    PEFT's layers, which keep working) by an Fp8Linear; the output head and anything trained are left as they
    are. Frees each replaced weight as it goes (peak: the model plus one weight's fp32 copy). Returns how many."""
    import torch
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if child is not head and _convertible(child)]
    n = len(swaps)
    while swaps:                       # popped: the list holds no replaced layer, so each one's weight goes now
        parent, name, child = swaps.pop()
        setattr(parent, name, to_fp8(child))
        child = None
    if n and next(model.parameters()).is_cuda:
        torch.cuda.empty_cache()
    log.info("FP8 base: %d frozen linear layers", n)
    return n
