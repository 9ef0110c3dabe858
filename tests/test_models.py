"""Contract tests of dasgd.ml.models: every model's gradient against finite differences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dasgd.errors import ConfigError
from dasgd.ml.models import MODELS, Model, build_model

N_FEATURES = 5
BATCH = 8

# (id, model name, n_classes, keyword arguments of build_model)
CASES = [
    ("softmax", "softmax", 3, {}),
    ("softmax-l2", "softmax", 3, {"l2": 0.1}),
    ("logistic", "logistic", 2, {}),
    ("logistic-l2", "logistic", 2, {"l2": 0.1}),
    ("least_squares", "least_squares", 3, {}),
    ("least_squares-l2", "least_squares", 3, {"l2": 0.1}),
    ("mlp-relu", "mlp", 3, {"hidden": (4,)}),
    ("mlp-relu-2layers", "mlp", 3, {"hidden": (4, 3)}),
    ("mlp-tanh", "mlp", 3, {"hidden": (4,), "activation": "tanh"}),
    ("mlp-tanh-2layers-l2", "mlp", 3, {"hidden": (4, 3), "activation": "tanh", "l2": 0.1}),
    ("mlp-relu-2layers-l2", "mlp", 3, {"hidden": (6, 2), "l2": 0.05}),
]


def test_cases_cover_every_model():
    assert {name for _, name, _, _ in CASES} == set(MODELS)


def _problem(n_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(BATCH, N_FEATURES))
    y = rng.integers(0, n_classes, size=BATCH).astype(np.int64)
    return X, y


def _numerical_grad(model: Model, params: np.ndarray, X, y, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of ``model.loss``, one coordinate at a time."""
    grad = np.empty_like(params)
    probe = params.copy()
    for i in range(params.size):
        probe[i] = params[i] + eps
        up = model.loss(probe, X, y)
        probe[i] = params[i] - eps
        down = model.loss(probe, X, y)
        probe[i] = params[i]
        grad[i] = (up - down) / (2 * eps)
    return grad


def _reference_loss(name, n_classes, kwargs, params, X, y) -> float:
    """The documented loss, written plainly from the documented parameter layout."""
    sizes = [N_FEATURES, *kwargs.get("hidden", ())] if name == "mlp" else [N_FEATURES]
    sizes.append(1 if name == "logistic" else n_classes)
    Ws, bs, start = [], [], 0
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        Ws.append(params[start : start + fan_in * fan_out].reshape(fan_in, fan_out))
        start += fan_in * fan_out
    for fan_out in sizes[1:]:
        bs.append(params[start : start + fan_out])
        start += fan_out
    assert start == params.size
    a = X
    for W, b in zip(Ws[:-1], bs[:-1], strict=True):
        z = a @ W + b
        a = np.maximum(z, 0) if kwargs.get("activation", "relu") == "relu" else np.tanh(z)
    Z = a @ Ws[-1] + bs[-1]
    if name == "logistic":
        z = Z[:, 0]
        per_example = np.log1p(np.exp(z)) - y * z
    elif name == "least_squares":
        per_example = 0.5 * np.sum((Z - np.eye(n_classes)[y]) ** 2, axis=1)
    else:
        per_example = np.log(np.sum(np.exp(Z), axis=1)) - Z[np.arange(len(y)), y]
    penalty = 0.5 * kwargs.get("l2", 0.0) * sum(np.sum(W**2) for W in Ws)
    return float(np.mean(per_example) + penalty)


