"""Node failures (``--on-node-failure``): the protocol and transport in one process, and kill -9
of real node processes through the ``dasgd run`` command.

The multi-process tests make runs long with emulated compute time (``--compute-time``), not
CPU work, so a kill lands mid-run however loaded the machine is; every wait has a deadline.
"""

import json
from pathlib import Path

import numpy as np
import psutil
import pytest

from dasgd.analysis.metrics import read_events
from dasgd.config import RunConfig
from dasgd.core import wire
from dasgd.core.node import DasgdNode
from dasgd.core.protocol import NodeProtocol, adjacency_sets
from dasgd.errors import ConfigError
from dasgd.ml.data import BatchSampler
from dasgd.ml.models import build_model
from dasgd.ml.optim import build_optimizer
from dasgd.runtime.launch import derive_fin, repair_links
from dasgd.runtime.transport import Transport
from dasgd.topology import neighbours, parse_topology

from .conftest import wait_for
from .test_multiprocess import start_command as multiprocess_command


def proto(node, nbrs, n, adjacency=None):
    return NodeProtocol(node, nbrs, n, 1, n_params=2, adjacency=adjacency)


# -- one process ---------------------------------------------------------------------------


def test_default_policy_is_continue_and_bad_policy_is_a_config_error():
    assert RunConfig().on_node_failure == "continue"
    with pytest.raises(ConfigError, match="--on-node-failure"):
        RunConfig(on_node_failure="ignore")


def test_failed_node_is_awaited_only_up_to_the_fin_the_launcher_derives():
    # path 0 - 1 - 2: node 2 dies before its fin; node 1 completes with the derived fin
    n0, n1 = proto(0, [1], 3), proto(1, [0, 2], 3)
    d2 = proto(2, [1], 3).local_step().header
    n1.receive(d2)
    (fin0,) = n0.finish()
    n1.receive(fin0.header)
    n1.finish()
    assert not n1.complete and n1.missing["fin_from"] == [2]
    n1.node_failed(2)
    assert n1.neighbours == (0,)
    assert n1.held(2) == {
        "deltas": 1,
        "contiguous": 1,
        "above": [],
        "steps": 1,
        "fin_deltas": None,
        "fin_steps": None,
    }
    assert not n1.complete  # until the launcher says how many of its deltas count
    n1.failed_fin(2, 1, 1)
    assert n1.complete
    out = n1.announce_complete()
    assert out.to == (0,)  # nothing more goes to the dead node
    n1.receive(out.header.replace_sender(0, n0.vv))  # a complete from node 0
    assert n1.can_stop  # no complete awaited from node 2
    n1.node_failed(2)  # idempotent
    with pytest.raises(ValueError, match="not a peer"):
        n1.node_failed(1)
    with pytest.raises(ValueError, match="refused"):
        n1.failed_fin(0, 1, 1)  # node 0 is alive


def test_a_neighbour_that_already_left_is_not_awaited():
    # node 1 between 0 and 2: node 2 (a repair neighbour, say) left before its complete reached
    # node 1; the launcher's `finished` tells node 1 not to wait for it
    n0, n1, n2 = proto(0, [1], 3), proto(1, [0, 2], 3), proto(2, [1], 3)
    for other in (n0, n2):
        (fin,) = other.finish()
        n1.receive(fin.header)
    n1.finish()
    assert n1.complete and n1.announce_complete().to == (0, 2)
    n1.receive(wire.Header("complete", 0, 0, 0, 0, np.zeros(0, np.int64), n0.vv))
    assert not n1.can_stop  # node 2's complete never came
    n1.neighbour_finished(2)
    assert n1.can_stop
    n1.neighbour_finished(2)  # idempotent
    n1.neighbour_finished(7)  # not a neighbour: ignored


def test_fin_of_a_failed_node_is_still_honoured():
    n0, n1 = proto(0, [1], 2), proto(1, [0], 2)
    d = n0.local_step().header
    (fin,) = n0.finish()
    n1.finish()
    n1.receive(fin.header)
    n1.node_failed(0)  # died after its fin: its announced delta is still awaited
    n1.failed_fin(0, 5, 5)  # and the fin it sent wins over a derived one
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


