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


def test_answer_key_sharing_matches_unpadded_reads(tiny_model_dir):
    from memlm.evaluation import format_question
    from memlm.usage import answer_key_overlap, answer_key_sharing

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = load_tokenizer(tiny_model_dir)
    facts = json.loads((tiny_model_dir / "probe.json").read_text())["facts"][:12]
    questions = [f["question"] for f in facts]
    rep = answer_key_sharing(model, tok, questions, batch_size=5)  # padded batches of unequal lengths
    layer = model.config.memory_layers[0]
    reads = []
    for q in questions:  # one unpadded forward per question: the last position's reads and weights
        ids = torch.tensor([tok.encode(format_question(q), add_special_tokens=False)])
        seen = {}
        h = model.model.layers[layer].memory.register_forward_hook(
            lambda m, a, o, seen=seen: seen.update(o=o)
        )
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        h.remove()
        reads.append((seen["o"].indices[0, -1].reshape(-1), seen["o"].weights[0, -1].reshape(-1)))
    shared = []
    for i, (idx, w) in enumerate(reads):
        others = set().union(*(set(x.tolist()) for j, (x, _) in enumerate(reads) if j != i))
        mask = torch.tensor([s in others for s in idx.tolist()])
        shared.append(float(w[mask].sum() / w.sum()))
    assert rep[layer]["questions"] == len(questions)
    assert rep[layer]["shared_weight"] == pytest.approx(sum(shared) / len(shared), abs=1e-5)
    distinct = len(set().union(*(set(x.tolist()) for x, _ in reads)))
    assert rep[layer]["distinct_read_share"] == pytest.approx(distinct / sum(x.numel() for x, _ in reads))
    one = answer_key_sharing(model, tok, questions[:1])[layer]
    assert one["shared_weight"] == 0.0 and one["distinct_read_share"] <= 1.0  # nobody else to share with
    ref = set().union(*(set(x.tolist()) for x, _ in reads[6:]))
    by_hand = [float(w[torch.tensor([s in ref for s in x.tolist()])].sum() / w.sum()) for x, w in reads[:6]]
    overlap = answer_key_overlap(model, tok, questions[:6], questions[6:], batch_size=4)[layer]
    assert overlap == pytest.approx(sum(by_hand) / 6, abs=1e-5)
    assert answer_key_overlap(model, tok, questions[:3], questions[:3])[layer] == pytest.approx(1.0)
