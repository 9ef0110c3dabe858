"""Real node processes on loopback sockets: drain, oracle, failures, malformed input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest
import zmq

from dasgd.analysis.metrics import read_events
from dasgd.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TopologyConfig,
    TrainConfig,
    TransportConfig,
)
from dasgd.core import wire
from dasgd.runtime.launch import run

from .conftest import sequential_mlp_sgd, wait_for

pytestmark = pytest.mark.multiprocess


def config(tmp_path, **over):
    values = dict(
        n_nodes=4,
        topology=TopologyConfig("ring"),
        data=DataConfig("digits"),
        model=ModelConfig("softmax"),
        train=TrainConfig(steps=60, lr=0.05, batch_size=16),
        transport=TransportConfig(ready_timeout_s=60, drain_timeout_s=30, send_timeout_s=30),
        out_dir=str(tmp_path / "runs"),
        log_interval_s=0.05,
        timeout_s=120,
    )
    values.update(over)
    return RunConfig(**values)


def check_drained_run(run_dir, summary, n):
    checks = summary["checks"]
    assert checks["exactly_once"], checks
    assert checks["all_drained"], checks
    assert checks["consensus_distance_rel"] <= 1e-6
    assert checks["oracle_distance_rel"] <= 1e-6
    models = [np.load(run_dir / f"node-{i}.npy") for i in range(n)]
    x0 = np.load(run_dir / "x0.npy")
    reference = x0 + sum(np.load(run_dir / f"node-{i}.delta_sum.npy") for i in range(n))
    scale = np.linalg.norm(reference)
    for m in models:
        # equal up to floating-point summation order, relative to the model's norm
        assert np.linalg.norm(m - models[0]) <= 1e-6 * scale
        assert np.linalg.norm(m - reference) <= 1e-6 * scale
        assert np.linalg.norm(m - x0) > 1e-3 * scale  # it trained
    # every node applied every delta of every other node exactly once
    finals = [read_events(run_dir / f"node-{i}.jsonl", "final")[0] for i in range(n)]
    sealed = [f["deltas_sealed"] for f in finals]
    for i, f in enumerate(finals):
        expected = list(sealed)
        expected[i] = 0
        assert f["applied_deltas_per_origin"] == expected
        assert f["version_vector"] == [g["steps"] for g in finals]
    return finals


def test_ring_of_4_drains_to_equal_models(tmp_path):
    run_dir, summary = run(config(tmp_path), progress=False)
    finals = check_drained_run(run_dir, summary, 4)
    assert summary["run"]["steps"] == 4 * 60
    assert summary["run"]["staleness_apply_count"] == 3 * 4 * 60  # b = 1: every step is a delta
    assert summary["run"]["duplicates"] > 0  # flooding on a ring meets itself
    assert {e["src"] for e in summary["edges"] if e["dst"] == 0} == {1, 3}
    # logs: start, interval records over time with staleness, final
    kinds = [r["kind"] for r in read_events(run_dir / "node-0.jsonl")]
    assert kinds[0] == "start" and kinds[-1] == "final" and "interval" in kinds
    assert finals[0]["bytes_out"] > 0
    assert json.loads((run_dir / "summary.json").read_text())["checks"]["exactly_once"]
    assert json.loads((run_dir / "config.json").read_text())["n_nodes"] == 4


def test_sparse_8_node_graph_with_mlp_and_send_interval(tmp_path):
    cfg = config(
        tmp_path,
        n_nodes=8,
        topology=TopologyConfig("random-regular:3", seed=1),
        model=ModelConfig("mlp", hidden=(16,), dtype="float32"),
        train=TrainConfig(steps=40, lr=0.05, batch_size=16, send_every=3),
    )
    run_dir, summary = run(cfg, progress=False)
    finals = check_drained_run(run_dir, summary, 8)
    # 40 steps in windows of 3: 13 full windows + 1 partial window sealed at the end
    assert all(f["deltas_sealed"] == 14 for f in finals)


def test_tcp_transport_with_os_chosen_ports(tmp_path):
    cfg = config(
        tmp_path,
        n_nodes=3,
        topology=TopologyConfig("complete"),
        transport=TransportConfig(kind="tcp"),
    )
    run_dir, summary = run(cfg, progress=False)
    check_drained_run(run_dir, summary, 3)
    assert read_events(run_dir / "node-0.jsonl", "start")[0]["address"].startswith(
        "tcp://127.0.0.1:"
    )


def test_single_node_is_plain_sequential_sgd(tmp_path):
    cfg = config(
        tmp_path,
        n_nodes=1,
        model=ModelConfig("mlp", hidden=(8,)),
        train=TrainConfig(steps=50, lr=0.1, batch_size=8, seed=3),
    )
    run_dir, _ = run(cfg, progress=False)
    X = np.load(run_dir / "data" / "shard-0-X.npy")
    y = np.load(run_dir / "data" / "shard-0-y.npy")
    x = sequential_mlp_sgd(X, y, steps=50, lr=0.1, batch_size=8, seed=3, hidden=(8,))
    # exact by construction: with one node the runtime makes these same calls in the same
    # order on the same arrays (loss_and_grad, then x += -lr * g), in one BLAS thread
    np.testing.assert_array_equal(np.load(run_dir / "node-0.npy"), x)


# -- failures, through the real command ------------------------------------


def start_command(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dasgd",
            "run",
            "-q",
            "--out-dir",
            str(tmp_path / "runs"),
            "--run-id",
            "r",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # a shell's background job (`nohup ... &`, how CI may start pytest) inherits SIGINT
        # ignored, and Python then keeps ignoring it: give the launcher Ctrl-C as a terminal does
        preexec_fn=_default_sigint,
    )


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def node_pids(proc, n):
    def find():
        try:
            kids = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        return [k.pid for k in kids] if len(kids) == n else None

    return wait_for(find, 60, f"{n} node processes")


def wait_training(tmp_path, node=0):
    log = tmp_path / "runs" / "r" / f"node-{node}.jsonl"
    wait_for(lambda: log.exists() and read_events(log, "interval"), 60, "the first interval record")


def assert_gone(pids):
    def gone():
        return all(
            not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE
            for p in pids
        )

    wait_for(gone, 15, f"node processes {pids} to exit")


LONG = ["-n", "3", "--topology", "complete", "--steps", "200000", "--log-interval-s", "0.05"]
STOP = ["--on-node-failure", "stop"]


def test_killed_node_stops_the_run_and_is_named(tmp_path):
    proc = start_command(tmp_path, *LONG, *STOP)
    try:
        pids = node_pids(proc, 3)
        wait_training(tmp_path)
        victim = psutil.Process(pids[1])
        node_id = int(victim.cmdline()[victim.cmdline().index("--node-id") + 1])
        victim.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == 1
    err = err.decode()
    assert f"node {node_id} exited with code -9" in err and f"node-{node_id}.jsonl" in err
    assert "Traceback" not in err
    assert_gone(pids)


def test_ctrl_c_stops_every_node(tmp_path):
    proc = start_command(tmp_path, *LONG)
    try:
        pids = node_pids(proc, 3)
        wait_training(tmp_path)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # say where it waits
            proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack to stderr
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"dasgd run ignored Ctrl-C for 60 s; its stacks:\n{err.decode()[-4000:]}")
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == 130, err
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    assert_gone(pids)
    # logs were flushed on the way out
    assert read_events(tmp_path / "runs" / "r" / "node-0.jsonl", "interval")


def test_malformed_messages_are_counted_and_dropped(tmp_path):
    # link latency keeps node 1 draining for a while, whatever the machine's speed
    proc = start_command(
        tmp_path,
        "-n",
        "3",
        "--topology",
        "path",
        "--steps",
        "1500",
        "--log-interval-s",
        "0.05",
        "--latency",
        "0.3",
    )
    try:
        run_dir = tmp_path / "runs" / "r"
        wait_training(tmp_path, node=1)
        inbox = read_events(run_dir / "node-1.jsonl", "start")[0]["address"]
        n_params = read_events(run_dir / "node-1.jsonl", "start")[0]["n_params"]
        good = dict(
            v=wire.WIRE_VERSION,
            kind="delta",
            origin=0,
            sender=0,
            seq=10**6,
            steps=1,
            base_vv=b"\0" * 12,
            sender_vv=b"\0" * 12,
            dtype="float64",
            shape=[n_params],
        )
        nan = np.full(n_params, np.nan)
        bad_messages = [
            [b"\xc1 not msgpack"],
            [msgpack.packb({**good, "v": 99}), nan.tobytes()],
            [msgpack.packb(good), nan.tobytes()],  # NaN delta
            [
                msgpack.packb({**good, "sender": 1}),
                np.zeros(n_params).tobytes(),
            ],  # node 1 is not its own neighbour
            [msgpack.packb({**good, "shape": [n_params + 1]}), np.zeros(n_params + 1).tobytes()],
        ]
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(inbox)
        for frames in bad_messages:
            sock.send_multipart(frames)
        sock.close()
        ctx.term()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == 0, err.decode()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["nodes"][1]["malformed"] == 5
    assert summary["run"]["malformed"] == 5
    assert summary["checks"]["exactly_once"] and summary["checks"]["consensus_distance_rel"] <= 1e-6
    reasons = [r["reason"] for r in read_events(run_dir / "node-1.jsonl", "malformed")]
    assert (
        len(reasons) == 5
        and any("NaN" in r for r in reasons)
        and any("version" in r for r in reasons)
    )
    assert "exactly once at every node: yes" in out.decode()


def test_latency_and_straggler_runs_still_drain_to_equal_models(tmp_path):
    from dasgd.config import EmulationConfig

    cfg = config(
        tmp_path,
        n_nodes=4,
        topology=TopologyConfig("ring"),
        emulation=EmulationConfig(slowdown="1:3", latency="0.002,0-3:0.03"),
        train=TrainConfig(steps=40, lr=0.05, batch_size=16, send_every=2),
    )
    run_dir, summary = run(cfg, progress=False)
    check_drained_run(run_dir, summary, 4)
    emulation = summary["emulation"]
    assert emulation["slowdown_factors"] == [1.0, 3.0, 1.0, 1.0]
    # exact: the values parsed from the spec, stored as they are
    assert emulation["latency_s"]["0-3"] == emulation["latency_s"]["3-0"] == 0.03
    assert emulation["latency_s"]["1-2"] == 0.002
    finals = [read_events(run_dir / f"node-{i}.jsonl", "final")[0] for i in range(4)]
    assert finals[1]["slept_s"] > 0 and finals[0]["slept_s"] == 0


def test_large_deltas_take_the_zero_copy_path_and_drain(tmp_path):
    from dasgd.runtime.node import ZERO_COPY_BYTES

    cfg = config(
        tmp_path,
        n_nodes=3,
        model=ModelConfig("mlp", hidden=(128,)),  # 9,610 float64 parameters: 77 KB deltas
        train=TrainConfig(steps=30, lr=0.05, batch_size=16),
    )
    run_dir, summary = run(cfg, progress=False)
    assert summary["model"]["n_params"] * 8 > ZERO_COPY_BYTES
    check_drained_run(run_dir, summary, 3)


def test_lead_bound_makes_fast_nodes_wait_for_a_straggler(tmp_path):
    from dasgd.config import EmulationConfig

    cfg = config(
        tmp_path,
        n_nodes=3,
        topology=TopologyConfig("complete"),
        emulation=EmulationConfig(slowdown="2:8"),
        train=TrainConfig(steps=300, lr=0.05, batch_size=16, max_lead_steps=4),
    )
    run_dir, summary = run(cfg, progress=False)
    check_drained_run(run_dir, summary, 3)
    finals = [read_events(run_dir / f"node-{i}.jsonl", "final")[0] for i in range(3)]
    assert finals[0]["lead_waits"] > 0 and finals[1]["lead_waits"] > 0
    # with lead bound K on n = 3 nodes, apply staleness is at most 2K + (n - 2) 4K = 24
    # steps (without the bound this run measured S_max 81)
    assert summary["run"]["staleness_apply_max_steps"] <= 24


def test_stop_processes_reaps_the_whole_tree(tmp_path):
    from dasgd.runtime.launch import stop_processes

    # a child that starts a grandchild ignoring SIGTERM, then writes its pid and waits
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import pathlib, signal, subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', "
        "'import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        'open(sys.argv[1], "w").write("ready"); time.sleep(600)\', sys.argv[1] + \'.ready\'])\n'
        "pathlib.Path(sys.argv[1]).write_text(str(g.pid))\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(pid_file)])
    try:
        ready = pid_file.with_name(pid_file.name + ".ready")
        # the grandchild's handler is installed once it has written its file
        wait_for(lambda: pid_file.exists() and ready.exists(), 60, "the grandchild to start")
        grandchild = int(pid_file.read_text())
        assert psutil.Process(proc.pid).children(recursive=True)[0].pid == grandchild
        killed = stop_processes([proc], timeout_s=1.0)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if pid_file.exists() and pid_file.read_text():  # never leave the grandchild behind
            try:
                left = psutil.Process(int(pid_file.read_text()))
                if str(pid_file) in " ".join(left.cmdline()):  # not a reused pid
                    left.kill()
            except psutil.NoSuchProcess:
                pass
    assert proc.returncode is not None
    assert killed == []  # the child obeyed SIGTERM; only the grandchild needed SIGKILL
    assert_gone([grandchild])
