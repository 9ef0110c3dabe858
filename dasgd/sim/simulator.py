"""A discrete-event simulation of a whole run in virtual time, on the same node state machines.

:func:`simulate` is what ``dasgd simulate`` does: it builds every node (or PS
worker and server) with :func:`dasgd.build.build_machine`, exactly as the
process runtime does, and drives them with a virtual clock and an event queue
(a heap of ``(time, sequence number, event)``: the sequence number makes ties
deterministic) instead of processes and sockets. The numpy models and the data
are real, so loss curves are real; time is modelled:

- **A node is a single server**, as its process is: it handles one message,
  or one step, at a time. Handling a message costs
  ``SimCosts.message_s + SimCosts.byte_s * payload_bytes`` of host time (decode,
  check, apply, relay), a step ``SimCosts.step_s`` plus the gradient's modelled
  cost ``SimCosts.gradient_fixed_s + SimCosts.gradient_s_per_unit * batch *
  n_params``, and every message sent ``SimCosts.send_s``. A slowed node
  (``--slowdown``) owes (factor - 1) times that work, as in the runtime.
- **Emulated compute time** (``--compute-time``) is a wait between reading the
  model and producing the update, during which the host keeps handling
  messages, exactly as in the runtime (the machines decide it).
- **A link** is a FIFO with the latency of ``--latency`` and a transfer time of
  size / ``--bandwidth``; a node's uplink is shared by all its outgoing
  messages (the parameter server's is the one that saturates first). A link
  cut by ``--partition`` holds a message due during the cut until the cut
  ends, as the runtime's transport does (nothing lost, order kept); the
  simulator has no silence deadlines, so a cut of any length only delays.
- **Randomness**: every node's draws come from its own generators seeded from
  the run seed and its id (as in the runtime), so a simulation is
  deterministic: same configuration and seed, same result, bit for bit.
- **Failures** (``--kill NODE@T_S``, ``SimConfig.kills``): at ``T_S`` the node
  stops; what had left its uplink by then still arrives, what it had queued
  is lost, and messages to it are lost from then on. The simulated launcher,
  as the real one (:mod:`dasgd.runtime.launch`), notices it at its next check
  (a multiple of :data:`~dasgd.core.failures.CHILD_POLL_S`), records it in
  ``failures.json`` (``exit_code`` -9, times in virtual seconds, plus
  ``killed_t_s``), and under ``--on-node-failure continue`` repairs the
  overlay (:func:`~dasgd.core.failures.repair_links`,
  ``topology-changes.jsonl``) and sends every survivor ``failed``; each
  survivor links up, exchanges ``have`` messages over the simulated links
  (every node keeps a ``--delta-store-mib`` store when kills are given) and
  reports what it holds; once all have, every survivor gets the derived
  ``fin`` (:func:`~dasgd.core.failures.derive_fin`). Control messages take
  no time on the wire and ``message_s`` of host time. Survivors whose drain
  cannot complete (a store too small) stop after ``--drain-timeout-s``, as
  real nodes do. Under ``--on-node-failure stop`` the simulation raises
  :class:`~dasgd.errors.NodeFailed` naming the node.

It writes the same run directory as ``dasgd run`` (``config.json``,
``topology.json``, one ``node-<i>.jsonl`` log per node with ``t_s`` in
virtual seconds, final models, ``summary.json``), so ``dasgd summary`` and
everything that reads runs works unchanged.

Memory: each DASGD node keeps its version vector and per-origin counters (6
arrays of n int32 and 3 of n int64: 48 n bytes per node, 48 n^2 in all; 4.5
GiB at n = 10,000), about 1 kB per edge, plus the base vector of every delta
in flight and a copy of the sender's vector for every message whose lag is
sampled.
"""

from __future__ import annotations

import heapq
import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..analysis.events import CHUNK_ROWS, ModelSnapshots
from ..analysis.metrics import Evaluator, EventLog
from ..build import build_machine, build_recorder, build_run_model, is_server
from ..config import RunConfig
from ..core.actions import CONTINUE, DONE, WAIT_BACKLOG, WAIT_DRAIN, WAITS
from ..core.emulation import Partitions, release_after
from ..core.failures import CHILD_POLL_S, derive_fin, lost_deltas, repair_links
from ..core.node import DasgdNode
from ..core.protocol import adjacency_sets, lag_sampled
from ..core.ps import PSServer
from ..errors import ConfigError, DasgdError, NodeFailed, WireError
from ..ml.data import local_steps
from ..rundir import process_name
from ..topology import neighbours as topology_neighbours

__all__ = ["SimCosts", "SimulationStalled", "check_kills", "estimate_memory_bytes", "simulate"]

#: A simulation whose estimated memory exceeds this fraction of the machine's is refused.
MEMORY_FRACTION = 0.8
#: Simulations of more nodes than this measure the model lag on one in n // LAG_SAMPLE_NODES
#: new messages (NodeProtocol's lag_every): summary lag_avg is then a sample mean, lag_max a
#: sample maximum.
LAG_SAMPLE_NODES = 1000
#: Memory per topology edge in a simulation, bytes (graph, adjacency sets, per-edge statistics;
#: measured ~860 on a 1,000-node complete graph).
EDGE_BYTES = 1000
_ARRIVE, _WAKE = 0, 1
# failure injection (--kill): a node dies; the launcher notices it, hears a survivor's `held`
# report, notices a node that finished
_KILL, _DETECT, _REPORT, _EXIT = 2, 3, 4, 5
#: The exit code a killed node's failure record gives (SIGKILL, as ``kill -9`` of a real node).
KILLED_EXIT_CODE = -9


