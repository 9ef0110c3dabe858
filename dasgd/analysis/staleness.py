"""The staleness measures and convergence curves of a finished run, from its event logs.

:func:`analyze_run` reads a run directory's binary event logs
(:mod:`dasgd.analysis.events`) and computes, on the run's one clock
(ALGORITHMS.md §2 gives the definitions; the names are dasgd's, since the
paper's text gives only "average staleness between models", a "gradient-set
based staleness metric" and "loose versions"):

- **S1, apply staleness** (DASGD): per delta application, the updates the
  receiver already had that the model which computed the delta lacked;
- **S2, virtual-sequence staleness** (DASGD and parameter server): order every
  gradient of the run by the time it joined a model; gradient g, the t_g-th,
  was computed on a model holding c_g gradients: S2(g) = t_g - 1 - c_g, the
  gradients finished anywhere before g that its model lacked. For ps-async it
  equals Koloskova et al. (2022)'s delay tau (Definition 4), so DASGD's S2 and
  ps-async's tau compare on one scale;
- **S3, pairwise staleness between models** (DASGD): |G_j(t) \\ G_i(t)| =
  sum_k max(0, V_j[k](t) - V_i[k](t)) over ordered pairs i != j, and the
  symmetric ("loose") sum_k |V_j[k](t) - V_i[k](t)|, at sampled instants.
  Version vectors are rebuilt exactly from the events (a node's own entry
  counts its gradients, entry k the steps of origin k's deltas it applied),
  not sampled from periodic logs;
- **convergence over time**: at every evaluation instant, the average model's
  test loss and accuracy, |grad f(mean)|^2 on the whole training set (the
  quantity the theorems bound) and the consensus distance
  max_i |x_i - mean| / |mean| (exact from model snapshots, estimated from
  CountSketches once snapshots stop).

The result is the content of ``analysis.json``; :func:`run_fields` and
:func:`node_fields` are the scalars merged into ``summary.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .events import (
    APPLY_DTYPE,
    GRADIENT_DTYPE,
    SKETCH_SIZE,
    count_sketch,
    read_columns,
    snapshot_dtype,
)

__all__ = [
    "ANALYSIS_FORMAT",
    "analyze_run",
    "node_fields",
    "pairwise_staleness",
    "run_fields",
    "version_vectors",
    "virtual_staleness",
]

ANALYSIS_FORMAT = 1
#: Instants at which S3 is evaluated, and time bins of the "over time" curves.
TIME_SAMPLES = 100
#: S3 over all ordered pairs of at most this many nodes (a seeded sample of larger runs).
PAIRWISE_MAX_NODES = 128
#: Histogram bins (integer steps up to this many bins, wider bins beyond).
HISTOGRAM_BINS = 60


def virtual_staleness(gradients: np.ndarray) -> np.ndarray:
    """S2 of every gradient: its rank by finish time minus the gradients in its model.

    Parameters
    ----------
    gradients : structured ndarray of :data:`~dasgd.analysis.events.GRADIENT_DTYPE`, shape (G,)
        Every gradient of the run (all nodes).

    Returns
    -------
    ndarray of shape (G,), int64
        S2(g) = t_g - 1 - c_g in the order of ``gradients`` (ALGORITHMS.md §2;
        Koloskova et al. 2022, Definition 4, on the virtual sequence). Ties in
        finish time are ordered by node and step. A negative value means a
        model held a gradient that finished later: clocks that disagree.
    """
    order = np.lexsort((gradients["step"], gradients["node"], gradients["t_end_s"]))
    rank = np.empty(len(gradients), dtype=np.int64)
    rank[order] = np.arange(len(gradients))
    return rank - gradients["model_gradients"]


def dead_processes(run_dir) -> list[dict]:
    """Every node process that died mid-run, in order: node, death time and the steps that left it.

    From ``restarts.json`` (``steps_held``) and ``failures.json`` (the derived
    ``fin``'s steps); a restarted node's ``state_installed`` records give the
    version vector it resumed with (``resumed_t_s``, ``version_vector``).

    Returns
    -------
    list of dict
        ``node``, ``t_s`` (when the launcher saw it dead), ``steps`` (its
        steps in the survivors' models: every later gradient of that process
        was lost), ``resumed_t_s`` and ``version_vector`` (restarts, when logged).
    """
    from .metrics import read_events, read_failures, read_restarts

    run_dir = Path(run_dir)
    out = []
    installed: dict[int, list] = {}
    for r in read_restarts(run_dir):
        node = int(r["node"])
        if node not in installed:
            log = run_dir / f"node-{node}.jsonl"
            installed[node] = read_events(log, "state_installed") if log.exists() else []
        resumed = {}
        if "rejoined_t_s" in r and installed[node]:  # (a restart that never got a state: none)
            resumed = installed[node].pop(0)
        out.append(
            {
                "node": node,
                "t_s": float(r["detected_t_s"]),
                # where it resumed: the donor's count of its steps (at least the launcher's)
                "steps": int(resumed.get("steps", r["steps_held"])),
                "resumed_t_s": resumed.get("t_s"),
                "version_vector": resumed.get("version_vector"),
            }
        )
    for node, f in read_failures(run_dir).items():
        fin = f.get("fin")
        if fin is not None:
            out.append(
                {"node": int(node), "t_s": float(f["detected_t_s"]), "steps": int(fin["steps"])}
            )
    return sorted(out, key=lambda d: d["t_s"])


def settle_dead_gradients(gradients: np.ndarray, dead: list[dict]) -> tuple[np.ndarray, int, int]:
    """The gradient events as the models saw them, around node processes that died.

    A dead process's gradients beyond the steps that left it were never in any
    model: they are dropped. Its last gradients that did leave but whose
    events were still buffered when it died (up to one log interval) are
    imputed, evenly spaced between its last recorded gradient and its death,
    with ``model_gradients`` -1 (no S2 of their own; they count in the ranks).

    Parameters
    ----------
    gradients : structured ndarray of GRADIENT_DTYPE, shape (G,)
    dead : list of dict
        :func:`dead_processes`.

    Returns
    -------
    gradients : structured ndarray, sorted by node and finish time
    dropped, imputed : int
    """
    if not dead:
        return gradients, 0, 0
    keep = np.ones(len(gradients), dtype=bool)
    extra = []
    since: dict[int, float] = {}
    kept_steps: dict[int, int] = {}
    for d in dead:
        i, t_s, steps = d["node"], d["t_s"], d["steps"]
        window = (gradients["node"] == i) & (gradients["t_end_s"] <= t_s)
        window &= gradients["t_end_s"] > since.get(i, -np.inf)
        keep &= ~(window & (gradients["step"] > steps))
        have = set(gradients["step"][window & keep].tolist())
        missing = [k for k in range(kept_steps.get(i, 0) + 1, steps + 1) if k not in have]
        if missing:
            mine = gradients["t_end_s"][window & keep]
            start = float(mine.max()) if mine.size else since.get(i, 0.0)
            start = max(start, 0.0)
            times = np.linspace(start, t_s, len(missing) + 2)[1:-1]
            for k, t in zip(missing, times, strict=True):
                extra.append((i, k, np.nan, t, -1, -1))
        since[i] = d.get("resumed_t_s") or t_s
        kept_steps[i] = steps
    out = np.concatenate([gradients[keep], np.array(extra, dtype=gradients.dtype)])
    out = out[np.lexsort((out["t_end_s"], out["node"]))]
    return out, int((~keep).sum()), len(extra)


def version_vectors(
    gradients: np.ndarray,
    applies: np.ndarray,
    nodes,
    n_nodes: int,
    times_s: np.ndarray,
    resets=None,
) -> np.ndarray:
    """The version vectors of ``nodes`` at each of ``times_s``, rebuilt from the events.

    Parameters
    ----------
    gradients, applies : structured ndarrays (GRADIENT_DTYPE, APPLY_DTYPE)
        All events of the run.
    nodes : sequence of int, length m
    n_nodes : int
    times_s : ndarray of shape (K,), sorted, run-clock seconds
    resets : mapping of int to list of (float, array-like), optional
        Per node, restarts: at run-clock time t its model became the donor's
        with version vector vv (``--on-node-failure restart``); its applies
        before t no longer count.

    Returns
    -------
    ndarray of shape (K, m, n_nodes), int64
        ``V[t, a, k]``: origin-k steps in node ``nodes[a]``'s model at
        ``times_s[t]`` (events at exactly that time included).
    """
    K = len(times_s)
    V = np.zeros((K, len(nodes), n_nodes), dtype=np.int64)
    for a, i in enumerate(nodes):
        own = np.sort(gradients["t_end_s"][gradients["node"] == i])
        mine = applies[applies["node"] == i]
        bucket = np.searchsorted(times_s, mine["t_s"], side="left")
        keep = bucket < K
        counts = np.zeros((K, n_nodes), dtype=np.int64)
        np.add.at(counts, (bucket[keep], mine["origin"][keep]), mine["steps"][keep])
        applied = np.cumsum(counts, axis=0)
        V[:, a, :] = applied
        for t_s, vv in sorted((resets or {}).get(int(i), ())):
            # from the restart on: the state it took, plus what it applied after it
            at = int(np.searchsorted(times_s, t_s, side="left"))
            if at < K:
                before = mine["t_s"] < t_s
                base = np.zeros(n_nodes, dtype=np.int64)
                np.add.at(base, mine["origin"][before], mine["steps"][before])
                V[at:, a, :] = np.asarray(vv, dtype=np.int64) + applied[at:] - base
        V[:, a, i] = np.searchsorted(own, times_s, side="right")
    return V


def pairwise_staleness(V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """S3 and its loose variant for every ordered pair, at every instant.

    Parameters
    ----------
    V : ndarray of shape (K, m, n), int64
        Version vectors (:func:`version_vectors`).

    Returns
    -------
    strict, loose : ndarray of shape (K, m * (m - 1)), int64
        ``sum_k max(0, V_j[k] - V_i[k])`` (|G_j \\ G_i|) and
        ``sum_k |V_j[k] - V_i[k]|`` for every ordered pair i != j, row by row
        (i, then j: column ``i * (m - 1) + j - (j > i)``).
    """
    K, m, _ = V.shape
    off_diagonal = ~np.eye(m, dtype=bool)
    strict = np.empty((K, m * (m - 1)), dtype=np.int64)
    loose = np.empty_like(strict)
    for t in range(K):
        diff = V[t][None, :, :] - V[t][:, None, :]  # [i, j, k] = V_j[k] - V_i[k]
        strict[t] = np.maximum(diff, 0).sum(axis=2)[off_diagonal]
        loose[t] = np.abs(diff).sum(axis=2)[off_diagonal]
    return strict, loose


def _histogram(values: np.ndarray) -> dict:
    values = np.asarray(values)
    if values.size == 0:
        return {"bin_edges": [], "counts": []}
    lo, hi = int(values.min()), int(values.max())
    if hi - lo + 1 <= HISTOGRAM_BINS:
        edges = np.arange(lo, hi + 2) - 0.5
    else:
        edges = np.linspace(lo - 0.5, hi + 0.5, HISTOGRAM_BINS + 1)
    counts, edges = np.histogram(values, bins=edges)
    return {"bin_edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _over_time(times_s: np.ndarray, values: np.ndarray, t_end_s: float) -> dict:
    """Average and maximum of ``values`` in TIME_SAMPLES equal bins of [0, t_end_s]."""
    if values.size == 0 or not t_end_s > 0:
        return {"t_s": [], "avg_steps": [], "max_steps": []}
    edges = np.linspace(0.0, t_end_s, TIME_SAMPLES + 1)
    idx = np.clip(np.searchsorted(edges, times_s, side="right") - 1, 0, TIME_SAMPLES - 1)
    count = np.bincount(idx, minlength=TIME_SAMPLES)
    total = np.bincount(idx, weights=values, minlength=TIME_SAMPLES)
    peak = np.full(TIME_SAMPLES, np.iinfo(np.int64).min)
    np.maximum.at(peak, idx, values)
    has = count > 0
    return {
        "t_s": [float(t) for t in edges[1:][has]],
        "avg_steps": [float(v) for v in (total[has] / count[has])],
        "max_steps": [int(v) for v in peak[has]],
    }


def _grouped(keys: np.ndarray, values: np.ndarray) -> list[tuple[int, float, int, int]]:
    """(key, mean, max, count) of ``values`` per distinct key."""
    if keys.size == 0:
        return []
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    uniq, start = np.unique(keys, return_index=True)
    out = []
    for k, (a, b) in zip(uniq, zip(start, [*start[1:], len(keys)], strict=True), strict=True):
        chunk = values[a:b]
        out.append((int(k), float(chunk.mean()), int(chunk.max()), int(chunk.size)))
    return out


def _measure(values: np.ndarray, times_s: np.ndarray, by_node: np.ndarray, t_end_s: float) -> dict:
    """The MEASURE block of analysis.json for per-event staleness ``values``."""
    values = np.asarray(values, dtype=np.int64)
    return {
        "avg_steps": float(values.mean()) if values.size else None,
        "max_steps": int(values.max()) if values.size else None,
        "count": int(values.size),
        "histogram": _histogram(values),
        "over_time": _over_time(times_s, values, t_end_s),
        "per_node": [
            {"node": k, "avg_steps": avg, "max_steps": mx, "count": c}
            for k, avg, mx, c in _grouped(by_node, values)
        ],
    }


def _read_all(run_dir: Path, names: list[str], suffix: str, dtype) -> np.ndarray:
    parts = [read_columns(run_dir / f"{name}.{suffix}", dtype) for name in names]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _eval_series(run_dir: Path, name: str) -> dict:
    from .metrics import read_events

    path = run_dir / f"{name}.jsonl"
    records = read_events(path, "eval") if path.exists() else []  # a lost host's node: none
    return {
        "t_s": [r["t_s"] for r in records],
        "test_loss": [r.get("test_loss") for r in records],
        "test_accuracy": [r.get("test_accuracy") for r in records],
    }


def _snapshots(run_dir: Path, name: str, n_params: int, dtype, interval_s: float):
    """{tick: (t_s, full model or None, sketch)} of one process (the last row per tick).

    Full snapshots come first; the evaluations after their budget have sketches only.
    """
    full = read_columns(run_dir / f"{name}.models.bin", snapshot_dtype(n_params, dtype))
    sketched = read_columns(
        run_dir / f"{name}.sketch.bin", snapshot_dtype(min(n_params, SKETCH_SIZE), np.float64)
    )
    out: dict[int, tuple] = {}
    for row in full:
        out[math.floor(row["t_s"] / interval_s)] = (float(row["t_s"]), row["x"], None)
    for row in sketched:
        out[math.floor(row["t_s"] / interval_s)] = (float(row["t_s"]), None, row["x"])
    return out


def _convergence(
    run_dir: Path,
    names: list[str],
    *,
    model,
    X_train,
    y_train,
    X_test,
    y_test,
    n_params: int,
    dtype,
    interval_s: float,
    finish_times: np.ndarray,
    seed: int,
) -> dict | None:
    sketch = count_sketch(n_params, seed)
    snaps = [_snapshots(run_dir, name, n_params, dtype, interval_s) for name in names]
    if not snaps or not all(snaps):
        return None
    ticks = sorted(set.intersection(*(set(s) for s in snaps)))
    grad = np.empty(n_params, dtype=dtype)
    out = {
        "t_s": [],
        "gradients": [],
        "average_model_test_loss": [],
        "average_model_test_accuracy": [],
        "grad_norm_sq_train": [],
        "consensus_distance_rel": [],
        "consensus_exact": True,
    }
    sorted_finish = np.sort(finish_times)
    for tick in ticks:
        rows = [s[tick] for s in snaps]
        t_s = max(r[0] for r in rows)
        out["t_s"].append(t_s)
        out["gradients"].append(int(np.searchsorted(sorted_finish, t_s, side="right")))
        if all(r[1] is not None for r in rows):
            models = np.stack([r[1] for r in rows])
            mean = models.mean(axis=0).astype(dtype, copy=False)
            out["average_model_test_loss"].append(_finite(model.loss(mean, X_test, y_test)))
            out["average_model_test_accuracy"].append(float(model.accuracy(mean, X_test, y_test)))
            if X_train is not None:
                model.loss_and_grad(mean, X_train, y_train, out=grad)
                out["grad_norm_sq_train"].append(_finite(float(np.dot(grad, grad))))
            else:
                out["grad_norm_sq_train"].append(None)
            vectors = models
        else:
            out["average_model_test_loss"].append(None)
            out["average_model_test_accuracy"].append(None)
            out["grad_norm_sq_train"].append(None)
            # the same sketch of the nodes whose full snapshot is there
            vectors = np.stack([r[2] if r[1] is None else sketch(r[1]) for r in rows])
            out["consensus_exact"] = out["consensus_exact"] and n_params <= SKETCH_SIZE
        center = vectors.mean(axis=0)
        scale = max(float(np.linalg.norm(center)), 1e-300)
        out["consensus_distance_rel"].append(
            _finite(float(np.max(np.linalg.norm(vectors - center, axis=1))) / scale)
        )
    return out


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def analyze_run(
    run_dir,
    *,
    config,
    model,
    n_params: int,
    X_train=None,
    y_train=None,
    X_test=None,
    y_test=None,
) -> dict:
    """Staleness measures and convergence curves of a finished run (the content of ``analysis.json``).

    Parameters
    ----------
    run_dir : path-like
        A finished run directory with binary event logs (runs with
        ``record_events`` off give the eval curves only).
    config : dasgd.config.RunConfig
        The run's resolved configuration.
    model : dasgd.ml.models.Model
    n_params : int
    X_train, y_train : ndarray of shape (m, d) and (m,), optional
        The whole training set, for |grad f(mean)|^2 (omitted: None entries).
    X_test, y_test : ndarray
        The test split, for the average model's curves.

    Returns
    -------
    dict
        ``format``, ``algorithm``, ``n_nodes``, ``time_base``, ``notes``,
        ``staleness`` (``apply``, ``virtual``, ``tau``: per-event measures with
        histograms, curves over time, per node (and per edge for ``apply``);
        ``pairwise``: S3 and loose S3), ``convergence`` (average model, grad
        norm, consensus distance over time) and ``nodes`` (each process's
        test curves, against time and total gradients). Fields are listed in
        README.md.
    """
    from ..build import apply_events_plan

    run_dir = Path(run_dir)
    n = config.n_nodes
    ps = config.algorithm != "dasgd"
    dtype = np.dtype(config.model.dtype)
    notes = []
    names = ["server"] if ps else [f"node-{i}" for i in range(n)]
    gradients = _read_all(run_dir, names, "gradients.bin", GRADIENT_DTYPE)
    applies = (
        np.zeros(0, APPLY_DTYPE) if ps else _read_all(run_dir, names, "applies.bin", APPLY_DTYPE)
    )
    if not config.record_events:
        notes.append("events not recorded (--no-events): no S2, S3 or convergence curves")
    elif not ps:
        meta_path = run_dir / "data" / "meta.json"
        if meta_path.exists():
            import json

            recorded, why = apply_events_plan(
                config, json.loads(meta_path.read_text())["shard_sizes"]
            )
            if not recorded and why:
                notes.append(why)
    dead = [] if ps else dead_processes(run_dir)
    gradients, dropped, imputed = settle_dead_gradients(gradients, dead)
    if dropped or imputed:
        notes.append(
            f"node processes died: {dropped} of their gradients never left them (dropped), the "
            f"events of {imputed} that did were lost with them (imputed for the S2 ranks, "
            "evenly spaced before the death; no S2 of their own)"
        )
    resets = {}
    for d in dead:
        if d.get("version_vector") is not None and d.get("resumed_t_s") is not None:
            resets.setdefault(d["node"], []).append((d["resumed_t_s"], d["version_vector"]))
    t_end_s = float(gradients["t_end_s"].max()) if gradients.size else 0.0
    staleness = {"apply": None, "virtual": None, "tau": None, "pairwise": None}
    if gradients.size:
        s2 = virtual_staleness(gradients)
        own = gradients["model_gradients"] >= 0  # imputed rows rank others only
        staleness["virtual"] = _measure(
            s2[own], gradients["t_end_s"][own], gradients["node"][own], t_end_s
        )
        staleness["virtual"]["negative_count"] = int((s2[own] < 0).sum())
        if ps:
            tau = gradients["tau_steps"]
            staleness["tau"] = _measure(tau, gradients["t_end_s"], gradients["node"], t_end_s)
            staleness["tau"]["note"] = (
                "per applied gradient; Definition 4's in-flight gradients are in summary.json"
            )
    if applies.size:
        s1 = applies["staleness_steps"]
        block = _measure(s1, applies["t_s"], applies["node"], t_end_s)
        edge_key = applies["sender"].astype(np.int64) * n + applies["node"]
        block["per_edge"] = [
            {"src": k // n, "dst": k % n, "avg_steps": avg, "max_steps": mx, "count": c}
            for k, avg, mx, c in _grouped(edge_key, s1)
        ]
        block["per_origin"] = [
            {"origin": k, "avg_steps": avg, "max_steps": mx, "count": c}
            for k, avg, mx, c in _grouped(applies["origin"].astype(np.int64), s1)
        ]
        staleness["apply"] = block
        staleness["pairwise"] = _pairwise(
            gradients, applies, n, t_end_s, config.train.seed, resets, dead
        )
    nodes = []
    for name in names if ps else [f"node-{i}" for i in range(n)]:
        series = _eval_series(run_dir, name)
        finish = np.sort(gradients["t_end_s"])
        series["gradients"] = [int(np.searchsorted(finish, t, side="right")) for t in series["t_s"]]
        nodes.append({"node": "server" if name == "server" else int(name[5:]), **series})
    convergence = None
    if config.record_events and config.eval_interval_s is not None:
        convergence = _convergence(
            run_dir,
            names,
            model=model,
            X_train=X_train,
            y_train=y_train,
            X_test=X_test,
            y_test=y_test,
            n_params=n_params,
            dtype=dtype,
            interval_s=config.eval_interval_s,
            finish_times=gradients["t_end_s"],
            seed=config.train.seed,
        )
    return {
        "format": ANALYSIS_FORMAT,
        "algorithm": config.algorithm,
        "n_nodes": n,
        "time_base": "seconds on the run clock: since the launcher's start (all processes), "
        "virtual seconds in a simulation",
        "notes": notes,
        "staleness": staleness,
        "convergence": convergence,
        "nodes": nodes,
    }


def _pairwise(
    gradients, applies, n: int, t_end_s: float, seed: int, resets=None, dead=None
) -> dict | None:
    if n < 2 or not t_end_s > 0:
        return None
    nodes = np.arange(n)
    if n > PAIRWISE_MAX_NODES:
        rng = np.random.default_rng([seed, 0x5033])
        nodes = np.sort(rng.choice(n, PAIRWISE_MAX_NODES, replace=False))
    times_s = np.linspace(0.0, t_end_s, TIME_SAMPLES + 1)[1:]
    V = version_vectors(gradients, applies, nodes, n, times_s, resets)
    strict, loose = pairwise_staleness(V)
    m = len(nodes)
    # a pair counts only while both processes live (a dead node's frozen vector is no model)
    alive = np.ones((len(times_s), m), dtype=bool)
    for d in dead or ():
        a = int(np.searchsorted(nodes, d["node"]))
        if a < m and nodes[a] == d["node"]:
            end = d["resumed_t_s"] if d.get("resumed_t_s") is not None else np.inf
            alive[(times_s >= d["t_s"]) & (times_s < end), a] = False
    pair = (alive[:, :, None] & alive[:, None, :])[:, ~np.eye(m, dtype=bool)]  # like strict
    if not pair.any():
        return None
    behind = np.where(pair, strict, -1).reshape(len(times_s), m, m - 1)

    def per_time(values, f, cast):
        out = f(np.ma.masked_array(values, ~pair), axis=1)
        return [None if v is np.ma.masked else cast(v) for v in out]

    per_node = []
    for a, i in enumerate(nodes):
        rows = behind[:, a][behind[:, a] >= 0]
        if rows.size:
            per_node.append(
                {"node": int(i), "avg_steps": float(rows.mean()), "max_steps": int(rows.max())}
            )
    return {
        "avg_steps": float(strict[pair].mean()),
        "max_steps": int(strict[pair].max()),
        "loose_avg_steps": float(loose[pair].mean()),
        "loose_max_steps": int(loose[pair].max()),
        "sampled_nodes": int(len(nodes)),
        "sampled_times": int(len(times_s)),
        "over_time": {
            "t_s": [float(t) for t in times_s],
            "avg_steps": per_time(strict, np.ma.mean, float),
            "max_steps": per_time(strict, np.ma.max, int),
            "loose_avg_steps": per_time(loose, np.ma.mean, float),
            "loose_max_steps": per_time(loose, np.ma.max, int),
        },
        "histogram": _histogram(strict[pair]),
        "per_node": per_node,
    }


def run_fields(analysis: dict) -> dict:
    """Run-level scalars of ``analysis`` for ``summary.json``'s ``run``."""
    st = analysis["staleness"]
    out = {}
    virtual = st.get("virtual")
    out["staleness_virtual_avg_steps"] = virtual["avg_steps"] if virtual else None
    out["staleness_virtual_max_steps"] = virtual["max_steps"] if virtual else None
    pairwise = st.get("pairwise")
    for key in ("avg_steps", "max_steps", "loose_avg_steps", "loose_max_steps"):
        out[f"staleness_pairwise_{key}"] = pairwise[key] if pairwise else None
    conv = analysis.get("convergence")
    if conv and conv["t_s"]:
        out["grad_norm_sq_train_final"] = conv["grad_norm_sq_train"][-1]
    return out


def node_fields(analysis: dict, node: int) -> dict:
    """Per-node S2 (of the gradients node ``node`` computed) for ``summary.json``'s ``nodes``."""
    virtual = analysis["staleness"].get("virtual")
    row = next((r for r in (virtual or {}).get("per_node", []) if r["node"] == node), None)
    return {
        "staleness_virtual_avg_steps": row["avg_steps"] if row else None,
        "staleness_virtual_max_steps": row["max_steps"] if row else None,
    }
