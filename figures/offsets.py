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

They are averaged per object-size bin. The expectation from the paper (DK adapts the effective
kernel to the object's scale) is a positive rank correlation between size and ``mean_radial``.
"""
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from ._io import FigureResult, PathLike, metadata, pyplot, save_figure, write_csv, write_json
from ._models import checkpoint_first, load_models, open_test_data

__all__ = ["offsets_by_size"]

LABELS = {"dcn": "DCN", "dk_global": "DK (global)", "dk": "DK", "dk_dcn": "DK+DCN"}


def _deformable_modules(model: nn.Module) -> Dict[str, nn.Module]:
    from dk_ops.modules import DeformConv2d, _DeformKernelBase

    return {n: m for n, m in model.named_modules() if isinstance(m, (_DeformKernelBase, DeformConv2d))}


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


def offsets_by_size(checkpoints: Mapping[str, Any], out_dir: PathLike, *, data: Optional[str] = None,
                    num_images: int = 100, batch_size: int = 32, device: str = "cpu", seed: int = 0,
                    progress: bool = True) -> FigureResult:
    """Writes ``offsets.{png,pdf}``, ``offsets_per_image.csv``, ``offsets_by_bin.csv`` and ``offsets.json``.

    Args:
        checkpoints: ``{op: checkpoint}`` (or lists per seed; the first is used); variants without
            deformable layers (conv, condconv) are skipped.
        out_dir: output folder.
        data: ``--data`` spec (default: the checkpoints' own); its test split is used.
        num_images: seeded random test images.
        batch_size, device: of the forward passes.
        seed: seeds the image choice.
        progress: a progress bar.

    Returns:
        a :class:`FigureResult` whose table holds the per-bin means.
    """
    import pandas as pd
    from scipy.stats import spearmanr
    from erf_lab._progress import progress as progress_bar
    from erf_lab.errors import ErfLabError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_models(checkpoint_first(checkpoints), device)
    loaded = {op: lm for op, lm in loaded.items() if _deformable_modules(lm.model)}
    if not loaded:
        raise ErfLabError("none of the models has deformable layers (dcn, dk_global, dk or dk_dcn)")
    ds = open_test_data(loaded, data)
    n = min(num_images, len(ds))
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    rows: List[Dict[str, Any]] = []
    for op, lm in loaded.items():
        mods = _deformable_modules(lm.model)
        captured: Dict[str, Dict[str, torch.Tensor]] = {}
        busy = {"on": False}

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

        handles = [m.register_forward_hook(hook(name)) for name, m in mods.items()]
        try:
            for s in progress_bar(range(0, n, batch_size), desc=f"offsets {op}", unit="batch", enabled=progress):
                items = [ds[int(i)] for i in idx[s:s + batch_size]]
                x = torch.stack([it["image"] for it in items]).to(device)
                boxes = torch.stack([it["box"] for it in items])
                captured.clear()
                with torch.no_grad():
                    lm.model(x)
                for name, used in captured.items():
                    mod = mods[name]
                    kh, kw = mod.kernel_size
                    dirs = _tap_directions(kh, kw)
                    hw_out = tuple(int(v) for v in used["_hw_out"])
                    mask = _box_masks(boxes, ds.image_size, hw_out)
                    for kind in ("kernel_offset", "offset"):
                        if kind not in used:
                            continue
                        mean_abs, radial = _stats(used[kind], kh * kw, dirs, mask)
                        for k, it in enumerate(items):
                            rows.append({"op": op, "layer": name, "kind": kind, "index": int(idx[s + k]),
                                         "size_bin": int(it["size_bin"]),
                                         "size": float(math.sqrt(float(it["box"][2]) * float(it["box"][3]))),
                                         "mean_abs": float(mean_abs[k]), "mean_radial": float(radial[k])})
        finally:
            for h in handles:
                h.remove()
    per = pd.DataFrame(rows)
    per_img = per.groupby(["op", "kind", "index", "size_bin", "size"], as_index=False)[["mean_abs", "mean_radial"]].mean()
    by_bin = (per_img.groupby(["op", "kind", "size_bin"])
              .agg(mean_abs=("mean_abs", "mean"), mean_radial=("mean_radial", "mean"),
                   mean_radial_std=("mean_radial", "std"), n=("mean_abs", "size")).reset_index())
    corr_rows = []
    for (op, kind), g in per_img.groupby(["op", "kind"]):
        rho, p = spearmanr(g["size"], g["mean_radial"]) if g["mean_radial"].nunique() > 1 else (math.nan, math.nan)
        rho_abs, p_abs = spearmanr(g["size"], g["mean_abs"]) if g["mean_abs"].nunique() > 1 else (math.nan, math.nan)
        corr_rows.append({"op": op, "kind": kind, "n": len(g), "spearman_size_radial": float(rho),
                          "p_radial": float(p), "spearman_size_abs": float(rho_abs), "p_abs": float(p_abs)})
    corr = pd.DataFrame(corr_rows)

    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), layout="constrained")
    for row, (kind, unit) in enumerate((("kernel_offset", "scope cells"), ("offset", "input pixels"))):
        for op in by_bin.op.unique():
            sel = by_bin[(by_bin.op == op) & (by_bin.kind == kind)]
            if len(sel) == 0:
                continue
            axes[row, 0].plot(sel.size_bin, sel.mean_abs, "o-", ms=4, label=LABELS.get(op, op))
            axes[row, 1].plot(sel.size_bin, sel.mean_radial, "o-", ms=4, label=LABELS.get(op, op))
        name = "kernel offsets (DK)" if kind == "kernel_offset" else "image offsets (DCN)"
        axes[row, 0].set_title(f"{name}: mean |offset| ({unit})", fontsize=9)
        axes[row, 1].set_title(f"{name}: mean radial component ({unit}; > 0 spreads out)", fontsize=9)
        axes[row, 1].axhline(0, color="gray", lw=0.8)
        for ax in axes[row]:
            ax.set_xlabel("object size bin (small -> large)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.suptitle(f"Learnt offsets inside the object's box, by object size ({n} test images, all deformable layers)")
    files = save_figure(fig, out, "offsets")
    files.append(write_csv(out / "offsets_per_image.csv", per))
    files.append(write_csv(out / "offsets_by_bin.csv", by_bin))
    files.append(write_csv(out / "offsets_correlation.csv", corr))
    options = dict(checkpoints={k: str(v) for k, v in checkpoint_first(checkpoints).items()}, data=ds.spec,
                   split=ds.split, num_images=n, batch_size=batch_size, device=device,
                   positions="cells whose centre (evenly tiled grid) lies inside the box")
    summary = {"correlation": corr_rows}
    files.append(write_json(out / "offsets.json", metadata("offsets", options, seed, summary=summary)))
    claims = []
    for r in corr_rows:
        what = "kernel offsets" if r["kind"] == "kernel_offset" else "image offsets"
        verdict = ("spread out more for larger objects" if r["spearman_size_radial"] > 0 and r["p_radial"] < 0.05
                   else "contract more for larger objects" if r["spearman_size_radial"] < 0 and r["p_radial"] < 0.05
                   else "show no significant size trend")
        claims.append(f"{LABELS.get(r['op'], r['op'])} {what}: Spearman(size, radial) = {r['spearman_size_radial']:.3f} "
                      f"(p = {r['p_radial']:.2g}, n = {r['n']}): they {verdict}.")
    return FigureResult("offsets", "Learnt offsets by object size", files, summary, corr, claims)
