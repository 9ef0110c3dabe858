"""The Python API: :func:`run`, :func:`simulate` and :func:`load_run`, each giving a :class:`RunResult`.

Options are named as the command's flags (``nodes=4, topology="ring",
dataset="digits", lr=0.05, send_every=4, no_events=True`` ...), so a command
line translates word for word. A dataset may also be given as arrays
(``dataset=(X, y)`` or ``(X, y, X_test, y_test)`` or a dict with those keys),
and a PyTorch model as a spec ``"torch:MODULE:FACTORY"`` or as the factory
function itself (defined in an importable module: node processes import it by
name).

Usable from a notebook (progress bars by ``tqdm.auto``) and from any thread
(signal handlers are installed only in the main thread; the node processes
are stopped and reaped on every path out of :func:`run`).

Example::

    import dasgd

    result = dasgd.run(nodes=4, topology="ring", dataset="digits", steps=200, quiet=True)
    result.summary["run"]["average_model_test_accuracy"]
    result.intervals          # pandas DataFrame (lists of dicts without pandas)
    result.models.shape       # (4, n_params): every node's final model

This module imports nothing heavy at import time: ``import dasgd`` stays cheap
for the node processes (DESIGN.md §9).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from .errors import ConfigError

__all__ = ["RunResult", "load_run", "run", "simulate"]


def _split_dataset(options: dict) -> tuple[dict, dict | None]:
    """Take arrays out of ``options["dataset"]``; return the options and the arrays (or None)."""
    data = options.get("dataset")
    if data is None or isinstance(data, str) or hasattr(data, "__fspath__"):
        return options, None
    if isinstance(data, dict):
        arrays = dict(data)
    elif isinstance(data, tuple | list) and len(data) in (2, 4):
        keys = ("X", "y", "X_test", "y_test")
        arrays = dict(zip(keys, data, strict=False))
    else:
        raise ConfigError(
            "dataset must be a name or path, (X, y), (X, y, X_test, y_test) or a dict with "
            f"keys X, y[, X_test, y_test], got {type(data).__name__}"
            + (f" of length {len(data)}" if isinstance(data, tuple | list) else "")
        )
    options = dict(options)
    options["dataset"] = "arrays"
    return options, arrays


def _prepare(command: str, config, options: dict):
    from .cli import config_from_args, options_namespace, run_config_and_hosts
    from .ml.models import check_model_name

    options, arrays = _split_dataset(options)
    args = options_namespace(command, config, options)
    if arrays is None and args.dataset == "arrays":
        raise ConfigError(
            "dataset 'arrays' names data given as arrays: pass dataset=(X, y) or a name or path"
        )
    hosts = None
    if command == "run":  # `dasgd run`'s several-host options; not a scheduler's environment
        # (a notebook on a SLURM allocation is not a rank of a dasgd run unless told so)
        run_config, hosts = run_config_and_hosts(args, environ={})
    else:
        run_config = config_from_args(args)
    check_model_name(run_config.model.name)
    if args.tensorboard:
        from .analysis.export import check_tensorboard

        check_tensorboard()
    return args, run_config, arrays, hosts


def run(config=None, **options) -> RunResult:
    """Train with one process per node (``dasgd run``) and return the result.

    Parameters
    ----------
    config : RunConfig, dict or path-like, optional
        Where to start from: a :class:`~dasgd.config.RunConfig`, its dict, or
        a finished run's ``config.json`` (or its run directory) to replay it
        (a new run directory is made). ``options`` override it.
    **options
        The flags of ``dasgd run`` with ``_`` for ``-``: ``nodes``,
        ``topology``, ``algorithm``, ``dataset``, ``model``, ``hidden``,
        ``lr``, ``batch_size``, ``steps``, ``epochs``, ``send_every``,
        ``seed``, ``slowdown``, ``latency``, ``compute_time``, ``partition``, ``out_dir``,
        ``run_id``, ``no_events``, ``quiet`` (no progress bar),
        ``tensorboard`` (a directory), and for a run over several hosts
        ``nhosts``, ``host_rank``, ``nproc_per_host``, ``rdzv_endpoint`` ...
        (``dasgd run --help`` lists them all with their defaults). Special values:

        - ``dataset``: a name or path as on the command line, or arrays:
          ``(X, y)``, ``(X, y, X_test, y_test)`` or a dict with those keys;
          ``X`` of shape (m, d) real, ``y`` of shape (m,) class labels. They
          are split (without a test part) and standardized as files are, and
          saved to ``RUN_DIR/data/arrays.npz`` so that the run can be replayed.
        - ``model``: a name, ``"torch:MODULE:FACTORY"``, or the factory itself
          (a function defined at the top level of an importable module).

    Returns
    -------
    RunResult

    Raises
    ------
    ConfigError
        An unknown option (the message lists the valid ones) or a bad value,
        before any process starts.
    NodeFailed
        A node failed, missed the ready deadline, or the run passed
        ``timeout_s``; every process has been stopped.
    KeyboardInterrupt
        After stopping every process.
    """
    from .runtime.launch import run as launch_run

    args, run_config, arrays, hosts = _prepare("run", config, options)
    run_dir, summary = launch_run(run_config, progress=not args.quiet, hosts=hosts, arrays=arrays)
    return _finish(args, run_dir, summary)


def simulate(config=None, *, costs=None, **options) -> RunResult:
    """Simulate a run in virtual time (``dasgd simulate``) and return the result.

    Parameters
    ----------
    config : RunConfig, dict or path-like, optional
        As for :func:`run`.
    costs : dasgd.sim.SimCosts, optional
        Modelled host costs (default: measured on the project's machines).
    **options
        As for :func:`run`, plus ``bandwidth`` (bits/s: ``"10G"``, ``1e9``),
        ``message_bytes`` and ``kill``: nodes whose process dies, and when,
        as ``"NODE@T_S"`` strings or ``(node, t_s)`` pairs in virtual
        seconds, e.g. ``kill=[(3, 0.5)]`` or ``kill=["3@0.5", "5@1.2"]``
        (``dasgd simulate --kill``; the config's ``sim.kills``).

    Returns
    -------
    RunResult
        Times are virtual seconds; ``summary["run"]["simulated"]`` is True.

    Raises
    ------
    ConfigError
        As for :func:`run`, or a simulation too large for this machine's memory.
    SimulationStalled
        A node never finished, or the simulation passed ``timeout_s`` of real time.
    """
    from .cli import sim_config_from_args
    from .sim import simulate as sim_simulate

    if "bandwidth" in options and not isinstance(options["bandwidth"], str):
        options["bandwidth"] = repr(float(options["bandwidth"]))
    args, run_config, arrays, _ = _prepare("simulate", config, options)
    run_config = run_config.replace(sim=sim_config_from_args(args))
    run_dir, summary = sim_simulate(run_config, costs=costs, progress=not args.quiet, arrays=arrays)
    return _finish(args, run_dir, summary)


def _finish(args, run_dir: Path, summary: dict) -> RunResult:
    if args.tensorboard:
        from .analysis.export import write_tensorboard

        write_tensorboard(run_dir, args.tensorboard)
    return RunResult(Path(run_dir), summary)


def load_run(path) -> RunResult:
    """The :class:`RunResult` of a run directory written earlier (by the CLI or the API).

    Parameters
    ----------
    path : path-like
        ``runs/<run-id>``.

    Raises
    ------
    ConfigError
        If ``path`` is not a run directory or its ``summary.json`` is missing
        (an interrupted run: its logs are still readable with
        :func:`dasgd.analysis.export.run_tables`).
    """
    from .rundir import read_summary

    run_dir = Path(path)
    return RunResult(run_dir, read_summary(run_dir))


def _frame(table):
    """A pandas DataFrame of a column table, or a list of row dicts without pandas."""
    try:
        import pandas as pd
    except ImportError:
        columns = list(table)
        lists = [table[c].tolist() for c in columns]
        return [dict(zip(columns, row, strict=True)) for row in zip(*lists, strict=True)]
    return pd.DataFrame(table)


@dataclass(frozen=True, eq=False)
class RunResult:
    """A finished run: its summary, its directory and, read on first access, its records and models.

    Record tables are pandas DataFrames when pandas is installed (the
    ``notebook`` extra), else lists of dicts (one per row). Columns: see
    :func:`dasgd.analysis.export.run_tables` (``process``, ``node``, ``t_s``
    in seconds on the run clock, ``step``, then the record's fields).

    Attributes
    ----------
    run_dir : Path
        The run directory (``config.json``, logs, models, ``summary.json``).
    summary : dict
        The content of ``summary.json`` (README: "summary.json").
    """

    run_dir: Path
    summary: dict = field(repr=False)

    def __repr__(self) -> str:
        run = self.summary.get("run", {})
        acc = run.get("average_model_test_accuracy")
        shown = f", average model test accuracy {acc:.4f}" if isinstance(acc, float) else ""
        return (
            f"RunResult({str(self.run_dir)!r}: {run.get('algorithm')}, "
            f"{run.get('n_nodes')} nodes, {run.get('steps')} steps{shown})"
        )

    @cached_property
    def config(self):
        """The resolved :class:`~dasgd.config.RunConfig` (from ``config.json``)."""
        from .cli import load_config

        return load_config(self.run_dir / "config.json")

    @cached_property
    def _tables(self) -> dict:
        from .analysis.export import run_tables

        return run_tables(self.run_dir)

    def _table(self, name: str):
        table = self._tables.get(name)
        return None if table is None else _frame(table)

    @property
    def intervals(self):
        """Interval records of every process (loss, steps/s, staleness, bytes... per log interval)."""
        return self._table("intervals")

    @property
    def evals(self):
        """Evaluations of every process's model on the test split (``test_loss``, ``test_accuracy``)."""
        return self._table("evals")

    @property
    def finals(self):
        """One row per process: its ``final`` record (nested fields as JSON text)."""
        return self._table("finals")

    @property
    def gradients(self):
        """Every gradient (``GRADIENT_DTYPE`` columns), or None if the run recorded no events."""
        return self._table("gradients")

    @property
    def applies(self):
        """Every delta application (``APPLY_DTYPE`` columns; DASGD), or None if not recorded."""
        return self._table("applies")

    @property
    def nodes(self):
        """The summary's per-node rows (accuracy, steps, staleness...) as a table."""
        rows = self.summary.get("nodes", [])
        try:
            import pandas as pd
        except ImportError:
            return rows
        return pd.DataFrame(rows)

    @cached_property
    def models(self) -> np.ndarray:
        """The final models: every node's (DASGD), or the server's (PS baselines).

        Returns
        -------
        ndarray of shape (n_nodes, n_params) for DASGD, (1, n_params) for
        ``ps-async``/``ps-sync`` (workers keep no model of their own); the
        run's dtype. Row i is node i's model; a node that died
        (``summary["run"]["failed_nodes"]``) left none: its row is NaN.
        """
        if (self.run_dir / "server.npy").is_file():
            return np.load(self.run_dir / "server.npy")[None, :]
        n = self.summary["run"]["n_nodes"]
        failed = set(self.summary["run"].get("failed_nodes", ()))
        alive = {i: np.load(self.run_dir / f"node-{i}.npy") for i in range(n) if i not in failed}
        if not failed:
            return np.stack(list(alive.values()))
        first = next(iter(alive.values()))
        models = np.full((n, first.size), np.nan, dtype=first.dtype)
        for i, params in alive.items():
            models[i] = params
        return models

    @property
    def average_model(self) -> np.ndarray:
        """The mean of :attr:`models` over the nodes alive at the end, shape (n_params,).

        The model the summary's ``average_model_*`` evaluate.
        """
        models = self.models
        failed = sorted(self.summary["run"].get("failed_nodes", ()))
        if failed and models.shape[0] > 1:  # a DASGD run that lost nodes: survivors only
            models = np.delete(models, failed, axis=0)
        return models.mean(axis=0).astype(models.dtype, copy=False)

    @cached_property
    def x0(self) -> np.ndarray:
        """The common initial model, shape (n_params,)."""
        return np.load(self.run_dir / "x0.npy")

    def model(self):
        """The run's :class:`~dasgd.ml.models.Model` (e.g. a TorchModel), to evaluate its vectors.

        Its inputs are the run's standardized features (``RUN_DIR/data/test-X.npy``).
        """
        from .build import build_run_model

        meta = json.loads((self.run_dir / "data" / "meta.json").read_text())
        return build_run_model(self.config, meta["n_features"], meta["n_classes"])
