"""Scheduling decisions without Ray: skip finished domains, skip domains without data, refuse an
incompatible checkpoint before any trial starts; base model resolution errors; merged export."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import tiny_config, write_sft  # noqa: E402

from pipeline.errors import UserFacingError  # noqa: E402
from pipeline.storage import Store  # noqa: E402
from pipeline.lm.compat import compat_record  # noqa: E402
from pipeline.lm.model import ModelLoadError, resolve_base  # noqa: E402
from pipeline.train.identity import TrainingIdentity  # noqa: E402
from pipeline.train.schedule import preflight  # noqa: E402


def test_preflight_skips_finished_and_empty_domains(tmp_path):
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate", "medicine", "education"])
    cfg = tiny_config(str(tmp_path))
    store.write_json("adapters/debate/training_report.json",
                     {"status": "finished", "config_fingerprint": TrainingIdentity.of(cfg, "debate", store).fingerprint(), "val_loss": 1.0})
    store.write_json("adapters/medicine/training_report.json",  # made with other settings: trains again
                     {"status": "finished", "config_fingerprint": {**TrainingIdentity.of(cfg, "medicine", store).fingerprint(),
                                                                   "settings": "0000"}, "val_loss": 1.0})
    todo, known = preflight(cfg, store)
    assert todo == ["medicine", "education"]
    assert known["debate"]["status"] == "finished" and known["debate"]["skipped"]
    assert known["ecology"]["status"] == "skipped" and "no SFT data" in known["ecology"]["error"]
    assert store.read_json("runs/t/domains/ecology.json")["state"] == "skipped"
    assert store.read_json("runs/t/domains/debate.json")["state"] == "finished"


def test_preflight_refuses_incompatible_checkpoint_before_any_work(tmp_path):
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate"])
    cfg = tiny_config(str(tmp_path), domains=["debate"])
    store.write_json("runs/t/train/debate/checkpoint_2026/train_state.json",
                     {"step": 4, "compat": compat_record(cfg, "debate")})
    assert preflight(cfg, store)[0] == ["debate"]  # same settings: resumes
    other = tiny_config(str(tmp_path), domains=["debate"], lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(UserFacingError) as e:
        preflight(other, store)
    msg = str(e.value)
    assert "lora.r: checkpoint has 8, config has 4" in msg and "lora.target_modules" in msg and "new run_name" in msg


def test_resolve_base_errors_name_the_fix(tmp_path):
    cfg = tiny_config(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not built yet.*adapters train"):
        resolve_base(cfg)
    c = tiny_config(str(tmp_path), model={"base": str(tmp_path / "nowhere")})
    with pytest.raises(ModelLoadError, match="base model not found at .*set model.base"):
        resolve_base(c)
    (tmp_path / "m").mkdir()
    c = tiny_config(str(tmp_path), model={"base": str(tmp_path / "m")})
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_base(c)
    c = tiny_config(str(tmp_path), model={"base": "mistralai/Mistral-7B-Instruct-v0.3"})
    assert resolve_base(c) == "mistralai/Mistral-7B-Instruct-v0.3"


def test_merged_export_refuses_nan(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file
    from pipeline.train.export import NonFiniteWeightsError, export_merged
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    from pipeline.lm.data import Example, tokenize_conversation
    from pipeline.lm.model import load_tokenizer
    from pipeline.lm.tiny import ensure_tiny
    from fixtures_train import sft_rows
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate"], n=(16, 4, 4))
    cfg = tiny_config(str(tmp_path), domains=["debate"], model__tiny__pretrain_steps=0, train__max_steps=2)
    ensure_tiny(cfg, store)
    tok = load_tokenizer(resolve_base(cfg, store), cfg)
    ex = [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", 16, 1)]
    train_domain(cfg, "debate", {"train": ex[:12], "val": ex[12:14], "test": ex[14:]}, LocalSession(str(tmp_path / "ck")))
    uri = export_merged(cfg, "debate", store)
    assert store.is_file("adapters/debate/merged/model.safetensors") and uri.endswith("adapters/debate/merged")
    f = tmp_path / "adapters" / "debate" / "adapter_model.safetensors"
    sd = load_file(str(f))
    k = next(k for k in sd if "lora_B" in k)
    sd[k] = torch.full_like(sd[k], float("nan"))
    save_file(sd, str(f))
    with pytest.raises(NonFiniteWeightsError, match="NaN/inf"):
        export_merged(cfg, "debate", store)


def test_a_domain_subset_does_not_rebuild_the_tiny_base(tmp_path):
    """`--domains debate` after a run of all four must train on the same base model the others used
    (it was rebuilt from the subset's text, and the other domains' resumes then failed as incompatible)."""
    from pipeline.lm.tiny import ensure_tiny, tiny_fingerprint
    store = Store(str(tmp_path))
    write_sft(store, n=(16, 4, 4))
    cfg = tiny_config(str(tmp_path), model__tiny__pretrain_steps=0)
    ensure_tiny(cfg, store)
    built = store.read_json("base_model/tiny_meta.json")
    subset = tiny_config(str(tmp_path), domains=["debate"], model__tiny__pretrain_steps=0)
    assert tiny_fingerprint(subset) == tiny_fingerprint(cfg)
    ensure_tiny(subset, store)
    assert store.read_json("base_model/tiny_meta.json") == built        # not rebuilt
    assert compat_record(subset, "debate") == compat_record(cfg, "debate")
    write_sft(store, domains=["debate"], n=(20, 4, 4))                   # other training text: a new base
    assert tiny_fingerprint(cfg) != built["fingerprint"]


def test_the_tiny_base_learns_only_train_split_text(tmp_path):
    """The demo's base model is pretrained (and its tokenizer trained) on train-split text only: corpus
    documents whose SFT examples are all in train; not a document with a val or test example, nor one with
    none (a duplicate of a held-out row can be such a document). A domain without a corpus: its SFT train
    split. So the demo's val and test losses are on text the base model has not seen."""
    import pyarrow as pa
    from pipeline.prepare import CORPUS_SCHEMA
    from pipeline.lm.tiny import _texts, ensure_tiny, tiny_fingerprint
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate", "medicine"], n=(6, 3, 3))   # doc_ids debate-1-*, debate-2-* (val), -3-* (test)
    docs = ([(f"debate-1-{i}", f"train document {i} about the resolution") for i in range(6)]
            + [(f"debate-2-{i}", f"val document {i} HELDOUTVAL") for i in range(3)]
            + [(f"debate-3-{i}", f"test document {i} HELDOUTTEST") for i in range(3)]
            + [("debate-unsplit", "a document with no SFT example NOSPLIT")])
    store.write_table("data/corpus/debate/part-00000.parquet", pa.Table.from_pylist(
        [{"doc_id": i, "domain": "debate", "source": "fixture", "text": t} for i, t in docs], schema=CORPUS_SCHEMA))
    cfg = tiny_config(str(tmp_path), domains=["debate", "medicine"], model__tiny__pretrain_steps=2)
    texts = _texts(cfg, store)
    debate = [t for t in texts if "document" in t]
    assert sorted(debate) == sorted(t for i, t in docs if i.startswith("debate-1-"))
    held_out = {c["content"] for d in ("debate", "medicine") for s in ("val", "test")
                for m in store.read_table(f"data/sft/{d}/{s}", columns=["messages"]).column("messages").to_pylist()
                for c in m}
    medicine = [t for t in texts if "document" not in t]
    assert len(medicine) == 6 and not any(h in t for t in texts for h in held_out)
    assert not any(w in t for t in texts for w in ("HELDOUTVAL", "HELDOUTTEST", "NOSPLIT"))
    ensure_tiny(cfg, store)
    meta = store.read_json("base_model/tiny_meta.json")
    assert meta["texts"] == len(texts) == 12   # the tokenizer and the pretraining get these texts
    # a document that moves from train to test (another split) is dropped: a new base model
    before = tiny_fingerprint(cfg, store)
    rows = store.read_table("data/sft/debate/test").to_pylist() + [
        {**r, "split": "test"} for r in store.read_table("data/sft/debate/train").to_pylist() if r["doc_id"] == "debate-1-0"]
    store.write_table("data/sft/debate/test/part-00000.parquet", pa.Table.from_pylist(rows))
    assert tiny_fingerprint(cfg, store) != before
    assert "train document 0 about the resolution" not in _texts(cfg, store)


