"""Clustering scores against constructed features whose structure is known."""
import numpy as np
import pytest

from analyses.features import stratified_sample
from analyses.scores import (
    SCORE_COLUMNS,
    kmeans_ami,
    knn_accuracies,
    knn_accuracy,
    score_table,
    silhouette,
    trustworthiness,
    within_class_bins,
)

N, D, K, B = 600, 32, 6, 5


def _labels(seed: int = 0):
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(K), N // K)
    rng.shuffle(classes)
    sizes = rng.uniform(8, 64, N)  # independent of class
    bins = np.minimum((sizes - 8) / (56 / B), B - 1).astype(np.int64)
    return rng, classes, bins, sizes


def _clusters(rng, labels, n_labels, sep=8.0):
    centres = rng.normal(size=(n_labels, D)) * sep
    return centres[labels] + rng.normal(size=(len(labels), D))


def _row(table, labels, space="features"):
    sel = table[(table.labels == labels) & (table.space == space)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_class_clusters_score_class_and_not_size():
    rng, classes, bins, sizes = _labels()
    x = _clusters(rng, classes, K)
    table, _ = score_table(x, None, classes, bins, sizes, n_jobs=1)
    assert list(table.columns) == SCORE_COLUMNS
    c, s = _row(table, "class"), _row(table, "size")
    assert c.knn_acc > 0.98 and c.chance == pytest.approx(1 / K)
    assert c.silhouette > 0.5 and c.ami_kmeans > 0.9
    assert abs(s.knn_acc - s.chance) < 0.1  # size is not in the features
    assert abs(s.silhouette) < 0.05 and abs(s.ami_kmeans) < 0.05


def test_size_clusters_score_size_and_not_class():
    rng, classes, bins, sizes = _labels(1)
    x = _clusters(rng, bins, B)
    table, _ = score_table(x, None, classes, bins, sizes, n_jobs=1)
    c, s = _row(table, "class"), _row(table, "size")
    assert s.knn_acc > 0.98 and s.silhouette > 0.5 and s.ami_kmeans > 0.9
    assert abs(c.knn_acc - c.chance) < 0.1 and abs(c.silhouette) < 0.05 and abs(c.ami_kmeans) < 0.05


def test_within_class_size_is_immune_to_class_size_correlation():
    rng = np.random.default_rng(2)
    classes = np.repeat(np.arange(K), N // K)
    sizes = 10 * (classes + 1) * rng.uniform(0.9, 1.1, N)  # big objects are mostly of the high classes
    edges = np.quantile(sizes, np.linspace(0, 1, B + 1))
    bins = np.clip(np.searchsorted(edges[1:-1], sizes, side="right"), 0, B - 1)
    x = _clusters(rng, classes, K)  # features know the class only
    table, details = score_table(x, None, classes, bins, sizes, n_size_bins=4, n_jobs=1)
    s, sc = _row(table, "size"), _row(table, "size|class")
    assert s.knn_acc > s.chance + 0.3  # global size bins are predictable from class...
    assert abs(sc.knn_acc - sc.chance) < 0.12  # ...but not within a class
    assert len(details["size|class"]["features"]) == K
    # features that also encode size within each class do show a within-class effect
    relative = sizes / (10 * (classes + 1))  # size relative to the class's typical size
    x2 = np.concatenate([x, 1000 * relative[:, None]], 1)
    table2, _ = score_table(x2, None, classes, bins, sizes, n_size_bins=4, n_jobs=1)
    sc2 = _row(table2, "size|class")
    assert sc2.knn_acc > sc2.chance + 0.4


def test_scores_invariant_to_common_rescaling_and_translation():
    rng, classes, bins, sizes = _labels(3)
    x = _clusters(rng, classes, K, sep=0.35)  # overlapping clusters: scores away from their bounds
    emb = x[:, :2] + 0.3 * rng.normal(size=(N, 2))
    t1, _ = score_table(x, emb, classes, bins, sizes, n_jobs=1)
    t2, _ = score_table(1000.0 * x + 7.0, 0.01 * emb - 3.0, classes, bins, sizes, n_jobs=1)
    cols = ["knn_acc", "chance", "silhouette", "ami_kmeans", "trustworthiness"]
    np.testing.assert_allclose(t1[cols].to_numpy(float), t2[cols].to_numpy(float), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert 0.3 < _row(t1, "class").knn_acc < 0.95  # the check above compared informative numbers


def test_knn_accuracy_chance_is_majority_share_and_unlabelled_points_are_ignored():
    rng = np.random.default_rng(4)
    y = np.array([0] * 140 + [1] * 60)
    x = rng.normal(size=(200, 5))
    acc, chance = knn_accuracy(x, y)
    assert chance == pytest.approx(0.7)
    assert 0.5 < acc < 0.85  # random features: about the majority rate
    y2 = y.copy()
    y2[:20] = -1
    x_sep = np.where(y2[:, None] == 1, 10.0, 0.0) + rng.normal(size=(200, 5))
    acc2, chance2 = knn_accuracy(x_sep, y2)
    assert acc2 == 1.0 and chance2 == pytest.approx(120 / 180)


def test_knn_accuracies_shared_folds_match_single_labelling_quality():
    rng, classes, bins, _ = _labels(5)
    x = _clusters(rng, classes, K)
    res = knn_accuracies(x, {"class": classes, "size": bins})
    assert res["class"][0] > 0.98 and abs(res["size"][0] - res["size"][1]) < 0.1


def test_degenerate_labellings_give_nan_not_errors():
    x = np.random.default_rng(6).normal(size=(50, 4))
    one = np.zeros(50, np.int64)
    assert np.isnan(silhouette(x, one)) and np.isnan(kmeans_ami(x, one)) and np.isnan(knn_accuracy(x, one)[0])
    unknown = np.full(50, -1)
    table, _ = score_table(x, None, one, unknown, None, n_jobs=1)
    assert set(table.labels) == {"class"}  # no size rows when every size is unknown


def test_trustworthiness_of_a_faithful_and_a_random_embedding():
    rng = np.random.default_rng(7)
    plane = rng.normal(size=(400, 2))
    x = np.concatenate([plane, np.zeros((400, 8))], 1) @ np.linalg.qr(rng.normal(size=(10, 10)))[0]
    assert trustworthiness(x, plane * 3.0) > 0.999
    assert trustworthiness(x, rng.normal(size=(400, 2))) < 0.7
    # the subsample keeps memory bounded and still measures the same thing
    assert trustworthiness(x, plane, max_samples=150) > 0.99


def test_within_class_bins_are_quantiles_inside_each_class():
    rng = np.random.default_rng(8)
    classes = np.repeat([0, 1, 2], [200, 100, 15])
    sizes = np.where(classes == 0, rng.uniform(1, 2, 315), rng.uniform(50, 100, 315))
    b = within_class_bins(classes, sizes, n_bins=4, min_per_bin=10)
    for c, expect in ((0, 4), (1, 4)):
        counts = np.bincount(b[classes == c])
        assert len(counts) == expect and counts.min() >= counts.max() - 1
    assert (b[classes == 2] == -1).all()  # 15 points cannot make 2 bins of 10


def test_stratified_sample_keeps_proportions_exactly_and_is_seeded():
    strata = np.array([0] * 500 + [1] * 300 + [2] * 200)
    idx = stratified_sample(strata, 100, seed=3)
    assert len(idx) == 100 and (np.diff(idx) > 0).all()
    assert np.bincount(strata[idx]).tolist() == [50, 30, 20]
    assert (stratified_sample(strata, 100, seed=3) == idx).all()
    assert not (stratified_sample(strata, 100, seed=4) == idx).all()
    joint = np.stack([strata, np.arange(1000) % 2], 1)
    idx2 = stratified_sample(joint, 101, seed=0)
    assert len(idx2) == 101
    assert len(stratified_sample(strata, 5000)) == 1000
