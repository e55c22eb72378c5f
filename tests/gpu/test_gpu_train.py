"""GPU: the same train code on CUDA with 4-bit NF4 (bf16 compute), packed attention paths, and a
short run_train with one GPU per trial. Skipped without CUDA (tests/conftest.py)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import sft_rows, tiny_config, write_sft  # noqa: E402

from pipeline.storage import Store  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_env(tmp_path_factory):
    from pipeline.lm.model import load_tokenizer, resolve_base
    from pipeline.lm.tiny import ensure_tiny
    out = tmp_path_factory.mktemp("gpu")
    cfg = tiny_config(str(out), resources={"device": "cuda", "cpus_per_trial": 1, "gpus_per_trial": 1},
                      model__tiny__hidden_size=256, model__tiny__intermediate_size=512, model__tiny__pretrain_steps=50)
    store = Store(str(out))
    write_sft(store, domains=["debate", "medicine"])
    ensure_tiny(cfg, store)
    return cfg, store, load_tokenizer(resolve_base(cfg, store), cfg)


def _examples(tok, n=12):
    from pipeline.lm.data import Example, tokenize_conversation
    rows = sft_rows("debate", n, 1) + sft_rows("medicine", n, 1)
    return [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in rows]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "flex_attention", "flash_attention_2"])
def test_gpu_nf4_packed_equals_unpacked(gpu_env, attn):
    import torch
    from pipeline.lm.data import collate, plan_batches
    from pipeline.lm.kernels import loss_sum
    from pipeline.lm.model import add_lora, load_model, resolve_base
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    cfg, store, tok = gpu_env
    cfg = cfg.model_copy(deep=True)
    cfg.model.attn_implementation = attn
    model = add_lora(load_model(resolve_base(cfg, store), cfg, "cuda"), cfg.hyper_for("debate").lora, cfg, False)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.__class__.__name__ == "Linear4bit"
    assert model.dtype in (torch.bfloat16, torch.float16) or cfg.model.compute_dtype == "float32"
    model.eval()
    ex = _examples(tok)
    plan = plan_batches([len(e) for e in ex], list(range(len(ex))), rows=2, seq_len=128)
    with torch.no_grad():
        packed = sum(float(loss_sum(model, collate(ex, b, tok.pad_token_id), "cuda")) for b in plan)
        single = sum(float(loss_sum(model, collate(ex, [[i]], tok.pad_token_id), "cuda")) for i in range(len(ex)))
    n = sum(e.n_target_tokens for e in ex)
    assert math.isclose(packed / n, single / n, rel_tol=2e-2), (packed / n, single / n)


def test_gpu_train_domain_learns_and_reports_memory(gpu_env, tmp_path):
    import torch
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    cfg, store, tok = gpu_env
    ex = _examples(tok, 24)
    data = {"train": ex[:32], "val": ex[32:40], "test": ex[40:]}
    c = cfg.model_copy(deep=True)
    c.train.max_steps = 20
    rep = train_domain(c, "debate", data, LocalSession(str(tmp_path)))
    assert rep["device"].startswith("cuda")
    assert rep["val_loss"] < rep["base_val_loss"]
    assert 0 < rep["peak_memory_gb"] < torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"gpu tiny: {rep['tokens_per_s']:.0f} tok/s, peak {rep['peak_memory_gb']:.2f} GB, attn {rep['attn_implementation']}")


@pytest.mark.slow
def test_gpu_run_train_one_gpu_per_trial(gpu_env):
    import ray
    from pipeline.train import run_train
    cfg, store, _ = gpu_env
    c = cfg.model_copy(deep=True)
    c.domains = ["debate", "medicine"]
    ray.init(include_dashboard=False)
    try:
        res = run_train(c)
    finally:
        ray.shutdown()
    for d, r in res.items():
        assert r["status"] == "finished", (d, r.get("error"))
        assert r["device"].startswith("cuda") and r["val_loss"] < r["base_val_loss"]
