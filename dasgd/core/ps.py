"""The centralized baselines as clock-free state machines: parameter-server worker and server.

Same contract as :class:`~dasgd.core.node.DasgdNode`: handed ``now``, returning
``(sends, wait)`` from ``advance`` and the replies from ``on_message``; no
clock, socket or file. Node ids: workers 0..n-1, the server n (a star with the
server in the centre). Wire kinds ``grad``, ``model`` and ``stop``
(:mod:`dasgd.core.wire`).

``ps-async`` -- asynchronous SGD, Koloskova, Stich & Jaggi, "Sharper Convergence
Guarantees for Asynchronous SGD for Distributed and Federated Learning",
NeurIPS 2022 (arXiv 2206.08307), Algorithm 1, every worker always busy: the
server holds x and a version counter t; it sends x_t to a worker, the worker
computes a gradient on its shard and pushes it; the server applies it at once
with step eta_t (delay-adaptive if asked, their Eq. (11)) and sends the new model
back to that worker only. The delay of the gradient is tau = t(apply) -
t(read). The run ends after the gradient budget has been applied; the
gradients still being computed then count in tau_avg with delay
t(end) - t(read) (their Definition 4).

``ps-sync`` -- synchronous mini-batch SGD: each round the server sends x to all
workers, waits for all n gradients, averages them and steps (zero delay); equal
to sequential SGD with batch n*M.

Server update rules: SGD, or AMSGrad as in APAM (Xu et al., arXiv 2002.09095,
Algorithm 1: the server keeps x, m, v, v_hat; only the gradient is stale).

A worker's gradient takes the emulated compute time (``--compute-time`` times
its slowdown factor, plus what a slowed worker owes for its real work) between
reading the model and sending the gradient, as a DASGD node's does.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import Diverged, WireError
from .actions import DONE, WAIT_MESSAGE
from .emulation import ComputeTime, Slowdown
from .protocol import Outgoing
from .staleness import RunningStat
from .wire import Header

__all__ = ["PSServer", "PSWorker"]

_NO_VV = np.zeros(0, np.int64)
_NOTHING: tuple = ()


class _Role:
    """What workers and the server share: ids, headers, counters."""

    def __init__(self, node_id: int, n_workers: int, n_params: int, dtype) -> None:
        self.node_id = node_id
        self.n_workers = n_workers
        self.server_id = n_workers
        self.n_params = n_params
        self.dtype = np.dtype(dtype)

    t_start: float | None = None
    t_end: float | None = None

    @property
    def train_s(self) -> float:
        """From the first call to the end of serving or computing, in the driver's seconds."""
        if self.t_start is None or self.t_end is None:
            return 0.0
        return self.t_end - self.t_start

    def _header(self, kind: str, seq: int, steps: int, *, array: bool) -> Header:
        return Header(
            kind,
            self.node_id,
            self.node_id,
            seq,
            steps,
            _NO_VV,
            _NO_VV,
            self.dtype.name if array else "",
            (self.n_params,) if array else (),
        )


