"""Emulated compute time: a wait between reading the model and the update (DASGD node, PS worker, real runs).

The state machines are driven by hand with a fake clock (``now`` handed in);
the real runs go through :func:`dasgd.runtime.launch.run`.
"""

import statistics

import numpy as np
import pytest

from dasgd.analysis.metrics import read_events
from dasgd.build import build_machine
from dasgd.config import (
    DataConfig,
    EmulationConfig,
    ModelConfig,
    RunConfig,
    TopologyConfig,
    TrainConfig,
    TransportConfig,
)
from dasgd.core import wire
from dasgd.core.actions import CONTINUE, DONE, WAIT_MESSAGE
from dasgd.core.emulation import SLEEP_QUANTUM_S, ComputeTime
from dasgd.core.node import DasgdNode
from dasgd.core.ps import PSWorker
from dasgd.core.wire import Header
from dasgd.ml.data import BatchSampler
from dasgd.ml.models import build_model
from dasgd.ml.optim import build_optimizer
from dasgd.runtime.launch import run

N_FEATURES, N_CLASSES, M, BATCH, LR = 5, 3, 40, 8, 0.1
_NO_VV = np.zeros(0, np.int64)


def shard(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(M, N_FEATURES)), rng.integers(0, N_CLASSES, size=M)


def dasgd_node(node_id=0, n_nodes=2, *, compute_time=None, slowdown_factor=1.0, steps=10):
    """Node ``node_id`` of a line 0 - 1 - ... - (n_nodes - 1), b = 1, SGD on softmax regression."""
    model = build_model("softmax", N_FEATURES, N_CLASSES)
    X, y = shard(node_id)
    neighbours = [u for u in (node_id - 1, node_id + 1) if 0 <= u < n_nodes]
    return DasgdNode(
        node_id,
        neighbours,
        n_nodes,
        model=model,
        X=X,
        y=y,
        x0=model.init_params(seed=0),
        optimizer=build_optimizer("sgd", model.n_params, LR),
        sampler=BatchSampler(M, BATCH, seed=1 + node_id),
        total_steps=steps,
        send_every=1,
        compute_time=compute_time,
        slowdown_factor=slowdown_factor,
    )


def snapshot(out):
    """An Outgoing as a receiver gets it: the header through the wire, the payload copied."""
    n = len(out.header.sender_vv)
    payload = None if out.payload is None else np.array(out.payload)
    return wire.decode_header(wire.encode_header(out.header), n), payload


def first_update(node_id=0):
    """The change of node ``node_id``'s first step when nothing arrives (a twin without compute time)."""
    twin = dasgd_node(node_id)
    x0 = twin.params.copy()
    sends, wait = twin.advance(0.0)
    assert wait is CONTINUE and len(sends) == 1
    return twin.params - x0


def neighbour_delta(node_id=1):
    """The first delta of node ``node_id`` (no compute time), as its neighbours receive it."""
    sender = dasgd_node(node_id)
    sends, _ = sender.advance(0.0)
    (out,) = sends
    return snapshot(out)


# ---------------------------------------------------------------------------
# DasgdNode by hand


def test_advance_reads_the_model_and_returns_the_time_the_update_is_due():
    node = dasgd_node(compute_time=ComputeTime("0.01"))
    x0 = node.params.copy()
    sends, wait = node.advance(5.0)
    assert sends == () and isinstance(wait, float) and wait == pytest.approx(5.01)
    assert node.phase == "computing" and node.step == 0
    np.testing.assert_array_equal(node.params, x0)  # the update waits for the compute time
    assert node.advance(5.005) == ((), wait)  # not yet due: the same wait again
    sends, wait = node.advance(5.01)
    assert node.step == 1 and len(sends) == 1 and sends[0].header.kind == "delta"
    np.testing.assert_allclose(node.params, x0 + first_update())
    # the next step has begun at once: its update is due another 0.01 s later
    assert wait == pytest.approx(5.02) and node.compute_s == pytest.approx(0.02)


