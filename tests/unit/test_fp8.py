"""FP8 base matmuls (pipeline/lm/fp8.py, train.base_matmul) on the CPU: the rowwise quantization's scales,
range, round-trip error and layouts; torch._scaled_mm's rowwise mode (it runs on the CPU too) against a
dequantize-then-matmul reference; the switch's config checks, its refusal off a FP8 GPU, and the fused
layer's bf16 path wherever FP8 cannot run. The GPU side: tests/gpu/test_gpu_fp8.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import tiny_config  # noqa: E402

from pipeline.lm import fp8  # noqa: E402

E4M3_SUBNORMAL_STEP = 2.0 ** -9   # e4m3fn's spacing below its smallest normal (2^-6)


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def _rows(dtype=torch.float32):
    """Rows of very different magnitudes, one all zero, one with a single huge outlier."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 256, generator=g)
    t *= torch.tensor([1e-6, 1e-2, 1.0, 3.0, 1e3, 1e5, 1.0, 1.0])[:, None]
    t[6] = 0.0
    t[7, 17] = 5e4
    return t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_scales_range_and_round_trip(dtype):
    t = _rows(dtype)
    q, s = fp8.quantize_rows(t)
    assert q.dtype == torch.float8_e4m3fn and q.shape == t.shape and q.is_contiguous()
    assert s.dtype == torch.float32 and s.shape == (8, 1)
    qf = q.float()
    assert torch.isfinite(qf).all() and qf.abs().max() <= 448
    amax = t.float().abs().amax(dim=1, keepdim=True)
    live = amax[:, 0] > 0
    # the scale is amax / 448, a hair larger (the margin that keeps the cast in range)
    ratio = (s * 448 / amax)[live]
    assert ((ratio >= 1.0) & (ratio < 1.0 + 2 ** -6)).all(), ratio.flatten()
    assert torch.isfinite(s).all() and (s > 0).all()           # the zero row too
    assert (qf[6] == 0).all()
    # each row uses e4m3's range: its largest element lands near 448 (not flushed by another row's scale)
    assert (qf.abs().amax(dim=1)[live] >= 416).all()
    # round trip: e4m3's relative rounding (2^-4) plus bf16's intermediate (2^-8), or the subnormal step
    back = fp8.dequantize_rows(q, s)
    tf = t.float()
    bound = (2 ** -4 + 2 ** -7) * tf.abs() + 1.01 * E4M3_SUBNORMAL_STEP * s
    assert ((back - tf).abs() <= bound).all(), ((back - tf).abs() - bound).max()
    # typical elements (not the outlier row) come back within a few percent
    assert _rel(back[:6], tf[:6]) < 0.04


def test_quantize_rows_of_a_transposed_view_scales_per_column_and_is_contiguous():
    """The backward's layout: W.t() quantized per row of the view (per input channel of W), stored [K, N]
    contiguous so that its .t() is the column-major operand _scaled_mm takes."""
    wt = _rows().t().contiguous().t()    # the values of _rows() as a non-contiguous [8, 256] view
    assert not wt.is_contiguous()
    q, s = fp8.quantize_rows(wt)
    assert q.shape == (8, 256) and q.is_contiguous() and s.shape == (8, 1)
    q2, s2 = fp8.quantize_rows(wt.contiguous())
    assert torch.equal(q.float(), q2.float()) and torch.equal(s, s2)
    assert q.t().stride() == (1, 256)     # its transpose: column-major [256, 8]


def test_the_fused_quantization_gives_the_same_scales_and_values_within_one_e4m3_step():
    """What runs compiled on a GPU (_quantize_rows_fused: amax, multiply and cast in one kernel) against the
    eager ops, run here without compiling: the same per-row scales (to bf16's rounding of the reciprocal), values
    within one e4m3 step (the product rounds once from fp32 instead of through bf16), the same round-trip error."""
    t = _rows()
    qe, se = fp8._quantize_rows_eager(t)
    qf, sf = fp8._quantize_rows_fused(t)
    assert qf.dtype == torch.float8_e4m3fn and qf.shape == t.shape and sf.shape == (8, 1)
    assert torch.allclose(sf, se, rtol=2 ** -7, atol=0)
    assert torch.isfinite(qf.float()).all() and qf.float().abs().max() <= 448
    de, df = fp8.dequantize_rows(qe, se), fp8.dequantize_rows(qf, sf)
    step = 2 ** -3 * de.abs() + 1.01 * E4M3_SUBNORMAL_STEP * se     # one e4m3 step (3 mantissa bits)
    assert ((df - de).abs() <= step).all()
    assert abs(_rel(df[:6], t.float()[:6]) - _rel(de[:6], t.float()[:6])) < 0.005
    # a transposed view: quantize_rows hands _scaled_mm a contiguous copy whichever quantization ran
    wt = t.t().contiguous().t()
    qv, sv = fp8._quantize_rows_fused(wt)
    assert torch.equal(qv.contiguous().float(), qf.float()) and torch.equal(sv, sf)


