"""Modules, conversion and the zoo."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dk_ops
from dk_ops import (
    CondConv2d,
    DeformConv2d,
    DeformKernel2d,
    DeformKernelConv2d,
    GlobalDeformKernel2d,
    convert_model,
    deform_kernel_conv2d,
    models,
    scope_from_kernel,
)
from dk_ops.reference import sample_kernel

D = torch.float64
DK_CLASSES = [GlobalDeformKernel2d, DeformKernel2d, DeformKernelConv2d]


@pytest.mark.parametrize("cls", DK_CLASSES)
@pytest.mark.parametrize("groups", [1, 4])
def test_fresh_dk_module_is_the_rigid_kernel(cls, groups):
    m = cls(4, 8, 3, stride=2, padding=1, groups=groups, scope_size=(4, 5)).double()
    x = torch.randn(2, 4, 9, 9, dtype=D)
    rigid = sample_kernel(m.weight, None, (3, 3))[0, ..., 0].reshape(8, 4 // groups, 3, 3)
    torch.testing.assert_close(m(x), F.conv2d(x, rigid, m.bias, 2, 1, 1, groups))


@pytest.mark.parametrize("modulated", [False, True])
def test_fresh_dcn_module_is_the_rigid_conv(modulated):
    m = DeformConv2d(4, 6, (3, 2), padding=(1, 0), groups=2, modulated=modulated).double()
    x = torch.randn(2, 4, 6, 7, dtype=D)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, m.bias, 1, (1, 0), 1, 2))
    _, used = m(x, return_offsets=True)
    if modulated:
        torch.testing.assert_close(used["mask"], torch.ones_like(used["mask"]))


def test_fresh_condconv_mixes_experts_at_one_half():
    m = CondConv2d(4, 4, 3, padding=1, groups=2, num_experts=3).double()
    x = torch.randn(3, 4, 5, 5, dtype=D)
    kernel = 0.5 * m.weight.sum(0)
    torch.testing.assert_close(m(x), F.conv2d(x, kernel, m.bias, 1, 1, 1, 2))


def test_condconv_routes_each_sample_independently():
    m = CondConv2d(3, 4, 3, padding=1, num_experts=2).double()
    nn.init.normal_(m.routing.weight)
    x = torch.randn(3, 3, 5, 5, dtype=D)
    y, used = m(x, return_offsets=True)
    for i in range(3):
        kernel = torch.einsum("e,eocij->ocij", used["routing"][i], m.weight)
        torch.testing.assert_close(y[i : i + 1], F.conv2d(x[i : i + 1], kernel, m.bias, padding=1))


def test_dk_modules_pass_their_offsets_to_the_op():
    m = DeformKernelConv2d(3, 3, 3, padding=1, groups=3, kernel_offset_groups=3, offset_groups=3).double()
    for gen in (m.kernel_offset_generator, m.offset_generator):
        nn.init.normal_(gen.weight, std=0.3)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    y, used = m(x, return_offsets=True)
    assert used["kernel_offset"].shape == (2, 2 * 3 * 9, 6, 6) and used["offset"].shape == (2, 2 * 3 * 9, 6, 6)
    expected = deform_kernel_conv2d(
        x, m.weight, used["kernel_offset"], used["offset"], None, m.bias, kernel_size=3, padding=1, groups=3
    )
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("cls", DK_CLASSES)
def test_every_generator_is_learnt(cls):
    """The 2020 DK+DCN never learnt its kernel offsets: every generator must receive a gradient."""
    m = cls(4, 4, 3, padding=1, groups=4)
    m(torch.randn(2, 4, 6, 6)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_offset_clip_scope_uses_each_axis_own_size():
    """Clamp into [0, S_h-1] x [0, S_w-1]; the 2020 code clamped both axes with S_h."""
    m = GlobalDeformKernel2d(2, 2, 3, padding=1, groups=2, scope_size=(4, 7), offset_clip="scope").double()
    nn.init.normal_(m.kernel_offset_generator.bias, std=20.0)
    _, used = m(torch.randn(1, 2, 5, 5, dtype=D), return_offsets=True)
    dk = used["kernel_offset"].view(9, 2)
    i = torch.arange(3, dtype=D).repeat_interleave(3)
    j = torch.arange(3, dtype=D).repeat(3)
    u, v = 0.5 + i + dk[:, 0], 2.0 + j + dk[:, 1]
    assert u.min() >= 0 and u.max() <= 3 and v.min() >= 0 and v.max() <= 6
    assert v.max() > 3 or v.min() < 0.5  # some column offset used the wider axis
    raw = m.kernel_offset_generator(torch.zeros(1, 2, dtype=D)).view(9, 2)
    inside = (0.5 + i + raw[:, 0] >= 0) & (0.5 + i + raw[:, 0] <= 3)
    torch.testing.assert_close(dk[inside, 0], raw[inside, 0])


def test_dcn_offset_clip_bounds_image_offsets():
    m = DeformConv2d(2, 2, 3, padding=1, offset_clip=1.5)
    nn.init.normal_(m.offset_generator.bias, std=10.0)
    _, used = m(torch.randn(1, 2, 5, 5), return_offsets=True)
    assert used["offset"].abs().max() <= 1.5


def test_batch_zero_modules():
    for m in [cls(4, 4, 3, padding=1, groups=4) for cls in DK_CLASSES] + [
        DeformConv2d(4, 4, 3, padding=1, modulated=True),
        CondConv2d(4, 4, 3, padding=1),
    ]:
        assert m(torch.randn(0, 4, 5, 5)).shape == (0, 4, 5, 5), type(m).__name__


def test_extra_repr_prints_non_defaults_only():
    assert repr(DeformKernel2d(4, 4, 3)) == "DeformKernel2d(\n  4, 4, kernel_size=(3, 3), scope_size=(4, 4)\n" + (
        "  (kernel_offset_generator): Conv2d(4, 18, kernel_size=(3, 3), stride=(1, 1))\n)"
    )
    r = repr(DeformConv2d(4, 8, 3, stride=2, groups=2, bias=False, modulated=True, offset_clip=2.0))
    assert "stride=(2, 2), groups=2, bias=False, modulated=True, offset_clip=2.0" in r
    assert "padding" not in r.split("\n")[1]


def test_module_argument_errors():
    with pytest.raises(ValueError, match="scope_size .* must be at least kernel_size"):
        DeformKernel2d(4, 4, 3, scope_size=2)
    with pytest.raises(ValueError, match="kernel_offset_groups=3 must divide out_channels=4"):
        DeformKernel2d(4, 4, 3, kernel_offset_groups=3)
    with pytest.raises(ValueError, match="offset_clip must be None or 'scope'"):
        DeformKernel2d(4, 4, 3, offset_clip="kernel")
    with pytest.raises(ValueError, match="in_channels=3 must be divisible by groups=2"):
        CondConv2d(3, 4, 3, groups=2)


# ----------------------------------------------------------------------------------------------
# Conversion


@pytest.mark.parametrize("k,scope", [((3, 3), (4, 4)), ((3, 3), (5, 6)), ((1, 3), (2, 4)), ((2, 2), (2, 2))])
def test_scope_from_kernel_reproduces_the_kernel(k, scope):
    kernel = torch.randn(5, 2, *k, dtype=D)
    fitted = scope_from_kernel(kernel, scope)
    assert fitted.shape == (5, 2, *scope)
    torch.testing.assert_close(sample_kernel(fitted, None, k)[0, ..., 0].reshape(kernel.shape), kernel)


@pytest.mark.parametrize("op", models.OPS)
def test_convert_model_preserves_outputs(op):
    net = models.create("study_net", num_classes=5).eval()
    with torch.no_grad():
        for m in net.modules():  # non-trivial BN statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, 32, 32)
    converted = convert_model(net, op=op, scope_size=5).eval()
    n_dw = sum(1 for m in net.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    kinds = {"dcn": DeformConv2d, "condconv": CondConv2d, "dk_global": GlobalDeformKernel2d, "dk": DeformKernel2d,
             "dk_dcn": DeformKernelConv2d}
    if op != "conv":
        assert sum(isinstance(m, kinds[op]) for m in converted.modules()) == n_dw
    with torch.no_grad():
        a, b = net.forward_features(x), converted.forward_features(x)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_convert_model_which_all_and_callable_and_inplace():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4))
    x = torch.randn(2, 3, 8, 8)
    allc = convert_model(net, op="dk", which="all")
    assert isinstance(allc[0], DeformKernel2d) and isinstance(allc[2], DeformKernel2d)
    torch.testing.assert_close(allc(x), net(x), rtol=1e-5, atol=1e-5)
    first = convert_model(net, op="dcn", which=lambda name, m: name == "0")
    assert isinstance(first[0], DeformConv2d) and type(first[2]) is nn.Conv2d
    assert type(net[0]) is nn.Conv2d  # not converted in place by default
    same = convert_model(net, op="dk", inplace=True)
    assert same is net and isinstance(net[2], DeformKernel2d) and type(net[0]) is nn.Conv2d
    # Already-converted layers and their generators are left alone.
    again = convert_model(net, op="dcn", which="all")
    assert isinstance(again[2], DeformKernel2d) and isinstance(again[0], DeformConv2d)


def test_convert_model_errors():
    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        convert_model(net, op="dk", which="all")
    with pytest.raises(ValueError, match="op must be one of"):
        convert_model(net, op="deform")
    with pytest.raises(ValueError, match="which must be"):
        convert_model(net, op="dk", which="pointwise")


# ----------------------------------------------------------------------------------------------
# Zoo

ZOO = [
    ("study_net", {}, 32),
    ("mobilenet_v2", dict(width_mult=0.25, stem_stride=1), 32),
    ("resnet50_dw", dict(small_input=True, base_width=8), 16),
]


@pytest.mark.parametrize("op", models.OPS)
@pytest.mark.parametrize("name,kwargs,size", ZOO, ids=[z[0] for z in ZOO])
def test_every_zoo_model_runs_forward_and_backward_for_every_op(name, kwargs, size, op):
    net = models.create(name, op=op, num_classes=7, **kwargs)
    x = torch.randn(2, 3, size, size)
    out = net(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    rebuilt = models.create(net.arch_name, **net.arch_kwargs)
    rebuilt.load_state_dict(net.state_dict())


@pytest.mark.parametrize("op", ["conv", "dk"])
def test_mobilenet_v2_residual_blocks_start_as_the_identity(op):
    """zero_init_last zeroes the last BN scale of residual blocks: in train mode such a block
    returns its input exactly; without it (the default) the block changes its input."""
    from dk_ops.models.mobilenetv2 import InvertedResidual

    for kw, identity in (({"zero_init_last": True}, True), ({}, False)):
        net = models.create("mobilenet_v2", op=op, num_classes=5, width_mult=0.25, **kw)
        blocks = [m for m in net.modules() if isinstance(m, InvertedResidual) and m.use_residual]
        assert blocks
        for b in blocks:
            xb = torch.randn(2, b.conv[-1].num_features, 8, 8)
            assert torch.equal(b(xb), xb) == identity
        plain = [m for m in net.modules() if isinstance(m, InvertedResidual) and not m.use_residual]
        assert all(bool((m.conv[-1].weight == 1).all()) for m in plain)  # only residual blocks


def test_zoo_registry_and_errors():
    assert models.names() == ["mobilenet_v2", "resnet50_dw", "study_net"]
    assert models.names("*net*") == ["mobilenet_v2", "resnet50_dw", "study_net"]
    with pytest.raises(ValueError, match="unknown model 'mobilenet'; did you mean mobilenet_v2"):
        models.create("mobilenet")
    with pytest.raises(ValueError, match="op must be one of"):
        models.create("study_net", op="deformable")


def test_complexity_counts_against_hand_computed_values():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    c = models.complexity(net, (3, 10, 10))
    assert c["params"] == (8 * 3 * 9 + 8) + (8 * 9 + 8) + (8 * 10 + 10)
    assert c["macs"] == 100 * 8 * 27 + 100 * 8 * 9 + 80 and c["sampling_macs"] == 0
    dk = models.complexity(DeformKernel2d(8, 8, 3, padding=1, groups=8), (8, 10, 10))
    # main conv + generator conv (8 -> 18 channels, 3x3) + 4 corners per sampled weight per position
    assert dk["macs"] == 100 * 8 * 9 + 100 * 18 * 72 and dk["sampling_macs"] == 4 * 8 * 9 * 100


def test_importing_dk_ops_does_not_pull_matplotlib():
    import subprocess
    import sys

    code = "import sys, dk_ops; print('matplotlib' in sys.modules, 'erf_lab' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    assert dk_ops.__all__


@pytest.mark.parametrize("cls", DK_CLASSES + [DeformConv2d])
def test_modules_run_under_autocast_like_conv2d(cls):
    m = cls(4, 4, 3, padding=1, groups=4)
    for gen in [getattr(m, "kernel_offset_generator", None), getattr(m, "offset_generator", None)]:
        if gen is not None:
            nn.init.normal_(gen.weight, std=0.1)
    x = torch.randn(2, 4, 6, 6)
    expected = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05 * expected.abs().max().item())
    y.float().sum().backward()
    assert m.weight.grad is not None and m.weight.grad.dtype == torch.float32
