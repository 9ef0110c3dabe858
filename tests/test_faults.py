"""Node failures (``--on-node-failure``): the protocol and transport in one process, and kill -9
of real node processes through the ``dasgd run`` command.

The multi-process tests make runs long with emulated compute time (``--compute-time``), not
CPU work, so a kill lands mid-run however loaded the machine is; every wait has a deadline.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from dasgd.analysis.metrics import read_events
from dasgd.config import RunConfig
from dasgd.core.protocol import NodeProtocol, adjacency_sets
from dasgd.errors import ConfigError
from dasgd.runtime.transport import Transport
from dasgd.topology import neighbours, parse_topology

from .conftest import wait_for


def proto(node, nbrs, n, adjacency=None):
    return NodeProtocol(node, nbrs, n, 1, n_params=2, adjacency=adjacency)


# -- one process ---------------------------------------------------------------------------


def test_default_policy_is_continue_and_bad_policy_is_a_config_error():
    assert RunConfig().on_node_failure == "continue"
    with pytest.raises(ConfigError, match="--on-node-failure"):
        RunConfig(on_node_failure="ignore")


def test_failed_node_without_fin_is_not_awaited_by_the_drain():
    # path 0 - 1 - 2: node 2 dies before its fin; node 1 completes and stops without it
    n0, n1 = proto(0, [1], 3), proto(1, [0, 2], 3)
    d2 = proto(2, [1], 3).local_step().header
    n1.receive(d2)
    (fin0,) = n0.finish()
    n1.receive(fin0.header)
    n1.finish()
    assert not n1.complete and n1.missing["fin_from"] == [2]
    n1.node_failed(2)
    assert n1.neighbours == (0,) and n1.missing["fin_from"] == []
    assert n1.complete
    out = n1.announce_complete()
    assert out.to == (0,)  # nothing more goes to the dead node
    n1.receive(out.header.replace_sender(0, n0.vv))  # a complete from node 0
    assert n1.can_stop  # no complete awaited from node 2
    n1.node_failed(2)  # idempotent
    with pytest.raises(ValueError, match="not a peer"):
        n1.node_failed(1)


def test_fin_of_a_failed_node_is_still_honoured():
    n0, n1 = proto(0, [1], 2), proto(1, [0], 2)
    d = n0.local_step().header
    (fin,) = n0.finish()
    n1.finish()
    n1.receive(fin.header)
    n1.node_failed(0)  # died after its fin: its announced delta is still awaited
    assert not n1.complete and n1.missing["deltas_from"] == [0]
    n1.receive(d)
    assert n1.complete


def test_deltas_of_a_failed_origin_are_relayed_without_pruning():
    # ring 0-1-2-3-4: node 4 relays origin 2's delta to 3 only once it knows 2 is dead
    graph = parse_topology("ring", 5)
    adjacency = adjacency_sets({k: neighbours(graph, k) for k in graph})
    origin = proto(2, neighbours(graph, 2), 5, adjacency)
    d = origin.local_step().header
    n0 = proto(0, neighbours(graph, 0), 5, adjacency)
    _, fwd = n0.receive(d.replace_sender(1, d.sender_vv))
    n4 = proto(4, neighbours(graph, 4), 5, adjacency)
    _, pruned = n4.receive(fwd.header.replace_sender(0, fwd.header.sender_vv))
    assert pruned is None  # 3 is a neighbour of the origin: the origin sends it itself
    n4b = proto(4, neighbours(graph, 4), 5, adjacency)
    n4b.node_failed(2)
    _, relay = n4b.receive(fwd.header.replace_sender(0, fwd.header.sender_vv))
    assert relay.to == (3,)


def test_transport_drops_a_disconnected_neighbour_without_blocking(tmp_path):
    with Transport(0, f"ipc://{tmp_path}/a", hwm_msgs=2) as a:
        # node 1 never binds: a dead neighbour whose queue fills at once
        a.connect({1: f"ipc://{tmp_path}/nobody"})
        for _ in range(5):
            a.send(1, [b"x"])
        assert a.backlog_msgs > 0
        assert a.disconnect(1) == a.msgs_to_failed > 0
        a.send(1, [b"y"])
        assert a.backlog_msgs == 0 and not a.has_pending
        assert a.disconnect(1) == 0


# -- real processes ------------------------------------------------------------------------

mp = pytest.mark.multiprocess


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
            "--log-interval-s",
            "0.05",
            "--eval-interval-s",
            "0",
            "--timeout-s",
            "300",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def kill_when_stepping(tmp_path, proc, node, n_procs, step=10, log_name=None):
    """SIGKILL the process of ``node`` once its log shows ``step`` steps; returns its pid."""

    def find():
        try:
            kids = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            return None
        for kid in kids:
            try:
                cmd = kid.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "--node-id" in cmd and cmd[cmd.index("--node-id") + 1] == str(node):
                return kid if len(kids) == n_procs else None
        return None

    victim = wait_for(find, 60, f"the process of node {node}")
    log = tmp_path / "runs" / "r" / (log_name or f"node-{node}.jsonl")

    def stepping():
        return log.exists() and any(r["step"] >= step for r in read_events(log, "interval"))

    wait_for(stepping, 60, f"node {node} to log step {step}")
    victim.kill()
    return victim.pid


def finish(proc, timeout_s=240):
    try:
        out, err = proc.communicate(timeout=timeout_s)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    return out.decode(), err.decode()


def check_survivors(tmp_path, out, n, dead):
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    checks = summary["checks"]
    assert summary["run"]["failed_nodes"] == [dead]
    assert checks["survivors"] == n - 1
    assert checks["exactly_once"], checks
    assert checks["all_drained"], checks
    assert checks["consensus_distance_rel"] <= 1e-6
    entry = summary["nodes"][dead]
    assert entry["failed"] and entry["exit_code"] == -9
    assert entry["deltas_held_by_survivors_min"] == entry["deltas_held_by_survivors_max"] > 0
    assert entry["steps_lost"] > 0 and entry["detected_t_s"] > 0
    run_dir = tmp_path / "runs" / "r"
    models = [np.load(run_dir / f"node-{i}.npy") for i in range(n) if i != dead]
    scale = np.linalg.norm(models[0])
    for m in models:
        assert np.linalg.norm(m - models[0]) <= 1e-6 * scale
    assert f"node {dead} failed" in out and f"{dead}* FAILED (exit code -9)" in out
    for i in range(n):
        if i != dead:
            assert read_events(run_dir / f"node-{i}.jsonl", "node_failed")[0]["failed_node"] == dead
    return summary


@mp
def test_ring_survives_a_killed_node(tmp_path):
    proc = start_command(
        tmp_path, "-n", "5", "--topology", "ring", "--steps", "400", "--compute-time", "0.02"
    )
    kill_when_stepping(tmp_path, proc, 2, 5)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    check_survivors(tmp_path, out, 5, 2)


@mp
def test_stop_policy_still_fails_the_run_naming_the_node(tmp_path):
    proc = start_command(
        tmp_path,
        "-n",
        "4",
        "--topology",
        "ring",
        "--steps",
        "100000",
        "--compute-time",
        "0.02",
        "--on-node-failure",
        "stop",
    )
    kill_when_stepping(tmp_path, proc, 1, 4)
    _, err = finish(proc)
    assert proc.returncode == 1
    assert "node 1 exited with code -9" in err and "Traceback" not in err


@mp
def test_ps_async_drops_a_dead_worker_and_names_it(tmp_path):
    proc = start_command(
        tmp_path, "-n", "3", "--algorithm", "ps-async", "--steps", "200", "--compute-time", "0.02"
    )
    kill_when_stepping(tmp_path, proc, 1, 4)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["run"]["failed_nodes"] == [1]
    assert summary["checks"]["budget_used"]
    assert summary["nodes"][1]["failed"] and summary["nodes"][1]["gradients_applied"] > 0
    assert "worker 1 failed" in out


@mp
def test_dead_ps_server_ends_the_run(tmp_path):
    proc = start_command(
        tmp_path,
        "-n",
        "2",
        "--algorithm",
        "ps-async",
        "--steps",
        "100000",
        "--compute-time",
        "0.02",
    )
    kill_when_stepping(tmp_path, proc, 2, 3, step=5, log_name="server.jsonl")  # node n
    _, err = finish(proc)
    assert proc.returncode == 1
    assert "the parameter server exited with code -9" in err and "Traceback" not in err
