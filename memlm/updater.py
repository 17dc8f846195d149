"""Sparse memory finetuning: teach a model new text by training only a few memory value rows.

    batches -> access counts per memory layer (padding excluded)        memlm.selection.count_accesses
            -> top-t slots per layer by TF-IDF against the background   memlm.selection.select_slots
            -> a trainable (t, d) copy of those rows, passed to every forward as `memory_overlay`
               (gradients reach only those rows: no dense N x d gradient, no masking)
            -> SGD or a row-local Adam for `steps` steps (early stop when `stop_fn` says so)
            -> the rows written into the value tables; a SlotDelta (indices, new rows, old rows)

Everything but the selected rows is bit-identical after an update: other parameters are never handed
to the optimizer, never receive a gradient (their requires_grad is off during the update), and the
final write is an `index_copy_` of the selected rows only. The Adam here is built on the (t, d) row
tensors, so its moments and step counts exist only for the selected rows; a masked Adam/AdamW over the
whole table would move unselected rows through momentum and weight decay (docs/design.md).

Loss scale and learning rate: the loss is summed over target tokens and averaged over sequences
(`loss_reduction="sum"`). With the per-token mean a value row's gradient shrinks with the number of
tokens in the batch (weights 1/(H k) per read, then 1/#tokens), which is why a prototype needed SGD
lr 100-1000; the per-sequence sum keeps one lr valid for short QA forms and long chunks alike.

What the default model taught us (benchmarks/tune_sparse.py, recorded in docs/internals.md): its
memory output dominates the residual stream (norm ~270 against ~16 at the layer input) and value
rows have norms from ~1 (rarely read) to ~35. A fact is learned only when a few rows move by several
times their norm, and 90% of the squared change lands on the ~50 selected rows with the lowest IDF
(slots read by ~40% of background sequences, e.g. at the answer's sub-word positions): that is where
the forgetting comes from. Plain SGD (the paper's optimizer) moves rows in proportion to their
gradient; the row-local Adam moves every selected coordinate by ~lr, which at the lr needed to learn
wrecked every selected row. Two optional levers exist: `max_df` ("stop slots": never select slots read
by more than that share of the background) and `max_row_change` (cap each row's change relative to its
norm); both removed the forgetting on the tuning stream but also the learning (docs/internals.md).
The default keeps those rows but scales each selected row's step by its IDF (`idf_lr_power`): at equal
learning it halved the perplexity damage on the tuning stream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .augment import AugmentSettings, TrainingStream, build_stream, document_facts, trains_text
from .delta import LayerDelta, SlotDelta
from .prefix import FrozenPrefixes, hidden_states, to_device
from .rehearsal import ReplayKL, reached_replay, replay_batch
from .selection import count_accesses, idf, select_slots

Batch = dict[str, torch.Tensor]  # input_ids (B,T), attention_mask (B,T), labels (B,T) with -100 = no loss
Overlay = dict[int, tuple[torch.Tensor, torch.Tensor]]


class BatchSource(Protocol):
    def all_batches(self) -> list[Batch]: ...

    def batch(self, step: int) -> Batch | None: ...


class _ListSource:
    def __init__(self, batches: Sequence[Batch]):
        if not batches:
            raise ValueError("no training batches")
        self.batches = list(batches)

    def all_batches(self) -> list[Batch]:
        return self.batches

    def batch(self, step: int) -> Batch:
        return self.batches[step % len(self.batches)]


@dataclass
class UpdateSettings:
    # Defaults chosen on a tuning stream disjoint from the benchmark's (benchmarks/tune_sparse.py: 12
    # invented facts one per update, retention on 64 probe facts, default model; docs/internals.md): SGD,
    # t=2000, QA forms only, each row's step scaled by its IDF (idf_lr_power 1) at lr 10000 learned 92%
    # with 69% retention and +6.8% perplexity after 12 updates; the same without the IDF scaling (lr 1000)
    # 92% / 64% / +14.5%; the first default (row-local Adam lr 1, t=1000, text too) 100% / 1.6% / +168%.
    # Adam moves every selected coordinate by ~lr whatever its gradient; SGD moves rows in proportion to
    # their gradient.
    top_t: int = 2000  # slots per memory layer (paper: 500 for single facts; our N is 16x smaller)
    steps: int = 60  # maximum optimizer steps per batch of examples (learn_documents: x batches per pass)
    lr: float = 10000.0  # SGD step on the summed loss, before the IDF scaling below (paper: 2-5, mean loss)
    optimizer: str = (
        "sgd"  # "sgd" (plain, no momentum, as in the paper) or "adam" (state for the selected rows only)
    )
    method: str = "tfidf"  # slot ranking: tfidf | tf | random | all (see memlm.selection)
    batch_size: int = 16  # sequences per step; one fact's examples fit in one batch
    loss_reduction: str = "sum"  # "sum": token sum averaged over sequences; "mean": per-token mean
    early_stop: bool = True  # stop once every fact of the update is answered (checked every check_every)
    check_every: int = (
        1  # steps between early-stop checks (a teacher-forced forward; generation only if it passes)
    )
    extra_steps: int = 0  # steps trained after the stop check fires (margin for other wordings)
    grad_clip: float | None = None  # clip the rows' gradient norm (None: no clipping)
    # after every step, each selected row's change is cut back to at most this multiple of its norm before
    # the update (None: unbounded). Bounds the damage to every other input that reads the row.
    max_row_change: float | None = None
    # "stop slots": slots read by more than this share of the background documents are never selected
    # (None: the paper's plain top-t). See the module docstring.
    max_df: float | None = None
    # soft stop slots: each selected row's gradient is scaled by (idf / idf_max) ** idf_lr_power, where
    # idf_max is the IDF of a slot no background document reads (0: off, every row gets the full lr).
    # Rows read by much of the background (low IDF) then move less than rows specific to the new text.
    idf_lr_power: float = 1.0
    # rehearsal: this many background sequences (the formats the service answers in, from
    # memlm.pretrain.format_matched_background) are kept at the pre-update model's predictions by a KL
    # term of weight replay_weight at every step (0: off)
    replay: int = 0
    replay_weight: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)  # standard Adam moments
    adam_eps: float = 1e-8  # standard Adam epsilon
    seed: int = 0  # random-t selection and paraphrase order
    max_seq_len: int = 128  # tokens per training example; longer documents are chunked
    paraphrases: int = 3  # model-free paraphrases per chunk (memlm.augment)
    question_rewrites: int = 4  # training wordings per fact (memlm.augment.TRAINING_QUESTION_TEMPLATES)
    # a document that supplies facts is taught through them (QA forms); its text is trained only when this is
    # True (documents without facts always train on their text). On the tuning stream (SGD lr 3000, t=1000)
    # text + QA learned 75% with +78% perplexity, QA forms only 92% with +33% (retention 23% vs 25%).
    train_text: bool = False
    # run each step from the first memory layer up on the batch's cached frozen states (FrozenPrefixes;
    # same loss and gradients). False: the full forward every step (the baseline of its benchmark)
    cached_prefix: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer {self.optimizer!r} is not 'adam' or 'sgd'")
        if self.loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss reduction {self.loss_reduction!r} is not 'sum' or 'mean'")
        if self.method not in ("tfidf", "tf", "random", "all"):
            raise ValueError(f"selection method {self.method!r} is not tfidf, tf, random or all")
        if self.top_t < 1 and self.method != "all":
            raise ValueError(f"top_t must be >= 1, got {self.top_t}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.max_row_change is not None and self.max_row_change <= 0:
            raise ValueError(f"max_row_change must be > 0 or None, got {self.max_row_change}")
        if self.idf_lr_power < 0:
            raise ValueError(f"idf_lr_power must be >= 0, got {self.idf_lr_power}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes) -> UpdateSettings:
        return UpdateSettings(**{**self.to_dict(), **changes})


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Next-token cross entropy; labels -100 carry no loss. "sum": summed over tokens, averaged over the
    sequences that have a target; "mean": averaged over target tokens."""
    tgt = labels[:, 1:]
    tok = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        tgt.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(tgt.shape)  # (B, T-1)
    valid = tgt != -100
    if reduction == "mean":
        return tok.sum() / valid.sum().clamp(min=1)
    return tok.sum() / valid.any(-1).sum().clamp(min=1)


