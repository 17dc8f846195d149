"""`memlm.load(model_dir, device)`: the one way a model directory becomes a model and its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def load(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """The model and tokenizer of a model directory (a `memfit pretrain` model, or a `memfit retrofit`
    one wrapped in `RetrofittedLM` so that it has the native interface), on `device`, in eval mode,
    with every parameter frozen.

    Frozen is what serving and the sparse updater want (the updater trains a copy of the selected rows,
    never the table); a dense trainer unfreezes the parameters it trains (memfit.bench.baselines)."""
    from .retrofit import load_memory_model
    from .tokenizer import load_tokenizer

    model = load_memory_model(model_dir).to(device)
    model.eval()
    model.requires_grad_(False)
    return model, load_tokenizer(model_dir)
