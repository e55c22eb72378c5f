"""GPU: the FP8 base (pipeline.lm.fp8, train.fp8_base) with its CUDA kernels: the Triton row quantizer against
PyTorch's ops on the same rows, cuBLAS's FP8 matmul against the dense bf16 one (rows not a multiple of 16
included), and a 4-bit LoRA model with Liger, fused LoRA, the fused SwiGLU and checkpointing: the loss and LoRA
gradients within FP8 rounding of the 4-bit model's. Skipped without CUDA (tests/conftest.py) and on GPUs without
FP8 tensor cores."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures_train import GPU_TINY, loss_and_grads, sft_rows, tiny_debate_env, tiny_lora_model  # noqa: E402


pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch
    from pipeline.lm.fp8 import fp8_unsupported
    if torch.cuda.is_available() and fp8_unsupported("cuda:0"):
        pytest.skip(fp8_unsupported("cuda:0"))
    return tiny_debate_env(tmp_path_factory.mktemp("gpu-fp8"), **GPU_TINY, lora__dropout=0.1)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_gpu_triton_row_quantizer_equals_torch_ops(env):
    import torch
    from pipeline.lm.fp8 import E4M3_MAX, quantize_rows
    torch.manual_seed(0)
    for M, K in ((1, 64), (333, 4096), (64, 14336)):
        x = (torch.randn(M, K, device="cuda") * torch.rand(M, 1, device="cuda") * 30).to(torch.bfloat16)
        x[0] = 0                                           # an all-zero row (padding)
        x8, s = quantize_rows(x)
        s_ref = x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        ref8 = (x.float() / s_ref).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        assert torch.allclose(s, s_ref, rtol=1e-6)
        same = (x8.view(torch.uint8) == ref8.view(torch.uint8)).float().mean().item()
        assert same > 0.999, (M, K, same)                 # x * (1/s) vs x / s: a rare last-bit tie
        assert x8[0].float().abs().max().item() == 0


def test_gpu_fp8_matmul_is_within_fp8_rounding_of_bf16(env):
    import torch
    from pipeline.lm.fp8 import to_fp8
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    f = to_fp8(lin)
    for M in (8192, 1000):                                 # 1000: padded to 1008 rows inside
        x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = f(x)
        ref = x.detach() @ lin.weight.t()
        assert y.shape == ref.shape and y.dtype == torch.bfloat16
        err = _rel(y, ref)
        assert 1e-3 < err < 0.06, err
        g = torch.randn_like(y)
        y.backward(g)
        assert _rel(x.grad, g @ f.dense_weight(torch.bfloat16)) < 1e-2


def test_gpu_fp8_base_under_the_trainers_kernels_stays_close_to_nf4(env):
    from pipeline.lm.data import Example, collate, tokenize_conversation
    from pipeline.lm.fp8 import fp8_base
    from pipeline.lm.lora_fused import fuse_lora, fuse_swiglu_down
    cfg, store, tok = env
    ex = [Example(*tokenize_conversation(tok, r["messages"], 128, True)[0]) for r in sft_rows("debate", 16, 1)]
    batch = collate(ex, [list(range(0, 8)), list(range(8, 16))], tok.pad_token_id)

    def model(fp8: bool):
        m = tiny_lora_model(cfg, store, "cuda", checkpointing=True, fused_kernels=True)
        n = fp8_base(m) if fp8 else 0
        fuse_lora(m, "on")
        fuse_swiglu_down(m)
        m.train()
        return m, n

    def loss_grads(m):
        return loss_and_grads(m, batch, "cuda", seed=7)

    nf4, _ = model(False)
    ref = loss_grads(nf4)
    del nf4
    fp8, n = model(True)
    assert n == 7 * cfg.model.tiny.num_hidden_layers
    got = loss_grads(fp8)
    assert got[0] == pytest.approx(ref[0], rel=1e-2)
    worst = max(_rel(got[1][k], ref[1][k]) for k in ref[1])
    assert worst < 0.2, worst
    print(f"fp8 vs nf4: loss {got[0]:.5f} vs {ref[0]:.5f}, worst LoRA grad rel err {worst:.2e}")
