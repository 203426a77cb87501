"""Parameter and multiply-add counts of a model, per operator type."""
from typing import Dict, Sequence

import torch
import torch.nn as nn

from ..modules import CondConv2d, DeformConv2d, DeformKernelConv2d, GlobalDeformKernel2d, DeformKernelBase


def _conv_macs(out: torch.Tensor, in_per_group: int, kh: int, kw: int) -> int:
    return out[0].numel() * in_per_group * kh * kw


@torch.no_grad()
def complexity(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> Dict[str, int]:
    """Count parameters and multiply-adds for one input of ``input_size`` (C, H, W).

    Returns ``params``, ``macs`` (convolution and linear multiply-adds, counting
    the offset generators and the routing layers as the layers they are, and the
    deformable layers as the rigid convolution they replace) and
    ``sampling_macs`` (extra multiply-adds of bilinear sampling: 4 per sampled
    kernel weight for DK, 4 per sampled input value for DCN, and the expert
    mixing of CondConv).
    """
    counts = {"macs": 0, "sampling_macs": 0}
    hooks = []

    def hook(module: nn.Module, inputs, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(module, nn.Conv2d):
            counts["macs"] += _conv_macs(out, module.in_channels // module.groups, *module.kernel_size)
        elif isinstance(module, nn.Linear):
            counts["macs"] += out[0].numel() * module.in_features
        elif isinstance(module, (DeformKernelBase, DeformConv2d, CondConv2d)):
            cg = module.in_channels // module.groups
            kh, kw = module.kernel_size
            counts["macs"] += _conv_macs(out, cg, kh, kw)
            positions = out.shape[-2] * out.shape[-1]
            taps = kh * kw
            if isinstance(module, GlobalDeformKernel2d):
                counts["sampling_macs"] += 4 * module.out_channels * cg * taps
            elif isinstance(module, DeformKernelBase):
                counts["sampling_macs"] += 4 * module.out_channels * cg * taps * positions
            if isinstance(module, (DeformConv2d, DeformKernelConv2d)):
                counts["sampling_macs"] += 4 * module.in_channels * taps * positions
            if isinstance(module, CondConv2d):
                counts["sampling_macs"] += module.num_experts * module.weight[0].numel()

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, DeformKernelBase, DeformConv2d, CondConv2d)):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_size, device=p.device if p is not None else "cpu",
                        dtype=p.dtype if p is not None else torch.float32)
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()), **counts}