@pytest.mark.parametrize(
    ("spec", "dead", "added"),
    [("ring", 2, [[1, 3]]), ("topologies/barbell-8.json", 3, [[2, 4]]), ("complete", 0, [])],
)
def test_repair_links_keep_the_survivors_connected(spec, dead, added):
    import networkx as nx

    root = Path(__file__).resolve().parent.parent
    graph = parse_topology(str(root / spec) if spec.endswith(".json") else spec, 8)
    overlay = {k: set(neighbours(graph, k)) for k in graph}
    assert repair_links(overlay, dead) == added
    assert dead not in overlay and all(dead not in v for v in overlay.values())
    repaired = nx.Graph([(u, v) for u, vs in overlay.items() for v in vs])
    assert nx.is_connected(repaired) and repaired.number_of_nodes() == 7
    if spec == "ring":  # a ring stays a ring
        assert all(len(v) == 2 for v in overlay.values())


def test_derive_fin_takes_a_known_fin_or_the_longest_prefix():
    held = {"fin_deltas": None, "fin_steps": None}
    reports = [
        {**held, "deltas": 3, "contiguous": 3, "steps": 6},
        {**held, "deltas": 5, "contiguous": 4, "steps": 10},  # a gap at seq 4
    ]
    assert derive_fin(reports, 2) == (4, 8)  # 4 full windows of b = 2
    reports.append({**held, "deltas": 4, "contiguous": 4, "steps": 8})
    assert derive_fin(reports, 2) == (4, 8)
    reports.append({"deltas": 1, "contiguous": 1, "steps": 1, "fin_deltas": 6, "fin_steps": 11})
    assert derive_fin(reports, 2) == (6, 11)


def test_have_round_trips_on_the_wire():
    p = proto(1, [0, 2], 3)
    p.local_step()
    out = p.have(2, 0, answer=True)
    h = wire.decode_header(wire.encode_header(out.header), 3)
    assert (h.kind, h.origin, h.sender, h.seq, out.to) == ("have", 2, 1, 1, (0,))
    assert h.base_vv.tolist() == [0, 1, 0]  # its own entry: the deltas it sealed


def small_node(node_id, nbrs, n, store_bytes):
    model = build_model("softmax", 4, 2)
    rng = np.random.default_rng(node_id)
    return DasgdNode(
        node_id,
        nbrs,
        n,
        model=model,
        X=rng.normal(size=(10, 4)),
        y=rng.integers(0, 2, size=10),
        x0=model.init_params(seed=0),
        optimizer=build_optimizer("sgd", model.n_params, 0.1),
        sampler=BatchSampler(10, 2, seed=node_id),
        total_steps=5,
        send_every=1,
        delta_store_bytes=store_bytes,
    )


def delta_of(origin, seq, n, n_params, value):
    vv = np.zeros(n, np.int64)
    header = wire.Header("delta", origin, origin, seq, 1, vv, vv, "float64", (n_params,))
    return header, np.full(n_params, value)


@pytest.mark.parametrize("store_bytes", [1 << 20, 1])
def test_anti_entropy_sends_what_a_neighbour_lacks_from_the_store(store_bytes):
    # triangle 0-1-2 with node 2 dead: node 0 got its deltas 0 and 1, node 1 only delta 0
    a, b = small_node(0, [1, 2], 3, store_bytes), small_node(1, [0, 2], 3, store_bytes)
    d = a.n_params
    for seq in (0, 1):
        header, payload = delta_of(2, seq, 3, d, seq + 1.0)
        a.on_message(header, payload)
    header, payload = delta_of(2, 0, 3, d, 1.0)
    b.on_message(header, payload)
    (ask,) = b.node_failed(2)  # b knows first: asks a
    assert ask.to == (0,) and ask.header.seq == 0
    out = a.on_message(wire.decode_header(wire.encode_header(ask.header), 3), None)
    # a learns the failure from the have, asks b in turn, sends what b lacks, answers
    kinds = [(o.header.kind, o.header.origin, o.header.seq, o.to) for o in out]
    assert kinds[0] == ("have", 2, 0, (1,))
    assert kinds[-1] == ("have", 2, 1, (1,))
    pushed = [o for o in out if o.header.kind == "delta"]
    if store_bytes > 1:
        assert [(o.header.origin, o.header.seq) for o in pushed] == [(2, 1)]
        b.on_message(pushed[0].header, np.array(pushed[0].payload))
        np.testing.assert_allclose(b.params, a.params)
        assert a.store_misses == 0
    else:  # nothing fits in the store: the miss is counted, not hidden
        assert pushed == [] and a.store_misses == 1
    assert b.on_message(out[-1].header, None) == []  # an answer is not answered


