"""k-NN precision / recall (Kynkäänniemi et al. 2019) and the Inception Score against hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hdebm_ray.evaluation.sample_metrics import inception_score, knn_radii, precision_recall


def column(*values) -> np.ndarray:
    return np.array(values, dtype=float)[:, None]


def test_precision_and_recall_of_points_on_a_line_equal_the_hand_count():
    real = column(*range(10))  # k = 1: every real ball has radius 1
    assert knn_radii(real, 1).tolist() == [1.0] * 10
    # fake: 0.5 and 1.5 lie in real balls, 100 and 101 do not -> precision 2/4. Fake radii (k = 1) are all 1: the
    # real points within 1 of 0.5 or 1.5 are 0, 1, 2 -> recall 3/10.
    precision, recall = precision_recall(real, column(0.5, 1.5, 100, 101), k=1)
    assert precision == pytest.approx(0.5) and recall == pytest.approx(0.3)
    # one far fake point makes the other's ball huge (radius 19.5): it covers every real point
    assert precision_recall(real, column(0.5, 20), k=1) == pytest.approx((0.5, 1.0))


def test_identical_sets_score_one_and_disjoint_sets_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_a_dropped_mode_costs_recall_and_noise_costs_precision():
    rng = np.random.default_rng(0)
    centres = np.zeros((2, 8))
    centres[1, 0] = 50.0
    real = np.concatenate([c + rng.normal(size=(500, 8)) for c in centres])
    # A fresh draw of the same distribution: with k = 3 in 8-D both stay below 1 (the balls miss a little).
    fresh_p, fresh_r = precision_recall(real, np.concatenate([c + rng.normal(size=(500, 8)) for c in centres]))
    assert 0.8 < fresh_p < 1 and 0.8 < fresh_r < 1
    one_mode = centres[0] + rng.normal(size=(1000, 8))  # realistic samples of half the data
    precision, recall = precision_recall(real, one_mode)
    assert precision > fresh_p - 0.05 and 0.4 * fresh_r < recall < 0.55 * fresh_r
    blurred = real + rng.normal(scale=3.0, size=real.shape)  # both modes, none of them sharp
    precision, recall = precision_recall(real, blurred)
    assert precision < 0.2 and recall > 0.9


def test_knn_radii_need_more_vectors_than_neighbours():
    with pytest.raises(ValueError, match="k = 3"):
        knn_radii(np.zeros((3, 2)), 3)


def test_inception_score_closed_forms():
    # the same prediction for every sample: KL = 0 -> IS = 1
    assert inception_score(np.full((100, 10), 0.1)) == pytest.approx((1.0, 0.0))
    # confident and balanced over 10 classes in every split: IS = 10
    onehot = np.eye(10)[np.arange(1000) % 10]
    assert inception_score(onehot) == pytest.approx((10.0, 0.0))
    # half of the mass on each of two classes, pairs {0,1} and {2,3} equally often: KL = log 2 -> IS = 2
    pairs = np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])[np.arange(200) % 2]
    assert inception_score(pairs, splits=4) == pytest.approx((2.0, 0.0))
    # splits that see only one class score 1 each
    assert inception_score(np.eye(2)[[0] * 50 + [1] * 50], splits=2) == pytest.approx((1.0, 0.0))
    assert math.isclose(inception_score(np.eye(2)[[0] * 50 + [1] * 50], splits=1)[0], 2.0)
