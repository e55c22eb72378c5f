"""Your data in the formats people have, through the CLI as a user runs it: a ShareGPT file, an OpenAI-
messages file (system turn and two turns), an Alpaca file with input, and a local dataset folder laid
out as on the Hugging Face Hub (a subset and a split) prepare and train (tiny model, CPU, Ray); a
source that keeps nothing fails prepare with its reason (fixtures/custom/formats/)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parents[2]
FORMATS = ROOT / "fixtures" / "custom" / "formats"


def _config(tmp: Path, sources: list[dict], **train) -> Path:
    cfg = {
        "run_name": "formats", "output": str(tmp / "out"), "domains": ["support"], "seed": 42,
        "data": {"raw_dir": str(ROOT / "fixtures" / "raw"), "sources": [], "custom_sources": sources,
                 "download": {"offline": True}},
        "model": {"base": "tiny", "quantization": "nf4",
                  "tiny": {"vocab_size": 600, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "pretrain_steps": 5}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_seq_length": 256, "tokens_per_micro_batch": 1024, "max_steps": 4, "warmup_steps": 1,
                  "eval_every": 4, "checkpoint_every": 4, "log_every": 2, "gradient_checkpointing": False, **train},
        "eval": {"generation_samples": 2, "side_by_side": 1, "max_new_tokens": 8},
        "resources": {"device": "cpu", "cpus_per_trial": 1, "max_concurrent_trials": 1},
    }
    path = tmp / "formats.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _adapters(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, capture_output=True, text=True, timeout=900)


SOURCES = [
    {"name": "support_sharegpt", "domain": "support", "path": str(FORMATS / "support_sharegpt.jsonl"), "format": "sharegpt"},
    {"name": "support_openai", "domain": "support", "path": str(FORMATS / "support_openai.jsonl")},   # detected
    {"name": "translate_alpaca", "domain": "support", "path": str(FORMATS / "translate_alpaca.json"), "format": "alpaca"},
    {"name": "berths", "domain": "support", "path": str(FORMATS / "hub_dataset"), "subset": "fr", "split": "train"},
]


def test_four_formats_prepare_and_train_through_the_cli(tmp_path):
    cfg = _config(tmp_path, SOURCES)
    r = _adapters("run", "--config", str(cfg), "--show-examples", "1")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "support_openai: format not set; assumed openai" in out
    assert "⟦" in out and "⟧" in out                      # --show-examples marks the trained part
    m = json.loads((tmp_path / "out" / "data" / "manifest.json").read_text())
    kept = {n: (m["sources"][n]["kept"], m["sources"][n]["quarantined"]) for n in (s["name"] for s in SOURCES)}
    assert kept == {"support_sharegpt": (24, 0), "support_openai": (24, 0), "translate_alpaca": (30, 0), "berths": (24, 0)}
    assert [f["path"] for f in m["sources"]["berths"]["files"]] == ["custom/berths/fr/train-00000-of-00001.parquet"]
    rows = [r for f in sorted((tmp_path / "out" / "data" / "sft" / "support").glob("*/*.parquet"))
            for r in pq.read_table(f).to_pylist()]
    chats = [r for r in rows if r["source"] in ("support_sharegpt", "support_openai")]
    assert chats and all([t["role"] for t in r["messages"]] == ["system", "user", "assistant", "user", "assistant"]
                         for r in chats)
    alpaca = [r["messages"][0]["content"] for r in rows if r["source"] == "translate_alpaca"]
    assert len(set(alpaca)) == 30 and all(a.startswith("Translate to French\n\n") for a in alpaca)
    assert (tmp_path / "out" / "adapters" / "support" / "adapter_model.safetensors").is_file()
    # the adapter ships the template it was trained with (the tiny tokenizer has none of its own)
    from transformers import AutoTokenizer
    from pipeline.lm.model import DEFAULT_CHAT_TEMPLATE
    assert AutoTokenizer.from_pretrained(tmp_path / "out" / "adapters" / "support").chat_template == DEFAULT_CHAT_TEMPLATE


def test_a_source_that_keeps_nothing_fails_prepare_with_its_reason(tmp_path):
    wrong = dict(SOURCES[0], format="openai")           # ShareGPT records read as OpenAI messages
    r = _adapters("prepare", "--config", str(_config(tmp_path, [wrong, SOURCES[1]])))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-4000:]
    assert "support_sharegpt: kept 0 of 24 records (24 quarantined)" in out
    assert "missing_field: 24 (e.g. custom/support_sharegpt/support_sharegpt.jsonl line 1: no column 'messages'" in out
    assert "fix the mapping in data.custom_sources[support_sharegpt]" in out
    assert not (tmp_path / "out" / "data" / "_SUCCESS").exists()
