"""The continual benchmark's results (memfit.bench.continual): per-run summaries, the aims and targets
of results.json (docs/benchmark.md), results.md, and the plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from memlm.data.templates import CAPITAL, CITY_COUNTRY

from .continual_stream import at_update, mean_of


def summary_from(res: dict) -> dict:
    f = res.get("final", {})
    return {
        k: f.get(k)
        for k in ("learning", "learning_heldout", "recall", "retention", "forgetting", "perplexity_change")
    } | {"seconds_per_update": res.get("seconds_per_update", f.get("seconds_per_update"))}


def without_records(r: dict) -> dict:
    """A run without per-update records (kept in progress.json), plus its summary."""
    out = {k: v for k, v in r.items() if k != "records"}
    recs = r["records"]
    out["learning"] = mean_of(x["learned"] for x in recs)
    out["learning_heldout"] = mean_of(x["learned_heldout"] for x in recs)
    out["learned_by_update"] = [int(x["learned"]) for x in recs]
    return out


def corrections_summary(r: dict) -> dict:
    recs, final = r["records"], r["final"]
    return {
        "settings": r["spec"]["settings"],
        "facts": len(recs),
        "corrected": mean_of(x["corrected"] for x in recs),  # new answered, old not, right after the update
        "new_answered": mean_of(x["learned"] for x in recs),
        "new_answered_heldout": mean_of(x["learned_heldout"] for x in recs),
        "old_answered": mean_of(x["old_answered"] for x in recs),
        "recall_end": final.get("recall"),
        "old_answered_end": final.get("old_answered"),
        "unrelated_retention": final.get("retention"),
        "perplexity_change": final.get("perplexity_change"),
        "seconds_per_update": r["seconds_per_update"],
    }


# probe (a), the relation a fifth of the stream shares, and (b), another relation (docs/benchmark.md)
SAME_RELATION, OTHER_RELATION = CAPITAL.name, CITY_COUNTRY.name


def _forgetting(run: dict, relation: str) -> float | None:
    kept = run["final"].get("retention_by_relation", {}).get(relation)
    return None if kept is None else 1.0 - kept


def _method_aims(run: dict) -> dict:
    """One method's figures on the main stream, under the keys docs/benchmark.md fixes."""
    f = run["final"]
    kept = f.get("retention_by_relation", {})
    return {
        "learning": run.get("learning"),
        "learning_heldout": run.get("learning_heldout"),
        "recall_at_end": f.get("recall"),
        "retention_same_relation": kept.get(SAME_RELATION),
        "retention_other_relation": kept.get(OTHER_RELATION),
        "perplexity_change": f.get("perplexity_change"),
        "reach_mean": run.get("reach_mean"),
        "seconds_per_update": run.get("seconds_per_update"),
    }


def _forgetting_ratio(sparse: dict, base: dict) -> float | None:
    """Sparse forgetting / baseline forgetting, averaged over the two probes (a) and (b)."""
    ratios = [_ratio(_forgetting(sparse, r), _forgetting(base, r)) for r in (SAME_RELATION, OTHER_RELATION)]
    ratios = [x for x in ratios if x is not None]
    return sum(ratios) / len(ratios) if ratios else None


def aims(res: dict) -> tuple[dict, dict]:
    """results.json's `aims` (sparse TF-IDF on the main stream) and `baselines` (full FT, LoRA): the
    same keys for each, fractions as 0..1; the forgetting ratios only for sparse."""
    m = res["main"]
    sparse = _method_aims(m["sparse"]) | {
        "forgetting_ratio_vs_full": _forgetting_ratio(m["sparse"], m["full"]),
        "forgetting_ratio_vs_lora": _forgetting_ratio(m["sparse"], m["lora"]),
    }
    return sparse, {name: _method_aims(m[name]) for name in ("full", "lora")}


