"""Adapters out: adapters/<domain>/ in PEFT format (adapter_config.json, adapter_model.safetensors),
the tokenizer files, a model card (README.md, the Hugging Face format) and training_report.json
(written last: it marks the adapter complete).

    export_adapter(model, tok, store, domain, report, cfg=None) -> adapter URI
    portable_adapter_config(d, module_names, base_model) -> the adapter_config.json serving engines load
    model_card(cfg, domain, report, manifest) -> README.md text
    export_merged(cfg, domain, store=None) -> URI of adapters/<domain>/merged/ (bf16; refuses NaN/inf)
    hub_files(local_dir) / upload_to_hub(cfg, domain, store) -> what hub.repo_id receives, and the upload

Serving engines (vLLM, Ray Serve LLM, text-generation-inference) read `target_modules` as module
*names* (q_proj, v_proj, ...) matched against their own layer names; peft 0.21 saves "all-linear" as the
fully qualified path of every adapted layer (model.layers.0.self_attn.q_proj, ...), which they do not
match. The export writes the names when they select exactly the same layers (else it keeps the paths and
the training report and model card say the adapter may not load there).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Optional

from pipeline import layout
from pipeline.lm.model import load_adapter_onto, load_model, load_tokenizer, resolve_base
from pipeline.lm.serving import VLLM_LORA_RANKS, serving_problems
from pipeline.sources import selected_sources
from pipeline.storage import open_store

log = logging.getLogger(__name__)


class NonFiniteWeightsError(RuntimeError):
    pass


def _check_finite(named_tensors, what: str) -> None:
    import torch
    bad = [n for n, t in named_tensors if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteWeightsError(f"{what} holds NaN/inf values in {len(bad)} tensor(s) (e.g. {bad[0]}); "
                                    "refusing to export it. Lower train.learning_rate and train again.")


# ---- portability ------------------------------------------------------------------------------------

def portable_adapter_config(d: dict, linear_names: list[str], adapted: list[str], base_model: str) -> dict:
    """`d` (adapter_config.json) with target_modules as module names when those names select exactly the
    `adapted` layers among the base's `linear_names`, and base_model_name_or_path = `base_model`."""
    out = dict(d, base_model_name_or_path=base_model)
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = sorted(n for n in linear_names if n.rsplit(".", 1)[-1] in short)
    if adapted and selected == sorted(adapted):
        out["target_modules"] = short
    elif isinstance(d.get("target_modules"), str):   # a regex or "all-linear": leave it to peft
        pass
    else:
        out["target_modules"] = sorted(adapted)
    return out


def _dataset_ids(cfg, domain: str) -> list[str]:
    return sorted({p.repo for s in selected_sources(cfg) if s.domain == domain for p in s.parts
                   if p.kind == "hf" and p.repo})


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else ("–" if x is None else str(x))


def model_card(cfg, domain: str, report: dict, manifest: Optional[dict], adapter_config: dict) -> str:
    """README.md for adapters/<domain>/ in the Hugging Face model card format."""
    base = adapter_config.get("base_model_name_or_path") or cfg.model.base
    datasets = _dataset_ids(cfg, domain)
    srcs = [s for s in selected_sources(cfg) if s.domain == domain]
    msrc = (manifest or {}).get("sources") or {}
    head = {"base_model": base, "library_name": "peft", "license": "other",
            "license_name": "see-training-data", "datasets": datasets,
            "tags": ["lora", "qlora" if cfg.model.quantization == "nf4" else "lora-fp", "peft", domain,
                     "domain-adapters"], "pipeline_tag": "text-generation"}
    import yaml
    n = report.get("n_examples") or {}
    # the base model's test figures are the evaluation stage's (eval/matrix.json), made after training
    rows = [("loss", report.get("val_loss"), report.get("base_val_loss"), report.get("test_loss")),
            ("perplexity", report.get("val_ppl"), report.get("base_val_ppl"), report.get("test_ppl"))]
    table = ["| metric | val (adapter) | val (base) | test (adapter) |", "| --- | --- | --- | --- |"]
    table += [f"| {r[0]} | " + " | ".join(_fmt(x) for x in r[1:]) + " |" for r in rows]
    data = ["| source | license | records kept | SFT examples |", "| --- | --- | --- | --- |"]
    for s in srcs:
        m = msrc.get(s.name) or {}
        data.append(f"| {s.name} | {s.license} | {_fmt(m.get('kept'))} | {_fmt(m.get('sft_examples'))} |")
    problems = serving_problems(adapter_config)
    tm = adapter_config.get("target_modules")
    modules = ", ".join(tm) if isinstance(tm, list) else str(tm)
    serve = ("It loads in vLLM's multi-LoRA serving as it is." if not problems else
             "vLLM will not load it as it is: " + "; ".join(problems) + ".")
    max_rank = next(r for r in VLLM_LORA_RANKS if r >= (adapter_config.get("r") or 1)) if not problems else None
    return f"""---
{yaml.safe_dump(head, sort_keys=False).strip()}
---

# {domain} adapter for {base}

A LoRA adapter (rank {adapter_config.get('r')}, alpha {adapter_config.get('lora_alpha')}, on {modules}) trained by
domain-adapters on the {domain} domain's prompt/response examples
({n.get('train', '–')} train, {n.get('val', '–')} val, {n.get('test', '–')} test), {report.get('steps', '–')} steps;
the weights exported are those of step {report.get('exported_step', '–')} ({report.get('export_reason', '')}).

## Evaluation

Mean token loss on the held-out splits, the adapter against its base model:

{chr(10).join(table)}

The run's evaluation (report/summary.html, eval/matrix.json) has the base model's test loss and the task metrics
(accuracy, ROUGE-L, F1) of both, with intervals.

## Training data

{chr(10).join(data)}

The adapter inherits the terms of this data and of the base model: check both before you use it.

## Use

With peft:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained("{base}", dtype="bfloat16")
model = PeftModel.from_pretrained(base, "<this folder>")
tok = AutoTokenizer.from_pretrained("<this folder>")
```

With vLLM (OpenAI-compatible server; the request's `model` picks the adapter). {serve}

```bash
vllm serve {base} --enable-lora --max-lora-rank {max_rank or 'N'} --lora-modules {domain}=<this folder>
```

Every domain from one base, with this project: `adapters serve --output <the run's output>` (docs/SERVING.md).
"""


