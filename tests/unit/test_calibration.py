"""Platt calibration, the balanced threshold rule and its bootstrap interval (medops.metrics), and
folding the calibration into a model's output layer (medops.learn.calibration)."""

from __future__ import annotations

import numpy as np
import pytest

from medops.errors import MedopsError
from medops.metrics import (
    balanced_cutpoint, compute_calibration, fit_platt, logit, select_threshold, sigmoid, threshold_interval,
)


def logistic_sample(a: float, b: float, n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn with P(y=1 | z) = sigmoid(a z + b)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, n)
    y = (rng.random(n) < sigmoid(a * z + b)).astype(int)
    return y, z


def test_platt_recovers_the_temperature_and_shift_it_was_drawn_with():
    y, z = logistic_sample(0.5, 1.0)
    a, b = fit_platt(y, z)
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(1.0, abs=0.15)
    # and it calibrates: an over-confident score (z itself) has a larger ECE than the fitted one
    assert compute_calibration(y, sigmoid(a * z + b))[1] < 0.5 * compute_calibration(y, sigmoid(z))[1]


def test_platt_stays_finite_on_a_perfectly_separated_split():
    z = np.concatenate([np.linspace(-6, -1, 50), np.linspace(1, 6, 150)])
    y = np.r_[np.zeros(50), np.ones(150)].astype(int)
    a, b = fit_platt(y, z)  # plain maximum likelihood would send a to infinity
    assert np.isfinite(a) and 0 < a < 50 and np.isfinite(b)


def test_platt_needs_both_classes():
    with pytest.raises(MedopsError):
        fit_platt(np.ones(10, dtype=int), np.linspace(-1, 1, 10))


def test_the_balanced_cutpoint_is_where_the_calibrated_probability_equals_the_prior():
    y, z = logistic_sample(1.0, 1.2, seed=1)
    a, b, cut = balanced_cutpoint(y, z)
    assert sigmoid(a * cut + b) == pytest.approx(y.mean(), abs=1e-9)
    # the Bayes rule for equal priors: sensitivity and specificity both high, close to Youden's
    pred = z >= cut
    sens, spec = pred[y == 1].mean(), 1 - pred[y == 0].mean()
    youden = select_threshold(y, sigmoid(a * z + b), "youden")
    ysens = (sigmoid(a * z + b) >= youden)[y == 1].mean()
    yspec = 1 - (sigmoid(a * z + b) >= youden)[y == 0].mean()
    assert sens + spec >= ysens + yspec - 0.02


def near_separable_val(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A val split like PneumoniaMNIST's (524 images, 74 % positive, AUC ~0.997)."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(135), np.ones(389)].astype(int)
    z = np.where(y == 1, rng.normal(4.0, 1.6, len(y)), rng.normal(-4.0, 1.6, len(y)))
    return y, z


def test_the_balanced_rule_is_far_steadier_than_the_youden_argmax_on_a_near_separable_split():
    y, z = near_separable_val()
    a, b = fit_platt(y, z)
    lo_b, hi_b = threshold_interval(y, z, "balanced", a=a, b=b, bootstrap_samples=100)
    lo_y, hi_y = threshold_interval(y, z, "youden_bootstrap", a=a, b=b, bootstrap_samples=100)
    assert lo_b <= y.mean() <= hi_b
    assert (hi_b - lo_b) < 0.5 * (hi_y - lo_y)
    assert threshold_interval(y, z, "fixed") == (0.5, 0.5)


def test_logit_and_sigmoid_invert_each_other_and_clip():
    p = np.array([0.0, 1e-3, 0.5, 0.9, 1.0])
    assert np.allclose(sigmoid(logit(p)), np.clip(p, 1e-7, 1 - 1e-7))
    assert np.isfinite(logit(p)).all()


def test_folding_the_calibration_into_the_model_gives_sigmoid_of_a_z_plus_b():
    keras = pytest.importorskip("keras")
    from medops.learn.calibration import fold_calibration, model_logits
    from medops.learn.inference import predict_probabilities

    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Dense(4, activation="relu")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="probability")(h))
    x = np.random.default_rng(0).random((20, 8, 8, 1)).astype("float32")
    z = model_logits(model, x)
    assert np.allclose(predict_probabilities(model, x), sigmoid(z), atol=1e-6)
    fold_calibration(model, 0.4, -0.7)
    assert np.allclose(predict_probabilities(model, x), sigmoid(0.4 * z - 0.7), atol=1e-6)
    with pytest.raises(MedopsError):
        fold_calibration(model, -1.0, 0.0)  # a decreasing "calibration" would flip every decision


def test_platt_converges_from_logits_far_from_unit_scale():
    """A trained model's logits reach +-30; plain Newton from a=1 stepped to a=-5e8 on seed 1 of
    the quality run. The line search keeps every step downhill."""
    y, z = logistic_sample(0.5, 1.0, seed=3)
    a, b = fit_platt(y, 40 * z)  # the same data with logits 40x too confident
    assert a * 40 == pytest.approx(0.5, abs=0.05) and b == pytest.approx(1.0, abs=0.15)
    zz = np.concatenate([np.linspace(-35, -2, 135), np.linspace(3, 38, 389)])
    yy = np.r_[np.zeros(135), np.ones(389)].astype(int)
    yy[[5, 300]] = 1 - yy[[5, 300]]  # two confidently wrong images, as on a real val split
    a, b = fit_platt(yy, zz)
    assert np.isfinite(a) and a > 0 and np.isfinite(b)
