"""The report and the evaluation attached to each domain's MLflow run (a real local MLflow file store, read
back with MlflowClient); the training metrics themselves are tested through Ray Tune's callbacks in
tests/integration/test_train_ray.py."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import tiny_config  # noqa: E402

from pipeline.storage import Store  # noqa: E402


def test_report_and_evaluation_land_on_each_domains_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from pipeline.tracking import attach_to_mlflow
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = f"file://{tmp_path / 'mlruns'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    runs = {}
    for run_name, domain in (("t", "debate"), ("t", "medicine"), ("other", "debate")):
        r = client.create_run(exp, tags={"run_name": run_name})   # as Ray's MLflowLoggerCallback tags them
        client.log_param(r.info.run_id, "domain", domain)
        runs[(run_name, domain)] = r.info.run_id
    store = Store(str(tmp_path / "out"))
    cfg = tiny_config(str(tmp_path / "out"), domains=["debate", "medicine", "ecology"],
                      tracking={"mlflow": {"tracking_uri": uri, "experiment": "e"}})
    store.write_json("eval/matrix.json", {"loss": {"base": {"debate": 3.0}, "debate": {"debate": 2.5}},
                                          "acc": {"base": {"debate": 0.25}, "debate": {"debate": 0.5}}})
    store.write_json("adapters/debate/training_report.json", {"exported_step": 12})
    for rel in ("report/summary.json", "report/summary.md", "report/summary.html", "runs/t/config.json"):
        store.write_text(rel, "{}")
    attached = attach_to_mlflow(cfg, store)
    assert attached == {"debate": runs[("t", "debate")], "medicine": runs[("t", "medicine")]}   # no ecology run
    rid = runs[("t", "debate")]
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "eval_test_loss")] == [(12, 2.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(rid, "eval_test_loss_base")] == [(12, 3.0)]
    assert [m.value for m in client.get_metric_history(rid, "eval_test_acc")] == [0.5]
    names = sorted(a.path for a in client.list_artifacts(rid, "report"))
    assert names == ["report/config.json", "report/summary.html", "report/summary.json", "report/summary.md"]
    assert not client.list_artifacts(runs[("other", "debate")])   # another run name's run is left alone
    assert not client.get_metric_history(runs[("t", "medicine")], "eval_test_loss")   # not evaluated: nothing logged
