"""Checks of pipeline/lm/lora_triton.py for tests/unit/test_lora_triton.py, run by it in a child
process with TRITON_INTERPRET=1 (Triton's interpreter on the CPU). Usage: python lora_triton_checks.py CASE"""
from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import triton.runtime.interpreter as ti  # noqa: E402

_orig = ti._patch_lang_tensor


def _patched(tensor, scope):  # triton 3.6's interpreter calls int() on 1-element arrays; numpy >= 2.4 refuses
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


ti._patch_lang_tensor = _patched

from pipeline.lm import lora_triton as lt  # noqa: E402

CASES = {"fp32_r8": (100, 80, 8, torch.float32, 1e-5), "fp32_r16": (130, 200, 16, torch.float32, 1e-5),
         "fp16_r32": (64, 96, 32, torch.float16, 3e-3)}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_case(M, K, r, dtype, tol):
    g = torch.Generator().manual_seed(M + K + r)
    x = torch.randn(M, K, generator=g).to(dtype)
    a = (torch.randn(r, K, generator=g) * 0.1).to(dtype)
    gh = torch.randn(M, r, generator=g).to(dtype)
    gx0 = torch.randn(M, K, generator=g).to(dtype)
    p, seed = 0.3, 1234 + M
    s = lt.dropout_scale(M, K, seed, p, "cpu")
    vals = set(round(v, 5) for v in s.unique().tolist())
    assert vals == {0.0, round(1 / 0.7, 5)}, vals
    h = lt.lora_down(x, a, seed, p, sm_count=2)   # split-K: several column splits
    assert h.shape == (M, r) and h.dtype == dtype, (h.shape, h.dtype)
    e = rel(h, (x.float() * s) @ a.float().t())
    assert e < tol, f"h: {e}"
    gx = gx0.clone()
    ga = lt.lora_down_backward(x, gh, a, gx, seed, p, sm_count=2)
    assert ga.shape == (r, K) and ga.dtype == torch.float32, (ga.shape, ga.dtype)
    e = rel(ga, gh.float().t() @ (x.float() * s))
    assert e < tol, f"gA: {e}"
    e = rel(gx.float() - gx0.float(), (gh.float() @ a.float()) * s)
    assert e < tol, f"gx: {e}"
    e = rel(lt.lora_down_backward(x, gh, a, None, seed, p, sm_count=2), ga)   # no input gradient wanted
    assert e < 1e-6, f"gA without gx: {e}"


def check_mask():
    s1 = lt.dropout_scale(257, 300, 7, 0.25, "cpu")
    s2 = lt.dropout_scale(257, 300, 7, 0.25, "cpu")
    s3 = lt.dropout_scale(257, 300, 8, 0.25, "cpu")
    assert torch.equal(s1, s2) and not torch.equal(s1, s3), "the mask must be a function of the seed alone"
    kept = (s1 > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01, kept                      # 77,100 draws: sd 0.0016
    assert (s1 > 0).float().mean(0).std() > 0, "whole columns kept or dropped"
    k1, k3 = (s1 > 0).float(), (s3 > 0).float()
    agree = (k1 == k3).float().mean().item()
    assert abs(agree - (0.75 ** 2 + 0.25 ** 2)) < 0.01, f"two seeds' masks are not independent: {agree}"
    c = torch.corrcoef(torch.stack([k1[:, :-1].reshape(-1), k1[:, 1:].reshape(-1)]))[0, 1].item()
    assert abs(c) < 0.02, f"neighbouring elements correlate: {c}"
    c = torch.corrcoef(torch.stack([k1[:-1].reshape(-1), k1[1:].reshape(-1)]))[0, 1].item()
    assert abs(c) < 0.02, f"neighbouring rows correlate: {c}"
    x, a = torch.randn(40, 70), torch.randn(16, 70)
    e = rel(lt.lora_down(x, a, 3, 0.0), x @ a.t())
    assert e < 1e-5, f"p=0: {e}"


def check_fused_layer():
    """The fused LoRA layer's Triton branch (the one CUDA takes with dropout), run here on the CPU:
    y, and the gradients of x, A and B, against a float64 reference with the kernels' own mask; and
    with x needing no gradient (the first layer), the same A and B gradients."""
    from types import SimpleNamespace
    from pipeline.lm import lora_fused as lf
    lf._triton_ok = lambda x: True          # CUDA-only otherwise
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(96, 80, bias=False)
    base.weight.requires_grad_(False)
    layer = SimpleNamespace(base_layer=base)
    A0, B0 = torch.randn(8, 96, generator=g) * 0.1, torch.randn(80, 8, generator=g) * 0.1
    x0 = torch.randn(3, 30, 96, generator=g)
    gy = torch.randn(3, 30, 80, generator=g)
    p, s_ = 0.3, 2.0
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    m = lt.dropout_scale(90, 96, seed, p, "cpu").double()
    X, W, A, B, G = x0.reshape(90, 96).double(), base.weight.double(), A0.double(), B0.double(), gy.reshape(90, 80).double()
    h = (X * m) @ A.t()
    gh = s_ * G @ B
    ref = {"y": X @ W.t() + s_ * h @ B.t(), "x": G @ W + (gh @ A) * m, "A": gh.t() @ (X * m), "B": s_ * G.t() @ h}
    for x_grad in (True, False):
        x = x0.clone().requires_grad_(x_grad)
        A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
        torch.manual_seed(5)                 # the layer draws the same seed
        y = lf._fn().apply(x, A, B, layer, s_, p)
        y.backward(gy)
        got = {"y": y.detach().reshape(90, 80), "A": A.grad, "B": B.grad}
        if x_grad:
            got["x"] = x.grad.reshape(90, 96)
        else:
            assert x.grad is None
        for k, v in got.items():
            e = rel(v.double(), ref[k])
            assert e < 1e-5, f"fused layer {k} (x needs grad: {x_grad}): {e}"


if __name__ == "__main__":
    name = sys.argv[1]
    {"mask": check_mask, "fused_layer": check_fused_layer}.get(name, lambda: check_case(*CASES[name]))()
    print(f"PASSED {name}")
