"""The DASGD node protocol as a sans-IO state machine.

:class:`NodeProtocol` does the bookkeeping of one node of decentralized
asynchronous SGD (Tosi & Theobald, "Convergence Analysis of Decentralized ASGD",
arXiv 2309.03754; ALGORITHMS.md §1): its version vector, its open delta window,
which deltas it has applied, staleness statistics, and the end-of-run drain.
It imports no socket, clock or file: messages come in as arguments and go out
as return values, so the same object runs under the ZeroMQ runtime
(:mod:`dasgd.node`) and in unit tests with scripted message orders.

The runtime owns the arrays: it adds each local update ``u`` to the model and to
its open delta buffer, calls :meth:`NodeProtocol.local_step`, and when that
returns an :class:`Outgoing` it sends the buffer with that header and zeroes the
buffer. For each incoming message it calls :meth:`NodeProtocol.receive`; when
told to apply, it adds the payload to the model, then relays the same payload
with the returned header.

End of run (DESIGN.md §8, a dasgd choice): a node that stops stepping calls
:meth:`~NodeProtocol.finish`, which seals the partial window and floods a
``fin`` message carrying its totals. A node that holds every delta of every
``fin`` it knows, for all n origins, is *complete* and tells its neighbours once
(``complete``). It may stop when it and all its neighbours are complete: no
neighbour then needs anything it could relay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import WireError
from .staleness import StalenessTracker, apply_staleness, model_lag
from .wire import VV_KINDS, Header

__all__ = ["NodeProtocol", "Outgoing"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to send: ``header`` (and, for deltas, the payload) to each node in ``to``."""

    header: Header
    to: tuple[int, ...]


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
    adjacency : mapping of int to iterable of int, optional
        Every node's neighbours (the whole topology). With it, a delta (or fin)
        is not relayed to the origin's own neighbours: the origin sends it to
        them itself, over links that lose nothing while both ends live. By
        induction over the distance from the origin every node still receives
        it; on a complete graph no duplicates remain. Without it: plain flooding.

    Attributes
    ----------
    vv : ndarray of shape (n_nodes,), int64
        The version vector V_i: local steps of each origin contained in the model.
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
    ) -> None:
        self.node_id = node_id
        self.neighbours = tuple(sorted(neighbours))
        if node_id in self.neighbours or not 0 <= node_id < n_nodes:
            raise ValueError(
                f"node {node_id} cannot be its own neighbour or outside 0..{n_nodes - 1}"
            )
        self.n_nodes = n_nodes
        self.send_every = send_every
        # relay targets per origin: my neighbours minus the origin and its own neighbours
        self._relay_to = [
            tuple(
                u
                for u in self.neighbours
                if u != k and (adjacency is None or u not in set(adjacency[k]))
            )
            for k in range(n_nodes)
        ]
        self.n_params = n_params
        self.dtype = dtype
        self.vv = np.zeros(n_nodes, dtype=np.int64)
        self._window_base = self.vv.copy()
        self._window_steps = 0
        self.deltas_sealed = 0
        # de-duplication: every seq < _applied_below[k] is applied; later ones in _applied_above[k]
        self._applied_below = [0] * n_nodes
        self._applied_above: list[set[int]] = [set() for _ in range(n_nodes)]
        self.applied_deltas = np.zeros(n_nodes, dtype=np.int64)
        self.duplicates = 0
        self.last_apply_staleness = 0
        self.staleness = StalenessTracker(node_id, self.neighbours, n_nodes)
        # drain state
        self.finished = False
        self._fin_deltas: dict[int, int] = {}
        self._fin_steps: dict[int, int] = {}
        self._complete_announced = False
        self._neighbours_complete: set[int] = set()

    # -- local steps --------------------------------------------------------
    def local_step(self) -> Outgoing | None:
        """Count one local SGD step; every ``send_every`` steps, seal the window.

        Call it once per step, after computing the gradient on the current model
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
        if self._window_steps == 0:
            # the window opens with the model its first gradient was computed on
            self._window_base = self.vv.copy()
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
        live = [self.vv[u] for u in self.neighbours if u not in self._fin_deltas]
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
            self.vv.copy(),
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
        self._fin_deltas[me] = self.deltas_sealed
        self._fin_steps[me] = int(self.vv[me])
        fin = Header(
            "fin",
            me,
            me,
            self.deltas_sealed,
            int(self.vv[me]),
            np.zeros(0, np.int64),
            self.vv.copy(),
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
        if sender not in self.staleness.edge_lag:
            raise WireError(
                f"message from node {sender}, which is not a neighbour of {self.node_id}"
            )
        kind = header.kind
        origin = header.origin
        if kind == "delta" and header.steps > self.send_every:
            raise WireError(
                f"delta {origin}:{header.seq} of {header.steps} steps; windows hold at most {self.send_every}"
            )
        if (
            kind == "delta"
            and origin in self._fin_deltas
            and header.seq >= self._fin_deltas[origin]
        ):
            raise WireError(
                f"delta {origin}:{header.seq} beyond the {self._fin_deltas[origin]} deltas node {origin} announced"
            )
        if kind == "fin" and header.seq != -(-header.steps // self.send_every):
            # every window holds send_every steps but the last: deltas = ceil(steps / b)
            raise WireError(
                f"fin of node {origin} announces {header.seq} deltas for {header.steps} steps (b = {self.send_every})"
            )
        lag, loose = model_lag(header.sender_vv, self.vv)
        self.staleness.record_lag(sender, lag, loose)
        if kind == "complete":
            self._neighbours_complete.add(sender)
            return False, None
        if kind == "fin":
            if origin in self._fin_deltas:
                self.duplicates += 1
                return False, None
            self._fin_deltas[origin] = header.seq
            self._fin_steps[origin] = header.steps
            return False, self._relay(header)
        # delta
        if origin == self.node_id or self._seen(origin, header.seq):
            self.duplicates += 1
            return False, None
        staleness_steps = apply_staleness(self.vv, header.base_vv, origin)
        self.last_apply_staleness = staleness_steps
        self.staleness.record_apply(origin, sender, staleness_steps)
        self.vv[origin] += header.steps
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

    def _relay(self, header: Header) -> Outgoing | None:
        to = tuple(u for u in self._relay_to[header.origin] if u != header.sender)
        if not to:
            return None
        return Outgoing(header.replace_sender(self.node_id, self.vv.copy()), to)

    def _seen(self, origin: int, seq: int) -> bool:
        return seq < self._applied_below[origin] or seq in self._applied_above[origin]

    def _mark_seen(self, origin: int, seq: int) -> None:
        above = self._applied_above[origin]
        if seq != self._applied_below[origin]:
            above.add(seq)
            return
        below = seq + 1
        while below in above:
            above.remove(below)
            below += 1
        self._applied_below[origin] = below

    # -- drain --------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """True when a ``fin`` is known from every node and every announced delta is applied."""
        if len(self._fin_deltas) < self.n_nodes:
            return False
        for k in range(self.n_nodes):
            if k == self.node_id:
                continue
            if self.applied_deltas[k] != self._fin_deltas[k] or self.vv[k] != self._fin_steps[k]:
                return False
        return True

    def announce_complete(self) -> Outgoing | None:
        """Once complete, the ``complete`` message for every neighbour (returned once)."""
        if self._complete_announced or not self.complete:
            return None
        self._complete_announced = True
        header = Header(
            "complete", self.node_id, self.node_id, 0, 0, np.zeros(0, np.int64), self.vv.copy()
        )
        return Outgoing(header, self.neighbours)

    @property
    def can_stop(self) -> bool:
        """True when this node announced completeness and every neighbour did too."""
        return self._complete_announced and self._neighbours_complete.issuperset(self.neighbours)

    @property
    def missing(self) -> dict:
        """What a node still waits for, for the error message of a drain that timed out."""
        return {
            "fin_from": [k for k in range(self.n_nodes) if k not in self._fin_deltas],
            "deltas_from": [
                k
                for k, n in self._fin_deltas.items()
                if k != self.node_id and self.applied_deltas[k] != n
            ],
            "neighbours_not_complete": [
                u for u in self.neighbours if u not in self._neighbours_complete
            ],
        }

    def summary(self) -> dict:
        """Counters and staleness statistics of the whole run (JSON-ready)."""
        return {
            "steps": int(self.vv[self.node_id]),
            "deltas_sealed": self.deltas_sealed,
            "deltas_applied": int(self.applied_deltas.sum()),
            "applied_deltas_per_origin": self.applied_deltas.tolist(),
            "version_vector": self.vv.tolist(),
            "fin_deltas_per_origin": [self._fin_deltas.get(k) for k in range(self.n_nodes)],
            "fin_steps_per_origin": [self._fin_steps.get(k) for k in range(self.n_nodes)],
            "duplicates": self.duplicates,
            "complete": self.complete,
            **self.staleness.summary(),
        }
