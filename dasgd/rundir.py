"""The run directory: one home for its layout, its preparation and its summary.

A real run (:func:`dasgd.runtime.launch.run`) and a simulation
(:func:`dasgd.sim.simulate`) write the same directory, so everything that reads
runs (``dasgd summary``, the benchmarks) works on both.

Run directory (``OUT_DIR/RUN_ID/``)::

    config.json            resolved RunConfig (n_nodes filled in)
    topology.json          the graph, node-link JSON
    x0.npy                 the common initial model
    data/meta.json         dataset, classes, shard sizes and class histograms
    data/shard-<i>-X.npy   node i's training shard (features, labels: -y.npy)
    data/test-X.npy        the test split (labels: test-y.npy)
    data/arrays.npz        the dataset as given, when it was given as arrays (Python API)
    node-<i>.jsonl         node i's event log
    node-<i>.stderr        node i's stderr (real runs; tracebacks of crashes land here)
    node-<i>.npy           node i's final model
    node-<i>.delta_sum.npy the sum of node i's own sealed deltas
    summary.json           the evaluated summary (see README.md)
"""

from __future__ import annotations

import dataclasses
import json
import socket
import uuid
from datetime import datetime
from pathlib import Path

import networkx as nx
import numpy as np

from .analysis.metrics import build_ps_summary, build_summary
from .analysis.staleness import node_fields, run_fields
from .config import RunConfig
from .errors import ConfigError

__all__ = ["ARRAYS_FILE", "prepare_run", "process_name", "write_analysis", "write_summary"]

#: File under ``data/`` holding a dataset given as arrays (``X``, ``y``[, ``X_test``, ``y_test``]).
ARRAYS_FILE = "arrays.npz"
_ARRAY_KEYS = ("X", "y", "X_test", "y_test")


def read_summary(run_dir) -> dict:
    """The ``summary.json`` of a finished run directory (``dasgd summary``, ``report``, ``load_run``).

    Raises
    ------
    ConfigError
        One line: the directory does not exist, has no ``summary.json``, or it
        is not a JSON object with a ``run`` section.
    """
    path = Path(run_dir)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ConfigError(
            f"run directory {str(run_dir)!r} {what}: give a finished run directory (it holds "
            "summary.json)"
        )
    file = path / "summary.json"
    if not file.is_file():
        raise ConfigError(
            f"no summary.json in {str(run_dir)!r}: give a finished run directory (runs/<run-id>)"
        )
    try:
        summary = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{file} is unreadable ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    if not isinstance(summary, dict):
        raise ConfigError(f"{file}: expected a JSON object, got {type(summary).__name__}")
    if not isinstance(summary.get("run"), dict):
        raise ConfigError(f"{file} is not a dasgd summary (no 'run' section)")
    return summary


def process_name(config: RunConfig, node_id: int) -> str:
    """File stem of a process's log and outputs: ``node-<i>``, or ``server`` for the parameter server."""
    return (
        "server" if config.algorithm != "dasgd" and node_id == config.n_nodes else f"node-{node_id}"
    )


def _check_ports_free(host: str, ports: list[int]) -> None:
    for node, port in enumerate(ports):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # as ZeroMQ does: a port in TIME-WAIT from an earlier run is free to bind
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                raise ConfigError(
                    f"port {port} (node {node}) on {host} is not available ({exc.strerror}): "
                    f"choose another --base-port, or 0 for any free ports"
                ) from None


