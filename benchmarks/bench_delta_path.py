"""The dasgd delta path between two node processes against raw ZeroMQ sending the same bytes.

Target (from the issue): for deltas from 40 KB to 40 MB, the delta path
(encode, send, receive, decode, apply) between two node processes reaches at
least half of raw ZeroMQ's throughput at 4 MB.

Competitors, each a pair of processes (sender -> receiver) on this machine,
run back to back in every repetition (the order alternates) for every size.
The verdict uses the median over repetitions of the per-repetition ratio
dasgd/raw ("paired"); the ratio of the medians is printed beside it.

``raw``
    PUSH -> PULL over ipc (``--transport tcp``: tcp loopback). The sender sends
    one preallocated float32 array with ``copy=False`` N times; the receiver
    calls ``recv(copy=False)`` N times and touches nothing. Both sockets get the
    high-water mark a dasgd node would use for that message size
    (:func:`dasgd.runtime.node.queue_limit_msgs`), so both have the same queue depth.
``dasgd``
    The real code path of two nodes of a 2-node run, each a
    :class:`~dasgd.core.node.DasgdNode` built by :func:`dasgd.build.build_machine`
    (softmax regression with ``n_features * 10 + 10`` float32 parameters = the
    delta size, ``send_every=1``) and run by :meth:`dasgd.runtime.node.Driver.run`,
    with transports, buffer pools and logs built as ``node_main`` builds them.
    Only the gradient is replaced: the sender's model and optimizer are
    stand-ins that return a fixed update at no cost, so each of its steps is
    the delta path alone. Sender (node 0, N steps), per message: ``advance()``
    (``params += u``, the open delta, ``protocol.local_step()``, the seal:
    own-delta sum, a fresh buffer from the pool), then ``Driver._send``
    (msgpack header, zero-copy frame, non-blocking send), with the driver's
    backpressure (``WAIT_BACKLOG``: ``Driver._wait_message``). Receiver (node
    1, no steps of its own: it drains from the start): ``Driver._receive_all``
    -> ``Driver._handle``: ``wire.decode``, the machine's ``on_message``
    (finite check, ``protocol.receive``, ``params += delta``). Both runs end
    with the real drain (``fin``, ``complete``). Fresh machines and drivers
    each repetition (built before the clock starts), the same sockets.

Throughput = N x size / (receiver's time from the start signal to the last
message received, resp. to the end of its ``Driver.run()``: all N deltas
applied and the drain finished). The start signal goes to the receiver first,
then (through the orchestrator) to the sender, so the clock runs before the
first byte leaves. Each worker pair lives for all repetitions of a size; one
untimed warm-up repetition per competitor comes first (buffer pools, malloc).

To explain the ratio, every worker reports its CPU time (user and kernel, all
threads incl. ZeroMQ's I/O thread) and minor page faults per message, and a
per-message cost breakdown at 4 MB of both sides follows (in this process,
``timeit``, no sockets: the same machines and drivers with a transport that
drops every message; hot = the same arrays every call, cold = rotating over
256 MB of arrays, as the real pipeline does).

Every process gets ``OPENBLAS_NUM_THREADS=1`` (and OMP/MKL). Results go to
``benchmarks/results/bench_delta_path.json``.

Usage::

    python benchmarks/bench_delta_path.py                     # ~50 s on 2 cores
    python benchmarks/bench_delta_path.py --scale 4 --reps 5  # longer runs
    python benchmarks/bench_delta_path.py --sizes 4MB --transport tcp
    python benchmarks/bench_delta_path.py --sizes 400KB 4MB --transport tcp --curve  # CurveZMQ on both
"""

from __future__ import annotations

import os

THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
os.environ.update(THREAD_ENV)  # before numpy is imported, here and in every child

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import timeit  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import zmq  # noqa: E402
from common import (  # noqa: E402
    close_driver,
    in_process_driver,
    machine_info,
    report_load,
    summarize,
)

from dasgd.analysis.metrics import EventLog  # noqa: E402
from dasgd.build import build_machine  # noqa: E402
from dasgd.config import ModelConfig, RunConfig, TrainConfig, TransportConfig  # noqa: E402
from dasgd.core import wire  # noqa: E402
from dasgd.core.actions import CONTINUE  # noqa: E402
from dasgd.ml.data import BatchSampler  # noqa: E402
from dasgd.runtime.node import BufferPool, Driver, queue_limit_msgs  # noqa: E402

