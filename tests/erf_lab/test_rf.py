"""Theoretical receptive fields: hand-computed values for textbook nets (stride/dilation chains, residual
blocks, concatenation, pooling), the DK/DCN rules, and the gradient support of positive linear nets."""
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dk_ops.modules import CondConv2d, DeformConv2d, DeformKernel2d, DeformKernelConv2d, GlobalDeformKernel2d
from erf_lab import theoretical_rf
from erf_lab.errors import ErfLabError
from erf_lab.rf import trace_rf


def row(df, layer):
    return df.set_index("layer").loc[layer]


def test_stride_dilation_chain_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # r 3, j 1, c0 0
        nn.Conv2d(4, 4, 3, stride=2, padding=1),  # r 5, j 2, c0 0
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),  # r 5 + 2*2*2 = 13, j 2, c0 0
        nn.MaxPool2d(2),  # r 13 + 1*2 = 15, j 4, c0 0 + 0.5*2 = 1
        nn.Conv2d(4, 4, 3),  # valid: r 15 + 2*4 = 23, j 4, c0 1 + 1*4 = 5
    )
    df = theoretical_rf(net, (3, 32, 32))
    expect = {"0": (3, 1, 0), "1": (5, 2, 0), "2": (13, 2, 0), "3": (15, 4, 1), "4": (23, 4, 5)}
    for name, (r, j, c0) in expect.items():
        got = row(df, name)
        assert (got.rf_y, got.rf_x, got.stride_y, got.center0_y) == (r, r, j, c0), name
    assert row(df, "4").pad_y == (23 - 1) / 2 - 5  # the field of unit 0 starts 6 px before pixel 0
    assert row(df, "4")["shape"] == (4, 6, 6) and not row(df, "4")["global"]


class Residual(nn.Module):
    def __init__(self, misaligned: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 2 if misaligned else 3, stride=2, padding=0 if misaligned else 1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.shortcut = nn.Conv2d(4, 4, 1, stride=2)

    def forward(self, x):
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


def test_residual_block_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Residual())
    df = theoretical_rf(net, (3, 16, 16))
    # stem r 3; main: conv1 (k3 s2) r 5 j 2, conv2 r 5 + 2*2 = 9; shortcut r 3; union 9
    assert (row(df, "1.conv1").rf_y, row(df, "1.conv2").rf_y, row(df, "1.shortcut").rf_y) == (5, 9, 3)
    out = row(df, "1")
    assert (out.rf_y, out.stride_y, out.center0_y, out.aligned) == (9, 2, 0, True)


def test_misaligned_merge_is_reported():
    df = theoretical_rf(Residual(misaligned=True), (4, 16, 16))
    out = row(df, "(output)")
    assert not out.aligned and "misaligned" in out.notes
    # main: k2 s2 -> r 2, c0 0.5; conv2 -> r 6, c0 0.5 -> [-2, 3]; shortcut r 1 at 0 -> union [-2, 3]
    assert out.rf_y == 6 and out.center0_y == 0.5


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 5, padding=2)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        z = F.max_pool2d(F.conv2d(y, torch.ones(2, 4, 3, 3), padding=1), 2)
        return self.gap(self.pool(z))


def test_concat_functional_ops_and_adaptive_pooling_by_hand():
    g = trace_rf(Concat(), (3, 16, 16))
    # cat: r 5; F.conv2d k3: 7; F.max_pool2d 2: 8, j 2, c0 0.5; adaptive 8 -> 4 = k2 s2: 8 + 2 = 10, j 4, c0 1.5
    pool = g.of("pool")
    assert (pool.y.size, pool.y.jump, pool.y.center0, pool.global_) == (10, 4, 1.5, False)
    assert g.of("gap").global_ and not g.of("gap").local()


