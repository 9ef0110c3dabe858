"""Datasets, train/test splits, sharding across nodes, and mini-batch sampling.

What lives here (ALGORITHMS.md §7):

- :func:`load_dataset` -- a scikit-learn bundled set (``digits``,
  ``breast_cancer``, ``wine``, ``iris``; offline), an ``.npz`` file, or an
  svmlight/LIBSVM file (a9a, rcv1, covtype, ...), split into train and test
  and standardized on the training part only. Returns a :class:`Dataset`.
  :func:`dataset_from_arrays` does the same for arrays in memory.
- :func:`shard_iid` and :func:`shard_by_label` -- which training samples each
  node owns: i.i.d. (a seeded permutation cut into equal parts) or non-i.i.d.
  by label (per-class Dirichlet proportions).
- :func:`class_histogram` -- samples per class, for reporting shards.
- :class:`BatchSampler` and :func:`steps_for_epochs` -- the per-node mini-batch
  stream used on every SGD step.

Node processes import this module for :class:`BatchSampler`, so it imports
only numpy and the standard library at top level; scikit-learn (about 1.3 s to
import) is imported inside the functions that need it.

Every user-facing problem raises :class:`dasgd.errors.DataError` with a
one-line message naming the bad value and what would be valid.
"""

from __future__ import annotations

import math
import numbers
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..validation import check_int, check_seed

__all__ = [
    "DATASETS",
    "MAX_DENSE_BYTES",
    "BatchSampler",
    "Dataset",
    "class_histogram",
    "dataset_from_arrays",
    "load_dataset",
    "shard_by_label",
    "shard_iid",
    "local_steps",
    "steps_for_epochs",
]

#: Names of the scikit-learn bundled datasets :func:`load_dataset` accepts.
DATASETS: tuple[str, ...] = ("digits", "breast_cancer", "wine", "iris")

#: Largest dense float64 matrix (in bytes) an svmlight file may expand to.
MAX_DENSE_BYTES: int = 4 * 2**30

#: Float labels that are not all integers, with more distinct values than
#: this, are taken for regression targets and refused.
_MAX_FLOAT_CLASSES = 100

#: How many Dirichlet draws :func:`shard_by_label` tries before it moves
#: samples into empty shards by hand.
_MAX_DIRICHLET_TRIES = 10

_CHOICES = ", ".join(DATASETS[:-1]) + f", {DATASETS[-1]}"
_VALID_NAMES = f"choose one of {_CHOICES}, or a path to an svmlight/LIBSVM or .npz file"
_SVMLIGHT_PREFIX = "svmlight:"


# ----------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset split into train and test parts.

    Parameters
    ----------
    name : str
        The bundled dataset's name, or the file name (without directories).
    X_train : ndarray of shape (n_train, n_features), dtype float64
        Training features, C-contiguous; standardized if requested.
    y_train : ndarray of shape (n_train,), dtype int64
        Training class ids in ``0 .. n_classes - 1``.
    X_test : ndarray of shape (n_test, n_features), dtype float64
        Test features, transformed with the training set's statistics.
    y_test : ndarray of shape (n_test,), dtype int64
        Test class ids in ``0 .. n_classes - 1``.
    n_classes : int
        Number of classes (at least 2).
    class_labels : tuple
        The original label of each class id, ``class_labels[k]`` for id ``k``;
        ints, floats or strs (JSON-serializable). Integral float labels such
        as LIBSVM's ``-1``/``+1`` are recorded as ints.

    Notes
    -----
    Equality is identity (``eq=False``): comparing arrays field by field has no
    single truth value.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    class_labels: tuple

    def __post_init__(self) -> None:
        for part in ("train", "test"):
            X = getattr(self, f"X_{part}")
            y = getattr(self, f"y_{part}")
            if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
                raise DataError(
                    f"dataset {self.name!r}: X_{part} has shape {X.shape} and y_{part} "
                    f"{y.shape}: need X_{part} (m, d) and y_{part} (m,)"
                )
        if self.X_train.shape[1] != self.X_test.shape[1]:
            raise DataError(
                f"dataset {self.name!r}: X_train has {self.X_train.shape[1]} features and "
                f"X_test {self.X_test.shape[1]}: they must match"
            )
        if len(self.class_labels) != self.n_classes:
            raise DataError(
                f"dataset {self.name!r}: {len(self.class_labels)} class labels for "
                f"n_classes={self.n_classes}: need one label per class"
            )

    @property
    def n_features(self) -> int:
        """Number of features ``d``."""
        return int(self.X_train.shape[1])

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.X_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return int(self.X_test.shape[0])


