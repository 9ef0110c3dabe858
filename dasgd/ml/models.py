"""Numpy models over one flat parameter vector.

Every model in dasgd computes with a flat parameter vector ``params`` of shape
``(n_params,)`` (dtype float32 or float64). The runtime owns that vector and adds
local updates and received deltas to it in place (ALGORITHMS.md §1); a model
holds no parameters, it only computes the loss, its gradient and predictions on
a mini-batch.

=================  ==========================  ========================================
name               class                       what it is
=================  ==========================  ========================================
``softmax``        :class:`SoftmaxRegression`  multinomial logistic regression
``logistic``       :class:`LogisticRegression` binary logistic regression (2 classes)
``least_squares``  :class:`LeastSquares`       linear regression onto one-hot targets
``mlp``            :class:`MLP`                fully connected net, softmax output
=================  ==========================  ========================================

Build one with :func:`build_model`. Any PyTorch module plus a loss runs as a
model too: a name ``torch:MODULE:FACTORY`` builds a
:class:`dasgd.ml.torch_model.TorchModel` (torch is imported only then).
Conventions shared by all models:

- ``X`` is a batch of shape ``(m, n_features)``; it is cast to ``params.dtype``
  (``X.astype(params.dtype, copy=False)``), so all arithmetic, the gradient and
  the returned loss are computed in the dtype of ``params``. Keep the data in the
  model's dtype to avoid a copy per batch.
- ``y`` holds int64 class ids in ``0 .. n_classes - 1`` of shape ``(m,)``. They
  are not range-checked in the hot path (the data module validates labels once);
  ids out of range give wrong results or an ``IndexError``.
- Layout of ``params``: all weight matrices first (C order, layer by layer),
  then all bias vectors. The L2 penalty ``l2 / 2 * ||weights||^2`` therefore
  acts on the leading ``n_weights`` entries; biases are not penalized.
- ``loss_and_grad(params, X, y, out=grad)`` writes the gradient into ``out``
  without allocating a gradient vector. Intermediate activations live in
  per-batch-size work buffers cached on the model (fresh large allocations are
  slow on our machines), so one model object must not be used from two threads
  at once; give each thread (or process) its own model.
"""

from __future__ import annotations

import abc
import math
from collections import OrderedDict

import numpy as np

from ..errors import ConfigError
from ..validation import check_dtype, check_int, check_non_negative

__all__ = [
    "MODELS",
    "ACTIVATIONS",
    "Model",
    "SoftmaxRegression",
    "LogisticRegression",
    "LeastSquares",
    "MLP",
    "build_model",
    "check_model_name",
]

MODELS: tuple[str, ...] = ("softmax", "logistic", "least_squares", "mlp")
"""Names accepted by :func:`build_model`."""

#: Prefix of the names of PyTorch models (:mod:`dasgd.ml.torch_model`).
TORCH_PREFIX = "torch:"

_VALID_MODELS = f"choose one of {', '.join(MODELS)}, or torch:MODULE:FACTORY for a PyTorch model"

ACTIVATIONS: tuple[str, ...] = ("relu", "tanh")
"""Hidden-layer activations of :class:`MLP`."""

_LINEAR_INIT_STD = 0.01
"""Standard deviation of the seeded normal init of the linear models' weights."""

_MAX_WORKSPACES = 4
"""Batch sizes whose work buffers a model keeps (least recently used dropped)."""

_MAX_CACHED_VIEWS = 4
"""Flat vectors whose weight/bias views a model keeps (oldest dropped)."""


# ---------------------------------------------------------------------------
# model-specific checks (shared ones: dasgd.validation)


def _check_hidden(hidden) -> tuple[int, ...]:
    if isinstance(hidden, (int, np.integer)) and not isinstance(hidden, bool):
        hidden = (hidden,)
    try:
        sizes = tuple(hidden)
    except TypeError:
        raise ConfigError(
            f"hidden must be a sequence of layer sizes >= 1, got {hidden!r}"
        ) from None
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ConfigError(f"hidden layer sizes must be integers >= 1, got {sizes!r}")
    if not sizes:
        raise ConfigError("model 'mlp' needs at least one hidden layer, got hidden=()")
    return tuple(int(s) for s in sizes)


