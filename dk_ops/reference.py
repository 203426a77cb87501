"""Pure-PyTorch reference implementation of the deformable-kernel convolution.

This is the numerical oracle for the native kernels: it follows docs/design.md section 2
literally and lets autograd differentiate it with respect to every tensor
argument. It is vectorised (``unfold``/``grid_sample`` for the input, an
interpolation matrix for the kernel, one contraction) but makes no attempt at
being memory-lean: it materialises the sampled input columns ``(N, C_in, K, L)``
and the sampled kernel ``(N, C_out, C_in/groups, K, L)`` (``K = k_h*k_w`` taps,
``L = H_out*W_out`` positions; the kernel drops ``N`` and/or ``L`` when its
offsets do not depend on them).

Arguments are assumed validated by :func:`dk_ops.deform_kernel_conv2d`.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._utils import conv_out_size

__all__ = ["deform_kernel_conv2d_reference", "bilinear_corners", "sample_kernel", "tap_grid"]


def bilinear_corners(py: Tensor, px: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor]:
    """Four-corner bilinear sampling coefficients of a ``height x width`` plane.

    Returns ``(index, weight)``, both of shape ``py.shape + (4,)``: the flat index
    ``y * width + x`` of each corner (clamped into the plane so that it can be
    used for gathering) and its weight, which is zero for corners outside the
    plane. Sampling is therefore zero when ``py <= -1``, ``py >= height``,
    ``px <= -1`` or ``px >= width``, as docs/design.md section 2 specifies.
    """
    y0 = torch.floor(py)
    x0 = torch.floor(px)
    ly = py - y0
    lx = px - x0
    hy, hx = 1 - ly, 1 - lx
    ys = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
    xs = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)
    weight = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=-1)
    inside = (ys >= 0) & (ys <= height - 1) & (xs >= 0) & (xs <= width - 1)
    weight = weight * inside.to(weight.dtype)
    index = ys.clamp(0, height - 1).long() * width + xs.clamp(0, width - 1).long()
    return index, weight


def tap_grid(kh: int, kw: int, dtype, device) -> Tuple[Tensor, Tensor]:
    """Row and column index (i, j) of each tap t = i*kw + j, shape (K,)."""
    i = torch.arange(kh, dtype=dtype, device=device).repeat_interleave(kw)
    j = torch.arange(kw, dtype=dtype, device=device).repeat(kh)
    return i, j


def sample_kernel(weight: Tensor, kernel_offset: Optional[Tensor], kernel_size: Tuple[int, int]) -> Tensor:
    """Bilinearly resample the scope weight at the (offset) kernel grid.

    ``weight`` is ``(C_out, C_in/groups, S_h, S_w)``. Returns the sampled kernel of
    shape ``(n, C_out, C_in/groups, K, P)`` where ``(n, P) = (1, 1)`` without
    offsets, ``(N, 1)`` for global offsets ``(N, 2*G_k*K)`` and ``(N, L)`` for
    local offsets ``(N, 2*G_k*K, H_out, W_out)``.

    Resampling is linear in the scope: a dense interpolation matrix
    ``B[n, g, t, p, s]`` (at most four non-zeros per row) times the scope cells
    ``W[o, c, s]``, one batched matrix product per kernel-offset group.
    """
    c_out, cg, sh, sw = weight.shape
    kh, kw = kernel_size
    K = kh * kw
    i, j = tap_grid(kh, kw, weight.dtype, weight.device)
    u0 = (sh - kh) / 2 + i  # (K,)
    v0 = (sw - kw) / 2 + j
    if kernel_offset is None:
        n, gk, P = 1, 1, 1
        u = u0.view(1, 1, K, 1)
        v = v0.view(1, 1, K, 1)
    else:
        n = kernel_offset.shape[0]
        gk = kernel_offset.shape[1] // (2 * K)
        P = 1 if kernel_offset.dim() == 2 else kernel_offset.shape[2] * kernel_offset.shape[3]
        dk = kernel_offset.reshape(n, gk, K, 2, P)
        u = u0.view(1, 1, K, 1) + dk[:, :, :, 0]
        v = v0.view(1, 1, K, 1) + dk[:, :, :, 1]
    index, corner_w = bilinear_corners(u, v, sh, sw)  # (n, gk, K, P, 4)
    interp = corner_w.new_zeros(n, gk, K, P, sh * sw).scatter_add(-1, index, corner_w)
    cells = weight.reshape(gk, c_out // gk, cg, sh * sw).reshape(gk, (c_out // gk) * cg, sh * sw)
    sampled = torch.einsum("ngkps,gms->ngmkp", interp, cells)  # (n, gk, Co/gk * Cg, K, P)
    return sampled.reshape(n, c_out, cg, K, P)


def _sample_input(
    x: Tensor,
    offset: Optional[Tensor],
    mask: Optional[Tensor],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    out_size: Tuple[int, int],
) -> Tensor:
    """Sampled input columns ``(N, C_in, K, L)``, modulated by ``mask`` when given."""
    n, c, h, w = x.shape
    kh, kw = kernel_size
    ho, wo = out_size
    K, L = kh * kw, ho * wo
    if offset is None:
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
        cols = cols.reshape(n, c, K, L)
    else:
        gi = offset.shape[1] // (2 * K)
        i, j = tap_grid(kh, kw, x.dtype, x.device)
        hs = torch.arange(ho, dtype=x.dtype, device=x.device) * stride[0] - padding[0]
        ws = torch.arange(wo, dtype=x.dtype, device=x.device) * stride[1] - padding[1]
        py0 = (i * dilation[0]).view(K, 1, 1) + hs.view(1, ho, 1)  # (K, Ho, 1)
        px0 = (j * dilation[1]).view(K, 1, 1) + ws.view(1, 1, wo)  # (K, 1, Wo)
        off = offset.reshape(n, gi, K, 2, ho, wo)
        py = py0 + off[:, :, :, 0]  # (N, Gi, K, Ho, Wo), in input pixels
        px = px0 + off[:, :, :, 1]
        # grid_sample's bilinear mode with zero padding is exactly the four-corner rule with
        # outside corners counting as zero; align_corners=False maps pixel p to (2p + 1)/size - 1.
        grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
        grid = grid.reshape(n * gi, K * ho, wo, 2)
        planes = x.reshape(n * gi, c // gi, h, w)
        cols = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        cols = cols.reshape(n, c, K, L)
    if mask is not None:
        gm = mask.shape[1] // K
        cols = (cols.reshape(n, gm, c // gm, K, L) * mask.reshape(n, gm, 1, K, L)).reshape(n, c, K, L)
    return cols


def deform_kernel_conv2d_reference(
    input: Tensor,
    weight: Tensor,
    kernel_offset: Optional[Tensor],
    offset: Optional[Tensor],
    mask: Optional[Tensor],
    bias: Optional[Tensor],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
) -> Tensor:
    """Reference forward of :func:`dk_ops.deform_kernel_conv2d` (validated arguments)."""
    orig_dtype = input.dtype
    if orig_dtype in (torch.float16, torch.bfloat16):
        # Reduced precision: compute (and accumulate) in float32, return in the input dtype.
        up = [t.float() if t is not None else None for t in (input, weight, kernel_offset, offset, mask, bias)]
        out = deform_kernel_conv2d_reference(*up, kernel_size, stride, padding, dilation, groups)
        return out.to(orig_dtype)

    n, c_in, h, w = input.shape
    c_out, cg = weight.shape[0], weight.shape[1]
    kh, kw = kernel_size
    ho = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    wo = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    K, L = kh * kw, ho * wo

    cols = _sample_input(input, offset, mask, kernel_size, stride, padding, dilation, (ho, wo))
    cols = cols.reshape(n, groups, cg, K, L)
    kernel = sample_kernel(weight, kernel_offset, kernel_size)  # (n', C_out, Cg, K, P)
    kernel = kernel.reshape(kernel.shape[0], groups, c_out // groups, cg, K, kernel.shape[-1])

    if kernel_offset is None:
        out = torch.einsum("goct,ngctl->ngol", kernel[0, ..., 0], cols)
    elif kernel_offset.dim() == 2:
        out = torch.einsum("ngoct,ngctl->ngol", kernel[..., 0], cols)
    else:
        # A plain broadcast product and sum: einsum's bmm plan for this pattern is ~80x slower on CPU.
        out = (kernel * cols.unsqueeze(2)).sum(dim=(3, 4))
    out = out.reshape(n, c_out, ho, wo)
    if bias is not None:
        out = out + bias.view(1, c_out, 1, 1)
    return out
