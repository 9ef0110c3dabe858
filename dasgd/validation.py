"""Small argument checks shared by the layers: one-line errors naming the bad value.

The lowest layer of the package: imports only numpy and :mod:`dasgd.errors`.
Every check returns the value converted (``int``, ``float``, ``np.dtype``) or
raises ``error`` (:class:`~dasgd.errors.ConfigError` by default) with a
one-line message in one of two forms, chosen by the error class:

- ``"{what} must be {need}, got {value!r}"`` (ConfigError and its other subclasses);
- ``"{what}={value!r} is invalid: need {need}"`` (:class:`~dasgd.errors.DataError`:
  the form every message of :mod:`dasgd.ml.data` takes).
"""

from __future__ import annotations

import math
import operator

import numpy as np

from .errors import ConfigError, DataError

__all__ = [
    "check_dtype",
    "check_int",
    "check_non_negative",
    "check_positive",
    "check_seed",
    "check_unit_interval",
    "invalid",
]


def invalid(error: type[ConfigError], what: str, shown: str, need: str) -> ConfigError:
    """The exception saying that ``what`` is not ``need`` (returned, not raised).

    Parameters
    ----------
    error : type
        A :class:`~dasgd.errors.ConfigError` class; a
        :class:`~dasgd.errors.DataError` class gets the data layer's form.
    what : str
        The name of the argument, e.g. ``"batch_size"``.
    shown : str
        The bad value as the message shows it (usually its ``repr``).
    need : str
        What is valid, e.g. ``"an integer >= 1"``.
    """
    if issubclass(error, DataError):
        return error(f"{what}={shown} is invalid: need {need}")
    return error(f"{what} must be {need}, got {shown}")


def check_int(value, what: str, minimum: int, *, error: type[ConfigError] = ConfigError) -> int:
    """``value`` as an integer >= ``minimum``.

    Anything ``operator.index`` accepts (Python and numpy integers) except
    ``bool`` is an integer.

    Parameters
    ----------
    value : object
    what : str
        The argument's name in the message.
    minimum : int
    error : type, default ConfigError

    Returns
    -------
    int

    Raises
    ------
    ConfigError
        (``error``) If ``value`` is not an integer or is below ``minimum``.
        A value below the minimum is shown as given (ConfigError form) or as
        a plain int (DataError form).
    """
    need = f"an integer >= {minimum}"
    if isinstance(value, bool):
        raise invalid(error, what, repr(value), need)
    try:
        ivalue = operator.index(value)
    except TypeError:
        raise invalid(error, what, repr(value), need) from None
    if ivalue < minimum:
        shown = repr(ivalue if issubclass(error, DataError) else value)
        raise invalid(error, what, shown, need)
    return ivalue


def check_seed(seed, what: str = "seed", *, error: type[ConfigError] = ConfigError) -> int:
    """A random seed: an integer >= 0 (see :func:`check_int`)."""
    return check_int(seed, what, 0, error=error)


def check_dtype(dtype, what: str = "dtype", *, error: type[ConfigError] = ConfigError) -> np.dtype:
    """``dtype`` as a numpy float32 or float64 dtype.

    Raises
    ------
    ConfigError
        (``error``) If it is not a dtype (shown as given) or another dtype
        (shown by name, e.g. ``int64``).
    """
    need = "float32 or float64"
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise invalid(error, what, repr(dtype), need) from None
    if dt.char not in "fd":
        raise invalid(error, what, dt.name, need)
    return dt


def _as_float(value, what: str, need: str, error) -> float:
    """``float(value)``; a bool and what ``float`` refuses raise ``error``."""
    if isinstance(value, bool):
        raise invalid(error, what, repr(value), need)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise invalid(error, what, repr(value), need) from None


def check_positive(value, what: str, *, error: type[ConfigError] = ConfigError) -> float:
    """``value`` as a finite float > 0 (a step size, an epsilon)."""
    need = "a finite number > 0"
    x = _as_float(value, what, need, error)
    if not math.isfinite(x) or x <= 0.0:
        raise invalid(error, what, repr(value), need)
    return x


def check_non_negative(value, what: str, *, error: type[ConfigError] = ConfigError) -> float:
    """``value`` as a finite float >= 0 (a regularization weight)."""
    need = "a finite number >= 0"
    x = _as_float(value, what, need, error)
    if not math.isfinite(x) or x < 0:
        raise invalid(error, what, repr(value), need)
    return x


def check_unit_interval(value, what: str, *, error: type[ConfigError] = ConfigError) -> float:
    """``value`` as a float in [0, 1) (a momentum, a decay rate)."""
    need = "a number in [0, 1)"
    x = _as_float(value, what, need, error)
    if not 0.0 <= x < 1.0:
        raise invalid(error, what, repr(value), need)
    return x
