"""Figure 5: what the deformable layers learn, by object size.

For every deformable layer of the DK variants (kernel offsets, in scope cells) and of the DCN
variants (image offsets, in input pixels), each module's own ``forward(x, return_offsets=True)``
gives the offsets it used on a test image. Per image and layer two statistics are taken over
the positions whose receptive-field centre lies inside the object's box (the nearest position
when none does; global offsets have a single position):

* ``mean_abs``: mean length of the offset vectors over taps;
* ``mean_radial``: mean projection of the offsets of the outer taps on the unit vector from the
  kernel centre to the tap: positive when the sampled kernel spreads out (a larger effective
  kernel, hence a larger ERF), negative when it contracts.

For the kernel offsets of DK layers a third statistic measures how sharply the *sampled kernel*
varies over its taps (claim 3 of ``docs/design.md`` section 7):

* ``kernel_dispersion``: with ``a_k`` the root-mean-square over output and input channels of
  the sampled kernel's tap ``k`` (the scope weight bilinearly resampled at the tap's offset
  position, :func:`dk_ops.reference.sample_kernel`), the normalised variance over taps
  ``var_k(a) / mean_k(a)^2``: 0 for a flat kernel, large for a kernel concentrated on few taps.

They are averaged per object-size bin on the same test images for every model and seed (the
instance images of the ERF figure), and each is correlated with the object size (Spearman,
per seed, with a bootstrap interval over seeds and images). The paper's reading of local DK:
sharply varying kernels for small objects (a negative size-dispersion correlation) and kernels
that spread out for large ones (a positive size-radial correlation).
"""
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ._io import FigureResult, metadata, pyplot, save_figure
from erf_lab.io import PathLike, write_csv, write_json
from ._models import checkpoint_names, load_seeds, open_test_data, sample_per_bin, stack_items
from .stats import Effect

__all__ = ["offsets_by_size", "offset_effects", "tap_rms"]

LABELS = {"dcn": "DCN", "dk_global": "DK (global)", "dk": "DK", "dk_dcn": "DK+DCN"}


def _deformable_modules(model: nn.Module) -> Dict[str, nn.Module]:
    from dk_ops.modules import DeformConv2d, DeformKernelBase

    return {n: m for n, m in model.named_modules() if isinstance(m, (DeformKernelBase, DeformConv2d))}


def _tap_directions(kh: int, kw: int) -> torch.Tensor:
    """(K, 2) unit vectors from the kernel centre to each tap (zero for the centre tap)."""
    i = torch.arange(kh, dtype=torch.float64).repeat_interleave(kw) - (kh - 1) / 2
    j = torch.arange(kw, dtype=torch.float64).repeat(kh) - (kw - 1) / 2
    v = torch.stack([i, j], 1)
    n = v.norm(dim=1, keepdim=True)
    return torch.where(n > 0, v / n.clamp(min=1e-12), torch.zeros_like(v))


