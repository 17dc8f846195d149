"""`memfit bench serve [--quick] [--out DIR] [--model DIR]`: serving cost of the memfit engine.

Measured in one run, on one machine, so that only the ratios matter (the development machine is a
shared 2-core box; the load average is recorded beside the figures):

1. Throughput and latency. Tokens/s and p50/p95 request latency at concurrency 1, 8 and 32
   (--quick: 1 and 8, fewer requests) of
   - the memfit engine, in process, through the API the /generate route uses (`Engine.prepare` +
     `Engine.stream`: continuous batching over one KV cache per batch, swap lock, version checks);
   - (a) plain transformers `model.generate()` on the same model, one request at a time (the clients
     of a concurrency level share one lock, so latency includes the wait for the model).
   Requests: greedy, 16 new tokens at most, prompts alternating between probe questions
   ("Question: ...\\nAnswer:", short answers that end in EOS) and held-out text openings (continued
   for the full 16 tokens). Both sides generate the same tokens (greedy, same model, EOS honoured).
2. Per-token cost, memory layer vs (b) dense FFN of equal active parameters: the same architecture
   and width with random weights, where the memory layer is replaced by a SwiGLU FFN whose width f
   makes its parameters equal the memory layer's active parameters per token:
       3 d f = d (H key_dim)          query projection
             + H 2 sqrt(N) key_dim/2   sub-keys scored (every sub-key of both halves, every head)
             + H k d                   value rows read (the embedding bag)
             + 2 d^2                   Memory+ gate W1, W2
   (d = 256, N = 65,536, H = 4, k = 32, key_dim = 128 -> 425,984 parameters, f = 555).
   Cost = forward seconds per token, KV-cached decoding (batch 1 and 8) and prefill (8 x 64 tokens).
3. The same ratio over model width d = 128, 256, 512 (random weights, forward per-token cost only).

Intra-op threads: 1 when the 1-minute load average is at least the core count, else all cores
(MEMFIT_BENCH_THREADS overrides); the same for every side.

Prints a table and writes JSON to --out (default benchmarks/results/serve/serve[-quick].json).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .load import closed_loop, write_json

MAX_NEW = 16


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def _machine() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "loadavg": [round(x, 2) for x in load],
    }


def _find_model(arg: str | None) -> Path:
    from memlm.paths import default_model_dir

    path = Path(arg).expanduser() if arg else default_model_dir("default")
    if not (path / "model.safetensors").exists():
        raise SystemExit(f"no model at {path}: pass --model DIR or build one (memfit pretrain)")
    return path


def _prompts(model_dir: Path, tokenizer, n: int) -> list[str]:
    from memlm.evaluation import format_question

    probe = json.loads((model_dir / "probe.json").read_text())
    questions = [format_question(f["question"]) for f in probe.get("facts", [])]
    openings = []
    for text in probe.get("heldout_texts", []):
        ids = tokenizer.encode(text, add_special_tokens=False)[:24]
        if len(ids) >= 8:
            openings.append(tokenizer.decode(ids))
    questions = questions or ["Question: What is the capital of France?\nAnswer:"]
    openings = openings or ["The history of the city begins"]
    return [(questions if i % 2 == 0 else openings)[(i // 2) % len(questions if i % 2 == 0 else openings)]
            for i in range(n)]  # fmt: skip


def _drive(fn, prompts: list[str], concurrency: int) -> dict[str, Any]:
    """Run fn(prompt) -> completion tokens from `concurrency` closed-loop client threads."""
    run = closed_loop(fn, prompts, concurrency)
    lat, tokens, wall = run.latencies, sum(run.results), run.wall_s
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(lat) / wall, 2),
        "p50_ms": round(_pct(lat, 50) * 1e3, 1),
        "p95_ms": round(_pct(lat, 95) * 1e3, 1),
    }


def throughput(model_dir: Path, levels: list[int], per_level: dict[int, int]) -> dict[str, Any]:
    from memfit.config import Settings
    from model_store import Store
    from service.engine import Engine
    from service.generation import SamplingParams

    with tempfile.TemporaryDirectory(prefix="memfit-bench-serve-") as tmp:
        store = Store.init(Path(tmp) / "store", model_dir)
        settings = Settings(model=model_dir, store=Path(tmp) / "store")
        engine = Engine.from_store(store, settings)
        model, tok = engine.model, engine.tokenizer
        params = SamplingParams(max_new_tokens=MAX_NEW)
        gen_lock = threading.Lock()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0

        def memfit(prompt: str) -> int:
            return engine.complete(engine.prepare(prompt, params)).completion_tokens

        def plain(prompt: str) -> int:
            ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
            with gen_lock, torch.no_grad():
                out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=pad)
            new = out[0, ids.shape[1] :].tolist()
            eos = tok.eos_token_id
            return new.index(eos) if eos in new else len(new)  # EOS is not a completion token

        try:
            warm = _prompts(model_dir, tok, 4)
            _drive(memfit, warm, 2)
            _drive(plain, warm, 1)
            # same greedy tokens both ways (a sanity check of the comparison)
            same = all(engine.complete(engine.prepare(p, params)).completion_tokens == plain(p) for p in warm)
            rows = []
            for c in levels:
                prompts = _prompts(model_dir, tok, per_level[c])
                engine.wait_idle()
                w0, s0, r0 = engine.waves, engine.decode_steps, engine.decode_rows
                m = _drive(memfit, prompts, c)
                steps = engine.decode_steps - s0
                m["mean_decode_batch"] = round((engine.decode_rows - r0) / steps, 2) if steps else 0.0
                m["waves"] = engine.waves - w0
                # (a): one at a time; fewer requests at high concurrency (its throughput does not
                # depend on concurrency, and its latency is the queue)
                a = _drive(plain, prompts[: max(c, min(len(prompts), 2 * c, 32))], c)
                rows.append({"concurrency": c, "memfit": m, "plain_generate": a,
                             "throughput_ratio": round(m["tokens_per_s"] / a["tokens_per_s"], 2)})  # fmt: skip
        finally:
            engine.close()
    return {
        "max_new_tokens": MAX_NEW,
        "engine_settings": {
            "generation_workers": settings.generation_workers,
            "max_batch_size": settings.max_batch_size,
        },  # fmt: skip
        "same_tokens_as_generate": same,
        "levels": rows,
    }


# -- per-token cost: memory layer vs dense FFN of equal active parameters ---------------------------
def memory_active_params(cfg) -> int:
    d, H, kd, k = cfg.hidden_size, cfg.memory_heads, cfg.memory_key_dim, cfg.memory_topk
    n = cfg.memory_subkeys
    gate = 2 * d * d if cfg.memory_gate else 0
    return d * H * kd + H * 2 * n * (kd // 2) + H * k * d + gate


def _pair(cfg):
    """(memory model, dense-matched model), random weights, eval mode."""
    from memlm.modeling import DenseFFN, MemoryLMForCausalLM

    torch.manual_seed(0)
    mem = MemoryLMForCausalLM(cfg).eval()
    dense_cfg = copy.deepcopy(cfg)
    dense_cfg.memory_layers = []
    dense = MemoryLMForCausalLM(dense_cfg).eval()
    width = round(memory_active_params(cfg) / (3 * cfg.hidden_size))
    for i in cfg.memory_layers:
        dense.model.layers[i].ffn = DenseFFN(
            SimpleNamespace(hidden_size=cfg.hidden_size, intermediate_size=width)
        )
    return mem, dense, width


@torch.no_grad()
def _decode_cost(model, batch: int, prompt_len: int, steps: int) -> float:
    """Seconds per generated token of KV-cached decoding (forward only, fixed length)."""
    from transformers.cache_utils import DynamicCache

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, model.config.vocab_size, (batch, prompt_len), generator=g)
    cache = DynamicCache(config=model.config)
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(nxt, cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t0) / (steps * batch)


@torch.no_grad()
def _prefill_cost(model, batch: int, length: int) -> float:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, model.config.vocab_size, (batch, length), generator=g)
    t0 = time.perf_counter()
    model(ids, logits_to_keep=1)
    return (time.perf_counter() - t0) / (batch * length)


def per_token_cost(cfg, reps: int, steps: int) -> dict[str, Any]:
    mem, dense, width = _pair(cfg)
    fns = {
        "decode_b1": lambda m: _decode_cost(m, 1, 16, steps),
        "decode_b8": lambda m: _decode_cost(m, 8, 16, steps),
        "prefill_8x64": lambda m: _prefill_cost(m, 8, 64),
    }
    out: dict[str, Any] = {"hidden_size": cfg.hidden_size, "dense_width": width,
                           "memory_active_params": memory_active_params(cfg)}  # fmt: skip
    for name, fn in fns.items():
        fn(mem), fn(dense)  # warm up
        ms, ds = [], []
        for _ in range(reps):  # interleaved, so that load swings hit both sides alike
            ms.append(fn(mem))
            ds.append(fn(dense))
        m_us, d_us = statistics.median(ms) * 1e6, statistics.median(ds) * 1e6
        out[name] = {"memory_us": round(m_us, 1), "dense_us": round(d_us, 1), "ratio": round(m_us / d_us, 3)}
    return out


def width_curve(base_cfg, widths: list[int], reps: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    for d in widths:
        cfg = copy.deepcopy(base_cfg)
        cfg.hidden_size = d
        cfg.intermediate_size = 4 * d
        cfg.head_dim = d // cfg.num_attention_heads
        rows.append(per_token_cost(cfg, reps, steps))
    return rows


def _print(report: dict[str, Any]) -> None:
    print(f"machine: {report['machine']['cpu_count']} cores, load {report['machine']['loadavg']} "
          f"(before) -> {report['machine_after']['loadavg']} (after), torch threads "
          f"{report['machine']['torch_threads']}")  # fmt: skip
    t = report["throughput"]
    print(f"\nthroughput, greedy <= {t['max_new_tokens']} new tokens; engine {t['engine_settings']}; "
          f"same tokens as generate(): {t['same_tokens_as_generate']}")  # fmt: skip
    print(f"{'conc':>4} | {'memfit tok/s':>12} {'p50 ms':>8} {'p95 ms':>8} {'batch':>5} | "
          f"{'generate tok/s':>14} {'p50 ms':>8} {'p95 ms':>8} | {'ratio':>5}")  # fmt: skip
    for r in t["levels"]:
        m, a = r["memfit"], r["plain_generate"]
        print(f"{r['concurrency']:>4} | {m['tokens_per_s']:>12} {m['p50_ms']:>8} {m['p95_ms']:>8} "
              f"{m['mean_decode_batch']:>5} | {a['tokens_per_s']:>14} {a['p50_ms']:>8} {a['p95_ms']:>8} | "
              f"{r['throughput_ratio']:>5}")  # fmt: skip
    print("\nper-token forward cost, memory layer vs dense FFN of equal active parameters (random weights)")
    print(f"{'d':>4} {'dense f':>7} | {'decode b1 us (mem/dense)':>26} | {'decode b8 us':>22} | "
          f"{'prefill 8x64 us':>22}")  # fmt: skip
    for r in [report["per_token"], *report["width_curve"]]:
        cells = [f"{r[k]['memory_us']:.0f}/{r[k]['dense_us']:.0f} = {r[k]['ratio']:.2f}x"
                 for k in ("decode_b1", "decode_b8", "prefill_8x64")]  # fmt: skip
        print(
            f"{r['hidden_size']:>4} {r['dense_width']:>7} | {cells[0]:>26} | {cells[1]:>22} | {cells[2]:>22}"
        )


def run(args) -> int:
    from memlm.config import MemoryLMConfig

    quick = bool(getattr(args, "quick", False))
    # intra-op threads: on a box whose load exceeds its cores, 2 OpenMP threads per forward are ~10x
    # slower than 1 (spinning workers preempted); MEMFIT_BENCH_THREADS overrides. Same for every side.
    cores = os.cpu_count() or 1
    threads = int(os.environ.get("MEMFIT_BENCH_THREADS", "0")) or (
        1 if os.getloadavg()[0] >= cores else cores
    )
    torch.set_num_threads(threads)
    model_dir = _find_model(getattr(args, "model", None))
    out_dir = Path(args.out) if getattr(args, "out", None) else Path("benchmarks/results/serve")
    levels = [1, 8] if quick else [1, 8, 32]
    per_level = {1: 8, 8: 32} if quick else {1: 16, 8: 64, 32: 128}
    reps, steps = (3, 16) if quick else (5, 32)
    machine = _machine()
    t0 = time.perf_counter()
    report: dict[str, Any] = {"model": str(model_dir), "quick": quick, "machine": machine}
    report["throughput"] = throughput(model_dir, levels, per_level)
    cfg = MemoryLMConfig.from_pretrained(str(model_dir))
    report["per_token"] = per_token_cost(cfg, reps, steps)
    report["width_curve"] = width_curve(cfg, [128, 512] if not quick else [128], reps, steps)
    report["machine_after"] = _machine()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    at8 = next((r for r in report["throughput"]["levels"] if r["concurrency"] == 8), None)
    report["aims"] = {
        "throughput_c8_vs_generate": {"aim": ">= 4x", "measured": at8 and at8["throughput_ratio"]},
        "per_token_vs_dense": {
            "aim": "<= 1.2x",
            "measured_decode_b8": report["per_token"]["decode_b8"]["ratio"],
            "measured_decode_b1": report["per_token"]["decode_b1"]["ratio"],
            "measured_prefill": report["per_token"]["prefill_8x64"]["ratio"],
        },  # fmt: skip
    }
    _print(report)
    path = write_json(report, out_dir, "serve-quick.json" if quick else "serve.json")
    print(f"\nwrote {path} ({report['seconds']} s)")
    return 0
