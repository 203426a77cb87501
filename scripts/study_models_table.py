"""Print the markdown table of the shipped study models (docs/experiments.md): name, epochs,
best epoch, test accuracy of the shipped weights, smallest and largest size bin, and the mean
and spread per (arch, op) over seeds. Reads only the checkpoints' ``study`` entries.

    python scripts/study_models_table.py
"""
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from erf_lab import study_models

    rows, groups = [], {}
    for path in study_models.available():
        info = study_models.study_info(path)
        bins = info["test_acc_per_size_bin"]
        keys = sorted(bins, key=int)
        r = info["recipe"]
        rows.append(f"| `{info['name']}` | {r['epochs']} | {info['best_epoch']} | {100 * info['test_acc']:.1f}% | "
                    f"{100 * bins[keys[0]]:.0f}% / {100 * bins[keys[-1]]:.0f}% |")
        groups.setdefault((r["arch"], r["op"]), []).append(info["test_acc"])
    print("| model | epochs | best epoch | test acc | smallest / largest size bin |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("| arch | op | seeds | test acc, mean +- sd |")
    print("|---|---|---|---|")
    for (arch, op), accs in groups.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        print(f"| {arch} | {op} | {len(accs)} | {100 * statistics.mean(accs):.1f}% +- {100 * sd:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
