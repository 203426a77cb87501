"""Figure 2: t-SNE of the last features, coloured by class and by object-size bin (the paper's section 5.3).

The paper's claim: CondConv's features group by class, Deformable Kernels' by object size.
Features of every model and seed on the same samples (stratified by class and size,
:func:`analyses.features.extract_features`), t-SNE maps for several t-SNE seeds
(:func:`analyses.embedding.embed`), and two k-NN scores per point (:func:`analyses.scores.knn_hits`):
the size bin predicted within each class (``size|class``, immune to any class/size correlation
of the data) and the class. Claim 4 (``docs/design.md`` section 7) compares DK with CondConv on
both, in the t-SNE map (replicates: model seeds x t-SNE seeds) and in the feature space (model
seeds), with bootstrap intervals over the replicates and the samples. The first seed's maps
and scores also go to the analyses HTML report (``report/``).
"""
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ._io import FigureResult, metadata, pyplot, save_figure
from erf_lab.io import PathLike, write_csv, write_json, write_npz
from ._models import checkpoint_names, load_seeds
from .stats import Effect

__all__ = ["tsne_figure", "tsne_effects", "grouping_hits"]

ORDER = ("condconv", "dk", "conv", "dcn", "dk_global", "dk_dcn")
LABELS = {"conv": "conv", "dcn": "DCN", "condconv": "CondConv", "dk_global": "DK (global)", "dk": "DK",
          "dk_dcn": "DK+DCN"}


def grouping_hits(x: np.ndarray, labels: np.ndarray, sizes: np.ndarray, seed: int = 0) -> Dict[str, np.ndarray]:
    """Per point: ``class`` and ``size|class`` k-NN hits (1/0, NaN when not scored) in the space ``x``."""
    from analyses.scores import knn_hits, within_class_bins, within_class_knn_hits

    bins = within_class_bins(labels, sizes)
    return {"class": knn_hits(x, {"class": labels}, seed=seed)["class"][0],
            "size|class": within_class_knn_hits(x, labels, bins, seed=seed)}


def tsne_effects(hits: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], *, n_boot: int = 2000,
                 seed: int = 0) -> List[Effect]:
    """Claim 4 from ``{space: {score: {op: (replicates, samples)}}}`` hits (``space``: ``tsne``/``features``)."""
    from .stats import effect_row, mean_effect

    out: List[Effect] = []
    where = {"tsne": "in the t-SNE map", "features": "in the feature space"}
    for space, scores in hits.items():
        for score, a, b, claim in (("size|class", "dk", "condconv", "DK's features group by object size more than CondConv's"),
                                   ("class", "condconv", "dk", "CondConv's features group by class more than DK's")):
            per_op = scores.get(score, {})
            if not {a, b} <= set(per_op):
                continue
            r, n = per_op[a].shape
            est = mean_effect({a: per_op[a], b: per_op[b]}, lambda m: m[a] - m[b], n_boot=n_boot, seed=seed)
            reps = "model seeds x t-SNE seeds" if space == "tsne" else "model seeds"
            out.append(effect_row(claim, f"kNN {score} accuracy {where[space]}, {a} - {b}", est, +1,
                                  f"{r} replicates ({reps}) x {n} samples, paired", "4"))
    return out


