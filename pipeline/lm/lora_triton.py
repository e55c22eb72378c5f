"""Triton kernels for the fused LoRA layer with dropout (CUDA): the dropout mask is drawn inside the
kernels from a seed and redrawn in the backward, so dropout(x) and its mask are never written to
memory nor kept for the backward (the layer keeps x, which the other projections of the same input
keep too, and the tokens x r matrix h).

    lora_down(x, A, seed, p)                       -> h = dropout(x) @ A^T          (x read once)
    lora_down_backward(x, gh, A, gx, seed, p)      -> gA = gh^T @ dropout(x);  gx += dropout'(gh @ A) in place

x: [M, K] contiguous, A: [r, K]; dropout keeps an element with probability 1 - p and scales it by
1 / (1 - p), as torch.nn.Dropout does; the keep decision of element (m, k) is a function of
(seed, m * K + k) only, so the forward, a checkpoint's recompute and the backward
see the same mask (an integer hash, see _keep_scale). Memory traffic per element of x: forward 2 bytes (PyTorch's dropout + matmul: 7),
backward 6 bytes (PyTorch: 17). Tested against a PyTorch reference with the same mask, on the GPU
and, in Triton's interpreter, on the CPU (tests/unit/test_lora_triton.py).
"""
from __future__ import annotations

import triton
import triton.language as tl

# Launch configurations: block rows BM, block columns BK, warps and pipeline stages per program; WAVES
# programs per multiprocessor (the split of K in the forward, of M in the backward, is sized by it).
# These are the fastest of bench/lora_kernels.py's sweep on an H200 (one all-linear 7B layer at 8192
# tokens: forward 479 -> 435 us, backward 1212 -> 921 us against 64x128 / 64x64, 4 warps, 4 waves).
FWD = {"BM": 128, "BK": 64, "num_warps": 8, "num_stages": 4, "WAVES": 8}
BWD = {"BM": 32, "BK": 64, "num_warps": 8, "num_stages": 3, "WAVES": 8}


@triton.jit
def _keep_scale(seed, offs, p, inv):
    """inv where the element is kept (probability 1 - p), 0 where it is dropped. The uniform number of
    element `offs` is an integer hash of offs XOR seed (lowbias32, from Wellons' hash-prospector:
    full avalanche, ~10 integer operations) with 24-bit resolution. tl.rand's Philox-4x32-10 costs
    ~10x more and keeps one of its four outputs: per element that was more arithmetic than the
    kernel's memory traffic."""
    x = offs.to(tl.uint32) ^ seed.to(tl.uint32)
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    u = (x >> 8).to(tl.float32) * (1.0 / 16777216.0)
    return tl.where(u >= p, inv, 0.0)