def test_quantize_rows_refuses_other_than_2d():
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_rows(torch.ones(2, 3, 16))


def _reference_nt(a, b):
    """a @ b.T computed from the quantized operands in fp32: what _scaled_mm must return (to bf16 rounding)."""
    qa, sa = fp8.quantize_rows(a)
    qb, sb = fp8.quantize_rows(b)
    return fp8.dequantize_rows(qa, sa) @ fp8.dequantize_rows(qb, sb).t()


@pytest.mark.parametrize("layout", ["weight", "transposed"])
def test_matmul_nt_applies_the_row_scales_as_the_reference_does(layout):
    """torch._scaled_mm (its CPU kernel) with scale_a [M,1], scale_b [1,N]: equal to the dequantized matmul,
    and within e4m3's error of the exact product, for the forward's operand (W [N, K]) and the backward's
    (a transposed view). Row magnitudes spread over 1e-3..1e3 keep their own relative error."""
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(40, 128, generator=g) * torch.logspace(-2, 2, 40)[:, None]).bfloat16()
    w = (torch.randn(48, 128, generator=g) * torch.logspace(-3, 3, 48)[:, None]).bfloat16()
    b = w if layout == "weight" else w.t().contiguous().t()     # the same values as a non-contiguous view
    y = fp8.matmul_nt(a, b)
    assert y.dtype == torch.bfloat16 and y.shape == (40, 48)
    ref = _reference_nt(a, b)
    assert _rel(y, ref) < 5e-3                                  # bf16 output rounding only
    exact = a.float() @ b.float().t()
    assert _rel(y, exact) < 0.06
    # per output element scale: every column (output channel of very different size) keeps ~e4m3 precision
    col_err = (y.float() - exact).norm(dim=0) / exact.norm(dim=0)
    assert col_err.max() < 0.1, col_err.max()


def test_usable_only_for_bf16_on_an_fp8_device_with_dimensions_multiple_of_16(monkeypatch):
    a = torch.zeros(33, 64, dtype=torch.bfloat16)
    assert not fp8.usable(a, 48)                       # CPU tensors: the bf16 path
    monkeypatch.setattr(fp8, "DEVICE_TYPES", ("cuda", "cpu"))
    assert fp8.usable(a, 48)                           # any row count
    assert not fp8.usable(a, 40)                       # output dimension not a multiple of 16
    assert not fp8.usable(torch.zeros(33, 72, dtype=torch.bfloat16), 48)   # contraction not a multiple of 16
    assert not fp8.usable(a.float(), 48)               # fp32 compute
    assert not fp8.usable(torch.zeros(0, 64, dtype=torch.bfloat16), 48)


def test_require_refuses_the_cpu_naming_the_setting():
    with pytest.raises(fp8.Fp8Unavailable, match=r"train.base_matmul.*(8\.9|CUDA)"):
        fp8.require("cpu")


# ---- the fused layer ------------------------------------------------------------------------------

def _peft_tiny():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    c._attn_implementation = "sdpa"
    model = get_peft_model(LlamaForCausalLM(c), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.1)
    return model


def test_fuse_lora_fp8_is_refused_off_an_fp8_gpu_and_without_the_fused_layers():
    from pipeline.lm.lora_fused import FusedForward, fuse_lora
    model = _peft_tiny()
    with pytest.raises(fp8.Fp8Unavailable, match="train.base_matmul"):
        fuse_lora(model, "auto", "fp8")
    with pytest.raises(ValueError, match="train.fused_lora"):
        fuse_lora(model, "off", "fp8")
    with pytest.raises(ValueError, match="bf16 or fp8"):
        fuse_lora(model, "auto", "fp16")
    assert not any(isinstance(vars(m).get("forward"), FusedForward) for m in model.modules())   # nothing patched


def test_fp8_layers_take_the_bf16_path_for_cpu_tensors():
    """A layer set to FP8 computes exactly the bf16 path's loss and gradients where FP8 cannot run
    (here: CPU tensors), so the flag never changes results off a FP8 GPU."""
    from pipeline.lm import kernels
    from pipeline.lm.lora_fused import FusedForward, fuse_lora
    model = _peft_tiny()
    assert fuse_lora(model, "auto") == 14
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(3, 97, (2, 24), generator=g), "position_ids": torch.arange(24).repeat(2, 1),
             "targets": torch.randint(3, 97, (2, 24), generator=g)}

    def run():
        model.zero_grad(set_to_none=True)
        loss = kernels.loss_sum(model, batch, "cpu")
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ref = run()
    fused = [m.forward for m in model.modules() if isinstance(vars(m).get("forward"), FusedForward)]
    assert len(fused) == 14 and not any(f.fp8 for f in fused)
    for f in fused:
        f.fp8 = True
    got = run()
    assert got[0] == ref[0]
    assert all(torch.equal(got[1][n], ref[1][n]) for n in ref[1])


