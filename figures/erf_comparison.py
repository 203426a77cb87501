"""Figure 1: ERFs of rigid, deformable and deformable-kernel networks (the paper's teaser and section 5.3).

* Instance ERFs of the same test images, a small object and a large one, for conv / DCN / DK /
  DK+DCN side by side: the unit is the cell of the last spatial layer whose receptive field is
  centred nearest the object's box centre; the map is ``|d target / d x|`` summed over colour
  (:func:`erf_lab.instance_erf`, preset ``replknet`` with ``grad_rectify="abs"``), shown as a
  fraction of its total mass with one colour scale per image row, over the image, box drawn.
* The data-set ERF of every model (:func:`erf_lab.compute_erf`, preset ``replknet``, centre
  unit) with its metrics.
* The paper's observation, quantified on ``instance_per_bin`` test images per object-size bin
  (the same images for every model and seed): the fraction of the instance-ERF mass inside the
  object's box, next to the box's share of the image (what a uniform ERF would score), and the
  ERF's spread (mass-weighted RMS radius per axis, :func:`figures._models.spread`) relative to
  the box side ``sqrt(w h)``; effects with bootstrap intervals over seeds and images
  (:mod:`figures.stats`) for claims 2 and 5 of ``docs/design.md`` section 7.
"""
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from erf_lab.io import PathLike, write_csv, write_json, write_npz

from ._io import FigureResult, metadata, pyplot, save_figure
from ._models import (box_mask, checkpoint_names, display_image, grid_geometry, instance_erf_maps, last_spatial_layer, load_seeds,
                      mass_in_box, open_test_data, sample_per_bin, spread, stack_items, unit_for_point)
from .stats import Effect

__all__ = ["erf_comparison", "erf_effects"]

SHOWN_OPS = ("conv", "dcn", "dk", "dk_dcn")
LABELS = {"conv": "conv", "dcn": "DCN", "condconv": "CondConv", "dk_global": "DK (global)", "dk": "DK",
          "dk_dcn": "DK+DCN"}


def erf_effects(mass: Mapping[str, np.ndarray], rel_spread: Mapping[str, np.ndarray], *, n_boot: int = 2000,
                seed: int = 0) -> List[Effect]:
    """Claims 2 and 5 from per-image ``{op: (seeds, images)}`` ERF mass in the box and relative spread."""
    from .stats import effect_row, mean_effect

    s, n = next(iter(mass.values())).shape
    size = f"{s} seed(s) x {n} test images, paired"
    out: List[Effect] = []

    def diff(values, a, b, claim, what, cid):
        if {a, b} <= set(values):
            est = mean_effect({k: values[k] for k in (a, b)}, lambda m: m[a] - m[b], n_boot=n_boot, seed=seed)
            out.append(effect_row(claim, f"{what} {a} - {b}", est, +1, size, cid))

    diff(mass, "dk", "dcn", "DK's ERF concentrates inside the object more than DCN's", "ERF mass in box", "2")
    diff(mass, "dk", "conv", "DK's ERF concentrates inside the object more than the rigid conv's", "ERF mass in box", "2")
    diff(rel_spread, "dcn", "dk", "DCN's ERF spreads wider than DK's", "ERF spread / box side", "2")
    diff(mass, "dk_dcn", "dk", "DK+DCN combine: more ERF mass in the box than DK alone", "ERF mass in box", "5")
    diff(mass, "dk_dcn", "dcn", "DK+DCN combine: more ERF mass in the box than DCN alone", "ERF mass in box", "5")
    return out