def _stats(off: torch.Tensor, taps: int, dirs: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[np.ndarray, np.ndarray]:
    """Per-image (mean_abs, mean_radial) of offsets (N, 2*G*K[, H, W]) over taps and masked positions."""
    n = off.shape[0]
    o = off.double().reshape(n, -1, taps, 2, *off.shape[2:])  # N, G, K, 2, [H, W]
    if o.dim() == 4:
        o = o[..., None, None]
    length = o.norm(dim=3)  # N, G, K, H, W
    radial = (o * dirs.view(1, 1, taps, 2, 1, 1)).sum(3)
    outer = (dirs.norm(dim=1) > 0).view(1, 1, taps, 1, 1).double()
    length = length.mean(dim=(1, 2))
    radial = (radial * outer).sum(dim=(1, 2)) / (outer.sum() * o.shape[1])
    if mask is None or length.shape[-2:] == (1, 1):
        w = torch.ones_like(length)
    else:
        w = mask.double()
    w = w / w.sum(dim=(1, 2), keepdim=True)
    return (length * w).sum(dim=(1, 2)).numpy(), (radial * w).sum(dim=(1, 2)).numpy()


def _box_masks(boxes: torch.Tensor, hw_in: Tuple[int, int], hw_out: Tuple[int, int]) -> torch.Tensor:
    """(N, H', W') masks of the output cells whose centre (evenly tiled grid) falls inside each box."""
    sy, sx = hw_in[0] / hw_out[0], hw_in[1] / hw_out[1]
    cy = (torch.arange(hw_out[0], dtype=torch.float64) + 0.5) * sy
    cx = (torch.arange(hw_out[1], dtype=torch.float64) + 0.5) * sx
    b = boxes.double()
    iny = (cy[None] >= b[:, 1:2]) & (cy[None] <= b[:, 1:2] + b[:, 3:4])
    inx = (cx[None] >= b[:, 0:1]) & (cx[None] <= b[:, 0:1] + b[:, 2:3])
    m = iny[:, :, None] & inx[:, None, :]
    for k in range(len(b)):  # no cell centre inside: the cell nearest the box centre
        if not m[k].any():
            yc, xc = float(b[k, 1] + b[k, 3] / 2), float(b[k, 0] + b[k, 2] / 2)
            m[k, int(min(yc // sy, hw_out[0] - 1)), int(min(xc // sx, hw_out[1] - 1))] = True
    return m


def tap_rms(weight: torch.Tensor, kernel_offset: torch.Tensor, kernel_size: Tuple[int, int]) -> torch.Tensor:
    """(N, K, P): RMS over (output, input) channels of each tap of the sampled kernel at each position.

    Equals ``sample_kernel(weight, kernel_offset, kernel_size).pow(2).mean((1, 2)).sqrt()`` without
    building the (N, C_out, C_in, K, P) kernel: a tap is ``b^T w`` for its interpolation row ``b``
    over the scope cells, so its mean square is ``b^T G b / M`` with ``G`` the cells' Gram matrix.
    """
    from dk_ops.reference import tap_grid, bilinear_corners

    c_out, cg, sh, sw = weight.shape
    kh, kw = kernel_size
    k = kh * kw
    n = kernel_offset.shape[0]
    gk = kernel_offset.shape[1] // (2 * k)
    p = 1 if kernel_offset.dim() == 2 else kernel_offset.shape[2] * kernel_offset.shape[3]
    w = weight.double()
    i, j = tap_grid(kh, kw, w.dtype, w.device)
    dk = kernel_offset.double().reshape(n, gk, k, 2, p)
    u = ((sh - kh) / 2 + i).view(1, 1, k, 1) + dk[:, :, :, 0]
    v = ((sw - kw) / 2 + j).view(1, 1, k, 1) + dk[:, :, :, 1]
    index, corner_w = bilinear_corners(u, v, sh, sw)
    interp = corner_w.new_zeros(n, gk, k, p, sh * sw).scatter_add(-1, index, corner_w)
    cells = w.reshape(gk, (c_out // gk) * cg, sh * sw)
    gram = torch.einsum("gms,gmt->gst", cells, cells) / cells.shape[1]
    ms = torch.einsum("ngkps,gst,ngkpt->ngkp", interp, gram, interp).mean(1)
    return ms.clamp(min=0).sqrt()


def _dispersion(rms: torch.Tensor) -> torch.Tensor:
    """(N, K, P) tap RMS -> (N, P) normalised variance over taps."""
    mean = rms.mean(1)
    return rms.var(1, unbiased=False) / mean.clamp(min=1e-30) ** 2


def offset_effects(per_img: Any, *, n_boot: int = 2000, seed: int = 0) -> List[Effect]:
    """Claim 3 from per-image rows (op, kind, seed_index, index, size, kernel_dispersion, mean_radial)."""
    from .stats import effect_row, spearman_effect

    out: List[Effect] = []
    dk = per_img[(per_img.op == "dk") & (per_img.kind == "kernel_offset")]
    if len(dk) == 0:
        return out
    size = dk.pivot(index="seed_index", columns="index", values="size").to_numpy()
    n = f"{size.shape[0]} seed(s) x {size.shape[1]} test images"
    for col, claim, sign, what in (
            ("kernel_dispersion", "Local DK samples sharper kernels for small objects, flatter for large", -1,
             "Spearman(object size, sampled-kernel dispersion) of dk"),
            ("mean_radial", "Local DK's kernel offsets spread out for larger objects (wider ERF)", +1,
             "Spearman(object size, radial kernel offset) of dk")):
        y = dk.pivot(index="seed_index", columns="index", values=col).to_numpy()
        out.append(effect_row(claim, what, spearman_effect(size, y, n_boot=n_boot, seed=seed), sign, n, "3"))
    return out


def _capture_rows(op: str, k: int, lm: Any, items: Dict[str, Any], batch_size: int, device: str) -> List[Dict[str, Any]]:
    """Per-(layer, kind, image) statistics of one model on the stacked items."""
    mods = _deformable_modules(lm.model)
    captured: Dict[str, Dict[str, torch.Tensor]] = {}
    busy = {"on": False}
    rows: List[Dict[str, Any]] = []

    def hook(name: str):
        def run(mod: nn.Module, inputs: Any, output: Any) -> None:
            if busy["on"]:
                return
            busy["on"] = True
            try:
                _, used = mod(inputs[0], return_offsets=True)
            finally:
                busy["on"] = False
            captured[name] = {k: v.detach().cpu() for k, v in used.items() if k in ("kernel_offset", "offset")}
            captured[name]["_hw_out"] = torch.tensor(output.shape[-2:])

        return run

    hw_in = tuple(items["image"].shape[-2:])
    handles = [m.register_forward_hook(hook(name)) for name, m in mods.items()]
    try:
        for s in range(0, len(items["index"]), batch_size):
            x = items["image"][s:s + batch_size].to(device)
            boxes = torch.as_tensor(items["box"][s:s + batch_size])
            captured.clear()
            with torch.no_grad():
                lm.model(x)
            for name, used in captured.items():
                mod = mods[name]
                kh, kw = mod.kernel_size
                dirs = _tap_directions(kh, kw)
                hw_out = tuple(int(v) for v in used["_hw_out"])
                mask = _box_masks(boxes, hw_in, hw_out)
                for kind in ("kernel_offset", "offset"):
                    if kind not in used:
                        continue
                    mean_abs, radial = _stats(used[kind], kh * kw, dirs, mask)
                    disp = np.full(len(x), np.nan)
                    if kind == "kernel_offset":
                        d = _dispersion(tap_rms(mod.weight.detach().cpu(), used[kind], (kh, kw)))
                        disp = _masked_mean(d, mask, used[kind].dim() == 2, hw_out)
                    for j in range(len(x)):
                        b = items["box"][s + j]
                        rows.append({"op": op, "seed_index": k, "layer": name, "kind": kind,
                                     "index": int(items["index"][s + j]), "size_bin": int(items["size_bin"][s + j]),
                                     "size": float(math.sqrt(b[2] * b[3])), "mean_abs": float(mean_abs[j]),
                                     "mean_radial": float(radial[j]), "kernel_dispersion": float(disp[j])})
    finally:
        for h in handles:
            h.remove()
    return rows


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, global_offsets: bool, hw_out: Tuple[int, int]) -> np.ndarray:
    """(N, P) values -> (N,) means over the box positions (the single position of global offsets)."""
    if global_offsets or values.shape[1] == 1:
        return values[:, 0].numpy()
    w = mask.reshape(len(values), -1).double()
    return ((values * w).sum(1) / w.sum(1)).numpy()


def offsets_by_size(checkpoints: Mapping[str, Any], out_dir: PathLike, *, data: Optional[str] = None,
                    per_bin: int = 50, batch_size: int = 64, device: str = "cpu", seed: int = 0,
                    progress: bool = True, n_boot: int = 2000) -> FigureResult:
    """Writes ``offsets.{png,pdf}``, ``offsets_per_image.csv``, ``offsets_by_bin.csv``,
    ``offsets_correlation.csv`` and ``offsets.json``.

    Args:
        checkpoints: ``{op: [checkpoint per seed]}`` (or ``{op: checkpoint}``); variants without
            deformable layers (conv, condconv) are skipped.
        out_dir: output folder.
        data: ``--data`` spec (default: the checkpoints' own); its test split is used.
        per_bin: test images per size bin (seeded; the ERF figure's instance images for the same seed).
        batch_size, device: of the forward passes.
        seed: seeds the image choice and the bootstrap.
        progress: a progress bar.
        n_boot: bootstrap replicates of the intervals.

    Returns:
        a :class:`FigureResult` whose table holds the correlations, its effects claim 3's.
    """
    import pandas as pd
    from erf_lab.progress import progress as progress_bar
    from erf_lab.errors import ErfLabError

    from .stats import spearman_effect

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_seeds(checkpoints, device)
    loaded = {op: lms for op, lms in loaded.items() if _deformable_modules(lms[0].model)}
    if not loaded:
        raise ErfLabError("none of the models has deformable layers (dcn, dk_global, dk or dk_dcn)")
    ds = open_test_data({op: lms[0] for op, lms in loaded.items()}, data)
    chosen = sample_per_bin(ds.size_bins, per_bin, seed)
    if not chosen:
        raise ErfLabError(f"data {ds.spec!r} has no object size bins: the offset statistics need boxes")
    items = stack_items(ds, np.concatenate([chosen[b] for b in sorted(chosen)]))
    rows: List[Dict[str, Any]] = []
    jobs = [(op, k) for op, lms in loaded.items() for k in range(len(lms))]
    for op, k in progress_bar(jobs, desc="offsets", unit="model", enabled=progress):
        rows += _capture_rows(op, k, loaded[op][k], items, batch_size, device)
    per = pd.DataFrame(rows)
    stats_cols = ["mean_abs", "mean_radial", "kernel_dispersion"]
    per_img = per.groupby(["op", "kind", "seed_index", "index", "size_bin", "size"], as_index=False)[stats_cols].mean()
    by_bin = (per_img.groupby(["op", "kind", "size_bin"])
              .agg(mean_abs=("mean_abs", "mean"), mean_radial=("mean_radial", "mean"),
                   mean_radial_std=("mean_radial", "std"), kernel_dispersion=("kernel_dispersion", "mean"),
                   n=("mean_abs", "size")).reset_index())
    corr_rows = []
    for (op, kind), g in per_img.groupby(["op", "kind"]):
        size = g.pivot(index="seed_index", columns="index", values="size").to_numpy()
        row = {"op": op, "kind": kind, "seeds": size.shape[0], "n": size.shape[1]}
        for col in stats_cols:
            y = g.pivot(index="seed_index", columns="index", values=col).to_numpy()
            if not np.isfinite(y).any():
                continue
            e, lo, hi = spearman_effect(size, y, n_boot=min(n_boot, 1000), seed=seed)
            row.update({f"spearman_size_{col}": e, f"ci_low_{col}": lo, f"ci_high_{col}": hi})
        corr_rows.append(row)
    corr = pd.DataFrame(corr_rows)
    effects = offset_effects(per_img, n_boot=n_boot, seed=seed)

    files = _draw(out, by_bin, len(items["index"]), per_img.seed_index.max() + 1)
    files.append(write_csv(out / "offsets_per_image.csv", per))
    files.append(write_csv(out / "offsets_by_bin.csv", by_bin))
    files.append(write_csv(out / "offsets_correlation.csv", corr))
    options = dict(checkpoints=checkpoint_names(checkpoints), data=ds.spec, split=ds.split, per_bin=per_bin,
                   batch_size=batch_size, device=device, n_boot=n_boot,
                   positions="cells whose centre (evenly tiled grid) lies inside the box")
    summary = {"correlation": corr_rows}
    files.append(write_json(out / "offsets.json", metadata("offsets", options, seed, summary=summary,
                                                           effects=[e.to_dict() for e in effects])))
    claims = [f"{e.claim}: {e.measure} = {e.effect:+.3f}, 95% CI {e.ci()}: {e.verdict}." for e in effects]
    for r in corr_rows:
        if r["op"] == "dk" and r["kind"] == "kernel_offset":
            continue
        what = "kernel offsets" if r["kind"] == "kernel_offset" else "image offsets"
        claims.append(f"{LABELS.get(r['op'], r['op'])} {what}: Spearman(size, radial) = "
                      f"{r.get('spearman_size_mean_radial', math.nan):+.3f}, 95% CI "
                      f"[{r.get('ci_low_mean_radial', math.nan):+.3f}, {r.get('ci_high_mean_radial', math.nan):+.3f}].")
    return FigureResult("offsets", "Learnt offsets and sampled kernels by object size", files, summary, corr, claims,
                        effects)


def _draw(out: Path, by_bin: Any, n_images: int, n_seeds: int) -> List[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), layout="constrained")
    for row, (kind, unit) in enumerate((("kernel_offset", "scope cells"), ("offset", "input pixels"))):
        for op in by_bin.op.unique():
            sel = by_bin[(by_bin.op == op) & (by_bin.kind == kind)]
            if len(sel) == 0:
                continue
            axes[row, 0].plot(sel.size_bin, sel.mean_abs, "o-", ms=4, label=LABELS.get(op, op))
            axes[row, 1].plot(sel.size_bin, sel.mean_radial, "o-", ms=4, label=LABELS.get(op, op))
            if kind == "kernel_offset":
                axes[row, 2].plot(sel.size_bin, sel.kernel_dispersion, "o-", ms=4, label=LABELS.get(op, op))
        name = "kernel offsets (DK)" if kind == "kernel_offset" else "image offsets (DCN)"
        axes[row, 0].set_title(f"{name}: mean |offset| ({unit})", fontsize=9)
        axes[row, 1].set_title(f"{name}: mean radial component ({unit}; > 0 spreads out)", fontsize=9)
        axes[row, 1].axhline(0, color="gray", lw=0.8)
        for ax in axes[row]:
            ax.set_xlabel("object size bin (small -> large)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    axes[0, 2].set_title("sampled kernel: var / mean^2 of the taps' RMS (0: flat)", fontsize=9)
    axes[1, 2].axis("off")
    fig.suptitle(f"Learnt offsets inside the object's box, by object size ({n_images} test images x {n_seeds} seed(s), "
                 "all deformable layers)")
    return save_figure(fig, out, "offsets")
