"""Failure injection in the simulator (``dasgd simulate --kill NODE@T_S``).

A killed node's process dies at a virtual time; the simulated launcher notices
it at its next check (every ``CHILD_POLL_S``), repairs the overlay and settles
the dead node's ``fin`` as the real launcher does (tests/test_faults.py kills
real processes). Every run here is in this process: no node processes, no
sockets, no sleeps.
"""

import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from dasgd.analysis.events import APPLY_DTYPE, GRADIENT_DTYPE, read_columns
from dasgd.analysis.metrics import read_events
from dasgd.cli import main, options_namespace, sim_config_from_args
from dasgd.config import EmulationConfig, SimConfig, TopologyConfig, TrainConfig
from dasgd.core.failures import CHILD_POLL_S
from dasgd.errors import ConfigError, NodeFailed
from dasgd.sim import simulate
from dasgd.topology import neighbours, parse_topology

from .test_simulator import _without_real_time, sim_config

BARBELL = str(Path(__file__).resolve().parent.parent / "topologies" / "barbell-8.json")


def kill_config(tmp_path, kills, *, n=8, topology="ring", steps=150, **over):
    """A run long enough (150 steps of 2 ms emulated compute) that a kill lands mid-run."""
    values = dict(
        n_nodes=n,
        run_id="r",
        topology=TopologyConfig(topology),
        train=TrainConfig(steps=steps, lr=0.05, batch_size=16, send_every=2),
        emulation=EmulationConfig(compute_time="0.002", latency="0.0005"),
        sim=SimConfig(kills=kills),
    )
    values.update(over)
    return sim_config(tmp_path, **values)


def run_killed(cfg):
    run_dir, summary = simulate(cfg, progress=False)
    return run_dir, summary


def check_survivors(run_dir, summary, n, dead):
    """What tests/test_faults.py checks of a real run that lost ``dead``."""
    checks = summary["checks"]
    assert summary["run"]["failed_nodes"] == sorted(dead)
    assert checks["survivors"] == n - len(dead)
    assert checks["exactly_once"], checks
    assert checks["all_drained"], checks
    assert checks["consensus_distance_rel"] <= 1e-6
    alive = [i for i in range(n) if i not in dead]
    models = [np.load(run_dir / f"node-{i}.npy") for i in alive]
    scale = np.linalg.norm(models[0])
    for m in models:
        assert np.linalg.norm(m - models[0]) <= 1e-6 * scale
    failures = {f["node"]: f for f in json.loads((run_dir / "failures.json").read_text())}
    assert sorted(failures) == sorted(dead)
    for k in dead:
        entry = summary["nodes"][k]
        assert entry["failed"] and entry["exit_code"] == -9
        assert entry["deltas_held_by_survivors_min"] == entry["deltas_held_by_survivors_max"]
        assert not (run_dir / f"node-{k}.npy").exists()  # a killed process writes no model
        assert not read_events(run_dir / f"node-{k}.jsonl", "final")
        # seen dead at the launcher's next check after the kill, in virtual seconds
        killed_s = failures[k]["killed_t_s"]
        assert killed_s < failures[k]["detected_t_s"] <= killed_s + CHILD_POLL_S + 1e-9
        assert failures[k]["fin"]["deltas"] == entry["deltas_held_by_survivors_max"]
        last = read_events(run_dir / f"node-{k}.jsonl")[-1]
        assert last["t_s"] <= killed_s  # its log ends at the kill
        for i in alive:
            seen = [
                r["failed_node"] for r in read_events(run_dir / f"node-{i}.jsonl", "node_failed")
            ]
            assert k in seen
            fins = read_events(run_dir / f"node-{i}.jsonl", "failed_fin")
            assert [(r["deltas"], r["steps"]) for r in fins if r["failed_node"] == k] == [
                (failures[k]["fin"]["deltas"], failures[k]["fin"]["steps"])
            ]
    return failures


def repaired_graph(run_dir, spec, n):
    graph = parse_topology(spec, n)
    overlay = nx.Graph([(u, v) for u in graph for v in neighbours(graph, u)])
    for line in (run_dir / "topology-changes.jsonl").read_text().splitlines():
        change = json.loads(line)
        overlay.remove_node(change["removed_node"])
        overlay.add_edges_from(change["added_edges"])
    return overlay


