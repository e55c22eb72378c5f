"""Fused LoRA linear layers: the frozen base matmul and the LoRA branch as one autograd step.

    fuse_lora(model, mode) -> int     patch each PEFT LoRA linear layer that qualifies (this model's
                                      instances only); returns how many were patched

Why. PEFT's LoRA forward for a 4-bit base clones the base output, casts the input to the adapter's
fp32 dtype, runs dropout and both LoRA matmuls in fp32, writes the (tokens x out_features) LoRA
output in fp32, scales it, casts it back and adds it. For the 14336-wide MLP projections of a 7B
model that is about 3 GB of memory traffic per layer per 8192 tokens, paid again when gradient
checkpointing recomputes the layer: with LoRA on every linear layer it doubled the forward time
(bench/NOTES.md). Here, per layer, with s = alpha / r:

    forward   y = base(x);  xd = dropout(x);  h = xd @ A^T;  y += s * h @ B^T   (in place, one GEMM)
    backward  gh = s * g @ B;  gB = s * g^T @ h;  gA = gh^T @ xd;
              gx = g @ W + dropout_backward(gh @ A)      (W dequantized once, as bitsandbytes does)

Saved for backward: h (tokens x r) and, on the CPU, xd and the dropout mask (x itself when dropout
is off). On CUDA with dropout, the mask is drawn inside Triton kernels (lora_triton.py) from a seed
and drawn again in the backward: only x is kept, which the layer's sibling projections share.
The adapter weights stay fp32 (the optimizer's master copy); the LoRA matmuls run in the compute
dtype (bf16 on GPUs) with fp32 accumulation and their gradients come back in fp32. On the CPU
(fp32) the fused layer matches PEFT's outputs and gradients (tests/unit/test_lora_fused.py).

A patched layer falls back to PEFT's own forward whenever it is not plain LoRA: adapters disabled
(the base-model evaluation), merged, several active adapters, DoRA or other variants, LoRA bias,
per-call adapter names. Saved adapters are PEFT's, unchanged.

    fuse_swiglu_down(model) -> int    on top of fuse_lora: each SwiGLU MLP whose down projection is a
                                      fused LoRA layer keeps gate and up only; returns how many

Why. The fused down projection keeps its input c = silu(gate) * up for its backward (gA needs it),
while the SwiGLU's own backward keeps gate and up: three (tokens x intermediate) tensors per layer,
235 MB each for a 7B at 8192 tokens. c is one element-wise pass over gate and up, so the MLP's SwiGLU
and down projection run as one autograd step that keeps gate and up and makes c again in its
backward: a layer kept by the checkpoint budget (kernels.CheckpointBudget) costs ~23% less, so the
budget keeps more layers and recomputes fewer. Same numbers: c is made by the same kernel both times
(Liger's where the MLP ran Liger's, torch's otherwise), and the dropout mask is the Triton kernels' seed
or, on PyTorch's path, the kept mask.
"""
from __future__ import annotations

import functools
import logging
import weakref

log = logging.getLogger(__name__)


def _dense_weight(base, dtype):
    """The base layer's weight as a dense [out, in] matrix in `dtype` (4-bit: dequantized)."""
    w = base.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(w.data, qs).to(dtype)
    return w.to(dtype)


