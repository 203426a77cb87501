"""The memory-format rule shared by the ERF engine and training."""
import torch
import torch.nn as nn


def channels_last_pays(model: nn.Module, device: torch.device) -> bool:
    """Whether running ``model`` channels-last is the faster choice by default: on CPU, for
    models with 2-D convolutions (oneDNN's convolutions and their backward are faster in
    that layout) and no parameter or buffer of more than 4 dimensions (CondConv's expert
    banks, which ``Module.to(memory_format=...)`` cannot convert)."""
    return (device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())
            and all(t.dim() <= 4 for t in list(model.parameters()) + list(model.buffers())))
