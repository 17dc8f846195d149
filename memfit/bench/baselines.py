"""Baselines for the continual-learning benchmark, on the same documents, augmentations and early stopping
as the sparse updater (memlm.updater.learn_documents):

- `full_finetune`: AdamW on every parameter (weight decay 0 by default, kinder to retention than 0.1).
- `LoRAUpdater`: one LoRA adapter (peft, injected in place on `qkv`, `o_proj`, `gate_up`, `down`) kept
  through the stream and trained at each update; `merge()` folds it into the weights.
- memory finetuning of every accessed slot (`method="all"`), TF-only ranking (`"tf"`) and random-t
  (`"random"`): `memory_baseline(...)`, i.e. learn_documents with another selection method.
- `BM25Retriever`: no training; the best-matching ingested passage is prepended to the prompt.

Every trainer mutates the model it is given (the benchmark starts each method from the same
checkpoint) and returns a report dict with the same keys as a SlotDelta report where they apply.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from memlm.augment import document_facts
from memlm.delta import SlotDelta
from memlm.evaluation import format_question, greedy_complete, is_answered
from memlm.updater import UpdateSettings, batch_loss, facts_stop_fn, learn_documents, training_stream

LORA_TARGETS = ["qkv", "o_proj", "gate_up", "down"]


@dataclass
class DenseSettings:
    steps: int = 40  # maximum optimizer steps per update (early stopping usually ends sooner)
    lr: float = 1e-4  # AdamW lr; chosen per method on the dev stream by the benchmark
    weight_decay: float = 0.0  # AdamW decay; 0 so that untouched knowledge is not decayed away
    batch_size: int = 16  # sequences per step (one fact's examples fit in one batch)
    loss_reduction: str = "sum"  # same loss as the sparse updater (memlm.updater.lm_loss)
    early_stop: bool = True  # stop once every fact of the update is answered
    check_every: int = 1  # steps between early-stop checks (memlm.updater.facts_stop_fn)
    grad_clip: float | None = 1.0  # gradient-norm clip over the trained parameters
    lora_rank: int = 8  # LoRA rank r
    lora_alpha: float = 16.0  # LoRA scale alpha (effective scale alpha / r)
    seed: int = 0  # paraphrase order
    max_seq_len: int = 128  # tokens per training example
    paraphrases: int = 3  # model-free paraphrases per chunk (memlm.augment)
    question_rewrites: int = 4  # training question wordings per fact
    train_text: bool = False  # as UpdateSettings.train_text: documents with facts train their QA forms only
    # batch_size, seed, max_seq_len, paraphrases, question_rewrites, train_text: the training stream
    # (memlm.updater.training_stream, the same builder as the sparse updater's)

    def to_dict(self) -> dict:
        return asdict(self)


def train_parameters(
    model,
    tokenizer,
    documents: Sequence[dict],
    params: list[torch.Tensor],
    settings: DenseSettings,
    method: str,
    progress: Callable[[dict], None] | None = None,
) -> dict:
    """AdamW on `params` over the documents' training stream, with per-fact early stopping."""
    s = settings
    t0 = time.perf_counter()
    stream = training_stream(tokenizer, documents, s)
    facts = document_facts(documents)
    stop = facts_stop_fn(tokenizer, facts, stream) if facts and s.early_stop else None
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    model.eval()  # no dropout in the model; eval keeps generation and training alike

    def loss_of(b):
        return batch_loss(model, {k: v.to(device) for k, v in b.items()}, None, s.loss_reduction)

    with torch.no_grad():
        loss_before = sum(float(loss_of(b)) for b in stream.all_batches()) / len(stream.all_batches())
    steps, stopped = 0, False
    for step in range(s.steps):
        batch = stream.batch(step)
        if batch is None:
            stopped = True
            break
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        steps += 1
        if progress is not None:
            progress({"step": steps, "steps": s.steps, "loss": float(loss.detach())})
        if stop is not None and steps % s.check_every == 0 and stop(model, {}):
            stopped = True
            break
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss_after = sum(float(loss_of(b)) for b in stream.all_batches()) / len(stream.all_batches())
    return {
        "method": method,
        "lr": s.lr,
        "steps": steps,
        "max_steps": s.steps,
        "stopped_early": stopped,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "seconds": time.perf_counter() - t0,
        "params_trained": sum(p.numel() for p in params),
        "documents": [str(d.get("id", f"doc-{n}")) for n, d in enumerate(documents)],
    }