def _lora_forward(ctx, x, A, B, layer, scale: float, p: float):
    """y = base(x) + scale * dropout(x) @ A^T @ B^T (the LoRA part added in place, one GEMM). Returns (y, xd, mask,
    h, a, b): xd the dropped input on PyTorch's dropout path (x itself otherwise), mask PyTorch's dropout mask or
    None, h = xd @ A^T, a and b the adapter in the compute dtype. Sets ctx.seed (the Triton kernels' dropout seed,
    or None), ctx.layer, ctx.scale, ctx.p and the adapter's dtypes for _lora_backward."""
    import torch
    y = layer.base_layer(x)               # autograd is off in here: bitsandbytes takes its plain path
    if not y.is_contiguous():
        y = y.contiguous()
    K, N = x.shape[-1], y.shape[-1]
    dt = y.dtype
    a, b = A.to(dt), B.to(dt)
    x2 = x.reshape(-1, K).to(dt)
    ctx.seed = None
    if p > 0 and _triton_ok(x2):
        # dropout inside the kernels, redrawn in the backward from a seed (the CPU generator:
        # checkpointing restores it, so a recompute draws the same seed)
        x2 = x2.contiguous()
        ctx.seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        from pipeline.lm.lora_triton import lora_down   # imports triton: only where it is usable
        xd, mask = x2, None
        h = lora_down(x2, a, ctx.seed, p, _sm_count(x2.device))
    elif p > 0:
        xd, mask = torch.native_dropout(x2, p, True)
        h = xd @ a.t()
    else:
        xd, mask = x2, None
        h = xd @ a.t()                    # [tokens, r]
    y.view(-1, N).addmm_(h, b.t(), alpha=scale)
    ctx.layer, ctx.scale, ctx.p = layer, scale, p
    ctx.A_dtype, ctx.B_dtype = A.dtype, B.dtype
    return y, xd, mask, h, a, b


def _lora_backward(ctx, gy, xd, mask, h, a, b, need_gx: bool, need_gA: bool, need_gB: bool):
    """The gradients of _lora_forward's y: (gx as [tokens, in_features] in the compute dtype, gA, gB), each
    None where not needed. xd and mask: as _lora_forward returned them."""
    import torch
    g = gy.reshape(-1, gy.shape[-1]).to(h.dtype)
    gx = gA = gB = None
    gh = (g @ b).mul_(ctx.scale)           # [tokens, r]
    if need_gB:
        gB = (g.t() @ h).mul_(ctx.scale).to(ctx.B_dtype)
    if need_gx:
        w = _dense_weight(ctx.layer.base_layer, g.dtype)
        gx = g @ w
        del w
    if ctx.seed is not None:                # Triton: gA and the dropout part of gx in one pass over x
        if gx is not None or need_gA:
            from pipeline.lm.lora_triton import lora_down_backward   # imports triton (see lora_down)
            ga = lora_down_backward(xd, gh, a, gx, ctx.seed, ctx.p, _sm_count(xd.device))
            gA = ga.to(ctx.A_dtype) if need_gA else None
    else:
        if need_gA:
            gA = (gh.t() @ xd).to(ctx.A_dtype)
        if gx is not None and mask is None:
            gx.addmm_(gh, a)
        elif gx is not None:
            gx.add_(torch.ops.aten.native_dropout_backward(gh @ a, mask, 1.0 / (1.0 - ctx.p)))
    return gx, gA, gB


def _autograd_fn():
    import torch

    class FusedLoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, A, B, layer, scale: float, p: float):
            y, xd, mask, h, a, b = _lora_forward(ctx, x, A, B, layer, scale, p)
            ctx.save_for_backward(xd, mask, h, a, b)
            ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
            return y

        @staticmethod
        def backward(ctx, gy):
            need = ctx.needs_input_grad
            gx, gA, gB = _lora_backward(ctx, gy, *ctx.saved_tensors, need[0], need[1], need[2])
            if gx is not None:
                gx = gx.view(ctx.x_shape).to(ctx.x_dtype)
            return gx, gA, gB, None, None, None

    return FusedLoraLinear


def _triton_ok(x) -> bool:
    """The Triton dropout kernels: CUDA, half precision, element offsets within int32."""
    import torch
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.numel() < 2**31
            and _triton_importable())


@functools.cache
def _triton_importable() -> bool:
    try:
        import pipeline.lm.lora_triton  # noqa: F401
        return True
    except Exception as e:  # no Triton: PyTorch's dropout
        log.info("Triton not usable (%s): LoRA dropout through PyTorch", e)
        return False


@functools.cache
def _sm_count(device) -> int:
    """Multiprocessors of the device (the kernels size their grids by it); 4 off CUDA (the interpreter)."""
    import torch
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.cache
def _fn():
    """The autograd Function (made on first use: torch is imported lazily, as in the rest of train/)."""
    return _autograd_fn()


