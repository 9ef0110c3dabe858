"""Where a run's configuration meets the core: build the state machine of each node.

The process runtime (:mod:`dasgd.runtime.node`) and the simulator
(:mod:`dasgd.sim`) both call :func:`build_machine`, so a node, worker or
server is configured identically whichever drives it.
"""

from __future__ import annotations

import numpy as np

from .config import RunConfig
from .core.emulation import ComputeTime
from .core.node import DasgdNode
from .core.ps import PSServer, PSWorker
from .ml.data import BatchSampler, local_steps
from .ml.models import build_model
from .ml.optim import build_optimizer, delay_adaptive_lr

__all__ = ["build_machine", "build_recorder", "build_run_model", "is_server"]


def is_server(config: RunConfig, node_id: int) -> bool:
    """True for the parameter server's id (``n_nodes``) in a PS run."""
    return config.algorithm != "dasgd" and node_id == config.n_nodes


def apply_events_plan(config: RunConfig, shard_sizes) -> tuple[bool, str | None]:
    """Whether the run's DASGD nodes record apply events, and if not, why (see ``record_applies``)."""
    from .analysis.events import record_applies

    if not config.record_events or config.algorithm != "dasgd":
        return False, None
    steps = [local_steps(config.train, size) for size in shard_sizes]
    return record_applies(config.n_nodes, steps, config.train.send_every)


def build_recorder(
    config: RunConfig, node_id: int, machine, run_dir, shard_sizes, *, t0: float, chunk_rows=None
):
    """Attach an event recorder to ``machine`` (a DASGD node or the PS server) if the run records events.

    Returns
    -------
    dasgd.analysis.events.EventRecorder or None
        None for PS workers (the server records their gradients) and runs
        with ``record_events`` off.
    """
    from .analysis.events import CHUNK_ROWS, EventRecorder
    from .rundir import process_name

    if not config.record_events or isinstance(machine, PSWorker):
        return None
    applies, _ = apply_events_plan(config, shard_sizes)
    recorder = EventRecorder(
        run_dir,
        process_name(config, node_id),
        node_id,
        t0=t0,
        applies=applies,
        chunk_rows=chunk_rows or CHUNK_ROWS,
    )
    machine.events = recorder
    return recorder


def build_run_model(config: RunConfig, n_features: int, n_classes: int):
    """The run's model (``dasgd.ml.models.Model``) for data of that shape."""
    mc = config.model
    return build_model(
        mc.name, n_features, n_classes, hidden=mc.hidden, activation=mc.activation, l2=mc.l2
    )


def build_machine(
    config: RunConfig,
    node_id: int,
    *,
    n_features: int,
    n_classes: int,
    shard=None,
    shard_sizes=None,
    neighbours=(),
    adjacency=None,
    slowdown_factor: float = 1.0,
    new_buffer=None,
    vv_dtype=np.int64,
    lag_every: int = 1,
    model=None,
    delta_store_bytes: int = 0,
):
    """The core state machine of ``node_id`` in a run of ``config``.

    Parameters
    ----------
    config : RunConfig
        With ``n_nodes`` resolved.
    node_id : int
        0..n-1 (DASGD node or PS worker) or n (the PS server).
    n_features, n_classes : int
        Shape of the data.
    shard : tuple of (ndarray of shape (m, n_features), ndarray of shape (m,) int64)
        The node's or worker's training shard (not for the server).
    shard_sizes : list of int
        Every worker's shard size (the server's gradient budget).
    neighbours : iterable of int
        DASGD: the node's neighbours.
    adjacency : mapping of int to set of int, optional
        DASGD: the whole topology, for the pruned relay.
    slowdown_factor : float
        The node's straggler factor (>= 1).
    new_buffer : callable, optional
        Buffers handed to the driver with deltas and gradients (see
        :class:`~dasgd.core.node.DasgdNode`).
    vv_dtype : numpy integer dtype
        Of the DASGD version vectors.
    lag_every : int
        DASGD: measure the model lag on one in this many new messages.
    model : Model, optional
        Shared by all nodes of a simulation (models hold no state); built if None.

    Returns
    -------
    DasgdNode, PSWorker or PSServer
    """
    tc, mc = config.train, config.model
    dtype = np.dtype(mc.dtype)
    model = model or build_run_model(config, n_features, n_classes)
    x0 = model.init_params(seed=tc.seed, dtype=dtype)
    n = config.n_nodes
    if is_server(config, node_id):
        sizes = list(shard_sizes)
        if config.algorithm == "ps-sync":
            budget = min(local_steps(tc, m) for m in sizes)
        else:
            budget = sum(local_steps(tc, m) for m in sizes)
        concurrency = tc.delay_concurrency or n
        return PSServer(
            n,
            x0=x0,
            optimizer=build_optimizer(tc.server_optimizer, model.n_params, tc.lr, dtype=dtype),
            algorithm=config.algorithm,
            budget=budget,
            lr_for_delay=lambda tau: delay_adaptive_lr(tc.lr, tau, concurrency, rule=tc.delay_rule),
        )
    X, y = shard
    X = np.ascontiguousarray(X, dtype=dtype)
    y = np.asarray(y, dtype=np.int64)
    sampler = BatchSampler(len(y), tc.batch_size, seed=tc.seed + 1 + node_id)
    compute_time = None
    if config.emulation.compute_time:
        compute_time = ComputeTime(
            config.emulation.compute_time, slowdown_factor, seed=(tc.seed, node_id)
        )
    if config.algorithm != "dasgd":
        return PSWorker(
            node_id,
            n,
            model=model,
            X=X,
            y=y,
            sampler=sampler,
            dtype=dtype,
            compute_time=compute_time,
            slowdown_factor=slowdown_factor,
            new_buffer=new_buffer,
        )
    delay_scale = None
    if tc.delay_rule != "none":
        concurrency = tc.delay_concurrency or n

        def delay_scale(staleness_steps: int) -> float:
            return delay_adaptive_lr(1.0, staleness_steps, concurrency, rule=tc.delay_rule)

    trc = config.transport
    return DasgdNode(
        node_id,
        neighbours,
        n,
        model=model,
        X=X,
        y=y,
        x0=x0,
        optimizer=build_optimizer(
            tc.optimizer, model.n_params, tc.lr, momentum=tc.momentum, dtype=dtype
        ),
        sampler=sampler,
        total_steps=local_steps(tc, len(y)),
        send_every=tc.send_every,
        compute_time=compute_time,
        slowdown_factor=slowdown_factor,
        delay_rule=tc.delay_rule,
        delay_scale=delay_scale,
        max_lead_steps=tc.max_lead_steps,
        max_backlog_msgs=trc.max_backlog_msgs,
        max_backlog_bytes=trc.queue_bytes,
        adjacency=adjacency,
        check_finite=trc.check_finite,
        new_buffer=new_buffer,
        vv_dtype=vv_dtype,
        lag_every=lag_every,
        delta_store_bytes=delta_store_bytes,
    )
