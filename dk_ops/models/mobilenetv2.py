"""MobileNetV2 (Sandler et al., CVPR 2018) with a choice of operator on its depthwise layers."""
from typing import List, Optional

import torch.nn as nn
from torch import Tensor

from ._layers import make_conv, zero_offset_generators
from ._registry import register_model


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round channels to a multiple of ``divisor`` without going below 90% of ``v`` (MobileNet rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_bn_act(in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (op-dependent) -> project (1x1), with a residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, op: str, **layer_kwargs) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1))
        layers += [
            make_conv(op, hidden, hidden, stride=stride, groups=hidden, **layer_kwargs),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2; ``op`` selects the depthwise operator (conv, dcn, condconv, dk_global, dk, dk_dcn).

    ``stem_stride`` (2 as in the paper) can be set to 1 for small inputs such as 64x64.
    ``zero_init_last=True`` zeroes the scale of the last BatchNorm of every residual block, so
    each block starts as the identity (Goyal et al., 2017; timm's ``zero_init_last``). Off by
    default, as in torchvision: trained from scratch on ``digits-ms`` at width 0.5 it left the
    initial plateau sooner in two 8-epoch runs but stayed at chance for 33 of 41 epochs in the
    benchmark's 10-minute run (docs/experiments.md).
    """

    # expansion t, channels c, repeats n, first stride s
    SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]

    def __init__(
        self,
        op: str = "conv",
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_chans: int = 3,
        stem_stride: int = 2,
        dropout: float = 0.2,
        zero_init_last: bool = False,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        in_ch = make_divisible(32 * width_mult)
        self.num_features = make_divisible(1280 * max(1.0, width_mult))
        layers: List[nn.Module] = [conv_bn_act(in_chans, in_ch, 3, stem_stride)]
        for t, c, n, s in self.SETTINGS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t, op, **layer_kwargs))
                in_ch = out_ch
        layers.append(conv_bn_act(in_ch, self.num_features, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.out_features == num_classes:
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, InvertedResidual) and m.use_residual:
                    nn.init.zeros_(m.conv[-1].weight)
        zero_offset_generators(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.forward_features(x)).flatten(1))


# erf_lab.train's size curriculum by default (large objects first): trained from scratch on
# digits-ms without it, this net stayed at chance loss for 6-33 epochs.
@register_model(train_hints={"size_curriculum": True})
def mobilenet_v2(op: str = "conv", num_classes: int = 1000, **kwargs) -> MobileNetV2:
    """MobileNetV2 (``width_mult``, ``stem_stride``, ``in_chans``, ``dropout``, ``zero_init_last``;
    input size free)."""
    return MobileNetV2(op=op, num_classes=num_classes, **kwargs)
