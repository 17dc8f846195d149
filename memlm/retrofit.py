"""Add a product-key memory layer to an existing local Hugging Face causal LM (Llama, Qwen2, GPT-2).

Two modes:
- "parallel": the memory is added beside the chosen layer's MLP with zero-initialised values, so the
  retrofitted model computes exactly what the original did until its memory is trained;
- "replace": the memory replaces the chosen layer's MLP (values initialised randomly; needs training).

Slot indices are read with `collect_memory_indices(model)`, a context manager of forward hooks: the
memory module returns them, nothing is stored on the module. `save_retrofitted` / `load_retrofitted`
round-trip the result as a normal model directory plus `memfit_retrofit.json` (the list of specs, one
per memory layer; a single spec object from older files is read too).

`warmup(model, tokenizer, texts, ...)` trains only the new memories (query, keys, values, gate) on
generic text with every base weight frozen; `max_logit_change(a, b, ids)` measures how far two models'
outputs are apart (0.0 for a parallel retrofit before any training). The `memfit retrofit` command
(memfit/commands/retrofit.py) strings these together for a local checkpoint.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from .config import MemoryLMConfig
from .memory import ProductKeyMemory

RETROFIT_FILE = "memfit_retrofit.json"


@dataclass
class RetrofitSpec:
    layer: int  # which transformer block gets the memory
    mode: str = "parallel"  # "parallel" (identity at init) or "replace"
    memory_size: int = 16384  # N slots, a perfect square
    memory_heads: int = 4  # query heads sharing one value table
    memory_topk: int = 32  # slots per head and token
    memory_key_dim: int = 128  # full key dim per head
    memory_gate: bool = True  # Memory+ gate


class _Call:
    """What one `RetrofittedLM` forward pass hands its memories: the row overlay to read, and where to
    put the slot indices each memory returns. Held in a ContextVar, so concurrent calls (the engine's
    decoding threads) never see each other's overlay."""

    def __init__(self, overlay: dict | None) -> None:
        self.overlay = overlay or {}
        self.indices: dict[int, torch.Tensor] = {}


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("memfit_retrofit_call", default=None)


class RetrofitMemoryMLP(nn.Module):
    """Wraps a block's MLP: out = mlp(h) + memory(h) (parallel) or memory(h) (replace)."""

    def __init__(self, mlp: nn.Module | None, memory: ProductKeyMemory, layer: int = -1):
        super().__init__()
        self.mlp = mlp
        self.memory = memory
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        call = _CALL.get()
        if call is None:
            out = self.memory(hidden_states).out
        else:
            mem = self.memory(hidden_states, call.overlay.get(self.layer))
            call.indices[self.layer] = mem.indices
            out = mem.out
        if self.mlp is not None:
            out = out + self.mlp(hidden_states, *args, **kwargs)
        return out


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama / Qwen2 / Mistral-like or GPT-2 model, in order."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):  # Llama, Qwen2, Mistral-like
        return inner.layers
    tr = getattr(model, "transformer", None)
    if tr is not None and hasattr(tr, "h"):  # GPT-2
        return tr.h
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: expected Llama, Qwen2 or GPT-2 layout"
    )


def _hidden_size(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot find the hidden size in {type(config).__name__}")


def retrofit(model: nn.Module, spec: RetrofitSpec, seed: int = 0) -> nn.Module:
    """Insert a memory into `model` in place and return it."""
    if spec.mode not in ("parallel", "replace"):
        raise ValueError(f"retrofit mode {spec.mode!r} is not 'parallel' or 'replace'")
    blocks = decoder_blocks(model)
    if not 0 <= spec.layer < len(blocks):
        raise ValueError(f"layer {spec.layer} outside 0..{len(blocks) - 1}")
    block = blocks[spec.layer]
    if isinstance(block.mlp, RetrofitMemoryMLP):
        raise ValueError(f"layer {spec.layer} already has a memory")
    d = _hidden_size(model.config)
    mcfg = MemoryLMConfig(
        vocab_size=8,
        hidden_size=d,
        num_hidden_layers=1,
        num_attention_heads=1,
        memory_size=spec.memory_size,
        memory_heads=spec.memory_heads,
        memory_topk=spec.memory_topk,
        memory_key_dim=spec.memory_key_dim,
        memory_gate=spec.memory_gate,
    )
    gen = torch.Generator().manual_seed(seed)
    memory = ProductKeyMemory(mcfg)
    with torch.no_grad():
        memory.subkeys.copy_(torch.randn(memory.subkeys.shape, generator=gen) / memory.half_dim**0.5)
        for lin in [memory.query] + ([memory.gate_proj, memory.out_proj] if memory.gate else []):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * d**-0.5)
        if spec.mode == "parallel":
            memory.values.weight.zero_()
        else:
            memory.values.weight.copy_(torch.randn(memory.values.weight.shape, generator=gen) * d**-0.5)
    ref = next(model.parameters())
    memory.to(device=ref.device, dtype=ref.dtype)
    block.mlp = RetrofitMemoryMLP(block.mlp if spec.mode == "parallel" else None, memory, spec.layer)
    model.config.memfit_retrofit = [*retrofit_specs(model.config), asdict(spec)]
    return model