def targets(res: dict) -> dict:
    """Each line of the knowledge issue's "Done means", measured (not asserted): value, target, met."""
    a, full = res["aims"], res["baselines"]["full"]
    out: dict[str, dict] = {}

    def put(name, value, target, met):
        out[name] = {"value": value, "target": target, "met": bool(met) if value is not None else None}

    def at_least(x, y):
        return x is not None and x >= y

    put("sparse learning right after the update", a["learning"], ">= 0.9", at_least(a["learning"], 0.9))
    ratio = _ratio(a["learning"], full["learning"])
    put("sparse learning / full FT learning", ratio, ">= 0.9", at_least(ratio, 0.9))
    put("recall of the stream at the end", a["recall_at_end"], ">= 0.7", at_least(a["recall_at_end"], 0.7))
    for key, floor in (("retention_other_relation", 0.95), ("retention_same_relation", 0.8)):
        put(key.replace("_", " "), a[key], f">= {floor}", at_least(a[key], floor))
    pc = a["perplexity_change"]
    put("held-out perplexity change", pc, "<= +5%", _le(pc, 0.05))
    for r in (SAME_RELATION, OTHER_RELATION):
        fr = _ratio(_forgetting(res["main"]["sparse"], r), _forgetting(res["main"]["full"], r))
        put(f"forgetting / full FT forgetting ({r})", fr, "<= 0.2", _le(fr, 0.2))
    put("mean reach per update", a["reach_mean"], "<= 0.1", _le(a["reach_mean"], 0.1))
    ab = res["ablations"]
    at = (res.get("sparse_at_short") or res["main_at_short"]["sparse"]).get("forgetting")
    for name in ("tf", "all"):
        if name in ab:
            other = ab[name]["final"].get("forgetting")
            put(
                f"TF-IDF forgets less than {name}",
                [at, other],
                "tfidf < other",
                None not in (at, other) and at < other,
            )
    s = a["seconds_per_update"]
    put("sparse seconds per single-fact update", s, "<= 2", _le(s, 2))
    return out


