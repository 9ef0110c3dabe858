"""What the benchmark scripts share: statistics over repetitions, a description of the machine,
loss curves and time to target from a run directory, in-process drivers.

The scripts run as ``python benchmarks/<script>.py``, so this module is
imported from the scripts' own directory.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from dasgd.analysis.events import EventRecorder
from dasgd.analysis.metrics import EventLog, read_events
from dasgd.build import build_machine
from dasgd.core import wire
from dasgd.runtime.node import BufferPool, Driver, queue_limit_msgs
from dasgd.runtime.transport import Transport


def summarize(values) -> dict:
    """Median, min, max and the values of a list of repetitions."""
    values = list(values)
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def machine_info(**extra) -> dict:
    """Cores, platform, Python and numpy versions (plus ``extra``), for the results JSON."""
    return {
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        **extra,
    }


def report_load(load_before: float) -> float:
    """Print the 1-minute load average before/after a run (busy machines give noisy figures); return after."""
    load_after = os.getloadavg()[0]
    print(
        f"\n1-minute load average before / after: {load_before:.2f} / {load_after:.2f}"
        + ("  (the machine was busy: figures are noisy)" if load_before > 1.0 else "")
    )
    return load_after


def loss_curve(run_dir, algorithm: str, n: int) -> list[tuple[float, int, float]]:
    """(t_s, gradients so far, test loss) of a run over time, from its ``eval`` records.

    Parameter-server runs (``ps-async``, ``ps-sync``): the server's model;
    gradients so far are the server's step (ps-async: gradients applied) or
    its rounds times n (ps-sync). DASGD: the mean over nodes of each node's
    latest test loss (a point once every node has evaluated), with the sum of
    the steps those evaluations were taken at. ``t_s`` is each process's own
    training clock (virtual seconds in a simulation).
    """
    run_dir = Path(run_dir)
    if algorithm != "dasgd":  # the server's step is its version: gradients (async) or rounds (sync)
        per_step = n if algorithm == "ps-sync" else 1
        return [
            (r["t_s"], r["step"] * per_step, r["test_loss"])
            for r in read_events(run_dir / "server.jsonl", "eval")
        ]
    events = sorted(
        (r["t_s"], r["node"], r["step"], r["test_loss"])
        for i in range(n)
        for r in read_events(run_dir / f"node-{i}.jsonl", "eval")
    )
    latest_loss, latest_step, curve = {}, {}, []
    for t, node, step, loss in events:
        latest_loss[node], latest_step[node] = loss, step
        if len(latest_loss) == n:
            curve.append((t, sum(latest_step.values()), float(np.mean(list(latest_loss.values())))))
    return curve


def to_target(curve, target: float) -> tuple[float | None, int | None]:
    """(t_s, gradients) of the first point of a :func:`loss_curve` at or below ``target``; (None, None) if never."""
    for t, grads, loss in curve:
        if loss is not None and loss <= target:
            return t, grads
    return None, None


def nominal_s(spec: str) -> float:
    """The mean emulated seconds per gradient of a ``--compute-time`` spec (nan for none)."""
    from dasgd.core.emulation import parse_compute_time

    p = parse_compute_time(spec)
    return {
        "none": 0.0,
        "constant": p.get("seconds"),
        "exponential": p.get("mean"),
        "uniform": (p.get("low", 0) + p.get("high", 0)) / 2,
        "lognormal": p.get("median", 0) * np.exp(p.get("sigma", 0) ** 2 / 2),
    }[p["kind"]] or float("nan")


def in_process_driver(
    config,
    node_id: int,
    *,
    shard,
    n_features: int,
    n_classes: int,
    bind: str,
    log_path,
    neighbours=(),
):
    """A node's real state machine and process driver, built in this process as ``node_main`` builds them.

    The machine comes from :func:`dasgd.build.build_machine` (a
    :class:`~dasgd.core.node.DasgdNode` for a DASGD config), its open-delta
    buffers from a :class:`~dasgd.runtime.node.BufferPool`, its inbox is bound
    with the high-water mark and message limit ``node_main`` uses, and its
    event log is open with ``t0`` on :func:`time.monotonic`'s clock. The
    caller connects the transport (``driver.transport.connect``) and closes
    everything with :func:`close_driver`. No evaluator: nothing is evaluated.
    With ``config.record_events`` (the default, as in real runs) the machine
    records its gradient and apply events next to the log.

    Parameters
    ----------
    config : dasgd.config.RunConfig
    node_id : int
    shard : tuple of (ndarray of shape (m, n_features), ndarray of shape (m,))
        The node's training data.
    n_features, n_classes : int
    bind : str
        Inbox address (``ipc://...`` or ``tcp://...``).
    log_path : path-like
        The node's JSONL event log.
    neighbours : iterable of int

    Returns
    -------
    dasgd.runtime.node.Driver
        ``driver.machine`` is the state machine.
    """
    machine = build_machine(
        config,
        node_id,
        n_features=n_features,
        n_classes=n_classes,
        shard=shard,
        neighbours=list(neighbours),
    )
    pool = BufferPool(machine.n_params, machine.dtype)
    machine.new_buffer = pool.take  # buffers ZeroMQ has released, as node_main does
    message_bytes = machine.n_params * machine.dtype.itemsize
    curve = None
    if config.transport.curve_keys:  # CurveZMQ as node_main sets it up
        from dasgd.runtime.security import CurveKeys

        curve = CurveKeys(config.transport.curve_keys)
    transport = Transport(
        node_id,
        bind,
        curve=curve,
        hwm_msgs=queue_limit_msgs(config.transport, message_bytes),
        max_message_bytes=message_bytes + wire.MAX_HEADER_BYTES + 4096,
    )
    log = None
    try:
        transport.start()
        t0 = time.monotonic()
        log = EventLog(log_path, node_id, flush_interval_s=config.log_interval_s, t0=t0).open()
        if config.record_events:  # the binary event files next to the log, as node_main writes
            machine.events = EventRecorder(
                Path(log_path).parent, Path(log_path).stem, node_id, t0=t0
            )
        driver = Driver(machine, config, transport, log, pool)
        return driver
    except BaseException:
        transport.close(linger_s=0.0)
        if log is not None:
            log.close()
        raise


def close_driver(driver, linger_s: float = 1.0) -> None:
    """Close an in-process benchmark driver's transport, log and event files."""
    driver.transport.close(linger_s=linger_s)
    driver.log.close()
    if driver.events is not None:
        driver.events.close()
