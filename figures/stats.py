"""Effects with bootstrap confidence intervals, and the verdicts drawn from them.

Every claim of the reproduction is an *effect* (a difference of means, or a rank correlation)
measured on per-item values of several trained seeds. Its 95% interval comes from a
hierarchical bootstrap (``docs/design.md`` section 7): each replicate draws the seeds with
replacement, then the items (images, samples) with replacement, *the same draw for every model
compared*, so differences are paired wherever the models saw the same items. The verdict reads
the interval against zero in the claimed direction:

* ``holds``: the whole interval lies on the claimed side;
* ``contradicted``: the whole interval lies on the other side;
* ``inconclusive``: the interval covers zero.

Replicates are drawn from a seeded generator, so a run repeats its intervals exactly.
"""
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Effect", "bootstrap", "mean_effect", "spearman_effect", "verdict", "N_BOOT", "LEVEL"]

N_BOOT = 2000
LEVEL = 0.95


@dataclass
class Effect:
    """One row of the verdict table.

    Attributes:
        claim: the paper's statement, in words.
        measure: what was measured (and on what).
        effect: the point estimate (on all seeds and items).
        lo, hi: the 95% bootstrap interval.
        direction: +1 when the claim predicts a positive effect, -1 a negative one.
        verdict: ``holds``, ``contradicted`` or ``inconclusive``.
        n: a short description of the sample (seeds x items).
        claim_id: the claim's number in the paper's section 5.3 list (``docs/design.md`` section 7).
    """

    claim: str
    measure: str
    effect: float
    lo: float
    hi: float
    direction: int
    verdict: str
    n: str
    claim_id: str = ""

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    def ci(self) -> str:
        return f"[{self.lo:+.3f}, {self.hi:+.3f}]"


def verdict(lo: float, hi: float, direction: int = 1) -> str:
    """``holds`` / ``contradicted`` / ``inconclusive`` for the interval ``[lo, hi]`` (module docstring)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    lo, hi = sorted((direction * lo, direction * hi))
    return "holds" if lo > 0 else "contradicted" if hi < 0 else "inconclusive"


def _as_grid(values: Mapping[str, Sequence[Sequence[float]]]) -> Dict[str, np.ndarray]:
    """``{name: (S, N) float array}``; every name must have the same seeds and items."""
    grid = {k: np.asarray(v, dtype=np.float64) for k, v in values.items()}
    shapes = {a.shape for a in grid.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"values must be (seeds, items) arrays of one shape, got {sorted(shapes)}")
    return grid


def _draws(s: int, n: int, n_boot: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 5303])
    seeds = rng.integers(0, s, size=(n_boot, s))
    items = rng.integers(0, n, size=(n_boot, s, n))
    return seeds, items


def bootstrap(values: Mapping[str, Sequence[Sequence[float]]], statistic: Callable[[Dict[str, np.ndarray]], float],
              *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Tuple[float, float, float]:
    """``(estimate, lo, hi)`` of ``statistic`` over a hierarchical (seeds, then items) bootstrap.

    Args:
        values: ``{name: (S, N) array}``: per-item values of each model on the same ``N`` items
            for each of ``S`` seeds (NaN items are ignored by the means).
        statistic: maps ``{name: (S', N') array}`` (one resampled data set) to a number.
        n_boot: replicates; level: the interval's coverage (percentile interval).
        seed: seeds the draws.
    """
    grid = _as_grid(values)
    s, n = next(iter(grid.values())).shape
    estimate = float(statistic(grid))
    seeds, items = _draws(s, n, n_boot, seed)
    reps = np.empty(n_boot)
    for b in range(n_boot):
        rows = seeds[b]
        reps[b] = statistic({k: a[rows[:, None], items[b]] for k, a in grid.items()})
    reps = reps[np.isfinite(reps)]
    if len(reps) < n_boot // 2:
        return estimate, math.nan, math.nan
    a = (1 - level) / 2
    lo, hi = np.quantile(reps, [a, 1 - a])
    return estimate, float(lo), float(hi)


def _mean(a: np.ndarray) -> float:
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(a)) if np.isfinite(a).any() else math.nan


def mean_effect(values: Mapping[str, Sequence[Sequence[float]]], combine: Callable[[Dict[str, float]], float],
                **kw) -> Tuple[float, float, float]:
    """Bootstrap of ``combine({name: mean over seeds and items})``, e.g. ``lambda m: m["dk"] - m["conv"]``."""
    return bootstrap(values, lambda g: combine({k: _mean(a) for k, a in g.items()}), **kw)


def _rank(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    r = np.empty(len(a))
    r[order] = np.arange(len(a))
    # average ranks of ties
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    return sums[inv] / counts[inv]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties; NaN pairs dropped)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    rx, ry = _rank(x), _rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt((rx * rx).sum() * (ry * ry).sum()))


def spearman_effect(x: Sequence[Sequence[float]], y: Sequence[Sequence[float]], **kw) -> Tuple[float, float, float]:
    """Mean over seeds of Spearman(x, y) per seed, with its hierarchical bootstrap interval."""

    def stat(g: Dict[str, np.ndarray]) -> float:
        rs = [spearman(g["x"][i], g["y"][i]) for i in range(g["x"].shape[0])]
        rs = [r for r in rs if math.isfinite(r)]
        return float(np.mean(rs)) if rs else math.nan

    return bootstrap({"x": x, "y": y}, stat, **kw)


def effect_row(claim: str, measure: str, est: Tuple[float, float, float], direction: int, n: str,
               claim_id: str = "") -> Effect:
    """An :class:`Effect` with its verdict from a ``(estimate, lo, hi)`` triple."""
    e, lo, hi = est
    return Effect(claim, measure, e, lo, hi, direction, verdict(lo, hi, direction), n, claim_id)


def effects_table(effects: Sequence[Effect]):
    """The effects as a DataFrame (claim, measure, effect, ci_low, ci_high, verdict, n)."""
    import pandas as pd

    rows: List[Dict[str, object]] = []
    for e in effects:
        rows.append({"claim": e.claim_id, "statement": e.claim, "measure": e.measure, "effect": e.effect,
                     "ci_low": e.lo, "ci_high": e.hi, "predicted_sign": "+" if e.direction > 0 else "-",
                     "verdict": e.verdict, "n": e.n})
    return pd.DataFrame(rows, columns=["claim", "statement", "measure", "effect", "ci_low", "ci_high",
                                       "predicted_sign", "verdict", "n"])


def per_seed_stack(per_seed: Sequence[Optional[np.ndarray]]) -> np.ndarray:
    """Per-seed item vectors of one length stacked to (S, N) (the seeds saw the same items)."""
    arrs = [np.asarray(a, dtype=np.float64) for a in per_seed if a is not None]
    if not arrs or len({a.shape for a in arrs}) != 1:
        raise ValueError("every seed needs values for the same items")
    return np.stack(arrs)
