"""Prepare's per-record rules are named steps (pipeline/prepare.py): each drops a record with its outcome and
reason, every quarantine entry names the step that made it, and the Tally of the steps gives the manifest's
counts (the same counts on every source's real layout: tests/unit/test_prepare.py). No Ray here."""
from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.prepare import READ, Cap, Dedupe, Drop, Tally, file_events, file_steps
from pipeline.sources import BUILTIN, Opts


def claim(i: int, **kw) -> dict:
    return {"claim_id": f"c{i}", "claim": f"Claim number {i} about the climate, long enough to keep.",
            "claim_label": "SUPPORTS", "evidences": [{"evidence_id": "e", "evidence_label": "SUPPORTS",
                                                      "article": "A", "evidence": f"Evidence sentence {i}."}], **kw}


def test_each_file_step_quarantines_with_its_reason_and_name(tmp_path):
    lines = [json.dumps(claim(1)),
             "{not json",                                                  # the reader's own entry
             json.dumps({**claim(2), "evidences": json.loads("[" * 200 + "]" * 200)}),   # too deep
             json.dumps(claim(3, note="x" * 5000)),                        # over max_record_chars
             json.dumps({**claim(4), "claim": ""}),                        # the normalizer's Reject
             json.dumps({**claim(5), "claim_label": "MAYBE"}),             # another Reject
             json.dumps(claim(6))]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(lines) + "\n")
    evs = list(file_events(BUILTIN["climate_fever"], str(f), "climate_fever/c.jsonl", Opts(max_record_chars=2000)))
    assert [k for k, _ in evs] == ["r", "q", "q", "q", "q", "q", "r", "f"]
    assert [(e["location"], e["step"], e["reason"]) for k, e in evs if k == "q"] == [
        ("line 2", READ, "malformed_json"), ("line 3", "nesting_depth", "too_deeply_nested"),
        ("line 4", "record_size", "too_large"), ("line 5", "normalize", "empty_text"),
        ("line 6", "normalize", "missing_field")]


def test_a_normalizer_error_costs_its_record_only(tmp_path):
    def boom(raw, opts):
        if raw.data["claim_id"] == "c2":
            raise KeyError("surprise")
        return BUILTIN["climate_fever"].normalize(raw, opts)
    src = dataclasses.replace(BUILTIN["climate_fever"], normalize=boom)
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps(claim(i)) for i in (1, 2, 3)) + "\n")
    evs = list(file_events(src, str(f), "climate_fever/c.jsonl", Opts()))
    assert [(k, e.get("step"), e.get("reason")) for k, e in evs[:-1]] == [
        ("r", None, None), ("q", "normalize", "record_error"), ("r", None, None)]
    assert "KeyError" in evs[1][1]["snippet"]
    assert [s.name for s in file_steps(src, Opts(), "x")] == ["nesting_depth", "record_size", "normalize"]


def test_driver_steps_dedupe_before_cap_and_the_tally_adds_up():
    seen: set[str] = set()
    steps = [Dedupe(seen), Cap(2)]
    tally = Tally()
    for h in ["a", "b", "a", "c", "b", "c", "d"]:   # a, b kept; then the cap is reached
        rec = {"hash": h}
        try:
            for step in steps:
                rec = step(rec)
        except Drop as d:
            tally.drop(step.name, d.outcome, d.reason)
            continue
        seen.add(h)
        tally.kept += 1
    tally.drop(READ, "quarantined", "malformed_json")
    # a duplicate of a kept text is deduplicated even after the cap; a capped text is not "seen" (c twice: capped twice)
    assert tally.kept == 2 and tally.count("deduplicated") == 2 and tally.count("capped") == 3
    assert tally.reasons("quarantined") == {"malformed_json": 1} and tally.read == 8
    assert tally.by_step() == {"dedupe": {"deduplicated:duplicate_text": 2}, "cap": {"capped:max_docs_per_source": 3},
                               READ: {"quarantined:malformed_json": 1}}
    assert not Cap(None).reached
    with pytest.raises(Drop):
        Cap(0)({"hash": "z"})
