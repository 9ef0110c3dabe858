"""One dasgd node against a plain numpy SGD loop on the same MLP and data.

Target (from the issue): a single dasgd node's steps/s is at least 0.9 of a
plain, hand-written numpy SGD loop's on the same MLP and mini-batches.
Second target (issue 8): the per-event binary logs (on by default; the ``node``
row above records them) cost at most 3 %: a lone softmax node on digits at
b = 1, events on against ``record_events=False``, paired and interleaved.
Third target (issue 11): a PyTorch model in a dasgd node (``--model
torch:...``, :class:`dasgd.ml.torch_model.TorchModel`) runs at least 0.9 of
the steps/s of a plain PyTorch training loop on the same module and batches
(section "PyTorch"; skipped with a line when torch is not installed).

Competitors, run side by side in one process and interleaved: every repetition
runs ``loop`` and ``node`` back to back, in alternating order, so a slow phase
of the machine hits both alike. The verdict uses the median over repetitions of
the per-repetition ratio node/loop ("paired"); the ratio of the medians is
printed beside it.

``loop``
    A self-contained numpy MLP (``d -> hidden... -> C``, relu, softmax
    cross-entropy) with preallocated work buffers, doing forward, backward and
    ``W -= lr * g`` on mini-batches of a fresh permutation each epoch, the way
    a careful user writes it without dasgd. It calls no dasgd model code; its
    gradient is checked once against :class:`dasgd.ml.models.MLP` before timing.
``node``
    The real code path of a node without neighbours (``n_nodes=1``): its
    :class:`~dasgd.core.node.DasgdNode` built by :func:`dasgd.build.build_machine`,
    run by :meth:`dasgd.runtime.node.Driver.run` (the loop of every node process:
    ``advance()``, ``_receive_all()``, interval and eval checks, the drain)
    with a real ipc transport and event log, built in-process as ``node_main``
    builds them. Only ``run()`` is timed (construction is not).
``cli`` (information; the first ``--cli-reps`` repetitions; ``--no-cli`` skips it)
    ``dasgd run -n 1`` end to end, wall time of the whole command including
    interpreter start, dataset loading, launching, the final evaluation and the
    summary; its steps/s is ``steps / wall``. ``cli-train`` is the same run's
    ``steps / train_s`` as its node process recorded it.

``torch-loop`` and ``torch-node`` (section "PyTorch", ``--torch-steps 0`` skips it)
    The loop a PyTorch user writes: ``opt.zero_grad(); loss_fn(net(X[idx]),
    y[idx]).backward(); opt.step()`` with ``torch.optim.SGD``, on the batches
    of the node's :class:`~dasgd.ml.data.BatchSampler` and the module the
    factory builds under ``torch.manual_seed(0)`` (float32). ``torch-node``:
    a lone node as ``node`` above with ``--model torch:torch_models:digits_NAME``
    (``benchmarks/torch_models.py``: a small CNN and an MLP 64-256-10 on
    digits). Before timing, both train 50 steps from the same start and their
    parameters are compared (same model, same batches).

Every process gets ``OPENBLAS_NUM_THREADS=1`` (and OMP/MKL), and torch
``torch.set_num_threads(1)``: BLAS threads are not part of the comparison. Results go to ``benchmarks/results/bench_single_node.json``.

Usage::

    python benchmarks/bench_single_node.py                  # ~50 s on 2 cores
    python benchmarks/bench_single_node.py --reps 11 --steps 10000 400
    python benchmarks/bench_single_node.py --hidden 256 --steps 3000 --no-cli
"""

from __future__ import annotations

import os

THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
os.environ.update(THREAD_ENV)  # before numpy is imported, here and in every child

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
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
from common import (  # noqa: E402
    close_driver,
    in_process_driver,
    machine_info,
    report_load,
    summarize,
)

from dasgd.config import ModelConfig, RunConfig, TrainConfig  # noqa: E402
from dasgd.core.actions import CONTINUE  # noqa: E402
from dasgd.ml.data import load_dataset  # noqa: E402
from dasgd.ml.models import build_model  # noqa: E402

TARGET_RATIO = 0.9
#: Steps/s with the per-event binary logs on, at least this fraction of off (issue 8).
EVENTS_TARGET = 0.97
#: A torch model in a node: steps/s at least this fraction of a plain torch loop's (issue 11).
TORCH_TARGET = 0.9
RESULTS = Path(__file__).resolve().parent / "results" / "bench_single_node.json"
CLI_TIMEOUT_S = 300.0


# ---------------------------------------------------------------------------
# the honest competitor: a plain numpy MLP trained with SGD


