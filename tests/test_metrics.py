"""FID/sFID, Inception Score and precision/recall on cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from erw.evaluation.metrics import Gaussian, frechet_distance, inception_score, precision_recall


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _adm_frechet(a: Gaussian, b: Gaussian) -> float:
    """The ADM/TTUR formula with scipy's general matrix square root (fine when well conditioned)."""
    covmean = linalg.sqrtm(a.sigma @ b.sigma).real
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def test_frechet_distance_is_zero_for_identical_statistics():
    features = np.random.default_rng(0).normal(size=(500, 16))
    g = Gaussian.fit(features)
    assert frechet_distance(g, g) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_equals_the_closed_form_for_commuting_gaussians():
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    var_a, var_b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    a = Gaussian(rng.normal(size=6), basis @ np.diag(var_a) @ basis.T)
    b = Gaussian(rng.normal(size=6), basis @ np.diag(var_b) @ basis.T)
    expected = np.sum((a.mu - b.mu) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_agrees_with_the_adm_formula_on_general_covariances():
    rng = np.random.default_rng(2)
    a = Gaussian(rng.normal(size=32), _random_spd(rng, 32))
    b = Gaussian(rng.normal(size=32), _random_spd(rng, 32))
    assert frechet_distance(a, b) == pytest.approx(_adm_frechet(a, b), rel=1e-8)


def test_frechet_distance_is_stable_for_singular_covariances():
    """Fewer samples than dimensions (rank-deficient covariances), as in small evaluations."""
    rng = np.random.default_rng(3)
    d, rank = 64, 5
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    var_a = np.r_[rng.uniform(0.5, 2.0, rank), np.zeros(d - rank)]
    var_b = np.r_[rng.uniform(0.5, 2.0, rank), np.full(d - rank, 1e-14)]
    a = Gaussian(np.zeros(d), basis @ np.diag(var_a) @ basis.T)
    b = Gaussian(np.ones(d), basis @ np.diag(var_b) @ basis.T)
    expected = d + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)

    # Covariances fitted from 10 points in 64 dimensions: rank 9, and the distance is still finite,
    # non-negative, symmetric and zero against itself.
    few_a, few_b = Gaussian.fit(rng.normal(size=(10, d))), Gaussian.fit(rng.normal(size=(10, d)) + 0.5)
    ab, ba = frechet_distance(few_a, few_b), frechet_distance(few_b, few_a)
    assert np.isfinite(ab) and ab > 0 and ab == pytest.approx(ba, rel=1e-8)
    assert frechet_distance(few_a, few_a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_refuses_statistics_of_different_dimension():
    with pytest.raises(ValueError, match="different dimension"):
        frechet_distance(Gaussian(np.zeros(3), np.eye(3)), Gaussian(np.zeros(4), np.eye(4)))


def _confident_logits(labels: np.ndarray, classes: int) -> np.ndarray:
    return 30.0 * np.eye(classes)[labels]


def test_inception_score_of_perfect_collapsed_and_uninformative_predictions():
    classes = 10
    balanced = np.tile(np.arange(classes), 100)  # every split sees every class equally often
    assert inception_score(_confident_logits(balanced, classes)) == pytest.approx(classes, rel=1e-6)
    assert inception_score(_confident_logits(np.zeros(1000, dtype=int), classes)) == pytest.approx(1.0, abs=1e-6)
    assert inception_score(np.zeros((1000, classes))) == pytest.approx(1.0, abs=1e-9)
    half = np.tile(np.arange(5), 200)  # confident but only half the classes: IS = 5
    assert inception_score(_confident_logits(half, classes)) == pytest.approx(5.0, rel=1e-6)


def test_inception_score_averages_over_splits():
    """Split i holds one class only (IS 1 each) although the whole set is diverse (IS 10)."""
    sorted_labels = np.repeat(np.arange(10), 100)
    assert inception_score(_confident_logits(sorted_labels, 10), splits=10) == pytest.approx(1.0, abs=1e-6)
    assert inception_score(_confident_logits(sorted_labels, 10), splits=1) == pytest.approx(10.0, rel=1e-6)


def test_precision_recall_of_perfect_collapsed_and_disjoint_samples():
    rng = np.random.default_rng(4)
    reference = rng.normal(size=(400, 8))
    assert precision_recall(reference, reference.copy()) == (1.0, 1.0)

    fresh = rng.normal(size=(400, 8))  # another draw of the same distribution
    precision, recall = precision_recall(reference, fresh)
    assert precision > 0.7 and recall > 0.7

    collapsed = reference[0] + 0.01 * rng.normal(size=(400, 8))  # mode collapse onto one real point
    precision, recall = precision_recall(reference, collapsed)
    assert precision == 1.0 and recall < 0.05

    assert precision_recall(reference, reference + 100.0) == (0.0, 0.0)


def test_precision_uses_the_kth_neighbour_radius():
    """Reference points 0..9 on a line: with k = 3 the end point 0 has radius 3 (its neighbours 1, 2, 3)."""
    reference = np.arange(10, dtype=np.float64)[:, None]
    inside, outside = np.array([[-3.0]] * 4), np.array([[-3.5]] * 4)
    assert precision_recall(reference, inside, k=3)[0] == 1.0
    assert precision_recall(reference, outside, k=3)[0] == 0.0
    assert precision_recall(reference, outside, k=3, block=3) == precision_recall(reference, outside, k=3)
