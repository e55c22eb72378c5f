"""The fused LoRA layer (pipeline.lm.lora_fused) against PEFT's own forward, on the CPU: the same
loss and the same LoRA gradients (dropout on, same seed), through plain and 4-bit NF4 bases, with
and without gradient checkpointing; the fallbacks (adapter disabled, merged) and the modes. The fused
SwiGLU + down projection against the fused layers alone: same loss and gradients, gate and up kept
instead of their product."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import loss_and_grads, sft_rows, tiny_debate_env, tiny_lora_model  # noqa: E402

from pipeline.lm import kernels  # noqa: E402
from pipeline.lm.lora_fused import FusedForward, FusedSwiGLUForward, fuse_lora, fuse_swiglu_down  # noqa: E402


def _tiny_lm(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def _peft(model, dropout=0.1, targets="all-linear"):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so that every gradient path carries signal
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _batch(vocab=97):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 24), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    tgt = torch.randint(3, vocab, (2, 24), generator=g)
    tgt[:, :5] = -100
    return {"input_ids": ids, "position_ids": pos, "targets": tgt}


def _loss_and_grads(model, batch, seed=5):
    return loss_and_grads(model, batch, "cpu", seed)


def _assert_same(a, b, rtol):
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, rel=rtol)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        scale = ga[n].abs().max().clamp_min(1e-12)
        assert ((ga[n] - gb[n]).abs().max() / scale).item() < rtol, n
        assert ga[n].abs().sum() > 0, f"{n}: no gradient reached it"


def test_fused_equals_peft_with_dropout_plain_base():
    model = _peft(_tiny_lm())
    model.train()
    b = _batch()
    ref = _loss_and_grads(model, b)
    assert fuse_lora(model, "auto") == 14       # 7 projections x 2 layers
    assert all(isinstance(m.forward, FusedForward) for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    _assert_same(_loss_and_grads(model, b), ref, 1e-5)
    # a different dropout draw gives a different loss: dropout is really applied in the fused path
    other = _loss_and_grads(model, b, seed=6)
    assert other[0] != pytest.approx(ref[0], rel=1e-7)


def test_fused_with_checkpointing_equals_without():
    """Non-reentrant checkpointing recomputes the fused layer with the same dropout mask."""
    b = _batch()
    plain = _peft(kernels.prepare_for_kbit(_tiny_lm(layers=3), gradient_checkpointing=False))
    fuse_lora(plain)
    plain.train()
    ref = _loss_and_grads(plain, b)
    ck = _peft(kernels.prepare_for_kbit(_tiny_lm(layers=3), gradient_checkpointing=True))
    fuse_lora(ck)
    ck.train()
    assert all(layer.gradient_checkpointing for layer in kernels.decoder_layers(ck))
    _assert_same(_loss_and_grads(ck, b), ref, 1e-5)


@pytest.fixture(scope="module")
def nf4_env(tmp_path_factory):
    return tiny_debate_env(tmp_path_factory.mktemp("fused-nf4"), n=(8, 2, 2), model__tiny__pretrain_steps=5,
                           lora__dropout=0.1)


def _nf4_model(cfg, store, checkpointing=False):
    return tiny_lora_model(cfg, store, "cpu", checkpointing)


def test_fused_equals_peft_on_nf4_base(nf4_env):
    from pipeline.lm.data import Example, collate, tokenize_conversation
    cfg, store, tok = nf4_env
    ex = [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", 4, 1)]
    batch = collate(ex, [[0, 1], [2, 3]], tok.pad_token_id)
    model = _nf4_model(cfg, store)
    assert type(model.base_model.model.model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    model.train()
    ref = _loss_and_grads(model, batch)
    assert fuse_lora(model, "on") == 14
    fused = _loss_and_grads(model, batch)
    _assert_same(fused, ref, 1e-4)
    # with checkpointing, fused: the same again
    ck = _nf4_model(cfg, store, checkpointing=True)
    fuse_lora(ck)
    ck.train()
    _assert_same(_loss_and_grads(ck, batch), ref, 1e-4)
    # and the SwiGLU fused with the down projection, checkpointed: the same again
    assert fuse_swiglu_down(ck) == 2
    _assert_same(_loss_and_grads(ck, batch), ref, 1e-4)


@pytest.mark.parametrize("swiglu_down", [False, True])
def test_fallbacks_disabled_adapter_eval_and_merged(swiglu_down):
    model = _peft(_tiny_lm())
    b = _batch()
    model.eval()
    with torch.no_grad():
        ref_on = kernels.loss_sum(model, b, "cpu").item()
        with model.disable_adapter():
            ref_off = kernels.loss_sum(model, b, "cpu").item()
    fuse_lora(model)
    if swiglu_down:   # no gradient taken, adapter disabled, merged: the MLP's own forward
        assert fuse_swiglu_down(model) == 2
    with torch.no_grad():
        assert kernels.loss_sum(model, b, "cpu").item() == pytest.approx(ref_on, rel=1e-6)
        with model.disable_adapter():
            assert kernels.loss_sum(model, b, "cpu").item() == pytest.approx(ref_off, rel=1e-6)
        assert ref_on != pytest.approx(ref_off, rel=1e-4)
        model.merge_adapter()
        assert kernels.loss_sum(model, b, "cpu").item() == pytest.approx(ref_on, rel=1e-5)
        model.unmerge_adapter()
        assert kernels.loss_sum(model, b, "cpu").item() == pytest.approx(ref_on, rel=1e-6)


def test_modes_and_unsupported_bases():
    model = _peft(_tiny_lm())
    assert fuse_lora(model, "off") == 0
    assert not any(isinstance(getattr(m, "forward", None), FusedForward) for m in model.modules())
    # a trainable base weight is not fused (its gradient would be lost)
    model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    assert fuse_lora(model, "auto") == 13
    assert fuse_lora(model, "auto") == 13    # idempotent
    # no LoRA linear layer at all: 'on' says what to set
    with pytest.raises(RuntimeError, match="train.fused_lora"):
        fuse_lora(_tiny_lm(), "on")


def test_a_discarded_fused_model_is_freed_without_the_garbage_collector():
    """No reference cycle through the patched forward: dropping the last reference frees the model
    at once (a cycle kept a previous 7B model's GPU memory alive until gc happened to run)."""
    import gc
    import weakref
    model = _peft(_tiny_lm())
    fuse_lora(model)
    model.train()
    kernels.loss_sum(model, _batch(), "cpu").backward()
    ref = weakref.ref(model.base_model.model.model.layers[0].mlp.down_proj)
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_swiglu_down_equals_fused_layers(dropout):
    b = _batch()
    model = _peft(_tiny_lm(), dropout=dropout)
    fuse_lora(model)
    model.train()
    ref = _loss_and_grads(model, b)
    assert fuse_swiglu_down(model) == 2
    assert fuse_swiglu_down(model) == 2          # idempotent
    mlp = model.base_model.model.model.layers[0].mlp
    assert isinstance(vars(mlp)["forward"], FusedSwiGLUForward) and not vars(mlp)["forward"].liger   # torch's product
    _assert_same(_loss_and_grads(model, b), ref, 1e-5)
    if dropout:   # the dropout draw is the down projection's own: another seed, another loss
        assert _loss_and_grads(model, b, seed=6)[0] != pytest.approx(ref[0], rel=1e-7)
    # with checkpointing (non-reentrant: the recompute makes gate and up again): the same
    ck = _peft(kernels.prepare_for_kbit(_tiny_lm(), gradient_checkpointing=True), dropout=dropout)
    fuse_lora(ck)
    fuse_swiglu_down(ck)
    ck.train()
    _assert_same(_loss_and_grads(ck, b), ref, 1e-5)


def test_fused_swiglu_down_keeps_gate_and_up_not_their_product():
    """What the MLP leaves for its backward (tokens x intermediate tensors): without the fusion, gate,
    silu(gate) and up (PyTorch's SiLU and product; Liger's kernel keeps gate and up only) and
    silu(gate) * up (the down projection's input); with it, gate and up only."""
    b = _batch()

    def kept_intermediate(model):
        sizes = []

        def pack(t):
            if t.dim() and t.shape[-1] == 128 and t.numel() >= 48 * 128:   # intermediate_size, every token (not LoRA's A)
                sizes.append(t.data_ptr())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            kernels.loss_sum(model, b, "cpu")
        return len(set(sizes))

    model = _peft(_tiny_lm(layers=1), dropout=0.0)
    fuse_lora(model)
    model.train()
    before = kept_intermediate(model)
    fuse_swiglu_down(model)
    after = kept_intermediate(model)
    assert (before, after) == (4, 2)


def test_fused_swiglu_down_needs_a_fused_lora_down_projection():
    # down projection without LoRA (q,v targets): nothing to fuse
    qv = _peft(_tiny_lm(), targets=["q_proj", "v_proj"])
    fuse_lora(qv)
    assert fuse_swiglu_down(qv) == 0
    # an MLP whose forward someone else patched (not a method bound to it) is left as it is
    other = _peft(_tiny_lm())
    fuse_lora(other)
    mlp = other.base_model.model.model.layers[0].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, x)
    assert fuse_swiglu_down(other) == 1
    # fused LoRA off: nothing to fuse either
    off = _peft(_tiny_lm())
    fuse_lora(off, "off")
    assert fuse_swiglu_down(off) == 0
