"""The report's facts: every file of the output tree it reads, gathered into one summary dict (build_summary),
the content of report/summary.json. Nothing here formats or plots."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from pipeline import layout
from pipeline.eval import finished_adapters, up_to_date
from pipeline.status import domain_state
from pipeline.storage import Store, StorageError

log = logging.getLogger(__name__)


SPLITS = ("train", "val", "test")


PACKAGES = ("domain-adapters", "ray", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers",
            "safetensors", "huggingface_hub", "pyarrow", "pandas", "boto3", "pydantic", "PyYAML", "matplotlib")


METRICS = ("train_loss", "val_loss", "test_loss", "val_ppl", "test_ppl", "base_val_loss", "base_test_loss",
           "base_val_ppl", "base_test_ppl", "tokens_per_s", "peak_memory_gb", "wall_time_s", "busy_share", "steps")
# the base model's test figures: only the evaluation's (eval/matrix.json). The recipe measures the base model's
# val loss only; the base test figures an older training report holds are not read.
EVALUATION_ONLY = ("base_test_loss", "base_test_ppl")


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


def as_number(x: Any) -> Optional[float]:
    """x as a finite float, or None (missing, not a number, NaN or infinite)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _ppl(loss: Any) -> Optional[float]:
    v = as_number(loss)
    if v is None:
        return None
    try:
        return math.exp(min(v, 700.0))
    except OverflowError:
        return None


def domain_summary(store: Store, cfg, domain: str, manifest: Optional[dict]) -> dict:
    """One domain's row of the report: status and cause (pipeline.status.domain_state, the same words
    `adapters status` shows), metrics."""
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
    try:
        if up_to_date(cfg, store, finished_adapters(cfg, store)):
            return None
    except Exception as e:  # noqa: BLE001 - the report is made whatever it cannot check
        log.warning("report: could not check whether eval/matrix.json is up to date: %s", e)
        return None
    return (f"{layout.EVAL_MATRIX} was made from other adapters, data or eval settings than this output has now: its "
            "figures (and the keep / drop table) are not this run's; the adapters' test figures per domain are the "
            "training recipe's, and the base model's are not shown. `adapters eval` brings it up to date")


def _test_figures_of_the_evaluation(row: dict, matrix: Optional[dict], domain: str) -> None:
    """One test loss per model and split in the whole report: the evaluation's (eval/matrix.json) wherever it
    scored that model on that test split. The base model's test loss is only the evaluation's. The training
    recipe measures the adapter's test loss too (training_report.json), on its own batches; shown only where
    the evaluation has no figure (evaluation off, or that adapter not scored), and ``test_source`` says which
    one a row's test figures are."""
    loss = (matrix or {}).get("loss") or {}
    src = {}
    for model, pre in ((domain, ""), ("base", "base_")):
        v = as_number((loss.get(model) or {}).get(domain))
        if v is not None and (model == "base" or row.get("status") == "finished"):
            row[f"{pre}test_loss"], row[f"{pre}test_ppl"] = v, _ppl(v)
            src[model if model == "base" else "adapter"] = layout.EVAL_MATRIX
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
        out[k] = as_number((rep or {}).get(k)) if rep and k not in EVALUATION_ONLY else None
    if rep:  # derive perplexities from losses when a report has only losses
        for split, pre in (("val", ""), ("test", ""), ("val", "base_")):
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


def _harness(store: Store) -> Optional[dict]:
    h, problem = _read(store, layout.HARNESS_JSON)
    if problem:
        log.warning("report: eval/harness.json unreadable (%s): no standard benchmark table", problem)
    return h if isinstance(h, dict) and h.get("rows") else None
