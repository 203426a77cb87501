"""The memory-format rule shared by the ERF engine and training."""
from typing import Union

import torch
import torch.nn as nn

from .errors import ErfLabError


def _has_high_rank_tensors(model: nn.Module) -> bool:
    return any(t.dim() > 4 for t in list(model.parameters()) + list(model.buffers()))


def channels_last_pays(model: nn.Module, device: torch.device) -> bool:
    """Whether running ``model`` channels-last is the faster choice by default: on CPU, for
    models with 2-D convolutions (oneDNN's convolutions and their backward are faster in
    that layout) and no parameter or buffer of more than 4 dimensions (CondConv's expert
    banks, which ``Module.to(memory_format=...)`` cannot convert)."""
    return (device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
            and not _has_high_rank_tensors(model))


def resolve_channels_last(setting: Union[bool, str], model: nn.Module, device: torch.device) -> bool:
    """``"auto"`` -> :func:`channels_last_pays`; ``True``/``False`` as given, with one clear
    error for a model that cannot be converted."""
    if setting == "auto":
        return channels_last_pays(model, device)
    if not isinstance(setting, bool):
        raise ErfLabError(f"channels_last must be True, False or 'auto', got {setting!r}")
    if setting and _has_high_rank_tensors(model):
        raise ErfLabError("channels_last=True: the model has parameters or buffers of more than 4 dimensions "
                          "(e.g. CondConv's expert bank), which cannot be channels-last; use 'auto' or False")
    return setting
