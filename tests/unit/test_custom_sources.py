"""data.custom_sources: the config (names, mappings, where the data lives, new domains), and each
format and record shape read through prepare (in-process; the fifth-domain run with Ray is in
test_prepare.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.prepare import run_prepare
from pipeline.sources import registry, selected_sources

from ._prepare_helpers import RAW, ROOT, make_cfg, read_rows

LAW = ROOT / "fixtures" / "custom" / "law.jsonl"


def custom(**kw) -> str:
    """A --set value declaring one custom source."""
    return "data.custom_sources=[" + json.dumps(kw) + "]"


# ---- config ----------------------------------------------------------------------------------

def test_example_config_declares_a_fifth_domain():
    cfg = load_config(ROOT / "configs" / "custom_example.yaml", environ={})
    c = cfg.data.custom_sources[0]
    assert cfg.domains[-1] == "law" and c.domain == "law" and c.where == "local"
    assert Path(c.path) == LAW  # relative to the YAML file
    assert [s.name for s in selected_sources(cfg)][-1] == "harbour_code"


def test_domains_default_to_builtin_and_custom(tmp_path):
    cfg = make_cfg(RAW, tmp_path, custom(name="law_qa", domain="law", path=str(LAW), format="jsonl",
                                         prompt="question", response="answer"))
    assert cfg.domains == ["debate", "medicine", "education", "ecology", "law"]


@pytest.mark.parametrize("domains,per_domain", [(["debate", "astrology"], None), (["debate"], "astrology")])
def test_unknown_domain_is_a_config_error_naming_the_known_ones(tmp_path, domains, per_domain):
    sets = [f"train.per_domain={{{per_domain}: {{max_steps: 3}}}}"] if per_domain else []
    with pytest.raises(ConfigError) as e:
        make_cfg(RAW, tmp_path, *sets, domains=domains)
    msg = str(e.value)
    assert "astrology" in msg and "debate, medicine, education, ecology" in msg
    if not per_domain:
        assert "no source provides" in msg and "data.custom_sources" in msg


@pytest.mark.parametrize("kw,err", [
    (dict(prompt="q", messages="m"), "map exactly one record shape"),
    (dict(prompt="q", response="a", text="t"), "map exactly one record shape"),
    (dict(format="sharegpt", prompt="q"), "format sharegpt reads conversations; \\['prompt'\\] belong to another"),
    (dict(format="alpaca", messages="m"), "map exactly one record shape"),
    (dict(name="medquad", text="t"), "is a built-in source"),
    (dict(name="Law QA", text="t"), "not a valid name"),
    (dict(path="gs://bucket/x", text="t"), "use a local path, s3://bucket/prefix or a Hugging Face dataset id"),
    (dict(format="xml", text="t"), "format"),
])
def test_custom_source_mistakes_are_named(tmp_path, kw, err):
    base = dict(name="law_qa", domain="law", path=str(LAW), format="jsonl")
    with pytest.raises(ConfigError, match=err):
        make_cfg(RAW, tmp_path, custom(**{**base, **kw}))


def test_where_the_data_lives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    def where(path, fmt="jsonl"):
        cfg = make_cfg(RAW, tmp_path, custom(name="x", domain="law", path=path, format=fmt, text="t"))
        return cfg.data.custom_sources[0]
    assert where("s3://bucket/law/").where == "s3"
    hf = where("hf://someone/law-qa")
    assert hf.where == "hf" and hf.hf_id == "someone/law-qa"
    assert where("someone/law-qa").where == "hf"                       # no such local path
    local = where("data/law.jsonl")                                     # ends in .<format>: a path
    assert local.where == "local" and local.path == str(tmp_path / "data" / "law.jsonl")
    spec = registry(make_cfg(RAW, tmp_path, custom(name="x", domain="law", path="hf://someone/law-qa",
                                                   format="parquet", text="t")).data)["x"]
    assert [(p.kind, p.repo, p.dest) for p in spec.parts] == [("hf", "someone/law-qa", "custom/x")]
    assert spec.patterns == ("**/*.parquet",)


def test_custom_names_in_download_selection_and_redaction(tmp_path):
    cfg = load_config(None, sets=["model.base=tiny", "resources.device=cpu",
                                  custom(name="law_qa", domain="law", path="s3://bucket/law?X-Amz-Signature=abc123",
                                         format="jsonl", text="t")],
                      environ={"DOWNLOAD_ONLY": "law_qa"})
    assert cfg.data.download.only == ["law_qa"]
    assert "abc123" not in json.dumps(cfg.redacted())
    with pytest.raises(ConfigError, match="unknown source.*known sources: .*law_qa"):
        load_config(None, sets=["model.base=tiny", "resources.device=cpu",
                                custom(name="law_qa", domain="law", path=str(LAW), format="jsonl", text="t")],
                    environ={"DOWNLOAD_SKIP": "law"})


# ---- formats and record shapes through prepare ------------------------------------------------

CHAT = [
    {"messages": [{"role": "system", "content": "You answer questions on the Harbour Town Code."},
                  {"role": "user", "content": "May I fish from the harbour wall?"},
                  {"role": "assistant", "content": "Yes, with the free yearly fishing card (section 9.1)."},
                  {"role": "user", "content": "And may my children swim off the harbour steps?"},
                  {"role": "assistant", "content": "No: swimming in the harbour is forbidden (section 9.3)."}]},
    {"messages": [{"role": "user", "content": "Who hears complaints against the town?"},
                  {"role": "assistant", "content": "The town ombudsman, within thirty days (section 10.1)."}]},
    {"messages": [{"role": "robot", "content": "beep"}]},                        # not a chat: quarantined
    {"messages": [{"role": "user", "content": "A question that nobody answered at all?"}]},  # no answer
]


def _prepare(tmp_path, *sets, **kw):
    out = tmp_path / "out"
    cfg = make_cfg(RAW, out, custom(name="mine", domain="law", **kw), *sets, domains=["law"])
    return run_prepare(cfg, use_ray=False), out


def test_chat_messages_in_parquet(tmp_path):
    d = tmp_path / "chats"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(CHAT), d / "part-0.parquet")
    m, out = _prepare(tmp_path, path=str(d), format="parquet", messages="messages")
    s = m["sources"]["mine"]
    assert (s["read"], s["kept"], s["quarantined_by_reason"]) == (4, 2, {"empty_answer": 1, "missing_field": 1})
    assert s["files"][0]["path"] == "custom/mine/part-0.parquet"
    # one row per conversation, every turn kept in its slot (system first): training encodes it turn by turn
    sft = sorted(read_rows(out, "data/sft/law/*/*.parquet"), key=lambda r: len(r["messages"]))
    assert [r["task"] for r in sft] == ["chat"] * 2
    assert sft[0]["messages"] == CHAT[1]["messages"]
    assert sft[1]["messages"] == CHAT[0]["messages"]


def test_csv_with_messages_as_json_and_a_missing_column(tmp_path):
    import csv
    f = tmp_path / "law.csv"
    with open(f, "w", newline="") as fh:
        csv.writer(fh).writerows([["id", "chat"], ["1", json.dumps(CHAT[1]["messages"])]])
    m, out = _prepare(tmp_path, path=str(f), format="csv", messages="chat")
    assert m["sources"]["mine"]["kept"] == 1 and len(read_rows(out, "data/sft/law/*/*.parquet")) == 1
    from pipeline.errors import UserFacingError
    with pytest.raises(UserFacingError, match=r"(?s)mine: kept 0 of 1 records.*unknown_format: 1 \(e\.g\. custom/mine/law\.csv "
                       r"header: missing columns \['question', 'answer'\].*fix the mapping in data.custom_sources\[mine\]"):
        _prepare(tmp_path, path=str(f), format="csv", prompt="question", response="answer")  # header lacks the columns
    m, _ = _prepare(tmp_path, "data.min_kept_share=0", path=str(f), format="csv", prompt="question", response="answer")
    assert m["sources"]["mine"]["quarantined_by_reason"] == {"unknown_format": 1}


def test_json_list_and_text_only_source(tmp_path):
    f = tmp_path / "notes.json"
    f.write_text(json.dumps([{"body": "The harbour master keeps the register of moorings.\nIt is public."},
                             {"body": ""}, {"other": "x"}]))
    m, out = _prepare(tmp_path, "data.min_kept_share=0.3", path=str(f), format="json", text="body")
    s = m["sources"]["mine"]
    assert (s["kept"], s["sft_examples"], s["quarantined_by_reason"]) == (1, 0, {"empty_text": 1, "missing_field": 1})
    assert s["note"] == "text-only source: corpus rows, no SFT examples"
    corpus = read_rows(out, "data/corpus/law/*.parquet")
    assert corpus[0]["text"] == "The harbour master keeps the register of moorings.\nIt is public."  # lines kept
    assert m["domains"]["law"]["sft_rows"] == {"train": 0, "val": 0, "test": 0}


def test_missing_local_path_is_named(tmp_path):
    from pipeline.errors import UserFacingError
    with pytest.raises(UserFacingError, match="mine: nothing under .*nope.jsonl.*fix data.custom_sources\\[mine\\].path"):
        _prepare(tmp_path, path=str(tmp_path / "nope.jsonl"), format="jsonl", text="t")


# ---- the formats people have, by name -----------------------------------------------------------

def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _sft(out: Path, domain: str = "law") -> list[dict]:
    return read_rows(out, f"data/sft/{domain}/*/*.parquet")


SHAREGPT = [{"id": f"c{i}", "conversations": [
    {"from": "system", "value": "You are a helpful support agent."},
    {"from": "human", "value": f"My router {i} blinks red. What now?"},
    {"from": "gpt", "value": "Unplug it for thirty seconds, then plug it back in."},
    {"from": "user", "value": "Still red."},
    {"from": "chatgpt", "value": f"Then call your provider about line {i}: it may be down."}]} for i in range(6)]


def test_sharegpt_speakers_and_aliases(tmp_path):
    bad = {"id": "x", "conversations": [{"from": "tool", "value": "{}"}, {"from": "gpt", "value": "ok"}]}
    m, out = _prepare(tmp_path, path=str(_jsonl(tmp_path / "chats.jsonl", SHAREGPT + [bad])), format="sharegpt")
    s = m["sources"]["mine"]
    assert (s["kept"], s["quarantined_by_reason"], s["sft_by_task"]) == (6, {"missing_field": 1}, {"chat": 6})
    rows = sorted(_sft(out), key=lambda r: r["messages"][1]["content"])
    assert rows[0]["messages"] == [
        {"role": "system", "content": "You are a helpful support agent."},
        {"role": "user", "content": "My router 0 blinks red. What now?"},
        {"role": "assistant", "content": "Unplug it for thirty seconds, then plug it back in."},
        {"role": "user", "content": "Still red."},
        {"role": "assistant", "content": "Then call your provider about line 0: it may be down."}]
    q = read_rows(out, "data/quarantine/mine/*.parquet")
    assert "conversations[0] is not {from:" in q[0]["snippet"] and "tool" in q[0]["snippet"]


def test_sharegpt_mapped_as_openai_fails_prepare_with_the_reason_and_an_example(tmp_path):
    """The user's report: a ShareGPT file read with the wrong mapping lost every record in silence."""
    from pipeline.errors import UserFacingError
    f = _jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    with pytest.raises(UserFacingError, match=r"(?s)mine: kept 0 of 6 records \(6 quarantined\).*missing_field: 6 "
                                              r"\(e\.g\. custom/mine/chats\.jsonl line 1: no column 'messages'; columns: "
                                              r"conversations, id\).*fix the mapping in data\.custom_sources\[mine\]"):
        _prepare(tmp_path, path=str(f), format="openai")


