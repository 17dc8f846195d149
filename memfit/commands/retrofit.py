"""`memfit retrofit --from HF_DIR --out DIR`: add memory layers to a local Hugging Face causal LM.

Loads a local Llama / Qwen2 / GPT-2 checkpoint (single or sharded safetensors; nothing is
downloaded), inserts a product-key memory at each `--layers` block (memlm/retrofit.py), checks that a
parallel retrofit computes what the original did (zero-initialised values: the largest logit change
on random token ids must be 0), optionally warms the new memories up on `--warmup-texts` (plain text,
one document per line, or JSONL with a "text" field) with every base weight frozen, and writes the
model, its `memfit_retrofit.json` and the tokenizer to `--out`. Progress goes to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _texts(path: Path) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                line = str(json.loads(line).get("text", ""))
            except (json.JSONDecodeError, AttributeError):
                pass
        if line:
            out.append(line)
    return out


def _layers(value: str | None, n_blocks: int) -> list[int]:
    if not value:
        return [n_blocks // 2]
    layers = sorted({int(x) for x in value.split(",") if x.strip()})
    bad = [x for x in layers if not 0 <= x < n_blocks]
    if bad:
        raise ValueError(f"--layers {bad} outside 0..{n_blocks - 1} (the model has {n_blocks} blocks)")
    return layers


def run(args) -> int:
    src, out = Path(args.source).expanduser(), Path(args.out).expanduser()
    if not (src / "config.json").exists():
        print(f"memfit retrofit: {src} is not a model directory (no config.json)", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"memfit retrofit: {out} is not empty (use --force to overwrite)", file=sys.stderr)
        return 2
    texts = None
    if args.warmup_texts:
        texts = _texts(Path(args.warmup_texts).expanduser())
        if not texts:
            print(f"memfit retrofit: no text in {args.warmup_texts}", file=sys.stderr)
            return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memlm.retrofit import RetrofitSpec, _blocks, memory_modules, retrofit, save_retrofitted, warmup

    print(f"loading {src}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype=torch.float32).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError) as e:
        tokenizer = None
        if texts is not None:
            print(f"memfit retrofit: --warmup-texts needs the model's tokenizer: {e}", file=sys.stderr)
            return 2
        print(f"note: no tokenizer in {src} ({type(e).__name__}); the output has none either", flush=True)
    base_params = sum(p.numel() for p in model.parameters())
    try:
        layers = _layers(args.layers, len(_blocks(model)))
    except ValueError as e:
        print(f"memfit retrofit: {e}", file=sys.stderr)
        return 2
    print(
        f"{type(model).__name__}: {len(_blocks(model))} blocks, {base_params / 1e6:.2f}M parameters; "
        f"{args.mode} memory of {args.slots} slots at layer(s) {', '.join(map(str, layers))}",
        flush=True,
    )

    vocab = int(model.get_input_embeddings().weight.shape[0])
    positions = int(
        getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions", 0) or 16
    )
    probe = torch.randint(vocab, (2, min(16, positions)), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        before = model(probe).logits.float()
    try:
        for i, layer in enumerate(layers):
            spec = RetrofitSpec(
                layer=layer,
                mode=args.mode,
                memory_size=args.slots,
                memory_heads=args.heads,
                memory_topk=args.topk,
                memory_key_dim=args.key_dim,
                memory_gate=not args.no_gate,
            )
            retrofit(model, spec, seed=args.seed + i)
    except (ValueError, AssertionError) as e:
        print(f"memfit retrofit: {e}", file=sys.stderr)
        return 2
    added = sum(p.numel() for m in memory_modules(model).values() for p in m.parameters())
    with torch.no_grad():
        change = float((model(probe).logits.float() - before).abs().max())
    print(
        f"memory added: {added / 1e6:.2f}M parameters; largest logit change on random ids: {change:.3g}",
        flush=True,
    )
    if args.mode == "parallel" and change != 0.0:
        print("memfit retrofit: a parallel retrofit changed the outputs; not written", file=sys.stderr)
        return 1

    if texts is not None:
        steps = int(args.warmup_steps)
        every = max(1, steps // 10)
        print(f"warm-up: {steps} steps on {len(texts)} texts, base frozen", flush=True)

        def show(step: int, loss: float) -> None:
            if step == 1 or step % every == 0 or step == steps:
                print(f"  step {step}/{steps}  loss {loss:.4f}", flush=True)

        losses = warmup(
            model, tokenizer, texts, steps=steps, lr=args.warmup_lr, seed=args.seed, progress=show
        )
        print(f"warm-up loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_retrofitted(model, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    print(f"wrote {out}", flush=True)
    return 0
