"""Retrofitting a memory layer onto local Llama / Qwen2 / GPT-2 models (tiny random configs, no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from memlm.retrofit import (
    RetrofitSpec,
    collect_memory_indices,
    load_retrofitted,
    memory_modules,
    retrofit,
    save_retrofitted,
)


def tiny(family: str):
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(cfg)
    if family == "qwen2":
        cfg = Qwen2Config(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return Qwen2ForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg)


SPEC = dict(layer=1, memory_size=64, memory_heads=2, memory_topk=4, memory_key_dim=16)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_parallel_retrofit_is_identity_and_reads_slots(family):
    model = tiny(family).eval()
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(x).logits
        retrofit(model, RetrofitSpec(mode="parallel", **SPEC))
        with collect_memory_indices(model) as got:
            after = model(x).logits
    assert torch.equal(before, after)
    assert got[1][0].shape == (2, 10, 2, 4)
    # training the values changes the output: the memory is really on the path
    with torch.no_grad():
        memory_modules(model)[1].values.weight.fill_(0.5)
        assert not torch.allclose(model(x).logits, before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_replace_retrofit_and_round_trip(family, tmp_path):
    model = retrofit(tiny(family), RetrofitSpec(mode="replace", **SPEC)).eval()
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = model(x).logits
    save_retrofitted(model, tmp_path)
    loaded = load_retrofitted(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


def test_refuses_bad_layer_and_mode():
    with pytest.raises(ValueError, match="outside 0..1"):
        retrofit(tiny("llama"), RetrofitSpec(layer=5))
    with pytest.raises(ValueError, match="not 'parallel' or 'replace'"):
        retrofit(tiny("llama"), RetrofitSpec(layer=0, mode="sideways"))
