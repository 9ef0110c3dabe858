"""Restart with state transfer (``--on-node-failure restart``) and hung-node detection (issue 10)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from dasgd.analysis.metrics import read_events
from dasgd.core import wire
from dasgd.errors import WireError

from .conftest import wait_for
from .test_faults import delta_of, finish, kill_when_stepping, small_node, start_command


def roundtrip(out, n):
    """An Outgoing as the receiver decodes it (header through msgpack, payload copied)."""
    header = wire.decode_header(wire.encode_header(out.header), n)
    payload = None if out.payload is None else np.array(out.payload)
    return header, payload


def test_state_transfer_gives_the_donor_model_less_its_open_window():
    n = 4
    donor, joiner = small_node(0, [1, 2, 3], n, 1 << 20), small_node(1, [0, 3], n, 1 << 20)
    d = donor.n_params
    # the donor holds node 1's deltas 0..1, node 2's deltas 0 and (out of order) 2, node 3's fin
    for origin, seq, value in ((1, 0, 1.0), (1, 1, 2.0), (2, 0, 3.0), (2, 2, 4.0)):
        donor.on_message(*delta_of(origin, seq, n, d, value))
    fin = wire.Header("fin", 3, 2, 0, 0, np.zeros(0, np.int64), np.zeros(n, np.int64))
    donor.on_message(fin, None)
    donor.total_steps = 100
    for t in range(3):  # b = 1 in small_node: each step seals; then open a window by hand
        donor.advance(float(t))
    donor.protocol.send_every = 4  # the next steps stay in the open window
    donor.advance(3.0)
    assert donor.protocol.window_steps == 1
    sealed = donor.protocol.deltas_sealed

    joiner.protocol.add_neighbour(2)  # repair link beside its original neighbours
    (join,) = joiner.join(0, 2)
    assert join.to == (0,) and join.header.kind == "join" and join.header.seq == 2
    # a delta that arrives before the state is held back, then handled
    early, early_payload = delta_of(2, 3, n, d, 5.0)
    early = early.replace_sender(3, np.zeros(n, np.int64))
    assert joiner.on_message(early, early_payload) == ()
    sends, wait = joiner.advance(0.0)
    assert wait == "state" and sends == ()

    (state,) = donor.on_message(*roundtrip(join, n))
    assert state.header.kind == "state" and state.to == (1,)
    header, payload = roundtrip(state, n)
    out = joiner.on_message(header, payload)
    np.testing.assert_allclose(joiner.params, donor.params - donor.open_delta + early_payload)
    expected_vv = donor.protocol.vv.copy()
    expected_vv[0] -= 1  # the open window's step travels later, in its sealed delta
    expected_vv[2] += 1  # the delta held back, handled after the state
    assert joiner.protocol.vv.tolist() == expected_vv.tolist()
    assert joiner.step == 2 and joiner.protocol.deltas_sealed == 2  # continues its own stream
    assert joiner.protocol.applied_deltas.tolist() == [sealed, 0, 3, 0]
    assert joiner.protocol._fin_deltas[3] == 0  # the fin the donor knew
    assert joiner.protocol.is_new_delta(delta_of(2, 1, n, d, 0.0)[0])  # the gap stays open
    assert not joiner.protocol.is_new_delta(delta_of(2, 2, n, d, 0.0)[0])
    assert {k: joiner.restored[k] for k in ("donor", "deltas", "steps")} == {
        "donor": 0,
        "deltas": 2,
        "steps": 2,
    }
    # the state as installed, before the held-back delta
    assert joiner.restored["version_vector"] == (expected_vv - [0, 0, 1, 0]).tolist()
    kinds = sorted((o.header.kind, o.to) for o in out)
    assert ("have", (0,)) in kinds and ("have", (2,)) in kinds and ("have", (3,)) in kinds
    # the joiner's have makes the donor push stored deltas it lacks and the fins it knows
    have = next(o for o in out if o.to == (0,) and o.header.kind == "have")
    pushed = donor.on_message(*roundtrip(have, n))
    assert ("fin", 3) in [(o.header.kind, o.header.origin) for o in pushed]
    assert all(o.to == (1,) for o in pushed)
    # its next delta continues its sequence
    joiner.total_steps = 10
    sends, _ = joiner.advance(10.0)
    assert [(o.header.kind, o.header.seq) for o in sends] == [("delta", 2)]


def test_the_donor_answers_only_once_it_holds_the_joiners_earlier_deltas():
    n = 3
    donor, joiner = small_node(0, [1, 2], n, 1 << 20), small_node(1, [0, 2], n, 1 << 20)
    d = donor.n_params
    donor.on_message(*delta_of(1, 0, n, d, 1.0))
    (join,) = joiner.join(0, 2)
    assert not donor.on_message(*roundtrip(join, n))  # holds 1 of the 2
    relayed, payload = delta_of(1, 1, n, d, 2.0)
    relayed = relayed.replace_sender(2, np.zeros(n, np.int64))
    out = donor.on_message(relayed, payload)
    assert [o.header.kind for o in out] == ["state"]
    header, payload = roundtrip(out[0], n)
    joiner.on_message(header, payload)
    assert joiner.protocol.deltas_sealed == 2 and joiner.step == 2


def test_a_joiner_whose_donor_dies_asks_another_neighbour():
    joiner = small_node(1, [0, 2], 3, 1 << 20)
    joiner.join(0, 0)
    (again,) = joiner.node_failed(0)
    assert (again.header.kind, again.to) == ("join", (2,))
    assert joiner.node_failed(2) == []  # no neighbour left to ask: the deadline ends it


def test_a_join_from_a_stranger_and_a_malformed_state_are_refused():
    n = 3
    donor = small_node(0, [1], n, 0)
    stranger = wire.Header("join", 2, 2, 0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64))
    with pytest.raises(WireError, match="not a neighbour"):
        donor.on_message(stranger, None)
    joiner = small_node(1, [0], n, 0)
    (join,) = joiner.join(0, 0)
    (state,) = donor.on_message(*roundtrip(join, n))
    raw = wire.encode_header(state.header)
    import msgpack

    body = msgpack.unpackb(raw)
    for bad in ({"applied": b"x"}, {"above": [[9, [1]]]}, {"failed": [7]}, {"above": "x"}):
        broken = dict(body, extra=dict(body["extra"], **bad))
        with pytest.raises(WireError):
            wire.decode_header(msgpack.packb(broken, use_bin_type=True), n)
    with pytest.raises(WireError, match="did not ask"):
        donor.on_message(*roundtrip(state, n))


# -- real processes ------------------------------------------------------------------------

mp = pytest.mark.multiprocess


def summary_of(tmp_path):
    return json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())


def check_all_equal(tmp_path, n, restarted):
    summary = summary_of(tmp_path)
    checks = summary["checks"]
    assert summary["run"]["failed_nodes"] == []
    assert summary["run"]["restarted_nodes"] == restarted
    assert checks["exactly_once"] and checks["all_drained"], checks
    assert checks["consensus_distance_rel"] <= 1e-6
    assert checks["oracle_distance_rel"] is None  # the first process's delta sum died with it
    run_dir = tmp_path / "runs" / "r"
    models = [np.load(run_dir / f"node-{i}.npy") for i in range(n)]
    for m in models:
        assert np.linalg.norm(m - models[0]) <= 1e-6 * np.linalg.norm(models[0])
    return summary


@mp
def test_a_killed_node_is_restarted_and_ends_equal_to_the_others(tmp_path):
    proc = start_command(
        tmp_path,
        "-n",
        "5",
        "--topology",
        "ring",
        "--steps",
        "400",
        "--compute-time",
        "0.02",
        "--on-node-failure",
        "restart",
    )
    kill_when_stepping(tmp_path, proc, 2, 5)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    summary = check_all_equal(tmp_path, 5, [2])
    (record,) = summary["run"]["restarts"]
    assert record["node"] == 2 and record["exit_code"] == -9 and record["incarnation"] == 1
    assert record["donor"] in (1, 3) and record["steps_held"] > 0
    assert summary["nodes"][2]["steps"] == 400  # its remaining steps, not all 400 again
    run_dir = tmp_path / "runs" / "r"
    (installed,) = read_events(run_dir / "node-2.jsonl", "state_installed")
    assert installed["steps"] == record["steps_held"] and installed["donor"] == record["donor"]
    changes = [json.loads(c) for c in (run_dir / "topology-changes.jsonl").read_text().splitlines()]
    assert changes[-1]["rejoined_node"] == 2
    assert "2r restarted (restart 1)" in out
    # the analysis rebuilds the restarted node's history: no gradient in a model before it finished
    analysis = json.loads((run_dir / "analysis.json").read_text())
    assert analysis["staleness"]["virtual"]["negative_count"] == 0
    assert analysis["staleness"]["pairwise"]["max_steps"] < 400 * 5


@mp
def test_a_node_restarted_twice_then_dropped_after_max_restarts(tmp_path):
    proc = start_command(
        tmp_path,
        "-n",
        "4",
        "--topology",
        "ring",
        "--steps",
        "600",
        "--compute-time",
        "0.01",
        "--on-node-failure",
        "restart",
        "--max-restarts",
        "1",
    )
    log = tmp_path / "runs" / "r" / "node-1.jsonl"
    kill_when_stepping(tmp_path, proc, 1, 4)
    wait_for(lambda: read_events(log, "state_installed"), 90, "node 1's restart")
    steps = read_events(log, "state_installed")[0]["step"]
    kill_when_stepping(tmp_path, proc, 1, 4, step=steps + 20)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    summary = summary_of(tmp_path)
    assert summary["run"]["failed_nodes"] == [1]  # the second death: as continue
    assert [r["node"] for r in summary["run"]["restarts"]] == [1]
    assert summary["checks"]["exactly_once"] and summary["checks"]["consensus_distance_rel"] <= 1e-6


@mp
@pytest.mark.parametrize("policy", ["restart", "stop"])
def test_a_hung_node_is_detected_by_its_missing_heartbeats(tmp_path, policy):
    import psutil

    proc = start_command(
        tmp_path,
        "-n",
        "4",
        "--topology",
        "ring",
        "--steps",
        "400",
        "--compute-time",
        "0.02",
        "--on-node-failure",
        policy,
        "--heartbeat-timeout-s",
        "2",
    )
    log = tmp_path / "runs" / "r" / "node-3.jsonl"

    def node3():
        for kid in psutil.Process(proc.pid).children():
            cmd = kid.cmdline()
            if "--node-id" in cmd and cmd[cmd.index("--node-id") + 1] == "3":
                return kid
        return None

    victim = wait_for(node3, 60, "node 3's process")
    wait_for(lambda: log.exists() and read_events(log, "interval"), 60, "node 3 to step")
    victim.send_signal(signal.SIGSTOP)
    out, err = finish(proc)
    if policy == "stop":
        assert proc.returncode == 1
        assert "node 3 sent nothing for" in err and "--heartbeat-timeout-s 2" in err
        return
    assert proc.returncode == 0, err
    summary = check_all_equal(tmp_path, 4, [3])
    (record,) = summary["run"]["restarts"]
    assert record["hung_s"] >= 2
    assert "without a heartbeat" in out


def test_the_analysis_drops_lost_gradients_and_imputes_unlogged_ones():
    from dasgd.analysis.events import GRADIENT_DTYPE
    from dasgd.analysis.staleness import settle_dead_gradients, version_vectors

    # node 0 logged steps 1..3, died at t = 1.0 with 5 steps out (4, 5 unlogged) and step 6
    # never sent; restarted at 2.0 from a state holding 5 of its steps, then logged 6, 7
    rows = [(0, k, 0.1 * k, 0.1 * k, k - 1, -1) for k in (1, 2, 3)]
    rows += [(0, 6, 0.95, 0.96, 5, -1)]  # logged, then lost with the process
    rows += [(0, 6, 2.1, 2.2, 9, -1), (0, 7, 2.2, 2.3, 10, -1), (1, 1, 0.5, 0.5, 0, -1)]
    gradients = np.array(rows, dtype=GRADIENT_DTYPE)
    dead = [{"node": 0, "t_s": 1.0, "steps": 5, "resumed_t_s": 2.0, "version_vector": [5, 4]}]
    out, dropped, imputed = settle_dead_gradients(gradients, dead)
    assert (dropped, imputed) == (1, 2)
    mine = out[out["node"] == 0]
    assert mine["step"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert (mine["model_gradients"][3:5] == -1).all()
    assert 0.3 < mine["t_end_s"][3] < mine["t_end_s"][4] < 1.0
    applies = np.zeros(
        0, dtype=[("node", "<i4"), ("origin", "<i4"), ("steps", "<i4"), ("t_s", "<f8")]
    )
    V = version_vectors(out, applies, [0], 2, np.array([0.5, 1.5, 2.5]), {0: [(2.0, [5, 4])]})
    assert V[:, 0, :].tolist() == [[3, 0], [5, 0], [7, 4]]  # own steps; the state's vector after


def test_a_repair_link_to_a_node_that_died_meanwhile_is_not_made():
    # ring 0-1-2-3: 0 and 1 die at once; node 3 hears of 1 first (a neighbour's have),
    # then the launcher's news of 0 with the repair link 1-3
    node = small_node(3, [0, 2], 4, 1 << 20)
    node.node_failed(1)
    node.node_failed(0, links=[1])
    assert node.protocol.neighbours == (2,)


def test_a_gap_left_by_a_second_death_is_counted_lost_not_awaited():
    from dasgd.core.failures import lost_deltas
    from dasgd.core.protocol import NodeProtocol

    # node 0 died; its delta 2 reached only a node that died too; node 1 holds 0, 1 and 3
    reports = [
        {"node": 1, "contiguous": 2, "above": [3], "deltas": 3},
        {"node": 4, "contiguous": 1, "above": [], "deltas": 1},
    ]
    assert lost_deltas(reports) == (4, [2])
    assert lost_deltas([{"contiguous": 3, "above": []}]) == (3, [])
    p = NodeProtocol(1, [2], 3, 1, n_params=2)
    zero = np.zeros(3, np.int64)
    for seq in (0, 1, 3):
        p.receive(wire.Header("delta", 0, 2, seq, 1, zero, zero, "float64", (2,)))
    p.node_failed(0)
    with pytest.raises(ValueError):
        p.failed_fin(0, 4, 4, lost=[4])  # not below the deltas
    p.failed_fin(0, 4, 4, lost=[2])
    p.receive(wire.Header("fin", 2, 2, 0, 0, np.zeros(0, np.int64), zero))
    p.finish()
    assert p.complete  # 3 of node 0's 4 deltas, 3 of its 4 steps
    with pytest.raises(WireError, match="beyond"):
        p.receive(wire.Header("delta", 0, 2, 4, 1, zero, zero, "float64", (2,)))


# -- the coordinator (one machine's launcher or host 0's rendezvous) -----------------------


def coordinator(tmp_path, **config):
    from dasgd.config import RunConfig
    from dasgd.runtime.coordinator import FailureCoordinator

    cfg = RunConfig(n_nodes=4, on_node_failure="restart", **config)
    ring = {0: {1, 3}, 1: {0, 2}, 2: {1, 3}, 3: {0, 2}}
    addresses = {i: f"ipc://node-{i}" for i in range(4)}
    return FailureCoordinator(cfg, tmp_path, ring, 0.0, addresses)


def held(node, failed, contiguous, above=()):
    return {
        "node": node,
        "failed": failed,
        "contiguous": contiguous,
        "deltas": contiguous + len(above),
        "steps": contiguous + len(above),
        "above": list(above),
        "fin_deltas": None,
        "fin_steps": None,
    }


def test_a_restart_that_dies_before_it_is_linked_back_keeps_what_the_survivors_hold(tmp_path):
    c = coordinator(tmp_path, max_restarts=1)
    record = {"node": 2, "exit_code": -9, "last_step": 7, "planned_steps": 50}
    (notify,) = c.handle({"event": "node_down", "node": 2, "record": record})
    assert notify["message"]["kind"] == "failed" and sorted(notify["to"]) == [0, 1, 3]
    for j in (0, 1, 3):
        c.handle({"event": "held", "report": held(j, 2, 5 if j == 1 else 4)})
    assert c.tick() == [{"do": "spawn", "node": 2}]
    # the new process dies before its ready: no report is asked, its fin is the survivors' 5
    actions = c.handle({"event": "node_down", "node": 2, "record": record})
    fin = [a["message"] for a in actions if a["do"] == "notify"]
    assert fin == [{"kind": "fin_of", "node": 2, "deltas": 5, "steps": 5, "lost": []}]
    assert {"do": "settled", "node": 2} in actions
    assert c.handle({"event": "node_down", "node": 2, "record": record}) == [
        {"do": "settled", "node": 2}
    ]


def test_the_coordinator_refuses_malformed_events(tmp_path):
    c = coordinator(tmp_path)
    c.handle({"event": "node_down", "node": 2, "record": {"node": 2, "last_step": 1}})
    for bad in (
        {"event": "held", "report": {"node": 0, "failed": 2}},
        {"event": "held", "report": held(0, 2, 1, above=["x"])},
        {"event": "node_down", "node": 9, "record": {}},
        {"event": "node_down", "node": 1, "record": {"last_step": "7"}},
        {"event": "ready", "node": 1},
        {"event": "nonsense", "node": 1},
    ):
        with pytest.raises((ValueError, TypeError, KeyError)):
            c.handle(bad)
    assert 2 in c.awaiting and not c.awaiting[2]["reports"]  # nothing half-recorded


def test_a_restart_with_nobody_left_is_killed_not_a_crash(tmp_path):
    c = coordinator(tmp_path)
    c.handle({"event": "node_down", "node": 2, "record": {"node": 2, "last_step": 1}})
    for j in (0, 1, 3):
        c.handle({"event": "held", "report": held(j, 2, 1)})
    assert c.tick() == [{"do": "spawn", "node": 2}]
    for j in (0, 1, 3):
        c.handle({"event": "exited", "node": j})
    actions = c.handle({"event": "ready", "node": 2, "address": "ipc://node-2b"})
    assert [a["do"] for a in actions] == ["kill"]


def test_a_lost_host_comes_back_for_its_unsettled_nodes_only(tmp_path):
    c = coordinator(tmp_path)
    c.host_of = lambda node: node // 2
    c.handle({"event": "node_down", "node": 3, "record": {"node": 3, "last_step": 1}})
    for j in (0, 1, 2):  # it had sent its fin: nothing to redo, it is settled
        c.handle({"event": "held", "report": held(j, 3, 1) | {"fin_deltas": 1, "fin_steps": 1}})
    assert [a["message"]["kind"] for a in c.tick() if a["do"] == "notify"] == ["fin_of"]
    c.host_lost(1, [2, 3], "silent")
    for j in (0, 1):
        c.handle({"event": "held", "report": held(j, 2, 2)})
    c.tick()
    assert c.can_return(1) and c.host_back(1) == [2]
    assert c.node_ready(2, "tcp://h1:2") == []  # ready before its restart was decided
    actions = c.tick()  # the restart: linked back at once, its start to its host
    assert [a["do"] for a in actions] == ["notify", "send"] and 2 not in c.failures
    assert actions[1]["message"]["restart"]["deltas"] == 2


def test_a_have_or_join_that_overtakes_the_news_of_a_restart_is_answered_after_it():
    n = 3
    survivor = small_node(0, [1, 2], n, 1 << 20)
    d = survivor.n_params
    survivor.on_message(*delta_of(2, 0, n, d, 1.0))
    survivor.node_failed(1)
    joiner = small_node(1, [0, 2], n, 0)
    (join,) = joiner.join(0, 0)
    assert not survivor.on_message(*roundtrip(join, n))  # 1 is still dead here: deferred
    early_have = joiner.protocol.have(1, 0, answer=True)
    assert not survivor.on_message(*roundtrip(early_have, n))
    out = survivor.node_rejoined(1, link=True)
    kinds = sorted(o.header.kind for o in out)
    assert "state" in kinds and "delta" in kinds  # the state, and the stored delta it lacks


def test_a_state_the_joiner_cannot_take_is_dropped_and_it_keeps_waiting():
    n = 3
    donor, joiner = small_node(0, [1], n, 0), small_node(1, [0], n, 0)
    (join,) = joiner.join(0, 0)
    (state,) = donor.on_message(*roundtrip(join, n))
    header, payload = roundtrip(state, n)
    bad = wire.Header(
        header.kind,
        header.origin,
        header.sender,
        header.seq,
        header.steps,
        header.base_vv,
        header.sender_vv,
        header.dtype,
        header.shape,
        dict(header.extra, above={1: [4]}),  # claims the joiner's own deltas beyond a gap
    )
    with pytest.raises(WireError, match="state from node 0"):
        joiner.on_message(bad, payload)
    assert joiner.phase == "joining" and joiner.protocol.vv_total == 0
    joiner.on_message(header, payload)
    assert joiner.phase == "ready"


def test_version_vectors_follow_every_restart_of_a_node():
    from dasgd.analysis.events import APPLY_DTYPE, GRADIENT_DTYPE
    from dasgd.analysis.staleness import version_vectors

    applies = np.zeros(3, dtype=APPLY_DTYPE)
    applies["node"], applies["origin"] = 0, 1
    applies["steps"] = [2, 1, 1]
    applies["t_s"] = [0.5, 1.5, 2.5]
    gradients = np.zeros(0, dtype=GRADIENT_DTYPE)
    resets = {0: [(2.0, [0, 7]), (1.0, [0, 3])]}  # in any order
    V = version_vectors(gradients, applies, [0], 2, np.array([0.6, 1.6, 2.6]), resets)
    assert V[:, 0, 1].tolist() == [2, 4, 8]


@mp
def test_a_long_emulated_gradient_is_not_taken_for_a_hang(tmp_path):
    # the gradient waits 5 s, longer than the heartbeat timeout (3 s): heartbeats go on meanwhile
    # (every 1 s, so a loaded machine has 2 s of slack)
    proc = start_command(
        tmp_path,
        "-n",
        "2",
        "--steps",
        "1",
        "--compute-time",
        "5",
        "--heartbeat-timeout-s",
        "3",
    )
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert summary_of(tmp_path)["run"]["failed_nodes"] == []
