"""Version vectors and the staleness statistics every dasgd run logs.

Definitions are those of ALGORITHMS.md §2 (a dasgd choice: Tosi & Theobald,
arXiv 2309.03754, name "average staleness between models" S_avg and S_max but
leave the exact measure open). Unit: local SGD steps.

- Version vector ``V_i`` (int64, shape (n_nodes,)): ``V_i[k]`` is the number of
  origin-k local steps contained in node i's model.
- Apply staleness of a delta from origin j applied at node i:
  ``sum_{k != j} max(0, V_i[k] - base[k])`` where ``base`` is the origin's vector
  when the delta's window opened (:func:`apply_staleness`).
- Model lag of node i behind neighbour u, on receipt of a message from u that
  brings something new (a delta or fin not seen before, or ``complete``;
  duplicates are dropped before any work of size n):
  ``sum_k max(0, V_u[k] - V_i[k])``; the "loose" variant is
  ``sum_k |V_u[k] - V_i[k]|`` (:func:`model_lag`).

This module is pure: no clock, socket or file.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["RunningStat", "StalenessTracker", "apply_staleness", "model_lag"]


def apply_staleness(vv: np.ndarray, base_vv: np.ndarray, origin: int) -> int:
    """Apply staleness in steps of a delta from ``origin`` against vector ``vv``.

    Parameters
    ----------
    vv : ndarray of shape (n_nodes,), int64
        The receiver's version vector just before applying the delta.
    base_vv : ndarray of shape (n_nodes,), int64
        The origin's version vector when the delta's window opened.
    origin : int
        The delta's origin; its own entry is excluded.

    Returns
    -------
    int
        Number of updates the receiver has that the model which computed the
        delta lacked (ALGORITHMS.md §2).
    """
    d = np.subtract(vv, base_vv)
    # sum max(d, 0) = (sum |d| + sum d) / 2, in the vectors' own dtype (fast; the caller's
    # dtype holds the run's total steps, see NodeProtocol's vv_dtype)
    total = int(d.sum(dtype=d.dtype)) - int(d[origin])
    loose = int(np.abs(d, out=d).sum(dtype=d.dtype)) - int(d[origin])
    return (loose + total) // 2


def model_lag(sender_vv: np.ndarray, vv: np.ndarray) -> tuple[int, int]:
    """How far a receiver's model is behind a neighbour's, in steps.

    Parameters
    ----------
    sender_vv, vv : ndarray of shape (n_nodes,), int64
        The neighbour's vector carried by its message, and the receiver's.

    Returns
    -------
    lag_steps : int
        ``sum_k max(0, sender_vv[k] - vv[k])``.
    loose_lag_steps : int
        ``sum_k |sender_vv[k] - vv[k]|`` (symmetric difference).
    """
    d = np.subtract(sender_vv, vv)
    total = int(d.sum(dtype=d.dtype))
    loose = int(np.abs(d, out=d).sum(dtype=d.dtype))
    return (loose + total) // 2, loose  # max(d, 0) = (|d| + d) / 2


class RunningStat:
    """Count, mean and maximum of a stream of non-negative integers (steps)."""

    __slots__ = ("count", "total", "max")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0
        self.max = 0

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value

    @property
    def mean(self) -> float:
        """Mean of the values so far; NaN when there are none."""
        return self.total / self.count if self.count else math.nan

    def as_dict(self, prefix: str) -> dict:
        """``{prefix_avg_steps, prefix_max_steps, prefix_count}``; avg is None when empty."""
        return {
            f"{prefix}_avg_steps": self.total / self.count if self.count else None,
            f"{prefix}_max_steps": self.max if self.count else None,
            f"{prefix}_count": self.count,
        }


class StalenessTracker:
    """Staleness and lag statistics of one node: whole run, per edge, per interval.

    Parameters
    ----------
    node_id : int
        The node that applies deltas.
    neighbours : sequence of int
        Its neighbours; per-edge statistics are kept for each incoming edge
        (neighbour -> node_id).
    n_nodes : int
        Number of nodes; per-origin statistics are kept for each.
    """

    def __init__(self, node_id: int, neighbours, n_nodes: int) -> None:
        self.node_id = node_id
        self.staleness = RunningStat()
        self.lag = RunningStat()
        self.loose_lag = RunningStat()
        self.edge_staleness = {u: RunningStat() for u in neighbours}
        self.edge_lag = {u: RunningStat() for u in neighbours}
        # per origin as arrays, not objects: a simulation holds n of these trackers
        self.origin_count = np.zeros(n_nodes, dtype=np.int64)
        self.origin_total = np.zeros(n_nodes, dtype=np.int64)
        self.origin_max = np.zeros(n_nodes, dtype=np.int64)
        self._interval_staleness = RunningStat()
        self._interval_lag = RunningStat()

    def add_edge(self, sender: int) -> None:
        """Keep per-edge statistics for a new incoming edge (a repair link); idempotent."""
        self.edge_staleness.setdefault(sender, RunningStat())
        self.edge_lag.setdefault(sender, RunningStat())

    def record_apply(self, origin: int, sender: int, staleness_steps: int) -> None:
        """Record the apply staleness of a delta from ``origin`` relayed by ``sender``."""
        self.staleness.add(staleness_steps)
        self.edge_staleness[sender].add(staleness_steps)
        self.origin_count[origin] += 1
        self.origin_total[origin] += staleness_steps
        if staleness_steps > self.origin_max[origin]:
            self.origin_max[origin] = staleness_steps
        self._interval_staleness.add(staleness_steps)

    def record_lag(self, sender: int, lag_steps: int, loose_lag_steps: int) -> None:
        """Record the model lag measured on a message from neighbour ``sender``."""
        self.lag.add(lag_steps)
        self.loose_lag.add(loose_lag_steps)
        self.edge_lag[sender].add(lag_steps)
        self._interval_lag.add(lag_steps)

    def interval(self) -> dict:
        """Statistics since the previous call (for the interval log records), then reset."""
        out = {
            **self._interval_staleness.as_dict("staleness_apply"),
            **self._interval_lag.as_dict("lag"),
        }
        self._interval_staleness = RunningStat()
        self._interval_lag = RunningStat()
        return out

    def summary(self, *, per_origin: bool = True) -> dict:
        """Whole-run statistics: overall, per incoming edge and (if ``per_origin``) per origin."""
        out = {
            **self.staleness.as_dict("staleness_apply"),
            **self.lag.as_dict("lag"),
            **self.loose_lag.as_dict("loose_lag"),
            "edges": [
                {
                    "src": u,
                    "dst": self.node_id,
                    **self.edge_staleness[u].as_dict("staleness_apply"),
                    **self.edge_lag[u].as_dict("lag"),
                }
                for u in sorted(self.edge_staleness)
            ],
        }
        if not per_origin:
            return out
        out["origins"] = [
            {
                "origin": k,
                "staleness_apply_avg_steps": int(total) / int(count) if count else None,
                "staleness_apply_max_steps": int(mx) if count else None,
                "staleness_apply_count": int(count),
            }
            for k, (count, total, mx) in enumerate(
                zip(self.origin_count, self.origin_total, self.origin_max, strict=True)
            )
            if k != self.node_id
        ]
        return out
