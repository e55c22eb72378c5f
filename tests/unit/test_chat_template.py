"""Tokens trained = tokens served: a conversation is encoded with the tokenizer's own chat template,
turn by turn, the loss on the assistant turns only (pipeline.lm.model.encode_conversation), for
three real template families written into small local tokenizers (tests/chat_tokenizers.py)."""
from __future__ import annotations

import json

import pytest

from pipeline.config import load_config
from pipeline.lm.data import IGNORE, tokenize_conversation
from pipeline.train.data import Tokenize
from pipeline.lm.model import DEFAULT_CHAT_TEMPLATE, encode_conversation, load_tokenizer, prompt_tokens
from tests.chat_tokenizers import build

CHAT = [{"role": "system", "content": "You are a helpful support agent."},
        {"role": "user", "content": "My router blinks red. What now?"},
        {"role": "assistant", "content": "Unplug it for thirty seconds, then plug it back in."},
        {"role": "user", "content": "Still red."},
        {"role": "assistant", "content": "Then call your provider: the line may be down."}]


def cfg_for(base: str, *sets: str):
    return load_config(None, sets=[f"model.base={base}", "resources.device=cpu", *sets], environ={})


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    where = tmp_path_factory.mktemp("tokenizers")
    return {f: load_tokenizer(build(f, where), cfg_for(str(where / f))) for f in ("mistral", "llama3", "chatml", "mistral_v03")}


