"""`adapters generate` refuses what it cannot do with one line and exit 2, not a traceback labelled "a bug":
--max-new-tokens 0, negative or huge (over 4096, or over the model's context), an empty prompt, and an
adapter trained on another base model (a size mismatch). In-process `main()` on tiny models built here."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.cli import main

from ..fixtures_train import tiny_config, write_sft

pytestmark = pytest.mark.timeout(300)


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    rc = main(list(argv))
    err = capsys.readouterr().err.splitlines()
    return rc, [ln for ln in err if ln.startswith("error:") or "bug" in ln or "Traceback" in ln]


@pytest.mark.parametrize("n", ["0", "-5", "100000000"])
def test_max_new_tokens_out_of_range_is_one_line_exit_2(tmp_path, capsys, n):
    rc, lines = run(capsys, "generate", "--output", str(tmp_path), "--domain", "debate", "--max-new-tokens", n, "hello")
    assert rc == 2 and lines == [f"error: --max-new-tokens {n}: give a number from 1 to 4096"]


@pytest.mark.parametrize("prompts", [[""], ["ok", "   "]])
def test_an_empty_prompt_is_refused(tmp_path, capsys, prompts):
    rc, lines = run(capsys, "generate", "--output", str(tmp_path), "--domain", "debate", *prompts)
    assert rc == 2 and len(lines) == 1 and f"prompt {len(prompts)} is empty" in lines[0]


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory):
    """Output A: a tiny base (hidden 64) and a debate adapter trained on another tiny base (hidden 128)."""
    from peft import LoraConfig, get_peft_model
    from pipeline.storage import Store
    from pipeline.lm.model import load_model, resolve_base
    from pipeline.lm.tiny import ensure_tiny
    outs = {}
    for name, hidden in (("a", 64), ("b", 128)):
        out = tmp_path_factory.mktemp(f"gen-{name}")
        cfg = tiny_config(str(out), model__tiny__pretrain_steps=0, model__tiny__hidden_size=hidden,
                          model__quantization="none")
        store = Store(str(out))
        write_sft(store, domains=["debate"], n=(20, 5, 5))
        ensure_tiny(cfg, store)
        outs[name] = (out, cfg, store)
    out_a, cfg_a, store_a = outs["a"]
    _, cfg_b, store_b = outs["b"]
    other = load_model(resolve_base(cfg_b, store_b), cfg_b, "cpu")
    peft = get_peft_model(other, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(str(out_a / "adapters" / "debate"))
    store_a.write_json("adapters/debate/training_report.json", {
        "status": "finished", "base_model": "tiny (hidden 128)", "device": "cpu",
        "compat": {"model.base": "tiny", "model.quantization": "none", "train.max_seq_length": 128,
                   "train.chat_template": "auto"}})
    return out_a


def test_an_adapter_of_another_base_is_named_not_a_traceback(two_bases, capsys):
    rc, lines = run(capsys, "generate", "--output", str(two_bases), "--domain", "debate", "--max-new-tokens", "4",
                    "What is a debate?")
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: the debate adapter") and "was trained on another base model" in lines[0]
    assert "size mismatch" in lines[0] and "use the base it was trained on" in lines[0]


def test_max_new_tokens_over_the_model_context_is_refused(two_bases, capsys):
    # the tiny base's context: 256 positions (tiny_config)
    rc, lines = run(capsys, "generate", "--output", str(two_bases), "--base", "--max-new-tokens", "1000", "What is a debate?")
    assert rc == 2 and lines == ["error: --max-new-tokens 1000 does not fit the model's context of 256 tokens: use at most 240"]
