"""Which memory slots a sparse update may train (Lin et al. 2025, "Continual Learning via Sparse Memory
Finetuning", section 3).

    batch -> forward -> memory indices (B, T, H, k) per memory layer
          -> access counts c(i): one access per (non-padding token, head, top-k index)
          -> TF-IDF score(i) = c(i) / sum_j c(j) * log((|B| + 1) / (df(i) + 1))
          -> the t highest-scoring accessed slots

`df(i)` is the number of background documents (batches or sequences, see memlm.background) in which
slot i was accessed, `|B|` their number. A slot that every background document reads scores 0: it is
generic, and training it would disturb everything. Only accessed slots are ever candidates: a slot the
batch never reads gets no gradient, so selecting it would only waste the budget.
"""

from __future__ import annotations

import math

import torch

METHODS = ("tfidf", "tf", "random", "all")


def count_accesses(
    indices: torch.Tensor, attention_mask: torch.Tensor | None, num_slots: int
) -> torch.Tensor:
    """Access counts per slot: LongTensor (num_slots,).

    indices: (B, T, H, k) slot ids read by one memory layer; attention_mask: (B, T), 0 marks padding
    (None: every position counts).
    """
    if indices.dim() != 4:
        raise ValueError(f"indices must be (B, T, H, k), got shape {tuple(indices.shape)}")
    if attention_mask is None:
        real = indices.reshape(-1)
    else:
        if attention_mask.shape != indices.shape[:2]:
            raise ValueError(
                f"attention mask {tuple(attention_mask.shape)} does not match indices (B, T) {tuple(indices.shape[:2])}"
            )
        real = indices[attention_mask.to(indices.device).bool()].reshape(-1)  # (n_real * H * k,)
    return torch.bincount(real.long().cpu(), minlength=num_slots)[:num_slots]


def tfidf_scores(counts: torch.Tensor, df: torch.Tensor, num_docs: int) -> torch.Tensor:
    """score(i) = c(i) / sum_j c(j) * log((num_docs + 1) / (df(i) + 1)), in float64 (N,)."""
    if counts.shape != df.shape:
        raise ValueError(f"counts {tuple(counts.shape)} and df {tuple(df.shape)} differ in shape")
    c = counts.to(torch.float64)
    total = c.sum()
    tf = c / total if total > 0 else c
    idf = torch.log(torch.tensor(float(num_docs + 1), dtype=torch.float64)) - torch.log(
        df.to(torch.float64).cpu() + 1.0
    )
    return tf.cpu() * idf


def _top(scores: torch.Tensor, candidates: torch.Tensor, t: int) -> torch.Tensor:
    """The t candidates with the highest score; ties go to the lower slot id (stable, deterministic)."""
    order = torch.sort(scores[candidates], descending=True, stable=True).indices
    return candidates[order[:t]]


def select_slots(
    counts: torch.Tensor,
    df: torch.Tensor | None,
    num_docs: int,
    t: int,
    method: str = "tfidf",
    generator: torch.Generator | None = None,
    max_df: float | None = None,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted LongTensor of the slots to train, chosen among the accessed ones (counts > 0).

    tfidf: top-t by TF-IDF; tf: top-t by access count; random: t accessed slots drawn uniformly;
    all: every accessed slot (t ignored). `df` may be None only for tf, random and all.
    `max_df` (tfidf only): "stop slots" -- slots read by more than this share of the background
    documents are never candidates, however often the batch reads them (see UpdateSettings.max_df).
    `protected` (any method): a bool mask (N,) of slots that are never candidates, e.g. the slots a
    preservation set of known facts reads (memlm.reach.protected_slots).
    """
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; choose one of {', '.join(METHODS)}")
    counts = counts.cpu()
    candidates = torch.nonzero(counts > 0).flatten()  # ascending slot ids
    if protected is not None:
        if protected.shape != counts.shape:
            raise ValueError(
                f"protected mask has shape {tuple(protected.shape)}, counts {tuple(counts.shape)}"
            )
        candidates = candidates[~protected.cpu().bool()[candidates]]
    if method == "all":
        return candidates
    if t < 0:
        raise ValueError(f"top-t must be >= 0, got {t}")
    if method == "tfidf":
        if df is None:
            raise ValueError("tfidf selection needs background df counts")
        if max_df is not None:
            if not 0 < max_df <= 1:
                raise ValueError(f"max_df must be in (0, 1], got {max_df}")
            candidates = candidates[df.cpu()[candidates] <= max_df * num_docs]
        chosen = _top(tfidf_scores(counts, df, num_docs), candidates, t)
    elif method == "tf":
        chosen = _top(counts.to(torch.float64), candidates, t)
    else:  # random
        perm = torch.randperm(candidates.numel(), generator=generator)
        chosen = candidates[perm[:t]]
    return torch.sort(chosen).values


def idf(df: torch.Tensor, num_docs: int) -> torch.Tensor:
    """log((num_docs + 1) / (df + 1)) per slot (float64): reports, plots and the updater's IDF-scaled steps."""
    return torch.full(df.shape, math.log(num_docs + 1), dtype=torch.float64) - torch.log(
        df.to(torch.float64) + 1
    )