def test_fused_layer_fp8_math_forward_and_input_gradient(monkeypatch):
    """The fused layer's FP8 path itself, run on torch's CPU _scaled_mm kernel (DEVICE_TYPES widened; the GPU
    suite runs it on CUDA): y = x W^T and gx = g W from the per-token / per-channel quantized operands plus
    the LoRA branch in bf16, as a dequantized reference computes them; the LoRA gradients those of bf16."""
    from pipeline.lm.lora_fused import _fn
    model = _peft_tiny().to(torch.bfloat16)
    layer = model.base_model.model.model.layers[0].mlp.down_proj        # 128 -> 64
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W = layer.base_layer.weight.detach()
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 37, 128, generator=g).bfloat16()
    gy = torch.randn(2, 37, 64, generator=g).bfloat16()

    def run(flag):
        A.grad = B.grad = None
        x = x0.clone().requires_grad_(True)
        y = _fn().apply(x, A, B, layer, 2.0, 0.0, flag)
        y.backward(gy)
        return y.detach(), x.grad, A.grad.clone(), B.grad.clone()

    monkeypatch.setattr(fp8, "DEVICE_TYPES", ("cuda", "cpu"))
    y, gx, gA, gB = run(True)
    ref_y, ref_gx, ref_gA, ref_gB = run(False)
    x2, g2 = x0.reshape(-1, 128), gy.reshape(-1, 64)
    a, b = A.detach().bfloat16().float(), B.detach().bfloat16().float()
    h = x2.float() @ a.t()
    want_y = _reference_nt(x2, W) + 2.0 * h @ b.t()
    want_gx = _reference_nt(g2, W.t()) + (2.0 * g2.float() @ b) @ a
    assert _rel(y.reshape(-1, 64), want_y) < 2e-2
    assert _rel(gx.reshape(-1, 128), want_gx) < 2e-2
    # FP8 ran (not the bf16 path), within e4m3's error of it; the LoRA gradients do not depend on it
    assert not torch.equal(y, ref_y) and not torch.equal(gx, ref_gx)
    assert _rel(y, ref_y) < 0.08 and _rel(gx, ref_gx) < 0.08
    assert torch.equal(gA, ref_gA) and torch.equal(gB, ref_gB)


# ---- the config switch ------------------------------------------------------------------------------

def test_base_matmul_config_default_choices_and_refusals(tmp_path):
    from pydantic import ValidationError
    assert tiny_config(str(tmp_path)).train.base_matmul == "bf16"
    assert tiny_config(str(tmp_path), train__base_matmul="fp8").train.base_matmul == "fp8"
    with pytest.raises(ValidationError, match="base_matmul"):
        tiny_config(str(tmp_path), train__base_matmul="fp16")
    with pytest.raises(ValidationError, match="train.fused_lora"):
        tiny_config(str(tmp_path), train__base_matmul="fp8", train__fused_lora="off")
    with pytest.raises(ValidationError, match="bf16 compute"):
        tiny_config(str(tmp_path), train__base_matmul="fp8", model__compute_dtype="float32")


def test_base_matmul_config_from_the_command_line():
    from pipeline.config import load_config
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs/default.yaml", sets=["train.base_matmul=fp8"], environ={})
    assert cfg.train.base_matmul == "fp8"


def test_fp8_changes_the_settings_fingerprint_and_bf16_leaves_it_as_it_was(tmp_path):
    """An fp8 adapter is not current for a bf16 config (other weights) and the other way round; the bf16
    fingerprint has no new key, so adapters trained before the switch existed stay current."""
    from pipeline.fingerprint import fingerprint
    from pipeline.lm.compat import TRAIN_KEYS
    from pipeline.train.identity import settings_fingerprint
    bf16 = tiny_config(str(tmp_path))
    f8 = tiny_config(str(tmp_path), train__base_matmul="fp8")
    d = bf16.domains[0]
    assert settings_fingerprint(bf16, d) != settings_fingerprint(f8, d)
    before = {"model": bf16.model.model_dump(mode="json"), "hyper": bf16.hyper_for(d).model_dump(mode="json"),
              "train": {k: getattr(bf16.train, k) for k in TRAIN_KEYS + ("gradient_checkpointing",)}}
    assert settings_fingerprint(bf16, d) == fingerprint(before, 16)
