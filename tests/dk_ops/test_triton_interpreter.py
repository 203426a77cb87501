"""The Triton kernels (dk_ops/triton) under Triton's interpreter, against the reference path.

The testing contract: with TRITON_INTERPRET=1 and DK_OPS_BACKEND=triton, dk_ops.deform_kernel_conv2d
on CPU tensors runs the Triton kernels through the interpreter (forward and backward), the same
kernels a GPU compiles. TRITON_INTERPRET is set here, before triton is imported: triton decides
between compiled and interpreted functions when @triton.jit runs, and dk_ops.triton._impl
re-imports its kernels module if the mode changed since (so the order of test modules does not
matter). The interpreter runs programs one at a time (atomic races are never exercised) and has no
bfloat16 arithmetic (the kernels convert bfloat16 to float32 on load, which it supports; bf16 speed
and error are measured on a GPU by scripts/gpu_check.sh).

Shapes are small (the interpreter runs numpy per block operation): the whole CPU native test grid in
float64, a bounded hypothesis search, float32/float16/bfloat16, batch 0, non-contiguous and
channels-last arguments, NaN-poisoned buffers (every element written, on the whole grid), multi-program tiling, the
batch-chunked general path, opcheck, torch.compile, torch.export, one tiny gradcheck, and the
GPU compiler's acceptance of the kernels (compiled for sm_90 without a GPU, nothing run).
"""
import os

_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # noqa: E402 - must precede the first triton import

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import triton  # noqa: E402,F401  (the test extra installs it: this suite must run in CI)

import dk_ops  # noqa: E402
from dk_ops.triton import _impl  # noqa: E402
from tests.dk_ops.test_native import GRID, _ids, call_reference, flat, make, out_hw  # noqa: E402

D = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ["input", "weight", "kernel_offset", "offset", "mask", "bias"]


@pytest.fixture(scope="module", autouse=True)
def _restore_environment():
    """Later test modules (and their subprocesses) see TRITON_INTERPRET as it was."""
    yield
    if _BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _BEFORE


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Every test runs the public op with DK_OPS_BACKEND=triton under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DK_OPS_BACKEND", "triton")
    assert dk_ops.backend.selected_backend("cpu") == "triton"
    yield


def call_triton(args, sizes):
    return dk_ops.deform_kernel_conv2d(*args, **sizes)


def values_and_grads(fn, args, sizes, grad_out=None):
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    y = fn(leaves, sizes)
    if grad_out is None:
        grad_out = torch.randn_like(y)
    live = [a for a in leaves if a is not None]
    grads = torch.autograd.grad(y, live, grad_out, allow_unused=True) if y.numel() else [None] * len(live)
    return y, grads, grad_out


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def assert_parity(args, sizes, tol=None, rel_tol=None):
    """Triton through the public op vs the reference's autograd: values and every gradient."""
    before = sum(_impl.LAUNCHES.values())
    y_t, g_t, go = values_and_grads(call_triton, args, sizes)
    assert sum(_impl.LAUNCHES.values()) > before, "the Triton kernels did not run"
    y_r, g_r, _ = values_and_grads(call_reference, args, sizes, go)
    names = [nm for nm, a in zip(NAMES, args) if a is not None]
    pairs = [("output", y_t, y_r)] + [(nm, a, b if b is not None else torch.zeros_like(a))
                                      for nm, a, b in zip(names, g_t, g_r)]
    for nm, a, b in pairs:
        assert a.dtype == b.dtype and a.shape == b.shape, nm
        assert torch.isfinite(a).all(), f"{nm}: non-finite values"
        if rel_tol is not None:
            assert rel(a, b) <= rel_tol, f"{nm}: relative error {rel(a, b):.2e}"
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{nm}: {m}")
    return y_t, g_t


# ---------------------------------------------------------------------------------------------
# The CPU native suite's argument grid, float64, values and all gradients.