def _instance_rows(loaded: Mapping[str, List[Any]], items: Dict[str, Any], input_size, layer: Optional[str],
                   keep: Sequence[int], device: str, progress: bool) -> Tuple[List[Dict[str, Any]], Dict[str, np.ndarray], Dict[str, str]]:
    """Per-image rows of every (op, seed), the maps of the ``keep`` positions (first seed) and the layers."""
    from erf_lab.progress import progress as progress_bar

    boxes = items["box"]
    side = np.sqrt(boxes[:, 2] * boxes[:, 3])
    hw = tuple(items["image"].shape[-2:])
    area = np.array([box_mask(b, hw).mean() for b in boxes])
    rows: List[Dict[str, Any]] = []
    kept: Dict[str, np.ndarray] = {}
    layers: Dict[str, str] = {}
    jobs = [(op, k) for op, lms in loaded.items() for k in range(len(lms))]
    for op, k in progress_bar(jobs, desc="instance ERFs", unit="model", enabled=progress):
        model = loaded[op][k].model
        name = layers.setdefault(op, layer or last_spatial_layer(model, input_size))
        geo = grid_geometry(model, name, input_size)
        units = np.array([unit_for_point(geo, b[1] + b[3] / 2, b[0] + b[2] / 2) for b in boxes])
        maps = instance_erf_maps(model, items["image"], name, units, device=device)
        mass, spr = mass_in_box(maps, boxes), spread(maps)
        for j in range(len(boxes)):
            rows.append({"op": op, "seed_index": k, "index": int(items["index"][j]), "label": int(items["label"][j]),
                         "size_bin": int(items["size_bin"][j]), "box_x": boxes[j, 0], "box_y": boxes[j, 1],
                         "box_w": boxes[j, 2], "box_h": boxes[j, 3], "unit_y": int(units[j, 0]),
                         "unit_x": int(units[j, 1]), "box_area_fraction": float(area[j]),
                         "erf_mass_in_box": float(mass[j]), "erf_spread": float(spr[j]),
                         "erf_spread_rel": float(spr[j] / side[j])})
        if k == 0:
            for j in keep:
                kept[f"{op}_{int(items['index'][j])}"] = maps[j]
    return rows, kept, layers


