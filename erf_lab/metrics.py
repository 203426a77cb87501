"""ERF metrics, all centred on the unit's theoretical-RF centre (not the array centre).

Every function takes a 2-D float map ``m`` (H x W) and a centre ``(cy, cx)`` in pixel
coordinates (pixel centres at integers). Mass-based metrics use ``max(m, 0)``.
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "THRESHOLDS",
    "replknet_transform",
    "area_ratio",
    "luo_size",
    "second_moments",
    "gaussian_fit",
    "area_ratios",
    "radial_mass",
    "center_of_mass",
    "peak",
    "erf_metrics",
]

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
LUO_FRACTION = 0.0455  # two standard deviations of a Gaussian (Luo et al. 2016)
Center = Tuple[float, float]


def replknet_transform(m: np.ndarray) -> np.ndarray:
    """RepLKNet's display transform: ``log10(m + 1) / max`` (their analyze_erf.py)."""
    d = np.log10(np.asarray(m, dtype=np.float64) + 1)
    mx = np.max(d)
    return d / mx if mx > 0 else d


def area_ratio(m: np.ndarray, t: float, center: Optional[Center] = None) -> float:
    """High-contribution area ratio r(t): side^2 / (H W) of the smallest square (side 2i+1, i >= 1)
    around the centre whose sum exceeds ``t`` of the total (strict ``>``).

    ``center=None`` reproduces RepLKNet exactly: the square is centred on (H//2, W//2) and
    i runs over ``range(1, H // 2)`` (NaN when none qualifies). With a centre, it is the
    nearest pixel to that point, squares are clipped to the image and i grows until the square
    covers the image.
    """
    m = np.asarray(m, dtype=np.float64)
    h, w = m.shape
    total = m.sum()
    if not total > 0:
        return math.nan
    if center is None:
        for i in range(1, h // 2):
            if m[h // 2 - i : h // 2 + 1 + i, w // 2 - i : w // 2 + 1 + i].sum() / total > t:
                return (2 * i + 1) / h * (2 * i + 1) / w
        return math.nan
    return area_ratios(m, [t], center)[t]


def area_ratios(m: np.ndarray, thresholds: Sequence[float], center: Center) -> Dict[float, float]:
    """:func:`area_ratio` around ``center`` for several thresholds at once (one summed-area table)."""
    m = np.asarray(m, dtype=np.float64)
    h, w = m.shape
    total = m.sum()
    if not total > 0:
        return {t: math.nan for t in thresholds}
    cy, cx = int(round(center[0])), int(round(center[1]))
    cs = np.pad(m, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    i = np.arange(1, max(h, w) + 1)
    y0, y1 = np.clip(cy - i, 0, h), np.clip(cy + i + 1, 0, h)
    x0, x1 = np.clip(cx - i, 0, w), np.clip(cx + i + 1, 0, w)
    s = cs[y1, x1] - cs[y0, x1] - cs[y1, x0] + cs[y0, x0]
    valid = (y1 > y0) & (x1 > x0)
    out = {}
    for t in thresholds:
        hit = np.nonzero(valid & (s / total > t))[0]
        out[t] = (2 * int(i[hit[0]]) + 1) ** 2 / (h * w) if len(hit) else math.nan
    return out


def _bilinear(m: np.ndarray, cy: float, cx: float) -> float:
    h, w = m.shape
    cy, cx = min(max(cy, 0.0), h - 1.0), min(max(cx, 0.0), w - 1.0)
    y0, x0 = int(math.floor(cy)), int(math.floor(cx))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    fy, fx = cy - y0, cx - x0
    return float(
        m[y0, x0] * (1 - fy) * (1 - fx) + m[y0, x1] * (1 - fy) * fx + m[y1, x0] * fy * (1 - fx) + m[y1, x1] * fy * fx
    )


def luo_size(m: np.ndarray, center: Center) -> float:
    """Luo et al.'s ERF size: sqrt(#pixels whose value exceeds 4.55% of the value at the RF centre)."""
    v = _bilinear(np.asarray(m, dtype=np.float64), *center)
    if not v > 0:
        return math.nan
    return math.sqrt(int((np.asarray(m) > LUO_FRACTION * v).sum()))


def _grid(shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates, broadcastable to ``shape`` ((H, 1) and (1, W))."""
    return (np.arange(shape[0], dtype=np.float64)[:, None], np.arange(shape[1], dtype=np.float64)[None, :])


def second_moments(m: np.ndarray, center: Center) -> Tuple[float, float]:
    """(sigma_y, sigma_x): root second moments of the mass ``max(m, 0)`` about ``center``."""
    w = np.clip(np.asarray(m, dtype=np.float64), 0, None)
    total = w.sum()
    if not total > 0:
        return math.nan, math.nan
    yy, xx = _grid(w.shape)
    return (
        math.sqrt(float((w * (yy - center[0]) ** 2).sum() / total)),
        math.sqrt(float((w * (xx - center[1]) ** 2).sum() / total)),
    )


def center_of_mass(m: np.ndarray) -> Tuple[float, float]:
    w = np.clip(np.asarray(m, dtype=np.float64), 0, None)
    total = w.sum()
    if not total > 0:
        return math.nan, math.nan
    yy, xx = _grid(w.shape)
    return float((w * yy).sum() / total), float((w * xx).sum() / total)


def peak(m: np.ndarray) -> Tuple[int, int]:
    idx = np.unravel_index(int(np.argmax(m)), np.shape(m))
    return int(idx[0]), int(idx[1])


#: Maps with more pixels than this are fitted on a block-averaged copy (:func:`gaussian_fit`).
GAUSS_FIT_MAX_PIXELS = 256 * 256


def _block_mean(m: np.ndarray, f: int) -> np.ndarray:
    """Means of f x f blocks (the map zero-padded to a multiple of f: an ERF is ~0 at its border)."""
    h, w = m.shape
    H, W = -(-h // f) * f, -(-w // f) * f
    p = np.zeros((H, W), dtype=np.float64)
    p[:h, :w] = m
    return p.reshape(H // f, f, W // f, f).mean(axis=(1, 3))


def gaussian_fit(m: np.ndarray, center: Center, steps: int = 60, max_pixels: int = GAUSS_FIT_MAX_PIXELS) -> Dict[str, float]:
    """Least-squares fit of ``A exp(-(y-my)^2/2sy^2 - (x-mx)^2/2sx^2)`` to ``m`` (L-BFGS, float64).

    Starts from the moments about ``center``. Returns amplitude, mean, sigmas, R^2 and
    ``downsample``: a map of more than ``max_pixels`` pixels is fitted on its means over
    ``f x f`` blocks (``f`` the smallest factor that brings it under the bound, which keeps the
    cost of a 2048 px map at that of a 256 px one); the parameters are mapped back to pixels
    (block centres; the variance a block mean adds, ``(f^2 - 1) / 12``, is removed) and R^2 is
    that of the block-mean map. A field narrower than two blocks is refitted at full resolution
    on a window of +-6 sigma around it (``window``: y0, x0, y1, x1).
    """
    m = np.asarray(m, dtype=np.float64)
    f = 1
    while m.size / (f * f) > max_pixels:
        f += 1
    if f == 1:
        return dict(_fit(m, center, steps), downsample=1)
    small = _block_mean(m, f)
    g = _fit(small, ((center[0] - (f - 1) / 2) / f, (center[1] - (f - 1) / 2) / f), steps)
    box_var = (f * f - 1) / 12.0
    if g["sigma_y"] == g["sigma_y"] and min(g["sigma_y"], g["sigma_x"]) < 2:
        # a field narrower than two blocks is not Gaussian after block means: refit at full resolution
        # on a window of +-6 sigma around it (within the pixel bound)
        half = int(min(math.ceil(6 * f * max(g["sigma_y"], g["sigma_x"])) + 2, (math.sqrt(max_pixels) - 1) // 2))
        cy, cx = f * g["mean_y"] + (f - 1) / 2, f * g["mean_x"] + (f - 1) / 2
        y0, x0 = max(0, int(round(cy)) - half), max(0, int(round(cx)) - half)
        y1, x1 = min(m.shape[0], int(round(cy)) + half + 1), min(m.shape[1], int(round(cx)) + half + 1)
        if y1 > y0 + 2 and x1 > x0 + 2:
            w = _fit(m[y0:y1, x0:x1], (cy - y0, cx - x0), steps)
            w["mean_y"], w["mean_x"] = w["mean_y"] + y0, w["mean_x"] + x0
            return dict(w, downsample=1, window=[y0, x0, y1, x1])
    out = {"r2": g["r2"], "downsample": f}
    amp = g["amplitude"]
    for axis in ("y", "x"):
        var = max((f * g[f"sigma_{axis}"]) ** 2 - box_var, 1e-12) if g[f"sigma_{axis}"] == g[f"sigma_{axis}"] else math.nan
        out[f"sigma_{axis}"] = math.sqrt(var) if var == var else math.nan
        out[f"mean_{axis}"] = f * g[f"mean_{axis}"] + (f - 1) / 2
        if var == var:  # a block mean of a Gaussian is lower at the peak by sqrt(var / (var + box_var)) per axis
            amp = amp * math.sqrt((var + box_var) / var)
    out["amplitude"] = amp
    return {k: out[k] for k in ("amplitude", "mean_y", "mean_x", "sigma_y", "sigma_x", "r2", "downsample")}


def _fit(m: np.ndarray, center: Center, steps: int) -> Dict[str, float]:
    import torch

    sy0, sx0 = second_moments(m, center)
    if not (sy0 > 0 and sx0 > 0):
        return {"amplitude": math.nan, "mean_y": math.nan, "mean_x": math.nan, "sigma_y": math.nan,
                "sigma_x": math.nan, "r2": math.nan}
    target = torch.from_numpy(m)
    scale = float(np.abs(m).max()) or 1.0
    yy, xx = (torch.from_numpy(a) for a in _grid(m.shape))
    p = torch.tensor(
        [math.log(max(_bilinear(m, *center), 1e-12 * scale) / scale), center[0], center[1], math.log(sy0), math.log(sx0)],
        dtype=torch.float64,
        requires_grad=True,
    )

    def model(q):
        return scale * torch.exp(q[0] - (yy - q[1]) ** 2 / (2 * torch.exp(2 * q[3])) - (xx - q[2]) ** 2 / (2 * torch.exp(2 * q[4])))

    opt = torch.optim.LBFGS([p], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((model(p) - target) ** 2).sum() / scale**2
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        fit = model(p)
        ss_res = float(((fit - target) ** 2).sum())
        ss_tot = float(((target - target.mean()) ** 2).sum())
        q = p.detach().tolist()
    return {
        "amplitude": scale * math.exp(q[0]),
        "mean_y": q[1],
        "mean_x": q[2],
        "sigma_y": math.exp(q[3]),
        "sigma_x": math.exp(q[4]),
        "r2": 1 - ss_res / ss_tot if ss_tot > 0 else math.nan,
    }


def radial_mass(m: np.ndarray, center: Center, radii: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(radii, cumulative fraction of the mass ``max(m, 0)`` within each Euclidean radius of ``center``)."""
    w = np.clip(np.asarray(m, dtype=np.float64), 0, None)
    yy, xx = _grid(w.shape)
    r = np.hypot(yy - center[0], xx - center[1]).ravel()
    if radii is None:  # integer radii: r <= k exactly when ceil(r) <= k, so a histogram does it without sorting
        k = np.ceil(r).astype(np.int64)
        cum = np.cumsum(np.bincount(k, weights=w.ravel(), minlength=int(k.max()) + 1))
        radii = np.arange(len(cum), dtype=np.float64)
        total = float(w.sum())
        return radii, (cum / total if total > 0 else np.full(len(radii), math.nan))
    radii = np.asarray(radii, dtype=np.float64)
    order = np.argsort(r)
    cum = np.concatenate([[0.0], np.cumsum(w.ravel()[order])])
    total = cum[-1]
    k = np.searchsorted(r[order], radii, side="right")
    frac = cum[k] / total if total > 0 else np.full(len(radii), math.nan)
    return radii, frac


def erf_metrics(
    m: np.ndarray,
    center: Center,
    rf_size: Optional[Tuple[float, float]] = None,
    array_center_parity: bool = False,
) -> Dict[str, object]:
    """Every ERF metric of a map, centred on the RF centre ``center``.

    Args:
        m: the aggregated ERF map (H x W, before display transforms).
        center: the unit's theoretical-RF centre in pixels.
        rf_size: the theoretical RF size (rows, cols) for the ERF/TRF ratio.
        array_center_parity: also report RepLKNet's area ratios centred on the array centre.
    """
    m = np.asarray(m, dtype=np.float64)
    mass = np.clip(m, 0, None)
    h, w = m.shape
    disp = replknet_transform(mass)
    out: Dict[str, object] = {"center_y": float(center[0]), "center_x": float(center[1])}
    rep, raw = area_ratios(disp, THRESHOLDS, center), area_ratios(mass, THRESHOLDS, center)
    for t in THRESHOLDS:
        out[f"area_ratio_replknet@{t}"] = rep[t]
        out[f"area_ratio_raw@{t}"] = raw[t]
        if array_center_parity:
            out[f"area_ratio_replknet_array_center@{t}"] = area_ratio(disp, t, None)
    out["luo_size"] = luo_size(m, center)
    sy, sx = second_moments(m, center)
    out["sigma_y"], out["sigma_x"] = sy, sx
    g = gaussian_fit(mass, center)
    for k, v in g.items():
        out[f"gauss_{k}"] = v
    radii, frac = radial_mass(m, center)
    out["radial_mass"] = {"radius": radii.tolist(), "fraction": frac.tolist()}
    for q in (0.5, 0.9):
        hit = np.nonzero(frac >= q)[0]
        out[f"radius_mass@{q}"] = float(radii[hit[0]]) if len(hit) else math.nan
    cy, cx = center_of_mass(m)
    out["center_of_mass_y"], out["center_of_mass_x"] = cy, cx
    out["center_of_mass_offset"] = math.hypot(cy - center[0], cx - center[1]) if cy == cy else math.nan
    py, px = peak(m)
    out["peak_y"], out["peak_x"] = py, px
    out["peak_offset"] = math.hypot(py - center[0], px - center[1])
    if rf_size is not None and all(math.isfinite(s) and s > 0 for s in rf_size):
        # TRF area clipped to the image; ERF "size" is Luo's (side of an equal-area square).
        th, tw = min(rf_size[0], h), min(rf_size[1], w)
        out["trf_size_y"], out["trf_size_x"] = float(rf_size[0]), float(rf_size[1])
        out["erf_trf_ratio"] = out["luo_size"] / math.sqrt(th * tw) if out["luo_size"] == out["luo_size"] else math.nan
    else:
        out["erf_trf_ratio"] = math.nan
    return out
