"""The engine behind `adapters serve` without Ray or HTTP: the base model once, two adapters on one
PeftModel, a mixed batch (each row through its own adapter, one generate call) giving each row what
`adapters generate` gives for that adapter alone (greedy); prompts as the adapters were trained."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import sft_rows, tiny_config, write_sft  # noqa: E402

from pipeline.storage import Store  # noqa: E402

DOMAINS = ["debate", "medicine"]


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    from pipeline.lm.data import Example, tokenize_conversation
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    from pipeline.lm.model import load_tokenizer, resolve_base
    from pipeline.lm.tiny import ensure_tiny
    tmp = tmp_path_factory.mktemp("serve")
    store = Store(str(tmp))
    write_sft(store, domains=DOMAINS, n=(16, 4, 4))
    cfg = tiny_config(str(tmp), domains=DOMAINS, model__tiny__pretrain_steps=0, train__max_steps=3,
                      train__learning_rate=0.02)
    ensure_tiny(cfg, store)
    tok = load_tokenizer(resolve_base(cfg, store), cfg)
    for d in DOMAINS:
        ex = [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows(d, 16, 1)]
        train_domain(cfg, d, {"train": ex[:12], "val": ex[12:14], "test": ex[14:]}, LocalSession(str(tmp / d)))
    return cfg


def test_mixed_adapter_batch_equals_each_adapter_alone(output):
    from pipeline.eval.generate import run_generate
    from pipeline.serve import AdapterModels
    cfg = output
    prompts = ["Argue the plan side on the judge of the warrant.", "Which dose fits a patient with fever?"]
    ref = {(r["model"], r["prompt"]): r["output"] for r in run_generate(cfg, prompts, DOMAINS, True, 12)}
    assert len(set(ref.values())) > 1
    engine = AdapterModels(cfg)
    assert engine.names() == ["base", "debate", "medicine"]
    items = [(m, p) for p in prompts for m in ("debate", "medicine", "base")]
    out = engine.generate([(m, engine.prompt([{"role": "user", "content": p}], 12), 12) for m, p in items])
    for (m, p), (text, n, reason) in zip(items, out):
        assert text == ref[(m, p)], (m, p)
        assert 0 < n <= 12 and reason in ("stop", "length")
    # a shorter budget in the same batch: a prefix of the same greedy answer
    short = engine.generate([("debate", engine.prompt([{"role": "user", "content": prompts[0]}], 12), 3),
                             ("medicine", engine.prompt([{"role": "user", "content": prompts[0]}], 12), 12)])
    assert short[0][1] <= 3 and short[1][0] == ref[("medicine", prompts[0])]


def test_chat_messages_follow_the_training_prompt_format(output):
    """A request's turns become exactly the ids training put before an answer to them: the chat template
    with its generation prompt (the system message in its own slot)."""
    from pipeline.serve import chat_prompt_ids
    from pipeline.lm.model import _ids, encode_conversation, load_tokenizer, resolve_base
    cfg = output
    tok = load_tokenizer(resolve_base(cfg), cfg)
    two = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it?"}]
    served = chat_prompt_ids(tok, two, 100)
    assert served == _ids(tok.apply_chat_template(two, add_generation_prompt=True, tokenize=True))
    ids, trained = encode_conversation(tok, two + [{"role": "assistant", "content": "Yes."}])[0]
    first = trained.index(True)
    assert ids[:first] == served and not any(trained[:first])
    assert chat_prompt_ids(tok, two, 4) == served[-4:]
    with pytest.raises(ValueError):
        chat_prompt_ids(tok, [{"role": "user", "content": 5}], 100)


def test_serve_refuses_domains_without_a_finished_adapter(output, capsys):
    from pipeline.cli import main
    rc = main(["serve", "--output", output.output, "--domains", "debate,law", "--port", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "no finished adapter for ['law']" in err and "finished: debate, medicine" in err