@pytest.mark.parametrize(
    ("name", "n_classes", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_model_contract(name, n_classes, kwargs):
    model = build_model(name, N_FEATURES, n_classes, **kwargs)
    X, y = _problem(n_classes)

    # init: right shape and dtype, deterministic per seed, different across seeds
    p0 = model.init_params(seed=3)
    assert p0.shape == (model.n_params,) and p0.dtype == np.float64
    np.testing.assert_array_equal(p0, model.init_params(seed=3))
    assert not np.array_equal(p0, model.init_params(seed=4))
    p32 = model.init_params(seed=3, dtype=np.float32)
    assert p32.dtype == np.float32
    np.testing.assert_array_equal(p32, p0.astype(np.float32))

    # move away from the init so every bias and unit takes part
    params = p0 + np.random.default_rng(1).normal(0.0, 0.5, size=model.n_params)
    before = params.copy()

    # gradient against central finite differences, every coordinate (float64)
    loss, grad = model.loss_and_grad(params, X, y)
    assert isinstance(loss, float) and np.isfinite(loss)
    assert loss == pytest.approx(model.loss(params, X, y), rel=1e-12)
    assert loss == pytest.approx(_reference_loss(name, n_classes, kwargs, params, X, y), rel=1e-12)
    assert grad.shape == (model.n_params,) and grad.dtype == np.float64
    numerical = _numerical_grad(model, params, X, y)
    rel_err = np.linalg.norm(grad - numerical) / max(np.linalg.norm(numerical), 1e-12)
    assert rel_err < 1e-6, f"relative gradient error {rel_err:.2e}"
    np.testing.assert_allclose(grad, numerical, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(params, before)  # params not modified

    # out= is written in place and returned; the result does not depend on its contents
    out = np.full(model.n_params, np.nan)
    loss_out, grad_out = model.loss_and_grad(params, X, y, out=out)
    assert grad_out is out
    # exact: the loss comes from the same forward pass on the same arrays and work buffers
    assert loss_out == loss
    # the gradient lands in other memory; a BLAS kernel may pick its code path by the
    # destination's alignment, so allow a few ulps (NaN left over from `out` would fail)
    np.testing.assert_allclose(out, grad, rtol=1e-12, atol=1e-15)

    # the model sees in-place changes of params (no stale cached views)
    params += 0.1
    np.testing.assert_allclose(
        model.loss_and_grad(params, X, y, out=out)[1],
        model.loss_and_grad(params.copy(), X, y)[1],
        rtol=1e-12,
        atol=1e-15,
    )
    params[...] = before  # not `params -= 0.1`: x + 0.1 - 0.1 is not x in floating point

    # a non-contiguous params vector gives the same result
    strided = np.zeros(2 * model.n_params)[::2]
    strided[...] = params
    np.testing.assert_allclose(model.loss_and_grad(strided, X, y)[1], grad, rtol=1e-12, atol=1e-15)

    # other batch sizes, interleaved (per-batch-size work buffers). A buffer shared by
    # mistake would change the results by O(1); a buffer allocated anew may sit at another
    # alignment and round differently in BLAS or numpy's SIMD loops: a few ulps are allowed
    loss_3, grad_3 = model.loss_and_grad(params, X[:3], y[:3])
    assert model.loss_and_grad(params, X, y)[0] == pytest.approx(loss, rel=1e-12)
    np.testing.assert_allclose(
        model.loss_and_grad(params, X[:3], y[:3])[1], grad_3, rtol=1e-12, atol=1e-15
    )
    one_loss, _ = model.loss_and_grad(params, X[:1], y[:1])
    assert np.isfinite(one_loss)

    # float32 params: float32 gradient (X stays float64 on purpose), close to float64
    p32 = params.astype(np.float32)
    loss32, grad32 = model.loss_and_grad(p32, X, y)
    assert grad32.dtype == np.float32
    assert loss32 == pytest.approx(loss, rel=1e-4)  # float32 has 7 significant digits
    np.testing.assert_allclose(grad32, grad, rtol=1e-3, atol=1e-4)
    out32 = np.empty(model.n_params, dtype=np.float32)
    assert model.loss_and_grad(p32, X, y, out=out32)[1] is out32

    # predictions and accuracy
    pred = model.predict(params, X)
    assert pred.shape == (BATCH,) and pred.dtype == np.int64
    assert pred.min() >= 0 and pred.max() < n_classes
    acc = model.accuracy(params, X, y)
    assert 0.0 <= acc <= 1.0
    assert acc == np.mean(pred == y)  # exact: the same mean of the same booleans
    assert model.predict(p32, X).dtype == np.int64

    # describe: JSON-serializable, with the documented keys
    info = json.loads(json.dumps(model.describe()))
    assert info["name"] == name
    assert info["n_features"] == N_FEATURES and info["n_classes"] == n_classes
    assert info["n_params"] == model.n_params
    assert info["l2"] == kwargs.get("l2", 0.0)
    if name == "mlp":
        assert info["hidden"] == list(kwargs["hidden"])
        assert info["activation"] == kwargs.get("activation", "relu")
    else:
        assert info["hidden"] == [] and info["activation"] is None


@pytest.mark.parametrize("name", MODELS)
def test_sgd_reduces_loss_on_separable_toy(name):
    rng = np.random.default_rng(0)
    centers = np.array([[3.0, 0.0, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0]])
    y = np.repeat(np.arange(2, dtype=np.int64), 32)
    X = centers[y] + rng.normal(0.0, 0.5, size=(64, 4))
    model = build_model(name, 4, 2, hidden=(8,))
    params = model.init_params(seed=0)
    grad = np.empty_like(params)
    first = model.loss(params, X, y)
    for _epoch in range(4):  # 32 steps of plain mini-batch SGD, batch 8
        order = rng.permutation(64)
        for start in range(0, 64, 8):
            idx = order[start : start + 8]
            _, grad = model.loss_and_grad(params, X[idx], y[idx], out=grad)
            params -= 0.1 * grad
    assert model.loss(params, X, y) < 0.5 * first
    assert model.accuracy(params, X, y) == 1.0


def test_mlp_layout_and_size():
    model = build_model("mlp", 64, 10, hidden=(256,))
    assert model.n_params == 64 * 256 + 256 * 10 + 256 + 10
    assert model.n_weights == 64 * 256 + 256 * 10
    params = model.init_params(seed=0)
    assert np.all(params[model.n_weights :] == 0.0)  # biases start at zero
    # He init of the relu layer: std close to sqrt(2 / 64)
    assert np.std(params[: 64 * 256]) == pytest.approx(np.sqrt(2 / 64), rel=0.05)


def test_softmax_is_stable_for_huge_logits():
    model = build_model("softmax", 2, 3)
    params = np.zeros(model.n_params)
    params[:6] = [1e4, -1e4, 0.0, 0.0, 0.0, 1e4]
    X = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([1, 2], dtype=np.int64)
    loss, grad = model.loss_and_grad(params, X, y)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss == pytest.approx(2e4 / 2)  # example 0 is wrong by a margin of 2e4


def test_logistic_is_stable_for_huge_scores():
    model = build_model("logistic", 1, 2)
    params = np.array([1e4, 0.0])
    X = np.array([[1.0], [-1.0]])
    loss, grad = model.loss_and_grad(params, X, np.array([0, 0], dtype=np.int64))
    assert loss == pytest.approx(1e4 / 2) and np.all(np.isfinite(grad))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: build_model("foo", 4, 3), "unknown model 'foo': choose one of softmax"),
        (lambda: build_model("softmax", 0, 3), "n_features must be an integer >= 1, got 0"),
        (lambda: build_model("softmax", 4, 0), "n_classes must be an integer >= 1, got 0"),
        (lambda: build_model("softmax", 4.5, 3), "got 4.5"),
        (
            lambda: build_model("logistic", 4, 10),
            "model 'logistic' needs 2 classes but the dataset has 10: use softmax",
        ),
        (lambda: build_model("mlp", 4, 3, hidden=(64, 0)), "got (64, 0)"),
        (lambda: build_model("mlp", 4, 3, hidden=()), "at least one hidden layer"),
        (lambda: build_model("mlp", 4, 3, activation="sigmoid"), "unknown activation 'sigmoid'"),
        (
            lambda: build_model("softmax", 4, 3, l2=-1.0),
            "l2 must be a finite number >= 0, got -1.0",
        ),
        (lambda: build_model("mlp", 4, 3, l2=float("nan")), "got nan"),
        (lambda: build_model("softmax", 4, 3).init_params(dtype=np.int32), "got int32"),
        (
            lambda: build_model("softmax", 4, 3).loss(
                np.zeros(7), np.zeros((2, 4)), np.zeros(2, np.int64)
            ),
            "params must be a float32 or float64 array of shape (15,), got shape (7,)",
        ),
        (
            lambda: build_model("softmax", 4, 3).loss(
                np.zeros(15), np.zeros((2, 5)), np.zeros(2, np.int64)
            ),
            "X must have shape (m, 4), got shape (2, 5)",
        ),
        (
            lambda: build_model("softmax", 4, 3).loss(
                np.zeros(15), np.zeros((2, 4)), np.zeros(3, np.int64)
            ),
            "y must have shape (2,)",
        ),
        (
            lambda: build_model("softmax", 4, 3).loss(
                np.zeros(15), np.zeros((0, 4)), np.zeros(0, np.int64)
            ),
            "empty batch",
        ),
        (
            lambda: build_model("softmax", 4, 3).loss_and_grad(
                np.zeros(15), np.zeros((2, 4)), np.zeros(2, np.int64), out=np.zeros(15, np.float32)
            ),
            "out must be a writeable C-contiguous float64 array of shape (15,), got shape (15,), dtype float32",
        ),
    ],
)
def test_errors_name_the_bad_value(make, needle):
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
