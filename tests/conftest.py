"""Shared fixtures: deadlines instead of sleeps, and no child process outlives a test."""

import os
import time

import psutil
import pytest

# node processes and these tests share 2 cores: keep BLAS single-threaded
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def sequential_mlp_sgd(X, y, *, steps: int, lr: float, batch_size: int, seed: int, hidden):
    """The reference for a 1-node run: plain SGD on an MLP over node 0's batches.

    Node i samples with ``seed + 1 + i``; the model starts at ``init_params(seed)``.
    Returns the final parameters, shape (n_params,), float64.
    """
    from dasgd.ml.data import BatchSampler
    from dasgd.ml.models import build_model

    model = build_model("mlp", X.shape[1], 10, hidden=hidden)
    x = model.init_params(seed=seed)
    sampler = BatchSampler(len(y), batch_size, seed=seed + 1)
    for _ in range(steps):
        idx = sampler.next_batch()
        _, g = model.loss_and_grad(x, X[idx], y[idx])
        x = x - lr * g
    return x


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.02):
    """Poll ``condition()`` until it returns a truthy value; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


@pytest.fixture(autouse=True)
def no_leftover_children():
    """Fail a test that leaves child processes behind (and kill them)."""
    yield
    me = psutil.Process()
    children = [c for c in me.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
    if children:
        for c in children:
            c.kill()
        psutil.wait_procs(children, timeout=5)
        pytest.fail(f"test left child processes behind: {[c.pid for c in children]}")
