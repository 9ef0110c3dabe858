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

Run directory (``OUT_DIR/RUN_ID/``)::

    config.json            resolved RunConfig (n_nodes filled in)
    topology.json          the graph, node-link JSON
    x0.npy                 the common initial model
    data/meta.json         dataset, classes, shard sizes and class histograms
    data/shard-<i>-X.npy   node i's training shard (features, labels: -y.npy)
    data/test-X.npy        the test split (labels: test-y.npy)
    node-<i>.jsonl         node i's event log
    node-<i>.stderr        node i's stderr (tracebacks of crashes land here)
    node-<i>.npy           node i's final model
    node-<i>.delta_sum.npy the sum of node i's own sealed deltas
    summary.json           the evaluated summary (see README.md)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import msgpack
import networkx as nx
import numpy as np
import psutil
import zmq

from .analysis.metrics import build_ps_summary, build_summary
from .config import RunConfig
from .errors import ConfigError, NodeFailed
from .ml.data import local_steps
from .runtime.node import log_name

__all__ = ["prepare_run", "run", "stop_processes", "write_summary"]

#: How long stopped nodes get between SIGTERM and SIGKILL.
TERMINATE_TIMEOUT_S = 5.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def _check_ports_free(host: str, ports: list[int]) -> None:
    for node, port in enumerate(ports):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # as ZeroMQ does: a port in TIME-WAIT from an earlier run is free to bind
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise ConfigError(
                    f"port {port} (node {node}) on {host} is not available ({exc.strerror}): "
                    f"choose another --base-port, or 0 for any free ports"
                ) from None


