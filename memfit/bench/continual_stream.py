"""The continual benchmark's machinery (memfit.bench.continual): its configuration, the model under
test with its evaluation sets, one learner per method, resumable progress, and one stream of
updates run and evaluated along the way. tune_sparse.py (benchmarks/) drives the same pieces.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

import memlm
from memlm.evaluation import answered, perplexity
from memlm.reach import (
    delta_rows,
    merge_reads,
    probe_reads,
    protection_mask,
    reach_report,
    reached,
    text_reads,
)
from memlm.repair import Learned, repair_update, served_text
from memlm.updater import UpdateSettings, learn_documents

from .baselines import BM25Retriever, DenseSettings, LoRAUpdater, full_finetune

# ---- configuration ----------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    test_facts: int = 500  # facts in the main stream (full FT, LoRA, sparse TF-IDF)
    short_facts: int = 100  # facts for ablations, retrieval and the Pareto grid (first of the test stream)
    dev_facts: int = 50  # facts of the dev stream the grids are chosen on (disjoint from the test stream)
    corrections: int = 50  # corrections stream length
    probe_facts: int = 200  # base-answered probe facts checked for retention along the stream
    dev_probe_facts: int = 100  # probe facts checked at the end of each dev run
    eval_every: int = 50  # updates between evaluations along the stream (and mid-stream checkpoints)
    heldout_tokens: int = 4096  # tokens of held-out text for perplexity
    seed: int = 0  # fact generator and update seed
    # grids: each method gets the same number of configurations (6)
    sparse_t: list[int] = field(default_factory=lambda: [2000, 4000])
    # SGD lr before the updater's IDF scaling of each row's step (UpdateSettings.idf_lr_power)
    sparse_lr: list[float] = field(default_factory=lambda: [3000.0, 10000.0, 30000.0])
    sparse_optimizer: str = "sgd"  # the lr grid's optimizer (benchmarks/tune_sparse.py compared both)
    full_lr: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3])
    lora_rank: list[int] = field(default_factory=lambda: [4, 16])
    lora_lr: list[float] = field(default_factory=lambda: [3e-4, 3e-3, 3e-2])
    # the Pareto grid around the chosen sparse setting: t and lr multipliers
    pareto_t: list[int] = field(default_factory=lambda: [100, 500, 2000, 8000])
    pareto_lr_factors: list[float] = field(default_factory=lambda: [1.0])
    # ablations at the chosen sparse setting: selection all / tf / random (the paper's), plus stop slots
    # (UpdateSettings.max_df), the plain SGD step without IDF scaling, and the row-local Adam the updater
    # first defaulted to
    ablations: list[str] = field(default_factory=lambda: ["all", "tf", "random", "stop", "noidf", "adam"])
    steps: int = 40  # maximum steps per update, every method (early stopping usually ends sooner)
    # fields every sparse setting of the grid carries (PROTECTION_FIELDS or UpdateSettings fields, e.g.
    # {"preserve": true, "shield": 30, "repair": true}); the ablations and Pareto grid inherit them
    sparse_extra: dict = field(default_factory=dict)
    # facts of the main stream full FT runs (None: all test_facts; a 1M-slot model's full FT update
    # costs ~35 s on 2 cores); fewer is conservative for the forgetting ratio, since a dense method's
    # forgetting only grows along the stream
    full_facts: int | None = None

    @classmethod
    def small(cls) -> BenchConfig:
        """The default model in ~5 minutes on 2 cores: same methods and grids, shorter streams."""
        return cls._scaled(0)

    @classmethod
    def quick(cls) -> BenchConfig:
        """The tiny CI model in minutes."""
        return cls._scaled(1)

    def with_overrides(self, pairs: Sequence[str]) -> BenchConfig:
        """A copy with `KEY=JSON` overrides (`memfit bench continual --set sparse_lr=[1000]`); a
        ValueError names the key when it is not a field or its value is not JSON of the field's kind."""
        out = copy.deepcopy(self)
        names = [f.name for f in fields(self)]
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            key = key.strip()
            if not sep or key not in names:
                raise ValueError(f"--set {pair!r}: expected KEY=JSON with KEY one of {', '.join(names)}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"--set {key}: value {raw!r} is not JSON ({e.msg})") from None
            if not _fits(getattr(self, key), value, key):
                kind = "a positive integer or null" if key == "full_facts" else f"like {getattr(self, key)!r}"
                raise ValueError(f"--set {key}: {value!r} is not {kind}")
            if key == "sparse_extra" and (bad := sorted(set(value) - _sparse_extra_fields())):
                raise ValueError(
                    f"--set sparse_extra: {bad} are neither UpdateSettings nor protection fields"
                )
            setattr(out, key, float(value) if isinstance(getattr(self, key), float) else value)
        return out

    @classmethod
    def _scaled(cls, column: int) -> BenchConfig:
        return cls(**{k: copy.deepcopy(v[column]) for k, v in _SCALES.items() if v[column] is not None})


def _sparse_extra_fields() -> set[str]:
    return set(PROTECTION_FIELDS) | {f.name for f in fields(UpdateSettings)}


def _fits(current: Any, value: Any, key: str) -> bool:
    """Whether `value` (parsed JSON) may replace the field's `current` value."""
    if key == "full_facts":
        return value is None or (type(value) is int and value > 0)
    if isinstance(current, float):
        return type(value) in (int, float)
    return type(value) is type(current)


# The shorter runs' fields, as (small, quick); None keeps the full run's value.
_SCALES: dict[str, tuple[Any, Any]] = {
    "test_facts": (24, 6),
    "short_facts": (12, 4),
    "dev_facts": (4, 3),
    "corrections": (8, 3),
    "probe_facts": (64, 20),
    "dev_probe_facts": (32, 20),
    "eval_every": (8, 2),
    "heldout_tokens": (1024, 512),
    "sparse_t": ([2000, 4000], [16]),
    "sparse_lr": ([10000.0], [0.3, 1.0]),
    "sparse_optimizer": (None, "adam"),  # adam: the tiny CI model
    "full_lr": ([1e-4, 1e-3], [1e-3, 3e-3]),
    "lora_rank": ([8], [4]),
    "lora_lr": ([3e-3, 3e-2], [3e-3, 3e-2]),
    "pareto_t": ([100, 500, 2000], [8, 64]),
    "ablations": (None, ["all", "tf", "random"]),
    "steps": (40, 30),
}


@dataclass
class MethodSpec:
    name: str  # row label
    kind: str  # sparse | full | lora | retrieval
    settings: dict = field(default_factory=dict)  # UpdateSettings / DenseSettings fields

    def key(self) -> str:
        parts = ",".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"{self.name}[{parts}]"


# ---- context: the model under test and its evaluation sets -----------------------------------------


class Context:
    """Loads fresh copies of the base model and holds the evaluation sets (built once)."""

    def __init__(self, model_dir: Path, cfg: BenchConfig, log: Callable[[str], None] = print):
        from memlm.background import BackgroundStats
        from memlm.tokenizer import load_tokenizer

        self.model_dir = Path(model_dir)
        self.cfg = cfg
        self.log = log
        self.tokenizer = load_tokenizer(self.model_dir)
        self.background = BackgroundStats.load(self.model_dir)
        probe_file = self.model_dir / "probe.json"
        data = json.loads(probe_file.read_text()) if probe_file.exists() else {}
        probe_all = data.get("facts") or []
        self.heldout_text: list[str] = data.get("heldout_texts") or []
        base = self.load()
        hits = answered(base, self.tokenizer, probe_all)
        self.probe_known = [f for f, h in zip(probe_all, hits) if h]
        # the relations in turn, so that the probe checked along the stream holds both the capitals (the
        # relation a fifth of the stream shares) and the other relation, not only the first in the file
        self.probe = interleave_relations(self.probe_known)[: cfg.probe_facts]
        # the known facts not in the measured probe: a preservation set whose slots a sparse setting
        # with "preserve" keeps out of selection (its own rows in the results: it spends knowledge of
        # what must be kept, though never the measured probe itself)
        self.preservation = interleave_relations(self.probe_known)[cfg.probe_facts :]
        self.base_perplexity = self.ppl(base)
        self.base_probe_accuracy = sum(hits) / len(hits) if hits else float("nan")

    def load(self):
        """A fresh copy of the base model (eval mode, frozen: each method unfreezes what it trains)."""
        model, _ = memlm.load(self.model_dir)
        return model

    def ppl(self, model) -> float:
        if not self.heldout_text:
            return float("nan")
        return perplexity(model, self.tokenizer, self.heldout_text, max_tokens=self.cfg.heldout_tokens)


def fact_document(fact: dict) -> dict:
    """The ingest document of one fact: its statement, and the fact in the ingest wording."""
    return {
        "id": fact["id"],
        "text": fact["text"],
        "facts": [{"question": fact["question"], "answer": fact["answer"]}],
        "metadata": {"relation": fact.get("relation")},
    }


# ---- learners: one update per call, all with the same documents and early stopping ------------------


class Learner:
    """update(doc) trains the model on one document; answered(facts, key) evaluates the current state."""

    def __init__(self, spec: MethodSpec, model, ctx: Context, seed: int):
        self.spec, self.model, self.ctx, self.seed = spec, model, ctx, seed
        self.touched: set[tuple[int, int]] = set()  # (layer, slot) rows changed so far (memory methods)
        self.reads: list | None = None  # memory reads of each probe text at the current state (memlm.reach)
        self.retriever = BM25Retriever() if spec.kind == "retrieval" else None
        self.lora = None
        self.protected = None
        # the stream's facts learned so far, with the reads of their served texts (`rehearse`, `repair`)
        self.learned = Learned()
        # `rehearse_text` N: N general-text chunks every update rehearses where it reaches them
        self.text_rehearsal: tuple[list[str], list] = ([], [])
        if spec.kind == "sparse" and spec.settings.get("rehearse_text"):
            texts = general_text_chunks(ctx.tokenizer, int(spec.settings["rehearse_text"]))
            self.text_rehearsal = (texts, text_reads(model, ctx.tokenizer, texts))
        if spec.kind == "sparse" and (spec.settings.get("preserve") or spec.settings.get("shield")):
            self.protected = _preservation_mask(
                model,
                ctx,
                spec.settings.get("preserve") or 0,
                int(spec.settings.get("preserve_min", 1)),
                int(spec.settings.get("shield") or 0),
            )
        if spec.kind == "lora":
            self.lora = LoRAUpdater(model, _dense(spec.settings, ctx.cfg))
        if spec.kind == "full":
            self.params = sum(p.numel() for p in model.parameters())

    def update(self, doc: dict, index: int) -> dict:
        kind, tok = self.spec.kind, self.ctx.tokenizer
        if kind == "sparse":
            fields = {k: v for k, v in self.spec.settings.items() if k not in PROTECTION_FIELDS}
            s = UpdateSettings(**{"steps": self.ctx.cfg.steps, **fields}).replace(seed=self.seed + index)
            if self.reads is None:
                self.reads = probe_reads(self.model, tok, self.ctx.probe)
            rehearse, rehearse_reads = self._rehearsal_set()
            delta = learn_documents(
                self.model, tok, [doc], self.ctx.background, s, protected=self.protected,
                rehearse=rehearse, rehearse_reads=rehearse_reads,
            )  # fmt: skip
            if self.spec.settings.get("repair"):
                delta = repair_update(
                    self.model, tok, [doc], self.ctx.background, s, delta, self.learned, self.protected
                )
            written = delta_rows(delta)
            r = dict(delta.report)
            if self.spec.settings.get("rehearse") or self.spec.settings.get("repair"):
                self._remember_if_learned(doc)
            for layer, idx in written.items():
                self.touched.update((layer, int(i)) for i in idx.tolist())
            self._keep_what_was_learned(doc, written)
            reach = reach_report(self.reads, written)
            # probes outside the reach read what they read before; re-read only the reached ones
            hits = reached(self.reads, written)
            fresh = probe_reads(self.model, tok, [f for f, h in zip(self.ctx.probe, hits) if h])
            self.reads = merge_reads(self.reads, hits, fresh)
            return {"seconds": r["seconds"], "steps": r["steps"], "rows_changed": r["rows_changed"],
                    "reach": reach["share"], "rows_read_changed": reach["rows_read_changed_mean"],
                    "rehearsed": r.get("rehearsed", 0), "repaired": r.get("repaired", 0)}  # fmt: skip
        # dense methods change weights every probe reads: reach 1 by construction
        if kind == "full":
            r = full_finetune(self.model, tok, [doc], _dense(self.spec.settings, self.ctx.cfg))
            return {"seconds": r["seconds"], "steps": r["steps"], "params_changed": r["params_trained"],
                    "reach": 1.0}  # fmt: skip
        if kind == "lora":
            r = self.lora.learn(tok, [doc])
            return {"seconds": r["seconds"], "steps": r["steps"], "params_changed": r["params_trained"],
                    "reach": 1.0}  # fmt: skip
        if kind == "retrieval":
            t0 = time.perf_counter()
            self.retriever.add([doc])
            return {"seconds": time.perf_counter() - t0, "steps": 0, "rows_changed": 0}
        raise ValueError(f"unknown method kind {kind!r}")

    def _rehearsal_set(self) -> tuple[list[str], list | None]:
        """`rehearse` N: the last N learned facts' texts; `rehearse` "reach": every learned fact's text with
        its memory reads, so that an update rehearses exactly those it can reach."""
        mode = self.spec.settings.get("rehearse")
        general, general_reads = self.text_rehearsal
        texts = [served_text(d["facts"][0]) for d in self.learned.docs]
        if mode == "reach":
            return texts + general, self.learned.reads + general_reads
        if general:
            if mode:
                raise ValueError('rehearse_text needs "rehearse": "reach" or no rehearse')
            return general, general_reads
        n = int(mode or 0)
        return (texts[-n:] if n else []), None

    def _remember_if_learned(self, doc: dict) -> None:
        """`rehearse`: the facts of `doc` the update taught join the rehearsal texts, which later updates
        keep predicting as they do now (memlm.updater.learn_documents(rehearse=...))."""
        self.learned.add_taught(self.model, self.ctx.tokenizer, [doc])

    def _keep_what_was_learned(self, doc: dict, written: dict[int, torch.Tensor]) -> None:
        """`keep_written`: the rows this update wrote are never selected again; `keep_learned`: nor the
        slots its facts' served prompts (and answers) read now. Later updates then cannot overwrite it."""
        settings = self.spec.settings
        if not (settings.get("keep_written") or settings.get("keep_learned")):
            return
        if self.protected is None:
            self.protected = protection_mask(self.model, self.ctx.tokenizer)  # nothing protected yet
        if settings.get("keep_written"):
            for layer, idx in written.items():
                self.protected[layer][idx.cpu()] = True
        if settings.get("keep_learned"):
            facts = [{"question": f["question"], "answer": f["answer"]} for f in doc.get("facts", [])]
            for reads in probe_reads(self.model, self.ctx.tokenizer, facts):
                for layer, slots in reads.items():
                    self.protected[layer][slots.cpu()] = True

    def answered(self, facts: Sequence[dict], key: str = "question") -> list[bool]:
        if self.retriever is not None:
            hits, stats = self.retriever.answered(self.model, self.ctx.tokenizer, facts, key=key)
            self.last_retrieval = stats
            return hits
        return answered(self.model, self.ctx.tokenizer, facts, key=key)

    def perplexity(self) -> float:
        return self.ctx.base_perplexity if self.retriever is not None else self.ctx.ppl(self.model)


# sparse settings of the benchmark that are not UpdateSettings fields: which slots are kept out of selection
PROTECTION_FIELDS = (
    "preserve", "preserve_min", "shield", "keep_written", "keep_learned", "rehearse", "rehearse_text", "repair"
)  # fmt: skip


def general_text_chunks(tokenizer, n: int, seq_len: int = 128) -> list[str]:
    """n Wikipedia chunks of at most seq_len tokens from the corpus's background split (pretraining's
    statistics text: never the held-out perplexity text, never the probe), in corpus order."""
    from memlm.data import build_corpus

    chunks: list[str] = []
    for text in build_corpus(0).background:
        ids = tokenizer(text)["input_ids"]
        if len(ids) < seq_len // 2:
            continue  # fact sentences and stubs: the general text is what perplexity measures
        chunks.append(tokenizer.decode(ids[:seq_len]))
        if len(chunks) == n:
            break
    return chunks


def _preservation_mask(
    model, ctx: Context, preserve, min_prompts: int = 1, shield: int = 0
) -> dict[int, Any]:
    """memlm.reach.protection_mask of `preserve` facts of the preservation set (all of it for True) and
    `shield` served-format texts, on the base model."""
    facts = (
        [] if not preserve else ctx.preservation if preserve is True else ctx.preservation[: int(preserve)]
    )
    if preserve and not facts:
        raise ValueError("the preservation set is empty: every known fact is in the measured probe")
    return protection_mask(model, ctx.tokenizer, facts, shield, min_prompts)


def _dense(settings: dict, cfg: BenchConfig) -> DenseSettings:
    return DenseSettings(**{"steps": cfg.steps, **settings})


def interleave_relations(facts: Sequence[dict]) -> list[dict]:
    """The facts with their relations taken in turn (each relation's own order kept)."""
    groups: dict[str, list[dict]] = {}
    for f in facts:
        groups.setdefault(str(f.get("relation")), []).append(f)
    out: list[dict] = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out.extend(g[i] for g in groups.values() if i < len(g))
    return out


def mean_of(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate_state(
    learner: Learner, facts_so_far: Sequence[dict], probe: Sequence[dict], with_ppl: bool
) -> dict:
    t0 = time.perf_counter()
    recall = learner.answered(facts_so_far) if facts_so_far else []
    recall_h = learner.answered(facts_so_far, key="heldout_question") if facts_so_far else []
    ret = learner.answered(probe) if probe else []
    retention = mean_of(ret) if ret else 1.0
    by_relation: dict[str, list[bool]] = {}
    for f, hit in zip(probe, ret):
        by_relation.setdefault(str(f.get("relation")), []).append(hit)
    out = {
        "updates": len(facts_so_far),
        "recall": mean_of(recall) if recall else None,
        "recall_heldout": mean_of(recall_h) if recall_h else None,
        "retention": retention,
        "forgetting": 1.0 - retention,  # retention_before = 1 on the base-answered probe
        "retention_by_relation": {r: mean_of(h) for r, h in sorted(by_relation.items())},
    }
    if with_ppl:
        ppl = learner.perplexity()
        base = learner.ctx.base_perplexity
        out["perplexity"] = ppl
        out["perplexity_change"] = (ppl - base) / base if base and not math.isnan(base) else None
    if learner.retriever is not None:
        out["retrieval"] = getattr(learner, "last_retrieval", {})
    out["eval_seconds"] = time.perf_counter() - t0
    return out


# ---- progress (resume) ---------------------------------------------------------------------------


# BenchConfig fields that only say which extra runs exist (each run's key names its own settings):
# a --resume with fewer or other ones reuses every finished run
_WHICH_RUNS = ("ablations", "pareto_t", "pareto_lr_factors")


def _comparable(fingerprint: dict | None) -> dict | None:
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("config"), dict):
        return fingerprint
    config = {k: v for k, v in fingerprint["config"].items() if k not in _WHICH_RUNS}
    return {**fingerprint, "config": config}


class Progress:
    """progress.json in the out dir: finished runs, and the state of the run in flight."""

    def __init__(self, out: Path, resume: bool, fingerprint: dict):
        self.path = out / "progress.json"
        self.ckpt_dir = out / "checkpoint"
        self.data: dict[str, Any] = {"fingerprint": fingerprint, "runs": {}, "partial": {}}
        if resume and self.path.exists():
            old = json.loads(self.path.read_text())
            if _comparable(old.get("fingerprint")) == _comparable(fingerprint):
                self.data = old
            else:
                print("--resume: the saved progress belongs to another model or configuration; starting over")

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def done(self, key: str) -> dict | None:
        return self.data["runs"].get(key)

    def finish(self, key: str, result: dict) -> None:
        self.data["runs"][key] = result
        self.data["partial"].pop(key, None)
        ckpt = self.ckpt_dir / (_safe(key) + ".safetensors")
        ckpt.unlink(missing_ok=True)
        self.save()

    def checkpoint(self, key: str, model, state: dict) -> None:
        from safetensors.torch import save_file

        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = self.ckpt_dir / (_safe(key) + ".safetensors")
        tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        # tied weights share storage; safetensors refuses shared tensors, clone() above separates them
        save_file(tensors, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)
        self.data["partial"][key] = state
        self.save()

    def restore(self, key: str, model) -> dict | None:
        state = self.data["partial"].get(key)
        path = self.ckpt_dir / (_safe(key) + ".safetensors")
        if not state or not path.exists():
            return None
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path)), strict=False)
        return state


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=.," else "_" for c in key)[:150]


