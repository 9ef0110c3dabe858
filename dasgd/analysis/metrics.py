"""Event logs (one JSONL file per node) and the run summary.

Every record is one JSON object on one line with at least ``t_s`` (seconds since
the log's ``t0`` on the driver's clock: the process's monotonic clock in a real
run, virtual time in a simulation), ``node``, ``kind`` and ``step``. The log
never reads a clock: the caller hands in ``now``. Files are
appended to and flushed every ``flush_interval_s``, never rewritten. Kinds:

- ``start``: the node's neighbours, shard size and total steps;
- ``interval``: loss, throughput, messages, bytes, staleness and lag over the
  last interval (fields documented in README.md);
- ``malformed``: a dropped message and why (the first few of a run);
- ``drain_timeout``: the node stopped draining before holding every delta;
- ``final``: totals of the whole run, incl. per-edge and per-origin staleness.

:func:`build_summary` turns a finished run directory into ``summary.json``;
:func:`format_summary` renders it as the table ``dasgd run`` and ``dasgd
summary`` print.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from ..core.protocol import counts_digest

__all__ = [
    "EventLog",
    "Evaluator",
    "build_ps_summary",
    "build_summary",
    "format_summary",
    "read_events",
]


class EventLog:
    """Append-only JSONL log of one node.

    Parameters
    ----------
    path : path-like
        The ``.jsonl`` file (created or appended to).
    node_id : int
        Written into every record.
    flush_interval_s : float
        Buffered records are written once a record is logged at least this
        long (on the caller's clock) after the previous write.
    t0 : float
        The time on the caller's clock that ``t_s`` counts from.
    """

    def __init__(
        self, path, node_id: int, *, flush_interval_s: float = 0.5, t0: float = 0.0
    ) -> None:
        self.path = Path(path)
        self.node_id = node_id
        self.flush_interval_s = flush_interval_s
        self.t0 = t0
        self._file = None
        self._buffer: list[str] = []
        self._last_flush = t0

    def open(self) -> EventLog:
        if self._file is None:
            self._file = self.path.open("a", encoding="utf-8")
        return self

    def log(self, now: float, kind: str, step: int, **fields) -> dict:
        """Buffer one record at time ``now`` (seconds, the caller's clock); flush when due.

        Returns the record. Non-finite floats (a diverged loss) are written as
        null: the file stays JSON.
        """
        record = {
            "t_s": round(now - self.t0, 6),
            "node": self.node_id,
            "kind": kind,
            "step": step,
            **fields,
        }
        line = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self._buffer.append(json.dumps(line, allow_nan=False, default=_json_default))
        if now - self._last_flush >= self.flush_interval_s:
            self.flush()
            self._last_flush = now
        return record

    def flush(self) -> None:
        """Write the buffered records to the file."""
        if self._file is None or not self._buffer:
            return
        self._file.write("\n".join(self._buffer) + "\n")
        self._file.flush()
        self._buffer.clear()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None

    def __enter__(self) -> EventLog:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


class Evaluator:
    """Logs ``eval`` records (test loss and accuracy of a model) once per ``interval_s`` of the run clock.

    Evaluations fall on the run clock's multiples of ``interval_s`` (the
    first call at or after each), the same instants on every node, so models
    of different nodes are compared at (nearly) the same time.

    Parameters
    ----------
    model : dasgd.models.Model
    X_test : ndarray of shape (m, d), the model's dtype
    y_test : ndarray of shape (m,), int64
    interval_s : float
        Seconds of the run clock between two records (``force`` overrides it).
    snapshots : dasgd.analysis.events.ModelSnapshots, optional
        Also records the model (or its sketch) at every evaluation.

    Attributes
    ----------
    eval_s : float
        Time spent evaluating so far, in seconds.
    """

    def __init__(
        self, model, X_test: np.ndarray, y_test: np.ndarray, interval_s: float, snapshots=None
    ) -> None:
        self.model = model
        self.X_test = X_test
        self.y_test = y_test
        self.interval_s = interval_s
        self.snapshots = snapshots
        self.eval_s = 0.0
        self._tick = -1

    def maybe_log(
        self, log: EventLog, now: float, step: int, params: np.ndarray, *, force: bool = False
    ) -> None:
        """Evaluate ``params`` and log the record if a new multiple of the interval was reached (or ``force``)."""
        tick = math.floor((now - log.t0) / self.interval_s)
        if not force and tick <= self._tick:
            return
        t = time.perf_counter()
        log.log(
            now,
            "eval",
            step,
            test_loss=self.model.loss(params, self.X_test, self.y_test),
            test_accuracy=self.model.accuracy(params, self.X_test, self.y_test),
        )
        if self.snapshots is not None:
            self.snapshots.take(now, step, params)
        self._tick = max(tick, self._tick)
        self.eval_s += time.perf_counter() - t


def _json_default(value):
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return _finite(float(value))
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot log {type(value).__name__}")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def read_events(path, kind: str | None = None) -> list[dict]:
    """Records of a node log, optionally only those of one ``kind``.

    A truncated last line (a node killed mid-write) is skipped.
    """
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or record.get("kind") == kind:
                records.append(record)
    return records


def _pooled(stats: list[dict], prefix: str) -> dict:
    """Pool per-node ``prefix_{avg,max}_steps``/``prefix_count`` into run-level values."""
    count = sum(s[f"{prefix}_count"] for s in stats)
    total = sum(
        s[f"{prefix}_avg_steps"] * s[f"{prefix}_count"] for s in stats if s[f"{prefix}_count"]
    )
    maxima = [s[f"{prefix}_max_steps"] for s in stats if s[f"{prefix}_count"]]
    return {
        f"{prefix}_avg_steps": total / count if count else None,
        f"{prefix}_max_steps": max(maxima) if maxima else None,
        f"{prefix}_count": count,
    }


#: Keys of apply staleness (S1) before it was named: kept in summary.json for one release.
_APPLY_ALIASES = ("avg_steps", "max_steps", "count")


def add_apply_aliases(record: dict) -> dict:
    """Add the old ``staleness_{avg,max}_steps``/``staleness_count`` keys next to ``staleness_apply_*``.

    Deprecated names of S1 (apply staleness), kept for one release so that
    scripts reading older summaries keep working.
    """
    for suffix in _APPLY_ALIASES:
        new = f"staleness_apply_{suffix}"
        if new in record:
            record[f"staleness_{suffix}"] = record[new]
    return record


def per_class_accuracy(
    model, params: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, n_classes: int
) -> list:
    """Test accuracy of ``params`` on each class (None for a class absent from the test split)."""
    predictions = model.predict(params, X_test)
    return [
        float(np.mean(predictions[y_test == c] == c)) if np.any(y_test == c) else None
        for c in range(n_classes)
    ]


def read_failures(run_dir) -> dict[int, dict]:
    """The node failures the launcher recorded (``failures.json``), by node id; {} if none."""
    path = Path(run_dir) / "failures.json"
    if not path.exists():
        return {}
    return {int(f["node"]): f for f in json.loads(path.read_text())}


def _death(record: dict) -> str:
    """How a node died, for the run table: its exit code, or its host going silent."""
    if record.get("host_lost") is not None:
        return f"host {record['host_lost']} went silent"
    return f"exit code {record['exit_code']}"


def read_restarts(run_dir) -> list[dict]:
    """The node restarts the launcher recorded (``restarts.json``, ``--on-node-failure restart``); [] if none."""
    path = Path(run_dir) / "restarts.json"
    if not path.exists():
        return []
    return json.loads(path.read_text())


def _survivors_exactly_once(alive: list[int], finals: list[dict], failures: dict):
    """Exactly-once among survivors, and the summary entries of the failed nodes.

    Every survivor must hold the same number of deltas of every origin (its
    own: those it sealed), a live origin's being all it sealed; the deltas of
    a failed origin are compared between survivors only. Needs the
    per-origin counts (runs of at most ``PER_ORIGIN_DETAIL_MAX`` nodes).

    Returns
    -------
    exactly_once : bool
    failed_nodes : list of dict
        One entry per failed node: its ``failures.json`` record, ``failed``
        True, ``deltas_held_by_survivors_min``/``_max`` (equal when the
        survivors agree), ``steps_held_by_survivors_max`` (its local steps in
        the survivors' models) and ``steps_lost`` (planned minus those).
    """
    held = []
    for i, f in zip(alive, finals, strict=True):
        per_origin = f.get("applied_deltas_per_origin")
        if per_origin is None:
            return False, [{"node": k, "failed": True, **failures[k]} for k in sorted(failures)]
        row = list(per_origin)
        row[i] = f["deltas_sealed"]
        held.append(row)
    held = np.asarray(held, dtype=np.int64)
    sealed = {i: f["deltas_sealed"] for i, f in zip(alive, finals, strict=True)}
    agree = bool((held == held[0]).all()) and all(int(held[0][i]) == sealed[i] for i in alive)
    steps_held = np.asarray([f["version_vector"] for f in finals], dtype=np.int64)
    failed_nodes = []
    for k in sorted(failures):
        column = held[:, k]
        contributed = int(steps_held[:, k].max())
        failed_nodes.append(
            {
                "node": k,
                "failed": True,
                **failures[k],
                "deltas_held_by_survivors_min": int(column.min()),
                "deltas_held_by_survivors_max": int(column.max()),
                "steps_held_by_survivors_max": contributed,
                # what no survivor holds of its planned steps (its log may lag behind)
                "steps_lost": max(0, failures[k]["planned_steps"] - contributed),
            }
        )
    return agree and all(f["complete"] for f in finals), failed_nodes


def build_summary(
    run_dir,
    *,
    model,
    X_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    x0: np.ndarray,
    wall_s: float,
) -> dict:
    """Evaluate a finished DASGD run directory and assemble ``summary.json``'s content.

    Parameters
    ----------
    run_dir : path-like
        Holds ``node-<i>.jsonl``, ``node-<i>.npy`` (final model) and
        ``node-<i>.delta_sum.npy`` (sum of the node's own sealed deltas).
    model : dasgd.models.Model
        Evaluates the final models.
    X_test : ndarray of shape (m, d), float64
    y_test : ndarray of shape (m,), int64
    n_classes : int
    x0 : ndarray of shape (n_params,)
        The common initial model.
    wall_s : float
        Wall time of the run as seen by the launcher, in seconds.

    Returns
    -------
    dict
        ``run`` (whole-run figures), ``nodes`` (one dict per node), ``edges``
        (staleness per directed edge) and ``checks`` (consensus and exactly-once).
    """
    run_dir = Path(run_dir)
    failures = read_failures(run_dir)
    all_finals = []
    n = 0
    # a node of a host that went silent has no log here: the failures name it
    while (run_dir / f"node-{n}.jsonl").exists() or n in failures:
        recs = [] if n in failures else read_events(run_dir / f"node-{n}.jsonl", "final")
        all_finals.append(recs[-1] if recs else None)
        n += 1
    missing = [i for i, f in enumerate(all_finals) if f is None and i not in failures]
    if missing:
        raise FileNotFoundError(f"no final record in the logs of node(s) {missing} in {run_dir}")
    alive = [i for i in range(n) if i not in failures]
    finals = [all_finals[i] for i in alive]
    models = [np.load(run_dir / f"node-{i}.npy") for i in alive]
    delta_sums = [np.load(run_dir / f"node-{i}.delta_sum.npy") for i in alive]

    nodes = []
    for i, final, params in zip(alive, finals, models, strict=True):
        nodes.append(
            {
                "node": i,
                "test_accuracy": model.accuracy(params, X_test, y_test),
                "test_loss": model.loss(params, X_test, y_test),
                "steps": final["steps"],
                "gradients_per_s": final["gradients_per_s"],
                "train_s": final["train_s"],
                "drain_s": final["drain_s"],
                **{
                    k: final[k] for k in final if k.startswith(("staleness_", "lag_", "loose_lag_"))
                },
                "deltas_sealed": final["deltas_sealed"],
                "deltas_applied": final["deltas_applied"],
                "duplicates": final["duplicates"],
                "malformed": final["malformed"],
                "msgs_in": final["msgs_in"],
                "msgs_out": final["msgs_out"],
                "bytes_in": final["bytes_in"],
                "bytes_out": final["bytes_out"],
                "drained": final["drained"],
            }
        )
    average = np.mean(models, axis=0)
    reference = x0 + np.sum(delta_sums, axis=0)
    scale = max(float(np.linalg.norm(reference)), 1e-300)
    consensus = max(float(np.linalg.norm(m - average)) for m in models) / scale
    oracle = max(float(np.linalg.norm(m - reference)) for m in models) / scale
    sealed = [f["deltas_sealed"] for f in finals]
    steps = [f["steps"] for f in finals]
    restarted = sorted(i for i, f in zip(alive, finals, strict=True) if f.get("restored"))
    if restarted:
        # a restarted node's sum of its earlier deltas died with its first process
        oracle = None
    if failures:
        # the dead nodes' deltas are known only as the survivors hold them: compare survivors
        exactly_once, failed_nodes = _survivors_exactly_once(alive, finals, failures)
        oracle = None  # x0 + sum of deltas needs the dead nodes' deltas, which no file holds
    else:
        failed_nodes = []
        # every node holds every origin's deltas and steps (complete: applied == the fin totals
        # it received) and those totals are what each origin says it sealed (one digest, O(n))
        expected = counts_digest(sealed, steps)
        exactly_once = all(f["complete"] and f["fin_digest"] == expected for f in finals)
    per_class = per_class_accuracy(model, average, X_test, y_test, n_classes)
    train_s = max(f["train_s"] for f in finals)
    run = {
        "n_nodes": n,
        "failed_nodes": sorted(failures),
        "restarted_nodes": restarted,
        "restarts": read_restarts(run_dir),
        "test_accuracy_mean": float(np.mean([x["test_accuracy"] for x in nodes])),
        "test_accuracy_min": float(np.min([x["test_accuracy"] for x in nodes])),
        "test_loss_mean": float(np.mean([x["test_loss"] for x in nodes])),
        "average_model_test_accuracy": model.accuracy(average, X_test, y_test),
        "average_model_test_loss": model.loss(average, X_test, y_test),
        "average_model_per_class_accuracy": per_class,
        "steps": int(sum(steps)),
        "gradients_per_s": sum(steps) / train_s if train_s > 0 else None,
        "train_s": train_s,
        "wall_s": wall_s,
        **_pooled(finals, "staleness_apply"),
        **_pooled(finals, "lag"),
        "deltas_sealed": int(sum(sealed)),
        "deltas_applied": int(sum(f["deltas_applied"] for f in finals)),
        "duplicates": int(sum(f["duplicates"] for f in finals)),
        "malformed": int(sum(f["malformed"] for f in finals)),
        "msgs_out": int(sum(f["msgs_out"] for f in finals)),
        "bytes_out": int(sum(f["bytes_out"] for f in finals)),
    }
    edges = sorted(
        (edge for f in finals for edge in f["edges"]),
        key=lambda e: (e["src"], e["dst"]),
    )
    for record in (run, *nodes, *edges):
        add_apply_aliases(record)
    nodes = sorted(nodes + failed_nodes, key=lambda d: d["node"])
    checks = {
        "exactly_once": bool(exactly_once),
        "all_drained": all(f["drained"] for f in finals),
        "consensus_distance_rel": consensus,
        "oracle_distance_rel": oracle,
    }
    if failures or restarted:
        checks["delta_store_misses"] = int(sum(f.get("delta_store_misses", 0) for f in finals))
    if failures:
        checks["survivors"] = len(alive)
        # deltas a neighbour asked for (anti-entropy) that had left this node's store
        checks["delta_store_misses"] = int(sum(f.get("delta_store_misses", 0) for f in finals))
    return {"run": run, "nodes": nodes, "edges": edges, "checks": checks}


def build_ps_summary(
    run_dir,
    *,
    model,
    X_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    x0: np.ndarray,
    wall_s: float,
) -> dict:
    """Evaluate a finished parameter-server run (ps-async, ps-sync) into ``summary.json``'s content.

    Parameters are those of :func:`build_summary`; the run directory holds
    ``server.jsonl``/``server.npy`` and one ``node-<i>.jsonl`` per worker.

    Returns
    -------
    dict
        ``run`` (the server's model and tau_avg/tau_max, Koloskova et al. 2022
        Definition 4 with in-flight gradients counted), ``nodes`` (one dict per
        worker, with the delays of its gradients), ``edges`` (empty) and ``checks``.
    """
    run_dir = Path(run_dir)
    server = read_events(run_dir / "server.jsonl", "final")
    if not server:
        raise FileNotFoundError(f"no final record in {run_dir / 'server.jsonl'}")
    server = server[-1]
    failures = read_failures(run_dir)
    workers = []
    while (run_dir / f"node-{len(workers)}.jsonl").exists() or len(workers) in failures:
        if len(workers) in failures:  # a dead ps-async worker: no final record
            workers.append(None)
            continue
        recs = read_events(run_dir / f"node-{len(workers)}.jsonl", "final")
        if not recs:
            raise FileNotFoundError(
                f"no final record in the log of worker {len(workers)} in {run_dir}"
            )
        workers.append(recs[-1])
    x = np.load(run_dir / "server.npy")
    nodes = []
    for i, (w, delays) in enumerate(zip(workers, server["workers"], strict=True)):
        if w is None:
            nodes.append(
                {
                    "node": i,
                    "failed": True,
                    **failures[i],
                    "gradients_applied": server["gradients_per_worker"][i],
                }
            )
            continue
        nodes.append(
            {
                "node": i,
                "test_accuracy": None,
                "test_loss": None,
                "steps": w["gradients"],
                "gradients_applied": server["gradients_per_worker"][i],
                "gradients_per_s": w["gradients_per_s"],
                "train_s": w["train_s"],
                "wait_s": w["wait_s"],
                **{k: delays[k] for k in ("tau_avg_steps", "tau_max_steps", "tau_count")},
                "malformed": w["malformed"],
                "msgs_in": w["msgs_in"],
                "msgs_out": w["msgs_out"],
                "bytes_in": w["bytes_in"],
                "bytes_out": w["bytes_out"],
                "slowdown_factor": w["slowdown_factor"],
            }
        )
    per_class = per_class_accuracy(model, x, X_test, y_test, n_classes)
    accuracy = model.accuracy(x, X_test, y_test)
    loss = model.loss(x, X_test, y_test)
    run = {
        "n_nodes": len(workers),
        "test_accuracy_mean": accuracy,
        "test_loss_mean": loss,
        "average_model_test_accuracy": accuracy,
        "average_model_test_loss": loss,
        "average_model_per_class_accuracy": per_class,
        "steps": server["gradients_received"],
        "updates_applied": server["updates_applied"],
        "gradients_dropped": server["gradients_dropped"],
        "gradients_per_s": server["gradients_received"] / server["train_s"]
        if server["train_s"] > 0
        else None,
        "train_s": server["train_s"],
        "wall_s": wall_s,
        **{
            k: server[k]
            for k in (
                "tau_avg_steps",
                "tau_max_steps",
                "tau_count",
                "tau_applied_avg_steps",
                "tau_in_flight_steps",
            )
        },
        "malformed": int(server["malformed"] + sum(w["malformed"] for w in workers if w)),
        "msgs_out": int(server["msgs_out"] + sum(w["msgs_out"] for w in workers if w)),
        "bytes_out": int(server["bytes_out"] + sum(w["bytes_out"] for w in workers if w)),
        "failed_nodes": sorted(failures),
        "server_optimizer": server["optimizer"],
        "delay_rule": server["delay_rule"],
        "delay_concurrency": server["delay_concurrency"],
    }
    checks = {
        "budget_used": server["gradients_received"] >= server["budget"],
        "distance_from_x0_rel": float(
            np.linalg.norm(x - x0) / max(float(np.linalg.norm(x0)), 1e-300)
        ),
    }
    return {"run": run, "nodes": nodes, "edges": [], "checks": checks}


def _fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_summary(summary: dict, *, max_edges: int = 32) -> str:
    """The summary as the plain-text tables printed by ``dasgd run`` / ``dasgd summary``.

    DASGD runs show apply staleness (S1) per node; parameter-server runs show
    the delay tau of each worker's gradients in the same columns. Both show
    the virtual-sequence staleness S2 (of the gradients each node computed),
    which is tau's analogue: the one scale on which they compare.
    """
    run = summary["run"]
    algorithm = run.get("algorithm", "dasgd")
    ps = algorithm != "dasgd"
    key, label = ("tau", "tau") if ps else ("staleness_apply", "S1")
    header = (
        f"{'worker' if ps else 'node':>6} {'test_acc':>8} {'test_loss':>9} {'steps':>7} {'grad/s':>8} "
        f"{label + '_avg':>7} {label + '_max':>7} {'S2_avg':>7} {'S2_max':>7} "
        f"{'lag_avg':>7} {'lag_max':>7} {'msgs_out':>8} {'MB_out':>8}"
    )
    lines = [f"algorithm: {algorithm}", header, "-" * len(header)]

    def row(name, d):
        return (
            f"{name:>6} {_fmt(d.get('test_accuracy', d.get('test_accuracy_mean')), '.4f'):>8} "
            f"{_fmt(d.get('test_loss', d.get('test_loss_mean')), '.4f'):>9} {d['steps']:>7} "
            f"{_fmt(d['gradients_per_s'], '.0f'):>8} {_fmt(d.get(key + '_avg_steps')):>7} "
            f"{_fmt(d.get(key + '_max_steps'), 'd'):>7} "
            f"{_fmt(d.get('staleness_virtual_avg_steps')):>7} "
            f"{_fmt(d.get('staleness_virtual_max_steps'), 'd'):>7} {_fmt(d.get('lag_avg_steps')):>7} "
            f"{_fmt(d.get('lag_max_steps'), 'd'):>7} {d['msgs_out']:>8} {d['bytes_out'] / 1e6:>8.2f}"
        )

    failed = [node for node in summary["nodes"] if node.get("failed")]
    restarts = run.get("restarts") or []
    restarted = {r["node"] for r in restarts}
    for node in summary["nodes"]:
        if node.get("failed"):
            lines.append(f"{str(node['node']) + '*':>6} FAILED ({_death(node)})")
        else:
            mark = "r" if node["node"] in restarted else ""
            lines.append(row(str(node["node"]) + mark, node))
    lines.append("-" * len(header))
    lines.append(row("all" if not failed else "alive", run))
    checks = summary["checks"]
    for node in failed:
        held = ""
        if "deltas_held_by_survivors_min" in node:
            lo, hi = node["deltas_held_by_survivors_min"], node["deltas_held_by_survivors_max"]
            held = f", {lo}{'' if lo == hi else f'..{hi}'} of its deltas held by the survivors"
        elif "gradients_applied" in node:
            held = f", {node['gradients_applied']} of its gradients applied by the server"
        lines.append(
            f"* {'worker' if ps else 'node'} {node['node']} failed: seen dead at t = {node['detected_t_s']:.2f} s "
            f"({_death(node)}), last logged step {node['last_step']} of "
            f"{node['planned_steps']} ({node['steps_lost']} steps lost){held}"
            + (
                f"; killed after {node['hung_s']:.1f} s without a heartbeat"
                if "hung_s" in node
                else ""
            )
        )
    for r in restarts:
        rejoined = (
            f", took node {r['donor']}'s state at t = {r['rejoined_t_s']:.2f} s"
            if "rejoined_t_s" in r
            else ""
        )
        lines.append(
            f"* node {r['node']}r restarted (restart {r['incarnation']}): seen dead at "
            f"t = {r['detected_t_s']:.2f} s ({_death(r)}){rejoined}, resumed at "
            f"step {r['steps_held']} of {r['planned_steps']} (last logged step {r['last_step']})"
            + (f"; killed after {r['hung_s']:.1f} s without a heartbeat" if "hung_s" in r else "")
        )
    if ps:
        in_flight = run.get("tau_in_flight_steps") or []
        lines += [
            "",
            f"server model: test accuracy {_fmt(run['average_model_test_accuracy'], '.4f')}, "
            f"test loss {_fmt(run['average_model_test_loss'], '.4f')}",
            f"tau_avg {_fmt(run['tau_avg_steps'])} steps (Koloskova et al. Def. 4, {len(in_flight)} in-flight "
            f"gradients counted), tau_max {_fmt(run['tau_max_steps'], 'd')}; delay rule {run['delay_rule']}, "
            f"{run['gradients_dropped']} gradients dropped",
            f"wall time {run['wall_s']:.1f} s, training {run['train_s']:.1f} s, "
            f"{run['updates_applied']} server updates, {run['malformed']} malformed messages",
        ]
        return "\n".join(lines)
    lines += [
        "",
        f"average model: test accuracy {_fmt(run['average_model_test_accuracy'], '.4f')}, "
        f"test loss {_fmt(run['average_model_test_loss'], '.4f')}",
        f"consensus distance (max_i |x_i - mean| / |x|{', survivors' if failed else ''}): "
        f"{checks['consensus_distance_rel']:.2e}; every delta applied exactly once at every "
        f"{'survivor' if failed else 'node'}: {'yes' if checks['exactly_once'] else 'NO'}"
        f"{'' if checks['all_drained'] else ' (drain timed out on some node)'}",
        *(
            [
                f"the delta store was too small to repair: {checks['delta_store_misses']} deltas "
                "a neighbour lacked had been evicted (--delta-store-mib); survivors may differ"
            ]
            if checks.get("delta_store_misses")
            else []
        ),
        f"wall time {run['wall_s']:.1f} s, training {run['train_s']:.1f} s, "
        f"{run['deltas_sealed']} deltas sealed, {run['duplicates']} duplicates dropped, "
        f"{run['malformed']} malformed messages",
    ]
    edges = summary["edges"]
    if edges:
        lines += ["", f"{'edge':>9} {'S1_avg':>6} {'S1_max':>6} {'lag_avg':>7} {'lag_max':>7}"]
        for e in edges[:max_edges]:
            lines.append(
                f"{e['src']:>4}->{e['dst']:<4} {_fmt(e['staleness_apply_avg_steps']):>6} "
                f"{_fmt(e['staleness_apply_max_steps'], 'd'):>6} {_fmt(e['lag_avg_steps']):>7} "
                f"{_fmt(e['lag_max_steps'], 'd'):>7}"
            )
        if len(edges) > max_edges:
            lines.append(f"... {len(edges) - max_edges} more edges in summary.json")
    return "\n".join(lines)