# -- the survivors finish and agree --------------------------------------------------------


def test_ring_survives_a_killed_node_and_stays_a_ring(tmp_path):
    run_dir, summary = run_killed(kill_config(tmp_path, ["3@0.1"]))
    failures = check_survivors(run_dir, summary, 8, [3])
    changes = (run_dir / "topology-changes.jsonl").read_text().splitlines()
    assert [json.loads(c)["added_edges"] for c in changes] == [[[2, 4]]]
    assert json.loads(changes[0])["t_s"] == failures[3]["detected_t_s"]
    assert failures[3]["added_edges"] == [[2, 4]]
    assert failures[3]["fin"]["reports"] == 7  # every survivor said what it holds
    assert failures[3]["last_words"].startswith("killed at t = 0.1 s by --kill 3@0.1")
    entry = summary["nodes"][3]
    assert 0 < entry["steps_held_by_survivors_max"] < 150 and entry["steps_lost"] > 0
    overlay = repaired_graph(run_dir, "ring", 8)
    assert nx.is_connected(overlay) and all(d == 2 for _, d in overlay.degree())
    records = read_events(run_dir / "node-2.jsonl", "node_failed")
    assert records[0]["links"] == [4] and records[0]["detected_t_s"] == failures[3]["detected_t_s"]
    final = read_events(run_dir / "node-2.jsonl", "final")[0]
    assert final["failed_nodes_seen"] == [3]


def test_what_left_before_the_kill_arrives_and_what_was_queued_is_lost(tmp_path):
    # 4-node ring, b = 1, 50 ms links of 1 Mbit/s: each ~5 kB delta takes ~42 ms to leave, so
    # node 1's uplink is backlogged (backpressure) when it dies at 0.3 s
    kill_s, latency_s = 0.3, 0.05
    cfg = kill_config(
        tmp_path,
        [(1, kill_s)],
        n=4,
        train=TrainConfig(steps=150, lr=0.05, batch_size=16, send_every=1),
        emulation=EmulationConfig(compute_time="0.002", latency=str(latency_s)),
        sim=SimConfig(bandwidth_bps=1e6, kills=[(1, kill_s)]),
    )
    run_dir, summary = run_killed(cfg)
    failures = check_survivors(run_dir, summary, 4, [1])
    applies = read_columns(run_dir / "node-0.applies.bin", APPLY_DTYPE)
    direct = applies["t_s"][(applies["origin"] == 1) & (applies["sender"] == 1)]
    # in flight at the kill: still arrives, within the link's latency (plus handling)
    assert (direct > kill_s).any()
    assert direct.max() <= kill_s + latency_s + 0.005
    # sealed (b = 1: one delta per gradient) but still queued on its uplink: lost
    gradients = read_columns(run_dir / "node-1.gradients.bin", GRADIENT_DTYPE)
    sealed = int((gradients["t_end_s"] <= kill_s).sum())
    assert 0 < failures[1]["fin"]["deltas"] < sealed - 5


def test_random_regular_survives_a_killed_node(tmp_path):
    spec = "random-regular:3"
    run_dir, summary = run_killed(kill_config(tmp_path, [(5, 0.12)], topology=spec))
    check_survivors(run_dir, summary, 8, [5])
    assert nx.is_connected(repaired_graph(run_dir, spec, 8))


def test_barbell_survives_its_bridge_node_dying(tmp_path):
    # without the repair link 2-4 the cliques {0,1,2} and {4,5,6,7} would lose each other
    run_dir, summary = run_killed(kill_config(tmp_path, ["3@0.1"], topology=BARBELL, n=None))
    failures = check_survivors(run_dir, summary, 8, [3])
    assert failures[3]["added_edges"] == [[2, 4]]
    finals = {i: read_events(run_dir / f"node-{i}.jsonl", "final")[0] for i in (2, 4)}
    # the halves exchanged what each had sealed while the bridge was down (anti-entropy)
    assert sum(f["deltas_pushed"] for f in finals.values()) > 0
    assert summary["checks"]["delta_store_misses"] == 0


