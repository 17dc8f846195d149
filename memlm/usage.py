"""How a model uses its memory: the figures that say whether a sparse update can stay sparse.

    memory_usage(model, tokenizer, texts, prompts) -> per memory layer:
      output_residual_ratio  mean |memory output| / |residual stream it is added to| (block input plus
                             its attention output) over real tokens of `texts`
                             (a memory that dwarfs the residual makes every read row matter a lot)
      slots_read_share       share of slots read at least once by `texts` (usage; Lample et al. 2019
                             report 26% -> 80% at 1M slots with query BatchNorm)
      top1pct_read_share     share of all reads that go to the 1% most-read slots (hubs)
      reads_per_prompt       mean distinct slots one prompt of `prompts` reads (the probe side of reach)
      prompts_union_share    share of slots read by at least one prompt: a new fact whose rows lie
                             outside this union changes no prompt's output (memlm.reach)

    answer_key_sharing(model, tokenizer, questions) -> per memory layer, at the position that predicts
    the first answer token (the end of "Question: ...\nAnswer:"):
      shared_weight          mean share of a question's read weight on slots that another question of
                             the set also reads there (1: the answer position reads the format, not the
                             entity; an entity-keyed memory is near 0)
      distinct_read_share    distinct slots over all reads at that position (1: no two questions share)

    answer_key_overlap(model, tokenizer, questions, reference) -> per memory layer, the mean share of a
    question's answer-position read weight on slots some `reference` question reads there (new facts
    against the probe: measured on questions no pretraining penalty or statistic has seen)

Measured with forward hooks on the memory blocks; the model is not changed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .background import chunk_texts, pad_right


@torch.no_grad()
def _pass(model, seqs: list[list[int]], pad: int, batch_size: int, on_batch) -> None:
    device = next(model.parameters()).device
    for start in range(0, len(seqs), batch_size):
        ids, mask = pad_right(seqs[start : start + batch_size], pad)
        on_batch(ids.to(device), mask.to(device))


@torch.no_grad()
def memory_usage(
    model,
    tokenizer,
    texts: Sequence[str],
    prompts: Sequence[str] = (),
    seq_len: int = 128,
    batch_size: int = 16,
) -> dict[int, dict]:
    """{memory layer: figures above}. `texts`: general text (e.g. held-out or background); `prompts`:
    probe prompts with their answers (memlm.reach.probe_texts)."""
    was_training = model.training
    model.eval()
    modules = model.memory_modules()
    blocks = {i: model.model.layers[i] for i in modules}
    n_slots = {i: m.num_slots for i, m in modules.items()}
    counts = {i: torch.zeros(n, dtype=torch.long) for i, n in n_slots.items()}
    ratio_sum = dict.fromkeys(modules, 0.0)
    ratio_n = dict.fromkeys(modules, 0)
    state: dict = {"count": True, "out": {}}

    def mem_hook(layer: int):
        def hook(module, args, output):
            state["out"][layer] = output.out  # (B, T, d) what the memory adds to the residual
            if state["count"]:
                real = output.indices[state["mask"].bool()].reshape(-1).cpu()
                counts[layer] += torch.bincount(real, minlength=n_slots[layer])

        return hook

    def block_hook(layer: int):
        def hook(block, args, output):  # Block.forward -> (x + attention + memory, indices)
            if not state["count"]:
                return
            mask = state["mask"].bool()
            mem = state["out"][layer]
            resid = (output[0] - mem)[mask].float().norm(dim=-1)  # the stream the memory output joins
            ratio_sum[layer] += float((mem[mask].float().norm(dim=-1) / resid.clamp(min=1e-6)).sum())
            ratio_n[layer] += int(mask.sum())

        return hook

    handles = []
    for layer, m in modules.items():
        handles.append(m.register_forward_hook(mem_hook(layer)))
        handles.append(blocks[layer].register_forward_hook(block_hook(layer)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompt_sets: dict[int, list[set[int]]] = {i: [] for i in modules}
    try:

        def run(ids, mask):
            state["mask"] = mask
            model(input_ids=ids, attention_mask=mask, use_cache=False)

        _pass(model, chunk_texts(tokenizer, texts, seq_len), pad, batch_size, run)
        state["count"] = False

        def run_prompts(ids, mask):
            state["mask"] = mask
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            for layer, idx in zip(modules, out.memory_indices):
                for b in range(ids.shape[0]):
                    prompt_sets[layer].append(set(idx[b][mask[b].bool()].reshape(-1).tolist()))

        if prompts:
            _pass(model, chunk_texts(tokenizer, prompts, seq_len), pad, batch_size, run_prompts)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        layer: _figures(c, ratio_sum[layer] / max(ratio_n[layer], 1), prompt_sets[layer])
        for layer, c in counts.items()
    }


def _figures(counts: torch.Tensor, output_residual_ratio: float, sets: list[set[int]]) -> dict:
    """One layer's usage figures from its background read counts (N,) and the probe prompts' slot sets."""
    n = counts.numel()
    total = int(counts.sum())
    union = set().union(*sets) if sets else set()
    return {
        "output_residual_ratio": output_residual_ratio,
        "slots_read_share": float((counts > 0).float().mean()),
        "top1pct_read_share": float(counts.topk(max(1, n // 100)).values.sum()) / total if total else 0.0,
        "reads_per_prompt": sum(map(len, sets)) / len(sets) if sets else None,
        "prompts_union_share": len(union) / n if sets else None,
    }


@torch.no_grad()
def _answer_reads(model, tokenizer, questions: Sequence[str], batch_size: int) -> dict[int, list]:
    """{memory layer: [(slot ids (H*k,), weights (H*k,)) per question]} read at the answer position."""
    from .evaluation import format_question

    was_training = model.training
    model.eval()
    modules = model.memory_modules()
    reads: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in modules}
    state: dict = {}

    def hook(layer: int):
        def fn(module, args, output):
            last = state["mask"].sum(dim=1) - 1  # right-padded: the last real position of each row
            rows = torch.arange(last.numel(), device=last.device)
            idx, w = output.indices[rows, last], output.weights[rows, last]  # (B, H, k)
            reads[layer].extend(zip(idx.reshape(len(rows), -1).cpu(), w.reshape(len(rows), -1).float().cpu()))

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in modules.items()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [tokenizer.encode(format_question(q), add_special_tokens=False) for q in questions]
    try:

        def run(ids, mask):
            state["mask"] = mask
            model(input_ids=ids, attention_mask=mask, use_cache=False)

        _pass(model, seqs, pad, batch_size, run)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return reads


def answer_key_sharing(model, tokenizer, questions: Sequence[str], batch_size: int = 16) -> dict[int, dict]:
    """{memory layer: {"shared_weight", "distinct_read_share", "questions"}} (see the module docstring)."""
    report: dict[int, dict] = {}
    for layer, items in _answer_reads(model, tokenizer, questions, batch_size).items():
        owners: dict[int, int] = {}  # slot -> how many questions read it at the answer position
        for idx, _ in items:
            for slot in set(idx.tolist()):
                owners[slot] = owners.get(slot, 0) + 1
        shared = []
        for idx, w in items:
            others = torch.tensor([owners[s] > 1 for s in idx.tolist()])
            shared.append(float(w[others].sum() / w.sum()))
        total = sum(idx.numel() for idx, _ in items)
        report[layer] = {
            "shared_weight": sum(shared) / len(shared) if shared else None,
            "distinct_read_share": len(owners) / total if total else None,
            "questions": len(items),
        }
    return report


def answer_key_overlap(
    model, tokenizer, questions: Sequence[str], reference: Sequence[str], batch_size: int = 16
) -> dict[int, float | None]:
    """{memory layer: mean share of a question's answer-position read weight on slots that some question
    of `reference` reads at its answer position}. With `questions` new facts (an update stream) and
    `reference` the probe, this is the answer-position side of reach: 0 means an update's rows there
    are no probe question's rows."""
    new = _answer_reads(model, tokenizer, questions, batch_size)
    ref = _answer_reads(model, tokenizer, reference, batch_size)
    report: dict[int, float | None] = {}
    for layer, items in new.items():
        seen = set().union(*(set(idx.tolist()) for idx, _ in ref[layer]))
        shares = [
            float(w[torch.tensor([s in seen for s in idx.tolist()])].sum() / w.sum()) for idx, w in items
        ]
        report[layer] = sum(shares) / len(shares) if shares else None
    return report
