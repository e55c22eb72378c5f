"""The Triton LoRA dropout kernels (pipeline/lm/lora_triton.py) run in Triton's interpreter on the
CPU, against a PyTorch reference that applies the kernels' own mask: h = dropout(x) @ A^T, and in
the backward gA = gh^T @ dropout(x) and gx += dropout'(gh @ A) in place; and the fused LoRA layer's
Triton branch (pipeline/lm/lora_fused.py) end to end. Shapes that are not
multiples of the blocks, ranks below 16 (padded) and above, fp32 and fp16 (the interpreter has no
bf16; bf16 runs in tests/gpu/test_gpu_lora_fused.py).

The checks run in a child process: TRITON_INTERPRET must be set before Triton is first imported
(triton.language's own jit functions, tl.rand's among them, are made at import)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is Linux x86-64 only (the [dev] extra installs it there)")

ROOT = Path(__file__).resolve().parents[2]
CHECKS = Path(__file__).with_name("lora_triton_checks.py")


def _run(name: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(CHECKS), name], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and f"PASSED {name}" in p.stdout, (p.stdout + p.stderr)[-3000:]


@pytest.mark.parametrize("case", ["fp32_r8", "fp32_r16", "fp16_r32"])
def test_kernels_equal_the_reference_with_their_mask(case):
    _run(case)


def test_mask_rate_seed_and_no_dropout():
    _run("mask")


def test_fused_layer_triton_branch_equals_the_reference():
    _run("fused_layer")