def test_a_delta_arriving_during_the_wait_is_applied_before_the_update():
    node = dasgd_node(compute_time=ComputeTime("0.01"))
    x0 = node.params.copy()
    node.advance(0.0)  # reads x0: the gradient is computed on it
    header, delta = neighbour_delta(1)
    assert node.on_message(header, delta) == ()  # node 0 has no other neighbour to relay to
    np.testing.assert_allclose(node.params, x0 + delta)  # applied at once, while computing
    sends, _ = node.advance(0.01)
    # the update computed on x0 is added to the newer model x0 + delta
    np.testing.assert_allclose(node.params, x0 + delta + first_update(), rtol=1e-12)
    np.testing.assert_allclose(sends[0].payload, first_update(), rtol=1e-12)


def test_the_sealed_base_is_the_vector_read_so_a_receiver_counts_the_wait():
    header1, delta1 = neighbour_delta(1)
    node = dasgd_node(compute_time=ComputeTime("0.01"))
    node.advance(0.0)  # reads the model while its vector is [0, 0]
    node.on_message(header1, delta1)  # node 1's step arrives during the wait
    np.testing.assert_array_equal(node.protocol.vv, [0, 1])
    (out,), _ = node.advance(0.01)
    header0, delta0 = snapshot(out)
    np.testing.assert_array_equal(header0.base_vv, [0, 0])  # not [0, 1]: the model read
    np.testing.assert_array_equal(header0.sender_vv, [1, 1])
    # node 1 holds its own step, which node 0's gradient did not see: staleness 1
    receiver = dasgd_node(1)
    receiver.advance(0.0)
    receiver.on_message(header0, delta0)
    assert receiver.protocol.last_apply_staleness == 1
    assert receiver.protocol.summary()["origins"][0]["staleness_apply_avg_steps"] == 1
    # without compute time the same arrival precedes the read: base [0, 1], staleness 0
    instant = dasgd_node()
    instant.on_message(header1, delta1)
    (out,), _ = instant.advance(0.0)
    header0, delta0 = snapshot(out)
    np.testing.assert_array_equal(header0.base_vv, [0, 1])
    receiver = dasgd_node(1)
    receiver.advance(0.0)
    receiver.on_message(header0, delta0)
    assert receiver.protocol.last_apply_staleness == 0


def test_the_slowdown_factor_multiplies_the_compute_time():
    config = RunConfig(
        n_nodes=2,
        model=ModelConfig("softmax"),
        train=TrainConfig(steps=5, batch_size=BATCH),
        emulation=EmulationConfig(compute_time="0.01", slowdown="1:4"),
    )
    kwargs = dict(n_features=N_FEATURES, n_classes=N_CLASSES, shard=shard())
    fast = build_machine(config, 0, neighbours=[1], **kwargs)
    slow = build_machine(config, 1, neighbours=[0], slowdown_factor=4.0, **kwargs)
    assert fast.advance(2.0)[1] == pytest.approx(2.01)
    assert slow.advance(2.0)[1] == pytest.approx(2.04)
    assert slow.compute_s == pytest.approx(4 * fast.compute_s)