TARGET_RATIO = 0.5
TARGET_BYTES = 4_000_000
N_CLASSES = 10
RESULTS = Path(__file__).resolve().parent / "results" / "bench_delta_path.json"
#: arrays the cold breakdown rotates over, in bytes: well above the 32 MiB L3 cache here
COLD_BYTES = 256_000_000
ROLES = ("raw-recv", "raw-send", "dasgd-recv", "dasgd-send")
#: messages per repetition at scale 1: 0.4-2 GB, about 1-2 s for dasgd
DEFAULT_COUNTS = {40_000: 10_000, 400_000: 4_000, 4_000_000: 500, 40_000_000: 40}
UNITS = {"KB": 1_000, "MB": 1_000_000, "GB": 1_000_000_000, "B": 1}


# ---------------------------------------------------------------------------
# shared helpers


def parse_size(text: str) -> int:
    """'40KB', '4MB', '4000000' -> bytes (decimal units); a multiple of 40 (10 float32 classes)."""
    t = text.strip().upper()
    for unit, factor in UNITS.items():
        if t.endswith(unit) and t[: -len(unit)].replace(".", "", 1).isdigit():
            nbytes = int(float(t[: -len(unit)]) * factor)
            break
    else:
        if not t.isdigit():
            raise argparse.ArgumentTypeError(f"size {text!r}: expected e.g. 40KB, 4MB or 4000000")
        nbytes = int(t)
    if nbytes < 80 or nbytes % 40:
        raise argparse.ArgumentTypeError(f"size {text!r}: need a multiple of 40 bytes, >= 80")
    return nbytes


