"""Triton kernels of ``deform_kernel_conv2d`` (DESIGN section 2; the algorithms of
``dk_ops/csrc/deform_kernel_conv2d_impl.h``).

Imported lazily by :mod:`dk_ops.triton._impl` (``import dk_ops`` never imports triton).
``@triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported; ``_impl`` reloads
the module when the mode changed since (see ``_impl.kernels``).

Sizes: input (N, C, H, W); scope weight (Co, Cg, SH, SW), S = SH*SW cells; kernel
(KH, KW), K = KH*KW taps; output (N, Co, Ho, Wo), L = Ho*Wo positions. Kernel offsets
have Gk groups over output channels (Cok = Co/Gk each); image offsets Gi groups
(Cig = C/Gi) and the mask Gm groups (Cmg = C/Gm) over input channels.

Sampling: four-corner bilinear with corners outside the plane counting as zero
(``_bilinear``, floor-based, its derivative is the one autograd gives the reference).
The same weights written as a tensor product of hat functions, ``hat(u - sy) * hat(v - sx)``
for scope cell (sy, sx), give dense interpolation rows over all S cells (``_hat``,
``_dhat``: the right derivative, equal to the floor-based one); they turn the scatter of
kernel corners into plain reductions (no atomics) for the weight gradient and the
scattered columns.

Every tensor argument is read through its strides (non-contiguous and channels-last
inputs need no copy); internal buffers are contiguous. Offsets of whole tensors are
formed in int64.

Only APIs present in triton 3.6 are used (tl.dot with input_precision/out_dtype,
tl.static_range, tl.atomic_add, tl.trans); nothing needs libdevice, so the interpreter
runs every kernel.
"""
import triton
import triton.language as tl


# ---------------------------------------------------------------------------------------------
# Helpers.

@triton.jit
def _hat(d):
    """Bilinear weight of a cell at signed distance d: max(0, 1 - |d|) on [-1, 1)."""
    return tl.where((d >= -1.0) & (d < 1.0), 1.0 - tl.abs(d), d * 0.0)


# Whether @triton.jit gave interpreted functions (TRITON_INTERPRET was set at import).
INTERPRETED = type(_hat).__name__ == "InterpretedFunction"


@triton.jit
def _dhat(d):
    """Right derivative of _hat with respect to the sampling point (d = point - cell)."""
    z = d * 0.0
    return tl.where((d >= -1.0) & (d < 0.0), z + 1.0, tl.where((d >= 0.0) & (d < 1.0), z - 1.0, z))


@triton.jit
def _bilinear(base, py, px, Hp, Wp, sy, sx, m, ACC: tl.constexpr, GRAD: tl.constexpr):
    """Four-corner bilinear sample of the plane at ``base`` (strides sy, sx; Hp x Wp) at (py, px).

    Returns (value, d value / d py, d value / d px); the derivatives only when GRAD.
    """
    py = tl.minimum(tl.maximum(py, -2.0), Hp + 1.0)  # far outside: still outside, ints stay in range
    px = tl.minimum(tl.maximum(px, -2.0), Wp + 1.0)
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    ly = py - y0f
    lx = px - x0f
    y0 = y0f.to(tl.int32)
    x0 = x0f.to(tl.int32)
    # y0 >= -2 after the clamp: y0 + 1 >= 0 <=> y0 >= -1, and y0 < Hp + 1.
    m0 = m & (y0 >= 0)
    m1 = m & (y0 < Hp - 1) & (y0 >= -1)
    vx0 = (x0 >= 0) & (x0 < Wp)
    vx1 = (x0 >= -1) & (x0 < Wp - 1)
    p00 = base + y0 * sy + x0 * sx
    p10 = p00 + sy
    v00 = tl.load(p00, mask=m0 & (y0 < Hp) & vx0, other=0.0).to(ACC)
    v01 = tl.load(p00 + sx, mask=m0 & (y0 < Hp) & vx1, other=0.0).to(ACC)
    v10 = tl.load(p10, mask=m1 & vx0, other=0.0).to(ACC)
    v11 = tl.load(p10 + sx, mask=m1 & vx1, other=0.0).to(ACC)
    hy = 1.0 - ly
    hx = 1.0 - lx
    val = hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11)
    if GRAD:
        gy = hx * (v10 - v00) + lx * (v11 - v01)
        gx = hy * (v01 - v00) + ly * (v11 - v10)
    else:
        gy = val
        gx = val
    return val, gy, gx


@triton.jit
def _kernel_uv(dk_ptr, n, gk, ho, wo, sk0, sk1, sk2, sk3, m, t: tl.constexpr, ti: tl.constexpr,
               tj: tl.constexpr, K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, KH: tl.constexpr,
               KW: tl.constexpr, HAS_DK: tl.constexpr, DK_LOCAL: tl.constexpr, ACC: tl.constexpr):
    """Scope coordinates (u, v) of tap t for kernel-offset group gk at (ho, wo) of sample n."""
    u0 = (SH - KH) * 0.5 + ti
    v0 = (SW - KW) * 0.5 + tj
    if HAS_DK:
        ch = (2 * (gk * K + t)).to(tl.int64)
        if DK_LOCAL:
            p = dk_ptr + n * sk0 + ch * sk1 + ho * sk2 + wo * sk3
        else:
            p = dk_ptr + n * sk0 + ch * sk1 + (ho * 0 + wo * 0)
        u = tl.load(p, mask=m, other=0.0).to(ACC) + u0
        v = tl.load(p + sk1, mask=m, other=0.0).to(ACC) + v0
    else:
        zero = (gk * 0 + ho * 0 + wo * 0).to(ACC)
        u = zero + u0
        v = zero + v0
    return u, v