# ---- one stream --------------------------------------------------------------------------------------


def run_stream(
    ctx: Context,
    spec: MethodSpec,
    facts: Sequence[dict],
    eval_every: int,
    probe: Sequence[dict] | None = None,
    progress: Progress | None = None,
    key: str | None = None,
    final_probe: Sequence[dict] | None = None,
    corrections: bool = False,
) -> dict:
    """Teach `facts` one per update with `spec`, from a fresh copy of the base model.

    Returns {"spec", "records" (per update), "curve" (evaluations every `eval_every` updates and at the
    end), "final" (the last evaluation, on `final_probe` if given)}."""
    key = key or spec.key()
    probe = list(ctx.probe if probe is None else probe)
    model = ctx.load()
    learner = Learner(spec, model, ctx, seed=ctx.cfg.seed)
    records: list[dict] = []
    curve: list[dict] = []
    state = progress.restore(key, model) if progress is not None else None
    if state:
        records, curve = state["records"], state["curve"]
        learner.touched = {tuple(x) for x in state.get("touched", [])}
        if learner.retriever is not None:
            learner.retriever.add([fact_document(f) for f in facts[: len(records)]])
        ctx.log(f"  {key}: resumed after {len(records)} updates")
    t_run = time.perf_counter()
    for i in range(len(records), len(facts)):
        records.append(_update_record(learner, facts[i], i, corrections))
        n = i + 1
        if n % eval_every == 0 or n == len(facts):
            last = n == len(facts)
            ev = _curve_point(
                learner, facts[:n], records, final_probe if (last and final_probe) else probe, corrections
            )
            curve.append(ev)
            ctx.log(
                f"  {key}: {n}/{len(facts)} learning {ev['learning']:.2f} recall {ev['recall']:.2f} "
                f"retention {ev['retention']:.3f} ppl {ev.get('perplexity_change') or 0:+.2%} "
                f"({mean_of(r['seconds'] for r in records):.2f} s/update)"
            )
            if progress is not None and not last:
                progress.checkpoint(
                    key, model, {"records": records, "curve": curve, "touched": sorted(learner.touched)}
                )
    result = _stream_result(spec, len(facts), records, curve, learner.touched)
    result["wall_seconds"] = time.perf_counter() - t_run
    if learner.retriever is not None:
        result["retrieval"] = curve[-1].get("retrieval", {}) if curve else {}
    del model, learner
    return result


