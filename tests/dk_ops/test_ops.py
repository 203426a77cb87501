"""The functional operator against independent oracles (docs/design.md section 2)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from dk_ops import deform_kernel_conv2d
from dk_ops.backend import dispatch
from tests.dk_ops._naive import naive_deform_kernel_conv2d

D = torch.float64


@pytest.fixture(autouse=True, params=["reference", "auto"])
def backend(request, monkeypatch):
    """Every test runs on the reference path and on whatever the default dispatch picks (native if built)."""
    monkeypatch.setenv("DK_OPS_BACKEND", request.param)
    return request.param


def make_args(
    n=2, c_in=4, c_out=4, hw=(5, 6), k=(3, 3), scope=(4, 4), groups=1, gk=1, gi=None, kernel="local",
    mask=False, bias=True, stride=(1, 1), padding=(1, 1), dilation=(1, 1), dtype=D, offset_scale=0.7,
):
    """Random arguments for one configuration; offsets are fractional (no kinks for gradcheck)."""
    K = k[0] * k[1]
    ho = (hw[0] + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
    wo = (hw[1] + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
    x = torch.randn(n, c_in, *hw, dtype=dtype)
    w = torch.randn(c_out, c_in // groups, *scope, dtype=dtype)
    dk = None
    if kernel == "local":
        dk = torch.randn(n, 2 * gk * K, ho, wo, dtype=dtype) * offset_scale
    elif kernel == "global":
        dk = torch.randn(n, 2 * gk * K, dtype=dtype) * offset_scale
    off = None if gi is None else torch.randn(n, 2 * gi * K, ho, wo, dtype=dtype) * offset_scale
    m = None
    if mask:
        m = torch.rand(n, (gi or 1) * K, ho, wo, dtype=dtype)
    b = torch.randn(c_out, dtype=dtype) if bias else None
    kw = dict(kernel_size=k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (x, w, dk, off, m, b), kw


# A grid that touches every argument: groups, G_k, G_i, global/local, mask, geometry, non-square.
CONFIGS = [
    dict(),
    dict(kernel="global"),
    dict(kernel=None, gi=1),
    dict(kernel=None, gi=2, mask=True),
    dict(kernel=None, mask=True),
    dict(gi=1),
    dict(groups=2, gk=2, gi=2, mask=True),
    dict(groups=4, c_out=8, gk=4, kernel="global"),
    dict(groups=4, c_out=4, gk=2, gi=4),
    dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2), gi=1),
    dict(k=(2, 3), scope=(3, 5), hw=(6, 5), gi=1, padding=(1, 0)),
    dict(k=(3, 1), scope=(5, 2), kernel="global", bias=False),
    dict(groups=4, kernel=None),  # depthwise, no offsets: the CPU's direct depthwise loops
    dict(groups=4, c_out=8, kernel="global", stride=(2, 2), dilation=(1, 2), padding=(0, 2), hw=(7, 6)),
    dict(c_in=6, c_out=3, groups=3, gk=3, gi=3, mask=True, stride=(2, 2), dilation=(2, 1), padding=(2, 1)),
]


def _ids(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_matches_nested_loop_oracle(cfg):
    args, kw = make_args(**cfg)
    out = deform_kernel_conv2d(*args, **kw)
    np_args = [None if a is None else a.numpy() for a in args]
    expected = naive_deform_kernel_conv2d(*np_args, **kw)
    torch.testing.assert_close(out, torch.from_numpy(expected), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_gradcheck_every_tensor_argument(cfg):
    # Fast mode checks random projections v^T J u of the Jacobian against finite differences.
    args, kw = make_args(**{"n": 1, "hw": (4, 5), **cfg})
    args = tuple(None if a is None else a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(
        lambda *a: deform_kernel_conv2d(*a, **kw), args, eps=1e-6, atol=1e-5, fast_mode=True
    )


@pytest.mark.parametrize("cfg", [dict(gi=1, mask=True), dict(groups=2, gk=2, kernel="global")], ids=_ids)
def test_gradcheck_full_jacobian(cfg):
    args, kw = make_args(**{"n": 1, "c_in": 2, "c_out": 2, "hw": (3, 4), **cfg})
    args = tuple(None if a is None else a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(lambda *a: deform_kernel_conv2d(*a, **kw), args, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("geometry", [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 2), (2, 1))])
def test_scope_equal_kernel_zero_offsets_is_conv2d(groups, geometry):
    stride, padding, dilation = geometry
    x = torch.randn(2, 4, 7, 8, dtype=D)
    w = torch.randn(8, 4 // groups, 3, 2, dtype=D)
    b = torch.randn(8, dtype=D)
    expected = F.conv2d(x, w, b, stride, padding, dilation, groups)
    kw = dict(kernel_size=(3, 2), stride=stride, padding=padding, dilation=dilation, groups=groups)
    torch.testing.assert_close(deform_kernel_conv2d(x, w, bias=b, **kw), expected)
    ho, wo = expected.shape[-2:]
    zeros_local = torch.zeros(2, 2 * 6, ho, wo, dtype=D)
    torch.testing.assert_close(deform_kernel_conv2d(x, w, zeros_local, zeros_local, bias=b, **kw), expected)
    torch.testing.assert_close(deform_kernel_conv2d(x, w, torch.zeros(2, 12, dtype=D), bias=b, **kw), expected)


@pytest.mark.parametrize("shift", [(0, 0), (1, -1), (-1, 1), (2, 0), (-2, -3)])
def test_integer_kernel_offsets_are_a_shifted_crop_of_the_scope(shift):
    dy, dx = shift
    x = torch.randn(2, 3, 6, 6, dtype=D)
    scope = torch.randn(3, 1, 5, 5, dtype=D)
    # Zero-padded scope so that crops leaving the scope read zeros (the bilinear rule).
    padded = F.pad(scope, (3, 3, 3, 3))
    top, left = 1 + dy + 3, 1 + dx + 3
    crop = padded[..., top : top + 3, left : left + 3]
    expected = F.conv2d(x, crop, padding=1, groups=3)
    dk = torch.tensor([dy, dx], dtype=D).repeat(9).view(1, 18).expand(2, 18)
    kw = dict(kernel_size=3, padding=1, groups=3)
    torch.testing.assert_close(deform_kernel_conv2d(x, scope, dk, **kw), expected)
    local = dk[:, :, None, None].expand(2, 18, 6, 6)
    torch.testing.assert_close(deform_kernel_conv2d(x, scope, local, **kw), expected)


def test_scope4_kernel3_zero_offsets_is_box_filtered_scope():
    x = torch.randn(2, 4, 6, 7, dtype=D)
    scope = torch.randn(8, 2, 4, 4, dtype=D)
    box = F.avg_pool2d(scope, kernel_size=2, stride=1)  # each weight the mean of a 2x2 block
    expected = F.conv2d(x, box, padding=1, groups=2)
    torch.testing.assert_close(deform_kernel_conv2d(x, scope, kernel_size=3, padding=1, groups=2), expected)


def test_dk_dcn_with_zero_kernel_offsets_and_scope_k_is_dcn():
    (x, w, _, off, m, b), kw = make_args(scope=(3, 3), gi=2, mask=True, kernel=None)
    ho, wo = off.shape[-2:]
    zero_dk = torch.zeros(x.shape[0], 18, ho, wo, dtype=D)
    torch.testing.assert_close(
        deform_kernel_conv2d(x, w, zero_dk, off, m, b, **kw), deform_kernel_conv2d(x, w, None, off, m, b, **kw)
    )


def test_dcn_matches_torchvision():
    import torchvision.ops as tv_ops  # the Makefile installs the torchvision matching torch
    (x, w, _, off, m, b), kw = make_args(scope=(3, 3), gi=2, mask=True, kernel=None, stride=(2, 1))
    expected = tv_ops.deform_conv2d(x, off, w, b, stride=kw["stride"], padding=kw["padding"], mask=m)
    torch.testing.assert_close(deform_kernel_conv2d(x, w, None, off, m, b, **kw), expected)


@pytest.mark.parametrize("gk", [1, 2])
def test_global_offsets_equal_local_offsets_broadcast(gk):
    (x, w, dk, off, m, b), kw = make_args(kernel="global", gk=gk, gi=1)
    ho, wo = off.shape[-2:]
    local = dk[:, :, None, None].expand(-1, -1, ho, wo)
    torch.testing.assert_close(
        deform_kernel_conv2d(x, w, dk, off, m, b, **kw), deform_kernel_conv2d(x, w, local, off, m, b, **kw)
    )


def test_batch_size_zero_forward_and_backward():
    (x, w, dk, off, m, b), kw = make_args(n=0, gi=1, mask=True)
    w.requires_grad_()
    out = deform_kernel_conv2d(x, w, dk, off, m, b, **kw)
    assert out.shape == (0, 4, 5, 6)
    out.sum().backward()
    assert w.grad is not None and torch.all(w.grad == 0)


def test_non_contiguous_inputs():
    (x, w, dk, off, m, b), kw = make_args(gi=1, mask=True, groups=2, gk=2)
    expected = deform_kernel_conv2d(x, w, dk, off, m, b, **kw)
    nc = [
        x.to(memory_format=torch.channels_last),
        w.transpose(2, 3).contiguous().transpose(2, 3),
        dk.transpose(2, 3).contiguous().transpose(2, 3),
        off.to(memory_format=torch.channels_last),
        m[:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3),
        torch.stack([b, b], 1)[:, 0],
    ]
    assert not any(t.is_contiguous() for t in nc[1:4])
    torch.testing.assert_close(deform_kernel_conv2d(*nc, **kw), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_matches_float64(dtype):
    (x, w, dk, off, m, b), kw = make_args(gi=1, mask=True)
    expected = deform_kernel_conv2d(x, w, dk, off, m, b, **kw)
    low = [None if t is None else t.to(dtype) for t in (x, w, dk, off, m, b)]
    out = deform_kernel_conv2d(*low, **kw)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    # Reduced-precision inputs are themselves rounded, so compare against float64 on the rounded inputs.
    ref = deform_kernel_conv2d(*[None if t is None else t.to(D) for t in low], **kw)
    torch.testing.assert_close(out.to(D), ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert (ref - expected).abs().max() < 0.2 * expected.abs().max()


def test_backend_dispatch_takes_normalised_arguments():
    (x, w, dk, off, m, b), kw = make_args(gi=1)
    out = dispatch(x, w, dk, off, m, b, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    torch.testing.assert_close(out, deform_kernel_conv2d(x, w, dk, off, m, b, **kw))


# ----------------------------------------------------------------------------------------------
# Errors: a ValueError naming the argument with the expected and the received shape.

def _err(match, *args, **kw):
    with pytest.raises(ValueError, match=match):
        deform_kernel_conv2d(*args, **kw)


def test_error_offset_channels_not_multiple_of_taps():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    _err(r"offset must have shape \(1, 2\*offset_groups\*9, 3, 3\).*multiple of 18.*\(1, 10, 3, 3\)",
         x, w, None, torch.randn(1, 10, 3, 3), kernel_size=3)
    _err(r"kernel_offset must have shape.*multiple of 18.*\(1, 7\)", x, w, torch.randn(1, 7), kernel_size=3)
    _err(r"mask must have shape.*\(1, 4, 3, 3\)", x, w, None, None, torch.randn(1, 4, 3, 3), kernel_size=3)


def test_error_groups_do_not_divide_channels():
    _err(r"groups=2 must divide in_channels=3", torch.randn(1, 3, 5, 5), torch.randn(2, 1, 3, 3),
         kernel_size=3, groups=2)
    _err(r"groups=2 must divide out_channels=3", torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3),
         kernel_size=3, groups=2)
    _err(r"weight must have shape \(4, 2, scope_height, scope_width\).*\(4, 4, 3, 3\)",
         torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3), kernel_size=3, groups=2)
    _err(r"kernel_offset has 3 groups.*must divide out_channels=4", torch.randn(1, 4, 5, 5),
         torch.randn(4, 4, 3, 3), torch.randn(1, 54), kernel_size=3)
    _err(r"offset has 3 groups.*must divide in_channels=4", torch.randn(1, 4, 5, 5),
         torch.randn(4, 4, 3, 3), None, torch.randn(1, 54, 3, 3), kernel_size=3)


def test_error_kernel_larger_than_scope():
    _err(r"kernel_size \(3, 3\) must not exceed the scope size.*\(2, 1, 3, 2\)",
         torch.randn(1, 1, 5, 5), torch.randn(2, 1, 3, 2), kernel_size=3)


def test_error_mismatched_batch_and_spatial_sizes():
    x, w = torch.randn(2, 2, 5, 5), torch.randn(2, 2, 3, 3)
    _err(r"offset must have shape .* batch size 2, got \(3, 18, 3, 3\)", x, w, None, torch.randn(3, 18, 3, 3),
         kernel_size=3)
    _err(r"kernel_offset must have shape .* spatial size \(3, 3\).*got \(2, 18, 4, 4\)", x, w,
         torch.randn(2, 18, 4, 4), kernel_size=3)
    _err(r"input must have shape \(batch_size, in_channels, height, width\), got \(2, 5, 5\)",
         torch.randn(2, 5, 5), w, kernel_size=3)
    _err(r"too small.*output would be \(-1, -1\)", torch.randn(1, 2, 1, 1), w, kernel_size=3)
    _err(r"bias must have shape \(2,\), got \(3,\)", x, w, bias=torch.randn(3), kernel_size=3)


def test_error_dtype_and_device_mixes():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    _err(r"weight must have the input's dtype torch.float32, got torch.float64", x, w.double(), kernel_size=3)
    _err(r"offset must have the input's dtype", x, w, None, torch.randn(1, 18, 3, 3, dtype=D), kernel_size=3)
    _err(r"input must be a floating-point tensor", x.long(), w.long(), kernel_size=3)
    _err(r"weight must be on the input's device meta, got cpu", x.to("meta"), w, kernel_size=3)


def test_error_bad_geometry_arguments():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)
    _err(r"kernel_size must be an int or a pair of ints", x, w, kernel_size=(3, 3, 3))
    _err(r"stride and dilation must be >= 1", x, w, kernel_size=3, stride=0)
    _err(r"groups must be a positive int", x, w, kernel_size=3, groups=0)


def test_configs_cover_the_promised_axes():
    """Guard against the grid silently shrinking: every axis the issue names is exercised."""
    keys = set(itertools.chain.from_iterable(CONFIGS))
    assert {"groups", "gk", "gi", "kernel", "mask", "stride", "padding", "dilation", "k", "scope"} <= keys
