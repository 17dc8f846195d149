"""The opt-in Triton memory read (memlm.fused) against the reference embedding-bag path.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, in a subprocess so the
setting never leaks into other tests); with CUDA it also runs compiled, in fp32 and bf16."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import os
import torch
import torch.nn.functional as F
from memlm import MemoryLMConfig, MemoryLMForCausalLM, fused

device = os.environ.get("CHECK_DEVICE", "cpu")
torch.manual_seed(0)
# the kernel alone: duplicate slots in a bag, a width that is not a multiple of the block
table = torch.randn(500, 72, device=device)
idx = torch.randint(0, 500, (33, 24), device=device)
idx[:, 1] = idx[:, 0]
w = torch.rand(33, 24, device=device)
ref = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
got = fused.bag(idx, table, w, block_d=32)
assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (got - ref).abs().max()
assert fused.bag(idx[:0], table, w[:0]).shape == (0, 72)

# the whole model: logits with the kernel == logits with the reference path
cfg = MemoryLMConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, memory_size=1024, memory_heads=2, memory_topk=4,
                     memory_key_dim=16, memory_layers=[1], pad_token_id=1)
model = MemoryLMForCausalLM(cfg).eval().to(device)
ids = torch.randint(2, 128, (3, 10), device=device)
os.environ["MEMFIT_MEMORY_KERNEL"] = "torch"
with torch.no_grad():
    reference = model(ids).logits
os.environ["MEMFIT_MEMORY_KERNEL"] = "triton"
with torch.no_grad():
    assert fused.wanted(model.model.layers[1].memory.values.weight)
    kernel = model(ids).logits
assert torch.allclose(kernel, reference, atol=1e-4, rtol=1e-4), (kernel - reference).abs().max()
assert not fused.wanted(model.model.layers[1].memory.values.weight)  # grad mode: reference path
if device == "cuda":
    t16 = table.to(torch.bfloat16)
    ref16 = F.embedding_bag(idx, t16.float(), per_sample_weights=w, mode="sum")
    got16 = fused.bag(idx, t16, w.to(torch.bfloat16)).float()
    assert torch.allclose(got16, ref16, atol=5e-2, rtol=2e-2), (got16 - ref16).abs().max()
print("fused kernel matches the reference")
"""


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, **env_extra}
    return subprocess.run(
        [sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_fused_kernel_matches_reference_in_the_triton_interpreter():
    pytest.importorskip("triton")
    r = _run({"TRITON_INTERPRET": "1", "CHECK_DEVICE": "cpu"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "matches the reference" in r.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_kernel_matches_reference_on_cuda():
    pytest.importorskip("triton")
    r = _run({"CHECK_DEVICE": "cuda"})
    assert r.returncode == 0, r.stdout + r.stderr


def test_reference_path_without_the_opt_in(monkeypatch):
    from memlm import fused

    monkeypatch.delenv("MEMFIT_MEMORY_KERNEL", raising=False)
    with torch.no_grad():
        assert not fused.wanted(torch.zeros(4, 4))
    monkeypatch.setenv("MEMFIT_MEMORY_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with torch.no_grad():
        assert not fused.wanted(torch.zeros(4, 4))  # a CPU table without the interpreter