class PlainMLP:
    """Fully connected relu net with softmax cross-entropy, trained by plain SGD.

    Parameters
    ----------
    sizes : sequence of int
        Layer widths ``(d, h_1, ..., h_k, C)``.
    batch_size : int
        Rows of every mini-batch (work buffers are allocated for it once).
    lr : float
        SGD step size.
    seed : int
        Seed of the initial weights (He normal for hidden layers, Glorot
        uniform for the output layer, zero biases).
    dtype : numpy dtype
        Of weights, activations and gradients.
    """

    def __init__(self, sizes, batch_size: int, lr: float, seed: int, dtype=np.float64) -> None:
        rng = np.random.default_rng(seed)
        self.lr = lr
        shapes = list(zip(sizes[:-1], sizes[1:], strict=True))
        self.W, self.b = [], []
        for layer, (fan_in, fan_out) in enumerate(shapes):
            if layer < len(shapes) - 1:
                W = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
            else:
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                W = rng.uniform(-limit, limit, size=(fan_in, fan_out))
            self.W.append(W.astype(dtype))
            self.b.append(np.zeros(fan_out, dtype))
        m = batch_size
        self.acts = [np.empty((m, h), dtype) for h in sizes[1:-1]]
        self.dacts = [np.empty((m, h), dtype) for h in sizes[1:-1]]
        self.masks = [np.empty((m, h), bool) for h in sizes[1:-1]]
        self.logits = np.empty((m, sizes[-1]), dtype)
        self.sums = np.empty(m, dtype)
        self.rows = np.arange(m)
        self.gW = [np.empty_like(W) for W in self.W]
        self.gb = [np.empty_like(b) for b in self.b]

    @property
    def n_params(self) -> int:
        return sum(W.size + b.size for W, b in zip(self.W, self.b, strict=True))

    def loss_and_grad(self, X: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy on the batch; leaves the gradient in ``gW``/``gb``."""
        a = X
        for W, b, z in zip(self.W[:-1], self.b[:-1], self.acts, strict=True):
            np.matmul(a, W, out=z)
            z += b
            np.maximum(z, 0.0, out=z)
            a = z
        Z = self.logits
        np.matmul(a, self.W[-1], out=Z)
        Z += self.b[-1]
        Z -= Z.max(axis=1, keepdims=True)
        z_true = Z[self.rows, y]  # shifted logit of the true class (a copy)
        np.exp(Z, out=Z)
        s = Z.sum(axis=1, out=self.sums)
        loss = float(np.log(s).sum() - z_true.sum()) / len(y)
        Z /= s[:, None]  # softmax
        Z[self.rows, y] -= 1.0
        Z *= 1.0 / len(y)  # dLoss/dZ
        dZ = Z
        for layer in range(len(self.W) - 1, -1, -1):
            a_in = X if layer == 0 else self.acts[layer - 1]
            np.matmul(a_in.T, dZ, out=self.gW[layer])
            dZ.sum(axis=0, out=self.gb[layer])
            if layer == 0:
                break
            dA = self.dacts[layer - 1]
            np.matmul(dZ, self.W[layer].T, out=dA)
            np.greater(self.acts[layer - 1], 0.0, out=self.masks[layer - 1])
            dA *= self.masks[layer - 1]
            dZ = dA
        return loss

    def step(self, X: np.ndarray, y: np.ndarray) -> float:
        """One SGD step ``W -= lr * g`` on a batch; returns the batch loss."""
        loss = self.loss_and_grad(X, y)
        for p, g in zip(self.W + self.b, self.gW + self.gb, strict=True):
            g *= self.lr
            p -= g
        return loss

    def loss(self, X: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy on any number of rows (allocates; not for the hot loop)."""
        a = X
        for W, b in zip(self.W[:-1], self.b[:-1], strict=True):
            a = np.maximum(a @ W + b, 0.0)
        Z = a @ self.W[-1] + self.b[-1]
        Z -= Z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(Z).sum(axis=1)) - Z[np.arange(len(y)), y]))

    def flat_params(self) -> np.ndarray:
        """Parameters in dasgd's layout (all weights, then all biases), for checks only."""
        return np.concatenate([W.ravel() for W in self.W] + self.b)

    def flat_grad(self) -> np.ndarray:
        return np.concatenate([g.ravel() for g in self.gW] + self.gb)


def train_loop(net: PlainMLP, X, y, batch_size: int, steps: int, seed: int) -> float:
    """``steps`` SGD steps over shuffled full mini-batches; returns the mean loss."""
    rng = np.random.default_rng(seed)
    batches_per_epoch = len(y) // batch_size
    perm, k = rng.permutation(len(y)), 0
    loss_sum = 0.0
    for _ in range(steps):
        if k == batches_per_epoch:
            perm, k = rng.permutation(len(y)), 0
        idx = perm[k * batch_size : (k + 1) * batch_size]
        k += 1
        loss_sum += net.step(X[idx], y[idx])
    return loss_sum / steps


