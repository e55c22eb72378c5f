"""Benchmark prepare: rows/s and peak RSS on a generated large input, beside a single-process baseline.

    python bench/prepare.py                      # 2 GB of Climate-FEVER-style JSONL (the default)
    python bench/prepare.py --size-mb 200        # smaller, for a quick look
    python bench/prepare.py --size-mb 200 --cap 2000 --num-cpus 2

It generates ``--size-mb`` of JSONL in the real Climate-FEVER layout (claims with 5 evidences each,
unique texts) as files of ``--file-mb`` under a temporary raw dir, then runs, each in a fresh
process whose whole process tree (driver, raylet, Ray workers) is sampled for RSS:

  1. ``ray``       run_prepare(cfg) with Ray Data, no cap (all records read, normalized, written)
  2. ``baseline``  run_prepare(cfg, use_ray=False): the same steps in one plain Python process
  3. ``cap``       run_prepare with max_docs_per_source=--cap on 1/4, 1/2 and all of the input:
                   with a cap, reading stops after the cap, so the time stays flat as the input grows

and prints one table. Nothing here is a test; the figures go to bench/NOTES.md by hand.

    python bench/prepare.py --near-dup                        # ../shared/data/real, 5 rounds
    python bench/prepare.py --near-dup --raw-dir DIR --repeat 3

``--near-dup`` (issue 24's target: prepare at most +20% over prepare without near-duplicate handling)
runs, side by side in one run, the in-process prepare (``use_ray=False``: no Ray start-up or scheduling
in the figure) of every built-in source under ``--raw-dir`` with ``data.near_duplicates`` false and
true, alternating, each in a fresh process, ``--repeat`` times, and prints the median CPU and wall
seconds of each and their ratio, plus the n-gram work of the "on" run as the manifest times it (the
near-duplicate units and the contamination table, which is computed in both runs) and the ratio of the
"on" run to the same run without any n-gram work: by wall seconds of the medians, and by CPU seconds of
this process per run (the manifest's cpu_seconds; the steadier figure on a shared machine), median and best.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SUBJ = ["Arctic sea ice", "global mean sea level", "coral reef bleaching", "atmospheric CO2", "glacier mass",
        "ocean heat content", "permafrost thaw", "wildfire season length", "wetland methane", "the Antarctic ice sheet"]
TREND = ["has declined sharply since 1979", "is rising faster than in the twentieth century",
         "is driven mainly by natural cycles", "has stopped increasing", "is accelerating because of emissions"]
LABELS = ["SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO", "DISPUTED"]


def generate(raw: Path, size_mb: int, file_mb: int, seed: int = 0) -> tuple[int, int]:
    """Write Climate-FEVER JSONL files under raw/climate_fever/dataset/; returns (files, records)."""
    rng = random.Random(seed)
    out = raw / "climate_fever" / "dataset"
    out.mkdir(parents=True, exist_ok=True)
    target, per_file = size_mb * 1_000_000, file_mb * 1_000_000
    written = n = files = 0
    f = None
    cur = 0
    while written < target:
        if f is None or cur >= per_file:
            if f:
                f.close()
            f = open(out / f"climate-fever-{files:05d}.jsonl", "w", encoding="utf-8")
            files += 1
            cur = 0
        s, t = rng.choice(SUBJ), rng.choice(TREND)
        evs = [{"evidence_id": f"Climate change:{n}-{j}", "evidence_label": rng.choice(LABELS[:3]), "article": "Climate change",
                "evidence": f"Observation {n}.{j}: measurements of {rng.choice(SUBJ)} show it {rng.choice(TREND)} "
                            f"with an uncertainty of {rng.random():.3f} per decade across {rng.randrange(3, 90)} stations.",
                "entropy": round(rng.random(), 4), "votes": ["SUPPORTS", None, None, None, None]} for j in range(5)]
        line = json.dumps({"claim_id": str(n), "claim": f"Claim {n}: {s} {t}.", "claim_label": rng.choice(LABELS),
                           "evidences": evs}) + "\n"
        f.write(line)
        cur += len(line)
        written += len(line)
        n += 1
    f.close()
    return files, n


def _child(mode: str, raw: str, out: str, cap: int, num_cpus: int) -> None:
    """Runs in the measured process: one prepare, prints a JSON line of figures. Modes: ray, baseline
    (generated Climate-FEVER, ecology only), near-on / near-off (every built-in source, in-process)."""
    import logging
    logging.basicConfig(level=logging.WARNING)
    from pipeline.config import load_config
    from pipeline.prepare import run_prepare
    if mode.startswith("near-"):
        sets = ["model.base=tiny", "resources.device=cpu", "data.allow_missing=true",
                f"data.near_duplicates={'true' if mode == 'near-on' else 'false'}"]
        cfg = load_config(None, sets=sets, raw_dir=raw, output=out, environ={})
        t, c = time.time(), time.process_time()
        m = run_prepare(cfg, use_ray=False)
        ngram = sum((d.get("near_duplicates") or {}).get("seconds", 0) for d in m["domains"].values())
        ngram_cpu = sum((d.get("near_duplicates") or {}).get("cpu_seconds", 0) for d in m["domains"].values())
        print("RESULT " + json.dumps({"seconds": time.time() - t, "cpu_s": time.process_time() - c, "read": m["totals"]["read"],
                                      "near_dup_s": ngram, "contamination_s": m["contamination"].get("seconds", 0),
                                      "near_dup_cpu_s": ngram_cpu, "contamination_cpu_s": m["contamination"].get("cpu_seconds", 0),
                                      "sft": sum(sum(d.get("sft_rows", {}).values()) for d in m["domains"].values())}), flush=True)
        return
    sets = ["model.base=tiny", "resources.device=cpu", f"resources.num_cpus={num_cpus}", "data.sources=[climate_fever]",
            "data.rows_per_shard=20000"]
    if cap:
        sets.append(f"data.max_docs_per_source={cap}")
    cfg = load_config(None, sets=sets, raw_dir=raw, output=out, domains=["ecology"], environ={})
    t_ray = 0.0
    if mode != "baseline":
        from pipeline.raycluster import ensure_ray
        t = time.time()
        ensure_ray(cfg)
        t_ray = time.time() - t
    t = time.time()
    m = run_prepare(cfg, use_ray=mode != "baseline")
    dt = time.time() - t
    s = m["sources"]["climate_fever"]
    print("RESULT " + json.dumps({"seconds": dt, "ray_start_s": t_ray, "read": s["read"], "kept": s["kept"],
                                  "sft": sum(m["domains"]["ecology"]["sft_rows"].values())}), flush=True)


def measure(mode: str, raw: Path, out: Path, cap: int, num_cpus: int) -> dict:
    import psutil
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    p = subprocess.Popen([sys.executable, __file__, "--_child", mode, str(raw), str(out), str(cap), str(num_cpus)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=str(ROOT))
    peak_tree = peak_driver = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree, peak_driver
        proc = psutil.Process(p.pid)
        while not done.is_set():
            try:
                procs = [proc] + proc.children(recursive=True)
                rss = {q.pid: q.memory_info().rss for q in procs if q.is_running()}
                peak_driver = max(peak_driver, rss.get(p.pid, 0))
                peak_tree = max(peak_tree, sum(rss.values()))
            except psutil.Error:
                pass
            time.sleep(0.2)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, _ = p.communicate()
    done.set()
    th.join()
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise RuntimeError(f"{mode} run failed (rc={p.returncode}): {stdout[-2000:]}")
    r = json.loads(line[len("RESULT "):])
    r.update(peak_driver_mb=peak_driver / 1e6, peak_tree_mb=peak_tree / 1e6, rows_per_s=r["read"] / r["seconds"])
    return r


def near_dup(raw: Path, repeat: int) -> None:
    """Prepare with and without near-duplicate handling, alternating, each in a fresh process; medians and ratios."""
    import statistics
    runs: dict[str, list[dict]] = {"near-off": [], "near-on": []}
    with tempfile.TemporaryDirectory(prefix="bench_neardup_") as tmp:
        for i in range(repeat):
            for mode in ("near-off", "near-on") if i % 2 == 0 else ("near-on", "near-off"):
                r = measure(mode, raw, Path(tmp) / mode, 0, 1)
                runs[mode].append(r)
                print(f"  round {i + 1} {mode}: cpu {r['cpu_s']:.2f}s wall {r['seconds']:.2f}s "
                      f"(near-dup units {r['near_dup_s']:.2f}s wall {r['near_dup_cpu_s']:.2f}s cpu, contamination "
                      f"{r['contamination_s']:.2f}s wall {r['contamination_cpu_s']:.2f}s cpu)", flush=True)
    keys = ("cpu_s", "seconds", "near_dup_s", "contamination_s", "near_dup_cpu_s", "contamination_cpu_s")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    best = {m: {k: min(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    off, on = med["near-off"], med["near-on"]
    r0 = runs["near-on"][0]
    print(f"\nraw: {raw}; {r0['read']:,} records read, {r0['sft']:,} SFT rows; medians of {repeat} runs each, in-process prepare")
    print("| run | CPU s | wall s | near-dup units s | contamination s |")
    print("| --- | --- | --- | --- | --- |")
    for m, label in (("near-off", "data.near_duplicates=false"), ("near-on", "data.near_duplicates=true (default)")):
        print(f"| {label} | {med[m]['cpu_s']:.2f} | {med[m]['seconds']:.2f} | {med[m]['near_dup_s']:.2f} | {med[m]['contamination_s']:.2f} |")
    print(f"on / off: CPU {on['cpu_s'] / off['cpu_s']:.3f}, wall {on['seconds'] / off['seconds']:.3f}")
    bare = on["seconds"] - on["near_dup_s"] - on["contamination_s"]
    print(f"on / (on without its n-gram work: near-dup units and contamination table): wall {on['seconds'] / bare:.3f}")
    # CPU seconds of this process (the machine may be shared: wall time moves with the load), per run: the
    # run's n-gram work over the rest of the same run; then the median and the best (least disturbed) run
    share = [r["cpu_s"] / (r["cpu_s"] - r["near_dup_cpu_s"] - r["contamination_cpu_s"]) for r in runs["near-on"]]
    b = best["near-on"]
    print(f"CPU: on {on['cpu_s']:.2f}s median ({b['cpu_s']:.2f}s best), n-gram work {on['near_dup_cpu_s']:.2f}s + "
          f"{on['contamination_cpu_s']:.2f}s median ({b['near_dup_cpu_s']:.2f}s + {b['contamination_cpu_s']:.2f}s best); "
          f"on / (on without its n-gram work): median {statistics.median(share):.3f}, best {min(share):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=int, default=2048, help="input size in MB (default 2048 = 2 GB)")
    ap.add_argument("--file-mb", type=int, default=64, help="size of each generated JSONL file")
    ap.add_argument("--cap", type=int, default=2000, help="max_docs_per_source for the capped runs")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--workdir", default=None, help="where to generate (default: a temp dir, deleted after)")
    ap.add_argument("--skip-uncapped", action="store_true", help="only the capped runs")
    ap.add_argument("--skip-baseline", action="store_true", help="no single-process baseline run")
    ap.add_argument("--near-dup", action="store_true", help="prepare with and without near-duplicate handling on --raw-dir")
    ap.add_argument("--raw-dir", default=str(ROOT.parent / "shared" / "data" / "real"), help="for --near-dup")
    ap.add_argument("--repeat", type=int, default=5, help="for --near-dup: runs of each")
    a = ap.parse_args()
    if a.near_dup:
        near_dup(Path(a.raw_dir).resolve(), a.repeat)
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        raw = work / "raw"
        t = time.time()
        files, n = generate(raw, a.size_mb, a.file_mb)
        print(f"generated {a.size_mb} MB: {n:,} records in {files} files under {raw} ({time.time() - t:.0f}s)", flush=True)
        rows = []
        if not a.skip_uncapped:
            for mode in ("ray",) if a.skip_baseline else ("ray", "baseline"):
                r = measure(mode, raw, work / f"out-{mode}", 0, a.num_cpus)
                rows.append((f"{mode}, no cap, {a.size_mb} MB", r))
                print(f"  {rows[-1][0]}: {r}", flush=True)
        all_files = sorted((raw / "climate_fever" / "dataset").glob("*.jsonl"))
        for frac in (0.25, 0.5, 1.0):
            sub = work / f"raw-{frac}"
            d = sub / "climate_fever" / "dataset"
            shutil.rmtree(sub, ignore_errors=True)
            d.mkdir(parents=True)
            for f in all_files[: max(1, round(len(all_files) * frac))]:
                os.link(f, d / f.name)  # a hard link: a symlink out of this raw dir would be refused
            r = measure("ray", sub, work / f"out-cap-{frac}", a.cap, a.num_cpus)
            rows.append((f"ray, cap {a.cap}, {a.size_mb * frac:.0f} MB", r))
            print(f"  {rows[-1][0]}: {r}", flush=True)
        print()
        print(f"| run | records read | prepare s | rows/s | Ray start s | peak RSS driver MB | peak RSS all processes MB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, r in rows:
            print(f"| {name} | {r['read']:,} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | {r['ray_start_s']:.1f} | "
                  f"{r['peak_driver_mb']:,.0f} | {r['peak_tree_mb']:,.0f} |")
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