def test_alpaca_input_is_part_of_the_user_turn_and_splits_by_conversation(tmp_path):
    pairs = [("The cat sleeps.", "Le chat dort."), ("The dog runs.", "Le chien court."), ("I read a book.", "Je lis un livre.")]
    recs = [{"instruction": "Translate to French", "input": f"{en} ({i})", "output": f"{fr} ({i})"}
            for i in range(10) for en, fr in pairs]
    recs.append({"instruction": "Name a French city.", "input": "", "output": "Lyon.", "system": "Answer briefly.",
                 "history": [["Name a French river.", "The Loire."]]})
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps(recs))
    m, out = _prepare(tmp_path, path=str(f), format="alpaca")
    assert m["sources"]["mine"]["kept"] == 31 and m["sources"]["mine"]["sft_by_task"] == {"instruction": 31}
    rows = _sft(out)
    users = sorted(r["messages"][-2]["content"] for r in rows)
    assert len(set(users)) == 31 and "Translate to French\n\nThe cat sleeps. (0)" in users  # the input is kept
    # 30 pairs under one instruction are 30 conversations: they spread over the splits
    splits = {r["split"] for r in rows if r["messages"][-2]["content"].startswith("Translate")}
    assert splits == {"train", "val", "test"}
    city = next(r for r in rows if r["messages"][-1]["content"] == "Lyon.")
    assert city["messages"] == [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "Name a French river."},
                                {"role": "assistant", "content": "The Loire."},
                                {"role": "user", "content": "Name a French city."},
                                {"role": "assistant", "content": "Lyon."}]


