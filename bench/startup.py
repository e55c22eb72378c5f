"""Start-up and GPU busy share of the real `adapters train` path (Ray Tune trial -> the domain's worker ->
Ray Data tokenization -> the recipe), on one GPU, or on the CPU with the demo's tiny model (--cpu).

    python bench/startup.py --data ../shared/data/real [--domain debate] [--steps 12] [--arch mistral7b]
    python bench/startup.py --compare                   # the trial's own worker vs Ray Train's, same run
    python bench/startup.py --cpu --compare --repeat 3  # the same on the CPU (demo data, tiny model)
    python bench/startup.py --compare-cache --repeat 2  # 4-bit weights quantized at load vs read from the cache

On the GPU it prepares the bench's raw data with the project's prepare stage, builds the same random-weight
base model as bench/train_throughput.py (throughput and start-up do not depend on the weights' values),
and runs the train stage for one domain with the project's default settings (configs/default.yaml), a few
steps, no evaluation matrix. With --cpu: the demo (configs/demo.yaml, bundled fixtures, tiny model). It
prints, from the domain's training report:

  trial start -> first optimizer step   the worker's start, Ray Data read + tokenization, model load (4-bit)
  recipe start -> device ready / tokenizer / model loaded / data ready / LoRA and kernels / set-up done / first step
  busy share                            the training report's: step time / wall time from the trial's start

--compare runs the stage with the trial's own worker (the default) and with Ray Train's TorchTrainer
(resources.ray_train_for_one_worker=true, what a trial of several workers uses), alternating, --repeat
times each, on the same Ray cluster, and prints the medians and their ratio. --compare-cache does the same
for the base model's 4-bit weights: quantized at every load (model.cache_quantized=false) against read from
the node's cache (the default; the cache, under --work, is filled by one load before the timed runs; the
demo's tiny base is never cached, so this is for the GPU). The worker loads the model
while Ray Data tokenizes (loop.run_worker), so "data ready" and "model loaded" overlap. Not a test: it
prints figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
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
    ap.add_argument("--cpu", action="store_true", help="the demo (tiny model) on the CPU instead of a 7B on a GPU")
    ap.add_argument("--compare", action="store_true", help="the trial's own worker and Ray Train's, same run")
    ap.add_argument("--compare-cache", action="store_true",
                    help="the 4-bit weights quantized at load and read from the node's cache, same run")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (--compare: alternating)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--timeline", help="also write Ray's timeline of the stage here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="another config override (repeatable), e.g. train.eval_max_batches=2")
    a = ap.parse_args()
    cfg, rows = (_cpu_setup if a.cpu else _gpu_setup)(a)
    from pipeline.train import run_train
    variants = {"default": {}}   # name -> {section: {field: value}} set on the run's config
    if a.compare:
        variants = {"own worker": {}, "Ray Train": {"resources": {"ray_train_for_one_worker": True}}}
    elif a.compare_cache:
        variants = {"quantized at load": {"model": {"cache_quantized": False}}, "4-bit cache": {}}
    figures: dict[str, list[dict]] = {v: [] for v in variants}
    # --compare-cache: one untimed run first, which quantizes the base and fills the cache
    runs = [("warm-up", {})] * a.compare_cache + [v for _ in range(a.repeat) for v in variants.items()]
    for i, (name, sets) in enumerate(runs):
        c = cfg.model_copy(deep=True)
        c.run_name = f"startup-{int(time.time())}-{i}"
        for section, values in sets.items():
            for field, value in values.items():
                setattr(getattr(c, section), field, value)
        shutil.rmtree(Path(c.output) / "adapters" / a.domain, ignore_errors=True)   # trained again each time
        t0 = time.time()
        res = run_train(c)[a.domain]
        wall = time.time() - t0
        if res.get("status") != "finished":
            print(f"train failed: {res.get('error')}", file=sys.stderr)
            return 1
        out = _figures(a.domain, rows, res, wall)
        figures.setdefault(name, []).append(out)
        print("RESULT " + json.dumps({"variant": name, **out}), flush=True)
        _say(name, out, res)
    if len(variants) == 2:
        (new, _), (old, _) = reversed(variants.items()) if a.compare_cache else variants.items()
        med = {v: statistics.median(f["trial_start_to_first_step_s"] for f in fs) for v, fs in figures.items()}
        stage = {v: statistics.median(f["train_stage_wall_s"] for f in fs) for v, fs in figures.items()}
        print(f"\ntrial start -> first step, median of {a.repeat}: {new} {med[new]:.1f} s, {old} {med[old]:.1f} s "
              f"({new} / {old} = {med[new] / med[old]:.2f}); train stage {stage[new]:.1f} s vs {stage[old]:.1f} s "
              f"({stage[new] / stage[old]:.2f})")
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2))
    if a.timeline:  # Ray's task and actor events (chrome://tracing format) for the whole stage
        import ray
        ray.timeline(filename=a.timeline)
    return 0


def _gpu_setup(a):
    from train_throughput import bench_config, build_base, cuda_or_exit, prepare_data
    cuda_or_exit()
    import torch
    from pipeline.storage import open_store
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
        "resources.cpus_per_trial=4", f"model.cache_dir={a.work}/model-cache", *a.set])
    cfg.domains = [a.domain]
    torch.cuda.empty_cache()
    return cfg, rows


def _cpu_setup(a):
    """The demo's data and tiny model (configs/demo.yaml), prepared and the tiny base built once per work folder."""
    import subprocess
    from pipeline.config import load_config
    from pipeline.lm.data import read_split
    from pipeline.lm.tiny import ensure_tiny
    from pipeline.raycluster import ensure_ray
    from pipeline.storage import open_store
    out = f"{a.work}/out-cpu"
    if not (Path(out) / "data/_SUCCESS").exists():
        subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--config", str(ROOT / "configs/demo.yaml"),
                        "--output", out], cwd=ROOT, check=True)
    cfg = load_config(ROOT / "configs/demo.yaml", output=out, sets=[
        f"train.max_steps={a.steps}", "train.eval_every=1000000", "train.checkpoint_every=1000000",
        "train.log_every=1", "train.eval_matrix=false", *a.set])
    cfg.domains = [a.domain]
    store = open_store(cfg)
    ensure_ray(cfg)
    ensure_tiny(cfg, store)
    return cfg, {s: read_split(store, a.domain, s).num_rows for s in ("train", "val", "test")}