def fmt_size(nbytes: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if nbytes >= UNITS[unit]:
            return f"{nbytes / UNITS[unit]:g} {unit}"
    return f"{nbytes} B"


#: Key directory of ``--curve`` runs (set in worker processes from ``--curve-keys``).
CURVE_KEYS: str | None = None


def run_config(kind: str, steps: int = 1) -> RunConfig:
    """A 2-node dasgd run (b = 1) in which node 0 takes ``steps`` local steps."""
    return RunConfig(
        n_nodes=2,
        model=ModelConfig(name="softmax", dtype="float32"),
        train=TrainConfig(optimizer="sgd", lr=0.05, batch_size=2, steps=steps, send_every=1),
        transport=TransportConfig(kind=kind, curve_keys=CURVE_KEYS),
    )


def curve_keys():
    """The run's CurveZMQ keys in a ``--curve`` worker, else None."""
    if CURVE_KEYS is None:
        return None
    from dasgd.runtime.security import CurveKeys

    return CurveKeys(CURVE_KEYS)


def n_features_for(nbytes: int) -> int:
    return (nbytes // 4 - N_CLASSES) // N_CLASSES


def hwm_for(nbytes: int) -> int:
    """High-water mark a dasgd node uses for messages of ``nbytes`` (defaults of TransportConfig)."""
    return queue_limit_msgs(TransportConfig(), nbytes)


class FixedGradient:
    """Stands in for the sender's model: no computation, the gradient buffer is left as it is."""

    def __init__(self, n_params: int) -> None:
        self.n_params = n_params

    def loss_and_grad(self, params, X, y, out=None):
        return 0.0, out


class FixedUpdate:
    """Stands in for the sender's optimizer: every step's parameter change is ``u``."""

    def __init__(self, u: np.ndarray) -> None:
        self.u = u

    def update(self, grad, lr=None) -> np.ndarray:
        return self.u

    def state_dict(self) -> dict:
        return {"name": "fixed-update"}


def make_machine(node_id: int, nbytes: int, kind: str, steps: int):
    """Node ``node_id``'s machine, as :func:`dasgd.build.build_machine` builds it for a 2-node run.

    Node 0 (the sender) takes ``steps`` steps whose gradient is a stand-in
    returning a fixed update: each step is the delta path alone. Node 1 (the
    receiver) takes no step: it finishes at once and drains, applying every
    delta node 0 sends.
    """
    d = n_features_for(nbytes)
    machine = build_machine(
        run_config(kind, max(1, steps)),
        node_id,
        n_features=d,
        n_classes=N_CLASSES,
        shard=(np.zeros((2, d), np.float32), np.array([0, 1], np.int64)),
        neighbours=[1 - node_id],
    )
    if machine.n_params * 4 != nbytes:
        raise RuntimeError(f"model has {machine.n_params} parameters, expected {nbytes // 4}")
    machine.total_steps = steps
    machine.model = FixedGradient(machine.n_params)
    machine.optimizer = FixedUpdate(np.full(machine.n_params, 1e-6, machine.dtype))
    # the stand-in reads no data: a one-column shard (no row copies per step), long
    # enough that the sampler draws a new permutation as rarely as in a real run
    rows = 1 << 16
    machine.X = np.zeros((rows, 1), np.float32)
    machine.y = np.zeros(rows, np.int64)
    machine.sampler = BatchSampler(rows, 2, seed=1)
    return machine


def make_driver(node_id: int, nbytes: int, kind: str, bind: str, work: Path) -> Driver:
    """Node ``node_id``'s driver with its inbox bound and its log open (as ``node_main`` does).

    Its machine is a placeholder: :func:`fresh_machine` puts the machine of a
    repetition in place before each run.
    """
    d = n_features_for(nbytes)
    return in_process_driver(
        run_config(kind),
        node_id,
        shard=(np.zeros((2, d), np.float32), np.array([0, 1], np.int64)),
        n_features=d,
        n_classes=N_CLASSES,
        bind=bind,
        log_path=work / f"node-{node_id}-{os.getpid()}.jsonl",
        neighbours=[1 - node_id],
    )


def fresh_machine(driver: Driver, node_id: int, nbytes: int, steps: int) -> Driver:
    """A new driver for a new run on ``driver``'s sockets, log and pool: a fresh machine of ``steps`` steps.

    A machine runs once (its protocol drains and stops), so every repetition
    gets new ones; sockets and buffer pools are kept, as in one long run.
    """
    machine = make_machine(node_id, nbytes, driver.config.transport.kind, steps)
    machine.new_buffer = driver.pool.take
    return Driver(machine, driver.config, driver.transport, driver.log, driver.pool)


# ---------------------------------------------------------------------------
# worker processes


class Worker:
    """A worker's control connection to the orchestrator (DEALER, identity = role)."""

    def __init__(self, args) -> None:
        self.args = args
        self.ctx = zmq.Context()
        self.ctrl = self.ctx.socket(zmq.DEALER)
        self.ctrl.setsockopt(zmq.LINGER, 1000)
        self.ctrl.setsockopt(zmq.IDENTITY, args.worker.encode())
        self.ctrl.connect(args.ctrl)

    def tell(self, **message) -> None:
        self.ctrl.send(json.dumps(message).encode())

    def command(self) -> dict:
        """Next command from the orchestrator; exits if it is gone or silent too long."""
        deadline = time.monotonic() + self.args.timeout_s * 4
        while time.monotonic() < deadline:
            if self.ctrl.poll(200):
                return json.loads(self.ctrl.recv())
            if os.getppid() != self.args.parent_pid:
                raise SystemExit("orchestrator is gone")
        raise SystemExit("no command from the orchestrator")

    def close(self) -> None:
        self.ctrl.close(linger=1000)
        self.ctx.term()


def worker_main(args) -> int:
    global CURVE_KEYS
    CURVE_KEYS = args.curve_keys
    w = Worker(args)
    try:
        if args.worker == "raw-recv":
            raw_receiver(w)
        elif args.worker == "raw-send":
            raw_sender(w)
        elif args.worker == "dasgd-recv":
            dasgd_receiver(w)
        else:
            dasgd_sender(w)
        return 0
    except Exception as exc:
        try:
            w.tell(kind="error", role=args.worker, message=f"{type(exc).__name__}: {exc}")
        except zmq.ZMQError:
            pass
        raise
    finally:
        w.close()


def serve(w: Worker, run_one, prepare=None) -> None:
    """Answer ``run`` commands with ``run_one(count, t_go)``'s result until ``exit``.

    ``prepare(count)`` (untimed) answers ``prepare`` commands, which come
    before each ``run``. Each result carries the process's CPU time (all its
    threads, incl. ZeroMQ's I/O thread) and minor page faults during the run.
    """
    while True:
        cmd = w.command()
        if cmd["cmd"] == "exit":
            return
        if cmd["cmd"] == "prepare":
            if prepare is not None:
                prepare(cmd["count"])
            w.tell(kind="prepared")
            continue
        before = resource.getrusage(resource.RUSAGE_SELF)
        t_go = time.perf_counter()
        if w.args.worker.endswith("recv"):
            w.tell(kind="armed")
        result = run_one(cmd["count"], t_go)
        after = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        result["sys_s"] = after.ru_stime - before.ru_stime
        result["minor_faults"] = after.ru_minflt - before.ru_minflt
        w.tell(kind="result", **result)


def raw_receiver(w: Worker) -> None:
    a = w.args
    sock = w.ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, a.hwm)
    sock.setsockopt(zmq.RCVTIMEO, int(a.timeout_s * 1000))  # every wait has a deadline
    keys, auth = curve_keys(), None
    if keys is not None:  # the same CURVE server as a dasgd inbox
        auth = keys.authenticator(w.ctx)
        keys.make_server(sock, "node-1")
    try:
        sock.bind(a.bind)
        w.tell(kind="ready", address=sock.getsockopt_string(zmq.LAST_ENDPOINT))

        def run_one(count: int, t_go: float) -> dict:
            nbytes = 0
            for _ in range(count):
                nbytes += len(sock.recv(copy=False))  # raises zmq.Again after RCVTIMEO
            return {"seconds": time.perf_counter() - t_go, "bytes": nbytes, "count": count}

        serve(w, run_one)
    finally:
        sock.close(linger=0)
        if auth is not None:
            auth.stop()


def raw_sender(w: Worker) -> None:
    a = w.args
    payload = np.ones(a.nbytes // 4, np.float32)
    sock = w.ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, a.hwm)
    sock.setsockopt(zmq.SNDTIMEO, int(a.timeout_s * 1000))
    keys = curve_keys()
    if keys is not None:
        keys.make_client(sock, "node-0", "node-1")
    try:
        sock.connect(a.connect)
        w.tell(kind="ready")

        def run_one(count: int, t_go: float) -> dict:
            for _ in range(count):
                sock.send(payload, copy=False)  # raises zmq.Again after SNDTIMEO
            return {"seconds": time.perf_counter() - t_go, "count": count}

        serve(w, run_one)
    finally:
        sock.close(linger=1000)


def dasgd_receiver(w: Worker) -> None:
    a = w.args
    base = make_driver(1, a.nbytes, a.transport, a.bind, Path(a.dir))
    try:
        w.tell(kind="ready", address=base.transport.address)
        # node 1's only neighbour is the origin of every delta: nothing is relayed,
        # only its fin and complete go back, to the sender's inbox
        cmd = w.command()
        if cmd["cmd"] != "connect":
            raise RuntimeError(f"expected connect, got {cmd['cmd']!r}")
        base.transport.connect({0: cmd["address"]})
        w.tell(kind="connected")
        current = {}

        def prepare(count: int) -> None:
            current["driver"] = fresh_machine(base, 1, a.nbytes, 0)

        def run_one(count: int, t_go: float) -> dict:
            driver = current.pop("driver")
            driver.run()
            seconds = time.perf_counter() - t_go
            machine = driver.machine
            applied = int(machine.protocol.applied_deltas[0])
            if not driver.drained or applied != count:
                raise RuntimeError(
                    f"applied {applied} of {count} deltas, drained: {driver.drained}"
                )
            return {
                "seconds": seconds,
                "bytes": count * a.nbytes,
                "count": count,
                "applied": applied,
                "malformed": driver.malformed,
                "duplicates": machine.protocol.duplicates,
                "params_finite": bool(np.isfinite(machine.params).all()),
            }

        serve(w, run_one, prepare)
    finally:
        close_driver(base)


def dasgd_sender(w: Worker) -> None:
    a = w.args
    base = make_driver(0, a.nbytes, a.transport, a.bind, Path(a.dir))
    try:
        base.transport.connect({1: a.connect})
        w.tell(kind="ready", address=base.transport.address)
        current = {}

        def prepare(count: int) -> None:
            current["driver"] = fresh_machine(base, 0, a.nbytes, count)

        def run_one(count: int, t_go: float) -> dict:
            driver = current.pop("driver")
            driver.run()
            machine = driver.machine
            if not driver.drained or machine.step != count:
                raise RuntimeError(
                    f"sent {machine.step} of {count} deltas, drained: {driver.drained}"
                )
            return {
                "seconds": time.perf_counter() - t_go,
                "count": count,
                "backpressure_waits": machine.backlog_waits,
                "pool_buffers": len(driver.pool._in_flight),
            }

        serve(w, run_one, prepare)
    finally:
        close_driver(base)


# ---------------------------------------------------------------------------
# orchestrator


class Pairs:
    """The four worker processes of one message size and the control socket to them."""

    def __init__(self, args, nbytes: int, count: int, work: Path) -> None:
        self.args = args
        self.nbytes = nbytes
        self.count = count
        self.work = work
        self.hwm = hwm_for(nbytes)
        self.procs: dict[str, subprocess.Popen] = {}
        self.ctx = zmq.Context()
        self.ctrl = self.ctx.socket(zmq.ROUTER)
        self.ctrl.setsockopt(zmq.LINGER, 0)
        self.ctrl.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.ctrl_address = f"ipc://{work}/ctrl-{nbytes}"
        self.ctrl.bind(self.ctrl_address)

    def _address(self, role: str) -> str:
        if self.args.transport == "tcp":
            return "tcp://127.0.0.1:*"
        return f"ipc://{self.work}/{role}-{self.nbytes}"

    def _spawn(self, role: str, connect: str = "") -> None:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            role,
            "--ctrl",
            self.ctrl_address,
            "--parent-pid",
            str(os.getpid()),
            "--bind",
            self._address(role),
            "--connect",
            connect,
            "--nbytes",
            str(self.nbytes),
            "--hwm",
            str(self.hwm),
            "--transport",
            self.args.transport,
            "--dir",
            str(self.work),
            "--timeout-s",
            str(self.args.timeout_s),
            *(["--curve-keys", self.args.curve_keys] if self.args.curve_keys else []),
        ]
        log = (self.work / f"{role}-{self.nbytes}.stderr").open("wb")
        try:
            self.procs[role] = subprocess.Popen(
                cmd,
                env={**os.environ, **THREAD_ENV},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def start(self) -> None:
        """Receivers first (they bind), then the senders connect to the addresses they report."""
        for role in ("raw-recv", "dasgd-recv"):
            self._spawn(role)
        addresses = {}
        for _ in range(2):
            role, msg = self._expect("ready")
            addresses[role] = msg["address"]
        self._spawn("raw-send", addresses["raw-recv"])
        self._spawn("dasgd-send", addresses["dasgd-recv"])
        for _ in range(2):
            role, msg = self._expect("ready")
            addresses[role] = msg.get("address")
        # the dasgd receiver sends its fin and complete back to the sender
        self._tell("dasgd-recv", cmd="connect", address=addresses["dasgd-send"])
        self._expect("connected")

    def _expect(self, kind: str, timeout_s: float | None = None) -> tuple[str, dict]:
        """The next control message, which must be of ``kind``; fails on a deadline or a dead worker."""
        deadline = time.monotonic() + (timeout_s or self.args.timeout_s * 2)
        while True:
            if self.ctrl.poll(100):
                role, raw = self.ctrl.recv_multipart()
                role, msg = role.decode(), json.loads(raw)
                if msg.get("kind") == "error":
                    raise RuntimeError(f"worker {role} failed: {msg['message']}{self._tail(role)}")
                if msg.get("kind") != kind:
                    raise RuntimeError(f"worker {role} sent {msg.get('kind')!r}, expected {kind!r}")
                return role, msg
            for role, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"worker {role} exited with {proc.returncode}{self._tail(role)}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {kind!r} from the workers within the deadline")

    def _tail(self, role: str) -> str:
        path = self.work / f"{role}-{self.nbytes}.stderr"
        text = path.read_text(errors="replace")[-1500:] if path.exists() else ""
        return f"\n--- {role} output ---\n{text}" if text.strip() else ""

    def _tell(self, role: str, **message) -> None:
        self.ctrl.send_multipart([role.encode(), json.dumps(message).encode()])

    def run(self, competitor: str, count: int) -> dict:
        """One timed transfer of ``count`` messages; the receiver's clock starts first."""
        recv, send = f"{competitor}-recv", f"{competitor}-send"
        for role in (recv, send):  # untimed: dasgd builds the repetition's machines
            self._tell(role, cmd="prepare", count=count)
        for _ in range(2):
            self._expect("prepared")
        self._tell(recv, cmd="run", count=count)
        self._expect("armed")
        self._tell(send, cmd="run", count=count)
        results = {}
        for _ in range(2):
            role, msg = self._expect("result")
            results[role] = msg
        r = results[recv]
        if r.get("malformed"):
            raise RuntimeError(f"{competitor}: {r['malformed']} malformed messages")
        if r.get("params_finite") is False:
            raise RuntimeError(f"{competitor}: receiver's parameters are not finite")
        mbps = r["bytes"] / r["seconds"] / 1e6
        return {
            "seconds": r["seconds"],
            "MB_per_s": mbps,
            "msgs_per_s": count / r["seconds"],
            "receiver": r,
            "sender": results[send],
        }

    def close(self) -> None:
        """Ask every worker to exit, then SIGTERM and SIGKILL stragglers; always reaps."""
        for role, proc in self.procs.items():
            if proc.poll() is None:
                try:
                    self._tell(role, cmd="exit")
                except zmq.ZMQError:
                    pass
        deadline = time.monotonic() + 5.0
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in self.procs.values() if p.poll() is None]
            for proc in alive:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            for proc in alive:
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    pass
        self.ctrl.close(linger=0)
        self.ctx.term()


