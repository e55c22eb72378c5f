"""The evaluation as a stage of its own (pipeline.eval.run_eval_stage, `adapters eval`): which adapters it
scores, when it keeps eval/matrix.json (nothing it depends on changed: no Ray started) and when it must
score again (an adapter retrained or added, other eval settings, other data). The scoring itself runs on
the demo (tests/integration/test_lifecycle.py, test_eval_demo.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import tiny_config, write_sft  # noqa: E402
from pipeline.errors import UsageError  # noqa: E402
from pipeline.eval import finished_adapters, fingerprint, run_eval_stage, up_to_date  # noqa: E402
from pipeline.storage import Store  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def finish(store: Store, cfg, domain: str, val_loss: float = 1.5) -> None:
    """A finished adapter as training leaves it: its report and its state file."""
    store.write_json(f"adapters/{domain}/training_report.json", {"domain": domain, "status": "finished",
                                                                  "val_loss": val_loss, "run_name": cfg.run_name,
                                                                  "finished_at": "2026-12-01T00:00:00Z"})
    store.write_json(f"runs/{cfg.run_name}/domains/{domain}.json", {"domain": domain, "state": "finished"})


@pytest.fixture
def evaluated(tmp_path):
    """Test data, two finished adapters and the matrix the stage wrote for them."""
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate", "medicine", "education"], n=(8, 4, 4))
    cfg = tiny_config(str(tmp_path), domains=["debate", "medicine", "education"], model__tiny__pretrain_steps=0)
    for d in ("debate", "medicine"):
        finish(store, cfg, d)
    store.write_json("eval/matrix.json", {"models": ["base", "debate", "medicine"], "datasets": cfg.domains,
                                          "fingerprint": fingerprint(cfg, store, ["debate", "medicine"])})
    return cfg, store


def test_an_up_to_date_matrix_is_kept_without_starting_ray(evaluated, caplog):
    import ray
    cfg, store = evaluated
    before = store.read_bytes("eval/matrix.json")
    caplog.set_level("INFO", logger="pipeline")
    m = run_eval_stage(cfg)
    assert m["models"] == ["base", "debate", "medicine"] and store.read_bytes("eval/matrix.json") == before
    assert not ray.is_initialized()
    assert "is up to date (same adapters, data and eval settings): kept" in caplog.text


def test_what_makes_the_matrix_out_of_date(evaluated):
    cfg, store = evaluated
    adapters = finished_adapters(cfg, store)
    assert adapters == ["debate", "medicine"] and up_to_date(cfg, store, adapters)
    # other eval settings
    assert not up_to_date(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"seed": cfg.eval.seed + 1})}),
                          store, adapters)
    # lm-eval's tasks decide eval/harness.json only: asking for one does not score the matrix again
    assert up_to_date(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"harness_tasks": ["medmcqa"]})}),
                      store, adapters)
    # another adapter finished since
    finish(store, cfg, "education")
    adapters = finished_adapters(cfg, store)
    assert adapters == ["debate", "medicine", "education"] and not up_to_date(cfg, store, adapters)
    store.delete("adapters/education")
    assert up_to_date(cfg, store, finished_adapters(cfg, store))
    # an adapter retrained (its training report differs)
    finish(store, cfg, "debate", val_loss=1.2)
    assert not up_to_date(cfg, store, finished_adapters(cfg, store))
    finish(store, cfg, "debate")
    assert up_to_date(cfg, store, finished_adapters(cfg, store))
    # other prepared data
    store.write_json("data/manifest.json", {"fingerprint": "other data"})
    assert not up_to_date(cfg, store, finished_adapters(cfg, store))


def test_a_failed_later_attempt_is_not_evaluated(evaluated):
    """The same words as `adapters status`: this run's later failed attempt outranks the older adapter."""
    cfg, store = evaluated
    store.write_json(f"runs/{cfg.run_name}/domains/medicine.json",
                     {"domain": "medicine", "state": "failed", "error": "boom", "updated": "2099-01-01T00:00:00Z"})
    assert finished_adapters(cfg, store) == ["debate"]


def test_no_finished_adapter(tmp_path, caplog):
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate"], n=(8, 4, 4))
    cfg = tiny_config(str(tmp_path), domains=["debate"])
    with pytest.raises(UsageError, match=r"no finished adapter of debate under .*: run `adapters train -x` first"):
        run_eval_stage(cfg, "adapters train -x")     # `adapters eval`: a usage error, nothing ran
    caplog.set_level("INFO", logger="pipeline")
    assert run_eval_stage(cfg) is None   # in `adapters run`: train has said why
    assert "eval: no finished adapter" in caplog.text and not store.exists("eval")


def test_off(evaluated, caplog):
    cfg, store = evaluated
    store.delete("eval/matrix.json")
    caplog.set_level("INFO", logger="pipeline")
    for off in ({"eval": cfg.eval.model_copy(update={"enabled": False})},
                {"train": cfg.train.model_copy(update={"eval_matrix": False})}):
        assert run_eval_stage(cfg.model_copy(update=off)) is None
    assert "eval: off (eval.enabled: false)" in caplog.text and not store.exists("eval/matrix.json")


def test_training_does_not_import_the_evaluation():
    """pipeline/train/ never imports pipeline/eval/ (at the top of a module or inside a function): the
    evaluation is the stage after training, not a part of it."""
    import ast
    root = Path(__file__).resolve().parents[2] / "pipeline" / "train"
    found = []
    for f in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{f.name}:{node.lineno} {n}" for n in names if n == "pipeline.eval" or n.startswith("pipeline.eval.")]
    assert len(list(root.rglob("*.py"))) > 5 and found == []
