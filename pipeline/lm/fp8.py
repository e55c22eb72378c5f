"""FP8 matmuls for the frozen base layers (train.base_matmul: fp8), on GPUs that have FP8 tensor cores.

    require(device)               raise Fp8Unavailable (saying why) unless rowwise-scaled FP8 matmuls run there
    usable(a, n) -> bool          a [M, K] @ (a [n, K] operand).T can go through matmul_nt (a CUDA bf16 2-D
                                  tensor, K and n multiples of 16)
    quantize_rows(t) -> (q, s)    t (2-D, any strides) as float8_e4m3fn, one fp32 scale per row: t ~ q * s
    dequantize_rows(q, s)         q * s in fp32 (tests, references)
    matmul_nt(a, b, fast_accum)   a @ b.T in bf16 through torch._scaled_mm, both operands quantized per row

Why hand-written. The frozen NF4 base's matmuls are most of a LoRA step (forward, the recomputation of
checkpointed layers, the input-gradient backward). No library does them in FP8 inside the fused LoRA step:
torchao's float8 training converts nn.Linear modules that own trainable weights (its weight gradient is
FP8 too), Transformer Engine has its own modules and no NF4 storage, and bitsandbytes' 4-bit matmul
dequantizes to the compute dtype. Here the NF4 weight is dequantized to bf16 (as the bf16 path does) and
quantized to FP8 per use; nothing is cached across steps (the weights stay NF4 in memory).

Scaling is rowwise along the contraction dimension for both operands (per token for activations and
gradients, per output channel of W in the forward, per input channel of W in the input-gradient backward):
one fp32 scale per row, amax / 448, so each row uses the whole e4m3 range. torch._scaled_mm's rowwise mode
(CUTLASS kernels on sm89 and sm90) takes scale_a [M, 1] and scale_b [1, N], a row-major first operand and
a column-major second one, both inner dimensions multiples of 16, and returns bf16. e4m3 (3 mantissa bits)
is used for gradients too: with one scale per row its 2^-9..448 range per row is enough, and the rowwise
kernels take e4m3 operands.
"""
from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

E4M3_MAX = 448.0
# the scale's reciprocal is rounded to the operand's dtype (bf16) before the multiply; this margin keeps
# amax * inv <= 448 after both roundings, so the cast to e4m3 never sees a value out of its range
_MARGIN = 1.0 - 2.0 ** -8
_AMAX_FLOOR = 1e-30   # an all-zero row: a finite scale, and zeros stay zeros


class Fp8Unavailable(RuntimeError):
    """train.base_matmul is fp8 but this GPU or this torch cannot do rowwise-scaled FP8 matmuls."""


def _e4m3():
    import torch
    return torch.float8_e4m3fn


def quantize_rows(t):
    """(q, scale): q = t / scale as float8_e4m3fn, contiguous [R, C] whatever t's strides (a transposed
    view gives the transposed copy, the layout _scaled_mm's second operand needs); scale [R, 1] fp32 with
    scale ~ amax(|row|) / 448. dequantize_rows(q, scale) ~ t with e4m3's relative error (2^-4)."""
    if t.dim() != 2:
        raise ValueError(f"quantize_rows takes a 2-D tensor, got shape {tuple(t.shape)}")
    fn = _compiled_quantize() if t.is_cuda else None
    if fn is not None:
        try:
            q, scale = fn(t)
            return (q if q.is_contiguous() else q.contiguous()), scale
        except Exception as e:   # a compiler problem costs speed, not the run
            log.warning("FP8: the compiled quantization failed (%s: %s); using the eager one", type(e).__name__, e)
            _compiled_quantize.cache_clear()
            _COMPILE[0] = False
    return _quantize_rows_eager(t)


def _quantize_rows_eager(t):
    """quantize_rows in separate torch ops: the amax, the scaled copy (contiguous) and the cast read or write
    the tensor five times over."""
    import torch
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dim=1, keepdim=True)   # no |t| temporary
    inv = (E4M3_MAX * _MARGIN / amax.float().clamp(min=_AMAX_FLOOR)).to(t.dtype)
    scaled = torch.empty(t.shape, dtype=t.dtype, device=t.device)                 # contiguous, even for a view
    torch.mul(t, inv, out=scaled)
    q = scaled.to(_e4m3())
    return q, inv.float().reciprocal()


def _quantize_rows_fused(t):
    """The same scales; compiled, the amax, the multiply and the cast are one kernel per row block that reads
    the tensor once (eager: ~0.24 s of a 7B all-linear step, bench/NOTES.md). The product is rounded to e4m3
    once, from fp32 (eager rounds it to bf16 first): values may differ from the eager ones by one e4m3 step."""
    import torch
    amax = t.abs().amax(dim=1, keepdim=True).float().clamp(min=_AMAX_FLOOR)
    inv = (E4M3_MAX * _MARGIN / amax).to(t.dtype)
    q = (t.float() * inv.float()).to(_e4m3())
    return q, inv.float().reciprocal()


