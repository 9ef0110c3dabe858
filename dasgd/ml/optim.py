"""Local update rules that return the parameter change.

An optimizer turns a gradient ``g`` into the additive change ``u`` of the model;
the caller applies it (``x += u``) and adds the same ``u`` to the node's open
delta, so what travels between nodes is always a parameter change, never a raw
gradient (ALGORITHMS.md §1). This follows scikit-learn's
``neural_network/_stochastic_optimizers.py``, whose ``_get_updates`` returns the
additive change, with the state kept in preallocated numpy buffers.

=============  =============================  =====================================
name           built as                       rule
=============  =============================  =====================================
``sgd``        ``SGD(momentum=0)``            ``u = -lr g``
``momentum``   ``SGD(momentum=mu)``           heavy ball, ``v = mu v + g; u = -lr v``
``amsgrad``    :class:`AMSGrad`               APAM / AMSGrad, no bias correction
=============  =============================  =====================================

:func:`delay_adaptive_lr` is the step-size rule of Koloskova et al. 2022 for
stale gradients (ALGORITHMS.md §4); pass its result as ``lr`` to
:meth:`Optimizer.update`.

Buffer contract: :meth:`Optimizer.update` returns an internal buffer of shape
``(n_params,)`` that the next call overwrites. Apply or copy it before calling
``update`` again; no array is allocated per call.
"""

from __future__ import annotations

import abc
import math

import numpy as np

from ..errors import ConfigError
from ..validation import check_dtype, check_int, check_positive, check_unit_interval

__all__ = [
    "OPTIMIZERS",
    "DELAY_RULES",
    "Optimizer",
    "SGD",
    "AMSGrad",
    "build_optimizer",
    "delay_adaptive_lr",
]

OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "amsgrad")
"""Names accepted by :func:`build_optimizer`."""

DELAY_RULES: tuple[str, ...] = ("none", "inverse", "drop")
"""Rules of :func:`delay_adaptive_lr` for a delay above the concurrency."""


# ---------------------------------------------------------------------------
# the interface


class Optimizer(abc.ABC):
    """A local update rule: gradient in, parameter change out.

    Parameters
    ----------
    n_params : int
        Length d of the flat parameter vector (>= 1).
    lr : float
        Default step size (> 0, finite).
    dtype : {np.float64, np.float32}, default np.float64
        Dtype of the state buffers and of the returned change; gradients must
        have it.

    Attributes
    ----------
    name : str
        One of :data:`OPTIMIZERS`.
    lr : float
        Default step size, used when :meth:`update` gets no ``lr``.
    n_params : int
    dtype : numpy.dtype
    """

    name: str
    lr: float

    def __init__(self, n_params: int, lr: float, *, dtype=np.float64) -> None:
        self.n_params = check_int(n_params, "n_params", 1)
        self.lr = check_positive(lr, "lr")
        self.dtype = check_dtype(dtype)
        self._u = np.zeros(self.n_params, dtype=self.dtype)

    def update(self, grad: np.ndarray, lr: float | None = None) -> np.ndarray:
        """The parameter change for one gradient; advances the optimizer state.

        Parameters
        ----------
        grad : ndarray of shape (n_params,), dtype ``self.dtype``
            Stochastic gradient at the current parameters; not modified.
        lr : float, optional
            Step size for this call only (finite, >= 0), e.g. from
            :func:`delay_adaptive_lr`; default ``self.lr``. ``lr = 0`` returns a
            zero change but still feeds ``grad`` into the state (momentum,
            moments): to drop a gradient entirely, do not call ``update``.

        Returns
        -------
        u : ndarray of shape (n_params,), dtype ``self.dtype``
            The additive change (the caller does ``x += u``). This is an
            internal buffer, overwritten by the next call: apply or copy it
            first. Nothing is allocated per call.
        """
        if (
            not isinstance(grad, np.ndarray)
            or grad.shape != self._u.shape
            or grad.dtype != self.dtype
        ):
            got = (
                f"shape {grad.shape}, dtype {grad.dtype.name}"
                if isinstance(grad, np.ndarray)
                else type(grad).__name__
            )
            raise ConfigError(
                f"grad must be a {self.dtype.name} array of shape ({self.n_params},), got {got}"
            )
        if lr is None:
            step = self.lr
        else:
            try:
                step = float(lr)
            except (TypeError, ValueError):
                step = math.nan
            if not (math.isfinite(step) and step >= 0.0):
                raise ConfigError(f"lr override must be a finite number >= 0, got {lr!r}")
        return self._step(grad, step)

    @abc.abstractmethod
    def _step(self, grad: np.ndarray, lr: float) -> np.ndarray:
        """Advance the state with ``grad`` and write the change into ``self._u``."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Name and hyper-parameters, JSON-serializable (for configs and logs).

        Returns
        -------
        info : dict
            ``name``, ``n_params``, ``dtype`` (str), ``lr`` and the rule's
            hyper-parameters. The state buffers are not included.
        """

    def __repr__(self) -> str:
        info = self.state_dict()
        args = ", ".join(f"{k}={v!r}" for k, v in info.items() if k != "name")
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------
# rules


