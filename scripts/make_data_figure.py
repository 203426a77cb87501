"""Draw samples of the embedded ``digits-ms`` data set with their boxes and labels.

    python scripts/make_data_figure.py [--out docs/digits_ms_samples.png] [--split test]

One row per size bin (smallest objects on top), so the picture shows the scale range.
"""
import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erf_lab.data import open_data  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/digits_ms_samples.png")
    p.add_argument("--data", default="digits-ms")
    p.add_argument("--split", default="test")
    p.add_argument("--per-bin", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ds = open_data(args.data, split=args.split)
    rng = np.random.default_rng(args.seed)
    bins = sorted(b for b in set(ds.size_bins.tolist()) if b >= 0)
    fig, axes = plt.subplots(len(bins), args.per_bin, figsize=(1.3 * args.per_bin, 1.42 * len(bins)))
    edges = ds.size_bin_edges
    for r, b in enumerate(bins):
        pick = rng.choice(np.flatnonzero(ds.size_bins == b), args.per_bin, replace=False)
        for c, i in enumerate(pick):
            item = ds[int(i)]
            img = (item["image"] * ds._std_t + ds._mean_t).clamp(0, 1).permute(1, 2, 0).numpy()
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            x, y, w, h = item["box"].tolist()
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, lw=0.8, ec="lime"))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(ds.class_names[item["label"]], fontsize=7, pad=1)
            if c == 0:
                ax.set_ylabel(f"bin {b}\n{edges[b]:.0f}-{edges[b + 1]:.0f}px", fontsize=7)
    fig.suptitle(f"{args.data} ({args.split}): box sqrt(w*h) per size bin; label above each image", fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.975))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
