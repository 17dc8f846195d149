"""Fixtures for the store tests: a fake base model dir (2 memory layers x 64 slots x 8 dims)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from memlm.delta import LayerDelta, SlotDelta
from model_store import Store

LAYERS = (1, 3)
N, D = 64, 8


def write_fake_model(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {"model.embed_tokens.weight": torch.randn(10, D, generator=g)}
    for layer in LAYERS:
        tensors[f"model.layers.{layer}.mlp.memory.values.weight"] = torch.randn(N, D, generator=g)
        tensors[f"model.layers.{layer}.mlp.memory.keys"] = torch.randn(2, 8, 4, generator=g)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(
        json.dumps({"model_type": "memfit-memory-lm", "memory_layers": list(LAYERS)})
    )
    save_file({"layer1.df": torch.zeros(N, dtype=torch.int64)}, str(path / "background.safetensors"))
    return path


def make_delta(tables: dict[int, torch.Tensor], slots: dict[int, list[int]], seed: int = 0) -> SlotDelta:
    """A delta writing random rows at `slots` on top of `tables` (old rows taken from them)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for layer, s in slots.items():
        idx = torch.tensor(sorted(set(s)), dtype=torch.int64)
        layers[layer] = LayerDelta(idx, torch.randn(idx.numel(), D, generator=g), tables[layer][idx].clone())
    return SlotDelta(layers=layers)


def random_slots(seed: int, t: int = 5) -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randperm(N, generator=g)[:t].tolist() for layer in LAYERS}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_fake_model(tmp_path / "model")


@pytest.fixture
def store(tmp_path: Path, model_dir: Path) -> Store:
    return Store.init(tmp_path / "store", model_dir, snapshot_every=4)


def publish_update(store: Store, slots: dict[int, list[int]], seed: int, docs=None, **kw) -> int:
    parent = store.active()
    delta = make_delta(store.materialize(parent), slots, seed)
    return store.publish(delta, parent, documents=docs or [], **kw)


def tables_equal(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def h():
    """The helpers above (test modules cannot import conftest under pytest's import mode)."""
    import types

    return types.SimpleNamespace(
        LAYERS=LAYERS,
        N=N,
        D=D,
        write_fake_model=write_fake_model,
        make_delta=make_delta,
        random_slots=random_slots,
        publish_update=publish_update,
        tables_equal=tables_equal,
    )
