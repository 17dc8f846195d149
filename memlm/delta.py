"""SlotDelta: the unit of change of a sparse memory update.

One delta holds, for every memory layer it touched, the slot indices (sorted, unique), the rows after
the update and the rows before it. Applying writes the new rows; reverting writes the old rows back;
both are exact copies (no arithmetic), so apply -> revert is bit-identical.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass
class LayerDelta:
    indices: torch.Tensor  # (t,) int64, sorted, unique
    new_rows: torch.Tensor  # (t, d)
    old_rows: torch.Tensor  # (t, d)

    def __post_init__(self) -> None:
        if self.indices.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(self.indices.shape)}")
        t = self.indices.numel()
        if self.new_rows.shape[0] != t or self.old_rows.shape[0] != t:
            raise ValueError(
                f"{t} indices but {self.new_rows.shape[0]} new rows and {self.old_rows.shape[0]} old rows"
            )
        if self.new_rows.shape != self.old_rows.shape:
            raise ValueError(
                f"new rows {tuple(self.new_rows.shape)} != old rows {tuple(self.old_rows.shape)}"
            )


@dataclass
class SlotDelta:
    layers: dict[int, LayerDelta]  # keyed by transformer layer index
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return sum(ld.indices.numel() for ld in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(
            ld.indices.numel() * ld.indices.element_size()
            + ld.new_rows.numel() * ld.new_rows.element_size()
            + ld.old_rows.numel() * ld.old_rows.element_size()
            for ld in self.layers.values()
        )

    def slot_sets(self) -> dict[int, set[int]]:
        return {layer: set(ld.indices.tolist()) for layer, ld in self.layers.items()}

    @torch.no_grad()
    def apply(self, value_tables: dict[int, torch.Tensor]) -> None:
        """Write the new rows into `value_tables` ({layer: (N, d) tensor}) in place."""
        for layer, ld in self.layers.items():
            table = value_tables[layer]
            table.index_copy_(0, ld.indices.to(table.device), ld.new_rows.to(table.device, table.dtype))

    @torch.no_grad()
    def revert(self, value_tables: dict[int, torch.Tensor]) -> None:
        """Write the previous rows back into `value_tables` in place."""
        for layer, ld in self.layers.items():
            table = value_tables[layer]
            table.index_copy_(0, ld.indices.to(table.device), ld.old_rows.to(table.device, table.dtype))

    def inverse(self) -> SlotDelta:
        """A delta that undoes this one (new and old rows swapped)."""
        return SlotDelta(
            layers={
                layer: LayerDelta(ld.indices.clone(), ld.old_rows.clone(), ld.new_rows.clone())
                for layer, ld in self.layers.items()
            },
            report={"inverse_of": self.report.get("version"), **{"kind": "revert"}},
        )

    # -- serialisation (safetensors + JSON metadata; never pickle) --------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for layer, ld in self.layers.items():
            out[f"layer{layer}.indices"] = ld.indices.detach().to("cpu", torch.int64).contiguous()
            out[f"layer{layer}.new"] = ld.new_rows.detach().cpu().contiguous()
            out[f"layer{layer}.old"] = ld.old_rows.detach().cpu().contiguous()
        return out

    def save(self, path: str | Path) -> None:
        save_file(self.to_tensors(), str(path), metadata={"report": json.dumps(self.report, default=str)})

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], report: dict[str, Any] | None = None
    ) -> SlotDelta:
        layers: dict[int, LayerDelta] = {}
        names = {k.split(".")[0] for k in tensors}
        for name in sorted(names):
            if not name.startswith("layer"):
                raise ValueError(f"unexpected tensor group {name!r} in delta")
            layer = int(name[len("layer") :])
            layers[layer] = LayerDelta(
                tensors[f"{name}.indices"].to(torch.int64), tensors[f"{name}.new"], tensors[f"{name}.old"]
            )
        return cls(layers=layers, report=report or {})

    @classmethod
    def load(cls, path: str | Path) -> SlotDelta:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        report = json.loads(meta.get("report", "{}"))
        return cls.from_tensors(load_file(str(path)), report)


def compose(first: SlotDelta, second: SlotDelta) -> SlotDelta:
    """One delta equal to applying `first` then `second` (taken from the state `first` left): per layer,
    the union of their slots; the old rows of `first` where it wrote (else `second`'s), the new rows of
    `second` where it wrote (else `first`'s). Its report is `first`'s."""
    layers: dict[int, LayerDelta] = {}
    for layer in sorted(set(first.layers) | set(second.layers)):
        a, b = first.layers.get(layer), second.layers.get(layer)
        if a is None or b is None:
            only = a if a is not None else b
            layers[layer] = LayerDelta(only.indices.clone(), only.new_rows.clone(), only.old_rows.clone())
            continue
        idx = torch.unique(torch.cat([a.indices.cpu(), b.indices.cpu()]))  # sorted
        new = torch.empty((idx.numel(), a.new_rows.shape[1]), dtype=a.new_rows.dtype)
        old = torch.empty_like(new)
        pos_a = torch.searchsorted(idx, a.indices.cpu())
        pos_b = torch.searchsorted(idx, b.indices.cpu())
        # old: second's first, then first's over it (first's old rows are the state before both)
        old[pos_b] = b.old_rows.cpu().to(old.dtype)
        old[pos_a] = a.old_rows.cpu().to(old.dtype)
        # new: first's, then second's over it (second wrote last)
        new[pos_a] = a.new_rows.cpu().to(new.dtype)
        new[pos_b] = b.new_rows.cpu().to(new.dtype)
        layers[layer] = LayerDelta(idx, new, old)
    return SlotDelta(layers=layers, report=dict(first.report))
