"""MEMFIT_DEVICE: where serving (the engine) and updates (the pipeline) put the model.

`cpu`, `cuda` (the current CUDA device), `cuda:N`, or `auto` (the default: CUDA when torch sees a GPU,
else the CPU). A CUDA device that is asked for and absent is a clear error at start-up
(`DeviceUnavailable`), never a silent fall back to the CPU. torch is imported only when a device is
resolved, so importing this module is cheap.
"""

from __future__ import annotations

import re

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"


class DeviceUnavailable(RuntimeError):
    """MEMFIT_DEVICE names a device this machine does not have (the message says what to do)."""


def resolve_device(setting: str | None) -> str:
    """The torch device string for a MEMFIT_DEVICE value ('auto' -> 'cuda' or 'cpu')."""
    value = (setting or "auto").strip().lower()
    if not re.match(DEVICE_PATTERN, value):
        raise ValueError(f"MEMFIT_DEVICE must be cpu, cuda, cuda:N or auto, got {setting!r}")
    if value == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if value == "auto":
        return "cuda" if available else "cpu"
    if not available:
        why = (
            "this torch build has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA device is visible"
        )
        raise DeviceUnavailable(
            f"MEMFIT_DEVICE={value} but {why} (torch {torch.__version__}): install a CUDA build of torch "
            "(make install TORCH_INDEX=... / docker build --build-arg VARIANT=cuda), check the driver and "
            "CUDA_VISIBLE_DEVICES, or set MEMFIT_DEVICE=cpu (or auto)"
        )
    if ":" in value:
        index, count = int(value.split(":", 1)[1]), torch.cuda.device_count()
        if index >= count:
            raise DeviceUnavailable(
                f"MEMFIT_DEVICE={value} but only {count} CUDA device(s) are visible (cuda:0 to cuda:{count - 1})"
            )
    return value