def git_commit() -> str | None:
    """The commit the run used (None outside a git checkout); "+dirty" when the tree had changes."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _ratio(a, b):
    if a is None or b is None:
        return None
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return a / b


def _le(x, y):
    return x is not None and x <= y


# ---- reporting -------------------------------------------------------------------------------------


def _pct(x, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.1%}" if signed else f"{x:.1%}"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _rows_label(r: dict) -> str:
    kind = r["spec"]["kind"]
    if kind == "full":
        return f"all ({(r.get('params_changed') or 0) / 1e6:.1f}M params)"
    if kind == "lora":
        return f"adapter ({(r.get('params_changed') or 0) / 1e3:.0f}k params)"
    if kind == "retrieval":
        return "0 (index)"
    return (
        f"{r.get('rows_changed_per_update', 0):.0f} / update ({r.get('distinct_rows_changed', 0)} distinct)"
    )


def table_row(r: dict, final: dict | None = None) -> str:
    s = r["spec"]["settings"]
    f = final or r["final"]
    t = s.get("top_t", "-") if r["spec"]["kind"] == "sparse" and s.get("method", "tfidf") != "all" else "-"
    if r["spec"]["kind"] == "lora":
        t = f"r={s.get('lora_rank')}"
    lr = s.get("lr", "-")
    learning = f.get("learning", r.get("learning"))
    heldout = f.get("learning_heldout", r.get("learning_heldout"))
    sec = f.get("seconds_per_update", r.get("seconds_per_update"))
    return (
        f"| {r['spec']['name']} | {t} | {lr} | {_pct(learning)} | {_pct(heldout)} | {_pct(f.get('recall'))} | "
        f"{_pct(f.get('retention'))} | {_pct(f.get('forgetting'))} | {_pct(f.get('perplexity_change'), True)} | "
        f"{_pct(f.get('reach_mean', r.get('reach_mean')))} | {sec:.2f} | {_rows_label(r)} |"
    )


HEADER = (
    "| method | t | lr | learning | held-out learning | recall at end | retention | forgetting | "
    "perplexity change | reach | s / update | rows changed |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(res: dict, main: dict, ablation: dict) -> str:
    lines = [
        *_md_intro(res),
        *_md_streams(res, main, ablation),
        *_md_pareto(res),
        *_md_corrections(res, main),
        *_md_dev(res),
        *_md_targets(res),
    ]
    return "\n".join(lines)


def _md_intro(res: dict) -> list[str]:
    """The command, model, machine and base model, and what each column means."""
    b = res["base"]
    return [
        "# Continual learning benchmark (`memfit bench continual`)",
        "",
        f"Command: `{res['command']}`  ",
        f"Model: `{res['model_dir']}` {res.get('model_note', '')}  ",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cpus']} CPUs, torch {res['machine']['torch']}"
        f" ({res['machine']['torch_threads']} threads), CUDA: {res['machine']['cuda'] or 'none'}; "
        f"load average at start {res['machine']['load_average']}, at end {res['machine_end']['load_average']}  ",
        f"Total time: {res['seconds_total'] / 60:.1f} min",
        "",
        *(
            [
                "**Stopped streams** (written by `--report` from progress.json): "
                + ", ".join(f"{m} after {n} updates" for m, n in res["stopped"].items())
                + "; their figures are those updates' (the last evaluation on the along-the-stream probe).",
                "",
            ]
            if res.get("stopped")
            else []
        ),
        f"Base model: probe accuracy {_pct(b['probe_accuracy'])} ({b['probe_known']} known facts; retention "
        f"measured on {b['retention_set']} along the stream and on all {b['probe_known']} at the end), held-out "
        f"perplexity {b['perplexity']:.2f}. Base accuracy on the new test facts: "
        f"{_pct(b['new_fact_accuracy']['test_ingested'])} (held-out wording "
        f"{_pct(b['new_fact_accuracy']['test_heldout'])}).",
        "",
        "Learning: share of the stream's facts answered right after their own update (ingested / held-out "
        "wording). Recall at end: share of all the stream's facts still answered after the last update. "
        "Retention: share of the base-answered probe facts still answered at the end; forgetting = 1 - "
        "retention (retention before = 1 on that set). Perplexity change: held-out text, relative to the base. "
        "Reach: mean share of the probe prompts (prompt + greedy answer before the update) that read a memory "
        "row the update changed (memlm.reach); a probe outside it answers bit-identically. 100% for the dense "
        "methods by construction. "
        "s / update: training time of one single-fact update, early-stop checks included.",
        "",
    ]


def _md_streams(res: dict, main: dict, ablation: dict) -> list[str]:
    """The main stream's table, the ablations and retrieval on its first short_facts, BM25's cost."""
    lines = [
        f"## Main stream: {main['sparse']['facts']} facts, one per update",
        "",
        HEADER,
        *[table_row(main[m]) for m in ("full", "lora", "sparse")],
        "",
        f"## Ablations and retrieval: first {res['config']['short_facts']} facts of the same stream",
        "",
        HEADER,
        *[
            table_row(main[m], res["main_at_short"][m])
            for m in ("full", "lora", "sparse")
            if res["main_at_short"][m]
        ],
        *[table_row(ablation[m]) for m in ablation],
        "",
    ]
    if "bm25" in ablation:
        rs = ablation["bm25"].get("retrieval", {})
        lines += [
            f"BM25 retrieval: {rs.get('seconds_per_query', float('nan')):.3f} s per query (retrieval "
            f"{rs.get('retrieval_seconds_per_query', float('nan')) * 1e3:.2f} ms), prompt grows by "
            f"{rs.get('prompt_tokens_added', float('nan')):.1f} tokens on average (probe questions included: "
            f"a matching passage is prepended whenever BM25 finds one); {rs.get('passages', 0)} passages indexed.",
            "",
        ]
    return lines


def _md_pareto(res: dict) -> list[str]:
    return [
        "## Pareto grid (sparse TF-IDF, first " + str(res["config"]["short_facts"]) + " facts)",
        "",
        "| t | lr | learning | held-out learning | retention | forgetting | perplexity change | s / update |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {p['settings']['top_t']} | {p['settings']['lr']} | {_pct(p['learning'])} | "
            f"{_pct(p['learning_heldout'])} | {_pct(p['retention'])} | {_pct(p['forgetting'])} | "
            f"{_pct(p['perplexity_change'], True)} | {p['seconds_per_update'] or float('nan'):.2f} |"
            for p in res["pareto"]
        ],
        "",
    ]


def _md_corrections(res: dict, main: dict) -> list[str]:
    return [
        "## Corrections (the capital of X is now Y)",
        "",
        "| method | corrected (new answered, old not) | new answered, held-out wording | old still answered | "
        "recall at end | old answered at end | unrelated retention | perplexity change | s / update |",
        "|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {main[m]['spec']['name']} | {_pct(c['corrected'])} | {_pct(c['new_answered_heldout'])} | "
            f"{_pct(c['old_answered'])} | {_pct(c['recall_end'])} | {_pct(c['old_answered_end'])} | "
            f"{_pct(c['unrelated_retention'])} | {_pct(c['perplexity_change'], True)} | {c['seconds_per_update']:.2f} |"
            for m, c in res["corrections"].items()
        ],
        "",
    ]


def _md_dev(res: dict) -> list[str]:
    lines = [
        "## Settings chosen on the dev stream",
        "",
        f"{res['dev']['facts']} dev facts (disjoint from the test stream); the same rule for every method: among "
        "the grid points within 90% of the method's best dev learning, the best dev retention.",
        "",
        "| method | grid point | learning | held-out learning | retention |",
        "|---|---|---|---|---|",
    ]
    for m, rows in res["dev"]["grids"].items():
        for row in rows:
            mark = " **(chosen)**" if row["settings"] == res["dev"]["chosen"][m] else ""
            lines.append(
                f"| {m} | {row['settings']}{mark} | {_pct(row['learning'])} | {_pct(row['learning_heldout'])} | "
                f"{_pct(row['retention'])} |"
            )
    return lines


def _md_targets(res: dict) -> list[str]:
    lines = [
        "",
        "## Targets: the knowledge issue's Done-means lines (measured, not asserted)",
        "",
        "| aim | measured | target | met |",
        "|---|---|---|---|",
    ]
    for name, a in res["targets"].items():
        v = a["value"]
        vs = ", ".join(_num(x) for x in v) if isinstance(v, list) else _num(v)
        lines.append(f"| {name} | {vs} | {a['target']} | {_met(a['met'])} |")
    lines.append("")
    return lines


def _met(met: bool | None) -> str:
    return "n/a" if met is None else ("yes" if met else "no")


def plots(out: Path, main: dict, ablation: dict, pareto: list[dict], short_facts: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in list(main.values()) + list(ablation.values()):
        xs = [c["updates"] for c in r["curve"]]
        axes[0].plot(xs, [c.get("recall") for c in r["curve"]], marker="o", ms=3, label=r["spec"]["name"])
        axes[1].plot(xs, [c.get("forgetting") for c in r["curve"]], marker="o", ms=3, label=r["spec"]["name"])
    axes[0].set(
        xlabel="updates (one fact each)", ylabel="facts so far still answered", title="learning (recall)"
    )
    axes[1].set(
        xlabel="updates (one fact each)", ylabel="forgetting (1 - probe retention)", title="forgetting"
    )
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning_forgetting.png", dpi=110)
    plt.close(fig)
    written.append("learning_forgetting.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    pts = [(p["forgetting"], p["learning"], p["settings"]) for p in pareto if p.get("forgetting") is not None]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c="tab:blue", label="sparse TF-IDF (t, lr)")
        for x, y, s in pts:
            ax.annotate(
                f"t={s['top_t']}, lr={s['lr']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        frontier, best = [], -1.0
        for x, y, _ in sorted(pts, key=lambda p: (p[0], -p[1])):
            if y > best:
                frontier.append((x, y))
                best = y
        ax.plot([p[0] for p in frontier], [p[1] for p in frontier], c="tab:blue", lw=1)
    for m, r in main.items():
        if m == "sparse":
            continue
        point = at_update(r, short_facts)
        if point:
            ax.scatter([point["forgetting"]], [point["learning"]], marker="s", label=r["spec"]["name"])
    for r in ablation.values():
        ax.scatter([r["final"]["forgetting"]], [r["learning"]], marker="^", label=r["spec"]["name"])
    ax.set(
        xlabel=f"forgetting after {short_facts} updates", ylabel="learning", title="learning vs forgetting"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    written.append("pareto.png")
    return written


def write_outputs(out: Path, res: dict, main: dict, ablation: dict) -> None:
    abl = {m: {**r, "learning": mean_of(x["learned"] for x in r["records"])} for m, r in ablation.items()}
    md = markdown(res, main, abl)
    (out / "results.md").write_text(md)
    res["plots"] = plots(out, main, abl, res["pareto"], res["config"]["short_facts"])
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    print(md)
