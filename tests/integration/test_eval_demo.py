"""The evaluation end to end on the demo (configs/demo.yaml: real Ray, the tiny model, the fixtures),
and `adapters generate` from that run's output on local disk and on the S3 server.

One demo run (the session's, tests/fixtures_demo.py, shared with test_lifecycle) serves the tests:
  - the report has task metrics with intervals, verdicts and side-by-side generations for every domain,
    per-example scores are in eval/scores/<model>/<dataset>.parquet, and some adapter beats the base
    model on its own domain on a task metric with a significant difference (the fixtures' answers follow
    learnable formats);
  - the evaluation is a stage of its own: `adapters eval` keeps an up-to-date matrix, `adapters train` alone
    writes none, `adapters eval` after it reproduces the run's matrix;
  - `adapters generate` (no --config: settings from the adapters) reproduces the adapter's greedy answer
    shown side by side in the report, from the local output and from a copy of it on S3.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest


ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ["debate", "medicine", "education", "ecology"]
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.slow


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def demo(demo_run):
    """The session's demo run (tests/fixtures_demo.py, shared with test_lifecycle): (output dir, its console)."""
    out, run = demo_run
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "eval_demo_run.log").write_text(run.text())
    return out, run.text()


def test_report_has_task_metrics_intervals_verdicts_and_generations(demo):
    out, log = demo
    m = json.loads((out / "eval/matrix.json").read_text())
    assert m["models"] == ["base", *DOMAINS] and m["datasets"] == DOMAINS
    for d in DOMAINS:
        for model in m["models"]:
            assert (out / f"eval/scores/{model}/{d}.parquet").is_file()
            loss = m["metrics"]["loss"][model][d]
            assert loss["low"] <= loss["value"] <= loss["high"] and loss["n"] == m["counts"][d]["items"]
        # accuracy decides unless the domain's multiple-choice gold is trivial (one class or majority > 0.9)
        task = "acc" if m["counts"][d]["multiple_choice_scored"] and not m["counts"][d]["multiple_choice_trivial"] else "rouge_l"
        c = m["metrics"][task][d][d]
        assert c["n"] > 0 and c["low"] <= c["value"] <= c["high"], (d, c)
        assert m["verdicts"][d]["metric"] == task and m["verdicts"][d]["verdict"] in (
            "better", "worse", "no significant difference")
        shown = m["side_by_side"][d]
        # five side by side, or every test row where near-duplicate splitting left fewer (the demo's education)
        assert len(shown) == min(5, m["counts"][d]["items"]) and shown and all(s["prompt"] and s["reference"] and s["base"] is not None and s["adapter"] is not None
                                       for s in shown)
        assert f"eval: {d} adapter done on " in log             # one progress line per model
    # multiple choice where the sources have labels: MedMCQA + PubMedQA, Climate-FEVER
    assert m["counts"]["medicine"]["multiple_choice_scored"] > 0 and m["counts"]["ecology"]["multiple_choice_scored"] > 0
    assert set(m["tasks"]["ecology"]) == {"climate_fever/claim_verification"}
    # per-example rows: one per test item, paired by key across models
    base = pq.read_table(out / "eval/scores/base/medicine.parquet").to_pylist()
    own = pq.read_table(out / "eval/scores/medicine/medicine.parquet").to_pylist()
    assert [r["key"] for r in base] == [r["key"] for r in own] and len(base) == m["counts"]["medicine"]["items"]
    assert any(r["correct"] is not None for r in base) and any(r["rouge_l"] is not None for r in base)
    # some adapter beats the base model on its own domain on a task metric, significantly
    wins = [(d, k, c["p"]) for d in DOMAINS for k, c in m["comparisons"][d][d].items()
            if k in ("acc", "acc_norm", "rouge_l", "f1") and c["verdict"] == "better"]
    assert wins, json.dumps({d: m["comparisons"][d][d] for d in DOMAINS}, indent=1)[:3000]
    md = (out / "report/summary.md").read_text()
    page = (out / "report/summary.html").read_text()
    for d in DOMAINS:
        last = len(m["side_by_side"][d])
        assert f"- **{d}**: " in md and f"#### {d}, example {last}" in md and f'id="side-by-side-{d}"' in page
        assert f'id="tasks-{d}"' in page
    assert 'id="eval-verdicts"' in page and 'id="matrix-acc"' in page and 'id="matrix-rouge_l"' in page
    assert "<script" not in page.split("</style>", 1)[1]     # generated text is escaped, never markup