class PSWorker(_Role):
    """A worker: receive the model, compute a gradient on its shard, push it; until told to stop.

    Parameters
    ----------
    worker_id : int
        0..n_workers-1.
    n_workers : int
    model : dasgd.ml.models.Model
    X : ndarray of shape (m, d), the model's dtype
        The worker's shard; ``y`` : ndarray of shape (m,), int64.
    sampler : dasgd.ml.data.BatchSampler
    dtype : numpy dtype
        Of the parameters.
    compute_time : ComputeTime, optional
        Emulated seconds per gradient (times the slowdown factor already).
    slowdown_factor : float, default 1
    new_buffer : callable, optional
        ``new_buffer() -> ndarray`` of shape (n_params,) for each gradient,
        handed to the driver with the ``grad`` message. Default ``np.empty``.
    """

    def __init__(
        self,
        worker_id: int,
        n_workers: int,
        *,
        model,
        X,
        y,
        sampler,
        dtype,
        compute_time: ComputeTime | None = None,
        slowdown_factor: float = 1.0,
        new_buffer=None,
    ) -> None:
        super().__init__(worker_id, n_workers, model.n_params, dtype)
        self.model = model
        self.X, self.y = X, y
        self.sampler = sampler
        self.compute_time = compute_time
        self.slowdown = Slowdown(slowdown_factor)
        self.new_buffer = new_buffer or (lambda: np.empty(self.n_params, dtype=self.dtype))
        self.params = np.empty(self.n_params, dtype=self.dtype)
        self.gradients = 0
        self.compute_s = 0.0
        self.wait_s = 0.0
        self.phase = "waiting"  # waiting -> computing -> waiting ... -> done
        self._model_version: int | None = None  # a model has arrived and is not used yet
        self._stopped = False
        self._grad_out: Outgoing | None = None
        self._compute_end = 0.0
        self._waiting_since: float | None = None
        self.t_start: float | None = None
        self.t_end: float | None = None
        self._loss_sum = 0.0
        self._loss_count = 0

    @property
    def progress_step(self) -> int:
        return self.gradients

    def on_message(self, header: Header, payload) -> tuple:
        """Take a ``model`` (kept for the next gradient) or ``stop`` from the server.

        Raises
        ------
        WireError
            Any other kind or sender.
        """
        if header.sender != self.server_id or header.kind not in ("model", "stop"):
            raise WireError(
                f"{header.kind} from node {header.sender}: workers take only model/stop from the server {self.server_id}"
            )
        if header.kind == "stop":
            self._stopped = True
        else:
            np.copyto(self.params, payload)
            self._model_version = header.seq
        return _NOTHING

    def advance(self, now: float, *, work_s: float = 0.0, **_):
        """Compute and push a gradient when a model is there; see :class:`~dasgd.core.node.DasgdNode`.

        Raises
        ------
        Diverged
            If the loss is not finite.
        """
        if work_s:
            self.slowdown.owe(work_s)
        if self.t_start is None:
            self.t_start = self._waiting_since = now
        sends = _NOTHING
        if self.phase == "computing":
            if now < self._compute_end and not self._stopped:
                return _NOTHING, self._compute_end
            sends = (self._grad_out,) if not self._stopped else _NOTHING
            self._grad_out = None
            self.phase = "waiting"
            self._waiting_since = now
        if self._stopped:
            if self.phase != "done":
                self.phase = "done"
                self.t_end = now
            return sends, DONE
        if self._model_version is None:
            return sends, WAIT_MESSAGE
        # a model is here: read it, compute the gradient
        self.wait_s += now - self._waiting_since
        version, self._model_version = self._model_version, None
        grad = self.new_buffer()
        idx = self.sampler.next_batch()
        loss, _ = self.model.loss_and_grad(self.params, self.X[idx], self.y[idx], out=grad)
        if not math.isfinite(loss):
            raise Diverged(
                f"worker {self.node_id} diverged at gradient {self.gradients} (loss {loss}): lower --lr"
            )
        self._loss_sum += loss
        self._loss_count += 1
        self.gradients += 1
        out = Outgoing(
            self._header("grad", version, 1, array=True), (self.server_id,), payload=grad
        )
        duration_s = self.compute_time.sample() if self.compute_time is not None else 0.0
        duration_s += self.slowdown.take()
        if duration_s > 0:
            self.compute_s += duration_s
            self._grad_out = out
            self._compute_end = now + duration_s
            self.phase = "computing"
            return sends, self._compute_end
        self._waiting_since = now
        return (*sends, out), WAIT_MESSAGE

    def interval_fields(self, now: float) -> dict:
        """Fields of an ``interval`` record since the previous call (then reset)."""
        fields = {
            "phase": "train",
            "loss": self._loss_sum / self._loss_count if self._loss_count else None,
        }
        self._loss_sum, self._loss_count = 0.0, 0
        return fields

    def final_fields(self) -> dict:
        train_s = self.train_s
        return {
            "role": "worker",
            "gradients": self.gradients,
            "train_s": train_s,
            "wait_s": self.wait_s,
            "compute_s": self.compute_s,
            "gradients_per_s": self.gradients / train_s if train_s > 0 else None,
            "slowdown_factor": self.slowdown.factor,
            "slept_s": self.slowdown.slept_s,
        }

    def start_fields(self) -> dict:
        """What the ``start`` record says about this worker."""
        return {"role": "worker", "shard_size": len(self.y)}


