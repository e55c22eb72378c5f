"""What a checkpoint must agree on to be resumed (base model, LoRA shape, data layout), one record that
the training's resume check and the evaluation's matrix fingerprint (the base model and the prompt format
it scores with) both take.

    compat_record(cfg, domain) -> {"model.base": ..., "lora.r": ..., "train.max_seq_length": ..., ...}
"""
from __future__ import annotations

from typing import Optional

from pipeline.lm.tiny import tiny_fingerprint

# the train.* settings a checkpoint's tensors and data position depend on (with the per-domain hyperparameters
# below); pipeline/train/identity.py's settings fingerprint takes the same keys
TRAIN_KEYS = ("max_seq_length", "packing", "mask_prompt", "chat_template", "seed")


def compat_record(cfg, domain: str, tiny: Optional[str] = None) -> dict:
    """What a checkpoint must agree on to be resumed: base model, LoRA shape, data layout. `tiny`: the tiny
    base's fingerprint when the caller has it (else computed: model.tiny and the texts it was built from)."""
    h = cfg.hyper_for(domain)
    t = cfg.train
    rec = {"model.base": cfg.model.base, "model.revision": cfg.model.revision,
           "model.quantization": cfg.model.quantization,
           "lora.r": h.lora.r, "lora.alpha": h.lora.alpha, "lora.target_modules": h.lora.target_modules,
           "train.tokens_per_micro_batch": h.tokens_per_micro_batch, "train.grad_accum": h.grad_accum,
           **{f"train.{k}": getattr(t, k) for k in TRAIN_KEYS}}
    if cfg.model.base == "tiny":
        rec["model.tiny"] = tiny if tiny is not None else tiny_fingerprint(cfg)
    return rec
