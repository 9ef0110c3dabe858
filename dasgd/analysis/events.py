"""Per-event binary logs on the run's one clock: every gradient, every delta application, model snapshots.

The JSONL logs (:mod:`dasgd.analysis.metrics`) hold interval aggregates; the
staleness measures of the decentralized-ASGD analysis need every event
(ALGORITHMS.md §2): S2 orders all gradients of the run by finish time, S3
rebuilds every node's version vector at any instant. Those go to fixed-width
binary columns, appended at every log interval and every :data:`CHUNK_ROWS`
rows (a few hundred nanoseconds per event, no JSON), readable with
:func:`numpy.fromfile`:

``node-<i>.gradients.bin`` (``server.gradients.bin`` for the parameter server), :data:`GRADIENT_DTYPE`
    One row per gradient step: ``node`` that computed it, its ``step`` (1-based
    count of that node's gradients), ``t_start_s`` (the model read; NaN where
    only the server saw it), ``t_end_s`` (the update joined a model: the
    node's own for DASGD, the server's for ps-async/ps-sync),
    ``model_gradients`` (c_g: gradients contained in the model it was
    computed on, the sum of the node's version vector at the read; the
    server's gradient count at the read for PS) and ``tau_steps``
    (Koloskova et al. 2022's delay, PS only; -1 for DASGD).
``node-<i>.applies.bin``, :data:`APPLY_DTYPE`
    One row per delta a DASGD node applied: receiving ``node``, ``origin``,
    ``sender`` (the neighbour it came from: the edge), ``seq``, ``steps`` (the
    origin's local steps it holds), ``t_s`` and ``staleness_steps`` (S1, apply
    staleness at that moment).
``node-<i>.models.bin`` / ``server.models.bin``, :func:`snapshot_dtype`
    The model at every evaluation (``t_s``, ``step``, then the parameters),
    while the file stays under :data:`SNAPSHOT_MAX_BYTES`; after that,
    ``node-<i>.sketch.bin``: a CountSketch of :data:`SKETCH_SIZE` entries of
    the model (exact copy when the model is no larger), from which consensus
    distances are estimated (relative error about sqrt(2 / SKETCH_SIZE)).

Every time is in seconds on the run's clock (:attr:`EventRecorder.t0`): the
launcher's start for a real run (each process converts with the wall clock it
was handed, so logs of all processes compare), 0 for a simulation (virtual
time). A file cut short by a killed process loses at most its last partial
row, which the readers drop.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = [
    "APPLY_EVENTS_MAX_BYTES",
    "APPLY_DTYPE",
    "GRADIENT_DTYPE",
    "SKETCH_SIZE",
    "SNAPSHOT_MAX_BYTES",
    "EventRecorder",
    "ModelSnapshots",
    "count_sketch",
    "read_columns",
    "record_applies",
    "snapshot_dtype",
]

GRADIENT_DTYPE = np.dtype(
    [
        ("node", "<i4"),
        ("step", "<i8"),
        ("t_start_s", "<f8"),
        ("t_end_s", "<f8"),
        ("model_gradients", "<i8"),
        ("tau_steps", "<i8"),
    ]
)
APPLY_DTYPE = np.dtype(
    [
        ("node", "<i4"),
        ("origin", "<i4"),
        ("sender", "<i4"),
        ("steps", "<i4"),
        ("seq", "<i8"),
        ("t_s", "<f8"),
        ("staleness_steps", "<i8"),
    ]
)
#: Rows buffered before a write (and at every flush of the log).
CHUNK_ROWS = 8192
#: Full model snapshots stop once a process's ``models.bin`` would pass this size.
SNAPSHOT_MAX_BYTES = 64 << 20
#: Entries of the CountSketch written at every evaluation.
SKETCH_SIZE = 1024
#: A DASGD run whose apply events would take more (all nodes together) records none: each of
#: its deltas is applied at n - 1 nodes, n^2 growth (a simulation of thousands of nodes).
APPLY_EVENTS_MAX_BYTES = 2 << 30


def record_applies(n_nodes: int, steps_per_node, send_every: int) -> tuple[bool, str | None]:
    """Whether a DASGD run records its apply events, and if not, why (one line).

    Parameters
    ----------
    n_nodes : int
    steps_per_node : iterable of int
        Local steps of each node.
    send_every : int
        b: local steps per delta.
    """
    deltas = sum(-(-int(s) // send_every) for s in steps_per_node)
    need = deltas * (n_nodes - 1) * APPLY_DTYPE.itemsize
    if need <= APPLY_EVENTS_MAX_BYTES:
        return True, None
    return False, (
        f"apply events not recorded: {deltas} deltas applied at {n_nodes - 1} nodes each would "
        f"take {need / 2**30:.1f} GiB (more than {APPLY_EVENTS_MAX_BYTES / 2**30:.0f} GiB); "
        "S1 is in the node logs, S3 needs the apply events"
    )


def snapshot_dtype(n_params: int, dtype) -> np.dtype:
    """Row type of ``models.bin`` (``n_params`` parameters) and ``sketch.bin`` (SKETCH entries)."""
    return np.dtype(
        [("t_s", "<f8"), ("step", "<i8"), ("x", np.dtype(dtype).newbyteorder("<"), (n_params,))]
    )


def read_columns(path, dtype) -> np.ndarray:
    """All complete rows of a binary event file (an empty array if there is none).

    Parameters
    ----------
    path : path-like
    dtype : numpy structured dtype
        :data:`GRADIENT_DTYPE`, :data:`APPLY_DTYPE` or a :func:`snapshot_dtype`.
    """
    path = Path(path)
    if not path.exists():
        return np.zeros(0, dtype)
    raw = path.read_bytes()
    rows = len(raw) // dtype.itemsize  # a partial last row (a killed writer) is dropped
    return np.frombuffer(raw, dtype=dtype, count=rows)


class _Columns:
    """Rows appended as tuples, written as one structured array per chunk.

    An existing file (a restarted node's, ``--on-node-failure restart``) is
    appended to after its partial last row, if any (the killed writer's), is cut.
    """

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = dtype
        self.rows: list[tuple] = []
        self.written = 0
        if path.exists():
            size = path.stat().st_size
            self.written = size // dtype.itemsize
            if size % dtype.itemsize:
                os.truncate(path, self.written * dtype.itemsize)

    def flush(self) -> None:
        if not self.rows:
            return
        with self.path.open("ab") as f:
            f.write(np.array(self.rows, dtype=self.dtype).tobytes())
        self.written += len(self.rows)
        self.rows.clear()


class EventRecorder:
    """Writes one process's gradient and apply events (the core machines call it).

    Parameters
    ----------
    run_dir : path-like
    name : str
        The process's file stem (``node-<i>`` or ``server``).
    node_id : int
    t0 : float
        The run clock's origin on the driver's clock: event times are written
        as ``now - t0``.
    applies : bool
        Record apply events (see :func:`record_applies`).
    chunk_rows : int
        Rows of each kind buffered before a write.

    Attributes
    ----------
    now : float
        The driver's time, set before it hands a message to the machine (apply
        events are stamped with it; the machines never read a clock).
    """

    def __init__(
        self,
        run_dir,
        name: str,
        node_id: int,
        *,
        t0: float = 0.0,
        applies: bool = True,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        run_dir = Path(run_dir)
        self.node_id = node_id
        self.record_applies = applies
        self.chunk_rows = chunk_rows
        self.t0 = t0
        self.now = t0
        self._gradients = _Columns(run_dir / f"{name}.gradients.bin", GRADIENT_DTYPE)
        self._applies = _Columns(run_dir / f"{name}.applies.bin", APPLY_DTYPE)
        self._grad_rows = self._gradients.rows
        self._apply_rows = self._applies.rows

    def gradient(self, step: int, t_start: float, t_end: float, model_gradients: int) -> None:
        """One gradient of this node: read and update times on the driver's clock, c_g."""
        rows = self._grad_rows
        t0 = self.t0
        rows.append((self.node_id, step, t_start - t0, t_end - t0, model_gradients, -1))
        if len(rows) >= self.chunk_rows:
            self._gradients.flush()

    def server_gradient(self, worker: int, step: int, model_gradients: int, tau_steps: int) -> None:
        """One gradient the parameter server received from ``worker`` at :attr:`now`, with its delay."""
        rows = self._grad_rows
        rows.append((worker, step, math.nan, self.now - self.t0, model_gradients, tau_steps))
        if len(rows) >= self.chunk_rows:
            self._gradients.flush()

    def apply(self, origin: int, sender: int, steps: int, seq: int, staleness_steps: int) -> None:
        """One delta applied at :attr:`now`."""
        if not self.record_applies:
            return
        rows = self._apply_rows
        rows.append((self.node_id, origin, sender, steps, seq, self.now - self.t0, staleness_steps))
        if len(rows) >= self.chunk_rows:
            self._applies.flush()

    @property
    def counts(self) -> dict:
        """Events recorded so far (for the ``final`` record)."""
        return {
            "gradient_events": self._gradients.written + len(self._grad_rows),
            "apply_events": self._applies.written + len(self._apply_rows),
        }

    def flush(self) -> None:
        """Write every buffered row."""
        self._gradients.flush()
        self._applies.flush()

    close = flush


def count_sketch(n_params: int, seed: int):
    """A CountSketch of a model vector into :data:`SKETCH_SIZE` entries (identity if not larger).

    Every coordinate is added, with a random sign, to one of ``SKETCH_SIZE``
    buckets; the sketch is linear, so the sketch of the mean model is the mean
    of the sketches, and |sketch(x)| estimates |x| without bias (relative
    error about sqrt(2 / SKETCH_SIZE)). Every node builds the same sketch from
    the run seed.

    Returns
    -------
    callable
        ``sketch(x) -> ndarray of shape (min(n_params, SKETCH_SIZE),), float64``.

    References
    ----------
    M. Charikar, K. Chen, M. Farach-Colton, "Finding frequent items in data
    streams", ICALP 2002 (CountSketch).
    """
    if n_params <= SKETCH_SIZE:
        return lambda x: np.asarray(x, dtype=np.float64).copy()
    rng = np.random.default_rng([seed, 0x736B6574])
    bucket = rng.integers(0, SKETCH_SIZE, n_params)
    sign = rng.choice(np.array([-1.0, 1.0]), n_params)
    return lambda x: np.bincount(bucket, weights=sign * x, minlength=SKETCH_SIZE)


class ModelSnapshots:
    """The model at every evaluation: in full while under :data:`SNAPSHOT_MAX_BYTES`, then sketched.

    Parameters
    ----------
    run_dir : path-like
    name : str
        File stem of the process.
    n_params : int
    dtype : numpy dtype
        Of the model.
    seed : int
        The run seed (the sketch is the same on every node).
    t0 : float
        Run clock origin on the driver's clock.
    """

    def __init__(self, run_dir, name: str, n_params: int, dtype, *, seed: int, t0: float = 0.0):
        run_dir = Path(run_dir)
        self.t0 = t0
        self._models = _Columns(run_dir / f"{name}.models.bin", snapshot_dtype(n_params, dtype))
        self._sketches = _Columns(
            run_dir / f"{name}.sketch.bin",
            snapshot_dtype(min(n_params, SKETCH_SIZE), np.float64),
        )
        self._sketch = count_sketch(n_params, seed)
        self._full_rows_max = max(0, SNAPSHOT_MAX_BYTES // self._models.dtype.itemsize)

    def take(self, now: float, step: int, params: np.ndarray) -> None:
        """Record the model at time ``now`` (driver's clock): in full while the budget lasts, then its sketch."""
        t_s = now - self.t0
        if self._models.written < self._full_rows_max:
            self._models.rows.append((t_s, step, params))
            self._models.flush()
        else:
            self._sketches.rows.append((t_s, step, self._sketch(params)))
            self._sketches.flush()

    def flush(self) -> None:
        """Nothing is buffered (each snapshot is written at once)."""

    close = flush
