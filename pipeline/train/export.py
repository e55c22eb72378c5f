"""Adapters out: adapters/<domain>/ in PEFT format (adapter_config.json, adapter_model.safetensors),
the tokenizer files and training_report.json (written last: it marks the adapter complete).

    export_adapter(model, tok, store, domain, report) -> adapter URI
    export_merged(cfg, domain, store=None) -> URI of adapters/<domain>/merged/ (refuses NaN/inf)
"""
from __future__ import annotations

import tempfile


class NonFiniteWeightsError(RuntimeError):
    pass


def _check_finite(named_tensors, what: str) -> None:
    import torch
    bad = [n for n, t in named_tensors if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteWeightsError(f"{what} holds NaN/inf values in {len(bad)} tensor(s) (e.g. {bad[0]}); "
                                    "refusing to export it. Lower train.learning_rate and train again.")


def export_adapter(model, tok, store, domain: str, report: dict) -> str:
    from peft import get_peft_model_state_dict
    _check_finite(get_peft_model_state_dict(model).items(), f"the {domain} adapter")
    rel = f"adapters/{domain}"
    if store.exists(f"{rel}/training_report.json"):
        store.delete(f"{rel}/training_report.json")  # not complete until rewritten below
    with tempfile.TemporaryDirectory(prefix="adapter-") as d:
        model.save_pretrained(d)
        tok.save_pretrained(d)
        store.upload_dir(d, rel)
    uri = store.uri_of(rel)
    store.write_json(f"{rel}/training_report.json", {**report, "adapter_uri": uri})
    return uri


def load_adapter_model(cfg, domain: str, device: str = "cpu", quantize=None, store=None):
    """The base model with adapters/<domain>/ applied (PeftModel.from_pretrained) and the tokenizer."""
    from pipeline.storage import open_store
    from pipeline.train.model import load_adapter_onto, load_model, load_tokenizer, resolve_base
    store = store or open_store(cfg)
    base = resolve_base(cfg, store)
    adir = _local_dir(store, f"adapters/{domain}")
    model = load_adapter_onto(load_model(base, cfg, device, quantize=quantize), adir)
    return model, load_tokenizer(base, cfg)


def _local_dir(store, rel: str) -> str:
    if not store.is_s3:
        return str(store.local_path(rel))
    d = tempfile.mkdtemp(prefix="adapter-")
    store.download_dir(rel, d)
    return d


def export_merged(cfg, domain: str, store=None) -> str:
    """Merge the adapter into full-precision base weights and write adapters/<domain>/merged/."""
    from pipeline.storage import open_store
    store = store or open_store(cfg)
    model, tok = load_adapter_model(cfg, domain, "cpu", quantize=False, store=store)
    merged = model.merge_and_unload()
    _check_finite(merged.state_dict().items(), f"the merged {domain} model")
    with tempfile.TemporaryDirectory(prefix="merged-") as d:
        merged.save_pretrained(d)
        tok.save_pretrained(d)
        return store.upload_dir(d, f"adapters/{domain}/merged")

