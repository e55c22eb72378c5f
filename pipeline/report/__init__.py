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

In four steps, one module each: gather.py (files -> the summary dict), tables.py (rows and notes), plots.py
(PNGs), render.py (Markdown and HTML); run_report below writes them.

Nothing secret is written: the config comes from ``cfg.redacted()``, and every text written goes
through ``pipeline.redaction.scrub`` (credential values from the environment, URL secrets, HF tokens).
"""
from __future__ import annotations

import json
import logging
import time

from pipeline import layout
from pipeline.redaction import redact_url, scrub
from pipeline.report.gather import build_summary
from pipeline.report.plots import plot_eval_matrix, plot_loss_curves, plot_perplexity
from pipeline.report.render import render_html, render_md
from pipeline.storage import open_store
from pipeline.tracking import attach_to_mlflow

log = logging.getLogger(__name__)


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
        try:
            attach_to_mlflow(cfg, store)
        except Exception as e:  # noqa: BLE001 - the report is written; a tracking server down is not worth failing it
            log.warning("tracking: could not attach the report to MLflow (%s): %s",
                        redact_url(cfg.tracking.mlflow.tracking_uri), e)
    return out