def test_dk_keeps_the_field_dcn_widens_or_unbounds_it():
    def rf_of(layer):
        return trace_rf(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer), (3, 24, 24)).of(None)

    dk = rf_of(DeformKernel2d(4, 4, 3, padding=1, scope_size=5))
    assert (dk.y.size, dk.x.size, dk.global_, dk.local()) == (5, 5, False, True)  # k, not the scope, counts
    assert rf_of(DeformConv2d(4, 4, 3, padding=1)).unbounded
    assert rf_of(DeformKernelConv2d(4, 4, 3, padding=1)).unbounded
    clipped = rf_of(DeformConv2d(4, 4, 3, padding=1, offset_clip=1.5))
    assert clipped.y.size == 5 + 2 * 2 and not clipped.unbounded  # ceil(1.5) px each side
    for routed in (GlobalDeformKernel2d(4, 4, 3, padding=1), CondConv2d(4, 4, 3, padding=1)):
        r = rf_of(routed)
        assert r.y.size == 5 and r.global_ and not r.local()


def test_resnet50_dw_last_stage_matches_resnet50():
    from dk_ops import models

    df = theoretical_rf(models.create("resnet50_dw"), (3, 224, 224))
    last = row(df, "layer4")
    assert (last.rf_y, last.stride_y, last["shape"]) == (427, 32, (2048, 7, 7))
    # docs/design.md: the centre cell (3, 3) of the 7x7 map is centred at pixel 96, not 111.5
    assert last.center0_y + 3 * last.stride_y == 96


def test_field_equals_gradient_support_of_positive_linear_nets():
    """Independent oracle: with positive weights and no nonlinearity nothing cancels, so the input
    pixels with nonzero gradient span exactly the theoretical field when its cone holds no padding
    (and lie inside it always)."""
    size, exact = 128, 0
    for seed in range(10):
        rng = random.Random(seed)
        layers = []
        for _ in range(rng.randint(2, 5)):
            k, s, d = rng.choice([1, 2, 3, 5]), rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
            pad = rng.randint(0, d * (k - 1) // 2 + 1)
            layers.append(nn.Conv2d(1, 1, k, stride=s, dilation=d, padding=pad, bias=False))
            if rng.random() < 0.3:
                layers.append(nn.AvgPool2d(2))
        net = nn.Sequential(*layers).double()
        for p in net.parameters():
            p.data.uniform_(0.5, 1.5)
        rf = trace_rf(net, (1, size, size)).of(None)
        x = torch.rand(1, 1, size, size, dtype=torch.float64, requires_grad=True)
        y = net(x)
        i, j = y.shape[2] // 2, y.shape[3] // 2
        (g,) = torch.autograd.grad(y[0, 0, i, j], x)
        ys, xs = np.nonzero(g[0, 0].numpy())
        y0, x0, y1, x1 = rf.box((i, j))
        assert y0 <= ys.min() and ys.max() <= y1 and x0 <= xs.min() and xs.max() <= x1, seed
        if min(y0, x0) >= 0 and max(y1, x1) < size:
            assert (ys.min(), ys.max(), xs.min(), xs.max()) == (y0, y1, x0, x1), seed
            exact += 1
    assert exact >= 6


@pytest.mark.parametrize("norm, is_global", [
    (lambda: nn.GroupNorm(2, 4), True),
    (lambda: nn.InstanceNorm2d(4, affine=True), True),
    (lambda: nn.BatchNorm2d(4, track_running_stats=False), True),
    (lambda: nn.LayerNorm([4, 32, 32]), True),
    (lambda: nn.BatchNorm2d(4), False),  # running statistics in eval mode: pointwise
    (lambda: nn.InstanceNorm2d(4, track_running_stats=True), False),
])
def test_statistics_normalisations_are_global_exactly_when_the_gradient_says_so(norm, is_global):
    """Oracle: the support of the centre unit's input gradient. A norm that takes statistics over
    positions spreads it over the whole image; a pointwise one keeps it inside the 3x3 field."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm(), nn.Conv2d(4, 4, 1)).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    rf = trace_rf(net, (1, 32, 32)).of(None)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(net(x)[0, 0, 16, 16], x)
    outside = g[0, 0].clone()
    outside[15:18, 15:18] = 0
    assert bool(outside.abs().max() > 0) == is_global
    assert rf.global_ == is_global


def test_untraceable_model_gives_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return x

    with pytest.raises(ErfLabError, match="cannot trace Branchy"):
        theoretical_rf(Branchy(), (3, 16, 16))
