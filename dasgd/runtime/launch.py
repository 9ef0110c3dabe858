"""Spawning and supervising the node processes of a run on this machine.

:func:`run` is what ``dasgd run`` does: resolve the topology and the data once
(scikit-learn is imported here, never in nodes), write the run directory, spawn
one ``python -m dasgd node`` process per node, wait until every node has bound
its inbox (``ready``, with a deadline), hand out the inbox addresses
(``start``), show progress, and finally evaluate the final models into
``summary.json``.

A failing node, a missed deadline or Ctrl-C stops every process: SIGTERM to
all, one shared deadline, then SIGKILL (as ``torch.distributed.elastic``
does), and raises :class:`~dasgd.errors.NodeFailed` naming the node, its exit
code, its last words and its log.

Under ``--on-node-failure continue`` (the default) a node process that dies
once training started does not stop the run: the launcher polls its children
every :data:`CHILD_POLL_S` seconds, records the failure in ``failures.json``
(see :func:`_failure_record`) and sends a ``failed`` control message to every
surviving process, which stops sending to the dead node and waiting for it.
The parameter server, a ps-sync worker and a node that dies before the run
starts still stop the run.

For DASGD the launcher also repairs the overlay (:func:`repair_links`, logged
in ``topology-changes.jsonl``) and, once every survivor has said what it holds
of the dead node's deltas (``held``), sends the dead node's ``fin`` as derived
from those (``fin_of``, see :func:`derive_fin`), so that the survivors' drain
ends when they all hold the same deltas of it.

Under ``--on-node-failure restart`` the dead node's process is started
again instead and takes a live neighbour's state (see
:mod:`dasgd.core.node`). Every such decision is the
:class:`~dasgd.runtime.coordinator.FailureCoordinator`'s; over several hosts
host 0's rendezvous runs it and each launcher carries out its actions. A node
process that sends nothing for ``--heartbeat-timeout-s`` is killed and counts
as dead.

The run directory is prepared by :func:`dasgd.rundir.prepare_run` (its layout is
documented there) and summarized by :func:`dasgd.rundir.write_summary`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import zmq

from ..config import RunConfig

# CHILD_POLL_S: how often (seconds) the launcher checks its children (the simulator uses it too)
from ..core.failures import CHILD_POLL_S, derive_fin, repair_links  # noqa: F401 (importable here)
from ..errors import ConfigError, NodeFailed
from ..ml.data import local_steps
from ..rundir import prepare_run, process_name, write_summary
from . import control as control_messages
from .coordinator import FailureCoordinator
from .rendezvous import (
    HostLink,
    HostSpec,
    RendezvousServer,
    advertise_address_for,
    data_digest,
)

__all__ = ["run", "stop_processes"]

#: Longest wait of a host for host 0's summary when the run has no --timeout-s (a silent
#: host 0 is caught sooner, by the heartbeats).
GATHER_TIMEOUT_S = 3600.0
#: How long stopped nodes get between SIGTERM and SIGKILL.
TERMINATE_TIMEOUT_S = 5.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


def stop_processes(
    procs: list[subprocess.Popen], timeout_s: float = TERMINATE_TIMEOUT_S
) -> list[int]:
    """SIGTERM every live process and its descendants, wait against one deadline, SIGKILL the rest.

    The descendants of each live process (``psutil.Process.children(recursive=True)``)
    are listed before any signal is sent, so a grandchild that a node started
    is stopped too instead of being orphaned.

    Parameters
    ----------
    procs : list of subprocess.Popen
        The processes started by this launcher; each is reaped before returning.
    timeout_s : float
        Seconds to wait after SIGTERM before SIGKILL, for the whole tree at once;
        also the deadline of each final reap.

    Returns
    -------
    list of int
        Indices into ``procs`` of the processes that had to be killed.
    """
    tree: list[psutil.Process] = []
    for proc in procs:
        if proc.poll() is None:
            try:
                parent = psutil.Process(proc.pid)
                tree.append(parent)
                tree.extend(parent.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    for member in tree:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(tree, timeout=timeout_s)
    killed = []
    for member in still:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            continue
        index = next((i for i, proc in enumerate(procs) if proc.pid == member.pid), None)
        if index is not None:
            killed.append(index)
    psutil.wait_procs(still, timeout=timeout_s)
    for proc in procs:  # reap: no zombies
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    return killed


def _last_words(path: Path) -> str:
    try:
        lines = [
            line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()
        ]
    except OSError:
        return ""
    return lines[-1] if lines else ""


class _Progress:
    """tqdm bar over the steps (gradients) of all nodes or workers, with loss and staleness.

    Parameters
    ----------
    n_nodes : int
        Nodes (DASGD) or workers (PS).
    total_steps : int
        Steps of all nodes together.
    enabled : bool
        False: no bar (records are still kept).
    server_id : int or None
        Node id of the parameter server, whose records carry tau instead of steps.
    """

    def __init__(
        self, n_nodes: int, total_steps: int, enabled: bool, server_id: int | None = None
    ) -> None:
        self.latest: dict[int, dict] = {}
        self.server: dict = {}
        self.server_id = server_id
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm  # a widget in notebooks, text in terminals

            self.bar = tqdm(
                total=total_steps, unit="step", desc=f"n={n_nodes}", dynamic_ncols=True, leave=True
            )

    def update(self, record: dict) -> None:
        if record["node"] == self.server_id:
            self.server = record
        else:
            self.latest[record["node"]] = record
        if self.bar is None:
            return
        self.bar.update(sum(r["step"] for r in self.latest.values()) - self.bar.n)

        def mean(key):
            values = [r[key] for r in self.latest.values() if r.get(key) is not None]
            return np.mean(values) if values else None

        postfix = {
            "loss": mean("loss"),
            "S1_avg": mean("staleness_apply_avg_steps"),
            "lag": mean("lag_avg_steps"),
        }
        if self.server_id is not None:
            postfix = {"loss": postfix["loss"], "tau_avg": self.server.get("tau_avg_steps")}
        self.bar.set_postfix(
            {k: f"{v:.3g}" for k, v in postfix.items() if v is not None}, refresh=False
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(
    config: RunConfig,
    *,
    progress: bool = True,
    hosts: HostSpec | None = None,
    arrays: dict | None = None,
) -> tuple[Path, dict]:
    """Run DASGD (one process per node) or a PS baseline (workers + server), and summarize it.

    Callable from any thread: the SIGTERM handler (SIGTERM stops the run like
    Ctrl-C) is installed only when called from the main thread, where signal
    handlers can be set; on every path out, normal or not, every process is
    stopped and reaped.

    Parameters
    ----------
    config : RunConfig
    progress : bool
        Show a progress bar on stderr (``tqdm.auto``: a widget in notebooks).
    hosts : HostSpec, optional
        This launcher's part of a run over several hosts
        (:mod:`dasgd.runtime.rendezvous`); default: the whole run here.
    arrays : dict, optional
        The dataset as arrays (``X``, ``y``[, ``X_test``, ``y_test``]) instead
        of ``config.data.dataset``; see :func:`dasgd.rundir.prepare_run`.

    Returns
    -------
    run_dir : Path
        This host's run directory (host 0's holds every node's files).
    summary : dict
        The content of ``summary.json`` (of the whole run, on every host).

    Raises
    ------
    ConfigError
        On bad input, before any process starts (on several hosts: also a
        configuration, version or data mismatch between hosts).
    NodeFailed
        If a node fails, misses the ready deadline or the run times out; every
        process is stopped first (on every host).
    KeyboardInterrupt
        After stopping every process.
    """
    hosts = hosts or HostSpec()
    config = _for_host(config, hosts)
    curve = _curve_keys(config, hosts)
    server = None
    if hosts.multi and hosts.host_rank == 0:
        # bound before anything is prepared: a port in use is a user mistake, found at once
        server = RendezvousServer(
            hosts,
            bind_host=config.transport.host,
            timeout_s=config.transport.ready_timeout_s,
            silence_s=config.transport.send_timeout_s,
            collect=None,
            curve=curve,
        )
    try:
        # a host writes its own nodes' shards only (n is known once hosts are several)
        local = (
            set(hosts.local_ids(config.n_nodes, config.algorithm != "dasgd"))
            if hosts.multi
            else True
        )
        config, run_dir, context = prepare_run(config, arrays=arrays, write_shards=local)
    except BaseException:
        if server is not None:
            server.close()
        raise
    link = None
    if hosts.multi:
        if server is not None:

            def collect(files: dict[str, bytes]) -> dict:
                for name, content in files.items():
                    (run_dir / name).write_bytes(content)
                return write_summary(config, run_dir, context, time.monotonic() - t_start)

            server.collect = collect
            if config.on_node_failure != "stop" and config.algorithm != "ps-sync":
                P = hosts.nproc_per_host
                server.make_coordinator = lambda addresses, t0_unix_s: FailureCoordinator(
                    config,
                    run_dir,
                    _overlay(config, run_dir),
                    t0_unix_s,
                    addresses,
                    host_of=lambda node: node // P if node < config.n_nodes else 0,
                    planned_steps={
                        i: int(local_steps(config.train, size))
                        for i, size in enumerate(context["meta"]["shard_sizes"])
                    },
                )
                server.host_nodes = lambda rank: list(range(rank * P, rank * P + P))
            server.start()
        link = HostLink(hosts, timeout_s=config.transport.send_timeout_s, curve=curve)
    t_start = time.monotonic()
    try:
        wall_s = _launch_local(config, run_dir, context, hosts, link, progress)
        if link is None:
            return run_dir, write_summary(config, run_dir, context, wall_s)
        summary = _gather(config, run_dir, hosts, link)
        if hosts.host_rank != 0:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return run_dir, summary
    finally:
        if link is not None:
            link.close()
        if server is not None:
            server.stop()
            server.join(timeout=5.0)


def _curve_keys(config: RunConfig, hosts: HostSpec):
    """The run's CurveZMQ keys, checked for what this host needs (None without --curve-keys)."""
    if not config.transport.curve_keys:
        return None
    from .security import CurveKeys

    keys = CurveKeys(config.transport.curve_keys)
    n = hosts.n_nodes() or config.n_nodes
    if n is not None:
        ps = config.algorithm != "dasgd"
        local = [process_name(config.replace(n_nodes=n), i) for i in hosts.local_ids(n, ps)]
        every = [f"node-{i}" for i in range(n)] + (["server"] if ps else [])
        launcher = ["launcher"] if hosts.multi else []
        keys.check(every + launcher, local + launcher)
    return keys


