"""Host side of the Triton backend: argument checks, buffers, grids and launches.

:func:`forward` and :func:`backward` have the semantics of the native ops
``dk_ops::deform_kernel_conv2d`` / ``_deform_kernel_conv2d_backward`` (same arguments, same
outputs, outputs in their arguments' memory formats, empty ``(0,)`` tensors for gradients not
asked for). Algorithms (those of ``dk_ops/csrc/deform_kernel_conv2d_impl.h``):

* depthwise (``C_in/groups == 1``), any kernel offsets (local, global, none), image offsets
  and mask: fused direct kernels, the input sampled on the fly (forward: one kernel; backward:
  a kernel-side kernel for the weight and kernel-offset gradients and an image-side kernel for
  the mask, image-offset and input gradients);
* general groups: input columns ``X (nb, C, K, L)`` built by a Triton gather kernel, then

  - kernel offsets constant over positions (global or none): the kernel sampled once per
    sample ``Wk`` (a Triton kernel) and ``y = Wk @ X`` (``torch.matmul``, cuBLAS on CUDA);
  - local kernel offsets: scattered columns ``Z = sum_t B_t X_t`` (a Triton kernel; no
    atomics: dense interpolation rows) and ``y = W @ Z`` per (conv group, kernel group)
    pair (``torch.matmul``);

  the backward mirrors each step (GEMMs by ``torch.matmul``, the rest by Triton kernels).

Accumulation: float32 for float16/bfloat16/float32 inputs, float64 for float64. Weight
gradients are deterministic (per-block partial sums reduced in a fixed order; one writer
per element in the general paths). The one use of atomics: the input gradient when image
offsets are given (a bilinear scatter, ``tl.atomic_add`` into a float32/float64 buffer).

Test hooks (module attributes): ``BLOCKS`` (tile sizes; tests shrink them to exercise
multi-program tiling and edge masks), ``POISON`` (fill every output and intermediate buffer
with NaN before the kernels run, so that an element no kernel writes shows up as NaN; also
``DK_OPS_TRITON_POISON=1``), ``LAUNCHES`` (a counter of kernel launches per kernel name).
"""
import importlib
import math
import os
from collections import Counter
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._utils import conv_out_size, memory_format_of

__all__ = ["forward", "backward", "kernels", "interpreting"]

# Tile sizes. Kernels using tl.dot (kernel_side) need BC >= 16 and BL >= 16 on a GPU.
BLOCKS = {
    "dw_forward": (8, 128),  # (channels, positions)
    "columns": (8, 128),
    "scatter": (4, 64),
    "kernel_side": (16, 64),
    "image_side": (16, 64),
    "rigid_input": (8, 128),
    "scattered_backward": (4, 64),
    "rows": 64,
}
POISON = os.environ.get("DK_OPS_TRITON_POISON", "") not in ("", "0")
LAUNCHES: Counter = Counter()
# Bytes of the per-chunk buffers of the general-groups path (columns, scattered columns).
CHUNK_BUDGET = 512 * 2**20

_TRUTHY = ("1", "true", "yes", "on", "y")
_kernels_module = None