# ----------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------


def load_dataset(
    name: str, *, test_fraction: float = 0.2, seed: int = 0, standardize: bool = True
) -> Dataset:
    """Load a classification dataset, split it and standardize it.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS` (scikit-learn's bundled copies, no network);
        or a path to an ``.npz`` file with arrays ``X`` (m, d) and ``y`` (m,),
        and optionally ``X_test`` and ``y_test`` (then no split is made); or a
        path to any other file, read as svmlight/LIBSVM (sparse, made dense).
        ``svmlight:PATH`` forces the svmlight reader whatever the suffix.
    test_fraction : float, default 0.2
        Fraction of the samples held out for testing, in (0, 1). The split is
        stratified by class when every class has at least 2 samples.
    seed : int, default 0
        Seed of the train/test split (non-negative).
    standardize : bool, default True
        Scale every feature to zero mean and unit variance with statistics of
        the training part only (constant features are only centred).

    Returns
    -------
    Dataset
        Features float64 C-contiguous; labels int64 ``0 .. n_classes - 1``
        (``np.unique`` order of the original labels, kept in ``class_labels``).

    Raises
    ------
    DataError
        Unknown name, missing or malformed file, unusable labels (fewer than 2
        classes, regression targets), non-finite values, a dense matrix larger
        than :data:`MAX_DENSE_BYTES`, a bad ``test_fraction`` or ``seed``, or
        fewer than 2 training samples.
    """
    if not isinstance(name, str | os.PathLike):
        raise DataError(f"dataset name {name!r} is not a string: {_VALID_NAMES}")
    name = os.fspath(name)
    test_fraction = _check_test_fraction(test_fraction)
    seed = check_seed(seed, error=DataError)

    X_test: np.ndarray | None = None
    y_test_raw: np.ndarray | None = None
    if name in DATASETS:
        label = name
        X, y_raw = _load_bundled(name)
    else:
        force_svmlight = name.startswith(_SVMLIGHT_PREFIX)
        path = _resolve_path(name[len(_SVMLIGHT_PREFIX) :] if force_svmlight else name, name)
        label = path.name
        if not force_svmlight and path.suffix.lower() == ".npz":
            X, y_raw, X_test, y_test_raw = _load_npz(path)
        else:
            X, y_raw = _load_svmlight(path)
    return _finish(X, y_raw, X_test, y_test_raw, label, test_fraction, seed, standardize)


def dataset_from_arrays(
    X,
    y,
    X_test=None,
    y_test=None,
    *,
    name: str = "arrays",
    test_fraction: float = 0.2,
    seed: int = 0,
    standardize: bool = True,
) -> Dataset:
    """A :class:`Dataset` from arrays in memory, split and standardized as :func:`load_dataset` does.

    The result equals :func:`load_dataset` of an ``.npz`` file holding the same
    arrays (``np.savez(path, X=X, y=y[, X_test=..., y_test=...])``): that is how
    a run given arrays is replayed.

    Parameters
    ----------
    X : array_like of shape (m, d)
        Real features (any real dtype; converted to float64). A pandas
        DataFrame works (``np.asarray``).
    y : array_like of shape (m,)
        Class labels: integers, integral floats or strings (mapped to ids
        ``0 .. C-1`` in ``np.unique`` order).
    X_test, y_test : array_like of shape (m_test, d) and (m_test,), optional
        A test split; both or neither. Without them ``test_fraction`` of
        ``X, y`` is held out (stratified when possible, seeded by ``seed``).
    name : str, default "arrays"
        Recorded as the dataset's name.
    test_fraction : float, default 0.2
        In (0, 1); used only without ``X_test``.
    seed : int, default 0
        Seed of the train/test split.
    standardize : bool, default True
        Zero mean, unit variance with the training part's statistics.

    Returns
    -------
    Dataset

    Raises
    ------
    DataError
        Wrong shapes or dtypes, non-finite values, only one of ``X_test`` and
        ``y_test``, unusable labels, or fewer than 2 training samples.
    """
    test_fraction = _check_test_fraction(test_fraction)
    seed = check_seed(seed, error=DataError)
    if (X_test is None) != (y_test is None):
        raise DataError(f"dataset {name!r}: got only one of X_test, y_test: give both or neither")
    X = _check_features(_as_array(X, "X", name), "X", name)
    y = _check_labels_shape(_as_array(y, "y", name), "y", X.shape[0], "X", name)
    if X_test is not None:
        X_test = _check_features(_as_array(X_test, "X_test", name), "X_test", name)
        if X_test.shape[1] != X.shape[1]:
            raise DataError(
                f"dataset {name!r}: X_test has {X_test.shape[1]} features and X has "
                f"{X.shape[1]}: they must match"
            )
        y_test = _check_labels_shape(
            _as_array(y_test, "y_test", name), "y_test", X_test.shape[0], "X_test", name
        )
    return _finish(X, y, X_test, y_test, name, test_fraction, seed, standardize)


