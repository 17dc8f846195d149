"""Reach of an update: the share of probe prompts whose memory reads include a row the update changed.

    probe facts -> prompt ("Question: ...\\nAnswer:") + its greedy answer under the parent version
               -> one forward per text (batch 1, no padding) -> the slot ids each memory layer reads
               -> a probe is *reached* by an update whose changed rows are S if any read is in S

Why this is exact: an update changes value rows only. Every layer below the first memory layer, the
memories' queries and sub-keys are frozen, so the slots a text reads at the first memory layer do not
depend on the values; if none of them is in S its output is unchanged, hence so is everything above it,
including the next memory layer's reads (by induction over the memory layers). A causal model's output
at a position depends only on the prefix, so the prompt's greedy answer -- every prefix of which is a
prefix of the read text -- is unchanged too. A probe outside the reach therefore gives bit-identical
logits after the update (tests/memlm/test_reach.py asserts exactly that), and only probes inside the
reach can be forgotten.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .evaluation import format_question, greedy_complete


@torch.no_grad()
def ids_reads(model, sequences: Sequence[Sequence[int]]) -> list[dict[int, torch.Tensor]]:
    """Per token sequence, {memory layer: sorted unique slot ids (int64) read at any of its positions}.
    One forward per sequence (batch 1, no padding, no cache): the reads of the text as served."""
    model.eval()
    device = next(model.parameters()).device
    layers = list(model.config.memory_layers)
    out: list[dict[int, torch.Tensor]] = []
    for ids in sequences:
        if len(ids) == 0:
            out.append({layer: torch.empty(0, dtype=torch.long) for layer in layers})
            continue
        x = torch.tensor([list(ids)], dtype=torch.long, device=device)
        res = model(x, use_cache=False)
        out.append(
            {layer: torch.unique(idx.reshape(-1).cpu()) for layer, idx in zip(layers, res.memory_indices)}
        )
    return out


def text_reads(model, tokenizer, texts: Sequence[str]) -> list[dict[int, torch.Tensor]]:
    """`ids_reads` of each text's tokens."""
    return ids_reads(model, [tokenizer.encode(t, add_special_tokens=False) for t in texts])


def probe_texts(model, tokenizer, facts: Sequence[dict], key: str = "question") -> list[str]:
    """Each probe prompt followed by the model's own greedy answer (the text a served probe reads)."""
    prompts = [format_question(f[key]) for f in facts]
    answers = greedy_complete(model, tokenizer, prompts) if prompts else []
    return [p + a for p, a in zip(prompts, answers)]


def probe_reads(
    model, tokenizer, facts: Sequence[dict], key: str = "question"
) -> list[dict[int, torch.Tensor]]:
    """`text_reads` of the probe texts under the model as it is now (call it on the parent version)."""
    return text_reads(model, tokenizer, probe_texts(model, tokenizer, facts, key))


def protected_slots(
    reads: Sequence[Mapping[int, torch.Tensor]], num_slots: Mapping[int, int], min_prompts: int = 1
) -> dict[int, torch.Tensor]:
    """{memory layer: bool mask (N,)} of the slots that at least `min_prompts` of `reads` (e.g. the
    `probe_reads` of a preservation set of known facts) read. An update that never selects them cannot
    reach those prompts (the module docstring: exact at the first memory layer, whose reads no value
    change moves)."""
    if min_prompts < 1:
        raise ValueError(f"min_prompts must be >= 1, got {min_prompts}")
    counts = {int(layer): torch.zeros(int(n), dtype=torch.long) for layer, n in num_slots.items()}
    for r in reads:
        for layer, slots in r.items():
            if int(layer) in counts:
                counts[int(layer)][slots.reshape(-1).cpu().long()] += 1
    return {layer: c >= min_prompts for layer, c in counts.items()}


SHIELD_SEED = 1  # the served-format texts `protection_mask` shields (memlm.pretrain.served_background)


def protection_mask(
    model, tokenizer, preservation: Sequence[dict] = (), shield: int = 0, min_prompts: int = 1
) -> dict[int, torch.Tensor]:
    """The `protected_slots` of a preservation set of known facts (their prompt + greedy answer reads
    under the model as it is now) and of `shield` served-format question-answer texts of invented
    entities no stream uses (memlm.pretrain.served_background, seed SHIELD_SEED: the reads the served
    format itself makes). Compute it on the base: first-layer reads never move under value-only updates,
    so one mask holds for every later update."""
    from .pretrain import served_background

    reads = probe_reads(model, tokenizer, preservation) if preservation else []
    texts = [t.rstrip("\n") for t in served_background(shield, seed=SHIELD_SEED)]
    reads += text_reads(model, tokenizer, texts)
    sizes = {layer: int(t.shape[0]) for layer, t in model.value_tables().items()}
    return protected_slots(reads, sizes, min_prompts)


def reached(reads: Sequence[Mapping[int, torch.Tensor]], changed: Mapping[int, torch.Tensor]) -> list[bool]:
    """Per probe: does it read any changed row? `changed`: {memory layer: slot ids the update wrote}."""
    sets = {int(layer): idx.reshape(-1).cpu().long() for layer, idx in changed.items()}
    hits = []
    for r in reads:
        hit = False
        for layer, slots in r.items():
            s = sets.get(int(layer))
            if s is not None and s.numel() and slots.numel() and bool(torch.isin(slots, s).any()):
                hit = True
                break
        hits.append(hit)
    return hits


def reach_report(reads: Sequence[Mapping[int, torch.Tensor]], changed: Mapping[int, torch.Tensor]) -> dict:
    """{"share", "reached", "probes", "rows_read_changed_mean"}: the reach and, over all probes, the mean
    number of changed rows a probe reads (how deep inside the reach it is). share is None with no probes."""
    hits = reached(reads, changed)
    sets = {int(layer): idx.reshape(-1).cpu().long() for layer, idx in changed.items()}
    depth = [
        sum(
            int(torch.isin(slots, sets[int(layer)]).sum()) for layer, slots in r.items() if int(layer) in sets
        )
        for r in reads
    ]
    n = len(hits)
    return {
        "share": (sum(hits) / n) if n else None,
        "reached": sum(hits),
        "probes": n,
        "rows_read_changed_mean": (sum(depth) / n) if n else None,
    }


def merge_reads(reads: Sequence, hits: Sequence[bool], fresh: Sequence) -> list:
    """Reads after an update: a probe outside the reach reads what it read before; `fresh` holds the
    re-read reads of the reached probes, in order."""
    it = iter(fresh)
    return [next(it) if h else r for r, h in zip(reads, hits)]


def delta_rows(delta) -> dict[int, torch.Tensor]:
    """{memory layer: slot ids} a SlotDelta writes."""
    return {int(layer): ld.indices for layer, ld in delta.layers.items()}
