"""The LoRA dropout kernels (pipeline/lm/lora_triton.py) under other launch configurations.

    python bench/lora_kernels.py [--m 8192] [--r 16] [--p 0.05] [--json out.json]

For the shapes of a 7B Mistral layer (x: 8192 tokens x 4096 for q,k,v,o,gate,up; x 14336 for down)
it times lora_down (h = dropout(x) @ A^T) and lora_down_backward (gA, and gx += dropout'(gh @ A) in
place) under each block shape, warp count, pipeline depth and grid size, checks every result against
the current configuration's (same mask: the same values up to fp32 summation order), and prints
the effective memory bandwidth (bytes the kernel must move / time) and the configuration that is
fastest over one all-linear layer (six 4096-wide inputs and one 14336-wide). Needs a CUDA GPU.
Not a test: it prints figures.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTHS = {4096: 6, 14336: 1}   # input width -> LoRA layers with that input per all-linear decoder layer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--json")
    a = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench
    from pipeline.lm import lora_triton as lt
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    seed, p = 1234, a.p
    g = torch.Generator(device="cuda").manual_seed(0)
    data = {}
    for K in WIDTHS:
        x = torch.randn(a.m, K, device="cuda", generator=g).to(torch.bfloat16)
        A = (torch.randn(a.r, K, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        gh = torch.randn(a.m, a.r, device="cuda", generator=g).to(torch.bfloat16)
        gx = torch.randn(a.m, K, device="cuda", generator=g).to(torch.bfloat16)
        h0 = lt.lora_down(x, A, seed, p, sm).float()
        gx0 = gx.clone()
        ga0 = lt.lora_down_backward(x, gh, A, gx0, seed, p, sm)
        data[K] = (x, A, gh, gx, h0, ga0, gx0)

    def run(kind: str, cfg: dict) -> dict:
        out = {"kind": kind, **cfg}
        for K, (x, A, gh, gx, h0, ga0, gx0) in data.items():
            try:
                if kind == "fwd":
                    h = lt.lora_down(x, A, seed, p, sm, cfg).float()
                    err = float((h - h0).abs().max() / h0.abs().max())
                    ms = do_bench(lambda: lt.lora_down(x, A, seed, p, sm, cfg))
                    nbytes = x.numel() * 2
                else:
                    gxc = gx.clone()
                    ga = lt.lora_down_backward(x, gh, A, gxc, seed, p, sm, cfg)
                    err = max(float((ga - ga0).abs().max() / ga0.abs().max()),
                              float((gxc.float() - gx0.float()).abs().max() / gx0.float().abs().max()))
                    scratch = gx.clone()
                    ms = do_bench(lambda: lt.lora_down_backward(x, gh, A, scratch, seed, p, sm, cfg))
                    nbytes = x.numel() * 2 * 3
            except Exception as e:  # a configuration that does not fit (registers, shared memory)
                out["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                return out
            out[f"ms_{K}"], out[f"tbs_{K}"], out[f"err_{K}"] = ms, nbytes / ms / 1e9, err
        out["layer_ms"] = sum(n * out[f"ms_{K}"] for K, n in WIDTHS.items())
        return out

    def show(r: dict) -> None:
        cfg = " ".join(f"{k}={r[k]}" for k in ("BM", "BK", "num_warps", "num_stages", "WAVES"))
        if "error" in r:
            print(f"{r['kind']} {cfg}: {r['error']}", flush=True)
            return
        per = "  ".join(f"K={K}: {r[f'ms_{K}']*1e3:7.1f} us {r[f'tbs_{K}']:.2f} TB/s (rel err {r[f'err_{K}']:.1e})" for K in WIDTHS)
        print(f"{r['kind']} {cfg}: layer {r['layer_ms']*1e3:7.1f} us | {per}", flush=True)

    results = []
    best = {}
    for kind, current in (("fwd", lt.FWD), ("bwd", lt.BWD)):
        rows = [run(kind, dict(current))]
        show(rows[0])
        # stage 1: block shape and warps; stage 2: pipeline depth and grid size for the two fastest
        for bm, bk, w in itertools.product((32, 64, 128), (64, 128, 256), (4, 8)):
            cfg = dict(current, BM=bm, BK=bk, num_warps=w)
            if cfg != current:
                rows.append(run(kind, cfg))
                show(rows[-1])
        top = sorted((r for r in rows if "error" not in r), key=lambda r: r["layer_ms"])[:2]
        for r in top:
            for st, wv in itertools.product((2, 3, 4), (2, 4, 8)):
                cfg = {k: r[k] for k in ("BM", "BK", "num_warps")} | {"num_stages": st, "WAVES": wv}
                if all(any(x.get(k) != cfg[k] for k in cfg) for x in rows):
                    rows.append(run(kind, cfg))
                    show(rows[-1])
        ok = [r for r in rows if "error" not in r and max(r[f"err_{K}"] for K in WIDTHS) < 2e-2]
        b = min(ok, key=lambda r: r["layer_ms"])
        best[kind] = b
        print(f"BEST {kind}: " + json.dumps({k: b[k] for k in ("BM", "BK", "num_warps", "num_stages", "WAVES")})
              + f" layer {b['layer_ms']*1e3:.1f} us vs current {rows[0]['layer_ms']*1e3:.1f} us "
              f"({rows[0]['layer_ms'] / b['layer_ms']:.2f}x)", flush=True)
        results += rows
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": results, "best": best, "sm": sm}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
