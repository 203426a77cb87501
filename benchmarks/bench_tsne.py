"""Benchmark: t-SNE analysis of 10,000 points x 512 features, openTSNE beside scikit-learn.

Times the whole analysis after feature extraction: PCA to 50 + t-SNE (1000 iterations),
every score (kNN CV, silhouette, k-means AMI, trustworthiness, within-class size effect, in
the feature space and in the embedding) and the report (figures, CSVs, JSON, HTML), once
per backend on the same features. Target (issue 5): <= 60 s with openTSNE on 2 CPU cores.

The features are synthetic with known structure (10 classes x 10 size bins, a class and a
size direction buried in 512-D noise), so the run also prints whether the scores find it.

    python benchmarks/bench_tsne.py                       # both backends, all CPUs
    python benchmarks/bench_tsne.py --jobs 2 --backends opentsne
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_features(n: int, dim: int, seed: int = 0):
    """Points with a class structure and a (weaker) size structure in ``dim`` dimensions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    sizes = np.exp(rng.uniform(np.log(6), np.log(45), n))
    edges = np.quantile(sizes, np.linspace(0, 1, 11))
    bins = np.clip(np.searchsorted(edges[1:-1], sizes, side="right"), 0, 9)
    class_dirs = rng.normal(size=(10, dim)) * 0.6
    size_dir = rng.normal(size=dim) * 0.35
    x = rng.normal(size=(n, dim)) + class_dirs[labels] + np.log(sizes)[:, None] * size_dir
    return x.astype(np.float32), labels.astype(np.int64), bins.astype(np.int64), sizes, list(edges)


def run(backend: str, x, labels, bins, sizes, edges, jobs, n_iter, out_dir: Path):
    import pandas as pd

    from analyses.embedding import embed
    from analyses.scores import score_table
    from analyses.results import ModelEmbedding, TSNEResult

    c0, t0 = time.process_time(), time.perf_counter()
    coords, info = embed(x, perplexity=30, n_iter=n_iter, backend=backend, seed=0, n_jobs=jobs, progress=False)
    c1, t1 = time.process_time(), time.perf_counter()
    table, details = score_table(x, coords, labels, bins, sizes, model=backend, seed=0, n_jobs=jobs)
    c2, t2 = time.process_time(), time.perf_counter()
    emb = ModelEmbedding(name=backend, coords=coords, labels=labels, size_bins=bins, sizes=sizes,
                         indices=np.arange(len(x)), meta={"embedding": info, "scores": details})
    result = TSNEResult(models=[emb], scores=table, class_names=[str(i) for i in range(10)], size_bin_edges=edges,
                        meta={"options": {"benchmark": True, "seed": 0}})
    result.save(out_dir / backend)
    c3, t3 = time.process_time(), time.perf_counter()
    row = lambda lab, sp: table[(table.labels == lab) & (table.space == sp)].iloc[0]  # noqa: E731
    return {
        "backend": backend, "gradient": info["gradient"], "embedding_s": round(t1 - t0, 1),
        "pca_s": info["pca"]["seconds"], "scores_s": round(t2 - t1, 1), "report_s": round(t3 - t2, 1),
        "total_s": round(t3 - t0, 1),
        "cpu_embedding_s": round(c1 - c0, 1), "cpu_scores_s": round(c2 - c1, 1), "cpu_report_s": round(c3 - c2, 1),
        "cpu_total_s": round(c3 - c0, 1),
        "class_knn_emb": round(float(row("class", "embedding").knn_acc), 3),
        "size_knn_emb": round(float(row("size", "embedding").knn_acc), 3),
        "trust": round(float(row("class", "embedding").trustworthiness), 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=None, help="threads (default: the CPUs this process may use)")
    ap.add_argument("--backends", default="opentsne,sklearn")
    ap.add_argument("--out", help="keep the reports in this directory (default: a temporary one)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()

    from analyses.embedding import available_backends

    jobs = args.jobs or len(os.sched_getaffinity(0))
    x, labels, bins, sizes, edges = make_features(args.n, args.dim)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        # warm-up on 300 points so that neither backend's row pays the one-off imports
        w = make_features(300, 16)
        run("sklearn", w[0], w[1], w[2], w[3], w[4], 1, 250, Path(tmp) / "warmup")
        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            if backend == "opentsne" and "opentsne" not in available_backends():
                print("opentsne: not installed (pip install 'erf-lab[tsne]'); skipped")
                continue
            rows.append(run(backend, x, labels, bins, sizes, edges, jobs, args.iterations, out))
            print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{args.n} x {args.dim}, {args.iterations} iterations, {jobs} thread(s), {platform.processor() or platform.machine()}, "
          f"load average {load:.1f}")
    print("wall seconds (CPU seconds of this process in brackets; with --jobs 1 and a busy machine the CPU time is")
    print("the better estimate of the wall time on an idle core)")
    print("| backend | gradient | embedding | scores | report | total |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k + '_s']} ({r['cpu_' + k + '_s']})" for k in ("embedding", "scores", "report", "total")]
        print(f"| {r['backend']} | {r['gradient']} | " + " | ".join(cells) + " |")
    if len(rows) == 2:
        print(f"sklearn / openTSNE total: {rows[1]['total_s'] / rows[0]['total_s']:.2f}x, "
              f"embedding: {rows[1]['embedding_s'] / rows[0]['embedding_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "n": args.n, "dim": args.dim, "jobs": jobs, "load": load},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
