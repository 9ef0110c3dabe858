"""The runtime of one DASGD node process: protocol + transport + model + data + metrics.

``python -m dasgd node --run-dir DIR --node-id I --control ADDR`` runs
:func:`node_main`. The node reads ``config.json``, ``topology.json`` and its
shard from the run directory, binds its inbox, reports ``ready`` to the
launcher over the control socket, waits for ``start`` (with the inbox
addresses of its neighbours), trains, drains, and writes ``node-<i>.npy``,
``node-<i>.delta_sum.npy`` and the ``final`` record of ``node-<i>.jsonl``.

The loop follows ALGORITHMS.md §1: apply every delta that has arrived (and
relay it), take one local step, and every ``send_every`` steps send the summed
parameter change to all neighbours. The arithmetic lives here, on
preallocated buffers; the bookkeeping lives in :class:`~dasgd.protocol.NodeProtocol`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import zmq

from ..analysis.metrics import Evaluator, EventLog
from ..config import RunConfig, run_config_from_dict
from ..core import wire
from ..core.emulation import Slowdown
from ..core.protocol import NodeProtocol, Outgoing
from ..errors import DasgdError, Diverged, TransportError, WireError
from ..ml.data import BatchSampler, local_steps
from ..ml.models import build_model
from ..ml.optim import build_optimizer, delay_adaptive_lr
from ..topology import neighbours as topology_neighbours
from ..topology import parse_topology
from .transport import Transport, inbox_address

__all__ = ["Node", "node_main"]

#: Deltas smaller than this are copied into the message; larger ones are sent
#: zero-copy from a pool of buffers that are reused once ZeroMQ releases them.
ZERO_COPY_BYTES = 1 << 16
#: How many malformed messages a node describes in its log (all are counted).
MAX_MALFORMED_LOGGED = 20


class _Terminated(Exception):
    """SIGTERM arrived: stop, flush logs, exit non-zero."""


class BufferPool:
    """Arrays sent zero-copy, reused once ZeroMQ has released them.

    ZeroMQ keeps a reference to a buffer sent with ``copy=False`` until the
    message has left; writing into it before then would corrupt the message.
    Arrays under :data:`ZERO_COPY_BYTES` are simply copied into the message.
    Fresh large allocations are slow on these machines (DESIGN.md §9), hence
    the pool.

    Parameters
    ----------
    n_params : int
        Length of every array, shape (n_params,).
    dtype : numpy dtype
    """

    def __init__(self, n_params: int, dtype) -> None:
        self.n_params = n_params
        self.dtype = dtype
        self._in_flight: list[tuple[np.ndarray, zmq.MessageTracker]] = []

    def take(self) -> np.ndarray:
        """A buffer ZeroMQ no longer uses (or a new one); its contents are undefined."""
        for k, (buf, tracker) in enumerate(self._in_flight):
            if tracker.done:
                del self._in_flight[k]
                return buf
        return np.empty(self.n_params, dtype=self.dtype)

    def payload(self, array: np.ndarray):
        """The message frame for ``array``.

        Returns
        -------
        bytes or zmq.Frame
            bytes (a copy: ``array`` is free again at once) for small arrays; a
            tracked zero-copy frame otherwise, and ``array`` then belongs to the
            pool until ZeroMQ releases it.
        """
        if array.nbytes < ZERO_COPY_BYTES:
            return array.tobytes()
        frame = zmq.Frame(array, track=True)
        self._in_flight.append((array, frame.tracker))
        return frame

    def snapshot(self, array: np.ndarray):
        """The message frame for a copy of ``array`` (which the caller keeps changing)."""
        if array.nbytes < ZERO_COPY_BYTES:
            return array.tobytes()
        buf = self.take()
        np.copyto(buf, array)
        return self.payload(buf)


class Node:
    """One DASGD node: owns the model vector, drives the protocol and the sockets.

    Parameters
    ----------
    config : RunConfig
        The run's resolved configuration (``n_nodes`` set).
    node_id : int
        This node.
    neighbours : list of int
        Its neighbours in the topology.
    X : ndarray of shape (m, d)
        This node's training shard (features), float64.
    y : ndarray of shape (m,), int64
        Its labels.
    n_classes : int
        Number of classes of the dataset.
    run_dir : Path
        Where the log and the final model are written.
    adjacency : mapping of int to list of int, optional
        Every node's neighbours; lets the protocol skip relays the origin makes
        itself (see :class:`~dasgd.protocol.NodeProtocol`). None: plain flooding.

    Notes
    -----
    ``transport`` and ``log`` are set by :func:`node_main` before :meth:`run`;
    ``on_progress`` (a callable taking each interval record) is optional.
    """

    def __init__(
        self,
        config: RunConfig,
        node_id: int,
        neighbours,
        X,
        y,
        n_classes: int,
        run_dir,
        *,
        adjacency=None,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.neighbours = sorted(neighbours)
        self.run_dir = Path(run_dir)
        mc, tc = config.model, config.train
        self.dtype = np.dtype(mc.dtype)
        self.X = np.ascontiguousarray(X, dtype=self.dtype)
        self.y = np.asarray(y, dtype=np.int64)
        self.model = build_model(
            mc.name,
            self.X.shape[1],
            n_classes,
            hidden=mc.hidden,
            activation=mc.activation,
            l2=mc.l2,
        )
        self.n_params = self.model.n_params
        self.params = self.model.init_params(seed=tc.seed, dtype=self.dtype)
        self._x0 = self.params.copy()
        # in the model's dtype: a float64 sum of float32 deltas doubles the cost of sealing
        self.delta_sum = np.zeros(self.n_params, dtype=self.dtype)
        self.optimizer = build_optimizer(
            tc.optimizer, self.n_params, tc.lr, momentum=tc.momentum, dtype=self.dtype
        )
        self.sampler = BatchSampler(len(self.y), tc.batch_size, seed=tc.seed + 1 + node_id)
        self.total_steps = local_steps(tc, len(self.y))
        self.protocol = NodeProtocol(
            node_id,
            self.neighbours,
            config.n_nodes,
            tc.send_every,
            n_params=self.n_params,
            dtype=mc.dtype,
            adjacency=adjacency,
        )
        self.pool = BufferPool(self.n_params, self.dtype)
        self.open_delta = np.zeros(self.n_params, dtype=self.dtype)
        self.malformed = 0
        self._delay_rule = tc.delay_rule
        self._delay_concurrency = tc.delay_concurrency or config.n_nodes
        self.deltas_dropped = 0
        self.lead_waits = 0
        self.lead_wait_s = 0.0
        self.transport: Transport | None = None
        self.log: EventLog | None = None
        self.on_progress = None  # callable(dict) or None
        self.stop_requested = False
        self._grad = np.empty(self.n_params, dtype=self.dtype)
        self._loss_sum = 0.0
        self._loss_count = 0
        self._interval_t = 0.0
        self._interval_step = 0
        self.train_s = 0.0
        self.drain_s = 0.0
        self.drained = False
        self.slowdown = Slowdown(1.0)
        self.evaluator: Evaluator | None = None  # logs eval records when set

    # -- messages -----------------------------------------------------------
    def _send(self, out: Outgoing, payload=None) -> None:
        header = wire.encode_header(out.header)
        frames = [header] if payload is None else [header, payload]
        for to in out.to:
            self.transport.send(to, frames)

    def accumulate(self, update: np.ndarray) -> None:
        """Add one local step's parameter change to the open delta; call before ``local_step``.

        The first step of a window overwrites the buffer, which is therefore
        never zeroed: after a seal its contents are undefined until then.
        """
        if self.protocol.window_steps:
            self.open_delta += update
        else:
            np.copyto(self.open_delta, update)

    def _seal_and_send(self, out: Outgoing) -> None:
        """Send the open delta with ``out``'s header; the next step's :meth:`accumulate` opens a new one."""
        sealed = self.open_delta
        self.delta_sum += sealed
        payload = self.pool.payload(sealed)
        if not isinstance(payload, bytes):  # the pool owns it until ZeroMQ lets go
            self.open_delta = self.pool.take()
        # (a copied buffer is reused as is: a window's first step overwrites it)
        self._send(out, payload)

    def _handle(self, frames: list) -> None:
        try:
            header, delta = wire.decode(
                frames,
                self.config.n_nodes,
                dtype=self.config.model.dtype,
                n_params=self.n_params,
                check_finite=False,
            )
            # the payload pass only for deltas that will be applied: duplicates are dropped unread
            if (
                self.config.transport.check_finite
                and delta is not None
                and self.protocol.is_new_delta(header)
            ):
                wire.check_finite_array(header, delta)
            apply, forward = self.protocol.receive(header)
        except WireError as exc:
            self.malformed += 1
            if self.malformed <= MAX_MALFORMED_LOGGED:
                self.log.log("malformed", self.step, reason=str(exc))
            return
        if apply:
            if self._delay_rule == "none":
                self.params += delta
            else:  # extension: scale by apply staleness (models then differ between nodes)
                scale = delay_adaptive_lr(
                    1.0,
                    self.protocol.last_apply_staleness,
                    self._delay_concurrency,
                    rule=self._delay_rule,
                )
                if scale > 0:
                    self.params += scale * delta
                else:
                    self.deltas_dropped += 1
        if forward is not None:
            self._send(forward, frames[1] if delta is not None else None)

    def _receive_all(self, timeout_s: float = 0.0) -> int:
        """Handle every message waiting (waiting up to ``timeout_s`` for the first)."""
        transport = self.transport
        if not transport.poll(timeout_s):  # poll(0) is cheaper than a recv that fails
            return 0
        handled = 0
        while (frames := transport.recv()) is not None:
            self._handle(frames)
            handled += 1
        return handled

    # -- logging ------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.protocol.vv[self.node_id])

    def _interval(self, now: float, phase: str) -> None:
        dt = now - self._interval_t
        record = self.log.log(
            "interval",
            self.step,
            phase=phase,
            epoch=self.sampler.epoch,
            loss=self._loss_sum / self._loss_count if self._loss_count else None,
            steps_per_s=(self.step - self._interval_step) / dt if dt > 0 else None,
            deltas_applied=int(self.protocol.applied_deltas.sum()),
            duplicates=self.protocol.duplicates,
            malformed=self.malformed,
            **self.transport.counters(),
            **self.protocol.staleness.interval(),
        )
        self._loss_sum, self._loss_count = 0.0, 0
        self._interval_t, self._interval_step = now, self.step
        if self.on_progress is not None:
            self.on_progress(record)

    def evaluate(self, now: float, *, force: bool = False) -> None:
        """Log an ``eval`` record of this node's model when one is due."""
        if self.evaluator is not None:
            self.evaluator.maybe_log(self.log, now, self.step, self.params, force=force)

    # -- phases -------------------------------------------------------------
    def train(self) -> None:
        """Take ``total_steps`` local steps, applying and relaying deltas as they arrive."""
        log_every_s = self.config.log_interval_s
        model, optimizer, sampler, protocol, transport = (
            self.model,
            self.optimizer,
            self.sampler,
            self.protocol,
            self.transport,
        )
        X, y, params, grad = self.X, self.y, self.params, self._grad
        slowdown = self.slowdown if self.slowdown.factor > 1 else None
        alone = not self.neighbours
        max_lead = self.config.train.max_lead_steps
        t_start = time.monotonic()
        self._interval_t = t_start
        self.evaluate(t_start, force=True)
        for _ in range(self.total_steps):
            if self.stop_requested:
                raise _Terminated
            if slowdown is not None:
                t_iteration = time.perf_counter()
            self._receive_all()
            if max_lead is not None and protocol.lead_steps() > max_lead:
                waited_s = self._wait_lead(max_lead)
                if slowdown is not None:
                    t_iteration += waited_s
            if transport.has_pending and self._backlogged():
                waited_s = self._wait_backlog()
                if slowdown is not None:  # waiting is not work a slower machine would stretch
                    t_iteration += waited_s
            idx = sampler.next_batch()
            loss, _ = model.loss_and_grad(params, X[idx], y[idx], out=grad)
            update = optimizer.update(grad)
            params += update
            if not math.isfinite(loss):
                raise Diverged(
                    f"node {self.node_id} diverged at step {self.step} (loss {loss}): lower --lr"
                )
            self._loss_sum += loss
            self._loss_count += 1
            if alone:  # no neighbours: plain SGD, no delta to keep (delta_sum is params - x0)
                protocol.local_step()
            else:
                self.accumulate(update)
                out = protocol.local_step()
                if out is not None:
                    self._seal_and_send(out)
            if slowdown is not None:  # the whole iteration (receive, apply, step, send) is slower
                slowdown.after_step(time.perf_counter() - t_iteration)
            now = time.monotonic()
            if now - self._interval_t >= log_every_s:
                self._interval(now, "train")
            self.evaluate(now)
        self.train_s = time.monotonic() - t_start
        if alone:
            self.delta_sum = self.params - self._x0
        self._interval(time.monotonic(), "train")

    def _wait_lead(self, max_lead: int) -> float:
        """The optional lead bound: receive until no live neighbour is more than ``max_lead`` steps behind.

        Returns
        -------
        float
            Seconds waited.

        Raises
        ------
        TransportError
            If no message arrives for ``send_timeout_s`` while waiting.
        """
        tc = self.config.transport
        t = time.perf_counter()
        last_message = time.monotonic()
        while self.protocol.lead_steps() > max_lead:
            if self.stop_requested:
                raise _Terminated
            self.transport.flush()
            now = time.monotonic()
            if self._receive_all(timeout_s=self.transport.wait_cap_s(0.005)):
                last_message = now
            elif now - last_message > tc.send_timeout_s:
                raise TransportError(
                    f"node {self.node_id} waited {now - last_message:.0f} s for its neighbours to catch up "
                    f"(--max-lead-steps {max_lead}); is one of them alive?"
                )
        waited = time.perf_counter() - t
        self.lead_waits += 1
        self.lead_wait_s += waited
        return waited

    def _backlogged(self) -> bool:
        """Flush; True while more than ``max_backlog_msgs`` messages or ``queue_bytes`` wait."""
        tc = self.config.transport
        waiting = self.transport.flush()
        return waiting > tc.max_backlog_msgs or (
            waiting > 0 and self.transport.backlog_bytes > tc.queue_bytes
        )

    def _wait_backlog(self) -> float:
        """Backpressure: keep receiving until the backlog is short again (or a neighbour is dead).

        Returns
        -------
        float
            Seconds waited.
        """
        tc = self.config.transport
        t = time.perf_counter()
        while self._backlogged():
            self.transport.check_stalled(tc.send_timeout_s)
            self._receive_all(timeout_s=self.transport.wait_cap_s(0.005))
            if self.stop_requested:
                raise _Terminated
        return time.perf_counter() - t

    def drain(self) -> None:
        """Stop stepping; keep applying and relaying until every node holds every delta.

        Gives up after ``drain_timeout_s`` without any incoming message (logged
        as ``drain_timeout`` with what is missing).
        """
        tc = self.config.transport
        t_start = time.monotonic()
        for out in self.protocol.finish():
            if out.header.kind != "delta":
                self._send(out)
            elif self.neighbours:  # a lone node kept no open delta (see train)
                self._seal_and_send(out)
        last_message = time.monotonic()
        # a message may spend the longest link latency in flight: not silence
        drain_timeout_s = tc.drain_timeout_s + max(self.transport.latency_s.values(), default=0.0)
        self.log.flush()
        while True:
            announce = self.protocol.announce_complete()
            if announce is not None:
                self._send(announce)
            if self.protocol.can_stop:
                self.drained = True
                break
            if self.stop_requested:
                raise _Terminated
            self.transport.flush()
            self.transport.check_stalled(tc.send_timeout_s)
            now = time.monotonic()
            if self._receive_all(timeout_s=self.transport.wait_cap_s(0.01)):
                last_message = now
            elif now - last_message > drain_timeout_s:
                self.log.log(
                    "drain_timeout", self.step, waited_s=now - last_message, **self.protocol.missing
                )
                self.log.flush()
                break
            if now - self._interval_t >= self.config.log_interval_s:
                self._interval(now, "drain")
        # let the last messages (our `complete`) leave; neighbours that still need them are alive
        deadline = (
            time.monotonic()
            + min(tc.send_timeout_s, 5.0)
            + max(self.transport.latency_s.values(), default=0.0)
        )
        while (
            self.transport.has_pending and time.monotonic() < deadline and not self.stop_requested
        ):
            self.transport.flush()
            self._receive_all(timeout_s=self.transport.wait_cap_s(0.005))
        self.drain_s = time.monotonic() - t_start
        self._interval(time.monotonic(), "drain")
        self.evaluate(time.monotonic(), force=True)

    def run(self) -> None:
        """Train, then drain."""
        self.train()
        self.drain()

    def start_fields(self) -> dict:
        """What the ``start`` record says about this node."""
        return {"role": "node", "shard_size": len(self.y), "total_steps": self.total_steps}

    def write_results(self) -> None:
        """Final model, own-delta sum and the ``final`` log record."""
        np.save(self.run_dir / f"node-{self.node_id}.npy", self.params)
        np.save(self.run_dir / f"node-{self.node_id}.delta_sum.npy", self.delta_sum)
        self.log.log(
            "final",
            self.step,
            train_s=self.train_s,
            drain_s=self.drain_s,
            eval_s=self.evaluator.eval_s if self.evaluator else 0.0,
            slowdown_factor=self.slowdown.factor,
            slept_s=self.slowdown.slept_s,
            gradients_per_s=self.step / self.train_s if self.train_s > 0 else None,
            drained=self.drained,
            malformed=self.malformed,
            delay_rule=self._delay_rule,
            deltas_dropped=self.deltas_dropped,
            lead_waits=self.lead_waits,
            lead_wait_s=self.lead_wait_s,
            optimizer=self.optimizer.state_dict(),
            **self.transport.counters(),
            **self.protocol.summary(),
        )


