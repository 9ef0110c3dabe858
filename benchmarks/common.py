"""What the benchmark scripts share: statistics over repetitions and a description of the machine.

The scripts run as ``python benchmarks/<script>.py``, so this module is
imported from the scripts' own directory.
"""

from __future__ import annotations

import os
import platform
import statistics

import numpy as np


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


def close_node(node, linger_s: float = 1.0) -> None:
    """Close an in-process benchmark node's transport and log."""
    if node.transport is not None:
        node.transport.close(linger_s=linger_s)
    if node.log is not None:
        node.log.close()