# ---------------------------------------------------------------------------
# the three competitors, one repetition each


def run_config(hidden, batch_size: int, steps: int, lr: float) -> RunConfig:
    return RunConfig(
        n_nodes=1,
        model=ModelConfig(name="mlp", hidden=tuple(hidden), dtype="float64"),
        train=TrainConfig(optimizer="sgd", lr=lr, batch_size=batch_size, steps=steps, seed=0),
    )


def time_loop(ds, hidden, args, steps: int, seed: int) -> dict:
    sizes = (ds.n_features, *hidden, ds.n_classes)
    net = PlainMLP(sizes, args.batch_size, args.lr, seed=seed)
    t0, c0 = time.perf_counter(), time.thread_time()
    mean_loss = train_loop(net, ds.X_train, ds.y_train, args.batch_size, steps, seed + 1)
    seconds, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
    return {
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "cpu_s": cpu_s,
        "mean_loss": mean_loss,
        "final_train_loss": net.loss(ds.X_train, ds.y_train),
    }


def make_driver(config: RunConfig, ds, work: Path, tag: str):
    """A lone node's machine and driver, its ipc inbox bound and its log open (as node_main does)."""
    driver = in_process_driver(
        config,
        0,
        shard=(ds.X_train, ds.y_train),
        n_features=ds.n_features,
        n_classes=ds.n_classes,
        bind=f"ipc://{work}/{tag}",
        log_path=work / f"{tag}.jsonl",
    )
    driver.transport.connect({})
    return driver


def time_node(ds, hidden, args, steps: int, work: Path, tag: str) -> dict:
    driver = make_driver(run_config(hidden, args.batch_size, steps, args.lr), ds, work, tag)
    machine = driver.machine
    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        driver.run()
        seconds, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        if not driver.drained or machine.step != steps:
            raise RuntimeError(f"the node stopped at step {machine.step} of {steps}")
        loss = machine.model.loss(machine.params, ds.X_train, ds.y_train)
    finally:
        close_driver(driver, linger_s=0.0)
    return {
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "cpu_s": cpu_s,
        "final_train_loss": loss,
    }


def time_cli(hidden, args, steps: int, work: Path, tag: str) -> dict:
    """``dasgd run -n 1`` as a child process; wall time of the whole command."""
    out_dir = work / f"cli-{tag}"
    cmd = [
        sys.executable,
        "-m",
        "dasgd",
        "run",
        "-n",
        "1",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--hidden",
        ",".join(map(str, hidden)),
        "--dtype",
        "float64",
        "--optimizer",
        "sgd",
        "--lr",
        str(args.lr),
        "--batch-size",
        str(args.batch_size),
        "--steps",
        str(steps),
        "--out-dir",
        str(out_dir),
        "--run-id",
        "run",
        "--timeout-s",
        str(CLI_TIMEOUT_S),
        "-q",
    ]
    env = {**os.environ, **THREAD_ENV}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=CLI_TIMEOUT_S + 30)
    finally:
        stop_child(proc)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"dasgd run exited with {proc.returncode}:\n{output.decode(errors='replace')[-2000:]}"
        )
    train_s = None
    summary = out_dir / "run" / "summary.json"
    if summary.exists():
        train_s = _find_number(json.loads(summary.read_text()), "train_s")
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"seconds": seconds, "steps_per_s": steps / seconds, "node_train_s": train_s}


def _find_number(obj, key: str):
    """First numeric value of ``key`` anywhere in a JSON document (None if absent)."""
    if isinstance(obj, dict):
        if isinstance(obj.get(key), int | float):
            return obj[key]
        obj = list(obj.values())
    if isinstance(obj, list):
        for item in obj:
            found = _find_number(item, key)
            if found is not None:
                return found
    return None


