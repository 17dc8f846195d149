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
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .background import compute_background, model_base_id
from .data import build_corpus
from .modeling import MemoryLMForCausalLM
from .presets import PRESETS, UPDATE_DEFAULTS_FILE, Preset, preset_with, update_defaults_of
from .tokenizer import build_tokenizer, encode_texts
from .training import (
    Optimizers,
    RowSampler,
    ThreadTuner,
    answer_positions,
    bf16_ok,
    clip_grad_norm,
    cpu_threads,
    lr_factor,
    read_sharing_penalty,
    usage_balance_penalty,
)

__all__ = ["PRESETS", "Preset", "preset_with", "pretrain", "served_background", "background_texts"]


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
            "generation_tokens_per_s", "memory_usage", "model_dir_bytes", "footprint"]  # fmt: skip
    return {k: report[k] for k in keys if k in report}


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _ema(old: float | None, value: float) -> float:
    return value if old is None else 0.95 * old + 0.05 * value


class _Penalties:
    """The memory-read penalties of a preset (read sharing at answer positions, sub-key usage balance):
    forward pre-hooks capture each memory's input, `add` puts the weighted penalties on the loss, and
    EMAs of both are kept for the progress bar and the training report (None: penalty off)."""

    def __init__(self, model, p: Preset):
        self.p = p
        self.memories = model.memory_modules()
        self.inputs: dict[int, torch.Tensor] = {}
        self.share_ema: float | None = None
        self.balance_ema: float | None = None
        self.hooks = []
        if p.answer_read_penalty > 0 or p.usage_balance_penalty > 0:
            self.hooks = [m.register_forward_pre_hook(self._capture(i)) for i, m in self.memories.items()]

    def _capture(self, layer: int):
        def hook(module, args):
            self.inputs[layer] = args[0]

        return hook

    def add(self, loss: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
        p = self.p
        detach = p.answer_read_penalty_scope == "query"
        inputs = {i: x.detach() if detach else x for i, x in self.inputs.items()}
        if p.answer_read_penalty > 0:
            share = sum(read_sharing_penalty(m, inputs[i], marked) for i, m in self.memories.items())
            self.share_ema = _ema(self.share_ema, float(share.detach()))
            loss = loss + p.answer_read_penalty * share
        if p.usage_balance_penalty > 0:
            balance = sum(usage_balance_penalty(m, inputs[i]) for i, m in self.memories.items())
            balance = balance / len(self.memories)
            self.balance_ema = _ema(self.balance_ema, float(balance.detach()))
            loss = loss + p.usage_balance_penalty * balance
        return loss

    def postfix(self) -> dict[str, str]:
        out = {} if self.share_ema is None else {"share": f"{self.share_ema:.3f}"}
        if self.balance_ema is not None:
            out["balance"] = f"{self.balance_ema:.2f}"
        return out

    def remove(self) -> None:
        for handle in self.hooks:
            handle.remove()


def _prepare(p: Preset, seed: int, progress: bool):
    """The corpus (plus the preset's invented pretraining facts), the tokenizer trained on it, and the
    row sampler over the encoded Wikipedia stream and fact texts."""
    corpus = build_corpus(seed, max_wiki=p.max_wiki, max_probe=p.max_probe, probe_cities=p.probe_cities)
    extra = invented_pretraining_texts(p.pretrain_invented_facts, seed)
    corpus.fact_texts.extend(extra)
    corpus.pretrain.extend(extra)
    _log(progress, f"corpus: {len(corpus.pretrain)} pretraining texts ({len(corpus.fact_texts)} fact texts), "
         f"{len(corpus.background)} background, {len(corpus.evaluation)} evaluation, {len(corpus.probe)} probe facts")  # fmt: skip
    tokenizer = build_tokenizer(corpus.pretrain, p.vocab_size, model_max_length=p.max_position_embeddings)
    fact_set = set(corpus.fact_texts)
    wiki_ids = encode_texts(tokenizer, [t for t in corpus.pretrain if t not in fact_set])
    fact_ids = encode_texts(tokenizer, corpus.fact_texts)
    marks = answer_positions(tokenizer, corpus.fact_texts) if p.answer_read_penalty > 0 else None
    sampler = RowSampler(wiki_ids, fact_ids, tokenizer.eos_token_id, p.seq_len, seed, fact_marks=marks)
    fact_tokens = sum(map(len, fact_ids))
    _log(progress, f"tokenizer: {len(tokenizer)} tokens; pretraining stream {len(sampler.wiki)} tokens "
         f"+ {fact_tokens} fact tokens")  # fmt: skip
    return corpus, tokenizer, sampler, fact_tokens


def _train(model, sampler: RowSampler, p: Preset, dev: torch.device, threads: int, progress: bool) -> dict:
    """The training loop: warmup + cosine to `max_steps` or `time_budget_s`, whichever is further along;
    returns the loop's figures for the training report."""
    optimizer = Optimizers(model, p)
    use_bf16 = p.bf16 and bf16_ok(dev)
    penalties = _Penalties(model, p)
    model.train()
    tuner = ThreadTuner(threads, every=50)
    t_train = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=p.max_steps, desc=f"pretrain {p.name}", unit="step", dynamic_ncols=True)
    step, tokens, ema, stopped_by = 0, 0, None, "steps"
    for step in range(p.max_steps):
        elapsed = time.perf_counter() - t_train
        if p.time_budget_s is not None and elapsed >= p.time_budget_s:
            stopped_by = "time"
            break
        frac = step / p.max_steps
        if p.time_budget_s:
            frac = max(frac, elapsed / p.time_budget_s)
        for g in optimizer.param_groups:
            g["lr"] = p.lr * g["lr_mult"] * lr_factor(frac, step, p.warmup_steps, p.min_lr_ratio)
        tuner.before_step(step)
        t_step = time.perf_counter()
        x, marked = sampler.batch_marked(p.batch_size, p.fact_fraction)
        x, marked = x.to(dev), marked.to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = penalties.add(model(input_ids=x, labels=x).loss, marked)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm(model.parameters(), p.grad_clip)
        optimizer.step()
        tokens += x.numel()
        tuner.after_step(time.perf_counter() - t_step)
        ema = _ema(ema, loss.item())
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(
                    loss=f"{ema:.3f}", lr=f"{lr:.1e}", threads=tuner.current, **penalties.postfix()
                )
    else:
        step = p.max_steps
    penalties.remove()
    if bar is not None:
        bar.close()
    seconds_train = time.perf_counter() - t_train
    _log(
        progress,
        f"trained {step} steps ({stopped_by}), {tokens} tokens in {seconds_train:.0f} s, loss {ema:.3f}",
    )
    torch.set_num_threads(tuner.current)
    return {
        "bf16_autocast": use_bf16,
        "steps": step,
        "stopped_by": stopped_by,
        "tokens_seen": tokens,
        "final_loss": ema,
        "final_read_sharing": penalties.share_ema,  # read_sharing_penalty's EMA at the end (None: off)
        "final_usage_balance": penalties.balance_ema,  # usage_balance_penalty's EMA at the end (None: off)
        "seconds_train": seconds_train,
    }