@pytest.mark.parametrize("cfg", GRID, ids=_ids)
def test_grid_float64_values_and_all_gradients(cfg, monkeypatch):
    """Also: every element is written. Output, gradient and partial-sum buffers are filled with NaN
    before the kernels run (_impl.POISON), so an element no kernel writes comes out as NaN
    (assert_parity checks finiteness and values). Batch 1 here (interpreter time); batches of 2 run
    in the tests below (hypothesis, memory formats, tiling, the self-check)."""
    monkeypatch.setattr(_impl, "POISON", True)
    args, sizes = make(**{"n": 1, **cfg})
    assert_parity(args, sizes, tol=1e-9)


@pytest.mark.parametrize("cfg", [dict(), dict(groups=2, gk=2, gi=1, mask=True), dict(groups=4, kernel="global"),
                                 dict(groups=1, c_out=6, gk=3, gi=2, scope=(5, 3), k=(3, 2))], ids=_ids)
def test_float32_relative_error(cfg):
    args, sizes = make(dtype=torch.float32, **cfg)
    assert_parity(args, sizes, rel_tol=2e-6)


@pytest.mark.parametrize("cfg,dtype", [(dict(groups=4, gi=1, mask=True), torch.float16),
                                       (dict(groups=4, gi=1, mask=True), torch.bfloat16),
                                       (dict(groups=2, gk=2, gi=2, mask=True), torch.float16),
                                       (dict(groups=1, kernel="global", gi=1), torch.bfloat16)],
                         ids=["depthwise-f16", "depthwise-bf16", "general-f16", "general-global-bf16"])
def test_reduced_precision_accumulates_in_float32(cfg, dtype):
    """Outputs and gradients in the input dtype, computed in float32: bitwise the float32 kernels' results
    on the same (rounded) inputs, rounded once; and close to the reference. (The float32 reference is not
    the bitwise oracle here: rounded inputs land on pixel and cell boundaries, where grid_sample's
    normalised coordinates may pick the other one-sided derivative.)"""
    args, sizes = make(n=1, scale=0.7, **cfg)
    low = [None if a is None else a.to(dtype) for a in args]
    go = torch.randn(out_shape(args, sizes)).to(dtype)
    y, g, _ = values_and_grads(call_triton, low, sizes, go)
    up = [None if a is None else a.float() for a in low]
    y32, g32, _ = values_and_grads(call_triton, up, sizes, go.float())
    y_r, g_r, _ = values_and_grads(call_reference, up, sizes, go.float())
    names = ["output"] + [n for n, a in zip(NAMES, args) if a is not None]
    for nm, a, b, r in zip(names, (y,) + tuple(g), (y32,) + tuple(g32), (y_r,) + tuple(g_r)):
        assert a.dtype == dtype, nm
        torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0, msg=lambda m: f"{nm}: {m}")
        assert rel(a.float(), r) <= 0.05, f"{nm}: relative error {rel(a.float(), r):.2e} against the reference"


def out_shape(args, sizes):
    x, w = args[0], args[1]
    ho, wo = out_hw(x.shape[2:], sizes["kernel_size"], sizes["stride"], sizes["padding"], sizes["dilation"])
    return (x.shape[0], w.shape[0], ho, wo)


# ---------------------------------------------------------------------------------------------
# Hypothesis: shapes, groups, geometry and offsets (fractional, on integers, outside the scope
# and the image).