@triton.jit
def _image_yx(off_ptr, n, gi, ho, wo, so0, so1, so2, so3, m, sth, stw, ph, pw, dh, dw, t: tl.constexpr,
              ti: tl.constexpr, tj: tl.constexpr, K: tl.constexpr, HAS_OFF: tl.constexpr, ACC: tl.constexpr):
    """Input coordinates (py, px) of tap t for image-offset group gi at (ho, wo) of sample n."""
    py = (ho * sth - ph + ti * dh + gi * 0).to(ACC)
    px = (wo * stw - pw + tj * dw + gi * 0).to(ACC)
    if HAS_OFF:
        ch = (2 * (gi * K + t)).to(tl.int64)
        p = off_ptr + n * so0 + ch * so1 + ho * so2 + wo * so3
        py = py + tl.load(p, mask=m, other=0.0).to(ACC)
        px = px + tl.load(p + so1, mask=m, other=0.0).to(ACC)
    return py, px


@triton.jit
def _sample_x(xbase, off_ptr, n, gi, ho, wo, H, W, sx2, sx3, so0, so1, so2, so3, m, sth, stw, ph, pw, dh, dw,
              t: tl.constexpr, ti: tl.constexpr, tj: tl.constexpr, K: tl.constexpr, HAS_OFF: tl.constexpr,
              ACC: tl.constexpr):
    """The (unmodulated) input sample of tap t: bilinear with image offsets, else a rigid read."""
    if HAS_OFF:
        py, px = _image_yx(off_ptr, n, gi, ho, wo, so0, so1, so2, so3, m, sth, stw, ph, pw, dh, dw, t, ti, tj, K,
                           HAS_OFF, ACC)
        xv, _gy, _gx = _bilinear(xbase, py, px, H, W, sx2, sx3, m, ACC, False)
    else:
        yy = ho * sth - ph + ti * dh
        xx = wo * stw - pw + tj * dw
        ok = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        xv = tl.load(xbase + yy * sx2 + xx * sx3, mask=m & ok, other=0.0).to(ACC)
    return xv


@triton.jit
def _depthwise_gx(w_ptr, dk_ptr, gy_ptr, n, c, ho, wo, m, Cog, Cok, sw0, sw2, sw3, sk0, sk1, sk2, sk3,
                  sg0, sg1, sg2, sg3, t: tl.constexpr, ti: tl.constexpr, tj: tl.constexpr, K: tl.constexpr,
                  SH: tl.constexpr, SW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_DK: tl.constexpr,
                  DK_LOCAL: tl.constexpr, ACC: tl.constexpr):
    """Depthwise (Cg == 1): gradient of the modulated input column of channel c, tap t,
    sum over the channel's outputs o = c*Cog + j of sampled-kernel value * output gradient."""
    gx = (c * 0 + ho * 0 + wo * 0).to(ACC)
    for j in range(0, Cog):
        o = c * Cog + j
        u, v = _kernel_uv(dk_ptr, n, o // Cok, ho, wo, sk0, sk1, sk2, sk3, m, t, ti, tj, K, SH, SW, KH, KW,
                          HAS_DK, DK_LOCAL, ACC)
        wv, _a, _b = _bilinear(w_ptr + o.to(tl.int64) * sw0, u, v, SH, SW, sw2, sw3, m, ACC, False)
        g = tl.load(gy_ptr + n * sg0 + o.to(tl.int64) * sg1 + ho * sg2 + wo * sg3, mask=m, other=0.0).to(ACC)
        gx += wv * g
    return gx


# ---------------------------------------------------------------------------------------------
# Forward.