def full_finetune(
    model, tokenizer, documents: Sequence[dict], settings: DenseSettings | None = None, progress=None
) -> dict:
    """Full finetuning: AdamW on all parameters (mutates the model)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        return train_parameters(
            model, tokenizer, documents, params, settings or DenseSettings(), "full", progress
        )
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None


class LoRAUpdater:
    """A LoRA adapter injected in place into `model` (peft), trained update after update.

    The model object keeps its class and forward signature (the adapter lives inside its Linear layers),
    so the evaluation code runs on it unchanged. Only the adapter's parameters train."""

    def __init__(self, model, settings: DenseSettings | None = None):
        from peft import LoraConfig, inject_adapter_in_model

        self.settings = settings or DenseSettings()
        s = self.settings
        for p in model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(
            r=s.lora_rank, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS
        )
        self.model = inject_adapter_in_model(config, model)
        self.params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        if not self.params:
            raise ValueError(f"no LoRA parameters injected; target modules {LORA_TARGETS} not found")

    def learn(self, tokenizer, documents: Sequence[dict], progress=None) -> dict:
        report = train_parameters(
            self.model, tokenizer, documents, self.params, self.settings, "lora", progress
        )
        report["rank"] = self.settings.lora_rank
        return report


def memory_baseline(
    model,
    tokenizer,
    documents: Sequence[dict],
    background,
    method: str,
    settings: UpdateSettings | None = None,
) -> SlotDelta:
    """Memory finetuning with another slot choice: "all" accessed slots, "tf" ranking, "random" t."""
    if method not in ("all", "tf", "random", "tfidf"):
        raise ValueError(f"memory baseline {method!r} is not all, tf, random or tfidf")
    s = (settings or UpdateSettings()).replace(method=method)
    return learn_documents(model, tokenizer, documents, background, s)


# ---- retrieval -------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an and are as at be by did do does for from has have he her his in is it its of on or she that the "
    "their they this to was were what when where which who whom whose why with".split()
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25Retriever:
    """BM25 (rank_bm25's BM25Plus: its idf stays positive in a small index) over the ingested passages;
    the best passage that shares a content word with the question is prepended to the prompt."""

    def __init__(self, max_passage_words: int = 96):
        self.passages: list[str] = []
        self.max_passage_words = max_passage_words  # passages are ingested documents' text, cut by words
        self._index = None
        self._terms: list[set[str]] = []

    def add(self, documents: Sequence[dict]) -> None:
        for doc in documents:
            text = (doc.get("text") or "").strip()
            if text:
                words = text.split()
                for start in range(0, len(words), self.max_passage_words):
                    self.passages.append(" ".join(words[start : start + self.max_passage_words]))
        self._index = None

    def best(self, query: str) -> str | None:
        if not self.passages:
            return None
        if self._index is None:
            from rank_bm25 import BM25Plus

            tokens = [_words(p) or ["_"] for p in self.passages]
            self._index = BM25Plus(tokens)
            self._terms = [set(t) - STOPWORDS for t in tokens]
        q = _words(query)
        content = set(q) - STOPWORDS
        scores = self._index.get_scores(q)
        candidates = [i for i, terms in enumerate(self._terms) if terms & content]
        if not candidates:
            return None
        return self.passages[max(candidates, key=lambda j: scores[j])]

    def prompt(self, question: str) -> str:
        passage = self.best(question)
        q = format_question(question)
        return f"{passage}\n{q}" if passage else q

    def answered(
        self, model, tokenizer, facts: Sequence[dict], key: str = "question"
    ) -> tuple[list[bool], dict]:
        """Per fact: answered with the retrieved passage in the prompt; plus latency and prompt growth."""
        if not facts:
            return [], {"seconds_per_query": 0.0, "prompt_tokens_added": 0.0, "retrieval_seconds": 0.0}
        t0 = time.perf_counter()
        prompts = [self.prompt(f[key]) for f in facts]
        t_retrieval = time.perf_counter() - t0
        completions = greedy_complete(model, tokenizer, prompts)
        seconds = time.perf_counter() - t0
        added = [
            len(tokenizer.encode(p, add_special_tokens=False))
            - len(tokenizer.encode(format_question(f[key]), add_special_tokens=False))
            for p, f in zip(prompts, facts)
        ]
        hits = [is_answered(c, f["answer"]) for c, f in zip(completions, facts)]
        return hits, {
            "seconds_per_query": seconds / len(facts),
            "retrieval_seconds_per_query": t_retrieval / len(facts),
            "prompt_tokens_added": sum(added) / len(added),
            "passages": len(self.passages),
        }


def geometric_grid(low: float, high: float, n: int) -> list[float]:
    """n values spaced evenly on a log scale from low to high (the lr grids of the benchmark)."""
    if n == 1:
        return [low]
    r = math.log(high / low) / (n - 1)
    return [float(f"{low * math.exp(r * i):.3g}") for i in range(n)]
