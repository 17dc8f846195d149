"""GPU figures for the memory layer and the sparse updater, each against a baseline in the same run.

    python benchmarks/gpu_bench.py [--out FILE.json]

Run by benchmarks/gpu_check.sh on a CUDA machine. The model has the default preset's shapes
(memlm.pretrain.PRESETS["default"]) with random weights and a random background table: these figures
are about speed, which depends on shapes, not on what the weights know. Printed and written as JSON:

1. one sparse update (30 SGD steps, t=2000, a one-fact-sized batch) on CUDA vs the same update on this
   machine's CPU, and vs 30 steps of full finetuning (AdamW over every parameter) on CUDA;
2. the memory read alone: F.embedding_bag (the reference path) vs the fused Triton kernel
   (memlm.fused), decode-shaped and prefill-shaped, fp32 and bf16;
3. a whole-model decode step (one new token, KV cache of 64) at batch 1 and 8, reference vs Triton read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memlm import MemoryLMForCausalLM  # noqa: E402
from memlm.background import BackgroundStats  # noqa: E402
from memlm.presets import PRESETS  # noqa: E402
from memlm.updater import UpdateSettings, sparse_update  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int = 3) -> list[float]:
    fn()  # warm-up (allocations, kernel compilation)
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def cuda_ms(fn, iters: int = 200) -> float:
    """Mean milliseconds per call, CUDA events over `iters` calls after 20 warm-ups."""
    for _ in range(20):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def build(device: str) -> tuple[MemoryLMForCausalLM, BackgroundStats]:
    torch.manual_seed(0)
    cfg = PRESETS["default"].model_config()
    model = MemoryLMForCausalLM(cfg).eval().to(device)
    g = torch.Generator().manual_seed(1)
    n_docs = 5000
    # skewed like a real table: most slots rarely read, a few read by much of the background
    df = {
        i: (torch.rand(cfg.memory_size, generator=g) ** 6 * n_docs).long() for i in model.config.memory_layers
    }
    return model, BackgroundStats(df=df, num_docs=n_docs)


def fact_batch(vocab: int, device: str) -> dict[str, torch.Tensor]:
    """16 sequences of 24 tokens, loss on the last 4: the size of one fact's QA forms."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, vocab, (16, 24), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def update_figures(device: str) -> dict:
    model, bg = build(device)
    batch = fact_batch(model.config.vocab_size, device)
    # the settings of the committed run (benchmarks/results/gpu/), made before idf_lr_power defaulted to 1;
    # the scaling adds one multiply per selected row and step
    settings = UpdateSettings(steps=30, early_stop=False, top_t=2000, lr=1000.0, idf_lr_power=0.0)
    sparse = timed(lambda: sparse_update(model, [batch], bg, settings), device)

    dense, _ = build(device)
    opt = torch.optim.AdamW(dense.parameters(), lr=1e-4)

    def full_ft():
        for _ in range(30):
            loss = dense(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    full = timed(full_ft, device)
    return {"sparse_30_steps_s": statistics.median(sparse), "full_ft_30_steps_s": statistics.median(full)}


def read_figures() -> list[dict]:
    from memlm import fused

    cfg = PRESETS["default"].model_config()
    rows = []
    g = torch.Generator(device="cuda").manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        table = torch.randn(cfg.memory_size, cfg.hidden_size, device="cuda", generator=g).to(dtype)
        k = cfg.memory_heads * cfg.memory_topk
        for shape, bags in (("decode b8", 8), ("prefill 8x128", 8 * 128)):
            idx = torch.randint(0, cfg.memory_size, (bags, k), device="cuda", generator=g)
            w = torch.rand(bags, k, device="cuda", generator=g).to(dtype)

            def ref_fn(idx=idx, table=table, w=w):
                return F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")

            def tri_fn(idx=idx, table=table, w=w):
                return fused.bag(idx, table, w)

            ok = torch.allclose(
                tri_fn().float(), ref_fn().float(), atol=5e-2 if dtype != torch.float32 else 1e-4, rtol=2e-2
            )
            ref, tri = cuda_ms(ref_fn), cuda_ms(tri_fn)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "shape": shape, "bags": bags, "k": k,
                         "embedding_bag_ms": ref, "triton_ms": tri, "speedup": ref / tri, "match": ok})  # fmt: skip
    return rows


def decode_figures() -> list[dict]:
    model, _ = build("cuda")
    rows = []
    for batch in (1, 8):
        g = torch.Generator().manual_seed(4)
        prompt = torch.randint(2, model.config.vocab_size, (batch, 64), generator=g).cuda()
        with torch.no_grad():
            cache = model(prompt, use_cache=True).past_key_values
            step = torch.randint(2, model.config.vocab_size, (batch, 1), generator=g).cuda()
            out = {}
            for mode in ("torch", "triton"):
                os.environ["MEMFIT_MEMORY_KERNEL"] = mode

                # drop the new token after each call so every timed step sees 64 cached tokens
                def one(cache=cache, step=step):
                    model(step, cache=cache, use_cache=True, logits_to_keep=1)
                    cache.crop(-1)

                out[mode] = cuda_ms(one, iters=100)
            os.environ["MEMFIT_MEMORY_KERNEL"] = "torch"
        rows.append({"batch": batch, "reference_ms": out["torch"], "triton_ms": out["triton"],
                     "speedup": out["torch"] / out["triton"]})  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu/gpu_bench.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs one", file=sys.stderr)
        return 2
    res: dict = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
            "host": platform.node(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "model": "default preset shapes, random weights",
    }
    cuda_u = update_figures("cuda")
    print(f"[1] update on CUDA: sparse 30 steps {cuda_u['sparse_30_steps_s']:.3f} s, full FT 30 steps "
          f"{cuda_u['full_ft_30_steps_s']:.3f} s (sparse/full {cuda_u['sparse_30_steps_s'] / cuda_u['full_ft_30_steps_s']:.2f}x)", flush=True)  # fmt: skip
    cpu_u = update_figures("cpu")
    print(f"[1] same on this machine's CPU ({torch.get_num_threads()} threads): sparse {cpu_u['sparse_30_steps_s']:.3f} s, "
          f"full FT {cpu_u['full_ft_30_steps_s']:.3f} s; CUDA speedup for the sparse update "
          f"{cpu_u['sparse_30_steps_s'] / cuda_u['sparse_30_steps_s']:.1f}x", flush=True)  # fmt: skip
    res["update"] = {"cuda": cuda_u, "cpu": cpu_u}
    res["memory_read"] = read_figures()
    for r in res["memory_read"]:
        print(f"[2] read {r['dtype']:8s} {r['shape']:14s} embedding_bag {r['embedding_bag_ms'] * 1e3:7.1f} us  "
              f"triton {r['triton_ms'] * 1e3:7.1f} us  {r['speedup']:.2f}x  match={r['match']}", flush=True)  # fmt: skip
    res["decode_step"] = decode_figures()
    for r in res["decode_step"]:
        print(f"[3] decode step batch {r['batch']}: reference {r['reference_ms']:.3f} ms, triton read "
              f"{r['triton_ms']:.3f} ms ({r['speedup']:.2f}x)", flush=True)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["match"] for r in res["memory_read"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