def retrofit_specs(config) -> list[dict]:
    """The specs recorded on a config (a list; one dict from older files becomes a list of one)."""
    got = getattr(config, "memfit_retrofit", None)
    if got is None:
        return []
    return [dict(x) for x in got] if isinstance(got, list) else [dict(got)]


def memory_modules(model: nn.Module) -> dict[int, ProductKeyMemory]:
    """{layer: memory} of a retrofitted (or native memlm) model."""
    if hasattr(model, "memory_modules"):
        return model.memory_modules()
    return {
        i: b.mlp.memory for i, b in enumerate(decoder_blocks(model)) if isinstance(b.mlp, RetrofitMemoryMLP)
    }


@contextlib.contextmanager
def collect_memory_indices(model: nn.Module) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Collect the (B, T, H, k) indices each memory returns during the calls inside the block."""
    got: dict[int, list[torch.Tensor]] = {}
    handles = []
    for layer, mem in memory_modules(model).items():
        got[layer] = []
        handles.append(mem.register_forward_hook(lambda _m, _i, out, _l=layer: got[_l].append(out.indices)))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def save_retrofitted(model: nn.Module, out_dir: str | Path, **kw) -> None:
    """`save_pretrained(out_dir, **kw)` (e.g. max_shard_size) plus the specs file."""
    out = Path(out_dir)
    model.save_pretrained(out, **kw)
    (out / RETROFIT_FILE).write_text(json.dumps(retrofit_specs(model.config), indent=2))


def load_retrofitted(model_dir: str | Path, **kw) -> nn.Module:
    """Load a directory written by `save_retrofitted` (base architecture + memory weights)."""
    path = Path(model_dir)
    raw = json.loads((path / RETROFIT_FILE).read_text())
    specs = [RetrofitSpec(**x) for x in (raw if isinstance(raw, list) else [raw])]
    from transformers.utils import logging as hf_logging

    # the base architecture does not know the memory keys (and a parallel retrofit renames the MLP's):
    # its load report would list them all as unexpected / missing; they are loaded below and checked
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    finally:
        hf_logging.set_verbosity(level)
    model.config.memfit_retrofit = None  # config.json carries the specs too: apply them once
    for spec in specs:
        retrofit(model, spec)
    state = {}
    for f in sorted(path.glob("model*.safetensors")):  # not background.safetensors
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    memory_missing = [k for k in missing if ".memory." in k]
    if memory_missing:
        raise ValueError(f"{path}: memory weights missing from the checkpoint: {memory_missing[:4]}")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    base_missing = [k for k in missing if ".memory." not in k and not (tied and k.endswith("lm_head.weight"))]
    if base_missing:  # e.g. a wrapped MLP's weights: they would stay randomly initialised
        raise ValueError(f"{path}: weights missing from the checkpoint: {base_missing[:4]}")
    return model


class _Body(nn.Module):
    """The native `model.model` interface over a Hugging Face base model: (ids, mask, position ids,
    cache, overlay) -> (final hidden states (B, T, d), cache, memory indices in layer order)."""

    def __init__(self, base: nn.Module, layers: list[int]) -> None:
        super().__init__()
        self.base = base
        self.layers = layers
        # transformers 5.x renames past_key_values to cache (the old name warns): use what it takes
        params = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        use_cache: bool = False,
        memory_overlay: dict | None = None,
    ):
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # left padding: positions count only real tokens (as the native model)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        call = _Call(memory_overlay)
        token = _CALL.set(call)
        try:
            out = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=bool(use_cache or cache is not None),
                **{self._cache_kw: cache},
            )
        finally:
            _CALL.reset(token)
        indices = tuple(call.indices[i] for i in self.layers if i in call.indices)
        if cache is None and use_cache:  # the model made one (updated in place when passed)
            cache = out.get("cache", None) or out.get("past_key_values", None)
        return out.last_hidden_state, cache, indices


class RetrofittedLM(nn.Module):
    """A retrofitted Hugging Face model behind the native `MemoryLMForCausalLM` interface that serving
    and updates use: `forward(ids, attention_mask=, cache=, use_cache=, logits_to_keep=, labels=,
    memory_overlay=)` returning logits and `memory_indices`, `model(...)` -> (hidden, cache, indices),
    `lm_head`, `memory_modules()`, `value_tables()`, and `config.memory_layers` / `config.memory_size`
    (set on the wrapped model's config, which `DynamicCache(config=...)` also reads).

    The base weights are the wrapped model's own tensors: nothing is copied."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        mems = memory_modules(hf_model)
        if not mems:
            raise ValueError(f"{type(hf_model).__name__} has no retrofitted memory")
        sizes = {m.num_slots for m in mems.values()}
        if len(sizes) != 1:
            raise ValueError(f"memory layers of different sizes {sorted(sizes)} are not supported")
        self.hf = hf_model
        self.config = hf_model.config
        self.config.memory_layers = sorted(mems)
        self.config.memory_size = sizes.pop()
        self.model = _Body(hf_model.base_model, list(self.config.memory_layers))
        head = hf_model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(hf_model).__name__} has no output embeddings (LM head)")
        self.lm_head = head

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def memory_modules(self) -> dict[int, ProductKeyMemory]:
        return {i: m for i, m in sorted(memory_modules(self.hf).items())}

    def value_tables(self) -> dict[int, torch.Tensor]:
        """{layer_idx: (N, d) value table}: the only tensors a sparse update may change."""
        return {i: m.values.weight for i, m in self.memory_modules().items()}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        memory_overlay: dict | None = None,
        past_key_values=None,
        **kwargs,
    ):
        from .modeling import lm_forward

        return lm_forward(
            self.model,
            self.lm_head,
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            memory_overlay=memory_overlay,
        )


