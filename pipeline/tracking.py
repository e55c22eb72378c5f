"""After the report: the run's config, its report and the evaluation attached to each domain's MLflow run.

    attach_to_mlflow(cfg, store) -> {domain: run_id}

Training metrics reach MLflow and W&B while the domains train, through Ray Tune's callbacks
(pipeline/train/schedule.py, tracking_callbacks). The report and the evaluation matrix are made after
Tune has finished, so they are added here, to the runs those callbacks made: found by their tags
(`run_name`) and params (`domain`), the newest per domain. The evaluation's numbers are logged at the
exported adapter's step (training_report.json's `exported_step`), next to the training curves.
"""
from __future__ import annotations

import logging
import os
import tempfile

from pipeline import layout
from pipeline.redaction import redact_url

log = logging.getLogger(__name__)

# what is attached under each run's artifacts/report/ (relative to the output)
REPORT_FILES = (layout.REPORT_JSON, layout.REPORT_MD, layout.REPORT_HTML)


def _eval_metrics(matrix: dict, domain: str) -> dict[str, float]:
    """The adapter's and the base model's numbers on the domain's own test set (eval/matrix.json)."""
    out = {}
    for metric in ("loss", "ppl", "acc", "acc_norm", "rouge_l", "f1"):
        table = matrix.get(metric) or {}
        for model, name in ((domain, f"eval_test_{metric}"), ("base", f"eval_test_{metric}_base")):
            v = (table.get(model) or {}).get(domain)
            if isinstance(v, (int, float)) and v == v:
                out[name] = float(v)
    return out


def attach_to_mlflow(cfg, store) -> dict[str, str]:
    m = cfg.tracking.mlflow
    if m is None:
        return {}
    from mlflow.tracking import MlflowClient
    if m.tracking_uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")   # as the training callback does
    client = MlflowClient(m.tracking_uri)
    exp = client.get_experiment_by_name(m.experiment)
    if exp is None:
        log.warning("tracking: no MLflow experiment %r at %s yet (nothing trained with tracking on): nothing attached",
                    m.experiment, redact_url(m.tracking_uri))
        return {}
    matrix = store.read_json_or(layout.EVAL_MATRIX) or {}
    attached = {}
    with tempfile.TemporaryDirectory(prefix="tracking-") as d:
        for rel in REPORT_FILES + (layout.run_config(cfg.run_name),):
            if store.is_file(rel):
                path = os.path.join(d, os.path.basename(rel))
                with open(path, "wb") as f:
                    f.write(store.read_bytes(rel))
        files = sorted(os.listdir(d))
        for domain in cfg.domains:
            runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1,
                                      filter_string=f"tags.run_name = '{cfg.run_name}' and params.domain = '{domain}'")
            if not runs:
                continue
            rid = runs[0].info.run_id
            rep = store.read_json_or(layout.training_report(domain)) or {}
            step = int(rep.get("exported_step") or 0)
            for name, value in _eval_metrics(matrix, domain).items():
                client.log_metric(rid, name, value, step=step)
            for name in files:
                client.log_artifact(rid, os.path.join(d, name), artifact_path="report")
            attached[domain] = rid
    if attached:
        log.info("tracking: report and evaluation attached to the MLflow runs of %s", ", ".join(attached))
    return attached