def test_prompt_completion_and_a_format_detected_with_one_line(tmp_path, caplog):
    import logging
    recs = [{"prompt": f"What does section {i} of the harbour code regulate?", "completion": f"Moorings, part {i}."}
            for i in range(4)]
    f = _jsonl(tmp_path / "pc.jsonl", recs)
    with caplog.at_level(logging.INFO, logger="pipeline.prepare"):
        m, out = _prepare(tmp_path, path=str(f))                      # no format: detected
    said = [r.getMessage() for r in caplog.records if "format not set" in r.getMessage()]
    assert said == ["prepare: mine: format not set; assumed prompt_completion from the columns of custom/mine/pc.jsonl "
                    "(completion, prompt); set data.custom_sources[mine].format to choose"]
    assert m["sources"]["mine"]["format"] == "prompt_completion"   # the manifest says which format was read
    assert sorted(r["messages"][0]["content"] for r in _sft(out)) == sorted(r["prompt"] for r in recs)
    assert all(r["messages"][1]["content"].startswith("Moorings") for r in _sft(out))
    # the same with the column names overridden
    g = _jsonl(tmp_path / "qa.jsonl", [{"q": r["prompt"], "a": r["completion"]} for r in recs])
    m, out = _prepare(tmp_path, path=str(g), format="prompt_completion", prompt="q", response="a")
    assert m["sources"]["mine"]["kept"] == 4