class SimulationStalled(DasgdError):
    """No event is left but some node has not finished (a protocol bug, never expected)."""


@dataclass(frozen=True)
class SimCosts:
    """Modelled host time of a node, in seconds (defaults measured on the 2-core dev machine).

    Defaults from ``benchmarks/bench_sim_vs_real.py --costs`` (a real node's
    pieces timed with the runtime's own machines, drivers and ipc sockets,
    2026-11-30, quiet machine).

    Attributes
    ----------
    step_s : float
        Per local step, around the gradient (optimizer, accumulate, bookkeeping).
    gradient_fixed_s : float
        Fixed cost of one gradient call.
    gradient_s_per_unit : float
        Gradient cost per (sample x parameter): ``batch_size * n_params`` units.
    message_s : float
        Per message handled (decode, protocol, staleness bookkeeping).
    byte_s : float
        Per payload byte of a handled message (finite check, apply).
    send_s : float
        Per message put on the wire (per destination).
    vv_entry_s : float
        Per version-vector entry of a DASGD message handled (lag and
        staleness sums, decode of the two vectors).
    wake_s : float
        A node that was idle (waiting for a message or the end of its compute
        time) starts work this much later: the runtime's poll returns ~70-100 us
        late (measured by ``benchmarks/bench_sim_vs_real.py --costs``).
    start_spread_s : float
        Nodes start at times drawn uniformly from [0, start_spread_s), as
        processes do (within about a millisecond): with identical modelled
        costs, a common start would keep every node in exact lockstep.
    """

    step_s: float = 25e-6
    gradient_fixed_s: float = 30e-6
    gradient_s_per_unit: float = 0.3e-9
    message_s: float = 40e-6
    byte_s: float = 0.25e-9
    send_s: float = 16e-6
    vv_entry_s: float = 4e-9
    wake_s: float = 80e-6
    start_spread_s: float = 1e-3


class _Node:
    """The simulator's view of one process: its machine, inbox, host and uplink."""

    __slots__ = (
        "id",
        "machine",
        "inbox",
        "busy_until",
        "wait",
        "woken",
        "uplink_free",
        "log",
        "evaluator",
        "interval_t",
        "work_s",
        "msgs_in",
        "msgs_out",
        "bytes_in",
        "bytes_out",
        "scheduled",
        "grad_cost_s",
        "uplink_queue",
        "uplink_bytes",
        "events",
        "dead",
        "exited",
        "control",
        "sent",
        "failed_seen",
        "msgs_to_failed",
    )

    def __init__(self, node_id: int, machine) -> None:
        self.id = node_id
        self.machine = machine
        self.inbox: deque = deque()
        self.busy_until = 0.0
        self.wait = CONTINUE
        self.woken = True
        self.uplink_free = 0.0
        self.log: EventLog | None = None
        self.evaluator: Evaluator | None = None
        self.interval_t = 0.0
        self.work_s = 0.0
        self.msgs_in = self.msgs_out = self.bytes_in = self.bytes_out = 0
        self.scheduled = -1.0  # time of the pending wake-up event, if any
        self.grad_cost_s = 0.0
        self.uplink_queue: deque = deque()  # (time its last byte leaves, size) per queued message
        self.uplink_bytes = 0
        self.events = None  # the machine's EventRecorder, if it records events
        # failure injection only
        self.dead = False  # killed (--kill): handles nothing, sends nothing more
        self.exited = False  # done, and the launcher has noticed
        self.control: deque = deque()  # the launcher's messages (failed, fin_of, finished)
        self.sent: deque = deque()  # (time its last byte leaves, event seq) per message sent
        self.failed_seen: list[int] = []
        self.msgs_to_failed = 0  # messages it sent that reached a dead node

    def uplink_backlog(self, t: float) -> tuple[int, int]:
        """Messages and bytes not yet on the wire at time ``t`` (backpressure)."""
        queue = self.uplink_queue
        while queue and queue[0][0] <= t:
            self.uplink_bytes -= queue.popleft()[1]
        return len(queue), self.uplink_bytes

    def counters(self) -> dict:
        return {
            "msgs_in": self.msgs_in,
            "msgs_out": self.msgs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "backlog_msgs": 0,
            "delayed_msgs": 0,
        }


class _SimLog(EventLog):
    """An EventLog that holds no file open between writes (a simulation has thousands of logs)."""

    max_buffered = 256

    def open(self) -> EventLog:
        return self

    def log(self, now: float, kind: str, step: int, **fields) -> dict:
        record = super().log(now, kind, step, **fields)
        if len(self._buffer) >= self.max_buffered:
            self.flush()
        return record

    def flush(self) -> None:
        if not self._buffer:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write("\n".join(self._buffer) + "\n")
        self._buffer.clear()

    def close(self) -> None:
        self.flush()

    def truncate_after(self, t_s: float) -> None:
        """Drop the buffered records later than ``t_s`` (a killed process never wrote them)."""
        self._buffer[:] = [line for line in self._buffer if json.loads(line)["t_s"] <= t_s]


def estimate_memory_bytes(config: RunConfig, n_params: int, n_nodes: int, n_edges: int = 0) -> int:
    """Bytes a simulation needs, roughly: version-vector bookkeeping, edges and model buffers.

    DASGD: 48 n^2 bytes (per node, 6 vectors of n int32 and 3 of n int64;
    measured), about :data:`EDGE_BYTES` per edge (graph, adjacency sets,
    per-edge statistics) and about 6 model-sized buffers per node; with
    kills (``config.sim.kills``), each node's delta store at its full
    ``--delta-store-mib`` (deltas and their base vectors fill it in any
    run of many nodes). PS: model buffers only. Messages in flight come on
    top (see the module docstring).
    """
    itemsize = np.dtype(config.model.dtype).itemsize
    models = (n_nodes + 1) * 6 * n_params * itemsize
    if config.algorithm != "dasgd":
        return models
    stores = n_nodes * int(config.delta_store_mib * 2**20) if config.sim.kills else 0
    return 48 * n_nodes * n_nodes + EDGE_BYTES * n_edges + models + stores


