"""What the benchmark scripts share: statistics over repetitions, a description of the machine, in-process drivers.

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
from dasgd.analysis.metrics import EventLog
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
