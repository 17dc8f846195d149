"""Pretraining of the default (and tiny) memory-layer model from the offline corpus.

    corpus (memlm.data) -> byte-level BPE (memlm.tokenizer) -> MemoryLMForCausalLM trained with AdamW,
    warmup + cosine, bf16 autocast on CPUs that support it -> evaluation (probe facts in both
    wordings, held-out perplexity, generation speed) -> background statistics -> model directory

Training rows start at document starts (so a prompt at position 0 looks like training data). A share
`fact_fraction` of the rows is packed from the fact texts (statements and QA forms of the probe facts):
the facts are oversampled so that the model learns them. The schedule runs to `max_steps`, or ends
early at `time_budget_s` (the learning rate follows whichever is further along), so a slow or busy
machine still finishes in time.

The model directory is built in a temporary sibling and renamed into place at the end, so a crash never
leaves a half model behind.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .background import DEFAULT_UNIT, compute_background, model_base_id
from .config import MemoryLMConfig
from .data import build_corpus
from .modeling import MemoryLMForCausalLM
from .tokenizer import build_tokenizer, encode_texts


@dataclass(frozen=True)
class Preset:
    name: str
    # model
    vocab_size: int = 8192  # byte-level BPE size
    hidden_size: int = 256
    num_hidden_layers: int = 4  # memory in layer 2; 6 layers learn more slowly per CPU second
    num_attention_heads: int = 8
    intermediate_size: int = 1024
    # the block whose FFN is the memory (None: the middle one, layer 2 of 4). A later block's query has
    # passed more attention layers, so it carries more of the context (the entity) at the answer position
    memory_layer: int | None = None
    memory_size: int = 65536  # 256 x 256 product keys
    memory_heads: int = 4
    memory_topk: int = 32
    memory_key_dim: int = 128
    memory_query_norm: bool = True  # RMS norm of each head's query
    memory_query_bn: bool = False  # BatchNorm over the query features (spreads slot usage)
    max_position_embeddings: int = 512
    # data
    max_wiki: int | None = None  # Wikipedia leads kept (None: all)
    max_probe: int | None = None  # probe facts kept (None: all)
    probe_cities: int = 0  # large-city facts added to the capitals in the probe set (0..150)
    fact_fraction: float = 0.5  # share of training rows packed from fact texts
    seq_len: int = 128
    batch_size: int = 16
    # optimisation
    max_steps: int = 2000
    time_budget_s: float | None = 16 * 60  # training stops here at the latest (evaluation comes after)
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.1  # on dense matrices only (not on memory values, embeddings, norms)
    memory_value_lr_mult: float = 30.0  # value rows are read sparsely; at 1x they barely left their init
    # (row norm 1.01 after the 16-minute build) and updates had to move them far enough to break every
    # fact sharing their slots; at 30x (tiny preset, 6 invented facts, t=64, Adam lr 1) learning went
    # 0% -> 100% at 7% forgetting
    # train the value tables with sparse gradients and a lazy Adam that touches only the rows a batch read
    # (torch.optim.SparseAdam); the dense AdamW step over a 262,144 x 256 table is what made larger memories
    # several times slower per step. False: the dense AdamW of the first default builds.
    sparse_values: bool = False
    # served-format prompts of further invented facts in the background ("Question: {rewrite}\nAnswer: {a}",
    # the rewrites the updater trains on): slots every question reads at its fixed prefix get the df of
    # the served format's real share instead of the few hundred QA forms above (see served_background)
    background_served_facts: int = 0
    # facts about invented entities (several attributes' relations, every corpus wording of each) added
    # to the pretraining facts: a memory that must hold many entities' facts has to key its slots on the
    # entity, not on the question format (knowledge augmentation: Allen-Zhu & Li, arXiv 2309.14316).
    # Never an entity of a measured stream; never in the probe.
    pretrain_invented_facts: int = 0
    # weight of a read-sharing penalty at the answer position of the QA form ("...\nAnswer:" predicts the
    # first answer token): the mean squared cosine between the half-queries of two different facts in a
    # batch, per head and half. Two queries that point apart read different slots, so a question's reads
    # there are keyed by its entity rather than by the shared format (0: off, the plain LM loss)
    answer_read_penalty: float = 0.0
    # what the penalty trains: "query" (the memory's query projection and BatchNorm only; the hidden state
    # it reads is detached, so the layers below keep training on the LM loss alone) or "model" (the
    # gradient also reaches every layer below the memory)
    answer_read_penalty_scope: str = "query"
    # weight of a sub-key usage balance loss at every position (usage_balance_penalty below: 1 when every
    # sub-key is picked equally often, larger as reads pile onto a few hub slots; the Switch Transformer's
    # load-balancing loss, Fedus et al., arXiv 2101.03961, on each head's two sub-key choices). Trains
    # what answer_read_penalty_scope says (0: off)
    usage_balance_penalty: float = 0.0
    background_matched_facts: int = 400  # invented-entity facts in the pretraining templates added to the
    # background text, so slots read by the question/statement templates get a high df (low IDF)
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast where the CPU/GPU supports it (about 2x on AVX512-BF16 CPUs)
    # evaluation
    eval_texts: int = 200  # held-out texts for perplexity (also stored in probe.json)
    background_unit: str = DEFAULT_UNIT

    def __post_init__(self) -> None:
        if self.answer_read_penalty_scope not in ("query", "model"):
            raise ValueError(
                f"answer_read_penalty_scope: expected 'query' or 'model', got {self.answer_read_penalty_scope!r}"
            )
        if self.answer_read_penalty < 0:
            raise ValueError(f"answer_read_penalty: must be >= 0, got {self.answer_read_penalty}")
        if self.usage_balance_penalty < 0:
            raise ValueError(f"usage_balance_penalty: must be >= 0, got {self.usage_balance_penalty}")

    def model_config(self) -> MemoryLMConfig:
        return MemoryLMConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            memory_layers=None if self.memory_layer is None else [self.memory_layer],
            memory_size=self.memory_size,
            memory_heads=self.memory_heads,
            memory_topk=self.memory_topk,
            memory_key_dim=self.memory_key_dim,
            memory_query_norm=self.memory_query_norm,
            memory_query_bn=self.memory_query_bn,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=0,
        )


PRESETS: dict[str, Preset] = {
    # tests: well under a minute on 2 cores; knows a few dozen capitals
    "tiny": Preset(
        name="tiny",
        vocab_size=640,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        memory_size=1024,  # 32 x 32
        memory_heads=2,
        memory_topk=8,
        memory_key_dim=32,
        max_wiki=400,
        max_probe=40,
        probe_cities=150,
        fact_fraction=0.5,
        seq_len=64,
        batch_size=16,
        max_steps=300,
        time_budget_s=None,  # step-bound: the same tiny model on any machine
        lr=5e-3,
        warmup_steps=20,
        eval_texts=40,
    ),
    # the default model: <= 20 minutes on 2 CPU cores including evaluation and background statistics
    "default": Preset(name="default"),
}


# the type a field whose default is None takes when set (--set memory_layer=3)
_NONE_DEFAULT_TYPES: dict[str, type] = {"memory_layer": int, "max_wiki": int, "max_probe": int}


def preset_with(name: str, assignments: list[str]) -> Preset:
    """The preset `name` with fields overridden by "FIELD=VALUE" strings (VALUE parsed as JSON, else
    taken as a string): one command line reproduces an experiment's model. Unknown fields or values of
    the wrong type raise ValueError naming the field."""
    import dataclasses

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[name]
    fields = {f.name: f for f in dataclasses.fields(Preset)}
    changes: dict = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        if key not in fields or key == "name":
            raise ValueError(
                f"--set {key}: not a preset field (fields: {', '.join(k for k in fields if k != 'name')})"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        current = getattr(base, key)
        expected = type(current) if current is not None else _NONE_DEFAULT_TYPES.get(key)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        wrong_bool = expected is int and isinstance(value, bool)
        if expected is not None and value is not None and (wrong_bool or not isinstance(value, expected)):
            raise ValueError(f"--set {key}: expected {expected.__name__}, got {raw!r}")
        changes[key] = value
    return dataclasses.replace(base, **changes) if changes else base


def _threads() -> int:
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


def _bf16_ok(device: torch.device) -> bool:
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


def format_matched_background(n: int, seed: int) -> list[str]:
    """Statements and QA forms of `n` invented entities (a seed of their own, never a benchmark's):
    background text in the same formats as the pretraining facts, disjoint from every split."""
    if n <= 0:
        return []
    from .data.corpus import fact_texts
    from .data.invented import unmeasured_facts
    from .data.templates import INVENTED_RELATIONS

    texts: list[str] = []
    for f in unmeasured_facts(n, seed=10_000 + seed):
        texts.extend(fact_texts(INVENTED_RELATIONS[f["relation"]], f["subject"], f["answer"]))
    return texts


def invented_pretraining_texts(n: int, seed: int) -> list[str]:
    """Every corpus wording (statements and the QA form) of `n` invented facts, a seed of their own
    (disjoint generator from the background's format-matched and served-format facts)."""
    return format_matched_background(n, seed + 10_000)  # 20_000 + seed: format_matched uses 10_000 + seed


def served_background(n: int, seed: int) -> list[str]:
    """`n` question-answer texts in the served format, one per invented fact (a seed of its own, disjoint
    from the benchmark and tuning streams), each question wrapped in one of the training rewrites in turn
    (memlm.augment.TRAINING_QUESTION_TEMPLATES). Background statistics only: never trained on."""
    if n <= 0:
        return []
    from .augment import TRAINING_QUESTION_TEMPLATES
    from .data.invented import unmeasured_facts
    from .evaluation import format_question

    wraps = TRAINING_QUESTION_TEMPLATES
    return [
        f"{format_question(wraps[i % len(wraps)].format(q=f['question']))} {f['answer']}\n"
        for i, f in enumerate(unmeasured_facts(n, seed=30_000 + seed))
    ]


def background_texts(corpus, p: Preset | dict, seed: int) -> list[str]:
    """The texts the background statistics count: the corpus's background split, format-matched facts and
    served-format prompts (sizes from the preset, or from a saved report's preset_settings dict)."""
    get = (lambda k: int(p.get(k, 0) or 0)) if isinstance(p, dict) else (lambda k: int(getattr(p, k)))
    return (
        corpus.background
        + format_matched_background(get("background_matched_facts"), seed)
        + served_background(get("background_served_facts"), seed)
    )


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


class _Optimizers:
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


def _lr_factor(progress: float, step: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def generation_speed(model, tokenizer, prompt: str, new_tokens: int = 64) -> tuple[float, str]:
    """Greedy tokens/s with the KV cache (batch 1), and the generated text."""
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # warm-up
    t0 = time.perf_counter()
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    dt = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    return n / dt, tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished build into place; an existing directory is replaced only after the move."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def pretrain(
    preset: str | Preset = "default",
    out_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str | None = None,
) -> Path:
    """Build the tokenizer and model of `preset` into `out_dir`; returns the model directory.

    Writes config.json, model.safetensors, tokenizer files, probe.json, splits.json,
    training_report.json and background.safetensors.
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if out_dir is None:
        from .paths import default_model_dir

        out_dir = default_model_dir(p.name)
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.build-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is readable like any other
    previous = None
    if threading.current_thread() is threading.main_thread():  # `kill` cleans up like Ctrl-C
        previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        report = _build(p, tmp, seed, progress, device)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if progress:
        print(f"model written to {out}")
        print(json.dumps(_summary(report), indent=2))
    return out


def _summary(report: dict) -> dict:
    keys = ["preset", "params_total", "params_memory", "seconds_total", "seconds_train", "tokens_seen",
            "final_loss", "probe_accuracy", "probe_accuracy_heldout", "heldout_perplexity",
            "generation_tokens_per_s", "memory_usage", "model_dir_bytes"]  # fmt: skip
    return {k: report[k] for k in keys if k in report}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _build(p: Preset, out: Path, seed: int, progress: bool, device_name: str | None) -> dict:
    from .evaluation import fact_accuracy, perplexity

    t_start = time.perf_counter()
    threads = _threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))

    corpus = build_corpus(seed, max_wiki=p.max_wiki, max_probe=p.max_probe, probe_cities=p.probe_cities)
    extra = invented_pretraining_texts(p.pretrain_invented_facts, seed)
    corpus.fact_texts.extend(extra)
    corpus.pretrain.extend(extra)
    _log(progress, f"corpus: {len(corpus.pretrain)} pretraining texts ({len(corpus.fact_texts)} fact texts), "
         f"{len(corpus.background)} background, {len(corpus.evaluation)} evaluation, {len(corpus.probe)} probe facts")  # fmt: skip
    tokenizer = build_tokenizer(corpus.pretrain, p.vocab_size, model_max_length=p.max_position_embeddings)
    fact_set = set(corpus.fact_texts)
    wiki_texts = [t for t in corpus.pretrain if t not in fact_set]
    wiki_ids = encode_texts(tokenizer, wiki_texts)
    fact_ids = encode_texts(tokenizer, corpus.fact_texts)
    marks = answer_positions(tokenizer, corpus.fact_texts) if p.answer_read_penalty > 0 else None
    sampler = RowSampler(wiki_ids, fact_ids, tokenizer.eos_token_id, p.seq_len, seed, fact_marks=marks)
    _log(progress, f"tokenizer: {len(tokenizer)} tokens; pretraining stream {len(sampler.wiki)} tokens "
         f"+ {sum(map(len, fact_ids))} fact tokens")  # fmt: skip

    config = p.model_config()
    config.vocab_size = len(tokenizer)
    model = MemoryLMForCausalLM(config).to(dev)
    params_total = sum(t.numel() for t in model.parameters())
    params_memory = sum(t.numel() for m in model.memory_modules().values() for t in m.parameters())
    optimizer = _Optimizers(model, p)
    use_bf16 = p.bf16 and _bf16_ok(dev)

    model.train()
    tuner = ThreadTuner(threads, every=50)
    t_train = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=p.max_steps, desc=f"pretrain {p.name}", unit="step", dynamic_ncols=True)
    step, tokens, ema = 0, 0, None
    stopped_by = "steps"
    memories = model.memory_modules()
    memory_inputs: dict[int, torch.Tensor] = {}
    hooks, share_ema, balance_ema = None, None, None
    detach = p.answer_read_penalty_scope == "query"
    if p.answer_read_penalty > 0 or p.usage_balance_penalty > 0:  # the memory's input, for the penalties

        def _capture(layer: int):
            def hook(module, args):
                memory_inputs[layer] = args[0]

            return hook

        hooks = [m.register_forward_pre_hook(_capture(i)) for i, m in memories.items()]
    for step in range(p.max_steps):
        elapsed = time.perf_counter() - t_train
        if p.time_budget_s is not None and elapsed >= p.time_budget_s:
            stopped_by = "time"
            break
        frac = step / p.max_steps
        if p.time_budget_s:
            frac = max(frac, elapsed / p.time_budget_s)
        for g in optimizer.param_groups:
            g["lr"] = p.lr * g["lr_mult"] * _lr_factor(frac, step, p.warmup_steps, p.min_lr_ratio)
        tuner.before_step(step)
        t_step = time.perf_counter()
        x, marked = sampler.batch_marked(p.batch_size, p.fact_fraction)
        x, marked = x.to(dev), marked.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=x, labels=x).loss
            inputs = {i: memory_inputs[i].detach() if detach else memory_inputs[i] for i in memory_inputs}
            if p.answer_read_penalty > 0:
                share = sum(read_sharing_penalty(m, inputs[i], marked) for i, m in memories.items())
                share_ema = (
                    float(share.detach())
                    if share_ema is None
                    else 0.95 * share_ema + 0.05 * float(share.detach())
                )
                loss = loss + p.answer_read_penalty * share
            if p.usage_balance_penalty > 0:
                balance = sum(usage_balance_penalty(m, inputs[i]) for i, m in memories.items()) / len(
                    memories
                )
                balance_ema = (
                    float(balance) if balance_ema is None else 0.95 * balance_ema + 0.05 * float(balance)
                )
                loss = loss + p.usage_balance_penalty * balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(model.parameters(), p.grad_clip)
        optimizer.step()
        tokens += x.numel()
        tuner.after_step(time.perf_counter() - t_step)
        value = loss.item()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                lr = optimizer.param_groups[0]["lr"]
                extra = {} if share_ema is None else {"share": f"{share_ema:.3f}"}
                if balance_ema is not None:
                    extra["balance"] = f"{balance_ema:.2f}"
                bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", threads=tuner.current, **extra)
    else:
        step = p.max_steps
    for handle in hooks or []:
        handle.remove()
    if bar is not None:
        bar.close()
    seconds_train = time.perf_counter() - t_train
    _log(
        progress,
        f"trained {step} steps ({stopped_by}), {tokens} tokens in {seconds_train:.0f} s, loss {ema:.3f}",
    )

    torch.set_num_threads(tuner.current)
    for m in model.memory_modules().values():
        m.bn_update = False
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

    t_eval = time.perf_counter()
    probe = corpus.probe
    acc = fact_accuracy(model, tokenizer, probe)
    acc_heldout = fact_accuracy(model, tokenizer, probe, key="heldout_question")
    eval_texts = corpus.evaluation[: p.eval_texts]
    ppl = perplexity(model, tokenizer, eval_texts, max_length=p.seq_len)
    gen_tps, sample = generation_speed(model, tokenizer, "The capital of France is")
    _, sample_qa = generation_speed(model, tokenizer, "Question: What is the capital of Japan?\nAnswer:", 8)
    from .data.templates import QA_TEMPLATE
    from .usage import memory_usage

    usage = memory_usage(
        model,
        tokenizer,
        eval_texts,
        [QA_TEMPLATE.format(question=f["question"], answer=f["answer"]).rstrip("\n") for f in probe],
        seq_len=p.seq_len,
    )
    seconds_eval = time.perf_counter() - t_eval
    _log(progress, f"probe {acc:.1%} (held-out wording {acc_heldout:.1%}), held-out perplexity {ppl:.1f}, "
         f"{gen_tps:.0f} tokens/s")  # fmt: skip

    t_bg = time.perf_counter()
    base_id = model_base_id(out)
    stats = compute_background(
        model,
        tokenizer,
        background_texts(corpus, p, seed),
        unit=p.background_unit,
        seq_len=p.seq_len,
        base_id=base_id,
    )
    stats.meta["served_facts"] = p.background_served_facts
    stats.save(out)
    seconds_background = time.perf_counter() - t_bg

    (out / "probe.json").write_text(
        json.dumps({"facts": probe, "heldout_texts": eval_texts, "seed": seed}, indent=1, ensure_ascii=False)
    )
    (out / "splits.json").write_text(json.dumps(corpus.split_hashes(), indent=2))
    report = {
        "preset": p.name,
        "preset_settings": asdict(p),
        "seed": seed,
        "device": str(dev),
        "threads": threads,
        "bf16_autocast": use_bf16,
        "torch": torch.__version__,
        "params_total": params_total,
        "params_memory": params_memory,
        "memory_slots": config.memory_size,
        "memory_layers": config.memory_layers,
        "vocab_size": len(tokenizer),
        "steps": step,
        "stopped_by": stopped_by,
        "tokens_seen": tokens,
        "pretrain_stream_tokens": int(len(sampler.wiki)),
        "fact_tokens": sum(map(len, fact_ids)),
        "final_loss": ema,
        "final_read_sharing": share_ema,  # read_sharing_penalty's EMA at the end (None: penalty off)
        "final_usage_balance": balance_ema,  # usage_balance_penalty's EMA at the end (None: off)
        "seconds_train": seconds_train,
        "seconds_eval": seconds_eval,
        "seconds_background": seconds_background,
        "probe_facts": len(probe),
        "probe_accuracy": acc,
        "probe_accuracy_heldout": acc_heldout,
        "heldout_perplexity": ppl,
        "heldout_perplexity_texts": len(eval_texts),
        "generation_tokens_per_s": gen_tps,
        "sample_prompt": "The capital of France is",
        "sample_generation": sample,
        "sample_qa": sample_qa,
        "background": {"unit": stats.unit, "num_docs": stats.num_docs, **stats.meta},
        # memlm.usage on the held-out texts and the probe QA texts, per memory layer
        "memory_usage": {str(k): v for k, v in usage.items()},
        "background_slots_read_share": {str(k): float((df > 0).float().mean()) for k, df in stats.df.items()},
        "model_dir_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        "base_id": base_id,
    }
    report["seconds_total"] = time.perf_counter() - t_start
    (out / "training_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report