def _evaluate(model, tokenizer, corpus, p: Preset, progress: bool) -> dict:
    """Probe accuracy in both wordings, held-out perplexity, generation speed and samples, and the memory
    usage figures (memlm.usage) on the held-out texts and the probe's QA texts."""
    from .data.templates import QA_TEMPLATE
    from .evaluation import fact_accuracy, perplexity
    from .usage import memory_usage

    t_eval = time.perf_counter()
    probe = corpus.probe
    acc = fact_accuracy(model, tokenizer, probe)
    acc_heldout = fact_accuracy(model, tokenizer, probe, key="heldout_question")
    eval_texts = corpus.evaluation[: p.eval_texts]
    ppl = perplexity(model, tokenizer, eval_texts, max_length=p.seq_len)
    gen_tps, sample = generation_speed(model, tokenizer, "The capital of France is")
    _, sample_qa = generation_speed(model, tokenizer, "Question: What is the capital of Japan?\nAnswer:", 8)
    qa = [QA_TEMPLATE.format(question=f["question"], answer=f["answer"]).rstrip("\n") for f in probe]
    usage = memory_usage(model, tokenizer, eval_texts, qa, seq_len=p.seq_len)
    _log(progress, f"probe {acc:.1%} (held-out wording {acc_heldout:.1%}), held-out perplexity {ppl:.1f}, "
         f"{gen_tps:.0f} tokens/s")  # fmt: skip
    return {
        "seconds_eval": time.perf_counter() - t_eval,
        "probe_facts": len(probe),
        "probe_accuracy": acc,
        "probe_accuracy_heldout": acc_heldout,
        "heldout_perplexity": ppl,
        "heldout_perplexity_texts": len(eval_texts),
        "generation_tokens_per_s": gen_tps,
        "sample_prompt": "The capital of France is",
        "sample_generation": sample,
        "sample_qa": sample_qa,
        # memlm.usage on the held-out texts and the probe QA texts, per memory layer
        "memory_usage": {str(k): v for k, v in usage.items()},
        "eval_texts": eval_texts,
    }


