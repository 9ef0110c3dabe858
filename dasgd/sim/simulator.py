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
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..analysis.events import CHUNK_ROWS, ModelSnapshots
from ..analysis.metrics import Evaluator, EventLog
from ..build import build_machine, build_recorder, build_run_model, is_server
from ..config import RunConfig
from ..core.actions import CONTINUE, DONE, WAIT_BACKLOG, WAITS
from ..core.emulation import Partitions, release_after
from ..core.node import DasgdNode
from ..core.protocol import adjacency_sets, lag_sampled
from ..core.ps import PSServer
from ..errors import ConfigError, DasgdError, WireError
from ..ml.data import local_steps
from ..rundir import process_name
from ..topology import neighbours as topology_neighbours

__all__ = ["SimCosts", "SimulationStalled", "estimate_memory_bytes", "simulate"]

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


def estimate_memory_bytes(config: RunConfig, n_params: int, n_nodes: int, n_edges: int = 0) -> int:
    """Bytes a simulation needs, roughly: version-vector bookkeeping, edges and model buffers.

    DASGD: 48 n^2 bytes (per node, 6 vectors of n int32 and 3 of n int64;
    measured), about :data:`EDGE_BYTES` per edge (graph, adjacency sets,
    per-edge statistics) and about 6 model-sized buffers per node. PS: model
    buffers only. Messages in flight come on top (see the module docstring).
    """
    itemsize = np.dtype(config.model.dtype).itemsize
    models = (n_nodes + 1) * 6 * n_params * itemsize
    if config.algorithm != "dasgd":
        return models
    return 48 * n_nodes * n_nodes + EDGE_BYTES * n_edges + models


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
        if costs.wake_s and t > node.busy_until and (inbox or self._due(node, t)):
            # a host that sat idle acts late (the runtime's poll and sleep overshoot)
            node.busy_until = t + costs.wake_s
            self._wake_at(node, node.busy_until)
            return
        if inbox:
            # everything that has arrived, back to back (as the runtime's receive-all); what
            # arrives meanwhile joins the inbox before the host is free again
            cost = 0.0
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
        self._busy(node, t, cost)

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
        while heap:
            t, _, kind, i, data = pop(heap)
            node = nodes[i]
            self.events += 1
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
                    self._gradients(nd.machine) for nd in nodes if not is_server(self.config, nd.id)
                )
                bar.refresh()
        if bar is not None:
            bar.close()
        if self.truncated:
            return t
        stuck = [node.id for node in nodes if node.wait is not DONE]
        if stuck:
            raise SimulationStalled(
                f"simulation stalled at t = {t:.6f} s: node(s) {stuck[:10]} never finished"
            )
        return max(node.busy_until for node in nodes)

    def _progress_bar(self):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        total = sum(getattr(nd.machine, "total_steps", 0) for nd in self.nodes) or None
        return tqdm(total=total, desc=f"simulate n={self.config.n_nodes}", unit="step", leave=False)

    def write_results(self) -> None:
        """Final models and ``final`` records, as the runtime writes them."""
        for node in self.nodes:
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
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return run_dir, summary


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
        raise ConfigError(
            f"a simulation of {n} {'DASGD nodes' if config.algorithm == 'dasgd' else 'workers'} "
            f"with {n_edges} edges needs about {need / 2**30:.1f} GiB (48 n^2 bytes of version "
            f"vectors and ~{EDGE_BYTES} bytes per edge), more than {MEMORY_FRACTION:.0%} of this "
            f"machine's {have / 2**30:.1f} GiB: use fewer nodes (-n) or a sparser topology"
        )
