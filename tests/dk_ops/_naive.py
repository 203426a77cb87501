"""An independent, scalar nested-loop statement of docs/design.md section 2 (the test oracle).

Deliberately written from the specification text with plain Python loops and no
code shared with dk_ops, so that it can catch layout and indexing mistakes.
"""
import math

import numpy as np


def bilinear(plane, y, x):
    """Four-corner blend at (y, x); corners outside the plane count as zero."""
    h, w = plane.shape
    if y <= -1 or y >= h or x <= -1 or x >= w:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * plane[yy, xx]
    return total


def naive_deform_kernel_conv2d(x, weight, kernel_offset=None, offset=None, mask=None, bias=None, *,
                               kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    n, c_in, h, w = x.shape
    c_out, cg, sh, sw = weight.shape
    kh, kw = kernel_size
    K = kh * kw
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    gk = 1 if kernel_offset is None else kernel_offset.shape[1] // (2 * K)
    gi = None if offset is None else offset.shape[1] // (2 * K)
    gm = None if mask is None else mask.shape[1] // K
    out = np.zeros((n, c_out, ho, wo))
    for b in range(n):
        for o in range(c_out):
            g = o // (c_out // groups)
            kg = o // (c_out // gk)
            for oh in range(ho):
                for ow in range(wo):
                    acc = 0.0 if bias is None else float(bias[o])
                    for ci in range(cg):
                        c = g * cg + ci
                        for i in range(kh):
                            for j in range(kw):
                                t = i * kw + j
                                dy = dx = 0.0
                                if kernel_offset is not None:
                                    ch = 2 * (kg * K + t)
                                    if kernel_offset.ndim == 2:
                                        dy, dx = kernel_offset[b, ch], kernel_offset[b, ch + 1]
                                    else:
                                        dy, dx = kernel_offset[b, ch, oh, ow], kernel_offset[b, ch + 1, oh, ow]
                                u = (sh - kh) / 2 + i + dy
                                v = (sw - kw) / 2 + j + dx
                                kval = bilinear(weight[o, ci], u, v)
                                py = oh * stride[0] - padding[0] + i * dilation[0]
                                px = ow * stride[1] - padding[1] + j * dilation[1]
                                if offset is not None:
                                    ig = c // (c_in // gi)
                                    ch = 2 * (ig * K + t)
                                    py += offset[b, ch, oh, ow]
                                    px += offset[b, ch + 1, oh, ow]
                                xval = bilinear(x[b, c], py, px)
                                if mask is not None:
                                    mg = c // (c_in // gm)
                                    xval *= mask[b, mg * K + t, oh, ow]
                                acc += kval * xval
                    out[b, o, oh, ow] = acc
    return out
