"""A run directory as tables: CSV, Parquet and TensorBoard scalars (``dasgd export``).

:func:`run_tables` reads a finished (or interrupted) run directory into
column tables, one per kind of record, every row labelled with the process it
came from:

==============  =========================================  =========================================
table           source                                     one row per
==============  =========================================  =========================================
``intervals``   ``interval`` records of ``*.jsonl``        log interval of a process (loss,
                                                           steps/s, staleness over the interval...)
``evals``       ``eval`` records of ``*.jsonl``            evaluation of a process's model
``finals``      ``final`` records of ``*.jsonl``           process (nested fields as JSON text)
``gradients``   ``*.gradients.bin``                        gradient (``GRADIENT_DTYPE``)
``applies``     ``node-<i>.applies.bin``                   delta application (``APPLY_DTYPE``)
==============  =========================================  =========================================

The binary tables exist only where the run recorded events (not with
``--no-events``; apply events only for DASGD). Every table has a ``process``
column (``node-<i>`` or ``server``); times are ``t_s`` seconds on the run
clock. A table is a dict of equal-length columns (numpy arrays), so it turns
into a pandas DataFrame with ``pandas.DataFrame(table)`` and into a pyarrow
Table with ``pyarrow.table(table)``.

:func:`export_run` writes the tables as CSV (standard library) or Parquet
(pyarrow, the ``parquet`` extra); :func:`write_tensorboard` writes TensorBoard
scalars (tensorboardX, the ``tensorboard`` extra).
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .events import APPLY_DTYPE, GRADIENT_DTYPE, read_columns
from .metrics import read_events

__all__ = [
    "FORMATS",
    "TABLES",
    "check_tensorboard",
    "export_run",
    "run_tables",
    "write_tensorboard",
]

#: Tables :func:`run_tables` can hold, in this order.
TABLES = ("intervals", "evals", "finals", "gradients", "applies")
#: Formats of :func:`export_run`.
FORMATS = ("csv", "parquet", "tensorboard")

_LEADING = ("process", "node", "kind", "t_s", "step")
_PROCESS = re.compile(r"^(node-\d+|server)$")


def _processes(run_dir: Path) -> list[str]:
    """Process names of a run directory in node order, the server last."""
    names = [p.stem for p in run_dir.glob("*.jsonl") if _PROCESS.match(p.stem)]
    return sorted(names, key=lambda s: (s == "server", int(s[5:]) if s != "server" else 0))


def _check_run_dir(run_dir) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not (run_dir / "config.json").is_file():
        raise ConfigError(
            f"{str(run_dir)!r} is not a run directory (no config.json): give runs/<run-id>"
        )
    return run_dir


def _column(values: list) -> np.ndarray:
    """One column from per-row values (None where a row lacks the field)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        if len(present) == len(values):
            return np.array(values, dtype=bool)
        return np.array(values, dtype=object)
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        if len(present) == len(values) and all(isinstance(v, int) for v in present):
            return np.array(values, dtype=np.int64)
        return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    # strings, and nested values as JSON text
    return np.array(
        [v if v is None or isinstance(v, str) else json.dumps(v) for v in values], dtype=object
    )


def _records_table(records: list[dict]) -> dict[str, np.ndarray]:
    keys: list[str] = [k for k in _LEADING if any(k in r for r in records)]
    seen = set(keys)
    for record in records:
        for key in record:
            if key not in seen:
                seen.add(key)
                keys.append(key)
    return {key: _column([r.get(key) for r in records]) for key in keys}


