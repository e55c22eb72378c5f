"""Training throughput: the project's trainer against the seed's recipe, same GPU, same run.

    python bench/train_throughput.py --data ../shared/data/real [--arch mistral7b|llama1b]
                                     [--targets qv,all] [--steps 14] [--seed-recipe ../shared/bench/seed_recipe.py]
                                     [--variant NAME:key=value,key=value ...] [--profile NAME]
                                     [--trl sdpa,flex_attention] [--memory-cap-gb 24]

--variant runs the project's trainer again under other settings (same data, same model), e.g.
--variant peft_lora:train.fused_lora=off; the first variant is always "default" (no overrides). Each
variant's per-step losses are printed against the default's (a speed change is kept only when its losses
stay close: issue 27 asks 0.01 for a kernel change, 0.02 for FP8 base matmuls).
--profile NAME runs that variant for 4 more steps under torch.profiler and prints the GPU kernels
that took the most time.

For each LoRA target set it runs, one after the other in this process's run:
  1. the project's trainer (pipeline.train.loop.train_domain, the code every trial runs) with the
     project's *default* training settings (configs/default.yaml: packed 2048-token sequences,
     8192 tokens per micro-batch, gradient checkpointing, flex attention, fused kernels when
     installed), on SFT rows that the project's own prepare stage made from --data;
  2. the peer a user would run instead (bench/trl_peer.py: TRL's SFTTrainer with Liger kernels and
     padding-free BFD packing, 4 x 2048 tokens per micro-batch x accumulation 2), once per attention
     implementation in --trl (flash_attention_2 too when it is installed), on the very token ids the
     project's trainer trains on, under the same memory cap, each in a child process;
  3. the seed's recipe (../shared/bench/seed_recipe.py: HF Trainer, every example padded to 512,
     batch 2 x accumulation 8, q_proj,v_proj or all linear) on the same sources,
and prints real (non-padding) tokens/s, padded tokens/s, MFU (4 x parameters FLOPs per real token
against a bf16 matmul rate measured here), peak allocated and reserved memory, then the ratios.
Both use the same random-weight base model (a 7B Mistral architecture by default; throughput and
memory do not depend on the weights' values), NF4 double quantization, bf16 compute, LoRA r16/a32.
Needs a CUDA GPU. Not a test: it prints figures.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = {
    "mistral7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
    "llama1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
}
TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}


def bf16_matmul_tflops() -> float:
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.time() - t) / 1e12


BASE_SETS = ["data.allow_missing=true", "data.download.offline=true", "resources.device=cpu"]


def cuda_or_exit() -> None:
    """A bench needs a CUDA GPU: say so and exit 2 without one; INFO logging otherwise."""
    import logging
    import torch
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def bench_config(data_dir: str, out: str, sets=()):
    """configs/default.yaml (the project's defaults) on the bench's raw data and work folder, plus `sets`. The
    base's 4-bit cache goes beside `out` (the work folder), not into ~/.cache: it goes when the work folder does."""
    from pipeline.config import load_config
    cache = f"model.cache_dir={Path(out).parent / 'model-cache'}"
    return load_config(ROOT / "configs/default.yaml", raw_dir=data_dir, output=out, sets=BASE_SETS + [cache] + list(sets))


def prepare_data(cfg) -> None:
    """The project's prepare stage on the raw data (once per work folder)."""
    from pipeline.prepare import run_prepare
    if not (Path(cfg.output) / "data/_SUCCESS").exists():
        run_prepare(cfg, use_ray=False)


def build_base(path: str, arch: str, texts: list[str]) -> None:
    """A random-weight model of the architecture plus a 32k BPE tokenizer trained on the texts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    if (Path(path) / "tokenizer.json").exists():
        return
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=32000, special_tokens=["<pad>", "<s>", "</s>"]))
    c = dict(ARCHS[arch])
    config = AutoConfig.for_model(c.pop("model_type"), **c)
    if not (Path(path) / "config.json").exists():
        torch.manual_seed(0)  # the same weights in every call: losses compare across calls and trees
        with torch.device("cuda"):
            m = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        m.save_pretrained(path)
        del m
        torch.cuda.empty_cache()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(path)


def tokenized(cfg, domain: str) -> dict:
    """The domain's SFT rows as the project's trainer sees them: {split: [Example]} (same code as a trial)."""
    from pipeline.storage import open_store
    from pipeline.lm.data import read_split
    from pipeline.train.data import SFT_COLUMNS, Tokenize, collect
    store, tokenize = open_store(cfg), Tokenize(cfg)
    return collect(tokenize(read_split(store, domain, split, columns=SFT_COLUMNS).to_pydict())
                   for split in ("train", "val", "test"))


def run_trl(cfg, base: str, domain: str, targets: str, attn: str, steps: int, cap_gb, work: str) -> dict:
    """TRL's SFTTrainer (bench/trl_peer.py) in a child process on the same token ids as the project's trainer."""
    from pipeline.lm.data import IGNORE
    c = cfg.model_copy(deep=True)
    c.model.base = base
    rows = Path(work) / f"trl-rows-{domain}.jsonl"
    if not rows.exists():
        with open(rows, "w") as f:
            for e in tokenized(c, domain)["train"]:
                f.write(json.dumps({"input_ids": e.input_ids.tolist(),
                                    "completion_mask": (e.labels != IGNORE).astype(int).tolist()}) + "\n")
    cmd = [sys.executable, str(ROOT / "bench/trl_peer.py"), "--base", base, "--rows", str(rows), "--targets", targets,
           "--attn", attn, "--steps", str(steps), "--lr", str(c.train.learning_rate)]
    if cap_gb:
        cmd += ["--memory-cap-gb", str(cap_gb)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    m = re.search(r"^RESULT (.*)$", p.stdout, re.M)
    if not m:
        return dict(who="trl", variant=f"trl-{attn}", targets=targets, error=(p.stdout + p.stderr)[-1500:])
    return json.loads(m.group(1))


def trl_attentions(requested: str) -> list[str]:
    """The attention implementations to run TRL with: those asked for, plus flash_attention_2 when installed."""
    out = [x for x in requested.split(",") if x]
    try:
        import flash_attn  # noqa: F401
        if "flash_attention_2" not in out:
            out.append("flash_attention_2")
    except ImportError:
        print("TRL: flash_attention_2 not run (flash-attn is not installed here)", flush=True)
    return out


def run_ours(cfg, base: str, domain: str, targets: str, steps: int, variant: str = "default",
             profile: bool = False) -> dict:
    import torch
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    c = cfg.model_copy(deep=True)
    c.model.base = base
    c.resources.device = "cuda"
    c.lora.target_modules = TARGETS[targets]
    c.train.max_steps = steps
    c.train.warmup_steps = 1
    c.train.eval_every = 10 ** 6
    c.train.checkpoint_every = 10 ** 6
    c.train.eval_max_batches = 2
    c.train.log_every = 1
    data = tokenized(c, domain)
    torch.cuda.empty_cache()
    if profile:
        return profile_steps(c, domain, data)
    with tempfile.TemporaryDirectory() as d:
        rep = train_domain(c, domain, data, LocalSession(d, resume=False))
    # steady state: the first steps compile kernels, and with checkpoint_keep_last auto the first three
    # steps measure memory (all layers checkpointed, then a probe) before settling
    hist = rep["history"]["train"][3:]
    timed = [h for h in hist if h.get("time")]
    if timed:
        secs = sum(h["time"] for h in timed)
        real = sum(h["tokens"] for h in timed) / secs
        padded = sum(h.get("padded_tokens", h["tokens"]) for h in timed) / secs
    else:
        real = padded = rep["tokens_per_s"]
    return dict(who="project", variant=variant, targets=targets, real_tok_s=real, padded_tok_s=padded,
                loss=sum(h["loss"] for h in hist[-5:]) / max(1, len(hist[-5:])),
                losses=[round(h["loss"], 4) for h in rep["history"]["train"]],
                step_s=[round(h["time"], 3) for h in rep["history"]["train"]],
                peak_alloc_gb=rep["peak_memory_gb"],   # over the whole run (the trainer resets the stats per step)
                peak_reserved_gb=rep.get("peak_reserved_gb") or torch.cuda.max_memory_reserved() / 2 ** 30,
                checkpointing=rep.get("checkpointing"), fused_lora_layers=rep.get("fused_lora_layers"),
                micro_batch=rep.get("micro_batch"), attn=rep.get("attn_implementation"),
                fused_loss=rep.get("fused_loss"), n_train=rep["n_examples"]["train"])


def profile_steps(cfg, domain: str, data: dict) -> dict:
    """A 7-step run of the trainer under torch.profiler. For the steady steps (5-7: steps 1-4 compile
    kernels and settle the memory budget) it prints the wall time, the time the GPU ran any kernel
    (union of kernel intervals), the kernel count and the longest GPU idle gaps; then the ops that
    took the most CPU time and the kernels that took the most GPU time over the whole run."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from pipeline.train.loop import DomainRecipe, train_domain
    from pipeline.train.sessions import LocalSession

    class MarkedRecipe(DomainRecipe):
        def train_step(self):
            with record_function("bench_step"):
                super().train_step()
                torch.cuda.synchronize()

    c = cfg.model_copy(deep=True)
    c.train.max_steps = 7
    c.train.eval_max_batches = 1
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with tempfile.TemporaryDirectory() as d:
            train_domain(c, domain, data, LocalSession(d, resume=False), MarkedRecipe)
        torch.cuda.synchronize()
    events = prof.events()
    # the CPU range of each step (the profiler also records a GPU-side annotation of the same name)
    steps = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.name == "bench_step" and e.device_type == torch.autograd.DeviceType.CPU)
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    for i, (t0, t1) in enumerate(steps[4:], start=5):
        inside = [(max(a, t0), min(b, t1)) for a, b in kernels if b > t0 and a < t1]
        busy, cur_a, cur_b, gaps = 0.0, None, None, []
        for a, b in inside:
            if cur_b is None or a > cur_b:
                if cur_b is not None:
                    busy += cur_b - cur_a
                    gaps.append((a - cur_b, cur_b - t0))
                cur_a, cur_b = a, b
            else:
                cur_b = max(cur_b, b)
        if cur_b is not None:
            busy += cur_b - cur_a
        gaps.sort(reverse=True)
        wall = t1 - t0
        print(f"PROFILE step {i}: wall {wall/1e3:.1f} ms, GPU busy {busy/1e3:.1f} ms ({busy/wall:.1%}), "
              f"{len(inside)} kernels; longest idle gaps (ms at ms): "
              + ", ".join(f"{g/1e3:.1f}@{at/1e3:.0f}" for g, at in gaps[:12]), flush=True)
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70), flush=True)
    print(ka.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90), flush=True)
    return {"profile": True}


