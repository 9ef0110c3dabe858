"""The process runtime of one node: drives a core state machine with sockets, signals, sleeping and files.

``python -m dasgd node --run-dir DIR --node-id I --control ADDR`` runs
:func:`node_main`. The process reads ``config.json``, ``topology.json`` and its
shard from the run directory, builds its state machine
(:func:`dasgd.build.build_machine`: a DASGD node, a parameter-server worker or
the server), binds its inbox, reports ``ready`` to the launcher over the
control socket, waits for ``start`` (with the inbox addresses of its
neighbours), and then :class:`Driver` runs the machine until it is done. It
writes the machine's final model and the ``final`` record of its log.

Every decision (when to step, seal, wait for a slower neighbour or for the
transport, drain, stop) is the machine's (:mod:`dasgd.core`); the driver only
moves bytes, measures time, sleeps, enforces deadlines and writes logs. The
simulator (:mod:`dasgd.sim`) drives the same machines in virtual time.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from ..analysis.events import ModelSnapshots
from ..analysis.metrics import Evaluator, EventLog
from ..build import build_machine, build_recorder, is_server
from ..config import RunConfig, run_config_from_dict
from ..core import wire
from ..core.actions import CONTINUE, DONE, WAIT_BACKLOG, WAIT_DRAIN, WAIT_LEAD, WAIT_STATE
from ..core.emulation import Partitions
from ..core.node import DasgdNode
from ..core.protocol import adjacency_sets
from ..core.ps import PSServer
from ..errors import DasgdError, TransportError, WireError
from ..rundir import process_name
from ..topology import neighbours as topology_neighbours
from ..topology import parse_topology
from . import control
from .transport import Transport, inbox_address

__all__ = ["BufferPool", "Driver", "node_main"]

#: Deltas smaller than this are copied into the message; larger ones are sent
#: zero-copy from a pool of buffers that are reused once ZeroMQ releases them.
ZERO_COPY_BYTES = 1 << 16
#: How many malformed messages a process describes in its log (all are counted).
MAX_MALFORMED_LOGGED = 20
#: A wait for a message this long (seconds) makes the PS server check that its model is finite.
IDLE_CHECK_S = 0.5
#: Longest single poll while waiting, in seconds (signals and deadlines are checked in between).
POLL_CAP_S = 0.01
#: How often (seconds) a running node reads the launcher's control messages (``failed``).
CONTROL_POLL_S = 0.05
#: A message from an unknown sender waits this long (seconds) for the launcher's news of a
#: repair link before it is dropped as malformed.
CONTROL_WAIT_S = 1.0
#: Poll while backpressure or the lead bound holds a node (the transport frees up without a message).
SHORT_POLL_S = 0.001


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
        self._free: list[np.ndarray] = []  # small arrays whose bytes were copied out

    def take(self) -> np.ndarray:
        """A buffer ZeroMQ no longer uses (or a new one); its contents are undefined."""
        if self._free:
            return self._free.pop()
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
            if array.size == self.n_params and len(self._free) < 4:
                self._free.append(array)  # copied out: free again at once
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


class Driver:
    """Runs one core state machine in this process: sockets, clock, waits, deadlines, logs.

    Parameters
    ----------
    machine : DasgdNode, PSWorker or PSServer
        The state machine (:mod:`dasgd.core`).
    config : RunConfig
    transport : Transport
        Started and connected.
    log : EventLog
        Open; its ``t0`` is on :func:`time.monotonic`'s clock.
    pool : BufferPool
        Buffers for zero-copy sends (the machine's ``new_buffer`` is ``pool.take``).
    evaluator : Evaluator, optional
        Logs ``eval`` records of the machine's model (DASGD nodes, PS server).

    Attributes
    ----------
    malformed : int
        Messages dropped as malformed (undecodable, or refused by the machine).
    stop_requested : bool
        Set by the signal handler: the driver stops at the next check.
    on_progress : callable or None
        Called with each ``interval`` record.
    on_control : callable or None
        Called every :data:`CONTROL_POLL_S` seconds or so: reads the
        launcher's control messages (and calls :meth:`node_failed`).
    """

    def __init__(
        self, machine, config: RunConfig, transport: Transport, log: EventLog, pool, evaluator=None
    ) -> None:
        self.machine = machine
        self.config = config
        self.transport = transport
        self.log = log
        self.pool = pool
        self.evaluator = evaluator
        self.malformed = 0
        self.stop_requested = False
        self.on_progress = None
        self.on_control = None
        self.failed_nodes: list[int] = []
        self._in_control = False
        self._control_t = time.monotonic()
        self._waited_for_link: set[int] = set()
        self.drained = False
        self.eval_s = 0.0
        self._n_ids = config.n_nodes + (config.algorithm != "dasgd")
        self._dtype = config.model.dtype
        self._n_params = machine.n_params
        # DASGD checks a delta's values only if it will apply it (the machine does)
        self._decode_finite = config.transport.check_finite and not isinstance(machine, DasgdNode)
        self._waited_s = 0.0
        self._interval_t = 0.0
        tc = config.transport
        # a neighbour that accepts nothing: under continue/restart, first let the failure
        # detectors (heartbeats, a host's silence) declare it dead, which unblocks this node
        self._stall_s = tc.send_timeout_s
        if config.on_node_failure != "stop":
            self._stall_s += max(tc.send_timeout_s, config.heartbeat_timeout_s)
        self.events = getattr(machine, "events", None)  # stamped with the time of each message

    # -- messages ------------------------------------------------------------
    def _send(self, out, received=None, frame=None) -> None:
        header = wire.encode_header(out.header)  # encodes the live vectors now
        payload = out.payload
        if payload is None:
            frames = [header]
        elif payload is received:  # a relay: forward the frame as it came
            frames = [header, frame]
        elif out.live:  # the owner keeps changing it: send a copy
            frames = [header, self.pool.snapshot(payload)]
        else:  # handed over: zero-copy for large arrays
            frames = [header, self.pool.payload(payload)]
        for to in out.to:
            self.transport.send(to, frames)

    def _handle(self, frames: list) -> None:
        machine = self.machine
        try:
            header, payload = wire.decode(
                frames,
                self._n_ids,
                dtype=self._dtype,
                n_params=self._n_params,
                check_finite=self._decode_finite,
            )
            if self.events is not None:
                self.events.now = time.monotonic()
            try:
                outs = machine.on_message(header, payload)
            except WireError as exc:
                # a repair link's first message may overtake the launcher's news of it:
                # wait for that news once per sender
                if (
                    self.on_control is None
                    or self._in_control
                    or header.sender in self._waited_for_link
                    or "not a neighbour" not in str(exc)
                ):
                    raise
                self._waited_for_link.add(header.sender)
                self.on_control(CONTROL_WAIT_S)
                outs = machine.on_message(header, payload)
        except WireError as exc:
            self.malformed += 1
            if self.malformed <= MAX_MALFORMED_LOGGED:
                self.log.log(time.monotonic(), "malformed", machine.progress_step, reason=str(exc))
            return
        for out in outs:
            self._send(out, payload, frames[1] if len(frames) > 1 else None)

    def _receive_all(self, timeout_s: float = 0.0) -> int:
        """Handle every message waiting (waiting up to ``timeout_s`` for the first)."""
        transport = self.transport
        if timeout_s > 0:
            t = time.perf_counter()
            ready = transport.poll(timeout_s)
            self._waited_s += time.perf_counter() - t
            if not ready:
                return 0
        elif not transport.poll(0):  # poll(0) is cheaper than a recv that fails
            return 0
        handled = 0
        while (frames := transport.recv()) is not None:
            self._handle(frames)
            handled += 1
        return handled

    # -- waits -----------------------------------------------------------------
    def _check_stop(self) -> None:
        if self.stop_requested:
            raise _Terminated

    def _poll_control(self) -> None:
        """Read the launcher's messages (and send a heartbeat) if :data:`CONTROL_POLL_S` passed."""
        if self.on_control is not None and not self._in_control:
            if time.monotonic() - self._control_t >= CONTROL_POLL_S:
                self._control_t = time.monotonic()
                self.on_control()

    def _wait_until(self, until: float) -> None:
        """Emulated compute time: handle messages until the clock reads ``until`` or one arrived.

        After handling a message it returns early: the machine is asked again
        (it answers the same time while still computing).
        """
        transport = self.transport
        while True:
            self._check_stop()
            self._poll_control()  # a long emulated gradient still sends heartbeats
            if transport.has_pending:
                transport.flush()
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            if remaining < 1e-3:  # below the poll's resolution: sleep the rest
                t = time.perf_counter()
                time.sleep(remaining)
                self._waited_s += time.perf_counter() - t
                return
            if self._receive_all(timeout_s=transport.wait_cap_s(min(remaining, POLL_CAP_S))):
                return  # the machine decides again (a worker told to stop ends its gradient)

    def _wait_message(self, why: str, since: float) -> bool:
        """Handle messages for a short while; True if any arrived.

        Raises
        ------
        TransportError
            If nothing arrived for ``send_timeout_s`` since ``since`` (a
            neighbour, worker or the server is gone) or a neighbour accepts nothing.
        """
        self._check_stop()
        transport = self.transport
        tc = self.config.transport
        transport.flush()
        transport.check_stalled(self._stall_s)
        # backpressure and the lead bound resume as soon as possible: short polls
        cap_s = SHORT_POLL_S if why in (WAIT_BACKLOG, WAIT_LEAD) else POLL_CAP_S
        if self._receive_all(timeout_s=transport.wait_cap_s(cap_s)):
            return True
        waited_s = time.monotonic() - since
        if why == WAIT_BACKLOG or why == WAIT_DRAIN:
            return False  # the transport's stall check and the drain deadline apply
        if isinstance(self.machine, PSServer) and waited_s > IDLE_CHECK_S:
            self.machine.check_model()  # a diverged model silences the workers: say why
        if waited_s > tc.send_timeout_s:
            what = {
                WAIT_LEAD: f"its neighbours to catch up (--max-lead-steps {self.config.train.max_lead_steps}); is one of them alive?",
                WAIT_STATE: "a message while it waits for its neighbour's state (restart)",
            }.get(
                why,
                "a message: "
                + (
                    "gradient from any worker"
                    if isinstance(self.machine, PSServer)
                    else "model from the server"
                ),
            )
            raise TransportError(f"node {self.machine.node_id} waited {waited_s:.0f} s for {what}")
        return False

    def node_failed(
        self, node: int, t_s: float | None = None, links=(), addresses=None
    ) -> dict | None:
        """The launcher says ``node`` died: the machine forgets it, the transport drops it.

        Every message already in the inbox is handled before the report
        (what the dead node sent before dying counts). Repair links (``links``, node ids
        with their inbox ``addresses``) are connected, the machine's ``have``
        requests sent, and a ``node_failed`` record logged (``failed_node``,
        ``detected_t_s``: the launcher's run-clock time, ``links``). A
        machine without failure handling (the PS worker) ignores it; a
        repeated report is ignored.

        Returns
        -------
        dict or None
            A DASGD node's holdings of ``node`` (:meth:`NodeProtocol.held`),
            for the launcher's ``held`` message; None otherwise.

        Raises
        ------
        ValueError
            If ``node`` is this node or not a node of the run.
        """
        if node in self.failed_nodes:  # repeated: what it holds of it, for the launcher
            if isinstance(self.machine, DasgdNode):
                return self.machine.protocol.held(node)
            return None
        handler = getattr(self.machine, "node_failed", None)
        if handler is None:
            return None
        self.failed_nodes.append(node)
        self.transport.disconnect(node)
        if isinstance(self.machine, DasgdNode):
            # a repair link to a node that died meanwhile (two deaths at once) is not made
            links = [u for u in links if u not in self.machine.protocol.failed and u != node]
            if links:
                self.transport.connect({u: addresses[u] for u in links})
            outs = handler(node, links)
        else:
            outs = handler(node) or ()
        for out in outs:
            self._send(out)
        self.log.log(
            time.monotonic(),
            "node_failed",
            self.machine.progress_step,
            failed_node=node,
            detected_t_s=t_s,
            links=list(links),
        )
        if isinstance(self.machine, DasgdNode):
            self._in_control = True  # no second wait for the launcher from in here
            try:
                self._receive_all()  # the dead node's last messages count in the report
            finally:
                self._in_control = False
            return self.machine.protocol.held(node)
        return None

    def node_rejoined(self, node: int, address: str, links=()) -> None:
        """The launcher's ``rejoined``: dead ``node`` was restarted at ``address``.

        ``links`` are the restarted node's neighbours; if this node is one of
        them it connects to the new process and takes it back as a neighbour.
        Logs a ``node_rejoined`` record. A PS machine ignores it.
        """
        machine = self.machine
        if not isinstance(machine, DasgdNode) or node == machine.node_id:
            return
        link = machine.node_id in links
        if node in self.failed_nodes:
            self.failed_nodes.remove(node)
        if link:
            self.transport.connect({node: address})
        for out in machine.node_rejoined(node, link=link):  # its have or join, if it came first
            self._send(out)
        self._waited_for_link.discard(node)
        self.log.log(
            time.monotonic(), "node_rejoined", machine.progress_step, rejoined_node=node, link=link
        )

    def neighbour_finished(self, node: int) -> None:
        """The launcher's ``finished``: ``node`` exited normally; stop awaiting and sending to it."""
        if isinstance(self.machine, DasgdNode) and node != self.machine.node_id:
            self.machine.protocol.neighbour_finished(node)
            self.transport.disconnect(node)  # nothing queued for it can matter any more

    def failed_fin(self, node: int, deltas: int, steps: int, lost=()) -> None:
        """The launcher's ``fin_of``: the dead node's ``fin`` (DASGD), logged as ``failed_fin``."""
        if isinstance(self.machine, DasgdNode):
            self.machine.protocol.failed_fin(node, deltas, steps, lost)
            self.log.log(
                time.monotonic(),
                "failed_fin",
                self.machine.progress_step,
                failed_node=node,
                deltas=deltas,
                steps=steps,
                lost=list(lost),
            )

    # -- records ---------------------------------------------------------------
    def _interval(self, now: float, phase: str) -> None:
        machine = self.machine
        fields = machine.interval_fields(now)
        fields.setdefault("phase", phase)
        record = self.log.log(
            now,
            "interval",
            machine.progress_step,
            **fields,
            malformed=self.malformed,
            **self.transport.counters(),
        )
        self._interval_t = now
        if self.events is not None:  # on disk every log interval, as the JSONL log
            self.events.flush()
        if self.on_progress is not None:
            self.on_progress(record)

    def _evaluate(self, now: float, *, force: bool = False) -> None:
        if self.evaluator is not None:
            params = self.machine.x if isinstance(self.machine, PSServer) else self.machine.params
            self.evaluator.maybe_log(self.log, now, self.machine.progress_step, params, force=force)

    # -- the loop --------------------------------------------------------------
    def run(self) -> None:
        """Drive the machine until it is done (or a deadline, signal or error stops it)."""
        machine, transport = self.machine, self.transport
        tc = self.config.transport
        log_every_s = self.config.log_interval_s
        slowed = machine.slowdown.factor > 1 if hasattr(machine, "slowdown") else False
        now = time.monotonic()
        self._interval_t = now
        joining = getattr(machine, "phase", None) == "joining"
        join_deadline = now + tc.send_timeout_s
        donor = getattr(machine, "_donor", None)
        if not joining:  # a restarted node has no model of its own before the state
            self._evaluate(now, force=True)
        mark = time.perf_counter()
        waiting_since = None  # when the current wait for a message began
        drain_since = None
        phase = "train"
        self._control_t = now
        while True:
            self._check_stop()
            self._poll_control()
            work_s = 0.0
            if slowed:  # this process's own work since the last call, waits excluded
                t = time.perf_counter()
                work_s = max(0.0, t - mark - self._waited_s)
                mark, self._waited_s = t, 0.0
            backlog_msgs = backlog_bytes = 0
            if transport.has_pending:
                backlog_msgs = transport.flush()
                backlog_bytes = transport.backlog_bytes
            now = time.monotonic()
            sends, wait = machine.advance(
                now, work_s=work_s, backlog_msgs=backlog_msgs, backlog_bytes=backlog_bytes
            )
            for out in sends:
                self._send(out)
            if joining:
                if machine.phase != "joining":
                    joining = False
                    self.log.log(now, "state_installed", machine.progress_step, **machine.restored)
                    self._evaluate(now, force=True)
                elif machine._donor != donor:  # the donor died: the next one gets the full time
                    donor = machine._donor
                    join_deadline = now + tc.send_timeout_s
                elif now > join_deadline:
                    raise TransportError(
                        f"node {machine.node_id}: no state from node {machine._donor} within "
                        f"{tc.send_timeout_s:.0f} s (--send-timeout-s) of the restart"
                    )
            if wait is CONTINUE:
                self._receive_all()
                waiting_since = None
            elif wait is DONE:
                self.drained = True
                break
            elif isinstance(wait, float):
                self._wait_until(wait)
                waiting_since = None
            else:
                if wait is WAIT_DRAIN and drain_since is None:
                    phase = "drain"
                    drain_since = waiting_since = now
                    if getattr(machine, "t_train_end", None) is not None:
                        self._interval(now, "train")
                    self.log.flush()
                if waiting_since is None:
                    waiting_since = now
                if self._wait_message(wait, waiting_since):
                    waiting_since = time.monotonic()
                elif wait is WAIT_DRAIN:
                    # a message may spend the longest link latency in flight: not silence
                    limit_s = tc.drain_timeout_s + max(transport.latency_s.values(), default=0.0)
                    silent_s = time.monotonic() - waiting_since
                    if silent_s > limit_s:
                        self.log.log(
                            time.monotonic(),
                            "drain_timeout",
                            machine.progress_step,
                            waited_s=silent_s,
                            **machine.protocol.missing,
                        )
                        self.log.flush()
                        break
            now = time.monotonic()
            if slowed:
                t = time.perf_counter()
            if now - self._interval_t >= log_every_s:
                self._interval(now, phase)
            self._evaluate(now)
            if slowed:  # logging and evaluation are not work a slower machine would stretch
                self._waited_s += time.perf_counter() - t
        self._let_last_messages_leave()
        now = time.monotonic()
        self._interval(now, phase)
        self._evaluate(now, force=True)

    def _let_last_messages_leave(self) -> None:
        """After the end: let queued messages leave while the peers that need them are alive."""
        transport = self.transport
        deadline = (
            time.monotonic()
            + min(self.config.transport.send_timeout_s, 5.0)
            + transport.max_delay_s()  # latency, or an emulated cut (--partition)
        )
        while transport.has_pending and time.monotonic() < deadline and not self.stop_requested:
            self._poll_control()
            transport.flush()
            self._receive_all(timeout_s=transport.wait_cap_s(0.005))

    # -- results -----------------------------------------------------------------
    def write_results(self, run_dir: Path, name: str) -> None:
        """The final model (and a DASGD node's own-delta sum) and the ``final`` record."""
        machine = self.machine
        if isinstance(machine, PSServer):
            np.save(run_dir / "server.npy", machine.x)
        elif isinstance(machine, DasgdNode):
            np.save(run_dir / f"{name}.npy", machine.params)
            np.save(run_dir / f"{name}.delta_sum.npy", machine.delta_sum)
        fields = machine.final_fields()
        if isinstance(machine, DasgdNode):
            fields["drained"] = self.drained
        if self.failed_nodes or self.transport.msgs_to_failed:
            fields["failed_nodes_seen"] = list(self.failed_nodes)
            fields["msgs_to_failed"] = self.transport.msgs_to_failed
        self.log.log(
            time.monotonic(),
            "final",
            machine.progress_step,
            **fields,
            eval_s=self.evaluator.eval_s if self.evaluator else 0.0,
            malformed=self.malformed,
            **(self.events.counts if self.events is not None else {}),
            **self.transport.counters(),
        )


def queue_limit_msgs(tc, message_bytes: int) -> int:
    """ZeroMQ high-water mark: ``tc.hwm_msgs``, lowered so a socket queues at most ``tc.queue_bytes``.

    Deep queues hide staleness (a delta waits behind hundreds of others) and,
    for large models, hold gigabytes; at least 2 messages are always allowed.
    """
    return max(2, min(tc.hwm_msgs, tc.queue_bytes // message_bytes))


def _build(config: RunConfig, node_id: int, run_dir: Path, meta: dict):
    """The machine this process drives, its neighbours and its evaluator."""
    data = run_dir / "data"
    n = config.n_nodes
    shard = None
    if not is_server(config, node_id):
        shard = (np.load(data / f"shard-{node_id}-X.npy"), np.load(data / f"shard-{node_id}-y.npy"))
    neighbours, adjacency = [], None
    if config.algorithm == "dasgd":
        graph = parse_topology(str(run_dir / "topology.json"), n)
        neighbours = topology_neighbours(graph, node_id)
        adjacency = adjacency_sets({k: topology_neighbours(graph, k) for k in graph})
    elif is_server(config, node_id):
        neighbours = list(range(n))
    else:
        neighbours = [n]
    factors = meta["emulation"]["slowdown_factors"]
    machine = build_machine(
        config,
        node_id,
        n_features=meta["n_features"],
        n_classes=meta["n_classes"],
        shard=shard,
        shard_sizes=meta["shard_sizes"],
        neighbours=neighbours,
        adjacency=adjacency,
        slowdown_factor=factors[node_id] if node_id < len(factors) else 1.0,
        delta_store_bytes=int(config.delta_store_mib * 2**20),
    )
    evaluator = None
    if config.eval_interval_s is not None and not (config.algorithm != "dasgd" and node_id < n):
        X_test = np.load(data / "test-X.npy").astype(machine.dtype, copy=False)
        model = machine.model if hasattr(machine, "model") else None
        if model is None:
            from ..build import build_run_model

            model = build_run_model(config, meta["n_features"], meta["n_classes"])
        evaluator = Evaluator(model, X_test, np.load(data / "test-y.npy"), config.eval_interval_s)
    return machine, neighbours, evaluator


def _restart_setup(machine, restart: dict) -> list[int]:
    """A restarted DASGD node's neighbours, dead nodes and their ``fin`` from the launcher's ``start``.

    Returns
    -------
    list of int
        The neighbours to connect to: the original ones still alive and any
        repair links to this node.
    """
    if not isinstance(machine, DasgdNode):
        raise TransportError("only DASGD nodes are restarted")
    protocol = machine.protocol
    now = [int(u) for u in restart["neighbours"]]
    for dead in restart.get("failed", ()):
        if int(dead) != machine.node_id:
            protocol.node_failed(int(dead))
    for u in list(protocol.neighbours):
        if u not in now:
            protocol.node_failed(u)
    for u in now:
        protocol.add_neighbour(u)
    for dead, (deltas, steps, *lost) in restart.get("fins", {}).items():
        protocol.failed_fin(int(dead), int(deltas), int(steps), lost[0] if lost else ())
    machine.neighbours = list(protocol.neighbours)
    machine.alone = not machine.neighbours
    return list(protocol.neighbours)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
    control_sock = ctx.socket(zmq.DEALER)
    control_sock.setsockopt(zmq.LINGER, 2000)
    control_sock.setsockopt(zmq.SNDTIMEO, 5000)  # no send to the launcher waits forever
    control_sock.connect(control_address)
    driver = None
    transport = None
    recorder = None

    def on_term(signum, frame):
        if driver is not None:
            driver.stop_requested = True
        else:
            raise _Terminated

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        meta = json.loads((run_dir / "data" / "meta.json").read_text())
        machine, neighbours, evaluator = _build(config, node_id, run_dir, meta)
        pool = BufferPool(machine.n_params, machine.dtype)
        machine.new_buffer = pool.take  # buffers ZeroMQ has released
        tc = config.transport
        bind = inbox_address(
            tc.kind, node_id, host=tc.host, base_port=tc.base_port, ipc_dir=meta["ipc_dir"]
        )
        message_bytes = machine.n_params * machine.dtype.itemsize
        links = (key.split("-") for key in meta["emulation"]["latency_s"])
        delays = meta["emulation"]["latency_s"]
        curve = None
        if tc.curve_keys:
            from .security import CurveKeys

            curve = CurveKeys(tc.curve_keys)
        transport = Transport(
            node_id,
            bind,
            curve=curve,
            key_name=lambda i: process_name(config, i),
            latency_s={int(v): delays[f"{u}-{v}"] for u, v in links if int(u) == node_id},
            partitions=Partitions(meta["emulation"].get("partition", ())),
            hwm_msgs=queue_limit_msgs(tc, message_bytes),
            max_message_bytes=message_bytes + wire.MAX_HEADER_BYTES + 4096,
        )
        address = transport.start()
        if tc.kind == "tcp" and tc.advertise_host:  # bound to all interfaces: say which reaches us
            address = f"tcp://{_url_host(tc.advertise_host)}:{address.rsplit(':', 1)[1]}"
        control.send(
            control_sock, {"kind": "ready", "node": node_id, "address": address, "pid": os.getpid()}
        )
        # the launcher waits for its nodes, then (several hosts) for the rendezvous: both deadlines
        start = control.recv(control_sock, tc.ready_timeout_s * 3, parent_pid=parent_pid)
        if start.get("kind") != "start":
            raise TransportError(f"expected start from the launcher, got {start.get('kind')!r}")
        addresses = {int(k): v for k, v in start["addresses"].items()}
        restart = start.get("restart")
        if restart is not None:  # a restarted node: today's neighbours, then a donor's state
            neighbours = _restart_setup(machine, restart)
        transport.connect({u: addresses[u] for u in neighbours})
        name = process_name(config, node_id)
        # the run clock: seconds since the launcher said start, the same in every process
        t0_unix_s = float(start.get("t0_unix_s", time.time()))
        t0 = time.monotonic() - (time.time() - t0_unix_s)
        transport.start_run_clock(t0)  # emulated cuts (--partition) are on the run clock
        recorder = build_recorder(config, node_id, machine, run_dir, meta["shard_sizes"], t0=t0)
        if recorder is not None:
            if evaluator is not None:
                evaluator.snapshots = ModelSnapshots(
                    run_dir,
                    name,
                    machine.n_params,
                    machine.dtype,
                    seed=config.train.seed,
                    t0=t0,
                )
        with EventLog(
            run_dir / f"{name}.jsonl", node_id, flush_interval_s=config.log_interval_s, t0=t0
        ) as log:
            driver = Driver(machine, config, transport, log, pool, evaluator)
            log.log(
                time.monotonic(),
                "start",
                0,
                t0_unix_s=t0_unix_s,
                neighbours=neighbours,
                n_params=machine.n_params,
                address=address,
                **machine.start_fields(),
                **({"restart": restart} if restart is not None else {}),
            )
            if restart is not None:
                for out in machine.join(int(restart["donor"]), int(restart["deltas"])):
                    driver._send(out)

            def progress(record):
                if os.getppid() != parent_pid:
                    raise TransportError("the launcher is gone")
                control.send(control_sock, {"kind": "progress", **record}, droppable=True)

            heartbeat_t = [time.monotonic()]

            def read_control(wait_s: float = 0.0):
                if time.monotonic() - heartbeat_t[0] >= control.HEARTBEAT_S:
                    heartbeat_t[0] = time.monotonic()
                    control.send(control_sock, {"kind": "alive", "node": node_id}, droppable=True)
                timeout_ms = int(wait_s * 1000)
                while control_sock.poll(timeout_ms):
                    timeout_ms = 0
                    message = control.unpack(control_sock.recv())
                    if message is None:
                        continue
                    if message.get("kind") == "failed":
                        dead = int(message["node"])
                        links = [
                            int(v if u == node_id else u)
                            for u, v in message.get("links", ())
                            if node_id in (u, v)
                        ]
                        addresses = {int(k): v for k, v in message.get("addresses", {}).items()}
                        held = driver.node_failed(dead, message.get("t_s"), links, addresses)
                        if held is not None:
                            control.send(
                                control_sock,
                                {"kind": "held", "node": node_id, "failed": dead, **held},
                            )
                    elif message.get("kind") == "fin_of":
                        driver.failed_fin(
                            int(message["node"]),
                            int(message["deltas"]),
                            int(message["steps"]),
                            [int(q) for q in message.get("lost", ())],
                        )
                    elif message.get("kind") == "finished":
                        driver.neighbour_finished(int(message["node"]))
                    elif message.get("kind") == "rejoined":
                        driver.node_rejoined(
                            int(message["node"]),
                            str(message["address"]),
                            [int(u) for u in message.get("neighbours", ())],
                        )

            driver.on_progress = progress
            driver.on_control = read_control
            driver.run()
            read_control()  # a neighbour that died at the end: do not linger on it at close
            driver.write_results(run_dir, name)
        control.send(control_sock, {"kind": "done", "node": node_id})
        return 0
    except _Terminated:
        print(f"node {node_id}: terminated", file=sys.stderr)
        return 143
    except (DasgdError, OSError, ValueError) as exc:
        message = str(exc) if str(exc).startswith(f"node {node_id}") else f"node {node_id}: {exc}"
        print(message, file=sys.stderr)
        try:
            control.send(control_sock, {"kind": "error", "node": node_id, "message": str(exc)})
        except zmq.ZMQError:
            pass
        return 1
    finally:
        if recorder is not None:  # what was recorded survives an error
            recorder.flush()
        if transport is not None:
            # done: what ZeroMQ still queues (our `complete`, behind relays on a slow link) is
            # awaited by live neighbours, so it gets the send deadline; after an error, 1 s
            done = driver is not None and driver.drained
            transport.close(linger_s=config.transport.send_timeout_s if done else 1.0)
        control_sock.close(linger=1000)
        ctx.term()