def _build(p: Preset, out: Path, seed: int, progress: bool, device_name: str | None) -> dict:
    t_start = time.perf_counter()
    threads = p.threads or cpu_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    dev = torch.device(device_name or ("cuda" if torch.cuda.is_available() else "cpu"))
    corpus, tokenizer, sampler, fact_tokens = _prepare(p, seed, progress)

    config = p.model_config()
    config.vocab_size = len(tokenizer)
    model = MemoryLMForCausalLM(config).to(dev)
    params_total = sum(t.numel() for t in model.parameters())
    params_memory = sum(t.numel() for m in model.memory_modules().values() for t in m.parameters())
    trained = _train(model, sampler, p, dev, threads, progress)
    for m in model.memory_modules().values():
        m.bn_update = False
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    evaluated = _evaluate(model, tokenizer, corpus, p, progress)
    eval_texts = evaluated.pop("eval_texts")

    t_bg = time.perf_counter()
    base_id = model_base_id(out)
    texts = background_texts(corpus, p, seed)
    stats = compute_background(
        model, tokenizer, texts, unit=p.background_unit, seq_len=p.seq_len, base_id=base_id
    )
    stats.meta["served_facts"] = p.background_served_facts
    stats.save(out)
    seconds_background = time.perf_counter() - t_bg

    (out / "probe.json").write_text(
        json.dumps(
            {"facts": corpus.probe, "heldout_texts": eval_texts, "seed": seed}, indent=1, ensure_ascii=False
        )
    )
    (out / "splits.json").write_text(json.dumps(corpus.split_hashes(), indent=2))
    (out / UPDATE_DEFAULTS_FILE).write_text(json.dumps(update_defaults_of(p), indent=2) + "\n")
    report = {
        "preset": p.name,
        "preset_settings": asdict(p),
        "seed": seed,
        "device": str(dev),
        "threads": threads,
        "torch": torch.__version__,
        # the allocator settings the build ran with (glibc reads MALLOC_* at start; memfit pretrain sets them)
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        "params_total": params_total,
        "params_memory": params_memory,
        "memory_slots": config.memory_size,
        "memory_layers": config.memory_layers,
        "vocab_size": len(tokenizer),
        "pretrain_stream_tokens": int(len(sampler.wiki)),
        "fact_tokens": fact_tokens,
        **trained,
        "seconds_background": seconds_background,
        **evaluated,
        "background": {"unit": stats.unit, "num_docs": stats.num_docs, **stats.meta},
        "background_slots_read_share": {str(k): float((df > 0).float().mean()) for k, df in stats.df.items()},
        "model_dir_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
        "base_id": base_id,
    }
    report["seconds_total"] = time.perf_counter() - t_start
    # load time and serving memory, from a fresh process (memlm.footprint); not part of seconds_total
    from .footprint import measure as measure_footprint

    report["footprint"] = measure_footprint(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report
