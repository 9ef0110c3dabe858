"""The sans-IO protocol driven by scripted message orders; staleness computed by hand."""

import numpy as np
import pytest

from dasgd.core.protocol import NodeProtocol
from dasgd.core.staleness import apply_staleness, model_lag
from dasgd.errors import WireError
from dasgd.topology import neighbours, parse_topology


def proto(node, nbrs, n=3, b=1):
    return NodeProtocol(node, nbrs, n, b, n_params=2)


def test_seal_every_b_steps_carries_window_base_and_length():
    p = proto(0, [1], n=2, b=3)
    assert p.local_step() is None
    assert p.local_step() is None
    out = p.local_step()
    h = out.header
    assert (h.kind, h.origin, h.sender, h.seq, h.steps) == ("delta", 0, 0, 0, 3)
    assert h.base_vv.tolist() == [0, 0]
    assert h.sender_vv.tolist() == [3, 0]
    assert out.to == (1,)
    for _ in range(2):
        assert p.local_step() is None
    # finish seals the partial window of 2 steps, then floods fin
    delta, fin = p.finish()
    assert (delta.header.seq, delta.header.steps, delta.header.base_vv.tolist()) == (1, 2, [3, 0])
    assert (fin.header.kind, fin.header.seq, fin.header.steps) == ("fin", 2, 5)
    with pytest.raises(RuntimeError, match="after finish"):
        p.local_step()


def test_scripted_reordered_duplicated_deliveries_on_a_path():
    # path 0 - 1 - 2; node 1 is under test
    n0, n1, n2 = proto(0, [1]), proto(1, [0, 2]), proto(2, [1])
    d0 = n0.local_step().header  # origin 0 seq 0, base [0,0,0]
    d2a = n2.local_step().header  # origin 2 seq 0, base [0,0,0]
    d2b = n2.local_step().header  # origin 2 seq 1, base [0,0,1]
    n1.local_step()  # node 1 now [0,1,0]

    # d2b arrives first (reordered). staleness: k != 2: (1-0) for node 1 -> 1
    apply, fwd = n1.receive(d2b)
    assert apply
    assert fwd.to == (0,) and fwd.header.sender == 1 and fwd.header.origin == 2
    assert fwd.header.sender_vv.tolist() == [0, 1, 1]
    # lag measured on receipt: sender [0,0,2] vs own [0,1,0]: ahead 2, loose 1 + 2
    assert n1.staleness.lag.total == 2 and n1.staleness.loose_lag.total == 3

    apply, fwd = n1.receive(d0)  # k != 0: node1 1 + node2 1 -> 2
    assert apply and fwd.to == (2,)
    apply, fwd = n1.receive(d2a)  # k != 2: node0 1 + node1 1 -> 2
    assert apply and fwd.to == (0,)
    assert n1.vv.tolist() == [1, 1, 2]

    apply, fwd = n1.receive(d2b)  # duplicate
    assert not apply and fwd is None
    assert n1.duplicates == 1

    s = n1.summary()
    assert s["staleness_apply_count"] == 3
    assert s["staleness_apply_avg_steps"] == pytest.approx((1 + 2 + 2) / 3)
    assert s["staleness_apply_max_steps"] == 2
    edges = {e["src"]: e for e in s["edges"]}
    assert edges[2]["staleness_apply_count"] == 2 and edges[2]["staleness_apply_max_steps"] == 2
    assert edges[0]["staleness_apply_avg_steps"] == 2
    assert s["applied_deltas_per_origin"] == [1, 0, 2]


def test_own_delta_flooded_back_is_a_duplicate_and_origin_is_not_relayed_to():
    # triangle: 0's delta comes back to 0 via 2
    n0, n2 = proto(0, [1, 2]), proto(2, [0, 1])
    d = n0.local_step().header
    relayed = d.replace_sender(1, np.array([1, 0, 0]))
    apply, fwd = n2.receive(relayed)
    assert apply and fwd is None  # only other neighbour is the origin itself
    apply, _ = n0.receive(relayed.replace_sender(2, np.array([1, 0, 0])))
    assert not apply and n0.duplicates == 1


def test_message_from_non_neighbour_is_rejected_without_state_change():
    n1 = proto(1, [0])
    d = proto(2, [1]).local_step().header
    with pytest.raises(WireError, match="not a neighbour"):
        n1.receive(d)
    assert n1.vv.tolist() == [0, 0, 0]


