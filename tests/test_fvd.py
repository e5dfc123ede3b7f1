import functools
import pickle
import warnings

import numpy as np
import pytest
import scipy.linalg

from eval.fvd import (DEFAULT_COVARIANCE, FeatureStats, FrechetResult, frechet, frechet_distance,
                      frechet_distance_from_stats, frechet_distance_gaussians, trace_sqrt_product)

DDOF = {"unbiased": 1, "biased": 0}


def reference_frechet(a: np.ndarray, b: np.ndarray, covariance: str) -> float:
    """The original FVD/FID computation: np.cov and scipy.linalg.sqrtm of the non-symmetric product."""
    ddof = DDOF[covariance]
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=ddof), np.cov(b, rowvar=False, ddof=ddof)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns that singular products may have no square root
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    return float(np.real(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)))


def feature_sets(kind: str, d: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "full_rank":
        mix = rng.standard_normal((d, d))
        return rng.standard_normal((300, d)) @ mix, rng.standard_normal((250, d)) @ mix.T + 0.5
    if kind == "fewer_samples_than_dims":
        return rng.standard_normal((30, d)), 2 * rng.standard_normal((20, d)) + 1
    if kind == "rank_deficient":
        low_a, low_b = rng.standard_normal((8, d)), rng.standard_normal((15, d))
        return rng.standard_normal((200, 8)) @ low_a, rng.standard_normal((200, 15)) @ low_b + 0.3
    raise ValueError(kind)


@pytest.mark.parametrize("covariance", ["unbiased", "biased"])
@pytest.mark.parametrize("kind", ["full_rank", "fewer_samples_than_dims", "rank_deficient"])
def test_matches_scipy_sqrtm_reference(kind, covariance):
    a, b = feature_sets(kind)
    ours = frechet_distance(a, b, covariance=covariance)
    assert ours == pytest.approx(reference_frechet(a, b, covariance), rel=1e-6)


def test_conventions_differ_and_default_is_stated():
    a, b = feature_sets("full_rank")
    result = frechet(a, b)
    assert isinstance(result, FrechetResult)
    assert (result.covariance, result.n_a, result.n_b) == (DEFAULT_COVARIANCE, 300, 250) == ("unbiased", 300, 250)
    assert "covariance=unbiased" in str(result)
    assert result.distance != frechet_distance(a, b, covariance="biased")


def test_identical_sets_give_zero():
    for kind in ("full_rank", "fewer_samples_than_dims", "rank_deficient"):
        a, _ = feature_sets(kind)
        assert abs(frechet_distance(a, a)) < 1e-8 * np.trace(np.cov(a, rowvar=False))


def test_trace_sqrt_product_of_commuting_matrices():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    wa, wb = rng.uniform(0, 3, 6), rng.uniform(0, 3, 6)
    wa[:2] = 0  # singular
    cov_a, cov_b = (q * wa) @ q.T, (q * wb) @ q.T
    assert trace_sqrt_product(cov_a, cov_b) == pytest.approx(np.sqrt(wa * wb).sum(), rel=1e-12)


def test_gaussians_closed_form_one_dimension():
    # d^2 = (m_a - m_b)^2 + (s_a - s_b)^2 for 1-D Gaussians with standard deviations s_a, s_b
    d = frechet_distance_gaussians(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]]))
    assert d == pytest.approx(9.0 + 1.0)


def test_streaming_stats_equal_batch_computation():
    a, b = feature_sets("full_rank")
    stats_a, stats_b = FeatureStats(a.shape[1]), FeatureStats(b.shape[1])
    for chunk in np.array_split(a, 7):
        stats_a.update(chunk)
    for chunk in np.array_split(b, 3):
        stats_b.update(chunk)
    assert stats_a.count == len(a)
    np.testing.assert_allclose(stats_a.mean, a.mean(axis=0), rtol=1e-12, atol=1e-12)
    for covariance in ("unbiased", "biased"):
        np.testing.assert_allclose(stats_a.covariance(covariance), np.cov(a, rowvar=False, ddof=DDOF[covariance]),
                                   rtol=1e-10, atol=1e-10)
        assert frechet_distance_from_stats(stats_a, stats_b, covariance) == pytest.approx(
            frechet_distance(a, b, covariance), rel=1e-10)


def test_merge_equals_update_and_survives_pickling(tmp_path):
    a, _ = feature_sets("full_rank")
    parts = [FeatureStats.from_features(chunk) for chunk in np.array_split(a, 4)]
    parts = [pickle.loads(pickle.dumps(p)) for p in parts]  # as Ray ships them between workers
    merged = functools.reduce(FeatureStats.merge, parts)
    whole = FeatureStats.from_features(a)
    assert merged.count == whole.count == len(a)
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-12)
    np.testing.assert_allclose(merged.outer, whole.outer, rtol=1e-12)
    assert parts[0].count == len(np.array_split(a, 4)[0])  # merge leaves its inputs alone
    merged.save(tmp_path / "stats.npz")
    loaded = FeatureStats.load(tmp_path / "stats.npz")
    assert loaded.count == merged.count
    np.testing.assert_array_equal(loaded.outer, merged.outer)


def test_bad_inputs_name_the_problem():
    a, b = feature_sets("full_rank")
    with pytest.raises(ValueError, match="covariance"):
        frechet_distance(a, b, covariance="population")
    with pytest.raises(ValueError, match="features_b.*shape"):
        frechet_distance(a, b[0])
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(a, b[:, :10])
    bad = a.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="features_a: 1 of 300 feature rows contain NaN"):
        frechet_distance(bad, b)
    with pytest.raises(ValueError, match="unbiased covariance needs more than 1"):
        frechet_distance(a[:1], b)
    with pytest.raises(ValueError, match="expected 48 features per row, got 5"):
        FeatureStats(48).update(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="no features"):
        FeatureStats(4).mean


def test_exact_in_high_precision_where_sqrtm_is_not():
    """Against a 40-digit computation: near-singular products cost sqrtm digits, not the eigh route."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40

    def exact(a: np.ndarray, b: np.ndarray) -> float:
        def moments(x):
            x = mpmath.matrix(x.tolist())
            mean = [mpmath.fsum(x[i, j] for i in range(x.rows)) / x.rows for j in range(x.cols)]
            centered = mpmath.matrix([[x[i, j] - mean[j] for j in range(x.cols)] for i in range(x.rows)])
            return mean, centered.T * centered / (x.rows - 1)

        (mu_a, cov_a), (mu_b, cov_b) = moments(a), moments(b)
        w, q = mpmath.eigsy(cov_a)
        root_a = q * mpmath.diag([mpmath.sqrt(max(e, 0)) for e in w]) * q.T
        m = root_a * cov_b * root_a
        trace_sqrt = mpmath.fsum(mpmath.sqrt(max(e, 0)) for e in mpmath.eigsy((m + m.T) / 2)[0])
        d = len(mu_a)
        return float(mpmath.fsum((mu_a[j] - mu_b[j]) ** 2 + cov_a[j, j] + cov_b[j, j] for j in range(d))
                     - 2 * trace_sqrt)

    for kind, rows in (("fewer_samples_than_dims", 16), ("rank_deficient", 40)):
        a, b = feature_sets(kind, d=24)
        a, b = a[:rows], b[:rows]
        assert frechet_distance(a, b) == pytest.approx(exact(a, b), rel=1e-12)
