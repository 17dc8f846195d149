"""Protected slots: rows a preservation set reads are never selected, so the update cannot reach it."""

from __future__ import annotations

import pytest
import torch

from memlm.reach import delta_rows, ids_reads, protected_slots, reached
from memlm.selection import select_slots
from memlm.updater import UpdateSettings, sparse_update

from .test_reach import _logits, _probes
from .test_updater import fake_background, random_batches, tiny_random_model


def test_protected_slots_counts_prompts_not_reads():
    reads = [{1: torch.tensor([0, 3])}, {1: torch.tensor([3, 5])}, {2: torch.tensor([7])}]
    masks = protected_slots(reads, {1: 8, 2: 8})
    assert masks[1].tolist() == [True, False, False, True, False, True, False, False]
    assert masks[2].nonzero().flatten().tolist() == [7]
    assert protected_slots(reads, {1: 8}, min_prompts=2)[1].nonzero().flatten().tolist() == [3]
    with pytest.raises(ValueError, match="min_prompts"):
        protected_slots(reads, {1: 8}, min_prompts=0)


@pytest.mark.parametrize("method", ["tfidf", "tf", "random", "all"])
def test_select_slots_never_picks_a_protected_slot(method):
    counts = torch.tensor([5, 4, 3, 2, 1, 0, 9, 8])
    df = torch.zeros(8, dtype=torch.long)
    protected = torch.tensor([True, False, False, False, False, False, True, False])
    chosen = select_slots(counts, df, 10, 3, method, torch.Generator().manual_seed(0), protected=protected)
    assert not protected[chosen].any()
    assert chosen.numel() == (6 - 1 if method == "all" else 3)  # 7 accessed, 2 protected
    if method in ("tfidf", "tf"):
        assert chosen.tolist() == [1, 2, 7]  # the top 3 of what is left, not of all
    with pytest.raises(ValueError, match="protected mask"):
        select_slots(counts, df, 10, 3, method, protected=protected[:4])


def test_update_with_a_protected_set_leaves_its_prompts_bit_identical():
    model = tiny_random_model()
    keep = _probes(40, seed=9)
    reads = ids_reads(model, keep)
    sizes = {layer: int(t.shape[0]) for layer, t in model.value_tables().items()}
    masks = protected_slots(reads, sizes)
    before = _logits(model, keep)
    settings = UpdateSettings(top_t=8, steps=6, lr=50.0, method="tfidf", early_stop=False, idf_lr_power=0.0)
    delta = sparse_update(model, random_batches(), fake_background(model), settings, protected=masks)
    changed = delta_rows(delta)
    assert sum(v.numel() for v in changed.values()) > 0  # something was still trained
    assert not any(reached(reads, changed))
    assert all(torch.equal(a, b) for a, b in zip(before, _logits(model, keep)))
    assert delta.report["slots_protected"] == {str(k): int(v.sum()) for k, v in masks.items()}


def test_protection_mask_covers_the_preservation_facts_and_the_shield_texts(tiny_model_dir):
    import json

    import memlm
    from memlm.pretrain import served_background
    from memlm.reach import SHIELD_SEED, probe_reads, protection_mask, text_reads

    model, tokenizer = memlm.load(tiny_model_dir)
    facts = json.loads((tiny_model_dir / "probe.json").read_text())["facts"][:6]
    shield = [t.rstrip("\n") for t in served_background(4, seed=SHIELD_SEED)]
    mask = protection_mask(model, tokenizer, facts, shield=4)
    for reads in probe_reads(model, tokenizer, facts) + text_reads(model, tokenizer, shield):
        for layer, slots in reads.items():
            assert mask[layer][slots].all()  # every slot any of them reads is protected
    only_facts = protection_mask(model, tokenizer, facts)
    only_shield = protection_mask(model, tokenizer, shield=4)
    for layer in mask:
        assert torch.equal(mask[layer], only_facts[layer] | only_shield[layer])  # and nothing else
        assert 0 < int(only_facts[layer].sum()) < mask[layer].numel()
    assert all(not m.any() for m in protection_mask(model, tokenizer).values())


