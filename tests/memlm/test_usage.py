"""memlm.usage: the memory-usage figures agree with the reads and activations measured directly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import memlm  # noqa: F401  (registers the model)
from memlm.reach import text_reads
from memlm.tokenizer import load_tokenizer
from memlm.usage import memory_usage


def test_usage_matches_direct_measurements(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = load_tokenizer(tiny_model_dir)
    probe = json.loads((tiny_model_dir / "probe.json").read_text())
    texts = probe["heldout_texts"][:8]
    prompts = [f"Question: {f['question']}\nAnswer: {f['answer']}" for f in probe["facts"][:10]]
    rep = memory_usage(model, tok, texts, prompts)
    assert set(rep) == set(model.config.memory_layers)
    reads = text_reads(model, tok, prompts)  # one forward per prompt, no padding
    for layer, r in rep.items():
        sets = [set(x[layer].tolist()) for x in reads]
        assert r["reads_per_prompt"] == pytest.approx(sum(map(len, sets)) / len(sets))
        n = model.config.memory_size
        assert r["prompts_union_share"] == pytest.approx(len(set().union(*sets)) / n)
        assert 0 < r["slots_read_share"] <= 1 and 0 < r["top1pct_read_share"] <= 1
    # the norm ratio of one text, computed by hand from the block's pieces
    ids = torch.tensor([tok.encode(prompts[0], add_special_tokens=False)])  # shorter than one chunk
    layer = model.config.memory_layers[0]
    block = model.model.layers[layer]
    seen = {}
    h1 = block.register_forward_hook(lambda m, a, o: seen.__setitem__("block", o[0]))
    h2 = block.memory.register_forward_hook(lambda m, a, o: seen.__setitem__("mem", o.out))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    h1.remove()
    h2.remove()
    by_hand = (seen["mem"].norm(dim=-1) / (seen["block"] - seen["mem"]).norm(dim=-1)).mean()
    one = memory_usage(model, tok, [prompts[0]])[layer]["output_residual_ratio"]
    assert one == pytest.approx(float(by_hand), rel=1e-3)
