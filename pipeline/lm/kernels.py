"""The fast paths of one training step, chosen once per worker, each with a plain fallback.

    prepare_for_kbit(model, gradient_checkpointing)  freeze the base, checkpointing without fp32 upcasts
    set_checkpointed_layers(model, keep_last)        leave the last N decoder layers un-checkpointed
    plan_checkpointing(model, train, mem, tokens)    checkpoint_keep_last: N layers kept, or 'auto' (CheckpointBudget):
                                                     as many as the memory budget allows, measured
    apply_fused_kernels(model, device, mode)         Liger RMSNorm / SwiGLU on CUDA when installed (this instance only),
                                                     RoPE by device (CUDA tensors: Liger; others: the original)
    set_sequence_multiple(model, 128)                flex attention: widen short micro-batches
    loss_sum(model, batch, device, fused)            summed cross-entropy over the target tokens
    head_logits(lm, h)                               the LM head with the architecture's logit scaling / soft-capping

Measured on an H100 (bench/NOTES.md): flex attention over packed examples was 2.25x SDPA with a
block mask; Liger's kernels +26% and -27% peak memory; computing the LM head only on target
tokens with a fused linear cross-entropy never materialises the (tokens x vocab) fp32 logits.
On the CPU (CI, the demo) none of these apply and the plain paths run.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger(__name__)


def prepare_for_kbit(model, gradient_checkpointing: bool):
    """What peft's prepare_model_for_kbit_training does, minus its fp32 upcast of every
    non-quantized weight: the upcast puts the embedding and the LM head in fp32 (a 7B model's head
    matmul then runs in fp32, ~20% of a step on an H100). Norms and head stay in the compute dtype,
    as the base model was trained."""
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing on every decoder layer (transformers 5.17 and later)."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def decoder_layers(model) -> list:
    """The decoder layers of a (PEFT-wrapped) causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    dec = lm.get_decoder() if hasattr(lm, "get_decoder") else getattr(lm, "model", lm)
    layers = getattr(dec, "layers", None)
    return list(layers) if layers is not None else []


def _checkpointable(model) -> list:
    return [layer for layer in decoder_layers(model) if hasattr(layer, "gradient_checkpointing")]


def kept_layers(model) -> int:
    """Decoder layers that keep their activations (not checkpointed)."""
    return sum(1 for layer in _checkpointable(model) if not layer.gradient_checkpointing)


def set_checkpointed_layers(model, keep_last: int) -> int:
    """With gradient checkpointing on, keep the activations of the last `keep_last` decoder layers
    (spend spare memory on speed: each such layer saves its recompute) and checkpoint the others.
    Returns how many layers are checkpointed."""
    layers = _checkpointable(model)
    n = len(layers)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n - keep_last
    return sum(1 for layer in layers if layer.gradient_checkpointing)


class CudaMemory:
    """Allocated / peak memory of one CUDA device; the peaks survive the per-step resets."""

    def __init__(self, device):
        self.device = device
        self.overall_alloc = self.overall_reserved = 0

    def allocated(self) -> int:
        import torch
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        import torch
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        import torch
        self.overall_alloc = max(self.overall_alloc, torch.cuda.max_memory_allocated(self.device))
        self.overall_reserved = max(self.overall_reserved, torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)

    def total_gb(self) -> float:
        import torch
        return torch.cuda.get_device_properties(self.device).total_memory / 2**30

    def overall(self) -> tuple[int, int]:
        import torch
        return (max(self.overall_alloc, torch.cuda.max_memory_allocated(self.device)),
                max(self.overall_reserved, torch.cuda.max_memory_reserved(self.device)))


def effective_budget_gb(configured: float, device_total_gb: float) -> float:
    """train.memory_budget_gb, but never more than 85% of the device (a 20 GB default on a 16 GB card
    would otherwise keep layers until it ran out of memory)."""
    return min(configured, 0.85 * device_total_gb)


