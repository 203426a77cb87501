"""Figure 1: ERFs of rigid, deformable and deformable-kernel networks (the paper's teaser and section 5.3).

* Instance ERFs of the same test images, a small object and a large one, for conv / DCN / DK /
  DK+DCN side by side: the unit is the cell of the last spatial layer whose receptive field is
  centred nearest the object's box centre; the map is ``|d target / d x|`` summed over colour
  (:func:`erf_lab.instance_erf`, preset ``replknet`` with ``grad_rectify="abs"``), shown as a
  fraction of its total mass with one colour scale per image row, over the image, box drawn.
* The data-set ERF of every model (:func:`erf_lab.compute_erf`, preset ``replknet``, centre
  unit) with its metrics.
* The paper's observation, quantified: the fraction of the instance-ERF mass inside the
  object's box, per model and per object-size bin, next to the box's share of the image (what a
  uniform ERF would score).
"""
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ._io import FigureResult, PathLike, metadata, pyplot, save_figure, write_csv, write_json, write_npz
from ._models import (box_mask, checkpoint_first, display_image, grid_geometry, last_spatial_layer, load_models,
                      open_test_data, sample_per_bin, unit_for_point)

__all__ = ["erf_comparison"]

SHOWN_OPS = ("conv", "dcn", "dk", "dk_dcn")
LABELS = {"conv": "conv", "dcn": "DCN", "condconv": "CondConv", "dk_global": "DK (global)", "dk": "DK",
          "dk_dcn": "DK+DCN"}


