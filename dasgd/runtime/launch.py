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

The run directory is prepared by :func:`dasgd.rundir.prepare_run` (its layout is
documented there) and summarized by :func:`dasgd.rundir.write_summary`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import zmq

from ..config import RunConfig
from ..errors import NodeFailed
from ..ml.data import local_steps
from ..rundir import prepare_run, process_name, write_summary
from . import control as control_messages

__all__ = ["run", "stop_processes"]

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
    names = [process_name(config, i) for i in range(n_procs)]
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
                    message = control_messages.unpack(raw)
                    if message is not None and isinstance(message.get("node"), int):
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
        start = control_messages.pack(
            {
                "kind": "start",
                "addresses": {str(k): v for k, v in addresses.items()},
                "t0_unix_s": time.time(),  # the run clock's origin, shared by every process
            }
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