def test_owed_work_is_paid_as_a_wait_between_read_and_update():
    node = dasgd_node(slowdown_factor=3.0)
    x0 = node.params.copy()
    # 0.01 s of work at full speed: a 3x slower machine owes 0.02 s more
    sends, wait = node.advance(1.0, work_s=0.01)
    assert sends == () and wait == pytest.approx(1.02) and node.step == 0
    np.testing.assert_array_equal(node.params, x0)  # the model was read, the update waits
    header, delta = neighbour_delta(1)
    node.on_message(header, delta)
    sends, wait = node.advance(1.02)
    # the step that waited, then (nothing owed now) the next one at once
    assert wait is CONTINUE and node.step == 2 and len(sends) == 2
    header0, delta0 = snapshot(sends[0])
    assert header0.base_vv.tolist() == [0, 0]  # its gradient read the model before the delta
    np.testing.assert_allclose(delta0, first_update(), rtol=1e-12)
    np.testing.assert_allclose(node.params, x0 + delta + delta0 + sends[1].payload, rtol=1e-12)
    assert snapshot(sends[1])[0].base_vv.tolist() == [1, 1]  # read after the delta
    assert node.slowdown.slept_s == pytest.approx(0.02)
    # less than a quantum owed: no wait yet (it accumulates)
    sends, wait = node.advance(1.03, work_s=0.4 * SLEEP_QUANTUM_S)
    assert wait is CONTINUE and node.step == 3 and node.slowdown.slept_s == pytest.approx(0.02)
    # with compute time as well, both are waited: 0.01 + (3 - 1) * 0.01
    paced = dasgd_node(compute_time=ComputeTime("0.01"), slowdown_factor=3.0)
    assert paced.advance(0.0, work_s=0.01)[1] == pytest.approx(0.03)


def test_a_full_run_by_hand_drains_after_the_compute_waits():
    nodes = [dasgd_node(i, compute_time=ComputeTime("0.01"), steps=3) for i in range(2)]
    now, inbox, done = 0.0, [], set()
    for _ in range(100):
        for i, node in enumerate(nodes):
            if i in done:
                continue
            sends, wait = node.advance(now)
            inbox.extend((out.to, snapshot(out)) for out in sends)
            if wait is DONE:
                done.add(i)
        while inbox:
            to, (header, payload) = inbox.pop(0)
            for j in to:
                for out in nodes[j].on_message(header, payload):
                    inbox.append((out.to, snapshot(out)))
        if len(done) == 2:
            break
        now += 0.005
    assert done == {0, 1}
    np.testing.assert_allclose(nodes[0].params, nodes[1].params, rtol=1e-12)
    assert all(node.step == 3 and node.compute_s == pytest.approx(0.03) for node in nodes)
    assert all(node.train_s >= 0.03 for node in nodes)


# ---------------------------------------------------------------------------
# PSWorker by hand


def ps_worker(compute_time):
    model = build_model("softmax", N_FEATURES, N_CLASSES)
    X, y = shard()
    worker = PSWorker(
        0,
        2,
        model=model,
        X=X,
        y=y,
        sampler=BatchSampler(M, BATCH, seed=1),
        dtype=np.float64,
        compute_time=compute_time,
    )
    return worker, model, X, y


def model_message(version, x):
    header = Header("model", 2, 2, version, 0, _NO_VV, _NO_VV, "float64", (x.size,))
    return header, x


def test_ps_worker_sends_its_gradient_only_after_the_compute_time():
    worker, model, X, y = ps_worker(ComputeTime("0.01"))
    x = model.init_params(seed=3)
    assert worker.advance(0.0) == ((), WAIT_MESSAGE)  # no model yet
    assert worker.on_message(*model_message(7, x)) == ()
    sends, wait = worker.advance(1.0)
    assert sends == () and wait == pytest.approx(1.01) and worker.phase == "computing"
    assert worker.advance(1.009) == ((), wait)
    (out,), wait = worker.advance(1.01)
    assert wait is WAIT_MESSAGE
    assert out.header.kind == "grad" and out.header.seq == 7 and out.to == (2,)
    idx = BatchSampler(M, BATCH, seed=1).next_batch()
    np.testing.assert_allclose(out.payload, model.loss_and_grad(x, X[idx], y[idx])[1])
    assert worker.compute_s == pytest.approx(0.01) and worker.gradients == 1