def prepare_run(config: RunConfig, *, write_shards: bool = True) -> tuple[RunConfig, Path, dict]:
    """Resolve the topology and data, validate, and write the run directory.

    Parameters
    ----------
    config : RunConfig
        As given by the user; ``n_nodes`` may be None for a topology file.
    write_shards : bool
        Write every node's shard and the test split under ``data/`` (node
        processes read them; the simulator keeps them in memory).

    Returns
    -------
    config : RunConfig
        With ``n_nodes`` and ``run_id`` filled in.
    run_dir : Path
    context : dict
        ``graph``, ``dataset``, ``shards`` (index arrays), ``model``, ``x0``
        and ``meta`` (the content of ``data/meta.json``).

    Raises
    ------
    ConfigError
        (or its subclasses TopologyError, DataError) on any bad value, before
        anything is spawned; nothing is written then.
    """
    from .core.emulation import resolve_latency, resolve_slowdown
    from .ml.data import class_histogram, load_dataset, shard_by_label, shard_iid
    from .ml.models import build_model
    from .topology import describe_topology, parse_topology, save_topology

    ps = config.algorithm != "dasgd"
    if ps:  # workers 0..n-1 around the server n; --topology does not apply
        n = config.n_nodes if config.n_nodes is not None else 4
        graph = nx.relabel_nodes(parse_topology("star", n + 1), {0: n, n: 0})
    else:
        graph = parse_topology(config.topology.spec, config.n_nodes, seed=config.topology.seed)
        n = graph.number_of_nodes()
    dc = config.data
    dataset = load_dataset(
        dc.dataset,
        test_fraction=dc.test_fraction,
        seed=config.train.seed,
        standardize=dc.standardize,
    )
    if n > dataset.n_train:
        raise ConfigError(
            f"{n} nodes but only {dataset.n_train} training samples in {dataset.name}: use fewer nodes (-n)"
        )
    if dc.sharding == "iid":
        shards = shard_iid(dataset.n_train, n, seed=config.train.seed)
    else:
        shards = shard_by_label(dataset.y_train, n, dc.dirichlet_alpha, seed=config.train.seed)
    mc = config.model
    model = build_model(
        mc.name,
        dataset.n_features,
        dataset.n_classes,
        hidden=mc.hidden,
        activation=mc.activation,
        l2=mc.l2,
    )
    tc = config.transport
    if tc.kind == "tcp" and tc.base_port:
        if tc.base_port + n + ps - 1 > 65535:
            raise ConfigError(f"base port {tc.base_port} + {n} nodes exceeds 65535 (--base-port)")
        _check_ports_free(tc.host, [tc.base_port + i for i in range(n + ps)])

    run_id = config.run_id or (
        f"{datetime.now():%Y%m%d-%H%M%S}-{config.algorithm}-n{n}-{uuid.uuid4().hex[:4]}"
    )
    # everything that can be a user mistake is checked before anything is written
    emulation = {
        "slowdown": config.emulation.slowdown,
        "slowdown_factors": resolve_slowdown(config.emulation.slowdown, n),
        "latency": config.emulation.latency,
        "compute_time": config.emulation.compute_time,
        "latency_s": {
            f"{u}-{v}": d
            for (u, v), d in sorted(resolve_latency(config.emulation.latency, graph.edges).items())
        },
    }
    try:
        x0 = model.init_params(seed=config.train.seed, dtype=np.dtype(mc.dtype))
    except MemoryError:
        raise ConfigError(
            f"model {mc.name} with hidden {list(mc.hidden)} has {model.n_params} parameters: "
            "too large for this machine's memory (--hidden)"
        ) from None
    run_dir = Path(config.out_dir) / run_id
    if run_dir.exists():
        raise ConfigError(f"run directory {run_dir} already exists: choose another --run-id")
    config = config.replace(n_nodes=n, run_id=run_id)
    try:
        (run_dir / "data").mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the run directory {run_dir}: {exc.strerror} (--out-dir)"
        ) from None
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    save_topology(graph, run_dir / "topology.json")
    np.save(run_dir / "x0.npy", x0)
    if write_shards:
        for i, idx in enumerate(shards):
            np.save(run_dir / "data" / f"shard-{i}-X.npy", dataset.X_train[idx])
            np.save(run_dir / "data" / f"shard-{i}-y.npy", dataset.y_train[idx])
        np.save(run_dir / "data" / "test-X.npy", dataset.X_test)
        np.save(run_dir / "data" / "test-y.npy", dataset.y_test)
    meta = {
        "dataset": dataset.name,
        "n_features": dataset.n_features,
        "n_classes": dataset.n_classes,
        "class_labels": list(dataset.class_labels),
        "n_train": dataset.n_train,
        "n_test": dataset.n_test,
        "sharding": dc.sharding,
        "shard_sizes": [len(s) for s in shards],
        "shard_class_histograms": [
            class_histogram(dataset.y_train[s], dataset.n_classes) for s in shards
        ],
        "model": model.describe(),
        "topology": {"parameter_server": n, "n_workers": n} if ps else describe_topology(graph),
        "emulation": emulation,
    }
    (run_dir / "data" / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return (
        config,
        run_dir,
        {
            "graph": graph,
            "dataset": dataset,
            "shards": shards,
            "model": model,
            "x0": x0,
            "meta": meta,
        },
    )


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
            from tqdm import tqdm

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
            "S_avg": mean("staleness_avg_steps"),
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


def run(config: RunConfig, *, progress: bool = True) -> tuple[Path, dict]:
    """Run DASGD (one process per node) or a PS baseline (workers + server) here, and summarize it.

    Parameters
    ----------
    config : RunConfig
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    run_dir : Path
    summary : dict
        The content of ``summary.json``.

    Raises
    ------
    ConfigError
        On bad input, before any process starts.
    NodeFailed
        If a node fails, misses the ready deadline or the run times out; every
        process is stopped first.
    KeyboardInterrupt
        After stopping every process.
    """
    config, run_dir, context = prepare_run(config)
    n = config.n_nodes
    n_procs = n + (config.algorithm != "dasgd")  # the parameter server is process n
    names = [log_name(config, i) for i in range(n_procs)]
    tc = config.transport
    ipc_dir = tempfile.mkdtemp(prefix="dasgd-")
    meta_path = run_dir / "data" / "meta.json"
    meta = context["meta"]
    meta["ipc_dir"] = ipc_dir
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    ctx = zmq.Context()
    control = ctx.socket(zmq.ROUTER)
    control.setsockopt(zmq.LINGER, 0)
    control_address = f"ipc://{ipc_dir}/control"
    control.bind(control_address)
    procs: list[subprocess.Popen] = []
    stderr_files = []
    bar = _Progress(
        n,
        sum(local_steps(config.train, m) for m in meta["shard_sizes"]),
        progress,
        server_id=n if n_procs > n else None,
    )
    errors: dict[int, str] = {}
    t_start = time.monotonic()

    def on_sigterm(signum, frame):  # `kill`, `timeout`, a scheduler's cancel: stop like Ctrl-C
        raise KeyboardInterrupt

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for i in range(n_procs):
            err = (run_dir / f"{names[i]}.stderr").open("wb")
            stderr_files.append(err)
            procs.append(
                subprocess.Popen(
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
            )

        def fail(i: int, what: str):
            who = "the parameter server" if names[i] == "server" else f"node {i}"
            reason = errors.get(i) or _last_words(run_dir / f"{names[i]}.stderr") or "no message"
            return NodeFailed(
                f"{who} {what}: {reason}; log: {run_dir / f'{names[i]}.jsonl'}, "
                f"stderr: {run_dir / f'{names[i]}.stderr'}"
            )

        def check_children() -> int:
            running = 0
            for i, proc in enumerate(procs):
                rc = proc.poll()
                if rc is None:
                    running += 1
                elif rc != 0:
                    raise fail(i, f"exited with code {rc}")
            return running

        def pump(timeout_ms: int, on_message) -> None:
            if control.poll(timeout_ms):
                while True:
                    try:
                        identity, raw = control.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ValueError:
                        continue
                    try:
                        message = msgpack.unpackb(raw, raw=False, strict_map_key=False)
                    except Exception:
                        continue
                    if isinstance(message, dict) and isinstance(message.get("node"), int):
                        if message.get("kind") == "error":
                            errors[message["node"]] = str(message.get("message"))
                        on_message(identity, message)

        identities: dict[int, bytes] = {}
        addresses: dict[int, str] = {}

        def on_ready(identity, message):
            if message.get("kind") == "ready":
                identities[message["node"]] = identity
                addresses[message["node"]] = message["address"]

        deadline = time.monotonic() + tc.ready_timeout_s
        while len(addresses) < n_procs:
            pump(100, on_ready)
            check_children()
            if time.monotonic() > deadline:
                missing = sorted(set(range(n_procs)) - set(addresses))
                raise NodeFailed(
                    f"node(s) {missing} not ready within {tc.ready_timeout_s:.0f} s (--ready-timeout-s); stderr in {run_dir}"
                )
        start = msgpack.packb(
            {"kind": "start", "addresses": {str(k): v for k, v in addresses.items()}},
            use_bin_type=True,
        )
        for i in range(n_procs):
            control.send_multipart([identities[i], start])

        def on_message(identity, message):
            if message.get("kind") == "progress":
                bar.update(message)

        while check_children():
            pump(200, on_message)
            if config.timeout_s is not None and time.monotonic() - t_start > config.timeout_s:
                raise NodeFailed(
                    f"run exceeded --timeout-s {config.timeout_s:.0f} s; logs in {run_dir}"
                )
        wall_s = time.monotonic() - t_start
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        stop_processes(procs)
        for f in stderr_files:
            f.close()
        control.close(linger=0)
        ctx.term()
        shutil.rmtree(ipc_dir, ignore_errors=True)

    return run_dir, write_summary(config, run_dir, context, wall_s)


def write_summary(config: RunConfig, run_dir: Path, context: dict, wall_s: float) -> dict:
    """Evaluate a finished run directory and write ``summary.json`` (real or simulated run).

    Parameters
    ----------
    config : RunConfig
        The resolved configuration.
    run_dir : Path
    context : dict
        As :func:`prepare_run` returns it.
    wall_s : float
        Duration of the run in seconds (virtual seconds for a simulation).

    Returns
    -------
    dict
        The content of ``summary.json``.
    """
    meta = context["meta"]
    dataset = context["dataset"]
    summarize = build_summary if config.algorithm == "dasgd" else build_ps_summary
    summary = summarize(
        run_dir,
        model=context["model"],
        X_test=dataset.X_test,
        y_test=dataset.y_test,
        n_classes=dataset.n_classes,
        x0=context["x0"],
        wall_s=wall_s,
    )
    summary["run"]["algorithm"] = config.algorithm
    summary["config"] = config.to_dict()
    summary["dataset"] = {
        k: meta[k]
        for k in (
            "dataset",
            "n_features",
            "n_classes",
            "n_train",
            "n_test",
            "sharding",
            "shard_sizes",
        )
    }
    summary["topology"] = meta["topology"]
    summary["model"] = meta["model"]
    summary["emulation"] = meta["emulation"]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