def interpreting() -> bool:
    """Whether triton runs kernels through its interpreter (``TRITON_INTERPRET``, as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


def kernels():
    """The kernels module, (re)imported so that ``@triton.jit`` matches the current interpreter mode
    (triton decides between compiled and interpreted functions when the decorator runs)."""
    global _kernels_module
    if _kernels_module is None:
        _kernels_module = importlib.import_module("dk_ops.triton.kernels")
    if _kernels_module.INTERPRETED != interpreting():
        _kernels_module = importlib.reload(_kernels_module)
    return _kernels_module


def _launch(name: str, grid, *args, **meta):
    LAUNCHES[name] += 1
    getattr(kernels(), name)[grid](*args, **meta)


def _empty(shape, dtype, device, memory_format=torch.contiguous_format) -> Tensor:
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON and t.is_floating_point():
        t.fill_(float("nan"))
    return t




def _pow2(v: int) -> int:
    return 1 << max(0, int(v - 1).bit_length())


class _P:
    """Sizes of one call (impl.h's Params)."""

    def __init__(self, input, weight, dk, off, mask, kh, kw, sth, stw, ph, pw, dh, dw, groups):
        if input.dim() != 4 or weight.dim() != 4:
            raise ValueError(f"dk_ops (triton): input and weight must be 4-D, got {tuple(input.shape)} and "
                             f"{tuple(weight.shape)}")
        self.N, self.C, self.H, self.W = (int(v) for v in input.shape)
        self.Co, self.Cg, self.Sh, self.Sw = (int(v) for v in weight.shape)
        self.G = int(groups)
        if self.G < 1 or self.C % self.G or self.Co % self.G or self.Cg != self.C // self.G:
            raise ValueError(f"dk_ops (triton): weight {tuple(weight.shape)} does not match input "
                             f"{tuple(input.shape)} with groups={groups}")
        self.Cog = self.Co // self.G
        self.kh, self.kw = int(kh), int(kw)
        self.K = self.kh * self.kw
        self.S = self.Sh * self.Sw
        if not (1 <= self.kh <= self.Sh and 1 <= self.kw <= self.Sw):
            raise ValueError(f"dk_ops (triton): kernel_size ({kh}, {kw}) must be positive and fit the scope "
                             f"{(self.Sh, self.Sw)}")
        self.geom = (int(sth), int(stw), int(ph), int(pw), int(dh), int(dw))
        if min(sth, stw, dh, dw) < 1 or min(ph, pw) < 0:
            raise ValueError("dk_ops (triton): invalid stride/padding/dilation")
        self.Ho = conv_out_size(self.H, kh, sth, ph, dh)
        self.Wo = conv_out_size(self.W, kw, stw, pw, dw)
        if self.Ho < 1 or self.Wo < 1:
            raise ValueError("dk_ops (triton): input too small for the kernel")
        self.L = self.Ho * self.Wo
        self.has_dk = dk is not None
        self.local = self.has_dk and dk.dim() == 4
        self.Gk = 1
        if self.has_dk:
            if dk.dim() not in (2, 4) or dk.shape[0] != self.N or dk.shape[1] % (2 * self.K) or (
                    self.local and tuple(dk.shape[2:]) != (self.Ho, self.Wo)):
                raise ValueError(f"dk_ops (triton): bad kernel_offset shape {tuple(dk.shape)}")
            self.Gk = dk.shape[1] // (2 * self.K)
        if self.Gk < 1 or self.Co % self.Gk:
            raise ValueError("dk_ops (triton): kernel-offset groups must divide out_channels")
        self.Cok = self.Co // self.Gk
        self.has_off = off is not None
        self.Gi = 1
        if self.has_off:
            if off.dim() != 4 or off.shape[0] != self.N or off.shape[1] % (2 * self.K) or tuple(off.shape[2:]) != (
                    self.Ho, self.Wo):
                raise ValueError(f"dk_ops (triton): bad offset shape {tuple(off.shape)}")
            self.Gi = off.shape[1] // (2 * self.K)
        if self.Gi < 1 or self.C % self.Gi:
            raise ValueError("dk_ops (triton): offset groups must divide in_channels")
        self.Cig = self.C // self.Gi
        self.has_mask = mask is not None
        self.Gm = 1
        if self.has_mask:
            if mask.dim() != 4 or mask.shape[0] != self.N or mask.shape[1] % self.K or tuple(mask.shape[2:]) != (
                    self.Ho, self.Wo):
                raise ValueError(f"dk_ops (triton): bad mask shape {tuple(mask.shape)}")
            self.Gm = mask.shape[1] // self.K
        if self.Gm < 1 or self.C % self.Gm:
            raise ValueError("dk_ops (triton): mask groups must divide in_channels")
        self.Cmg = self.C // self.Gm
        # Fine image groups: each inside one offset group and one mask group.
        self.Gf = self.Gi * self.Gm // math.gcd(self.Gi, self.Gm)
        self.Cf = self.C // self.Gf
        self.SP = max(16, _pow2(self.S))
        self.Nk = self.N if self.has_dk else 1
        self.P = self.L if self.local else 1

    def pairs(self) -> List[Tuple[int, int, int, int]]:
        """(conv group, kernel-offset group, first and last+1 output channel) sharing output channels."""
        out = []
        for g in range(self.G):
            lo, hi = g * self.Cog, (g + 1) * self.Cog
            for gk in range(lo // self.Cok, (hi - 1) // self.Cok + 1):
                out.append((g, gk, max(lo, gk * self.Cok), min(hi, (gk + 1) * self.Cok)))
        return out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision: TF32 only for float32 where the user allowed it for matmuls (as cuBLAS does)."""
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _st(t: Optional[Tensor], n: int = 4) -> Tuple[int, ...]:
    """Strides of ``t`` padded to ``n`` (zeros for an absent tensor or a 2-D kernel offset)."""
    if t is None:
        return (0,) * n
    s = tuple(int(v) for v in t.stride())
    return s + (0,) * (n - len(s))


def _chunk(p: _P, elem: int) -> int:
    per = (2 * p.C * p.K + 2 * p.Cg * p.S + 2 * p.Co) * p.L * elem + 1
    return max(1, min(p.N, CHUNK_BUDGET // per))


class _device_guard:
    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _check_device(input: Tensor) -> None:
    if input.device.type == "cuda":
        return
    if input.device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"dk_ops (triton): Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, "
        f"the interpreter); got a {input.device.type} tensor")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------
# Forward.

def forward(input, weight, kernel_offset, offset, mask, bias, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
            dilation_h, dilation_w, groups) -> Tensor:
    p = _P(input, weight, kernel_offset, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
           dilation_h, dilation_w, groups)
    y = _empty((p.N, p.Co, p.Ho, p.Wo), input.dtype, input.device, memory_format_of(input))
    if p.N == 0:
        return y
    _check_device(input)
    with _device_guard(input.device):
        if p.Cg == 1:
            if _store_via_float32(input.dtype):
                y32 = _empty(tuple(y.shape), torch.float32, y.device, memory_format_of(input))
                _dw_forward(p, input, weight, kernel_offset, offset, mask, bias, y32)
                y.copy_(y32)
            else:
                _dw_forward(p, input, weight, kernel_offset, offset, mask, bias, y)
        else:
            _general_forward(p, input, weight, kernel_offset, offset, mask, bias, y)
    return y


def _store_via_float32(dtype: torch.dtype) -> bool:
    """Under the interpreter, kernels write bfloat16 results to a float32 buffer (converted by torch):
    the interpreter converts float32 to bfloat16 by truncation, a GPU rounds to nearest even."""
    return dtype == torch.bfloat16 and interpreting()


def _common_meta(p: _P, dtype: torch.dtype) -> dict:
    return dict(KH=p.kh, KW=p.kw, ACC=_tl_acc(dtype))


def _dw_forward(p, x, w, dk, off, mask, bias, y):
    BC, BL = BLOCKS["dw_forward"]
    grid = (_cdiv(p.L, BL), _cdiv(p.Co, BC), p.N)
    dummy = x
    _launch("dw_forward_kernel", grid,
            x, w, dk if dk is not None else dummy, off if off is not None else dummy,
            mask if mask is not None else dummy, bias if bias is not None else dummy, y,
            p.C, p.H, p.W, p.Co, p.Cog, p.Wo, p.L, p.Cok, p.Cig, p.Cmg, *p.geom,
            *_st(x), _st(w)[0], _st(w)[2], _st(w)[3], *_st(dk), *_st(off), *_st(mask), *_st(y),
            SH=p.Sh, SW=p.Sw, HAS_DK=p.has_dk, DK_LOCAL=p.local, HAS_OFF=p.has_off, HAS_MASK=p.has_mask,
            HAS_BIAS=bias is not None, BC=BC, BL=BL, **_common_meta(p, x.dtype))


def _columns(p, x, off, mask, n0, nb, acc) -> Tensor:
    cols = _empty((nb, p.C, p.K, p.L), acc, x.device)
    BC, BL = BLOCKS["columns"]
    _launch("columns_kernel", (_cdiv(p.L, BL), _cdiv(p.C, BC), nb),
            x, off if off is not None else x, mask if mask is not None else x, cols, n0,
            p.C, p.H, p.W, p.Wo, p.L, p.Cig, p.Cmg, *p.geom, *_st(x), *_st(off), *_st(mask),
            HAS_OFF=p.has_off, HAS_MASK=p.has_mask, BC=BC, BL=BL, **_common_meta(p, x.dtype))
    return cols


def _sampled_kernel(p, w, dk, acc) -> Tensor:
    """Wk (Nk, Co, Cg, K) for kernel offsets constant over positions."""
    wk = _empty((p.Nk, p.Co, p.Cg, p.K), acc, w.device)
    BR = BLOCKS["rows"]
    _launch("sample_kernel_kernel", (_cdiv(p.Co * p.Cg, BR), p.Nk),
            w, dk if dk is not None else w, wk, p.Co, p.Cg, p.Cok, *_st(w), *_st(dk, 2)[:2],
            SH=p.Sh, SW=p.Sw, HAS_DK=p.has_dk, BR=BR, **_common_meta(p, w.dtype))
    return wk


def _scattered(p, cols, dk, n0, nb, g, gk, acc) -> Tensor:
    z = _empty((nb, p.Cg * p.S, p.L), acc, cols.device)
    BC, BL = BLOCKS["scatter"]
    _launch("scatter_columns_kernel", (_cdiv(p.L, BL), _cdiv(p.Cg, BC), nb),
            cols, dk, z, n0, g, gk, p.C, p.Cg, p.Wo, p.L, *_st(dk),
            SH=p.Sh, SW=p.Sw, SP=_pow2(p.S), BC=BC, BL=BL, **_common_meta(p, dk.dtype))
    return z


def _general_forward(p, x, w, dk, off, mask, bias, y):
    acc = _acc_dtype(x.dtype)
    out = _empty((p.N, p.Co, p.L), acc, x.device)
    w_acc = w.to(acc).reshape(p.Co, p.Cg * p.S)
    wk = _sampled_kernel(p, w, dk, acc).view(p.Nk, p.G, p.Cog, p.Cg * p.K) if p.P == 1 else None
    step = _chunk(p, torch.finfo(acc).bits // 8)
    for n0 in range(0, p.N, step):
        nb = min(step, p.N - n0)
        cols = _columns(p, x, off, mask, n0, nb, acc)
        if p.P == 1:
            wkc = wk if p.Nk == 1 else wk[n0:n0 + nb]
            out[n0:n0 + nb].view(nb, p.G, p.Cog, p.L).copy_(torch.matmul(wkc, cols.view(nb, p.G, p.Cg * p.K, p.L)))
        else:
            for g, gk, lo, hi in p.pairs():
                z = _scattered(p, cols, dk, n0, nb, g, gk, acc)
                out[n0:n0 + nb, lo:hi].copy_(torch.matmul(w_acc[lo:hi], z))
    if bias is not None:
        out += bias.to(acc).view(1, p.Co, 1)
    y.copy_(out.view(p.N, p.Co, p.Ho, p.Wo))


# ---------------------------------------------------------------------------------------------
# Backward.

def backward(grad, input, weight, kernel_offset, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h,
             pad_w, dilation_h, dilation_w, groups, output_mask: Sequence[bool]):
    p = _P(input, weight, kernel_offset, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
           dilation_h, dilation_w, groups)
    dtype, dev = input.dtype, input.device
    acc = _acc_dtype(dtype)
    need_in, need_w = bool(output_mask[0]), bool(output_mask[1])
    need_dk = bool(output_mask[2]) and p.has_dk
    need_off = bool(output_mask[3]) and p.has_off
    need_mask = bool(output_mask[4]) and p.has_mask
    need_b = bool(output_mask[5])
    if tuple(grad.shape) != (p.N, p.Co, p.Ho, p.Wo):
        raise ValueError(f"dk_ops (triton): grad has shape {tuple(grad.shape)}, expected {(p.N, p.Co, p.Ho, p.Wo)}")

    g_in = g_w = g_dk = g_off = g_mask = None
    if p.N == 0:
        g_in = torch.zeros_like(input, memory_format=memory_format_of(input)) if need_in else None
        g_w = torch.zeros_like(weight, memory_format=memory_format_of(weight)) if need_w else None
        g_dk = torch.zeros_like(kernel_offset, memory_format=memory_format_of(kernel_offset)) if need_dk else None
        g_off = torch.zeros_like(offset, memory_format=memory_format_of(offset)) if need_off else None
        g_mask = torch.zeros_like(mask, memory_format=memory_format_of(mask)) if need_mask else None
    elif need_in or need_w or need_dk or need_off or need_mask:
        _check_device(input)
        with _device_guard(dev):
            if p.Cg == 1:
                g_in, g_w, g_dk, g_off, g_mask = _dw_backward(p, grad, input, weight, kernel_offset, offset, mask,
                                                              need_in, need_w, need_dk, need_off, need_mask)
            else:
                g_in, g_w, g_dk, g_off, g_mask = _general_backward(p, grad, input, weight, kernel_offset, offset,
                                                                   mask, need_in, need_w, need_dk, need_off,
                                                                   need_mask)

    def fmt(g, arg):
        if g is None:
            return input.new_empty((0,))  # a fresh tensor each: outputs must not alias
        return g.to(dtype).contiguous(memory_format=memory_format_of(arg))

    g_b = grad.to(acc).sum(dim=(0, 2, 3)).to(dtype) if need_b else input.new_empty((0,))
    return (fmt(g_in, input), fmt(g_w, weight), fmt(g_dk, kernel_offset), fmt(g_off, offset), fmt(g_mask, mask),
            g_b)


def _input_grad_buffer(p, x, acc):
    """With image offsets: a zeroed accumulation buffer for the atomic scatter; else the result itself."""
    if p.has_off:
        return torch.zeros((p.N, p.C, p.H, p.W), dtype=acc, device=x.device)
    dtype = torch.float32 if _store_via_float32(x.dtype) else x.dtype
    return _empty(tuple(x.shape), dtype, x.device, memory_format_of(x))


def _image_side(p, x, off, mask, gx, w, dk, gy, gin, n0, nb, need_in, need_off, need_mask, acc):
    """Mask / image-offset partial sums (reduced here) and the scatter of the input gradient."""
    BC, BL = BLOCKS["image_side"]
    BC = min(BC, _pow2(p.Cf))
    nj = _cdiv(p.Cf, BC)
    pof = _empty((nb, p.Gf, nj, p.K, 2, p.L), acc, x.device) if need_off else None
    pmk = _empty((nb, p.Gf, nj, p.K, p.L), acc, x.device) if need_mask else None
    dummy = x
    _launch("image_side_kernel", (_cdiv(p.L, BL), p.Gf * nj, nb),
            x, off if off is not None else dummy, mask if mask is not None else dummy,
            gx if gx is not None else dummy, w, dk if dk is not None else dummy, gy,
            gin if gin is not None else dummy, pof if pof is not None else dummy, pmk if pmk is not None else dummy,
            n0, p.C, p.H, p.W, p.Cog, p.Wo, p.L, p.Cok, p.Cf, p.Cig, p.Cmg, p.Gf, nj, *p.geom,
            *_st(x), _st(w)[0], _st(w)[2], _st(w)[3], *_st(dk), *_st(off), *_st(mask), *_st(gy), *_st(gin),
            SH=p.Sh, SW=p.Sw, HAS_DK=p.has_dk, DK_LOCAL=p.local, HAS_OFF=p.has_off, HAS_MASK=p.has_mask,
            GX_GIVEN=gx is not None, NEED_IN=need_in and p.has_off, NEED_OFF=need_off, NEED_MASK=need_mask,
            BC=BC, BL=BL, **_common_meta(p, x.dtype))
    g_off = g_mask = None
    if need_off:  # fine groups -> offset groups, then the chunks: a fixed order
        g_off = pof.view(nb, p.Gi, (p.Gf // p.Gi) * nj, p.K, 2, p.L).sum(2).view(nb, 2 * p.Gi * p.K, p.Ho, p.Wo)
    if need_mask:
        g_mask = pmk.view(nb, p.Gm, (p.Gf // p.Gm) * nj, p.K, p.L).sum(2).view(nb, p.Gm * p.K, p.Ho, p.Wo)
    return g_off, g_mask


def _rigid_input(p, gx, w, dk, gy, mask, gin, n0, nb, dtype):
    BC, BP = BLOCKS["rigid_input"]
    dummy = gin
    _launch("rigid_input_grad_kernel", (_cdiv(p.H * p.W, BP), _cdiv(p.C, BC), nb),
            gx if gx is not None else dummy, w, dk if dk is not None else dummy, gy,
            mask if mask is not None else dummy, gin, n0,
            p.C, p.H, p.W, p.Ho, p.Wo, p.L, p.Cog, p.Cok, p.Cmg, *p.geom,
            _st(w)[0], _st(w)[2], _st(w)[3], *_st(dk), *_st(gy), *_st(mask), *_st(gin),
            SH=p.Sh, SW=p.Sw, HAS_DK=p.has_dk, DK_LOCAL=p.local, HAS_MASK=p.has_mask, GX_GIVEN=gx is not None,
            BC=BC, BP=BP, **_common_meta(p, dtype))


def _dw_backward(p, gy, x, w, dk, off, mask, need_in, need_w, need_dk, need_off, need_mask):
    acc = _acc_dtype(x.dtype)
    g_in = g_w = g_dk = g_off = g_mask = None
    if need_w or need_dk:
        BC, BL = BLOCKS["kernel_side"]
        nj = _cdiv(p.Cok, BC)
        nlb = _cdiv(p.L, BL)
        pw = _empty((p.Co, p.N, nlb, p.S), acc, x.device) if need_w else None
        if need_dk:
            shape = (p.N, p.Gk, nj, p.K, 2, p.L) if p.local else (p.N, p.Gk, nj, nlb, p.K, 2)
            pdk = _empty(shape, acc, x.device)
        else:
            pdk = None
        dummy = x
        _launch("dw_kernel_side_kernel", (nlb, p.Gk * nj, p.N),
                x, w, dk if dk is not None else dummy, off if off is not None else dummy,
                mask if mask is not None else dummy, gy, pw if pw is not None else dummy,
                pdk if pdk is not None else dummy,
                p.N, p.H, p.W, p.Cog, p.Wo, p.L, p.Gk, p.Cok, p.Cig, p.Cmg, nj, nlb, *p.geom,
                *_st(x), _st(w)[0], _st(w)[2], _st(w)[3], *_st(dk), *_st(off), *_st(mask), *_st(gy),
                SH=p.Sh, SW=p.Sw, SP=p.SP, HAS_DK=p.has_dk, DK_LOCAL=p.local, HAS_OFF=p.has_off,
                HAS_MASK=p.has_mask, NEED_W=need_w, NEED_DK=need_dk, DOT_PREC=_dot_precision(x.dtype),
                BC=BC, BL=BL, **_common_meta(p, x.dtype))
        if need_w:
            g_w = pw.sum(dim=(1, 2)).view(p.Co, 1, p.Sh, p.Sw)
        if need_dk:
            if p.local:
                g_dk = pdk.sum(2).view(p.N, 2 * p.Gk * p.K, p.Ho, p.Wo)
            else:
                g_dk = pdk.sum(dim=(2, 3)).view(p.N, 2 * p.Gk * p.K)
    gin = None
    if need_in:
        gin = _input_grad_buffer(p, x, acc)
    if need_off or need_mask or (need_in and p.has_off):
        g_off, g_mask = _image_side(p, x, off, mask, None, w, dk, gy, gin, 0, p.N, need_in, need_off, need_mask,
                                    acc)
    if need_in and not p.has_off:
        _rigid_input(p, None, w, dk, gy, mask, gin, 0, p.N, x.dtype)
    g_in = gin
    return g_in, g_w, g_dk, g_off, g_mask


def _general_backward(p, grad, x, w, dk, off, mask, need_in, need_w, need_dk, need_off, need_mask):
    acc = _acc_dtype(x.dtype)
    dev = x.device
    need_gx = need_in or need_off or need_mask
    w_acc = w.to(acc).reshape(p.Co, p.Cg * p.S)
    wk = _sampled_kernel(p, w, dk, acc).view(p.Nk, p.G, p.Cog, p.Cg * p.K) if p.P == 1 else None
    g_w = torch.zeros((p.Co, p.Cg, p.Sh, p.Sw), dtype=acc, device=dev) if need_w else None
    if need_dk:
        g_dk = (torch.zeros((p.N, 2 * p.Gk * p.K, p.L), dtype=acc, device=dev) if p.local
                else _empty((p.N, 2 * p.Gk * p.K), acc, dev))
    else:
        g_dk = None
    g_off = _empty((p.N, 2 * p.Gi * p.K, p.Ho, p.Wo), acc, dev) if need_off else None
    g_mask = _empty((p.N, p.Gm * p.K, p.Ho, p.Wo), acc, dev) if need_mask else None
    gin = _input_grad_buffer(p, x, acc) if need_in else None
    BR = BLOCKS["rows"]
    meta = _common_meta(p, x.dtype)
    step = _chunk(p, torch.finfo(acc).bits // 8)
    for n0 in range(0, p.N, step):
        nb = min(step, p.N - n0)
        gy = grad[n0:n0 + nb].to(acc).reshape(nb, p.Co, p.L)
        cols = _columns(p, x, off, mask, n0, nb, acc)
        gx = None
        if p.P == 1:
            gy4 = gy.view(nb, p.G, p.Cog, p.L)
            x4 = cols.view(nb, p.G, p.Cg * p.K, p.L)
            if need_w or need_dk:
                gwk = torch.matmul(gy4, x4.transpose(-1, -2))  # (nb, G, Cog, Cg*K) = (nb, Co, Cg, K)
                if need_w:
                    src = gwk.sum(0, keepdim=True) if not p.has_dk else gwk
                    src = src.contiguous()
                    _launch("sampled_kernel_weight_grad_kernel", (_cdiv(p.Co * p.Cg, BR),),
                            src, dk if dk is not None else src, g_w, n0, src.shape[0], p.Co, p.Cg, p.Cok,
                            *_st(dk, 2)[:2], SH=p.Sh, SW=p.Sw, SP=p.SP, HAS_DK=p.has_dk, BR=BR, **meta)
                if need_dk:
                    gwk = gwk.contiguous()
                    _launch("sampled_kernel_offset_grad_kernel", (p.Gk, nb),
                            gwk, w, dk, g_dk, n0, p.Co, p.Cg, p.Cok, p.Gk, *_st(w), *_st(dk, 2)[:2],
                            SH=p.Sh, SW=p.Sw, SP=p.SP, BR=BR, **meta)
            if need_gx:
                wkc = wk if p.Nk == 1 else wk[n0:n0 + nb]
                gx = torch.matmul(wkc.transpose(-1, -2), gy4).reshape(nb, p.C, p.K, p.L).contiguous()
        else:
            gx = torch.zeros((nb, p.C, p.K, p.L), dtype=acc, device=dev) if need_gx else None
            BC, BL = BLOCKS["scattered_backward"]
            for g, gk, lo, hi in p.pairs():
                gyo = gy[:, lo:hi]
                if need_w:
                    z = _scattered(p, cols, dk, n0, nb, g, gk, acc)
                    g_w[lo:hi] += torch.matmul(gyo, z.transpose(-1, -2)).sum(0).view(hi - lo, p.Cg, p.Sh, p.Sw)
                    del z
                if need_gx or need_dk:
                    gz = torch.matmul(w_acc[lo:hi].t(), gyo).contiguous()  # (nb, Cg*S, L)
                    _launch("scattered_backward_kernel", (_cdiv(p.L, BL), nb),
                            gz, cols, dk, gx if gx is not None else gz, g_dk if g_dk is not None else gz, n0, g, gk,
                            p.Gk, p.C, p.Cg, p.Wo, p.L, *_st(dk),
                            SH=p.Sh, SW=p.Sw, SP=_pow2(p.S), NEED_GX=need_gx, NEED_DK=need_dk, BC=BC, BL=BL, **meta)
        if need_off or need_mask or (need_in and p.has_off):
            go, gm = _image_side(p, x, off, mask, gx, w, dk, grad, gin, n0, nb, need_in, need_off, need_mask, acc)
            if need_off:
                g_off[n0:n0 + nb] = go
            if need_mask:
                g_mask[n0:n0 + nb] = gm
        if need_in and not p.has_off:
            _rigid_input(p, gx, w, dk, grad, mask, gin, n0, nb, x.dtype)
    if g_dk is not None and p.local:
        g_dk = g_dk.view(p.N, 2 * p.Gk * p.K, p.Ho, p.Wo)
    return gin, g_w, g_dk, g_off, g_mask
