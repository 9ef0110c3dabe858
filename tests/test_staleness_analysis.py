"""Event logs on one clock and the staleness measures built from them (S1, S2, S3, convergence).

Hand-made event sequences check the definitions (ALGORITHMS.md §2); simulated
runs check that the recorded events are complete (the version vectors rebuilt
from them equal the ones the nodes ended with) and agree with the online
statistics; one real run checks the common clock across processes.
"""

import json

import numpy as np
import pytest

from dasgd.analysis.events import (
    APPLY_DTYPE,
    GRADIENT_DTYPE,
    EventRecorder,
    read_columns,
    record_applies,
)
from dasgd.analysis.metrics import Evaluator, EventLog, format_summary, read_events
from dasgd.analysis.staleness import pairwise_staleness, version_vectors, virtual_staleness
from dasgd.cli import main
from dasgd.config import EmulationConfig, ModelConfig, TopologyConfig, TrainConfig
from dasgd.runtime.launch import run

from .test_multiprocess import config as real_config
from .test_simulator import sim, sim_config


def gradients(rows):
    """GRADIENT_DTYPE rows from (node, step, t_end_s, model_gradients) tuples."""
    return np.array([(n, s, np.nan, t, c, -1) for n, s, t, c in rows], dtype=GRADIENT_DTYPE)


def all_events(run_dir, n, suffix, dtype):
    return np.concatenate([read_columns(run_dir / f"node-{i}.{suffix}", dtype) for i in range(n)])


# -- definitions on hand-made sequences ----------------------------------------------------


def test_virtual_staleness_is_rank_minus_gradients_in_the_model():
    # node 0 finishes at t=1 on the empty model; node 1 at t=2 on the empty model (it lacks
    # node 0's); node 0 at t=3 on a model with its own first gradient (lacks node 1's); node 2
    # at t=4 on a model holding all three
    g = gradients([(1, 1, 2.0, 0), (0, 1, 1.0, 0), (0, 2, 3.0, 1), (2, 1, 4.0, 3)])
    assert virtual_staleness(g).tolist() == [1, 0, 1, 0]


def test_virtual_staleness_orders_ties_by_node_and_step():
    g = gradients([(1, 1, 1.0, 0), (0, 1, 1.0, 0)])
    assert virtual_staleness(g).tolist() == [1, 0]


def test_version_vectors_and_pairwise_staleness_by_hand():
    # node 0's gradient at t=1, node 1's at t=2; node 1 applies node 0's delta at t=3
    g = gradients([(0, 1, 1.0, 0), (1, 1, 2.0, 0)])
    a = np.array([(1, 0, 0, 1, 0, 3.0, 1)], dtype=APPLY_DTYPE)
    V = version_vectors(g, a, [0, 1, 2], 3, np.array([2.5, 3.5]))
    assert V[0].tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert V[1].tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    strict, loose = pairwise_staleness(V)
    # ordered pairs (i, j) row by row without i == j: |G_j \ G_i| and the symmetric difference
    assert strict[0].tolist() == [1, 0, 1, 0, 1, 1]
    assert strict[1].tolist() == [1, 0, 0, 0, 1, 2]
    assert loose[1].tolist() == [1, 1, 1, 2, 1, 2]


def test_a_partial_last_row_of_a_killed_writer_is_dropped(tmp_path):
    rec = EventRecorder(tmp_path, "node-0", 0, t0=10.0)
    rec.gradient(1, 10.5, 11.0, 0)
    rec.gradient(2, 11.0, 11.5, 1)
    rec.flush()
    path = tmp_path / "node-0.gradients.bin"
    path.write_bytes(path.read_bytes()[:-5])
    rows = read_columns(path, GRADIENT_DTYPE)
    assert rows["step"].tolist() == [1]
    assert rows["t_start_s"][0] == 0.5 and rows["t_end_s"][0] == 1.0  # on the run clock


def test_apply_events_of_an_oversized_run_are_not_recorded_and_say_why():
    assert record_applies(8, [100] * 8, 1) == (True, None)
    ok, why = record_applies(10_000, [10_000] * 10_000, 1)
    assert not ok and "GiB" in why and "S3 needs the apply events" in why