def _as_array(a, key: str, where: str) -> np.ndarray:
    try:
        return np.asarray(a)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where!r}: {key} is not an array ({exc}): need a numeric array") from None


def _finish(X, y_raw, X_test, y_test_raw, label, test_fraction, seed, standardize) -> Dataset:
    """Encode labels, split (unless a test part is given), standardize: the end of every loader."""
    if X_test is None or y_test_raw is None:
        y_all, labels = _encode_labels(y_raw, label)
        X_train, X_test, y_train, y_test = _split(X, y_all, test_fraction, seed, label)
    else:
        y_all, labels = _encode_labels(np.concatenate([y_raw, y_test_raw]), label)
        X_train, y_train = X, y_all[: len(y_raw)]
        y_test = y_all[len(y_raw) :]
        if X_train.shape[0] < 2:
            raise DataError(
                f"dataset {label!r} has {X_train.shape[0]} training sample(s): need at least 2"
            )

    if standardize:
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X_train)
        X_train = scaler.transform(X_train)
        X_test = scaler.transform(X_test)
        if not (np.isfinite(X_train).all() and np.isfinite(X_test).all()):
            raise DataError(
                f"dataset {label!r} has features too large to standardize (values near the float64 limit): "
                "rescale them or use --no-standardize"
            )

    return Dataset(
        name=label,
        X_train=np.ascontiguousarray(X_train, dtype=np.float64),
        y_train=np.ascontiguousarray(y_train, dtype=np.int64),
        X_test=np.ascontiguousarray(X_test, dtype=np.float64),
        y_test=np.ascontiguousarray(y_test, dtype=np.int64),
        n_classes=len(labels),
        class_labels=labels,
    )


def _check_test_fraction(test_fraction: float) -> float:
    ok = isinstance(test_fraction, numbers.Real) and not isinstance(test_fraction, bool)
    if not (ok and 0.0 < float(test_fraction) < 1.0):
        raise DataError(f"test_fraction={test_fraction!r} is invalid: need a number in (0, 1)")
    return float(test_fraction)


