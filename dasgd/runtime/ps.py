"""The centralized baselines: a parameter server with asynchronous or synchronous workers.

Same data shards, models, wire format (:mod:`dasgd.wire` kinds ``grad``,
``model``, ``stop``), transport, slowdown/latency emulation and event logs as
DASGD, so that runs compare on equal footing. Node ids: workers 0..n-1, the
server n (a star with the server in the centre).

``ps-async`` -- asynchronous SGD, Koloskova, Stich & Jaggi, "Sharper Convergence
Guarantees for Asynchronous SGD for Distributed and Federated Learning",
NeurIPS 2022 (arXiv 2206.08307), Algorithm 1, every worker always busy: the
server holds x and a version counter t; it sends x_t to a worker, the worker
computes a gradient on its shard and pushes it; the server applies it at once
with step eta_t (delay-adaptive if asked, their Eq. (11)) and sends the new model
back to that worker only. The delay of the gradient is tau = t(apply) -
t(read). The run ends after ``n * steps`` gradients have been applied; the
gradients still being computed then count in tau_avg with delay
t(end) - t(read) (their Definition 4).

``ps-sync`` -- synchronous mini-batch SGD: each round the server sends x to all
workers, waits for all n gradients, averages them and steps (zero delay); equal
to sequential SGD with batch n*M.

Server update rules: SGD, or AMSGrad as in APAM (Xu et al., arXiv 2002.09095,
Algorithm 1: the server keeps x, m, v, v_hat; only the gradient is stale).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..core import wire
from ..core.emulation import Slowdown
from ..core.staleness import RunningStat
from ..errors import Diverged, TransportError, WireError
from ..ml.data import BatchSampler, local_steps
from ..ml.models import build_model
from ..ml.optim import build_optimizer, delay_adaptive_lr
from .node import MAX_MALFORMED_LOGGED, BufferPool, _Terminated

__all__ = ["Server", "Worker"]

_NO_VV = np.zeros(0, np.int64)
#: A wait for a message this long (seconds) makes the server check that its model is finite.
IDLE_CHECK_S = 0.5


class _Role:
    """What workers and the server share: model, dtype, transport, log, receiving with deadlines."""

    def __init__(self, config, node_id: int, n_features: int, n_classes: int, run_dir) -> None:
        self.config = config
        self.node_id = node_id
        self.n_workers = config.n_nodes
        self.server_id = config.n_nodes
        self.run_dir = Path(run_dir)
        mc = config.model
        self.dtype = np.dtype(mc.dtype)
        self.model = build_model(
            mc.name, n_features, n_classes, hidden=mc.hidden, activation=mc.activation, l2=mc.l2
        )
        self.n_params = self.model.n_params
        self.pool = BufferPool(self.n_params, self.dtype)
        self.transport = None
        self.log = None
        self.on_progress = None
        self.stop_requested = False
        self.malformed = 0
        self.slowdown = Slowdown(1.0)
        self._interval_t = 0.0

    def _header(self, kind: str, seq: int, steps: int, *, array: bool) -> bytes:
        return wire.encode_header(
            wire.Header(
                kind,
                self.node_id,
                self.node_id,
                seq,
                steps,
                _NO_VV,
                _NO_VV,
                self.config.model.dtype if array else "",
                (self.n_params,) if array else (),
            )
        )

    def _next_message(self, timeout_s: float, expect: str):
        """The next well-formed message, waiting at most ``timeout_s``; malformed ones are counted and dropped.

        Raises
        ------
        TransportError
            If nothing arrives before the deadline (``expect`` names what was awaited).
        """
        start = time.monotonic()
        deadline = start + timeout_s
        idle_checked = False
        while True:
            if self.stop_requested:
                raise _Terminated
            self.transport.flush()
            frames = self.transport.recv()
            if frames is None:
                now = time.monotonic()
                if now >= deadline:
                    raise TransportError(f"no {expect} within {timeout_s:.0f} s")
                if not idle_checked and now - start > IDLE_CHECK_S:
                    self._on_idle()
                    idle_checked = True
                self.transport.poll(self.transport.wait_cap_s(min(deadline - now, 0.05)))
                continue
            try:
                header, array = wire.decode(
                    frames,
                    self.n_workers + 1,
                    dtype=self.config.model.dtype,
                    n_params=self.n_params,
                    check_finite=self.config.transport.check_finite,
                )
                self._validate(header)
            except WireError as exc:
                self.malformed += 1
                if self.malformed <= MAX_MALFORMED_LOGGED:
                    self.log.log("malformed", self.progress_step, reason=str(exc))
                continue
            return header, array

    def _validate(self, header) -> None:
        raise NotImplementedError

    def _on_idle(self) -> None:
        """Called once when a wait for a message has lasted ``IDLE_CHECK_S``."""

    def _progress(self, now: float, **fields) -> None:
        record = self.log.log(
            "interval",
            self.progress_step,
            **fields,
            malformed=self.malformed,
            **self.transport.counters(),
        )
        self._interval_t = now
        if self.on_progress is not None:
            self.on_progress(record)


class Worker(_Role):
    """A worker: receive the model, compute a gradient on its shard, push it; until told to stop.

    Parameters
    ----------
    config : RunConfig
        ``algorithm`` "ps-async" or "ps-sync"; ``n_nodes`` = number of workers.
    worker_id : int
        0..n_workers-1.
    X : ndarray of shape (m, d)
        The worker's shard; y : ndarray of shape (m,), int64.
    n_classes : int
    run_dir : path-like
    """

    def __init__(self, config, worker_id: int, X, y, n_classes: int, run_dir) -> None:
        super().__init__(config, worker_id, X.shape[1], n_classes, run_dir)
        self.X = np.ascontiguousarray(X, dtype=self.dtype)
        self.y = np.asarray(y, dtype=np.int64)
        self.sampler = BatchSampler(
            len(self.y), config.train.batch_size, seed=config.train.seed + 1 + worker_id
        )
        self.params = np.empty(self.n_params, dtype=self.dtype)
        self.gradients = 0
        self.wait_s = 0.0
        self.train_s = 0.0
        self._loss_sum = 0.0
        self._loss_count = 0

    @property
    def progress_step(self) -> int:
        return self.gradients

    def start_fields(self) -> dict:
        """What the ``start`` record says about this worker."""
        return {"role": "worker", "shard_size": len(self.y)}

    def _validate(self, header) -> None:
        if header.sender != self.server_id or header.kind not in ("model", "stop"):
            raise WireError(
                f"{header.kind} from node {header.sender}: workers take only model/stop from the server {self.server_id}"
            )

    def run(self) -> None:
        """Compute gradients until the server says stop."""
        tc = self.config.transport
        t_start = time.monotonic()
        self._interval_t = t_start
        timeout_s = tc.send_timeout_s
        while True:
            t_wait = time.perf_counter()
            header, array = self._next_message(timeout_s, "model from the server")
            self.wait_s += time.perf_counter() - t_wait
            if header.kind == "stop":
                break
            t_iteration = time.perf_counter()
            np.copyto(self.params, array)
            grad = self.pool.take()
            idx = self.sampler.next_batch()
            loss, _ = self.model.loss_and_grad(self.params, self.X[idx], self.y[idx], out=grad)
            if not math.isfinite(loss):
                raise Diverged(
                    f"worker {self.node_id} diverged at gradient {self.gradients} (loss {loss}): lower --lr"
                )
            self._loss_sum += loss
            self._loss_count += 1
            payload = self.pool.payload(grad)
            self.transport.send(
                self.server_id, [self._header("grad", header.seq, 1, array=True), payload]
            )
            self.transport.flush()
            self.gradients += 1
            self.slowdown.after_step(time.perf_counter() - t_iteration)
            now = time.monotonic()
            if now - self._interval_t >= self.config.log_interval_s:
                self._interval(now)
        self.train_s = time.monotonic() - t_start
        self._interval(time.monotonic())

    def _interval(self, now: float) -> None:
        self._progress(
            now, phase="train", loss=self._loss_sum / self._loss_count if self._loss_count else None
        )
        self._loss_sum, self._loss_count = 0.0, 0

    def write_results(self) -> None:
        self.log.log(
            "final",
            self.gradients,
            role="worker",
            gradients=self.gradients,
            train_s=self.train_s,
            wait_s=self.wait_s,
            gradients_per_s=self.gradients / self.train_s if self.train_s > 0 else None,
            malformed=self.malformed,
            slowdown_factor=self.slowdown.factor,
            slept_s=self.slowdown.slept_s,
            **self.transport.counters(),
        )


class Server(_Role):
    """The parameter server of ps-async (Koloskova et al. 2022, Algorithm 1) or ps-sync.

    Parameters
    ----------
    config : RunConfig
    n_features, n_classes : int
    shard_sizes : list of int
        Sizes of the workers' shards: the gradient budget is the sum of
        :func:`~dasgd.data.local_steps` over workers (``n * steps`` with ``--steps``).
    run_dir : path-like

    Attributes
    ----------
    x : ndarray of shape (n_params,)
        The model; starts at x_0 = ``init_params(seed)``, as DASGD nodes do.
    version : int
        t: gradients received so far (dropped ones included).
    """

    def __init__(self, config, n_features: int, n_classes: int, shard_sizes, run_dir) -> None:
        super().__init__(config, config.n_nodes, n_features, n_classes, run_dir)
        tc = config.train
        self.x = self.model.init_params(seed=tc.seed, dtype=self.dtype)
        self.optimizer = build_optimizer(
            tc.server_optimizer, self.n_params, tc.lr, dtype=self.dtype
        )
        self.budget = sum(local_steps(config.train, m) for m in shard_sizes)
        if config.algorithm == "ps-sync":
            self.rounds = min(local_steps(config.train, m) for m in shard_sizes)
            self.budget = self.rounds * self.n_workers
        self.concurrency = tc.delay_concurrency or self.n_workers
        self.version = 0
        self.applied = 0
        self.dropped = 0
        self.tau = RunningStat()
        self.tau_per_worker = [RunningStat() for _ in range(self.n_workers)]
        self.gradients_per_worker = [0] * self.n_workers
        self._interval_tau = RunningStat()
        self.in_flight_tau: list[int] = []
        self.evaluator = None  # a metrics.Evaluator logs eval records when set
        self.train_s = 0.0
        self._step_sum = np.zeros(self.n_params, dtype=self.dtype)

    @property
    def progress_step(self) -> int:
        return self.version

    def start_fields(self) -> dict:
        """What the ``start`` record says about the server."""
        return {"role": "server", "algorithm": self.config.algorithm, "budget": self.budget}

    def _on_idle(self) -> None:
        # workers reject a non-finite model as malformed and go quiet: say why instead of timing out
        if not math.isfinite(float(np.dot(self.x, self.x))):
            raise Diverged(
                f"the server's model diverged (NaN or inf) at version {self.version}: lower --lr"
            )

    def _validate(self, header) -> None:
        if (
            header.kind != "grad"
            or header.sender >= self.n_workers
            or header.origin != header.sender
        ):
            raise WireError(
                f"{header.kind} from node {header.sender}: the server takes only grad from workers 0..{self.n_workers - 1}"
            )
        if header.seq > self.version:
            raise WireError(
                f"grad computed at version {header.seq}, but the server is at {self.version}"
            )

    def _send_model(self, workers) -> None:
        payload = self.pool.snapshot(self.x)
        header = self._header("model", self.version, 0, array=True)
        for w in workers:
            self.transport.send(w, [header, payload])
        self.transport.flush()

    def _apply(self, grad: np.ndarray, tau: int, worker: int) -> None:
        lr = delay_adaptive_lr(
            self.config.train.lr, tau, self.concurrency, rule=self.config.train.delay_rule
        )
        self.tau.add(tau)
        self._interval_tau.add(tau)
        self.tau_per_worker[worker].add(tau)
        self.gradients_per_worker[worker] += 1
        self.version += 1
        if lr > 0:
            self.x += self.optimizer.update(grad, lr=lr)
            self.applied += 1
        else:
            self.dropped += 1

    def evaluate(self, now: float, *, force: bool = False) -> None:
        """Log an ``eval`` record of the server's model when one is due."""
        if self.evaluator is not None:
            self.evaluator.maybe_log(self.log, now, self.version, self.x, force=force)

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._interval_t >= self.config.log_interval_s:
            self._interval(now)
        self.evaluate(now)

    def _interval(self, now: float) -> None:
        self._progress(now, phase="train", **self._interval_tau.as_dict("tau"))
        self._interval_tau = RunningStat()

    def run(self) -> None:
        """Serve until the gradient budget is used, then stop every worker."""
        t_start = time.monotonic()
        self._interval_t = t_start
        self.evaluate(t_start, force=True)
        if self.config.algorithm == "ps-sync":
            self._run_sync()
        else:
            self._run_async()
        self.train_s = time.monotonic() - t_start
        stop = self._header("stop", self.version, 0, array=False)
        for w in range(self.n_workers):
            self.transport.send(w, [stop])
        self._interval(time.monotonic())
        self.evaluate(time.monotonic(), force=True)
        deadline = (
            time.monotonic()
            + min(self.config.transport.send_timeout_s, 5.0)
            + max(self.transport.latency_s.values(), default=0.0)
        )
        while (
            self.transport.has_pending and time.monotonic() < deadline and not self.stop_requested
        ):
            self.transport.flush()
            self.transport.poll(self.transport.wait_cap_s(0.005))

    def _run_async(self) -> None:
        timeout_s = self.config.transport.send_timeout_s
        read_version = [0] * self.n_workers
        self._send_model(range(self.n_workers))
        while self.version < self.budget:
            header, grad = self._next_message(timeout_s, "gradient from any worker")
            w = header.sender
            self._apply(grad, self.version - header.seq, w)
            if self.version < self.budget:
                read_version[w] = self.version
                self._send_model([w])
            else:
                read_version[w] = None
            self._tick()
        # Definition 4: gradients in flight at the end count with delay t(end) - t(read)
        self.in_flight_tau = [self.version - r for r in read_version if r is not None]

    def _run_sync(self) -> None:
        timeout_s = self.config.transport.send_timeout_s
        step = self._step_sum
        for _ in range(self.rounds):
            self._send_model(range(self.n_workers))
            step.fill(0)
            pending = set(range(self.n_workers))
            while pending:
                header, grad = self._next_message(
                    timeout_s, f"gradients of workers {sorted(pending)}"
                )
                if header.seq != self.version or header.sender not in pending:
                    self.malformed += 1
                    continue
                step += grad
                pending.discard(header.sender)
                self.tau_per_worker[header.sender].add(0)
                self.gradients_per_worker[header.sender] += 1
            step /= self.n_workers
            self.x += self.optimizer.update(step)
            self.tau.add(0)
            self._interval_tau.add(0)
            self.version += 1
            self.applied += 1
            self._tick()

    def tau_summary(self) -> dict:
        """tau_avg (Koloskova et al. Definition 4, in-flight gradients counted) and tau_max."""
        count = self.tau.count + len(self.in_flight_tau)
        total = self.tau.total + sum(self.in_flight_tau)
        return {
            "tau_avg_steps": total / count if count else None,
            "tau_max_steps": max([self.tau.max, *self.in_flight_tau]) if count else None,
            "tau_count": count,
            "tau_applied_avg_steps": self.tau.mean if self.tau.count else None,
            "tau_in_flight_steps": self.in_flight_tau,
        }

    def write_results(self) -> None:
        np.save(self.run_dir / "server.npy", self.x)
        self.log.log(
            "final",
            self.version,
            role="server",
            algorithm=self.config.algorithm,
            budget=self.budget,
            gradients_received=self.version
            if self.config.algorithm == "ps-async"
            else self.version * self.n_workers,
            updates_applied=self.applied,
            gradients_dropped=self.dropped,
            train_s=self.train_s,
            eval_s=self.evaluator.eval_s if self.evaluator else 0.0,
            malformed=self.malformed,
            optimizer=self.optimizer.state_dict(),
            delay_rule=self.config.train.delay_rule,
            delay_concurrency=self.concurrency,
            gradients_per_worker=self.gradients_per_worker,
            workers=[{"worker": w, **s.as_dict("tau")} for w, s in enumerate(self.tau_per_worker)],
            **self.tau_summary(),
            **self.transport.counters(),
        )
