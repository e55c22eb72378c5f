"""The report: what was trained, how well, on what data, and how to reproduce it.

    run_report(cfg) -> dict of URIs   {"json", "md", "html", "<plot>.png"...}, all under report/

Reads (each may be missing: the report says so instead of failing)
    data/manifest.json                        per source counts, licenses, file checksums; per domain rows
    data/download_manifest.json               versions (revision / commit) of downloaded sources
    adapters/<domain>/training_report.json    a finished adapter's metrics and loss history
    runs/<run_name>/domains/<domain>.json     the domain's state (failed with its cause, skipped, running)
    eval/matrix.json                          base + every adapter on every domain's test set: loss, task
                                              metrics with intervals, verdicts, side-by-side generations
    eval/harness.json                         lm-evaluation-harness's tasks on base + every adapter (optional)
Writes, through the output Store (local or s3://)
    report/summary.json   per domain and run-level facts (the contract in docs/ARCHITECTURE.md, 'Report')
    report/summary.md     the same as tables, plots linked
    report/summary.html   one self-contained file: CSS inline, plots embedded as base64 PNG
    report/loss_curves.png  report/perplexity.png  report/eval_matrix.png

Nothing secret is written: the config comes from ``cfg.redacted()``, and every text written goes
through ``pipeline.redaction.scrub`` (credential values from the environment, URL secrets, HF tokens).
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from pipeline import layout
from pipeline.redaction import redact_url, scrub
from pipeline.storage import Store, StorageError, open_store

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
PACKAGES = ("domain-adapters", "ray", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers",
            "safetensors", "huggingface_hub", "pyarrow", "pandas", "boto3", "pydantic", "PyYAML", "matplotlib")
METRICS = ("train_loss", "val_loss", "test_loss", "val_ppl", "test_ppl", "base_val_loss", "base_test_loss",
           "base_val_ppl", "base_test_ppl", "tokens_per_s", "peak_memory_gb", "wall_time_s", "busy_share", "steps")


# ---- reading the output tree -----------------------------------------------------------------

def _read(store: Store, rel: str) -> tuple[Optional[Any], Optional[str]]:
    """(parsed JSON or None, problem or None): missing is (None, None); damaged is (None, why)."""
    try:
        return store.read_json(rel), None
    except FileNotFoundError:
        return None, None
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{rel} is not valid JSON ({e})"
    except StorageError as e:
        return None, str(e)


def _num(x: Any) -> Optional[float]:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ppl(loss: Any) -> Optional[float]:
    v = _num(loss)
    if v is None:
        return None
    try:
        return math.exp(min(v, 700.0))
    except OverflowError:
        return None


def domain_summary(store: Store, cfg, domain: str, manifest: Optional[dict]) -> dict:
    """One domain's row of the report: status and cause (pipeline.status.domain_state, the same words
    `adapters status` shows), metrics."""
    from pipeline.status import domain_state
    rel = layout.training_report(domain)
    rep, _ = _read(store, rel)
    rep = rep if isinstance(rep, dict) else None
    dman = ((manifest or {}).get("domains") or {}).get(domain) or {}
    st = domain_state(store, cfg.run_name, domain, manifest)
    out: dict[str, Any] = {"domain": domain, "status": st.state, "cause": st.cause}
    if isinstance(st.record, dict) and st.record:
        out["state"] = {k: st.record.get(k) for k in ("state", "updated", "error") if k in st.record}
    rep = rep if st.state == "finished" else None  # metrics only from the adapter that counts
    try:
        out.update(_report_metrics(rep, dman))
    except (TypeError, AttributeError, ValueError, KeyError) as e:
        # a damaged report costs that domain's row, not the whole report
        out.update(_report_metrics(None, dman), status="unknown",
                   cause=f"{rel} is unreadable: a field has an unexpected type ({type(e).__name__}: {e})")
        rep = None
    out["adapter_uri"] = st.adapter_uri if out["status"] == st.state else None
    if out["test_ppl"] and out["base_test_ppl"]:
        out["test_ppl_change_pct"] = 100.0 * (out["test_ppl"] / out["base_test_ppl"] - 1.0)
    else:
        out["test_ppl_change_pct"] = None
    return out


TEST_FIGURES = ("test_loss", "test_ppl", "base_test_loss", "base_test_ppl")


def _stale_matrix_note(cfg, store: Store, matrix: Optional[dict]) -> Optional[str]:
    """Why eval/matrix.json is not this output's evaluation (it was made from other adapters, data or eval
    settings: an adapter retrained since, and its evaluation failed or has not run), else None. A matrix
    without a fingerprint (made by hand) is taken as it is."""
    if not matrix or not matrix.get("fingerprint"):
        return None
    from pipeline.eval import finished_adapters, up_to_date
    try:
        if up_to_date(cfg, store, finished_adapters(cfg, store)):
            return None
    except Exception as e:  # noqa: BLE001 - the report is made whatever it cannot check
        log.warning("report: could not check whether eval/matrix.json is up to date: %s", e)
        return None
    return ("eval/matrix.json was made from other adapters, data or eval settings than this output has now: its "
            "figures (and the keep / drop table) are not this run's; the test figures per domain are the training "
            "recipe's. `adapters eval` brings it up to date")


def _test_figures_of_the_evaluation(row: dict, matrix: Optional[dict], domain: str) -> None:
    """One test loss per model and split in the whole report: the evaluation's (eval/matrix.json) wherever it
    scored that model on that test split. The training recipe measures test loss too (training_report.json),
    on its own batches; shown only where the evaluation has no figure (evaluation off, or that model not
    scored), and ``test_source`` says which one a row's test figures are."""
    loss = (matrix or {}).get("loss") or {}
    src = {}
    for model, pre in ((domain, ""), ("base", "base_")):
        v = _num((loss.get(model) or {}).get(domain))
        if v is not None and (model == "base" or row.get("status") == "finished"):
            row[f"{pre}test_loss"], row[f"{pre}test_ppl"] = v, _ppl(v)
            src[model if model == "base" else "adapter"] = "eval/matrix.json"
        elif row.get(f"{pre}test_loss") is not None:
            src[model if model == "base" else "adapter"] = "training_report.json"
    row["test_source"] = src or None
    row["test_ppl_change_pct"] = (100.0 * (row["test_ppl"] / row["base_test_ppl"] - 1.0)
                                  if row["test_ppl"] and row["base_test_ppl"] else None)


def _report_metrics(rep: Optional[dict], dman: dict) -> dict:
    """A domain's figures from its training report (None: none, example counts from the manifest)."""
    out: dict[str, Any] = {}
    n = (rep or {}).get("n_examples") or dman.get("sft_rows") or {}
    out["examples"] = {s: n.get(s) for s in SPLITS}
    for k in METRICS:
        out[k] = _num((rep or {}).get(k)) if rep else None
    if rep:  # derive perplexities from losses when a report has only losses
        for split in ("val", "test"):
            for pre in ("", "base_"):
                if out[f"{pre}{split}_ppl"] is None:
                    out[f"{pre}{split}_ppl"] = _ppl(out[f"{pre}{split}_loss"])
    hist = (rep or {}).get("history") or {}
    out["_history"] = {"train": [h for h in hist.get("train", []) if isinstance(h, dict)],
                       "val": [h for h in hist.get("val", []) if isinstance(h, dict)]}
    for k in ("resumed_from_step", "device", "base_model", "tokens", "epochs"):
        if rep and k in rep:
            out[k] = rep[k]
    return out


