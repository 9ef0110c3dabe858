"""The shared argument checks: conversions, error classes and the two message forms."""

import numpy as np
import pytest

from dasgd.errors import ConfigError, DataError
from dasgd.validation import (
    check_dtype,
    check_int,
    check_non_negative,
    check_positive,
    check_seed,
    check_unit_interval,
)


def test_check_int_accepts_python_and_numpy_integers():
    assert check_int(3, "n", 1) == 3
    value = check_int(np.int64(3), "n", 1, error=DataError)
    assert value == 3 and type(value) is int


@pytest.mark.parametrize(
    ("value", "config_message", "data_message"),
    [
        (0, "n must be an integer >= 1, got 0", "n=0 is invalid: need an integer >= 1"),
        (True, "n must be an integer >= 1, got True", "n=True is invalid: need an integer >= 1"),
        (2.0, "n must be an integer >= 1, got 2.0", "n=2.0 is invalid: need an integer >= 1"),
        # below the minimum: ConfigError shows the value as given, DataError the int
        (
            np.int64(-1),
            f"n must be an integer >= 1, got {np.int64(-1)!r}",
            "n=-1 is invalid: need an integer >= 1",
        ),
    ],
)
def test_check_int_message_forms(value, config_message, data_message):
    with pytest.raises(ConfigError) as info:
        check_int(value, "n", 1)
    assert type(info.value) is ConfigError and str(info.value) == config_message
    with pytest.raises(DataError) as info:
        check_int(value, "n", 1, error=DataError)
    assert str(info.value) == data_message


def test_check_seed():
    assert check_seed(0) == 0
    with pytest.raises(DataError, match=r"^seed=-1 is invalid: need an integer >= 0$"):
        check_seed(-1, error=DataError)


def test_check_dtype():
    assert check_dtype("float32") == np.float32
    with pytest.raises(ConfigError, match=r"^dtype must be float32 or float64, got int64$"):
        check_dtype(np.int64)
    with pytest.raises(ConfigError, match=r"^dtype must be float32 or float64, got 'xx'$"):
        check_dtype("xx")


@pytest.mark.parametrize(
    ("check", "good", "bad", "need"),
    [
        (check_positive, 0.5, [0.0, -1.0, float("nan"), float("inf"), True, "x", None], "> 0"),
        (check_non_negative, 0.0, [-1.0, float("nan"), True, "x"], ">= 0"),
        (check_unit_interval, 0.0, [1.0, -0.1, float("nan"), True, None], "in [0, 1)"),
    ],
)
def test_float_checks(check, good, bad, need):
    assert check(good, "x") == good
    for value in bad:
        with pytest.raises(ConfigError) as info:
            check(value, "x")
        message = str(info.value)
        assert message.startswith("x must be a") and need in message, message
        assert message.endswith(f"got {value!r}"), message