def _figures(domain: str, rows: dict, res: dict, wall: float) -> dict:
    st = res["startup"]
    return {"domain": domain, "sft_rows": rows, "steps": res["steps"], "train_stage_wall_s": round(wall, 1),
            "trial_start_to_first_step_s": st.get("trial_start_to_first_step_s"),
            "trial_start_to_worker_process_s": st.get("trial_start_to_worker_process_s"),
            "trial_start_to_worker_fn_s": st.get("trial_start_to_worker_fn_s"),
            "trial_start_to_recipe_s": st.get("trial_start_to_recipe_s"),
            "recipe_device_ready_s": st.get("device_ready_s"), "recipe_tokenizer_loaded_s": st.get("tokenizer_loaded_s"),
            "recipe_model_loaded_s": st.get("model_loaded_s"), "recipe_data_ready_s": st.get("data_ready_s"),
            "recipe_lora_ready_s": st.get("lora_ready_s"), "recipe_setup_done_s": st.get("setup_done_s"),
            "recipe_first_step_s": st.get("first_step_s"), "train_time_s": round(res["train_time_s"], 1),
            "busy_share": round(res["busy_share"], 3), "real_tok_s": round(res["tokens_per_s"])}


def _say(name: str, out: dict, res: dict) -> None:
    rows = out["sft_rows"]
    print(f"\n[{name}] {out['domain']}: {sum(rows.values())} SFT rows ({rows['train']} train); trial start -> first step "
          f"{out['trial_start_to_first_step_s']} s (after the trial's start: worker process "
          f"{out['trial_start_to_worker_process_s']} s, train function {out['trial_start_to_worker_fn_s']} s, recipe "
          f"{out['trial_start_to_recipe_s']} s; in the recipe: device ready {out['recipe_device_ready_s']} s, tokenizer "
          f"{out['recipe_tokenizer_loaded_s']} s, model loaded {out['recipe_model_loaded_s']} s, data ready "
          f"{out['recipe_data_ready_s']} s, LoRA and kernels {out['recipe_lora_ready_s']} s, set-up done "
          f"{out['recipe_setup_done_s']} s, first step {out['recipe_first_step_s']} s); {res['steps']} steps in "
          f"{out['train_time_s']} s of a {out['train_stage_wall_s']} s train stage; busy share from the trial's start "
          f"{out['busy_share']:.1%}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