def batch_loss(
    model,
    batch: Batch,
    overlay: Overlay | None = None,
    reduction: str = "sum",
    prefixes: FrozenPrefixes | None = None,
) -> torch.Tensor:
    """`lm_loss` of a batch, with the LM head applied only where a label is (QA forms train a few answer
    tokens; the vocabulary projection of every other position would be wasted work). `prefixes`: run
    from the first memory layer up on cached frozen states (a values-only update; same result)."""
    labels = batch["labels"]
    h = hidden_states(model, batch, overlay, prefixes)  # (B, T, d)
    tgt = labels[:, 1:]  # (B, T-1): the label of position p is the token at p + 1
    valid = tgt != -100
    logits = model.lm_head(h[:, :-1][valid])  # (n_targets, V)
    tok = F.cross_entropy(logits.float(), tgt[valid], reduction="none")  # (n_targets,)
    if reduction == "mean":
        return tok.sum() / valid.sum().clamp(min=1)
    return tok.sum() / valid.any(-1).sum().clamp(min=1)


@torch.no_grad()
def teacher_forced_hits(
    model, tokenizer, facts: Sequence[dict], overlay: Overlay | None = None
) -> list[bool]:
    """Per fact: does the argmax at every answer position, given the right prefix, equal the answer token?

    If so, greedy decoding produces exactly the answer tokens, so the fact is answered (a sufficient
    condition, one forward instead of a generation). Used as the cheap early-stop pre-check."""
    from .augment import qa_example

    if not facts:
        return []
    device = _device(model)
    rows = [qa_example(tokenizer, f["question"], f["answer"]) for f in facts]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        lab = list(lab)
        # the trailing newline is not needed for an answer: check the answer tokens only
        last = max(j for j, x in enumerate(lab) if x != -100)
        lab[last] = -100
        ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(i)] = 1
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    h = model.model(ids, attention_mask=mask, memory_overlay=overlay)[0]
    pred = model.lm_head(h[:, :-1]).argmax(-1)  # (B, T-1)
    tgt = labels[:, 1:]
    ok = (pred == tgt) | (tgt == -100)
    return [bool(x) for x in ok.all(-1).tolist()]


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def count_batch_accesses(model, batches: Sequence[Batch]) -> dict[int, torch.Tensor]:
    """{memory layer: access counts (N,)} over `batches`, padding excluded."""
    layers = list(model.config.memory_layers)
    n = model.config.memory_size
    counts = {layer: torch.zeros(n, dtype=torch.long) for layer in layers}
    device = _device(model)
    for b in batches:
        b = to_device(b, device)
        out = model(b["input_ids"], attention_mask=b["attention_mask"])
        for layer, idx in zip(layers, out.memory_indices):
            counts[layer] += count_accesses(idx, b["attention_mask"], n)
    return counts


