"""resources.workers_per_trial: two gloo workers (torch.distributed, CPU) train one domain with the
global batch of one worker, and match one worker's per-step losses to 1e-4."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import sft_rows, tiny_config, write_sft  # noqa: E402

from pipeline.storage import Store  # noqa: E402


def _data(cfg, store):
    from pipeline.lm.data import Example, tokenize_conversation
    from pipeline.lm.model import load_tokenizer, resolve_base
    tok = load_tokenizer(resolve_base(cfg, store), cfg)

    def ex(seed, n):
        return [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", n, seed)]
    # 17 training examples, two to a row: micro-batches of 4, 4 and 1 rows (one worker has nothing in the last)
    return {"train": ex(1, 17), "val": ex(2, 9), "test": ex(3, 9)}


def _worker(rank: int, world: int, port: int, cfg, data, out: str) -> None:
    import torch.distributed as dist
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rep = train_domain(cfg, "debate", data, LocalSession(f"{out}/ck-{rank}", resume=False))
    finally:
        dist.destroy_process_group()
    Path(f"{out}/report-{rank}.json").write_text(json.dumps(
        {k: rep[k] for k in ("history", "val_loss", "test_loss", "base_val_loss", "workers", "n_target_tokens")}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_workers_match_one_worker(tmp_path):
    import torch.multiprocessing as mp
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    from pipeline.lm.tiny import ensure_tiny
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate"], n=(8, 4, 4))
    cfg = tiny_config(str(tmp_path), domains=["debate"], model__tiny__pretrain_steps=5, train__max_steps=6,
                      train__grad_accum=2, train__eval_every=3, train__checkpoint_every=100,
                      lora={"r": 8, "alpha": 16, "dropout": 0.0})
    ensure_tiny(cfg, store)
    data = _data(cfg, store)
    from pipeline.train.data import epoch_plan
    assert sorted(len(b) for b in epoch_plan(data["train"], 0, cfg.train.seed, 4, 128, True)) == [1, 4, 4]
    one = train_domain(cfg, "debate", data, LocalSession(str(tmp_path / "ck-one"), resume=False))
    assert one["workers"] == 1
    mp.start_processes(_worker, args=(2, _free_port(), cfg, data, str(tmp_path)), nprocs=2, start_method="spawn",
                       join=True)
    reps = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in (0, 1)]
    for rep in reps:
        assert rep["workers"] == 2
        assert [h["loss"] for h in rep["history"]["train"]] == pytest.approx(
            [h["loss"] for h in one["history"]["train"]], abs=1e-4)
        assert [h["tokens"] for h in rep["history"]["train"]] == [h["tokens"] for h in one["history"]["train"]]
        assert [v["loss"] for v in rep["history"]["val"]] == pytest.approx(
            [v["loss"] for v in one["history"]["val"]], abs=1e-4)
        assert rep["n_target_tokens"] == one["n_target_tokens"]
        for k in ("val_loss", "test_loss", "base_val_loss"):
            assert rep[k] == pytest.approx(one[k], abs=1e-4), k