# ---- export -----------------------------------------------------------------------------------------

def _adapted_layers(model) -> tuple[list[str], list[str]]:
    """(every nn.Linear-like layer of the base, the layers carrying LoRA), as names relative to the base model."""
    import torch
    base = model.get_base_model()
    linear, adapted = [], []
    for name, mod in base.named_modules():
        if hasattr(mod, "lora_A"):
            adapted.append(name)
            linear.append(name)
        elif isinstance(mod, torch.nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            if not any(name.startswith(a + ".") for a in adapted):
                linear.append(name)
    return linear, adapted


def export_adapter(model, tok, store, domain: str, report: dict, cfg=None) -> str:
    from peft import get_peft_model_state_dict
    _check_finite(get_peft_model_state_dict(model).items(), f"the {domain} adapter")
    rel = layout.adapter(domain)
    if store.exists(layout.training_report(domain)):
        store.delete(layout.training_report(domain))  # not complete until rewritten below
    with tempfile.TemporaryDirectory(prefix="adapter-") as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        path = os.path.join(d, "adapter_config.json")
        with open(path) as f:
            ac = json.load(f)
        base = (store.uri_of(layout.TINY_BASE) if cfg.model.base == "tiny" else cfg.model.base) if cfg is not None \
            else ac.get("base_model_name_or_path")
        ac = portable_adapter_config(ac, *_adapted_layers(model), base_model=base)
        with open(path, "w") as f:
            json.dump(ac, f, indent=2, sort_keys=True)
        problems = serving_problems(ac)
        report["serving_problems"] = problems
        for p in problems:
            log.warning("domain %s: adapter not servable by vLLM as exported: %s", domain, p)
        if cfg is not None:
            with open(os.path.join(d, "README.md"), "w") as f:
                f.write(model_card(cfg, domain, report, store.read_json_or(layout.MANIFEST), ac))
        store.upload_dir(d, rel)
    uri = store.uri_of(rel)
    store.write_json(layout.training_report(domain), {**report, "adapter_uri": uri})
    return uri


def load_adapter_model(cfg, domain: str, device: str = "cpu", quantize=None, store=None, dtype=None):
    """The base model with adapters/<domain>/ applied (PeftModel.from_pretrained) and the tokenizer."""
    store = store or open_store(cfg)
    base = resolve_base(cfg, store)
    with store.local_copy(layout.adapter(domain)) as adir:
        model = load_adapter_onto(load_model(base, cfg, device, quantize=quantize, dtype=dtype), adir)
    return model, load_tokenizer(base, cfg)


def export_merged(cfg, domain: str, store=None) -> str:
    """Merge the adapter into the base weights in bfloat16 (half float32's size and memory; on the GPU when
    there is one) and write adapters/<domain>/merged/."""
    import torch
    store = store or open_store(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_adapter_model(cfg, domain, device, quantize=False, store=store, dtype=torch.bfloat16)
    merged = model.merge_and_unload()
    _check_finite(merged.state_dict().items(), f"the merged {domain} model")
    with tempfile.TemporaryDirectory(prefix="merged-") as d:
        merged.save_pretrained(d)
        tok.save_pretrained(d)
        return store.upload_dir(d, layout.merged(domain))


# ---- the Hugging Face Hub -------------------------------------------------------------------------------

# left out of an upload: the merged weights (a model of their own) and the report of an earlier training
HUB_IGNORE = ("merged/*", "training_report.previous.json")


def hub_files(local_dir: str) -> list[str]:
    """The files of an adapter folder that hub.repo_id receives (relative paths, sorted)."""
    import fnmatch
    out = []
    for root, _, files in os.walk(local_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), local_dir).replace(os.sep, "/")
            if not any(fnmatch.fnmatch(rel, p) for p in HUB_IGNORE):
                out.append(rel)
    return sorted(out)


def upload_to_hub(cfg, domain: str, store) -> str:
    """Create hub.repo_id for the domain (exist_ok) and upload its adapter folder; returns the repo id."""
    from huggingface_hub import HfApi
    repo = cfg.hub.repo_id.format(domain=domain)
    rep = store.read_json(layout.training_report(domain))
    api = HfApi(endpoint=cfg.data.download.hf_endpoint)
    api.create_repo(repo, private=cfg.hub.private, exist_ok=True, repo_type="model")
    with store.local_copy(layout.adapter(domain)) as local:
        api.upload_folder(repo_id=repo, folder_path=local, ignore_patterns=list(HUB_IGNORE), repo_type="model",
                          commit_message=f"{domain} adapter: step {rep.get('exported_step')}, val loss {rep.get('val_loss'):.4f}")
    return repo