def test_ps_worker_stopped_during_the_compute_time_sends_nothing():
    worker, model, _, _ = ps_worker(ComputeTime("0.01"))
    worker.on_message(*model_message(0, model.init_params()))
    assert worker.advance(0.0)[1] == pytest.approx(0.01)
    worker.on_message(Header("stop", 2, 2, 1, 0, _NO_VV, _NO_VV), None)
    assert worker.advance(0.005) == ((), DONE)


# ---------------------------------------------------------------------------
# real runs


def run_config(tmp_path, **over):
    values = dict(
        n_nodes=4,
        topology=TopologyConfig("ring"),
        data=DataConfig("digits"),
        model=ModelConfig("softmax"),
        train=TrainConfig(steps=60, lr=0.05, batch_size=16, send_every=1),
        transport=TransportConfig(ready_timeout_s=60, drain_timeout_s=30, send_timeout_s=30),
        emulation=EmulationConfig(compute_time="0.003", slowdown="1:4"),
        out_dir=str(tmp_path / "runs"),
        log_interval_s=0.05,
        timeout_s=120,
    )
    values.update(over)
    return RunConfig(**values)


@pytest.mark.multiprocess
def test_ring_with_a_compute_time_straggler_drains_and_its_deltas_are_staler(tmp_path):
    run_dir, summary = run(run_config(tmp_path), progress=False)
    checks = summary["checks"]
    assert checks["exactly_once"] and checks["all_drained"], checks
    finals = [read_events(run_dir / f"node-{i}.jsonl", "final")[0] for i in range(4)]
    assert all(f["steps"] == 60 for f in finals)
    # node 1 waits 4 x 0.003 s per gradient (and the time it owes for its real work),
    # the others 0.003 s
    assert finals[1]["compute_s"] >= 60 * 0.012 and finals[1]["slept_s"] > 0
    assert finals[0]["compute_s"] == pytest.approx(60 * 0.003)
    fast = [finals[i]["gradients_per_s"] for i in (0, 2, 3)]
    assert finals[1]["gradients_per_s"] < 0.5 * min(fast), [f["gradients_per_s"] for f in finals]

    # apply staleness per origin, as every other node (receiver) measured it
    def per_origin(key):
        values = {k: [] for k in range(4)}
        for f in finals:
            for o in f["origins"]:
                values[o["origin"]].append(o[key])
        return values

    # A delta of node 1 waits 12 ms between read and update, during which each fast node
    # takes ~4 steps: the stalest of its deltas is far staler than any fast node's.
    # (The averages are not compared: once the fast nodes have finished, node 1's
    # remaining ~3/4 of deltas have staleness 0, so that every origin's average is
    # about n - 1 = 3, the steps the others take during its windows.)
    maxima = {k: statistics.mean(v) for k, v in per_origin("staleness_apply_max_steps").items()}
    assert maxima[1] > statistics.mean(maxima[k] for k in (0, 2, 3)), maxima
    counts = per_origin("staleness_apply_count")
    assert all(c == [60, 60, 60] for c in counts.values()), counts


@pytest.mark.multiprocess
def test_ps_async_with_compute_time_counts_every_gradient(tmp_path):
    cfg = run_config(
        tmp_path,
        algorithm="ps-async",
        transport=TransportConfig(ready_timeout_s=60, send_timeout_s=30),
        train=TrainConfig(steps=40, lr=0.05, batch_size=16),
    )
    run_dir, summary = run(cfg, progress=False)
    r, nodes = summary["run"], summary["nodes"]
    assert summary["checks"]["budget_used"]
    assert r["steps"] == 4 * 40 and r["updates_applied"] == 4 * 40
    assert sum(node["gradients_applied"] for node in nodes) == 4 * 40
    workers = [read_events(run_dir / f"node-{i}.jsonl", "final")[0] for i in range(4)]
    assert all(w["compute_s"] > 0 for w in workers)
    # the 4x slower worker computes fewer of the budget's gradients
    assert nodes[1]["gradients_applied"] < min(nodes[k]["gradients_applied"] for k in (0, 2, 3))