def _machine_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


class Simulation:
    """One simulated run; :func:`simulate` is the usual entry point.

    Parameters
    ----------
    config : RunConfig
        Resolved (``n_nodes`` set), as :func:`dasgd.runtime.launch.prepare_run` returns it.
    run_dir : Path
    context : dict
        From :func:`~dasgd.runtime.launch.prepare_run` (graph, dataset, shards, meta).
    costs : SimCosts
    progress : bool
        Show a progress bar (virtual steps done) on stderr.
    """

    def __init__(
        self, config: RunConfig, run_dir: Path, context: dict, costs: SimCosts, progress: bool
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.costs = costs
        self.progress = progress
        self._heap: list = []
        self._seq = 0
        n = config.n_nodes
        meta = context["meta"]
        dataset = context["dataset"]
        graph = context["graph"]
        dtype = np.dtype(config.model.dtype)
        self.model = build_run_model(config, dataset.n_features, dataset.n_classes)
        ps = config.algorithm != "dasgd"
        self.n_procs = n + ps
        adjacency = None
        if not ps:
            adjacency = adjacency_sets({k: topology_neighbours(graph, k) for k in graph})
        factors = meta["emulation"]["slowdown_factors"]
        latency = meta["emulation"]["latency_s"]
        self.latency_s: dict[tuple[int, int], float] = {}
        for key, d in latency.items():
            u, v = key.split("-")
            self.latency_s[(int(u), int(v))] = d
        self.partitions = Partitions(meta["emulation"].get("partition", ()))
        self._cut_windows: dict[tuple[int, int], list] = {}  # per directed link, on demand
        bw = config.sim.bandwidth_bps
        self.byte_time_s = 8.0 / bw if bw else 0.0
        self.message_bytes = config.sim.message_bytes
        X_test = dataset.X_test.astype(dtype, copy=False)
        # int32 counters halve the n^2 bookkeeping while they hold the run's total steps
        total_steps = sum(local_steps(config.train, len(idx)) for idx in context["shards"])
        vv_dtype = np.int32 if total_steps < 2**31 - 1 else np.int64
        # above LAG_SAMPLE_NODES nodes, model lag on a sample of messages (an O(n) sum each)
        self.lag_every = max(1, n // LAG_SAMPLE_NODES)
        # failure injection (--kill): the launcher's state, as in dasgd.runtime.launch
        self.kills = config.sim.kills
        self.shard_sizes = meta["shard_sizes"]
        self.failures: dict[int, dict] = {}  # failures.json, by node
        self.kills_ignored: list[int] = []  # nodes already done when their kill came
        self.overlay: dict[int, set[int]] = {}
        if self.kills and not ps:
            self.overlay = {k: set(topology_neighbours(graph, k)) for k in graph}
        self._cancelled: set[int] = set()  # seqs of arrivals lost with their dead sender
        # dead node -> ({survivor: held}, running survivors yet to report)
        self._awaiting: dict[int, tuple[dict[int, dict], set[int]]] = {}
        self._told_finished: set[int] = set()
        self._to_detect: dict[float, list[tuple[int, float]]] = {}  # check time -> (node, killed)
        # every node keeps recent deltas for the anti-entropy after a failure, as real nodes do
        store_bytes = int(config.delta_store_mib * 2**20) if self.kills else 0
        self.nodes: list[_Node] = []
        self.neighbours: list[list[int]] = []
        for i in range(self.n_procs):
            shard = None
            if not is_server(config, i):
                idx = context["shards"][i]
                shard = (dataset.X_train[idx], dataset.y_train[idx])
            if not ps:
                nbrs = topology_neighbours(graph, i)
            elif is_server(config, i):
                nbrs = list(range(n))
            else:
                nbrs = [n]
            factor = factors[i] if i < len(factors) else 1.0
            machine = build_machine(
                config,
                i,
                n_features=dataset.n_features,
                n_classes=dataset.n_classes,
                shard=shard,
                shard_sizes=meta["shard_sizes"],
                neighbours=nbrs,
                adjacency=adjacency,
                slowdown_factor=factor,
                vv_dtype=vv_dtype,
                lag_every=self.lag_every,
                model=self.model,
                delta_store_bytes=store_bytes,
            )
            node = _Node(i, machine)
            # thousands of nodes buffer events at once: keep each buffer small
            node.events = build_recorder(
                config,
                i,
                machine,
                run_dir,
                meta["shard_sizes"],
                t0=0.0,
                chunk_rows=max(64, min(CHUNK_ROWS, 4_000_000 // self.n_procs)),
            )
            node.grad_cost_s = costs.gradient_fixed_s + costs.gradient_s_per_unit * (
                config.train.batch_size * machine.n_params
            )
            name = process_name(config, i)
            node.log = _SimLog(run_dir / f"{name}.jsonl", i, flush_interval_s=float("inf"), t0=0.0)
            wants_eval = not ps or is_server(config, i)
            if config.eval_interval_s is not None and wants_eval:
                snapshots = None
                if config.record_events:
                    snapshots = ModelSnapshots(
                        run_dir, name, machine.n_params, dtype, seed=config.train.seed
                    )
                node.evaluator = Evaluator(
                    self.model, X_test, dataset.y_test, config.eval_interval_s, snapshots
                )
            self.nodes.append(node)
            self.neighbours.append(nbrs)
        self.events = 0
        self.messages = 0
        self.malformed = 0
        self.truncated = False

    # -- event queue ---------------------------------------------------------------
    def _push(self, t: float, kind: int, node: int, data=None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, node, data))

    def _wake_at(self, node: _Node, t: float) -> None:
        if node.scheduled != t:
            node.scheduled = t
            self._push(t, _WAKE, node.id)

    # -- sending -------------------------------------------------------------------
    def _dispatch(self, node: _Node, outs, t: float) -> float:
        """Put messages on node's uplink from time ``t``; returns the host time it spent."""
        cost = 0.0
        track = bool(self.kills)
        if track:  # what has left cannot be lost any more
            sent = node.sent
            while sent and sent[0][0] <= t:
                sent.popleft()
        for out in outs:
            header = out.header
            # the sender's live vector: freeze it as encoding would (only where a lag is sampled)
            if header.sender_vv.size and (
                self.lag_every == 1 or lag_sampled(header, self.lag_every)
            ):
                header = header.replace_sender(header.sender, header.sender_vv.copy())
            payload = out.payload
            if payload is not None and out.live:
                payload = payload.copy()
            size = 64 + 4 * (header.sender_vv.size + header.base_vv.size)
            if payload is not None:
                size += self.message_bytes or payload.nbytes
            message = (header, payload, size)
            for to in out.to:
                cost += self.costs.send_s
                start = max(t + cost, node.uplink_free)
                node.uplink_free = start + size * self.byte_time_s
                if self.byte_time_s:
                    node.uplink_queue.append((node.uplink_free, size))
                    node.uplink_bytes += size
                arrive = node.uplink_free + self.latency_s.get((node.id, to), 0.0)
                if self.partitions:
                    arrive = self._after_cuts(node.id, to, arrive)
                node.msgs_out += 1
                node.bytes_out += size
                self._push(arrive, _ARRIVE, to, message)
                if track:
                    node.sent.append((node.uplink_free, self._seq))
                self.messages += 1
        return cost

    def _after_cuts(self, src: int, dst: int, t: float) -> float:
        """When a message due at ``t`` on link src -> dst arrives: after any cut (--partition)."""
        windows = self._cut_windows.get((src, dst))
        if windows is None:
            windows = self._cut_windows[(src, dst)] = self.partitions.windows(src, dst)
        return release_after(windows, t) if windows else t

    # -- one node ------------------------------------------------------------------
    def _poke(self, node: _Node, t: float) -> None:
        """Give node's host whatever is due at time ``t`` (it is free)."""
        machine = node.machine
        costs = self.costs
        inbox = node.inbox
        wait = node.wait
        if costs.wake_s and t > node.busy_until and (inbox or node.control or self._due(node, t)):
            # a host that sat idle acts late (the runtime's poll and sleep overshoot)
            node.busy_until = t + costs.wake_s
            self._wake_at(node, node.busy_until)
            return
        if node.control and wait is not DONE:
            cost = self._handle_control(node, t)
            if node.wait in WAITS or isinstance(node.wait, float):
                node.woken = True  # the machine decides again (a fin_of may end its drain)
            self._busy(node, t, cost)
            return
        if inbox:
            # everything that has arrived, back to back (as the runtime's receive-all); what
            # arrives meanwhile joins the inbox before the host is free again
            cost = self._handle_inbox(node, t, 0.0)
            if node.wait in WAITS or isinstance(node.wait, float):
                node.woken = True  # a message arrived: the machine decides again
            self._busy(node, t, cost)
            return
        if wait is DONE:
            return
        if isinstance(wait, float) and t < wait and not node.woken:
            self._wake_at(node, wait)
            return
        if wait in WAITS and not node.woken:
            if wait is WAIT_BACKLOG:  # decide again when the next queued message has left
                node.uplink_backlog(t)
                queue = node.uplink_queue
                self._wake_at(node, queue[0][0] if queue else t)
                node.woken = True
            return
        before = self._gradients(machine)
        backlog_msgs, backlog_bytes = node.uplink_backlog(t)
        sends, wait = machine.advance(
            t, work_s=node.work_s, backlog_msgs=backlog_msgs, backlog_bytes=backlog_bytes
        )
        node.work_s = 0.0
        cost = costs.step_s if self._gradients(machine) != before or sends else 1e-9
        if self._gradients(machine) != before:
            cost += node.grad_cost_s
        if sends:
            cost += self._dispatch(node, sends, t + cost)
        node.wait = wait
        node.woken = False
        if wait is DONE:
            node.log.log(t + cost, "interval", machine.progress_step, **self._interval(node, t))
            if self.kills:  # the launcher notices the exit at its next check
                self._push(_next_poll_s(t + cost), _EXIT, node.id)
        self._busy(node, t, cost)

    def _handle_inbox(self, node: _Node, t: float, cost: float) -> float:
        """Handle every message in node's inbox from time ``t + cost``; returns the new cost."""
        costs = self.costs
        machine = node.machine
        inbox = node.inbox
        message_s, byte_s, vv_s = costs.message_s, costs.byte_s, costs.vv_entry_s
        events = node.events
        while inbox:
            header, payload, size = inbox.popleft()
            cost += message_s + vv_s * (header.sender_vv.size + header.base_vv.size)
            if payload is not None:
                cost += byte_s * payload.nbytes
            if events is not None:  # applied once handled
                events.now = t + cost
            try:
                outs = machine.on_message(header, payload)
            except WireError:  # as the runtime: counted and dropped (never expected here)
                self.malformed += 1
                outs = ()
            if outs:
                cost += self._dispatch(node, outs, t + cost)
        return cost

    def _handle_control(self, node: _Node, t: float) -> float:
        """The launcher's messages to node, as :class:`dasgd.runtime.node.Driver` handles them.

        ``failed``: the machine forgets the dead node and links up
        (``node_failed``: its ``have`` requests go out), a ``node_failed``
        record is logged, every message already in the inbox is handled, and
        then the node reports what it holds of the dead node (``held``, to the
        launcher). ``fin_of``: the dead node's derived ``fin``
        (``failed_fin`` record). ``finished``: a node that exited is no longer
        awaited. Returns the host time spent, in seconds.
        """
        machine = node.machine
        cost = 0.0
        reports = []
        while node.control:
            item = node.control.popleft()
            cost += self.costs.message_s
            what = item[0]
            if what == "failed":
                _, dead, detected_s, links = item
                if isinstance(machine, DasgdNode):
                    outs = machine.node_failed(dead, links)
                    if outs:
                        cost += self._dispatch(node, outs, t + cost)
                    reports.append(dead)
                else:  # the ps-async server drops the worker
                    machine.node_failed(dead)
                node.failed_seen.append(dead)
                node.log.log(
                    t + cost,
                    "node_failed",
                    machine.progress_step,
                    failed_node=dead,
                    detected_t_s=detected_s,
                    links=list(links),
                )
            elif what == "fin_of":
                _, dead, deltas, steps, lost = item
                machine.protocol.failed_fin(dead, deltas, steps, lost)
                node.log.log(
                    t + cost,
                    "failed_fin",
                    machine.progress_step,
                    failed_node=dead,
                    deltas=deltas,
                    steps=steps,
                )
            else:  # finished
                machine.protocol.neighbour_finished(item[1])
        if reports:  # the dead node's last messages count in the report
            cost = self._handle_inbox(node, t, cost)
            for dead in reports:
                self._push(t + cost, _REPORT, node.id, (dead, machine.protocol.held(dead)))
        return cost

    @staticmethod
    def _due(node: _Node, t: float) -> bool:
        """True if the machine has something to do at ``t`` with an empty inbox."""
        wait = node.wait
        if wait is DONE:
            return False
        if isinstance(wait, float):
            return t >= wait or node.woken
        return wait not in WAITS or node.woken

    def _busy(self, node: _Node, t: float, cost: float) -> None:
        node.work_s += cost
        node.busy_until = t + cost
        self._record(node, node.busy_until)
        self._wake_at(node, node.busy_until)

    @staticmethod
    def _gradients(machine) -> int:
        if isinstance(machine, PSServer):
            return machine.version
        if isinstance(machine, DasgdNode):
            return machine.gradients_computed
        return machine.gradients

    def _interval(self, node: _Node, t: float) -> dict:
        fields = node.machine.interval_fields(t)
        draining = getattr(node.machine, "t_train_end", None) is not None
        fields.setdefault("phase", "drain" if draining else "train")
        node.interval_t = t
        return {**fields, "malformed": 0, **node.counters()}

    def _record(self, node: _Node, t: float) -> None:
        if t - node.interval_t >= self.config.log_interval_s:
            node.log.log(t, "interval", node.machine.progress_step, **self._interval(node, t))
        if node.evaluator is not None:
            m = node.machine
            params = m.x if isinstance(m, PSServer) else m.params
            node.evaluator.maybe_log(node.log, t, m.progress_step, params)

    # -- the run -------------------------------------------------------------------
    def run(self, *, max_real_s: float | None = None) -> float:
        """Simulate until every node is done; returns the virtual duration in seconds.

        Parameters
        ----------
        max_real_s : float, optional
            Stop after this many real seconds, unfinished (``truncated`` is
            then True): for throughput measurements of runs too long to finish.

        Raises
        ------
        SimulationStalled
            If events run out while a node is not done.
        """
        nodes = self.nodes
        for node_id, t_s in self.kills:  # before the start: a kill at 0 comes first
            self._push(t_s, _KILL, node_id)
        for node in nodes:
            m = node.machine
            node.log.log(
                0.0,
                "start",
                0,
                neighbours=self.neighbours[node.id],
                n_params=m.n_params,
                address="sim",
                **m.start_fields(),
            )
            if node.evaluator is not None:
                params = m.x if isinstance(m, PSServer) else m.params
                node.evaluator.maybe_log(node.log, 0.0, 0, params, force=True)
            # each node's own generator, from the run seed and its id
            rng = np.random.default_rng([self.config.train.seed, node.id, 0x73696D])
            self._wake_at(node, float(rng.uniform(0.0, self.costs.start_spread_s)))
        bar = self._progress_bar()
        heap = self._heap
        pop = heapq.heappop
        t = 0.0
        next_bar = 0
        deadline = None if max_real_s is None else time.perf_counter() + max_real_s
        self.truncated = False
        next_refresh = 0.0
        cancelled = self._cancelled
        try:  # a failure under --on-node-failure stop ends the loop with NodeFailed
            while heap:
                t, seq, kind, i, data = pop(heap)
                self.events += 1
                if kind > _WAKE:
                    self._failure_event(t, kind, i, data)
                    continue
                node = nodes[i]
                if cancelled and seq in cancelled:  # its sender died before it left
                    cancelled.discard(seq)
                    continue
                if node.dead:
                    if kind == _ARRIVE:
                        nodes[data[0].sender].msgs_to_failed += 1
                    continue
                if kind == _ARRIVE:
                    node.inbox.append(data)
                    node.msgs_in += 1
                    node.bytes_in += data[2]
                elif node.scheduled == t:
                    node.scheduled = -1.0
                if t < node.busy_until:
                    continue  # its wake-up at busy_until comes
                self._poke(node, t)
                if self.events >= next_bar:
                    next_bar = self.events + 5000
                    now_real = time.perf_counter()
                    if deadline is not None and now_real > deadline:
                        self.truncated = True
                        break
                    if bar is None or now_real < next_refresh:
                        continue
                    next_refresh = now_real + 0.5
                    bar.n = sum(
                        self._gradients(nd.machine)
                        for nd in nodes
                        if not is_server(self.config, nd.id)
                    )
                    bar.refresh()
        finally:
            if bar is not None:
                bar.close()
        if self.truncated:
            return t
        stuck = [node.id for node in nodes if node.wait is not DONE and not node.dead]
        if stuck and self.failures and all(nodes[i].wait is WAIT_DRAIN for i in stuck):
            # after a failure the anti-entropy may not repair everything (--delta-store-mib):
            # as real nodes, the stuck ones give up after --drain-timeout-s of silence
            for i in stuck:  # silent since it last handled a message
                self._drain_timeout(nodes[i], nodes[i].busy_until)
            stuck = []
        if stuck:
            raise SimulationStalled(
                f"simulation stalled at t = {t:.6f} s: node(s) {stuck[:10]} never finished"
            )
        return max(node.busy_until for node in nodes if not node.dead)

    # -- failures (--kill) ------------------------------------------------------------
    def _failure_event(self, t: float, kind: int, i: int, data) -> None:
        if kind == _KILL:
            self._kill(self.nodes[i], t)
        elif kind == _DETECT:
            # the launcher's check goes through its children in id order, as check_children
            for node_id, killed_s in sorted(self._to_detect.pop(t)):
                self._detect(node_id, t, killed_s)
        elif kind == _REPORT:
            dead, held = data
            if dead in self._awaiting:
                reports, missing = self._awaiting[dead]
                reports[i] = held
                missing.discard(i)
                self._settle(t)
        else:  # _EXIT
            node = self.nodes[i]
            node.exited = True
            if self.failures and self.config.algorithm == "dasgd" and i not in self._told_finished:
                self._tell_finished(i, t)
            self._gone(i, t)

    def _gone(self, i: int, t: float) -> None:
        """Node i stopped running (died or exited): no report is awaited from it."""
        for _, missing in self._awaiting.values():
            missing.discard(i)
        self._settle(t)

    def _kill(self, node: _Node, t: float) -> None:
        """Node's process dies at ``t``: what has left its uplink arrives, the rest is lost."""
        if node.wait is DONE:  # it had finished and left: nothing to kill
            self.kills_ignored.append(node.id)
            return
        node.dead = True
        node.inbox.clear()
        node.control.clear()
        for leave_t, seq in node.sent:
            if leave_t > t:
                self._cancelled.add(seq)
        node.sent.clear()
        # its log ends at the kill (records of work it began before and would end after: lost)
        node.log.truncate_after(t)
        node.log.flush()
        if node.events is not None:
            node.events.flush()
        check_s = _next_poll_s(t)
        if check_s not in self._to_detect:
            self._to_detect[check_s] = []
            self._push(check_s, _DETECT, -1)
        self._to_detect[check_s].append((node.id, t))

    def _alive(self) -> list[int]:
        """Processes running as the launcher sees them: not dead, not exited (server included)."""
        return [node.id for node in self.nodes if not node.dead and not node.exited]

    def _tell(self, node: _Node, t: float, item: tuple) -> None:
        """A control message from the launcher reaches node at ``t`` (a running process only)."""
        if node.wait is DONE:
            return
        node.control.append(item)
        if t >= node.busy_until:
            self._poke(node, t)

    def _tell_finished(self, i: int, t: float) -> None:
        """Node i exited after a failure: its neighbours stop awaiting its ``complete``.

        The real launcher tells every process; only i's neighbours in the
        current overlay (repair links included) act on it, so only they are told.
        """
        self._told_finished.add(i)
        for j in sorted(self.overlay.get(i, ())):
            node = self.nodes[j]
            if not node.dead and not node.exited:
                self._tell(node, t, ("finished", i))

    def _detect(self, i: int, t: float, killed_s: float) -> None:
        """The launcher sees node i dead at ``t``: record it, repair, tell every survivor."""
        config = self.config
        name = process_name(config, i)
        log_path = self.run_dir / f"{name}.jsonl"
        reason = f"killed at t = {killed_s:g} s by --kill {i}@{killed_s:g} (simulated)"
        if config.on_node_failure != "continue":
            raise NodeFailed(
                f"node {i} exited with code {KILLED_EXIT_CODE}: {reason}; log: {log_path} "
                "(--on-node-failure stop)"
            )
        self.failures[i] = self._failure_record(i, t, killed_s, reason)
        if len(self.failures) == config.n_nodes:
            raise NodeFailed(
                f"node {i} exited with code {KILLED_EXIT_CODE}, the last node alive: {reason}; "
                f"log: {log_path}"
            )
        dasgd = config.algorithm == "dasgd"
        links = repair_links(self.overlay, i) if dasgd else []
        if dasgd:
            change = {
                "t_s": self.failures[i]["detected_t_s"],
                "removed_node": i,
                "added_edges": links,
            }
            with (self.run_dir / "topology-changes.jsonl").open("a") as f:
                f.write(json.dumps(change) + "\n")
            self.failures[i]["added_edges"] = links
            self._awaiting[i] = ({}, {j for j in self._alive() if j < config.n_nodes})
        self._write_failures()
        for j in self._alive():
            node = self.nodes[j]
            if not hasattr(node.machine, "node_failed"):
                continue  # a ps-async worker: nothing changes for it
            mine = [v if u == j else u for u, v in links if j in (u, v)]
            self._tell(node, t, ("failed", i, self.failures[i]["detected_t_s"], mine))
        if dasgd:  # nodes that left already: nobody waits for them (nor over a repair link)
            for node in self.nodes:
                if node.exited and node.id not in self._told_finished:
                    self._tell_finished(node.id, t)
        self._gone(i, t)  # its own reports on earlier failures will never come

    def _settle(self, t: float) -> None:
        """The derived ``fin`` of each dead node every running survivor reported on."""
        for dead in list(self._awaiting):
            reports, missing = self._awaiting[dead]
            if missing:
                continue
            del self._awaiting[dead]
            held = list(reports.values())
            deltas, steps = derive_fin(held, self.config.train.send_every)
            end, lost = lost_deltas(held)
            if lost and not any(r.get("fin_deltas") is not None for r in held):
                deltas, steps = end, end * self.config.train.send_every  # as the launcher does
            else:
                lost = []
            self.failures[dead]["fin"] = {"deltas": deltas, "steps": steps, "reports": len(reports)}
            if lost:
                self.failures[dead]["fin"]["lost"] = lost
            self._write_failures()
            for j in self._alive():
                self._tell(self.nodes[j], t, ("fin_of", dead, deltas, steps, lost))

    def _failure_record(self, i: int, detected_s: float, killed_s: float, reason: str) -> dict:
        """``failures.json``'s entry for node i, with the fields the real launcher writes.

        ``detected_t_s`` and ``last_record_t_s`` are virtual seconds; ``last_step``
        is that of its last record before the kill (the simulated log loses
        nothing before it, a real one up to ``--log-interval-s``);
        ``killed_t_s`` (simulator only) is when it died; ``last_words`` says
        how.
        """
        from ..analysis.metrics import read_events

        records = read_events(self.run_dir / f"{process_name(self.config, i)}.jsonl")
        last = records[-1] if records else {}
        planned = int(local_steps(self.config.train, self.shard_sizes[i]))
        last_step = int(last.get("step", 0))
        return {
            "node": i,
            "exit_code": KILLED_EXIT_CODE,
            "detected_t_s": round(detected_s, 6),
            "last_step": last_step,
            "last_record_t_s": last.get("t_s"),
            "planned_steps": planned,
            "steps_lost": max(0, planned - last_step),
            "last_words": reason,
            "killed_t_s": killed_s,
        }

    def _write_failures(self) -> None:
        (self.run_dir / "failures.json").write_text(
            json.dumps(sorted(self.failures.values(), key=lambda f: f["node"]), indent=2) + "\n"
        )

    def _drain_timeout(self, node: _Node, t: float) -> None:
        """Node gives up draining after ``--drain-timeout-s`` of silence from ``t`` (as the runtime)."""
        waited_s = self.config.transport.drain_timeout_s
        end = t + waited_s
        machine = node.machine
        node.log.log(
            end,
            "drain_timeout",
            machine.progress_step,
            waited_s=waited_s,
            **machine.protocol.missing,
        )
        node.log.log(end, "interval", machine.progress_step, **self._interval(node, end))
        node.busy_until = end
        node.wait = DONE

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        total = sum(getattr(nd.machine, "total_steps", 0) for nd in self.nodes) or None
        return tqdm(total=total, desc=f"simulate n={self.config.n_nodes}", unit="step", leave=False)

    def write_results(self) -> None:
        """Final models and ``final`` records, as the runtime writes them (a killed node: none)."""
        for node in self.nodes:
            if node.dead:
                continue
            m = node.machine
            t = node.busy_until
            name = process_name(self.config, node.id)
            if isinstance(m, PSServer):
                np.save(self.run_dir / "server.npy", m.x)
            elif isinstance(m, DasgdNode):
                np.save(self.run_dir / f"{name}.npy", m.params)
                np.save(self.run_dir / f"{name}.delta_sum.npy", m.delta_sum)
            if node.evaluator is not None:
                params = m.x if isinstance(m, PSServer) else m.params
                node.evaluator.maybe_log(node.log, t, m.progress_step, params, force=True)
            fields = m.final_fields()
            if node.failed_seen or node.msgs_to_failed:
                fields["failed_nodes_seen"] = list(node.failed_seen)
                fields["msgs_to_failed"] = node.msgs_to_failed
            node.log.log(
                t,
                "final",
                m.progress_step,
                **fields,
                eval_s=node.evaluator.eval_s if node.evaluator else 0.0,
                malformed=0,
                **(node.events.counts if node.events is not None else {}),
                **node.counters(),
            )
            node.log.close()
            if node.events is not None:
                node.events.flush()


def simulate(
    config: RunConfig,
    *,
    costs: SimCosts | None = None,
    progress: bool = True,
    arrays: dict | None = None,
) -> tuple[Path, dict]:
    """Simulate a DASGD, ps-async or ps-sync run in virtual time and summarize it.

    Parameters
    ----------
    config : RunConfig
        As for :func:`dasgd.runtime.launch.run`; ``config.sim`` sets bandwidth and
        nominal message size.
    costs : SimCosts, optional
        Modelled host costs; default :class:`SimCosts`.
    progress : bool
        Show a progress bar on stderr.
    arrays : dict, optional
        The dataset as arrays (``X``, ``y``[, ``X_test``, ``y_test``]) instead
        of ``config.data.dataset``; see :func:`dasgd.rundir.prepare_run`.

    Returns
    -------
    run_dir : Path
    summary : dict
        The content of ``summary.json``; ``run.wall_s`` and ``train_s`` are
        virtual seconds, ``run.simulated`` is True, ``run.sim_real_s`` the
        real time the whole simulation took and ``run.sim_loop_s`` that of its
        event loop alone.

    Raises
    ------
    ConfigError
        Bad input, or a simulation too large for this machine's memory
        (the message says how large it would be).
    SimulationStalled
        If the simulation ends with a node that never finished.
    """
    from ..rundir import prepare_run, write_summary

    t_real = time.perf_counter()
    costs = costs or SimCosts()
    _check_memory(config)
    check_kills(config)
    config, run_dir, context = prepare_run(
        config, write_shards=False, check_ports=False, arrays=arrays
    )
    sim = Simulation(config, run_dir, context, costs, progress)
    t_loop = time.perf_counter()
    try:
        virtual_s = sim.run(max_real_s=config.timeout_s)
    finally:  # a diverged or stalled simulation keeps what its nodes logged
        for node in sim.nodes:
            node.log.flush()
            if node.events is not None:
                node.events.flush()
    loop_s = time.perf_counter() - t_loop
    if sim.truncated:
        raise SimulationStalled(
            f"simulation exceeded --timeout-s {config.timeout_s:g} s of real time at "
            f"{virtual_s:.3f} virtual s; logs in {run_dir}"
        )
    sim.write_results()
    summary = write_summary(config, run_dir, context, virtual_s)
    summary["run"]["simulated"] = True
    summary["run"]["sim_real_s"] = time.perf_counter() - t_real
    summary["run"]["sim_loop_s"] = loop_s
    summary["run"]["sim_events"] = sim.events
    summary["run"]["sim_messages"] = sim.messages
    summary["sim"] = {"costs": costs.__dict__, **config.sim.__dict__}
    if config.sim.kills:
        summary["sim"]["kills_ignored"] = sim.kills_ignored
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run_dir, summary


def _next_poll_s(t_s: float) -> float:
    """When the launcher, checking its children every :data:`CHILD_POLL_S`, next looks after ``t_s``."""
    tick_s = (math.floor(t_s / CHILD_POLL_S) + 1) * CHILD_POLL_S
    return tick_s if tick_s > t_s else tick_s + CHILD_POLL_S


def check_kills(config: RunConfig) -> None:
    """Refuse ``--kill`` values the run cannot honour, before anything is written.

    Raises
    ------
    ConfigError
        A kill under ``--on-node-failure restart`` (not simulated), in a
        ps-sync run (every round waits for every worker), of the
        parameter server (its death always stops a run), or of a node the run
        does not have; the message names the value and what is valid.
    """
    kills = config.sim.kills
    if not kills:
        return
    node, t_s = kills[0]
    spec = f"{node}@{t_s:g}"
    if config.on_node_failure == "restart":
        raise ConfigError(
            f"--kill {spec} with --on-node-failure restart: the simulator does not restart "
            "nodes (dasgd run does); choose continue or stop"
        )
    if config.algorithm == "ps-sync":
        raise ConfigError(
            f"--kill {spec}: a ps-sync run cannot lose a worker (every round waits for all of "
            "them); kill nodes of a dasgd or ps-async run"
        )
    if config.algorithm == "dasgd":
        from ..topology import parse_topology

        graph = parse_topology(config.topology.spec, config.n_nodes, seed=config.topology.seed)
        n = graph.number_of_nodes()
    else:
        n = config.n_nodes if config.n_nodes is not None else 4
    for node, t_s in kills:
        spec = f"{node}@{t_s:g}"
        if config.algorithm != "dasgd" and node == n:
            raise ConfigError(
                f"--kill {spec}: node {n} is the parameter server, whose death always stops the "
                f"run; kill a worker, 0..{n - 1}"
            )
        if node >= n:
            what = "nodes" if config.algorithm == "dasgd" else "workers"
            raise ConfigError(
                f"--kill {spec}: the run has no node {node}; its {n} {what} are 0..{n - 1}"
            )


def _check_memory(config: RunConfig) -> None:
    """Refuse a simulation whose bookkeeping cannot fit in memory, before anything is written."""
    from ..topology import parse_topology

    have = _machine_memory_bytes()
    n, n_edges = config.n_nodes, 0
    # the vectors alone first (building a graph of millions of nodes is itself too much) ...
    need = estimate_memory_bytes(config, 0, n or 4, 0)
    if need <= MEMORY_FRACTION * have and config.algorithm == "dasgd":
        # ... then with the graph's real size and edges
        graph = parse_topology(config.topology.spec, n, seed=config.topology.seed)
        n, n_edges = graph.number_of_nodes(), graph.number_of_edges()
        need = estimate_memory_bytes(config, 0, n, n_edges)
    n = n or 4
    if need > MEMORY_FRACTION * have:
        stores = config.sim.kills and config.algorithm == "dasgd"
        raise ConfigError(
            f"a simulation of {n} {'DASGD nodes' if config.algorithm == 'dasgd' else 'workers'} "
            f"with {n_edges} edges needs about {need / 2**30:.1f} GiB (48 n^2 bytes of version "
            f"vectors and ~{EDGE_BYTES} bytes per edge"
            + (
                f", {config.delta_store_mib:g} MiB of stored deltas per node with --kill"
                if stores
                else ""
            )
            + f"), more than {MEMORY_FRACTION:.0%} of this machine's {have / 2**30:.1f} GiB: use "
            "fewer nodes (-n) or a sparser topology"
            + (" or a smaller --delta-store-mib" if stores else "")
        )