def test_a_node_killed_at_time_zero_contributes_nothing(tmp_path):
    run_dir, summary = run_killed(kill_config(tmp_path, ["0@0"]))
    failures = check_survivors(run_dir, summary, 8, [0])
    assert failures[0]["fin"] == {"deltas": 0, "steps": 0, "reports": 7}
    assert failures[0]["last_step"] == 0 and failures[0]["steps_lost"] == 150
    assert summary["nodes"][0]["steps_held_by_survivors_max"] == 0
    assert summary["run"]["steps"] == 7 * 150


def test_a_node_killed_while_draining_keeps_all_its_steps(tmp_path):
    # node 0 is 4x faster than the others: it finishes training and waits in its drain
    slow = ",".join(f"{i}:4" for i in range(1, 6))
    emulation = EmulationConfig(compute_time="0.002", latency="0.0005", slowdown=slow)
    first, plain = run_killed(
        kill_config(tmp_path / "plain", [], n=6, steps=60, emulation=emulation)
    )
    final = read_events(first / "node-0.jsonl", "final")[0]
    start = read_events(first / "node-0.jsonl", "start")[0]
    assert final["drain_s"] > 0.1
    kill_s = round(start["t_s"] + final["train_s"] + final["drain_s"] / 2, 3)
    run_dir, summary = run_killed(
        kill_config(tmp_path, [(0, kill_s)], n=6, steps=60, emulation=emulation)
    )
    failures = check_survivors(run_dir, summary, 6, [0])
    # its own fin had reached the survivors: all 30 deltas (60 steps, b = 2) count
    assert failures[0]["fin"]["deltas"] == 30 and failures[0]["fin"]["steps"] == 60
    assert summary["nodes"][0]["steps_held_by_survivors_max"] == 60
    assert summary["run"]["steps"] == 5 * 60


def test_two_nodes_killed_at_different_times(tmp_path):
    # neighbours on the ring: after 2 dies 1-3 are linked, after 3 dies 1-4
    run_dir, summary = run_killed(kill_config(tmp_path, ["3@0.25", "2@0.08"]))
    failures = check_survivors(run_dir, summary, 8, [2, 3])
    changes = [json.loads(c) for c in (run_dir / "topology-changes.jsonl").read_text().splitlines()]
    assert [(c["removed_node"], c["added_edges"]) for c in changes] == [
        (2, [[1, 3]]),
        (3, [[1, 4]]),
    ]
    assert failures[2]["fin"]["reports"] == 7 and failures[3]["fin"]["reports"] == 6
    overlay = repaired_graph(run_dir, "ring", 8)
    assert nx.is_connected(overlay) and all(d == 2 for _, d in overlay.degree())


def test_kills_seen_at_one_check_are_handled_in_node_order(tmp_path):
    # as the real launcher's check_children: 3 then 4, though 4 died first
    run_dir, summary = run_killed(kill_config(tmp_path, ["4@0.05", "3@0.06"]))
    failures = check_survivors(run_dir, summary, 8, [3, 4])
    assert failures[3]["detected_t_s"] == failures[4]["detected_t_s"]
    changes = [json.loads(c) for c in (run_dir / "topology-changes.jsonl").read_text().splitlines()]
    assert [(c["removed_node"], c["added_edges"]) for c in changes] == [
        (3, [[2, 4]]),
        (4, [[2, 5]]),
    ]
    assert failures[3]["fin"]["reports"] == failures[4]["fin"]["reports"] == 6


def test_a_kill_after_the_node_has_left_changes_nothing(tmp_path):
    run_dir, summary = run_killed(kill_config(tmp_path, ["1@100"], steps=20))
    assert summary["run"]["failed_nodes"] == [] and summary["sim"]["kills_ignored"] == [1]
    assert summary["checks"]["exactly_once"] and not (run_dir / "failures.json").exists()


def test_ps_async_drops_a_killed_worker(tmp_path):
    cfg = kill_config(tmp_path, ["1@0.05"], n=3, algorithm="ps-async", steps=100)
    run_dir, summary = run_killed(cfg)
    assert summary["run"]["failed_nodes"] == [1]
    assert summary["checks"]["budget_used"]
    entry = summary["nodes"][1]
    assert entry["failed"] and 0 < entry["gradients_applied"] < 100
    assert not (run_dir / "topology-changes.jsonl").exists()  # no overlay to repair
    assert read_events(run_dir / "server.jsonl", "node_failed")[0]["failed_node"] == 1


