"""Shared plumbing of the figure recipes: results, PNG+PDF figures, metadata, stage lines
(files are written through :mod:`erf_lab.io`)."""
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from erf_lab.io import PathLike, atomic_write, versions



@dataclass
class FigureResult:
    """What one figure recipe produced.

    Attributes:
        name: short id (``theory``, ``accuracy``, ...), also the sub-folder of the output directory.
        title: the figure's title in the report.
        files: every file written (figures first), relative to the output directory's parent-free root.
        summary: the key numbers (plain JSON types) for RESULTS.md.
        table: an optional pandas DataFrame shown in the report.
        claims: plain-language statements checked against the numbers (``"holds"``/``"does not hold"``).
        effects: the claims' effects with confidence intervals and verdicts
            (:class:`figures.stats.Effect`), gathered into the report's opening table.
    """

    name: str
    title: str
    files: List[Path] = field(default_factory=list)
    summary: Dict[str, Any] = field(default_factory=dict)
    table: Any = None
    claims: List[str] = field(default_factory=list)
    effects: List[Any] = field(default_factory=list)

    @property
    def images(self) -> List[Path]:
        return [f for f in self.files if f.suffix == ".png"]


def save_figure(fig: Any, directory: PathLike, stem: str, dpi: int = 130) -> List[Path]:
    """Saves a matplotlib figure as ``stem.png`` and ``stem.pdf`` (atomically) and closes it."""
    import matplotlib.pyplot as plt

    d = Path(directory)
    out = []
    try:
        for ext in ("png", "pdf"):
            out.append(atomic_write(d / f"{stem}.{ext}", lambda tmp, e=ext: fig.savefig(tmp, format=e, dpi=dpi,
                                                                                       bbox_inches="tight")))
    finally:
        plt.close(fig)
    return out


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def metadata(figure: str, options: Dict[str, Any], seed: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
    """The metadata JSON written next to every result: options, seed, versions, time."""
    return {"figure": figure, "options": options, "seed": seed, "versions": versions("matplotlib", "scikit-learn", "pandas"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


class Stages:
    """Prints one line per stage with its elapsed time (stderr), for long runs."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.enabled, self.k = total, enabled, 0
        self.start = time.perf_counter()
        self.times: Dict[str, float] = {}

    def __call__(self, name: str) -> "_Stage":
        self.k += 1
        return _Stage(self, name)


class _Stage:
    def __init__(self, parent: Stages, name: str) -> None:
        self.parent, self.name = parent, name

    def __enter__(self) -> "_Stage":
        self.t0 = time.perf_counter()
        if self.parent.enabled:
            print(f"[{self.parent.k}/{self.parent.total}] {self.name} ...", file=sys.stderr, flush=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        dt = time.perf_counter() - self.t0
        self.parent.times[self.name] = dt
        if self.parent.enabled and exc_type is None:
            total = time.perf_counter() - self.parent.start
            print(f"[{self.parent.k}/{self.parent.total}] {self.name}: done in {dt:.1f}s (total {total:.1f}s)",
                  file=sys.stderr, flush=True)


def rel(paths: Sequence[Path], root: Path) -> List[str]:
    out = []
    for p in paths:
        try:
            out.append(str(Path(p).resolve().relative_to(root.resolve())))
        except ValueError:
            out.append(str(p))
    return out
