"""Any ``torch.nn.Module`` plus a loss, run as a dasgd model on a flat parameter vector.

dasgd's runtime owns one flat numpy vector ``params`` of shape ``(n_params,)``
per node and adds local updates and received deltas to it in place
(ALGORITHMS.md §1). :class:`TorchModel` computes the loss and its gradient of a
PyTorch module *at that vector*: each parameter's ``.data`` is a view of its
slice of ``params`` (``torch.from_numpy``: shared memory, no copy), and each
parameter's ``.grad`` a view of its slice of the caller's ``out`` vector, into
which autograd accumulates. Nothing is copied between numpy and torch on the
hot path when the vectors are C-contiguous and writeable, and the views are
made once per vector (the runtime passes the same buffers at every step).

Why views bound as ``.data`` rather than :func:`torch.func.functional_call`
(which swaps views in and out of the module on every call): the swapping
cost about 40-60 us per call for a two-layer MLP on these machines, 15-20 %
of a small model's step (``benchmarks/bench_single_node.py``, section
"PyTorch", measures the result against a plain PyTorch loop).

A model is named by a spec ``torch:MODULE:FACTORY`` (``--model`` on the
command line), where ``MODULE`` is an importable module (dotted path) and
``FACTORY`` a callable in it that returns ``(module, loss_fn)``:

.. code-block:: python

    # mymodels.py, next to where you start `dasgd run`
    import torch

    def make_mlp():
        net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        return net, torch.nn.CrossEntropyLoss()

    # dasgd run --dataset digits --model torch:mymodels:make_mlp

Every node process imports the factory's module and calls the factory itself
(nothing is pickled), so the module must be importable there: node processes
start in the launcher's working directory with its ``PYTHONPATH``, and the
working directory is searched first (as ``python -m`` does), in the launcher
too. This module imports torch when it is imported: :mod:`dasgd.ml.models`
imports it only for ``torch:`` specs, so runs of the numpy models never load
torch (about 1.4 s per process, DESIGN.md §9).

Conventions (on top of :class:`dasgd.ml.models.Model`'s):

- **Layout**: ``params`` is the concatenation of ``p.reshape(-1)`` over
  ``module.named_parameters()`` in that order, as
  :func:`torch.nn.utils.parameters_to_vector` makes it. Tied parameters count
  once.
- **dtype**: the computation runs in the dtype of ``params`` (float32 or
  float64, ``--dtype``); the module's buffers are cast to it once.
- **Data**: ``X`` of shape ``(m, n_features)`` goes to the module as a
  ``(m, n_features)`` tensor of ``params``' dtype; a module for images reshapes
  it itself (e.g. ``torch.nn.Unflatten(1, (1, 28, 28))``). ``y`` goes to
  ``loss_fn`` as an int64 tensor of class ids of shape ``(m,)``.
- **Loss**: ``loss_fn(output, y)`` must return the *mean* loss over the batch
  as a scalar tensor (``torch.nn.CrossEntropyLoss()`` does).
- **Output**: the module maps ``(m, n_features)`` to scores of shape
  ``(m, n_classes)``, whose argmax is the predicted class (or ``(m,)`` /
  ``(m, 1)`` logits for two classes: class 1 where the logit is > 0). This is
  checked once, on a batch of zeros, when the model is built.
- **Modes**: gradients are computed in training mode (``module.train()``),
  :meth:`~TorchModel.loss`, :meth:`~TorchModel.predict` and
  :meth:`~TorchModel.accuracy` run in evaluation mode (``module.eval()``,
  no autograd).
- **Buffers** (BatchNorm running statistics) are not part of the flat vector:
  each process keeps its own; they are neither exchanged nor averaged.
  Dropout draws from torch's global generator of each process.
- **Initialization**: :meth:`~TorchModel.init_params` calls the factory again
  with torch's global generator seeded by ``seed`` (inside
  :func:`torch.random.fork_rng`, so the caller's generator is untouched): the
  same seed gives the same vector in every process.
- **L2** (``--l2``) penalizes *every* parameter, biases included, as
  ``torch.optim.SGD(weight_decay=l2)`` does.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys

import numpy as np
import torch

from ..errors import ConfigError
from .models import TORCH_PREFIX, Model

__all__ = ["TORCH_PREFIX", "TorchModel", "import_root", "load_factory", "spec_of"]

_FORMAT = "torch:MODULE:FACTORY, e.g. torch:mymodels:make_cnn"


@contextlib.contextmanager
def _cwd_on_path():
    """Search the working directory first while importing, as ``python -m`` (the node processes) does."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def _parse_spec(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str) or not spec.startswith(TORCH_PREFIX):
        raise ConfigError(f"torch model spec must be {_FORMAT}, got {spec!r} (--model)")
    parts = spec[len(TORCH_PREFIX) :].split(":")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ConfigError(f"torch model spec must be {_FORMAT}, got {spec!r} (--model)")
    return parts[0].strip(), parts[1].strip()


