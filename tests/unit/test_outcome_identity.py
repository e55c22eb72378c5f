"""A domain's outcome (one writer, one reader: pipeline.status), its training identity
(pipeline.train.identity) and the one fingerprint helper."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import tiny_config, write_sft  # noqa: E402

from pipeline import layout  # noqa: E402
from pipeline.fingerprint import fingerprint  # noqa: E402
from pipeline.status import clear_fatal, domain_state, write_fatal, write_outcome  # noqa: E402
from pipeline.storage import Store  # noqa: E402
from pipeline.train.identity import IncompatibleCheckpointError, TrainingIdentity  # noqa: E402
from pipeline.train.schedule import mark_interrupted, preflight  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def test_fingerprint_is_sha256_of_sorted_json():
    value = {"b": [1, 2], "a": {"y": None, "x": "s"}}
    full = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
    assert fingerprint(value) == full and fingerprint(value, 16) == full[:16]
    assert fingerprint({"a": {"x": "s", "y": None}, "b": [1, 2]}) == full          # key order does not count
    assert fingerprint({"p": Path("/x")}) == fingerprint({"p": "/x"})               # non-JSON values as str
    assert fingerprint([1, 2]) != fingerprint([2, 1])


def test_fatal_is_a_field_of_the_outcome(tmp_path):
    store = Store(str(tmp_path))
    write_outcome(store, "r", "law", "running", driver={"pid": 1, "host": "h"})
    write_fatal(store, "r", "law", "NonFiniteLossError: loss is nan at step 6")
    o = domain_state(store, "r", "law")
    assert (o.recorded, o.fatal) == ("running", "NonFiniteLossError: loss is nan at step 6")
    write_outcome(store, "r", "law", "failed", error=o.fatal)
    o = domain_state(store, "r", "law")
    assert (o.state, o.cause) == ("failed", "NonFiniteLossError: loss is nan at step 6")
    clear_fatal(store, "r", "law")   # a new attempt starts without it
    assert domain_state(store, "r", "law").fatal is None
    assert domain_state(store, "other", "law").fatal is None   # another run's outcome has its own


def test_outcome_written_by_the_earlier_code_is_read(tmp_path):
    """Runs written before DomainOutcome existed resume: the same files, in the same places."""
    root = tmp_path
    for rel, obj in {
        "runs/t/domains/debate.json": {"domain": "debate", "state": "failed", "error": "RuntimeError: boom",
                                       "updated": "2026-01-01T00:00:00Z", "val_loss": None, "adapter_uri": None},
        "runs/t/fatal/debate.json": {"domain": "debate", "error": "IncompatibleCheckpointError: other lora.r"},
        "adapters/medicine/training_report.json": {"status": "finished", "val_loss": 1.5, "run_name": "t",
                                                   "adapter_uri": "file:///x/adapters/medicine"},
        "runs/t/domains/medicine.json": {"domain": "medicine", "state": "finished", "updated": "2026-01-01T00:00:00Z"},
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(obj))
    store = Store(str(root))
    o = domain_state(store, "t", "debate")
    assert (o.state, o.cause, o.fatal) == ("failed", "RuntimeError: boom", "IncompatibleCheckpointError: other lora.r")
    o = domain_state(store, "t", "medicine")
    assert (o.state, o.val_loss, o.adapter_uri) == ("finished", 1.5, "file:///x/adapters/medicine")
    assert o.finished_report["status"] == "finished" and o.recorded == "finished"


def test_scheduler_and_status_read_one_outcome(tmp_path):
    """The scheduler decides from the same record `adapters status` shows: a finished, current adapter is
    skipped and shown finished; an interrupted domain is marked by the scheduler and shown interrupted."""
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate", "medicine"])
    cfg = tiny_config(str(tmp_path), domains=["debate", "medicine"])
    ident = TrainingIdentity.of(cfg, "debate", store)
    store.write_json(layout.training_report("debate"), {"status": "finished", "val_loss": 1.0,
                                                        "config_fingerprint": ident.fingerprint()})
    todo, known = preflight(cfg, store)
    assert todo == ["medicine"] and known["debate"]["skipped"]
    assert domain_state(store, "t", "debate").state == "finished"
    mark_interrupted(store, cfg, ["debate", "medicine"])   # the finished one keeps its outcome
    assert domain_state(store, "t", "debate").state == "finished"
    o = domain_state(store, "t", "medicine")
    assert o.state == "interrupted" and "resumes it from its last checkpoint" in o.cause


def test_identity_decides_skip_resume_and_fingerprints(tmp_path):
    store = Store(str(tmp_path))
    write_sft(store, domains=["debate"])
    cfg = tiny_config(str(tmp_path), domains=["debate"])
    ident = TrainingIdentity.of(cfg, "debate", store)
    rep = {"status": "finished", "config_fingerprint": ident.fingerprint()}
    assert ident.why_not_current(rep) is None and ident.current(rep) is rep
    assert ident.why_not_current({"status": "finished", "config_fingerprint": "0123"}).startswith("it was made by an older")
    assert ident.why_not_current(None) == "no finished adapter" and ident.current(None) is None

    # another learning rate: the adapter is not current, but its checkpoints can be resumed
    lr = TrainingIdentity.of(tiny_config(str(tmp_path), domains=["debate"], train__learning_rate=0.5), "debate", store)
    assert lr.why_not_current(rep) == "the training settings changed"
    lr.check_resume(ident.resume, "here")
    assert not lr.made_by({"config_fingerprint": ident.fingerprint()}) and ident.made_by(rep)

    # another LoRA rank: neither
    r4 = TrainingIdentity.of(tiny_config(str(tmp_path), domains=["debate"],
                                         lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}), "debate", store)
    assert r4.why_not_current(rep) == "the training settings changed"
    with pytest.raises(IncompatibleCheckpointError, match="lora.r: checkpoint has 8, config has 4"):
        r4.check_resume(ident.resume, "here")

    # the domain's SFT data prepared again from other inputs (prepare's marker of the domain): not current
    store.write_json(layout.domain_marker("debate"), {"fingerprint": "other-inputs"})
    assert TrainingIdentity.of(cfg, "debate", store).why_not_current(rep) == (
        "this domain's SFT data changed (prepared again from other inputs or settings)")
