"""Figure 2: t-SNE of the last features, coloured by class and by object-size bin (the paper's section 5.3).

The paper's claim: CondConv's features group by class, Deformable Kernels' by object size.
The embeddings, scores and the per-model HTML report come from :func:`analyses.run_tsne`
(the same samples for every model, stratified by class and size); this recipe draws the
variants side by side and states, from the scores, whether the claim holds here. The test
is the kNN accuracy of predicting the size bin within each class (``size|class``, immune to
any class/size correlation of the data) and of predicting the class, in the feature space.
"""
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ._io import FigureResult, PathLike, metadata, pyplot, save_figure, write_csv, write_json, write_npz
from ._models import checkpoint_first

__all__ = ["tsne_figure"]

ORDER = ("condconv", "dk", "conv", "dcn", "dk_global", "dk_dcn")
LABELS = {"conv": "conv", "dcn": "DCN", "condconv": "CondConv", "dk_global": "DK (global)", "dk": "DK",
          "dk_dcn": "DK+DCN"}


def tsne_figure(checkpoints: Mapping[str, Any], out_dir: PathLike, *, data: Optional[str] = None,
                max_samples: int = 400, n_iter: int = 500, perplexity: float = 30.0, device: str = "cpu",
                seed: int = 0, progress: bool = True) -> FigureResult:
    """Writes ``tsne.{png,pdf}``, ``tsne_scores.csv``, ``tsne_embeddings.npz``, ``tsne.json`` and
    the analyses report (``report/``) into ``out_dir``.

    Args:
        checkpoints: ``{op: checkpoint}`` (or lists per seed; the first is used).
        out_dir: output folder.
        data: ``--data`` spec (default: the checkpoints' own); the test split is used.
        max_samples: samples embedded (stratified by class and size bin; the same for every model).
        n_iter, perplexity: t-SNE options.
        device: feature extraction device.
        seed: seeds sampling, PCA, t-SNE and the scores.
        progress: progress bars.

    Returns:
        a :class:`FigureResult` whose table holds the feature-space scores per model.
    """
    import analyses

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = checkpoint_first(checkpoints)
    ops = [op for op in ORDER if op in paths] + [op for op in paths if op not in ORDER]
    res = analyses.run_tsne([str(paths[op]) for op in ops], names=ops, data=data, max_samples=max_samples,
                            n_iter=n_iter, perplexity=perplexity, device=device, seed=seed, out=out / "report",
                            progress=progress)
    scores = res.scores.copy()

    plt = pyplot()
    n = len(res.models)
    fig, axes = plt.subplots(2, n, figsize=(2.9 * n, 6), layout="constrained", squeeze=False)
    for col, emb in enumerate(res.models):
        for row, (key, cmap) in enumerate((("labels", "tab10"), ("size_bins", "viridis"))):
            ax = axes[row, col]
            c = getattr(emb, key)
            sc = ax.scatter(emb.coords[:, 0], emb.coords[:, 1], c=c, cmap=cmap, s=4, linewidths=0)
            lab = "class" if key == "labels" else "size|class"
            sel = scores[(scores.model == emb.name) & (scores.labels == lab) & (scores.space == "features")]
            knn = float(sel.knn_acc.iloc[0]) if len(sel) else float("nan")
            ax.set_title(f"{LABELS.get(emb.name, emb.name)} by {'class' if row == 0 else 'size'}\n"
                         f"kNN {lab}: {knn:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        if col == n - 1:
            fig.colorbar(sc, ax=axes[1, col], fraction=0.046, label="size bin")
    fig.suptitle("t-SNE of the last features: top coloured by class, bottom by object-size bin")
    files = save_figure(fig, out, "tsne")
    files.append(write_csv(out / "tsne_scores.csv", scores))
    arrays = {}
    for emb in res.models:
        arrays[f"{emb.name}_coords"] = emb.coords
        arrays[f"{emb.name}_labels"] = emb.labels
        arrays[f"{emb.name}_size_bins"] = emb.size_bins
    files.append(write_npz(out / "tsne_embeddings.npz", **arrays))

    feat = scores[scores.space == "features"]

    def score(model: str, lab: str, col: str = "knn_acc") -> float:
        s = feat[(feat.model == model) & (feat.labels == lab)]
        return float(s[col].iloc[0]) if len(s) else float("nan")

    table_rows = [{"model": op, "knn_class": score(op, "class"), "knn_size": score(op, "size"),
                   "knn_size_within_class": score(op, "size|class"), "chance_class": score(op, "class", "chance"),
                   "chance_size": score(op, "size", "chance"),
                   "chance_size_within_class": score(op, "size|class", "chance"),
                   "silhouette_class": score(op, "class", "silhouette"),
                   "silhouette_size_within_class": score(op, "size|class", "silhouette")} for op in ops]
    import pandas as pd

    table = pd.DataFrame(table_rows)
    claims = []
    if {"dk", "condconv"} <= set(ops):
        t = table.set_index("model")
        col, what = "knn_size_within_class", "Size-within-class"
        if not np.isfinite(t.loc[["dk", "condconv"], col]).all():  # too few samples per class for size|class
            col, what = "knn_size", "Size (within-class scores unavailable: too few samples per class)"
        dk_size, cc_size = t.loc["dk", col], t.loc["condconv", col]
        dk_cls, cc_cls = t.loc["dk", "knn_class"], t.loc["condconv", "knn_class"]
        size_chance = t.loc["dk", "chance_size_within_class" if col == "knn_size_within_class" else "chance_size"]
        size_ok, class_ok = dk_size > cc_size, cc_cls > dk_cls
        above = dk_size > size_chance and cc_cls > t.loc["condconv", "chance_class"]
        claims.append(
            f"Paper: DK clusters by size, CondConv by class. {what} kNN: DK {dk_size:.3f} vs CondConv "
            f"{cc_size:.3f} (chance {size_chance:.3f}); class kNN: CondConv {cc_cls:.3f} vs DK {dk_cls:.3f} (chance {t.loc['dk', 'chance_class']:.3f}). "
            + ("Inconclusive: the scores are at chance level." if not above else
               "Holds on this data." if size_ok and class_ok else
               "Holds only in part on this data." if size_ok or class_ok else "Does not hold on this data."))
    options = dict(checkpoints={k: str(v) for k, v in paths.items()}, data=res.meta.get("data"), max_samples=max_samples,
                   n_iter=n_iter, perplexity=perplexity, device=device, analyses_options=res.meta.get("options"))
    summary = {"scores": table_rows}
    files.append(write_json(out / "tsne.json", metadata("tsne", options, seed, summary=summary)))
    return FigureResult("tsne", "t-SNE by class and by object size", files, summary, table, claims)
