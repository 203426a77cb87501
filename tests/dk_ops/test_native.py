"""Native (C++) kernels of dk_ops against the reference path, and their torch.library plumbing.

The first test that needs the kernels compiles them (about 40 s on 2 cores, once per
cache; see dk_ops/_native.py); later runs load the cached build.
"""
import os
import subprocess
import sys

import pytest
import torch

from dk_ops import backend
from dk_ops.reference import deform_kernel_conv2d_reference

D = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", autouse=True)
def native():
    if os.environ.get("DK_OPS_BACKEND", "").lower() == "reference":
        pytest.skip("DK_OPS_BACKEND=reference")
    # CI must exercise the native CPU path: a failed build is a test failure, with the reason.
    assert backend.load_native(), backend.backend_info()
    return torch.ops.dk_ops


def out_hw(hw, k, s, p, d):
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def make(n=2, c_in=4, c_out=4, hw=(6, 7), k=(3, 3), scope=(4, 4), groups=1, gk=1, gi=None, gm=None,
         kernel="local", mask=False, bias=True, stride=(1, 1), padding=(1, 1), dilation=(1, 1), dtype=D, scale=1.3):
    """Random arguments; offsets large enough to reach outside the scope and the image."""
    K = k[0] * k[1]
    ho, wo = out_hw(hw, k, stride, padding, dilation)
    x = torch.randn(n, c_in, *hw, dtype=dtype)
    w = torch.randn(c_out, c_in // groups, *scope, dtype=dtype)
    dk = {"local": lambda: torch.randn(n, 2 * gk * K, ho, wo, dtype=dtype) * scale,
          "global": lambda: torch.randn(n, 2 * gk * K, dtype=dtype) * scale,
          None: lambda: None}[kernel]()
    off = None if gi is None else torch.randn(n, 2 * gi * K, ho, wo, dtype=dtype) * 2 * scale
    m = torch.rand(n, (gm or gi or 1) * K, ho, wo, dtype=dtype) if mask else None
    b = torch.randn(c_out, dtype=dtype) if bias else None
    sizes = dict(kernel_size=k, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return [x, w, dk, off, m, b], sizes


def flat(sizes):
    return (*sizes["kernel_size"], *sizes["stride"], *sizes["padding"], *sizes["dilation"], sizes["groups"])


def call_native(args, sizes):
    return torch.ops.dk_ops.deform_kernel_conv2d(*args, *flat(sizes))


def call_reference(args, sizes):
    return deform_kernel_conv2d_reference(
        *args, sizes["kernel_size"], sizes["stride"], sizes["padding"], sizes["dilation"], sizes["groups"]
    )


def values_and_grads(fn, args, sizes, grad_out=None):
    args = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    y = fn(args, sizes)
    if grad_out is None:
        grad_out = torch.randn_like(y)
    live = [a for a in args if a is not None]
    grads = torch.autograd.grad(y, live, grad_out, allow_unused=True) if y.numel() else [None] * len(live)
    return y, grads, grad_out


def assert_parity(args, sizes, rtol=1e-9, atol=1e-9):
    y_n, g_n, go = values_and_grads(call_native, args, sizes)
    y_r, g_r, _ = values_and_grads(call_reference, args, sizes, go)
    torch.testing.assert_close(y_n, y_r, rtol=rtol, atol=atol)
    names = [nm for nm, a in zip(["input", "weight", "kernel_offset", "offset", "mask", "bias"], args) if a is not None]
    for nm, a, b in zip(names, g_n, g_r):
        if b is None:
            b = torch.zeros_like(a)
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"grad of {nm}: {m}")


# Every axis of the operator: groups (1, 2, depthwise, depthwise multiplier), G_k, G_i, G_m,
# local/global/no kernel offsets, mask with and without image offsets, geometry, non-square
# kernel and scope, bias or not.
GRID = [
    dict(),
    dict(kernel="global"),
    dict(kernel=None),
    dict(kernel=None, gi=1),
    dict(kernel=None, gi=2, mask=True),
    dict(kernel=None, mask=True, gm=2),
    dict(gi=1, mask=True),
    dict(groups=2, gk=2, gi=2, mask=True),
    dict(groups=2, c_out=6, gk=3, gi=1),
    dict(groups=4, gk=2, gi=4),
    dict(groups=4, c_out=8, gk=4, kernel="global", mask=True),
    dict(groups=4, c_out=8, gk=2, gi=2, mask=True, bias=False),
    dict(groups=4, c_out=12, gk=3),
    dict(groups=1, c_out=6, gk=3, kernel="local", gi=2, scope=(5, 3), k=(3, 2)),
    dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2), gi=1),
    dict(groups=4, stride=(2, 2), padding=(2, 1), dilation=(2, 1), gi=2, mask=True),
    dict(k=(2, 3), scope=(3, 5), hw=(6, 5), gi=1, padding=(1, 0)),
    dict(k=(3, 1), scope=(5, 2), kernel="global", bias=False),
    dict(k=(3, 3), scope=(3, 3), kernel=None, gi=1, mask=True),
    dict(c_in=6, c_out=3, groups=3, gk=3, gi=3, mask=True, stride=(2, 2), dilation=(2, 1), padding=(2, 1)),
]