def test_eval_is_a_stage_of_its_own(demo, tmp_path):
    """On a copy of the demo's output (made by `adapters run`): `adapters eval` keeps the up-to-date matrix
    without starting Ray; `adapters train` alone (every domain finished) writes no matrix; `adapters eval`
    then scores every model again, from the same inputs (the same fingerprint) to the same numbers."""
    import shutil
    import time
    from pipeline.status import collect_status
    from pipeline.storage import Store
    from tests.fixtures_demo import DEMO, Run
    src, _ = demo
    out = tmp_path / "out"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("logs"))
    demo_matrix = (out / "eval" / "matrix.json").read_bytes()
    argv = ["--config", DEMO, "--output", str(out)]

    kept = Run(tmp_path, "eval", *argv, name="kept")
    assert kept.wait() == 0, kept.text()[-4000:]
    assert "is up to date (same adapters, data and eval settings): kept" in kept.text()
    assert "Ray cluster:" not in kept.text() and "eval: written to" not in kept.text()
    assert (out / "eval" / "matrix.json").read_bytes() == demo_matrix

    shutil.rmtree(out / "eval")
    train = Run(tmp_path, "train", *argv, name="train")
    assert train.wait() == 0, train.text()[-4000:]
    assert not (out / "eval").exists() and " eval: " not in train.text()
    st = collect_status(Store(str(out)), None, None)["stages"]
    assert st["train"].state == "finished" and st["eval"].state == "not started"

    t0 = time.monotonic()
    again = Run(tmp_path, "eval", *argv, name="again")
    assert again.wait() == 0, again.text()[-4000:]
    print(f"adapters eval on the demo's output: {time.monotonic() - t0:.1f}s")
    assert "eval: 5 model(s) on 4 test set(s)" in again.text() and "stage eval: done in" in again.text()
    old, new = json.loads(demo_matrix), json.loads((out / "eval" / "matrix.json").read_text())
    assert new["fingerprint"] == old["fingerprint"] and new["models"] == old["models"]
    for m in old["models"]:
        for d in old["datasets"]:
            assert new["loss"][m][d] == pytest.approx(old["loss"][m][d], rel=1e-4), (m, d)
    assert {d: v["verdict"] for d, v in new["verdicts"].items()} == {d: v["verdict"] for d, v in old["verdicts"].items()}
    assert collect_status(Store(str(out)), None, None)["stages"]["eval"].state == "finished"


def _generate(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "generate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _side_by_side(out: Path, domain: str) -> dict:
    return json.loads((out / "eval/matrix.json").read_text())["side_by_side"][domain][0]


def test_generate_from_local_output_reproduces_the_evaluation(demo, tmp_path):
    out, _ = demo
    shown = _side_by_side(out, "medicine")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": shown["prompt"]}) + "\n")
    answers = tmp_path / "answers.jsonl"
    r = _generate(["--output", str(out), "--domain", "medicine", "--base", "--prompts", str(prompts),
                   "What is the first-line drug for asthma?", "--max-new-tokens", "128", "--out-file", str(answers)], _env())
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    assert [(x["model"], x["prompt"][:20]) for x in rows] == [
        (m, p[:20]) for m in ("base", "medicine") for p in ("What is the first-line drug for asthma?", shown["prompt"])]
    by = {(x["model"], x["prompt"]): x["output"] for x in rows}
    # the same greedy answer as the evaluation's, for the base model and the adapter
    assert by[("medicine", shown["prompt"])] == shown["adapter"] and by[("base", shown["prompt"])] == shown["base"]
    assert "=== medicine adapter ===" in r.stdout
    bad = _generate(["--output", str(out), "--domain", "law", "x"], _env())
    assert bad.returncode == 1 and "no finished adapter for ['law']" in bad.stderr


def test_generate_from_s3_output(demo, s3_server):
    out, _ = demo
    bucket = s3_server.make_bucket()
    c = s3_server.client()
    for sub in ("adapters/medicine", "base_model"):
        for f in (out / sub).rglob("*"):
            if f.is_file():
                c.put_object(Bucket=bucket, Key=f"run/{f.relative_to(out).as_posix()}", Body=f.read_bytes())
    shown = _side_by_side(out, "medicine")
    r = _generate(["--output", f"s3://{bucket}/run", "--domain", "medicine", shown["prompt"], "--max-new-tokens", "128"],
                  _env(**s3_server.env()))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert shown["adapter"] in r.stdout
    assert s3_server.secret_key not in r.stdout + r.stderr