def _update_record(learner: Learner, fact: dict, i: int, corrections: bool) -> dict:
    """Teach one fact (update i) and check it right away, in its own and in held-out wording (and,
    for a correction, whether the old answer is still given)."""
    rep = learner.update(fact_document(fact), i)
    checks = [fact, {**fact, "question": fact["heldout_question"]}]
    if corrections:
        checks.append({**fact, "answer": fact["old_answer"]})
    hits = learner.answered(checks)
    rec = {"id": fact["id"], "learned": hits[0], "learned_heldout": hits[1], **rep}
    if corrections:
        rec["old_answered"] = hits[2]
        rec["corrected"] = hits[0] and not hits[2]
    return rec


def _curve_point(
    learner: Learner, taught: Sequence[dict], records: list[dict], probe: Sequence[dict], corrections: bool
) -> dict:
    """The evaluation after the facts taught so far (recall, retention on `probe`, perplexity), with
    the learning rates of their records."""
    ev = evaluate_state(learner, taught, probe, with_ppl=True)
    ev["learning"] = mean_of(r["learned"] for r in records)
    ev["learning_heldout"] = mean_of(r["learned_heldout"] for r in records)
    if corrections:
        ev["old_answered"] = mean_of(
            h for h in learner.answered([{**f, "answer": f["old_answer"]} for f in taught])
        )
    return ev