def run_seed(seed_recipe: str, data_dir: str, arch: str, targets: str, steps: int, base: str) -> dict:
    """The seed's recipe in a child process (its own CUDA context, so its peak memory is its own)."""
    sd = Path(tempfile.mkdtemp(prefix="seeddata-"))
    real = Path(data_dir).resolve()
    for name, src in (("pubmedqa", real / "pubmed_qa/data"), ("climate-fever", real / "climate_fever/dataset"),
                      ("MedQuAD", real / "MedQuAD"), ("IAM", real / "IAM")):
        (sd / name).symlink_to(src)
    env = dict(os.environ, ARCH=arch, STEPS=str(steps), TARGETS=",".join(TARGETS[targets]) if targets == "qv"
               else "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    # the recipe builds /tmp/base-<arch> when missing: point it at the same random-weight model
    link = Path(f"/tmp/base-{arch}")
    if not link.exists():
        link.symlink_to(base)
    p = subprocess.run([sys.executable, seed_recipe, str(sd)], env=env, capture_output=True, text=True)
    m = re.search(r"^RESULT (.*)$", p.stdout, re.M)
    if not m:
        return dict(who="seed", targets=targets, error=(p.stdout + p.stderr)[-1500:])
    r = json.loads(m.group(1))
    return dict(who="seed", targets=targets, real_tok_s=r["real_tok_s"], padded_tok_s=r["padded_tok_s"],
                peak_alloc_gb=r["peak_alloc_gb"], peak_reserved_gb=r["peak_reserved_gb"], loss=None)


def loss_comparison(ok: list[dict], targets: str) -> list[str]:
    """Each project variant's per-step losses against the default's (same data order and seeds), e.g. issue
    27's bar for FP8 base matmuls: every step within 0.02 of bf16's."""
    default = next((r for r in ok if r["who"] == "project" and r["variant"] == "default"), None)
    out = []
    for r in ok:
        if default is None or r["who"] != "project" or r is default:
            continue
        n = min(len(r["losses"]), len(default["losses"]))
        diffs = [abs(x - y) for x, y in zip(r["losses"][:n], default["losses"][:n])]
        worst = max(diffs, default=0.0)
        out.append(f"losses {targets} {r['variant']} vs default: max |diff| over {n} steps {worst:.4f}"
                   + (f" (step {1 + diffs.index(worst)}), last step {diffs[-1]:.4f}" if diffs else "")
                   + f"; speed {r['real_tok_s'] / default['real_tok_s']:.3f}x")
        out.append(f"  default {default['losses'][:n]}")
        out.append(f"  {r['variant']} {r['losses'][:n]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/data/real"))
    ap.add_argument("--arch", default="mistral7b", choices=sorted(ARCHS))
    ap.add_argument("--targets", default="qv,all")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--seed-steps", type=int, default=8)
    ap.add_argument("--domain", default="medicine")
    ap.add_argument("--seed-recipe", default=str(ROOT.parent / "shared/bench/seed_recipe.py"))
    ap.add_argument("--no-seed", action="store_true", help="no seed recipe")
    ap.add_argument("--trl", default="sdpa,flex_attention",
                    help="attention implementations to run TRL's SFTTrainer with ('' for none)")
    ap.add_argument("--trl-steps", type=int, default=10)
    ap.add_argument("--work", default="/tmp/bench-train")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                    help="also run the trainer with these config overrides (repeatable)")
    ap.add_argument("--profile", metavar="NAME", help="profile this variant (default or a --variant name)")
    ap.add_argument("--memory-cap-gb", type=float,
                    help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 24 for an RTX 3090")
    a = ap.parse_args()
    cuda_or_exit()
    import torch
    if a.memory_cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_cap_gb * 2**30 / total))
        print(f"memory cap: {a.memory_cap_gb:g} GB of {total / 2**30:.0f} GB", flush=True)
    t0 = time.time()
    cfg = bench_config(a.data, f"{a.work}/out")
    prepare_data(cfg)
    from pipeline.storage import open_store
    from pipeline.lm.data import read_split
    texts = ["\n".join(m["content"] for m in msgs)
             for msgs in read_split(open_store(cfg), a.domain, "train").column("messages").to_pylist()]
    base = f"{a.work}/base-{a.arch}"
    build_base(base, a.arch, texts)
    tflops = bf16_matmul_tflops()
    c = dict(ARCHS[a.arch])
    nparams = (c["vocab_size"] * c["hidden_size"] * 2 + c["num_hidden_layers"] * (
        2 * c["hidden_size"] ** 2 + 2 * c["hidden_size"] * c["hidden_size"] * c["num_key_value_heads"] // c["num_attention_heads"]
        + 3 * c["hidden_size"] * c["intermediate_size"]))
    print(f"gpu={torch.cuda.get_device_name(0)} torch={torch.__version__} bf16_matmul={tflops:.0f} TFLOP/s "
          f"params={nparams/1e9:.2f}B setup_s={time.time()-t0:.0f}", flush=True)
    variants = [("default", [])]
    for v in a.variant:
        name, _, sets = v.partition(":")
        variants.append((name, [x for x in sets.split(",") if x]))
    rows = []
    for targets in a.targets.split(","):
        for name, sets in variants:
            torch.cuda.reset_peak_memory_stats()
            try:
                vcfg = bench_config(a.data, f"{a.work}/out", sets) if sets else cfg
                r = run_ours(vcfg, base, a.domain, targets, a.steps, variant=name)
            except Exception as e:  # an out-of-memory variant must not lose the others' figures
                r = dict(who="project", variant=name, targets=targets, error=f"{type(e).__name__}: {e}"[:600])
            print("RESULT " + json.dumps(r), flush=True)
            rows.append(r)
            import gc
            gc.collect()
            torch.cuda.empty_cache()
        for attn in trl_attentions(a.trl) if a.trl else []:
            r = run_trl(cfg, base, a.domain, targets, attn, a.trl_steps, a.memory_cap_gb, a.work)
            print("RESULT " + json.dumps(r), flush=True)
            rows.append(r)
        if not a.no_seed:
            r = run_seed(a.seed_recipe, a.data, a.arch, targets, a.seed_steps, base)
            r["variant"] = "seed recipe"
            print("RESULT " + json.dumps(r), flush=True)
            rows.append(r)
    if a.profile:
        name, sets = next(v for v in variants if v[0] == a.profile)
        for targets in a.targets.split(",")[-1:]:
            run_ours(bench_config(a.data, f"{a.work}/out", sets), base, a.domain, targets, 7, profile=True)
    print(f"\n{'who':8} {'variant':16} {'targets':7} {'real tok/s':>10} {'padded tok/s':>12} {'MFU':>6} "
          f"{'peak alloc GB':>13} {'reserved GB':>11} {'loss':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['who']:8} {r.get('variant', ''):16} {r['targets']:7} error: {r['error'][-300:]}")
            continue
        mfu = 4 * nparams * r["real_tok_s"] / (tflops * 1e12)
        r["mfu"] = mfu
        loss = f"{r['loss']:.3f}" if r.get("loss") is not None else "-"
        print(f"{r['who']:8} {r.get('variant', ''):16} {r['targets']:7} {r['real_tok_s']:>10,.0f} {r['padded_tok_s']:>12,.0f} "
              f"{mfu:>6.1%} {r['peak_alloc_gb']:>13.1f} {r['peak_reserved_gb']:>11.1f} {loss:>7}")
    for targets in a.targets.split(","):
        ok = [r for r in rows if r["targets"] == targets and "error" not in r]
        seed = next((r for r in ok if r["who"] == "seed"), None)
        trl_best = max((r for r in ok if r["who"] == "trl"), key=lambda r: r["real_tok_s"], default=None)
        for r in ok:
            if r["who"] != "project":
                continue
            vs = []
            if trl_best:
                vs.append(f"{r['real_tok_s'] / trl_best['real_tok_s']:.2f}x TRL-best ({trl_best['variant']})")
            if seed:
                vs.append(f"{r['real_tok_s'] / seed['real_tok_s']:.1f}x the seed recipe")
            ck = r.get("checkpointing") or {}
            print(f"ratio {targets} {r['variant']}: " + ", ".join(vs) +
                  f"; peak {r['peak_alloc_gb']:.1f} GB (budget 20 GB for a 24 GB RTX 3090); "
                  f"layers kept from recomputation {ck.get('kept_layers')}/{ck.get('layers')}")
        for line in loss_comparison(ok, targets):
            print(line)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(rows=rows, tflops=tflops, params=nparams), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