def stop_child(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM the child's process group, wait, then SIGKILL; always reaps."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=grace_s)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


# ---------------------------------------------------------------------------
# checks and explanations (untimed)


def gradient_check(ds, hidden, batch_size: int) -> float:
    """Max |loop gradient - dasgd.ml.models.MLP gradient| on one batch, same parameters."""
    net = PlainMLP((ds.n_features, *hidden, ds.n_classes), batch_size, 0.1, seed=3)
    model = build_model("mlp", ds.n_features, ds.n_classes, hidden=tuple(hidden))
    if net.n_params != model.n_params:
        raise RuntimeError(f"loop has {net.n_params} parameters, dasgd's mlp {model.n_params}")
    X, y = ds.X_train[:batch_size], ds.y_train[:batch_size]
    loss = net.loss_and_grad(X, y)
    ref_loss, ref_grad = model.loss_and_grad(net.flat_params(), X, y)
    scale = max(1.0, float(np.abs(ref_grad).max()))
    err = max(float(np.abs(net.flat_grad() - ref_grad).max()) / scale, abs(loss - ref_loss))
    if err > 1e-9:
        raise RuntimeError(f"the loop's gradient differs from dasgd's mlp by {err:.2e}")
    return err


#: step_breakdown entries that together make one step of Driver.run (no overlaps)
NODE_STAGES = (
    "advance: model.loss_and_grad (batch gathered)",
    "advance: optimizer.update(grad)",
    "advance: the rest (model and optimizer stubbed)",
    "driver: _receive_all() (nothing waiting)",
    "driver: loop checks (stop, has_pending, clock, interval, _evaluate)",
)


class _StubModel:
    """Stands in for the model and the optimizer: no numerics, so advance()'s own work shows."""

    def __init__(self, n_params: int, dtype) -> None:
        self.n_params = n_params
        self.change = np.zeros(n_params, dtype)

    def loss_and_grad(self, params, X, y, out=None):
        return 0.5, out

    def update(self, grad, lr=None):
        return self.change


def step_breakdown(ds, hidden, args, work: Path) -> dict:
    """Per-step cost of what Driver.run does around the gradient (microseconds, best of 5).

    The stages are the lines of one iteration of :meth:`Driver.run` for a node
    that never waits (``wait is CONTINUE``): the machine's ``advance()`` (a
    whole local step: the gradient, the update and the rest, timed on a twin
    node whose model and optimizer are stubs), the driver's ``_receive_all()``
    and its per-step checks. ``node: advance()`` times whole steps for
    comparison; the loop's step is timed on the same batch.
    """
    # nodes with steps to spare: every advance() below is one whole local step
    config = run_config(hidden, args.batch_size, 10**9, args.lr)
    driver = make_driver(config, ds, work, "breakdown")
    stubbed = make_driver(config, ds, work, "breakdown-stubbed")
    try:
        machine = driver.machine
        transport = driver.transport
        stub = _StubModel(machine.n_params, machine.dtype)
        stubbed.machine.model = stubbed.machine.optimizer = stub
        for _ in range(50):  # warm buffers and caches
            machine.advance(time.monotonic())
            stubbed.machine.advance(time.monotonic())
        idx = machine.sampler.next_batch()
        Xb, yb = machine.X[idx], machine.y[idx]
        grad, params = machine._grad, machine.params
        net = PlainMLP((ds.n_features, *hidden, ds.n_classes), args.batch_size, args.lr, 0)
        log_every_s = config.log_interval_s

        def step(m):
            def advance():
                sends, wait = m.advance(
                    time.monotonic(), work_s=0.0, backlog_msgs=0, backlog_bytes=0
                )
                if sends or wait is not CONTINUE:
                    raise RuntimeError(f"advance() returned {wait!r} with {len(sends)} sends")

            return advance

        def loop_checks():
            # Driver.run's per-step lines besides advance() and _receive_all() (slowdown off)
            driver._check_stop()
            if transport.has_pending:
                transport.flush()
            now = time.monotonic()  # the other of the two clock reads is advance()'s argument
            if now - driver._interval_t >= log_every_s:
                raise RuntimeError("an interval record fell due inside the breakdown")
            driver._evaluate(now)

        driver._interval_t = math.inf  # no interval record falls due
        items = {
            "loop: X[idx] + loss_and_grad + W -= lr*g": lambda: net.step(ds.X_train[idx], yb),
            "node: advance() (one whole step)": step(machine),
            "advance: model.loss_and_grad (batch gathered)": lambda: machine.model.loss_and_grad(
                params, Xb, yb, out=grad
            ),
            "advance: optimizer.update(grad)": lambda: machine.optimizer.update(grad),
            "advance: the rest (model and optimizer stubbed)": step(stubbed.machine),
            "  of which sampler.next_batch()": machine.sampler.next_batch,
            "  of which X[idx], y[idx]": lambda: (machine.X[idx], machine.y[idx]),
            "  of which params += u": lambda: np.add(params, stub.change, out=params),
            "  of which protocol.read_model() + local_step()": lambda: (
                machine.protocol.read_model(),
                machine.protocol.local_step(),
            ),
            "driver: _receive_all() (nothing waiting)": driver._receive_all,
            "driver: loop checks (stop, has_pending, clock, interval, _evaluate)": loop_checks,
        }
        out = {}
        for name, fn in items.items():  # ~50 ms per timing
            number = max(20, min(2000, int(0.05 / max(1e-6, _once(fn)))))
            out[name] = min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6
        return out
    finally:
        close_driver(driver, linger_s=0.0)
        close_driver(stubbed, linger_s=0.0)


def _once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------
# driver


def bench_config(ds, hidden, steps: int, args, work: Path) -> dict:
    names = ["loop", "node"] + ([] if args.no_cli or args.cli_reps < 1 else ["cli"])
    tag = "x".join(map(str, hidden))

    def run(name: str, n_steps: int, rep: int) -> dict:
        if name == "loop":
            return time_loop(ds, hidden, args, n_steps, seed=0)
        if name == "node":
            return time_node(ds, hidden, args, n_steps, work, f"node-{tag}-{rep}")
        return time_cli(hidden, args, n_steps, work, f"{tag}-{rep}")

    grad_err = gradient_check(ds, hidden, args.batch_size)
    n_params = build_model("mlp", ds.n_features, ds.n_classes, hidden=tuple(hidden)).n_params
    print(
        f"\nMLP {ds.n_features}-{'-'.join(map(str, hidden))}-{ds.n_classes}: {n_params} parameters "
        f"(float64), batch {args.batch_size}, {steps} steps per repetition, {args.reps} "
        f"repetitions; loop gradient = dasgd's to {grad_err:.1e}"
    )
    warm = max(20, steps // 10)
    for name in ("loop", "node"):  # warm-up, not recorded
        run(name, warm, -1)
    raw: dict[str, list[dict]] = {name: [] for name in names}
    for rep in range(args.reps):
        # loop and node back to back, in alternating order; the cli run after them
        order = ["loop", "node"] if rep % 2 == 0 else ["node", "loop"]
        if "cli" in names and rep < args.cli_reps:
            order.append("cli")
        for name in order:
            raw[name].append(run(name, steps, rep))
        line = "  ".join(f"{n} {raw[n][-1]['steps_per_s']:7.0f}" for n in order)
        print(f"  rep {rep + 1}/{args.reps}: steps/s  {line}")
    rates = {name: [r["steps_per_s"] for r in raw[name]] for name in names}
    if "cli" in raw and all(r["node_train_s"] for r in raw["cli"]):
        rates["cli-train"] = [steps / r["node_train_s"] for r in raw["cli"]]
    paired = [n / lo for n, lo in zip(rates["node"], rates["loop"], strict=True)]
    # the same ratio on the main thread's CPU time: time the process was descheduled
    # (other jobs on a shared machine) is excluded
    paired_cpu = [lo["cpu_s"] / n["cpu_s"] for n, lo in zip(raw["node"], raw["loop"], strict=True)]
    result = {
        "hidden": list(hidden),
        "n_params": n_params,
        "steps": steps,
        "gradient_max_abs_diff": grad_err,
        "steps_per_s": {name: summarize(values) for name, values in rates.items()},
        "ratio_node_over_loop": statistics.median(rates["node"]) / statistics.median(rates["loop"]),
        "paired_ratio_node_over_loop": summarize(paired),
        "paired_cpu_ratio_node_over_loop": summarize(paired_cpu),
        "final_train_loss": {
            name: statistics.median(r["final_train_loss"] for r in raw[name])
            for name in ("loop", "node")
        },
        "raw": raw,
    }
    final = result["final_train_loss"]
    print(
        f"  training loss on all {ds.n_train} samples after {steps} steps (median): "
        f"loop {final['loop']:.4f}, node {final['node']:.4f}"
    )
    if args.breakdown:
        result["step_breakdown_us"] = step_breakdown(ds, hidden, args, work)
    return result


def bench_events_cost(ds, args, work: Path) -> dict:
    """Cost of the per-event binary logs: a lone softmax node at b = 1, events on and off.

    Target (issue 8): events on run at >= EVENTS_TARGET of events off, paired
    repetitions in alternating order, as the node/loop comparison.
    """
    steps = args.events_steps

    def once(record: bool, rep: int) -> tuple[float, float]:
        config = RunConfig(
            n_nodes=1,
            model=ModelConfig(name="softmax", dtype="float64"),
            train=TrainConfig(
                optimizer="sgd", lr=args.lr, batch_size=args.batch_size, steps=steps, seed=0
            ),
            record_events=record,
        )
        driver = make_driver(config, ds, work, f"events-{int(record)}-{rep}")
        try:
            t0, c0 = time.perf_counter(), time.thread_time()
            driver.run()
            seconds, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        finally:
            close_driver(driver, linger_s=0.0)
        return steps / seconds, steps / cpu_s

    once(True, -1), once(False, -1)  # warm-up
    on, off = [], []
    for rep in range(args.events_reps):
        for record in (True, False) if rep % 2 == 0 else (False, True):
            (on if record else off).append(once(record, rep))
        print(
            f"  rep {rep + 1}/{args.events_reps}: steps/s  events on {on[-1][0]:7.0f}  "
            f"off {off[-1][0]:7.0f}  (per CPU-second {on[-1][1]:7.0f} / {off[-1][1]:7.0f})"
        )
    paired = summarize([a[0] / b[0] for a, b in zip(on, off, strict=True)])
    paired_cpu = summarize([a[1] / b[1] for a, b in zip(on, off, strict=True)])
    ok = paired["median"] >= EVENTS_TARGET
    print(
        f"softmax/digits, b = 1, batch {args.batch_size}, {steps} steps: events on/off paired "
        f"{paired['median']:.3f} [{paired['min']:.3f}..{paired['max']:.3f}]  target >= "
        f"{EVENTS_TARGET}: {'MET' if ok else 'NOT MET'}; on the main thread's CPU time "
        f"{paired_cpu['median']:.3f} [{paired_cpu['min']:.3f}..{paired_cpu['max']:.3f}]"
    )
    return {
        "steps": steps,
        "steps_per_s": {
            "events_on": summarize([r[0] for r in on]),
            "events_off": summarize([r[0] for r in off]),
        },
        "paired_ratio_on_over_off": paired,
        "paired_cpu_ratio_on_over_off": paired_cpu,
        "target": EVENTS_TARGET,
        "met": ok,
    }


# ---------------------------------------------------------------------------
# PyTorch: a torch model in a dasgd node against a plain torch training loop


def torch_config(name: str, args, steps: int) -> RunConfig:
    return RunConfig(
        n_nodes=1,
        model=ModelConfig(name=f"torch:torch_models:digits_{name}", dtype="float32"),
        train=TrainConfig(
            optimizer="sgd", lr=args.lr, batch_size=args.batch_size, steps=steps, seed=0
        ),
    )


def torch_loop(name: str, ds, args, steps: int):
    """The plain loop: returns (steps/s, CPU seconds of this thread, final parameters, float32)."""
    import torch
    import torch_models

    from dasgd.ml.data import BatchSampler

    torch.manual_seed(0)  # the start TorchModel.init_params(seed=0) gives
    net, loss_fn = torch_models.MODELS[name]()
    opt = torch.optim.SGD(net.parameters(), lr=args.lr)
    X = torch.from_numpy(ds.X_train.astype(np.float32))
    y = torch.from_numpy(ds.y_train)
    sampler = BatchSampler(len(ds.y_train), args.batch_size, seed=1)  # node 0's: seed + 1
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(steps):
        idx = torch.from_numpy(sampler.next_batch().copy())
        opt.zero_grad()
        loss_fn(net(X[idx]), y[idx]).backward()
        opt.step()
    seconds, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
    flat = torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy().copy()
    return steps / seconds, cpu_s, flat


def torch_node(name: str, ds, args, steps: int, work: Path, tag: str):
    """A lone dasgd node with the torch model: returns (steps/s, CPU seconds, final parameters)."""
    driver = make_driver(torch_config(name, args, steps), ds, work, tag)
    try:
        t0, c0 = time.perf_counter(), time.thread_time()
        driver.run()
        seconds, cpu_s = time.perf_counter() - t0, time.thread_time() - c0
        if not driver.drained or driver.machine.step != steps:
            raise RuntimeError(f"the node stopped at step {driver.machine.step} of {steps}")
        return steps / seconds, cpu_s, driver.machine.params.copy()
    finally:
        close_driver(driver, linger_s=0.0)


def bench_torch(ds, args, work: Path) -> dict | None:
    """Target (issue 11): torch-node steps/s >= TORCH_TARGET x torch-loop's, paired repetitions."""
    try:
        import torch
    except ImportError:
        print("\nPyTorch: skipped (torch is not installed: pip install -e '.[torch]')")
        return None
    torch.set_num_threads(1)
    print(f"\nPyTorch {torch.__version__}, 1 thread: a torch model in a dasgd node vs a plain loop")
    results = {}
    for name in args.torch_models:
        steps = args.torch_steps
        # same model, same batches: 50 steps from the same start end at the same parameters
        a = torch_loop(name, ds, args, 50)[-1]
        b = torch_node(name, ds, args, 50, work, f"torch-{name}-check")[-1]
        diff = float(np.abs(a - b).max() / max(1e-12, np.abs(a).max()))
        print(
            f"  {name}: {a.size} parameters (float32), batch {args.batch_size}; after 50 steps the "
            f"loop's and the node's parameters differ by {diff:.1e} (relative max)"
        )
        torch_loop(name, ds, args, max(20, steps // 10))  # warm-up
        torch_node(name, ds, args, max(20, steps // 10), work, f"torch-{name}-warm")
        loop, node, loop_cpu, node_cpu = [], [], [], []
        for rep in range(args.reps):
            for who in ("loop", "node") if rep % 2 == 0 else ("node", "loop"):
                if who == "loop":
                    rate, cpu_s, _ = torch_loop(name, ds, args, steps)
                    loop.append(rate)
                    loop_cpu.append(cpu_s)
                else:
                    rate, cpu_s, _ = torch_node(name, ds, args, steps, work, f"torch-{name}-{rep}")
                    node.append(rate)
                    node_cpu.append(cpu_s)
            print(
                f"  rep {rep + 1}/{args.reps}: steps/s  loop {loop[-1]:7.0f}  node {node[-1]:7.0f}"
            )
        paired = summarize([n / lo for n, lo in zip(node, loop, strict=True)])
        # steps per CPU-second of this thread: time descheduled by other jobs excluded
        paired_cpu = summarize([lo / n for n, lo in zip(node_cpu, loop_cpu, strict=True)])
        ok = paired["median"] >= TORCH_TARGET
        results[name] = {
            "n_params": int(a.size),
            "steps": steps,
            "check_max_rel_diff_after_50_steps": diff,
            "steps_per_s": {"torch-loop": summarize(loop), "torch-node": summarize(node)},
            "ratio_node_over_loop": statistics.median(node) / statistics.median(loop),
            "paired_ratio_node_over_loop": paired,
            "paired_cpu_ratio_node_over_loop": paired_cpu,
            "target": TORCH_TARGET,
            "met": ok,
        }
    print(
        "\nsteps/s (median); paired = median of per-repetition node/loop (back to back; the "
        "verdict uses it); cpu = the same on CPU time of the thread"
    )
    print(
        f"{'model':>6} {'params':>8} {'loop steps/s':>13} {'node steps/s':>13} "
        f"{'paired [min..max]':>22} {'cpu':>6}  target"
    )
    for name, r in results.items():
        p = r["paired_ratio_node_over_loop"]
        print(
            f"{name:>6} {r['n_params']:>8} {r['steps_per_s']['torch-loop']['median']:>13.0f} "
            f"{r['steps_per_s']['torch-node']['median']:>13.0f} "
            f"{p['median']:>7.3f} [{p['min']:.3f}..{p['max']:.3f}] "
            f"{r['paired_cpu_ratio_node_over_loop']['median']:>6.3f}  paired >= {TORCH_TARGET}: "
            f"{'MET' if r['met'] else 'NOT MET'}"
        )
    return results


def print_table(results: list[dict]) -> None:
    print(
        "\nsteps/s (median [min..max]); ratio = median(competitor) / median(loop); "
        "paired = median of per-repetition node/loop (the two ran back to back: the verdict "
        "uses it);\ncli = `dasgd run -n 1`, steps / wall "
        "time of the whole command; cli-train = steps / train_s of that run's node"
    )
    head = f"{'model':>16} {'params':>9} {'competitor':>10} {'steps/s':>9} {'range':>17}"
    head += f" {'ratio':>7} {'paired [min..max]':>20}  target"
    print(head)
    print("-" * len(head))
    for res in results:
        model = "-".join(map(str, res["hidden"]))
        for name, s in res["steps_per_s"].items():
            ratio = paired = verdict = ""
            if name == "node":
                p = res["paired_ratio_node_over_loop"]
                ratio = f"{res['ratio_node_over_loop']:.3f}"
                paired = f"{p['median']:.3f} [{p['min']:.3f}..{p['max']:.3f}]"
                ok = p["median"] >= TARGET_RATIO
                verdict = f"paired >= {TARGET_RATIO}: {'MET' if ok else 'NOT MET'}"
            elif name in ("cli", "cli-train"):
                ratio = f"{s['median'] / res['steps_per_s']['loop']['median']:.3f}"
                paired = "(whole command)" if name == "cli" else "(node's train_s)"
            rng = f"[{s['min']:.0f}..{s['max']:.0f}]"
            print(
                f"{model:>16} {res['n_params']:>9} {name:>10} {s['median']:>9.0f} {rng:>17}"
                f" {ratio:>7} {paired:>20}  {verdict}"
            )
    print(
        "\nthe same paired ratio on CPU time of the main thread (steps per CPU-second; "
        "time descheduled by other jobs is excluded: on a busy machine it is the steadier figure):"
    )
    for res in results:
        p = res["paired_cpu_ratio_node_over_loop"]
        print(
            f"{'-'.join(map(str, res['hidden'])):>16} {res['n_params']:>9}  node/loop on CPU time "
            f"{p['median']:.3f} [{p['min']:.3f}..{p['max']:.3f}]"
        )
    for res in results:
        if "step_breakdown_us" in res:
            print(f"\nper-step cost, MLP hidden {res['hidden']} (us, best of 5 timeit runs):")
            costs = res["step_breakdown_us"]
            width = max(map(len, costs))
            for name, us in costs.items():
                print(f"  {name:<{width}} {us:9.1f}")
            node_sum = sum(costs[k] for k in NODE_STAGES)
            loop_us = 1e6 / res["steps_per_s"]["loop"]["median"]
            node_us = 1e6 / res["steps_per_s"]["node"]["median"]
            print(
                f"  node stages summed: {node_sum:.0f} us; measured per step in Driver.run(): "
                f"{node_us:.0f} us (loop: {loop_us:.0f} us);\n  the difference is run()'s "
                "own Python, the drain and effects the isolated timings do not see (caches, threads)"
            )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--hidden",
        nargs="+",
        default=["256", "1024,1024"],
        help="MLP hidden sizes, one spec per model, e.g. 256 1024,1024 (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=[2000, 80],
        help="steps per repetition, one per --hidden spec (default: %(default)s)",
    )
    p.add_argument("--reps", type=int, default=7, help="repetitions (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD step size (default: %(default)s)")
    p.add_argument("--no-cli", action="store_true", help="skip the `dasgd run -n 1` row")
    p.add_argument(
        "--cli-reps",
        type=int,
        default=3,
        help="repetitions of the `dasgd run -n 1` row (default: %(default)s)",
    )
    p.add_argument(
        "--no-breakdown", dest="breakdown", action="store_false", help="skip the per-step costs"
    )
    p.add_argument(
        "--events-steps",
        type=int,
        default=20000,
        help="steps of the events on/off comparison (softmax, b = 1); 0 skips it "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--events-reps",
        type=int,
        default=11,
        help="repetitions of the events on/off comparison (default: %(default)s)",
    )
    p.add_argument(
        "--torch-steps",
        type=int,
        default=1000,
        help="steps per repetition of the PyTorch section; 0 skips it (default: %(default)s)",
    )
    p.add_argument(
        "--torch-models",
        nargs="+",
        choices=("cnn", "mlp"),
        default=["cnn", "mlp"],
        help="PyTorch models of benchmarks/torch_models.py (default: %(default)s)",
    )
    p.add_argument(
        "--only",
        choices=("numpy", "events", "torch"),
        default=None,
        help="run one section: the numpy MLP, the event logs' cost or PyTorch (default: all)",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = p.parse_args(argv)
    if len(args.steps) != len(args.hidden):
        p.error(f"--steps needs one value per --hidden spec ({len(args.hidden)})")
    try:
        args.hidden = [tuple(int(h) for h in spec.split(",")) for spec in args.hidden]
    except ValueError:
        p.error(f"--hidden specs are comma-separated integers, got {args.hidden}")
    if args.reps < 1 or min(args.steps) < 1 or args.batch_size < 1:
        p.error("--reps, --steps and --batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    ds = load_dataset("digits")
    print(
        f"digits: {ds.n_train} training samples x {ds.n_features} features, {ds.n_classes} "
        f"classes, standardized; {os.cpu_count()} cores; {THREAD_ENV}"
    )
    work = Path(tempfile.mkdtemp(prefix="dbn-", dir="/tmp"))
    try:
        results = []
        if args.only in (None, "numpy"):
            results = [
                bench_config(ds, hidden, steps, args, work)
                for hidden, steps in zip(args.hidden, args.steps, strict=True)
            ]
        events_cost = None
        if args.events_steps and args.only in (None, "events"):
            print("\nper-event binary logs (gradient events) on against off:")
            events_cost = bench_events_cost(ds, args, work)
        torch_results = None
        if args.torch_steps and args.only in (None, "torch"):
            torch_results = bench_torch(ds, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if results:
        print_table(results)
    load_after = report_load(load_before)
    doc = {
        "benchmark": "bench_single_node",
        "target": f"node steps/s >= {TARGET_RATIO} x plain numpy loop steps/s",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "env": THREAD_ENV,
        "load_average_1min": {"before": load_before, "after": load_after},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dataset": {"name": "digits", "n_train": ds.n_train, "n_features": ds.n_features},
        "results": results,
        "events_cost": events_cost,
        "torch": torch_results,
        "wall_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {args.out} ({doc['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