def test_dataset_folder_laid_out_as_on_the_hub_with_subset_split_and_data_files(tmp_path):
    """A local dataset folder as the Hub lays out a dataset with two subsets (configs) and splits."""
    ds = tmp_path / "ds"
    for subset in ("en", "fr"):
        (ds / subset).mkdir(parents=True)
        for split in ("train", "test"):
            rows = [{"messages": [{"role": "user", "content": f"{subset} {split} question {i}?"},
                                  {"role": "assistant", "content": f"{subset} {split} answer {i}."}]} for i in range(3)]
            pq.write_table(pa.Table.from_pylist(rows), ds / subset / f"{split}-00000-of-00001.parquet")
    (ds / "README.md").write_text("---\nconfigs: ...\n---\n")
    m, out = _prepare(tmp_path, path=str(ds), subset="fr", split="test")
    s = m["sources"]["mine"]
    assert [f["path"] for f in s["files"]] == ["custom/mine/fr/test-00000-of-00001.parquet"] and s["kept"] == 3
    assert {r["messages"][0]["content"].rsplit(" ", 2)[0] for r in _sft(out)} == {"fr test"}
    m, _ = _prepare(tmp_path, path=str(ds), data_files=["en/train-*.parquet", "fr/train-*.parquet"])
    assert [f["path"] for f in m["sources"]["mine"]["files"]] == [
        "custom/mine/en/train-00000-of-00001.parquet", "custom/mine/fr/train-00000-of-00001.parquet"]
    # the Hub's own dataset id: the same patterns are what download keeps
    spec = registry(make_cfg(RAW, tmp_path, custom(name="x", domain="law", path="hf://someone/law-chats", subset="fr",
                                                   split="test", files="parquet")).data)["x"]
    assert "fr/**/test-*.parquet" in spec.patterns and all(p.startswith("fr/") for p in spec.patterns)