@triton.jit
def _down_fwd(X, A, H, M, K, seed, p, inv, stride_xm, stride_ar, k_per_split,
              R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    """H (fp32, zeroed) += dropout(X[rows, cols]) @ A[:, cols]^T for this program's rows and its
    split of the columns (split-K: enough programs to keep every SM streaming)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    k_start = tl.program_id(1) * k_per_split
    rr = tl.arange(0, R)
    mmask = rm[:, None] < M
    acc = tl.zeros((BM, R), dtype=tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk[None, :] < K
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=mmask & kmask, other=0.0)
        xs = (x.to(tl.float32) * _keep_scale(seed, rm[:, None] * K + rk[None, :], p, inv)).to(x.dtype)
        a = tl.load(A + rr[:, None] * stride_ar + rk[None, :], mask=kmask, other=0.0)
        acc += tl.dot(xs, tl.trans(a))
    tl.atomic_add(H + rm[:, None] * R + rr[None, :], acc, mask=mmask)


@triton.jit
def _down_bwd(X, GH, A, GX, GA, M, K, seed, p, inv, stride_xm, stride_ghm, stride_ar, stride_gxm, m_per_split,
              R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, HAS_GX: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = tl.arange(0, R)
    kmask = rk[None, :] < K
    a = tl.load(A + rr[:, None] * stride_ar + rk[None, :], mask=kmask, other=0.0)
    acc = tl.zeros((R, BK), dtype=tl.float32)
    m_start = pid_s * m_per_split
    for m0 in range(m_start, m_start + m_per_split, BM):
        rm = m0 + tl.arange(0, BM)
        mmask = rm[:, None] < M
        msk = mmask & kmask
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :], mask=msk, other=0.0)
        ks = _keep_scale(seed, rm[:, None] * K + rk[None, :], p, inv)
        gh = tl.load(GH + rm[:, None] * stride_ghm + rr[None, :], mask=mmask, other=0.0)
        xs = (x.to(tl.float32) * ks).to(x.dtype)
        acc += tl.dot(tl.trans(gh), xs)
        if HAS_GX:
            t = tl.dot(gh, a)
            gx_ptr = GX + rm[:, None] * stride_gxm + rk[None, :]
            gx = tl.load(gx_ptr, mask=msk, other=0.0)
            tl.store(gx_ptr, (gx.to(tl.float32) + t * ks).to(gx.dtype), mask=msk)
    tl.store(GA + pid_s * R * K + rr[:, None] * K + rk[None, :], acc, mask=kmask)


def _padded(t, size: int, dim: int):
    """Zero-pad dimension `dim` of a 2-D tensor up to `size` (tl.dot needs >= 16)."""
    import torch
    if t.shape[dim] == size:
        return t.contiguous()
    shape = list(t.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def _rpad(r: int) -> int:
    return max(16, -(-r // 16) * 16)


def lora_down(x, a, seed: int, p: float, sm_count: int = 132, config: dict | None = None):
    """h = dropout(x) @ a^T, dropout drawn from `seed`. x: [M, K] contiguous; a: [r, K]; h: [M, r]."""
    import torch
    c = config or FWD
    bm, bk = c["BM"], c["BK"]
    M, K = x.shape
    r = a.shape[0]
    R = _rpad(r)
    ap = _padded(a, R, 0)
    mb = triton.cdiv(M, bm)
    splits = max(1, min(triton.cdiv(K, bk), triton.cdiv(c["WAVES"] * sm_count, mb)))
    k_per_split = triton.cdiv(triton.cdiv(K, splits), bk) * bk
    splits = triton.cdiv(K, k_per_split)
    h = torch.zeros((M, R), dtype=torch.float32, device=x.device)
    _down_fwd[(mb, splits)](x, ap, h, M, K, seed, p, 1.0 / (1.0 - p), x.stride(0), ap.stride(0), k_per_split,
                            R=R, BM=bm, BK=bk, num_warps=c["num_warps"], num_stages=c["num_stages"])
    h = h.to(x.dtype)
    return h if R == r else h[:, :r]


def lora_down_backward(x, gh, a, gx, seed: int, p: float, sm_count: int = 132, config: dict | None = None):
    """gx += dropout'(gh @ a) in place (gx: [M, K] contiguous, or None when x needs no gradient);
    returns gA = gh^T @ dropout(x) in fp32."""
    import torch
    c = config or BWD
    bm, bk = c["BM"], c["BK"]
    M, K = x.shape
    r = a.shape[0]
    R = _rpad(r)
    ap, ghp = _padded(a, R, 0), _padded(gh, R, 1)
    kb = triton.cdiv(K, bk)
    splits = max(1, min(triton.cdiv(M, bm), (c["WAVES"] * sm_count) // kb))
    m_per_split = triton.cdiv(triton.cdiv(M, splits), bm) * bm
    splits = triton.cdiv(M, m_per_split)
    ga = torch.empty((splits, R, K), dtype=torch.float32, device=x.device)
    _down_bwd[(kb, splits)](x, ghp, ap, x if gx is None else gx, ga, M, K, seed, p, 1.0 / (1.0 - p), x.stride(0),
                            ghp.stride(0), ap.stride(0), x.stride(0) if gx is None else gx.stride(0), m_per_split,
                            R=R, BM=bm, BK=bk, HAS_GX=gx is not None, num_warps=c["num_warps"], num_stages=c["num_stages"])
    ga = ga.sum(0)
    return ga if R == r else ga[:r]


@triton.jit
def _scale_kernel(OUT, M, K, seed, p, inv, BM: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    msk = (rm[:, None] < M) & (rk[None, :] < K)
    tl.store(OUT + rm[:, None] * K + rk[None, :], _keep_scale(seed, rm[:, None] * K + rk[None, :], p, inv), mask=msk)


def dropout_scale(M: int, K: int, seed: int, p: float, device):
    """The [M, K] float32 matrix of 0 / (1 / (1 - p)) that the kernels apply for `seed` (for tests)."""
    import torch
    out = torch.empty((M, K), dtype=torch.float32, device=device)
    _scale_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](out, M, K, seed, p, 1.0 / (1.0 - p), BM=32, BK=32)
    return out