def prepare_run(
    config: RunConfig,
    *,
    write_shards=True,
    check_ports: bool = True,
    arrays: dict | None = None,
) -> tuple[RunConfig, Path, dict]:
    """Resolve the topology and data, validate, and write the run directory.

    Parameters
    ----------
    config : RunConfig
        As given by the user; ``n_nodes`` may be None for a topology file.
    write_shards : bool or collection of int
        Write every node's shard (or those of the given node ids: one host's
        share of a run over several hosts) and the test split under ``data/``
        (node processes read them; the simulator keeps them in memory).
    check_ports : bool
        Check that a tcp ``--base-port`` range is free (a simulation binds nothing).
    arrays : dict, optional
        The dataset as arrays instead of ``config.data.dataset``: keys ``X``
        (m, d) and ``y`` (m,), optionally ``X_test`` and ``y_test``; split and
        standardized by :func:`dasgd.ml.data.dataset_from_arrays` with
        ``config.data``'s settings. They are saved as they were given to
        ``data/arrays.npz``, and ``config.json`` names that file as the
        dataset, so the run can be replayed (``dasgd run --config``).

    Returns
    -------
    config : RunConfig
        With ``n_nodes`` and ``run_id`` filled in (and ``data.dataset`` the
        saved arrays' path when ``arrays`` were given).
    run_dir : Path
    context : dict
        ``graph``, ``dataset``, ``shards`` (index arrays), ``model``, ``x0``
        and ``meta`` (the content of ``data/meta.json``).

    Raises
    ------
    ConfigError
        (or its subclasses TopologyError, DataError) on any bad value, before
        anything is spawned; nothing is written then.
    """
    from .core.emulation import resolve_latency, resolve_partition, resolve_slowdown
    from .ml.data import (
        class_histogram,
        dataset_from_arrays,
        load_dataset,
        shard_by_label,
        shard_iid,
    )
    from .ml.models import build_model
    from .topology import describe_topology, parse_topology, save_topology

    ps = config.algorithm != "dasgd"
    if ps:  # workers 0..n-1 around the server n; --topology does not apply
        n = config.n_nodes if config.n_nodes is not None else 4
        graph = nx.relabel_nodes(parse_topology("star", n + 1), {0: n, n: 0})
    else:
        graph = parse_topology(config.topology.spec, config.n_nodes, seed=config.topology.seed)
        n = graph.number_of_nodes()
    dc = config.data
    if arrays is not None:
        unknown = sorted(set(arrays) - set(_ARRAY_KEYS))
        if unknown or "X" not in arrays or "y" not in arrays:
            raise ConfigError(
                f"dataset arrays must have keys X, y and optionally X_test, y_test, got "
                f"{', '.join(map(str, arrays)) or 'none'}"
            )
        dataset = dataset_from_arrays(
            **{k: arrays.get(k) for k in _ARRAY_KEYS},
            name=dc.dataset,
            test_fraction=dc.test_fraction,
            seed=config.train.seed,
            standardize=dc.standardize,
        )
    else:
        dataset = load_dataset(
            dc.dataset,
            test_fraction=dc.test_fraction,
            seed=config.train.seed,
            standardize=dc.standardize,
        )
    if n > dataset.n_train:
        raise ConfigError(
            f"{n} nodes but only {dataset.n_train} training samples in {dataset.name}: use fewer nodes (-n)"
        )
    if dc.sharding == "iid":
        shards = shard_iid(dataset.n_train, n, seed=config.train.seed)
    else:
        shards = shard_by_label(dataset.y_train, n, dc.dirichlet_alpha, seed=config.train.seed)
    mc = config.model
    model = build_model(
        mc.name,
        dataset.n_features,
        dataset.n_classes,
        hidden=mc.hidden,
        activation=mc.activation,
        l2=mc.l2,
    )
    tc = config.transport
    if check_ports and tc.kind == "tcp" and tc.base_port:
        if tc.base_port + n + ps - 1 > 65535:
            raise ConfigError(f"base port {tc.base_port} + {n} nodes exceeds 65535 (--base-port)")
        _check_ports_free(tc.host, [tc.base_port + i for i in range(n + ps)])

    run_id = config.run_id or (
        f"{datetime.now():%Y%m%d-%H%M%S}-{config.algorithm}-n{n}-{uuid.uuid4().hex[:4]}"
    )
    # everything that can be a user mistake is checked before anything is written
    emulation = {
        "slowdown": config.emulation.slowdown,
        "slowdown_factors": resolve_slowdown(config.emulation.slowdown, n),
        "latency": config.emulation.latency,
        "compute_time": config.emulation.compute_time,
        "partition": resolve_partition(config.emulation.partition, graph.edges, graph.nodes),
        "latency_s": {
            f"{u}-{v}": d
            for (u, v), d in sorted(resolve_latency(config.emulation.latency, graph.edges).items())
        },
    }
    try:
        x0 = model.init_params(seed=config.train.seed, dtype=np.dtype(mc.dtype))
    except MemoryError:
        raise ConfigError(
            f"model {mc.name} with hidden {list(mc.hidden)} has {model.n_params} parameters: "
            "too large for this machine's memory (--hidden)"
        ) from None
    run_dir = Path(config.out_dir) / run_id
    if run_dir.exists():
        raise ConfigError(f"run directory {run_dir} already exists: choose another --run-id")
    config = config.replace(n_nodes=n, run_id=run_id)
    try:
        (run_dir / "data").mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the run directory {run_dir}: {exc.strerror} (--out-dir)"
        ) from None
    if arrays is not None:  # as given, so that `dasgd run --config` replays the run exactly
        saved = (run_dir / "data" / ARRAYS_FILE).resolve()
        np.savez(saved, **{k: np.asarray(v) for k, v in arrays.items() if v is not None})
        config = config.replace(data=dataclasses.replace(dc, dataset=str(saved)))
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    save_topology(graph, run_dir / "topology.json")
    np.save(run_dir / "x0.npy", x0)
    if write_shards:
        for i, idx in enumerate(shards):
            if write_shards is not True and i not in write_shards:
                continue
            np.save(run_dir / "data" / f"shard-{i}-X.npy", dataset.X_train[idx])
            np.save(run_dir / "data" / f"shard-{i}-y.npy", dataset.y_train[idx])
        np.save(run_dir / "data" / "test-X.npy", dataset.X_test)
        np.save(run_dir / "data" / "test-y.npy", dataset.y_test)
    meta = {
        "dataset": dataset.name,
        "n_features": dataset.n_features,
        "n_classes": dataset.n_classes,
        "class_labels": list(dataset.class_labels),
        "n_train": dataset.n_train,
        "n_test": dataset.n_test,
        "sharding": dc.sharding,
        "shard_sizes": [len(s) for s in shards],
        "shard_class_histograms": [
            class_histogram(dataset.y_train[s], dataset.n_classes) for s in shards
        ],
        "model": model.describe(),
        "topology": {"parameter_server": n, "n_workers": n} if ps else describe_topology(graph),
        "emulation": emulation,
    }
    (run_dir / "data" / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return (
        config,
        run_dir,
        {
            "graph": graph,
            "dataset": dataset,
            "shards": shards,
            "model": model,
            "x0": x0,
            "meta": meta,
        },
    )


def write_summary(config: RunConfig, run_dir: Path, context: dict, wall_s: float) -> dict:
    """Evaluate a finished run directory and write ``summary.json`` (real or simulated run).

    Parameters
    ----------
    config : RunConfig
        The resolved configuration.
    run_dir : Path
    context : dict
        As :func:`prepare_run` returns it.
    wall_s : float
        Duration of the run in seconds (virtual seconds for a simulation).

    Returns
    -------
    dict
        The content of ``summary.json``.
    """
    meta = context["meta"]
    dataset = context["dataset"]
    summarize = build_summary if config.algorithm == "dasgd" else build_ps_summary
    summary = summarize(
        run_dir,
        model=context["model"],
        X_test=dataset.X_test,
        y_test=dataset.y_test,
        n_classes=dataset.n_classes,
        x0=context["x0"],
        wall_s=wall_s,
    )
    summary["run"]["algorithm"] = config.algorithm
    summary["config"] = config.to_dict()
    summary["dataset"] = {
        k: meta[k]
        for k in (
            "dataset",
            "n_features",
            "n_classes",
            "n_train",
            "n_test",
            "sharding",
            "shard_sizes",
        )
    }
    summary["topology"] = meta["topology"]
    summary["model"] = meta["model"]
    summary["emulation"] = meta["emulation"]
    analysis = write_analysis(config, run_dir, context)
    summary["run"] |= run_fields(analysis)
    for node in summary["nodes"]:
        node |= node_fields(analysis, node["node"])
    summary["analysis_notes"] = analysis["notes"]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_analysis(config: RunConfig, run_dir: Path, context: dict) -> dict:
    """Compute the staleness measures and convergence curves and write ``analysis.json``.

    See :func:`dasgd.analysis.staleness.analyze_run`; returns what was written.
    """
    from .analysis.staleness import analyze_run

    dataset = context["dataset"]
    dtype = np.dtype(config.model.dtype)
    analysis = analyze_run(
        run_dir,
        config=config,
        model=context["model"],
        n_params=context["x0"].size,
        X_train=dataset.X_train.astype(dtype, copy=False),
        y_train=dataset.y_train,
        X_test=dataset.X_test.astype(dtype, copy=False),
        y_test=dataset.y_test,
    )
    (run_dir / "analysis.json").write_text(json.dumps(analysis) + "\n")
    return analysis