def background_df(background, layer: int) -> tuple[torch.Tensor | None, int]:
    if background is None:
        return None, 0
    return background.df[layer], int(background.num_docs)


def _idf_grad_scale(
    background, selected: dict[int, torch.Tensor], power: float, device
) -> dict[int, torch.Tensor]:
    """Per selected row, (idf / idf_max) ** power as a column to multiply the rows' gradient by."""
    if power == 0:
        return {}
    out = {}
    for layer, idx in selected.items():
        df, num_docs = background_df(background, layer)
        if df is None:
            raise ValueError("idf_lr_power needs background statistics (memlm.background)")
        row_idf = idf(df.cpu()[idx.cpu()], num_docs)
        scale = (row_idf / math.log(num_docs + 1)).clamp(min=0.0) ** power
        out[layer] = scale.to(device=device, dtype=torch.float32).unsqueeze(-1)
    return out


@torch.no_grad()
def _mean_loss(
    model, batches: Sequence[Batch], overlay: Overlay | None, reduction: str, prefixes=None
) -> float:
    device = _device(model)
    total, n = 0.0, 0
    for b in batches:
        b = to_device(b, device)
        total += float(batch_loss(model, b, overlay, reduction, prefixes))
        n += 1
    return total / max(n, 1)


class _FrozenParams:
    """Turn off requires_grad on every parameter for the update; restore the flags afterwards."""

    def __init__(self, model):
        self.params = list(model.parameters())

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)
        return False


