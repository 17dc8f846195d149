"""Evaluation, defined once (docs/contracts.md "Evaluation"), used by pretraining reports, the benchmark and
the service's update gate.

- Completion: greedy decoding of up to 16 new tokens, free generation (no teacher forcing).
- A fact {"question", "answer"} counts as answered when the normalised answer appears in the
  normalised completion before its first newline.
- Learning: share of an update's facts answered (ingested and held-out wording).
- Retention: share of probe facts answered by the base that are still answered.
- Forgetting: (retention_before - retention_after) / retention_before.
"""

from __future__ import annotations

import functools
import math
import re
import string
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

MAX_NEW_TOKENS = 16
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACE = re.compile(r"\s+")


def format_question(question: str) -> str:
    """The prompt the model completes for a fact."""
    return f"Question: {question.strip()}\nAnswer:"


def normalize(text: str) -> str:
    """Fold case, punctuation and whitespace."""
    return _SPACE.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def is_answered(completion: str, answer: str) -> bool:
    first_line = completion.split("\n", 1)[0]
    ans = normalize(answer)
    return bool(ans) and f" {ans} " in f" {normalize(first_line)} "


@functools.lru_cache(maxsize=8)
def _newline_token_ids(tokenizer) -> frozenset[int]:
    ids = set()
    for i in range(len(tokenizer)):
        if "\n" in tokenizer.decode([i]):
            ids.add(i)
    return frozenset(ids)


def _left_pad(tokenizer, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):
        ids[row, width - len(e) :] = torch.tensor(e, dtype=torch.long)
        mask[row, width - len(e) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_complete(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 64,
    memory_overlay=None,
    stop_at_newline: bool = True,
) -> list[str]:
    """Greedy completions (new text only) for each prompt, batched with left padding and a KV cache."""
    model.eval()
    device = next(model.parameters()).device
    newline = _newline_token_ids(tokenizer) if stop_at_newline else frozenset()
    eos = tokenizer.eos_token_id
    out: list[str] = []
    extra = {"memory_overlay": memory_overlay} if memory_overlay else {}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = _left_pad(tokenizer, chunk, device)
        cache = DynamicCache(config=model.config)
        generated = torch.empty((len(chunk), 0), dtype=torch.long, device=device)
        done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
        step_ids = ids
        for _ in range(max_new_tokens):
            logits = model(
                step_ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **extra
            )
            nxt = logits.logits[:, -1].argmax(-1)  # (B,)
            generated = torch.cat([generated, nxt.unsqueeze(1)], dim=1)
            finished = nxt == eos if eos is not None else torch.zeros_like(done)
            if newline:
                finished |= torch.tensor([int(t) in newline for t in nxt.tolist()], device=device)
            done |= finished
            if bool(done.all()):
                break
            step_ids = nxt.unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        for row in generated.tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def answered(model, tokenizer, facts: Sequence[dict], key: str = "question", **kw) -> list[bool]:
    """Per fact: is `fact[key]` (a question) answered with `fact["answer"]`?"""
    if not facts:
        return []
    completions = greedy_complete(model, tokenizer, [format_question(f[key]) for f in facts], **kw)
    return [is_answered(c, f["answer"]) for c, f in zip(completions, facts)]


def fact_accuracy(model, tokenizer, facts: Sequence[dict], key: str = "question", **kw) -> float:
    hits = answered(model, tokenizer, facts, key=key, **kw)
    return sum(hits) / len(hits) if hits else 0.0


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    max_length: int = 256,
    batch_size: int = 16,
    max_tokens: int | None = None,
) -> float:
    """Token-level perplexity of `texts` (each truncated to `max_length` tokens); padding excluded."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [tokenizer.encode(t, add_special_tokens=False)[:max_length] for t in texts]
    encoded = [e for e in encoded if len(e) > 1]
    if max_tokens is not None:
        kept, total = [], 0
        for e in encoded:
            if total >= max_tokens:
                break
            kept.append(e)
            total += len(e)
        encoded = kept
    nll, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(e) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            ids[row, : len(e)] = torch.tensor(e)
            labels[row, : len(e)] = torch.tensor(e)
            mask[row, : len(e)] = 1
        logits = model(ids.to(device), attention_mask=mask.to(device)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = labels[:, 1:].to(device)
        valid = tgt != -100
        tok_lp = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll -= float(tok_lp[valid].sum())
        count += int(valid.sum())
    return math.exp(nll / count) if count else float("nan")


# ---- update-level evaluation (learning, retention, forgetting) --------------------------------------


@dataclass
class EvalBudget:
    """Caps that keep one update's evaluation near a second with the default model."""

    probe_facts: int = 64  # probe facts checked for retention
    heldout_tokens: int = 2048  # tokens of held-out text for perplexity


@dataclass
class EvalResult:
    learning: float | None  # share of the update's facts answered, ingested wording
    learning_heldout: float | None  # same facts, held-out wording (None when none given)
    retention: float  # share of the base-answered probe facts still answered
    forgetting: float  # (retention_before - retention_after) / retention_before, before = 1 on that set
    perplexity: float  # held-out perplexity after the update
    perplexity_change: float | None  # relative change against the reference perplexity
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_update(
    model,
    tokenizer,
    *,
    new_facts: Sequence[dict] = (),
    probe: Sequence[dict] = (),
    heldout_text: Sequence[str] = (),
    reference_perplexity: float | None = None,
    budget: EvalBudget | None = None,
    memory_overlay=None,
) -> EvalResult:
    """Evaluate a model after an update.

    `probe` should hold facts the reference (base/parent) model answers (retention is measured on
    them, so retention_before is 1 by construction). `new_facts` may carry "heldout_question".
    """
    budget = budget or EvalBudget()
    t0 = time.perf_counter()
    kw = {"memory_overlay": memory_overlay} if memory_overlay else {}
    learning = learning_heldout = None
    if new_facts:
        learning = fact_accuracy(model, tokenizer, new_facts, **kw)
        heldout = [f for f in new_facts if f.get("heldout_question")]
        if heldout:
            learning_heldout = fact_accuracy(model, tokenizer, heldout, key="heldout_question", **kw)
    probe = list(probe)[: budget.probe_facts]
    retention = fact_accuracy(model, tokenizer, probe, **kw) if probe else 1.0
    ppl = (
        perplexity_with_overlay(model, tokenizer, heldout_text, budget.heldout_tokens, memory_overlay)
        if heldout_text
        else float("nan")
    )
    change = None
    if reference_perplexity and not math.isnan(ppl):
        change = (ppl - reference_perplexity) / reference_perplexity
    return EvalResult(
        learning=learning,
        learning_heldout=learning_heldout,
        retention=retention,
        forgetting=1.0 - retention,
        perplexity=ppl,
        perplexity_change=change,
        seconds=time.perf_counter() - t0,
        details={"probe_facts": len(probe), "new_facts": len(new_facts)},
    )


def perplexity_with_overlay(model, tokenizer, texts, max_tokens, memory_overlay=None) -> float:
    if not memory_overlay:
        return perplexity(model, tokenizer, texts, max_tokens=max_tokens)
    # the overlay is passed through a thin wrapper so perplexity() stays model-agnostic

    class _WithOverlay(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            return self.inner(*a, memory_overlay=memory_overlay, **k)

    return perplexity(_WithOverlay(model), tokenizer, texts, max_tokens=max_tokens)