class SGD(Optimizer):
    """Stochastic gradient descent, optionally with heavy-ball or Nesterov momentum.

    With ``momentum = 0``: ``u = -lr g``. With ``momentum = mu > 0`` (as
    ``torch.optim.SGD`` with ``dampening = 0``; ``v`` starts at zero):

    - heavy ball: ``v <- mu v + g``, ``u = -lr v``;
    - Nesterov: ``v <- mu v + g``, ``u = -lr (g + mu v)``.

    Parameters
    ----------
    n_params : int
        Length d of the flat parameter vector (>= 1).
    lr : float
        Default step size (> 0, finite).
    momentum : float, default 0.0
        ``mu`` in [0, 1).
    nesterov : bool, default False
        Nesterov's variant; needs ``momentum > 0``.
    dtype : {np.float64, np.float32}, default np.float64
        Dtype of the buffers, the gradients and the returned change.

    References
    ----------
    .. [1] B. T. Polyak, "Some methods of speeding up the convergence of
       iteration methods", USSR Comput. Math. Math. Phys. 4(5), 1964 (heavy ball).
    .. [2] I. Sutskever, J. Martens, G. Dahl, G. Hinton, "On the importance of
       initialization and momentum in deep learning", ICML 2013, Eq. (3)-(4)
       (Nesterov momentum, in the form used by ``torch.optim.SGD``).
    """

    def __init__(
        self,
        n_params: int,
        lr: float,
        *,
        momentum: float = 0.0,
        nesterov: bool = False,
        dtype=np.float64,
    ) -> None:
        super().__init__(n_params, lr, dtype=dtype)
        self.momentum = check_unit_interval(momentum, "momentum")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise ConfigError(f"nesterov must be True or False, got {nesterov!r}")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError(f"nesterov=True needs momentum in (0, 1), got momentum={momentum!r}")
        self.name = "momentum" if self.momentum > 0.0 else "sgd"
        self._v = np.zeros(self.n_params, dtype=self.dtype) if self.momentum > 0.0 else None

    def _step(self, grad: np.ndarray, lr: float) -> np.ndarray:
        u, v = self._u, self._v
        if v is None:
            return np.multiply(grad, -lr, out=u)
        v *= self.momentum
        v += grad
        if self.nesterov:
            np.multiply(v, self.momentum, out=u)
            u += grad
            u *= -lr
            return u
        return np.multiply(v, -lr, out=u)

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "n_params": self.n_params,
            "dtype": self.dtype.name,
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
        }


class AMSGrad(Optimizer):
    """AMSGrad as in APAM, Algorithm 1 of Xu et al. (ALGORITHMS.md §5).

    With ``m``, ``v``, ``v_hat`` starting at zero, for each gradient ``g``::

        m     <- beta1 m + (1 - beta1) g
        v     <- beta2 v + (1 - beta2) g * g
        v_hat <- max(v_hat, v)                     (elementwise)
        u     =  -lr m / (sqrt(v_hat) + eps)

    There is no bias correction (as in the paper). ``v_hat`` never decreases.
    In APAM the server keeps ``m, v, v_hat`` current and only ``g`` is stale;
    in dasgd each node runs this rule on its own gradients.

    Parameters
    ----------
    n_params : int
        Length d of the flat parameter vector (>= 1).
    lr : float
        Default step size ``alpha`` (> 0, finite).
    beta1 : float, default 0.9
        First-moment decay, in [0, 1).
    beta2 : float, default 0.999
        Second-moment decay, in [0, 1).
    eps : float, default 1e-8
        Added to ``sqrt(v_hat)`` (> 0, finite).
    dtype : {np.float64, np.float32}, default np.float64
        Dtype of the buffers, the gradients and the returned change.

    References
    ----------
    .. [1] Y. Xu, Y. Xu, Y. Yan, C. Sutcher-Shepard, L. Grinberg, J. Chen,
       "Parallel and distributed asynchronous adaptive stochastic gradient
       methods", Mathematical Programming Computation (arXiv 2002.09095),
       Algorithm 1 (APAM).
    .. [2] S. J. Reddi, S. Kale, S. Kumar, "On the convergence of Adam and
       beyond", ICLR 2018 (AMSGrad).
    """

    name = "amsgrad"

    def __init__(
        self,
        n_params: int,
        lr: float,
        *,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        dtype=np.float64,
    ) -> None:
        super().__init__(n_params, lr, dtype=dtype)
        self.beta1 = check_unit_interval(beta1, "beta1")
        self.beta2 = check_unit_interval(beta2, "beta2")
        self.eps = check_positive(eps, "eps")
        self._m = np.zeros(self.n_params, dtype=self.dtype)
        self._v = np.zeros(self.n_params, dtype=self.dtype)
        self._v_hat = np.zeros(self.n_params, dtype=self.dtype)

    @property
    def v_hat(self) -> np.ndarray:
        """Running maximum of the second moment; shape (n_params,), read-only view."""
        view = self._v_hat.view()
        view.flags.writeable = False
        return view

    def _step(self, grad: np.ndarray, lr: float) -> np.ndarray:
        u, m, v, v_hat = self._u, self._m, self._v, self._v_hat
        # m <- beta1 m + (1 - beta1) g
        np.multiply(grad, 1.0 - self.beta1, out=u)
        m *= self.beta1
        m += u
        # v <- beta2 v + (1 - beta2) g^2
        np.multiply(grad, grad, out=u)
        u *= 1.0 - self.beta2
        v *= self.beta2
        v += u
        # v_hat <- max(v_hat, v)
        np.maximum(v_hat, v, out=v_hat)
        # u = -lr m / (sqrt(v_hat) + eps)
        np.sqrt(v_hat, out=u)
        u += self.eps
        np.divide(m, u, out=u)
        u *= -lr
        return u

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "n_params": self.n_params,
            "dtype": self.dtype.name,
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
        }


