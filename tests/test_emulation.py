"""Straggler and latency specs, and the slowdown's sleeping."""

import pytest

from dasgd.config import EmulationConfig
from dasgd.emulation import MAX_FACTOR, Slowdown, parse_latency, resolve_latency, resolve_slowdown
from dasgd.errors import ConfigError


def test_slowdown_specs():
    assert resolve_slowdown("", 3) == [1.0, 1.0, 1.0]
    assert resolve_slowdown("2:4", 3) == [1.0, 1.0, 4.0]
    assert resolve_slowdown("0:2,1:1.5", 3) == [2.0, 1.5, 1.0]
    a = resolve_slowdown("random:7", 50)
    assert a == resolve_slowdown("random:7", 50) and a != resolve_slowdown("random:8", 50)
    assert all(1.0 <= f <= MAX_FACTOR for f in a)
    # heavier tail with smaller alpha: a larger mean factor
    assert sum(resolve_slowdown("random:1:0.8", 400)) > sum(resolve_slowdown("random:1:4", 400))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("2", "NODE:FACTOR"),
        ("2:0.5", "must be in 1..1000"),
        ("0:1e300", "must be in 1..1000"),
        ("x:2", "node 'x'"),
        ("1:fast", "not a number"),
        ("random", "random:SEED"),
        ("random:1:-1", "> 0"),
    ],
)
def test_bad_slowdown_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        EmulationConfig(slowdown=spec)


def test_slowdown_naming_a_missing_node():
    with pytest.raises(ConfigError, match="node 5"):
        resolve_slowdown("5:2", 4)


def test_latency_specs():
    edges = [(0, 1), (1, 2), (2, 0)]
    assert resolve_latency("", edges) == {}
    # exact: the values are float() of the spec's text, stored as they are
    both = resolve_latency("0.01", edges)
    assert both[(0, 1)] == both[(1, 0)] == 0.01 and len(both) == 6
    mixed = resolve_latency("0.001,2-0:0.05", edges)
    assert mixed[(0, 2)] == mixed[(2, 0)] == 0.05 and mixed[(1, 2)] == 0.001
    assert parse_latency("1-0:0.2")["links"] == {(0, 1): 0.2}
    with pytest.raises(ConfigError, match="link 0-5"):
        resolve_latency("0-5:0.1", edges)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("-1", "must be in 0..10"),
        ("1e9", "must be in 0..10"),
        ("0-1", "not a number"),
        ("0-1:0.1,0.2", "default"),
        ("01:0.1", "U-V"),
    ],
)
def test_bad_latency_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        EmulationConfig(latency=spec)


def test_slowdown_sleeps_what_is_owed():
    s = Slowdown(3.0)
    for _ in range(20):
        s.after_step(0.001)  # each step owes 2 ms
    # sleeping never undershoots, and what is not slept yet is under one quantum
    # the sum of twenty 2 ms debts, rounded at each addition: 1 ns is far above that rounding
    assert s.slept_s + s.owed_s == pytest.approx(0.040, abs=1e-9)
    assert s.slept_s >= 0.039 and s.owed_s < 0.001
    idle = Slowdown(1.0)
    idle.after_step(1.0)
    assert idle.slept_s == 0 and idle.owed_s == 0