def erf_comparison(checkpoints: Mapping[str, Any], out_dir: PathLike, *, data: Optional[str] = None,
                   layer: Optional[str] = None, erf_images: int = 32, instance_per_bin: int = 2,
                   shown_ops: Sequence[str] = SHOWN_OPS, device: str = "cpu", seed: int = 0,
                   progress: bool = True) -> FigureResult:
    """Writes the ERF comparison figures and data into ``out_dir``.

    Args:
        checkpoints: ``{op: checkpoint}`` (or ``{op: [checkpoint per seed]}``; the first is used).
        out_dir: output folder: ``erf_instances``, ``erf_dataset``, ``erf_mass_in_box`` (PNG+PDF),
            ``erf_mass_in_box.csv`` (per image), ``erf_mass_by_bin.csv``, ``erf_dataset_metrics.csv``,
            ``erf_instances.npz``, ``erf_comparison.json`` and ``dataset/OP/erf.{npz,json,png}``.
        data: ``--data`` spec (default: the checkpoints' own); the test split is used.
        layer: the layer whose unit is analysed (default: the last spatial layer).
        erf_images: images of each data-set ERF.
        instance_per_bin: test images per size bin for the mass-in-box statistic.
        shown_ops: variants drawn side by side in the instance figure (those available).
        device: computation device.
        seed: seeds the image choice.
        progress: a progress bar over the instance ERFs.

    Returns:
        a :class:`FigureResult`; its table is the mass-in-box fraction per model and size bin.
    """
    import pandas as pd
    import erf_lab
    from erf_lab._progress import progress as progress_bar

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_models(checkpoint_first(checkpoints), device)
    ds = open_test_data(loaded, data)
    ops = list(loaded)
    first = loaded[ops[0]]
    input_size = tuple(first.input_size or (ds.channels, *ds.image_size))
    layers = {op: layer or last_spatial_layer(lm.model, input_size) for op, lm in loaded.items()}
    geos = {op: grid_geometry(lm.model, layers[op], input_size) for op, lm in loaded.items()}
    hw = ds.image_size

    chosen = sample_per_bin(ds.size_bins, instance_per_bin, seed)
    if not chosen:
        raise erf_lab.ErfLabError(f"data {ds.spec!r} has no object size bins: the ERF-in-box statistic needs boxes")
    bins_sorted = sorted(chosen)
    teaser = {"small": int(chosen[bins_sorted[0]][0]), "large": int(chosen[bins_sorted[-1]][0])}

    rows: List[Dict[str, Any]] = []
    instance_maps: Dict[str, np.ndarray] = {}
    jobs = [(op, int(i)) for op in ops for b in bins_sorted for i in chosen[b]]
    items: Dict[int, Dict[str, Any]] = {}
    for op, i in progress_bar(jobs, desc="instance ERFs", unit="ERF", enabled=progress):
        item = items.get(i) or items.setdefault(i, ds[i])
        box = item["box"].tolist()
        unit = unit_for_point(geos[op], box[1] + box[3] / 2, box[0] + box[2] / 2)
        r = erf_lab.instance_erf(loaded[op].model, item["image"], layer=layers[op], unit=unit, preset="replknet",
                                 grad_rectify="abs", device=device, crop=False)
        m = np.clip(r.map, 0, None)
        total = float(m.sum())
        mask = box_mask(box, hw)
        rows.append({"op": op, "index": i, "data_index": int(item["index"]), "label": int(item["label"]),
                     "size_bin": int(item["size_bin"]), "box_x": box[0], "box_y": box[1], "box_w": box[2],
                     "box_h": box[3], "unit_y": unit[0], "unit_x": unit[1],
                     "box_area_fraction": float(mask.mean()),
                     "erf_mass_in_box": float(m[mask].sum() / total) if total > 0 else math.nan})
        if i in teaser.values():
            instance_maps[f"{op}_{i}"] = r.map
    per_image = pd.DataFrame(rows)
    by_bin = (per_image.groupby(["op", "size_bin"])
              .agg(erf_mass_in_box_mean=("erf_mass_in_box", "mean"), erf_mass_in_box_std=("erf_mass_in_box", "std"),
                   box_area_fraction_mean=("box_area_fraction", "mean"), n=("erf_mass_in_box", "size"))
              .reset_index())

    # data-set ERFs
    ds_rows = []
    ds_results = {}
    for op in progress_bar(ops, desc="data-set ERFs", unit="model", enabled=progress):
        r = erf_lab.compute_erf(loaded[op].model, ds, layer=layers[op], unit="center", preset="replknet",
                                num_images=erf_images, seed=seed, device=device, progress=False)
        r.save(out / "dataset" / op, plot=False)
        met = r.metrics()
        ds_results[op] = r
        ds_rows.append({"op": op, "layer": layers[op], "n_images": r.n_images, "luo_size": met["luo_size"],
                        "sigma_y": met["sigma_y"], "sigma_x": met["sigma_x"],
                        "area_ratio@0.2": met["area_ratio_replknet@0.2"],
                        "area_ratio@0.5": met["area_ratio_replknet@0.5"],
                        "radius_mass@0.5": met["radius_mass@0.5"], "radius_mass@0.9": met["radius_mass@0.9"],
                        "gauss_r2": met["gauss_r2"], "erf_trf_ratio": met["erf_trf_ratio"],
                        "center_of_mass_offset": met["center_of_mass_offset"]})
    ds_df = pd.DataFrame(ds_rows)

    plt = pyplot()
    files: List[Path] = []
    from matplotlib.patches import Rectangle

    shown = [op for op in shown_ops if op in loaded] or ops[:4]
    fig, axes = plt.subplots(2, len(shown) + 1, figsize=(2.8 * (len(shown) + 1), 6), layout="constrained",
                             squeeze=False)
    for row, (kind, i) in enumerate(teaser.items()):
        item = items[i]
        img = display_image(ds, item["image"])
        x, y, w, h = item["box"].tolist()
        maps = {op: np.clip(instance_maps[f"{op}_{i}"], 0, None) for op in shown}
        maps = {op: m / m.sum() if m.sum() > 0 else m for op, m in maps.items()}
        vmax = max(float(m.max()) for m in maps.values()) or 1.0
        axes[row, 0].imshow(img)
        axes[row, 0].add_patch(Rectangle((x, y), w, h, fill=False, ec="red", lw=1.5))
        axes[row, 0].set_title(f"{kind} object (bin {int(item['size_bin'])}, {math.sqrt(w * h):.0f} px)", fontsize=9)
        for col, op in enumerate(shown, start=1):
            ax = axes[row, col]
            ax.imshow(img.mean(2), cmap="gray", alpha=0.5)
            im = ax.imshow(maps[op], cmap="inferno", vmin=0, vmax=vmax, alpha=0.8)
            ax.add_patch(Rectangle((x, y), w, h, fill=False, ec="cyan", lw=1.2))
            frac = per_image[(per_image.op == op) & (per_image["index"] == i)].erf_mass_in_box.iloc[0]
            ax.set_title(f"{LABELS.get(op, op)}: {100 * frac:.0f}% of ERF in box", fontsize=9)
        fig.colorbar(im, ax=axes[row, -1], fraction=0.046, label="share of ERF mass")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Instance ERFs (same colour scale per row; box in cyan)")
    files += save_figure(fig, out, "erf_instances")

    cols = min(3, len(ops))
    nrows = math.ceil(len(ops) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.9 * nrows), layout="constrained", squeeze=False)
    for ax, op in zip(axes.flat, ops):
        r, met = ds_results[op], ds_df.set_index("op").loc[op]
        r.plot(ax=ax, title=f"{LABELS.get(op, op)}: Luo size {met.luo_size:.1f}, "
                            f"r(0.2) {met['area_ratio@0.2']:.3f} (n={r.n_images})")
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    fig.suptitle(f"Data-set ERFs of the centre unit of the last spatial layer (replknet preset, log10(x+1)/max)")
    files += save_figure(fig, out, "erf_dataset")

    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for op in ops:
        sel = by_bin[by_bin.op == op]
        ax.plot(sel.size_bin, sel.erf_mass_in_box_mean, "o-", ms=4, label=LABELS.get(op, op))
    base = by_bin.groupby("size_bin").box_area_fraction_mean.mean()
    ax.plot(base.index, base.values, "k--", lw=1, label="box share of the image (uniform ERF)")
    ax.set_xlabel("object size bin (small -> large)")
    ax.set_ylabel("fraction of instance-ERF mass inside the box")
    ax.set_title(f"ERF mass inside the object's box ({instance_per_bin} image(s) per bin per model)", fontsize=10)
    ax.legend(fontsize=8)
    files += save_figure(fig, out, "erf_mass_in_box")

    files.append(write_csv(out / "erf_mass_in_box.csv", per_image))
    files.append(write_csv(out / "erf_mass_by_bin.csv", by_bin))
    files.append(write_csv(out / "erf_dataset_metrics.csv", ds_df))
    imgs = {f"image_{k}": display_image(ds, items[i]["image"]) for k, i in teaser.items()}
    files.append(write_npz(out / "erf_instances.npz", **instance_maps, **imgs,
                           **{f"box_{k}": items[i]["box"].numpy() for k, i in teaser.items()}))
    mean_by_op = per_image.groupby("op").erf_mass_in_box.mean().to_dict()
    summary = {"mass_in_box_mean": mean_by_op, "teaser_indices": teaser, "layers": layers,
               "dataset_luo_size": dict(zip(ds_df.op, ds_df.luo_size))}
    options = dict(checkpoints={k: str(v) for k, v in checkpoint_first(checkpoints).items()}, data=ds.spec,
                   split=ds.split, layer=layers, erf_images=erf_images, instance_per_bin=instance_per_bin,
                   instance_preset="replknet", instance_grad_rectify="abs", dataset_preset="replknet",
                   device=device, geometry={k: {"stride": v["stride"], "center0": v["center0"], "source": v["source"]}
                                            for k, v in geos.items()})
    files.append(write_json(out / "erf_comparison.json", metadata("erf_comparison", options, seed, summary=summary)))

    claims = []
    piv = by_bin.pivot(index="size_bin", columns="op", values="erf_mass_in_box_mean")
    for other in ("dk", "dk_dcn"):
        if other in piv and "conv" in piv:
            wins = int((piv[other] > piv["conv"]).sum())
            claims.append(f"{LABELS[other]} puts more ERF mass inside the box than conv in {wins} of {len(piv)} size "
                          f"bins (mean over images {mean_by_op[other]:.3f} vs {mean_by_op['conv']:.3f}).")
    if "dk" in piv and len(piv) >= 2:
        small, large = piv.index.min(), piv.index.max()
        ratio_dk = ds_df.set_index("op").luo_size
        claims.append(f"Paper: DK adapts the ERF to the object. ERF mass in box, smallest vs largest bin: "
                      + ", ".join(f"{LABELS.get(op, op)} {piv.loc[small, op]:.3f} -> {piv.loc[large, op]:.3f}"
                                  for op in piv.columns)
                      + ". Data-set ERF Luo size: " + ", ".join(f"{LABELS.get(k, k)} {v:.1f}" for k, v in ratio_dk.items())
                      + ".")
    return FigureResult("erf", "ERF comparison: conv, DCN, DK, DK+DCN", files, summary, by_bin, claims)
