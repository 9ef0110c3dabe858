"""Tests of dasgd.ml.optim: update rules against hand-computed values, step-size rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dasgd.errors import ConfigError
from dasgd.ml.optim import (
    DELAY_RULES,
    OPTIMIZERS,
    SGD,
    AMSGrad,
    build_optimizer,
    delay_adaptive_lr,
)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sgd_step_is_minus_lr_g(dtype):
    g = np.random.default_rng(0).normal(size=7).astype(dtype)
    opt = SGD(7, 0.3, dtype=dtype)
    u = opt.update(g)
    assert u.dtype == dtype and u.shape == (7,)
    # exact: u = -lr * g is one rounded product per entry, as in the expected value
    np.testing.assert_array_equal(u, -0.3 * g)
    np.testing.assert_array_equal(opt.update(g), -0.3 * g)  # no state without momentum


def test_momentum_three_steps_by_hand():
    # mu = 0.5, lr = 0.25: every value below is exact in binary floating point
    opt = SGD(2, 0.25, momentum=0.5)
    u1 = opt.update(np.array([1.0, -2.0])).copy()
    u2 = opt.update(np.array([0.5, 4.0])).copy()
    u3 = opt.update(np.array([-1.0, 1.0])).copy()
    # v1 = g1 = [1, -2]                              u1 = -0.25 v1
    np.testing.assert_array_equal(u1, [-0.25, 0.5])
    # v2 = 0.5 [1, -2] + [0.5, 4] = [1, 3]           u2 = -0.25 v2
    np.testing.assert_array_equal(u2, [-0.25, -0.75])
    # v3 = 0.5 [1, 3] + [-1, 1] = [-0.5, 2.5]        u3 = -0.25 v3
    np.testing.assert_array_equal(u3, [0.125, -0.625])


def test_nesterov_two_steps_by_hand():
    opt = SGD(2, 0.25, momentum=0.5, nesterov=True)
    u1 = opt.update(np.array([1.0, -2.0])).copy()
    u2 = opt.update(np.array([0.5, 4.0])).copy()
    # v1 = [1, -2];  u1 = -0.25 (g1 + 0.5 v1) = -0.25 [1.5, -3]
    np.testing.assert_array_equal(u1, [-0.375, 0.75])
    # v2 = [1, 3];   u2 = -0.25 (g2 + 0.5 v2) = -0.25 [1, 5.5]
    np.testing.assert_array_equal(u2, [-0.25, -1.375])


def test_amsgrad_three_steps_by_hand():
    eps = 1e-8
    opt = AMSGrad(2, 0.1, beta1=0.5, beta2=0.75, eps=eps)
    u1 = opt.update(np.array([1.0, 2.0])).copy()
    u2 = opt.update(np.array([-1.0, 0.0])).copy()
    u3 = opt.update(np.array([0.0, 0.0])).copy()
    # step 1: m = 0.5*0 + 0.5*[1, 2] = [0.5, 1]
    #         v = 0.75*0 + 0.25*[1, 4] = [0.25, 1]; v_hat = [0.25, 1]; sqrt = [0.5, 1]
    np.testing.assert_allclose(u1, [-0.1 * 0.5 / (0.5 + eps), -0.1 * 1.0 / (1.0 + eps)], rtol=1e-13)
    # step 2: m = 0.5*[0.5, 1] + 0.5*[-1, 0] = [-0.25, 0.5]
    #         v = 0.75*[0.25, 1] + 0.25*[1, 0] = [0.4375, 0.75]
    #         v_hat = max([0.25, 1], [0.4375, 0.75]) = [0.4375, 1]
    s = math.sqrt(0.4375)
    np.testing.assert_allclose(u2, [-0.1 * -0.25 / (s + eps), -0.1 * 0.5 / (1.0 + eps)], rtol=1e-13)
    # step 3: m = [-0.125, 0.25]; v = [0.328125, 0.5625]; v_hat stays [0.4375, 1]
    np.testing.assert_allclose(
        u3, [-0.1 * -0.125 / (s + eps), -0.1 * 0.25 / (1.0 + eps)], rtol=1e-13
    )
    np.testing.assert_array_equal(opt.v_hat, [0.4375, 1.0])


def test_amsgrad_default_betas_one_step_by_hand():
    opt = AMSGrad(1, 0.01)
    u = opt.update(np.array([2.0]))
    # m = 0.1 * 2 = 0.2; v = 0.001 * 4 = 0.004; no bias correction
    np.testing.assert_allclose(u, [-0.01 * 0.2 / (math.sqrt(0.004) + 1e-8)], rtol=1e-13)


def test_amsgrad_v_hat_is_monotone():
    rng = np.random.default_rng(0)
    opt = AMSGrad(50, 0.01, beta2=0.9)
    previous = np.zeros(50)
    for step in range(40):
        scale = 10.0 if step < 5 else 0.1  # large gradients first, so v decreases later
        opt.update(rng.normal(0.0, scale, size=50))
        assert np.all(opt.v_hat >= previous)
        previous = opt.v_hat.copy()
    with pytest.raises(ValueError, match="read-only"):
        opt.v_hat[0] = 0.0  # read-only view


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_returned_buffer_is_reused(name):
    opt = build_optimizer(name, 3, 0.1)
    u1 = opt.update(np.array([1.0, 2.0, 3.0]))
    first = u1.copy()
    u2 = opt.update(np.array([-4.0, 5.0, 0.5]))
    assert u2 is u1  # documented: the next call overwrites the previous change
    assert not np.array_equal(u1, first)


def test_lr_override():
    g = np.array([1.0, -2.0, 4.0])
    opt = SGD(3, 0.1)
    # exact: one rounded product per entry on both sides
    np.testing.assert_array_equal(opt.update(g, lr=0.5), -0.5 * g)
    np.testing.assert_array_equal(opt.update(g), -0.1 * g)  # the default is unchanged
    np.testing.assert_array_equal(opt.update(g, lr=0.0), np.zeros(3))
    assert opt.lr == 0.1
    # with state: same state, the change scales linearly with the override (0.2 = 2 * 0.1
    # and 0.05 = 0.5 * 0.1 exactly in binary; the order of the rounded operations differs)
    a, b = AMSGrad(3, 0.1), AMSGrad(3, 0.1)
    np.testing.assert_allclose(a.update(g, lr=0.2), 2.0 * b.update(g), rtol=1e-15)
    m1, m2 = SGD(3, 0.1, momentum=0.9), SGD(3, 0.1, momentum=0.9)
    m1.update(g)
    m2.update(g)
    np.testing.assert_allclose(m1.update(g, lr=0.05), 0.5 * m2.update(g), rtol=1e-15)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_float32_stays_float32(name):
    opt = build_optimizer(name, 4, 0.1, dtype=np.float32)
    u = opt.update(np.ones(4, dtype=np.float32), lr=0.05)
    assert u.dtype == np.float32
    with pytest.raises(
        ConfigError,
        match="grad must be a float32 array of shape \\(4,\\), got shape \\(4,\\), dtype float64",
    ):
        opt.update(np.ones(4))


def test_build_optimizer_and_state_dict():
    sgd = build_optimizer("sgd", 5, 0.1, momentum=0.9)
    assert isinstance(sgd, SGD) and sgd.momentum == 0.0 and sgd.name == "sgd"
    mom = build_optimizer("momentum", 5, 0.1, momentum=0.8)
    assert isinstance(mom, SGD) and mom.momentum == 0.8 and mom.name == "momentum"
    ams = build_optimizer("amsgrad", 5, 0.1)
    assert isinstance(ams, AMSGrad)
    assert (ams.beta1, ams.beta2, ams.eps) == (0.9, 0.999, 1e-8)
    for opt, name in [(sgd, "sgd"), (mom, "momentum"), (ams, "amsgrad")]:
        info = json.loads(json.dumps(opt.state_dict()))
        assert info["name"] == name and info["lr"] == 0.1 and info["n_params"] == 5
    assert json.loads(json.dumps(mom.state_dict()))["momentum"] == 0.8
    assert json.loads(json.dumps(ams.state_dict()))["beta2"] == 0.999


@pytest.mark.parametrize(
    ("lr", "delay", "concurrency", "rule", "expected"),
    [
        (0.1, 0, 4, "inverse", 0.1),  # tau <= tau_C: lr
        (0.1, 4, 4, "inverse", 0.1),
        (0.1, 5, 4, "inverse", 0.1 / 5),  # tau > tau_C: lr / tau
        (0.1, 40, 4, "inverse", 0.1 / 40),
        (0.1, 2, 1, "inverse", 0.05),
        (0.1, 4, 4, "drop", 0.1),
        (0.1, 5, 4, "drop", 0.0),  # tau > tau_C: dropped
        (0.1, 100, 4, "none", 0.1),
        (0.1, 3, 4, "none", 0.1),
    ],
)
def test_delay_adaptive_lr_table(lr, delay, concurrency, rule, expected):
    # exact: the rule is lr or one division lr / tau, the same operation as `expected`
    assert delay_adaptive_lr(lr, delay, concurrency, rule=rule) == expected


def test_delay_adaptive_lr_default_rule_is_inverse():
    assert "inverse" in DELAY_RULES
    assert delay_adaptive_lr(0.3, 6, 2) == 0.3 / 6
    assert delay_adaptive_lr(0.3, np.int64(6), np.int64(2)) == 0.3 / 6


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: SGD(3, 0.0), "lr must be a finite number > 0, got 0.0"),
        (lambda: SGD(3, -0.1), "got -0.1"),
        (lambda: SGD(3, float("nan")), "got nan"),
        (lambda: SGD(3, float("inf")), "got inf"),
        (lambda: SGD(3, "fast"), "got 'fast'"),
        (lambda: SGD(0, 0.1), "n_params must be an integer >= 1, got 0"),
        (lambda: SGD(3, 0.1, dtype=np.int64), "dtype must be float32 or float64, got int64"),
        (lambda: SGD(3, 0.1, momentum=1.0), "momentum must be a number in [0, 1), got 1.0"),
        (lambda: SGD(3, 0.1, momentum=-0.1), "got -0.1"),
        (lambda: SGD(3, 0.1, nesterov=True), "nesterov=True needs momentum in (0, 1)"),
        (lambda: AMSGrad(3, 0.1, beta1=1.0), "beta1 must be a number in [0, 1), got 1.0"),
        (lambda: AMSGrad(3, 0.1, beta2=1.5), "beta2 must be a number in [0, 1), got 1.5"),
        (lambda: AMSGrad(3, 0.1, eps=0.0), "eps must be a finite number > 0, got 0.0"),
        (
            lambda: build_optimizer("adam", 3, 0.1),
            "unknown optimizer 'adam': choose one of sgd, momentum, amsgrad",
        ),
        (lambda: build_optimizer("momentum", 3, 0.1, momentum=0.0), "got 0.0: use sgd"),
        (lambda: build_optimizer("momentum", 3, 0.1, momentum=1.2), "got 1.2"),
        (
            lambda: SGD(3, 0.1).update(np.ones(3), lr=-1.0),
            "lr override must be a finite number >= 0, got -1.0",
        ),
        (
            lambda: SGD(3, 0.1).update(np.ones(4)),
            "grad must be a float64 array of shape (3,), got shape (4,)",
        ),
        (
            lambda: delay_adaptive_lr(0.1, 3, 2, rule="sqrt"),
            "unknown delay rule 'sqrt': choose one of none, inverse, drop",
        ),
        (lambda: delay_adaptive_lr(0.1, -1, 2), "delay_steps must be an integer >= 0, got -1"),
        (lambda: delay_adaptive_lr(0.1, 3, 0), "concurrency must be an integer >= 1, got 0"),
        (lambda: delay_adaptive_lr(0.0, 3, 2), "lr must be a finite number > 0, got 0.0"),
    ],
)
def test_errors_name_the_bad_value(make, needle):
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