def _plain_lora(layer) -> bool:
    """True when the layer's current state is one plain LoRA adapter on a supported base."""
    if layer.disable_adapters or layer.merged:
        return False
    active = layer.active_adapters
    if len(active) != 1:
        return False
    name = active[0]
    return (name in layer.lora_A and name not in getattr(layer, "lora_variant", {})
            and not getattr(layer, "lora_bias", {}).get(name, False))


class FusedForward:
    """The patched `forward` of one layer. It holds the layer weakly: a bound method would make a
    reference cycle (layer -> forward -> layer) that keeps a discarded model's GPU memory alive until
    the garbage collector happens to run (seen on the H100: 3.4 GB of a previous model still allocated)."""

    __slots__ = ("layer", "__weakref__")

    def __init__(self, layer):
        self.layer = weakref.ref(layer)

    def __call__(self, x, *args, **kwargs):
        return _fused_forward(self.layer(), x, *args, **kwargs)


def _fused_forward(self, x, *args, **kwargs):
    import torch
    if args or kwargs or not _plain_lora(self):
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    drop = self.lora_dropout[name]
    p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    return _fn().apply(x, self.lora_A[name].weight, self.lora_B[name].weight, self, float(self.scaling[name]), p)


def base_supported(base) -> bool:
    """A frozen plain nn.Linear, or a bitsandbytes 4-bit Linear in the GPU layout."""
    import torch
    if getattr(base, "bias", None) is not None and base.bias.requires_grad:
        return False
    if base.weight.requires_grad:
        return False
    try:
        import bitsandbytes as bnb
        if isinstance(base, bnb.nn.Linear4bit):
            qs = getattr(base.weight, "quant_state", None)
            # the CPU inference repacking (AVX512-BF16) has another layout: dequantize_4bit cannot read it
            return qs is not None and not getattr(qs, "packing_format_for_cpu", False)
    except ImportError:
        pass
    return type(base) is torch.nn.Linear


def fuse_lora(model, mode: str = "auto") -> int:
    """Patch the PEFT LoRA linear layers of `model` whose base is supported. mode: auto (every layer
    that qualifies), on (the same, but an error if none does), off (nothing)."""
    if mode == "off":
        return 0
    from peft.tuners.lora import LoraLayer
    n, skipped = 0, []
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer) or not hasattr(m, "lora_A") or not hasattr(m, "base_layer"):
            continue
        if isinstance(vars(m).get("forward"), FusedForward):
            n += 1
            continue
        if not base_supported(m.get_base_layer()) or type(m).__name__ not in ("Linear", "Linear4bit"):
            skipped.append(name)
            continue
        m.forward = FusedForward(m)
        n += 1
    if mode == "on" and n == 0:
        raise RuntimeError("train.fused_lora is 'on' but no LoRA layer has a supported base (a frozen "
                           "nn.Linear or a bitsandbytes 4-bit Linear): set train.fused_lora to auto or off")
    if skipped:
        log.info("fused LoRA: %d layers patched, %d left to PEFT (unsupported base): %s", n, len(skipped), skipped[:4])
    else:
        log.debug("fused LoRA: %d layers patched", n)  # the training report has fused_lora_layers
    return n


def _swiglu_ops(liger: bool):
    """(forward, backward) of the SwiGLU product c = silu(gate) * up: Liger's Triton kernels where the MLP ran
    Liger's (train.fused_kernels; the backward writes d_gate, d_up over gate, up), torch's otherwise."""
    if liger:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
        return (lambda g, u: swiglu_forward(g, u)[2]), swiglu_backward
    return _torch_swiglu, _torch_swiglu_backward


def _torch_swiglu(gate, up):
    import torch
    return torch.nn.functional.silu(gate) * up


def _torch_swiglu_backward(gate, up, gc):
    import torch
    g32 = gate.float()
    sig = torch.sigmoid(g32)
    silu = g32 * sig
    d_up = (gc * silu).to(up.dtype)
    d_gate = (gc * up * (sig * (1 + g32 * (1 - sig)))).to(gate.dtype)
    return d_gate, d_up