def test_credentials_are_kept_from_tune_trials_not_from_the_driver(monkeypatch):
    """Tune copies what its ENV_VARS_TO_PROPAGATE names into every trial's runtime_env (logged by Ray): the
    credential names leave that set while Tune runs; the driver's environment keeps them (Tune's own S3
    calls, e.g. for a failed trial's error file, need them); afterwards the set is as it was."""
    import os
    from ray.tune.execution import class_cache
    from pipeline.train.schedule import secrets_kept_from_tune_trials
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    before = set(class_cache.ENV_VARS_TO_PROPAGATE)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} <= before
    with secrets_kept_from_tune_trials():
        kept = set(class_cache.ENV_VARS_TO_PROPAGATE)
        assert not {v for v in kept if v.startswith("AWS_")}
        assert kept and kept < before   # Tune's and Train's own settings are still copied
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert set(class_cache.ENV_VARS_TO_PROPAGATE) == before


def test_a_finished_adapter_is_reused_only_while_base_data_and_settings_are_the_same(tmp_path, caplog):
    """Issue 23.2: the demo run again with data.max_docs_per_source changed rebuilt the tiny base, yet every
    domain was 'finished earlier: skipped'. Now each of the three changes retrains, with a line saying why."""
    import logging
    import pyarrow as pa
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate"])
    cfg = tiny_config(str(tmp_path), domains=["debate"])

    def finish():
        store.write_json("adapters/debate/training_report.json", {
            "status": "finished", "config_fingerprint": TrainingIdentity.of(cfg, "debate", store).fingerprint(), "val_loss": 1.0})

    def decision():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.train.schedule"):
            todo, _ = preflight(cfg, store)
        return todo, " ".join(r.getMessage() for r in caplog.records)

    finish()
    assert decision() == ([], decision()[1]) and "finished earlier" in decision()[1]
    # the tiny base is built from every prepared domain's corpus: new corpus text rebuilds it
    store.write_table("data/corpus/medicine/x-00000.parquet", pa.table({"text": ["a new document"] * 50}))
    todo, said = decision()
    assert todo == ["debate"] and "the base model changed" in said and "training it again" in said
    finish()
    assert decision()[0] == []
    write_sft(store, domains=["debate"], n=(25, 5, 5))   # prepared again with other settings
    todo, said = decision()
    assert todo == ["debate"] and "SFT data changed" in said
    finish()
    cfg = tiny_config(str(tmp_path), domains=["debate"], train__learning_rate=0.5)
    todo, said = decision()
    assert todo == ["debate"] and "training settings changed" in said and "base model" not in said