def queue_limit_msgs(tc, message_bytes: int) -> int:
    """ZeroMQ high-water mark: ``tc.hwm_msgs``, lowered so a socket queues at most ``tc.queue_bytes``.

    Deep queues hide staleness (a delta waits behind hundreds of others) and,
    for large models, hold gigabytes; at least 2 messages are always allowed.
    """
    return max(2, min(tc.hwm_msgs, tc.queue_bytes // message_bytes))


def _control_send(sock: zmq.Socket, message: dict, *, droppable: bool = False) -> None:
    """Send to the launcher; progress reports (``droppable``) are dropped rather than block."""
    try:
        sock.send(msgpack.packb(message, use_bin_type=True), flags=zmq.NOBLOCK if droppable else 0)
    except zmq.Again:
        pass


def _control_recv(sock: zmq.Socket, timeout_s: float, *, parent_pid: int, should_stop) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        if should_stop():
            raise _Terminated
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransportError(f"no start from the launcher within {timeout_s:.0f} s")
        if sock.poll(min(200, int(remaining * 1000) + 1)):
            message = msgpack.unpackb(sock.recv(), raw=False, strict_map_key=False)
            if isinstance(message, dict):
                return message
        if os.getppid() != parent_pid:
            raise TransportError("the launcher is gone")


def log_name(config: RunConfig, node_id: int) -> str:
    """File stem of a process's log and outputs: ``node-<i>``, or ``server`` for the parameter server."""
    return (
        "server" if config.algorithm != "dasgd" and node_id == config.n_nodes else f"node-{node_id}"
    )


def _build_role(config: RunConfig, node_id: int, run_dir: Path, meta: dict):
    """The DASGD node, PS worker or PS server this process is, and its neighbours."""
    data = run_dir / "data"
    n = config.n_nodes
    if config.algorithm == "dasgd" or node_id < n:
        X = np.load(data / f"shard-{node_id}-X.npy")
        y = np.load(data / f"shard-{node_id}-y.npy")
    if config.algorithm == "dasgd":
        graph = parse_topology(str(run_dir / "topology.json"), n)
        neighbours = topology_neighbours(graph, node_id)
        adjacency = {k: topology_neighbours(graph, k) for k in graph}
        role = Node(
            config, node_id, neighbours, X, y, meta["n_classes"], run_dir, adjacency=adjacency
        )
    else:
        from .ps import Server, Worker

        if node_id < n:
            neighbours = [n]
            role = Worker(config, node_id, X, y, meta["n_classes"], run_dir)
        else:
            neighbours = list(range(n))
            role = Server(
                config, meta["n_features"], meta["n_classes"], meta["shard_sizes"], run_dir
            )
    factors = meta["emulation"]["slowdown_factors"]
    role.slowdown = Slowdown(factors[node_id] if node_id < len(factors) else 1.0)
    if config.eval_interval_s is not None and hasattr(role, "evaluator"):
        X_test = np.load(data / "test-X.npy").astype(role.dtype, copy=False)
        role.evaluator = Evaluator(
            role.model, X_test, np.load(data / "test-y.npy"), config.eval_interval_s
        )
    return role, neighbours


def node_main(run_dir: str, node_id: int, control_address: str) -> int:
    """Entry point of a node process (DASGD node, PS worker or PS server); returns the exit code.

    Parameters
    ----------
    run_dir : str
        The run directory the launcher prepared.
    node_id : int
        Which node this process is (the PS server is node ``n_nodes``).
    control_address : str
        The launcher's control socket.

    Returns
    -------
    int
        0 on success, 1 on an error (reported to the launcher and written to
        stderr), 143 when terminated.
    """
    run_dir = Path(run_dir)
    parent_pid = os.getppid()
    config = run_config_from_dict(json.loads((run_dir / "config.json").read_text()))
    ctx = zmq.Context()
    control = ctx.socket(zmq.DEALER)
    control.setsockopt(zmq.LINGER, 2000)
    control.setsockopt(zmq.SNDTIMEO, 5000)  # no send to the launcher waits forever
    control.connect(control_address)
    role = None

    def on_term(signum, frame):
        if role is not None:
            role.stop_requested = True
        else:
            raise _Terminated

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        meta = json.loads((run_dir / "data" / "meta.json").read_text())
        role, neighbours = _build_role(config, node_id, run_dir, meta)
        tc = config.transport
        bind = inbox_address(
            tc.kind, node_id, host=tc.host, base_port=tc.base_port, ipc_dir=meta["ipc_dir"]
        )
        message_bytes = role.n_params * role.dtype.itemsize
        links = (key.split("-") for key in meta["emulation"]["latency_s"])
        delays = meta["emulation"]["latency_s"]
        role.transport = Transport(
            node_id,
            bind,
            latency_s={int(v): delays[f"{u}-{v}"] for u, v in links if int(u) == node_id},
            hwm_msgs=queue_limit_msgs(tc, message_bytes),
            max_message_bytes=message_bytes + wire.MAX_HEADER_BYTES + 4096,
        )
        address = role.transport.start()
        _control_send(
            control, {"kind": "ready", "node": node_id, "address": address, "pid": os.getpid()}
        )
        start = _control_recv(
            control,
            tc.ready_timeout_s * 2,
            parent_pid=parent_pid,
            should_stop=lambda: role.stop_requested,
        )
        if start.get("kind") != "start":
            raise TransportError(f"expected start from the launcher, got {start.get('kind')!r}")
        addresses = {int(k): v for k, v in start["addresses"].items()}
        role.transport.connect({u: addresses[u] for u in neighbours})
        name = log_name(config, node_id)
        with EventLog(
            run_dir / f"{name}.jsonl", node_id, flush_interval_s=config.log_interval_s
        ) as log:
            role.log = log
            log.log(
                "start",
                0,
                neighbours=neighbours,
                n_params=role.n_params,
                address=address,
                **role.start_fields(),
            )

            def progress(record):
                if os.getppid() != parent_pid:
                    raise TransportError("the launcher is gone")
                _control_send(control, {"kind": "progress", **record}, droppable=True)

            role.on_progress = progress
            role.run()
            role.write_results()
        _control_send(control, {"kind": "done", "node": node_id})
        return 0
    except _Terminated:
        print(f"node {node_id}: terminated", file=sys.stderr)
        return 143
    except (DasgdError, OSError, ValueError) as exc:
        message = str(exc) if str(exc).startswith(f"node {node_id}") else f"node {node_id}: {exc}"
        print(message, file=sys.stderr)
        try:
            _control_send(control, {"kind": "error", "node": node_id, "message": str(exc)})
        except zmq.ZMQError:
            pass
        return 1
    finally:
        if role is not None and role.transport is not None:
            role.transport.close(linger_s=1.0)
        control.close(linger=1000)
        ctx.term()