def _swiglu_down_fn():
    import torch

    class SwiGLUDownLora(torch.autograd.Function):
        """y = down(silu(gate) * up) with the down projection a fused LoRA layer (see FusedLoraLinear):
        saves gate, up, h and (PyTorch's dropout only) the mask; c is made again in the backward."""

        @staticmethod
        def forward(ctx, gate, up, A, B, layer, scale: float, p: float, liger: bool):
            gate, up = gate.contiguous(), up.contiguous()
            ctx.liger = liger
            swiglu, _ = _swiglu_ops(liger)
            y, _, mask, h, a, b = _lora_forward(ctx, swiglu(gate, up), A, B, layer, scale, p)
            ctx.save_for_backward(gate, up, mask, h, a, b)   # not the product: made again in the backward
            return y

        @staticmethod
        def backward(ctx, gy):
            gate, up, mask, h, a, b = ctx.saved_tensors
            swiglu, swiglu_backward = _swiglu_ops(ctx.liger)
            c = swiglu(gate, up)
            c = c.reshape(-1, c.shape[-1]).to(h.dtype)
            # the down projection's input as _lora_forward kept it: dropped on PyTorch's dropout path
            xd = c if mask is None else torch.ops.aten.native_dropout_backward(c, mask, 1.0 / (1.0 - ctx.p))
            need = ctx.needs_input_grad
            gc, gA, gB = _lora_backward(ctx, gy, xd, mask, h, a, b, need[0] or need[1], need[2], need[3])
            del c, xd
            d_gate = d_up = None
            if gc is not None:
                d_gate, d_up = swiglu_backward(gate, up, gc.view(gate.shape).to(gate.dtype))
            return d_gate, d_up, gA, gB, None, None, None, None

    return SwiGLUDownLora


@functools.cache
def _swiglu_fn():
    return _swiglu_down_fn()


# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (Liger's SwiGLU MLP is the same)
SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


class FusedSwiGLUForward:
    """The patched `forward` of one SwiGLU MLP; holds the MLP weakly (see FusedForward) and the forward
    it replaced as a plain function, which runs whenever the down projection is not plain fused LoRA
    or no gradient is taken (evaluation, generation). The product uses the kernel that forward used."""

    __slots__ = ("mlp", "previous", "liger", "__weakref__")

    def __init__(self, mlp, previous):
        self.mlp = weakref.ref(mlp)
        self.previous = previous
        self.liger = (getattr(previous, "__module__", None) or "").startswith("liger_kernel")

    def __call__(self, x):
        import torch
        mlp = self.mlp()
        down = mlp.down_proj
        if not torch.is_grad_enabled() or not _plain_lora(down):
            return self.previous(mlp, x)
        name = down.active_adapters[0]
        drop = down.lora_dropout[name]
        p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
        return _swiglu_fn().apply(mlp.gate_proj(x), mlp.up_proj(x), down.lora_A[name].weight,
                                  down.lora_B[name].weight, down, float(down.scaling[name]), p, self.liger)


def fuse_swiglu_down(model) -> int:
    """Patch each SwiGLU MLP of `model` whose down projection fuse_lora has patched (this model's
    instances only; call after Liger's kernels and fuse_lora). Returns how many MLPs were patched."""
    n = 0
    for m in model.modules():
        if type(m).__name__ not in SWIGLU_MLPS or not all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj")):
            continue
        current = vars(m).get("forward")
        if isinstance(current, FusedSwiGLUForward):
            n += 1
            continue
        act = getattr(getattr(m, "config", None), "hidden_act", None)
        if act not in ("silu", "swish") or not isinstance(vars(m.down_proj).get("forward"), FusedForward):
            continue
        # the forward in place now: the class's own, or Liger's bound to this instance; any other patch stays
        previous = type(m).forward if current is None else getattr(current, "__func__", None)
        if previous is None:
            continue
        m.forward = FusedSwiGLUForward(m, previous)
        n += 1
    log.debug("fused SwiGLU + down projection: %d MLPs", n)
    return n