def is_retrofitted(model_dir: str | Path) -> bool:
    return (Path(model_dir) / RETROFIT_FILE).exists()


def load_memory_model(model_dir: str | Path, **kw) -> nn.Module:
    """The model of a model directory with the native interface: a `memfit pretrain` model as it is,
    a `memfit retrofit` directory wrapped in `RetrofittedLM`. What serving and updates load."""
    if is_retrofitted(model_dir):
        return RetrofittedLM(load_retrofitted(model_dir, **kw))
    import memlm  # noqa: F401  (registers the memory-layer model with the Auto classes)

    return AutoModelForCausalLM.from_pretrained(str(model_dir), **kw)


def max_logit_change(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> float:
    """The largest absolute difference between the logits of `a` and `b` on `ids` (B, T)."""
    with torch.no_grad():
        return float((a(ids).logits.float() - b(ids).logits.float()).abs().max())


def warmup(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    max_len: int = 128,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the retrofitted memories on `texts` (language-model loss) with the base frozen.

    Only the memory modules' parameters get gradients (query, sub-keys, values, gate); every other
    weight stays bit-identical. Returns the loss of each step; `progress(step, loss)` is called after
    each one."""
    memories = list(memory_modules(model).values())
    if not memories:
        raise ValueError("the model has no retrofitted memory to warm up")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no warm-up text")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    params = [p for m in memories for p in m.parameters()]
    trainable = {id(p) for p in params}
    was_training = model.training
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses: list[float] = []
    model.train()
    try:
        for step in range(steps):
            pick = torch.randint(len(texts), (min(batch_size, len(texts)),), generator=gen).tolist()
            enc = tokenizer(
                [texts[i] for i in pick],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_len,
            )
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, losses[-1])
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    return losses
