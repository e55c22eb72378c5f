"""What a checkpoint must agree on to be resumed (base model, LoRA shape, data layout), one record that
the training's resume check and the evaluation's matrix fingerprint (the base model and the prompt format
it scores with) both take.

    compat_record(cfg, domain) -> {"model.base": ..., "lora.r": ..., "train.max_seq_length": ..., ...}
"""
from __future__ import annotations

from pipeline.lm.tiny import tiny_fingerprint


def compat_record(cfg, domain: str) -> dict:
    """What a checkpoint must agree on to be resumed: base model, LoRA shape, data layout."""
    h = cfg.hyper_for(domain)
    t = cfg.train
    rec = {"model.base": cfg.model.base, "model.revision": cfg.model.revision,
           "model.quantization": cfg.model.quantization,
           "lora.r": h.lora.r, "lora.alpha": h.lora.alpha, "lora.target_modules": h.lora.target_modules,
           "train.max_seq_length": t.max_seq_length, "train.tokens_per_micro_batch": h.tokens_per_micro_batch,
           "train.grad_accum": h.grad_accum, "train.packing": t.packing, "train.mask_prompt": t.mask_prompt,
           "train.chat_template": t.chat_template, "train.seed": t.seed}
    if cfg.model.base == "tiny":
        rec["model.tiny"] = tiny_fingerprint(cfg)   # model.tiny and the texts it was built from
    return rec