try:
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @st.composite
    def configs(draw):
        groups = draw(st.sampled_from([1, 2, 3]))
        cg = draw(st.sampled_from([1, 1, 2]))
        mult = draw(st.integers(1, 2))
        c_in, c_out = groups * cg, groups * mult
        k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        scope = (k[0] + draw(st.integers(0, 2)), k[1] + draw(st.integers(0, 2)))
        stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        hw = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        ho, wo = out_hw(hw, k, stride, padding, dilation)
        if ho < 1 or wo < 1:
            hw = (hw[0] + dilation[0] * (k[0] - 1) + 1, hw[1] + dilation[1] * (k[1] - 1) + 1)
        gk = draw(st.sampled_from([d for d in (1, 2, 3) if c_out % d == 0]))
        gi = draw(st.sampled_from([None] + [d for d in (1, 2) if c_in % d == 0]))
        return dict(n=draw(st.integers(1, 2)), c_in=c_in, c_out=c_out, hw=hw, k=k, scope=scope, groups=groups,
                    gk=gk, gi=gi, kernel=draw(st.sampled_from(["local", "global", None])),
                    mask=draw(st.booleans()), bias=draw(st.booleans()), stride=stride, padding=padding,
                    dilation=dilation), draw(st.sampled_from(["fractional", "integer", "half", "far"]))

    def _offsets(t, kind, gen):
        if t is None or kind == "fractional":
            return t
        if kind == "integer":  # exactly on scope cells / pixels: the kinks of the bilinear rule
            return torch.randint(-3, 4, t.shape, generator=gen).to(t.dtype)
        if kind == "half":
            return torch.randint(-6, 7, t.shape, generator=gen).to(t.dtype) / 2
        return t + torch.where(torch.rand(t.shape, generator=gen) < 0.5, -40.0, 40.0).to(t.dtype)  # far outside

    @settings(max_examples=10, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(configs(), st.integers(0, 2**16))
    def test_random_shapes_and_offsets_match_reference(cfg, seed):
        """Offsets exactly on cells and pixels sit on the kinks of the bilinear rule, where the kernels
        take the one-sided (right) derivative autograd gives floor(); the reference's grid_sample goes
        through normalised coordinates and may land on either side there, so for those draws it is
        evaluated 1e-10 to the right (values move by ~1e-10 * gradient)."""
        cfg, kind = cfg
        torch.manual_seed(seed)
        args, sizes = make(**cfg)
        gen = torch.Generator().manual_seed(seed)
        args[2] = _offsets(args[2], kind, gen)
        args[3] = _offsets(args[3], kind, gen)
        y_t, g_t, go = values_and_grads(call_triton, args, sizes)
        shift = 1e-10 if kind in ("integer", "half") else 0.0
        ref_args = [a + shift if a is not None and i in (2, 3) else a for i, a in enumerate(args)]
        y_r, g_r, _ = values_and_grads(call_reference, ref_args, sizes, go)
        names = ["output"] + [nm for nm, a in zip(NAMES, args) if a is not None]
        tol = 1e-8 if shift else 1e-9
        for nm, a, b in zip(names, (y_t,) + tuple(g_t), (y_r,) + tuple(g_r)):
            b = torch.zeros_like(a) if b is None else b
            torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{nm} ({kind} offsets): {m}")


# ---------------------------------------------------------------------------------------------
# Edge cases: batch 0, memory formats, every element written, tiling, batch chunks.

def test_batch_size_zero():
    args, sizes = make(n=0, gi=1, mask=True, groups=2, gk=2)
    leaves = [None if a is None else a.requires_grad_() for a in args]
    y = call_triton(leaves, sizes)
    assert y.shape == (0, 4, 6, 7)
    y.sum().backward()
    assert leaves[1].grad.shape == leaves[1].shape and torch.all(leaves[1].grad == 0)
    assert leaves[5].grad.shape == (4,) and torch.all(leaves[5].grad == 0)
    assert leaves[0].grad.shape == leaves[0].shape


@pytest.mark.parametrize("cfg", [dict(gi=1, mask=True, groups=2, gk=2), dict(groups=4, gi=2, mask=True)],
                         ids=_ids)
def test_non_contiguous_arguments(cfg):
    args, sizes = make(**cfg)
    nc = [
        args[0][:, :, :, :].transpose(2, 3).contiguous().transpose(2, 3),
        args[1].transpose(2, 3).contiguous().transpose(2, 3),
        args[2].transpose(2, 3).contiguous().transpose(2, 3),
        args[3].transpose(1, 3).contiguous().transpose(1, 3),
        args[4].transpose(2, 3).contiguous().transpose(2, 3),
        torch.stack([args[5], args[5]], 1)[:, 0],
    ]
    assert not any(t.is_contiguous() for t in nc)
    assert_parity(nc, sizes, tol=1e-9)


@pytest.mark.parametrize("cfg", [dict(groups=4, gi=1, mask=True), dict(groups=2, gk=2, kernel="global", gi=2)],
                         ids=_ids)
def test_channels_last_arguments_and_output_formats(cfg):
    """Channels-last arguments are read through their strides; outputs and gradients take their
    arguments' memory formats, as conv2d's (and the native kernels') do."""
    args, sizes = make(**cfg)
    cl = [a.to(memory_format=torch.channels_last) if a is not None and a.dim() == 4 and i != 1 else a
          for i, a in enumerate(args)]
    y, grads = assert_parity(cl, sizes, tol=1e-9)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    for a, g in zip([a for a in cl if a is not None], grads):
        if a.dim() == 4 and not a.is_contiguous():
            assert g.is_contiguous(memory_format=torch.channels_last), g.stride()
    plain_y, plain_g = values_and_grads(call_triton, args, sizes)[:2]
    assert plain_y.is_contiguous()


@pytest.mark.parametrize("cfg", [
    dict(n=1, c_in=4, c_out=8, groups=4, gk=2, gi=1, mask=True, hw=(5, 6)),       # depthwise multiplier 2
    dict(n=1, c_in=4, c_out=4, groups=4, gk=1, kernel="global", hw=(6, 5), stride=(2, 1)),
    dict(n=2, c_in=4, c_out=4, groups=2, gk=2, gi=2, mask=True, hw=(4, 5)),       # general, batch chunks
    dict(n=2, c_in=4, c_out=4, groups=2, gk=2, kernel="global", hw=(4, 5), gi=1),
], ids=_ids)
def test_multi_program_tiling_and_batch_chunks(cfg, monkeypatch):
    """Tiles smaller than the tensors (several programs per axis, partial edge tiles, several channel
    chunks per group) and a chunk budget that splits the batch of the general-groups path."""
    monkeypatch.setattr(_impl, "POISON", True)
    monkeypatch.setattr(_impl, "CHUNK_BUDGET", 1)
    monkeypatch.setattr(_impl, "BLOCKS", {k: (v if isinstance(v, int) else (2, 16)) for k, v in _impl.BLOCKS.items()}
                        | {"rows": 4})
    args, sizes = make(**cfg)
    assert_parity(args, sizes, tol=1e-9)


def test_gradcheck_tiny():
    args, sizes = make(n=1, c_in=1, c_out=1, groups=1, hw=(3, 3), k=(2, 2), scope=(3, 3), gi=1, mask=True,
                       scale=0.4)
    leaves = tuple(None if a is None else a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(lambda *a: call_triton(list(a), sizes), leaves, eps=1e-6, atol=1e-5,
                                    fast_mode=True)


def test_weight_gradient_is_deterministic():
    args, sizes = make(dtype=torch.float32, groups=4, gi=1, mask=True)
    _, g1, go = values_and_grads(call_triton, args, sizes)
    _, g2, _ = values_and_grads(call_triton, args, sizes, go)
    assert torch.equal(g1[1], g2[1])


# ---------------------------------------------------------------------------------------------
# torch.library: opcheck, torch.compile, torch.export (the CPU path's checks, on the Triton ops).

@pytest.mark.parametrize("cfg", [dict(c_in=2, c_out=2, groups=2, gi=1, mask=True),
                                 dict(c_in=2, c_out=2, groups=1, kernel="global")], ids=_ids)
def test_opcheck_forward_and_backward_ops(cfg):
    args, sizes = make(n=1, hw=(3, 3), k=(2, 2), scope=(3, 3), **cfg)
    fwd_args = tuple(None if a is None else a.requires_grad_() for a in args) + flat(sizes)
    torch.library.opcheck(torch.ops.dk_ops_triton.deform_kernel_conv2d.default, fwd_args)
    y = call_reference(args, sizes).detach()
    need = [True, True, args[2] is not None, args[3] is not None, args[4] is not None, args[5] is not None]
    bwd_args = (torch.randn_like(y),) + tuple(None if a is None else a.detach() for a in args[:5]) + flat(sizes) + (
        need,)
    torch.library.opcheck(torch.ops.dk_ops_triton._deform_kernel_conv2d_backward.default, bwd_args)


def test_torch_compile_fullgraph_forward_and_backward():
    from dk_ops.modules import DeformKernel2d

    torch._dynamo.reset()
    layer = DeformKernel2d(4, 4, 3, padding=1, groups=4).double()
    with torch.no_grad():
        layer.kernel_offset_generator.weight.normal_(0, 0.1)
    x = torch.randn(1, 4, 5, 5, dtype=D, requires_grad=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch.compile(layer, fullgraph=True, backend=record)(x)
    assert "dk_ops_triton.deform_kernel_conv2d" in graphs[0]
    torch._dynamo.reset()
    eager_y = layer(x)
    eager_g = torch.autograd.grad(eager_y.square().sum(), [x, layer.weight])
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    g = torch.autograd.grad(y.square().sum(), [x, layer.weight])
    torch.testing.assert_close(y, eager_y)
    for a, b in zip(g, eager_g):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


def test_torch_export_records_the_triton_op():
    import dk_ops.models as zoo

    model = zoo.create("study_net", op="dk", widths=(4, 8), num_classes=3).eval()
    x = torch.randn(1, 3, 16, 16)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("dk_ops_triton.deform_kernel_conv2d" in t for t in targets), targets
    torch.testing.assert_close(program.module()(x), model(x))


# ---------------------------------------------------------------------------------------------
# The GPU compiler accepts the kernels (no GPU: triton.compile down to a cubin, nothing runs).

def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """One specialization of every kernel (float32, a 1x2 kernel, the cases with the most features on)
    compiled for sm_90 by triton's own compiler and ptxas; `python -m dk_ops.triton.aot_check` compiles all of them
    for sm_80 and sm_90 in every dtype (minutes)."""
    code = (
        "import sys, torch; from dk_ops.triton import aot_check as a\n"
        "launches = a.record_launches(cases=[a.CASES[i] for i in (0, 1, 3, 5)], dtypes=[torch.float32],\n"
        "                             kernel_size=(1, 2))\n"
        "best = {}\n"
        "for name, sig, consts in launches:\n"
        "    score = sum(1 for v in consts.values() if v is True)\n"
        "    if name not in best or score > best[name][0]: best[name] = (score, (name, sig, consts))\n"
        "fails = a.compile_all([v[1] for v in best.values()], targets=(90,))\n"
        "print(len(best), 'kernels', fails); sys.exit(1 if fails or len(best) < 10 else 0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# The first-use self-check, run here on the CPU under the interpreter (on a GPU it checks each
# CUDA device), with the real kernels and with a deliberately broken one.

@pytest.fixture
def cpu_self_check(monkeypatch):
    from dk_ops.triton import selfcheck

    monkeypatch.setattr(selfcheck, "CHECKED_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.delenv("DK_OPS_SELF_CHECK", raising=False)
    selfcheck.reset()
    yield selfcheck
    selfcheck.reset()


class _Broken:
    """A dw_forward_kernel that launches the real kernel, then corrupts its output (argument 6)."""

    def __init__(self, real, fail=False):
        self.real, self.fail = real, fail

    def __getitem__(self, grid):
        def run(*args, **meta):
            if self.fail:
                raise RuntimeError("PTX JIT compilation failed (simulated)")
            self.real[grid](*args, **meta)
            args[6].add_(0.25)
        return run


def test_self_check_passes_with_the_real_kernels(cpu_self_check):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert cpu_self_check.passed("cpu")
    assert cpu_self_check.result("cpu")["ok"]
    assert "cpu passed" in dk_ops.backend_info()["triton"]


def test_a_broken_kernel_fails_the_self_check_warns_once_and_the_reference_runs(cpu_self_check, monkeypatch):
    import warnings

    kernels = _impl.kernels()
    monkeypatch.setattr(kernels, "dw_forward_kernel", _Broken(kernels.dw_forward_kernel))
    args, sizes = make(groups=4, gi=1, mask=True)
    op = torch.ops.dk_ops_triton.deform_kernel_conv2d
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    with pytest.warns(RuntimeWarning, match=r"Triton backend failed its self-check on cpu .*output relative error"):
        y = op(*leaves, *flat(sizes))
    y_r, g_r, go = values_and_grads(call_reference, args, sizes)
    torch.testing.assert_close(y, y_r, rtol=1e-12, atol=1e-12)  # the op computed the reference instead
    grads = torch.autograd.grad(y, [a for a in leaves if a is not None], go)
    for a, b in zip(grads, g_r):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # one warning per device, not per call
        op(*args, *flat(sizes))
    assert not cpu_self_check.result("cpu")["ok"]
    # DK_OPS_BACKEND=triton is forced: the public op refuses rather than running unchecked kernels
    with pytest.raises(RuntimeError, match="DK_OPS_BACKEND=triton .*self-check"):
        dk_ops.deform_kernel_conv2d(*args, **sizes)
    assert "FAILED" in dk_ops.backend_info()["triton"]


def test_a_kernel_that_raises_fails_the_self_check(cpu_self_check, monkeypatch):
    kernels = _impl.kernels()
    monkeypatch.setattr(kernels, "dw_forward_kernel", _Broken(kernels.dw_forward_kernel, fail=True))
    with pytest.warns(RuntimeWarning, match="self-check on cpu .*PTX JIT compilation failed"):
        assert not cpu_self_check.passed("cpu")


def test_self_check_off(cpu_self_check, monkeypatch):
    """DK_OPS_SELF_CHECK=0: no check; the (broken) kernels run as they are."""
    import warnings

    monkeypatch.setenv("DK_OPS_SELF_CHECK", "0")
    kernels = _impl.kernels()
    monkeypatch.setattr(kernels, "dw_forward_kernel", _Broken(kernels.dw_forward_kernel))
    args, sizes = make(groups=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        y = dk_ops.deform_kernel_conv2d(*args, **sizes)
    torch.testing.assert_close(y, call_reference(args, sizes) + 0.25)
    assert cpu_self_check.result("cpu") is None
    assert "self-check off" in dk_ops.backend_info()["triton"]


def test_first_call_inside_torch_compile():
    """A fresh process whose first dk_ops call is inside torch.compile(fullgraph=True): triton is
    imported while tracing, outside the graph (dk_ops.backend.load_triton is a constant to dynamo)."""
    code = (
        "import sys, torch, dk_ops\n"
        "assert not dk_ops.triton.status()['attempted']\n"
        "x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)\n"
        "w = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)\n"
        "f = torch.compile(lambda x, w: dk_ops.deform_kernel_conv2d(x, w, kernel_size=3, padding=1, groups=2),\n"
        "                  fullgraph=True, backend='aot_eager')\n"
        "y = f(x, w); y.sum().backward()\n"
        "ref = dk_ops.reference.deform_kernel_conv2d_reference(x, w, None, None, None, None, (3, 3), (1, 1),\n"
        "                                                      (1, 1), (1, 1), 2)\n"
        "torch.testing.assert_close(y, ref)\n"
        "from dk_ops.triton import _impl; assert _impl.LAUNCHES['dw_forward_kernel'] == 1, _impl.LAUNCHES\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", DK_OPS_BACKEND="triton")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
