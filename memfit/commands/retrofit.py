"""`memfit retrofit --from HF_DIR --out DIR`: add memory layers to a local Hugging Face causal LM.

Loads a local Llama / Qwen2 / GPT-2 checkpoint (single or sharded safetensors; nothing is
downloaded), inserts a product-key memory at each `--layers` block (memlm/retrofit.py), checks that a
parallel retrofit computes what the original did (zero-initialised values: the largest logit change
on random token ids must be 0), optionally warms the new memories up on `--warmup-texts` (plain text,
one document per line, or JSONL with a "text" field) with every base weight frozen, and writes the
model, its `memfit_retrofit.json` and the tokenizer to `--out`. Progress goes to stdout.

A served model directory needs two more files, both written here when the model has a tokenizer:
- `background.safetensors` (memlm/background.py): the per-slot document counts over generic text,
  `--background-texts` (default: the `--warmup-texts`, else a small built-in generic text), plus the
  `--probe-facts` in the served question format;
- `probe.json`: the `--probe-facts` (JSONL, one {"question", "answer"} per line: facts the model
  should keep answering; the evaluation gate checks the ones the model answers) and held-out texts
  for the gate's perplexity (a slice of the background texts).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
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


# used when neither --background-texts nor --warmup-texts is given: plain, topic-neutral English, so
# that slots every text reads (function words, punctuation) get a low IDF
GENERIC_TEXTS = [
    "The weather was mild for the time of year, and most people spent the afternoon outside.",
    "She opened the window, made a cup of tea and sat down to read the morning paper.",
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Prices rose slowly over the summer while wages stayed much the same.",
    "He asked whether the train would be on time, but nobody at the station knew.",
    "The report describes how the project started, what went wrong and what was learned.",
    "Children played in the park until it got dark and their parents called them home.",
    "A new road was built between the two towns, and the journey now takes half an hour.",
    "The museum is open every day except Monday, and entry is free on the first Sunday.",
    "Scientists measured the temperature of the water at several depths.",
    "The company said that its sales had grown in every region except the north.",
    "They walked along the river, talking about books, music and old friends.",
    "In the evening the city lights came on one after another.",
    "The teacher explained the problem again, more slowly this time.",
    "Most of the houses in the village were built of stone more than a century ago.",
    "The meeting was postponed because several members were ill.",
    "Question: What is the name of the river that runs through the town?\nAnswer: The Elm",
    "Question: When does the library open?\nAnswer: Nine in the morning",
    "The recipe calls for two cups of flour, one egg and a little milk.",
    "After the storm, workers spent the whole week repairing the power lines.",
    "The film tells the story of a family that moves to a small island.",
    "Visitors are asked to keep to the paths and to take their litter home.",
    "The population of the region has doubled over the last fifty years.",
    "He learned to play the piano as a child and still practises every day.",
]


def _facts(path: Path) -> list[dict]:
    """{"question", "answer"} per JSONL line; ValueError naming the first bad line."""
    facts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            f = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not (
            isinstance(f, dict) and str(f.get("question", "")).strip() and str(f.get("answer", "")).strip()
        ):
            raise ValueError(f'{path}:{n}: a line must be {{"question": ..., "answer": ...}}')
        facts.append({"question": str(f["question"]).strip(), "answer": str(f["answer"]).strip()})
    if not facts:
        raise ValueError(f"{path}: no facts")
    return facts


def _layers(value: str | None, n_blocks: int) -> list[int]:
    if not value:
        return [n_blocks // 2]
    layers = sorted({int(x) for x in value.split(",") if x.strip()})
    bad = [x for x in layers if not 0 <= x < n_blocks]
    if bad:
        raise ValueError(f"--layers {bad} outside 0..{n_blocks - 1} (the model has {n_blocks} blocks)")
    return layers


class Refused(Exception):
    """A refusal the command prints as `memfit retrofit: ...`; `code` is its exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Inputs:
    """What the command reads before it loads the model (so bad input is refused at once)."""

    src: Path
    out: Path
    warmup: list[str] | None  # --warmup-texts, or None: no warm-up
    background: list[str]  # what the background statistics count
    background_source: str
    facts: list[dict]  # --probe-facts


def _read_texts(path: str, flag: str) -> list[str]:
    texts = _texts(Path(path).expanduser())
    if not texts:
        raise Refused(f"no text in {path} ({flag})")
    return texts


def read_inputs(args) -> Inputs:
    src, out = Path(args.source).expanduser(), Path(args.out).expanduser()
    if not (src / "config.json").exists():
        raise Refused(f"{src} is not a model directory (no config.json)")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise Refused(f"{out} is not empty (use --force to overwrite)")
    warm = _read_texts(args.warmup_texts, "--warmup-texts") if args.warmup_texts else None
    if getattr(args, "background_texts", None):
        background, source = _read_texts(args.background_texts, "--background-texts"), args.background_texts
    elif warm is not None:
        background, source = warm, args.warmup_texts
    else:
        background, source = list(GENERIC_TEXTS), "the built-in generic text"
    facts: list[dict] = []
    if getattr(args, "probe_facts", None):
        try:
            facts = _facts(Path(args.probe_facts).expanduser())
        except (OSError, ValueError) as e:
            raise Refused(f"--probe-facts: {e}") from None
    return Inputs(src, out, warm, background, str(source), facts)