def data_card(manifest: Optional[dict], download: Optional[dict]) -> dict:
    """Per source: counts read/kept/quarantined (by reason)/deduplicated/capped, license, files and checksums."""
    if not manifest:
        return {"available": False, "sources": {}, "domains": {}, "totals": {}}
    dl = (download or {}).get("sources") or {}
    sources = {}
    for name, m in (manifest.get("sources") or {}).items():
        versions = []
        for part in (dl.get(name) or {}).get("parts", []) or []:
            v = part.get("commit") or part.get("revision") or part.get("kind")
            if v and v not in versions:
                versions.append(str(v))
        sources[name] = {
            "domain": m.get("domain"), "status": m.get("status"), "license": m.get("license"), "url": m.get("url"),
            "version": ", ".join(versions) or None,
            **{k: m.get(k, 0) for k in ("read", "kept", "quarantined", "deduplicated", "capped")},
            "cap": m.get("cap"), "quarantined_by_reason": m.get("quarantined_by_reason") or {},
            "sft_examples": m.get("sft_examples"),
            "files": [{"path": f.get("path"), "size": f.get("size"), "sha256": f.get("sha256"), "status": f.get("status")}
                      for f in m.get("files", []) if isinstance(f, dict)],
        }
    domains = {d: {"status": m.get("status"), "corpus_rows": m.get("corpus_rows"), "sft_rows": m.get("sft_rows"),
                   "tokens_estimate": m.get("tokens_estimate"), "reason": m.get("reason"),
                   "near_duplicates": m.get("near_duplicates")}
               for d, m in (manifest.get("domains") or {}).items()}
    return {"available": True, "fingerprint": manifest.get("fingerprint"), "settings": manifest.get("settings"),
            "totals": manifest.get("totals") or {}, "sources": sources, "domains": domains,
            "contamination": manifest.get("contamination")}


def package_versions() -> dict[str, Optional[str]]:
    from importlib import metadata
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_commit(repo: Optional[Path] = None) -> dict[str, Any]:
    """The code's git commit (None outside a checkout) and whether tracked files were modified."""
    repo = repo or Path(__file__).resolve().parents[1]
    if os.environ.get("GIT_COMMIT"):
        return {"commit": os.environ["GIT_COMMIT"], "dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        if commit is None:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def build_summary(cfg, store: Store) -> dict:
    """summary.json's content (plus '_history' per domain, dropped before writing)."""
    manifest, manifest_problem = _read(store, layout.MANIFEST)
    manifest = manifest if isinstance(manifest, dict) else None
    download, _ = _read(store, layout.DOWNLOAD_MANIFEST)
    matrix, matrix_problem = _read(store, layout.EVAL_MATRIX)
    matrix = matrix if isinstance(matrix, dict) and matrix.get("models") and matrix.get("datasets") else None
    domains = list(cfg.domains)
    for d in ((manifest or {}).get("domains") or {}):
        if d not in domains and d in ((manifest or {}).get("domains_requested") or []):
            domains.append(d)
    per_domain = {d: domain_summary(store, cfg, d, manifest) for d in domains}
    stale = _stale_matrix_note(cfg, store, matrix)
    for d, row in per_domain.items():
        _test_figures_of_the_evaluation(row, None if stale else matrix, d)
    card = data_card(manifest, download if isinstance(download, dict) else None)
    manifest_sha = None
    if manifest is not None:
        try:
            manifest_sha = hashlib.sha256(store.read_bytes(layout.MANIFEST)).hexdigest()
        except (StorageError, OSError):
            pass
    hashes = {name: {f["path"]: f["sha256"] for f in s["files"] if f.get("sha256")} for name, s in card["sources"].items()}
    counts: dict[str, int] = {}
    for r in per_domain.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        "report_version": 1,
        "run_name": cfg.run_name,
        "output": store.uri,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "status_counts": counts,
        "domains": per_domain,
        "eval_matrix": matrix,
        "eval_matrix_note": None if matrix else (matrix_problem or "no eval/matrix.json (the eval stage has not run, "
                                                                   "is off, or no adapter finished: `adapters eval`)"),
        "eval_matrix_stale": stale,
        "standard_benchmarks": _harness(store),
        "data": card,
        "data_note": manifest_problem if manifest_problem else (None if manifest else "no data/manifest.json (prepare not run)"),
        "reproducibility": {
            "git": git_commit(),
            "packages": package_versions(),
            "platform": {"system": platform.system(), "machine": platform.machine(), "python": sys.version.split()[0]},
            "seeds": {"seed": cfg.seed, "data.split_seed": cfg.data.split_seed, "train.seed": cfg.train.seed,
                      **({"model.tiny.seed": cfg.model.tiny.seed} if cfg.model.base == "tiny" else {})},
            "data_fingerprint": (manifest or {}).get("fingerprint"),
            "manifest_sha256": manifest_sha,
            "data_hashes": hashes,
            "command": f"adapters run --config <config> --output {store.uri}",
            "config": cfg.redacted(),
        },
    }


# ---- plots ------------------------------------------------------------------------------------------