def test_delta_beyond_announced_fin_is_rejected():
    n0, n1 = proto(0, [1], n=2), proto(1, [0], n=2)
    d = n0.local_step().header
    (fin,) = n0.finish()
    n1.receive(fin.header)
    forged = d.__class__("delta", 0, 0, 5, 1, d.base_vv, d.sender_vv, d.dtype, d.shape)
    with pytest.raises(WireError, match="beyond"):
        n1.receive(forged)
    assert n1.receive(d)[0]  # the real one is still applied


def test_staleness_helpers_by_hand():
    assert apply_staleness(np.array([5, 3, 7]), np.array([2, 3, 9]), origin=1) == 3
    assert apply_staleness(np.array([5, 3, 7]), np.array([2, 0, 9]), origin=1) == 3
    assert model_lag(np.array([4, 1, 0]), np.array([2, 3, 0])) == (2, 4)


def _simulate(graph, n_steps, send_every, seed, d=5, pruned=True, duplicate_p=0.1):
    """Random interleaving of steps and deliveries of n protocols with real arithmetic."""
    rng = np.random.default_rng(seed)
    n = graph.number_of_nodes()
    adjacency = {k: neighbours(graph, k) for k in graph} if pruned else None
    protos = [
        NodeProtocol(i, neighbours(graph, i), n, send_every, n_params=d, adjacency=adjacency)
        for i in range(n)
    ]
    x0 = rng.normal(size=d)
    models = [x0.copy() for _ in range(n)]
    open_delta = [np.zeros(d) for _ in range(n)]
    sent_total = np.zeros(d)
    all_updates = np.zeros(d)
    queues = {(u, v): [] for u in range(n) for v in neighbours(graph, u)}
    steps_left = [n_steps] * n

    def send(out, payload):
        for to in out.to:
            queues[(out.header.sender, to)].append((out.header, payload))

    def seal(i, out):
        nonlocal sent_total
        payload = open_delta[i].copy()
        sent_total = sent_total + payload
        open_delta[i][:] = 0
        send(out, payload)

    while True:
        busy = [i for i in range(n) if steps_left[i] > 0]
        links = [k for k, q in queues.items() if q]
        if not busy and not links:
            progressed = False
            for p in protos:
                out = p.announce_complete()
                if out:
                    send(out, None)
                    progressed = True
            if not progressed:
                break
            continue
        if busy and (not links or rng.random() < 0.4):
            i = int(rng.choice(busy))
            u = rng.normal(size=d) * 0.1
            models[i] += u
            open_delta[i] += u
            all_updates += u
            out = protos[i].local_step()
            if out:
                seal(i, out)
            steps_left[i] -= 1
            if steps_left[i] == 0:
                for out in protos[i].finish():
                    if out.header.kind == "delta":
                        seal(i, out)
                    else:
                        send(out, None)
            continue
        link = links[int(rng.integers(len(links)))]
        q = queues[link]
        # mostly FIFO, sometimes out of order, sometimes duplicated
        k = int(rng.integers(len(q))) if rng.random() < 0.3 else 0
        header, payload = q[k] if rng.random() < duplicate_p else q.pop(k)
        apply, fwd = protos[link[1]].receive(header)
        if apply:
            models[link[1]] += payload
        if fwd:
            send(fwd, payload)
    if n > 1:  # every local update left its node inside exactly one sealed delta
        np.testing.assert_allclose(sent_total, all_updates, rtol=1e-12, atol=1e-12)
    else:  # a lone node seals nothing: its model is plain SGD
        assert not sent_total.any()
    return protos, models, x0 + all_updates