def test_a_failing_run_never_changes_another_runs_finished_domain(tmp_path):
    """Issue 23.2: a run under a new run_name that failed on a domain turned run a's finished domain into
    'not started' (the trial moved the shared adapters/<domain>/ report aside). The report stays; each
    run's status reads its own state."""
    from pipeline.status import domain_state
    store = Store(str(tmp_path))
    store.write_json("adapters/mine/training_report.json", {"status": "finished", "run_name": "a", "val_loss": 1.0,
                                                           "finished_at": "2026-01-01T00:00:00Z"})
    store.write_json("runs/a/domains/mine.json", {"domain": "mine", "state": "finished", "updated": "2026-01-01T00:00:01Z"})
    store.write_json("runs/b/domains/mine.json", {"domain": "mine", "state": "failed", "error": "NonFiniteLossError: ...",
                                                  "updated": "2026-01-02T00:00:00Z"})
    assert domain_state(store, "a", "mine").state == "finished"
    assert domain_state(store, "b", "mine").state == "failed"
    # run a again later failed on it (other settings): its own newer state wins over its older report
    store.write_json("runs/a/domains/mine.json", {"domain": "mine", "state": "failed", "error": "x",
                                                  "updated": "2026-01-03T00:00:00Z"})
    assert domain_state(store, "a", "mine").state == "failed"