# one colour per pipeline.status.STATES word
STATUS_COLORS = {"finished": "#1a7f37", "failed": "#cf222e", "skipped": "#9a6700", "interrupted": "#bc4c00",
                 "running": "#0969da", "stale": "#8250df", "not started": "#6e7781", "unknown": "#6e7781"}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def plot_loss_curves(summary: dict) -> bytes:
    plt = _plt()
    doms = list(summary["domains"].values())
    cols = min(2, max(1, len(doms)))
    rows = math.ceil(len(doms) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    for ax, d in zip(axes.flat, doms):
        h = d["_history"]
        tr = [(x.get("step"), _num(x.get("loss"))) for x in h["train"] if _num(x.get("loss")) is not None]
        va = [(x.get("step"), _num(x.get("loss"))) for x in h["val"] if _num(x.get("loss")) is not None]
        ax.set_title(f"{d['domain']} ({d['status']})", color=STATUS_COLORS.get(d["status"], "black"), fontsize=11)
        if not tr and not va:
            msg = d.get("cause") or "no loss history"
            ax.text(0.5, 0.5, _wrap(msg, 48), ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#57606a")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if tr:
            ax.plot(*zip(*tr), label="train", color="#0969da", lw=1.4)
        if va:
            ax.plot(*zip(*va), label="val", color="#bf3989", marker="o", ms=4, lw=1.4)
        if d.get("base_val_loss") is not None:
            ax.axhline(d["base_val_loss"], color="#6e7781", ls="--", lw=1, label="base val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(doms):]:
        ax.axis("off")
    fig.suptitle("Loss curves per domain (train and validation)", fontsize=12)
    fig.tight_layout()
    return _png(fig)


def plot_perplexity(summary: dict) -> bytes:
    plt = _plt()
    doms = list(summary["domains"].values())
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(doms) + 2), 3.8))
    xs = range(len(doms))
    w = 0.38
    base = [d.get("base_test_ppl") for d in doms]
    ada = [d.get("test_ppl") for d in doms]
    # log scale: one domain's perplexity can be 1,000x another's (a linear axis flattens the rest to nothing)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter
    for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):   # 20, 50, 100, not 2x10^1
        axis_fmt(FuncFormatter(lambda v, _: f"{v:g}"))
    floor = min([v for v in base + ada if v], default=1.0)
    b1 = ax.bar([x - w / 2 for x in xs], [v or float("nan") for v in base], w, label="base model", color="#8c959f")
    b2 = ax.bar([x + w / 2 for x in xs], [v or float("nan") for v in ada], w, label="adapter", color="#0969da")
    for bars, vals in ((b1, base), (b2, ada)):
        for rect, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}" if v else "n/a", (rect.get_x() + rect.get_width() / 2, v or floor),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{d['domain']}\n({d['status']})" for d in doms], fontsize=9)
    ax.set_ylabel("test perplexity, log scale (lower is better)")
    ax.margins(y=0.15)
    ax.set_title("Base model vs adapter: test perplexity per domain")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_eval_matrix(matrix: dict) -> bytes:
    plt = _plt()
    models, datasets = list(matrix["models"]), list(matrix["datasets"])
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(4.2, 1.2 * len(datasets) + 2.2), max(3.0, 0.6 * len(models) + 1.6)))
    for ax, key, title in ((axes[0], "loss", "test loss"), (axes[1], "ppl", "test perplexity")):
        vals = [[_num((matrix.get(key) or {}).get(m, {}).get(d)) for d in datasets] for m in models]
        flat = [v for row in vals for v in row if v is not None]
        grid = [[v if v is not None else float("nan") for v in row] for row in vals]
        im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(datasets)))
        ax.set_xticklabels(datasets, rotation=30, ha="right")
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels([m if m == "base" else f"adapter: {m}" for m in models])
        ax.set_xlabel("test set")
        ax.set_title(title)
        lo, hi = (min(flat), max(flat)) if flat else (0, 1)
        for i, row in enumerate(vals):
            for j, v in enumerate(row):
                txt = "n/a" if v is None else (f"{v:.3f}" if key == "loss" else f"{v:.1f}")
                light = v is not None and hi > lo and (v - lo) / (hi - lo) > 0.5
                ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if light else "black",
                        fontweight="bold" if models[i] == datasets[j] else "normal")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle("Evaluation matrix: base model and every adapter on every domain's test set (bold: own domain)", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def _wrap(text: str, width: int) -> str:
    words, lines, cur = str(text).split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > width and cur:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines[:6]) + ("..." if len(lines) > 6 else "")


# ---- text renderings ----------------------------------------------------------------------------

def _f(x: Any, nd: int = 3) -> str:
    v = _num(x)
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def _i(x: Any) -> str:
    v = _num(x)
    return "–" if v is None else f"{int(v):,}"


TEST_NOTE = ("Test figures are the evaluation's (the same numbers as the evaluation matrix below); where it has "
             "none (evaluation off, or that model not scored), the training recipe's.")
BUSY_NOTE = ("busy % is the share of the domain's wall time (from its trial's start to the export) spent in "
             "optimizer steps; the rest is start-up (worker, model load, tokenization), evaluations and "
             "checkpoints.")


def _results_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    head = ["domain", "status", "train / val / test examples", "train loss", "val loss (base)", "test loss (base)",
            "val ppl (base)", "test ppl (base)", "test ppl change", "tokens/s", "peak mem GB", "wall time s", "busy %", "adapter"]
    rows = []
    for d in summary["domains"].values():
        ex = d["examples"]
        chg = d.get("test_ppl_change_pct")
        rows.append([d["domain"], d["status"] + (f": {d['cause']}" if d.get("cause") else ""),
                     " / ".join(_i(ex.get(s)) for s in SPLITS), _f(d["train_loss"]),
                     f"{_f(d['val_loss'])} ({_f(d['base_val_loss'])})", f"{_f(d['test_loss'])} ({_f(d['base_test_loss'])})",
                     f"{_f(d['val_ppl'], 2)} ({_f(d['base_val_ppl'], 2)})", f"{_f(d['test_ppl'], 2)} ({_f(d['base_test_ppl'], 2)})",
                     "–" if chg is None else f"{chg:+.1f}%", _f(d["tokens_per_s"], 0), _f(d["peak_memory_gb"], 2),
                     _f(d["wall_time_s"], 1), "–" if d.get("busy_share") is None else f"{100 * d['busy_share']:.0f}",
                     d.get("adapter_uri") or "–"])
    return head, rows


def _matrix_rows(matrix: dict, key: str) -> tuple[list[str], list[list[str]]]:
    ds = list(matrix["datasets"])
    rows = []
    for m in matrix["models"]:
        vals = (matrix.get(key) or {}).get(m, {})
        rows.append([m if m == "base" else f"adapter: {m}"] + [_f(vals.get(d), 3 if key == "loss" else 2) for d in ds])
    return ["model \\ test set"] + ds, rows


# ---- the evaluation sections (eval/matrix.json: pipeline/eval) ---------------------------------------
from pipeline.eval.matrix import MAX_MAJORITY_RATE  # noqa: E402 (the bound the report states)

EVAL_METRICS = {"loss": "test loss", "ppl": "test perplexity", "acc": "accuracy", "acc_norm": "accuracy (length-normalised)",
                "rouge_l": "ROUGE-L (F)", "f1": "bag-of-words F1 (not SQuAD's)"}
TASK_METRICS = ("acc", "acc_norm", "rouge_l", "f1")


def _nd(metric: str) -> int:
    return 2 if metric == "ppl" else 3


def _cell_text(c: Optional[dict], metric: str) -> str:
    """value [low, high] (n=...) of one matrix cell."""
    if not c or c.get("value") is None:
        return "–"
    nd = _nd(metric)
    ci = f" [{_f(c.get('low'), nd)}, {_f(c.get('high'), nd)}]" if c.get("low") is not None else ""
    return f"{_f(c['value'], nd)}{ci} (n={c.get('n')})"


def _diff_text(c: dict, metric: str) -> str:
    if c.get("difference") is None:
        return "–"
    nd = _nd(metric)
    return f"{c['difference']:+.{nd}f} [{_f(c.get('low'), nd)}, {_f(c.get('high'), nd)}]"


def _p_text(c: dict) -> str:
    if c.get("p") is None:
        return "–"
    return f"{c['p']:.3g} ({c.get('test')})" + ("" if c.get("p_adjusted") is None else f"; Holm-adjusted {c['p_adjusted']:.3g}")