def _check_activation(activation) -> str:
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}"
        )
    return activation


def _softmax_xent(Z: np.ndarray, y: np.ndarray, ws: dict, grad: bool) -> float:
    """Mean softmax cross-entropy of logits ``Z``; overwrites ``Z``.

    Parameters
    ----------
    Z : ndarray of shape (m, C), dtype float32 or float64, C-contiguous
        Logits; overwritten: with the gradient of the mean loss with respect to
        the logits, ``(softmax(Z) - onehot(y)) / m``, if ``grad``, else garbage.
    y : ndarray of shape (m,), dtype int64
        Class ids in ``0 .. C - 1``.
    ws : dict
        Work buffers of the batch size (see ``_FeedForward._new_workspace``).
    grad : bool
        Whether to leave the gradient in ``Z``.

    Returns
    -------
    loss : float
        ``mean_i [logsumexp(Z_i) - Z_i[y_i]]``, computed stably by subtracting
        the row maximum before exponentiating.
    """
    m = Z.shape[0]
    Zf = Z.reshape(-1)  # view; Z[i, y_i] == Zf[i * C + y_i]
    idx = np.add(ws["row_offsets"], y, out=ws["idx"])
    Z -= np.maximum.reduce(Z, axis=1, keepdims=True)
    lse = Zf.take(idx)  # shifted logit of the true class
    np.exp(Z, out=Z)
    s = np.matmul(Z, ws["ones_c"], out=ws["sum_m"])  # row sums of exp
    np.log(s, out=ws["lse_m"])
    np.subtract(ws["lse_m"], lse, out=lse)
    loss = float(np.add.reduce(lse)) / m
    if grad:
        s *= m
        Z /= s[:, None]
        Zf[idx] -= 1.0 / m
    return loss


# ---------------------------------------------------------------------------
# the interface