@pytest.mark.parametrize(
    ("spec", "n", "b"),
    [
        ("ring", 4, 1),
        ("ring", 5, 3),
        ("star", 6, 2),
        ("random-regular:3", 8, 1),
        ("path", 4, 4),
        ("complete", 1, 1),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("pruned", [True, False])
def test_random_interleavings_every_delta_applied_once_and_models_equal(spec, n, b, seed, pruned):
    graph = parse_topology(spec, n, seed=seed)
    protos, models, reference = _simulate(graph, n_steps=7, send_every=b, seed=seed, pruned=pruned)
    for p, x in zip(protos, models, strict=True):
        assert p.complete and p.can_stop
        assert p.vv.tolist() == [7] * n
        # deltas were applied in another order than `reference` summed them
        np.testing.assert_allclose(x, reference, rtol=1e-12, atol=1e-12)
        expected = [(7 + b - 1) // b if n > 1 else 0] * n
        expected[p.node_id] = 0
        assert p.applied_deltas.tolist() == expected
        # one staleness sample per applied delta; never negative, and bounded by the
        # other nodes' steps
        s = p.summary()
        assert s["staleness_apply_count"] == sum(expected)
        if n > 1:
            assert 0 <= s["staleness_apply_max_steps"] <= 7 * (n - 1)


def test_complete_requires_fin_and_all_deltas():
    n0, n1 = proto(0, [1], n=2), proto(1, [0], n=2)
    d = n0.local_step().header
    (fin,) = n0.finish()
    n1.finish()
    n1.receive(fin.header)
    assert not n1.complete and n1.missing["deltas_from"] == [0]
    n1.receive(d)
    assert n1.complete
    out = n1.announce_complete()
    assert out.header.kind == "complete" and n1.announce_complete() is None
    assert not n1.can_stop
    n1.receive(out.header.replace_sender(0, n0.vv))
    assert n1.can_stop


def test_window_base_is_the_model_the_first_gradient_saw():
    # deltas applied between a seal and the next step belong in the next delta's base
    n0, n1 = proto(0, [1], n=2), proto(1, [0], n=2)
    n0.local_step()  # seals seq 0
    d1 = n1.local_step().header
    n0.receive(d1)  # arrives while node 0 waits (e.g. under backpressure)
    d0 = n0.local_step().header
    assert d0.base_vv.tolist() == [1, 1]
    # so a receiver that already holds d1 sees no staleness from it
    n1b = proto(1, [0], n=2)
    n1b.local_step()
    n1b.receive(d0)
    assert n1b.staleness.staleness.max == 0


def test_pruned_relay_sends_no_duplicates_on_a_complete_graph():
    graph = parse_topology("complete", 5)
    protos, _, _ = _simulate(graph, n_steps=6, send_every=1, seed=3, duplicate_p=0)
    assert sum(p.duplicates for p in protos) == 0
    flooded, _, _ = _simulate(graph, n_steps=6, send_every=1, seed=3, pruned=False, duplicate_p=0)
    assert sum(p.duplicates for p in flooded) > 0


@pytest.mark.parametrize("kind", ["grad", "model", "stop"])
def test_parameter_server_kinds_are_rejected(kind):
    n1 = proto(1, [0])
    h = proto(0, [1]).local_step().header
    foreign = h.__class__(
        kind, 0, 0, 0, 1, np.zeros(0, np.int64), np.zeros(0, np.int64), "float64", (2,)
    )
    with pytest.raises(WireError, match="DASGD nodes take only"):
        n1.receive(foreign)
    assert n1.vv.tolist() == [0, 0, 0] and n1.applied_deltas.sum() == 0


def test_forged_counts_are_rejected_without_state_change():
    n0, n1 = proto(0, [1], n=2, b=2), proto(1, [0], n=2, b=2)
    n0.local_step()
    d = n0.local_step().header
    big = d.__class__("delta", 0, 0, 0, 3, d.base_vv, d.sender_vv, d.dtype, d.shape)  # 3 > b = 2
    with pytest.raises(WireError, match="at most 2"):
        n1.receive(big)
    bad_fin = d.__class__(
        "fin", 0, 0, 7, 2, np.zeros(0, np.int64), d.sender_vv
    )  # 2 steps = 1 delta, not 7
    with pytest.raises(WireError, match="announces 7 deltas"):
        n1.receive(bad_fin)
    # the bad fin was not taken: no fin from node 0 (nor from node 1, which has not finished)
    assert n1.vv.tolist() == [0, 0] and n1.missing["fin_from"] == [0, 1]
    assert n1.receive(d)[0]


def test_lead_steps_counts_live_neighbours_only():
    n0, n1, n2 = proto(0, [1, 2]), proto(1, [0]), proto(2, [0])
    for _ in range(5):
        n0.local_step()
    assert n0.lead_steps() == 5
    for _ in range(3):
        n0.receive(n1.local_step().header)
    assert n0.lead_steps() == 5  # node 2 is still at 0
    d2 = n2.local_step().header
    n0.receive(d2)
    assert n0.lead_steps() == 4  # min(3, 1)
    (fin,) = n2.finish()
    n0.receive(fin.header)
    assert n0.lead_steps() == 2  # node 2 finished: only node 1 (3 steps) counts
