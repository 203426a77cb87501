"""The device a command runs on: one rule for every package."""
from typing import Union

import torch

from .errors import ErfLabError

__all__ = ["resolve_device"]


def resolve_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` or ``"auto"``: CUDA when it is available, else the
    CPU. A CUDA device where CUDA is missing is a one-line :class:`ErfLabError`."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ErfLabError(f"device {device!r} is not a device (cpu, cuda, cuda:1, auto): {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ErfLabError(f"device {str(device)!r} requested but CUDA is not available here (device cpu, --device cpu)")
    return dev
