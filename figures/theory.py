"""Figure 4: the linear ERF theory (Luo et al. 2016; Deformable Kernels, section 3).

Three checks on linear networks, where everything is exact:

* the ERF computed by :func:`erf_lab.compute_erf` for a stack of ``n`` uniform ``k x k``
  convolutions equals the analytic ERF: the outer product of the ``n``-fold convolution of the
  uniform ``k``-point distribution with itself (integer polynomial coefficients / ``k^(2n)``);
* the ERF size grows as ``sqrt(n)``: the slope of log size against log depth is about 0.5
  (Luo et al. report 0.56 for their networks);
* the Deformable Kernels property: in a linear network whose layers sample their kernels at
  fractional (global) kernel offsets, the ERF equals the bilinear blend of the ERFs at the
  neighbouring integer offsets (a product of per-layer bilinear weights over all 4^n corner
  combinations). Computed in float64 with :func:`dk_ops.deform_kernel_conv2d`; the residual
  is at rounding level.
"""
import itertools
import math
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from erf_lab.io import PathLike, write_csv, write_json, write_npz

from ._io import FigureResult, metadata, pyplot, save_figure

__all__ = ["linear_erf_theory", "analytic_box_erf", "dk_blend_erfs"]

QUICK_DEPTHS = (1, 2, 4, 8, 16, 32)


def analytic_box_erf(depth: int, kernel_size: int, size: int) -> np.ndarray:
    """Exact ERF (size x size, centred) of ``depth`` stacked uniform ``kernel_size`` convolutions.

    Per axis it is the ``depth``-fold convolution of the uniform distribution on ``kernel_size``
    points: the coefficients of ``(1 + z + ... + z^(k-1))^depth`` (exact integers) over
    ``k^depth``. The 2-D ERF is the outer product of the two axes.
    """
    coeffs = [1]
    for _ in range(depth):
        nxt = [0] * (len(coeffs) + kernel_size - 1)
        for i, c in enumerate(coeffs):
            for j in range(kernel_size):
                nxt[i + j] += c
        coeffs = nxt
    denom = kernel_size ** depth
    axis = np.array([c / denom for c in coeffs], dtype=np.float64)  # length depth*(k-1)+1
    if len(axis) > size:
        raise ValueError(f"an image of {size} pixels is smaller than the receptive field {len(axis)}")
    pad = (size - len(axis)) // 2
    full = np.zeros(size)
    full[pad:pad + len(axis)] = axis
    return np.outer(full, full)