_COMPILE = [True]   # set False after a compiled call failed: the eager quantization from then on


@functools.cache
def _compiled_quantize():
    """torch.compile of _quantize_rows_fused (dynamic shapes: one compile serves every layer and token count),
    or None where compiling is off or unavailable. Why compiled and not a hand-written kernel: inductor fuses
    the row reduction with the pointwise cast already; nothing to maintain here."""
    if not _COMPILE[0]:
        return None
    try:
        import torch
        return torch.compile(_quantize_rows_fused, dynamic=True)
    except Exception as e:
        log.warning("FP8: torch.compile unavailable (%s); the quantization runs eagerly", e)
        return None


def dequantize_rows(q, scale):
    return q.float() * scale


# where the FP8 path runs: CUDA (the GPU suite checks that it is an FP8 GPU); the unit tests add "cpu", where
# torch._scaled_mm has a reference kernel, to check the fused layer's FP8 math without a GPU
DEVICE_TYPES = ("cuda",)


def usable(a, n: int) -> bool:
    """a [M, K] times a [n, K] operand (transposed) can go through matmul_nt: a is a 2-D bf16 tensor on an
    FP8 device, M > 0, and K and n are multiples of 16 (what torch._scaled_mm takes)."""
    import torch
    return (a.device.type in DEVICE_TYPES and a.dtype == torch.bfloat16 and a.dim() == 2 and a.shape[0] > 0
            and a.shape[1] % 16 == 0 and n % 16 == 0)


def matmul_nt(a, b, fast_accum: bool = False):
    """a [M, K] @ b [N, K].T -> [M, N] bf16, each operand quantized per row (over K) to e4m3. b may be
    any view (W.t() for the input-gradient backward): quantize_rows makes the contiguous copy."""
    import torch
    qa, sa = quantize_rows(a)
    qb, sb = quantize_rows(b)
    # qb.t(): [K, N] column-major, the layout the second operand must have
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb.reshape(1, -1), out_dtype=torch.bfloat16,
                            use_fast_accum=fast_accum)


def require(device) -> None:
    """Raise Fp8Unavailable naming what is missing unless rowwise FP8 matmuls run on `device` (checked by
    running one: a torch build or GPU without the rowwise kernels fails here, not in the first step)."""
    import torch
    dev = torch.device(device)
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        raise Fp8Unavailable(f"train.base_matmul is fp8 but torch {torch.__version__} has no torch._scaled_mm / "
                             "float8 types: upgrade torch or set train.base_matmul: bf16")
    if dev.type != "cuda":
        raise Fp8Unavailable(f"train.base_matmul is fp8 but the model is on {dev.type}: FP8 matmuls need a CUDA GPU "
                             "with FP8 tensor cores (compute capability 8.9 or higher: Ada, Hopper); set "
                             "train.base_matmul: bf16")
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 9):
        raise Fp8Unavailable(f"train.base_matmul is fp8 but {torch.cuda.get_device_name(dev)} has compute capability "
                             f"{cap[0]}.{cap[1]}; FP8 matmuls need 8.9 or higher (Ada, Hopper): set "
                             "train.base_matmul: bf16")
    _probe(dev.index if dev.index is not None else torch.cuda.current_device())


@functools.cache
def _probe(index: int) -> None:
    import torch
    dev = torch.device("cuda", index)
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(32, 64, device=dev, generator=g).to(torch.bfloat16)
    b = torch.randn(48, 64, device=dev, generator=g).to(torch.bfloat16)
    try:
        y = matmul_nt(a, b).float()
    except Exception as e:
        raise Fp8Unavailable(f"train.base_matmul is fp8 but torch {torch.__version__} cannot run a rowwise-scaled "
                             f"FP8 matmul on {torch.cuda.get_device_name(dev)} ({type(e).__name__}: {e}); set "
                             "train.base_matmul: bf16") from e
    ref = a.float() @ b.float().t()
    err = ((y - ref).norm() / ref.norm()).item()
    if not err < 0.1:   # e4m3 gives ~4%; more (or NaN) means the scales are not applied as this module assumes
        raise Fp8Unavailable(f"train.base_matmul is fp8 but a rowwise-scaled FP8 matmul on "
                             f"{torch.cuda.get_device_name(dev)} is off by {err:.2g} (relative) from bf16; set "
                             "train.base_matmul: bf16")
