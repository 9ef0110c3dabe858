"""The simulator (``dasgd simulate``): the same machines in virtual time, exact and deterministic.

Every run here is a :func:`dasgd.sim.simulate` in this process: no node
processes, no sockets, no sleeps.
"""

import numpy as np
import pytest

from dasgd.analysis.metrics import read_events
from dasgd.cli import main
from dasgd.config import (
    DataConfig,
    EmulationConfig,
    ModelConfig,
    RunConfig,
    SimConfig,
    TopologyConfig,
    TrainConfig,
)
from dasgd.rundir import prepare_run
from dasgd.sim import simulate

from .conftest import sequential_mlp_sgd
from .test_multiprocess import check_drained_run
from .test_ps import expected_tau_avg


def sim_config(tmp_path, **over):
    values = dict(
        n_nodes=4,
        topology=TopologyConfig("ring"),
        data=DataConfig("digits"),
        model=ModelConfig("softmax"),
        train=TrainConfig(steps=60, lr=0.05, batch_size=16),
        out_dir=str(tmp_path / "runs"),
        log_interval_s=0.05,
        eval_interval_s=None,
    )
    values.update(over)
    return RunConfig(**values)


def sim(cfg):
    return simulate(cfg, progress=False)


# -- one node is plain SGD -------------------------------------------------------------


def test_single_node_simulated_is_plain_sequential_sgd(tmp_path):
    # as tests/test_multiprocess.py::test_single_node_is_plain_sequential_sgd (`dasgd run -n 1`
    # takes the default topology, a ring, which with one node has no edge)
    cfg = sim_config(
        tmp_path,
        n_nodes=1,
        model=ModelConfig("mlp", hidden=(8,)),
        train=TrainConfig(steps=50, lr=0.1, batch_size=8, seed=3),
    )
    run_dir, summary = sim(cfg)
    assert summary["run"]["simulated"] and summary["run"]["steps"] == 50
    # the simulator keeps the shards in memory: the same seeded split, prepared again
    _, _, context = prepare_run(cfg.replace(out_dir=str(tmp_path / "ref")), write_shards=False)
    idx = context["shards"][0]
    X, y = context["dataset"].X_train[idx], context["dataset"].y_train[idx]
    x = sequential_mlp_sgd(X, y, steps=50, lr=0.1, batch_size=8, seed=3, hidden=(8,))
    # exact by construction: the simulator drives the same DasgdNode as the runtime, which
    # with no neighbour makes these same calls in the same order on the same arrays
    # (loss_and_grad, then x += -lr * g); virtual time decides only when, never what
    np.testing.assert_array_equal(np.load(run_dir / "node-0.npy"), x)


# -- determinism -------------------------------------------------------------------


def _without_real_time(summary):
    """The summary minus what legitimately differs between two simulations of one config."""
    run = {
        k: v
        for k, v in summary["run"].items()
        # the host's time the simulation took (sim_real_s, sim_loop_s, ...); events and
        # messages (sim_events, sim_messages) are the simulation's own and compared
        if not (k.startswith("sim_") and k.endswith("_s"))
    }
    assert "sim_events" in run and "wall_s" in run  # virtual seconds are compared
    config = dict(summary["config"])
    del config["out_dir"]  # where each copy was written
    return dict(summary, run=run, config=config)