def ids_of(x) -> list[int]:
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def spans(mask: list[bool]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, on in enumerate(mask + [False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("family", ["mistral", "llama3", "chatml"])
def test_trained_ids_are_the_template_and_the_mask_covers_exactly_the_answers(toks, family):
    tok = toks[family]
    [(ids, trained)] = encode_conversation(tok, CHAT)
    # the whole sequence is what apply_chat_template gives for the conversation
    assert ids == ids_of(tok.apply_chat_template(CHAT, tokenize=True))
    # each answer follows exactly what a server sends for the turns before it
    answers = [k for k, m in enumerate(CHAT) if m["role"] == "assistant"]
    got = spans(trained)
    assert len(got) == len(answers) == 2
    for (start, end), k in zip(got, answers):
        server = ids_of(tok.apply_chat_template(CHAT[:k], add_generation_prompt=True, tokenize=True))
        assert ids[:len(server)] == server and start == len(server)
        # the trained span: the answer's text and its end-of-turn token, nothing else
        assert ids[end - 1] == tok.eos_token_id and tok.eos_token_id not in ids[start:end - 1]
        assert tok.decode(ids[start:end - 1]).strip() == CHAT[k]["content"]
    assert ids_of(tok.apply_chat_template(CHAT[:-1], add_generation_prompt=True, tokenize=True)) == ids[:got[-1][0]]
    # labels: -100 everywhere but the answers (the system, user turns and template tokens carry no loss)
    [(ids2, labels)] = tokenize_conversation(tok, CHAT, 4096, mask_prompt=True)
    assert ids2 == ids and [i for i, l in enumerate(labels) if l != IGNORE] == [i for i, t in enumerate(trained) if t]
    assert all(labels[i] == ids[i] for i, t in enumerate(trained) if t)


def test_a_template_that_rewrites_earlier_turns_trains_each_answer_on_its_server_prompt(toks):
    """Mistral v0.3 puts the system message in the *last* user turn: no one sequence can hold both
    answers as served, so each answer is its own sequence: its server prompt, then the answer."""
    tok = toks["mistral_v03"]
    seqs = encode_conversation(tok, CHAT)
    assert len(seqs) == 2
    for (ids, trained), k in zip(seqs, (2, 4)):
        server = ids_of(tok.apply_chat_template(CHAT[:k], add_generation_prompt=True, tokenize=True))
        assert ids[:len(server)] == server and not any(trained[:len(server)])
        assert all(trained[len(server):]) and ids[-1] == tok.eos_token_id
        assert tok.decode(ids[len(server):-1]).strip() == CHAT[k]["content"]
    assert "You are a helpful support agent." in tok.decode(seqs[1][0])  # the system message as served


def test_a_tokenizer_without_a_template_gets_the_documented_default_saved_with_it(tmp_path, toks):
    """The default goes into the tokenizer files an adapter ships (export saves this tokenizer), so a
    server applies the template the adapter was trained with."""
    from transformers import AutoTokenizer
    path = build("chatml", tmp_path)
    raw = json.loads((tmp_path / "chatml" / "tokenizer_config.json").read_text())
    raw.pop("chat_template", None)
    (tmp_path / "chatml" / "tokenizer_config.json").write_text(json.dumps(raw))
    (tmp_path / "chatml" / "chat_template.jinja").unlink(missing_ok=True)
    assert not AutoTokenizer.from_pretrained(path).chat_template
    tok = load_tokenizer(path, cfg_for(path))
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "adapter")
    assert AutoTokenizer.from_pretrained(tmp_path / "adapter").chat_template == DEFAULT_CHAT_TEMPLATE
    text = tok.apply_chat_template(CHAT[:3], tokenize=False)
    assert text == ("### System:\nYou are a helpful support agent.\n\n### Question:\nMy router blinks red. What now?\n\n"
                    "### Answer:\nUnplug it for thirty seconds, then plug it back in.<|im_end|>\n\n")
    # train.chat_template: simple asks for the default even where the tokenizer has its own
    assert load_tokenizer(str(tmp_path / "chatml"), cfg_for(path, "train.chat_template=simple")).chat_template == DEFAULT_CHAT_TEMPLATE
    assert toks["chatml"].chat_template != DEFAULT_CHAT_TEMPLATE


def test_tokenize_reads_rows_as_ray_data_hands_them(tmp_path, toks):
    """Ray Data's numpy batches hold the messages column as arrays of dicts: the same ids come out,
    and a multi-turn row stays one example with both answers trained."""
    import numpy as np
    import pyarrow as pa
    from pipeline.prepare import MESSAGES_TYPE
    path = build("llama3", tmp_path)
    cfg = cfg_for(path, "train.max_seq_length=512")
    tok = Tokenize(cfg)
    table = pa.table({"messages": pa.array([CHAT, CHAT[1:3]], type=MESSAGES_TYPE), "doc_id": ["a", "b"],
                      "split": ["train", "val"]})
    batch = {k: np.array(table.column(k).to_pylist() if k != "messages" else
                         [np.array(x, dtype=object) for x in table.column(k).to_pylist()] + [None], dtype=object)[:2]
             for k in table.column_names}
    out = tok(batch)
    assert list(out["split"]) == ["train", "val"] and len(out["key"]) == 2
    want = tokenize_conversation(tok.tok, CHAT, 512, True)[0]
    assert out["input_ids"][0].tolist() == want[0] and out["labels"][0].tolist() == want[1]
    assert len(spans([l != IGNORE for l in want[1]])) == 2


def test_prompt_tokens_are_the_generation_prompt(toks):
    tok = toks["llama3"]
    assert prompt_tokens(tok, CHAT[:2]) == ids_of(tok.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=True))


def test_show_examples_marks_the_trained_part_of_a_prepared_row(tmp_path):
    """`adapters prepare --show-examples N`: a multi-turn row as trained, the answers between ⟦ ⟧."""
    from pipeline.cli import _parser
    from pipeline.prepare import run_prepare
    from pipeline.storage import open_store
    from pipeline.train.preview import show_examples
    base = build("chatml", tmp_path)
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps({"messages": CHAT}) + "\n")
    cfg = load_config(None, sets=[f"model.base={base}", "resources.device=cpu", "data.split={train: 1.0, val: 0.0, test: 0.0}",
                                  "data.custom_sources=[" + json.dumps({"name": "mine", "domain": "law", "path": str(f)}) + "]"],
                      output=str(tmp_path / "out"), domains=["law"], environ={})
    run_prepare(cfg, use_ray=False)
    [text] = show_examples(cfg, open_store(cfg), 3)
    assert text.startswith("<|im_start|>system\nYou are a helpful support agent.<|im_end|>\n<|im_start|>user\nMy router")
    assert "<|im_start|>assistant\n⟦Unplug it for thirty seconds, then plug it back in.<|im_end|>⟧\n<|im_start|>user\nStill red." in text
    assert text.count("⟦") == 2 and "⟦Then call your provider: the line may be down.<|im_end|>⟧\n" in text
    assert _parser().parse_args(["prepare", "--config", "x.yaml", "--show-examples", "3"]).show_examples == 3
