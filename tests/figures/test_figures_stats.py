"""The statistics behind the verdicts: bootstrap intervals against analytic ones, the verdict rule,
pairing, Spearman against scipy, per-point k-NN hits against the scores, and verdicts that flip
when the data is built to flip them; the batched instance ERFs and sampled-kernel RMS against
the engine and the reference operator."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from figures import stats
from figures.accuracy import accuracy_effects
from figures.offsets import offset_effects, tap_rms
from figures.tsne import grouping_hits, tsne_effects


# ---- bootstrap and verdicts -----------------------------------------------------------------------
def test_bootstrap_interval_of_a_mean_matches_the_normal_interval():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 1.0, size=(1, 4000))
    est, lo, hi = stats.mean_effect({"x": x}, lambda m: m["x"], n_boot=2000, seed=1)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(x.size)
    assert est == pytest.approx(x.mean())
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.2 * half)


def test_bootstrap_resamples_seeds_too():
    # three seeds whose means differ a lot: the seed level dominates the interval
    rng = np.random.default_rng(1)
    x = np.stack([rng.normal(m, 0.1, 500) for m in (0.0, 1.0, 2.0)])
    _, lo, hi = stats.mean_effect({"x": x}, lambda m: m["x"], n_boot=2000)
    items_only = 2 * 1.96 * x.std() / math.sqrt(x.size)
    assert hi - lo > 5 * items_only


def test_paired_differences_are_tighter_than_unpaired():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, size=(1, 1000))
    a, b = base + 0.05 + rng.normal(0, 0.05, base.shape), base
    e, lo, hi = stats.mean_effect({"a": a, "b": b}, lambda m: m["a"] - m["b"], n_boot=1000)
    assert lo > 0 and e == pytest.approx(0.05, abs=0.01)
    # the same numbers with the pairing broken: the interval covers zero
    shuffled = {"a": a, "b": b[:, rng.permutation(1000)]}
    est = stats.bootstrap({"a": shuffled["a"]}, lambda m: m["a"].mean(), n_boot=500)
    assert est[2] - est[1] > 5 * (hi - lo) / 2


@pytest.mark.parametrize("lo,hi,direction,expected", [
    (0.01, 0.2, 1, "holds"), (-0.2, -0.01, 1, "contradicted"), (-0.1, 0.1, 1, "inconclusive"),
    (-0.2, -0.01, -1, "holds"), (0.01, 0.2, -1, "contradicted"), (math.nan, 0.1, 1, "inconclusive"),
    (0.0, 0.2, 1, "inconclusive")])
def test_verdict_rule(lo, hi, direction, expected):
    assert stats.verdict(lo, hi, direction) == expected


def test_intervals_repeat_exactly_with_the_seed():
    x = np.random.default_rng(3).normal(size=(2, 300))
    assert stats.mean_effect({"x": x}, lambda m: m["x"], seed=4) == stats.mean_effect({"x": x}, lambda m: m["x"], seed=4)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(5)
    x = rng.integers(0, 8, 200).astype(float)
    y = x + rng.normal(0, 3, 200)
    y[::7] = np.round(y[::7])
    assert stats.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


# ---- verdicts that flip with the data ---------------------------------------------------------------
def test_accuracy_verdict_flips_with_the_data():
    rng = np.random.default_rng(6)
    good = (rng.random((3, 1000)) < 0.95).astype(float)
    bad = (rng.random((3, 1000)) < 0.85).astype(float)
    holds = {e.measure: e.verdict for e in accuracy_effects({"conv": bad, "dk": good}, n_boot=500)}
    flips = {e.measure: e.verdict for e in accuracy_effects({"conv": good, "dk": bad}, n_boot=500)}
    same = {e.measure: e.verdict for e in accuracy_effects({"conv": good, "dk": good.copy()}, n_boot=500)}
    assert holds == {"test accuracy dk - conv": "holds"}
    assert flips == {"test accuracy dk - conv": "contradicted"}
    assert same == {"test accuracy dk - conv": "inconclusive"}


def _features(kind: str, labels: np.ndarray, sizes: np.ndarray, seed: int) -> np.ndarray:
    """Synthetic features: grouped by class (one-hot) or by object size (a size axis), plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (len(labels), 16))
    if kind == "class":
        x[np.arange(len(labels)), labels] += 6.0
    else:
        x[:, 0] += 12 * (sizes - sizes.mean()) / sizes.std()
    return x


def test_tsne_claim_flips_when_the_features_are_built_to_flip_it():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(10), 60)
    sizes = rng.uniform(8, 48, len(labels))

    def hits(dk_kind, cc_kind):
        out = {"features": {}}
        for op, kind in (("dk", dk_kind), ("condconv", cc_kind)):
            for rep in range(2):
                for score, h in grouping_hits(_features(kind, labels, sizes, rep), labels, sizes).items():
                    out["features"].setdefault(score, {}).setdefault(op, []).append(h)
        return {sp: {sc: {op: np.stack(v) for op, v in d.items()} for sc, d in per.items()} for sp, per in out.items()}

    paper = {e.claim: e.verdict for e in tsne_effects(hits("size", "class"), n_boot=300)}
    swapped = {e.claim: e.verdict for e in tsne_effects(hits("class", "size"), n_boot=300)}
    assert set(paper.values()) == {"holds"} and len(paper) == 2
    assert set(swapped.values()) == {"contradicted"}