class Model(abc.ABC):
    """A differentiable model on a flat parameter vector.

    Attributes
    ----------
    name : str
        One of :data:`MODELS`.
    n_features : int
        Number of input features d.
    n_classes : int
        Number of classes C; labels are ``0 .. C - 1``.
    n_params : int
        Length of the flat parameter vector.
    n_weights : int
        Number of leading entries of ``params`` that are weights (penalized by
        ``l2``); the remaining ``n_params - n_weights`` entries are biases.
    l2 : float
        L2 penalty coefficient (>= 0).
    """

    name: str
    n_features: int
    n_classes: int
    n_params: int
    n_weights: int
    l2: float

    def __init__(self, n_features: int, n_classes: int, *, l2: float = 0.0) -> None:
        self.n_features = check_int(n_features, "n_features", 1)
        self.n_classes = check_int(n_classes, "n_classes", 1)
        self.l2 = check_non_negative(l2, "l2")
        self._workspaces: OrderedDict = OrderedDict()
        self._l2_tmp: dict = {}
        self._views: dict = {}

    # -- abstract core --------------------------------------------------------

    @abc.abstractmethod
    def init_params(self, seed: int = 0, dtype=np.float64) -> np.ndarray:
        """Initial parameters, deterministic for a seed.

        Parameters
        ----------
        seed : int, default 0
            Seed of ``np.random.default_rng``. Same seed, same vector (the
            values are drawn in float64 and then cast, so a float32 vector is
            the float64 one rounded).
        dtype : {np.float64, np.float32}, default np.float64
            Dtype of the returned vector, and hence of all computation.

        Returns
        -------
        params : ndarray of shape (n_params,), dtype ``dtype``
            A freshly allocated, C-contiguous vector.
        """

    @abc.abstractmethod
    def _data_loss_grad(
        self,
        params: np.ndarray,
        X: np.ndarray,
        y: np.ndarray,
        g: np.ndarray | None,
        g_reused: bool = True,
    ) -> float:
        """Mean data loss; if ``g`` is given, write the data gradient into it.

        ``g_reused`` is False when ``g`` was allocated for this call only (then
        its views are not worth caching).
        """

    @abc.abstractmethod
    def _scores(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Scores whose argmax (or sign, for 1-D) is the predicted class."""

    # -- public API -----------------------------------------------------------

    def loss_and_grad(
        self,
        params: np.ndarray,
        X: np.ndarray,
        y: np.ndarray,
        out: np.ndarray | None = None,
    ) -> tuple[float, np.ndarray]:
        """Mean loss on a batch and its gradient.

        The loss is ``mean_i loss_i + l2 / 2 * ||weights||^2`` (biases excluded
        from the penalty), where ``loss_i`` is the model's per-example loss (see
        the class docstring).

        Parameters
        ----------
        params : ndarray of shape (n_params,), dtype float32 or float64
            Parameters; not modified.
        X : ndarray of shape (m, n_features), m >= 1
            Mini-batch; cast to ``params.dtype`` without copy when it already has it.
        y : ndarray of shape (m,), dtype int64
            Class ids in ``0 .. n_classes - 1``.
        out : ndarray of shape (n_params,), dtype ``params.dtype``, optional
            C-contiguous vector (not ``params`` itself) to write the gradient
            into. Pass one in the hot loop: then no gradient vector is allocated.

        Returns
        -------
        loss : float
            Mean loss over the batch plus the L2 term.
        grad : ndarray of shape (n_params,), dtype ``params.dtype``
            The gradient of ``loss`` with respect to ``params``: ``out`` itself
            when given, else a new array.
        """
        self._check_params(params)
        X = self._check_batch(params, X, y)
        out_given = out is not None
        if out is None:
            out = np.empty(self.n_params, dtype=params.dtype)
        elif (
            not isinstance(out, np.ndarray)
            or out.shape != (self.n_params,)
            or out.dtype != params.dtype
            or not out.flags.c_contiguous
            or not out.flags.writeable
            or out is params
        ):
            raise ConfigError(
                f"out must be a writeable C-contiguous {params.dtype.name} array of shape "
                f"({self.n_params},), got {_describe_array(out)}"
            )
        loss = self._data_loss_grad(params, X, y, out, out_given)
        if self.l2 > 0.0:
            w = params[: self.n_weights]
            loss += 0.5 * self.l2 * float(np.dot(w, w))
            tmp = self._l2_tmp.get(params.dtype.char)
            if tmp is None:
                tmp = self._l2_tmp[params.dtype.char] = np.empty(self.n_weights, params.dtype)
            np.multiply(w, self.l2, out=tmp)
            out[: self.n_weights] += tmp
        return loss, out

    def loss(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Mean loss on a batch (the ``loss`` of :meth:`loss_and_grad`, no gradient).

        Parameters
        ----------
        params : ndarray of shape (n_params,), dtype float32 or float64
        X : ndarray of shape (m, n_features), m >= 1
        y : ndarray of shape (m,), dtype int64

        Returns
        -------
        loss : float
            Mean loss over the batch plus ``l2 / 2 * ||weights||^2``.
        """
        self._check_params(params)
        X = self._check_batch(params, X, y)
        loss = self._data_loss_grad(params, X, y, None)
        if self.l2 > 0.0:
            w = params[: self.n_weights]
            loss += 0.5 * self.l2 * float(np.dot(w, w))
        return loss

    def predict(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        """Predicted class ids.

        Parameters
        ----------
        params : ndarray of shape (n_params,), dtype float32 or float64
        X : ndarray of shape (m, n_features)

        Returns
        -------
        labels : ndarray of shape (m,), dtype int64
            Class ids in ``0 .. n_classes - 1`` (a new array).
        """
        self._check_params(params)
        X = self._check_batch(params, X, None)
        scores = self._scores(params, X)
        if scores.ndim == 1:
            return (scores > 0).astype(np.int64)
        return scores.argmax(axis=1).astype(np.int64, copy=False)

    def accuracy(self, params: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Fraction of correctly classified examples.

        Parameters
        ----------
        params : ndarray of shape (n_params,), dtype float32 or float64
        X : ndarray of shape (m, n_features), m >= 1
        y : ndarray of shape (m,), dtype int64

        Returns
        -------
        accuracy : float
            In ``[0, 1]``.
        """
        pred = self.predict(params, X)
        y = np.asarray(y)
        if y.shape != pred.shape or pred.shape[0] == 0:
            raise ConfigError(
                f"y must have shape ({pred.shape[0]},) with at least one label, got {y.shape}"
            )
        return float(np.count_nonzero(pred == y)) / pred.shape[0]

    def describe(self) -> dict:
        """JSON-serializable summary for configs and logs.

        Returns
        -------
        info : dict
            Keys ``name``, ``n_features``, ``n_classes``, ``n_params``,
            ``hidden`` (list of int; empty for linear models), ``activation``
            (str, or None for linear models), ``l2`` (float).
        """
        return {
            "name": self.name,
            "n_features": self.n_features,
            "n_classes": self.n_classes,
            "n_params": self.n_params,
            "hidden": list(getattr(self, "hidden", ())),
            "activation": getattr(self, "activation", None),
            "l2": self.l2,
        }

    def __repr__(self) -> str:
        info = self.describe()
        args = ", ".join(f"{k}={v!r}" for k, v in info.items() if k != "name")
        return f"{type(self).__name__}({args})"

    # -- helpers --------------------------------------------------------------

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_workspaces"] = OrderedDict()
        state["_l2_tmp"] = {}
        state["_views"] = {}
        return state

    def _check_params(self, params) -> None:
        if (
            not isinstance(params, np.ndarray)
            or params.shape != (self.n_params,)
            or params.dtype.char not in "fd"
        ):
            raise ConfigError(
                f"params must be a float32 or float64 array of shape ({self.n_params},), "
                f"got {_describe_array(params)}"
            )

    def _check_batch(self, params: np.ndarray, X, y) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ConfigError(f"X must have shape (m, {self.n_features}), got {_describe_array(X)}")
        if y is not None:
            m = X.shape[0]
            if m == 0:
                raise ConfigError("X is an empty batch (0 rows): need at least one example")
            if getattr(y, "shape", None) != (m,):
                raise ConfigError(f"y must have shape ({m},) to match X, got {_describe_array(y)}")
        return X.astype(params.dtype, copy=False)

    def _workspace(self, m: int, dtype: np.dtype) -> dict:
        """Work buffers for a batch of ``m`` rows in ``dtype`` (cached, LRU)."""
        key = (m, dtype.char)
        ws = self._workspaces.get(key)
        if ws is None:
            ws = self._new_workspace(m, dtype)
            self._workspaces[key] = ws
            if len(self._workspaces) > _MAX_WORKSPACES:
                self._workspaces.popitem(last=False)
        else:
            self._workspaces.move_to_end(key)
        return ws

    def _new_workspace(self, m: int, dtype: np.dtype) -> dict:
        return {}


def _init_linear(model: Model, seed: int, dtype) -> np.ndarray:
    """Weights ``~ N(0, 0.01^2)`` (seeded, drawn in float64), biases zero."""
    dt = check_dtype(dtype)
    rng = np.random.default_rng(seed)
    params = np.zeros(model.n_params, dtype=np.float64)
    params[: model.n_weights] = rng.normal(0.0, _LINEAR_INIT_STD, size=model.n_weights)
    return params.astype(dt)


def _describe_array(a) -> str:
    if isinstance(a, np.ndarray):
        return f"shape {a.shape}, dtype {a.dtype.name}"
    return f"{type(a).__name__} {a!r}"[:120]


# ---------------------------------------------------------------------------
# dense feed-forward models: softmax regression, least squares, MLP


class _FeedForward(Model):
    """Dense layers ``d -> hidden... -> C``; a softmax or squared-error head.

    Subclasses are settings of this one core (no hidden layer = linear model).
    Parameter layout: ``W_1, ..., W_L`` (each ``(fan_in, fan_out)``, C order),
    then ``b_1, ..., b_L``. Slices and shapes are computed once here, and each
    call unpacks them as views of ``params`` and of the gradient vector.
    """

    _head: str = "xent"  # "xent" (softmax cross-entropy) or "squares"

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        *,
        hidden: tuple[int, ...] = (),
        activation: str = "relu",
        l2: float = 0.0,
    ) -> None:
        super().__init__(n_features, n_classes, l2=l2)
        self._hidden = tuple(hidden)
        self._activation = activation
        sizes = (self.n_features, *self._hidden, self.n_classes)
        self._shapes = list(zip(sizes[:-1], sizes[1:], strict=True))
        w_slices, b_slices = [], []
        start = 0
        for fan_in, fan_out in self._shapes:
            w_slices.append(slice(start, start + fan_in * fan_out))
            start += fan_in * fan_out
        self.n_weights = start
        for _, fan_out in self._shapes:
            b_slices.append(slice(start, start + fan_out))
            start += fan_out
        self.n_params = start
        self._w_slices = w_slices
        self._b_slices = b_slices

    def _unpack(
        self, vec: np.ndarray, cache: bool = True
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Weight and bias views of a flat vector (no copy when ``vec`` is contiguous).

        The views of the last few contiguous vectors seen are cached with a
        reference to the vector itself (so its id cannot be reused while cached):
        the runtime passes the same model and gradient buffers at every step.
        """
        views = self._views
        entry = views.get(id(vec))
        if entry is not None and entry[0] is vec:
            return entry[1], entry[2]
        Ws = [vec[s].reshape(shape) for s, shape in zip(self._w_slices, self._shapes, strict=True)]
        bs = [vec[s] for s in self._b_slices]
        if cache and vec.flags.c_contiguous:  # only then are the reshapes views, safe to keep
            views[id(vec)] = (vec, Ws, bs)
            if len(views) > _MAX_CACHED_VIEWS:
                del views[next(iter(views))]
        return Ws, bs

    def _new_workspace(self, m: int, dtype: np.dtype) -> dict:
        C = self.n_classes
        aux_dtype = bool if self._activation == "relu" else dtype
        return {
            "acts": [np.empty((m, h), dtype) for h in self._hidden],
            "dacts": [np.empty((m, h), dtype) for h in self._hidden],
            "aux": [np.empty((m, h), aux_dtype) for h in self._hidden],
            "logits": np.empty((m, C), dtype),
            "ones_m": np.ones(m, dtype),
            "ones_c": np.ones(C, dtype),
            "row_offsets": np.arange(m, dtype=np.int64) * C,
            "idx": np.empty(m, np.int64),
            "sum_m": np.empty(m, dtype),
            "lse_m": np.empty(m, dtype),
        }

    def _forward(self, params: np.ndarray, X: np.ndarray, ws: dict) -> np.ndarray:
        Ws, bs = self._unpack(params)
        a = X
        relu = self._activation == "relu"
        for W, b, z in zip(Ws[:-1], bs[:-1], ws["acts"], strict=True):
            np.matmul(a, W, out=z)
            z += b
            if relu:
                np.maximum(z, 0, out=z)
            else:
                np.tanh(z, out=z)
            a = z
        Z = ws["logits"]
        np.matmul(a, Ws[-1], out=Z)
        Z += bs[-1]
        return Z

    def _scores(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        return self._forward(params, X, self._workspace(X.shape[0], params.dtype))

    def _data_loss_grad(self, params, X, y, g, g_reused=True):
        m = X.shape[0]
        ws = self._workspace(m, params.dtype)
        Z = self._forward(params, X, ws)
        # head: turn the logits Z into dLoss/dZ in place
        if self._head == "xent":
            loss = _softmax_xent(Z, y, ws, grad=g is not None)
        else:  # residual  Z - onehot(y)
            Zf = Z.reshape(-1)
            Zf[np.add(ws["row_offsets"], y, out=ws["idx"])] -= 1
            loss = 0.5 * float(np.vdot(Zf, Zf)) / m
            Z *= 1.0 / m
        if g is None:
            return loss
        Ws, _ = self._unpack(params)
        gWs, gbs = self._unpack(g, cache=g_reused)
        acts, dacts, aux, ones_m = ws["acts"], ws["dacts"], ws["aux"], ws["ones_m"]
        relu = self._activation == "relu"
        dZ = Z
        for layer in range(len(Ws) - 1, -1, -1):
            a_in = X if layer == 0 else acts[layer - 1]
            np.matmul(a_in.T, dZ, out=gWs[layer])
            np.matmul(ones_m, dZ, out=gbs[layer])  # column sums, as a BLAS gemv
            if layer == 0:
                break
            dA = dacts[layer - 1]
            np.matmul(dZ, Ws[layer].T, out=dA)
            a, t = acts[layer - 1], aux[layer - 1]
            if relu:  # relu'(z) = 1[z > 0] = 1[a > 0]
                np.greater(a, 0, out=t)
                np.multiply(dA, t, out=dA)
            else:  # tanh'(z) = 1 - a^2
                np.multiply(a, a, out=t)
                np.subtract(1, t, out=t)
                dA *= t
            dZ = dA
        return loss


class SoftmaxRegression(_FeedForward):
    """Multinomial logistic regression.

    Scores ``Z = X W + b`` with ``W`` of shape (d, C) and ``b`` of shape (C,);
    ``params = [W.ravel(), b]``, so ``n_params = d C + C``. Per-example loss is the
    softmax cross-entropy ``logsumexp(Z_i) - Z_i[y_i]``, computed stably (row
    maximum subtracted before exponentiating). Prediction: ``argmax_c Z_ic``.

    Initialization: ``W ~ N(0, 0.01^2)`` from ``np.random.default_rng(seed)``,
    ``b = 0``. Zero would do for this convex model; a small seeded random start
    keeps all models on the same seeded footing as the MLP.

    Parameters
    ----------
    n_features : int
        d >= 1.
    n_classes : int
        C >= 1.
    l2 : float, default 0.0
        Penalty ``l2 / 2 * ||W||^2`` added to the mean loss.
    """

    name = "softmax"
    _head = "xent"

    def __init__(self, n_features: int, n_classes: int, *, l2: float = 0.0) -> None:
        super().__init__(n_features, n_classes, l2=l2)

    def init_params(self, seed: int = 0, dtype=np.float64) -> np.ndarray:
        return _init_linear(self, seed, dtype)


class LeastSquares(_FeedForward):
    """Linear least squares on one-hot targets.

    Outputs ``Z = X W + b`` with ``W`` of shape (d, C), ``b`` of shape (C,);
    ``params = [W.ravel(), b]``. Loss ``0.5 * mean_i ||Z_i - onehot(y_i)||^2``
    (sum over the C outputs, mean over the batch). Prediction: ``argmax_c Z_ic``.
    Initialization as :class:`SoftmaxRegression` (``W ~ N(0, 0.01^2)``, ``b = 0``).

    Parameters
    ----------
    n_features : int
        d >= 1.
    n_classes : int
        C >= 1.
    l2 : float, default 0.0
        Penalty ``l2 / 2 * ||W||^2`` added to the mean loss (ridge).
    """

    name = "least_squares"
    _head = "squares"

    def __init__(self, n_features: int, n_classes: int, *, l2: float = 0.0) -> None:
        super().__init__(n_features, n_classes, l2=l2)

    def init_params(self, seed: int = 0, dtype=np.float64) -> np.ndarray:
        return _init_linear(self, seed, dtype)


class MLP(_FeedForward):
    """Fully connected network with a softmax cross-entropy output.

    Layers ``d -> h_1 -> ... -> h_k -> C``; ``a_0 = X``,
    ``a_l = act(a_{l-1} W_l + b_l)`` for the hidden layers, logits
    ``Z = a_k W_{k+1} + b_{k+1}``, per-example loss ``logsumexp(Z_i) - Z_i[y_i]``.
    ``params = [W_1.ravel(), ..., W_{k+1}.ravel(), b_1, ..., b_{k+1}]`` with
    ``W_l`` of shape (fan_in, fan_out).

    Initialization (seeded, ``np.random.default_rng(seed)``, layer by layer):
    hidden layers with ``relu`` use He normal ``N(0, 2 / fan_in)``, with ``tanh``
    Glorot uniform ``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``; the output
    layer uses Glorot uniform; all biases are zero.

    Parameters
    ----------
    n_features : int
        d >= 1.
    n_classes : int
        C >= 1.
    hidden : tuple of int, default (64,)
        Hidden layer sizes, at least one, each >= 1.
    activation : {"relu", "tanh"}, default "relu"
    l2 : float, default 0.0
        Penalty ``l2 / 2 * sum_l ||W_l||^2`` added to the mean loss.

    References
    ----------
    .. [1] X. Glorot, Y. Bengio, "Understanding the difficulty of training deep
       feedforward neural networks", AISTATS 2010.
    .. [2] K. He, X. Zhang, S. Ren, J. Sun, "Delving deep into rectifiers",
       ICCV 2015 (arXiv 1502.01852).
    """

    name = "mlp"
    _head = "xent"

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        *,
        hidden: tuple[int, ...] = (64,),
        activation: str = "relu",
        l2: float = 0.0,
    ) -> None:
        super().__init__(
            n_features,
            n_classes,
            hidden=_check_hidden(hidden),
            activation=_check_activation(activation),
            l2=l2,
        )

    @property
    def hidden(self) -> tuple[int, ...]:
        """Hidden layer sizes."""
        return self._hidden

    @property
    def activation(self) -> str:
        """Hidden-layer activation, ``"relu"`` or ``"tanh"``."""
        return self._activation

    def init_params(self, seed: int = 0, dtype=np.float64) -> np.ndarray:
        dt = check_dtype(dtype)
        rng = np.random.default_rng(seed)
        params = np.zeros(self.n_params, dtype=np.float64)
        Ws, _ = self._unpack(params, cache=False)
        for layer, W in enumerate(Ws):
            fan_in, fan_out = W.shape
            if layer < len(Ws) - 1 and self._activation == "relu":
                W[...] = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=W.shape)
            else:
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                W[...] = rng.uniform(-limit, limit, size=W.shape)
        return params.astype(dt)


# ---------------------------------------------------------------------------
# binary logistic regression


class LogisticRegression(Model):
    """Binary logistic regression (exactly two classes).

    Score ``z = X w + b`` with ``w`` of shape (d,) and scalar ``b``;
    ``params = [w, b]``, ``n_params = d + 1``. With labels ``y in {0, 1}`` the
    per-example loss is ``log(1 + exp(z_i)) - y_i z_i`` (computed with
    ``np.logaddexp``, stable for any ``z``); its derivative is
    ``sigmoid(z_i) - y_i``, with ``sigmoid(z) = (1 + tanh(z / 2)) / 2``.
    Prediction: class 1 where ``z > 0``. Initialization: ``w ~ N(0, 0.01^2)``,
    ``b = 0``.

    Parameters
    ----------
    n_features : int
        d >= 1.
    n_classes : int
        Must be 2 (use ``softmax`` for more).
    l2 : float, default 0.0
        Penalty ``l2 / 2 * ||w||^2`` added to the mean loss.
    """

    name = "logistic"

    def __init__(self, n_features: int, n_classes: int = 2, *, l2: float = 0.0) -> None:
        super().__init__(n_features, n_classes, l2=l2)
        if self.n_classes != 2:
            raise ConfigError(
                f"model 'logistic' needs 2 classes but the dataset has {self.n_classes}: "
                "use softmax"
            )
        self.n_weights = self.n_features
        self.n_params = self.n_features + 1

    def init_params(self, seed: int = 0, dtype=np.float64) -> np.ndarray:
        return _init_linear(self, seed, dtype)

    def _new_workspace(self, m: int, dtype: np.dtype) -> dict:
        return {"z": np.empty(m, dtype), "t": np.empty(m, dtype)}

    def _scores(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        z = X @ params[: self.n_features]
        z += params[self.n_features]
        return z

    def _data_loss_grad(self, params, X, y, g, g_reused=True):
        m = X.shape[0]
        d = self.n_features
        ws = self._workspace(m, params.dtype)
        z, t = ws["z"], ws["t"]
        np.matmul(X, params[:d], out=z)
        z += params[d]
        np.copyto(t, y, casting="unsafe")  # labels as floats
        loss = (float(np.logaddexp(0, z).sum()) - float(np.dot(t, z))) / m
        if g is None:
            return loss
        # dLoss/dz = (sigmoid(z) - y) / m, sigmoid(z) = (1 + tanh(z/2)) / 2
        z *= 0.5
        np.tanh(z, out=z)
        z *= 0.5
        z += 0.5
        z -= t
        z *= 1.0 / m
        np.matmul(X.T, z, out=g[:d])
        g[d] = z.sum()
        return loss


# ---------------------------------------------------------------------------
# factory


def build_model(
    name: str,
    n_features: int,
    n_classes: int,
    *,
    hidden: tuple[int, ...] = (64,),
    activation: str = "relu",
    l2: float = 0.0,
) -> Model:
    """Build a model by name.

    Parameters
    ----------
    name : {"softmax", "logistic", "least_squares", "mlp"}
        See :data:`MODELS` and the module docstring.
    n_features : int
        Input dimension d >= 1.
    n_classes : int
        Number of classes C >= 1 (``logistic`` needs exactly 2).
    hidden : tuple of int, default (64,)
        Hidden layer sizes of ``mlp`` (at least one, each >= 1); ignored by the
        linear models.
    activation : {"relu", "tanh"}, default "relu"
        Hidden activation of ``mlp``; ignored by the linear models.
    l2 : float, default 0.0
        L2 penalty on the weights (not the biases), >= 0.

    Returns
    -------
    model : Model

    Raises
    ------
    ConfigError
        For an unknown name or an invalid size, activation or penalty; for a
        ``torch:`` spec also when torch is not installed or the factory cannot
        be imported or does not build a usable module (see
        :class:`dasgd.ml.torch_model.TorchModel`).
    """
    if isinstance(name, str) and name.startswith(TORCH_PREFIX):
        try:
            from .torch_model import TorchModel, load_factory
        except ImportError as exc:
            raise ConfigError(
                f"model {name!r} needs PyTorch, which cannot be imported ({exc}): "
                "pip install 'dasgd[torch]' (--model)"
            ) from None
        return TorchModel(load_factory(name), n_features, n_classes, spec=name, l2=l2)
    if name == "softmax":
        return SoftmaxRegression(n_features, n_classes, l2=l2)
    if name == "logistic":
        return LogisticRegression(n_features, n_classes, l2=l2)
    if name == "least_squares":
        return LeastSquares(n_features, n_classes, l2=l2)
    if name == "mlp":
        return MLP(n_features, n_classes, hidden=hidden, activation=activation, l2=l2)
    raise ConfigError(f"unknown model {name!r}: {_VALID_MODELS}")


def check_model_name(name) -> str:
    """``name`` if it is one of :data:`MODELS` or looks like ``torch:MODULE:FACTORY``.

    Only the form is checked here (no import); :func:`build_model` imports.

    Raises
    ------
    ConfigError
        Naming the value and the valid names.
    """
    if name in MODELS:
        return name
    if isinstance(name, str) and name.startswith(TORCH_PREFIX):
        parts = name[len(TORCH_PREFIX) :].split(":")
        if len(parts) == 2 and all(p.strip() for p in parts):
            return name
        raise ConfigError(
            f"torch model spec must be torch:MODULE:FACTORY, e.g. torch:mymodels:make_cnn, "
            f"got {name!r} (--model)"
        )
    raise ConfigError(f"unknown model {name!r}: {_VALID_MODELS} (--model)")
