"""The frozen part of a forward under a values-only update, computed once per batch.

A sparse update changes only memory value rows: every block below the first memory layer, that block's
attention and the memory's query, slot indices and weights are functions of frozen weights. They are
computed once per distinct batch (MemoryLMModel.frozen_prefix) and every later forward of the batch
runs only the value read and the blocks above it (MemoryLMModel.from_prefix); the result equals the
full forward's (tests/memlm/test_updater.py).
"""

from __future__ import annotations

import torch

Batch = dict[str, torch.Tensor]
Overlay = dict[int, tuple[torch.Tensor, torch.Tensor]]


class FrozenPrefixes:
    """What a values-only update cannot change, computed once per distinct batch: the blocks below the
    first memory layer, that block's attention, and the memory's slot indices and weights
    (MemoryLMModel.frozen_prefix). Every later forward of the same batch runs only the memory read and
    the blocks above it. Bodies without frozen_prefix (retrofitted models) run the full forward."""

    def __init__(self, model, max_batches: int = 64) -> None:
        self.body = model.model if hasattr(model.model, "frozen_prefix") else None
        self.max_batches = max_batches
        self.cache: dict[tuple, dict] = {}

    def hidden(self, model, batch: Batch, overlay: Overlay | None) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.body is None:
            return hidden_states(model, batch, overlay)
        key = (tuple(ids.shape), ids.cpu().numpy().tobytes(), mask.cpu().numpy().tobytes())
        prefix = self.cache.get(key)
        if prefix is None:
            if len(self.cache) >= self.max_batches:
                self.cache.clear()
            prefix = self.cache[key] = self.body.frozen_prefix(ids, mask)
        return self.body.from_prefix(prefix, overlay)


def hidden_states(model, batch: Batch, overlay: Overlay | None, prefixes: FrozenPrefixes | None = None):
    """The final hidden states (B, T, d) of `batch` with the value rows of `overlay`: from the cached
    frozen prefix where `prefixes` is given, else the full forward."""
    if prefixes is not None:
        return prefixes.hidden(model, batch, overlay)
    return model.model(batch["input_ids"], attention_mask=batch["attention_mask"], memory_overlay=overlay)[0]


def to_device(batch: Batch, device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}
