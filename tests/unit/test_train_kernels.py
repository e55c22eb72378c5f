"""The step's fast-path plumbing on CPU: the head-on-targets loss equals the plain full-logits loss,
layer-selective checkpointing, and the kbit preparation that keeps weights in their dtype."""
import pytest
import torch

from pipeline.lm import kernels


def _tiny_lm(vocab=97, hidden=64, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 24), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)  # two packed examples per row
    tgt = torch.randint(3, 97, (2, 24), generator=g)
    tgt[:, :5] = -100        # a masked prompt
    tgt[:, 9] = -100         # no prediction across the example boundary
    return {"input_ids": ids, "position_ids": pos, "targets": tgt}


def test_loss_on_target_tokens_equals_full_logits_loss():
    import torch.nn.functional as F
    model = _tiny_lm()
    b = _batch()
    logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
    sel = b["targets"] != -100
    ref = F.cross_entropy(logits[sel].float(), b["targets"][sel], reduction="sum")
    got = kernels.loss_sum(model, b, "cpu", fused=False)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    # and the gradients agree
    ref.backward()
    g_ref = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    kernels.loss_sum(model, b, "cpu", fused=False).backward()
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight.grad, g_ref, rtol=1e-4, atol=1e-6)


def test_loss_through_peft_wrapper_and_no_fused_path_on_cpu():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(_tiny_lm(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    b = _batch()
    out = kernels.loss_sum(model, b, "cpu", fused=False)
    assert torch.isfinite(out) and out.item() > 0
    assert kernels.fused_loss_available(model, "cpu") is False
    assert kernels.apply_fused_kernels(model, "cpu", "auto") is False
    with pytest.raises(RuntimeError, match="not CUDA"):
        kernels.apply_fused_kernels(model, "cpu", "on")


def test_checkpointing_keep_last_layers():
    model = kernels.prepare_for_kbit(_tiny_lm(layers=4), gradient_checkpointing=True)
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # no dtype changes, only freezing
    assert kernels.set_checkpointed_layers(model, keep_last=0) == 4
    assert kernels.set_checkpointed_layers(model, keep_last=1) == 3
    layers = kernels.decoder_layers(model)
    assert [l.gradient_checkpointing for l in layers] == [True, True, True, False]


def test_padding_to_a_multiple_leaves_the_loss_unchanged():
    model = _tiny_lm()
    b = _batch()
    ref = kernels.loss_sum(model, b, "cpu")
    padded = kernels.pad_batch(b, 128)
    assert padded["input_ids"].shape == (2, 128) and (padded["targets"][:, 24:] == -100).all()
    assert padded["position_ids"][0, 24:].tolist() == list(range(104))
    kernels.set_sequence_multiple(model, 128)
    got = kernels.loss_sum(model, b, "cpu")
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert kernels.pad_batch(b, 1) is b


def test_fused_kernels_do_not_leak_into_the_modeling_module(monkeypatch):
    """Liger swaps module-level classes; ours must patch the instance only (a later CPU model of the
    same architecture in the process must stay plain). Simulated: a fake Liger entry point."""
    import sys
    import types
    from transformers.models.llama import modeling_llama
    before = modeling_llama.LlamaRMSNorm
    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")

    def apply(model, **kw):
        modeling_llama.LlamaRMSNorm = object  # what Liger does to the module
        model._patched = True
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply}
    fake._apply_liger_kernel_to_instance = lambda model, **kw: apply(model, **kw)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    monkeypatch.setattr(kernels, "liger_available", lambda: True)
    model = _tiny_lm()
    assert kernels.apply_fused_kernels(model, "cuda:0", "auto") is True
    assert model._patched and modeling_llama.LlamaRMSNorm is before


class _FakeMemory:
    """A device that behaves like a checkpointed step: at the end of the forward it holds
    static + fe + kept * per_layer; the all-checkpointed peak comes later in the backward (static +
    late), after kept layers are freed, so the step's peak is the larger of the two (x tokens)."""

    GB = 2 ** 30

    def __init__(self, model, static, fe, late, per_layer, tokens_fn):
        self.model, self.static, self.fe, self.late, self.per_layer, self.tokens_fn = \
            model, static * self.GB, fe * self.GB, late * self.GB, per_layer * self.GB, tokens_fn
        self.extra, self.resets, self.max_seen = 0, 0, 0

    def kept(self):
        return sum(1 for layer in kernels.decoder_layers(self.model) if not layer.gradient_checkpointing)

    def forward_end(self):
        return self.static + (self.fe + self.kept() * self.per_layer + self.extra) * self.tokens_fn()

    def allocated(self):
        return self.forward_end() if self.in_forward_end else self.static

    def reset_peak(self):
        self.resets += 1

    def peak(self):
        p = max(self.forward_end(), self.static + (self.late + self.extra) * self.tokens_fn())
        self.max_seen = max(self.max_seen, p)
        return p

    in_forward_end = False


def _steps(budget, mem, n, tokens=8192):
    kept = []
    for _ in range(n):
        budget.before_step()
        mem.in_forward_end = True
        budget.after_forward(tokens)
        mem.in_forward_end = False
        budget.after_step(tokens)
        kept.append(mem.kept())
    return kept


def test_checkpoint_budget_measures_then_keeps_what_fits():
    model = kernels.prepare_for_kbit(_tiny_lm(layers=32), gradient_checkpointing=True)
    width = {"tokens": 0.5}   # the first steps see half-width micro-batches: the budget scales them up
    mem = _FakeMemory(model, static=6, fe=2.0, late=2.8, per_layer=1.2, tokens_fn=lambda: width["tokens"])
    b = kernels.CheckpointBudget(model, budget_gb=20, mem=mem, max_tokens=8192)
    kept = _steps(b, mem, 2, tokens=4096)
    width["tokens"] = 1.0
    kept += _steps(b, mem, 4)
    # warm-up, base (all checkpointed), probe 2, then floor((20 - 0.5 - 8.8) / 1.2) = 8 layers kept;
    # the late all-checkpointed peak hides the probe's layers, so peaks alone would have kept 13 (23.6 GB)
    assert kept == [0, 2, 8, 8, 8, 8]
    assert mem.max_seen <= 20 * mem.GB
    rec = kernels.checkpointing_record(model, True, b)
    assert rec["kept_layers"] == 8 and rec["layers"] == 32 and rec["settled"] and rec["per_layer_gb"] == pytest.approx(1.2, rel=1e-3)
    assert rec["all_checkpointed_peak_gb"] == pytest.approx(8.8, rel=1e-3)
    assert mem.resets == 4        # no more resets once settled


def test_checkpoint_budget_lowers_when_over_and_skips_without_room():
    model = kernels.prepare_for_kbit(_tiny_lm(layers=16), gradient_checkpointing=True)
    mem = _FakeMemory(model, static=4, fe=1.5, late=2, per_layer=1, tokens_fn=lambda: 1.0)
    b = kernels.CheckpointBudget(model, budget_gb=14, mem=mem, max_tokens=8192)
    assert _steps(b, mem, 3)[-1] == 7           # floor((14 - 0.5 - 6) / 1)
    mem.extra = 3 * mem.GB                       # something else grew: the check step sees 15.5 GB
    kept = _steps(b, mem, 2)
    assert kept[0] < 7 and 4 + 1.5 + 3 + kept[0] <= 14 and kept[1] == kept[0]
    assert b.phase == "done"
    # a budget already spent with every layer checkpointed: no probe, nothing kept
    model2 = kernels.prepare_for_kbit(_tiny_lm(layers=4), gradient_checkpointing=True)
    mem2 = _FakeMemory(model2, static=18, fe=1.0, late=1.8, per_layer=1, tokens_fn=lambda: 1.0)
    b2 = kernels.CheckpointBudget(model2, budget_gb=20, mem=mem2, max_tokens=8192)
    assert _steps(b2, mem2, 4) == [0, 0, 0, 0] and b2.phase == "done"
    assert all(layer.gradient_checkpointing for layer in kernels.decoder_layers(model2))


def test_rope_dispatch_keeps_cpu_tensors_on_the_original(monkeypatch):
    """The RoPE replacement is module-level (the attention looks it up per call): CPU tensors must
    still get the original function, bit for bit; CUDA tensors go to the fused kernel."""
    import sys
    import types
    from transformers.models.llama import modeling_llama
    orig = modeling_llama.apply_rotary_pos_emb
    calls = []
    fake = types.ModuleType("liger_kernel.transformers.rope")
    fake.liger_rotary_pos_emb = lambda q, k, cos, sin: calls.append("fused") or (q, k)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.rope", fake)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", orig)
    assert kernels.install_rope_dispatch(modeling_llama, "llama") is True
    assert kernels.install_rope_dispatch(modeling_llama, "llama") is True   # once only
    wrapped = modeling_llama.apply_rotary_pos_emb
    assert wrapped is not orig and wrapped.__wrapped__ is orig
    q, k = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
    cos, sin = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    got = wrapped(q, k, cos, sin)
    ref = orig(q, k, cos, sin)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and calls == []
    # a CPU model run through the patched module gives the same logits as before
    model = _tiny_lm()
    b = _batch()
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", orig)
    plain = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", wrapped)
    assert torch.equal(model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits, plain)
    assert kernels.install_rope_dispatch(modeling_llama, "gemma") is False  # not a known plain-RoPE architecture


