"""Reach: a probe that reads no changed row gives bit-identical output after the update."""

from __future__ import annotations

import torch

from memlm.reach import delta_rows, ids_reads, reach_report, reached
from memlm.updater import UpdateSettings, sparse_update

from .test_updater import fake_background, random_batches, tiny_random_model


def _probes(n: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(2, 128, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


@torch.no_grad()
def _logits(model, seqs):
    return [model(torch.tensor([s]), use_cache=False).logits for s in seqs]


def test_outside_reach_bit_identical_inside_changed():
    model = tiny_random_model(
        memory_layers=(0, 2)
    )  # two memory layers: the second's reads depend on the first
    probes = _probes(200)
    reads = ids_reads(model, probes)  # under the parent
    before = _logits(model, probes)
    settings = UpdateSettings(top_t=4, steps=6, lr=50.0, optimizer="sgd", method="tfidf", early_stop=False,
                              idf_lr_power=0.0)  # fmt: skip
    delta = sparse_update(model, random_batches(), fake_background(model), settings)
    changed = delta_rows(delta)
    assert sum(v.numel() for v in changed.values()) > 0
    hits = reached(reads, changed)
    after = _logits(model, probes)
    outside = [i for i, h in enumerate(hits) if not h]
    inside = [i for i, h in enumerate(hits) if h]
    assert outside and inside, (len(outside), len(inside))  # the stream exercises both sides
    for i in outside:
        assert torch.equal(before[i], after[i]), f"probe {i} outside the reach changed"
    assert any(not torch.equal(before[i], after[i]) for i in inside), "no reached probe changed"
    rep = reach_report(reads, changed)
    assert rep["probes"] == 200 and rep["reached"] == len(inside)
    assert abs(rep["share"] - len(inside) / 200) < 1e-12
    assert rep["rows_read_changed_mean"] > 0


def test_reach_of_nothing_and_of_everything():
    model = tiny_random_model()
    probes = _probes(10)
    reads = ids_reads(model, probes)
    assert reach_report(reads, {1: torch.empty(0, dtype=torch.long)})["share"] == 0.0
    assert reach_report(reads, {1: torch.arange(model.config.memory_size)})["share"] == 1.0
    assert reach_report([], {1: torch.arange(3)})["share"] is None
    # rows of another layer than the one read never count
    assert reach_report(reads, {0: torch.arange(model.config.memory_size)})["share"] == 0.0


def test_pretrained_update_reach(tiny_model_dir):
    """On the tiny pretrained model: a real fact update, its reach over the probe set, and the exactness."""
    import json

    from transformers import AutoModelForCausalLM

    from memlm.background import BackgroundStats
    from memlm.reach import probe_texts, text_reads
    from memlm.tokenizer import load_tokenizer
    from memlm.updater import learn_documents

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    tok = load_tokenizer(tiny_model_dir)
    background = BackgroundStats.load(tiny_model_dir)
    probe = json.loads((tiny_model_dir / "probe.json").read_text())["facts"][:40]
    texts = probe_texts(model, tok, probe)
    reads = text_reads(model, tok, texts)
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    before = _logits(model, ids)
    doc = {"id": "z", "text": "The capital of Zorbania is Quillton.",
           "facts": [{"question": "What is the capital of Zorbania?", "answer": "Quillton"}]}  # fmt: skip
    delta = learn_documents(
        model, tok, [doc], background, UpdateSettings(top_t=8, steps=10, early_stop=False)
    )
    rep = reach_report(reads, delta_rows(delta))
    assert rep["probes"] == 40 and 0.0 <= rep["share"] <= 1.0
    after = _logits(model, ids)
    for i, hit in enumerate(reached(reads, delta_rows(delta))):
        if not hit:
            assert torch.equal(before[i], after[i])