def _eval_has(matrix: dict, metric: str) -> bool:
    return any((c or {}).get("value") is not None for per in ((matrix.get("metrics") or {}).get(metric) or {}).values()
               for c in per.values())


def _metric_matrix_rows(matrix: dict, metric: str) -> tuple[list[str], list[list[str]]]:
    ds = list(matrix["datasets"])
    vals = (matrix.get("metrics") or {}).get(metric) or {}
    rows = [[m if m == "base" else f"adapter: {m}"] + [_cell_text(vals.get(m, {}).get(d), metric) for d in ds]
            for m in matrix["models"]]
    return ["model \\ test set"] + ds, rows


def _verdict_rows(matrix: dict) -> tuple[list[str], list[list[str]]]:
    """Each adapter against the base model on its own domain, every measured metric; the headline first."""
    metrics, comps = matrix.get("metrics") or {}, matrix.get("comparisons") or {}
    rows = []
    for d in matrix["datasets"]:
        head = (matrix.get("verdicts") or {}).get(d, {}).get("metric")
        order = [head] + [m for m in ("loss", "acc", "acc_norm", "rouge_l", "f1") if m != head] if head else []
        for m in order:
            c = (comps.get(d) or {}).get(d, {}).get(m) or {}
            if not c.get("n"):
                continue
            if m == head:   # the domain's verdict: decided on the Holm-adjusted p
                c = matrix["verdicts"][d]
            rows.append([d if m == head else "", EVAL_METRICS[m] + (" (headline)" if m == head else ""), _i(c["n"]),
                         _cell_text(metrics.get(m, {}).get("base", {}).get(d), m),
                         _cell_text(metrics.get(m, {}).get(d, {}).get(d), m), _diff_text(c, m), _p_text(c), c["verdict"]])
    return ["domain", "metric", "paired examples", "base [95% CI]", "adapter [95% CI]", "difference [95% CI]",
            "p (test)", "verdict"], rows


# fewer paired rows than this and the top table says "too few rows" instead of keep / drop
MIN_DECISION_N = 30


def _keep_rows(matrix: dict) -> tuple[list[str], list[list[str]]]:
    """The report's first table, one row per domain: keep the adapter or not, on what evidence (its own
    domain's headline metric vs the base model, the loss change there, the worst loss change it causes
    on another domain)."""
    comps, metrics = matrix.get("comparisons") or {}, matrix.get("metrics") or {}
    rows = []
    for d, v in (matrix.get("verdicts") or {}).items():
        m, n = v["metric"], v.get("n") or 0
        if n < MIN_DECISION_N:
            decision = f"too few rows to decide (n={n} < {MIN_DECISION_N})"
        else:
            decision = {"better": "keep", "worse": "drop"}.get(v["verdict"], "no evidence either way (not significant)")
        own_loss = (comps.get(d) or {}).get(d, {}).get("loss") or {}
        others = [(o, c.get("loss") or {}) for o, c in (comps.get(d) or {}).items() if o != d]
        others = [(o, c) for o, c in others if c.get("difference") is not None]
        worst = max(others, key=lambda oc: oc[1]["difference"], default=None)
        rows.append([d, decision,
                     f"{EVAL_METRICS.get(m, m)}: base {_cell_text(metrics.get(m, {}).get('base', {}).get(d), m)}, "
                     f"adapter {_cell_text(metrics.get(m, {}).get(d, {}).get(d), m)}",
                     f"{_diff_text(v, m)}; p {'–' if v.get('p') is None else format(v['p'], '.3g')}"
                     + ("" if v.get("p_adjusted") is None else f", Holm {v['p_adjusted']:.3g}") + f"; {v['verdict']}",
                     "–" if own_loss.get("difference") is None else f"{own_loss['difference']:+.3f} ({own_loss['verdict']})",
                     "–" if worst is None else f"{worst[0]}: {worst[1]['difference']:+.3f} ({worst[1]['verdict']})"])
    return ["domain", "keep this adapter?", "evidence: own-domain headline metric [95% CI]", "difference vs base [95% CI]",
            "own test loss change", "worst loss change on another domain"], rows