def tsne_figure(checkpoints: Mapping[str, Any], out_dir: PathLike, *, data: Optional[str] = None,
                max_samples: int = 1000, n_iter: int = 500, perplexity: float = 30.0, tsne_runs: int = 2,
                device: str = "cpu", seed: int = 0, progress: bool = True, n_boot: int = 2000) -> FigureResult:
    """Writes ``tsne.{png,pdf}``, ``tsne_grouping.{png,pdf}``, ``tsne_scores.csv``, ``tsne_grouping.csv``,
    ``tsne_embeddings.npz``, ``tsne.json`` and the analyses report (``report/``) into ``out_dir``.

    Args:
        checkpoints: ``{op: [checkpoint per seed]}`` (or ``{op: checkpoint}``).
        out_dir: output folder.
        data: ``--data`` spec (default: the checkpoints' own); the test split is used.
        max_samples: samples embedded (stratified by class and size bin; the same for every model).
        n_iter, perplexity: t-SNE options; tsne_runs: t-SNE seeds per model and seed.
        device: feature extraction device.
        seed: seeds sampling, PCA, the first t-SNE run, the scores and the bootstrap.
        progress: progress bars.
        n_boot: bootstrap replicates of the intervals.

    Returns:
        a :class:`FigureResult` whose table holds the scores per model, its effects claim 4's.
    """
    import pandas as pd

    from analyses.embedding import embed
    from analyses.features import extract_features
    from analyses.scores import score_table
    from analyses.results import ModelEmbedding, TSNEResult
    from erf_lab.progress import progress as progress_bar
    from erf_lab.data import open_data

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_seeds(checkpoints, device)
    ops = [op for op in ORDER if op in loaded] + [op for op in loaded if op not in ORDER]
    first = loaded[ops[0]][0]
    size = first.input_size
    ds = open_data(data or first.meta.get("data_spec") or "digits-ms", split="test",
                   image_size=None if size is None else tuple(size[1:]), channels=3 if size is None else size[0])
    hits: Dict[str, Dict[str, Dict[str, List[np.ndarray]]]] = {"tsne": {}, "features": {}}
    shown: List[ModelEmbedding] = []
    tables = []
    jobs = [(op, k) for op in ops for k in range(len(loaded[op]))]
    for op, k in progress_bar(jobs, desc="t-SNE", unit="model", enabled=progress):
        feats = extract_features(loaded[op][k], ds, max_samples=max_samples, device=device, seed=seed, progress=False)
        for score, h in grouping_hits(feats.features, feats.labels, feats.sizes, seed).items():
            hits["features"].setdefault(score, {}).setdefault(op, []).append(h)
        for r in range(tsne_runs):
            coords, info = embed(feats.features, perplexity=perplexity, n_iter=n_iter, seed=seed + r, progress=False)
            for score, h in grouping_hits(coords, feats.labels, feats.sizes, seed).items():
                hits["tsne"].setdefault(score, {}).setdefault(op, []).append(h)
            if k == 0 and r == 0:
                table, details = score_table(feats.features, coords, feats.labels, feats.size_bins, feats.sizes,
                                             model=op, n_size_bins=max(2, len(feats.size_bin_edges or []) - 1),
                                             seed=seed, progress=False)
                tables.append(table)
                shown.append(ModelEmbedding(name=op, coords=coords, labels=feats.labels, size_bins=feats.size_bins,
                                            sizes=feats.sizes, indices=feats.indices,
                                            meta={"features": {k2: v for k2, v in feats.meta.items() if k2 != "versions"},
                                                  "embedding": info, "scores": details}))
    arrays = {sp: {sc: {op: np.stack(v) for op, v in per.items()} for sc, per in d.items()} for sp, d in hits.items()}
    effects = tsne_effects(arrays, n_boot=n_boot, seed=seed)
    scores = pd.concat(tables, ignore_index=True)
    report = TSNEResult(models=shown, scores=scores, class_names=list(getattr(ds, "class_names", []) or []),
                        size_bin_edges=getattr(ds, "size_bin_edges", None),
                        meta={"options": {"max_samples": max_samples, "n_iter": n_iter, "perplexity": perplexity,
                                          "seed": seed}, "seed": seed, "data": ds.spec, "split": "test"})
    report.save(out / "report")
    grouping = _grouping_table(arrays, n_boot, seed)
    files = _draw(out, shown, scores, grouping, tsne_runs)
    files.append(write_csv(out / "tsne_scores.csv", scores))
    files.append(write_csv(out / "tsne_grouping.csv", grouping))
    files.append(write_npz(out / "tsne_embeddings.npz", **{f"{e.name}_{key}": getattr(e, key) for e in shown
                                                             for key in ("coords", "labels", "size_bins")}))
    feat = scores[scores.space == "features"]

    def score(model: str, lab: str, col: str = "knn_acc") -> float:
        s = feat[(feat.model == model) & (feat.labels == lab)]
        return float(s[col].iloc[0]) if len(s) else float("nan")

    table = pd.DataFrame([{"model": op, "knn_class": score(op, "class"), "knn_size": score(op, "size"),
                           "knn_size_within_class": score(op, "size|class"), "chance_class": score(op, "class", "chance"),
                           "chance_size": score(op, "size", "chance"),
                           "chance_size_within_class": score(op, "size|class", "chance"),
                           "silhouette_class": score(op, "class", "silhouette"),
                           "silhouette_size_within_class": score(op, "size|class", "silhouette")} for op in ops])
    claims = [f"{e.claim}: {e.measure} = {e.effect:+.3f}, 95% CI {e.ci()}: {e.verdict}." for e in effects]
    options = dict(checkpoints=checkpoint_names(checkpoints), data=ds.spec, max_samples=max_samples,
                   n_iter=n_iter, perplexity=perplexity, tsne_runs=tsne_runs, device=device, n_boot=n_boot)
    summary = {"scores": table.to_dict("records"), "grouping": grouping.to_dict("records")}
    files.append(write_json(out / "tsne.json", metadata("tsne", options, seed, summary=summary,
                                                        effects=[e.to_dict() for e in effects])))
    return FigureResult("tsne", "t-SNE by class and by object size", files, summary, grouping, claims, effects)