@torch.no_grad()
def _limit_row_change(rows: Sequence[torch.Tensor], old: Sequence[torch.Tensor], factor: float) -> None:
    """In place: scale each row's change (row - old) down so that its norm is <= factor * |old row|."""
    for r, o in zip(rows, old):
        change = r - o
        cap = factor * o.norm(dim=-1, keepdim=True)
        scale = (cap / change.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
        r.copy_(o + change * scale)


def sparse_update(
    model,
    batches: Sequence[Batch] | BatchSource,
    background,
    settings: UpdateSettings | None = None,
    stop_fn: Callable[[Any, Overlay], bool] | None = None,
    progress: Callable[[dict], None] | None = None,
    replay: Batch | Callable[[dict[int, torch.Tensor]], Batch | None] | None = None,
    protected: Mapping[int, torch.Tensor] | None = None,
) -> SlotDelta:
    """Train the top-t value rows per memory layer on `batches`; write them into the model; return the
    delta (its `revert` restores the model exactly).

    `replay`: a batch held at the pre-update predictions by a KL term (rehearsal), or a function of the
    selected slots ({layer: ids}) that returns that batch (None: no rehearsal), for rehearsal sets
    chosen by what the update can reach.

    `protected`: {memory layer: bool mask (N,)} of slots never selected (memlm.reach.protected_slots: the
    slots a preservation set of known facts reads); the top-t is then taken among the others.

    `batches`: a list of batches (cycled over the steps) or a source with `all_batches()` (used for
    access counting and the loss report) and `batch(step)` (the batch of a step; None ends training).
    `stop_fn(model, overlay) -> bool` is asked every `check_every` steps whether to stop (e.g. every
    fact answered); `progress(dict)` receives {"step", "steps", "loss"} after each step.
    """
    s = settings or UpdateSettings()
    t0 = time.perf_counter()
    source: BatchSource = batches if hasattr(batches, "batch") else _ListSource(batches)  # type: ignore[arg-type]
    device = _device(model)
    was_training = model.training
    model.eval()  # no dropout in the model; eval keeps any future stochastic layer off
    tables = model.value_tables()

    with _FrozenParams(model):
        all_batches = source.all_batches()
        counts = count_batch_accesses(model, all_batches)
        selected = _select(counts, background, s, protected, device)
        if callable(replay):
            replay = replay(selected)
        old_rows = {layer: tables[layer].detach()[idx].clone() for layer, idx in selected.items()}
        rows = {layer: old_rows[layer].clone().requires_grad_(True) for layer in selected}
        overlay: Overlay = {layer: (selected[layer], rows[layer]) for layer in selected}
        prefixes = FrozenPrefixes(model) if s.cached_prefix else None
        loss_before = _mean_loss(model, all_batches, overlay, s.loss_reduction, prefixes)
        keep = None
        if replay is not None and s.replay_weight > 0:
            keep = ReplayKL(model, replay, device, prefixes)
        scale = _idf_grad_scale(background, selected, s.idf_lr_power, device)
        loop = _RowTraining(model, source, s, rows, old_rows, scale, prefixes)
        loop.run(overlay, keep, stop_fn, progress)
        final = {layer: r.detach().clone() for layer, r in rows.items()}
        loss_after = _mean_loss(
            model, all_batches, {k: (selected[k], final[k]) for k in selected}, s.loss_reduction, prefixes
        )
        with torch.no_grad():
            for layer, idx in selected.items():
                tables[layer].index_copy_(0, idx, final[layer].to(tables[layer].dtype))

    if was_training:
        model.train()
    report = _update_report(s, loop, counts, selected, final, old_rows, protected, keep is not None)
    report.update(loss_before=loss_before, loss_after=loss_after, seconds=time.perf_counter() - t0)
    # the delta holds the rows that actually changed (a selected row whose gradient stayed zero is left
    # out), so its size, the version's slots_changed and the rows a hot swap writes agree
    layers = {}
    for layer in selected:
        moved = (final[layer] != old_rows[layer]).any(-1).cpu()
        layers[layer] = LayerDelta(
            selected[layer].cpu()[moved], final[layer].cpu()[moved], old_rows[layer].cpu()[moved]
        )
    return SlotDelta(layers=layers, report=report)


def _update_report(
    s: UpdateSettings, loop, counts, selected, final, old_rows, protected, replayed: bool
) -> dict:
    """The delta's report (besides the losses and seconds the caller adds)."""
    changed = sum(int((final[k] != old_rows[k]).any(-1).sum()) for k in selected)
    return {
        "method": s.method,
        "optimizer": s.optimizer,
        "t": s.top_t,
        "lr": s.lr,
        "steps": loop.steps_run,
        "max_steps": s.steps,
        "stopped_early": loop.stopped_early,
        "slots_selected": {str(k): int(v.numel()) for k, v in selected.items()},
        "accessed_slots": {str(k): int((c > 0).sum()) for k, c in counts.items()},
        "rows_changed": changed,
        "replay": s.replay if replayed else 0,
        "slots_protected": {str(k): int(v.sum()) for k, v in (protected or {}).items()},
    }


def _select(counts, background, s: UpdateSettings, protected, device) -> dict[int, torch.Tensor]:
    """Per memory layer, the top-t slot ids of the batches' access counts under `s.method`, never a
    protected one."""
    gen = torch.Generator().manual_seed(s.seed)
    selected: dict[int, torch.Tensor] = {}
    for layer, c in counts.items():
        df, num_docs = background_df(background, layer)
        if s.method == "tfidf" and df is None:
            raise ValueError("tfidf selection needs background statistics (memlm.background)")
        mask = None if protected is None else protected.get(layer)
        selected[layer] = select_slots(c, df, num_docs, s.top_t, s.method, gen, s.max_df, mask).to(device)
    return selected


class _RowTraining:
    """The update's optimisation of the selected rows (the overlay's leaves): SGD or Adam, the IDF
    gradient scale, clipping, the row-change limit, optional replay KL, and early stopping asked of
    `stop_fn` every `check_every` steps (then `extra_steps` more)."""

    def __init__(
        self, model, source: BatchSource, s: UpdateSettings, rows, old_rows, grad_scale, prefixes=None
    ):
        self.model, self.source, self.s, self.prefixes = model, source, s, prefixes
        self.rows, self.grad_scale = rows, grad_scale
        self.device = _device(model)
        self.params = [r for r in rows.values() if r.numel()]
        self.old = [old_rows[k] for k, r in rows.items() if r.numel()]
        self.steps_run, self.stopped_early = 0, False

    def _optimizer(self):
        s = self.s
        if not self.params:
            return None
        if s.optimizer == "adam":
            return torch.optim.Adam(self.params, lr=s.lr, betas=s.adam_betas, eps=s.adam_eps)
        return torch.optim.SGD(self.params, lr=s.lr)

    def _step(self, opt, batch: Batch, overlay: Overlay, keep) -> torch.Tensor:
        s, device = self.s, self.device
        loss = batch_loss(self.model, to_device(batch, device), overlay, s.loss_reduction, self.prefixes)
        if keep is not None:
            loss = loss + s.replay_weight * keep.loss(self.model, overlay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for layer, scale in self.grad_scale.items():
            if self.rows[layer].grad is not None:
                self.rows[layer].grad.mul_(scale)
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        opt.step()
        if s.max_row_change is not None:
            _limit_row_change(self.params, self.old, s.max_row_change)
        return loss

    def run(self, overlay: Overlay, keep, stop_fn, progress) -> None:
        s, opt = self.s, self._optimizer()
        extra_left = None
        for step in range(s.steps if opt is not None else 0):
            batch = self.source.batch(step)
            if batch is None:
                self.stopped_early = True
                break
            loss = self._step(opt, batch, overlay, keep)
            self.steps_run += 1
            if progress is not None:
                progress({"step": self.steps_run, "steps": s.steps, "loss": float(loss.detach())})
            if extra_left is not None:
                extra_left -= 1
                if extra_left <= 0:
                    break
            elif s.early_stop and stop_fn is not None and self.steps_run % s.check_every == 0:
                if stop_fn(self.model, {k: (i, r.detach()) for k, (i, r) in overlay.items()}):
                    self.stopped_early = True
                    if s.extra_steps <= 0:
                        break
                    extra_left = s.extra_steps


def facts_stop_fn(tokenizer, facts: dict[str, dict], stream=None) -> Callable[[Any, Overlay], bool]:
    """A stop_fn: True once every fact is answered (greedy decoding, docs/contracts.md). A teacher-forced
    pre-check (one forward) decides which facts are worth a generation. With a TrainingStream, the
    facts answered at each check leave the training batches (per-fact early stopping); a fact that
    drops out of the answers later comes back."""
    from .evaluation import answered

    keys = list(facts)

    def stop(model, overlay: Overlay) -> bool:
        ov = overlay or None
        likely = [
            k
            for k, hit in zip(keys, teacher_forced_hits(model, tokenizer, [facts[k] for k in keys], ov))
            if hit
        ]
        confirmed = (
            answered(model, tokenizer, [facts[k] for k in likely], memory_overlay=ov) if likely else []
        )
        done = {k for k, h in zip(likely, confirmed) if h}
        if stream is not None:
            stream.answered = done
        return len(done) == len(keys)

    return stop


def training_stream(tokenizer, documents: Sequence[dict], settings) -> TrainingStream:
    """The documents' training examples in batches (memlm.augment): chunks, paraphrases and QA forms.

    `settings` is an UpdateSettings or any settings with its augmentation fields (`max_seq_len`,
    `paraphrases`, `question_rewrites`, `seed`, `train_text`, `batch_size`; the benchmark's dense
    baselines pass theirs), so that every method trains on the same examples. Documents with nothing to
    train are an error."""
    aug = AugmentSettings(
        max_seq_len=settings.max_seq_len,
        paraphrases=settings.paraphrases,
        question_rewrites=settings.question_rewrites,
        seed=settings.seed,
        text_examples=trains_text(documents, settings.train_text),
    )
    stream = build_stream(tokenizer, documents, batch_size=settings.batch_size, settings=aug)
    if not stream.examples:
        raise ValueError("documents hold no trainable text or facts")
    return stream


def learn_documents(
    model,
    tokenizer,
    documents: Sequence[dict],
    background,
    settings: UpdateSettings | None = None,
    progress: Callable[[dict], None] | None = None,
    protected: Mapping[int, torch.Tensor] | None = None,
    rehearse: Sequence[str] = (),
    rehearse_reads: Sequence[Mapping[int, torch.Tensor]] | None = None,
) -> SlotDelta:
    """Teach `documents` ({"id", "text", "facts": [{"question", "answer"}], "metadata"}) by sparse
    memory finetuning. Facts the documents supply are trained in QA form too and stop the update once
    all are answered. Mutates the model; the returned delta reverts it exactly.

    `protected`: slots never selected (sparse_update). `rehearse`: texts whose next-token predictions
    the update keeps, as KL(before || now) of weight `replay_weight` beside the `replay` background.
    `rehearse_reads`: each rehearse text's memory reads (memlm.reach.text_reads); with them only the
    texts that read a selected slot are rehearsed, since the others read no row the update can change
    and keep their predictions bit for bit whatever it does (report "rehearsed": how many were)."""
    s = settings or UpdateSettings()
    stream = training_stream(tokenizer, documents, s)
    facts = document_facts(documents)
    stop = facts_stop_fn(tokenizer, facts, stream) if facts and s.early_stop else None
    # `steps` and `check_every` are per batch of examples: an update of many documents gets as many
    # passes over its examples as a one-batch update gets steps, and checks its facts once per pass
    passes = max(1, math.ceil(len(stream.examples) / s.batch_size))
    if passes > 1:
        s = s.replace(steps=s.steps * passes, check_every=max(s.check_every, passes))
    rehearsed = {"texts": len(rehearse)}
    replay: Batch | Callable[[dict[int, torch.Tensor]], Batch | None] | None = None
    if rehearse_reads is not None:
        if len(rehearse_reads) != len(rehearse):
            raise ValueError(f"rehearse_reads: {len(rehearse_reads)} read sets for {len(rehearse)} texts")
        replay = reached_replay(tokenizer, s, rehearse, rehearse_reads, rehearsed)
    elif s.replay > 0 or rehearse:
        replay = replay_batch(tokenizer, s, rehearse)
    delta = sparse_update(
        model, stream, background, s, stop_fn=stop, progress=progress, replay=replay, protected=protected
    )
    delta.report["documents"] = [str(d.get("id", f"doc-{n}")) for n, d in enumerate(documents)]
    delta.report["examples"] = len(stream.examples)
    delta.report["facts"] = len(facts)
    delta.report["rehearsed"] = rehearsed["texts"]
    return delta