def test_per_domain_system_message_opens_builtin_rows(tmp_path):
    out = tmp_path / "out"
    cfg = make_cfg(RAW, out, "data.sources=[climate_fever]",
                   'data.system_messages={ecology: "You check climate claims against the evidence."}', domains=["ecology"])
    run_prepare(cfg, use_ray=False)
    rows = read_rows(out, "data/sft/ecology/*/*.parquet")
    assert rows and all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] and
                        r["messages"][0]["content"] == "You check climate claims against the evidence." for r in rows)
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="data.system_messages: unknown domain"):
        make_cfg(RAW, out, 'data.system_messages={astrology: "x"}')


def test_turn_order_is_checked_and_unanswered_turns_are_dropped(tmp_path):
    u, a = ({"role": "user", "content": "Is the harbour open at night?"},
            {"role": "assistant", "content": "Yes, the north gate stays open (section 2.4)."})
    recs = [{"messages": [u, a, {"role": "user", "content": "Thanks, and in winter?"}]},   # last turn unanswered
            {"messages": [u, u, a]},                                                          # two user turns
            {"messages": [a, u, a]}]                                                          # opens with an answer
    m, out = _prepare(tmp_path, "data.min_kept_share=0.3", path=str(_jsonl(tmp_path / "c.jsonl", recs)), format="openai")
    assert m["sources"]["mine"]["quarantined_by_reason"] == {"bad_turn_order": 2}
    assert [r["messages"] for r in _sft(out)] == [[u, a]]
    q = read_rows(out, "data/quarantine/mine/*.parquet")
    assert all("user and assistant turns alternating" in r["snippet"] for r in q)


def test_an_answer_that_repeats_an_earlier_answer_keeps_the_conversation():
    """Only an answer that copies what the user (or system) said is rejected; an assistant saying again what
    it said before is a real turn (it used to drop the whole conversation as response_copies_prompt)."""
    from pipeline.sources.base import finalize_sft
    same = "I am not sure about that, let me check."
    row = {"domain": "law", "source": "mine", "doc_id": "d1", "metadata": "{}"}
    msgs = [{"role": "user", "content": "Is parking allowed on the quay?"}, {"role": "assistant", "content": same},
            {"role": "user", "content": "And on Sundays?"}, {"role": "assistant", "content": same}]
    out, rejected = finalize_sft([{"task": "chat", "messages": msgs}], row, 10_000)
    assert rejected == {} and len(out) == 1 and [m["content"] for m in out[0]["messages"]][-1] == same
    copy = [{"role": "user", "content": "Repeat after me: the harbour closes at dusk."},
            {"role": "assistant", "content": "Repeat after me: the harbour closes at dusk."}]
    out, rejected = finalize_sft([{"task": "chat", "messages": copy}], row, 10_000)
    assert out == [] and rejected == {"response_copies_prompt": 1}
