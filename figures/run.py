"""The whole run behind ``erf-lab figures``: models, then every figure, then the report."""
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from erf_lab.errors import ErfLabError
from erf_lab.io import PathLike, check_output_dir, write_csv, write_json

from ._io import FigureResult, Stages, rel
from .config import FiguresConfig, config_for, prepare_models

__all__ = ["run_figures", "FIGURES"]

#: Figure ids in the order they are made.
FIGURES = ("theory", "accuracy", "erf", "tsne", "offsets")


def _save_result(root: Path, r: FigureResult) -> None:
    """``DIR/NAME/result.json`` (+ ``result_table.csv``): lets a later partial run show this figure in its report."""
    d = root / r.name
    if r.table is not None:
        write_csv(d / "result_table.csv", r.table)
    write_json(d / "result.json", {"name": r.name, "title": r.title, "files": rel(r.files, root), "summary": r.summary,
                                   "claims": r.claims, "table": r.table is not None,
                                   "effects": [e.to_dict() for e in r.effects]})


def _load_result(root: Path, name: str) -> Optional[FigureResult]:
    try:
        meta = json.loads((root / name / "result.json").read_text())
        table = _read_csv(root / name / "result_table.csv") if meta.get("table") else None
    except (OSError, ValueError, KeyError):
        return None
    files = [root / f for f in meta["files"]]
    if not all(f.is_file() for f in files):
        return None
    from .stats import Effect

    effects = [Effect(**e) for e in meta.get("effects", [])]
    return FigureResult(meta["name"], meta["title"], files, meta.get("summary", {}), table, list(meta.get("claims", [])),
                        effects)


def _read_csv(path: Path) -> Any:
    import pandas as pd

    return pd.read_csv(path)


def _device(device: Optional[str]) -> str:
    from erf_lab.device import resolve_device

    return str(resolve_device(device))


def _make_figure(name: str, d: Path, cfg: FiguresConfig, ckpts: Dict[str, List[Path]],
                 tsne_ckpts: Dict[str, List[Path]], data_spec: Optional[str], dev: str, seed: int,
                 progress: bool) -> FigureResult:
    """Figure ``name`` into folder ``d`` with the run's configuration and models."""
    if name == "theory":
        from .theory import linear_erf_theory

        return linear_erf_theory(d, depths=cfg.theory_depths, seed=seed)
    if name == "accuracy":
        from .accuracy import accuracy_table

        return accuracy_table(ckpts, d, latency_repeats=cfg.latency_repeats, device="cpu", seed=seed,
                              data=data_spec, n_boot=cfg.n_boot)
    if name == "erf":
        from .erf_comparison import erf_comparison

        return erf_comparison(ckpts, d, data=data_spec, erf_images=cfg.erf_images,
                              instance_per_bin=cfg.instance_per_bin, device=dev, seed=seed, progress=progress,
                              n_boot=cfg.n_boot)
    if name == "tsne":
        from .tsne import tsne_figure

        return tsne_figure(tsne_ckpts, d, data=data_spec, max_samples=cfg.tsne_samples, n_iter=cfg.tsne_iter,
                           tsne_runs=cfg.tsne_runs, device=dev, seed=seed, progress=progress, n_boot=cfg.n_boot)
    from .offsets import offsets_by_size

    return offsets_by_size(ckpts, d, data=data_spec, per_bin=cfg.instance_per_bin, device=dev, seed=seed,
                           progress=progress, n_boot=cfg.n_boot)


def _report_notes(dev: str, cfg: FiguresConfig, models_dir: Optional[PathLike], need_models: bool) -> List[str]:
    import torch

    notes = [f"Device {dev}; {torch.get_num_threads()} torch CPU threads; {os.cpu_count()} CPUs visible. "
             "Latency and wall times depend on the machine and its load."]
    if models_dir is not None:
        notes.append(f"Models taken from {models_dir} (not trained by this run).")
    elif cfg.source == "shipped" and need_models:
        notes.append("Models: the converged study models shipped in erf_lab/study_models (not trained by this "
                     "run; `--retrain` trains them anew with the same recipes).")
    return notes


