"""run_report with --output s3://...: reads the tree from the bucket and writes the report there."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_config
from pipeline.report import run_report
from pipeline.storage import Store
from tests.unit.test_report import write_tree

ROOT = Path(__file__).resolve().parents[2]


def test_report_to_s3(s3_server, monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.make_bucket()
    cfg = load_config(ROOT / "configs" / "demo.yaml", output=f"s3://{bucket}/r")
    store = Store(cfg.output, cfg.storage)
    write_tree(store)
    out = run_report(cfg)
    assert out["html"] == f"s3://{bucket}/r/report/summary.html"
    keys = s3_server.list_keys(bucket, "r/report/")
    assert keys == sorted(f"r/report/{n}" for n in ("summary.json", "summary.md", "summary.html", "loss_curves.png",
                                                     "perplexity.png", "eval_matrix.png"))
    c = s3_server.client()
    s = json.loads(c.get_object(Bucket=bucket, Key="r/report/summary.json")["Body"].read())
    assert s["domains"]["debate"]["status"] == "finished" and s["output"] == f"s3://{bucket}/r"
    for k in keys:
        body = c.get_object(Bucket=bucket, Key=k)["Body"].read()
        assert s3_server.secret_key.encode() not in body and s3_server.access_key.encode() not in body, k
