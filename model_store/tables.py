"""Row algebra on value tables: net rows of a sequence of deltas, base tables from safetensors."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from memlm.background import model_base_id, weight_files
from memlm.delta import SlotDelta

Rows = dict[int, tuple[torch.Tensor, torch.Tensor]]  # {layer: (indices (t,) sorted unique, rows (t, d))}

_VALUE_KEY = re.compile(r"\.(\d+)\.(?:.*\.)?values\.weight$")


def find_value_keys(keys: list[str], memory_layers: list[int] | None = None) -> dict[int, str]:
    """Map transformer layer index -> state-dict key of that memory layer's value table."""
    found: dict[int, str] = {}
    for k in sorted(keys):
        m = _VALUE_KEY.search(k)
        if m:
            layer = int(m.group(1))
            if layer in found:
                raise ValueError(f"two value tables for layer {layer}: {found[layer]} and {k}")
            found[layer] = k
    if memory_layers is not None and sorted(found) != sorted(memory_layers):
        raise ValueError(
            f"config.memory_layers = {memory_layers} but value tables found for layers {sorted(found)}"
        )
    if not found:
        raise ValueError(
            "no memory value table (a key ending in '.<layer>....values.weight') in the checkpoint"
        )
    return found


def has_weights(model_dir: str | Path) -> bool:
    """Whether `model_dir` holds a safetensors checkpoint (one file or an index of shards)."""
    d = Path(model_dir)
    return (d / "model.safetensors").exists() or (d / "model.safetensors.index.json").exists()


def weights_id(model_dir: str | Path) -> str:
    """The base id of every store: memlm.background.model_base_id (sha256 over the weight files)."""
    return model_base_id(model_dir)


def weight_keys(model_dir: str | Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for f in weight_files(model_dir):
        with safe_open(str(f), framework="pt") as fh:
            keys += list(fh.keys())
    return keys


def load_value_tables(model_file: str | Path, value_keys: dict[int, str]) -> dict[int, torch.Tensor]:
    """The value tables from a weights file, or from a model directory (one file or shards)."""
    from safetensors import safe_open

    path = Path(model_file)
    files = weight_files(path) if path.is_dir() else [path]
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            have = set(f.keys())
            for layer, key in value_keys.items():
                if key in have:
                    out[int(layer)] = f.get_tensor(key)
    missing = [key for layer, key in value_keys.items() if int(layer) not in out]
    if missing:
        raise KeyError(f"value tables {missing} not in {path}")
    return out


def net_rows(seq: list[tuple[int, torch.Tensor, torch.Tensor]]) -> Rows:
    """Rows left after writing each (layer, indices, rows) of `seq` in order: the last write wins."""
    by_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer, idx, rows in seq:
        by_layer.setdefault(layer, []).append((idx, rows))
    out: Rows = {}
    for layer, parts in by_layer.items():
        if len(parts) == 1:
            out[layer] = (parts[0][0].to(torch.int64), parts[0][1])
            continue
        idx = torch.cat([p[0].to(torch.int64) for p in parts])  # (sum t,)
        rows = torch.cat([p[1] for p in parts])  # (sum t, d)
        uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
        pos = torch.arange(idx.numel(), dtype=torch.int64)
        last = torch.full((uniq.numel(),), -1, dtype=torch.int64).scatter_reduce_(0, inv, pos, reduce="amax")
        out[layer] = (uniq, rows[last])
    return out


def path_rows(down: list[SlotDelta], up: list[SlotDelta]) -> Rows:
    """Rows that move tables from the end of `down` (a chain, oldest first, to revert) to the end of
    `up` (a chain, oldest first, to apply) via their common ancestor."""
    seq: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for d in reversed(down):
        seq += [(layer, ld.indices, ld.old_rows) for layer, ld in d.layers.items()]
    for d in up:
        seq += [(layer, ld.indices, ld.new_rows) for layer, ld in d.layers.items()]
    return net_rows(seq)


def apply_rows(tables: dict[int, torch.Tensor], rows: Rows) -> int:
    n = 0
    with torch.no_grad():
        for layer, (idx, r) in rows.items():
            t = tables[layer]
            t.index_copy_(0, idx.to(t.device), r.to(t.device, t.dtype))
            n += idx.numel()
    return n


def rows_nbytes(rows: Rows) -> int:
    return sum(i.numel() * i.element_size() + r.numel() * r.element_size() for i, r in rows.values())
