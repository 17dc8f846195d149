"""The CUDA path of the memory layer against the CPU reference (skipped without CUDA).

- the embedding bag (the memory read) on CUDA equals the CPU reference, plain and through a row
  overlay (the path pinned versions use);
- a sparse update on CUDA changes only the selected value rows: every other tensor of the model, and
  every unselected row, stays bit-identical; its delta reverts the model exactly.
Run on a GPU machine by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import copy

import pytest
import torch

from memlm import MemoryLMConfig, MemoryLMForCausalLM
from memlm.updater import UpdateSettings, sparse_update

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

N = 4096


def _model(seed: int = 0) -> MemoryLMForCausalLM:
    torch.manual_seed(seed)
    cfg = MemoryLMConfig(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        memory_size=N, memory_heads=4, memory_topk=8, memory_key_dim=32, memory_layers=[1], pad_token_id=1,
    )  # fmt: skip
    return MemoryLMForCausalLM(cfg).eval()


def test_memory_read_on_cuda_matches_cpu_reference():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = _model()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(1))
    mem_c, mem_g = cpu.memory_modules()[1], gpu.memory_modules()[1]
    with torch.no_grad():
        ref = mem_c(x)
        out = mem_g(x.cuda())
        assert torch.equal(out.indices.cpu(), ref.indices)  # same slots selected
        torch.testing.assert_close(out.weights.cpu(), ref.weights, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.out.cpu(), ref.out, rtol=1e-4, atol=1e-5)
        # overlay path: rows replaced for this call only
        idx = torch.arange(0, N, 7)
        rows = torch.randn(idx.numel(), 64, generator=torch.Generator().manual_seed(2))
        ov_ref = mem_c(x, (idx, rows))
        ov_out = mem_g(x.cuda(), (idx.cuda(), rows.cuda()))
        torch.testing.assert_close(ov_out.out.cpu(), ov_ref.out, rtol=1e-4, atol=1e-5)
        # whole model logits
        ids = torch.randint(2, 256, (2, 12), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits, rtol=1e-4, atol=1e-4)


class _Background:
    def __init__(self, model):
        g = torch.Generator().manual_seed(0)
        self.df = {layer: torch.randint(0, 40, (N,), generator=g) for layer in model.config.memory_layers}
        self.num_docs = 50
        self.unit = "sequence"


def test_sparse_update_on_cuda_touches_only_selected_rows():
    model = _model().cuda()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 256, (4, 16), generator=g)
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]
    delta = sparse_update(
        model, batches, _Background(model), UpdateSettings(top_t=32, steps=5, early_stop=False)
    )
    after = model.state_dict()
    table = "model.layers.1.memory.values.weight"
    for k, v in before.items():
        if k != table:
            assert torch.equal(after[k], v), k  # frozen: bit-identical
    changed = (after[table] != before[table]).any(-1).nonzero().flatten().cpu()
    selected = delta.layers[1].indices.cpu()
    assert changed.numel() > 0
    assert set(changed.tolist()) <= set(selected.tolist())  # only selected rows moved
    keep = torch.ones(N, dtype=torch.bool)
    keep[selected] = False
    assert torch.equal(after[table][keep.cuda()], before[table][keep.cuda()])
    delta.revert(model.value_tables())
    assert torch.equal(model.state_dict()[table], before[table])  # the delta reverts exactly