def test_evaluations_fall_on_the_same_run_clock_ticks_on_every_node(tmp_path):
    class Model:
        def loss(self, params, X, y):
            return 1.0

        accuracy = loss

    def evaluated_ticks(t0, calls):
        log = EventLog(tmp_path / f"{t0}.jsonl", 0, t0=t0).open()
        ev = Evaluator(Model(), None, None, interval_s=1.0)
        for now in calls:
            ev.maybe_log(log, now, 0, None)
        log.close()
        return [int(r["t_s"]) for r in read_events(log.path, "eval")]

    # two nodes on one run clock, calling at different moments: one record per tick each
    assert evaluated_ticks(100.0, [100.0, 100.4, 101.2, 101.9, 103.05]) == [0, 1, 3]
    assert evaluated_ticks(200.0, [200.3, 201.0, 201.5, 202.2, 203.6]) == [0, 1, 2, 3]


# -- simulated runs --------------------------------------------------------------------------


def test_ps_async_virtual_staleness_is_exactly_tau(tmp_path):
    cfg = sim_config(
        tmp_path,
        n_nodes=5,
        algorithm="ps-async",
        emulation=EmulationConfig(compute_time="lognormal:0.001:0.5"),
    )
    run_dir, summary = sim(cfg)
    g = read_columns(run_dir / "server.gradients.bin", GRADIENT_DTYPE)
    assert len(g) == summary["run"]["steps"]  # every gradient the server received
    np.testing.assert_array_equal(virtual_staleness(g), g["tau_steps"])
    assert summary["run"]["staleness_virtual_avg_steps"] == pytest.approx(
        summary["run"]["tau_applied_avg_steps"]
    )
    assert summary["run"]["staleness_pairwise_avg_steps"] is None  # workers hold no own model
    assert "S2_avg" in format_summary(summary)


@pytest.mark.parametrize("send_every", [1, 3])
def test_recorded_events_rebuild_every_nodes_final_version_vector(tmp_path, send_every):
    n = 5
    cfg = sim_config(
        tmp_path,
        n_nodes=n,
        topology=TopologyConfig("random-regular:2", seed=2),
        train=TrainConfig(steps=40, lr=0.05, batch_size=16, send_every=send_every),
        emulation=EmulationConfig(compute_time="0.001", slowdown="1:4", latency="0.0002"),
    )
    run_dir, summary = sim(cfg)
    g = all_events(run_dir, n, "gradients.bin", GRADIENT_DTYPE)
    a = all_events(run_dir, n, "applies.bin", APPLY_DTYPE)
    assert len(g) == n * 40
    finals = [read_events(run_dir / f"node-{i}.jsonl", "final")[0] for i in range(n)]
    end = np.array([max(g["t_end_s"].max(), a["t_s"].max()) + 1.0])
    V = version_vectors(g, a, range(n), n, end)[0]
    assert V.tolist() == [f["version_vector"] for f in finals]
    # the apply events hold exactly the applications the nodes counted online
    run_ = summary["run"]
    assert len(a) == run_["staleness_apply_count"]
    assert a["staleness_steps"].max() == run_["staleness_apply_max_steps"]
    assert a["staleness_steps"].mean() == pytest.approx(run_["staleness_apply_avg_steps"])
    assert run_["staleness_avg_steps"] == run_["staleness_apply_avg_steps"]  # the old name
    # on one clock no gradient's model holds a gradient that finished later
    analysis = json.loads((run_dir / "analysis.json").read_text())
    assert analysis["staleness"]["virtual"]["negative_count"] == 0
    assert virtual_staleness(g).min() >= 0
    assert run_["staleness_pairwise_max_steps"] >= run_["staleness_pairwise_avg_steps"] > 0
    assert run_["staleness_pairwise_loose_avg_steps"] >= run_["staleness_pairwise_avg_steps"]
    # the slowed node's gradients take 4x as long: its model misses the most (at its start; once
    # the others are done it runs alone, so its average is not the largest)
    per_node = {r["node"]: r["max_steps"] for r in analysis["staleness"]["virtual"]["per_node"]}
    assert per_node[1] == max(per_node.values())


