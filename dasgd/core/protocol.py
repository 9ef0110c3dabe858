"""The DASGD node protocol as a sans-IO state machine.

:class:`NodeProtocol` does the bookkeeping of one node of decentralized
asynchronous SGD (Tosi & Theobald, "Convergence Analysis of Decentralized ASGD",
arXiv 2309.03754; ALGORITHMS.md §1): its version vector, its open delta window,
which deltas it has applied, staleness statistics, and the end-of-run drain.
It imports no socket, clock or file: messages come in as arguments and go out
as return values, so the same object serves :class:`~dasgd.core.node.DasgdNode`
(driven by the process runtime and by the simulator) and unit tests with
scripted message orders.

Its owner holds the arrays: it adds each local update ``u`` to the model and to
its open delta buffer, calls :meth:`NodeProtocol.local_step`, and when that
returns an :class:`Outgoing` it sends the buffer with that header and starts a
new one. For each incoming message it calls :meth:`NodeProtocol.receive`; when
told to apply, it adds the payload to the model, then relays the same payload
with the returned header.

End of run (DESIGN.md §8, a dasgd choice): a node that stops stepping calls
:meth:`~NodeProtocol.finish`, which seals the partial window and floods a
``fin`` message carrying its totals. A node that holds every delta of every
``fin`` it knows, for all n origins, is *complete* and tells its neighbours once
(``complete``). It may stop when it and all its neighbours are complete: no
neighbour then needs anything it could relay.

Node failures (``--on-node-failure continue``): the driver reports a dead node
with :meth:`~NodeProtocol.node_failed`. It leaves the neighbours (nothing is
sent to it, no ``complete`` is awaited from it) and its deltas are relayed
without pruning from then on: the pruned relay counts on the origin sending
to its own neighbours, which a dead origin no longer does. Repair links to new
neighbours come with :meth:`~NodeProtocol.add_neighbour`. Neighbours then
exchange ``have`` messages (anti-entropy; the owner sends the deltas a
neighbour lacks from its store), and the drain waits for the dead node's
``fin`` as before: its own if it sent one, otherwise the one the launcher
derives from what every survivor holds (:meth:`~NodeProtocol.failed_fin`).

Restart (``--on-node-failure restart``): a restarted node takes a live
neighbour's state (:meth:`~NodeProtocol.state` there,
:meth:`~NodeProtocol.install_state` here: version vector, which deltas are
applied, the ``fin`` totals known) and continues its own sequence of deltas
where the survivors' holdings of it end; the survivors take it back as a
neighbour with :meth:`~NodeProtocol.node_rejoined` and await its real ``fin``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import WireError
from .staleness import StalenessTracker, apply_staleness, model_lag
from .wire import VV_KINDS, Header

__all__ = [
    "PER_ORIGIN_DETAIL_MAX",
    "NodeProtocol",
    "Outgoing",
    "adjacency_sets",
    "counts_digest",
    "lag_sampled",
]

_NO_VV = np.zeros(0, np.int64)
#: Runs of at most this many nodes list per-origin counts in each node's summary;
#: larger ones (simulations of thousands of nodes) give a digest instead.
PER_ORIGIN_DETAIL_MAX = 512


def lag_sampled(header: Header, every: int) -> bool:
    """True for the messages whose model lag a node samples at one in ``every`` (a pure rule)."""
    return (header.origin + header.seq + header.sender) % every == 0


def counts_digest(deltas_per_origin, steps_per_origin) -> str:
    """SHA-256 (hex) of per-origin delta and step counts, each of shape (n,).

    A node's summary carries the digest of the ``fin`` totals it received; the
    run summary compares it with the digest of what every origin reports it
    sealed, an O(n) check per node that needs no n x n table.
    """
    import hashlib

    h = hashlib.sha256()
    h.update(np.asarray(deltas_per_origin, dtype="<i8").tobytes())
    h.update(np.asarray(steps_per_origin, dtype="<i8").tobytes())
    return h.hexdigest()


def adjacency_sets(neighbours_of) -> dict[int, frozenset[int]]:
    """Every node's neighbours as frozensets, the ``adjacency`` argument of :class:`NodeProtocol`.

    Parameters
    ----------
    neighbours_of : mapping of int to iterable of int
        Node id -> its neighbours (e.g. ``dict(graph.adjacency())``).
    """
    return {int(k): frozenset(int(u) for u in v) for k, v in neighbours_of.items()}


@dataclass(slots=True)
class Outgoing:
    """A message to send: ``header`` (and, for array kinds, ``payload``) to each node in ``to``.

    Attributes
    ----------
    header : Header
        Its ``sender_vv`` (and a delta's ``base_vv``) may be the sender's live
        version vector: valid until the sender's next call. A driver encodes
        it at once (the runtime) or copies it (the simulator).
    to : tuple of int
        Destination nodes.
    payload : ndarray or None
        The array frame. Set by the node state machines, not by the protocol.
    live : bool
        True if ``payload`` is an array its owner keeps changing (the server's
        model): the driver must copy it before the next call. False: it is
        handed over and never written again by its owner.
    """

    header: Header
    to: tuple[int, ...]
    payload: object = None
    live: bool = False


class NodeProtocol:
    """Bookkeeping of one DASGD node; no I/O.

    Parameters
    ----------
    node_id : int
        This node, in 0..n_nodes-1.
    neighbours : iterable of int
        Its neighbours in the (undirected) topology.
    n_nodes : int
        Number of nodes in the run.
    send_every : int
        Local steps per sealed delta (b in ALGORITHMS.md).
    n_params : int
        Length of the model vector (written into delta headers).
    dtype : {"float32", "float64"}
        Parameter dtype (written into delta headers).
    adjacency : mapping of int to set of int, optional
        Every node's neighbours (the whole topology), as sets: build it once
        per run (:func:`adjacency_sets`) and share it between the nodes of a
        simulation. With it, a delta (or fin) is not relayed to the origin's
        own neighbours: the origin sends it to them itself, over links that
        lose nothing while both ends live. By induction over the distance from
        the origin every node still receives it; on a complete graph no
        duplicates remain. Without it: plain flooding. Relay targets are found
        per message in O(degree), so set-up is O(degree) per node.
    vv_dtype : numpy integer dtype, default int64
        Dtype of the version vector and of the per-origin counters, and of
        the staleness sums: it must hold the run's total number of local
        steps. The simulator uses int32 when that total is below 2**31
        (n^2 counters at n nodes).
    lag_every : int, default 1
        Measure the model lag on one in ``lag_every`` new messages, chosen by
        :func:`lag_sampled` from the message itself (so a simulator knows
        which copies need their sender's vector). 1: every message. The
        simulator samples above 1,000 nodes, where the O(n) lag would
        dominate the cost of a message.

    Attributes
    ----------
    vv : ndarray of shape (n_nodes,), ``vv_dtype``
        The version vector V_i: local steps of each origin contained in the model.
    applied_deltas : ndarray of shape (n_nodes,), ``vv_dtype``
        Deltas applied per origin.
    staleness : StalenessTracker
        Apply staleness and model lag statistics.
    duplicates : int
        Deltas and fins received again and dropped (flooding makes them normal).
    last_apply_staleness : int
        Apply staleness, in steps, of the delta most recently applied.

    References
    ----------
    M. Tosi, M. Theobald, "Convergence Analysis of Decentralized ASGD",
    arXiv 2309.03754, 2023, Algorithm 1; flooding with de-duplication and the
    staleness measures are dasgd choices, ALGORITHMS.md §1-2.
    """

    def __init__(
        self,
        node_id: int,
        neighbours,
        n_nodes: int,
        send_every: int,
        *,
        n_params: int,
        dtype: str = "float64",
        adjacency=None,
        vv_dtype=np.int64,
        lag_every: int = 1,
    ) -> None:
        self.node_id = node_id
        self.neighbours = tuple(sorted(neighbours))
        if node_id in self.neighbours or not 0 <= node_id < n_nodes:
            raise ValueError(
                f"node {node_id} cannot be its own neighbour or outside 0..{n_nodes - 1}"
            )
        self.n_nodes = n_nodes
        self.send_every = send_every
        self._alone = (
            not self.neighbours
        )  # from the start: a node whose neighbours died still seals
        self._adjacency = adjacency
        self.n_params = n_params
        self.dtype = dtype
        self.lag_every = lag_every
        self.vv = np.zeros(n_nodes, dtype=vv_dtype)
        self.vv_total = 0  # sum of vv, kept up to date (a gradient's c_g, ALGORITHMS.md §2)
        self._window_base = self.vv.copy()
        self._window_steps = 0
        self._base_taken = False
        self.deltas_sealed = 0
        # de-duplication: every seq < _applied_below[k] is applied; later ones in _applied_above[k]
        self._applied_below = np.zeros(n_nodes, dtype=vv_dtype)
        self._applied_above: dict[int, set[int]] = {}
        self.applied_deltas = np.zeros(n_nodes, dtype=vv_dtype)
        self.duplicates = 0
        self.last_apply_staleness = 0
        self.staleness = StalenessTracker(node_id, self.neighbours, n_nodes)
        # drain state: -1 = no fin from that origin yet
        self.finished = False
        self._fin_deltas = np.full(n_nodes, -1, dtype=vv_dtype)
        self._fin_steps = np.full(n_nodes, -1, dtype=vv_dtype)
        # one more than an origin's last sequence number (its fin's deltas, unless some are lost)
        self._fin_end = np.full(n_nodes, -1, dtype=vv_dtype)
        self._fins_known = 0
        self._complete_announced = False
        self._neighbours_complete: set[int] = set()
        #: nodes reported dead (:meth:`node_failed`)
        self.failed: set[int] = set()

    # -- local steps --------------------------------------------------------
    def read_model(self) -> None:
        """Say that a gradient is being computed on the current model.

        Call it when the gradient reads the model; messages may then be
        handled before :meth:`local_step` counts the step (emulated compute
        time). The first read of a window fixes the delta's base: the model
        the window's first gradient saw. Without a call, :meth:`local_step`
        takes the base itself.
        """
        if self._window_steps == 0 and not self._base_taken:
            self._window_base = self.vv.copy()
            self._base_taken = True

    def local_step(self) -> Outgoing | None:
        """Count one local SGD step; every ``send_every`` steps, seal the window.

        Call it once per step. Unless :meth:`read_model` was called when the
        gradient read the model, call it right after computing the gradient
        and before handling any further message: the first step of a window
        records the version vector as the delta's base (the model the window's
        first gradient saw).

        Returns
        -------
        Outgoing or None
            The sealed delta's header, to send with the runtime's open-delta
            buffer to every neighbour; None while the window stays open.

        Raises
        ------
        RuntimeError
            If called after :meth:`finish`.
        """
        if self.finished:
            raise RuntimeError("local_step() after finish()")
        self.vv_total += 1
        if self._alone:  # a lone node: plain SGD, nothing to seal or send
            self.vv[self.node_id] += 1
            return None
        if self._window_steps == 0:
            # the window opens with the model its first gradient was computed on
            if not self._base_taken:
                self._window_base = self.vv.copy()
            self._base_taken = False
        self.vv[self.node_id] += 1
        self._window_steps += 1
        if self._window_steps >= self.send_every:
            return self._seal()
        return None

    def lead_steps(self) -> int:
        """How many steps this node is ahead of its slowest neighbour that has not finished.

        ``V_i[i] - min V_i[u]`` over neighbours u without a ``fin`` (0 when all
        have finished). Used for the optional bound ``max_lead_steps``: the
        slowest unfinished node of the run sees every neighbour at or above its
        own count less at most ``send_every - 1`` unsent steps, so with a bound
        >= ``send_every`` it never waits and the bound cannot deadlock.
        """
        fin = self._fin_deltas
        live = [self.vv[u] for u in self.neighbours if fin[u] < 0]
        return int(self.vv[self.node_id] - min(live)) if live else 0

    @property
    def window_steps(self) -> int:
        """Local steps in the open window (0: the next step opens a new one)."""
        return self._window_steps

    def _seal(self) -> Outgoing:
        header = Header(
            "delta",
            self.node_id,
            self.node_id,
            self.deltas_sealed,
            self._window_steps,
            self._window_base,
            self.vv,
            self.dtype,
            (self.n_params,),
        )
        self.deltas_sealed += 1
        self._window_steps = 0
        return Outgoing(header, self.neighbours)

    def finish(self) -> list[Outgoing]:
        """Stop stepping: seal the partial window (if any) and flood this node's ``fin``.

        Returns
        -------
        list of Outgoing
            Zero or one delta (the partial window, sent with the open buffer),
            then the ``fin`` message, each to every neighbour.
        """
        if self.finished:
            return []
        out = [self._seal()] if self._window_steps else []
        self.finished = True
        me = self.node_id
        self._record_fin(me, self.deltas_sealed, int(self.vv[me]))
        fin = Header(
            "fin",
            me,
            me,
            self.deltas_sealed,
            int(self.vv[me]),
            _NO_VV,
            self.vv,
        )
        out.append(Outgoing(fin, self.neighbours))
        return out

    # -- incoming -----------------------------------------------------------
    def receive(self, header: Header) -> tuple[bool, Outgoing | None]:
        """Process one validated message from a neighbour.

        Parameters
        ----------
        header : Header
            The decoded header; ``header.sender`` must be a neighbour.

        Returns
        -------
        apply : bool
            True if the runtime must add this message's delta to its model
            (first receipt of a delta). The version vector already counts it.
        forward : Outgoing or None
            The same message as relayed by this node, to the other neighbours;
            send it with the received payload.

        Raises
        ------
        WireError
            If the kind is not a DASGD kind, the sender is not a neighbour, or
            the message contradicts what the origin announced (a delta beyond
            its ``fin``). Nothing is changed.
        """
        sender = header.sender
        if header.kind not in VV_KINDS:
            raise WireError(
                f"{header.kind} message from node {sender}: DASGD nodes take only {', '.join(VV_KINDS)}"
            )
        if sender not in self.staleness.edge_lag:  # a dict: O(1)
            raise WireError(
                f"message from node {sender}, which is not a neighbour of {self.node_id}"
            )
        kind = header.kind
        origin = header.origin
        if kind == "delta" and header.steps > self.send_every:
            raise WireError(
                f"delta {origin}:{header.seq} of {header.steps} steps; windows hold at most {self.send_every}"
            )
        if kind == "delta" and 0 <= self._fin_end[origin] <= header.seq:
            raise WireError(
                f"delta {origin}:{header.seq} beyond the {self._fin_end[origin]} deltas node {origin} announced"
            )
        if kind == "fin" and header.seq != -(-header.steps // self.send_every):
            # every window holds send_every steps but the last: deltas = ceil(steps / b)
            raise WireError(
                f"fin of node {origin} announces {header.seq} deltas for {header.steps} steps (b = {self.send_every})"
            )
        # duplicates are dropped before any O(n) work: lag is measured on what is new
        if kind == "fin":
            if self._fin_deltas[origin] >= 0:
                self.duplicates += 1
                return False, None
        elif kind == "delta" and (origin == self.node_id or self._seen(origin, header.seq)):
            self.duplicates += 1
            return False, None
        if self.lag_every == 1 or lag_sampled(header, self.lag_every):
            lag, loose = model_lag(header.sender_vv, self.vv)
            self.staleness.record_lag(sender, lag, loose)
        if kind == "complete":
            self._neighbours_complete.add(sender)
            return False, None
        if kind == "have":  # the owner answers it (DasgdNode: deltas from its store)
            return False, None
        if kind == "fin":
            self._record_fin(origin, header.seq, header.steps)
            return False, self._relay(header)
        staleness_steps = apply_staleness(self.vv, header.base_vv, origin)
        self.last_apply_staleness = staleness_steps
        self.staleness.record_apply(origin, sender, staleness_steps)
        self.vv[origin] += header.steps
        self.vv_total += header.steps
        self.applied_deltas[origin] += 1
        self._mark_seen(origin, header.seq)
        return True, self._relay(header)

    def is_new_delta(self, header: Header) -> bool:
        """True if ``header`` is a delta this node has not applied (a query; changes nothing)."""
        return (
            header.kind == "delta"
            and header.origin != self.node_id
            and not self._seen(header.origin, header.seq)
        )

    def node_failed(self, node: int) -> None:
        """Forget a dead node: no longer a neighbour, nor awaited by the drain.

        Its deltas already applied stay applied; later ones (still in flight)
        are applied and relayed to every other neighbour, without the pruning
        of the origin's neighbours. Idempotent.

        Parameters
        ----------
        node : int
            The node that died, in 0..n_nodes-1 and not this node.

        Raises
        ------
        ValueError
            If ``node`` is this node or outside 0..n_nodes-1.
        """
        if node == self.node_id or not 0 <= node < self.n_nodes:
            raise ValueError(f"node {self.node_id} told that node {node} failed: not a peer")
        if node in self.failed:
            return
        self.failed.add(node)
        self.neighbours = tuple(u for u in self.neighbours if u != node)
        self._neighbours_complete.discard(node)

    def neighbour_finished(self, node: int) -> None:
        """``node`` has stopped (it was complete and so were its neighbours): count it complete.

        After a repair a node may leave before a new neighbour hears its
        ``complete``; it needs nothing more, so nobody waits for it. Idempotent.
        """
        if node in self.neighbours:
            self._neighbours_complete.add(node)

    def add_neighbour(self, node: int) -> None:
        """A repair link to ``node`` (a live node): send to it and await its ``complete`` too.

        Relays keep pruning by the original topology (``adjacency``): an
        origin still sends its deltas to its original neighbours itself.
        Idempotent.

        Raises
        ------
        ValueError
            If ``node`` is this node, outside 0..n_nodes-1 or failed.
        """
        if node == self.node_id or not 0 <= node < self.n_nodes or node in self.failed:
            raise ValueError(f"node {self.node_id} cannot link to node {node}")
        if node in self.neighbours:
            return
        self.neighbours = tuple(sorted((*self.neighbours, node)))
        self.staleness.add_edge(node)

    def node_rejoined(self, node: int, *, link: bool) -> None:
        """A dead node was restarted (``--on-node-failure restart``): it is live again.

        Its deltas are relayed with pruning again (it sends to its original
        neighbours itself) and the drain awaits its own ``fin``. With
        ``link``, it is a neighbour of this node again (send to it, await its
        ``complete``). Idempotent.

        A node whose ``fin`` is known here is left as it is (the launcher does
        not restart a node that had finished).

        Raises
        ------
        ValueError
            If ``node`` is this node or outside 0..n_nodes-1.
        """
        if node == self.node_id or not 0 <= node < self.n_nodes:
            raise ValueError(f"node {self.node_id} told that node {node} rejoined: not a peer")
        if self._fin_deltas[node] >= 0:  # (its fin overtook the launcher's decision): keep it
            return
        self.failed.discard(node)
        if link:
            self.add_neighbour(node)
            self._neighbours_complete.discard(node)

    def state(self) -> dict:
        """What a restarted neighbour installs (:meth:`install_state`): this node's bookkeeping.

        Without the open window: its steps are not in the state's model either
        (the driver sends the model less the open delta); they reach the
        restarted node in the sealed delta like every other neighbour's.

        Returns
        -------
        dict
            ``vv`` and ``contiguous`` (ndarray (n_nodes,)), ``applied``
            (deltas applied per origin; own: sealed), ``above`` (origin ->
            sorted seqs applied beyond ``contiguous``), ``fin_deltas`` and
            ``fin_steps`` (ndarray (n_nodes,), -1 where unknown), ``failed``
            (sorted node ids).
        """
        vv = self.vv.copy()
        vv[self.node_id] -= self._window_steps
        applied = self.applied_deltas.copy()
        applied[self.node_id] = self.deltas_sealed
        return {
            "vv": vv,
            "contiguous": self.contiguous_counts(),
            "applied": applied,
            "above": {k: sorted(v) for k, v in self._applied_above.items() if v},
            "fin_deltas": self._fin_deltas.copy(),
            "fin_steps": self._fin_steps.copy(),
            "failed": sorted(self.failed),
        }

    def install_state(
        self, vv, contiguous, applied, above, fin_deltas, fin_steps, failed=()
    ) -> None:
        """Take over a neighbour's bookkeeping (:meth:`state`) as a restarted node.

        This node's own entries are its earlier deltas as the neighbour holds
        them: it seals its next delta with sequence number ``contiguous[me]``
        and counts its steps from ``vv[me]``. Staleness statistics start anew.

        Parameters
        ----------
        vv, contiguous, applied, fin_deltas, fin_steps : array-like of shape (n_nodes,)
            As returned by :meth:`state` (``fin_*``: -1 where unknown).
        above : mapping of int to iterable of int
        failed : iterable of int
            Nodes known dead (added to :attr:`failed`; neighbours unchanged).

        Raises
        ------
        ValueError
            If this node has stepped or received anything already, a vector has
            the wrong length, or this node's own deltas are not a contiguous
            prefix at the neighbour (a gap: its next sequence number is unknown).
        """
        n, me = self.n_nodes, self.node_id
        if self.vv_total or self.deltas_sealed or self.applied_deltas.any() or self.finished:
            raise ValueError(f"node {me} installs a state after it stepped or received deltas")
        arrays = [np.asarray(a) for a in (vv, contiguous, applied, fin_deltas, fin_steps)]
        if any(a.shape != (n,) for a in arrays):
            raise ValueError(f"state vectors must have shape ({n},)")
        vv, contiguous, applied, fin_deltas, fin_steps = arrays
        if above.get(me) or applied[me] != contiguous[me]:
            raise ValueError(
                f"node {me}'s earlier deltas are not a contiguous prefix at the donor "
                f"({int(applied[me])} held, {int(contiguous[me])} contiguous)"
            )
        self.vv[:] = vv
        self.vv_total = int(self.vv.sum())
        self._applied_below[:] = contiguous
        self._applied_below[me] = 0
        self._applied_above = {int(k): set(v) for k, v in above.items() if v and k != me}
        self.applied_deltas[:] = applied
        self.applied_deltas[me] = 0
        self.deltas_sealed = int(contiguous[me])
        # fins known here already (a dead node's, from the launcher) are kept
        ours = self._fin_deltas >= 0
        self._fin_deltas[:] = np.where(ours, self._fin_deltas, fin_deltas)
        self._fin_steps[:] = np.where(ours, self._fin_steps, fin_steps)
        self._fin_deltas[me] = self._fin_steps[me] = -1
        for k in failed:
            if k != me:
                self.failed.add(int(k))
        # a dead node's fin travels as its count, which lost deltas make smaller than its last
        # sequence number: no "beyond the fin" check for those (unless known here already)
        taken = ~ours & (self._fin_deltas >= 0)
        self._fin_end[taken] = self._fin_deltas[taken]
        self._fin_end[[k for k in self.failed if taken[k]]] = -1
        self._fins_known = int(np.count_nonzero(self._fin_deltas >= 0))

    def failed_fin(self, node: int, deltas: int, steps: int, lost=()) -> None:
        """The ``fin`` of a dead node as the launcher derived it from the survivors' holdings.

        Ignored when the node's own ``fin`` is known. From then on the drain
        waits for exactly ``deltas`` deltas and ``steps`` steps of it, less the
        ``lost`` ones: sequence numbers below ``deltas`` that no survivor holds
        (a second node died with them, :func:`~dasgd.core.failures.lost_deltas`),
        ``send_every`` steps each.

        Raises
        ------
        ValueError
            If ``node`` was not reported dead, a count is negative, or a lost
            sequence number is not below ``deltas``.
        """
        lost = sorted(set(int(q) for q in lost))
        if (
            node not in self.failed
            or deltas < 0
            or steps < 0
            or (lost and not 0 <= lost[0] <= lost[-1] < deltas)
            or steps < len(lost) * self.send_every
        ):
            raise ValueError(f"fin of node {node} ({deltas} deltas, {steps} steps) refused")
        if self._fin_deltas[node] < 0:
            self._record_fin(node, deltas - len(lost), steps - len(lost) * self.send_every)
            self._fin_end[node] = deltas

    def held(self, node: int) -> dict:
        """What this node holds of ``node``'s deltas (the launcher's input to :meth:`failed_fin`).

        Returns
        -------
        dict
            ``deltas`` (applied), ``contiguous`` (every seq below is applied),
            ``steps`` (its steps in this model), ``fin_deltas`` and
            ``fin_steps`` (its own ``fin``, or None).
        """
        fin = int(self._fin_deltas[node])
        return {
            "deltas": int(self.applied_deltas[node]),
            "contiguous": int(self._applied_below[node]),
            "above": sorted(self._applied_above.get(node, ())),
            "steps": int(self.vv[node]),
            "fin_deltas": fin if fin >= 0 else None,
            "fin_steps": int(self._fin_steps[node]) if fin >= 0 else None,
        }

    def known_fins(self, to: int) -> list[Outgoing]:
        """Every ``fin`` this node knows but ``to``'s own, as relayed by this node, for ``to``.

        Sent to a restarted neighbour once it has its state: a ``fin`` flooded
        while it was down may have missed it (``fin`` messages are not stored).
        """
        out = []
        for k in np.flatnonzero(self._fin_deltas >= 0):
            if k != to:
                header = Header(
                    "fin",
                    int(k),
                    self.node_id,
                    int(self._fin_deltas[k]),
                    int(self._fin_steps[k]),
                    _NO_VV,
                    self.vv,
                )
                out.append(Outgoing(header, (to,)))
        return out

    def contiguous_counts(self) -> np.ndarray:
        """Per origin, the number of its first deltas all applied here (own: all sealed)."""
        counts = self._applied_below.copy()
        counts[self.node_id] = self.deltas_sealed
        return counts

    def have(self, failed: int, to: int, *, answer: bool) -> Outgoing:
        """The ``have`` message (anti-entropy after ``failed`` died) for neighbour ``to``."""
        header = Header(
            "have", failed, self.node_id, int(answer), 0, self.contiguous_counts(), self.vv
        )
        return Outgoing(header, (to,))

    def _record_fin(self, origin: int, deltas: int, steps: int) -> None:
        self._fin_deltas[origin] = deltas
        self._fin_steps[origin] = steps
        self._fin_end[origin] = deltas
        self._fins_known += 1

    def _relay(self, header: Header) -> Outgoing | None:
        origin, sender = header.origin, header.sender
        skip = ()
        if self._adjacency is not None and origin not in self.failed:
            skip = self._adjacency[origin]
        to = tuple(u for u in self.neighbours if u != sender and u != origin and u not in skip)
        if not to:
            return None
        # the live vector: the driver encodes (or copies) it before the next call
        return Outgoing(header.replace_sender(self.node_id, self.vv), to)

    def _seen(self, origin: int, seq: int) -> bool:
        if seq < self._applied_below[origin]:
            return True
        above = self._applied_above.get(origin)
        return above is not None and seq in above

    def _mark_seen(self, origin: int, seq: int) -> None:
        below = int(self._applied_below[origin])
        above = self._applied_above.get(origin)
        if seq != below:
            if above is None:
                above = self._applied_above[origin] = set()
            above.add(seq)
            return
        below = seq + 1
        if above:
            while below in above:
                above.remove(below)
                below += 1
            if not above:
                del self._applied_above[origin]
        self._applied_below[origin] = below

    # -- drain --------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """True when a ``fin`` is known from every node and every announced delta is applied.

        A dead node's ``fin`` is its own, or the one :meth:`failed_fin` records.
        """
        if self._fins_known < self.n_nodes:
            return False
        # own entries match by construction (the own fin records own counts)
        applied = self.applied_deltas.copy()
        applied[self.node_id] = self._fin_deltas[self.node_id]
        return bool(
            np.array_equal(applied, self._fin_deltas) and np.array_equal(self.vv, self._fin_steps)
        )

    def announce_complete(self) -> Outgoing | None:
        """Once complete, the ``complete`` message for every neighbour (returned once)."""
        if self._complete_announced or not self.complete:
            return None
        self._complete_announced = True
        header = Header("complete", self.node_id, self.node_id, 0, 0, _NO_VV, self.vv)
        return Outgoing(header, self.neighbours)

    @property
    def can_stop(self) -> bool:
        """True when this node announced completeness and every neighbour did too."""
        return self._complete_announced and self._neighbours_complete.issuperset(self.neighbours)

    @property
    def missing(self) -> dict:
        """What a node still waits for, for the error message of a drain that timed out."""
        fin = self._fin_deltas
        return {
            "fin_from": [int(k) for k in np.flatnonzero(fin < 0)],
            "deltas_from": [
                k
                for k in range(self.n_nodes)
                if k != self.node_id and fin[k] >= 0 and self.applied_deltas[k] != fin[k]
            ],
            "neighbours_not_complete": [
                u for u in self.neighbours if u not in self._neighbours_complete
            ],
        }

    def summary(self) -> dict:
        """Counters and staleness statistics of the whole run (JSON-ready).

        Per-origin lists (``applied_deltas_per_origin``, ``version_vector``,
        ``fin_*_per_origin``, ``origins``) only for runs of at most
        :data:`PER_ORIGIN_DETAIL_MAX` nodes; ``fin_digest`` (see
        :func:`counts_digest`) always.
        """
        detail = self.n_nodes <= PER_ORIGIN_DETAIL_MAX
        out = {
            "steps": int(self.vv[self.node_id]),
            "deltas_sealed": self.deltas_sealed,
            "deltas_applied": int(self.applied_deltas.sum()),
            "duplicates": self.duplicates,
            "complete": self.complete,
            "failed_nodes": sorted(self.failed),
            "fin_digest": counts_digest(self._fin_deltas, self._fin_steps),
        }
        if detail:
            out |= {
                "applied_deltas_per_origin": self.applied_deltas.tolist(),
                "version_vector": self.vv.tolist(),
                "fin_deltas_per_origin": [None if v < 0 else int(v) for v in self._fin_deltas],
                "fin_steps_per_origin": [None if v < 0 else int(v) for v in self._fin_steps],
            }
        return out | self.staleness.summary(per_origin=detail)
