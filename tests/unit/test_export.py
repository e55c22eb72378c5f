"""Adapters that load anywhere: adapter_config.json as serving engines read it (module names, the base's
id, nothing vLLM refuses), a Hugging Face model card next to each adapter, the merged export in bf16."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import sft_rows, tiny_config, write_sft  # noqa: E402

from pipeline.storage import Store  # noqa: E402
from pipeline.lm.serving import config_serving_warnings, serving_problems  # noqa: E402
from pipeline.train.export import portable_adapter_config  # noqa: E402

ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny domain trained (2 steps, no Ray) and exported: (cfg, store, output dir)."""
    from pipeline.lm.data import Example, tokenize_conversation
    from pipeline.train.loop import train_domain
    from pipeline.train.sessions import LocalSession
    from pipeline.lm.model import load_tokenizer, resolve_base
    from pipeline.lm.tiny import ensure_tiny
    tmp = tmp_path_factory.mktemp("export")
    store = Store(str(tmp))
    write_sft(store, domains=["debate"], n=(16, 4, 4))
    store.write_json("data/manifest.json", {"sources": {"debatesum": {"domain": "debate", "kept": 16, "sft_examples": 16}}})
    cfg = tiny_config(str(tmp), domains=["debate"], model__tiny__pretrain_steps=0, train__max_steps=2)
    ensure_tiny(cfg, store)
    tok = load_tokenizer(resolve_base(cfg, store), cfg)
    ex = [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", 16, 1)]
    train_domain(cfg, "debate", {"train": ex[:12], "val": ex[12:14], "test": ex[14:]}, LocalSession(str(tmp / "ck")))
    return cfg, store, tmp


def test_adapter_config_names_modules_and_the_base(trained):
    cfg, store, tmp = trained
    ac = json.loads((tmp / "adapters/debate/adapter_config.json").read_text())
    assert ac["target_modules"] == ALL_LINEAR              # names, not model.layers.0.self_attn.q_proj
    assert ac["base_model_name_or_path"] == store.uri_of("base_model")
    assert not ac.get("modules_to_save")
    assert serving_problems(ac) == []
    assert store.read_json("adapters/debate/training_report.json")["serving_problems"] == []


def test_exported_adapter_loads_with_peft_on_the_same_layers(trained):
    """The names select exactly the layers that were trained: peft puts LoRA on the same 14 layers."""
    from peft import PeftModel
    from pipeline.lm.model import load_model, resolve_base
    cfg, store, tmp = trained
    base = load_model(resolve_base(cfg, store), cfg, "cpu", quantize=False)
    m = PeftModel.from_pretrained(base, str(tmp / "adapters/debate"))
    adapted = [n for n, mod in m.get_base_model().named_modules() if hasattr(mod, "lora_A")]
    assert len(adapted) == 2 * len(ALL_LINEAR)
    assert sorted({n.rsplit(".", 1)[-1] for n in adapted}) == ALL_LINEAR


def test_model_card_in_hugging_face_format(trained):
    cfg, store, tmp = trained
    text = (tmp / "adapters/debate/README.md").read_text()
    assert text.startswith("---\n")
    head = yaml.safe_load(text.split("---\n")[1])
    assert head["base_model"] == store.uri_of("base_model") and head["library_name"] == "peft"
    assert "Hellisotherpeople/DebateSum" in head["datasets"] and "debate" in head["tags"] and head["license"]
    rep = store.read_json("adapters/debate/training_report.json")
    assert f"| loss | {rep['val_loss']:.4f} | {rep['base_val_loss']:.4f} |" in text
    assert "| debatesum |" in text and "| 16 | 16 |" in text          # the data card line, from the manifest
    assert "PeftModel.from_pretrained" in text and "vllm serve" in text and "--lora-modules debate=" in text


def test_merged_export_is_bf16_at_half_the_size(trained):
    import torch
    from safetensors import safe_open
    from pipeline.train.export import export_merged
    cfg, store, tmp = trained
    export_merged(cfg, "debate", store)
    f = tmp / "adapters/debate/merged/model.safetensors"
    with safe_open(str(f), "pt") as s:
        tensors = {k: s.get_tensor(k) for k in s.keys()}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    n_params = sum(t.numel() for t in tensors.values())
    assert n_params * 2 <= f.stat().st_size < n_params * 2 + 64 * 1024   # 2 bytes a weight, plus the header


def test_serving_problems_name_what_vllm_refuses():
    ok = {"r": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    assert serving_problems(ok) == []
    assert "above vLLM's largest --max-lora-rank (512)" in serving_problems({**ok, "r": 1024})[0]
    assert "lm_head" in serving_problems({**ok, "target_modules": ["q_proj", "lm_head"]})[0]
    assert "modules_to_save" in serving_problems({**ok, "modules_to_save": ["embed_tokens"]})[0]
    assert "module paths" in serving_problems({**ok, "target_modules": ["model.layers.0.self_attn.q_proj"]})[0]
    assert "DoRA" in serving_problems({**ok, "use_dora": True})[0]


def test_config_warns_before_training(tmp_path):
    from pipeline.doctor import WARN, Report, check_serving
    cfg = tiny_config(str(tmp_path), lora={"r": 1024, "alpha": 16, "target_modules": ["q_proj", "lm_head"]},
                      domains=["debate"])
    w = config_serving_warnings(cfg)
    assert len(w) == 2 and all(x.startswith("debate: ") for x in w)
    rep = Report()
    check_serving(cfg, rep)
    assert rep.rows[0].status == WARN and "lora.r" in rep.rows[0].detail
    assert config_serving_warnings(tiny_config(str(tmp_path))) == []


def test_partial_targets_keep_their_paths():
    """Names that would select more layers than were trained are not written: the paths stay."""
    linear = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")] + ["lm_head"]
    adapted = ["model.layers.0.self_attn.q_proj"]
    out = portable_adapter_config({"target_modules": adapted, "r": 8}, linear, adapted, "org/base")
    assert out["target_modules"] == adapted and out["base_model_name_or_path"] == "org/base"
    every_q = [n for n in linear if n.endswith("q_proj")]
    assert portable_adapter_config({"target_modules": every_q}, linear, every_q, "b")["target_modules"] == ["q_proj"]


def test_preflight_warns_when_the_adapters_will_not_load_in_vllm(tmp_path, caplog):
    import logging
    from pipeline.doctor import preflight
    cfg = tiny_config(str(tmp_path), lora={"r": 1024, "alpha": 16}, domains=["debate"])
    with caplog.at_level(logging.WARNING, logger="pipeline.doctor"):
        preflight(cfg)
    assert any("will not load in vLLM" in r.getMessage() and "lora.r" in r.getMessage() for r in caplog.records)


def test_hub_upload_sends_the_adapter_folder_without_merged_weights(trained, monkeypatch):
    """What hub.repo_id receives (the Hub itself is not reachable here: an upload to a closed local port fails
    with the client's own error, before anything is sent)."""
    from pipeline.config import ConfigError, load_config
    from pipeline.train.export import hub_files, upload_to_hub
    cfg, store, tmp = trained
    d = tmp / "adapters/debate"
    (d / "training_report.previous.json").write_text("{}")
    files = hub_files(str(d))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "training_report.json",
            "tokenizer.json"} <= set(files)
    assert not any(f.startswith("merged/") or f == "training_report.previous.json" for f in files)
    (d / "training_report.previous.json").unlink()
    with pytest.raises(ConfigError, match=r"\{domain\}"):
        load_config(str(Path(__file__).resolve().parents[2] / "configs/demo.yaml"), sets=["hub.repo_id=org/one-repo"])
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    hub = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"repo_id": "org/tiny-{domain}"}),
                                 "data": cfg.data.model_copy(update={"download": cfg.data.download.model_copy(
                                     update={"hf_endpoint": "http://127.0.0.1:9"})})})
    with pytest.raises(Exception) as e:
        upload_to_hub(hub, "debate", store)
    assert "127.0.0.1" in str(e.value) or "onnect" in str(e.value)