def _for_host(config: RunConfig, hosts: HostSpec) -> RunConfig:
    """The configuration as this host runs it: node count, tcp, bind and advertised addresses."""
    if not hosts.multi:
        return config
    tc = config.transport
    n = hosts.n_nodes()
    if config.n_nodes is not None and config.n_nodes != n:
        raise ConfigError(
            f"-n {config.n_nodes} but {hosts.nhosts} hosts x {hosts.nproc_per_host} processes "
            f"per host = {n} nodes: give one or the other"
        )
    if tc.kind != "tcp":
        raise ConfigError("a run over several hosts needs --transport tcp")
    advertise = tc.advertise_host
    if advertise is None:  # a given interface is what others reach; all interfaces: the route
        bound_to_all = tc.host in ("0.0.0.0", "::", "*", "")
        advertise = advertise_address_for(hosts.rdzv_endpoint) if bound_to_all else tc.host
    run_id = config.run_id
    if hosts.host_rank != 0:  # several launchers may share one machine and --out-dir
        run_id = f"{run_id or 'run'}-host{hosts.host_rank}-{uuid.uuid4().hex[:4]}"
    return config.replace(
        n_nodes=n,
        run_id=run_id,
        transport=dataclasses.replace(tc, advertise_host=advertise),
    )


def _gather(config: RunConfig, run_dir: Path, hosts: HostSpec, link: HostLink) -> dict:
    """Send this host's node files to host 0 and receive the summary of the whole run."""
    names = []
    if hosts.host_rank != 0:  # host 0's files are in its run directory already
        names = [
            p.name
            for p in sorted(run_dir.iterdir())
            if p.is_file() and p.name.startswith(("node-", "server."))
        ]
    link.send(
        {"kind": "result", "host_rank": hosts.host_rank, "names": names},
        [(run_dir / name).read_bytes() for name in names],
    )
    # host 0's nodes may still be draining and it then evaluates every model (analysis of a
    # large run takes minutes): the heartbeats catch a dead host 0 within --send-timeout-s,
    # so this deadline only bounds a live host 0 that never finishes
    done = link.wait_for("done", config.timeout_s or GATHER_TIMEOUT_S)
    return json.loads(done["summary"])