def stopped_result(spec: MethodSpec, facts: int, state: dict) -> dict:
    """A stream stopped mid-way, as of its last checkpoint (`memfit bench continual --report`): the
    result of its updates up to its last evaluation, marked "stopped_at" (its last evaluation is on the
    along-the-stream probe, not the final one)."""
    records, curve = state["records"], state["curve"]
    n = curve[-1]["updates"] if curve else 0
    touched = {tuple(x) for x in state.get("touched", [])}
    return {**_stream_result(spec, facts, records[:n], curve, touched), "stopped_at": n}


def _stream_result(
    spec: MethodSpec, facts: int, records: list[dict], curve: list[dict], touched: set
) -> dict:
    return {
        "spec": asdict(spec),
        "facts": facts,
        "records": records,
        "curve": curve,
        "final": curve[-1] if curve else {},
        "seconds_per_update": mean_of(r["seconds"] for r in records),
        "steps_per_update": mean_of(r["steps"] for r in records),
        "rows_changed_per_update": mean_of(r.get("rows_changed") for r in records),
        "reach_mean": mean_of(r.get("reach") for r in records),
        "rows_read_changed_mean": mean_of(r.get("rows_read_changed") for r in records),
        "distinct_rows_changed": len(touched),
        "params_changed": records[0].get("params_changed") if records else None,
    }


def at_update(result: dict, n: int) -> dict:
    """A run's metrics after its first n updates (from the curve point at n and the first n records)."""
    point = next((c for c in result["curve"] if c["updates"] == n), None)
    if point is None:
        return {}
    recs = result["records"][:n]
    return {
        **point,
        "learning": mean_of(r["learned"] for r in recs),
        "learning_heldout": mean_of(r["learned_heldout"] for r in recs),
        "seconds_per_update": mean_of(r["seconds"] for r in recs),
        "rows_changed_per_update": mean_of(r.get("rows_changed") for r in recs),
        "reach_mean": mean_of(r.get("reach") for r in recs),
    }
