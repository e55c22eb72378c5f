"""Are two runs' results the same? Per-step train/val losses, adapter weights and the evaluation matrix of
two output trees, compared exactly (used for issue 25's "bit-identical before and after a refactor").

    python bench/compare_outputs.py OUT_A OUT_B [--ignore-intervals]

--ignore-intervals leaves the interval bounds and names out of the matrix comparison (for a comparison
across a change of interval method). Wall times, fingerprints and lm-eval harness settings are always left
out. Exit 0 when everything compared is identical, 1 otherwise.

To compare two commits on the demo with the same base model (the demo's tiny base is built from the data,
so give both the same one):
    adapters run --config configs/demo.yaml --output /tmp/a            # builds /tmp/a/base_model
    cp -r /tmp/a/base_model /tmp/base
    adapters run --config configs/demo.yaml --output /tmp/new --set model.base=/tmp/base
    (cd OLD_CHECKOUT && PYTHONPATH=. python -m pipeline run --config configs/demo.yaml --output /tmp/old \\
        --set model.base=/tmp/base)
    python bench/compare_outputs.py /tmp/old /tmp/new --ignore-intervals
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

SKIP = {"wall_time_s", "fingerprint"}
INTERVAL = {"low", "high", "interval"}


def _strip(x, drop: set):
    if isinstance(x, dict):
        return {k: _strip(v, drop) for k, v in x.items() if k not in drop and not k.startswith("harness_")}
    if isinstance(x, list):
        return [_strip(v, drop) for v in x]
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ignore-intervals", action="store_true")
    args = ap.parse_args()
    same = True
    domains = sorted(p.name for p in (args.a / "adapters").iterdir() if (p / "training_report.json").exists())
    for d in domains:
        ra, rb = (json.loads((o / "adapters" / d / "training_report.json").read_text()) for o in (args.a, args.b))
        ha, hb = ([(k, h["step"], h["loss"], h.get("tokens")) for k in ("train", "val") for h in r["history"][k]]
                  for r in (ra, rb))
        wa, wb = (hashlib.sha256((o / "adapters" / d / "adapter_model.safetensors").read_bytes()).hexdigest()
                  for o in (args.a, args.b))
        ok = ha == hb and wa == wb
        same &= ok
        print(f"{d}: {len(ha)} logged losses {'identical' if ha == hb else 'DIFFER'}; adapter weights "
              f"{'identical' if wa == wb else 'DIFFER'} (sha256 {wa[:12]} / {wb[:12]})")
        if ha != hb:
            print("  first difference:", next((x, y) for x, y in zip(ha, hb) if x != y) if len(ha) == len(hb) else "lengths")
    drop = SKIP | (INTERVAL if args.ignore_intervals else set())
    ma, mb = (_strip(json.loads((o / "eval" / "matrix.json").read_text()), drop) for o in (args.a, args.b))
    print("eval matrix" + (" (interval bounds left out)" if args.ignore_intervals else "") + ": "
          + ("identical" if ma == mb else "DIFFERS at " + ", ".join(k for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k))))
    same &= ma == mb
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