@pytest.mark.parametrize("algorithm", ["dasgd", "ps-async", "ps-sync"])
def test_same_config_and_seed_give_the_same_run_bit_for_bit(tmp_path, algorithm):
    def once(where):
        cfg = sim_config(
            tmp_path / where,
            n_nodes=5,
            algorithm=algorithm,
            run_id="r",
            train=TrainConfig(steps=40, lr=0.05, batch_size=16, send_every=2),
            emulation=EmulationConfig(
                compute_time="lognormal:0.002:0.5", slowdown="2:8", latency="0.0005"
            ),
            sim=SimConfig(bandwidth_bps=2e8),
        )
        run_dir, summary = sim(cfg)
        return run_dir, summary

    dir_a, a = once("a")
    dir_b, b = once("b")
    assert _without_real_time(a) == _without_real_time(b)
    models = sorted(p.name for p in dir_a.glob("*.npy"))
    assert models == sorted(p.name for p in dir_b.glob("*.npy"))
    assert ("server.npy" in models) == (algorithm != "dasgd")
    for name in models:
        np.testing.assert_array_equal(np.load(dir_a / name), np.load(dir_b / name))
    # the event logs too, record for record (their times are virtual)
    logs = sorted(p.name for p in dir_a.glob("*.jsonl"))
    assert len(logs) == 5 + (algorithm != "dasgd")
    for name in logs:
        assert (dir_a / name).read_bytes() == (dir_b / name).read_bytes(), name
    # and the randomness was real: the straggler and the compute-time draws mattered
    if algorithm == "ps-async":
        assert a["run"]["tau_max_steps"] > a["run"]["tau_avg_steps"] + 4


# -- the checks a real run passes ----------------------------------------------------


