"""Print README.md's opening tables from an `erf-lab figures` output folder (the demo's `results/`):
one row per operator (accuracy with its 95% CI, parameters, MACs, ERF mass in the box and spread),
the t-SNE grouping scores, and the verdict table.

    python scripts/readme_tables.py results/
"""
import json
import sys
from pathlib import Path

LABELS = {"conv": "conv", "dcn": "DCN", "condconv": "CondConv", "dk_global": "DK (global)", "dk": "DK",
          "dk_dcn": "DK+DCN"}


def main(argv=None) -> int:
    import pandas as pd

    root = Path((argv or sys.argv[1:] or ["results"])[0])
    acc = pd.read_csv(root / "accuracy" / "accuracy.csv").set_index("op")
    erf = pd.read_csv(root / "erf" / "erf_mass_in_box.csv").groupby("op")[["erf_mass_in_box", "erf_spread_rel"]].mean()
    print("| operator | seeds | test acc. (95% CI) | params | MACs (+ sampling) | ERF mass in box | ERF spread / box |")
    print("|---|---|---|---|---|---|---|")
    for op, r in acc.iterrows():
        print(f"| {LABELS.get(op, op)} | {int(r.seeds)} | {r.test_acc_mean:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] | "
              f"{r.params / 1e3:.1f}k | {r.macs / 1e6:.2f}M (+{r.sampling_macs / 1e6:.2f}M) | "
              f"{erf.loc[op, 'erf_mass_in_box']:.3f} | {erf.loc[op, 'erf_spread_rel']:.3f} |")
    g = pd.read_csv(root / "tsne" / "tsne_grouping.csv")
    print()
    print("| MobileNetV2 | kNN class, map | kNN size-in-class, map | kNN class, features | kNN size-in-class, features |")
    print("|---|---|---|---|---|")
    for model in dict.fromkeys(g.model):
        cells = []
        for space in ("tsne", "features"):
            for score in ("class", "size|class"):
                r = g[(g.model == model) & (g.space == space) & (g.score == score)].iloc[0]
                cells.append(f"{r.knn_acc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]")
        print(f"| {LABELS.get(model, model)} | " + " | ".join(cells) + " |")
    effects = sorted(json.loads((root / "run.json").read_text())["effects"], key=lambda e: e["claim_id"])
    print()
    print("| # | claim | measure | effect [95% CI] | verdict |")
    print("|---|---|---|---|---|")
    for e in effects:
        print(f"| {e['claim_id']} | {e['claim']} | {e['measure']} | {e['effect']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}] "
              f"| **{e['verdict']}** |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
