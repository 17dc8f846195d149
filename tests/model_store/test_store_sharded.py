"""A store seeded from a sharded checkpoint (model.safetensors.index.json + shards), as `memfit retrofit`
writes for a large model: base id over the shards, value tables read from the shard that holds them."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from memlm.background import model_base_id
from memlm.retrofit import RetrofitSpec, memory_modules, retrofit, save_retrofitted
from model_store import Store
from model_store.tables import has_weights, weight_files, weights_id


def test_sharded_base_seeds_a_store_and_verifies(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=32))
    retrofit(model, RetrofitSpec(layer=2, memory_size=256, memory_heads=2, memory_topk=4, memory_key_dim=16))
    with torch.no_grad():
        memory_modules(model)[2].values.weight.normal_()
    src = tmp_path / "model"
    save_retrofitted(model, src, max_shard_size="50KB")
    shards = weight_files(src)
    assert len(shards) > 1 and not (src / "model.safetensors").exists() and has_weights(src)
    store = Store.init(tmp_path / "store", src)
    assert store.base_id == weights_id(src) == model_base_id(src)  # the background's base id matches
    assert store.value_keys == {2: "transformer.h.2.mlp.memory.values.weight"}
    assert torch.equal(store.base_tables()[2], memory_modules(model)[2].values.weight)
    assert store.verify(check_base=True)["ok"]
    assert Store.init(tmp_path / "store", src).base_id == store.base_id  # idempotent for the same base
