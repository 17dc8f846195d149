"""The pieces of the pretraining loop (memlm.pretrain): thread choice, row sampling, the memory-read
penalties, the optimizers (dense AdamW, SparseAdam on the value tables), gradient clipping over dense
and sparse gradients, and the learning-rate schedule."""

from __future__ import annotations

import math
import os
import platform
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .presets import Preset


def cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class ThreadTuner:
    """Picks the torch thread count (1 or all cores) that gives the faster steps, re-checked now and then.

    On a machine shared with other CPU-heavy processes, two OpenMP threads on two busy cores are several
    times slower than one (threads wait for each other at every barrier): measured 11 s vs 2.2 s per
    default-model step under a load of 8. A trial of the other setting stops after one step when that
    step is clearly slower, and a lost trial doubles the wait before the next one. The choice changes
    speed only, not the training math (up to float summation order).
    """

    def __init__(self, max_threads: int, every: int = 50, probe_steps: int = 3):
        self.options = sorted({1, max_threads})
        self.every, self.probe_steps = every, probe_steps
        self.wait = every
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        self.current = 1 if busy >= max_threads else max_threads  # a busy machine: start with one
        self.recent: list[float] = []  # last step times at the current setting
        self.trial: int | None = None
        self.trial_times: list[float] = []
        self.next_trial = 5
        torch.set_num_threads(self.current)

    def before_step(self, step: int) -> None:
        if len(self.options) > 1 and self.trial is None and step >= self.next_trial and self.recent:
            self.trial = next(o for o in self.options if o != self.current)
            self.trial_times = []
            torch.set_num_threads(self.trial)
        self._step = step

    def after_step(self, seconds: float) -> None:
        if self.trial is None:
            self.recent = (self.recent + [seconds])[-self.probe_steps :]
            return
        self.trial_times.append(seconds)
        base = sorted(self.recent)[len(self.recent) // 2]
        if seconds > 1.3 * base:  # clearly slower: give up at once, wait longer next time
            self._end(won=False)
        elif len(self.trial_times) >= self.probe_steps:
            self._end(won=sorted(self.trial_times)[len(self.trial_times) // 2] < base)

    def _end(self, won: bool) -> None:
        if won:
            self.current, self.recent, self.wait = (
                self.trial,
                self.trial_times[-self.probe_steps :],
                self.every,
            )
        else:
            self.wait *= 2
        self.trial = None
        self.next_trial = self._step + self.wait
        torch.set_num_threads(self.current)


def bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() == "arm64"
    return "avx512_bf16" in flags or "amx_bf16" in flags


class RowSampler:
    """Training rows of `seq_len` tokens, each starting at a document start.

    Wikipedia rows: a random lead start in the stream of all leads (each followed by <|endoftext|>).
    Fact rows: fact texts drawn without replacement (reshuffled each pass) and packed with separators.
    """

    def __init__(
        self,
        wiki_ids: list[list[int]],
        fact_ids: list[list[int]],
        eos: int,
        seq_len: int,
        seed: int,
        fact_marks: list[list[int]] | None = None,
    ):
        """fact_marks: per fact text, token positions to mark (see answer_positions); batch_marked
        returns them as a mask."""
        self.seq_len = seq_len
        self.rng = random.Random(seed)
        stream, starts = [], []
        for ids in wiki_ids:
            starts.append(len(stream))
            stream.extend(ids)
            stream.append(eos)
        self.wiki = torch.tensor(stream, dtype=torch.long)
        self.starts = [s for s in starts if s + seq_len <= len(stream)] or [0]
        self.facts = [ids + [eos] for ids in fact_ids]
        self.marks = fact_marks if fact_marks is not None else [[] for _ in fact_ids]
        self.order: list[int] = []

    def _fact_row(self) -> tuple[list[int], list[int]]:
        row: list[int] = []
        marks: list[int] = []
        while len(row) < self.seq_len:
            if not self.order:
                self.order = list(range(len(self.facts)))
                self.rng.shuffle(self.order)
            i = self.order.pop()
            marks.extend(len(row) + m for m in self.marks[i] if len(row) + m < self.seq_len)
            row.extend(self.facts[i])
        return row[: self.seq_len], marks

    def batch(self, batch_size: int, fact_fraction: float) -> torch.Tensor:
        return self.batch_marked(batch_size, fact_fraction)[0]

    def batch_marked(self, batch_size: int, fact_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) token ids and a (B, T) bool mask of the marked positions of the fact texts packed in."""
        rows = []
        mask = torch.zeros(batch_size, self.seq_len, dtype=torch.bool)
        for b in range(batch_size):
            if self.facts and self.rng.random() < fact_fraction:
                row, marks = self._fact_row()
                rows.append(torch.tensor(row, dtype=torch.long))
                mask[b, marks] = True
            else:
                s = self.rng.choice(self.starts)
                row = self.wiki[s : s + self.seq_len]
                if len(row) < self.seq_len:  # a stream shorter than one row (tiny corpora)
                    row = torch.cat([row, row.new_zeros(self.seq_len - len(row))])
                rows.append(row)
        return torch.stack(rows), mask  # (B, T), (B, T)


ANSWER_MARKER = "\nAnswer:"


def answer_positions(tokenizer, texts: list[str], marker: str = ANSWER_MARKER) -> list[list[int]]:
    """Per text, the token positions whose token ends where `marker` ends: in the QA form the position
    that predicts the first answer token (encoded exactly as encode_texts encodes the text)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    out: list[list[int]] = []
    for text, enc in zip(texts, encodings):
        ends = []
        start = text.find(marker)
        while start >= 0:
            ends.append(start + len(marker))
            start = text.find(marker, start + 1)
        out.append([i for i, (_, end) in enumerate(enc.offsets) if end in ends])
    return out


def read_sharing_penalty(memory, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between the half-queries of every two different marked positions (per head
    and half, running BatchNorm statistics): 0 when the marked positions' queries are orthogonal, 1
    when they all point the same way and so read the same slots. h: (B, T, d) the memory's input."""
    x = h[mask]  # (n, d)
    n = x.shape[0]
    if n < 2:
        return h.new_zeros((), dtype=torch.float32)
    q = F.normalize(memory.half_queries(x).float(), dim=-1)  # (n, H, 2, dk/2)
    q = q.permute(1, 2, 0, 3)  # (H, 2, n, dk/2)
    gram = q @ q.transpose(-1, -2)  # (H, 2, n, n)
    off = ~torch.eye(n, dtype=torch.bool, device=h.device)
    return gram[..., off].pow(2).mean()


BALANCE_TEMPERATURE = 0.1  # of usage_balance_penalty's cosine softmax


def usage_balance_penalty(memory, h: torch.Tensor) -> torch.Tensor:
    """Sub-key load balance over every position of h (B, T, d), per head and half of the product key:
    n * sum_j f_j * p_j over the n sub-keys, with f_j the share of the top-k sub-key picks that went to
    sub-key j (no gradient) and p_j the mean of softmax(cos(query, sub-key) / BALANCE_TEMPERATURE) over
    all n (running BatchNorm statistics); averaged over heads and halves. Cosines, so that the loss
    cannot be met by shrinking the query scale (a flat softmax) without moving a single pick. 1 when picks spread evenly, n / k when every
    position picks the same k sub-keys (so reads the same k*k slots). The softmax over every sub-key
    gives each one a gradient, as the Switch Transformer's router loss does for its experts. (A
    slot-level version with the top-k read weights as p was tried first: inside the top-k the gradient
    only moves weight between the picked slots, and it made the reads more concentrated, not less.)"""
    x = h.reshape(-1, h.shape[-1])
    q = memory.half_queries(x).float()  # (m, H, 2, dk/2)
    sub = torch.einsum("mhcd,hcnd->mhcn", q, memory.subkeys.float())  # (m, H, 2, n): what top-k ranks
    cos = torch.einsum("mhcd,hcnd->mhcn", F.normalize(q, dim=-1), F.normalize(memory.subkeys.float(), dim=-1))
    n = sub.shape[-1]
    picks = sub.detach().topk(memory.topk, dim=-1).indices.permute(1, 2, 0, 3).reshape(*sub.shape[1:3], -1)
    f = torch.zeros_like(sub[0]).scatter_add_(-1, picks, torch.ones_like(picks, dtype=sub.dtype))
    f = f / picks.shape[-1]  # (H, 2, n): share of the picks per sub-key
    p = (cos / BALANCE_TEMPERATURE).softmax(-1).mean(0)  # (H, 2, n)
    return (n * (f * p).sum(-1)).mean()


def _param_groups(model: torch.nn.Module, weight_decay: float, value_lr_mult: float = 1.0) -> list[dict]:
    decay, no_decay, values = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # memory values are read sparsely: decay would shrink rows that no token reads
        if "values" in name:
            values.append(p)
        elif p.dim() < 2 or "embed" in name or "subkeys" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
        {"params": values, "weight_decay": 0.0, "lr_mult": value_lr_mult},
    ]


class Optimizers:
    """AdamW on the dense parameters; with `sparse_values`, SparseAdam (lazy: a row's moments and value
    change only in steps that read it) on the memory value tables. One object with the optimizer
    interface the training loop uses (param_groups, zero_grad, step)."""

    def __init__(self, model: torch.nn.Module, p: Preset):
        groups = _param_groups(model, p.weight_decay, p.memory_value_lr_mult)
        for m in model.memory_modules().values():
            m.bn_update = True  # query BatchNorm (if any) learns its statistics during pretraining only
        self.sparse = None
        if p.sparse_values:
            for m in model.memory_modules().values():
                m.values.sparse = True
            values = groups.pop()  # the value tables (no weight decay either way)
            self.sparse = torch.optim.SparseAdam(
                [{"params": values["params"], "lr_mult": values["lr_mult"]}],
                lr=p.lr,
                betas=(0.9, 0.95),
                eps=1e-8,
            )
        self.dense = torch.optim.AdamW(groups, lr=p.lr, betas=(0.9, 0.95), eps=1e-8)
        self.param_groups = self.dense.param_groups + (self.sparse.param_groups if self.sparse else [])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.dense.zero_grad(set_to_none=set_to_none)
        if self.sparse is not None:
            self.sparse.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.dense.step()
        if self.sparse is not None:
            self.sparse.step()


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """clip_grad_norm_ for a mix of dense and sparse gradients: one global L2 norm over both (a sparse
    gradient is coalesced first, so a row read twice counts once with its summed gradient)."""
    grads = []
    for prm in params:
        if prm.grad is None:
            continue
        if prm.grad.is_sparse:
            prm.grad = prm.grad.coalesce()
            grads.append(prm.grad._values())
        else:
            grads.append(prm.grad)
    if not grads:
        return 0.0
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = max_norm / (float(total) + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return float(total)


def lr_factor(progress: float, step: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
