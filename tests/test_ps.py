"""Parameter-server baselines: delays (Koloskova et al. 2022), ps-sync oracle, update rules, failures."""

import json
import math

import numpy as np
import pytest

from dasgd.analysis.metrics import read_events
from dasgd.build import build_machine
from dasgd.config import DataConfig, ModelConfig, RunConfig, TrainConfig, TransportConfig
from dasgd.core.wire import Header
from dasgd.ml.data import BatchSampler
from dasgd.ml.models import build_model
from dasgd.runtime.launch import run

from .test_multiprocess import assert_gone, node_pids, start_command, wait_training


def ps_config(tmp_path, algorithm="ps-async", **over):
    values = dict(
        n_nodes=4,
        algorithm=algorithm,
        data=DataConfig("digits"),
        model=ModelConfig("softmax"),
        train=TrainConfig(steps=60, lr=0.05, batch_size=16),
        transport=TransportConfig(ready_timeout_s=60, send_timeout_s=30),
        out_dir=str(tmp_path / "runs"),
        log_interval_s=0.05,
        timeout_s=120,
    )
    values.update(over)
    return RunConfig(**values)


def expected_tau_avg(T, n):
    # every update adds one step to the delay of each of the n - 1 other outstanding
    # gradients; at the end n - 1 gradients are in flight (Koloskova et al., Remark 5)
    return T * (n - 1) / (T + n - 1)


@pytest.mark.multiprocess
def test_ps_async_tau_avg_is_n_minus_1(tmp_path):
    run_dir, summary = run(ps_config(tmp_path), progress=False)
    r = summary["run"]
    T = 4 * 60
    assert r["steps"] == T and r["updates_applied"] == T
    assert r["tau_avg_steps"] == pytest.approx(expected_tau_avg(T, 4), rel=1e-12)
    assert len(r["tau_in_flight_steps"]) == 3
    assert sum(n["gradients_applied"] for n in summary["nodes"]) == T
    assert r["test_accuracy_mean"] > 0.8
    # the server logs every interval's delays and its test loss over time
    server_log = read_events(run_dir / "server.jsonl")
    assert {"start", "interval", "eval", "final"} <= {rec["kind"] for rec in server_log}


@pytest.mark.multiprocess
def test_ps_async_straggler_raises_its_delays_not_tau_avg(tmp_path):
    from dasgd.config import EmulationConfig

    # emulated compute time: the straggler's 8x is mostly a sleep, not CPU time that a loaded
    # machine's scheduler stretches for every worker alike (it failed once at load 10 on 2 cores)
    cfg = ps_config(
        tmp_path,
        n_nodes=3,
        emulation=EmulationConfig(slowdown="2:8", compute_time="0.002"),
        train=TrainConfig(steps=150, lr=0.05, batch_size=16),
    )
    _, summary = run(cfg, progress=False)
    r, nodes = summary["run"], summary["nodes"]
    assert r["tau_avg_steps"] == pytest.approx(expected_tau_avg(r["steps"], 3), rel=1e-12)
    fast = np.mean([nodes[0]["tau_avg_steps"], nodes[1]["tau_avg_steps"]])
    assert nodes[2]["tau_avg_steps"] > 2 * fast
    assert r["tau_max_steps"] >= nodes[2]["tau_avg_steps"]
    assert nodes[2]["steps"] < min(nodes[0]["steps"], nodes[1]["steps"])  # it computed fewer
    assert summary["nodes"][2]["slowdown_factor"] == 8


@pytest.mark.multiprocess
def test_ps_sync_is_sequential_sgd_with_batch_n_times_m(tmp_path):
    n, M, rounds, lr = 3, 8, 20, 0.1
    cfg = ps_config(
        tmp_path,
        "ps-sync",
        n_nodes=n,
        model=ModelConfig("mlp", hidden=(8,)),
        train=TrainConfig(steps=rounds, lr=lr, batch_size=M, seed=2),
    )
    run_dir, summary = run(cfg, progress=False)
    assert summary["run"]["tau_max_steps"] == 0 and summary["run"]["updates_applied"] == rounds
    shards = [
        (
            np.load(run_dir / "data" / f"shard-{i}-X.npy"),
            np.load(run_dir / "data" / f"shard-{i}-y.npy"),
        )
        for i in range(n)
    ]
    samplers = [BatchSampler(len(y), M, seed=2 + 1 + i) for i, (_, y) in enumerate(shards)]
    model = build_model("mlp", 64, 10, hidden=(8,))
    x = model.init_params(seed=2)
    for _ in range(rounds):
        batches = [s.next_batch() for s in samplers]
        X = np.concatenate([shards[i][0][b] for i, b in enumerate(batches)])
        y = np.concatenate([shards[i][1][b] for i, b in enumerate(batches)])
        _, g = model.loss_and_grad(x, X, y)
        x = x - lr * g
    # the server sums the n workers' gradients in arrival order, the reference computes the
    # gradient of the concatenated batch: equal up to summation order over 20 rounds
    np.testing.assert_allclose(np.load(run_dir / "server.npy"), x, rtol=1e-10, atol=1e-12)