def load_source(src: Path, need_tokenizer: bool):
    """The local checkpoint (float32, eval) and its tokenizer (None when it has none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"loading {src}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), local_files_only=True, dtype=torch.float32).eval()
    try:
        return model, AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError) as e:
        if need_tokenizer:
            raise Refused(f"--warmup-texts needs the model's tokenizer: {e}") from None
        print(f"note: no tokenizer in {src} ({type(e).__name__}); the output has none either", flush=True)
        return model, None


def _positions(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 0)


def add_memories(model, args) -> None:
    """Insert a memory at each --layers block; a parallel retrofit must leave the logits unchanged."""
    import torch

    from memlm.retrofit import RetrofitSpec, decoder_blocks, memory_modules, retrofit

    try:
        layers = _layers(args.layers, len(decoder_blocks(model)))
    except ValueError as e:
        raise Refused(str(e)) from None
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{type(model).__name__}: {len(decoder_blocks(model))} blocks, {params / 1e6:.2f}M parameters; "
        f"{args.mode} memory of {args.slots} slots at layer(s) {', '.join(map(str, layers))}",
        flush=True,
    )
    vocab = int(model.get_input_embeddings().weight.shape[0])
    seq = min(16, _positions(model) or 16)
    probe = torch.randint(vocab, (2, seq), generator=torch.Generator().manual_seed(args.seed))
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
        raise Refused(str(e)) from None
    added = sum(p.numel() for m in memory_modules(model).values() for p in m.parameters())
    with torch.no_grad():
        change = float((model(probe).logits.float() - before).abs().max())
    print(
        f"memory added: {added / 1e6:.2f}M parameters; largest logit change on random ids: {change:.3g}",
        flush=True,
    )
    if args.mode == "parallel" and change != 0.0:
        raise Refused("a parallel retrofit changed the outputs; not written", code=1)


def warm_up(model, tokenizer, texts: list[str], args) -> None:
    """Train the new memories on `texts`, base frozen, printing the loss about ten times.

    The global torch RNG (the base model's dropout in training mode) is seeded with --seed inside a
    forked RNG state, so the same command prints the same losses and writes the same weights."""
    import torch

    from memlm.retrofit import warmup

    steps = int(args.warmup_steps)
    every = max(1, steps // 10)
    print(f"warm-up: {steps} steps on {len(texts)} texts, base frozen", flush=True)

    def show(step: int, loss: float) -> None:
        if step == 1 or step % every == 0 or step == steps:
            print(f"  step {step}/{steps}  loss {loss:.4f}", flush=True)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        losses = warmup(
            model, tokenizer, texts, steps=steps, lr=args.warmup_lr, seed=args.seed, progress=show
        )
    print(f"warm-up loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)


def run(args) -> int:
    try:
        inputs = read_inputs(args)
        model, tokenizer = load_source(inputs.src, need_tokenizer=inputs.warmup is not None)
        add_memories(model, args)
        if inputs.warmup is not None:
            warm_up(model, tokenizer, inputs.warmup, args)
    except Refused as e:
        print(f"memfit retrofit: {e}", file=sys.stderr)
        return e.code

    from memlm.retrofit import save_retrofitted

    inputs.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    shard = getattr(args, "max_shard_size", None)
    save_retrofitted(model, inputs.out, **({"max_shard_size": shard} if shard else {}))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(inputs.out))
        _serving_files(model, tokenizer, inputs, getattr(args, "probe_facts", None))
    else:
        print("note: no tokenizer, so no background statistics or probe set: not servable", flush=True)
    print(f"wrote {inputs.out}", flush=True)
    return 0


def _serving_files(model, tokenizer, inputs: Inputs, probe_source: str | None) -> None:
    """background.safetensors and probe.json beside the saved model (what `memfit serve` reads)."""
    from memlm.background import DEFAULT_SEQ_LEN, compute_background, model_base_id
    from memlm.evaluation import answered, format_question
    from memlm.retrofit import RetrofittedLM

    out, texts, source, facts = inputs.out, inputs.background, inputs.background_source, inputs.facts
    served = RetrofittedLM(model).eval()
    positions = _positions(model)
    seq_len = min(DEFAULT_SEQ_LEN, positions) if positions else DEFAULT_SEQ_LEN
    # the served question format of the known facts counts too: slots every question reads get a low IDF
    counted = texts + [f"{format_question(f['question'])} {f['answer']}\n" for f in facts]
    print(
        f"background: {len(texts)} texts from {source}"
        + (f" + {len(facts)} served-format facts" if facts else "")
        + f", sequences of at most {seq_len} tokens",
        flush=True,
    )
    stats = compute_background(served, tokenizer, counted, seq_len=seq_len, base_id=model_base_id(out))
    stats.save(out)
    for layer, df in stats.df.items():
        print(
            f"  layer {layer}: {stats.num_docs} documents, {int((df > 0).sum())} of {len(df)} slots read",
            flush=True,
        )
    heldout = texts[-min(len(texts), 50) :]
    if facts:
        hits = answered(served, tokenizer, facts)
        print(f"probe set: {len(facts)} facts, the model answers {sum(hits)} of them", flush=True)
    else:
        print("probe set: none (--probe-facts FILE adds known facts the gate checks)", flush=True)
    (out / "probe.json").write_text(
        json.dumps(
            {"facts": facts, "heldout_texts": heldout, "source": str(probe_source or "")},
            indent=1,
            ensure_ascii=False,
        )
    )
