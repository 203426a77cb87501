"""ResNet-50-DW: ResNet-50 whose 3x3 convolutions are depthwise (the DK paper's second base)."""
from typing import List

import torch.nn as nn
from torch import Tensor

from ._layers import make_conv, zero_offset_generators
from ._registry import register_model


class BottleneckDW(nn.Module):
    """1x1 reduce -> depthwise 3x3 (op-dependent, carries the stride) -> 1x1 expand, plus shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, op: str, **layer_kwargs) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = make_conv(op, width, width, stride=stride, groups=width, **layer_kwargs)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetDW(nn.Module):
    """ResNet with depthwise bottlenecks; ``op`` selects the depthwise operator."""

    def __init__(
        self,
        layers: List[int],
        op: str = "conv",
        num_classes: int = 1000,
        in_chans: int = 3,
        base_width: int = 64,
        small_input: bool = False,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        if small_input:  # 3x3 stride-1 stem, no max-pool (CIFAR-style), for inputs around 32-64 px
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, base_width, 3, 1, 1, bias=False), nn.BatchNorm2d(base_width), nn.ReLU(inplace=True)
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, base_width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(base_width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        in_ch = base_width
        stages = []
        for i, n in enumerate(layers):
            width = base_width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(BottleneckDW(in_ch, width, 2 if (j == 0 and i > 0) else 1, op, **layer_kwargs))
                in_ch = width * BottleneckDW.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = in_ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        zero_offset_generators(self)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


@register_model
def resnet50_dw(op: str = "conv", num_classes: int = 1000, **kwargs) -> ResNetDW:
    """ResNet-50-DW: [3, 4, 6, 3] depthwise bottlenecks (``small_input`` for 32-64 px images)."""
    return ResNetDW([3, 4, 6, 3], op=op, num_classes=num_classes, **kwargs)
