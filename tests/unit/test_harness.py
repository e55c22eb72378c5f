"""Standard benchmarks through lm-evaluation-harness (pipeline/eval/harness.py): the real lm-eval on the tiny
base model and a tiny trained adapter, on local tasks in lm-eval's own format (tests/data/harness: the Hub is
not reachable here), offline; an unknown task name stops a run before anything runs; a task whose dataset is
on the Hub says so when offline."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import sft_rows, tiny_config, write_sft  # noqa: E402

from pipeline.config import ConfigError  # noqa: E402
from pipeline.storage import Store  # noqa: E402

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "data" / "harness"
DEMO = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny base and one domain's adapter (4 steps on debate rows, no Ray), with harness settings."""
    from pipeline.lm.data import Example, tokenize_conversation
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    from pipeline.lm.model import load_tokenizer, resolve_base
    from pipeline.lm.tiny import ensure_tiny
    tmp = tmp_path_factory.mktemp("harness")
    store = Store(str(tmp))
    write_sft(store, domains=["debate"], n=(16, 4, 4))
    cfg = tiny_config(str(tmp), domains=["debate"], model__tiny__pretrain_steps=0, train__max_steps=4,
                      eval__harness_tasks=["tiny_debate_mc", "tiny_debate_ppl"], eval__harness_include_path=str(TASKS),
                      data__download__offline=True)
    ensure_tiny(cfg, store)
    tok = load_tokenizer(resolve_base(cfg, store), cfg)
    ex = [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", 16, 1)]
    train_domain(cfg, "debate", {"train": ex[:12], "val": ex[12:14], "test": ex[14:]}, LocalSession(str(tmp / "ck")))
    return cfg, store, tmp


@pytest.fixture(scope="module")
def harness_rows(trained):
    import ray
    from pipeline.eval.harness import run_harness
    cfg, store, _ = trained
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield run_harness(cfg, store, ["debate"])
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_lm_eval_runs_local_tasks_on_the_base_and_the_adapter(trained, harness_rows):
    cfg, store, tmp = trained
    got = {(r.model, r.task, r.metric): r for r in harness_rows}
    assert set(got) == {(m, "tiny_debate_mc", k) for m in ("base", "debate") for k in ("acc", "acc_norm")} | \
        {(m, "tiny_debate_ppl", "perplexity") for m in ("base", "debate")}
    for r in harness_rows:
        assert r.n == 10 and r.filter == "none" and r.num_fewshot == 0
        if r.metric.startswith("acc"):
            assert 0.0 <= r.value <= 1.0 and r.stderr is not None and 0.0 <= r.stderr <= 0.5
    # the adapter really is on the model: trained on debate answers, it finds them likelier than the base does
    ppl = {m: got[(m, "tiny_debate_ppl", "perplexity")].value for m in ("base", "debate")}
    assert 1.0 < ppl["debate"] < ppl["base"], ppl
    written = store.read_json("eval/harness.json")
    assert [tuple(sorted(r.items())) for r in written["rows"]] == [tuple(sorted(r.model_dump().items())) for r in harness_rows]
    assert written["lm_eval_version"].startswith("0.4.")
    cmd = written["commands"]["debate"]
    assert cmd.startswith("lm_eval --model hf --model_args ") and f"peft={tmp}/adapters/debate" in cmd
    assert f"--include_path {TASKS}" in cmd and "dtype=float32" in cmd and "peft=" not in written["commands"]["base"]
    own = store.read_json("eval/harness/debate.json")   # lm-eval's own record: the task as it ran
    assert own["configs"]["tiny_debate_mc"]["output_type"] == "multiple_choice"
    assert own["n-samples"]["tiny_debate_mc"] == {"original": 10, "effective": 10}


@pytest.mark.slow
def test_standard_errors_are_bootstrapped_without_a_process_pool(trained, monkeypatch):
    """lm-eval bootstraps a perplexity's standard error in a forked multiprocessing pool, which hung for good
    once in CI when forked from the harness's Ray worker: the harness has it bootstrap in its own process."""
    import multiprocessing
    from pipeline.eval.harness import _include_dir, _include_files, harness_models

    def no_pool(*args, **kwargs):
        raise AssertionError("lm-eval started a process pool")
    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    monkeypatch.delenv("DISABLE_MULTIPROC", raising=False)
    cfg, _, _ = trained
    out = harness_models(cfg, ["base"], _include_files(_include_dir(cfg)), True)
    stderr = out["base"]["results"]["tiny_debate_ppl"]["perplexity_stderr,none"]
    assert isinstance(stderr, float) and stderr > 0, stderr


@pytest.mark.slow
def test_unchanged_models_and_tasks_keep_the_results(trained, harness_rows, caplog):
    """A second call (Ray no longer running) reads eval/harness.json back instead of evaluating again."""
    import logging
    from pipeline.eval.harness import run_harness
    cfg, store, _ = trained
    with caplog.at_level(logging.INFO, logger="pipeline"):
        again = run_harness(cfg, store, ["debate"])
    assert again == harness_rows and "is up to date" in caplog.text


@pytest.mark.slow
def test_the_report_has_a_standard_benchmark_table(trained, harness_rows):
    from pipeline.report import run_report
    cfg, store, tmp = trained
    run_report(cfg)
    md = (tmp / "report/summary.md").read_text()
    page = (tmp / "report/summary.html").read_text()
    summary = json.loads((tmp / "report/summary.json").read_text())
    assert len(summary["standard_benchmarks"]["rows"]) == len(harness_rows)
    assert "## Standard benchmarks (lm-evaluation-harness)" in md
    table = [ln for ln in md.split("## Standard benchmarks (lm-evaluation-harness)")[1].splitlines() if ln.startswith("|")]
    assert table[0] == "| task | metric | n | base | debate |"
    assert all(ln.count("|") == table[0].count("|") for ln in table)   # every row has the header's cells
    acc = next(ln for ln in table if ln.startswith("| tiny_debate_mc | acc |"))
    base = next(r for r in harness_rows if (r.model, r.task, r.metric) == ("base", "tiny_debate_mc", "acc"))
    assert f"{base.value:.3f} ± {base.stderr:.3f}" in acc and "| 10 |" in acc
    assert 'id="standard-benchmarks"' in page and "tiny_debate_ppl" in page


def test_unknown_task_stops_the_run_before_anything_runs(tmp_path, capsys):
    from pipeline.cli import main
    out = tmp_path / "out"
    rc = main(["run", "--config", DEMO, "--output", str(out), "--set", "eval.harness_tasks=medmcq,no_such_task"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: eval.harness_tasks: lm-eval knows no task 'medmcq', 'no_such_task'")
    assert "did you mean medmcqa" in err[0] and "`lm-eval ls tasks` lists them" in err[0]
    assert not out.exists()   # nothing ran, nothing written
    # `adapters eval --harness` is the same setting, checked before the stage runs
    rc = main(["eval", "--config", DEMO, "--output", str(out), "--harness", "no_such_task"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and err == [e for e in err if "lm-eval knows no task 'no_such_task'" in e] and err, err
    assert not out.exists()


def test_bad_task_settings_are_config_errors(tmp_path):
    from pipeline.config import load_config
    with pytest.raises(ConfigError, match=r"eval.harness_tasks: \['mmlu pro'\]: an lm-eval task name"):
        load_config(DEMO, sets=["eval.harness_tasks=[mmlu pro]"])
    with pytest.raises(ConfigError, match="lists a task twice"):
        load_config(DEMO, sets=["eval.harness_tasks=medmcqa,medmcqa"])
    assert load_config(DEMO, sets=["eval.harness_tasks=medmcqa, pubmedqa"]).eval.harness_tasks == ["medmcqa", "pubmedqa"]
    from pipeline.eval.harness import check_tasks
    cfg = load_config(DEMO, sets=["eval.harness_tasks=[tiny_debate_mc]", f"eval.harness_include_path={tmp_path}"])
    with pytest.raises(ConfigError, match="no folder of task YAMLs"):
        check_tasks(cfg)
    # in a YAML file the folder is relative to the file, as every path there
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.yaml").write_text(Path(DEMO).read_text() + "\neval:\n  harness_include_path: tasks\n")
    assert load_config(tmp_path / "conf" / "c.yaml").eval.harness_include_path == str(tmp_path / "conf" / "tasks")


def test_without_lm_eval_the_error_says_what_to_install(monkeypatch):
    from pipeline.config import load_config
    from pipeline.eval.harness import check_tasks
    monkeypatch.setitem(sys.modules, "lm_eval", None)   # as if the [harness] extra were not installed
    with pytest.raises(ConfigError, match=r"needs lm-evaluation-harness, which is not installed .*pip install -e '\.\[harness\]'"):
        check_tasks(load_config(DEMO, sets=["eval.harness_tasks=[medmcqa]"]))


def test_a_hub_task_offline_says_it_needs_the_hub(monkeypatch, tmp_path):
    """lm-eval's own pubmedqa reads bigbio/pubmed_qa from the Hub: offline and not cached, the error says
    which tasks, that their data is on the Hub, and the two ways out, before any model is loaded."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))   # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager
    from pipeline.eval.harness import HarnessError, load_datasets
    with pytest.raises(HarnessError) as e:
        load_datasets(["pubmedqa"], TaskManager(), offline=True)
    msg = str(e.value)
    assert msg.startswith("harness: lm-eval task(s) pubmedqa read their dataset from the Hugging Face Hub and offline mode is on")
    assert "eval.harness_include_path" in msg and "Run once with network access" in msg
