"""The DASGD node as a clock-free state machine: every decision a node makes, no I/O.

:class:`DasgdNode` owns one node's model vector, open delta, optimizer and
mini-batch stream, and wraps the bookkeeping of
:class:`~dasgd.core.protocol.NodeProtocol`. It never reads a clock, sleeps or
touches a socket or file: the time is handed in (``now``, seconds on the
driver's clock: wall time in the process runtime, virtual time in the
simulator) and what to do is returned. The process runtime
(:mod:`dasgd.runtime.node`) and the simulator (:mod:`dasgd.sim`) drive the
same objects, so a simulated node decides exactly as a real one does.

A driver repeats::

    sends, wait = node.advance(now, work_s=..., backlog_msgs=..., backlog_bytes=...)
    # put every Outgoing of `sends` on the wire, then (dasgd.core.actions):
    #   wait == CONTINUE      -> handle waiting messages, call advance again
    #   wait is a float t     -> until time t, handle messages as they arrive
    #   wait in WAITS         -> handle messages until one arrives (with a deadline)
    #   wait == DONE          -> write results, exit
    # for every message:  sends = node.on_message(header, payload)

One local step (ALGORITHMS.md §1): the gradient reads the model
(:meth:`~dasgd.core.protocol.NodeProtocol.read_model` fixes the window's base),
the node then waits the emulated compute time (``--compute-time``, times its
slowdown factor, plus the time a slowed node owes for its real work) while
messages keep arriving and being applied, and finally the update is added to
the model and to the open delta, which is sealed every ``send_every`` steps.
A gradient that waited is therefore applied to a newer model than the one it
was computed on: the staleness a slow device causes.

A restarted node (``--on-node-failure restart``) first calls :meth:`DasgdNode.join`:
it asks a live neighbour for its state (``join``), keeps what else arrives
meanwhile, and once the ``state`` is in (the neighbour's model without its open
window, its version vector, applied deltas and known ``fin`` totals) continues
its remaining steps from the steps the survivors hold of it; its neighbours then
send it the stored deltas and the ``fin`` messages it may lack (anti-entropy).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from ..errors import Diverged, WireError
from . import wire
from .actions import CONTINUE, DONE, WAIT_BACKLOG, WAIT_DRAIN, WAIT_LEAD, WAIT_STATE
from .emulation import ComputeTime, Slowdown
from .protocol import PER_ORIGIN_DETAIL_MAX, NodeProtocol, Outgoing

__all__ = ["DasgdNode"]

_NOTHING: tuple = ()
_NO_VV = np.zeros(0, np.int64)


class DasgdNode:
    """One DASGD node's state and decisions, handed the time and returning actions.

    Parameters
    ----------
    node_id : int
    neighbours : iterable of int
    n_nodes : int
    model : dasgd.ml.models.Model
        Computes ``loss_and_grad(params, X, y, out=grad)``.
    X : ndarray of shape (m, d), the model's dtype
        This node's training shard; ``y`` : ndarray of shape (m,), int64.
    x0 : ndarray of shape (n_params,)
        The common initial model (copied).
    optimizer : dasgd.ml.optim optimizer
        ``update(grad) -> ndarray`` returns the parameter change.
    sampler : dasgd.ml.data.BatchSampler
    total_steps : int
        Local steps to take before draining.
    send_every : int
        b: local steps per sealed delta.
    compute_time : ComputeTime, optional
        Emulated seconds per gradient (already times the slowdown factor).
    slowdown_factor : float, default 1
        >= 1: the node owes (factor - 1) times its reported work
        (``advance(work_s=...)``) as waits between read and update.
    delay_rule : {"none", "inverse", "drop"}
        Named in the records; ``delay_scale`` applies it.
    delay_scale : callable, optional
        ``delay_scale(staleness_steps) -> float``: the factor a received delta
        is applied with (Koloskova et al. 2022, Eq. (11), applied to apply
        staleness: an extension the papers do not analyse, ALGORITHMS.md §4);
        0 drops it. None: every delta is applied as it is.
    max_lead_steps : int or None
        Optional lead bound (see :meth:`NodeProtocol.lead_steps`).
    max_backlog_msgs, max_backlog_bytes : int
        Backpressure: no step while more messages (or, with any message
        waiting, more bytes) than this wait to be sent.
    adjacency : mapping of int to set of int, optional
        The whole topology, for the pruned relay (:class:`NodeProtocol`).
    check_finite : bool
        Reject received deltas holding NaN or inf (:class:`~dasgd.errors.WireError`).
    new_buffer : callable, optional
        ``new_buffer() -> ndarray`` of shape (n_params,): a fresh open-delta
        buffer after a seal hands the sealed one to the driver. Default
        ``np.empty``; the runtime passes a pool of buffers ZeroMQ has released.
    vv_dtype : numpy integer dtype
        Of the version vectors (see :class:`NodeProtocol`).
    lag_every : int
        Model-lag sampling (see :class:`NodeProtocol`).
    events : dasgd.analysis.events.EventRecorder, optional
        Told every gradient (read and update times, c_g) and every applied
        delta (stamped with the recorder's ``now``, which the driver sets).

    Attributes
    ----------
    params : ndarray of shape (n_params,)
        The model x_i.
    delta_sum : ndarray of shape (n_params,)
        Sum of this node's own sealed deltas (for the run's oracle check).
    protocol : NodeProtocol

    References
    ----------
    M. Tosi, M. Theobald, "Convergence Analysis of Decentralized ASGD",
    arXiv 2309.03754, 2023, Algorithm 1 (ALGORITHMS.md §1).
    """

    def __init__(
        self,
        node_id: int,
        neighbours,
        n_nodes: int,
        *,
        model,
        X,
        y,
        x0: np.ndarray,
        optimizer,
        sampler,
        total_steps: int,
        send_every: int,
        compute_time: ComputeTime | None = None,
        slowdown_factor: float = 1.0,
        delay_rule: str = "none",
        delay_scale=None,
        max_lead_steps: int | None = None,
        max_backlog_msgs: int = 32,
        max_backlog_bytes: int = 64 << 20,
        adjacency=None,
        check_finite: bool = True,
        new_buffer=None,
        vv_dtype=np.int64,
        lag_every: int = 1,
        events=None,
        delta_store_bytes: int = 0,
    ) -> None:
        self.node_id = node_id
        self.events = events
        self.neighbours = sorted(neighbours)
        self.n_nodes = n_nodes
        self.model = model
        self.X, self.y = X, y
        self.params = np.array(x0, copy=True)
        self.dtype = self.params.dtype
        self.n_params = self.params.size
        self._x0 = self.params.copy()
        # in the model's dtype: a float64 sum of float32 deltas doubles the cost of sealing
        self.delta_sum = np.zeros(self.n_params, dtype=self.dtype)
        self.optimizer = optimizer
        self.sampler = sampler
        self.total_steps = total_steps
        self.compute_time = compute_time
        self.slowdown = Slowdown(slowdown_factor)
        self.delay_rule = delay_rule
        self.delay_scale = delay_scale
        self.max_lead_steps = max_lead_steps
        self.max_backlog_msgs = max_backlog_msgs
        self.max_backlog_bytes = max_backlog_bytes
        self.check_finite = check_finite
        self.new_buffer = new_buffer or (lambda: np.empty(self.n_params, dtype=self.dtype))
        self.protocol = NodeProtocol(
            node_id,
            self.neighbours,
            n_nodes,
            send_every,
            n_params=self.n_params,
            dtype=self.dtype.name,
            adjacency=adjacency,
            vv_dtype=vv_dtype,
            lag_every=lag_every,
        )
        self.alone = not self.neighbours
        self.open_delta = self.new_buffer()
        self._grad = np.empty(self.n_params, dtype=self.dtype)
        self._update: np.ndarray | None = None  # the change of the step in flight
        self._read_t = 0.0  # when the step in flight read the model, and c_g of that model
        self._read_gradients = 0
        self._compute_end = 0.0
        self.phase = "ready"  # ready -> computing -> ready ... -> draining -> done
        self.deltas_dropped = 0
        self.lead_waits = 0
        self.backlog_waits = 0
        self.compute_s = 0.0
        self.gradients_computed = 0
        self.t_start: float | None = None
        self.t_train_end: float | None = None
        self.t_done: float | None = None
        self._loss_sum = 0.0
        self._loss_count = 0
        self._interval_t = 0.0
        self._interval_step = 0
        # anti-entropy after a failure: recent deltas (own and applied), oldest first
        self.delta_store_bytes = delta_store_bytes
        self._store: OrderedDict[tuple[int, int], tuple] = OrderedDict()
        self._stored_bytes = 0
        self._have_sent: set[tuple[int, int]] = set()
        self.deltas_pushed = 0
        self.store_misses = 0
        # restart with state transfer: joins this node answers (joiner -> its deltas to hold
        # first), and, while this node itself joins, the donor and what arrived meanwhile
        self._joins: dict[int, int] = {}
        self._donor: int | None = None
        self._join_deltas = 0
        self._held_back: list[tuple] = []
        self._deferred_haves: dict[int, wire.Header] = {}  # restarted sender -> its have
        self.held_back_dropped = 0
        self.restored: dict | None = None

    # -- state -------------------------------------------------------------
    @property
    def step(self) -> int:
        """Local steps taken so far."""
        return int(self.protocol.vv[self.node_id])

    progress_step = step

    @property
    def drained(self) -> bool:
        return self.phase == "done"

    # -- messages ------------------------------------------------------------
    def on_message(self, header: wire.Header, payload) -> list[Outgoing] | tuple:
        """Handle one decoded message from a neighbour: apply a new delta, return the relays.

        Parameters
        ----------
        header : Header
        payload : ndarray of shape (n_params,) or None
            The delta (read only; never kept).

        Returns
        -------
        list of Outgoing
            The relay of the same message (its ``payload`` is ``payload``
            itself, so a driver may forward the frame it received), or empty.

        Raises
        ------
        WireError
            The message is not valid here (see :meth:`NodeProtocol.receive`),
            or a new delta holds NaN or inf; nothing was changed.
        """
        protocol = self.protocol
        kind = header.kind
        if kind == "join":
            return self._on_join(header)
        if kind == "have" and header.origin == header.sender in protocol.failed:
            # a restarted node's have may overtake the launcher's news of its restart: what
            # this node sent it now would be dropped; answered once the news is in
            self._deferred_haves[header.sender] = header
            return _NOTHING
        if self.phase == "joining":
            if kind == "state" and header.sender == self._donor:
                return self._install(header, payload)
            if kind not in wire.VV_KINDS or header.sender not in protocol.neighbours:
                raise WireError(f"{kind} from node {header.sender} while node {self.node_id} joins")
            # held back until the state is in (the state may already hold it: de-duplicated then)
            self._held_back.append((header, None if payload is None else np.array(payload)))
            return _NOTHING
        if kind == "state":
            raise WireError(
                f"state from node {header.sender}, which node {self.node_id} did not ask"
            )
        if self.check_finite and payload is not None and protocol.is_new_delta(header):
            wire.check_finite_array(header, payload)  # only for deltas that will be applied
        apply, forward = protocol.receive(header)
        if header.kind == "have":
            return self._on_have(header)
        if apply:
            self._remember(header, payload)
            if self.events is not None:
                self.events.apply(
                    header.origin,
                    header.sender,
                    header.steps,
                    header.seq,
                    protocol.last_apply_staleness,
                )
            if self.delay_scale is None:
                self.params += payload
            else:  # extension: scale by apply staleness (models then differ between nodes)
                scale = self.delay_scale(protocol.last_apply_staleness)
                if scale > 0:
                    self.params += scale * payload
                else:
                    self.deltas_dropped += 1
            if self._joins:  # a restarted neighbour may be waiting for this delta
                answers = self._answer_joins()
                if answers:
                    if forward is not None:
                        forward.payload = payload
                        answers.insert(0, forward)
                    return answers
        if forward is None:
            return _NOTHING
        forward.payload = payload
        return [forward]

    # -- restart with state transfer ---------------------------------------------
    def join(self, donor: int, deltas: int) -> list[Outgoing]:
        """Start as a restarted node: ask neighbour ``donor`` for its state.

        Until the state arrives :meth:`advance` answers :data:`WAIT_STATE` and
        messages from neighbours are kept (copied) to be handled after it.

        Parameters
        ----------
        donor : int
            A live neighbour.
        deltas : int
            How many of this node's earlier deltas the survivors hold (the
            launcher's count from their reports); the donor answers once it
            holds all of them.

        Returns
        -------
        list of Outgoing
            The ``join`` message.

        Raises
        ------
        ValueError
            If this node has started, or ``donor`` is not a neighbour.
        """
        if self.phase != "ready" or self.t_start is not None:
            raise ValueError(f"node {self.node_id} joins after it started")
        if donor not in self.protocol.neighbours:
            raise ValueError(f"node {self.node_id}: donor {donor} is not a neighbour")
        self.phase = "joining"
        self._donor = donor
        self._join_deltas = int(deltas)
        me = self.node_id
        header = wire.Header("join", me, me, int(deltas), 0, _NO_VV, _NO_VV)
        return [Outgoing(header, (donor,))]

    def node_rejoined(self, node: int, *, link: bool) -> list[Outgoing]:
        """A dead node was restarted: see :meth:`NodeProtocol.node_rejoined`.

        Returns
        -------
        list of Outgoing
            The answers to its ``have`` or ``join`` if they came before this news.
        """
        self.protocol.node_rejoined(node, link=link)
        self.neighbours = list(self.protocol.neighbours)
        self._have_sent = {(f, u) for f, u in self._have_sent if node not in (f, u)}
        out = []
        have = self._deferred_haves.pop(node, None)
        if have is not None and link:
            out += self._on_have(have)
        if self._joins:
            out += self._answer_joins()
        return out

    def _on_join(self, header: wire.Header) -> list[Outgoing]:
        joiner = header.sender
        if header.origin != joiner or (
            joiner not in self.protocol.neighbours and joiner not in self.protocol.failed
        ):
            raise WireError(f"join from node {joiner}, which is not a neighbour of {self.node_id}")
        if self.phase == "joining":
            raise WireError(f"join from node {joiner} while node {self.node_id} joins itself")
        self._joins[joiner] = header.seq
        return self._answer_joins()

    def _answer_joins(self) -> list[Outgoing]:
        """The ``state`` for each restarted neighbour whose earlier deltas this node holds."""
        protocol = self.protocol
        out = []
        for joiner, expected in list(self._joins.items()):
            if joiner not in protocol.neighbours:
                continue  # its join overtook the news of its restart: answered after it
            held = int(protocol.applied_deltas[joiner])
            if held < expected or protocol.contiguous_counts()[joiner] != held:
                continue  # anti-entropy among the survivors brings the rest
            del self._joins[joiner]
            state = protocol.state()
            model = self.params - self.open_delta if protocol.window_steps else self.params.copy()
            fin_deltas = np.where(state["fin_deltas"] < 0, wire.UNKNOWN_COUNT, state["fin_deltas"])
            fin_steps = np.where(state["fin_steps"] < 0, wire.UNKNOWN_COUNT, state["fin_steps"])
            extra = {
                "applied": wire.vv_to_bytes(state["applied"]),
                "above": [[int(k), [int(q) for q in v]] for k, v in state["above"].items()],
                "fin_deltas": wire.vv_to_bytes(fin_deltas),
                "fin_steps": wire.vv_to_bytes(fin_steps),
                "failed": [int(k) for k in state["failed"]],
            }
            me = self.node_id
            header = wire.Header(
                "state",
                me,
                me,
                0,
                0,
                state["contiguous"],
                state["vv"],
                self.dtype.name,
                (self.n_params,),
                extra,
            )
            out.append(Outgoing(header, (joiner,), payload=model))
        return out

    def _install(self, header: wire.Header, payload) -> list[Outgoing]:
        """The donor's ``state``: take it over, then handle what was held back."""
        protocol = self.protocol
        extra = header.extra
        fins = []
        for key in ("fin_deltas", "fin_steps"):
            counts = np.asarray(extra[key], dtype=np.int64)
            fins.append(np.where(counts == wire.UNKNOWN_COUNT, -1, counts))
        wire.check_finite_array(header, payload)
        try:  # checks everything before it changes anything
            protocol.install_state(
                header.sender_vv, header.base_vv, extra["applied"], extra["above"], *fins
            )
        except ValueError as exc:  # a state this node cannot take: dropped, still joining
            raise WireError(f"state from node {header.sender}: {exc}") from None
        np.copyto(self.params, payload)
        self.delta_sum[:] = 0  # the earlier deltas' sum died with the old process
        for _ in range(self.step):  # the batches the node would have drawn so far
            self.sampler.next_batch()
        self.restored = {
            "donor": int(header.sender),
            "deltas": int(protocol.deltas_sealed),
            "steps": self.step,
        }
        if self.n_nodes <= PER_ORIGIN_DETAIL_MAX:  # the analysis rebuilds its version vector
            self.restored["version_vector"] = protocol.vv.tolist()
        self.phase = "ready"
        self._donor = None
        me = self.node_id
        # the neighbours send what this node lacks: stored deltas and the fins it may have missed
        out = [protocol.have(me, u, answer=True) for u in protocol.neighbours]
        held_back, self._held_back = self._held_back, []
        for h, p in held_back:
            try:
                handled = self.on_message(h, p)
            except WireError:  # (a delta beyond a fin, NaN): dropped as it would have been
                self.held_back_dropped += 1
                continue
            for o in handled:
                o.live = o.payload is not None  # copied by the driver: p is not a received frame
                out.append(o)
        return out

    def node_failed(self, node: int, links=()) -> list[Outgoing]:
        """A node of the run died (``--on-node-failure continue``): forget it, link up, repair.

        See :meth:`NodeProtocol.node_failed`. Repair links (``links``: live
        nodes to link to, see :meth:`NodeProtocol.add_neighbour`) are added
        first; then every neighbour not yet asked since ``node`` died gets a
        ``have`` request (anti-entropy: it answers with the deltas this node
        lacks from its store, and its own ``have``). Calling it again (the
        launcher's message after a neighbour's ``have`` told the news) only
        adds the new links and asks them.

        Returns
        -------
        list of Outgoing
            The ``have`` requests.

        Raises
        ------
        ValueError
            If ``node`` is this node or not a node of the run, or a link is
            not to a live node.
        """
        protocol = self.protocol
        protocol.node_failed(node)
        for u in links:
            if u not in protocol.failed:  # one that died meanwhile (two deaths at once): no link
                protocol.add_neighbour(u)
        self.neighbours = list(protocol.neighbours)
        self._joins.pop(node, None)
        if self.phase == "joining":  # no state yet: nothing to repair; a dead donor is replaced
            if node == self._donor and protocol.neighbours:
                self.phase = "ready"
                return self.join(protocol.neighbours[0], self._join_deltas)
            return []
        out = []
        for u in protocol.neighbours:
            if (node, u) not in self._have_sent:
                self._have_sent.add((node, u))
                out.append(protocol.have(node, u, answer=False))
        return out

    def _remember(self, header: wire.Header, payload) -> None:
        """Keep a copy of a delta for anti-entropy; evict the oldest beyond the store's size.

        Costs one copy of the delta (the model's size) per sealed or applied
        delta; an evicted delta's buffer is reused, so a full store allocates
        nothing (fresh large allocations are slow, DESIGN.md §9).
        """
        if self.delta_store_bytes <= 0:
            return
        base = np.array(header.base_vv, copy=True)
        size = base.nbytes + payload.nbytes
        if size > self.delta_store_bytes:
            return
        reuse = None
        while self._store and self._stored_bytes + size > self.delta_store_bytes:
            _, (_, old_base, old) = self._store.popitem(last=False)
            self._stored_bytes -= old_base.nbytes + old.nbytes
            if reuse is None and old.shape == payload.shape and old.dtype == payload.dtype:
                reuse = old
        if reuse is None:
            reuse = np.array(payload, copy=True)
        else:
            np.copyto(reuse, payload)
        self._store[(header.origin, header.seq)] = (header.steps, base, reuse)
        self._stored_bytes += size

    def _on_have(self, header: wire.Header) -> list[Outgoing]:
        """A neighbour's ``have``: send it the stored deltas it lacks; answer a request."""
        protocol = self.protocol
        failed, sender = header.origin, header.sender
        out = []
        if failed == sender:  # a restarted neighbour installed its state: the fins it may lack
            out += protocol.known_fins(sender)
        elif failed not in protocol.failed and failed != self.node_id:
            out += self.node_failed(failed)  # the news came from a neighbour first
        theirs = header.base_vv
        mine = protocol.contiguous_counts()
        # what it lacks below my contiguous counts and the store no longer has
        for k in np.flatnonzero(theirs < mine):
            for seq in range(int(theirs[k]), int(mine[k])):
                if (int(k), seq) not in self._store:
                    self.store_misses += 1
        vv = protocol.vv
        for (origin, seq), (steps, base, payload) in self._store.items():
            if seq >= theirs[origin] and origin != sender:
                delta = wire.Header(
                    "delta",
                    origin,
                    self.node_id,
                    seq,
                    steps,
                    base,
                    vv,
                    self.dtype.name,
                    (self.n_params,),
                )
                # live: the driver copies it (the store keeps the array)
                out.append(Outgoing(delta, (sender,), payload=payload, live=True))
                self.deltas_pushed += 1
        if header.seq == 0 and sender in protocol.neighbours:
            out.append(protocol.have(failed, sender, answer=True))
        return out

    # -- stepping ------------------------------------------------------------
    def advance(
        self,
        now: float,
        *,
        work_s: float = 0.0,
        backlog_msgs: int = 0,
        backlog_bytes: int = 0,
    ):
        """Do what is due at time ``now``.

        Parameters
        ----------
        now : float
            The driver's clock, in seconds.
        work_s : float
            Seconds of this node's own work at full speed since the previous
            call (measured by the runtime, modelled by the simulator); a
            slowed node owes (factor - 1) times it.
        backlog_msgs, backlog_bytes : int
            Messages and bytes waiting to be sent (backpressure).

        Returns
        -------
        sends : list of Outgoing
            To put on the wire now, in order.
        wait : float or str
            A time to wait until (handling messages meanwhile), or one of
            :data:`CONTINUE`, :data:`WAIT_LEAD`, :data:`WAIT_BACKLOG`,
            :data:`WAIT_DRAIN`, :data:`DONE`.

        Raises
        ------
        Diverged
            If the local loss is not finite.
        """
        if work_s:
            self.slowdown.owe(work_s)
        if self.phase == "joining":
            return _NOTHING, WAIT_STATE
        sends = self._answer_joins() if self._joins else _NOTHING
        if self.phase == "computing":
            if now < self._compute_end:
                return _NOTHING, self._compute_end
            sends = self._end_step(now)
            self.phase = "ready"
        if self.phase == "ready":
            if self.t_start is None:
                self.t_start = self._interval_t = now
            if self.step >= self.total_steps:
                self.t_train_end = now
                sends = [*sends, *self._finish()]
                self.phase = "draining"
            else:
                if self.max_lead_steps is not None and (
                    self.protocol.lead_steps() > self.max_lead_steps
                ):
                    self.lead_waits += 1
                    return sends, WAIT_LEAD
                if backlog_msgs > self.max_backlog_msgs or (
                    backlog_msgs and backlog_bytes > self.max_backlog_bytes
                ):
                    self.backlog_waits += 1
                    return sends, WAIT_BACKLOG
                duration_s = self._begin_step(now)
                if duration_s > 0:
                    self.compute_s += duration_s
                    self._compute_end = now + duration_s
                    self.phase = "computing"
                    return sends, self._compute_end
                end = self._end_step(now)
                return (end if not sends else [*sends, *end]), CONTINUE
        # draining
        announce = self.protocol.announce_complete()
        if announce is not None:
            sends = [*sends, announce]
        if self.protocol.can_stop:
            self.phase = "done"
            self.t_done = now
            return sends, DONE
        return sends, WAIT_DRAIN

    def _begin_step(self, now: float) -> float:
        """Read the model, compute the gradient and the update; return the emulated seconds it takes."""
        self.protocol.read_model()
        self._read_t = now
        self._read_gradients = self.protocol.vv_total
        self.gradients_computed += 1
        idx = self.sampler.next_batch()
        loss, _ = self.model.loss_and_grad(self.params, self.X[idx], self.y[idx], out=self._grad)
        if not math.isfinite(loss):
            raise Diverged(
                f"node {self.node_id} diverged at step {self.step} (loss {loss}): lower --lr"
            )
        self._loss_sum += loss
        self._loss_count += 1
        self._update = self.optimizer.update(self._grad)
        duration_s = self.compute_time.sample() if self.compute_time is not None else 0.0
        return duration_s + self.slowdown.take()

    def _end_step(self, now: float):
        """Add the update to the model and the open delta; seal every ``send_every`` steps."""
        update = self._update
        self.params += update
        self._update = None
        if self.events is not None:  # steps are sequential: this gradient is step `step + 1`
            self.events.gradient(self.step + 1, self._read_t, now, self._read_gradients)
        if self.alone:  # plain SGD: no delta to keep (delta_sum is params - x0 at the end)
            self.protocol.local_step()
            return _NOTHING
        if self.protocol.window_steps:
            self.open_delta += update
        else:  # a window's first step overwrites the buffer, which is never zeroed
            np.copyto(self.open_delta, update)
        out = self.protocol.local_step()
        if out is None:
            return _NOTHING
        return [self._seal(out)]

    def _seal(self, out: Outgoing) -> Outgoing:
        sealed = self.open_delta
        self._remember(out.header, sealed)
        self.delta_sum += sealed
        out.payload = sealed  # handed over: this node never writes into it again
        self.open_delta = self.new_buffer()
        return out

    def _finish(self) -> list[Outgoing]:
        """Stop stepping: seal the partial window and flood the ``fin`` (drain, DESIGN.md §8)."""
        if self.alone:
            self.delta_sum = self.params - self._x0
        sends = []
        for out in self.protocol.finish():
            if out.header.kind == "delta":
                if self.alone:  # a lone node kept no open delta
                    continue
                out = self._seal(out)
            sends.append(out)
        return sends

    # -- records -------------------------------------------------------------
    def interval_fields(self, now: float) -> dict:
        """Fields of an ``interval`` record since the previous call (then reset)."""
        dt = now - self._interval_t
        fields = {
            "epoch": self.sampler.epoch,
            "loss": self._loss_sum / self._loss_count if self._loss_count else None,
            "steps_per_s": (self.step - self._interval_step) / dt if dt > 0 else None,
            "deltas_applied": int(self.protocol.applied_deltas.sum()),
            "duplicates": self.protocol.duplicates,
            **self.protocol.staleness.interval(),
        }
        self._loss_sum, self._loss_count = 0.0, 0
        self._interval_t, self._interval_step = now, self.step
        return fields

    @property
    def train_s(self) -> float:
        if self.t_start is None or self.t_train_end is None:
            return 0.0
        return self.t_train_end - self.t_start

    @property
    def drain_s(self) -> float:
        if self.t_train_end is None or self.t_done is None:
            return 0.0
        return self.t_done - self.t_train_end

    def final_fields(self) -> dict:
        """Fields of the ``final`` record (totals of the whole run)."""
        train_s = self.train_s
        return {
            "train_s": train_s,
            "drain_s": self.drain_s,
            "slowdown_factor": self.slowdown.factor,
            "slept_s": self.slowdown.slept_s,
            "compute_s": self.compute_s,
            "gradients_per_s": self.step / train_s if train_s > 0 else None,
            "drained": self.drained,
            "delay_rule": self.delay_rule,
            "deltas_dropped": self.deltas_dropped,
            "lead_waits": self.lead_waits,
            "backlog_waits": self.backlog_waits,
            "deltas_pushed": self.deltas_pushed,
            "delta_store_misses": self.store_misses,
            "restored": self.restored,
            "optimizer": self.optimizer.state_dict(),
            **self.protocol.summary(),
        }

    def start_fields(self) -> dict:
        """What the ``start`` record says about this node."""
        return {"role": "node", "shard_size": len(self.y), "total_steps": self.total_steps}