class CheckpointBudget:
    """checkpoint_keep_last 'auto': keep as many decoder layers' activations as the memory budget
    allows, measured on the device rather than estimated from the architecture.

    Step 1 (the optimizer state is allocated in it) and step 2 run with every layer checkpointed: step
    2's peak is P0. Step 3 keeps `probe` layers. What a kept layer costs, c, is read where it is all
    alive, at the end of the first micro-batch's forward (memory allocated there, step 3 minus step 2,
    over `probe`). At any later moment a kept layer adds at most c to what the all-checkpointed step
    held then, so from step 4 on k = floor((budget - margin - P0) / c) layers are kept and the peak
    stays under the budget. (Peaks alone would not do: the all-checkpointed peak comes late in the
    backward, after the kept layers have been freed, so peak differences under-measure c.)
    Memory that grows with the micro-batch is scaled to the widest one the run can produce
    (rows x max_seq_length). Step 4's peak is checked against the budget, and k lowered if over."""

    MARGIN = 0.5 * 2**30

    def __init__(self, model, budget_gb: float, mem, max_tokens: int, probe: int = 2):
        self.model, self.mem, self.max_tokens = model, mem, max_tokens
        self.budget = budget_gb * 2**30
        self.n = len(_checkpointable(model))
        self.probe = min(probe, self.n)
        self.phase = "warmup" if self.n else "done"
        self.p0, self.fe0, self.fe, self.per_layer, self.static = None, None, None, None, 0
        set_checkpointed_layers(model, 0)

    @property
    def keep(self) -> int:
        return kept_layers(self.model)

    def _scaled(self, value: int, tokens: int) -> float:
        return self.static + (value - self.static) * max(1.0, self.max_tokens / max(1, tokens))

    def before_step(self) -> None:
        if self.phase == "done":
            return
        self.static = self.mem.allocated()
        self.fe = None
        self.mem.reset_peak()

    def after_forward(self, micro_tokens: int) -> None:
        """Call once per step, after the first micro-batch's loss and before its backward."""
        if self.phase in ("base", "probe") and self.fe is None:
            self.fe = self._scaled(self.mem.allocated(), micro_tokens)

    def after_step(self, micro_tokens: int) -> None:
        """micro_tokens: the most (padded) tokens of one micro-batch in the step just taken."""
        if self.phase == "done":
            return
        peak = self._scaled(self.mem.peak(), micro_tokens)
        if self.phase == "warmup":
            self.phase = "base"
        elif self.phase == "base":
            self.p0, self.fe0 = peak, self.fe
            # a kept layer costs at most about the transient of a fully checkpointed step (which holds
            # one recomputed layer): probe only where that much room is left
            room, transient = self.budget - self.MARGIN - peak, max(peak - self.static, 1)
            self.probe = min(self.probe, int(room // transient)) if room > 0 else 0
            if self.probe <= 0 or self.fe0 is None:
                log.info("checkpointing: every layer checkpointed (%.1f GB peak leaves no room under the %.1f GB "
                         "budget to keep a layer)", peak / 2**30, self.budget / 2**30)
                self.phase = "done"
                return
            self._set(self.probe)
            self.phase = "probe"
        elif self.phase == "probe":
            self.per_layer = (self.fe - self.fe0) / self.probe if self.fe is not None else 0
            if self.per_layer <= 0:  # cannot measure here: stay with every layer checkpointed
                log.warning("checkpointing: could not measure a kept layer's memory; every layer stays checkpointed")
                self.per_layer = None
                self._set(0)
                self.phase = "done"
                return
            room = self.budget - self.MARGIN - self.p0
            self._set(max(0, min(self.n, int(room // self.per_layer))))
            log.info("checkpointing: %d of %d layers keep their activations (%.2f GB each; %.1f GB peak with all "
                     "checkpointed; budget %.1f GB)", self.keep, self.n, self.per_layer / 2**30, self.p0 / 2**30,
                     self.budget / 2**30)
            if self.p0 > self.budget:
                log.warning("peak memory %.1f GB is over train.memory_budget_gb (%.1f) with every layer checkpointed: "
                            "lower train.tokens_per_micro_batch", self.p0 / 2**30, self.budget / 2**30)
            self.phase = "check"
        elif self.phase == "check":
            if peak > self.budget and self.keep > 0:
                drop = int(-(-(peak - self.budget) // max(self.per_layer, 1))) + 1
                log.warning("checkpointing: peak %.1f GB over the %.1f GB budget: keeping %d layers instead of %d",
                            peak / 2**30, self.budget / 2**30, max(0, self.keep - drop), self.keep)
                self._set(max(0, self.keep - drop))
            else:
                self.phase = "done"

    def _set(self, keep: int) -> None:
        set_checkpointed_layers(self.model, keep)

    def record(self) -> dict:
        return {"budget_gb": self.budget / 2**30,
                "per_layer_gb": None if self.per_layer is None else round(self.per_layer / 2**30, 3),
                "all_checkpointed_peak_gb": None if self.p0 is None else round(self.p0 / 2**30, 3),
                "settled": self.phase == "done"}


def plan_checkpointing(model, train, mem, max_tokens: int) -> Optional[CheckpointBudget]:
    """Apply train.checkpoint_keep_last: an integer keeps that many layers; 'auto' returns the
    CheckpointBudget the loop steps through (CUDA), or keeps none (CPU: no device memory to spend)."""
    if not train.gradient_checkpointing:
        return None
    if train.checkpoint_keep_last != "auto":
        set_checkpointed_layers(model, train.checkpoint_keep_last)
        return None
    if mem is None:
        return None
    return CheckpointBudget(model, effective_budget_gb(train.memory_budget_gb, mem.total_gb()), mem, max_tokens)


def checkpointing_record(model, enabled: bool, budget: Optional[CheckpointBudget]) -> dict:
    """For the training report: how many decoder layers ran without checkpointing, and what the
    budget measured."""
    rec = {"enabled": enabled, "layers": len(_checkpointable(model)), "kept_layers": kept_layers(model) if enabled else None}
    return {**rec, **budget.record()} if budget else rec


def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
        import triton  # noqa: F401
        return True
    except Exception:
        return False


def apply_fused_kernels(model, device: str, mode: str = "auto") -> bool:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on the model instance (CUDA only). mode: auto (when
    installed and the architecture is supported), on (required), off. Returns True when applied."""
    if mode == "off" or not str(device).startswith("cuda"):
        if mode == "on" and not str(device).startswith("cuda"):
            raise RuntimeError("train.fused_kernels is 'on' but the device is not CUDA: set it to auto or off")
        return False
    if not liger_available():
        if mode == "on":
            raise RuntimeError("train.fused_kernels is 'on' but liger-kernel is not installed: "
                               "pip install 'domain-adapters[gpu]' (or set train.fused_kernels: auto)")
        log.info("liger-kernel not installed: plain kernels (pip install 'domain-adapters[gpu]' for the fused ones)")
        return False
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    mtype = getattr(lm.config, "model_type", None)
    if mtype not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if mode == "on":
            raise RuntimeError(f"train.fused_kernels is 'on' but Liger has no kernels for model type {mtype!r}")
        log.info("no fused kernels for model type %r: plain kernels", mtype)
        return False
    # Liger also swaps the classes and functions of the architecture's modeling module, which would
    # turn every later model of that architecture in this process (a CPU one too) into Triton kernels:
    # patch this instance only and put the module back. (RoPE is a module-level function: left plain.)
    import sys
    module = sys.modules[type(lm).__module__]
    saved = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=lm, rope=False, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    finally:
        for k, v in saved.items():
            if vars(module).get(k) is not v:
                setattr(module, k, v)
    rope = install_rope_dispatch(module, mtype)
    log.info("fused kernels (Liger RMSNorm, SwiGLU%s) applied to this %s model", ", RoPE on CUDA tensors" if rope else "", mtype)
    return True


# Architectures whose apply_rotary_pos_emb(q, k, cos, sin) is the plain rotate-half RoPE over the whole head
ROPE_ARCHS = {"llama", "mistral", "qwen2", "qwen3"}


def install_rope_dispatch(module, mtype: str) -> bool:
    """RoPE is a module-level function that the attention looks up at each call: replace it with one
    that sends CUDA tensors to Liger's fused kernel and everything else to the original, so a CPU model
    of the same architecture in this process is unaffected (the plain RoPE was ~6% of an all-linear
    7B step on an H100: two multiplies, a concatenation and an add per tensor, each way)."""
    orig = getattr(module, "apply_rotary_pos_emb", None)
    if mtype not in ROPE_ARCHS or orig is None:
        return False
    if getattr(orig, "_domain_adapters_rope", False):
        return True
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:
        return False

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if q.is_cuda and unsqueeze_dim == 1:
            return liger_rotary_pos_emb(q, k, cos, sin)
        return orig(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    apply_rotary_pos_emb._domain_adapters_rope = True
    apply_rotary_pos_emb.__wrapped__ = orig
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    return True


def set_sequence_multiple(model, multiple: int) -> None:
    """Pad each micro-batch's width up to a multiple of `multiple` in loss_sum. Flex attention needs
    >= 128 query positions: shorter ones go to its decoding kernel, which fails to compile for
    training on torch 2.11 (NoValidChoicesError), e.g. for a short last eval batch."""
    model._seq_multiple = int(multiple)


def pad_batch(batch: dict, multiple: int) -> dict:
    """Widen a collated batch to a multiple of `multiple`: the padding is a dummy trailing sequence
    (its own position ids from 0, no targets), so it is attended to by nothing real."""
    import torch
    width = batch["input_ids"].shape[1]
    extra = (-width) % multiple if multiple > 1 else 0
    if not extra:
        return batch
    B = batch["input_ids"].shape[0]
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].new_zeros((B, extra))], 1)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(extra).expand(B, extra).to(batch["position_ids"])], 1)
    out["targets"] = torch.cat([batch["targets"], batch["targets"].new_full((B, extra), -100)], 1)
    return out


def _head_is_plain(lm) -> bool:
    """A fused head needs logits = hidden @ W^T exactly: no soft-capping, scaling or bias."""
    c = lm.config
    head = lm.get_output_embeddings()
    return (head is not None and getattr(head, "bias", None) is None
            and not getattr(c, "final_logit_softcapping", None) and getattr(c, "logit_scale", None) in (None, 1, 1.0)
            and not hasattr(head, "base_layer"))  # a LoRA-wrapped head: use the module's own forward


def fused_loss_available(model, device: str, mode: str = "auto") -> bool:
    if mode == "off" or not str(device).startswith("cuda") or not liger_available():
        return False
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _head_is_plain(lm)


def loss_sum(model, batch: dict, device, fused: bool = False) -> Any:
    """Sum of token cross-entropies over the batch's target tokens (targets are pre-shifted).

    The LM head runs only on target tokens (prompt tokens and padding never reach it); with
    `fused` the head and the cross-entropy are one Liger kernel that never holds the logits."""
    import torch.nn.functional as F
    batch = pad_batch(batch, getattr(model, "_seq_multiple", 1))
    ids = batch["input_ids"].to(device, non_blocking=True)
    pos = batch["position_ids"].to(device, non_blocking=True)
    # the target positions are found where the batch was collated (the CPU): a boolean index on the
    # device would make the CPU wait for the whole forward before it could queue the head and backward
    flat = batch["targets"].reshape(-1)
    where = (flat != -100).nonzero().squeeze(1)
    y = flat[where].to(device, non_blocking=True)
    where = where.to(device, non_blocking=True)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(lm, "get_decoder") or lm.get_output_embeddings() is None:
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).index_select(0, where).float(), y, reduction="sum")
    hidden = lm.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
    if fused:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(lm.get_output_embeddings().weight, h, y)
    return F.cross_entropy(head_logits(lm, h).float(), y, reduction="sum")


def head_logits(lm, h) -> Any:
    """The LM head's logits for hidden states h, with the architecture's logit scaling and soft-capping
    (the evaluation's scoring uses this too)."""
    logits = lm.get_output_embeddings()(h)
    scale = getattr(lm.config, "logit_scale", None)
    if scale not in (None, 1, 1.0):
        logits = logits * scale
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = (logits / cap).tanh() * cap
    return logits