class PSServer(_Role):
    """The parameter server of ps-async (Koloskova et al. 2022, Algorithm 1) or ps-sync.

    Parameters
    ----------
    n_workers : int
    x0 : ndarray of shape (n_params,)
        The common initial model x_0 (copied), as DASGD nodes start from.
    optimizer : dasgd.ml.optim optimizer
        ``update(grad, lr=None) -> ndarray`` returns the change of x.
    algorithm : {"ps-async", "ps-sync"}
    budget : int
        ps-async: gradients to apply. ps-sync: rounds (each of n gradients).
        Records give it in gradients (``budget_gradients``).
    lr_for_delay : callable, optional
        ps-async: ``lr_for_delay(tau) -> float``, the step size of a gradient
        of delay tau (Koloskova et al. 2022, Eq. (11)); 0 drops it. None: the
        optimizer's own step size.

    Attributes
    ----------
    x : ndarray of shape (n_params,)
        The model.
    version : int
        t: gradients received so far (ps-async, dropped ones included), or
        rounds done (ps-sync).
    """

    def __init__(
        self,
        n_workers: int,
        *,
        x0: np.ndarray,
        optimizer,
        algorithm: str,
        budget: int,
        lr_for_delay=None,
        delay_rule: str = "none",
        delay_concurrency: int | None = None,
    ) -> None:
        x0 = np.asarray(x0)
        super().__init__(n_workers, n_workers, x0.size, x0.dtype)
        self.x = np.array(x0, copy=True)
        self.optimizer = optimizer
        self.algorithm = algorithm
        self.budget = budget
        self.lr_for_delay = lr_for_delay
        self.delay_rule = delay_rule
        self.delay_concurrency = delay_concurrency or n_workers
        self.version = 0
        self.applied = 0
        self.dropped = 0
        self.tau = RunningStat()
        self.tau_per_worker = [RunningStat() for _ in range(n_workers)]
        self.gradients_per_worker = [0] * n_workers
        self._interval_tau = RunningStat()
        self.in_flight_tau: list[int] = []
        self._read_version: list[int | None] = [0] * n_workers
        self._step_sum = np.zeros(self.n_params, dtype=self.dtype)
        self._pending: set[int] = set()
        self.phase = "start"  # start -> serving -> done
        self.t_start: float | None = None
        self.t_end: float | None = None
        self._workers = tuple(range(n_workers))
        #: dasgd.analysis.events.EventRecorder or None: told every gradient received (the
        #: driver sets its ``now``), with tau and c_g, for the virtual-sequence staleness
        self.events = None

    @property
    def progress_step(self) -> int:
        return self.version

    @property
    def finished(self) -> bool:
        return self.version >= self.budget

    @property
    def budget_gradients(self) -> int:
        """The budget in gradients (ps-sync: rounds times workers)."""
        return self.budget * (self.n_workers if self.algorithm == "ps-sync" else 1)

    def _model_to(self, workers) -> Outgoing:
        # live: the driver copies x before the next call changes it
        return Outgoing(
            self._header("model", self.version, 0, array=True),
            tuple(workers),
            payload=self.x,
            live=True,
        )

    def on_message(self, header: Header, grad) -> tuple:
        """Apply (ps-async) or collect (ps-sync) a worker's gradient; return the replies.

        Raises
        ------
        WireError
            Not a ``grad`` from a worker; a version from the future; in
            ps-sync, a gradient of another round or a second one from the
            same worker. Nothing was changed.
        """
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
        w = header.sender
        if self.algorithm == "ps-sync":
            return self._collect(header, grad)
        if self.finished:  # arrived after the budget was used: it counts as in flight
            return _NOTHING
        tau = self.version - header.seq
        lr = self.lr_for_delay(tau) if self.lr_for_delay is not None else None
        self._record_tau(w, tau)
        self.version += 1
        if lr is None:
            self.x += self.optimizer.update(grad)
            self.applied += 1
        elif lr > 0:
            self.x += self.optimizer.update(grad, lr=lr)
            self.applied += 1
        else:
            self.dropped += 1
        if self.finished:
            self._read_version[w] = None
            return _NOTHING
        self._read_version[w] = self.version
        return (self._model_to((w,)),)

    def _record_tau(self, worker: int, tau: int) -> None:
        self.tau.add(tau)
        self._interval_tau.add(tau)
        self.tau_per_worker[worker].add(tau)
        self.gradients_per_worker[worker] += 1
        if self.events is not None:  # c_g: gradients in the model the worker read
            self.events.server_gradient(
                worker, self.gradients_per_worker[worker], self.version - tau, tau
            )

    def _collect(self, header: Header, grad) -> tuple:
        w = header.sender
        if header.seq != self.version or w not in self._pending:
            raise WireError(
                f"grad of worker {w} for round {header.seq} in round {self.version} (already received or stale)"
            )
        self._step_sum += grad
        self._pending.discard(w)
        self.tau_per_worker[w].add(0)
        self.gradients_per_worker[w] += 1
        if self.events is not None:  # the model of round r holds r * n gradients
            self.events.server_gradient(
                w, self.gradients_per_worker[w], self.version * self.n_workers, 0
            )
        if self._pending:
            return _NOTHING
        self._step_sum /= self.n_workers
        self.x += self.optimizer.update(self._step_sum)
        self.tau.add(0)
        self._interval_tau.add(0)
        self.version += 1
        self.applied += 1
        if self.finished:
            return _NOTHING
        return self._start_round()

    def _start_round(self) -> tuple:
        self._step_sum.fill(0)
        self._pending = set(self._workers)
        return (self._model_to(self._workers),)

    def advance(self, now: float, **_):
        """Start serving; once the budget is used, stop every worker (then :data:`DONE`)."""
        if self.phase == "start":
            self.t_start = now
            self.phase = "serving"
            if self.algorithm == "ps-sync":
                return self._start_round(), WAIT_MESSAGE
            return (self._model_to(self._workers),), WAIT_MESSAGE
        if self.phase == "done":
            return _NOTHING, DONE
        if not self.finished:
            return _NOTHING, WAIT_MESSAGE
        self.phase = "done"
        self.t_end = now
        if self.algorithm == "ps-async":
            # Definition 4: gradients in flight at the end count with delay t(end) - t(read)
            self.in_flight_tau = [self.version - r for r in self._read_version if r is not None]
        stop = Outgoing(self._header("stop", self.version, 0, array=False), self._workers)
        return (stop,), DONE

    def node_failed(self, worker: int) -> None:
        """A ps-async worker died: stop sending to it; its gradient in flight is lost.

        The budget (gradients) is then filled by the other workers; the lost
        gradient is not counted in flight for tau (Definition 4), as it never
        arrives. Idempotent.

        Raises
        ------
        ValueError
            For ps-sync (every round waits for every worker: the launcher
            stops such a run instead) or a worker id outside 0..n_workers-1.
        """
        if self.algorithm != "ps-async" or not 0 <= worker < self.n_workers:
            raise ValueError(f"the {self.algorithm} server cannot drop worker {worker}")
        self._workers = tuple(w for w in self._workers if w != worker)
        self._read_version[worker] = None

    def check_model(self) -> None:
        """Raise :class:`~dasgd.errors.Diverged` if the model holds NaN or inf.

        Workers reject a non-finite model as malformed and go quiet; a driver
        whose wait for gradients lasts calls this to say why instead of timing out.
        """
        if not math.isfinite(float(np.dot(self.x, self.x))):
            raise Diverged(
                f"the server's model diverged (NaN or inf) at version {self.version}: lower --lr"
            )

    def interval_fields(self, now: float) -> dict:
        """Fields of an ``interval`` record since the previous call (then reset)."""
        fields = {"phase": "train", **self._interval_tau.as_dict("tau")}
        self._interval_tau = RunningStat()
        return fields

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

    def final_fields(self) -> dict:
        return {
            "role": "server",
            "algorithm": self.algorithm,
            "budget": self.budget_gradients,
            "gradients_received": self.version
            if self.algorithm == "ps-async"
            else self.version * self.n_workers,
            "updates_applied": self.applied,
            "gradients_dropped": self.dropped,
            "train_s": self.train_s,
            "optimizer": self.optimizer.state_dict(),
            "delay_rule": self.delay_rule,
            "delay_concurrency": self.delay_concurrency,
            "gradients_per_worker": self.gradients_per_worker,
            "workers": [
                {"worker": w, **s.as_dict("tau")} for w, s in enumerate(self.tau_per_worker)
            ],
            **self.tau_summary(),
        }

    def start_fields(self) -> dict:
        """What the ``start`` record says about the server."""
        return {"role": "server", "algorithm": self.algorithm, "budget": self.budget_gradients}
