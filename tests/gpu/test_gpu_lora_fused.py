"""GPU: the fused LoRA layer on a 4-bit NF4 base in bf16 against PEFT's own (fp32-adapter) forward:
the same loss and LoRA gradients to bf16 precision, with flex attention and Liger as the trainer
uses them; dropout applied with the right rate. Skipped without CUDA (tests/conftest.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import loss_and_grads, sft_rows, tiny_debate_env, tiny_lora_model  # noqa: E402


pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # wide enough for the kernels' tiles, on one CUDA device
    return tiny_debate_env(tmp_path_factory.mktemp("gpu-fused"), resources={"device": "cuda", "cpus_per_trial": 1,
                           "gpus_per_trial": 1}, model__tiny__hidden_size=256, model__tiny__intermediate_size=768,
                           model__tiny__pretrain_steps=20, lora__dropout=0.0)


def _model(cfg, store, checkpointing):
    model = tiny_lora_model(cfg, store, "cuda", checkpointing, fused_kernels=True)
    model.train()
    return model


def _loss_grads(model, batch):
    return loss_and_grads(model, batch, "cuda", seed=7)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpu_fused_lora_matches_peft_nf4_bf16(env, checkpointing):
    import torch
    from pipeline.lm.data import Example, collate, tokenize_conversation
    from pipeline.lm.lora_fused import fuse_lora
    cfg, store, tok = env
    ex = [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", 16, 1)]
    batch = collate(ex, [list(range(0, 8)), list(range(8, 16))], tok.pad_token_id)
    model = _model(cfg, store, checkpointing)
    ref = _loss_grads(model, batch)
    assert fuse_lora(model, "on") == 7 * cfg.model.tiny.num_hidden_layers
    got = _loss_grads(model, batch)
    assert got[0] == pytest.approx(ref[0], rel=2e-3)
    worst = max(((got[1][n] - ref[1][n]).norm() / ref[1][n].norm()).item() for n in ref[1])
    assert worst < 3e-2, worst              # bf16 LoRA matmuls vs PEFT's fp32 ones
    print(f"fused vs peft (ckpt={checkpointing}): loss {got[0]:.5f} vs {ref[0]:.5f}, worst grad rel err {worst:.2e}")


def test_gpu_fused_lora_dropout_is_applied_and_unbiased(env):
    """With dropout p the LoRA branch differs per call, and its mean over draws is the p=0 branch."""
    import torch
    from pipeline.lm.lora_fused import _fn
    cfg, store, _ = env
    model = _model(cfg, store, False)
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    x = torch.randn(256, layer.in_features, device="cuda", dtype=torch.bfloat16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        base = layer.base_layer(x).float()
        exact = _fn().apply(x, A, B, layer, 2.0, 0.0).float() - base
        ref = (x.float() @ A.t().float()) @ B.t().float() * 2.0
        assert ((exact - ref).norm() / ref.norm()).item() < 2e-2
        draws = torch.stack([_fn().apply(x, A, B, layer, 2.0, 0.25).float() - base for _ in range(200)])
    assert not torch.equal(draws[0], draws[1])
    assert ((draws[0] - exact).norm() / exact.norm()).item() > 0.1         # one draw: visibly perturbed
    assert ((draws.mean(0) - exact).norm() / exact.norm()).item() < 0.1    # on average: unbiased


def test_gpu_rope_dispatch_matches_plain_rope_on_packed_rows(env):
    """Liger's RoPE (installed by apply_fused_kernels for CUDA tensors) gives the logits of the plain
    RoPE on packed rows, where cos/sin differ per row (per-example position ids)."""
    import sys
    import torch
    from pipeline.lm import kernels
    from pipeline.lm.data import Example, collate, tokenize_conversation
    from pipeline.lm.model import load_model, resolve_base
    cfg, store, tok = env
    ex = [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", 8, 2)]
    batch = collate(ex, [[0, 1, 2, 3], [4, 5, 6, 7]], tok.pad_token_id)
    model = load_model(resolve_base(cfg, store), cfg, "cuda")
    ids, pos = batch["input_ids"].cuda(), batch["position_ids"].cuda()
    module = sys.modules[type(model).__module__]
    with torch.no_grad():
        plain = model(input_ids=ids, position_ids=pos).logits.float()
    assert kernels.install_rope_dispatch(module, model.config.model_type)
    assert getattr(module.apply_rotary_pos_emb, "_domain_adapters_rope", False)
    with torch.no_grad():
        fused = model(input_ids=ids, position_ids=pos).logits.float()
    err = ((fused - plain).norm() / plain.norm()).item()
    assert err < 1e-2, err


@pytest.mark.parametrize("r,p", [(16, 0.05), (8, 0.3)])
def test_gpu_triton_dropout_path_equals_reference_with_its_mask(env, r, p):
    """On CUDA with dropout the fused layer draws the mask inside the Triton kernels: y, gx, gA and gB
    equal a float32 reference built with that same mask (read back with dropout_scale)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from pipeline.lm.lora_fused import _fn
    from pipeline.lm.lora_triton import dropout_scale
    from pipeline.lm.model import load_model, resolve_base
    cfg, store, _ = env
    base = load_model(resolve_base(cfg, store), cfg, "cuda")
    for q in base.parameters():
        q.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["down_proj"]))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.copy_(torch.randn_like(B) * 0.05)
    M, K = 3 * 512 + 77, layer.in_features
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    torch.manual_seed(11)
    y = _fn().apply(x, A, B, layer, 2.0, p)
    gy = torch.randn_like(y)
    y.backward(gy)
    s = dropout_scale(M, K, seed, p, "cuda")
    assert abs((s > 0).float().mean().item() - (1 - p)) < 0.01
    xf, Af, Bf, g = x.detach().float(), A.detach().float(), B.detach().float(), gy.float()
    W = layer.base_layer.weight
    import bitsandbytes.functional as bnbf
    Wf = bnbf.dequantize_4bit(W.data, W.quant_state).float()
    h = (xf * s) @ Af.t()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(y, xf @ Wf.t() + 2.0 * h @ Bf.t()) < 2e-2
    gh = 2.0 * g @ Bf
    assert rel(A.grad, gh.t() @ (xf * s)) < 2e-2
    assert rel(B.grad, 2.0 * g.t() @ h) < 2e-2
    assert rel(x.grad, g @ Wf + (gh @ Af) * s) < 2e-2


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gpu_fused_swiglu_down_matches_fused_layers_with_dropout(env, checkpointing):
    """Liger's SwiGLU kernels and the Triton dropout path: the SwiGLU fused with the down projection
    (gate and up kept, their product made again in the backward, the same dropout seed) gives the loss
    and gradients of the fused layers alone, and less memory is held after the forward."""
    import torch
    from pipeline.lm.data import Example, collate, tokenize_conversation
    from pipeline.lm.lora_fused import fuse_lora, fuse_swiglu_down
    cfg, store, tok = env
    ex = [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", 16, 1)]
    batch = collate(ex, [list(range(0, 8)), list(range(8, 16))], tok.pad_token_id)
    model = _model(cfg, store, checkpointing)
    for m in model.modules():   # dropout on (the env's config has it off): the Triton kernels' seeded path
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    fuse_lora(model, "on")

    def held_after_forward():
        from pipeline.lm import kernels
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.manual_seed(7)
        loss = kernels.loss_sum(model, batch, "cuda")
        held = torch.cuda.memory_allocated() - before
        del loss
        return held

    ref = _loss_grads(model, batch)
    held_ref = held_after_forward()
    assert fuse_swiglu_down(model) == cfg.model.tiny.num_hidden_layers
    assert model.base_model.model.model.layers[0].mlp.forward.liger   # Liger's product, as the MLP ran it
    got = _loss_grads(model, batch)
    held = held_after_forward()
    assert got[0] == pytest.approx(ref[0], rel=1e-3)
    worst = max(((got[1][n] - ref[1][n]).norm() / ref[1][n].norm()).item() for n in ref[1])
    assert worst < 1e-2, worst
    if not checkpointing:   # every layer keeps its activations: one (tokens x intermediate) tensor less each
        assert held < held_ref, (held, held_ref)
    print(f"swiglu+down vs fused layers (ckpt={checkpointing}): loss {got[0]:.5f} vs {ref[0]:.5f}, "
          f"worst grad rel err {worst:.2e}, held after forward {held / 2**20:.1f} vs {held_ref / 2**20:.1f} MiB")