def test_rehearsal_holds_the_rehearsed_texts_predictions(tiny_model_dir):
    """learn_documents(rehearse=texts): the update keeps those texts' next-token predictions closer to
    what they were than the same update without them."""
    import json

    import torch.nn.functional as F

    import memlm
    from memlm.background import BackgroundStats
    from memlm.evaluation import format_question
    from memlm.updater import learn_documents

    model, tok = memlm.load(tiny_model_dir)
    background = BackgroundStats.load(tiny_model_dir)
    facts = json.loads((tiny_model_dir / "probe.json").read_text())["facts"][:4]
    texts = [format_question(f["question"]) + " " + f["answer"] for f in facts]
    doc = {"id": "d", "text": "Goju Theipouquis was born in Peivistead.",
           "facts": [{"question": "Where was Goju Theipouquis born?", "answer": "Peivistead"}]}  # fmt: skip
    # at lr 1000 the KL term's SGD step is stable on the tiny model; at lr 3000 it overshoots (drift 21.3
    # with rehearsal vs 7.3 without, measured 2026-12-08): rehearsal needs a step the replay loss descends at
    settings = UpdateSettings(steps=8, early_stop=False, lr=1000.0, replay_weight=1.0, question_rewrites=1)

    @torch.no_grad()
    def logprobs():
        return [F.log_softmax(model(tok(t, return_tensors="pt").input_ids).logits.float(), -1) for t in texts]

    def drift(before):
        return sum(float((b.exp() * (b - a)).sum()) for b, a in zip(before, logprobs()))

    before = logprobs()
    tables = model.value_tables()
    plain = learn_documents(model, tok, [doc], background, settings)
    drift_plain = drift(before)
    plain.revert(tables)
    held = learn_documents(model, tok, [doc], background, settings, rehearse=texts)
    drift_held = drift(before)
    assert held.report["rehearsed"] == len(texts) and plain.report["rehearsed"] == 0
    assert drift_plain > 0
    assert drift_held < drift_plain


def test_rehearsal_by_reach_rehearses_only_the_texts_the_update_can_reach(tiny_model_dir):
    """learn_documents(rehearse_reads=...): a text whose reads miss every selected slot is left out (its
    predictions cannot move), a text reading a selected slot is rehearsed, and the report counts them."""
    import memlm
    from memlm.background import BackgroundStats
    from memlm.reach import text_reads
    from memlm.updater import learn_documents

    model, tok = memlm.load(tiny_model_dir)
    background = BackgroundStats.load(tiny_model_dir)
    doc = {"id": "d", "text": "Goju Theipouquis was born in Peivistead.",
           "facts": [{"question": "Where was Goju Theipouquis born?", "answer": "Peivistead"}]}  # fmt: skip
    settings = UpdateSettings(steps=4, early_stop=False, lr=3000.0, question_rewrites=1)
    texts = ["Question: Where was Goju Theipouquis born?\nAnswer: Peivistead", "The river runs north."]
    reads = text_reads(model, tok, texts)
    tables = model.value_tables()
    first = learn_documents(model, tok, [doc], background, settings)
    rows = delta_rows(first)
    first.revert(tables)
    inside = reached(reads, rows)
    # a read set that misses every slot of the table, beside the real ones
    nowhere = {layer: torch.empty(0, dtype=torch.long) for layer in reads[0]}
    delta = learn_documents(
        model, tok, [doc], background, settings, rehearse=[*texts, "x"], rehearse_reads=[*reads, nowhere]
    )
    assert inside[0], "the fact's own served text reads the rows its update writes"
    assert delta.report["rehearsed"] == sum(inside)
    assert delta_rows(delta).keys() == rows.keys()
    with pytest.raises(ValueError, match="rehearse_reads"):
        learn_documents(model, tok, [doc], background, settings, rehearse=texts, rehearse_reads=reads[:1])