def make_server(tmp_path, **train):
    cfg = RunConfig(
        n_nodes=4,
        algorithm="ps-async",
        model=ModelConfig("least_squares"),
        train=TrainConfig(steps=10, **train),
    )
    return build_machine(cfg, 4, n_features=1, n_classes=1, shard_sizes=[10] * 4)


def apply_grad(server, g, tau, worker):
    """Hand the server a gradient of delay ``tau`` as a worker's message would."""
    server.version = max(server.version, tau)
    no_vv = np.zeros(0, np.int64)
    header = Header("grad", worker, worker, server.version - tau, 1, no_vv, no_vv, "float64", (2,))
    server.on_message(header, g)


def test_server_delay_adaptive_inverse_and_drop(tmp_path):
    s = make_server(tmp_path, lr=0.5, delay_rule="inverse")
    x = s.x.copy()
    g = np.array([1.0, -2.0])
    apply_grad(s, g, tau=4, worker=0)  # tau <= tau_C = 4 workers: full step
    # exact: the server adds -(lr * g), the same rounded product as the expected value
    np.testing.assert_array_equal(s.x, x - 0.5 * g)
    apply_grad(s, g, tau=8, worker=1)  # tau > 4: lr / tau = 0.0625
    np.testing.assert_array_equal(s.x, x - 0.5 * g - 0.0625 * g)
    s = make_server(tmp_path, lr=0.5, delay_rule="drop")
    x = s.x.copy()
    apply_grad(s, g, tau=5, worker=0)
    np.testing.assert_array_equal(s.x, x)
    assert (s.dropped, s.applied, s.version) == (1, 0, 6)
    assert s.tau_summary()["tau_max_steps"] == 5


def test_server_amsgrad_step_by_hand(tmp_path):
    s = make_server(tmp_path, lr=0.1, server_optimizer="amsgrad")
    x = s.x.copy()
    g1, g2 = np.array([1.0, -2.0]), np.array([0.5, 0.0])
    apply_grad(s, g1, tau=0, worker=0)
    apply_grad(s, g2, tau=3, worker=1)  # APAM: only g is stale, the server state is current
    m = 0.1 * g1
    v = 0.001 * g1**2
    x1 = x - 0.1 * m / (np.sqrt(v) + 1e-8)
    m = 0.9 * m + 0.1 * g2
    v_new = 0.999 * v + 0.001 * g2**2
    v_hat = np.maximum(v, v_new)
    x2 = x1 - 0.1 * m / (np.sqrt(v_hat) + 1e-8)
    # the hand formula orders its operations differently from the optimizer: a few ulps
    np.testing.assert_allclose(s.x, x2, rtol=1e-12)


LONG_PS = ["--algorithm", "ps-async", "-n", "2", "--steps", "200000", "--log-interval-s", "0.05"]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("victim", "named"),
    [(2, "the parameter server exited with code -9"), (0, "node 0 exited with code -9")],
)
def test_dead_server_or_worker_stops_the_run(tmp_path, victim, named):
    # under --on-node-failure stop; with continue a dead ps-async worker is dropped (test_faults)
    import psutil

    proc = start_command(tmp_path, *LONG_PS, "--on-node-failure", "stop")
    try:
        pids = node_pids(proc, 3)
        wait_training(tmp_path)
        by_id = {}
        for pid in pids:
            cmd = psutil.Process(pid).cmdline()
            by_id[int(cmd[cmd.index("--node-id") + 1])] = pid
        psutil.Process(by_id[victim]).kill()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == 1
    assert named in err.decode() and "Traceback" not in err.decode()
    assert_gone(pids)


@pytest.mark.multiprocess
def test_dasgd_delay_rule_extension_drops_stale_deltas(tmp_path):
    from dasgd.config import TopologyConfig

    cfg = ps_config(
        tmp_path,
        algorithm="dasgd",
        topology=TopologyConfig("complete"),
        train=TrainConfig(steps=80, lr=0.05, batch_size=16, delay_rule="drop", delay_concurrency=1),
    )
    run_dir, summary = run(cfg, progress=False)
    finals = [read_events(run_dir / f"node-{i}.jsonl", "final")[0] for i in range(4)]
    assert all(f["delay_rule"] == "drop" for f in finals)
    dropped = sum(f["deltas_dropped"] for f in finals)
    assert summary["checks"]["exactly_once"]  # bookkeeping unchanged: every delta received once
    assert dropped > 0  # tau_C = 1: any delta with staleness > 1 is dropped
    assert summary["checks"]["consensus_distance_rel"] > 1e-9  # nodes dropped different deltas
    assert json.loads((run_dir / "config.json").read_text())["train"]["delay_rule"] == "drop"
    assert not math.isnan(summary["run"]["test_accuracy_mean"])