def test_convergence_curves_of_the_average_model(tmp_path):
    cfg = sim_config(
        tmp_path,
        topology=TopologyConfig("complete"),
        train=TrainConfig(steps=150, lr=0.1, batch_size=16),
        emulation=EmulationConfig(compute_time="0.001"),
        eval_interval_s=0.02,
    )
    run_dir, summary = sim(cfg)
    conv = json.loads((run_dir / "analysis.json").read_text())["convergence"]
    assert conv["consensus_exact"] and len(conv["t_s"]) >= 5
    assert conv["t_s"] == sorted(conv["t_s"]) and conv["gradients"] == sorted(conv["gradients"])
    assert conv["gradients"][0] == 0 and conv["gradients"][-1] == 4 * 150
    assert conv["average_model_test_loss"][-1] < 0.5 * conv["average_model_test_loss"][0]
    assert conv["grad_norm_sq_train"][-1] < 0.1 * conv["grad_norm_sq_train"][0]
    assert conv["consensus_distance_rel"][0] == 0.0  # all start from x0
    assert 0 < max(conv["consensus_distance_rel"]) < 1
    assert summary["run"]["grad_norm_sq_train_final"] == conv["grad_norm_sq_train"][-1]


def test_consensus_from_sketches_once_snapshots_stop_is_close_to_the_exact(tmp_path, monkeypatch):
    import dasgd.analysis.events as events

    def consensus(where):
        cfg = sim_config(
            tmp_path / where,
            run_id="r",
            model=ModelConfig("mlp", hidden=(32,)),  # 2,410 parameters: a real sketch
            train=TrainConfig(steps=100, lr=0.1, batch_size=16),
            emulation=EmulationConfig(compute_time="0.001", latency="0.002"),
            eval_interval_s=0.01,
        )
        run_dir, _ = sim(cfg)
        return json.loads((run_dir / "analysis.json").read_text())["convergence"]

    exact = consensus("exact")
    monkeypatch.setattr(events, "SNAPSHOT_MAX_BYTES", 3 * 2410 * 8)  # 2 full rows, then sketches
    sketched = consensus("sketched")
    assert exact["consensus_exact"] and not sketched["consensus_exact"]
    assert sketched["t_s"] == exact["t_s"]  # the same deterministic run
    assert sketched["average_model_test_loss"][2:] == [None] * (len(exact["t_s"]) - 2)
    a, b = (
        np.array(exact["consensus_distance_rel"][2:]),
        np.array(sketched["consensus_distance_rel"][2:]),
    )
    assert len(a) >= 5 and np.all(a > 0)
    # CountSketch of 1,024 buckets: norms within a few percent (error ~ sqrt(2/1024) each)
    assert np.median(np.abs(b / a - 1)) < 0.15


def test_no_events_writes_no_binary_logs_and_says_what_is_missing(tmp_path, capsys):
    code = main(
        [
            "simulate",
            "-n",
            "3",
            "--steps",
            "20",
            "--out-dir",
            str(tmp_path),
            "--run-id",
            "r",
            "--no-events",
            "-q",
        ]
    )
    assert code == 0
    run_dir = tmp_path / "r"
    assert not list(run_dir.glob("*.bin"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["staleness_virtual_avg_steps"] is None
    assert summary["run"]["staleness_apply_avg_steps"] is not None  # S1 is online
    assert any("--no-events" in note for note in summary["analysis_notes"])


# -- real processes --------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_real_run_logs_every_process_on_one_clock(tmp_path):
    n = 3
    cfg = real_config(
        tmp_path,
        n_nodes=n,
        topology=TopologyConfig("complete"),
        model=ModelConfig("softmax"),
        train=TrainConfig(steps=60, lr=0.05, batch_size=16),
        emulation=EmulationConfig(compute_time="0.002"),
        eval_interval_s=0.05,
    )
    run_dir, summary = run(cfg, progress=False)
    starts = [read_events(run_dir / f"node-{i}.jsonl", "start")[0] for i in range(n)]
    assert len({s["t0_unix_s"] for s in starts}) == 1  # one origin, handed by the launcher
    g = all_events(run_dir, n, "gradients.bin", GRADIENT_DTYPE)
    a = all_events(run_dir, n, "applies.bin", APPLY_DTYPE)
    # a delta is applied after the gradients in it finished at their origin, on every clock
    assert virtual_staleness(g).min() >= 0
    for row in a[:50]:
        origin = g[(g["node"] == row["origin"])]
        last_step = row["seq"] * 1 + row["steps"]  # b = 1: delta seq s holds step s + 1
        assert origin["t_end_s"][origin["step"] == last_step][0] <= row["t_s"]
    finals = [read_events(run_dir / f"node-{i}.jsonl", "final")[0] for i in range(n)]
    V = version_vectors(g, a, range(n), n, np.array([1e9]))[0]
    assert V.tolist() == [f["version_vector"] for f in finals]
    assert summary["run"]["staleness_virtual_avg_steps"] > 0
