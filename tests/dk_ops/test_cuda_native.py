"""Native CUDA kernels against the reference path (run by scripts/gpu_check.sh; skipped without a GPU).

Tolerances: float64 1e-9 (values and gradients); float32 1e-4 relative to the output's scale
(GEMMs may use TF32 only if the user enabled it; the suite disables it); float16 / bfloat16
against the float32 reference on the same rounded inputs: 1e-2 / 5e-2 of the scale.
"""
import pytest
import torch

from tests.dk_ops.test_native import GRID, _ids, call_native, call_reference, flat, make, values_and_grads

pytestmark = pytest.mark.cuda

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def native_cuda():
    if not CUDA:
        pytest.skip("no CUDA device")
    from dk_ops import backend, _native

    assert backend.load_native(), backend.backend_info()
    assert _native.has_cuda(), backend.backend_info()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def to(args, device, dtype=None):
    return [None if a is None else a.to(device=device, dtype=dtype or a.dtype) for a in args]


def compare(args, sizes, dtype, tol):
    """CUDA native in `dtype` against the reference on the CPU in float64 (inputs rounded to dtype first)."""
    low = to(args, "cpu", dtype)
    y_c, g_c, go = values_and_grads(call_native, to(low, "cuda"), sizes)
    ref_in = to(low, "cpu", torch.float64)
    y_r, g_r, _ = values_and_grads(call_reference, ref_in, sizes, go.cpu().double())
    scale = max(y_r.abs().max().item(), 1e-6)
    torch.testing.assert_close(y_c.cpu().double(), y_r, rtol=tol, atol=tol * scale)
    names = [nm for nm, a in zip(["input", "weight", "kernel_offset", "offset", "mask", "bias"], args) if a is not None]
    for nm, a, b in zip(names, g_c, g_r):
        if b is None:
            b = torch.zeros_like(a, device="cpu", dtype=torch.float64)
        s = max(b.abs().max().item(), 1e-6)
        torch.testing.assert_close(a.cpu().double(), b, rtol=tol, atol=tol * s, msg=lambda m: f"grad {nm}: {m}")


@pytest.mark.parametrize("cfg", GRID, ids=_ids)
def test_cuda_parity_float64(cfg):
    args, sizes = make(**cfg)
    compare(args, sizes, torch.float64, 1e-9)


@pytest.mark.parametrize("cfg", GRID, ids=_ids)
def test_cuda_parity_float32(cfg):
    args, sizes = make(**cfg)
    compare(args, sizes, torch.float32, 1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("cfg", [dict(), dict(groups=2, gk=2, gi=2, mask=True), dict(groups=4, kernel="global"),
                                 dict(groups=1, c_out=6, gk=3, gi=2, scope=(5, 3), k=(3, 2))], ids=_ids)
def test_cuda_reduced_precision_against_float32(cfg, dtype, tol):
    args, sizes = make(scale=0.7, **cfg)
    compare(args, sizes, dtype, tol)


@pytest.mark.parametrize("cfg", [dict(), dict(groups=2, gk=2, gi=2, mask=True), dict(kernel="global", groups=4),
                                 dict(kernel=None, mask=True, bias=False)], ids=_ids)
def test_cuda_opcheck(cfg):
    args, sizes = make(n=1, hw=(5, 4), **cfg)
    args = to(args, "cuda")
    fwd = tuple(None if a is None else a.requires_grad_() for a in args) + flat(sizes)
    torch.library.opcheck(torch.ops.dk_ops.deform_kernel_conv2d.default, fwd)
    y = call_native(args, sizes).detach()
    need = [True, True, args[2] is not None, args[3] is not None, args[4] is not None, args[5] is not None]
    bwd = (torch.randn_like(y),) + tuple(None if a is None else a.detach() for a in args[:5]) + flat(sizes) + (need,)
    torch.library.opcheck(torch.ops.dk_ops._deform_kernel_conv2d_backward.default, bwd)


@pytest.mark.parametrize("cfg", [dict(gi=1, mask=True), dict(groups=2, gk=2, kernel="global"), dict(groups=4, gi=2)],
                         ids=_ids)
def test_cuda_gradcheck_float64(cfg):
    args, sizes = make(n=1, hw=(4, 5), scale=0.4, **cfg)
    args = [None if a is None else a.cuda().requires_grad_() for a in args]
    live = [i for i, a in enumerate(args) if a is not None]

    def fn(*ts):
        full = list(args)
        for i, t in zip(live, ts):
            full[i] = t
        return call_native(full, sizes)

    assert torch.autograd.gradcheck(fn, [args[i] for i in live], eps=1e-6, atol=1e-6)


def test_cuda_on_a_side_stream():
    """The kernels run on the current (here a non-default) stream."""
    args, sizes = make(n=5, c_in=8, c_out=8, groups=8, hw=(9, 9), gi=2, mask=True)
    expected = call_reference(args, sizes)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = call_native(to(args, "cuda"), sizes)
    stream.synchronize()
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-9, atol=1e-9)
