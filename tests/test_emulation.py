"""Straggler and latency specs, and the slowdown's sleeping."""

import numpy as np
import pytest

from dasgd.config import EmulationConfig
from dasgd.core.emulation import (
    MAX_FACTOR,
    SLEEP_QUANTUM_S,
    ComputeTime,
    Partitions,
    Slowdown,
    parse_compute_time,
    parse_latency,
    parse_partition,
    release_after,
    resolve_latency,
    resolve_partition,
    resolve_slowdown,
)
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


def test_slowdown_owes_and_pays_in_quanta():
    s = Slowdown(3.0)
    waits = []
    for _ in range(20):
        s.owe(0.0003)  # each step owes 0.6 ms: a wait every second step
        waits.append(s.take())
    assert waits[0] == 0.0 and waits[1] == pytest.approx(0.0012)
    assert sum(waits) + s.owed_s == pytest.approx(20 * 0.0006)
    assert s.slept_s == pytest.approx(sum(waits)) and s.owed_s < SLEEP_QUANTUM_S
    idle = Slowdown(1.0)
    idle.owe(1.0)
    assert idle.take() == 0 and idle.owed_s == 0


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("", "none"),
        ("0.005", "constant"),
        ("lognormal:0.005:0.5", "lognormal"),
        ("exponential:0.002", "exponential"),
        ("uniform:0.001:0.003", "uniform"),
    ],
)
def test_compute_time_specs(spec, kind):
    assert parse_compute_time(spec)["kind"] == kind
    a = ComputeTime(spec, factor=2.0, seed=(0, 3))
    b = ComputeTime(spec, factor=2.0, seed=(0, 3))
    draws = [a.sample() for _ in range(200)]
    assert draws == [b.sample() for _ in range(200)]  # same seed, same draws
    assert all(d >= 0 for d in draws)
    assert a.enabled == (kind != "none")
    if kind == "constant":
        assert set(draws) == {0.01}
    if kind == "uniform":
        assert 0.002 <= min(draws) and max(draws) <= 0.006
    if kind == "lognormal":  # median of the draws near 2 x 5 ms
        assert 0.008 < float(np.median(draws)) < 0.0125


def test_compute_time_seeds_are_per_node():
    draws = {k: ComputeTime("exponential:0.01", seed=(0, k)).sample() for k in range(4)}
    assert len(set(draws.values())) == 4


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("-1", "must be in 0..60"),
        ("fast", "not a number"),
        ("lognormal:0.005", "expected"),
        ("lognormal:0:1", "median must be > 0"),
        ("uniform:3:1", "LOW must be <= HIGH"),
        ("exponential:nan", "finite"),
    ],
)
def test_bad_compute_time_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_compute_time(spec)


# -- partitions ---------------------------------------------------------------------

RING4 = [(0, 1), (1, 2), (2, 3), (3, 0)]


def test_partition_specs():
    assert parse_partition("") == []
    link, host = parse_partition("1-0@2+3, 3@0.5+1.5")
    assert link == {"link": [0, 1], "start_s": 2.0, "end_s": 5.0}
    assert host == {"node": 3, "start_s": 0.5, "end_s": 2.0}
    assert resolve_partition("0-1@2+3,3@0+1", RING4, range(4)) == parse_partition("0-1@2+3,3@0+1")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0-1", "expected U-V@START"),
        ("0-1@2", "expected U-V@START"),
        ("@2+3", "expected U-V@START"),
        ("0-1@-1+3", "start -1 s must be >= 0"),
        ("0-1@1+0", "duration 0 s must be > 0"),
        ("0-1@1+-2", "duration -2 s must be > 0"),
        ("0-1@x+1", "'x' in '0-1@x\\+1' is not a number"),
        ("0-1@1+inf", "must be finite"),
        ("a-1@1+1", "must be a node id"),
        ("1-1@1+1", "two different nodes"),
    ],
)
def test_bad_partition_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        EmulationConfig(partition=spec)


def test_partition_naming_a_missing_node_or_link():
    with pytest.raises(ConfigError, match=r"node 4 but the run has nodes 0..3 \(--partition\)"):
        resolve_partition("4@1+1", RING4, range(4))
    with pytest.raises(ConfigError, match=r"node 9 but the run has nodes 0..3"):
        resolve_partition("0-9@1+1", RING4, range(4))
    with pytest.raises(ConfigError, match=r"link 0-2, which is not in the topology; .*\[1, 3\]"):
        resolve_partition("2-0@1+1", RING4, range(4))


def test_partition_windows_per_directed_link():
    cuts = Partitions(resolve_partition("0-1@2+3,3@1+2,1-0@4+2", RING4, range(4)))
    assert cuts
    assert not Partitions([])
    # overlapping cuts of one link merge; both directions are cut
    assert cuts.windows(0, 1) == cuts.windows(1, 0) == [(2.0, 6.0)]
    # a host cut cuts every link of the host, in both directions, and no other
    assert cuts.windows(3, 0) == cuts.windows(2, 3) == [(1.0, 3.0)]
    assert cuts.windows(1, 2) == []
    # touching windows merge too
    assert Partitions(parse_partition("0-1@1+1,0-1@2+1")).windows(0, 1) == [(1.0, 3.0)]


def test_release_after_is_the_first_time_outside_every_cut():
    windows = [(1.0, 2.0), (3.0, 4.0)]
    assert release_after(windows, 0.5) == 0.5
    assert release_after(windows, 1.0) == 2.0  # [start, end): the start is inside
    assert release_after(windows, 1.5) == 2.0
    assert release_after(windows, 2.0) == 2.0  # the end is outside
    assert release_after(windows, 3.9) == 4.0
    assert release_after(windows, 5.0) == 5.0
    assert release_after([], 1.5) == 1.5
    ts = np.linspace(0, 5, 101)
    released = [release_after(windows, t) for t in ts]
    assert all(
        b >= a for a, b in zip(released[:-1], released[1:], strict=True)
    )  # monotone: FIFO kept