def test_same_seed_and_kills_give_the_same_run_bit_for_bit(tmp_path):
    def once(where):
        cfg = kill_config(
            tmp_path / where,
            ["3@0.09", "6@0.2"],
            emulation=EmulationConfig(
                compute_time="lognormal:0.002:0.5", slowdown="2:3", latency="0.0005"
            ),
            sim=SimConfig(bandwidth_bps=2e8, kills=["3@0.09", "6@0.2"]),
        )
        return run_killed(cfg)

    dir_a, a = once("a")
    dir_b, b = once("b")
    assert a["run"]["failed_nodes"] == [3, 6]
    assert _without_real_time(a) == _without_real_time(b)
    for name in ("failures.json", "topology-changes.jsonl"):
        assert (dir_a / name).read_bytes() == (dir_b / name).read_bytes()
    for path in sorted(dir_a.glob("*.jsonl")) + sorted(dir_a.glob("*.npy")):
        assert path.read_bytes() == (dir_b / path.name).read_bytes(), path.name


# -- the command line and the API -----------------------------------------------------------


def simulate_command(tmp_path, *args):
    return main(
        [
            "simulate",
            "-q",
            "--out-dir",
            str(tmp_path / "runs"),
            "--run-id",
            "r",
            "--steps",
            "100",
            "--compute-time",
            "0.002",
            "--eval-interval-s",
            "0",
            *args,
        ]
    )


def test_simulate_kill_from_the_command_line(tmp_path, capsys):
    code = simulate_command(tmp_path, "-n", "5", "--kill", "2@0.05", "--kill", "4@0.1")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "node 2 failed: seen dead at t = 0.20 s (exit code -9)" in out
    assert "2* FAILED (exit code -9)" in out and "4* FAILED (exit code -9)" in out
    run_dir = tmp_path / "runs" / "r"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["sim"]["kills"] == [[2, 0.05], [4, 0.1]]
    # `dasgd summary` and replay read it unchanged
    assert main(["summary", str(run_dir)]) == 0
    assert "node 4 failed" in capsys.readouterr().out
    replay = options_namespace("simulate", str(run_dir))
    assert sim_config_from_args(replay).kills == ((2, 0.05), (4, 0.1))
    out_dir = str(tmp_path / "replays")
    assert main(["simulate", "-q", "--config", str(run_dir), "--out-dir", out_dir]) == 0
    (again,) = (tmp_path / "replays").iterdir()
    assert [f["node"] for f in json.loads((again / "failures.json").read_text())] == [2, 4]
    out_dir = str(tmp_path / "replaced")
    code = main(
        ["simulate", "-q", "--config", str(run_dir), "--kill", "1@0.05", "--out-dir", out_dir]
    )
    assert code == 0  # an explicit --kill replaces the config's kills
    (replaced,) = (tmp_path / "replaced").iterdir()
    assert [f["node"] for f in json.loads((replaced / "failures.json").read_text())] == [1]
    capsys.readouterr()
    # and the Python API: a dead node's row of the models is NaN, the average the survivors'
    import dasgd

    result = dasgd.load_run(run_dir)
    assert result.models.shape[0] == 5 and len(result.finals) == 3
    assert np.isnan(result.models[[2, 4]]).all() and not np.isnan(result.models[[0, 1, 3]]).any()
    survivors = np.mean([np.load(run_dir / f"node-{i}.npy") for i in (0, 1, 3)], axis=0)
    np.testing.assert_allclose(result.average_model, survivors, rtol=1e-12)


def test_stop_policy_ends_the_simulation_naming_the_node(tmp_path, capsys):
    code = simulate_command(tmp_path, "-n", "4", "--kill", "1@0.05", "--on-node-failure", "stop")
    out, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("dasgd: error: node 1 exited with code -9: killed at t = 0.05 s")
    assert "--on-node-failure stop" in lines[0]


def test_stop_policy_raises_from_the_api(tmp_path):
    cfg = kill_config(tmp_path, ["1@0.05"], n=4, on_node_failure="stop")
    with pytest.raises(NodeFailed, match="node 1 exited with code -9"):
        simulate(cfg, progress=False)


def test_killing_every_node_fails_naming_the_last(tmp_path):
    cfg = kill_config(tmp_path, ["0@0.01", "1@0.3"], n=2)
    with pytest.raises(NodeFailed, match="node 1 exited with code -9, the last node alive"):
        simulate(cfg, progress=False)