def _ids(cfg):
    return ",".join(f"{k}={v}" for k, v in cfg.items()) or "default"


@pytest.mark.parametrize("cfg", GRID, ids=_ids)
def test_parity_float64_values_and_all_gradients(cfg):
    args, sizes = make(**cfg)
    assert_parity(args, sizes)


@pytest.mark.parametrize("cfg", [cfg for cfg in GRID if cfg.get("kernel", "local") == "local"], ids=_ids)
def test_parity_of_the_device_agnostic_passes_cuda_runs(cfg, monkeypatch):
    """DK_OPS_CPU_GENERIC=1: the CPU runs the passes the CUDA kernels share (no fused depthwise backward)."""
    monkeypatch.setenv("DK_OPS_CPU_GENERIC", "1")
    args, sizes = make(**cfg)
    assert_parity(args, sizes)


@pytest.mark.parametrize("cfg", [dict(), dict(groups=2, gk=2, gi=1, mask=True), dict(groups=4, kernel="global")],
                         ids=_ids)
def test_parity_float32(cfg):
    args, sizes = make(dtype=torch.float32, **cfg)
    assert_parity(args, sizes, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_computed_in_float32(dtype):
    args, sizes = make(gi=1, mask=True, groups=2, gk=2)
    low = [None if a is None else a.to(dtype) for a in args]
    out = call_native(low, sizes)
    assert out.dtype == dtype
    expected = call_reference([None if a is None else a.float() for a in low], sizes).to(dtype)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_batch_size_zero():
    args, sizes = make(n=0, gi=1, mask=True, groups=2, gk=2)
    args = [None if a is None else a.requires_grad_() for a in args]
    y = call_native(args, sizes)
    assert y.shape == (0, 4, 6, 7)
    y.sum().backward()
    assert args[1].grad.shape == args[1].shape and torch.all(args[1].grad == 0)
    assert args[5].grad.shape == (4,)


def test_non_contiguous_inputs():
    args, sizes = make(gi=1, mask=True, groups=2, gk=2)
    nc = [
        args[0].to(memory_format=torch.channels_last),
        args[1].transpose(2, 3).contiguous().transpose(2, 3),
        args[2].transpose(2, 3).contiguous().transpose(2, 3),
        args[3].to(memory_format=torch.channels_last),
        args[4].transpose(2, 3).contiguous().transpose(2, 3),
        torch.stack([args[5], args[5]], 1)[:, 0],
    ]
    assert not any(t.is_contiguous() for t in nc[1:])
    assert_parity(nc, sizes)


def test_public_function_dispatches_to_native_on_cpu():
    import dk_ops

    assert backend.selected_backend("cpu") == "native"
    info = dk_ops.backend_info()
    assert info["cpu"].startswith("native"), info
    args, sizes = make(gi=1)
    torch.testing.assert_close(dk_ops.deform_kernel_conv2d(*args, **sizes), call_reference(args, sizes))


def test_backend_env_var(monkeypatch):
    args, sizes = make()
    monkeypatch.setenv("DK_OPS_BACKEND", "reference")
    assert backend.selected_backend("cpu") == "reference"
    assert backend.backend_info()["cpu"].startswith("reference")
    monkeypatch.setenv("DK_OPS_BACKEND", "native")
    assert backend.selected_backend("cpu") == "native"
    monkeypatch.setenv("DK_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DK_OPS_BACKEND"):
        backend.selected_backend("cpu")


# ---------------------------------------------------------------------------------------------
# Determinism: two runs of the weight gradient are bitwise equal.

# Depthwise on channels-last tensors: its own CPU kernels (cpu/depthwise_channels_last.h).
DEPTHWISE_GRID = [
    dict(groups=4),
    dict(groups=4, kernel="global"),
    dict(groups=4, kernel=None, gi=1),
    dict(groups=4, kernel=None, mask=True, gm=2, bias=False),
    dict(groups=4, gk=2, gi=2, mask=True),
    dict(c_in=8, c_out=8, groups=8, gk=2, gi=4, gm=2, mask=True, stride=(2, 1), padding=(2, 1), dilation=(1, 2)),
    dict(c_in=6, c_out=6, groups=6, gk=3, kernel="global", mask=True, bias=False),
    dict(groups=4, k=(2, 3), scope=(3, 5), hw=(6, 5), gi=1, padding=(1, 0)),
    dict(c_in=3, c_out=3, groups=3, k=(3, 3), scope=(3, 3), kernel=None, gi=1, mask=True, stride=(2, 2)),
]


def channels_last(args):
    """Input, kernel offsets, offsets and mask in channels-last format (the weight as it is)."""
    return [a.to(memory_format=torch.channels_last) if a is not None and a.dim() == 4 and i != 1 else a
            for i, a in enumerate(args)]


@pytest.mark.parametrize("cfg", DEPTHWISE_GRID, ids=_ids)
def test_channels_last_depthwise_parity_and_formats(cfg):
    args, sizes = make(**cfg)
    cl = channels_last(args)
    assert_parity(cl, sizes)
    assert_parity([cl[0]] + args[1:], sizes)  # channels-last input, NCHW offsets and mask
    live = [None if a is None else a.detach().clone().requires_grad_() for a in cl]
    y = call_native(live, sizes)
    # outputs follow their argument's format, as conv2d's do
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    grads = torch.autograd.grad(y, [a for a in live if a is not None], torch.randn_like(y))
    for a, g in zip([a for a in live if a is not None], grads):
        if a.dim() == 4 and not a.is_contiguous():
            assert g.is_contiguous(memory_format=torch.channels_last), g.stride()
    plain = call_native(args, sizes)
    assert plain.is_contiguous()
    torch.testing.assert_close(y, plain, rtol=1e-12, atol=1e-12)


def test_channels_last_depthwise_float32_gradcheck_like_float64():
    args, sizes = make(dtype=torch.float32, groups=4, gi=1, mask=True)
    assert_parity(channels_last(args), sizes, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_depthwise_gradients_do_not_depend_on_threads(threads):
    args, sizes = make(dtype=torch.float32, groups=4, n=5, hw=(9, 8), gi=1, mask=True)
    cl = channels_last(args)
    go = torch.randn_like(call_native(cl, sizes))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = values_and_grads(call_native, cl, sizes, go)[1]
        torch.set_num_threads(threads)
        many = values_and_grads(call_native, cl, sizes, go)[1]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("generic", [False, True])
@pytest.mark.parametrize("cfg", [dict(groups=4, n=3, hw=(12, 11)), dict(groups=2, gk=2, n=3, hw=(12, 11), gi=1),
                                 dict(groups=1, kernel="global", n=3), dict(groups=4, n=2, hw=(70, 70), gi=2)],
                         ids=_ids)
def test_weight_gradient_is_deterministic(cfg, generic, monkeypatch):
    monkeypatch.setenv("DK_OPS_CPU_GENERIC", "1" if generic else "0")
    args, sizes = make(dtype=torch.float32, **cfg)
    go = torch.randn_like(call_native(args, sizes))
    a = values_and_grads(call_native, args, sizes, go)[1][1]
    b = values_and_grads(call_native, args, sizes, go)[1][1]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile, torch.export.

@pytest.mark.parametrize("cfg", [dict(), dict(groups=2, gk=2, gi=2, mask=True), dict(kernel="global", groups=4),
                                 dict(kernel=None, mask=True, bias=False), dict(groups=4, gi=1, mask=True, cl=True),
                                 dict(groups=4, kernel="global", cl=True)], ids=_ids)
def test_opcheck_forward_and_backward_ops(cfg):
    cfg = dict(cfg)
    cl = cfg.pop("cl", False)
    args, sizes = make(n=2 if cl else 1, hw=(5, 4), **cfg)
    if cl:  # the channels-last depthwise kernels, and outputs in their arguments' formats
        args = channels_last(args)
    fwd_args = tuple(None if a is None else a.requires_grad_() for a in args) + flat(sizes)
    torch.library.opcheck(torch.ops.dk_ops.deform_kernel_conv2d.default, fwd_args)
    y = call_native(args, sizes).detach()
    need = [True, True, args[2] is not None, args[3] is not None, args[4] is not None, args[5] is not None]
    bwd_args = (torch.randn_like(y),) + tuple(None if a is None else a.detach() for a in args[:5]) + flat(sizes) + (
        need,)
    torch.library.opcheck(torch.ops.dk_ops._deform_kernel_conv2d_backward.default, bwd_args)


def test_torch_compile_fullgraph_forward_and_backward():
    """The native op is captured in one graph; inductor compiles forward and backward around it."""
    from dk_ops.modules import DeformKernel2d

    torch._dynamo.reset()
    layer = DeformKernel2d(4, 4, 3, padding=1, groups=4).double()
    with torch.no_grad():
        layer.kernel_offset_generator.weight.normal_(0, 0.1)
    x = torch.randn(2, 4, 7, 7, dtype=D, requires_grad=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch.compile(layer, fullgraph=True, backend=record)(x)
    assert "dk_ops.deform_kernel_conv2d" in graphs[0]
    torch._dynamo.reset()

    eager_y = layer(x)
    eager_g = torch.autograd.grad(eager_y.square().sum(), [x, layer.weight])
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    g = torch.autograd.grad(y.square().sum(), [x, layer.weight])
    torch.testing.assert_close(y, eager_y)
    for a, b in zip(g, eager_g):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_torch_export_of_a_zoo_model_with_dk_layers():
    import dk_ops.models as zoo

    model = zoo.create("study_net", op="dk", widths=(8, 16), num_classes=3).eval()
    x = torch.randn(1, 3, 16, 16)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("dk_ops.deform_kernel_conv2d" in t for t in targets), targets
    torch.testing.assert_close(program.module()(x), model(x))


# ---------------------------------------------------------------------------------------------
# Random shapes (bounded).

try:
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @st.composite
    def configs(draw):
        groups = draw(st.sampled_from([1, 2, 3]))
        cg = draw(st.integers(1, 2))
        mult = draw(st.integers(1, 2))
        c_in, c_out = groups * cg, groups * mult
        k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        scope = (k[0] + draw(st.integers(0, 2)), k[1] + draw(st.integers(0, 2)))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        hw = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
        ho, wo = out_hw(hw, k, stride, padding, dilation)
        if ho < 1 or wo < 1:
            hw = (hw[0] + dilation[0] * (k[0] - 1) + 1, hw[1] + dilation[1] * (k[1] - 1) + 1)
        gk = draw(st.sampled_from([d for d in (1, 2, 3) if c_out % d == 0]))
        gi = draw(st.sampled_from([None] + [d for d in (1, 2) if c_in % d == 0]))
        return dict(n=draw(st.integers(1, 2)), c_in=c_in, c_out=c_out, hw=hw, k=k, scope=scope, groups=groups,
                    gk=gk, gi=gi, kernel=draw(st.sampled_from(["local", "global", None])),
                    mask=draw(st.booleans()), bias=draw(st.booleans()), stride=stride, padding=padding,
                    dilation=dilation)

    @settings(max_examples=40, deadline=None, derandomize=True)
    @given(configs())
    def test_random_shapes_match_reference(cfg):
        args, sizes = make(**cfg)
        assert_parity(args, sizes)


# ---------------------------------------------------------------------------------------------
# Build mechanics, in fresh interpreters.

def _python(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)


def test_import_does_not_build_or_load():
    r = _python("import dk_ops, dk_ops.modules, dk_ops.models, sys; from dk_ops import _native; "
                "assert not _native.status()['attempted']; "
                "assert 'torch.utils.cpp_extension' not in sys.modules; print('ok')")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_failed_build_falls_back_to_reference_and_says_why(tmp_path):
    code = ("import torch, dk_ops; from dk_ops import backend; "
            "x = torch.randn(1, 2, 5, 5); w = torch.randn(2, 1, 4, 4); "
            "y = dk_ops.deform_kernel_conv2d(x, w, kernel_size=3, padding=1, groups=2); "
            "info = dk_ops.backend_info(); print(info['cpu']); print(info['native'])")
    r = _python(code, CXX="/nonexistent/c++", DK_OPS_BUILD_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "reference" in r.stdout and "no C++ compiler" in r.stdout, r.stdout
    forced = _python(code, CXX="/nonexistent/c++", DK_OPS_BUILD_DIR=str(tmp_path), DK_OPS_BACKEND="native")
    assert forced.returncode != 0 and "DK_OPS_BACKEND=native" in forced.stderr and "no C++ compiler" in forced.stderr