def test_the_store_keeps_the_newest_deltas_and_reuses_evicted_buffers():
    a = small_node(0, [1, 2], 3, 0)
    d = a.n_params
    a.delta_store_bytes = 2 * (d * 8 + 3 * 8)  # room for two deltas
    for seq in range(3):
        header, payload = delta_of(2, seq, 3, d, seq + 1.0)
        a.on_message(header, payload)
    first = a._store[(2, 1)][2]
    assert list(a._store) == [(2, 1), (2, 2)]
    header, payload = delta_of(2, 3, 3, d, 9.0)
    a.on_message(header, payload)
    assert list(a._store) == [(2, 2), (2, 3)]
    assert a._store[(2, 3)][2] is first  # the evicted buffer, overwritten
    np.testing.assert_array_equal(a._store[(2, 3)][2], np.full(d, 9.0))
    np.testing.assert_array_equal(a._store[(2, 2)][2], np.full(d, 3.0))


# -- real processes ------------------------------------------------------------------------

mp = pytest.mark.multiprocess


def start_command(tmp_path, *args):
    """``dasgd run`` as tests/test_multiprocess.py starts it, with fast logs and a deadline."""
    return multiprocess_command(
        tmp_path, "--log-interval-s", "0.05", "--eval-interval-s", "0", "--timeout-s", "300", *args
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
    summary = check_survivors(tmp_path, out, 5, 2)
    changes = (tmp_path / "runs" / "r" / "topology-changes.jsonl").read_text().splitlines()
    assert [json.loads(c)["added_edges"] for c in changes] == [[[1, 3]]]  # still a ring
    assert summary["nodes"][2]["fin"]["reports"] == 4


@mp
def test_barbell_survives_its_bridge_node_dying(tmp_path):
    # without the repair link 2-4 the cliques {0,1,2} and {4,5,6,7} would lose each other
    topology = str(Path(__file__).resolve().parent.parent / "topologies" / "barbell-8.json")
    proc = start_command(
        tmp_path, "--topology", topology, "--steps", "400", "--compute-time", "0.02"
    )
    kill_when_stepping(tmp_path, proc, 3, 8)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    summary = check_survivors(tmp_path, out, 8, 3)
    assert summary["nodes"][3]["added_edges"] == [[2, 4]]
    run_dir = tmp_path / "runs" / "r"
    assert read_events(run_dir / "node-2.jsonl", "node_failed")[0]["links"] == [4]
    # the halves exchanged what each had sealed before the link came up
    assert (
        sum(read_events(run_dir / f"node-{i}.jsonl", "final")[0]["deltas_pushed"] for i in (2, 4))
        > 0
    )


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


@mp
def test_a_store_too_small_to_repair_is_reported_not_hidden(tmp_path):
    # no store: deltas that crossed the bridge only through node 3 cannot be resent over 2-4
    topology = str(Path(__file__).resolve().parent.parent / "topologies" / "barbell-8.json")
    proc = start_command(
        tmp_path,
        "--topology",
        topology,
        "--steps",
        "300",
        "--compute-time",
        "0.01",
        "--delta-store-mib",
        "0",
        "--drain-timeout-s",
        "5",
    )
    kill_when_stepping(tmp_path, proc, 3, 8)
    out, err = finish(proc)
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    checks = summary["checks"]
    if checks["delta_store_misses"] == 0:  # nothing was sealed while the link was down
        assert proc.returncode == 0 and checks["exactly_once"], err
        return
    assert "the delta store was too small to repair" in out
    if checks["exactly_once"]:  # the survivors still met over other paths
        assert proc.returncode == 0 and checks["consensus_distance_rel"] <= 1e-6
    else:  # the drain waited in vain and the run says so
        assert proc.returncode == 1 and "stopped draining" in err
