"""`memfit bench continual`: continual learning of new facts, one fact per update, every method from the
same checkpoint (Lin et al. 2025, section 4, at the scale of this project's default model).

    facts the model cannot know (memlm.data.invented_facts; base accuracy reported, ~0)
      dev stream  -> per method, the lr (and t / rank) grid; the chosen setting is the one with the best
                     retention among those within 90% of the method's best learning (one rule for all)
      test stream -> full finetuning, LoRA and sparse TF-IDF memory finetuning on up to 500 facts;
                     ablations (all accessed slots, TF-only, random-t), BM25 retrieval and the t x lr
                     Pareto grid on the first 100
      corrections -> "the capital of X is now Y": new value answered, old value not, the rest retained

Metrics (docs/contracts.md "Evaluation", memlm.evaluation): learning = share of the stream's facts answered
right after their own update (ingested / held-out wording); recall = share of all facts so far still
answered at the end; retention = share of the base-answered probe facts still answered; forgetting =
(retention_before - retention_after) / retention_before with retention_before = 1 on that set; held-out
perplexity change; seconds per update (training only, early-stop checks included); rows changed.

Output under --out (default benchmarks/results/continual[-quick]): results.md, results.json,
learning_forgetting.png, pareto.png, progress.json (what --resume continues from) and checkpoint/
(model states mid-stream, git-ignored).

This module chooses the settings and runs the streams; memfit.bench.continual_stream holds the
configuration, the model under test and one stream's run, memfit.bench.continual_report the summaries,
aims, targets, tables and plots.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from memlm.augment import TRAINING_QUESTION_TEMPLATES
from memlm.evaluation import answered

from .continual_report import (
    aims,
    corrections_summary,
    git_commit,
    summary_from,
    targets,
    without_records,
    write_outputs,
)
from .continual_stream import (
    BenchConfig,
    Context,
    MethodSpec,
    Progress,
    at_update,
    mean_of,
    run_stream,
    stopped_result,
)

# ---- grids and selection -----------------------------------------------------------------------------


def grids(cfg: BenchConfig) -> dict[str, list[MethodSpec]]:
    return {
        "full": [MethodSpec("full FT", "full", {"lr": lr}) for lr in cfg.full_lr],
        "lora": [
            MethodSpec("LoRA", "lora", {"lr": lr, "lora_rank": r, "lora_alpha": 2.0 * r})
            for r in cfg.lora_rank
            for lr in cfg.lora_lr
        ],
        "sparse": [
            MethodSpec(
                "sparse TF-IDF",
                "sparse",
                {"lr": lr, "top_t": t, "optimizer": cfg.sparse_optimizer, **cfg.sparse_extra},
            )
            for t in cfg.sparse_t
            for lr in cfg.sparse_lr
        ],
    }


def choose(results: Sequence[tuple[MethodSpec, dict]]) -> tuple[MethodSpec, dict]:
    """One rule for every method: among the settings within 90% of the method's best dev learning,
    the best retention (ties: more learning, then the earlier grid point)."""
    best_learning = max(r["final"]["learning"] for _, r in results)
    ok = [(s, r) for s, r in results if r["final"]["learning"] >= 0.9 * best_learning]
    return max(ok, key=lambda sr: (sr[1]["final"]["retention"], sr[1]["final"]["learning"]))


# ---- the whole benchmark -------------------------------------------------------------------------


def split_streams(cfg: BenchConfig) -> tuple[list[dict], list[dict]]:
    from memlm.data import invented_facts

    facts = invented_facts(cfg.dev_facts + cfg.test_facts, seed=cfg.seed)
    return facts[: cfg.dev_facts], facts[cfg.dev_facts :]


def pick_corrections(ctx: Context, n: int, seed: int) -> list[dict]:
    """n corrections of capitals that the base model answers (so there is something to correct)."""
    from memlm.data import corrections, probe_facts

    known = {f["id"] for f in ctx.probe_known}
    capitals = sum(1 for f in probe_facts() if f["relation"] == "capital")
    pool = corrections(capitals, seed=seed)  # every capital, in a seeded order
    return [c for c in pool if c["id"] in known][:n]


def machine_info() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average": load,
    }


def benchmark(
    model_dir: Path,
    out: Path,
    cfg: BenchConfig,
    resume: bool = False,
    command: str = "",
    report_only: bool = False,
    log: Callable[[str], None] = print,
    model_note: str = "",
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    machine_start = machine_info()
    commit = git_commit()  # at the start: the tree may move on while a long run goes
    ctx = Context(model_dir, cfg, log)
    from memlm.background import model_base_id

    fingerprint = {"base_id": model_base_id(model_dir), "config": asdict(cfg)}
    streams = Streams(ctx, Progress(out, resume or report_only, fingerprint), report_only)
    dev, test = split_streams(cfg)
    base_acc = base_accuracy(ctx, dev, test)
    log(
        f"model {model_dir}: probe {len(ctx.probe_known)} known facts, retention set {len(ctx.probe)}, "
        f"base perplexity {ctx.base_perplexity:.2f}; base accuracy on the new facts "
        f"{base_acc['test_ingested']:.1%} (held-out wording {base_acc['test_heldout']:.1%})"
    )
    chosen, dev_results = dev_grids(streams, dev)  # 1) dev grids
    main: dict[str, dict] = {}  # 2) main stream
    for method in ("full", "lora", "sparse"):
        facts = test[: cfg.full_facts] if method == "full" and cfg.full_facts else test
        log(f"test stream {method} {chosen[method].settings}: {len(facts)} facts")
        key = f"test/{chosen[method].key()}" + ("" if len(facts) == len(test) else f"/{len(facts)}")
        main[method] = streams.run(chosen[method], facts, key, final_probe=ctx.probe_known)
        if main[method] is None:
            raise SystemExit(f"--report: the {method} test stream never started: nothing to report")
    short = test[
        : cfg.short_facts
    ]  # 3) ablations and retrieval, 4) the Pareto grid: on the first short_facts
    ablation = ablations(streams, short, chosen["sparse"].settings)
    pareto, short_sparse = pareto_grid(streams, short, chosen["sparse"].settings, main["sparse"])
    corr_results = correction_streams(streams, chosen)  # 5) corrections

    results = {
        "command": command,
        "model_dir": str(model_dir),
        "model_note": model_note,
        "machine": machine_start,
        "machine_end": machine_info(),
        "config": asdict(cfg),
        "base": {
            "probe_accuracy": ctx.base_probe_accuracy,
            "probe_known": len(ctx.probe_known),
            "retention_set": len(ctx.probe),
            "perplexity": ctx.base_perplexity,
            "new_fact_accuracy": base_acc,
        },
        "training_templates": list(TRAINING_QUESTION_TEMPLATES),
        "dev": {
            "facts": len(dev),
            "grids": dev_results,
            "chosen": {m: s.settings for m, s in chosen.items()},
        },
        "main": {m: without_records(r) for m, r in main.items()},
        "main_at_short": {m: at_update(r, cfg.short_facts) for m, r in main.items()},
        # when the main stream has no evaluation at short_facts, the Pareto grid's run of the chosen
        # setting on the same first short_facts facts is the TF-IDF side of the ablation aims
        "sparse_at_short": at_update(main["sparse"], cfg.short_facts) or short_sparse,
        "ablations": {m: without_records(r) for m, r in ablation.items()},
        "pareto": pareto,
        "corrections": {m: corrections_summary(r) for m, r in corr_results.items() if r is not None},
        # streams a --report run found stopped mid-way: method -> updates evaluated
        "stopped": {m: r["stopped_at"] for m, r in main.items() if "stopped_at" in r},
        "seconds_total": time.perf_counter() - t_start,
    }
    results["commit"] = commit
    results["aims"], results["baselines"] = aims(results)
    results["targets"] = targets(results)
    write_outputs(out, results, {m: r for m, r in main.items()}, ablation)
    return results


class Streams:
    """Runs one stream of the benchmark, or returns its result from the progress file (--resume).
    report_only (--report): nothing is trained; a stream in flight gives its result as of its last
    checkpoint (stopped_result) and one never started gives None (left out of the results)."""

    def __init__(self, ctx: Context, progress: Progress, report_only: bool = False) -> None:
        self.ctx, self.cfg, self.log, self.progress = ctx, ctx.cfg, ctx.log, progress
        self.report_only = report_only

    def run(self, spec: MethodSpec, facts: Sequence[dict], key: str, **kw) -> dict | None:
        hit = self.progress.done(key)
        if hit is not None:
            self.log(f"  {key}: done (resumed)")
            return hit
        if self.report_only:
            state = self.progress.data["partial"].get(key)
            if not state:
                self.log(f"  {key}: never started, left out")
                return None
            res = stopped_result(spec, len(facts), state)
            self.log(f"  {key}: stopped after {res['stopped_at']} of {len(facts)} updates")
            return res
        eval_every = kw.pop("eval_every", self.cfg.eval_every)
        res = run_stream(self.ctx, spec, facts, eval_every, progress=self.progress, key=key, **kw)
        self.progress.finish(key, res)
        return res


def base_accuracy(ctx: Context, dev: Sequence[dict], test: Sequence[dict]) -> dict:
    """What the base model answers of the new facts before any update (about 0: they are invented)."""
    base = ctx.load()
    return {
        "test_ingested": mean_of(answered(base, ctx.tokenizer, test)),
        "test_heldout": mean_of(answered(base, ctx.tokenizer, test, key="heldout_question")),
        "dev_ingested": mean_of(answered(base, ctx.tokenizer, dev)),
    }


def dev_grids(streams: Streams, dev: Sequence[dict]) -> tuple[dict[str, MethodSpec], dict[str, list]]:
    """Each method's grid on the dev stream: (the chosen setting per method, every setting's figures)."""
    dev_probe = streams.ctx.probe[: streams.cfg.dev_probe_facts]
    chosen: dict[str, MethodSpec] = {}
    dev_results: dict[str, list] = {}
    for method, specs in grids(streams.cfg).items():
        streams.log(f"dev grid {method}: {len(specs)} settings on {len(dev)} facts")
        results = [
            (
                s,
                streams.run(
                    s, dev, f"dev/{s.key()}", eval_every=len(dev), probe=dev_probe, final_probe=dev_probe
                ),
            )
            for s in specs
        ]
        spec, _ = choose(results)
        chosen[method] = spec
        dev_results[method] = [
            {
                "settings": s.settings,
                **{k: r["final"].get(k) for k in ("learning", "learning_heldout", "retention")},
            }
            for s, r in results
        ]
        streams.log(f"  chosen {method}: {spec.settings}")
    return chosen, dev_results


def ablation_variants(sp: dict) -> dict[str, tuple[str, dict]]:
    """The ablations at the chosen sparse settings `sp`: name -> (row label, settings changed)."""
    return {
        "all": ("memory, all accessed", {"method": "all"}),
        "tf": ("memory, TF-only", {"method": "tf"}),
        "random": ("memory, random-t", {"method": "random"}),
        "stop": ("TF-IDF + stop slots (df <= 5%)", {"max_df": 0.05}),
        # without the IDF scaling the tuning stream's matching lr was a tenth (docs/internals.md)
        "noidf": ("TF-IDF, no IDF step scaling", {"idf_lr_power": 0.0, "lr": sp["lr"] / 10}),
        "adam": ("TF-IDF, row-local Adam lr 1", {"optimizer": "adam", "lr": 1.0, "idf_lr_power": 0.0}),
    }


def ablations(streams: Streams, short: Sequence[dict], sp: dict) -> dict[str, dict]:
    """The configured ablations of the chosen sparse setting, then BM25 retrieval, on `short`."""
    known = streams.ctx.probe_known
    ablation: dict[str, dict] = {}
    variants = ablation_variants(sp)
    for m in streams.cfg.ablations:
        name, change = variants[m]
        spec = MethodSpec(name, "sparse", {**sp, **change})
        streams.log(f"ablation {spec.name}: {len(short)} facts")
        ablation[m] = streams.run(spec, short, f"short/{spec.key()}", final_probe=known)
    spec = MethodSpec("BM25 retrieval", "retrieval", {})
    streams.log(f"retrieval: {len(short)} facts")
    ablation["bm25"] = streams.run(spec, short, f"short/{spec.key()}", final_probe=known)
    return {m: r for m, r in ablation.items() if r is not None}


def pareto_grid(
    streams: Streams, short: Sequence[dict], sp: dict, main_sparse: dict
) -> tuple[list[dict], dict]:
    """The t x lr grid of sparse TF-IDF around the chosen setting `sp` on `short`: (its points, the
    chosen setting's figures after short_facts updates when the grid ran it, else {})."""
    cfg = streams.cfg
    pareto: list[dict] = []
    short_sparse: dict = {}
    for t in cfg.pareto_t:
        for f in cfg.pareto_lr_factors:
            settings = {**sp, "top_t": t, "lr": float(f"{sp['lr'] * f:.3g}")}
            if settings == sp and cfg.short_facts % cfg.eval_every == 0:
                res = {"final": at_update(main_sparse, cfg.short_facts)}
            else:
                spec = MethodSpec("sparse TF-IDF", "sparse", settings)
                res = streams.run(spec, short, f"pareto/{spec.key()}", final_probe=streams.ctx.probe_known)
            pareto.append({"settings": settings, **summary_from(res)})
            if settings == sp:
                short_sparse = res.get("final", {})
    # the chosen point itself
    if not any(p["settings"] == sp for p in pareto) and cfg.short_facts % cfg.eval_every == 0:
        pareto.append({"settings": sp, **summary_from({"final": at_update(main_sparse, cfg.short_facts)})})
    return pareto, short_sparse


def correction_streams(streams: Streams, chosen: dict[str, MethodSpec]) -> dict[str, dict]:
    """Each method's chosen setting on the corrections stream, retention on the facts of other subjects."""
    cfg = streams.cfg
    corr = pick_corrections(streams.ctx, cfg.corrections, cfg.seed)
    if not corr:  # --set corrections=0
        return {}
    corrected_subjects = {c["subject"] for c in corr}
    unrelated = [f for f in streams.ctx.probe_known if f["subject"] not in corrected_subjects]
    corr_results: dict[str, dict] = {}
    for method in ("full", "lora", "sparse"):
        streams.log(f"corrections {method}: {len(corr)} facts")
        corr_results[method] = streams.run(
            chosen[method],
            corr,
            f"corrections/{chosen[method].key()}",
            eval_every=max(len(corr), 1),
            probe=unrelated[: cfg.probe_facts],
            final_probe=unrelated,
            corrections=True,
        )
    return corr_results


# ---- CLI ---------------------------------------------------------------------------------------------


def resolve_model(model: str | None, quick: bool, log: Callable[[str], None] = print) -> tuple[Path, str]:
    """The model to benchmark: --model, else the default model, else (with --quick) the tiny preset,
    built on first use."""
    from memlm.paths import default_model_dir

    if model:
        return Path(model), ""
    default = default_model_dir()
    if (default / "config.json").exists():
        return default, ""
    if not quick:
        raise SystemExit(
            f"no default model at {default}: run `memfit pretrain` first (or pass --model / --quick)"
        )
    tiny = default_model_dir("tiny")
    note = f"(tiny preset: no default model at {default})"
    if not (tiny / "config.json").exists():
        log(f"--quick: {note}; building the tiny preset into {tiny}")
        from memlm.pretrain import pretrain

        pretrain("tiny", tiny)
    return tiny, note


def run(args) -> int:
    quick = bool(getattr(args, "quick", False))
    small = bool(getattr(args, "small", False))
    cfg = BenchConfig.quick() if quick else BenchConfig.small() if small else BenchConfig()
    try:
        cfg = cfg.with_overrides(getattr(args, "set", None) or [])
    except ValueError as e:
        raise SystemExit(f"memfit bench continual: {e}") from None
    model_dir, note = resolve_model(getattr(args, "model", None), quick)
    if note:
        print(f"benchmarking {model_dir} {note}")
    default_out = Path("benchmarks/results") / (
        "continual-quick" if quick else "continual-small" if small else "continual"
    )
    out = Path(args.out) if getattr(args, "out", None) else default_out
    command = (
        "memfit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if sys.argv[1:]
        else "memfit bench continual"
    )
    benchmark(
        model_dir, out, cfg, resume=bool(getattr(args, "resume", False)), command=command, model_note=note,
        report_only=bool(getattr(args, "report", False)),
    )  # fmt: skip
    print(f"results in {out}/ (results.md, results.json, learning_forgetting.png, pareto.png)")
    return 0