def test_effective_budget_never_exceeds_the_device():
    assert kernels.effective_budget_gb(20, 23.6) == 20            # RTX 3090: the default as configured
    assert kernels.effective_budget_gb(20, 15.7) == pytest.approx(0.85 * 15.7)   # a 16 GB card
    assert kernels.effective_budget_gb(60, 79.2) == 60            # H100: a raised budget is honoured


def test_plan_checkpointing_integer_auto_cpu_and_off():
    from types import SimpleNamespace as NS
    GB = 2 ** 30
    model = kernels.prepare_for_kbit(_tiny_lm(layers=4), gradient_checkpointing=True)
    t = NS(gradient_checkpointing=True, checkpoint_keep_last=1, memory_budget_gb=20)
    assert kernels.plan_checkpointing(model, t, None, 1024) is None
    assert kernels.checkpointing_record(model, True, None) == {"enabled": True, "layers": 4, "kept_layers": 1}
    t.checkpoint_keep_last = "auto"                      # CPU: nothing to measure, every layer checkpointed
    assert kernels.plan_checkpointing(model, t, None, 1024) is None
    mem = _FakeMemory(model, static=4, fe=1, late=1.5, per_layer=1, tokens_fn=lambda: 1.0)
    mem.total_gb = lambda: 16.0                          # a 16 GB card: the 20 GB default is capped at 13.6
    b = kernels.plan_checkpointing(model, t, mem, 1024)
    assert b.budget == pytest.approx(0.85 * 16 * GB)
    assert kernels.kept_layers(model) == 0
    t.gradient_checkpointing = False
    assert kernels.plan_checkpointing(model, t, mem, 1024) is None


def test_logit_scaling_and_soft_capping_are_applied_once_for_training_and_scoring():
    """Architectures with a logit scale or soft-capping (Gemma 2, Cohere): the training loss and the
    evaluation's log-likelihood scoring go through the same head_logits."""
    import torch.nn.functional as F
    from pipeline.eval.scoring import _head_logprobs
    model = _tiny_lm()
    model.config.logit_scale, model.config.final_logit_softcapping = 0.5, 2.0
    b = _batch()
    sel = b["targets"] != -100
    with torch.no_grad():
        hidden = model.model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).last_hidden_state[sel]
        logits = torch.tanh(model.lm_head(hidden) * 0.5 / 2.0) * 2.0
        want = F.cross_entropy(logits, b["targets"][sel], reduction="sum")
        assert float(kernels.loss_sum(model, b, "cpu")) == pytest.approx(float(want), rel=1e-5)
        lp = _head_logprobs(model, hidden, b["targets"][sel])
        assert float(-lp.sum()) == pytest.approx(float(want), rel=1e-5)