def run_figures(out: PathLike, *, mode: str = "quick", data: Optional[str] = None, models_dir: Optional[PathLike] = None,
                device: Optional[str] = None, only: Optional[Sequence[str]] = None, progress: bool = True,
                command: Optional[str] = None, retrain: bool = False, jobs: int = 1,
                **overrides: Any) -> Dict[str, Any]:
    """Loads (or trains) the study models and writes every figure, ``RESULTS.md`` and ``index.html`` to ``out``.

    Args:
        out: output folder (checkpoints trained by the run are cached in ``out/models`` and reused).
        mode: ``quick`` (the shipped models, minutes on 2 CPU cores) or ``full`` (everything
            retrained, larger statistics).
        data: ``--data`` spec (default ``digits-ms``).
        models_dir: use the checkpoints in this folder (``ARCH-OP-sS.pt``, or ``OP.pt`` /
            ``OP-seedS.pt`` for the study net) instead of the shipped ones.
        retrain: train every model anew with the shipped models' recipes (``source="train"``).
        jobs: models trained at once, in worker processes of ``cpus // jobs`` threads (CPU only).
        device: ``cpu``, ``cuda[:i]`` or None/``auto``.
        only: a subset of :data:`FIGURES`.
        progress: stage lines and progress bars.
        command: the command line recorded in the report (default: this process's argv).
        **overrides: single :class:`~figures.config.FiguresConfig` options (``epochs=1``...).

    Returns:
        ``{"results": [FigureResult], "failures": {figure: message}, "report": Path, "config": FiguresConfig,
        "seconds": {stage: s}}``. A figure that fails is reported (and its error kept) while the others run.
    """
    wanted = tuple(FIGURES if not only else only)
    bad = [f for f in wanted if f not in FIGURES]
    if bad:
        raise ErfLabError(f"unknown figure(s) {', '.join(bad)}; choose from {', '.join(FIGURES)}")
    if retrain:
        overrides["source"] = "train"
    cfg: FiguresConfig = config_for(mode, data=data, **overrides)
    dev = _device(device)
    root = check_output_dir(out)  # before any work: an unwritable --out fails now, not after training
    command = command or " ".join(shlex.quote(a) for a in ([Path(sys.argv[0]).name] + sys.argv[1:]))
    need_models = any(f != "theory" for f in wanted)
    stages = Stages(len(wanted) + (2 if need_models else 1), enabled=progress)
    ckpts: Dict[str, List[Path]] = {}
    tsne_ckpts: Dict[str, List[Path]] = {}
    model_notes: List[str] = []
    if need_models:
        where = {"shipped": "shipped", "train": "trained"}[cfg.source] if models_dir is None else f"from {models_dir}"
        with stages(f"models ({where}): {len(cfg.ops)} variants x {len(cfg.seeds)} seed(s) of {cfg.arch}, "
                    f"{len(cfg.tsne_ops)} x {len(cfg.tsne_seeds)} of {cfg.tsne_arch} on {cfg.data}"):
            ckpts = prepare_models(cfg, root, models_dir=models_dir, device=dev, progress=progress, notes=model_notes,
                                   jobs=jobs)
            if "tsne" in wanted:
                try:
                    tsne_ckpts = prepare_models(cfg, root, models_dir=models_dir, device=dev, progress=progress,
                                                tsne=True, notes=model_notes, jobs=jobs)
                except ErfLabError:
                    if models_dir is None:
                        raise
                    tsne_ckpts = {op: ckpts[op] for op in cfg.tsne_ops if op in ckpts}
                    model_notes.append(f"No {cfg.tsne_arch} checkpoints in {models_dir}: the t-SNE figure uses "
                                       f"the {cfg.arch} models.")
            if progress:
                for note in model_notes:
                    print(f"  note: {note}", flush=True)
    seed = 0
    results: List[FigureResult] = []
    failures: Dict[str, str] = {}
    data_spec = None if models_dir is None else data

    for name in wanted:
        with stages(f"figure {name}"):
            try:
                results.append(_make_figure(name, root / name, cfg, ckpts, tsne_ckpts, data_spec, dev, seed, progress))
                _save_result(root, results[-1])
            except (ErfLabError, ImportError, RuntimeError, ValueError) as exc:
                failures[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if progress:
                    print(f"  figure {name} failed: {failures[name]}", file=sys.stderr, flush=True)
    with stages("report"):
        from .report import write_report

        notes = _report_notes(dev, cfg, models_dir, need_models) + model_notes
        options = dict(cfg.to_dict(), device=dev, models_dir=str(models_dir) if models_dir else None,
                       figures=list(wanted))
        earlier = [r for r in (_load_result(root, f) for f in FIGURES if f not in wanted) if r is not None]
        if earlier:
            notes.append("Figures not made by this command, shown from an earlier run in the same folder: "
                         + ", ".join(r.name for r in earlier) + " (see run.json of that run for its options).")
        order = {f: i for i, f in enumerate(FIGURES)}
        shown = sorted(results + earlier, key=lambda r: order[r.name])
        paths = write_report(root, shown, command=command, options=options, failures=failures,
                             stage_seconds=dict(stages.times), notes=notes)
        write_json(root / "run.json", {"command": command, "options": options, "failures": failures,
                                        "stage_seconds": stages.times,
                                        "checkpoints": {k: [str(p) for p in v] for k, v in ckpts.items()},
                                        "tsne_checkpoints": {k: [str(p) for p in v] for k, v in tsne_ckpts.items()},
                                        "effects": [e.to_dict() for r in results for e in r.effects],
                                        "summaries": {r.name: r.summary for r in results}})
    return {"results": results, "failures": failures, "report": paths[0], "html": paths[1], "config": cfg,
            "seconds": dict(stages.times)}