def test_api_takes_kill_as_pairs_or_strings(tmp_path):
    import dasgd

    common = dict(
        nodes=4, steps=60, compute_time="0.002", eval_interval_s=0, quiet=True, run_id="r"
    )
    a = dasgd.simulate(out_dir=str(tmp_path / "a"), kill=[(1, 0.05)], **common)
    b = dasgd.simulate(out_dir=str(tmp_path / "b"), kill=["1@0.05"], **common)
    assert a.summary["run"]["failed_nodes"] == b.summary["run"]["failed_nodes"] == [1]
    assert json.loads((a.run_dir / "config.json").read_text())["sim"]["kills"] == [[1, 0.05]]
    with pytest.raises(ConfigError, match="no node 7"):
        dasgd.simulate(out_dir=str(tmp_path / "c"), kill="7@0.05", **common)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["-n", "8", "--kill", "9@0.5"], "no node 9; its 8 nodes are 0..7"),
        (["-n", "8", "--kill", "3@-1"], "'3@-1'"),
        (["-n", "8", "--kill", "3"], "'3'"),
        (["-n", "8", "--kill", "x@1"], "'x@1'"),
        (["-n", "8", "--kill", "3@0.1", "--kill", "3@0.2"], "node 3 is killed twice"),
        (["-n", "4", "--algorithm", "ps-async", "--kill", "4@0.1"], "parameter server"),
        (["-n", "4", "--algorithm", "ps-sync", "--kill", "1@0.1"], "ps-sync"),
        (["-n", "4", "--on-node-failure", "restart", "--kill", "1@0.1"], "does not restart"),
    ],
)
def test_bad_kill_is_one_line_naming_it(tmp_path, capsys, args, named):
    code = simulate_command(tmp_path, *args)
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dasgd: error: ") and named in lines[0], lines[0]
    assert "--kill" in lines[0] and "Traceback" not in err and out == ""
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_the_simulated_launcher_checks_as_often_as_the_real_one():
    from dasgd.runtime.launch import CHILD_POLL_S as launcher_poll_s
    from dasgd.runtime.launch import derive_fin, repair_links  # still importable there

    assert launcher_poll_s == CHILD_POLL_S
    assert callable(derive_fin) and callable(repair_links)


def test_a_store_too_small_to_repair_times_the_drain_out_and_says_so(tmp_path, capsys):
    # no store: deltas that crossed the bridge only through node 3 cannot be resent over 2-4;
    # the survivors give up after --drain-timeout-s of silence, as real nodes do
    code = simulate_command(
        tmp_path,
        "--topology",
        BARBELL,
        "--steps",
        "300",
        "--kill",
        "3@0.2",
        "--delta-store-mib",
        "0",
        "--drain-timeout-s",
        "5",
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert "the delta store was too small to repair" in out
    assert "stopped draining" in err and "Traceback" not in err
    run_dir = tmp_path / "runs" / "r"
    timeouts = read_events(run_dir / "node-0.jsonl", "drain_timeout")
    assert timeouts and timeouts[0]["waited_s"] == 5
    assert read_events(run_dir / "node-0.jsonl", "final")[0]["drained"] is False


def test_with_kills_the_delta_stores_count_in_the_memory_check(tmp_path, capsys, monkeypatch):
    from dasgd.sim import simulator

    # pretend a 4 GiB machine: 300 nodes x 16 MiB of stores (4.7 GiB) do not fit, 1 MiB do
    monkeypatch.setattr(simulator, "_machine_memory_bytes", lambda: 4 << 30)
    out_dir = str(tmp_path / "runs")
    code = main(["simulate", "-q", "-n", "300", "--kill", "1@0.1", "--out-dir", out_dir])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "16 MiB of stored deltas per node" in err[0]
    assert "--delta-store-mib" in err[0] and not (tmp_path / "runs").exists()
    with_store = simulator.estimate_memory_bytes(
        kill_config(tmp_path, ["1@0.1"], n=300, delta_store_mib=1.0), 0, 300
    )
    without = simulator.estimate_memory_bytes(kill_config(tmp_path, [], n=300), 0, 300)
    assert with_store - without == 300 * 2**20