@pytest.mark.parametrize("send_every", [1, 4])
@pytest.mark.parametrize("topology", ["ring", "complete"])
def test_drained_simulation_passes_the_real_runs_checks(tmp_path, topology, send_every):
    cfg = sim_config(
        tmp_path,
        n_nodes=6,
        topology=TopologyConfig(topology),
        # 41 steps: with b = 4 the last window is partial and sealed at the end
        train=TrainConfig(steps=41, lr=0.05, batch_size=16, send_every=send_every),
        emulation=EmulationConfig(
            compute_time="lognormal:0.002:0.5", slowdown="3:4", latency="0.001,0-1:0.004"
        ),
    )
    run_dir, summary = sim(cfg)
    checks = summary["checks"]
    assert checks["exactly_once"] and checks["all_drained"], checks
    # float64 models, equal up to summation order: ~1e-16 measured
    assert checks["consensus_distance_rel"] < 1e-9
    assert checks["oracle_distance_rel"] < 1e-9
    finals = check_drained_run(run_dir, summary, 6)  # per node: every delta of every origin once
    assert all(f["deltas_sealed"] == -(-41 // send_every) for f in finals)
    assert summary["emulation"]["latency_s"]["0-1"] == 0.004
    assert finals[3]["slept_s"] > 0 and finals[0]["slept_s"] == 0  # the straggler waited
    assert summary["run"]["staleness_apply_count"] == 5 * 6 * (-(-41 // send_every))


def test_drained_simulation_with_backpressure_on_a_slow_link(tmp_path):
    # no compute time, 5,200-byte deltas on 10 Mbit/s uplinks (4.2 ms each): the uplinks
    # fill and the nodes wait for them (WAIT_BACKLOG) instead of stepping
    cfg = sim_config(
        tmp_path,
        n_nodes=5,
        topology=TopologyConfig("ring"),
        train=TrainConfig(steps=80, lr=0.05, batch_size=16),
        sim=SimConfig(bandwidth_bps=1e7),
    )
    run_dir, summary = sim(cfg)
    finals = check_drained_run(run_dir, summary, 5)
    assert summary["checks"]["consensus_distance_rel"] < 1e-9
    assert summary["checks"]["oracle_distance_rel"] < 1e-9
    assert all(f["backlog_waits"] > 0 for f in finals)


# -- staleness: the values the papers predict ----------------------------------------


@pytest.mark.parametrize(
    "emulation",
    [
        EmulationConfig(compute_time="0.003"),
        EmulationConfig(compute_time="lognormal:0.002:0.5", slowdown="1:6"),
    ],
    ids=["equal", "straggler"],
)
def test_ps_async_tau_avg_counts_in_flight_gradients(tmp_path, emulation):
    n, steps = 4, 50
    cfg = sim_config(
        tmp_path,
        n_nodes=n,
        algorithm="ps-async",
        train=TrainConfig(steps=steps, lr=0.05, batch_size=16),
        emulation=emulation,
        sim=SimConfig(bandwidth_bps=1e8),
    )
    _, summary = sim(cfg)
    r = summary["run"]
    T = n * steps
    assert r["steps"] == r["updates_applied"] == T
    # exact whatever the timing: from its first model on, every worker always holds exactly
    # one outstanding gradient (its model is on the way, or it computes, or its gradient is on
    # the way), so each of the T updates adds 1 to the delay of the n - 1 other outstanding
    # gradients, and n - 1 are in flight at the end: sum of delays T (n - 1) over T + n - 1
    assert r["tau_count"] == T + n - 1 and len(r["tau_in_flight_steps"]) == n - 1
    assert r["tau_avg_steps"] == pytest.approx(expected_tau_avg(T, n), rel=1e-12)


def _jittered_equal_speed(n, slowdown=""):
    # every node's gradient takes 10 ms +- 5 % (uniform): equal speeds on average; message
    # costs (a few 10 us per message) are 1-4 % of it
    return dict(
        n_nodes=n,
        topology=TopologyConfig("complete"),
        train=TrainConfig(steps=100, lr=0.05, batch_size=16, send_every=1),
        emulation=EmulationConfig(compute_time="uniform:0.0095:0.0105", slowdown=slowdown),
    )


@pytest.mark.parametrize("n", [4, 8])
def test_dasgd_complete_graph_equal_speeds_s_avg_is_n_minus_1(tmp_path, n):
    _, summary = sim(sim_config(tmp_path, **_jittered_equal_speed(n)))
    s_avg = summary["run"]["staleness_apply_avg_steps"]
    # ALGORITHMS.md §2: a delta from node j applied at node i counts the steps the other n - 1
    # nodes took between j's read and the apply; each takes one step per compute time, so
    # n - 1, plus the chance that one finishes a second step while the delta is delivered
    # (1-4 % of a step here), minus the run's first and last windows (1/steps).
    # Tolerance 5 %; measured 3.005 (n = 4) and 7.06 (n = 8).
    assert s_avg == pytest.approx(n - 1, rel=0.05)
    assert summary["run"]["staleness_apply_max_steps"] <= 2 * (n - 1)


@pytest.mark.parametrize("n", [4, 8])
def test_dasgd_constant_compute_time_s_avg_is_n_minus_1(tmp_path, n):
    # identical modelled costs would keep every node in exact lockstep from a common start
    # (S_avg = 1.5 n - 1); nodes start within SimCosts.start_spread_s (1 ms) as processes do.
    # Without jitter the phases stay fixed: a node whose phase falls inside a delta's delivery
    # time (handling, sending and the modelled 80 us wake-up latency: ~0.2-0.3 ms) is counted
    # twice, so S_avg sits above n - 1 (measured 3.97 at n = 4); real processes measured
    # 4.0-4.5 at n = 4 on a ring and a complete graph (benchmarks/bench_sim_vs_real.py).
    cfg = sim_config(
        tmp_path, **dict(_jittered_equal_speed(n), emulation=EmulationConfig(compute_time="0.01"))
    )
    _, summary = sim(cfg)
    s_avg = summary["run"]["staleness_apply_avg_steps"]
    assert n - 1 - 0.2 <= s_avg <= 1.5 * (n - 1)


@pytest.mark.parametrize("n", [4, 8])
def test_a_straggler_raises_s_max_much_more_than_s_avg(tmp_path, n):
    _, equal = sim(sim_config(tmp_path / "equal", **_jittered_equal_speed(n)))
    _, slow = sim(sim_config(tmp_path / "slow", **_jittered_equal_speed(n, f"{n - 1}:8")))
    eq, sl = equal["run"], slow["run"]
    # the straggler's deltas are computed over 8 compute times, during which the n - 1 others
    # take ~8 steps each: staleness ~8 (n - 1) (measured 27 at n = 4, 73 at n = 8) ...
    assert sl["staleness_apply_max_steps"] >= 7 * (n - 1)
    assert sl["staleness_apply_max_steps"] >= 5 * eq["staleness_apply_max_steps"]
    # ... but they are 1/8 of the deltas while all run, and once the fast nodes are done the
    # straggler's steps are stale by nothing: S_avg does not rise (measured 2.3 and 6.2)
    assert sl["staleness_apply_avg_steps"] <= 1.05 * eq["staleness_apply_avg_steps"]
    assert slow["nodes"][n - 1]["train_s"] > 6 * slow["nodes"][0]["train_s"]


# -- links ----------------------------------------------------------------------------


def test_ps_async_is_bounded_by_the_servers_uplink(tmp_path):
    bandwidth_bps, message_bytes = 1e9, 4_000_000
    cfg = sim_config(
        tmp_path,
        n_nodes=4,
        algorithm="ps-async",
        train=TrainConfig(steps=40, lr=0.05, batch_size=16),
        sim=SimConfig(bandwidth_bps=bandwidth_bps, message_bytes=message_bytes),
    )
    run_dir, summary = sim(cfg)
    rate = summary["run"]["gradients_per_s"]
    # every gradient is computed on a model the server sent during the run, and its uplink
    # sends one 4 MB model per 32 ms: at most 31.25 gradients/s (headers make it a bit less)
    bound = bandwidth_bps / 8 / message_bytes
    assert rate <= bound
    # with no compute time the workers are never the bottleneck: 4 workers keep the uplink
    # busy but for the start (measured 31.05/s, 99.4 % of the bound)
    assert rate >= 0.95 * bound
    # the server's uplink carried a nominal 4 MB model for each of the T = 160 gradients
    server = read_events(run_dir / "server.jsonl", "final")[0]
    assert server["bytes_out"] >= 160 * message_bytes


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--bandwidth", "0"], "'0'"),
        (["--bandwidth", "fast"], "'fast'"),
        (["--compute-time", "lognormal:1"], "'lognormal:1'"),
        (["--message-bytes", "-5"], "-5"),
    ],
)
def test_simulate_rejects_bad_input_in_one_line(tmp_path, capsys, args, named):
    out_dir = tmp_path / "runs"
    code = main(["simulate", "-q", "-n", "2", "--steps", "2", "--out-dir", str(out_dir), *args])
    assert code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dasgd: error: ") and named in lines[0], lines[0]
    assert args[0] in lines[0]  # the flag that sets it
    assert "Traceback" not in err and out == ""
    assert not out_dir.exists()  # nothing was written


def test_a_simulation_too_large_for_memory_is_refused_with_its_size(tmp_path, capsys):
    from dasgd.cli import main

    # 48 n^2 bytes of version-vector bookkeeping: 4.8 PB at n = 10 million, more than any machine
    code = main(["simulate", "-n", "10000000", "--out-dir", str(tmp_path / "runs"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "10000000 DASGD nodes with 0 edges needs about 4470348" in err[0] and "(-n)" in err[0]
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_a_topology_whose_size_the_spec_fixes_is_checked_too(tmp_path, capsys, monkeypatch):
    from dasgd.cli import main
    from dasgd.sim import simulator

    # pretend a 1 GiB machine: a 100x100 torus (10,000 nodes) needs ~4.5 GiB of vectors
    monkeypatch.setattr(simulator, "_machine_memory_bytes", lambda: 1 << 30)
    code = main(["simulate", "--topology", "torus:100x100", "--out-dir", str(tmp_path), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "10000 DASGD nodes with 20000 edges" in err[0]


def test_bad_message_bytes_is_one_line(tmp_path, capsys):
    from dasgd.cli import main

    code = main(["simulate", "--message-bytes", "1" + "0" * 40, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "at most 1 TiB" in err[0]
