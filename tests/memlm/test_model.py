"""The memory-layer model: product-key top-k, shapes, save/load, generate with and without cache."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import memlm  # noqa: F401  (registers the Auto classes)
from memlm import MemoryLMConfig, MemoryLMForCausalLM
from memlm.memory import ProductKeyMemory, overlay_rows


def tiny_config(**kw) -> MemoryLMConfig:
    base = dict(
        vocab_size=101,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        memory_size=256,
        memory_heads=2,
        memory_topk=4,
        memory_key_dim=16,
    )
    base.update(kw)
    return MemoryLMConfig(**base)


def test_config_validates_with_numbers():
    import pytest

    with pytest.raises(ValueError, match="not a multiple of 5 heads"):
        tiny_config(num_attention_heads=5)
    with pytest.raises(ValueError, match="200 is not a perfect square"):
        tiny_config(memory_size=200)
    assert tiny_config().memory_layers == [1]


def test_product_key_topk_equals_brute_force():
    torch.manual_seed(0)
    cfg = tiny_config(memory_size=144, memory_topk=5)
    mem = ProductKeyMemory(cfg)
    mem.reset_subkeys(1.0)
    x = torch.randn(3, 7, cfg.hidden_size)
    idx, w = mem.select(x)
    # brute force: materialise all N = n*n full keys per head and score them
    H, n, half = mem.num_heads, mem.num_subkeys, mem.half_dim
    q = mem.query(x).view(3, 7, H, 2, half)
    q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + mem.eps)
    k1 = mem.subkeys[:, 0]  # (H, n, half)
    k2 = mem.subkeys[:, 1]
    full = (k1.unsqueeze(2).expand(H, n, n, half), k2.unsqueeze(1).expand(H, n, n, half))
    full = torch.cat(full, dim=-1).reshape(H, n * n, 2 * half)  # (H, N, key_dim); slot = i*n + j
    scores = torch.einsum("bthd,hnd->bthn", q.reshape(3, 7, H, 2 * half), full)
    bs, bi = scores.topk(cfg.memory_topk, dim=-1)
    assert torch.equal(idx.sort(-1).values, bi.sort(-1).values)
    assert torch.allclose(w.sum(-1), torch.ones(3, 7, H))
    assert torch.allclose(w, torch.softmax(bs, -1), atol=1e-5)


def test_shapes_dtypes_and_indices_returned():
    torch.manual_seed(0)
    cfg = tiny_config(num_hidden_layers=3, memory_layers=[0, 2])
    model = MemoryLMForCausalLM(cfg)
    x = torch.randint(2, cfg.vocab_size, (2, 9))
    out = model(x, labels=x)
    assert out.logits.shape == (2, 9, cfg.vocab_size) and out.logits.dtype == torch.float32
    assert len(out.memory_indices) == 2
    for idx in out.memory_indices:
        assert idx.shape == (2, 9, cfg.memory_heads, cfg.memory_topk) and idx.dtype == torch.int64
        assert int(idx.min()) >= 0 and int(idx.max()) < cfg.memory_size
    assert set(model.value_tables()) == {0, 2}
    out.loss.backward()
    assert model.model.layers[0].memory.values.weight.grad is not None


def test_overlay_equals_writing_the_rows():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = MemoryLMForCausalLM(cfg).eval()
    x = torch.randint(2, cfg.vocab_size, (2, 9))
    layer = cfg.memory_layers[0]
    table = model.value_tables()[layer]
    idx = torch.unique(model(x).memory_indices[0].flatten())[:10]
    rows = torch.randn(idx.numel(), cfg.hidden_size)
    with torch.no_grad():
        via_overlay = model(x, memory_overlay={layer: (idx, rows)}).logits
        saved = table[idx].clone()
        table[idx] = rows
        written = model(x).logits
        table[idx] = saved
    assert torch.allclose(via_overlay, written, atol=1e-5)
    v = torch.randn(20, 4)
    sel = torch.tensor([1, 5])
    got = overlay_rows(v, torch.tensor([[5, 2], [1, 1]]), (sel, torch.zeros(2, 4)))
    assert torch.equal(got[0, 0], torch.zeros(4)) and torch.equal(got[0, 1], v[2])


def test_save_load_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = MemoryLMForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MemoryLMForCausalLM
    x = torch.randint(2, 101, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_generate_with_and_without_cache_same_greedy_tokens():
    torch.manual_seed(1)
    model = MemoryLMForCausalLM(tiny_config()).eval()
    x = torch.randint(2, 101, (2, 6))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=1)
    assert torch.equal(model.generate(x, use_cache=True, **kw), model.generate(x, use_cache=False, **kw))


def test_left_padding_matches_unpadded():
    torch.manual_seed(2)
    model = MemoryLMForCausalLM(tiny_config()).eval()
    x = torch.randint(2, 101, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        padded = model(x, attention_mask=mask).logits[0, -1]
        alone = model(x[:1, 2:]).logits[0, -1]
    assert torch.allclose(padded, alone, atol=1e-5)


def test_query_batchnorm_learns_only_while_pretraining(tmp_path):
    """memory_query_bn: batch statistics (and running-statistic updates) only with bn_update set, as
    pretraining does; train mode alone (a sparse update, a LoRA step) reads with the running statistics,
    so nothing but the value rows changes what a query reads. The statistics survive save/load."""
    torch.manual_seed(0)
    model = MemoryLMForCausalLM(tiny_config(memory_query_bn=True))
    (mem,) = model.memory_modules().values()
    x = torch.randint(2, 101, (2, 9))
    model.eval()
    ref = model(x).logits
    model.train()
    assert torch.equal(model(x).logits, ref)  # train mode without bn_update: running statistics
    assert torch.equal(mem.query_bn.running_mean, torch.zeros_like(mem.query_bn.running_mean))
    mem.bn_update = True
    model(x)
    assert not torch.equal(mem.query_bn.running_mean, torch.zeros_like(mem.query_bn.running_mean))
    mem.bn_update = False
    model.eval()
    after = model(x).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert torch.equal(loaded(x).logits, after)