def _overlay(config: RunConfig, run_dir: Path) -> dict[int, set[int]] | None:
    """The DASGD topology of a prepared run as node -> neighbours (None for the PS baselines)."""
    if config.algorithm != "dasgd":
        return None
    from ..topology import neighbours as topology_neighbours
    from ..topology import parse_topology

    graph = parse_topology(str(run_dir / "topology.json"), config.n_nodes)
    return {k: set(topology_neighbours(graph, k)) for k in graph}


def _failure_record(
    config: RunConfig, run_dir: Path, name: str, node: int, exit_code: int, t0_unix_s: float, meta
) -> dict:
    """What ``failures.json`` says of a node process that died (one entry per node).

    Fields: ``node``, ``exit_code`` (negative: killed by that signal),
    ``detected_t_s`` (run clock: seconds since start, when the launcher saw
    the exit; at most :data:`CHILD_POLL_S` after it), ``last_step`` and
    ``last_record_t_s`` (the last record of its JSONL log, written at least
    every ``--log-interval-s``), ``planned_steps`` and ``steps_lost``
    (planned minus ``last_step``: an upper bound, as steps after the last
    record are unlogged), ``last_words`` (its stderr's last line).
    """
    from ..analysis.metrics import read_events

    last = {}
    try:
        records = read_events(run_dir / f"{name}.jsonl")
        last = records[-1] if records else {}
    except (OSError, ValueError):
        pass
    planned = int(local_steps(config.train, meta["shard_sizes"][node]))
    last_step = int(last.get("step", 0))
    return {
        "node": node,
        "exit_code": exit_code,
        "detected_t_s": round(time.time() - t0_unix_s, 3),
        "last_step": last_step,
        "last_record_t_s": last.get("t_s"),
        "planned_steps": planned,
        "steps_lost": max(0, planned - last_step),
        "last_words": _last_words(run_dir / f"{name}.stderr"),
    }


