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


class RetrofitMemoryMLP(nn.Module):
    """Wraps a block's MLP: out = mlp(h) + memory(h) (parallel) or memory(h) (replace)."""

    def __init__(self, mlp: nn.Module | None, memory: ProductKeyMemory):
        super().__init__()
        self.mlp = mlp
        self.memory = memory

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.memory(hidden_states).out
        if self.mlp is not None:
            out = out + self.mlp(hidden_states, *args, **kwargs)
        return out


def _blocks(model: nn.Module) -> nn.ModuleList:
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
    blocks = _blocks(model)
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
    block.mlp = RetrofitMemoryMLP(block.mlp if spec.mode == "parallel" else None, memory)
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
    return {i: b.mlp.memory for i, b in enumerate(_blocks(model)) if isinstance(b.mlp, RetrofitMemoryMLP)}


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


def save_retrofitted(model: nn.Module, out_dir: str | Path) -> None:
    out = Path(out_dir)
    model.save_pretrained(out)
    (out / RETROFIT_FILE).write_text(json.dumps(retrofit_specs(model.config), indent=2))


def load_retrofitted(model_dir: str | Path, **kw) -> nn.Module:
    """Load a directory written by `save_retrofitted` (base architecture + memory weights)."""
    path = Path(model_dir)
    raw = json.loads((path / RETROFIT_FILE).read_text())
    specs = [RetrofitSpec(**x) for x in (raw if isinstance(raw, list) else [raw])]
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    model.config.memfit_retrofit = None  # config.json carries the specs too: apply them once
    for spec in specs:
        retrofit(model, spec)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    memory_missing = [k for k in missing if ".memory." in k]
    if memory_missing:
        raise ValueError(f"{path}: memory weights missing from the checkpoint: {memory_missing[:4]}")
    return model


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
