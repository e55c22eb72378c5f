"""Near-duplicates across splits on real data: contamination before and after near-duplicate grouping.

    python bench/contamination.py                          # ../shared/data/real (the default)
    python bench/contamination.py --raw-dir DIR --domains medicine,ecology

Runs prepare twice in this process (``use_ray=False``: the same split code as with Ray Data, without
cluster start-up in the timing), once with ``data.near_duplicates=false`` (exact duplicates and
source groups only: the old behaviour) and once with it on, each into a fresh output directory, and
prints per domain: test rows, test rows with >= 50% of their word 13-grams in that domain's train
split and in other domains' train splits (the manifest's ``contamination``), the split sizes, and
the prepare CPU time of each (the machine is shared: wall time varies with the load). Nothing here is a test; figures go to bench/NOTES.md by hand.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(raw: str, out: str, near: bool, domains: list[str]) -> tuple[dict, float]:
    from pipeline.config import load_config
    from pipeline.prepare import run_prepare
    cfg = load_config(None, sets=["model.base=tiny", "resources.device=cpu", "data.allow_missing=true",
                                  f"data.near_duplicates={'true' if near else 'false'}"],
                      raw_dir=raw, output=out, domains=domains, environ={})
    t = time.process_time()   # CPU time of this process: the machine is shared, wall time is not stable
    m = run_prepare(cfg, use_ray=False)
    return m, time.process_time() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw-dir", default=str(ROOT.parent / "shared" / "data" / "real"))
    ap.add_argument("--domains", default="debate,medicine,education,ecology")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    domains = a.domains.split(",")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for near in (False, True):
            res[near] = run(a.raw_dir, str(Path(tmp) / ("near" if near else "exact")), near, domains)
    print(f"raw: {a.raw_dir}")
    print("test rows with >= 50% of their word 13-grams in a train split; before: exact duplicates and source groups "
          "only (data.near_duplicates=false); after: near-duplicate units")
    print("all: every 13-gram counted; w/o tmpl: the domain's template 13-grams (in > 10% of one task's rows, and 3+) left out")
    print(f"{'domain':<10} {'run':<7} {'train/val/test':>16} {'own train, all':>15} {'own, w/o tmpl':>14} "
          f"{'other domains':>14} {'merged':>7} {'moved':>6}")
    pct = (lambda k, n: f"{k} ({100 * k / n:.1f}%)" if n else "0")
    for dm in domains:
        for near, label in ((False, "before"), (True, "after")):
            m = res[near][0]
            c = m["contamination"]["domains"].get(dm)
            if not c:
                print(f"{dm:<10} {label:<7} (no rows)")
                continue
            sizes = m["domains"][dm]["sft_rows"]
            nd = m["domains"][dm]["near_duplicates"]
            n = c["test_rows"]
            print(f"{dm:<10} {label:<7} {'/'.join(str(sizes[s]) for s in ('train', 'val', 'test')):>16} "
                  f"{pct(c['in_own_train'], n):>15} {pct(c['in_own_train_without_templates'], n):>14} "
                  f"{pct(c['in_other_train'], n):>14} {nd.get('merged_groups', '-'):>7} "
                  f"{nd['moved_to_train']['rows'] if 'moved_to_train' in nd else '-':>6}")
    nd_s = sum(m.get("near_duplicates", {}).get("seconds", 0) for m in res[True][0]["domains"].values())
    print(f"near-duplicate units: {nd_s:.2f}s of prepare; contamination table: {res[True][0]['contamination']['seconds']:.2f}s")
    print(f"prepare CPU time (this process): before {res[False][1]:.1f}s, after {res[True][1]:.1f}s ({100 * (res[True][1] / res[False][1] - 1):+.0f}%)")


if __name__ == "__main__":
    main()
