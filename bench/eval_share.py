"""The evaluation's share of the training time, on the GPU (issue 15's target: at most 15%).

    python bench/eval_share.py [--data ../shared/data/real] [--steps 8] [--work /tmp/bench-train]
                               [--max-examples N] [--generation-samples 64] [--max-new-tokens 128]
                               [--domains debate,medicine,education,ecology]

Run it from the repository root with the project importable by Ray's workers too (installed, or
PYTHONPATH=$PWD as docs/TRAINING.md's GPU recipe sets it).

What it does, one after the other (needs a CUDA GPU; about 5 minutes on an H200, --steps and the
eval sizes make it shorter):
  1. the project's prepare stage on --data and the bench's 7B random-weight Mistral-architecture base
     model (bench/train_throughput.py's: built once under --work, shared with that bench);
  2. each domain trained for --steps optimizer steps with configs/default.yaml's settings
     (pipeline.train.loop.train_domain, the code every trial runs), its adapter exported: the steady-state
     seconds per step (steps 4 on; the first ones measure memory) give the training time of the default
     config's train.max_steps per domain, without its periodic evaluations and checkpoints (so the
     share printed is an upper bound);
  3. the evaluation stage as `adapters train` runs it (pipeline.eval.run_eval in a Ray task on a local
     Ray with one GPU): the base model and every adapter on every domain's test split at the default
     config's eval settings (loss on every test row, every multiple-choice row's choices, 64 generations
     of 128 tokens per domain, side-by-side prompts), timed end to end (model load, Parquet, matrix);
then prints the test-set sizes, the evaluation's time per model x dataset (its log lines), the projected
training time and the share. Random weights rarely emit EOS, so every generation runs its full length:
a worst case for the generation time. Not a test: it prints figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import bench_config, build_base, cuda_or_exit, prepare_data  # noqa: E402

DOMAINS = ("debate", "medicine", "education", "ecology")


def train_briefly(cfg, domain: str, steps: int) -> dict:
    """train_domain for `steps` steps; the adapter is exported to adapters/<domain>; seconds per step."""
    import torch
    from pipeline.storage import open_store
    from pipeline.lm.data import read_split
    from pipeline.train.data import SFT_COLUMNS, Tokenize, collect
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    c = cfg.model_copy(deep=True)
    c.train.max_steps, c.train.warmup_steps, c.train.log_every = steps, 1, 1
    c.train.eval_every = c.train.checkpoint_every = 10 ** 6
    c.train.eval_max_batches = 2
    store = open_store(c)
    tokenize = Tokenize(c)
    data = collect(tokenize(read_split(store, domain, split, columns=SFT_COLUMNS).to_pydict())
                   for split in ("train", "val", "test"))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        rep = train_domain(c, domain, data, LocalSession(d, resume=False))
    wall = time.time() - t0
    times = [h["time"] for h in rep["history"]["train"][3:]] or [h["time"] for h in rep["history"]["train"]]
    gc.collect()
    torch.cuda.empty_cache()
    return {"domain": domain, "s_per_step": statistics.median(times), "wall_s": wall,
            "tokens_per_s": rep["tokens_per_s"], "train_rows": rep["n_examples"]["train"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/real"))
    ap.add_argument("--work", default="/tmp/bench-train")
    ap.add_argument("--arch", default="mistral7b")
    ap.add_argument("--steps", type=int, default=8, help="training steps per domain (>= 5: steps 1-3 measure memory)")
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--max-examples", type=int, default=None, help="eval.max_examples (default: every test row)")
    ap.add_argument("--generation-samples", type=int, default=None, help="eval.generation_samples (default 64)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="eval.max_new_tokens (default 128)")
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    cuda_or_exit()
    import torch
    domains = [d for d in a.domains.split(",") if d]
    t_start = time.time()
    sets = [f"eval.{k}={v}" for k, v in (("max_examples", a.max_examples), ("generation_samples", a.generation_samples),
                                          ("max_new_tokens", a.max_new_tokens)) if v is not None]
    out = f"{a.work}/eval-share"
    cfg = bench_config(a.data, out, sets + [f"domains=[{','.join(domains)}]"])
    prepare_data(cfg)
    from pipeline.storage import open_store
    from pipeline.lm.data import read_split
    store = open_store(cfg)
    texts = ["\n".join(m["content"] for m in msgs) for d in domains
             for msgs in read_split(store, d, "train").column("messages").to_pylist()]
    base = f"{a.work}/base-{a.arch}"
    build_base(base, a.arch, texts[:20000])
    cfg.model.base = base
    cfg.resources.device = "cuda"
    setup_s = time.time() - t_start
    print(f"gpu={torch.cuda.get_device_name(0)} torch={torch.__version__} setup_s={setup_s:.0f}", flush=True)

    trained = []
    for d in domains:
        r = train_briefly(cfg, d, a.steps)
        trained.append(r)
        print("TRAIN " + json.dumps(r), flush=True)

    import ray
    from pipeline.eval import run_eval
    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=True)
    t0 = time.time()
    matrix = run_eval(cfg, store, domains)
    eval_s = time.time() - t0
    ray.shutdown()

    from pipeline.config import load_config
    default = load_config(ROOT / "configs/default.yaml", raw_dir=a.data, output=out, sets=["resources.device=cpu"])
    projected = {r["domain"]: r["s_per_step"] * default.hyper_for(r["domain"]).max_steps for r in trained}
    train_total = sum(projected.values())
    counts = matrix["counts"]
    print(f"\n{'domain':10} {'test rows':>9} {'MC scored':>9} {'generated':>9} {'s/step':>7} "
          f"{'default steps':>13} {'projected train s':>17}")
    for r in trained:
        n = counts.get(r["domain"], {})
        print(f"{r['domain']:10} {n.get('test_rows', 0):>9} {n.get('multiple_choice_scored', 0):>9} "
              f"{n.get('generated', 0):>9} {r['s_per_step']:>7.2f} {default.hyper_for(r['domain']).max_steps:>13} "
              f"{projected[r['domain']]:>17,.0f}")
    share = eval_s / train_total
    print(f"\nevaluation (base + {len(domains)} adapters on {len(domains)} test sets, loss + task metrics + generations, "
          f"one Ray task): {eval_s:,.0f} s")
    print(f"training at the default config ({', '.join(f'{d} {default.hyper_for(d).max_steps}' for d in domains)} steps, "
          f"measured s/step): {train_total:,.0f} s")
    print(f"EVAL SHARE {share:.1%} of the training time (target <= 15%); bench wall {time.time() - t_start:,.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"train": trained, "projected_train_s": projected, "eval_s": eval_s,
                                            "share": share, "counts": counts, "settings": matrix["settings"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