def _launch_local(config, run_dir, context, hosts: HostSpec, link, progress: bool) -> float:
    """Spawn, start and supervise this host's node processes; returns the wall time in seconds."""
    n = config.n_nodes
    ps = config.algorithm != "dasgd"
    local = hosts.local_ids(n, ps)
    names = {i: process_name(config, i) for i in local}
    tc = config.transport
    ipc_dir = tempfile.mkdtemp(prefix="dasgd-")
    meta_path = run_dir / "data" / "meta.json"
    meta = context["meta"]
    meta["ipc_dir"] = ipc_dir
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    # a torch model's factory is imported by every node from where the launcher found it
    model_path = getattr(context["model"], "import_path", None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH"), model_path) if p
    )
    ctx = zmq.Context()
    control = ctx.socket(zmq.ROUTER)
    control.setsockopt(zmq.LINGER, 0)
    control_address = f"ipc://{ipc_dir}/control"
    control.bind(control_address)
    procs: dict[int, subprocess.Popen] = {}
    stderr_files = []
    workers = [i for i in local if i < n]
    bar = _Progress(
        len(workers),
        sum(local_steps(config.train, meta["shard_sizes"][i]) for i in workers),
        progress,
        server_id=n if ps and n in local else None,
    )
    errors: dict[int, str] = {}
    t_start = time.monotonic()

    def on_sigterm(signum, frame):  # `kill`, `timeout`, a scheduler's cancel: stop like Ctrl-C
        raise KeyboardInterrupt

    # signal.signal works only in the main thread; elsewhere (a notebook's or an
    # application's worker thread) SIGTERM keeps its handler and the finally still reaps
    in_main_thread = threading.current_thread() is threading.main_thread()

    def spawn(i: int, mode: str = "wb") -> subprocess.Popen:
        err = (run_dir / f"{names[i]}.stderr").open(mode)  # a restarted node appends
        stderr_files.append(err)
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dasgd",
                "node",
                "--run-dir",
                str(run_dir),
                "--node-id",
                str(i),
                "--control",
                control_address,
            ],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm) if in_main_thread else None
    try:
        for i in local:
            procs[i] = spawn(i)

        def fail(i: int, what: str):
            who = "the parameter server" if names[i] == "server" else f"node {i}"
            reason = errors.get(i) or _last_words(run_dir / f"{names[i]}.stderr") or "no message"
            return NodeFailed(
                f"{who} {what}: {reason}; log: {run_dir / f'{names[i]}.jsonl'}, "
                f"stderr: {run_dir / f'{names[i]}.stderr'}"
            )

        started = False
        coordinator: FailureCoordinator | None = None  # this host's; host 0's rendezvous has it
        gone: set[int] = set()  # local processes whose exit was handled
        pending: set[int] = set()  # local dead nodes whose fate (fin_of or restart) is open
        last_seen: dict[int, float] = {}  # node -> when it last sent anything (heartbeats)
        hung: dict[int, float] = {}  # node -> seconds of silence when it was killed
        quiet: set[int] = set()  # said done (or error): lingering or exiting, no more heartbeats
        watched: set[int] = set()  # got their start: heartbeats are expected
        identities: dict[int, bytes] = {}
        addresses: dict[int, str] = {}
        t0_unix_s = time.time()

        def tolerated(i: int) -> bool:
            if config.on_node_failure == "stop" or not started:
                return False
            return config.algorithm == "dasgd" or (config.algorithm == "ps-async" and i < n)

        def execute(actions) -> None:
            """Carry out the coordinator's actions for the nodes this host runs."""
            for action in actions:
                do, i = action["do"], action.get("node")
                if do == "notify":
                    message = action["message"]
                    if message["kind"] == "fin_of":
                        pending.discard(message["node"])
                    raw = control_messages.pack(message)
                    for j in action["to"]:
                        if j in procs and j in identities and procs[j].poll() is None:
                            control.send_multipart([identities[j], raw])
                elif i not in procs:
                    continue  # another host's node
                elif do == "spawn":
                    pending.discard(i)
                    for held_state in (gone, quiet):
                        held_state.discard(i)
                    identities.pop(i, None)
                    watched.discard(i)
                    hung.pop(i, None)
                    errors.pop(i, None)
                    procs[i] = spawn(i, "ab")
                elif do == "send" and i in identities:
                    control.send_multipart(
                        [identities[i], control_messages.pack(action["message"])]
                    )
                    last_seen[i] = time.monotonic()
                    watched.add(i)
                elif do == "settled":
                    pending.discard(i)  # its fate is known: no restart comes
                elif do == "kill" and procs[i].poll() is None:
                    errors[i] = action["why"]
                    procs[i].kill()  # reaped by the next check

        def report(event: dict) -> None:
            """Tell the coordinator what this host saw (over several hosts: host 0's)."""
            if link is not None:
                link.send({"kind": "event", **event})
            elif coordinator is not None:  # (none under --on-node-failure stop)
                try:
                    actions = coordinator.handle(event)
                except (KeyError, TypeError, ValueError, IndexError):
                    return  # a node's malformed report: dropped (its log says what it sent)
                execute(actions)

        def check_children() -> int:
            running = 0
            for i, proc in procs.items():
                rc = proc.poll()
                if rc is None:
                    running += 1
                    continue
                if i in gone:
                    continue
                gone.add(i)
                if rc == 0:
                    if started and i < n:
                        report({"event": "exited", "node": i})
                    continue
                what = f"exited with code {rc}"
                if i in hung:
                    what = (
                        f"sent nothing for {hung[i]:.0f} s (hung or stopped; "
                        f"--heartbeat-timeout-s {config.heartbeat_timeout_s:g}) and was killed"
                    )
                if not tolerated(i):
                    raise fail(i, what)
                record = _failure_record(config, run_dir, names[i], i, rc, t0_unix_s, meta)
                if i in hung:
                    record["hung_s"] = round(hung.pop(i), 3)
                if config.algorithm == "dasgd":
                    pending.add(i)
                report({"event": "node_down", "node": i, "record": record})
                if coordinator is not None and all(j in coordinator.failures for j in range(n)):
                    raise fail(i, f"{what}, the last node alive")
            return running

        def check_heartbeats() -> None:
            """Kill a started node process that has been silent too long (then it fails as usual)."""
            now = time.monotonic()
            for i, proc in procs.items():
                if i not in watched or i in quiet or i in gone or proc.poll() is not None:
                    continue
                silent_s = now - last_seen.get(i, now)
                if silent_s > config.heartbeat_timeout_s:
                    hung[i] = silent_s
                    proc.kill()  # reaped by the next check

        def pump(timeout_ms: int, on_message) -> None:
            if control.poll(timeout_ms):
                while True:
                    try:
                        identity, raw = control.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ValueError:
                        continue
                    message = control_messages.unpack(raw)
                    if message is not None and isinstance(message.get("node"), int):
                        last_seen[message["node"]] = time.monotonic()
                        if message.get("kind") == "error":
                            errors[message["node"]] = str(message.get("message"))
                        on_message(identity, message)

        def poll_link() -> None:
            """Messages from the rendezvous: an abort (raises), the coordinator's actions."""
            while (message := link.poll()) is not None:
                if message["kind"] == "act":
                    execute(message.get("actions") or ())

        def on_ready(identity, message):
            if message.get("kind") == "ready":
                identities[message["node"]] = identity
                addresses[message["node"]] = message["address"]

        deadline = time.monotonic() + tc.ready_timeout_s
        while len(addresses) < len(local):
            pump(100, on_ready)
            check_children()
            if link is not None:
                link.poll()  # an abort from host 0 (another host failed) ends this one too
            if time.monotonic() > deadline:
                missing = sorted(set(local) - set(addresses))
                raise NodeFailed(
                    f"node(s) {missing} not ready within {tc.ready_timeout_s:.0f} s (--ready-timeout-s); stderr in {run_dir}"
                )
        t0_unix_s = time.time()
        rejoining = False
        if link is not None:
            link.join(config.to_dict(), data_digest(context["dataset"]), addresses)

            def idle():
                pump(0, lambda identity, message: None)
                check_children()

            start_message = link.wait_for("start", tc.ready_timeout_s, on_idle=idle)
            addresses = {int(k): v for k, v in start_message["addresses"].items()}
            t0_unix_s = start_message["t0_unix_s"]
            rejoining = bool(start_message.get("rejoin"))
        started = True
        if rejoining:  # a lost host come back: its nodes are restarted ones, started one by one
            restart_nodes = set(start_message.get("restart_nodes") or ())
            for i in local:
                if i in restart_nodes:
                    report({"event": "ready", "node": i, "address": addresses[i]})
                else:  # settled without this host while it was away: not part of the run
                    gone.add(i)
                    procs[i].terminate()
        else:
            start = control_messages.pack(
                {
                    "kind": "start",
                    "addresses": {str(k): v for k, v in addresses.items()},
                    "t0_unix_s": t0_unix_s,  # the run clock's origin, shared by every process
                }
            )
            for i in local:
                control.send_multipart([identities[i], start])
                last_seen[i] = time.monotonic()
                watched.add(i)
        if link is None and config.on_node_failure != "stop":
            coordinator = FailureCoordinator(
                config, run_dir, _overlay(config, run_dir), t0_unix_s, addresses
            )

        def on_message(identity, message):
            kind, i = message.get("kind"), message["node"]
            if kind in ("done", "error"):
                quiet.add(i)
            elif kind == "progress":
                bar.update(message)
            elif kind == "held":
                report({"event": "held", "report": message})
            elif kind == "ready" and i in procs and i not in identities:
                identities[i] = identity  # a restarted process
                report({"event": "ready", "node": i, "address": message.get("address")})

        while check_children() or pending:
            pump(int(CHILD_POLL_S * 1000), on_message)
            check_heartbeats()
            if coordinator is not None:
                execute(coordinator.tick())
            if link is not None:
                poll_link()
            if config.timeout_s is not None and time.monotonic() - t_start > config.timeout_s:
                raise NodeFailed(
                    f"run exceeded --timeout-s {config.timeout_s:.0f} s; logs in {run_dir}"
                )
        return time.monotonic() - t_start
    except BaseException as exc:
        if link is not None:  # tell host 0, which stops every other host
            link.send(
                {
                    "kind": "failed",
                    "host_rank": hosts.host_rank,
                    "message": str(exc)
                    or (
                        "interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
                    ),
                    "exit_code": 2 if isinstance(exc, ConfigError) else 1,
                }
            )
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        stop_processes(list(procs.values()))
        for f in stderr_files:
            f.close()
        control.close(linger=0)
        ctx.term()
        shutil.rmtree(ipc_dir, ignore_errors=True)