def _interference_rows(matrix: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for part, label in (("diagonal", "own domain"), ("off_diagonal", "other domains")):
        for m, c in ((matrix.get("summary") or {}).get(part) or {}).items():
            if c.get("cells"):
                rows.append([label, EVAL_METRICS.get(m, m), _i(c["cells"]),
                             "–" if c.get("mean_difference") is None else f"{c['mean_difference']:+.{_nd(m)}f}",
                             _i(c.get("better")), _i(c.get("worse")), _i(c.get("no significant difference"))])
    return ["adapters on", "metric", "cells", "mean difference vs base", "better", "worse", "no significant difference"], rows


def _task_rows(matrix: dict, domain: str) -> tuple[list[str], list[list[str]]]:
    """One domain's tasks (source/SFT task): kind, rows, rows not scored, base vs the domain's adapter."""
    rows = []
    for name, t in ((matrix.get("tasks") or {}).get(domain) or {}).items():
        shown = [k for k in ("acc", "acc_norm", "rouge_l", "f1", "loss") if k in t.get("metrics", {})]
        for k, m in enumerate(shown):
            per = t["metrics"][m]
            first = [name, t["kind"].replace("_", " "), _i(t["rows"]), _i(t.get("unscored")), _majority_text(t)] if k == 0 else [""] * 5
            rows.append(first + [EVAL_METRICS[m], _cell_text(per.get("base"), m), _cell_text(per.get(domain), m)])
    return ["task", "kind", "test rows", "not scored", "majority-class accuracy", "metric", "base [95% CI]",
            f"{domain} adapter [95% CI]"], rows


def _majority_text(t: dict) -> str:
    """What always answering the most common gold choice would score, beside acc; 'trivial' when one class
    or a majority above the bound (pipeline/eval/matrix.MAX_MAJORITY_RATE): such a task decides no verdict."""
    r = t.get("majority_rate")
    if r is None:
        return "–"
    if t.get("gold_classes", 2) < 2:
        return f"{r:.3f} (trivial: one gold class)"
    return f"{r:.3f}" + (" (trivial)" if t.get("trivial") else "")


def _fence(text: Optional[str], lang: str = "text") -> list[str]:
    """A fenced Markdown block that no run of backticks inside the text can close."""
    text = "(none)" if text is None else str(text)
    longest = max((len(r) for r in re.findall(r"`+", text)), default=0)
    f = "`" * max(3, longest + 1)
    return [f + lang, text, f]


def _eval_md(matrix: dict) -> list[str]:
    """The evaluation's Markdown sections after the loss and perplexity matrices."""
    L: list[str] = []
    if not matrix.get("metrics"):
        return L
    L += ["### Adapter vs base model on its own domain", "",
          "Same test examples for both; 95% intervals: exact Clopper-Pearson for accuracy and Newcombe's paired interval "
          "(Clopper-Pearson margins) for an accuracy difference; a BCa bootstrap over examples for loss, ROUGE-L, F1 and "
          "their differences (approximate on few rows: read each with its n); "
          "accuracy is compared with McNemar's exact test, the other metrics with a paired permutation test; a verdict is "
          f"'better' or 'worse' when p < {(matrix.get('settings') or {}).get('alpha', 0.05)}: Holm-adjusted over the "
          "domains for each domain's verdict (the list below), uncorrected in the other tables. The headline metric is accuracy where a domain has multiple-choice rows that are not trivial "
          f"(more than one gold class, majority-class accuracy at most {MAX_MAJORITY_RATE}), else ROUGE-L.", ""]
    for d, v in (matrix.get("verdicts") or {}).items():
        L.append(f"- **{d}**: {v['verdict']} ({EVAL_METRICS.get(v['metric'], v['metric'])} "
                 f"{_diff_text(v, v['metric'])}, p {_p_text(v) if v.get('p') is not None else 'n/a'}, n={v.get('n')})")
    L += ["", _md_table(*_verdict_rows(matrix)), "", "### Interference: adapters on the other domains", "",
          _md_table(*_interference_rows(matrix)), ""]
    for m in TASK_METRICS:
        if _eval_has(matrix, m):
            L += [f"### {EVAL_METRICS[m][0].upper() + EVAL_METRICS[m][1:]}", "", _md_table(*_metric_matrix_rows(matrix, m)), ""]
    c = matrix.get("counts") or {}
    L += ["### Tasks per domain", ""]
    for d in matrix["datasets"]:
        n = c.get(d) or {}
        L += [f"#### {d}", "", f"{_i(n.get('items'))} test rows scored for loss; {_i(n.get('multiple_choice_scored'))} "
              f"multiple-choice rows scored ({_i(n.get('multiple_choice_unscored'))} without a readable gold answer, not "
              f"scored); {_i(n.get('generated'))} free-text rows generated.", "", _md_table(*_task_rows(matrix, d)), ""]
    L += ["### Side-by-side generations", ""]
    for d, items in (matrix.get("side_by_side") or {}).items():
        for k, it in enumerate(items, 1):
            L += [f"#### {d}, example {k} ({it.get('source')}/{it.get('task')})", "", "Prompt:", *_fence(it.get("prompt")), "",
                  "Reference:", *_fence(it.get("reference")), "", "Base model:", *_fence(it.get("base")), "",
                  f"{d} adapter:", *_fence(it.get("adapter")), ""]
    return L


def _eval_html(matrix: dict) -> list[str]:
    """The evaluation's HTML sections after the loss and perplexity matrices (every text escaped)."""
    if not matrix.get("metrics"):
        return []
    esc = _esc_rows_head
    parts = ["<h3>Adapter vs base model on its own domain</h3>",
             '<p class="note">Same test examples for both; 95% intervals: exact Clopper-Pearson for accuracy, percentile '
             "bootstrap over examples for the other metrics and the differences (covers less than 95% on few rows); accuracy: "
             "McNemar's exact test, other metrics: paired permutation test; per-domain verdicts Holm-adjusted over the domains, other cells uncorrected. Headline: "
             "accuracy where a domain has multiple-choice rows that are not trivial (two or more gold classes, majority-class "
             f"accuracy at most {MAX_MAJORITY_RATE}), else ROUGE-L.</p><ul>"]
    for d, v in (matrix.get("verdicts") or {}).items():
        cls = {"better": "finished", "worse": "failed"}.get(v["verdict"], "missing")
        parts.append(f'<li><b>{_h(d)}</b>: <span class="badge {cls}">{_h(v["verdict"])}</span> '
                     f"{_h(EVAL_METRICS.get(v['metric'], v['metric']))} {_h(_diff_text(v, v['metric']))}, "
                     f"p {_h(_p_text(v) if v.get('p') is not None else 'n/a')}</li>")
    parts += ["</ul>", _html_table(*esc(_verdict_rows(matrix)), None, "eval-verdicts"),
              "<h3>Interference: adapters on the other domains</h3>",
              _html_table(*esc(_interference_rows(matrix)), [None, None, "num", "num", "num", "num", "num"], "eval-interference")]
    for m in TASK_METRICS:
        if _eval_has(matrix, m):
            parts += [f"<h3>{_h(EVAL_METRICS[m][0].upper() + EVAL_METRICS[m][1:])}</h3>",
                      _html_table(*esc(_metric_matrix_rows(matrix, m)), None, f"matrix-{m}")]
    parts.append("<h3>Tasks per domain</h3>")
    for d in matrix["datasets"]:
        parts += [f"<h4>{_h(d)}</h4>", _html_table(*esc(_task_rows(matrix, d)), None, f"tasks-{_h(d)}")]
    parts.append("<h3>Side-by-side generations</h3>")
    for d, items in (matrix.get("side_by_side") or {}).items():
        rows = [[_h(f"{it.get('source')}/{it.get('task')}")] +
                [f'<pre class="gen">{_h(it.get(k) if it.get(k) is not None else "(none)")}</pre>'
                 for k in ("prompt", "reference", "base", "adapter")] for it in items]
        parts += [f"<h4>{_h(d)}</h4>", _html_table(["task", "prompt", "reference", "base model", f"{d} adapter"], rows, None,
                                                    f"side-by-side-{_h(d)}")]
    return parts


# ---- standard benchmarks (eval/harness.json: pipeline/eval/harness.py) -------------------------------------

HARNESS_NOTE = ("lm-evaluation-harness's own tasks (prompts, few-shot counts, splits, metrics), run by lm-eval on the base "
                "model and with each adapter (its `peft=` model argument): comparable with published lm-eval numbers for the "
                "same task, base model and precision{limit}. ± is lm-eval's standard error; n is rows scored.")


def _harness(store: Store) -> Optional[dict]:
    h, problem = _read(store, "eval/harness.json")
    if problem:
        log.warning("report: eval/harness.json unreadable (%s): no standard benchmark table", problem)
    return h if isinstance(h, dict) and h.get("rows") else None


def _harness_rows(h: dict) -> tuple[list[str], list[list[str]]]:
    """One row per task, metric (and filter, when not lm-eval's plain 'none'); one column per model."""
    models = list(h.get("models") or [])
    cells: dict[tuple, dict] = {}
    for r in h["rows"]:
        metric = r["metric"] if r.get("filter") in (None, "none") else f"{r['metric']} ({r['filter']})"
        cells.setdefault((r["task"], metric), {})[r["model"]] = r
    def fig(x: Any) -> str:   # a perplexity of a summed log-likelihood can be 1e17: not 18 digits
        v = _num(x)
        return f"{v:.4g}" if v is not None and abs(v) >= 1e5 else _f(x)

    rows = []
    for (task, metric), per in cells.items():
        n = {x.get("n") for x in per.values()}
        rows.append([task, metric, _i(n.pop()) if len(n) == 1 else "–"]
                    + [("–" if m not in per else fig(per[m]["value"]) + (f" ± {fig(per[m]['stderr'])}" if per[m].get("stderr") is not None else ""))
                       for m in models])
    return ["task", "metric", "n"] + models, rows


def _harness_note(h: dict) -> str:
    return (HARNESS_NOTE.format(limit=f"; here cut to {h['limit']} rows per task, so not comparable" if h.get("limit") else "")
            + (f" lm-eval {h['lm_eval_version']}." if h.get("lm_eval_version") else ""))


def _source_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    head = ["source", "domain", "status", "read", "kept", "quarantined", "deduplicated", "capped", "license", "version"]
    rows = [[n, s.get("domain") or "–", s.get("status") or "–", _i(s["read"]), _i(s["kept"]), _i(s["quarantined"]),
             _i(s["deduplicated"]), _i(s["capped"]) + (f" (cap {s['cap']})" if s.get("cap") else ""),
             s.get("license") or "–", s.get("version") or "–"] for n, s in card["sources"].items()]
    return head, rows


def _reason_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[n, r, _i(c)] for n, s in card["sources"].items() for r, c in sorted(s["quarantined_by_reason"].items())]
    return ["source", "quarantine reason", "records"], rows


