"""The FP8 base (pipeline.lm.fp8, train.fp8_base) on the CPU, with PyTorch's reference FP8 kernels: the layer's
forward within FP8 rounding of the dense matmul and its input gradient exactly the dense weight's; the swap of a
4-bit LoRA model's frozen layers (LoRA, the head and the fused layers untouched); a recipe trained with it learns
like the 4-bit one and reports the swapped layers; a device without FP8 gets a clear error. The CUDA kernels
(Triton row quantizer, cuBLAS FP8 matmul) are checked in tests/gpu/test_gpu_lora_fused.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import loss_and_grads, sft_rows, tiny_debate_env, tiny_lora_model  # noqa: E402

from pipeline.lm.fp8 import E4M3_MAX, fp8_base, fp8_linear_class, fp8_unsupported, quantize_rows, to_fp8  # noqa: E402
from pipeline.lm.lora_fused import FusedForward, fuse_lora  # noqa: E402


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_rows_are_scaled_to_the_e4m3_range_and_zero_rows_stay_zero():
    x = torch.randn(5, 32) * torch.tensor([[1e-3], [1.0], [50.0], [0.0], [7.0]])
    x8, s = quantize_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    back = x8.float()
    for i in (0, 1, 2, 4):   # each row's largest magnitude lands on 448, whatever its size
        assert back[i].abs().max().item() == E4M3_MAX
        assert _rel(back[i] * s[i], x[i]) < 0.04          # e4m3: 3 mantissa bits, ~2% rms
    assert back[3].abs().max().item() == 0 and torch.isfinite(s).all()


def test_fp8_linear_forward_within_fp8_rounding_and_input_gradient_is_the_dense_weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=True).requires_grad_(False)
    f = to_fp8(lin)
    assert f.weight8.dtype == torch.float8_e4m3fn and f.weight8.shape == (48, 64)
    assert not list(f.parameters())                      # nothing in it is trained
    assert _rel(f.dense_weight(torch.float32), lin.weight) < 0.04
    x = torch.randn(2, 37, 64, requires_grad=True)       # rows not a multiple of 16
    y = f(x)
    ref = lin(x)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = _rel(y, ref)
    assert 1e-4 < err < 0.06, err                        # rounded (it is FP8), not wrong
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.allclose(x.grad, g @ f.dense_weight(torch.float32), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return tiny_debate_env(tmp_path_factory.mktemp("fp8"), n=(40, 10, 10), model__tiny__pretrain_steps=10,
                           lora__dropout=0.1)


def test_fp8_base_swaps_the_frozen_layers_under_lora_and_keeps_loss_and_gradients_close(env):
    from pipeline.lm.data import Example, collate, tokenize_conversation
    cfg, store, tok = env
    ex = [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", 4, 1)]
    batch = collate(ex, [[0, 1], [2, 3]], tok.pad_token_id)
    model = tiny_lora_model(cfg, store)
    model.train()
    ref_loss, ref_grads = loss_and_grads(model, batch)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    head = model.get_output_embeddings()

    assert fp8_base(model) == 14                          # 7 projections x 2 layers, each under its LoRA layer
    Fp8Linear = fp8_linear_class()
    layer = model.base_model.model.model.layers[0]
    assert isinstance(layer.mlp.down_proj.base_layer, Fp8Linear)
    assert model.get_output_embeddings() is head and not isinstance(head, Fp8Linear)
    assert not any(type(m).__name__ == "Linear4bit" and not hasattr(m, "lora_A") for m in model.modules())
    now = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert now.keys() == trained.keys() and all(torch.equal(now[n], trained[n]) for n in now)
    assert fp8_base(model) == 0                           # nothing left to swap

    loss, grads = loss_and_grads(model, batch)
    assert loss == pytest.approx(ref_loss, rel=0.01) and loss != ref_loss
    for n, g in grads.items():
        assert g.abs().sum() > 0, n
        assert _rel(g, ref_grads[n]) < 0.15, n
    # the fused LoRA layers take the FP8 base too, and give the same numbers as PEFT's forward over it
    assert fuse_lora(model, "on") == 14
    assert all(isinstance(m.forward, FusedForward) for m in model.modules() if hasattr(m, "lora_A"))
    fused_loss, fused_grads = loss_and_grads(model, batch)
    assert fused_loss == pytest.approx(loss, rel=1e-4)
    for n, g in fused_grads.items():
        assert _rel(g, grads[n]) < 1e-3, n


def test_a_recipe_trained_on_the_fp8_base_learns_like_the_4bit_one_and_reports_it(env, tmp_path):
    from pipeline.lm.data import Example, tokenize_conversation
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    cfg, store, tok = env

    def examples(seed, n):
        return [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", n, seed)]

    data = {"train": examples(1, 40), "val": examples(2, 10), "test": examples(3, 10)}
    reports = {}
    for fp8 in (False, True):
        c = cfg.model_copy(deep=True)
        c.train.max_steps, c.train.eval_every, c.train.checkpoint_every, c.train.fp8_base = 8, 8, 100, fp8
        reports[fp8] = train_domain(c, "debate", data, LocalSession(str(tmp_path / str(fp8)), resume=False))
    nf4, fp8 = reports[False], reports[True]
    assert nf4["fp8_base_layers"] == 0 and fp8["fp8_base_layers"] == 14
    assert fp8["fused_lora_layers"] == 14
    assert fp8["val_loss"] < fp8["base_val_loss"] - 0.05                       # it learns
    assert fp8["val_loss"] == pytest.approx(nf4["val_loss"], abs=0.05)        # like the 4-bit base does
    losses = [h["loss"] for h in fp8["history"]["train"]], [h["loss"] for h in nf4["history"]["train"]]
    assert max(abs(a - b) for a, b in zip(*losses)) < 0.05


def test_a_gpu_without_fp8_tensor_cores_is_named(monkeypatch):
    assert fp8_unsupported("cpu") == ""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 3090")
    msg = fp8_unsupported("cuda:0")
    assert "RTX 3090" in msg and "8.6" in msg and "8.9" in msg
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert fp8_unsupported("cuda:0") == ""


def test_a_recipe_on_a_gpu_without_fp8_stops_before_loading_the_model_naming_the_gpu(env, tmp_path, monkeypatch):
    import pipeline.train.loop as loop
    from pipeline.lm.fp8 import Fp8UnsupportedError
    from pipeline.train.sessions import LocalSession
    cfg, _, _ = env
    c = cfg.model_copy(deep=True)
    c.train.fp8_base = True
    monkeypatch.setattr(loop, "fp8_unsupported", lambda device: "NVIDIA GeForce RTX 3090 (compute capability 8.6) "
                        "has no FP8 tensor cores")
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(Fp8UnsupportedError, match=r"RTX 3090 .*; set train.fp8_base: false"):
        loop.train_domain(c, "debate", {"train": [], "val": [], "test": []}, LocalSession(str(tmp_path), resume=False))
