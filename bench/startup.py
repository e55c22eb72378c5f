"""Start-up and GPU busy share of the real `adapters train` path (Ray Tune trial -> TorchTrainer ->
Ray Data tokenization -> the recipe), on one GPU.

    python bench/startup.py --data ../shared/data/real [--domain debate] [--steps 12] [--arch mistral7b]

It prepares the bench's raw data with the project's prepare stage, builds the same random-weight base
model as bench/train_throughput.py (throughput and start-up do not depend on the weights' values), and
runs the train stage for one domain with the project's default settings (configs/default.yaml), a few
steps, no evaluation matrix. It prints, from the domain's training report:

  trial start -> first optimizer step   worker group start, Ray Data read + tokenization, model load (4-bit)
  recipe start -> model loaded / data ready / first step
  busy share                            the training report's: step time / wall time from the trial's start

The worker loads the model while Ray Data tokenizes (loop.train_loop_per_worker), so "data ready" and
"model loaded" overlap. Needs a CUDA GPU. Not a test: it prints figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/real"))
    ap.add_argument("--arch", default="mistral7b")
    ap.add_argument("--domain", default="debate")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--work", default="/tmp/bench-startup")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--timeline", help="also write Ray's timeline of the stage here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another config override (repeatable), e.g. train.eval_max_batches=2")
    a = ap.parse_args()
    from train_throughput import bench_config, build_base, cuda_or_exit, prepare_data
    cuda_or_exit()
    import torch
    from pipeline.storage import open_store
    from pipeline.train import run_train
    from pipeline.lm.data import read_split
    cfg = bench_config(a.data, f"{a.work}/out")
    prepare_data(cfg)
    store = open_store(cfg)
    texts = ["\n".join(m["content"] for m in msgs)
             for msgs in read_split(store, a.domain, "train").column("messages").to_pylist()]
    base = f"{a.work}/base-{a.arch}"
    build_base(base, a.arch, texts)
    rows = {s: read_split(store, a.domain, s).num_rows for s in ("train", "val", "test")}
    cfg = bench_config(a.data, f"{a.work}/out", [
        f"model.base={base}", "resources.device=cuda", f"train.max_steps={a.steps}", "train.eval_every=1000000",
        "train.checkpoint_every=1000000", "train.log_every=1", "train.eval_matrix=false",
        "resources.cpus_per_trial=4", f"run_name=startup-{int(time.time())}", *a.set])
    cfg.domains = [a.domain]
    torch.cuda.empty_cache()
    t0 = time.time()
    res = run_train(cfg)[a.domain]
    wall = time.time() - t0
    if res.get("status") != "finished":
        print(f"train failed: {res.get('error')}", file=sys.stderr)
        return 1
    st = res["startup"]
    out = {"domain": a.domain, "sft_rows": rows, "steps": res["steps"], "train_stage_wall_s": round(wall, 1),
           "trial_start_to_first_step_s": st.get("trial_start_to_first_step_s"),
           "trial_start_to_worker_process_s": st.get("trial_start_to_worker_process_s"),
           "trial_start_to_worker_fn_s": st.get("trial_start_to_worker_fn_s"),
           "trial_start_to_recipe_s": st.get("trial_start_to_recipe_s"),
           "recipe_model_loaded_s": st.get("model_loaded_s"), "recipe_data_ready_s": st.get("data_ready_s"),
           "recipe_first_step_s": st.get("first_step_s"), "train_time_s": round(res["train_time_s"], 1),
           "busy_share": round(res["busy_share"], 3), "real_tok_s": round(res["tokens_per_s"])}
    print("RESULT " + json.dumps(out), flush=True)
    print(f"\n{a.domain}: {sum(rows.values())} SFT rows ({rows['train']} train); trial start -> first step "
          f"{out['trial_start_to_first_step_s']} s (after the trial's start: worker process {out['trial_start_to_worker_process_s']} s, "
          f"train function {out['trial_start_to_worker_fn_s']} s, recipe {out['trial_start_to_recipe_s']} s; in the recipe: model loaded {out['recipe_model_loaded_s']} s, data "
          f"ready {out['recipe_data_ready_s']} s, first step {out['recipe_first_step_s']} s); {res['steps']} steps in "
          f"{out['train_time_s']} s of a {out['train_stage_wall_s']} s train stage; busy share from the trial's start {out['busy_share']:.1%}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    if a.timeline:  # Ray's task and actor events (chrome://tracing format) for the whole stage
        import ray
        ray.timeline(filename=a.timeline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
