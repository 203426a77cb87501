"""ERF metrics on maps whose answers are known in closed form."""
import math

import numpy as np
import pytest

from erf_lab.metrics import (
    area_ratio,
    center_of_mass,
    erf_metrics,
    gaussian_fit,
    luo_size,
    peak,
    radial_mass,
    replknet_transform,
    second_moments,
)


def gaussian(h, w, cy, cx, sy, sx, a=1.0):
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    return a * np.exp(-((yy - cy) ** 2) / (2 * sy**2) - (xx - cx) ** 2 / (2 * sx**2))


def test_area_ratio_on_a_uniform_square():
    m = np.zeros((21, 21))
    m[8:13, 8:13] = 1.0  # a 5x5 block at the centre (10, 10)
    # side 3 holds 9/25, side 5 holds everything; "exceeds" is strict
    assert area_ratio(m, 0.3, (10, 10)) == pytest.approx(9 / 441)
    assert area_ratio(m, 0.36, (10, 10)) == pytest.approx(25 / 441)
    assert area_ratio(m, 0.99, None) == pytest.approx(25 / 441)
    # centred on the RF centre, not the array centre: the same block moved to the corner
    c = np.zeros((21, 21))
    c[0:5, 0:5] = 1.0
    assert area_ratio(c, 0.99, (2, 2)) == pytest.approx(25 / 441)
    assert math.isnan(area_ratio(c, 0.99, None)) or area_ratio(c, 0.99, None) > 25 / 441


def test_replknet_transform():
    m = np.array([[0.0, 9.0], [99.0, 999.0]])
    np.testing.assert_allclose(replknet_transform(m), [[0, 1 / 3], [2 / 3, 1]])


def test_luo_size_counts_pixels_above_4_55_percent_of_the_centre():
    m = np.zeros((9, 9))
    m[4, 4] = 100.0
    m[4, 5] = m[5, 4] = 4.6  # above 4.55
    m[0, 0] = 4.5  # below
    assert luo_size(m, (4, 4)) == pytest.approx(math.sqrt(3))
    assert math.isnan(luo_size(-m, (4, 4)))


def test_second_moments_and_gaussian_fit_recover_parameters():
    m = gaussian(61, 71, 30.0, 33.0, 4.0, 6.5, a=2.0)
    sy, sx = second_moments(m, (30.0, 33.0))
    assert sy == pytest.approx(4.0, rel=1e-3) and sx == pytest.approx(6.5, rel=1e-3)
    noisy = m + np.random.default_rng(0).normal(0, 0.01, m.shape)
    fit = gaussian_fit(noisy, (29.0, 35.0))  # started off-centre on purpose
    assert fit["sigma_y"] == pytest.approx(4.0, rel=0.02) and fit["sigma_x"] == pytest.approx(6.5, rel=0.02)
    assert fit["mean_y"] == pytest.approx(30.0, abs=0.05) and fit["amplitude"] == pytest.approx(2.0, rel=0.02)
    assert fit["r2"] > 0.99
    noise = np.random.default_rng(1).uniform(0, 1, (20, 20))  # no Gaussian in it: a poor fit
    assert gaussian_fit(noise, (10, 10))["r2"] < 0.5
    assert math.isnan(gaussian_fit(np.ones((20, 20)), (10, 10))["r2"])  # R^2 undefined for a constant map


def test_radial_mass_center_of_mass_and_peak():
    m = np.zeros((11, 11))
    m[5, 5], m[5, 8] = 3.0, 1.0
    radii, frac = radial_mass(m, (5, 5), radii=[0, 2.9, 3])
    np.testing.assert_allclose(frac, [0.75, 0.75, 1.0])
    assert center_of_mass(m) == pytest.approx((5.0, 5.75))
    assert peak(m) == (5, 5)


def test_erf_metrics_keys_and_erf_trf_ratio():
    m = gaussian(64, 64, 32, 32, 3, 3)
    out = erf_metrics(m, (32, 32), rf_size=(17, 17))
    for t in (0.2, 0.3, 0.5, 0.99):
        assert 0 < out[f"area_ratio_replknet@{t}"] <= 1 and 0 < out[f"area_ratio_raw@{t}"] <= 1
    assert out["sigma_y"] == pytest.approx(3, rel=1e-3) and out["peak_offset"] == 0
    assert out["erf_trf_ratio"] == pytest.approx(out["luo_size"] / 17)
    assert out["radius_mass@0.5"] <= out["radius_mass@0.9"]


def test_area_ratios_equal_a_loop_over_growing_squares():
    from erf_lab.metrics import area_ratios

    rng = np.random.default_rng(3)
    m = rng.random((37, 45)) ** 4
    center = (20.2, 11.7)
    got = area_ratios(m, (0.2, 0.5, 0.99), center)
    cy, cx = 20, 12
    for t, v in got.items():
        for i in range(1, 100):  # the definition, written out
            s = m[max(cy - i, 0) : cy + i + 1, max(cx - i, 0) : cx + i + 1].sum()
            if s / m.sum() > t:
                assert v == (2 * i + 1) ** 2 / m.size
                break


def test_radial_mass_histogram_equals_sorting_at_integer_radii():
    from erf_lab.metrics import radial_mass

    rng = np.random.default_rng(4)
    m = rng.standard_normal((30, 41))
    r, frac = radial_mass(m, (12.0, 7.5))
    yy, xx = np.mgrid[0:30, 0:41]
    dist = np.hypot(yy - 12.0, xx - 7.5)
    w = np.clip(m, 0, None)
    expect = [w[dist <= k].sum() / w.sum() for k in r]
    assert np.allclose(frac, expect, rtol=0, atol=1e-12) and frac[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("sigma", [60.0, 2.5])
def test_gaussian_fit_of_a_large_map_recovers_the_analytic_parameters(sigma):
    """1024 px maps are fitted on block means (or, for a narrow field, a full-resolution window)."""
    from erf_lab.metrics import gaussian_fit

    yy, xx = np.mgrid[0:1024, 0:1024]
    cy, cx = 500.3, 530.8
    m = 1.7 * np.exp(-(yy - cy) ** 2 / (2 * sigma**2) - (xx - cx) ** 2 / (2 * (1.4 * sigma) ** 2))
    g = gaussian_fit(m, (cy, cx))
    assert g["downsample"] == (4 if sigma > 10 else 1) and ("window" in g) == (sigma < 10)
    assert g["sigma_y"] == pytest.approx(sigma, rel=1e-3) and g["sigma_x"] == pytest.approx(1.4 * sigma, rel=1e-3)
    assert g["mean_y"] == pytest.approx(cy, abs=0.05) and g["mean_x"] == pytest.approx(cx, abs=0.05)
    assert g["amplitude"] == pytest.approx(1.7, rel=1e-3)
