"""The recipe's base-model evaluation (DomainRecipe.evaluate_base) timed per domain, in-process (no Ray),
on an output the demo has prepared.

    adapters run --config configs/demo.yaml --output /tmp/demo      (or only `adapters prepare`, `adapters train`)
    python bench/base_eval.py /tmp/demo [repeats]

Run it from the repository root: it reads configs/demo.yaml and the output's data/sft and base_model/. For
each domain it sets a recipe up (model, LoRA, kernels) on the domain's tokenized splits, then times
evaluate_base() `repeats` times (3 by default) and prints the median and the base losses measured. To
compare two versions of the code, run it with each on PYTHONPATH, on the same output.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

from pipeline.config import load_config
from pipeline.lm.data import read_split
from pipeline.storage import open_store
from pipeline.train.data import SFT_COLUMNS, Tokenize, collect
from pipeline.train.loop import DomainRecipe
from pipeline.train.sessions import LocalSession


def main(out: str, repeats: int = 3) -> dict:
    cfg = load_config("configs/demo.yaml", output=out)
    store = open_store(cfg)
    tokenize = Tokenize(cfg)
    res = {}
    for d in cfg.domains:
        data = collect([tokenize(read_split(store, d, s, columns=SFT_COLUMNS).to_pydict()) for s in ("train", "val", "test")])
        with tempfile.TemporaryDirectory(prefix="base-eval-") as ck:
            r = DomainRecipe(cfg, d, data, LocalSession(ck, resume=False))
            r.setup()
            times = []
            for _ in range(repeats):
                r.state.base = None   # evaluate_base measures once per domain: undo it to time it again
                t0 = time.perf_counter()
                r.evaluate_base()
                times.append(time.perf_counter() - t0)
        res[d] = {"median_s": round(statistics.median(times), 3), "times_s": [round(t, 3) for t in times],
                  "base": r.state.base, "examples": {s: len(data[s]) for s in ("val", "test")}}
        print(d, json.dumps(res[d]), flush=True)
    print(json.dumps({"total_median_s": round(sum(v["median_s"] for v in res.values()), 3)}))
    return res


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