def _binary_table(arrays: list[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    rows = np.concatenate([a for _, a in arrays]) if arrays else np.zeros(0)
    table = {"process": np.array([p for p, a in arrays for _ in range(len(a))], dtype=object)}
    for name in rows.dtype.names or ():
        table[name] = np.ascontiguousarray(rows[name])
    return table


def run_tables(run_dir, tables=TABLES) -> dict[str, dict[str, np.ndarray]]:
    """The per-process time series and event logs of a run directory as column tables.

    Parameters
    ----------
    run_dir : path-like
        A run directory (``runs/<run-id>``), finished or not.
    tables : iterable of str, default all of :data:`TABLES`
        Which tables to read.

    Returns
    -------
    dict
        Table name -> ``{column: ndarray}`` with columns of equal length. JSONL
        tables have ``process``, ``node``, ``kind``, ``t_s``, ``step`` first,
        then every field any record of that kind has (int64, float64 with NaN
        where a record lacks a number, bool, or object: strings, and nested
        values as JSON text, None where missing). ``gradients`` and
        ``applies`` have ``process`` and the fields of
        :data:`~dasgd.analysis.events.GRADIENT_DTYPE` /
        :data:`~dasgd.analysis.events.APPLY_DTYPE` (their dtypes); they are
        absent when the run recorded no such events.

    Raises
    ------
    ConfigError
        If ``run_dir`` is not a run directory or a table name is unknown.
    """
    run_dir = _check_run_dir(run_dir)
    tables = tuple(tables)
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ConfigError(f"unknown table(s) {unknown}: choose from {', '.join(TABLES)}")
    processes = _processes(run_dir)
    out: dict[str, dict[str, np.ndarray]] = {}
    kinds = {"intervals": "interval", "evals": "eval", "finals": "final"}
    wanted_kinds = {kinds[t] for t in tables if t in kinds}
    if wanted_kinds:
        by_kind: dict[str, list[dict]] = {k: [] for k in wanted_kinds}
        for name in processes:
            for record in read_events(run_dir / f"{name}.jsonl"):
                kind = record.get("kind")
                if kind in by_kind:
                    by_kind[kind].append({"process": name, **record})
        for table, kind in kinds.items():
            if table in tables:
                out[table] = _records_table(by_kind[kind])
    for table, suffix, dtype in (
        ("gradients", "gradients", GRADIENT_DTYPE),
        ("applies", "applies", APPLY_DTYPE),
    ):
        if table not in tables:
            continue
        found = [
            (name, read_columns(run_dir / f"{name}.{suffix}.bin", dtype))
            for name in processes
            if (run_dir / f"{name}.{suffix}.bin").exists()
        ]
        if found:
            out[table] = _binary_table(found)
    return out


def _write_csv(table: dict[str, np.ndarray], path: Path) -> None:
    columns = list(table)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        lists = [table[c].tolist() for c in columns]
        for row in zip(*lists, strict=True):
            writer.writerow(
                ["" if v is None or (isinstance(v, float) and v != v) else v for v in row]
            )


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ConfigError(
            "--format parquet needs pyarrow, which is not installed: pip install 'dasgd[parquet]' "
            "(or use --format csv)"
        ) from None
    return pyarrow


def _write_parquet(table: dict[str, np.ndarray], path: Path) -> None:
    pa = _pyarrow()
    arrays = {}
    for name, column in table.items():
        arrays[name] = pa.array(column.tolist() if column.dtype == object else column)
    pa.parquet.write_table(pa.table(arrays), path)


def export_run(run_dir, fmt: str = "csv", out_dir=None) -> list[Path]:
    """Write a run's tables (:func:`run_tables`) as CSV or Parquet files, or TensorBoard scalars.

    Parameters
    ----------
    run_dir : path-like
        A run directory.
    fmt : {"csv", "parquet", "tensorboard"}, default "csv"
        ``csv``: one ``<table>.csv`` per table (header row; empty cells where a
        record lacks a field). ``parquet``: one ``<table>.parquet`` per table
        (needs pyarrow). ``tensorboard``: event files as
        :func:`write_tensorboard` writes them.
    out_dir : path-like, optional
        Where to write; default ``RUN_DIR/export`` (``RUN_DIR/tensorboard``
        for TensorBoard). Created if missing; files of the same name are
        overwritten.

    Returns
    -------
    list of Path
        The files written (TensorBoard: the run's log directory).

    Raises
    ------
    ConfigError
        Not a run directory, an unknown format, an output directory that
        cannot be created, or the library a format needs is not installed.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    run_dir = _check_run_dir(run_dir)
    if fmt == "tensorboard":
        return [write_tensorboard(run_dir, out_dir or run_dir / "tensorboard")]
    if fmt == "parquet":
        _pyarrow()  # fail before writing anything
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {str(out_dir)!r}: {exc.strerror} (-o)") from None
    written = []
    for name, table in run_tables(run_dir).items():
        path = out_dir / f"{name}.{fmt}"
        (_write_csv if fmt == "csv" else _write_parquet)(table, path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------
# TensorBoard

#: interval-record fields written as scalars, and their TensorBoard tags.
_INTERVAL_SCALARS = {
    "loss": "train/loss",
    "steps_per_s": "train/steps_per_s",
    "staleness_apply_avg_steps": "staleness/apply_avg_steps",
    "staleness_apply_max_steps": "staleness/apply_max_steps",
    "lag_avg_steps": "staleness/lag_avg_steps",
    "lag_max_steps": "staleness/lag_max_steps",
    "tau_avg_steps": "staleness/tau_avg_steps",
    "tau_max_steps": "staleness/tau_max_steps",
    "bytes_out": "transport/bytes_out",
    "msgs_out": "transport/msgs_out",
    "duplicates": "transport/duplicates",
}
_EVAL_SCALARS = {"test_loss": "test/loss", "test_accuracy": "test/accuracy"}


def _summary_writer():
    """tensorboardX's SummaryWriter, else torch's; ConfigError naming the extra if neither imports."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "TensorBoard output needs tensorboardX (or torch with tensorboard), which is not "
                "installed: pip install 'dasgd[tensorboard]'"
            ) from None
    return SummaryWriter


def check_tensorboard() -> None:
    """Raise :class:`~dasgd.errors.ConfigError` now if TensorBoard output cannot be written."""
    _summary_writer()


def write_tensorboard(run_dir, logdir) -> Path:
    """TensorBoard scalars of a run: one TensorBoard run per process, and the average model.

    Layout: ``LOGDIR/<run-id>/<process>/`` for each process (``node-<i>``,
    ``server``), so TensorBoard overlays the nodes; ``LOGDIR/<run-id>/average/``
    for the average model's curves from ``analysis.json``. The step axis is the
    process's own local steps (the server: its version); wall time is the
    run's start (``t0_unix_s``) plus ``t_s``, so TensorBoard's relative time
    axis is the run clock.

    Tags: ``train/loss``, ``train/steps_per_s``, ``staleness/apply_avg_steps``,
    ``staleness/apply_max_steps``, ``staleness/lag_avg_steps``,
    ``staleness/lag_max_steps`` (PS server: ``staleness/tau_avg_steps``,
    ``staleness/tau_max_steps``), ``transport/bytes_out``,
    ``transport/msgs_out``, ``transport/duplicates`` (interval records);
    ``test/loss``, ``test/accuracy`` (eval records); for ``average``, at
    every evaluation instant with the run's gradients so far as the step:
    ``test/loss``, ``test/accuracy``, ``train/grad_norm_sq``,
    ``consensus/distance_rel``.

    Parameters
    ----------
    run_dir : path-like
        A run directory.
    logdir : path-like
        TensorBoard's ``--logdir``.

    Returns
    -------
    Path
        ``LOGDIR/<run-id>``.

    Raises
    ------
    ConfigError
        Not a run directory, or neither tensorboardX nor torch's writer imports.
    """
    SummaryWriter = _summary_writer()
    run_dir = _check_run_dir(run_dir)
    root = Path(logdir) / run_dir.name
    run_t0 = None
    for name in _processes(run_dir):
        records = read_events(run_dir / f"{name}.jsonl")
        start = next((r for r in records if r.get("kind") == "start"), {})
        t0 = float(start.get("t0_unix_s", 0.0))
        run_t0 = t0 if run_t0 is None else run_t0
        writer = SummaryWriter(str(root / name))
        try:
            for record in records:
                kind = record.get("kind")
                scalars = _INTERVAL_SCALARS if kind == "interval" else None
                if kind == "eval":
                    scalars = _EVAL_SCALARS
                if scalars is None:
                    continue
                for field, tag in scalars.items():
                    value = record.get(field)
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        writer.add_scalar(
                            tag, value, global_step=record["step"], walltime=t0 + record["t_s"]
                        )
        finally:
            writer.close()
    analysis_path = run_dir / "analysis.json"
    if analysis_path.is_file():
        conv = json.loads(analysis_path.read_text()).get("convergence") or {}
        series = {
            "test/loss": conv.get("average_model_test_loss"),
            "test/accuracy": conv.get("average_model_test_accuracy"),
            "train/grad_norm_sq": conv.get("grad_norm_sq_train"),
            "consensus/distance_rel": conv.get("consensus_distance_rel"),
        }
        steps = conv.get("gradients") or []
        times = conv.get("t_s") or []
        if steps:
            writer = SummaryWriter(str(root / "average"))
            try:
                for tag, values in series.items():
                    for k, value in enumerate(values or []):
                        if value is not None and k < len(steps):
                            walltime = (run_t0 or 0.0) + times[k] if k < len(times) else None
                            writer.add_scalar(tag, value, global_step=steps[k], walltime=walltime)
            finally:
                writer.close()
    return root
