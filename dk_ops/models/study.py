"""A small study network for fast CPU experiments on 64x64 images."""
from typing import List, Sequence

import torch.nn as nn
from torch import Tensor

from ._layers import make_conv, zero_offset_generators
from ._registry import register_model


class StudyBlock(nn.Module):
    """1x1 expand -> depthwise 3x3 (op-dependent) -> 1x1 project, residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, op: str, **layer_kwargs) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            make_conv(op, hidden, hidden, stride=stride, groups=hidden, **layer_kwargs),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class StudyNet(nn.Module):
    """Stem conv, then stages of :class:`StudyBlock` (first block of each stage strides by 2), GAP, linear.

    Defaults: widths (16, 32, 64), one extra block per stage, expansion 2, a stride-2 stem;
    about 36k parameters (conv). At 64x64 the last map is 4x4 (effective stride 16) and the
    theoretical receptive field of a last-stage unit is 87 px, wider than the image.
    ``stem_stride=1`` keeps the first map at full resolution (4x the cost).

    The op replaces the depthwise 3x3 of the stages from ``op_from_stage`` on (default 1:
    every stage but the first, highest-resolution one, as DCNv2 places deformable layers in
    ResNet's conv3-conv5 only); earlier stages use ``nn.Conv2d``. Half of a DK layer's cost is
    its offset generator (a dense 3x3 conv over its input channels); in the first stage it
    would make the DK variants about 3x the cost of the conv net instead of about 2x.
    ``op_from_stage=0`` puts the op everywhere.
    """

    def __init__(
        self,
        op: str = "conv",
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        depth: int = 2,
        expand: int = 2,
        stem_width: int = 16,
        stem_stride: int = 2,
        op_from_stage: int = 1,
        **layer_kwargs,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
        )
        blocks: List[nn.Module] = []
        in_ch = stem_width
        first_op = max(0, min(op_from_stage, len(widths) - 1))
        for i, w in enumerate(widths):
            stage_op, stage_kwargs = (op, layer_kwargs) if i >= first_op else ("conv", {})
            for j in range(depth):
                blocks.append(StudyBlock(in_ch, w, 2 if j == 0 else 1, expand, stage_op, **stage_kwargs))
                in_ch = w
        self.blocks = nn.Sequential(*blocks)
        self.num_features = in_ch
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        zero_offset_generators(self)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


# erf_lab.train's progressive resizing by default (small images early in the run): fully
# convolutional with global pooling, so any input size works; more epochs fit in a budget.
@register_model(train_hints={"progressive_resize": True})
def study_net(op: str = "conv", num_classes: int = 10, **kwargs) -> StudyNet:
    """The small study net (``widths``, ``depth``, ``expand``, ``in_chans``, ``stem_stride``,
    ``op_from_stage``)."""
    return StudyNet(op=op, num_classes=num_classes, **kwargs)