def test_checkpoints_of_a_replaced_adapter_are_not_resumed(tmp_path, caplog):
    """Issue 23.2: after the demo finished, the same run with other data (a rebuilt tiny base) or another
    learning rate must train again from step 0: its leftover checkpoints were either refused as incompatible
    (exit 2) or resumed near max_steps (the old training continued). The checkpoints of an attempt that did
    not finish stay (resumed, or refused as before)."""
    import logging
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate"])
    old = tiny_config(str(tmp_path), domains=["debate"])
    made = TrainingIdentity.of(old, "debate", store).fingerprint()
    store.write_json("adapters/debate/training_report.json", {"status": "finished", "config_fingerprint": made})
    store.write_json("runs/t/domains/debate.json", {"domain": "debate", "state": "finished"})
    ck = "runs/t/train/debate/checkpoint_000003/train_state.json"
    store.write_json(ck, {"step": 20, "compat": {**compat_record(old, "debate"), "model.tiny": "built-from-other-data"},
                          "config_fingerprint": made})
    new = tiny_config(str(tmp_path), domains=["debate"], train__learning_rate=0.5)
    with caplog.at_level(logging.INFO, logger="pipeline.train.schedule"):
        todo, _ = preflight(new, store)
    assert todo == ["debate"] and not store.exists("runs/t/train/debate")
    assert "are those of the adapter it replaces: training starts from step 0" in caplog.text
    # an interrupted retraining: its checkpoints are kept (and refused when incompatible, as before)
    store.write_json("runs/t/domains/debate.json", {"domain": "debate", "state": "interrupted"})
    store.write_json(ck, {"step": 20, "compat": {**compat_record(old, "debate"), "model.tiny": "built-from-other-data"},
                          "config_fingerprint": made})
    with pytest.raises(UserFacingError, match="cannot resume"):
        preflight(new, store)
    assert store.exists(ck)


def test_startup_lines_break_the_silence_until_each_trial_reports(caplog):
    """At least one line every 15 s before the first step: while no trial has started, then per trial
    until it reports (or ends); none after (issue 26, rough edges)."""
    import logging
    from types import SimpleNamespace
    from pipeline.train.schedule import startup_progress_callback
    now = [0.0]
    cb = startup_progress_callback(every_s=15, clock=lambda: now[0])
    trial = (lambda d: SimpleNamespace(config={"domain": d}, trial_id=d))
    a, b = trial("debate"), trial("medicine")

    def tick(to: float) -> list[str]:
        caplog.clear()
        while now[0] < to:
            now[0] += 0.5
            cb.on_step_begin(0, [])
        return [r.getMessage() for r in caplog.records]

    with caplog.at_level(logging.INFO, logger="pipeline.train.schedule"):
        assert tick(14) == []
        assert tick(31) == ["training: Ray Tune is starting the first trial (15s)",
                            "training: Ray Tune is starting the first trial (30s)"]
        cb.on_trial_start(0, [], a)
        cb.on_trial_start(0, [], b)
        said = tick(61)
        assert [m.split(" (")[0] for m in said] == ["domain debate: starting", "domain medicine: starting"] * 2, said
        assert "(15s)" in said[0] and "(30s)" in said[2]
        cb.on_trial_result(0, [], a, {"step": 1})
        assert [m.split(" (")[0] for m in tick(91)] == ["domain medicine: starting"] * 2
        cb.on_trial_error(0, [], b)
        assert tick(200) == []