def _file_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[n, f.get("path") or "–", _i(f.get("size")), f.get("sha256") or "–", f.get("status") or "–"]
            for n, s in card["sources"].items() for f in s["files"]]
    return ["source", "file", "bytes", "sha256", "status"], rows


def _domain_data_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for d, m in card["domains"].items():
        sft = m.get("sft_rows") or {}
        tok = (m.get("tokens_estimate") or {})
        rows.append([d, (m.get("status") or "–") + (f": {m['reason']}" if m.get("reason") else ""), _i(m.get("corpus_rows")),
                     " / ".join(_i(sft.get(s)) for s in SPLITS), _i(tok.get("corpus"))])
    return ["domain", "status", "corpus rows", "SFT train / val / test", "corpus tokens (est.)"], rows


def _contamination_rows(card: dict) -> tuple[list[str], list[list[str]]]:
    """Per domain: test rows with >= 50% of their word 13-grams in a train split (prepare's manifest), and
    what the near-duplicate split did (docs/ARCHITECTURE.md, "What the split guarantees")."""
    c = card.get("contamination") or {}
    pct = (lambda k, n: "–" if k is None else f"{_i(k)} ({100 * k / n:.1f}%)" if n else _i(k))
    rows = [["(all)", c["skipped"]] + ["–"] * 5] if c.get("skipped") else []
    for d, x in (c.get("domains") or {}).items():
        nd = (card["domains"].get(d) or {}).get("near_duplicates") or {}
        n = x.get("test_rows")
        rows.append([d, _i(n), pct(x.get("in_own_train"), n), pct(x.get("in_own_train_without_templates"), n),
                     pct(x.get("in_other_train"), n),
                     "off" if nd and not nd.get("enabled") else _i(nd.get("merged_groups")),
                     _i((nd.get("moved_to_train") or {}).get("rows"))])
    return ["domain", "test rows", "in own train (all 13-grams)", "in own train (without templates)",
            "in other domains' train", "near-duplicate merges", "rows moved to train"], rows


# A backslash escapes only ASCII punctuation (CommonMark), so one before other characters stays as it is.
# '_' is left alone: intraword underscores (empty_answer, ori_pqal.json) do not emphasize in GFM.
_MD_BACKSLASH = re.compile(r"\\(?=[!-/:-@\[-`{-~])")
_MD_SPECIAL = re.compile(r"([`*\[\]|])")


def _md(text: Any) -> str:
    """Text from the data or the run (a licence, a file name, an error) as literal Markdown text: no raw
    HTML (a licence '<img onerror=...>' ran in previews that render HTML), no links, images or code spans;
    one line."""
    t = html.escape(" ".join(str(text).split()), quote=False)  # & < > as entities: shown, never parsed as HTML
    return _MD_SPECIAL.sub(r"\\\1", _MD_BACKSLASH.sub(r"\\\\", t))