def bench_size(args, nbytes: int, work: Path) -> dict:
    count = max(2, int(DEFAULT_COUNTS.get(nbytes, 2_000_000_000 // nbytes) * args.scale))
    hwm = hwm_for(nbytes)
    print(
        f"\n{fmt_size(nbytes)} ({nbytes // 4} float32): {count} messages "
        f"({count * nbytes / 1e9:.2f} GB) per repetition, {args.reps} repetitions, "
        f"HWM {hwm} msgs"
    )
    runs: dict[str, list[dict]] = {"raw": [], "dasgd": []}
    pairs = Pairs(args, nbytes, count, work)
    try:
        t0 = time.perf_counter()
        pairs.start()
        startup_s = time.perf_counter() - t0
        for name in ("raw", "dasgd"):  # warm-up: buffer pools, malloc, connections
            pairs.run(name, max(2, count // 4))
        for rep in range(args.reps):
            order = ("raw", "dasgd") if rep % 2 == 0 else ("dasgd", "raw")
            for name in order:
                runs[name].append(pairs.run(name, count))
            print(
                f"  rep {rep + 1}/{args.reps} (order {', '.join(order)}): MB/s  "
                f"raw {runs['raw'][-1]['MB_per_s']:7.0f}  dasgd {runs['dasgd'][-1]['MB_per_s']:7.0f}"
            )
    finally:
        pairs.close()
    mb = {k: [r["MB_per_s"] for r in v] for k, v in runs.items()}
    paired = [d / r for d, r in zip(mb["dasgd"], mb["raw"], strict=True)]
    return {
        "nbytes": nbytes,
        "n_params": nbytes // 4,
        "count": count,
        "hwm_msgs": hwm,
        "startup_s": startup_s,
        "MB_per_s": {k: summarize(v) for k, v in mb.items()},
        "msgs_per_s": {k: statistics.median(r["msgs_per_s"] for r in v) for k, v in runs.items()},
        "ratio_dasgd_over_raw": statistics.median(mb["dasgd"]) / statistics.median(mb["raw"]),
        "paired_ratio": summarize(paired),
        "runs": runs,
    }


# ---------------------------------------------------------------------------
# per-message cost breakdown (one process, no sockets)


class _NullTransport:
    """Stands in for a transport: drops every message (frames are released at once)."""

    def send(self, to, frames) -> None:
        pass

    def close(self, linger_s=None) -> None:
        pass


def breakdown(nbytes: int, work: Path, repeat: int = 5) -> dict:
    """Microseconds per message for each stage of the delta path at ``nbytes``.

    Every stage is timed twice: ``hot``, on the same arrays every call (they
    stay in the CPU caches), and ``cold``, rotating over distinct arrays of
    :data:`COLD_BYTES` in all, as in the real pipeline, where every message
    arrives in a fresh receive buffer and the sender's pool rotates.
    """
    n_params = nbytes // 4
    n_cold = max(2, COLD_BYTES // nbytes)
    number = max(10, min(2000, 400_000_000 // nbytes))
    rows: dict[str, dict] = {}

    def best(fn) -> float:
        return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6

    def stage(name: str, hot, cold=None) -> None:
        rows[name] = {"hot": best(hot), "cold": best(cold) if cold is not None else None}

    def rotating(fn):
        """``fn(k)`` with k = 0, 1, ..., n_cold - 1, 0, ... on successive calls."""
        k = [0]

        def call():
            k[0] = (k[0] + 1) % n_cold
            return fn(k[0])

        return call

    bufs = [np.full(n_params, 1e-6, np.float32) for _ in range(n_cold)]  # touched: no page faults
    u = np.full(n_params, 1e-6, np.float32)
    config = run_config("ipc")
    log = EventLog(work / "breakdown.jsonl", 0).open()

    def null_driver(node_id: int, steps: int) -> Driver:
        """The real machine and driver of node ``node_id``, with a transport that drops every message."""
        machine = make_machine(node_id, nbytes, "ipc", steps)
        pool = BufferPool(machine.n_params, machine.dtype)
        machine.new_buffer = pool.take
        return Driver(machine, config, _NullTransport(), log, pool)

    try:
        # sender: node 0 stepping with the fixed update
        sender = null_driver(0, 10**9).machine
        params, part, total = sender.params, sender.open_delta, sender.delta_sum
        stage(
            "send: params += u",
            lambda: np.add(params, u, out=params),
            rotating(lambda k: np.add(bufs[k], u, out=bufs[k])),
        )
        stage(
            "send: open delta = u (a window's first step copies)",
            lambda: np.copyto(part, u),
            rotating(lambda k: np.copyto(bufs[k], u)),
        )
        protocol = sender.protocol
        stage(
            "send: protocol.read_model() + local_step() (seals)",
            lambda: (protocol.read_model(), protocol.local_step()),
        )
        stage(
            f"send: own-delta sum += delta ({total.dtype} += float32)",
            lambda: np.add(total, part, out=total),
            rotating(lambda k: np.add(total, bufs[k], out=total)),
        )
        for b in bufs:
            b.fill(1e-6)
        header = protocol.local_step().header
        stage("send: wire.encode_header", lambda: wire.encode_header(header))
        stage("send: zmq.Frame(array, track=True)", lambda: zmq.Frame(part, track=True))
        whole = null_driver(0, 10**9)

        def send_one():
            sends, wait = whole.machine.advance(0.0)
            if wait is not CONTINUE or len(sends) != 1:
                raise RuntimeError(f"advance() returned {wait!r} with {len(sends)} sends")
            whole._send(sends[0])

        stage("send: whole advance() + Driver._send (no socket)", send_one)
        pool_size = len(whole.pool._in_flight)

        # receiver: node 1's messages, seq 0, 1, ... from node 0
        headers = []
        for seq in range(number * repeat * 2 + 2):
            h = wire.Header(
                "delta",
                0,
                0,
                seq,
                1,
                np.zeros(2, np.int64),
                np.array([seq + 1, 0], np.int64),
                "float32",
                (n_params,),
            )
            headers.append(wire.encode_header(h))
        n_nodes = config.n_nodes
        head = zmq.Frame(headers[0])
        messages = [[head, zmq.Frame(b)] for b in bufs]

        def decode(frames, check: bool = False):
            return wire.decode(
                frames, n_nodes, dtype="float32", n_params=n_params, check_finite=check
            )

        stage(
            "recv: wire.decode (the driver's: no finite check)",
            lambda: decode(messages[0]),
            rotating(lambda k: decode(messages[k])),
        )
        parsed_head, view0 = decode(messages[0])
        views = [decode(m)[1] for m in messages]
        stage(
            "recv: finite check of a new delta (on_message)",
            lambda: wire.check_finite_array(parsed_head, view0),
            rotating(lambda k: wire.check_finite_array(parsed_head, views[k])),
        )
        receiver = null_driver(1, 0).machine
        parsed = iter([wire.decode_header(raw, n_nodes) for raw in headers])
        stage("recv: protocol.receive", lambda: receiver.protocol.receive(next(parsed)))
        rparams = receiver.params
        stage(
            "recv: params += delta",
            lambda: np.add(rparams, view0, out=rparams),
            rotating(lambda k: np.add(rparams, views[k], out=rparams)),
        )
        handler = null_driver(1, 0)
        frames = iter([[zmq.Frame(raw), messages[k % n_cold][1]] for k, raw in enumerate(headers)])

        def handle_one():
            handler._handle(next(frames))

        stage("recv: whole Driver._handle (decode, on_message: check, receive, apply)", handle_one)
        if handler.malformed:
            raise RuntimeError(f"{handler.malformed} messages refused in the breakdown")
        dst = np.empty(n_params, np.float32)
        stage(
            "reference: memcpy of one delta (np.copyto)",
            lambda: np.copyto(dst, bufs[0]),
            rotating(lambda k: np.copyto(dst, bufs[k])),
        )
    finally:
        log.close()
    rows["send: whole advance() + Driver._send (no socket)"]["pool_buffers"] = pool_size
    return {"n_cold_buffers": n_cold, "number": number, "stages_us": rows}


def per_message_stages(rows: dict, side: str) -> list[str]:
    """The stages that make up one message on ``side`` ("send" or "recv"), without overlaps."""
    skip = ("whole",)
    return [n for n in rows if n.startswith(side + ":") and not any(w in n for w in skip)]


# ---------------------------------------------------------------------------
# driver


def print_cpu_table(results: list[dict]) -> None:
    print(
        "\nCPU time per message of each process (all its threads: Python and ZeroMQ's I/O "
        "thread; median over repetitions), sys = kernel part, and minor page faults per message"
    )
    head = f"{'size':>7} {'competitor':>10} {'sender us':>10} {'(sys)':>7} {'receiver us':>11}"
    head += f" {'(sys)':>7} {'faults/msg':>10} {'wall us/msg':>11}"
    print(head)
    print("-" * len(head))
    for r in results:
        for name, runs in r["runs"].items():

            def med(side: str, key: str, runs=runs) -> float:
                return statistics.median(x[side][key] / x["receiver"]["count"] for x in runs)

            wall = statistics.median(x["seconds"] / x["receiver"]["count"] for x in runs)
            print(
                f"{fmt_size(r['nbytes']):>7} {name:>10} {med('sender', 'cpu_s') * 1e6:>10.0f}"
                f" {med('sender', 'sys_s') * 1e6:>7.0f} {med('receiver', 'cpu_s') * 1e6:>11.0f}"
                f" {med('receiver', 'sys_s') * 1e6:>7.0f} {med('receiver', 'minor_faults'):>10.0f}"
                f" {wall * 1e6:>11.0f}"
            )


def print_breakdown(nbytes: int, costs: dict) -> None:
    rows = costs["stages_us"]
    print(
        f"\nper-message cost at {fmt_size(nbytes)} in one process, no sockets (us, best of 5; "
        f"hot = same arrays every call, cold = rotating over {costs['n_cold_buffers']} arrays)"
    )
    print(f"  {'stage':<56} {'hot':>8} {'cold':>8}")
    for name, row in rows.items():
        cold = f"{row['cold']:8.0f}" if row["cold"] is not None else f"{'':>8}"
        print(f"  {name:<56} {row['hot']:8.0f} {cold}")

    def total(names, key):
        return sum(rows[n][key] if rows[n][key] is not None else rows[n]["hot"] for n in names)

    for side, prefix in (("sender", "send"), ("receiver", "recv")):
        names = per_message_stages(rows, prefix)
        hot, cold = total(names, "hot"), total(names, "cold")
        print(
            f"  {side} stages summed: {hot:.0f} us hot, {cold:.0f} us cold -> "
            f"{nbytes / cold:.0f} MB/s cold, on a core of its own"
        )


def print_table(results: list[dict], args) -> None:
    print(
        f"\nthroughput over {args.transport}, MB/s = 1e6 bytes/s of payload (median "
        "[min..max]); ratio = median(dasgd) / median(raw);\npaired = median of per-repetition "
        "ratios (raw and dasgd ran back to back: the verdict uses it)"
    )
    head = (
        f"{'size':>7} {'HWM':>4} {'msgs':>6} {'raw MB/s':>9} {'range':>13} {'dasgd MB/s':>10}"
        f" {'range':>13} {'ratio':>6} {'paired':>6} {'raw msg/s':>9} {'dasgd msg/s':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        raw, das = r["MB_per_s"]["raw"], r["MB_per_s"]["dasgd"]
        raw_range = f"[{raw['min']:.0f}..{raw['max']:.0f}]"
        das_range = f"[{das['min']:.0f}..{das['max']:.0f}]"
        mark = ""
        if r["nbytes"] == TARGET_BYTES:
            ok = r["paired_ratio"]["median"] >= TARGET_RATIO
            mark = f"  <- target: paired >= {TARGET_RATIO}: {'MET' if ok else 'NOT MET'}"
        print(
            f"{fmt_size(r['nbytes']):>7} {r['hwm_msgs']:>4} {r['count']:>6}"
            f" {raw['median']:>9.0f} {raw_range:>13} {das['median']:>10.0f} {das_range:>13}"
            f" {r['ratio_dasgd_over_raw']:>6.3f} {r['paired_ratio']['median']:>6.3f}"
            f" {r['msgs_per_s']['raw']:>9.0f} {r['msgs_per_s']['dasgd']:>11.0f}{mark}"
        )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        nargs="+",
        type=parse_size,
        default=list(DEFAULT_COUNTS),
        help="delta sizes, decimal units (default: 40KB 400KB 4MB 40MB)",
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default: %(default)s)")
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the messages per repetition (default counts: 0.4-2 GB)",
    )
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    p.add_argument(
        "--curve",
        action="store_true",
        help="encrypt both competitors with CurveZMQ (dasgd's --curve-keys; raw ZeroMQ with the "
        "same keys); compare with a run without it for the cost of encryption",
    )
    p.add_argument("--curve-keys", help=argparse.SUPPRESS)
    p.add_argument(
        "--breakdown-size",
        type=parse_size,
        default=TARGET_BYTES,
        help="size of the per-message cost breakdown (default: 4MB)",
    )
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    p.add_argument("--timeout-s", type=float, default=60.0, help="deadline of every wait")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    # worker mode (internal)
    p.add_argument("--worker", choices=ROLES, help=argparse.SUPPRESS)
    p.add_argument("--ctrl", help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bind", help=argparse.SUPPRESS)
    p.add_argument("--connect", help=argparse.SUPPRESS)
    p.add_argument("--nbytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--hwm", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reps < 1 or args.scale <= 0 or args.timeout_s <= 0:
        p.error("--reps must be >= 1, --scale and --timeout-s > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    print(
        f"delta path vs raw ZeroMQ over {args.transport}{' with CurveZMQ' if args.curve else ''}; "
        f"{os.cpu_count()} cores; pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}; {THREAD_ENV}"
    )
    work = Path(tempfile.mkdtemp(prefix="dbench-", dir="/tmp"))
    if args.curve:
        from dasgd.runtime.security import write_keys

        args.curve_keys = str(work / "keys")
        write_keys(args.curve_keys, 2)
    try:
        results = [bench_size(args, nbytes, work) for nbytes in args.sizes]
        costs = breakdown(args.breakdown_size, work) if args.breakdown else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results, args)
    print_cpu_table(results)
    if costs:
        print_breakdown(args.breakdown_size, costs)
    load_after = report_load(load_before)
    doc = {
        "benchmark": "bench_delta_path",
        "target": f"dasgd >= {TARGET_RATIO} x raw ZeroMQ throughput at {fmt_size(TARGET_BYTES)}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(pyzmq=zmq.__version__, libzmq=zmq.zmq_version()),
        "env": THREAD_ENV,
        "load_average_1min": {"before": load_before, "after": load_after},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "breakdown_us": costs,
        "wall_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {args.out} ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