# ---------------------------------------------------------------------------
# factory and step-size rules


def build_optimizer(
    name: str, n_params: int, lr: float, *, momentum: float = 0.9, dtype=np.float64
) -> Optimizer:
    """Build an optimizer by name.

    Parameters
    ----------
    name : {"sgd", "momentum", "amsgrad"}
        ``sgd`` is :class:`SGD` without momentum, ``momentum`` is :class:`SGD`
        with heavy-ball momentum ``momentum``, ``amsgrad`` is :class:`AMSGrad`
        with its default betas and eps.
    n_params : int
        Length d of the flat parameter vector (>= 1).
    lr : float
        Step size (> 0, finite).
    momentum : float, default 0.9
        Momentum of ``momentum``, in (0, 1); ignored by the other names.
    dtype : {np.float64, np.float32}, default np.float64
        Dtype of the buffers, the gradients and the returned change.

    Returns
    -------
    optimizer : Optimizer

    Raises
    ------
    ConfigError
        For an unknown name or an invalid hyper-parameter.
    """
    if name == "sgd":
        return SGD(n_params, lr, dtype=dtype)
    if name == "momentum":
        mu = check_unit_interval(momentum, "momentum")
        if mu == 0.0:
            raise ConfigError(
                f"optimizer 'momentum' needs momentum in (0, 1), got {momentum!r}: use sgd"
            )
        return SGD(n_params, lr, momentum=mu, dtype=dtype)
    if name == "amsgrad":
        return AMSGrad(n_params, lr, dtype=dtype)
    raise ConfigError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def delay_adaptive_lr(
    lr: float, delay_steps: int, concurrency: int, *, rule: str = "inverse"
) -> float:
    """Step size for a gradient (or delta) applied ``delay_steps`` late.

    Koloskova et al. (Theorem 8, Eq. (11)) take ``eta_t = eta`` while the delay
    ``tau_t`` is at most ``tau_C``, the number of concurrently busy workers (``n``
    at full load), and any ``eta_t`` in ``[0, min(eta, 1 / (4 L tau_t))]``
    otherwise. The rules for ``delay_steps > concurrency``:

    ===========  ==============================================================
    rule         ``eta_t``
    ===========  ==============================================================
    ``inverse``  ``lr / delay_steps`` (the paper's practical form)
    ``drop``     ``0.0``: the gradient is dropped
    ``none``     ``lr`` (no adaptation)
    ===========  ==============================================================

    The paper analyses a parameter server (delay = server versions between read
    and apply). Scaling a received DASGD delta by its apply staleness is a dasgd
    extension that the papers do not analyse. With non-i.i.d. shards the
    adaptive rule biases the model towards fast workers (§5 of the paper).

    Parameters
    ----------
    lr : float
        Base step size ``eta`` (> 0, finite).
    delay_steps : int
        Delay ``tau_t`` of the update, in steps (>= 0).
    concurrency : int
        ``tau_C``, the number of concurrently busy workers (>= 1).
    rule : {"inverse", "drop", "none"}, default "inverse"

    Returns
    -------
    eta_t : float
        ``lr`` if ``delay_steps <= concurrency``, else as the table says.

    References
    ----------
    .. [1] A. Koloskova, S. U. Stich, M. Jaggi, "Sharper convergence guarantees
       for asynchronous SGD for distributed and federated learning", NeurIPS
       2022 (arXiv 2206.08307), Theorem 8, Eq. (11).
    """
    lr = check_positive(lr, "lr")
    delay_steps = check_int(delay_steps, "delay_steps", 0)
    concurrency = check_int(concurrency, "concurrency", 1)
    if rule not in DELAY_RULES:
        raise ConfigError(f"unknown delay rule {rule!r}: choose one of {', '.join(DELAY_RULES)}")
    if delay_steps <= concurrency or rule == "none":
        return lr
    if rule == "inverse":
        return lr / delay_steps
    return 0.0