def _resolve_path(path_text: str, given: str) -> Path:
    path = Path(path_text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise DataError(f"dataset path {given!r} is not a regular file: {_VALID_NAMES}")
    looks_like_path = (
        given.startswith(_SVMLIGHT_PREFIX)
        or os.sep in path_text
        or "/" in path_text
        or path.suffix != ""
    )
    if looks_like_path:
        raise DataError(f"dataset file {given!r} not found: {_VALID_NAMES}")
    raise DataError(f"unknown dataset {given!r}: {_VALID_NAMES}")


def _load_bundled(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
    }[name]
    X, y = loader(return_X_y=True)
    return np.asarray(X, dtype=np.float64), np.asarray(y)


def _load_svmlight(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_svmlight_file

    try:
        X_sparse, y = load_svmlight_file(str(path))
    except OSError as exc:
        raise DataError(f"cannot read svmlight file {str(path)!r}: {exc}") from exc
    except (ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(
            f"svmlight/LIBSVM file {str(path)!r} is malformed ({reason}): "
            "need lines 'LABEL INDEX:VALUE ...', or give a .npz file"
        ) from exc
    m, d = X_sparse.shape
    dense_bytes = m * d * 8
    if dense_bytes > MAX_DENSE_BYTES:
        raise DataError(
            f"svmlight file {str(path)!r} is {m}x{d}, {dense_bytes / 2**30:.1f} GiB as dense "
            f"float64: at most {MAX_DENSE_BYTES / 2**30:.0f} GiB is supported; "
            "reduce the samples or features"
        )
    X = np.asarray(X_sparse.toarray(), dtype=np.float64)
    _check_features(X, "X", path)
    return X, np.asarray(y)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    where = str(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(
                f"{where!r} holds a single .npy array, not an .npz archive: "
                "need an np.savez archive with arrays X and y"
            )
        with loaded as archive:
            keys = set(archive.files)
            missing = [k for k in ("X", "y") if k not in keys]
            if missing:
                raise DataError(
                    f".npz file {where!r} lacks array(s) {', '.join(missing)} "
                    f"(has {', '.join(sorted(keys)) or 'none'}): need X (m, d) and y (m,)"
                )
            has_test = "X_test" in keys or "y_test" in keys
            if has_test and not ("X_test" in keys and "y_test" in keys):
                raise DataError(
                    f".npz file {where!r} has only one of X_test, y_test: give both or neither"
                )
            arrays = {k: archive[k] for k in ("X", "y", "X_test", "y_test") if k in keys}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(
            f"cannot read .npz file {where!r} ({reason}): need an np.savez archive "
            "with arrays X and y"
        ) from exc

    X = _check_features(arrays["X"], "X", path)
    y = _check_labels_shape(arrays["y"], "y", X.shape[0], "X", path)
    if not has_test:
        return X, y, None, None
    X_test = _check_features(arrays["X_test"], "X_test", path)
    if X_test.shape[1] != X.shape[1]:
        raise DataError(
            f".npz file {where!r}: X_test has {X_test.shape[1]} features and X has "
            f"{X.shape[1]}: they must match"
        )
    if X_test.shape[0] < 1:
        raise DataError(f".npz file {where!r}: X_test has no rows: need at least 1 test sample")
    y_test = _check_labels_shape(arrays["y_test"], "y_test", X_test.shape[0], "X_test", path)
    return X, y, X_test, y_test


def _check_features(X: np.ndarray, key: str, path: Path) -> np.ndarray:
    where = str(path)
    if X.ndim != 2:
        raise DataError(f"{where!r}: {key} has shape {X.shape}: need a 2-D array (m, d)")
    if X.dtype.kind not in "biuf":
        raise DataError(f"{where!r}: {key} has dtype {X.dtype}: need real numbers")
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise DataError(
            f"{where!r}: {key} has shape {X.shape}: need at least 1 sample and 1 feature"
        )
    X = np.asarray(X, dtype=np.float64)
    if not np.isfinite(X).all():
        bad = int(np.count_nonzero(~np.isfinite(X)))
        raise DataError(
            f"{where!r}: {key} has {bad} non-finite value(s) (nan/inf): need finite numbers"
        )
    return X


def _check_labels_shape(y: np.ndarray, key: str, m: int, x_key: str, path: Path) -> np.ndarray:
    where = str(path)
    if y.ndim != 1:
        raise DataError(f"{where!r}: {key} has shape {y.shape}: need a 1-D array of labels")
    if y.shape[0] != m:
        raise DataError(
            f"{where!r}: {key} has {y.shape[0]} labels and {x_key} has {m} rows: they must match"
        )
    if y.dtype.kind not in "biufU":
        raise DataError(f"{where!r}: {key} has dtype {y.dtype}: need integer, float or str labels")
    return y


def _encode_labels(y: np.ndarray, where: str) -> tuple[np.ndarray, tuple]:
    """Map labels to ``0 .. C-1`` in ``np.unique`` order; return ids and originals."""
    y = np.asarray(y)
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(f"dataset {where!r} has non-finite labels: need finite class labels")
    uniques, ids = np.unique(y, return_inverse=True)
    if y.dtype.kind == "f":
        integral = bool(np.all(uniques == np.round(uniques)))
        if not integral and len(uniques) > _MAX_FLOAT_CLASSES:
            raise DataError(
                f"dataset {where!r} has {len(uniques)} distinct non-integer labels, which "
                f"looks like regression targets: need class labels (at most "
                f"{_MAX_FLOAT_CLASSES} distinct values if not integers)"
            )
    if len(uniques) < 2:
        raise DataError(
            f"dataset {where!r} has {len(uniques)} class(es) "
            f"{tuple(_plain(u) for u in uniques)}: need at least 2"
        )
    return ids.astype(np.int64).reshape(-1), tuple(_plain(u) for u in uniques)


def _plain(value: np.generic) -> int | float | str | bool:
    """A JSON-serializable Python scalar for a numpy label; integral floats become ints."""
    item = value.item()
    if isinstance(item, float) and item.is_integer():
        return int(item)
    return item


def _split(
    X: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    m = X.shape[0]
    n_test = math.ceil(test_fraction * m)
    n_train = m - n_test
    if n_train < 2:
        raise DataError(
            f"dataset {where!r} has {m} sample(s); test_fraction={test_fraction} leaves "
            f"{n_train} for training: need at least 2 (lower test_fraction or add samples)"
        )
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(X, y, test_size=test_fraction, random_state=seed, stratify=y)
    except ValueError:
        # Stratification is impossible (a class with a single member, or fewer
        # test/train slots than classes): split without it.
        return train_test_split(X, y, test_size=test_fraction, random_state=seed)


# ----------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------


def shard_iid(n_samples: int, n_nodes: int, *, seed: int = 0) -> list[np.ndarray]:
    """Split ``range(n_samples)`` into ``n_nodes`` random, nearly equal shards.

    Parameters
    ----------
    n_samples : int
        Number of training samples (at least 1).
    n_nodes : int
        Number of shards, ``1 <= n_nodes <= n_samples``.
    seed : int, default 0
        Seed of the permutation.

    Returns
    -------
    list of ndarray of shape (n_samples // n_nodes or one more,), dtype int64
        Sorted, disjoint index arrays whose union is ``range(n_samples)``;
        sizes differ by at most 1 (``np.array_split`` of a seeded permutation).
    """
    n_samples = check_int(n_samples, "n_samples", 1, error=DataError)
    n_nodes = _check_n_nodes(n_nodes, n_samples)
    seed = check_seed(seed, error=DataError)
    perm = np.random.default_rng(seed).permutation(n_samples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, n_nodes)]


def shard_by_label(y: np.ndarray, n_nodes: int, alpha: float, *, seed: int = 0) -> list[np.ndarray]:
    """Split samples among nodes with per-class Dirichlet proportions (non-i.i.d.).

    For every class ``k`` a proportion vector ``p_k ~ Dir(alpha * 1_n)`` is drawn
    and the (shuffled) samples of class ``k`` are cut among the ``n`` nodes in
    those proportions. Small ``alpha`` (e.g. 0.1) gives each node few classes;
    large ``alpha`` (e.g. 100) approaches an i.i.d. split.

    Every node gets at least one sample: a draw that leaves a node empty is
    redrawn with the next seed (up to 10 times), then single samples are moved
    from the largest shard into the empty ones.

    Parameters
    ----------
    y : ndarray of shape (m,)
        Class labels of the training samples (any values; grouped by equality).
    n_nodes : int
        Number of shards, ``1 <= n_nodes <= m``.
    alpha : float
        Dirichlet concentration, ``> 0``.
    seed : int, default 0
        Seed of the draw.

    Returns
    -------
    list of ndarray, dtype int64
        ``n_nodes`` sorted, non-empty, disjoint index arrays whose union is
        ``range(m)``.

    References
    ----------
    .. [1] T.-M. H. Hsu, H. Qi, M. Brown, "Measuring the Effects of
       Non-Identical Data Distribution for Federated Visual Classification",
       arXiv:1909.06335, 2019 (Dirichlet label skew; they draw per client).
    .. [2] M. Yurochkin et al., "Bayesian Nonparametric Federated Learning of
       Neural Networks", ICML 2019, sec. 5 (the per-class split used here).
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"labels y have shape {y.shape}: need a 1-D array")
    m = int(y.shape[0])
    if m < 1:
        raise DataError("labels y are empty: need at least 1 sample to shard")
    n_nodes = _check_n_nodes(n_nodes, m)
    ok = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)
    if not ok or not (math.isfinite(float(alpha)) and float(alpha) > 0):
        raise DataError(f"alpha={alpha!r} is invalid: need a finite Dirichlet concentration > 0")
    alpha = float(alpha)
    seed = check_seed(seed, error=DataError)

    _, class_of = np.unique(y, return_inverse=True)
    class_of = class_of.reshape(-1)
    order = np.argsort(class_of, kind="stable")
    bounds = np.flatnonzero(np.diff(class_of[order])) + 1
    per_class = np.split(order.astype(np.int64), bounds)

    for attempt in range(_MAX_DIRICHLET_TRIES):
        shards = _dirichlet_split(per_class, n_nodes, alpha, seed + attempt)
        if all(len(s) > 0 for s in shards):
            break
    else:
        shards = _fill_empty(shards)
    return [np.sort(s) for s in shards]


def _dirichlet_split(
    per_class: list[np.ndarray], n_nodes: int, alpha: float, seed: int
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
    for idx in per_class:
        idx = rng.permutation(idx)
        p = rng.dirichlet(np.full(n_nodes, alpha))
        if not (np.isfinite(p).all() and p.sum() > 0):  # underflow at tiny alpha
            p = np.zeros(n_nodes)
            p[rng.integers(n_nodes)] = 1.0
        cuts = np.round(np.cumsum(p)[:-1] / p.sum() * len(idx)).astype(np.int64)
        for node, piece in enumerate(np.split(idx, np.clip(cuts, 0, len(idx)))):
            parts[node].append(piece)
    return [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]


def _fill_empty(shards: list[np.ndarray]) -> list[np.ndarray]:
    """Move one sample at a time from the largest shard into each empty one."""
    shards = [np.sort(s) for s in shards]
    for node in range(len(shards)):
        if len(shards[node]) == 0:
            largest = max(range(len(shards)), key=lambda k: len(shards[k]))
            shards[node] = shards[largest][-1:].copy()
            shards[largest] = shards[largest][:-1]
    return shards


def _check_n_nodes(n_nodes: object, n_samples: int) -> int:
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, numbers.Integral):
        raise DataError(f"n_nodes={n_nodes!r} is invalid: need an integer in 1..{n_samples}")
    n_nodes = int(n_nodes)
    if not 1 <= n_nodes <= n_samples:
        raise DataError(
            f"n_nodes={n_nodes} is invalid for {n_samples} training samples: "
            f"need 1 <= n_nodes <= {n_samples}"
        )
    return n_nodes


def class_histogram(y: np.ndarray, n_classes: int) -> list[int]:
    """Count the samples of each class.

    Parameters
    ----------
    y : ndarray of shape (m,), integer dtype
        Class ids in ``0 .. n_classes - 1``.
    n_classes : int
        Number of classes (at least 1).

    Returns
    -------
    list of int, length n_classes
        ``hist[k]`` = number of samples with ``y == k``.
    """
    n_classes = check_int(n_classes, "n_classes", 1, error=DataError)
    y = np.asarray(y)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataError(
            f"class ids have shape {y.shape}, dtype {y.dtype}: need a 1-D integer array"
        )
    if y.size and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise DataError(
            f"class ids span {int(y.min())}..{int(y.max())}: need 0..{n_classes - 1} "
            f"for n_classes={n_classes}"
        )
    return [int(c) for c in np.bincount(y.astype(np.int64), minlength=n_classes)]


# ----------------------------------------------------------------------------
# Mini-batches
# ----------------------------------------------------------------------------


class BatchSampler:
    """Mini-batch indices for one shard: a fresh seeded permutation each epoch, consecutive batches of equal size.

    Within an epoch, samples are drawn without replacement. A batch that
    reaches the end of an epoch is completed with the first indices of the
    next epoch's permutation, so every batch has exactly ``batch_size``
    indices and every sample is seen exactly once per epoch (also when
    ``batch_size > n_samples``: such a batch spans several epochs).

    Parameters
    ----------
    n_samples : int
        Number of samples in the shard (at least 1).
    batch_size : int
        Indices per batch (at least 1).
    seed : int, default 0
        Seed of ``np.random.default_rng``; the same seed gives the same stream.

    Attributes
    ----------
    n_samples : int
    batch_size : int
    epoch : int
        Completed passes over the shard so far.

    Notes
    -----
    The returned array is a read-only view of the current permutation when the
    batch lies inside one epoch (no copy), and a fresh array otherwise.
    """

    def __init__(self, n_samples: int, batch_size: int, *, seed: int = 0) -> None:
        self.n_samples = check_int(n_samples, "n_samples", 1, error=DataError)
        self.batch_size = check_int(batch_size, "batch_size", 1, error=DataError)
        self._rng = np.random.default_rng(check_seed(seed, error=DataError))
        self._perm = self._new_permutation()
        self._pos = 0
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """Completed passes over the shard so far."""
        return self._epoch

    def _new_permutation(self) -> np.ndarray:
        perm = self._rng.permutation(self.n_samples).astype(np.int64, copy=False)
        perm.flags.writeable = False
        return perm

    def next_batch(self) -> np.ndarray:
        """Return the next batch.

        Returns
        -------
        ndarray of shape (batch_size,), dtype int64
            Sample indices in ``0 .. n_samples - 1``.
        """
        end = self._pos + self.batch_size
        if end < self.n_samples:  # hot path: a slice of this epoch's permutation
            batch = self._perm[self._pos : end]
            self._pos = end
            return batch
        pieces = []
        need = self.batch_size
        while need:
            take = min(need, self.n_samples - self._pos)
            pieces.append(self._perm[self._pos : self._pos + take])
            self._pos += take
            need -= take
            if self._pos == self.n_samples:
                self._perm = self._new_permutation()
                self._pos = 0
                self._epoch += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __repr__(self) -> str:
        return (
            f"BatchSampler(n_samples={self.n_samples}, batch_size={self.batch_size}, "
            f"epoch={self._epoch})"
        )


def steps_for_epochs(epochs: float, n_samples: int, batch_size: int) -> int:
    """Number of SGD steps that make ``epochs`` passes over ``n_samples`` samples.

    Parameters
    ----------
    epochs : float
        Passes over the data, ``> 0`` (fractions allowed).
    n_samples : int
        Samples per pass (at least 1).
    batch_size : int
        Samples per step (at least 1).

    Returns
    -------
    int
        ``ceil(epochs * n_samples / batch_size)``, at least 1. A product within
        1e-9 (relative) of an integer counts as that integer, so ``0.1`` epochs
        of 70 samples in batches of 7 is 1 step, not 2.
    """
    ok = isinstance(epochs, numbers.Real) and not isinstance(epochs, bool)
    if not ok or not (math.isfinite(float(epochs)) and float(epochs) > 0):
        raise DataError(f"epochs={epochs!r} is invalid: need a finite number > 0")
    n_samples = check_int(n_samples, "n_samples", 1, error=DataError)
    batch_size = check_int(batch_size, "batch_size", 1, error=DataError)
    steps = float(epochs) * n_samples / batch_size
    nearest = round(steps)
    if abs(steps - nearest) <= 1e-9 * max(1.0, abs(steps)):
        return max(1, int(nearest))
    return max(1, math.ceil(steps))


def local_steps(train, n_samples: int) -> int:
    """Local steps (gradients) of one node over a shard of ``n_samples``.

    ``train.steps`` if set, else :func:`steps_for_epochs` of ``train.epochs``;
    ``train`` is a :class:`dasgd.config.TrainConfig`.
    """
    if train.steps is not None:
        return train.steps
    return steps_for_epochs(train.epochs, n_samples, train.batch_size)