def _box_stack(depth: int, k: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    layers = []
    for _ in range(depth):
        conv = nn.Conv2d(1, 1, k, padding=k // 2, bias=False, dtype=dtype)
        nn.init.constant_(conv.weight, 1.0 / (k * k))  # set in ``dtype``: 1/9 is not a float32
        layers.append(conv)
    return nn.Sequential(*layers)


def _computed_box_erf(depth: int, k: int, size: int):
    import erf_lab

    net = _box_stack(depth, k)  # float64: the engine keeps the model's dtype
    res = erf_lab.compute_erf(net, torch.zeros(1, 1, size, size, dtype=torch.float64), preset="luo",
                              progress=False)
    return res


def _erf64(weights: Sequence[torch.Tensor], offsets: Sequence[Tuple[float, float]], k: int, size: int) -> np.ndarray:
    """float64 ERF (input gradient of the centre output) of a linear stack of DK layers."""
    from dk_ops import deform_kernel_conv2d

    x = torch.zeros(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    y = x
    for w, (dy, dx) in zip(weights, offsets):
        ko = torch.tensor([dy, dx] * (k * k), dtype=torch.float64).view(1, -1)
        y = deform_kernel_conv2d(y, w, kernel_offset=ko, kernel_size=k, padding=k // 2)
    c = size // 2
    (g,) = torch.autograd.grad(y[0, 0, c, c], x)
    return g[0, 0].numpy()


def dk_blend_erfs(depth: int = 3, kernel_size: int = 3, scope_size: int = 5, size: int = 25,
                  seed: int = 0) -> Dict[str, Any]:
    """ERF of a linear DK stack at fractional kernel offsets vs the bilinear blend of integer-offset ERFs.

    Each layer ``l`` has a random positive scope weight (1 x 1 x S x S) and one global kernel
    offset ``(dy_l, dx_l)`` (the same for every tap) with non-zero fractional parts. The blend is
    ``sum over corners c_1..c_n of prod_l g_l(c_l) * ERF(floor(d) + c)``, with ``g_l`` the bilinear
    weights of layer ``l``.

    Returns:
        ``direct``, ``blend``, ``residual`` (float64 maps), ``offsets``, ``max_abs_residual``,
        ``max_rel_residual`` and ``n_corner_erfs``.
    """
    rng = np.random.default_rng(seed)
    weights = [torch.from_numpy(rng.uniform(0.1, 1.0, (1, 1, scope_size, scope_size))) for _ in range(depth)]
    offsets = []
    for _ in range(depth):
        d = rng.uniform(-0.95, 0.95, 2)
        d = np.where(np.abs(d - np.round(d)) < 0.05, d + 0.1, d)  # keep fractional parts away from 0
        offsets.append((float(d[0]), float(d[1])))
    direct = _erf64(weights, offsets, kernel_size, size)
    floors = [(math.floor(dy), math.floor(dx)) for dy, dx in offsets]
    fracs = [(dy - fy, dx - fx) for (dy, dx), (fy, fx) in zip(offsets, floors)]
    corners = [(0, 0), (0, 1), (1, 0), (1, 1)]
    blend = np.zeros_like(direct)
    n = 0
    for combo in itertools.product(corners, repeat=depth):
        coef = 1.0
        integer_offsets = []
        for (cy, cx), (fy, fx), (ty, tx) in zip(combo, floors, fracs):
            coef *= (ty if cy else 1 - ty) * (tx if cx else 1 - tx)
            integer_offsets.append((float(fy + cy), float(fx + cx)))
        blend += coef * _erf64(weights, integer_offsets, kernel_size, size)
        n += 1
    residual = direct - blend
    scale = float(np.abs(direct).max())
    return {"direct": direct, "blend": blend, "residual": residual, "offsets": offsets,
            "max_abs_residual": float(np.abs(residual).max()),
            "max_rel_residual": float(np.abs(residual).max() / scale) if scale > 0 else math.nan,
            "n_corner_erfs": n}


def _slope(depths: Sequence[int], values: Sequence[float]) -> float:
    x, y = np.log(np.asarray(depths, float)), np.log(np.asarray(values, float))
    ok = np.isfinite(y)
    return float(np.polyfit(x[ok], y[ok], 1)[0]) if ok.sum() >= 2 else math.nan


def _draw(df: Any, maps: Dict[str, np.ndarray], dk: Dict[str, Any], kernel_size: int, slope_luo: float,
          slope_sigma: float):
    """The 2 x 3 theory figure: the deepest stack's ERF, centre rows, size vs depth, the DK blend."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 8.5), layout="constrained")
    nmax = int(df.depth.max())
    ax = axes[0, 0]
    im = ax.imshow(maps[f"computed_{nmax}"], cmap="viridis")
    ax.set_title(f"computed ERF, {nmax} uniform {kernel_size}x{kernel_size} convs", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[0, 1]
    for n in df.depth:
        comp, ana = maps[f"computed_{n}"], maps[f"analytic_{n}"]
        r = comp.shape[0] // 2
        xs = np.arange(comp.shape[1]) - r
        line, = ax.plot(xs, ana[r], lw=1, label=f"n={n}")
        ax.plot(xs, comp[r], ".", ms=3, color=line.get_color())
    ax.set_title("centre row: analytic (line) vs computed (dots)", fontsize=9)
    ax.set_xlabel("pixel offset from the unit")
    ax.legend(fontsize=7)
    ax = axes[0, 2]
    d = df.depth.to_numpy(float)
    ax.loglog(d, df.luo_size_computed, "o", label=f"Luo size (computed), slope {slope_luo:.3f}")
    ax.loglog(d, df.sigma_computed, "s", label=f"sigma (computed), slope {slope_sigma:.3f}")
    ax.loglog(d, df.sigma_closed_form, "k--", lw=1, label="sqrt(n (k^2-1)/12)")
    for col, slope in (("luo_size_computed", slope_luo), ("sigma_computed", slope_sigma)):
        b = np.polyfit(np.log(d), np.log(df[col]), 1)
        ax.loglog(d, np.exp(np.polyval(b, np.log(d))), ":", color="gray", lw=1)
    ax.set_xlabel("depth n")
    ax.set_ylabel("ERF size (pixels)")
    ax.set_title("ERF size vs depth (log-log)", fontsize=9)
    ax.legend(fontsize=7)
    for ax, key, title in ((axes[1, 0], "direct", "DK ERF at fractional kernel offsets"),
                           (axes[1, 1], "blend", f"bilinear blend of {dk['n_corner_erfs']} integer-offset ERFs")):
        im = ax.imshow(dk[key], cmap="viridis")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    ax = axes[1, 2]
    lim = max(float(np.abs(dk["residual"]).max()), 1e-300)
    im = ax.imshow(dk["residual"], cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(f"residual (float64): max |r| = {dk['max_abs_residual']:.1e}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Linear ERF theory: exact ERFs of uniform stacks, sqrt(depth) growth, DK bilinear property")
    return fig


def linear_erf_theory(out_dir: PathLike, *, depths: Sequence[int] = QUICK_DEPTHS, kernel_size: int = 3,
                      dk_depth: int = 3, dk_scope: int = 5, margin: int = 4, seed: int = 0) -> FigureResult:
    """Writes the linear ERF theory figure (``theory.png/.pdf``) and its data into ``out_dir``.

    Args:
        out_dir: folder for ``theory.{png,pdf}``, ``theory_depth.csv``, ``theory.npz``, ``theory.json``.
        depths: stack depths of the uniform linear stacks (at least two, for the slope).
        kernel_size: the uniform kernel's side (odd).
        dk_depth, dk_scope: layers and scope size of the linear DK stack of the blend check.
        margin: pixels of zero border around the largest receptive field.
        seed: seeds the DK weights and offsets.

    Returns:
        a :class:`FigureResult` whose summary holds the residuals and the fitted slopes.
    """
    if len(depths) < 2 or kernel_size % 2 == 0:
        raise ValueError("need at least two depths and an odd kernel size")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    from erf_lab.metrics import luo_size, second_moments

    rows, maps = [], {}
    for n in depths:
        size = n * (kernel_size - 1) + 1 + 2 * margin
        res = _computed_box_erf(n, kernel_size, size)
        ana = analytic_box_erf(n, kernel_size, size)
        c = (size // 2, size // 2)
        m = res.metrics()
        sy, _ = second_moments(ana, c)
        rows.append({
            "depth": n, "image_size": size,
            "max_abs_residual": float(np.abs(res.map - ana).max()),
            "max_rel_residual": float(np.abs(res.map - ana).max() / ana.max()),
            "luo_size_computed": m["luo_size"], "luo_size_analytic": luo_size(ana, c),
            "sigma_computed": m["sigma_y"], "sigma_analytic": sy,
            "sigma_closed_form": math.sqrt(n * (kernel_size ** 2 - 1) / 12.0),
        })
        maps[f"computed_{n}"], maps[f"analytic_{n}"] = res.map, ana
    df = pd.DataFrame(rows)
    slope_luo = _slope(df.depth, df.luo_size_computed)
    slope_sigma = _slope(df.depth, df.sigma_computed)
    dk = dk_blend_erfs(dk_depth, kernel_size, dk_scope, size=2 * dk_depth * (dk_scope // 2 + 2) + 1 + 2 * margin,
                       seed=seed)

    fig = _draw(df, maps, dk, kernel_size, slope_luo, slope_sigma)
    files = save_figure(fig, out, "theory")

    options = dict(depths=list(depths), kernel_size=kernel_size, dk_depth=dk_depth, dk_scope=dk_scope,
                   margin=margin, erf_preset="luo", dtype_engine="float64", dtype_dk="float64")
    summary = {
        "max_rel_residual_engine_vs_analytic": float(df.max_rel_residual.max()),
        "slope_luo_size": slope_luo, "slope_sigma": slope_sigma,
        "dk_blend_max_abs_residual": dk["max_abs_residual"], "dk_blend_max_rel_residual": dk["max_rel_residual"],
        "dk_offsets": dk["offsets"],
    }
    files.append(write_csv(out / "theory_depth.csv", df))
    files.append(write_npz(out / "theory.npz", dk_direct=dk["direct"], dk_blend=dk["blend"],
                           dk_residual=dk["residual"], **maps))
    files.append(write_json(out / "theory.json", metadata("theory", options, seed, summary=summary)))
    claims = [
        f"Computed ERFs of uniform linear stacks match the analytic ERF: max relative residual "
        f"{summary['max_rel_residual_engine_vs_analytic']:.1e} (float64): "
        f"{'holds' if summary['max_rel_residual_engine_vs_analytic'] < 1e-9 else 'does not hold'}.",
        f"ERF size grows as depth^{slope_luo:.3f} (Luo size) and depth^{slope_sigma:.3f} (sigma); the theory says "
        f"0.5, Luo et al. report 0.56: {'holds' if abs(slope_sigma - 0.5) < 0.05 else 'does not hold'}.",
        f"DK property (ERF at fractional kernel offsets = bilinear blend of integer-offset ERFs, {dk_depth} layers): "
        f"max |residual| {dk['max_abs_residual']:.1e} in float64: "
        f"{'holds' if dk['max_abs_residual'] < 1e-9 else 'does not hold'}.",
    ]
    return FigureResult("theory", "Linear ERF theory", files, summary, df, claims)