def import_root(module_name: str) -> str | None:
    """The ``sys.path`` entry a module was imported from (None for built-in or namespace modules).

    ``/x/pkg/mod.py`` imported as ``pkg.mod`` gives ``/x``. The launcher adds
    it to the node processes' ``PYTHONPATH``, so that they import the factory
    from where the launcher did (a script's or a notebook's directory).
    """
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if not path:
        return None
    root = os.path.dirname(os.path.abspath(path))
    depth = module_name.count(".") + (os.path.basename(path) == "__init__.py")
    for _ in range(depth):
        root = os.path.dirname(root)
    return root


def load_factory(spec: str):
    """Import the factory a ``torch:MODULE:FACTORY`` spec names.

    Parameters
    ----------
    spec : str
        ``torch:MODULE:FACTORY``: ``MODULE`` a dotted module path importable
        from ``sys.path`` or the working directory, ``FACTORY`` an attribute
        of it (dotted for nested attributes, e.g. ``Models.cnn``).

    Returns
    -------
    callable
        The factory (not called).

    Raises
    ------
    ConfigError
        A malformed spec, a module that cannot be imported (with the import's
        own error), a missing attribute, or one that is not callable.
    """
    module_name, attr = _parse_spec(spec)
    try:
        with _cwd_on_path():
            module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may raise anything on import
        raise ConfigError(
            f"cannot import module {module_name!r} of model {spec!r} ({type(exc).__name__}: "
            f"{exc}); it must be importable from the working directory or PYTHONPATH (--model)"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"module {module_name!r} has no attribute {attr!r} (model {spec!r}, --model)"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(
            f"{module_name}:{attr} is a {type(obj).__name__}, not a callable returning "
            f"(torch.nn.Module, loss_fn) (model {spec!r}, --model)"
        )
    return obj


def spec_of(factory) -> str:
    """The ``torch:MODULE:FACTORY`` spec of a module-level function or class.

    Node processes import the factory by name (nothing is pickled), so it must
    be defined at the top level of an importable module, not in ``__main__``
    (a script or a notebook), not a lambda or a nested function.

    Raises
    ------
    ConfigError
        If ``factory`` cannot be found again by its module and name.
    """
    module = getattr(factory, "__module__", None)
    qualname = getattr(factory, "__qualname__", None)
    if not callable(factory) or not module or not qualname:
        raise ConfigError(
            f"model must be a name, {_FORMAT}, or a module-level factory function, got {factory!r}"
        )
    if module == "__main__" or "<" in qualname:
        raise ConfigError(
            f"the model factory {qualname!r} is defined in {module!r}: node processes import it "
            "by name, so define it at the top level of an importable module (a .py file next to "
            "your notebook or script) and pass it or its spec " + _FORMAT
        )
    return f"{TORCH_PREFIX}{module}:{qualname}"


def _call_factory(factory, spec: str, n_features: int, n_classes: int):
    """``factory()``, with ``n_features=``/``n_classes=`` if its signature names them; checked."""
    kwargs = {}
    try:
        names = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        names = {}
    if "n_features" in names:
        kwargs["n_features"] = n_features
    if "n_classes" in names:
        kwargs["n_classes"] = n_classes
    try:
        made = factory(**kwargs)
    except Exception as exc:
        raise ConfigError(
            f"the factory of model {spec!r} raised {type(exc).__name__}: {exc} (--model)"
        ) from None
    if (
        not isinstance(made, tuple | list)
        or len(made) != 2
        or not isinstance(made[0], torch.nn.Module)
        or not callable(made[1])
    ):
        shown = type(made).__name__
        if isinstance(made, tuple | list):
            shown = f"({', '.join(type(m).__name__ for m in made)})"
        raise ConfigError(
            f"the factory of model {spec!r} must return (torch.nn.Module, loss_fn), got {shown} (--model)"
        )
    return made[0], made[1]


def _writeable_contiguous(a: np.ndarray) -> tuple[np.ndarray, bool]:
    """``a`` itself when torch can share it, else a copy; and whether it was shared."""
    if a.flags.c_contiguous and a.flags.writeable and a.dtype.isnative:
        return a, True
    return np.array(a, order="C"), False


class TorchModel(Model):
    """A ``torch.nn.Module`` and a loss as a dasgd :class:`~dasgd.ml.models.Model`.

    See the module docstring for the conventions (layout, dtype, data, loss,
    modes, buffers, initialization).

    Parameters
    ----------
    factory : callable
        Returns ``(module, loss_fn)``; called with no arguments, or with
        ``n_features=`` and ``n_classes=`` when its signature names them.
        Called once here and once per :meth:`init_params`.
    n_features : int
        Columns of ``X`` (d >= 1).
    n_classes : int
        Number of classes C >= 1; labels are ``0 .. C - 1``.
    spec : str, optional
        The ``torch:MODULE:FACTORY`` name recorded in :meth:`describe` and
        error messages; default: derived from the factory (:func:`spec_of`).
    l2 : float, default 0.0
        Penalty ``l2 / 2 * ||params||^2`` (all parameters) added to the mean loss.

    Raises
    ------
    ConfigError
        If the factory raises, does not return ``(torch.nn.Module, callable)``,
        builds different parameters on two calls under the same torch seed,
        the module has no parameters or parameters that are not floating point,
        or a batch of zeros of shape ``(2, n_features)`` does not give scores of
        shape ``(2, n_classes)`` (or ``(2,)``/``(2, 1)`` for two classes).

    Attributes
    ----------
    name : str
        The spec.
    module : torch.nn.Module
    loss_fn : callable
    param_names : list of str
        ``module.named_parameters()`` names, in the order of the flat vector.
    param_shapes : list of tuple of int
    import_path : str or None
        The ``sys.path`` entry the factory's module came from (see
        :func:`import_root`); the launcher hands it to the node processes.

    Examples
    --------
    >>> import torch
    >>> def make():
    ...     return torch.nn.Linear(4, 3), torch.nn.CrossEntropyLoss()
    >>> model = TorchModel(make, 4, 3, spec="torch:example:make")
    >>> x = model.init_params(seed=0)
    >>> x.shape
    (15,)
    """

    def __init__(
        self, factory, n_features: int, n_classes: int, *, spec: str | None = None, l2: float = 0.0
    ) -> None:
        super().__init__(n_features, n_classes, l2=l2)
        self._factory = factory
        self.name = spec if spec is not None else spec_of(factory)
        self.import_path = import_root(getattr(factory, "__module__", "") or "")
        self.module, self.loss_fn = _call_factory(
            factory, self.name, self.n_features, self.n_classes
        )
        named = list(self.module.named_parameters())
        if not named:
            raise ConfigError(f"the module of model {self.name!r} has no parameters (--model)")
        bad = [n for n, p in named if not p.is_floating_point()]
        if bad:
            raise ConfigError(
                f"parameters {bad} of model {self.name!r} are not floating point (--model)"
            )
        self.param_names = [n for n, _ in named]
        self.param_shapes = [tuple(p.shape) for _, p in named]
        sizes = [p.numel() for _, p in named]
        self._slices = []
        start = 0
        for size in sizes:
            self._slices.append((start, start + size))
            start += size
        self.n_params = start
        self.n_weights = start  # the L2 penalty acts on every parameter
        self._params = [p for _, p in named]
        self._module_dtype = None
        self._training = None
        self._bound = self._bound_grad = None  # the vectors the parameters are views of
        self._grad_views: list = []
        self._check_output()

    # -- binding the flat vectors -------------------------------------------------

    def _prepare(self, dtype: np.dtype, training: bool) -> None:
        if self._module_dtype != dtype:
            # only the buffers (BatchNorm statistics) are used as the module holds them
            if any(b.is_floating_point() for b in self.module.buffers()):
                self.module.to(torch.float64 if dtype == np.float64 else torch.float32)
            self._module_dtype = dtype
            self._bound = self._bound_grad = None
        if self._training is not training:
            self.module.train(training)
            self._training = training

    def _bind(self, params: np.ndarray, grad: np.ndarray | None = None) -> None:
        """Make the module's parameters (and their ``.grad``) views of ``params`` (and ``grad``).

        Each parameter's ``.data`` becomes a view of its slice of the flat
        vector (``torch.from_numpy``: shared memory), so the module computes at
        the vector's current values, which the runtime changes in place. The
        binding is kept while the same vector comes back (the runtime passes
        the same model and gradient buffers at every step): no per-call work.
        A read-only or non-contiguous vector is bound through a copy, for one call.
        """
        if self._bound is not params:
            shared, keep = _writeable_contiguous(params)
            flat = torch.from_numpy(shared)
            for p, (start, end), shape in zip(
                self._params, self._slices, self.param_shapes, strict=True
            ):
                p.data = flat[start:end].view(shape)
            self._bound = params if keep else None
        if grad is not None and self._bound_grad is not grad:
            flat = torch.from_numpy(grad)  # the caller's ``out``: contiguous and writeable
            self._grad_views = [
                flat[start:end].view(shape)
                for (start, end), shape in zip(self._slices, self.param_shapes, strict=True)
            ]
            for p, view in zip(self._params, self._grad_views, strict=True):
                p.grad = view
            self._bound_grad = grad

    def _input(self, X: np.ndarray):
        return torch.from_numpy(_writeable_contiguous(X)[0])

    def _check_output(self) -> None:
        X = np.zeros((2, self.n_features), np.float32)
        params = self.init_params(seed=0, dtype=np.float32)
        # every node builds x_0 itself: the factory must be reproducible from torch's seed
        if not np.array_equal(params, self.init_params(seed=0, dtype=np.float32), equal_nan=True):
            raise ConfigError(
                f"the factory of model {self.name!r} builds different parameters on two calls "
                "under the same torch.manual_seed: every node must build the same x_0, so "
                "initialize with torch's generator (not numpy's or random's) (--model)"
            )
        try:
            scores = self._scores(params, X)
        except Exception as exc:
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            raise ConfigError(
                f"the module of model {self.name!r} fails on a batch of shape (2, "
                f"{self.n_features}) (the dataset's features): {detail} (--model)"
            ) from None
        ok = scores.shape == (2, self.n_classes) or (self.n_classes == 2 and scores.ndim == 1)
        if not ok:
            raise ConfigError(
                f"the module of model {self.name!r} maps a batch of shape (2, {self.n_features}) "
                f"to shape {tuple(scores.shape)}: need (2, {self.n_classes}) class scores"
                + (" or (2,)/(2, 1) logits" if self.n_classes == 2 else "")
                + " (--model)"
            )

    # -- the Model interface -------------------------------------------------------

    def init_params(self, seed: int = 0, dtype=np.float64) -> np.ndarray:
        """Initial parameters: the factory's module built with torch's generator seeded by ``seed``.

        Parameters
        ----------
        seed : int, default 0
            Passed to :func:`torch.manual_seed` inside :func:`torch.random.fork_rng`
            (the caller's generator state is restored).
        dtype : {np.float64, np.float32}, default np.float64

        Returns
        -------
        params : ndarray of shape (n_params,), dtype ``dtype``
            The module's parameters in :attr:`param_names` order (drawn in the
            module's own dtype, then cast).
        """
        from ..validation import check_dtype

        dt = check_dtype(dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module, _ = _call_factory(self._factory, self.name, self.n_features, self.n_classes)
        named = list(module.named_parameters())
        if [n for n, _ in named] != self.param_names or [tuple(p.shape) for _, p in named] != (
            self.param_shapes
        ):
            raise ConfigError(
                f"the factory of model {self.name!r} returned modules with different parameters "
                "on two calls: it must build the same architecture every time (--model)"
            )
        with torch.no_grad():
            flat = torch.nn.utils.parameters_to_vector([p for _, p in named])
        return flat.detach().cpu().numpy().astype(dt)

    def _data_loss_grad(self, params, X, y, g, g_reused=True):
        y_t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        if g is None:
            self._prepare(params.dtype, training=False)
            self._bind(params)
            with torch.no_grad():
                return float(self.loss_fn(self.module(self._input(X)), y_t))
        self._prepare(params.dtype, training=True)
        self._bind(params, g)
        g.fill(0.0)  # autograd accumulates into the bound .grad views, in place
        with torch.enable_grad():
            loss = self.loss_fn(self.module(self._input(X)), y_t)
            if loss.dim() != 0:
                raise ConfigError(
                    f"the loss of model {self.name!r} returned shape {tuple(loss.shape)}: it must "
                    "return the mean loss over the batch as a scalar (reduction='mean') (--model)"
                )
            loss.backward()
        views = self._grad_views
        for k, p in enumerate(self._params):
            if p.grad is not views[k]:  # replaced by autograd (rare): copy into ``g``, rebind
                if p.grad is not None:
                    views[k].copy_(p.grad)
                p.grad = views[k]
        if not g_reused:
            self._bound_grad = None  # ``g`` lives for this call only: do not keep it
        return float(loss.detach())

    def _scores(self, params: np.ndarray, X: np.ndarray) -> np.ndarray:
        self._prepare(params.dtype, training=False)
        self._bind(params)
        with torch.no_grad():
            scores = self.module(self._input(X))
        scores = scores.detach().cpu().numpy()
        if scores.ndim == 2 and scores.shape[1] == 1 and self.n_classes == 2:
            scores = scores[:, 0]
        return scores

    def describe(self) -> dict:
        """JSON-serializable summary: the keys of :meth:`Model.describe` plus the module.

        Returns
        -------
        info : dict
            ``name`` (the spec), ``n_features``, ``n_classes``, ``n_params``,
            ``hidden`` (empty), ``activation`` (None), ``l2``, ``torch_module``
            (the module's class), ``torch_version``, ``parameters`` (list of
            ``[name, shape]``).
        """
        info = super().describe()
        info["torch_module"] = type(self.module).__name__
        info["torch_version"] = torch.__version__
        info["parameters"] = [
            [n, list(s)] for n, s in zip(self.param_names, self.param_shapes, strict=True)
        ]
        return info

    def __repr__(self) -> str:
        return f"TorchModel({self.name!r}, n_params={self.n_params}, module={type(self.module).__name__})"