def _grouping_table(arrays: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]], n_boot: int, seed: int) -> Any:
    """Per (space, score, model): the k-NN accuracy over replicates and samples with its 95% interval."""
    import pandas as pd

    from .stats import mean_effect

    rows = []
    for space, scores in arrays.items():
        for score, per_op in scores.items():
            for op, h in per_op.items():
                e, lo, hi = mean_effect({"h": h}, lambda m: m["h"], n_boot=min(n_boot, 1000), seed=seed)
                rows.append({"space": space, "score": score, "model": op, "knn_acc": e, "ci_low": lo, "ci_high": hi,
                             "replicates": h.shape[0], "samples": h.shape[1]})
    return pd.DataFrame(rows)


def _draw(out: Path, shown: Sequence[Any], scores: Any, grouping: Any, tsne_runs: int) -> List[Path]:
    plt = pyplot()
    n = len(shown)
    fig, axes = plt.subplots(2, n, figsize=(2.9 * n, 6), layout="constrained", squeeze=False)
    for col, emb in enumerate(shown):
        for row, (key, cmap) in enumerate((("labels", "tab10"), ("size_bins", "viridis"))):
            ax = axes[row, col]
            sc = ax.scatter(emb.coords[:, 0], emb.coords[:, 1], c=getattr(emb, key), cmap=cmap, s=4, linewidths=0)
            lab = "class" if key == "labels" else "size|class"
            sel = grouping[(grouping.model == emb.name) & (grouping.score == lab) & (grouping.space == "tsne")]
            knn = float(sel.knn_acc.iloc[0]) if len(sel) else float("nan")
            ax.set_title(f"{LABELS.get(emb.name, emb.name)} by {'class' if row == 0 else 'size'}\n"
                         f"kNN {lab} in the map: {knn:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        if col == n - 1:
            fig.colorbar(sc, ax=axes[1, col], fraction=0.046, label="size bin")
    fig.suptitle("t-SNE of the last features (first seed): top coloured by class, bottom by object-size bin")
    files = save_figure(fig, out, "tsne")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for ax, score in zip(axes, ("class", "size|class")):
        sel = grouping[grouping.score == score]
        models = list(dict.fromkeys(sel.model))
        for j, space in enumerate(("tsne", "features")):
            g = sel[sel.space == space].set_index("model").reindex(models)
            xs = np.arange(len(models)) + (j - 0.5) * 0.38
            err = np.stack([g.knn_acc - g.ci_low, g.ci_high - g.knn_acc]).clip(min=0)
            ax.bar(xs, g.knn_acc, width=0.38, yerr=np.nan_to_num(err), capsize=3,
                   label="t-SNE map" if space == "tsne" else "features")
        ax.set_xticks(np.arange(len(models)), [LABELS.get(m, m) for m in models])
        ax.set_ylabel(f"kNN {score} accuracy")
        ax.set_title(f"grouping by {'class' if score == 'class' else 'size within class'} (95% CI)", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"k-NN scores over model seeds (and {tsne_runs} t-SNE seed(s) for the map)")
    return files + save_figure(fig, out, "tsne_grouping")