def _code(text: Any) -> str:
    """An inline code span no backtick inside the text can close (CommonMark: a longer fence)."""
    t = " ".join(str(text).split())
    longest = max((len(r) for r in re.findall(r"`+", t)), default=0)
    fence, pad = "`" * (longest + 1), " " if longest else ""
    return f"{fence}{pad}{t}{pad}{fence}"


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(_md(h) for h in head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render_md(summary: dict, plots: dict[str, bytes]) -> str:
    s, card, rep = summary, summary["data"], summary["reproducibility"]
    L = [f"# Domain adapters: run {_code(s['run_name'])}", "",
         f"Output {_code(s['output'])}, generated {_md(s['generated_at'])}. Domains: "
         + ", ".join(f"{_md(k)} {v}" for k, v in sorted(s["status_counts"].items())) + ".", ""]
    if s.get("eval_matrix_stale"):
        L += ["**The evaluation is out of date** (see the evaluation matrix below): run `adapters eval`.", ""]
    if s["eval_matrix"] and (s["eval_matrix"].get("verdicts") or {}):
        L += ["## Which adapters to keep", "", _md_table(*_keep_rows(s["eval_matrix"])), "",
              "Keep: the adapter beats the base model on its own domain's headline metric (Holm-adjusted p over the domains "
              "< alpha, paired test); "
              "drop: it is worse; loss changes are test loss, lower is better. Details in the evaluation matrix below.", ""]
    L += ["## Results per domain", "", _md_table(*_results_rows(s)), "",
         "Losses are mean token cross-entropy on assistant-turn tokens (each answer and its end-of-turn token); perplexity = exp(loss). "
         "Figures in parentheses are the base model's. " + TEST_NOTE + " " + BUSY_NOTE, ""]
    for name, title in (("loss_curves.png", "Loss curves"), ("perplexity.png", "Base vs adapter perplexity")):
        if name in plots:
            L += [f"![{title}]({name})", ""]
    L += ["## Evaluation matrix", ""]
    if s.get("eval_matrix_stale"):
        L += [f"**Out of date:** {_md(s['eval_matrix_stale'])}.", ""]
    if s["eval_matrix"]:
        L += ["Test loss:", "", _md_table(*_matrix_rows(s["eval_matrix"], "loss")), "",
              "Test perplexity:", "", _md_table(*_matrix_rows(s["eval_matrix"], "ppl")), ""]
        if "eval_matrix.png" in plots:
            L += ["![Evaluation matrix](eval_matrix.png)", ""]
        L += _eval_md(s["eval_matrix"])
    else:
        L += [f"Not available: {_md(s['eval_matrix_note'])}.", ""]
    if s.get("standard_benchmarks"):
        h = s["standard_benchmarks"]
        L += ["## Standard benchmarks (lm-evaluation-harness)", "", _md_table(*_harness_rows(h)), "", _md(_harness_note(h)),
              "", "Each model's numbers again: " + "; ".join(f"{_md(m)}: {_code(c)}" for m, c in (h.get("commands") or {}).items()), ""]
    L += ["## Data card", ""]
    if card["available"]:
        t = card["totals"]
        L += ["Totals: " + ", ".join(f"{k} {_i(v)}" for k, v in t.items()) + ".", "",
              "### Sources", "", _md_table(*_source_rows(card)), "",
              "### Quarantine reasons", "", _md_table(*_reason_rows(card)) if _reason_rows(card)[1] else "None.", "",
              "### Domains", "", _md_table(*_domain_data_rows(card)), "",
              *(["### Contamination", "", "Test rows with 50% or more of their word 13-grams in a train split "
                 "(templates: 13-grams in more than 10% of one task's rows).", "", _md_table(*_contamination_rows(card)), ""]
                if card.get("contamination") else []),
              "### Files and checksums", "", _md_table(*_file_rows(card)), ""]
    else:
        L += [f"Not available: {_md(s['data_note'])}.", ""]
    g = rep["git"]
    L += ["## Reproducibility", "",
          f"- git commit: {_code(g.get('commit') or 'unknown')}" + (" (modified files)" if g.get("dirty") else ""),
          f"- seeds: " + _md(", ".join(f"{k}={v}" for k, v in rep["seeds"].items())),
          f"- data fingerprint: {_code(rep['data_fingerprint'] or '–')}; manifest sha256: {_code(rep['manifest_sha256'] or '–')}",
          f"- command: {_code(rep['command'])}",
          "- packages: " + _md(", ".join(f"{k} {v}" for k, v in rep["packages"].items() if v)), "",
          "<details><summary>config</summary>", "", *_fence(json.dumps(rep["config"], indent=2), "json"), "", "</details>", ""]
    return "\n".join(L)


CSS = """
body{font-family:-apple-system,BlinkMacSystemFont,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1200px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:.3em}h2{margin-top:1.6em;border-bottom:1px solid #eaeef2;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px;width:100%}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fbfcfd}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px;font-weight:600}
{badges}
.cause{color:#57606a;font-size:12px;display:block;margin-top:2px;overflow-wrap:break-word}
td.status{min-width:220px;max-width:320px}td.uri{font-size:11px;word-break:break-all;min-width:160px;max-width:260px}
h1 code{font-size:inherit}th{white-space:normal}
img.plot{max-width:100%;border:1px solid #d0d7de;margin:.5em 0;display:block}
.note{color:#57606a}code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
pre{background:#f6f8fa;padding:10px;overflow:auto;max-height:420px}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #d0d7de;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:20px}td.diag{font-weight:700;outline:2px solid #0969da;outline-offset:-2px}
td.sha{font-family:ui-monospace,monospace;font-size:11px;word-break:break-all}
#repro td:first-child{white-space:nowrap}
pre.gen{margin:0;max-height:260px;white-space:pre-wrap;overflow-wrap:anywhere;font-size:11px}
""".replace("{badges}", "".join(f".{k.replace(' ', '-')}{{background:{v}}}" for k, v in STATUS_COLORS.items()))


def _h(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _html_table(head: list[str], rows: list[list[str]], cls: Optional[list[Optional[str]]] = None, tid: str = "") -> str:
    out = [f'<table id="{tid}">' if tid else "<table>", "<thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        tds = []
        for j, c in enumerate(r):
            k = (cls[j] if cls and j < len(cls) else None) or ""
            tds.append(f'<td class="{k}">{c}</td>' if k else f"<td>{c}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _esc_rows_head(hr: tuple[list[str], list[list[str]]]) -> tuple[list[str], list[list[str]]]:
    return hr[0], _esc_rows(hr[1])


def _esc_rows(rows: list[list[str]]) -> list[list[str]]:
    return [[_h(c) for c in r] for r in rows]


def _matrix_html(matrix: dict, key: str) -> str:
    ds = list(matrix["datasets"])
    vals = {m: (matrix.get(key) or {}).get(m, {}) for m in matrix["models"]}
    flat = [v for m in vals.values() for v in (_num(x) for x in m.values()) if v is not None]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    head = "<tr><th>model \\ test set</th>" + "".join(f"<th>{_h(d)}</th>" for d in ds) + "</tr>"
    body = []
    for m, row in vals.items():
        cells = [f"<th>{_h(m if m == 'base' else 'adapter: ' + m)}</th>"]
        for d in ds:
            v = _num(row.get(d))
            if v is None:
                cells.append('<td class="num">–</td>')
                continue
            t = (v - lo) / (hi - lo) if hi > lo else 0.0  # 0 = best (lowest)
            color = f"hsl({int(120 * (1 - t))},60%,{int(82 + 8 * t)}%)"
            diag = " diag" if m == d else ""
            cells.append(f'<td class="num{diag}" style="background:{color}">{_f(v, 3 if key == "loss" else 2)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="matrix" id="matrix-{key}"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _ordered_counts(counts: dict) -> list[tuple[str, int]]:
    from pipeline.status import STATES
    return sorted(counts.items(), key=lambda kv: (STATES.index(kv[0]) if kv[0] in STATES else len(STATES), kv[0]))


def render_html(summary: dict, plots: dict[str, bytes]) -> str:
    s, card, rep = summary, summary["data"], summary["reproducibility"]

    def img(name: str, alt: str) -> str:
        if name not in plots:
            return ""
        b64 = base64.b64encode(plots[name]).decode("ascii")
        return f'<img class="plot" id="plot-{name.split(".")[0]}" alt="{_h(alt)}" src="data:image/png;base64,{b64}">'

    cards = "".join(f'<div class="card"><span class="badge {_h(k.replace(" ", "-"))}">{_h(k)}</span><b>{v}</b>domains</div>'
                    for k, v in _ordered_counts(s["status_counts"]))
    head, rows = _results_rows(s)
    hrows = []
    for d, r in zip(s["domains"].values(), rows):
        status = f'<span class="badge {_h(d["status"].replace(" ", "-"))}">{_h(d["status"])}</span>'
        if d.get("cause"):
            status += f'<span class="cause">{_h(d["cause"][:600])}</span>'
        hrows.append([_h(r[0]), status] + [_h(c) for c in r[2:]])
    num = [None, "status"] + ["num"] * (len(head) - 3) + ["uri"]   # domain, status, the figures, the adapter URI
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Domain adapters: {_h(s['run_name'])}</title><style>{CSS}</style></head><body><main>",
        f"<h1>Domain adapters: run <code>{_h(s['run_name'])}</code></h1>",
        f'<p class="note">Output <code>{_h(s["output"])}</code> &middot; generated {_h(s["generated_at"])}</p>',
        f'<div class="cards">{cards}</div>',
        *(['<p class="note stale"><b>The evaluation is out of date</b> (see the evaluation matrix below): run '
            "<code>adapters eval</code>.</p>"] if s.get("eval_matrix_stale") else []),
        *((["<h2>Which adapters to keep</h2>", _html_table(*_esc_rows_head(_keep_rows(s["eval_matrix"])), None, "keep"),
             '<p class="note">Keep: the adapter beats the base model on its own domain\'s headline metric (Holm-adjusted p over the domains '
             "&lt; alpha, paired test); drop: it is worse; loss changes are test loss, lower is better.</p>"])
          if s["eval_matrix"] and (s["eval_matrix"].get("verdicts") or {}) else []),
        "<h2>Results per domain</h2>", _html_table(head, hrows, num, "results"),
        '<p class="note">Losses are mean token cross-entropy on assistant-turn tokens (each answer and its end-of-turn token); perplexity = exp(loss). '
        f"Figures in parentheses are the base model's. {_h(TEST_NOTE)} {_h(BUSY_NOTE)}</p>",
        img("loss_curves.png", "Loss curves per domain"), img("perplexity.png", "Base vs adapter perplexity"),
        "<h2>Evaluation matrix</h2>",
    ]
    if s.get("eval_matrix_stale"):
        parts.append(f'<p class="note stale"><b>Out of date:</b> {_h(s["eval_matrix_stale"])}.</p>')
    if s["eval_matrix"]:
        parts += ['<p class="note">The base model and every adapter on every domain\'s test set. Outlined: an adapter on its own domain; '
                  "greener is lower (better).</p>",
                  "<h3>Test loss</h3>", _matrix_html(s["eval_matrix"], "loss"),
                  "<h3>Test perplexity</h3>", _matrix_html(s["eval_matrix"], "ppl"),
                  img("eval_matrix.png", "Evaluation matrix heat map")] + _eval_html(s["eval_matrix"])
    else:
        parts.append(f'<p class="note">Not available: {_h(s["eval_matrix_note"])}.</p>')
    if s.get("standard_benchmarks"):
        h = s["standard_benchmarks"]
        head, rows = _harness_rows(h)
        parts += ["<h2>Standard benchmarks (lm-evaluation-harness)</h2>",
                  _html_table(head, _esc_rows(rows), [None, None] + ["num"] * (len(head) - 2), "standard-benchmarks"),
                  f'<p class="note">{_h(_harness_note(h))}</p>',
                  "<details><summary>lm_eval commands</summary>"
                  + "".join(f"<p>{_h(m)}: <code>{_h(c)}</code></p>" for m, c in (h.get("commands") or {}).items()) + "</details>"]
    parts.append("<h2>Data card</h2>")
    if card["available"]:
        parts += ["<p>Totals: " + ", ".join(f"{_h(k)} <b>{_i(v)}</b>" for k, v in card["totals"].items()) + "</p>",
                  "<h3>Sources</h3>", _html_table(*(lambda h, r: (h, _esc_rows(r)))(*_source_rows(card)),
                                                   [None, None, None] + ["num"] * 5, "sources"),
                  "<h3>Quarantine reasons</h3>",
                  _html_table(*(lambda h, r: (h, _esc_rows(r)))(*_reason_rows(card)), [None, None, "num"], "quarantine")
                  if _reason_rows(card)[1] else "<p>None.</p>",
                  "<h3>Domains</h3>", _html_table(*(lambda h, r: (h, _esc_rows(r)))(*_domain_data_rows(card)),
                                                   [None, None, "num", "num", "num"], "domains-data"),
                  *(["<h3>Contamination</h3>", '<p class="note">Test rows with 50% or more of their word 13-grams in a '
                     "train split (templates: 13-grams in more than 10% of one task's rows).</p>",
                     _html_table(*_esc_rows_head(_contamination_rows(card)), [None] + ["num"] * 6, "contamination")]
                    if card.get("contamination") else []),
                  "<details><summary>Files and checksums</summary>",
                  _html_table(*(lambda h, r: (h, _esc_rows(r)))(*_file_rows(card)), [None, None, "num", "sha", None], "files"),
                  "</details>"]
    else:
        parts.append(f'<p class="note">Not available: {_h(s["data_note"])}.</p>')
    g = rep["git"]
    repro = [["git commit", f"<code>{_h(g.get('commit') or 'unknown')}</code>" + (" (modified files)" if g.get("dirty") else "")],
             ["seeds", _h(", ".join(f"{k}={v}" for k, v in rep["seeds"].items()))],
             ["data fingerprint", f"<code>{_h(rep['data_fingerprint'] or '–')}</code>"],
             ["manifest sha256", f"<code>{_h(rep['manifest_sha256'] or '–')}</code>"],
             ["command", f"<code>{_h(rep['command'])}</code>"],
             ["packages", _h(", ".join(f"{k} {v}" for k, v in rep["packages"].items() if v))]]
    parts += ["<h2>Reproducibility</h2>", _html_table(["what", "value"], repro, None, "repro"),
              "<details><summary>Config (redacted)</summary><pre>" + _h(json.dumps(rep["config"], indent=2)) + "</pre></details>",
              "</main></body></html>"]
    return "\n".join(p for p in parts if p)


# ---- the stage ----------------------------------------------------------------------------------------

def run_report(cfg) -> dict:
    """Write report/summary.json, summary.md, summary.html and the PNG plots; return their URIs."""
    t0 = time.time()
    store = open_store(cfg)
    summary = build_summary(cfg, store)
    plots: dict[str, bytes] = {}
    makers = [("loss_curves.png", lambda: plot_loss_curves(summary)), ("perplexity.png", lambda: plot_perplexity(summary))]
    if summary["eval_matrix"]:
        makers.append(("eval_matrix.png", lambda: plot_eval_matrix(summary["eval_matrix"])))
    for name, make in makers:
        try:
            plots[name] = make()
        except Exception as e:  # a plot is not worth losing the report for
            log.error("report: plot %s failed: %s", name, e)
    summary["plots"] = sorted(plots)
    out: dict[str, str] = {}
    for name, png in plots.items():
        out[name] = store.write_bytes(layout.report(name), png)
    public = {**summary, "domains": {d: {k: v for k, v in r.items() if not k.startswith("_")}
                                     for d, r in summary["domains"].items()}}
    out["json"] = store.write_text(layout.REPORT_JSON, scrub(json.dumps(public, indent=2, default=str)) + "\n")
    out["md"] = store.write_text(layout.REPORT_MD, scrub(render_md(summary, plots)))
    out["html"] = store.write_text(layout.REPORT_HTML, scrub(render_html(summary, plots)))
    log.info("report: %s (%d domains: %s) in %.1fs", out["html"], len(summary["domains"]),
             ", ".join(f"{k} {v}" for k, v in sorted(summary["status_counts"].items())), time.time() - t0)
    if cfg.tracking.mlflow is not None:
        from pipeline.tracking import attach_to_mlflow
        try:
            attach_to_mlflow(cfg, store)
        except Exception as e:  # noqa: BLE001 - the report is written; a tracking server down is not worth failing it
            log.warning("tracking: could not attach the report to MLflow (%s): %s",
                        redact_url(cfg.tracking.mlflow.tracking_uri), e)
    return out