@triton.jit
def dw_forward_kernel(
    x_ptr, w_ptr, dk_ptr, off_ptr, mask_ptr, b_ptr, y_ptr,
    C, H, W, Co, Cog, Wo, L, Cok, Cig, Cmg,
    sth, stw, ph, pw, dh, dw,
    sx0, sx1, sx2, sx3, sw0, sw2, sw3, sk0, sk1, sk2, sk3, so0, so1, so2, so3, sm0, sm1, sm2, sm3,
    sy0, sy1, sy2, sy3,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_DK: tl.constexpr, DK_LOCAL: tl.constexpr, HAS_OFF: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr,
):
    """Depthwise (Cg == 1) direct forward: y[n, o, l] = sum_t kernel(o, t, l) * x_sampled(c, t, l).

    Grid (cdiv(L, BL), cdiv(Co, BC), N); one program owns a [BC, BL] tile of y.
    """
    K: tl.constexpr = KH * KW
    n = tl.program_id(2).to(tl.int64)
    o = tl.program_id(1) * BC + tl.arange(0, BC)
    l = tl.program_id(0) * BL + tl.arange(0, BL)
    om = o < Co
    lm = l < L
    o2 = o[:, None]
    ho = (l // Wo)[None, :]
    wo = (l % Wo)[None, :]
    m2 = om[:, None] & lm[None, :]
    c2 = o2 // Cog
    gk = o2 // Cok
    gi = c2 // Cig
    gm = c2 // Cmg
    wbase = w_ptr + o2.to(tl.int64) * sw0
    xbase = x_ptr + n * sx0 + c2.to(tl.int64) * sx1
    acc = tl.zeros([BC, BL], dtype=ACC)
    for ti in tl.static_range(KH):
        for tj in tl.static_range(KW):
            t = ti * KW + tj
            u, v = _kernel_uv(dk_ptr, n, gk, ho, wo, sk0, sk1, sk2, sk3, m2, t, ti, tj, K, SH, SW, KH, KW,
                              HAS_DK, DK_LOCAL, ACC)
            wv, _a, _b = _bilinear(wbase, u, v, SH, SW, sw2, sw3, m2, ACC, False)
            xv = _sample_x(xbase, off_ptr, n, gi, ho, wo, H, W, sx2, sx3, so0, so1, so2, so3, m2, sth, stw, ph, pw,
                           dh, dw, t, ti, tj, K, HAS_OFF, ACC)
            if HAS_MASK:
                mp = mask_ptr + n * sm0 + (gm * K + t).to(tl.int64) * sm1 + ho * sm2 + wo * sm3
                xv = xv * tl.load(mp, mask=m2, other=0.0).to(ACC)
            acc += wv * xv
    if HAS_BIAS:
        acc += tl.load(b_ptr + o2, mask=om[:, None], other=0.0).to(ACC)
    tl.store(y_ptr + n * sy0 + o2.to(tl.int64) * sy1 + ho * sy2 + wo * sy3, acc, mask=m2)


@triton.jit
def columns_kernel(
    x_ptr, off_ptr, mask_ptr, col_ptr, n0,
    C, H, W, Wo, L, Cig, Cmg,
    sth, stw, ph, pw, dh, dw,
    sx0, sx1, sx2, sx3, so0, so1, so2, so3, sm0, sm1, sm2, sm3,
    KH: tl.constexpr, KW: tl.constexpr, HAS_OFF: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
    BC: tl.constexpr, BL: tl.constexpr,
):
    """Modulated input columns X[nl, c, t, l] (contiguous (nb, C, K, L)) of samples n0 + nl.

    Grid (cdiv(L, BL), cdiv(C, BC), nb).
    """
    K: tl.constexpr = KH * KW
    nl = tl.program_id(2).to(tl.int64)
    n = nl + n0
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    l = tl.program_id(0) * BL + tl.arange(0, BL)
    c2 = c[:, None]
    l2 = l[None, :]
    ho = l2 // Wo
    wo = l2 % Wo
    m2 = (c2 < C) & (l2 < L)
    gi = c2 // Cig
    gm = c2 // Cmg
    xbase = x_ptr + n * sx0 + c2.to(tl.int64) * sx1
    for ti in tl.static_range(KH):
        for tj in tl.static_range(KW):
            t = ti * KW + tj
            xv = _sample_x(xbase, off_ptr, n, gi, ho, wo, H, W, sx2, sx3, so0, so1, so2, so3, m2, sth, stw, ph, pw,
                           dh, dw, t, ti, tj, K, HAS_OFF, ACC)
            if HAS_MASK:
                mp = mask_ptr + n * sm0 + (gm * K + t).to(tl.int64) * sm1 + ho * sm2 + wo * sm3
                xv = xv * tl.load(mp, mask=m2, other=0.0).to(ACC)
            tl.store(col_ptr + ((nl * C + c2) * K + t) * L + l2, xv, mask=m2)


@triton.jit
def sample_kernel_kernel(
    w_ptr, dk_ptr, wk_ptr,
    Co, Cg, Cok,
    sw0, sw1, sw2, sw3, sk0, sk1,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, HAS_DK: tl.constexpr,
    ACC: tl.constexpr, BR: tl.constexpr,
):
    """Sampled kernel Wk[nk, o, c, t] (contiguous (Nk, Co, Cg, K)) for kernel offsets constant
    over positions (global, or none: Nk = 1). Grid (cdiv(Co*Cg, BR), Nk)."""
    K: tl.constexpr = KH * KW
    nk = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = r < Co * Cg
    o = r // Cg
    c = r % Cg
    base = w_ptr + o.to(tl.int64) * sw0 + c.to(tl.int64) * sw1
    zero = r * 0
    for ti in tl.static_range(KH):
        for tj in tl.static_range(KW):
            t = ti * KW + tj
            u, v = _kernel_uv(dk_ptr, nk, o // Cok, zero, zero, sk0, sk1, 0, 0, rm, t, ti, tj, K, SH, SW, KH, KW,
                              HAS_DK, False, ACC)
            wv, _a, _b = _bilinear(base, u, v, SH, SW, sw2, sw3, rm, ACC, False)
            tl.store(wk_ptr + (nk * Co * Cg + r) * K + t, wv, mask=rm)


@triton.jit
def scatter_columns_kernel(
    col_ptr, dk_ptr, z_ptr, n0, g, gk,
    C, Cg, Wo, L,
    sk0, sk1, sk2, sk3,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, SP: tl.constexpr, ACC: tl.constexpr,
    BC: tl.constexpr, BL: tl.constexpr,
):
    """Scattered columns of conv group g for kernel group gk (local kernel offsets):
    Z[nl, c, s, l] = sum_t X[nl, g*Cg + c, t, l] * B[t, s, l] (contiguous (nb, Cg*S, L)), B the
    interpolation weight of scope cell s for tap t at l. Every element written once, no atomics.
    Grid (cdiv(L, BL), cdiv(Cg, BC), nb)."""
    K: tl.constexpr = KH * KW
    S: tl.constexpr = SH * SW
    nl = tl.program_id(2).to(tl.int64)
    n = nl + n0
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    l = tl.program_id(0) * BL + tl.arange(0, BL)
    lm = l < L
    cm = c < Cg
    ho = l // Wo
    wo = l % Wo
    s = tl.arange(0, SP)
    sm = s < S
    sy = (s // SW).to(ACC)[:, None]
    sx = (s % SW).to(ACC)[:, None]
    acc = tl.zeros([BC, SP, BL], dtype=ACC)
    m2 = cm[:, None] & lm[None, :]
    for ti in tl.static_range(KH):
        for tj in tl.static_range(KW):
            t = ti * KW + tj
            u, v = _kernel_uv(dk_ptr, n, gk, ho, wo, sk0, sk1, sk2, sk3, lm, t, ti, tj, K, SH, SW, KH, KW, True, True,
                              ACC)
            bw = _hat(u[None, :] - sy) * _hat(v[None, :] - sx)
            bw = tl.where(sm[:, None], bw, 0.0)
            xv = tl.load(col_ptr + ((nl * C + g * Cg + c[:, None]) * K + t) * L + l[None, :], mask=m2, other=0.0)
            acc += xv[:, None, :] * bw[None, :, :]
    c3 = c[:, None, None]
    s3 = s[None, :, None]
    l3 = l[None, None, :]
    zp = z_ptr + ((nl * Cg + c3) * S + s3) * L + l3
    tl.store(zp, acc, mask=(c3 < Cg) & (s3 < S) & (l3 < L))


# ---------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def dw_kernel_side_kernel(
    x_ptr, w_ptr, dk_ptr, off_ptr, mask_ptr, gy_ptr, pw_ptr, pdk_ptr,
    N, H, W, Cog, Wo, L, Gk, Cok, Cig, Cmg, NJ, NLB,
    sth, stw, ph, pw, dh, dw,
    sx0, sx1, sx2, sx3, sw0, sw2, sw3, sk0, sk1, sk2, sk3, so0, so1, so2, so3, sm0, sm1, sm2, sm3,
    sg0, sg1, sg2, sg3,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, SP: tl.constexpr,
    HAS_DK: tl.constexpr, DK_LOCAL: tl.constexpr, HAS_OFF: tl.constexpr, HAS_MASK: tl.constexpr,
    NEED_W: tl.constexpr, NEED_DK: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
    BC: tl.constexpr, BL: tl.constexpr,
):
    """Depthwise backward, kernel side: partial weight gradients and kernel-offset gradients.

    Grid (NLB = cdiv(L, BL), Gk * NJ, N): program (lb, gk*NJ + j, n) takes the output channels
    gk*Cok + j*BC + [0, BC) of kernel group gk and the positions lb*BL + [0, BL). With
    g = gy * X (X the modulated input sample) and B[t, s, l] the interpolation weights:
      pw[o, n, lb, s]                    = sum_{t, l} g[o, t, l] * B[t, s, l]   (tl.dot per tap)
      pdk[n, gk, j, t, 0/1, l] (local)   = sum_o g * d kernel(o, t, l) / d(u, v)
      pdk[n, gk, j, lb, t, 0/1] (global) = the same, summed over the block's positions
    Every element of pw and pdk has one writer; the host sums them in a fixed order
    (a two-stage reduction: deterministic, no atomics).
    """
    K: tl.constexpr = KH * KW
    S: tl.constexpr = SH * SW
    lb = tl.program_id(0)
    gj = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    gk = gj // NJ
    j = gj % NJ
    orow = j * BC + tl.arange(0, BC)
    om = orow < Cok
    o = gk * Cok + orow
    l = lb * BL + tl.arange(0, BL)
    lm = l < L
    ho = l // Wo
    wo = l % Wo
    o2 = o[:, None]
    ho2 = ho[None, :]
    wo2 = wo[None, :]
    m2 = om[:, None] & lm[None, :]
    c2 = o2 // Cog
    gi = c2 // Cig
    gm = c2 // Cmg
    s = tl.arange(0, SP)
    sm = s < S
    sy = (s // SW).to(ACC)[:, None]
    sx = (s % SW).to(ACC)[:, None]
    wbase = w_ptr + o2.to(tl.int64) * sw0
    xbase = x_ptr + n * sx0 + c2.to(tl.int64) * sx1
    gyp = gy_ptr + n * sg0 + o2.to(tl.int64) * sg1 + ho2 * sg2 + wo2 * sg3
    accw = tl.zeros([BC, SP], dtype=ACC)
    prow = (n * Gk + gk) * NJ + j  # (n, gk, j) row of pdk
    for ti in tl.static_range(KH):
        for tj in tl.static_range(KW):
            t = ti * KW + tj
            u, v = _kernel_uv(dk_ptr, n, gk, ho, wo, sk0, sk1, sk2, sk3, lm, t, ti, tj, K, SH, SW, KH, KW, HAS_DK,
                              DK_LOCAL, ACC)
            wv, wu, wvv = _bilinear(wbase, u[None, :], v[None, :], SH, SW, sw2, sw3, m2, ACC, NEED_DK)
            xv = _sample_x(xbase, off_ptr, n, gi, ho2, wo2, H, W, sx2, sx3, so0, so1, so2, so3, m2, sth, stw, ph, pw,
                           dh, dw, t, ti, tj, K, HAS_OFF, ACC)
            if HAS_MASK:
                mp = mask_ptr + n * sm0 + (gm * K + t).to(tl.int64) * sm1 + ho2 * sm2 + wo2 * sm3
                xv = xv * tl.load(mp, mask=m2, other=0.0).to(ACC)
            g = tl.load(gyp, mask=m2, other=0.0).to(ACC) * xv
            if NEED_W:
                bw = _hat(u[None, :] - sy) * _hat(v[None, :] - sx)
                bw = tl.where(sm[:, None] & lm[None, :], bw, 0.0)
                accw += tl.dot(g, tl.trans(bw), input_precision=DOT_PREC, out_dtype=ACC)
            if NEED_DK:
                gu = tl.sum(g * wu, axis=0)
                gv = tl.sum(g * wvv, axis=0)
                if DK_LOCAL:
                    dst = pdk_ptr + ((prow * K + t) * 2) * L + l
                    tl.store(dst, gu, mask=lm)
                    tl.store(dst + L, gv, mask=lm)
                else:
                    dst = pdk_ptr + ((prow * NLB + lb) * K + t) * 2
                    tl.store(dst, tl.sum(gu, axis=0))
                    tl.store(dst + 1, tl.sum(gv, axis=0))
    if NEED_W:
        wp = pw_ptr + ((o2.to(tl.int64) * N + n) * NLB + lb) * S + s[None, :]
        tl.store(wp, accw, mask=om[:, None] & sm[None, :])


@triton.jit
def image_side_kernel(
    x_ptr, off_ptr, mask_ptr, gx_ptr, w_ptr, dk_ptr, gy_ptr, gin_ptr, pof_ptr, pmk_ptr, n0,
    C, H, W, Cog, Wo, L, Cok, Cf, Cig, Cmg, Gf, NJ,
    sth, stw, ph, pw, dh, dw,
    sx0, sx1, sx2, sx3, sw0, sw2, sw3, sk0, sk1, sk2, sk3, so0, so1, so2, so3, sm0, sm1, sm2, sm3,
    sg0, sg1, sg2, sg3, si0, si1, si2, si3,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_DK: tl.constexpr, DK_LOCAL: tl.constexpr, HAS_OFF: tl.constexpr, HAS_MASK: tl.constexpr,
    GX_GIVEN: tl.constexpr, NEED_IN: tl.constexpr, NEED_OFF: tl.constexpr, NEED_MASK: tl.constexpr,
    ACC: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr,
):
    """Backward, image side: mask and image-offset gradients, and the input gradient's scatter
    when image offsets move the samples.

    gX[n, c, t, l], the gradient of the modulated input column, is read from gx_ptr
    (contiguous (nb, C, K, L); GX_GIVEN, general groups) or recomputed (depthwise).
    Channels are split into Gf fine groups of Cf channels (each inside one image-offset
    group and one mask group); grid (cdiv(L, BL), Gf * NJ, nb), program (lb, gf*NJ + j, nl)
    takes channels gf*Cf + j*BC + [0, BC). One writer per element of the partial sums
      pmk[nl, gf, j, t, l]      = sum_c gX * x_sampled
      pof[nl, gf, j, t, 0/1, l] = sum_c gX * mask * d x_sampled / d(py, px)
    which the host reduces in a fixed order. The input gradient with image offsets is the
    one scatter with atomics (tl.atomic_add into an accumulation-dtype buffer).
    """
    K: tl.constexpr = KH * KW
    nl = tl.program_id(2).to(tl.int64)
    n = nl + n0
    gj = tl.program_id(1)
    gf = gj // NJ
    j = gj % NJ
    cr = j * BC + tl.arange(0, BC)
    cm = cr < Cf
    c = gf * Cf + cr
    gi = (gf * Cf) // Cig
    gm = (gf * Cf) // Cmg
    l = tl.program_id(0) * BL + tl.arange(0, BL)
    lm = l < L
    ho = l // Wo
    wo = l % Wo
    c2 = c[:, None]
    l2 = l[None, :]
    ho2 = ho[None, :]
    wo2 = wo[None, :]
    m2 = cm[:, None] & lm[None, :]
    xbase = x_ptr + n * sx0 + c2.to(tl.int64) * sx1
    prow = (nl * Gf + gf) * NJ + j
    for ti in tl.static_range(KH):
        for tj in tl.static_range(KW):
            t = ti * KW + tj
            if GX_GIVEN:
                gxv = tl.load(gx_ptr + ((nl * C + c2) * K + t) * L + l2, mask=m2, other=0.0)
            else:
                gxv = _depthwise_gx(w_ptr, dk_ptr, gy_ptr, n, c2, ho2, wo2, m2, Cog, Cok, sw0, sw2, sw3, sk0, sk1,
                                    sk2, sk3, sg0, sg1, sg2, sg3, t, ti, tj, K, SH, SW, KH, KW, HAS_DK, DK_LOCAL, ACC)
            if HAS_OFF:
                py, px = _image_yx(off_ptr, n, gi, ho, wo, so0, so1, so2, so3, lm, sth, stw, ph, pw, dh, dw, t, ti, tj,
                                   K, HAS_OFF, ACC)
                py = tl.minimum(tl.maximum(py, -2.0), H + 1.0)
                px = tl.minimum(tl.maximum(px, -2.0), W + 1.0)
                y0f = tl.floor(py)
                x0f = tl.floor(px)
                ly = (py - y0f)[None, :]
                lx = (px - x0f)[None, :]
                hy = 1.0 - ly
                hx = 1.0 - lx
                y0 = y0f.to(tl.int32)
                x0 = x0f.to(tl.int32)
                # corner validity per position ([BL], y0, x0 >= -2 after the clamp), then per channel
                ry0 = (y0 >= 0) & (y0 < H)
                ry1 = (y0 >= -1) & (y0 < H - 1)
                rx0 = (x0 >= 0) & (x0 < W)
                rx1 = (x0 >= -1) & (x0 < W - 1)
                k00 = m2 & (lm & ry0 & rx0)[None, :]
                k01 = m2 & (lm & ry0 & rx1)[None, :]
                k10 = m2 & (lm & ry1 & rx0)[None, :]
                k11 = m2 & (lm & ry1 & rx1)[None, :]
                off00 = (y0 * sx2 + x0 * sx3)[None, :]
                p00 = xbase + off00
                p10 = p00 + sx2
                v00 = tl.load(p00, mask=k00, other=0.0).to(ACC)
                v01 = tl.load(p00 + sx3, mask=k01, other=0.0).to(ACC)
                v10 = tl.load(p10, mask=k10, other=0.0).to(ACC)
                v11 = tl.load(p10 + sx3, mask=k11, other=0.0).to(ACC)
                xs = hy * (hx * v00 + lx * v01) + ly * (hx * v10 + lx * v11)
            else:
                xs = _sample_x(xbase, off_ptr, n, gi, ho2, wo2, H, W, sx2, sx3, so0, so1, so2, so3, m2, sth, stw, ph,
                               pw, dh, dw, t, ti, tj, K, HAS_OFF, ACC)
            if NEED_MASK:
                tl.store(pmk_ptr + (prow * K + t) * L + l, tl.sum(gxv * xs, axis=0), mask=lm)
            if HAS_MASK:
                mp = mask_ptr + n * sm0 + (gm * K + t).to(tl.int64) * sm1 + ho * sm2 + wo * sm3
                gxs = gxv * tl.load(mp, mask=lm, other=0.0).to(ACC)[None, :]
            else:
                gxs = gxv
            if HAS_OFF:
                if NEED_OFF:
                    dy = hx * (v10 - v00) + lx * (v11 - v01)
                    dx = hy * (v01 - v00) + ly * (v11 - v10)
                    dst = pof_ptr + ((prow * K + t) * 2) * L + l
                    tl.store(dst, tl.sum(gxs * dy, axis=0), mask=lm)
                    tl.store(dst + L, tl.sum(gxs * dx, axis=0), mask=lm)
                if NEED_IN:
                    g00 = gin_ptr + n * si0 + c2.to(tl.int64) * si1 + (y0 * si2 + x0 * si3)[None, :]
                    tl.atomic_add(g00, gxs * (hy * hx), mask=k00)
                    tl.atomic_add(g00 + si3, gxs * (hy * lx), mask=k01)
                    tl.atomic_add(g00 + si2, gxs * (ly * hx), mask=k10)
                    tl.atomic_add(g00 + (si2 + si3), gxs * (ly * lx), mask=k11)


@triton.jit
def rigid_input_grad_kernel(
    gx_ptr, w_ptr, dk_ptr, gy_ptr, mask_ptr, gin_ptr, n0,
    C, H, W, Ho, Wo, L, Cog, Cok, Cmg,
    sth, stw, ph, pw, dh, dw,
    sw0, sw2, sw3, sk0, sk1, sk2, sk3, sg0, sg1, sg2, sg3, sm0, sm1, sm2, sm3, si0, si1, si2, si3,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    HAS_DK: tl.constexpr, DK_LOCAL: tl.constexpr, HAS_MASK: tl.constexpr, GX_GIVEN: tl.constexpr,
    ACC: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
):
    """Input gradient without image offsets, as a gather (one writer per input element, no
    atomics): gin[n, c, y, x] = sum over the taps t whose rigid sample at some output position l
    is (y, x) of mask * gX[n, c, t, l]. Grid (cdiv(H*W, BP), cdiv(C, BC), nb)."""
    K: tl.constexpr = KH * KW
    nl = tl.program_id(2).to(tl.int64)
    n = nl + n0
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    pm = p < H * W
    yy = p // W
    xx = p % W
    c2 = c[:, None]
    m2 = (c2 < C) & pm[None, :]
    acc = tl.zeros([BC, BP], dtype=ACC)
    for ti in tl.static_range(KH):
        for tj in tl.static_range(KW):
            t = ti * KW + tj
            hn = yy + ph - ti * dh
            wn = xx + pw - tj * dw
            hc = tl.maximum(hn, 0)
            wc = tl.maximum(wn, 0)
            ho = hc // sth
            wo = wc // stw
            ok = (hn >= 0) & (wn >= 0) & (ho * sth == hc) & (wo * stw == wc) & (ho < Ho) & (wo < Wo)
            ho = tl.where(ok, ho, 0)[None, :]
            wo = tl.where(ok, wo, 0)[None, :]
            mm = m2 & ok[None, :]
            if GX_GIVEN:
                gxv = tl.load(gx_ptr + ((nl * C + c2) * K + t) * L + ho * Wo + wo, mask=mm, other=0.0)
            else:
                gxv = _depthwise_gx(w_ptr, dk_ptr, gy_ptr, n, c2, ho, wo, mm, Cog, Cok, sw0, sw2, sw3, sk0, sk1, sk2,
                                    sk3, sg0, sg1, sg2, sg3, t, ti, tj, K, SH, SW, KH, KW, HAS_DK, DK_LOCAL, ACC)
            if HAS_MASK:
                mp = mask_ptr + n * sm0 + ((c2 // Cmg) * K + t).to(tl.int64) * sm1 + ho * sm2 + wo * sm3
                gxv = gxv * tl.load(mp, mask=mm, other=0.0).to(ACC)
            acc += gxv
    tl.store(gin_ptr + n * si0 + c2.to(tl.int64) * si1 + (yy * si2 + xx * si3)[None, :], acc, mask=m2)


@triton.jit
def scattered_backward_kernel(
    gz_ptr, col_ptr, dk_ptr, gx_ptr, gdk_ptr, n0, g, gk,
    Gk, C, Cg, Wo, L,
    sk0, sk1, sk2, sk3,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, SP: tl.constexpr,
    NEED_GX: tl.constexpr, NEED_DK: tl.constexpr, ACC: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr,
):
    """General groups, local kernel offsets: from gZ (the scattered columns' gradient, contiguous
    (nb, Cg*S, L)) of the pair (conv group g, kernel group gk),
      gX[nl, g*Cg + c, t, l] += sum_s B[t, s, l] gZ[nl, c, s, l]
      gdk[n, gk, t, 0/1, l]  += sum_{c, s} X[nl, g*Cg + c, t, l] dB[t, s, l]/d(u, v) gZ[nl, c, s, l]
    Grid (cdiv(L, BL), nb): one writer per element within a launch; pairs are launched one after
    another, so accumulation across pairs needs no atomics."""
    K: tl.constexpr = KH * KW
    S: tl.constexpr = SH * SW
    nl = tl.program_id(1).to(tl.int64)
    n = nl + n0
    l = tl.program_id(0) * BL + tl.arange(0, BL)
    lm = l < L
    ho = l // Wo
    wo = l % Wo
    s = tl.arange(0, SP)
    sm = s < S
    sy = (s // SW).to(ACC)[:, None]
    sx = (s % SW).to(ACC)[:, None]
    s3 = s[None, :, None]
    l3 = l[None, None, :]
    l2 = l[None, :]
    for ti in tl.static_range(KH):
        for tj in tl.static_range(KW):
            t = ti * KW + tj
            u, v = _kernel_uv(dk_ptr, n, gk, ho, wo, sk0, sk1, sk2, sk3, lm, t, ti, tj, K, SH, SW, KH, KW, True, True,
                              ACC)
            du = u[None, :] - sy
            dv = v[None, :] - sx
            hu = _hat(du)
            hv = _hat(dv)
            smask = sm[:, None]
            bw = tl.where(smask, hu * hv, 0.0)
            bu = tl.where(smask, _dhat(du) * hv, 0.0)
            bv = tl.where(smask, hu * _dhat(dv), 0.0)
            gu = tl.zeros([BL], dtype=ACC)
            gv = tl.zeros([BL], dtype=ACC)
            for c0 in range(0, Cg, BC):
                c = c0 + tl.arange(0, BC)
                c3 = c[:, None, None]
                c2 = c[:, None]
                m2 = (c2 < Cg) & lm[None, :]
                gz = tl.load(gz_ptr + ((nl * Cg + c3) * S + s3) * L + l3, mask=(c3 < Cg) & (s3 < S) & (l3 < L),
                             other=0.0)
                if NEED_GX:
                    gxp = gx_ptr + ((nl * C + g * Cg + c2) * K + t) * L + l2
                    gxv = tl.sum(gz * bw[None, :, :], axis=1)
                    tl.store(gxp, tl.load(gxp, mask=m2, other=0.0) + gxv, mask=m2)
                if NEED_DK:
                    xv = tl.load(col_ptr + ((nl * C + g * Cg + c2) * K + t) * L + l2, mask=m2, other=0.0)
                    gu += tl.sum(tl.sum(gz * bu[None, :, :], axis=1) * xv, axis=0)
                    gv += tl.sum(tl.sum(gz * bv[None, :, :], axis=1) * xv, axis=0)
            if NEED_DK:
                dst = gdk_ptr + (n * (2 * Gk * K) + 2 * (gk * K + t)) * L + l
                tl.store(dst, tl.load(dst, mask=lm, other=0.0) + gu, mask=lm)
                tl.store(dst + L, tl.load(dst + L, mask=lm, other=0.0) + gv, mask=lm)


@triton.jit
def sampled_kernel_weight_grad_kernel(
    gwk_ptr, dk_ptr, gw_ptr, n0, NB,
    Co, Cg, Cok,
    sk0, sk1,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, SP: tl.constexpr,
    HAS_DK: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr,
):
    """Kernel offsets constant over positions, general groups: weight gradient from gWk, the
    gradient of the sampled kernel (contiguous (NB, Co, Cg, K) for samples n0 + [0, NB); NB = 1
    with no kernel offsets, gWk then summed over samples):
      gW[o, c, s] += sum_{n, t} gWk[n, o, c, t] * B[n, gk(o), t, s]
    One writer per (o, c) row, samples in order: deterministic. Grid (cdiv(Co*Cg, BR),)."""
    K: tl.constexpr = KH * KW
    S: tl.constexpr = SH * SW
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = r < Co * Cg
    o = r // Cg
    gk = o // Cok
    s = tl.arange(0, SP)
    sm = s < S
    sy = (s // SW).to(ACC)[None, :]
    sx = (s % SW).to(ACC)[None, :]
    m2 = rm[:, None] & sm[None, :]
    gwp = gw_ptr + r[:, None].to(tl.int64) * S + s[None, :]
    acc = tl.load(gwp, mask=m2, other=0.0)
    zero = r * 0
    for nn in range(0, NB):
        n = (nn + n0).to(tl.int64)
        for ti in tl.static_range(KH):
            for tj in tl.static_range(KW):
                t = ti * KW + tj
                u, v = _kernel_uv(dk_ptr, n, gk, zero, zero, sk0, sk1, 0, 0, rm, t, ti, tj, K, SH, SW, KH, KW, HAS_DK,
                                  False, ACC)
                bw = _hat(u[:, None] - sy) * _hat(v[:, None] - sx)
                gv = tl.load(gwk_ptr + (nn * Co * Cg + r.to(tl.int64)) * K + t, mask=rm, other=0.0)
                acc += gv[:, None] * bw
    tl.store(gwp, acc, mask=m2)


@triton.jit
def sampled_kernel_offset_grad_kernel(
    gwk_ptr, w_ptr, dk_ptr, gdk_ptr, n0,
    Co, Cg, Cok, Gk,
    sw0, sw1, sw2, sw3, sk0, sk1,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, SP: tl.constexpr,
    ACC: tl.constexpr, BR: tl.constexpr,
):
    """Global kernel offsets, general groups: gdk[n, gk, t, 0/1] = sum over (o, c) of group gk of
    gWk[nl, o, c, t] * d sampled kernel / d(u, v). Grid (Gk, nb): one writer per element."""
    K: tl.constexpr = KH * KW
    S: tl.constexpr = SH * SW
    gk = tl.program_id(0)
    nl = tl.program_id(1).to(tl.int64)
    n = nl + n0
    s = tl.arange(0, SP)
    sm = s < S
    sy = (s // SW).to(ACC)[None, :]
    sx = (s % SW).to(ACC)[None, :]
    syi = (s // SW)[None, :]
    sxi = (s % SW)[None, :]
    r_lo = gk * Cok * Cg
    r_hi = r_lo + Cok * Cg
    zero = gk * 0
    for ti in tl.static_range(KH):
        for tj in tl.static_range(KW):
            t = ti * KW + tj
            u, v = _kernel_uv(dk_ptr, n, gk, zero, zero, sk0, sk1, 0, 0, True, t, ti, tj, K, SH, SW, KH, KW, True,
                              False, ACC)
            du = u - sy
            dv = v - sx
            bu = tl.where(sm[None, :], _dhat(du) * _hat(dv), 0.0)
            bv = tl.where(sm[None, :], _hat(du) * _dhat(dv), 0.0)
            accu = tl.zeros([BR], dtype=ACC)
            accv = tl.zeros([BR], dtype=ACC)
            for r0 in range(r_lo, r_hi, BR):
                r = r0 + tl.arange(0, BR)
                rm = r < r_hi
                o = (r // Cg)[:, None].to(tl.int64)
                c = (r % Cg)[:, None].to(tl.int64)
                wt = tl.load(w_ptr + o * sw0 + c * sw1 + syi * sw2 + sxi * sw3, mask=rm[:, None] & sm[None, :],
                             other=0.0).to(ACC)
                gv = tl.load(gwk_ptr + (nl * Co * Cg + r.to(tl.int64)) * K + t, mask=rm, other=0.0)
                accu += gv * tl.sum(wt * bu, axis=1)
                accv += gv * tl.sum(wt * bv, axis=1)
            dst = gdk_ptr + n * (2 * Gk * K) + 2 * (gk * K + t)
            tl.store(dst, tl.sum(accu, axis=0))
            tl.store(dst + 1, tl.sum(accv, axis=0))