def test_kernel_claim_flips_with_the_size_trend():
    rng = np.random.default_rng(8)
    size = rng.uniform(8, 48, 300)

    def rows(sign):
        return pd.DataFrame({"op": "dk", "kind": "kernel_offset", "seed_index": 0, "index": np.arange(300),
                             "size": size, "kernel_dispersion": 1 + sign * size / 48 + rng.normal(0, 0.1, 300),
                             "mean_radial": -sign * size / 48 + rng.normal(0, 0.1, 300)})

    assert [e.verdict for e in offset_effects(rows(-1), n_boot=300)] == ["holds", "holds"]
    assert [e.verdict for e in offset_effects(rows(+1), n_boot=300)] == ["contradicted", "contradicted"]


# ---- the per-point scores and maps ----------------------------------------------------------------
def test_knn_hits_equal_sklearn_cross_validated_predictions_and_average_to_the_scores():
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    from analyses.scores import K, N_SPLITS, knn_accuracies, knn_hits, score_space, within_class_bins, within_class_knn_hits

    rng = np.random.default_rng(9)
    labels = np.repeat(np.arange(5), 40)
    sizes = rng.uniform(8, 48, len(labels))
    x = _features("class", labels, sizes, 0)
    x[:, 5:] *= 4  # noisy enough that some votes are wrong
    h, chance = knn_hits(x, {"y": labels}, seed=3)["y"]
    cv = StratifiedKFold(n_splits=N_SPLITS, shuffle=True, random_state=3)
    pred = cross_val_predict(KNeighborsClassifier(n_neighbors=K, algorithm="brute"), x.astype(np.float32), labels, cv=cv)
    np.testing.assert_array_equal(h, (pred == labels).astype(float))
    assert 0 < h.mean() < 1 and chance == pytest.approx(0.2)
    y = labels.copy()
    y[:3] = -1  # left out
    h, chance = knn_hits(x, {"y": y})["y"]
    assert np.isnan(h[:3]).all() and set(np.unique(h[3:])) <= {0.0, 1.0}
    assert np.nanmean(h) == knn_accuracies(x, {"y": y})["y"][0] and chance == pytest.approx(40 / 197)
    bins = within_class_bins(labels, sizes)
    within = within_class_knn_hits(x, labels, bins)
    ref = score_space(x, labels, bins, class_size_bins=bins)[0]
    assert np.nanmean(within) == pytest.approx(ref["size|class"]["knn_acc"], abs=1e-12)


def test_mass_in_box_and_spread_of_a_uniform_square():
    from figures._models import mass_in_box, spread

    m = np.zeros((1, 64, 64))
    m[0, 10:30, 20:40] = 1.0
    assert mass_in_box(m, np.array([[20.0, 10.0, 20.0, 20.0]]))[0] == pytest.approx(1.0)
    assert mass_in_box(m, np.array([[20.0, 10.0, 10.0, 20.0]]))[0] == pytest.approx(0.5)
    assert spread(m)[0] == pytest.approx(math.sqrt((20 ** 2 - 1) / 12))  # discrete uniform on 20 pixels


def test_batched_instance_erfs_equal_the_engine_one_image_at_a_time():
    import erf_lab
    from dk_ops import models
    from figures._models import instance_erf_maps

    torch.manual_seed(0)
    net = models.create("study_net", op="dk", num_classes=10, widths=(4, 8, 8), stem_width=4, depth=1).eval()
    x = torch.randn(3, 3, 64, 64)
    units = np.array([[1, 2], [3, 0], [2, 2]])
    got = instance_erf_maps(net, x, "blocks", units, batch_size=2)
    for n in range(3):
        ref = erf_lab.instance_erf(net, x[n], layer="blocks", unit=tuple(units[n]), preset="replknet",
                                   grad_rectify="abs", crop=False)
        np.testing.assert_allclose(got[n], ref.map, rtol=1e-5, atol=1e-12)


def test_tap_rms_equals_the_sampled_kernel_of_the_reference():
    from dk_ops.reference import sample_kernel

    g = torch.Generator().manual_seed(10)
    w = torch.randn(8, 4, 4, 4, dtype=torch.float64, generator=g)
    for off in (torch.randn(2, 2 * 2 * 9, 5, 5, dtype=torch.float64, generator=g) * 1.5,
                torch.randn(3, 2 * 9, dtype=torch.float64, generator=g)):
        ref = sample_kernel(w, off, (3, 3)).pow(2).mean((1, 2)).sqrt()
        torch.testing.assert_close(tap_rms(w, off, (3, 3)), ref, rtol=1e-12, atol=1e-12)