def _by_bin(per_image: Any, n_boot: int, seed: int) -> Any:
    """Per (op, size bin): means of mass in box and relative spread with 95% intervals over seeds and images."""
    import pandas as pd

    from .stats import bootstrap

    rows = []
    for (op, b), g in per_image.groupby(["op", "size_bin"]):
        row = {"op": op, "size_bin": int(b), "n": int(g["index"].nunique()),
               "box_area_fraction_mean": float(g.box_area_fraction.mean())}
        for col, key in (("erf_mass_in_box", "erf_mass_in_box"), ("erf_spread_rel", "erf_spread_rel")):
            grid = g.pivot(index="seed_index", columns="index", values=col).to_numpy()
            e, lo, hi = bootstrap({"a": grid}, lambda m: float(np.nanmean(m["a"])), n_boot=n_boot, seed=seed)
            row.update({f"{key}_mean": e, f"{key}_ci_low": lo, f"{key}_ci_high": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def _grid(per_image: Any, col: str) -> Dict[str, np.ndarray]:
    return {op: g.pivot(index="seed_index", columns="index", values=col).to_numpy()
            for op, g in per_image.groupby("op", sort=False)}


def _dataset_erfs(firsts: Mapping[str, Any], ds: Any, layers: Mapping[str, str], erf_images: int, seed: int,
                  device: str, progress: bool, out: Path):
    """The data-set ERF of each model's first seed (saved to ``out/dataset/OP``): (metrics table, results)."""
    import pandas as pd
    import erf_lab
    from erf_lab.progress import progress as progress_bar

    rows, results = [], {}
    for op in progress_bar(list(firsts), desc="data-set ERFs", unit="model", enabled=progress):
        r = erf_lab.compute_erf(firsts[op].model, ds, layer=layers[op], unit="center", preset="replknet",
                                num_images=erf_images, seed=seed, device=device, progress=False)
        r.save(out / "dataset" / op, plot=False)
        met = r.metrics()
        results[op] = r
        rows.append({"op": op, "layer": layers[op], "n_images": r.n_images, "luo_size": met["luo_size"],
                     "sigma_y": met["sigma_y"], "sigma_x": met["sigma_x"],
                     "area_ratio@0.2": met["area_ratio_replknet@0.2"], "area_ratio@0.5": met["area_ratio_replknet@0.5"],
                     "radius_mass@0.5": met["radius_mass@0.5"], "radius_mass@0.9": met["radius_mass@0.9"],
                     "gauss_r2": met["gauss_r2"], "erf_trf_ratio": met["erf_trf_ratio"],
                     "center_of_mass_offset": met["center_of_mass_offset"]})
    return pd.DataFrame(rows), results


def erf_comparison(checkpoints: Mapping[str, Any], out_dir: PathLike, *, data: Optional[str] = None,
                   layer: Optional[str] = None, erf_images: int = 32, instance_per_bin: int = 50,
                   shown_ops: Sequence[str] = SHOWN_OPS, device: str = "cpu", seed: int = 0,
                   progress: bool = True, n_boot: int = 2000) -> FigureResult:
    """Writes the ERF comparison figures and data into ``out_dir``.

    Args:
        checkpoints: ``{op: [checkpoint per seed]}`` (or ``{op: checkpoint}``); the statistics
            pool every seed, the pictures show the first.
        out_dir: output folder: ``erf_instances``, ``erf_dataset``, ``erf_mass_in_box`` (PNG+PDF),
            ``erf_mass_in_box.csv`` (per image and seed), ``erf_mass_by_bin.csv``,
            ``erf_dataset_metrics.csv``, ``erf_instances.npz``, ``erf_comparison.json`` and
            ``dataset/OP/erf.{npz,json,png}``.
        data: ``--data`` spec (default: the checkpoints' own); the test split is used.
        layer: the layer whose unit is analysed (default: the last spatial layer).
        erf_images: images of each data-set ERF.
        instance_per_bin: test images per size bin for the instance-ERF statistics.
        shown_ops: variants drawn side by side in the instance figure (those available).
        device: computation device.
        seed: seeds the image choice and the bootstrap.
        progress: a progress bar over the models.
        n_boot: bootstrap replicates of the intervals.

    Returns:
        a :class:`FigureResult`; its table is the mass-in-box fraction per model and size bin,
        its effects those of claims 2 and 5.
    """
    import pandas as pd
    import erf_lab

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_seeds(checkpoints, device)
    firsts = {op: lms[0] for op, lms in loaded.items()}
    ds = open_test_data(firsts, data)
    ops = list(loaded)
    first = firsts[ops[0]]
    input_size = tuple(first.input_size or (ds.channels, *ds.image_size))

    chosen = sample_per_bin(ds.size_bins, instance_per_bin, seed)
    if not chosen:
        raise erf_lab.ErfLabError(f"data {ds.spec!r} has no object size bins: the ERF-in-box statistic needs boxes")
    bins_sorted = sorted(chosen)
    idx = np.concatenate([chosen[b] for b in bins_sorted])
    items = stack_items(ds, idx)
    teaser = {"small": int(chosen[bins_sorted[0]][0]), "large": int(chosen[bins_sorted[-1]][0])}
    keep = [int(np.nonzero(idx == i)[0][0]) for i in teaser.values()]
    rows, instance_maps, layers = _instance_rows(loaded, items, input_size, layer, keep, device, progress)
    per_image = pd.DataFrame(rows)
    by_bin = _by_bin(per_image, min(n_boot, 1000), seed)
    effects = erf_effects(_grid(per_image, "erf_mass_in_box"), _grid(per_image, "erf_spread_rel"),
                          n_boot=n_boot, seed=seed)
    n_seeds = int(per_image.seed_index.max()) + 1

    ds_df, ds_results = _dataset_erfs(firsts, ds, layers, erf_images, seed, device, progress, out)

    files = _draw(out, ds, items, idx, teaser, instance_maps, per_image, by_bin, ds_df, ds_results,
                  [op for op in shown_ops if op in loaded] or ops[:4], ops, instance_per_bin, n_seeds)
    files.append(write_csv(out / "erf_mass_in_box.csv", per_image))
    files.append(write_csv(out / "erf_mass_by_bin.csv", by_bin))
    files.append(write_csv(out / "erf_dataset_metrics.csv", ds_df))
    pos = {i: int(np.nonzero(idx == i)[0][0]) for i in teaser.values()}
    imgs = {f"image_{k}": display_image(ds, items["image"][pos[i]]) for k, i in teaser.items()}
    files.append(write_npz(out / "erf_instances.npz", **instance_maps, **imgs,
                           **{f"box_{k}": items["box"][pos[i]] for k, i in teaser.items()}))
    mean_by_op = per_image.groupby("op").erf_mass_in_box.mean().to_dict()
    summary = {"mass_in_box_mean": mean_by_op, "teaser_indices": teaser, "layers": layers,
               "dataset_luo_size": dict(zip(ds_df.op, ds_df.luo_size)), "instance_images": int(len(idx)),
               "seeds": n_seeds}
    options = dict(checkpoints=checkpoint_names(checkpoints), data=ds.spec,
                   split=ds.split, layer=layers, erf_images=erf_images, instance_per_bin=instance_per_bin,
                   instance_preset="replknet", instance_grad_rectify="abs", dataset_preset="replknet",
                   device=device, n_boot=n_boot)
    files.append(write_json(out / "erf_comparison.json", metadata("erf_comparison", options, seed, summary=summary,
                                                                  effects=[e.to_dict() for e in effects])))
    claims = [f"{e.claim}: {e.measure} = {e.effect:+.4f}, 95% CI {e.ci()}: {e.verdict}." for e in effects]
    if len(bins_sorted) >= 2:
        small, large = bins_sorted[0], bins_sorted[-1]
        t = by_bin.set_index(["op", "size_bin"]).erf_mass_in_box_mean
        claims.append("ERF mass in box, smallest vs largest bin: "
                      + ", ".join(f"{LABELS.get(op, op)} {t[(op, small)]:.3f} -> {t[(op, large)]:.3f}" for op in ops)
                      + ". Data-set ERF Luo size: "
                      + ", ".join(f"{LABELS.get(k, k)} {v:.1f}" for k, v in zip(ds_df.op, ds_df.luo_size)) + ".")
    return FigureResult("erf", "ERF comparison: conv, DCN, DK, DK+DCN", files, summary, by_bin, claims, effects)


def _draw(out: Path, ds: Any, items: Dict[str, Any], idx: np.ndarray, teaser: Dict[str, int],
          instance_maps: Dict[str, np.ndarray], per_image: Any, by_bin: Any, ds_df: Any, ds_results: Dict[str, Any],
          shown: Sequence[str], ops: Sequence[str], instance_per_bin: int, n_seeds: int) -> List[Path]:
    """The three figures: instance ERFs (first seed), data-set ERFs, mass in box and spread by size bin."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    files: List[Path] = []
    fig, axes = plt.subplots(2, len(shown) + 1, figsize=(2.8 * (len(shown) + 1), 6), layout="constrained",
                             squeeze=False)
    first_seed = per_image[per_image.seed_index == 0]
    for row, (kind, i) in enumerate(teaser.items()):
        j = int(np.nonzero(idx == i)[0][0])
        img = display_image(ds, items["image"][j])
        x, y, w, h = items["box"][j].tolist()
        maps = {op: np.clip(instance_maps[f"{op}_{i}"], 0, None) for op in shown}
        maps = {op: m / m.sum() if m.sum() > 0 else m for op, m in maps.items()}
        vmax = max(float(m.max()) for m in maps.values()) or 1.0
        axes[row, 0].imshow(img)
        axes[row, 0].add_patch(Rectangle((x, y), w, h, fill=False, ec="red", lw=1.5))
        axes[row, 0].set_title(f"{kind} object (bin {int(items['size_bin'][j])}, {math.sqrt(w * h):.0f} px)", fontsize=9)
        for col, op in enumerate(shown, start=1):
            ax = axes[row, col]
            ax.imshow(img.mean(2), cmap="gray", alpha=0.5)
            im = ax.imshow(maps[op], cmap="inferno", vmin=0, vmax=vmax, alpha=0.8)
            ax.add_patch(Rectangle((x, y), w, h, fill=False, ec="cyan", lw=1.2))
            frac = first_seed[(first_seed.op == op) & (first_seed["index"] == i)].erf_mass_in_box.iloc[0]
            ax.set_title(f"{LABELS.get(op, op)}: {100 * frac:.0f}% of ERF in box", fontsize=9)
        fig.colorbar(im, ax=axes[row, -1], fraction=0.046, label="share of ERF mass")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Instance ERFs, first seed (same colour scale per row; box in cyan)")
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
    fig.suptitle("Data-set ERFs of the centre unit of the last spatial layer (first seed; replknet preset, log10(x+1)/max)")
    files += save_figure(fig, out, "erf_dataset")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), layout="constrained")
    for op in ops:
        sel = by_bin[by_bin.op == op]
        for ax, key in zip(axes, ("erf_mass_in_box", "erf_spread_rel")):
            ax.plot(sel.size_bin, sel[f"{key}_mean"], "o-", ms=4, label=LABELS.get(op, op))
            ax.fill_between(sel.size_bin, sel[f"{key}_ci_low"], sel[f"{key}_ci_high"], alpha=0.12)
    base = by_bin.groupby("size_bin").box_area_fraction_mean.mean()
    axes[0].plot(base.index, base.values, "k--", lw=1, label="box share of the image (uniform ERF)")
    axes[0].set_ylabel("fraction of instance-ERF mass inside the box")
    axes[1].set_ylabel("ERF spread (RMS radius) / box side")
    for ax in axes:
        ax.set_xlabel("object size bin (small -> large)")
        ax.legend(fontsize=8)
    fig.suptitle(f"Instance ERFs by object size: {instance_per_bin} image(s) per bin x {n_seeds} seed(s), "
                 "bands: 95% bootstrap CI")
    files += save_figure(fig, out, "erf_mass_in_box")
    return files
