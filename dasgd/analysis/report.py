"""``dasgd report``: one self-contained HTML file of figures and tables from run directories.

:func:`write_report` reads finished run directories (``summary.json``, the
JSONL event logs, ``topology.json`` and, where present, ``analysis.json``)
and writes one HTML file with every figure embedded as a base64 PNG: nothing
outside the file is loaded, so it can be mailed, archived or opened offline.

What it holds:

- a table of the runs: configuration, wall time, final average-model test
  accuracy and loss, and the staleness of ALGORITHMS.md §2 (S1 apply, S2
  virtual-sequence, S3 pairwise, and tau of parameter-server runs: average
  and maximum, in steps);
- per run: test loss and accuracy of every node's model (``eval`` records)
  and of the average model against time and against the number of gradients
  of the whole run; staleness histograms and staleness over time; the
  topology with every directed edge coloured by its average apply staleness
  (PS runs: each worker's edge by its gradients' average tau); consensus
  distance and the squared gradient norm at the average model over time;
- across runs (more than one given): S2 (tau for PS runs) against the number
  of nodes.

Every part that a run cannot supply is replaced by a one-line note saying
what is missing and why (a run without ``analysis.json`` still gets its table
row and its per-node curves from the logs). matplotlib is imported only when
a report is drawn (the ``report`` extra: ``pip install 'dasgd[report]'``);
figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg
renderer, never through pyplot's global state.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import ConfigError, TopologyError
from .metrics import read_events

__all__ = ["ANALYSIS_FORMAT", "load_run", "render_report", "write_report"]

#: The ``format`` of ``analysis.json`` this module reads.
ANALYSIS_FORMAT = 1

#: Directed edges above this are drawn as undirected lines (arrows become unreadable and slow).
_MAX_ARROW_EDGES = 400
#: Graphs above this many nodes are not drawn (a hairball; the table and histograms remain).
_MAX_DRAWN_NODES = 2000
#: At most this many nodes get a legend entry each; more get a colour bar of node ids.
_MAX_LEGEND_NODES = 8
_DPI = 90

#: Key in ``analysis.json``'s ``staleness`` and label of each measure (ALGORITHMS.md §2).
_MEASURES = (
    ("apply", "S1 apply staleness"),
    ("virtual", "S2 virtual-sequence staleness"),
    ("pairwise", "S3 pairwise staleness"),
    ("tau", "tau (parameter-server delay)"),
)


@dataclass
class RunData:
    """What the report reads from one run directory.

    Attributes
    ----------
    path : Path
        The run directory.
    name : str
        Its name (the run id), unique within a report.
    summary : dict
        ``summary.json``.
    config : dict
        The resolved configuration (``summary["config"]``, else ``config.json``).
    analysis : dict or None
        ``analysis.json`` (format :data:`ANALYSIS_FORMAT`), None when absent or unreadable.
    graph : networkx.Graph or None
        ``topology.json``, None when absent or unreadable.
    logs : dict of str to list of dict
        Event records per process (``node-<i>``, ``server``).
    notes : list of str
        One line per part of the report this run cannot supply, and why.
    """

    path: Path
    name: str
    summary: dict
    config: dict
    analysis: dict | None
    graph: object | None
    logs: dict[str, list[dict]]
    notes: list[str] = field(default_factory=list)

    @property
    def algorithm(self) -> str:
        return self.summary.get("run", {}).get("algorithm") or self.config.get("algorithm", "dasgd")

    @property
    def is_ps(self) -> bool:
        return self.algorithm != "dasgd"

    @property
    def n_nodes(self) -> int | None:
        return self.summary.get("run", {}).get("n_nodes") or self.config.get("n_nodes")

    @property
    def simulated(self) -> bool:
        return bool(self.summary.get("run", {}).get("simulated"))

    @property
    def time_label(self) -> str:
        return "virtual time t_s (s)" if self.simulated else "wall time t_s (s)"


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; ValueError (with a one-line reason) otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    return data


def _process_logs(path: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """Records of every ``node-<i>.jsonl`` (in node order) and ``server.jsonl``, and notes."""
    logs, notes = {}, []
    numbered = []
    for file in path.glob("node-*.jsonl"):
        suffix = file.stem.removeprefix("node-")
        if suffix.isdigit():
            numbered.append((int(suffix), file))
    files = [file for _, file in sorted(numbered)]
    if (path / "server.jsonl").is_file():
        files.append(path / "server.jsonl")
    for file in files:
        try:
            logs[file.stem] = read_events(file)
        except (OSError, UnicodeDecodeError) as exc:
            notes.append(f"{file.name} is unreadable ({exc}): its curves are missing")
    if not files:
        notes.append("no node-<i>.jsonl event logs: no per-node curves")
    return logs, notes


def load_run(run_dir) -> RunData:
    """Read one run directory for the report.

    Parameters
    ----------
    run_dir : path-like
        A finished run directory (holds ``summary.json``).

    Returns
    -------
    RunData
        With one note per missing or unreadable optional file.

    Raises
    ------
    ConfigError
        If the directory does not exist or has no readable ``summary.json``.
    """
    from ..rundir import read_summary

    path = Path(run_dir)
    summary = read_summary(path)
    notes = []
    config = summary.get("config")
    if not isinstance(config, dict):
        try:
            config = _read_json(path / "config.json")
        except ValueError as exc:
            config = {}
            notes.append(f"config.json is {exc} and summary.json has no config: settings unknown")

    analysis = None
    analysis_path = path / "analysis.json"
    if not analysis_path.is_file():
        if config.get("record_events") is False:
            why = "the run was made with --no-events"
        else:
            why = "the run predates analysis.json or its per-event logs were switched off"
        notes.append(
            f"no analysis.json ({why}): no S2/S3 staleness, histograms, average-model or "
            "consensus curves; per-node curves and S1/tau come from the JSONL logs and summary.json"
        )
    else:
        try:
            analysis = _read_json(analysis_path)
        except ValueError as exc:
            notes.append(f"analysis.json is {exc}: the parts drawn from it are skipped")
        else:
            if analysis.get("format") != ANALYSIS_FORMAT:
                notes.append(
                    f"analysis.json has format {analysis.get('format')!r}, this dasgd reads format "
                    f"{ANALYSIS_FORMAT}: the parts drawn from it are skipped"
                )
                analysis = None
            else:  # what the analysis itself could not compute, and why
                notes += [f"analysis.json: {note}" for note in analysis.get("notes") or []]

    graph = None
    if (path / "topology.json").is_file():
        from ..topology import parse_topology

        try:
            graph = parse_topology(str(path / "topology.json"))
        except TopologyError as exc:
            notes.append(f"topology.json is unusable ({exc}): no graph drawing")
    else:
        notes.append("no topology.json: no graph drawing")
    logs, log_notes = _process_logs(path)
    return RunData(
        path=path,
        name=path.resolve().name,
        summary=summary,
        config=config,
        analysis=analysis,
        graph=graph,
        logs=logs,
        notes=notes + log_notes,
    )


# --------------------------------------------------------------------------- data


def _get(d, *keys, default=None):
    """``d[k1][k2]...``, or ``default`` where any level is missing or None."""
    for key in keys:
        if not isinstance(d, dict) or d.get(key) is None:
            return default
        d = d[key]
    return d


def _floats(values) -> np.ndarray:
    """A float64 array with None as NaN."""
    if values is None:
        return np.array([], dtype=np.float64)
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _measure(run: RunData, key: str) -> dict | None:
    return _get(run.analysis, "staleness", key)


def _avg_max(run: RunData, key: str) -> tuple[float | None, float | None]:
    """Average and maximum of a staleness measure, in steps.

    From ``analysis.json``, else from summary.json (older runs name S1
    ``staleness_*``, newer ones ``staleness_apply_*``). tau is summary.json's
    Definition 4 value (in-flight gradients counted) where present.
    """
    r = run.summary["run"]
    if key == "tau" and run.is_ps and r.get("tau_avg_steps") is not None:
        return r.get("tau_avg_steps"), r.get("tau_max_steps")
    measure = _measure(run, key)
    if measure is not None:
        return measure.get("avg_steps"), measure.get("max_steps")
    if key == "apply" and not run.is_ps:
        avg = r.get("staleness_apply_avg_steps", r.get("staleness_avg_steps"))
        return avg, r.get("staleness_apply_max_steps", r.get("staleness_max_steps"))
    if key in ("virtual", "pairwise"):
        return r.get(f"staleness_{key}_avg_steps"), r.get(f"staleness_{key}_max_steps")
    return None, None


@dataclass
class Curve:
    """One model's test curve: ``label``, and arrays of equal length (NaN where not evaluated)."""

    label: str
    node: int | str
    t_s: np.ndarray
    gradients: np.ndarray
    test_loss: np.ndarray
    test_accuracy: np.ndarray


def _total_gradients(run: RunData, t_s: np.ndarray) -> np.ndarray:
    """Gradients of the whole run at times ``t_s``: the sum over nodes/workers of their step counts.

    Each process's step count is interpolated linearly between its records
    (0 before its first). In a real run each log's ``t_s`` counts from its own
    process's start, so this is close, not exact.
    """
    total = np.zeros(len(t_s))
    for name, records in run.logs.items():
        if name == "server":
            continue
        points = sorted(
            (r["t_s"], r["step"])
            for r in records
            if isinstance(r.get("t_s"), int | float) and isinstance(r.get("step"), int | float)
        )
        if points:
            ts, steps = np.array(points, dtype=np.float64).T
            total += np.interp(t_s, ts, steps, left=0.0)
    return total


def node_curves(run: RunData) -> list[Curve]:
    """Every node's (PS: the server's) test curve, from ``analysis.json`` or the ``eval`` records."""
    nodes = _get(run.analysis, "nodes")
    if nodes:
        return [
            Curve(
                label="server" if n["node"] == "server" else f"node {n['node']}",
                node=n["node"],
                t_s=_floats(n["t_s"]),
                gradients=_floats(n["gradients"]),
                test_loss=_floats(n["test_loss"]),
                test_accuracy=_floats(n["test_accuracy"]),
            )
            for n in nodes
        ]
    curves = []
    for name, records in run.logs.items():
        evals = [r for r in records if r.get("kind") == "eval"]
        if evals:
            node = "server" if name == "server" else evals[0].get("node", name)
            curves.append(
                Curve(
                    label="server" if node == "server" else f"node {node}",
                    node=node,
                    t_s=_floats(r.get("t_s") for r in evals),
                    gradients=np.array([]),
                    test_loss=_floats(r.get("test_loss") for r in evals),
                    test_accuracy=_floats(r.get("test_accuracy") for r in evals),
                )
            )
    if curves:  # one pass over the logs for every evaluation time of every node
        grid = np.unique(np.concatenate([c.t_s for c in curves]))
        total = _total_gradients(run, grid)
        for c in curves:
            c.gradients = np.interp(c.t_s, grid, total)
    return curves


def average_curve(run: RunData) -> Curve | None:
    """The average model's test curve (``analysis.json``'s convergence), or None."""
    conv = _get(run.analysis, "convergence")
    if not conv or not conv.get("t_s"):
        return None
    loss = _floats(conv.get("average_model_test_loss"))
    if not np.isfinite(loss).any():
        return None
    return Curve(
        label="average model",
        node="average",
        t_s=_floats(conv["t_s"]),
        gradients=_floats(conv.get("gradients")),
        test_loss=loss,
        test_accuracy=_floats(conv.get("average_model_test_accuracy")),
    )


# --------------------------------------------------------------------------- table


def _fmt(value, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return format(value, spec)


def _topology_label(run: RunData) -> str:
    if run.is_ps:
        return "server (star)"
    spec = str(_get(run.config, "topology", "spec", default="?"))
    return Path(spec).name if "/" in spec else spec


def _model_label(config: dict) -> str:
    name = _get(config, "model", "name", default="?")
    if name == "mlp":
        hidden = _get(config, "model", "hidden", default=[])
        name += " " + ",".join(str(h) for h in hidden)
    return name


def _emulation_label(config: dict) -> str:
    parts = []
    if _get(config, "emulation", "slowdown"):
        parts.append(f"slowdown {config['emulation']['slowdown']}")
    if _get(config, "emulation", "latency"):
        parts.append(f"latency {config['emulation']['latency']} s")
    bandwidth = _get(config, "sim", "bandwidth_bps")
    if bandwidth:
        parts.append(f"bandwidth {bandwidth:.3g} bit/s")
    return "; ".join(parts) or "–"


TABLE_COLUMNS = (
    "run",
    "algorithm",
    "n",
    "topology",
    "model",
    "dataset",
    "lr",
    "batch",
    "b",
    "compute time",
    "slowdown / latency",
    "wall time (s)",
    "test acc (avg model)",
    "test loss (avg model)",
    "S1 avg / max",
    "S2 avg / max",
    "S3 avg / max",
    "tau avg / max",
)


def table_row(run: RunData) -> list[str]:
    """The run's cells, in :data:`TABLE_COLUMNS` order, as text ("–" where unknown)."""
    r, c = run.summary["run"], run.config

    def pair(key):
        avg, mx = _avg_max(run, key)
        return "–" if avg is None and mx is None else f"{_fmt(avg)} / {_fmt(mx)}"

    wall = _fmt(r.get("wall_s"), ".3g") + (" (virtual)" if run.simulated else "")
    return [
        run.name,
        run.algorithm,
        _fmt(run.n_nodes),
        _topology_label(run),
        _model_label(c),
        str(_get(c, "data", "dataset", default="?")),
        _fmt(_get(c, "train", "lr")),
        _fmt(_get(c, "train", "batch_size")),
        "–" if run.is_ps else _fmt(_get(c, "train", "send_every")),
        _get(c, "emulation", "compute_time") or "–",
        _emulation_label(c),
        wall,
        _fmt(r.get("average_model_test_accuracy"), ".4f"),
        _fmt(r.get("average_model_test_loss"), ".4f"),
        pair("apply"),
        pair("virtual"),
        pair("pairwise"),
        pair("tau"),
    ]


# --------------------------------------------------------------------------- figures


def _import_matplotlib():
    """matplotlib, with the Agg backend unless pyplot is already in use; ConfigError without it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("dasgd report needs matplotlib: pip install 'dasgd[report]'") from None
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return matplotlib


def _figure(width_in: float, height_in: float, **kwargs):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), layout="constrained", **kwargs)


def _png(fig) -> str:
    """The figure as base64 PNG (the figure is then discarded)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _node_colours(curves: list[Curve]):
    """One colour per curve: tab10 for a legend's worth of nodes, viridis by node id beyond."""
    import matplotlib as mpl

    numbered = [c.node for c in curves if isinstance(c.node, int)]
    top = max(numbered, default=0)
    colours = []
    for c in curves:
        if not isinstance(c.node, int):
            colours.append("tab:blue")  # the parameter server's model
        elif len(numbered) <= _MAX_LEGEND_NODES:
            colours.append(mpl.colormaps["tab10"](c.node % 10))
        else:
            colours.append(mpl.colormaps["viridis"](c.node / max(top, 1)))
    return colours, top


def _log_y(ax) -> None:
    """Log-scale y with plain tick labels ("0.2", "1e-05"; 2, 3 and 5 between decades when the
    data span under two): matplotlib's default mathtext labels cost about a second to set up."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = ax.get_ylim()
    if low > 0 and high / low < 100:

        def minor(v, _):
            mantissa = v / 10 ** math.floor(math.log10(v))
            return f"{v:g}" if min(abs(mantissa - m) for m in (2, 3, 5)) < 1e-6 else ""

        ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _break_gaps(t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Time-binned ``t, y`` with a NaN where ``t`` skips bins (more than 1.5 median steps): no
    line across bins nothing happened in (a straggler working alone, say)."""
    if len(t) < 3:
        return t, y
    dt = np.diff(t)
    gaps = np.flatnonzero(dt > 1.5 * max(float(np.median(dt)), 1e-12)) + 1
    return np.insert(t, gaps, np.nan), np.insert(y.astype(np.float64), gaps, np.nan)


def _plot_lines(ax, xs: list[np.ndarray], ys: list[np.ndarray], colours) -> None:
    """Many curves as one LineCollection (fast for hundreds of nodes); NaN points are skipped."""
    from matplotlib.collections import LineCollection

    segments, segment_colours = [], []
    for x, y, colour in zip(xs, ys, colours, strict=True):
        keep = np.isfinite(x) & np.isfinite(y)
        if keep.sum() >= 1:
            points = np.column_stack([x[keep], y[keep]])
            if len(points) == 1:  # a single evaluation: a dot instead of a line
                ax.plot(points[:, 0], points[:, 1], "o", ms=3, color=colour)
                continue
            segments.append(points)
            segment_colours.append(colour)
    if segments:
        ax.add_collection(
            LineCollection(segments, colors=segment_colours, linewidths=1.0, alpha=0.8)
        )
        ax.autoscale_view()


def figure_curves(run: RunData, curves: list[Curve], average: Curve | None) -> str:
    """Test loss and accuracy of every node (and the average model) against time and gradients."""
    import matplotlib as mpl
    from matplotlib.lines import Line2D

    fig = _figure(11, 6.2)
    axes = fig.subplots(2, 2, sharex="col", sharey="row")
    colours, top = _node_colours(curves)
    panels = [
        (axes[0, 0], "t_s", "test_loss"),
        (axes[0, 1], "gradients", "test_loss"),
        (axes[1, 0], "t_s", "test_accuracy"),
        (axes[1, 1], "gradients", "test_accuracy"),
    ]
    for ax, x, y in panels:
        _plot_lines(ax, [getattr(c, x) for c in curves], [getattr(c, y) for c in curves], colours)
        if average is not None:
            keep = np.isfinite(getattr(average, x)) & np.isfinite(getattr(average, y))
            ax.plot(getattr(average, x)[keep], getattr(average, y)[keep], color="black", lw=2.2)
        ax.grid(alpha=0.3)
    _log_y(axes[0, 0])
    axes[0, 0].set_ylabel("test loss (log scale)")
    axes[1, 0].set_ylabel("test accuracy")
    axes[1, 0].set_xlabel(run.time_label)
    axes[1, 1].set_xlabel("gradients, all nodes")
    n_numbered = sum(isinstance(c.node, int) for c in curves)
    handles = []
    if n_numbered > _MAX_LEGEND_NODES:
        norm = mpl.colors.Normalize(0, top)
        fig.colorbar(
            mpl.cm.ScalarMappable(norm=norm, cmap="viridis"),
            ax=axes,
            label=f"node id ({n_numbered} nodes, one line each)",
            shrink=0.8,
        )
    else:
        handles += [
            Line2D([], [], color=colour, lw=1.2, label=c.label)
            for c, colour in zip(curves, colours, strict=True)
        ]
    if average is not None:
        handles.append(Line2D([], [], color="black", lw=2.2, label="average model"))
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=9, frameon=False)
    fig.suptitle(f"{run.name}: test loss and accuracy", fontsize=11)
    return _png(fig)


def _measures_present(run: RunData) -> list[tuple[str, str, dict]]:
    """``(key, label, measure)`` of each staleness measure ``analysis.json`` holds."""
    return [(key, label, m) for key, label in _MEASURES if (m := _measure(run, key)) is not None]


def _interval_series(run: RunData, prefix: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled ``prefix_{avg,max}_steps`` of interval records over time (count-weighted, ~40 bins)."""
    rows = [
        (r["t_s"], r[f"{prefix}_avg_steps"], r.get(f"{prefix}_max_steps"), r[f"{prefix}_count"])
        for records in run.logs.values()
        for r in records
        if r.get("kind") == "interval"
        and r.get(f"{prefix}_count")
        and r.get(f"{prefix}_avg_steps") is not None
    ]
    if len({row[0] for row in rows}) < 2:
        return np.array([]), np.array([]), np.array([])
    t, avg, mx, count = (_floats(col) for col in zip(*rows, strict=True))
    edges = np.linspace(t.min(), t.max(), min(40, len(set(t))) + 1)
    which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)
    ts, avgs, maxs = [], [], []
    for b in np.unique(which):
        sel = which == b
        ts.append(float(np.average(t[sel], weights=count[sel])))
        avgs.append(float(np.average(avg[sel], weights=count[sel])))
        maxs.append(float(np.nanmax(mx[sel])) if np.isfinite(mx[sel]).any() else np.nan)
    return np.array(ts), np.array(avgs), np.array(maxs)


def figure_staleness(run: RunData) -> tuple[str | None, str]:
    """Each staleness measure (a column each): its histogram above, avg and max over time below.

    Measures come from ``analysis.json``; without it, the pooled interval
    records of the logs give S1 (DASGD) or tau (the server) over time alone.

    Returns
    -------
    png : str or None
        Base64 PNG, None when the run has no staleness data at all.
    source : str
        Where the data came from, for the caption.
    """
    columns = []  # (title, histogram or None, (t, series) or None)
    for key, label, m in _measures_present(run):
        hist = m.get("histogram") if _get(m, "histogram", "counts") else None
        over = m.get("over_time") or {}
        timeline = None
        if over.get("t_s"):
            series = [("avg", over.get("avg_steps"), "-"), ("max", over.get("max_steps"), "--")]
            if key == "pairwise":
                series += [
                    ("loose avg", over.get("loose_avg_steps"), ":"),
                    ("loose max", over.get("loose_max_steps"), "-."),
                ]
            timeline = (_floats(over["t_s"]), series)
        if hist or timeline:
            title = f"{label}\navg {_fmt(m.get('avg_steps'))}, max {_fmt(m.get('max_steps'))} steps"
            columns.append((title, hist, timeline))
    source = "analysis.json"
    if not columns:  # older runs: the interval records' S1 (DASGD) or tau (server)
        if run.is_ps:
            label = "tau (server's interval records)"
            t, avg, mx = _interval_series(run, "tau")
        else:  # S1 is staleness_apply_* in newer logs, staleness_* in older ones
            label = "S1 apply staleness (interval records)"
            t, avg, mx = _interval_series(run, "staleness_apply")
            if not len(t):
                t, avg, mx = _interval_series(run, "staleness")
        if len(t):
            columns.append((label, None, (t, [("avg", avg, "-"), ("max", mx, "--")])))
            source = "the interval records of the JSONL logs; histograms need analysis.json"
    if not columns:
        return None, source
    rows = int(any(h for _, h, _ in columns)) + int(any(tl for _, _, tl in columns))
    fig = _figure(3.5 * len(columns) + 0.3, 2.7 * rows + 0.3)
    axes = np.array(fig.subplots(rows, len(columns), squeeze=False))
    for j, (title, hist, timeline) in enumerate(columns):
        i = 0
        if rows == 2 or hist:
            ax = axes[0, j]
            i = 1
            if hist:
                counts = _floats(hist["counts"])
                ax.stairs(counts, _floats(hist["bin_edges"]), fill=True, alpha=0.7)
                ax.set_xlabel("staleness (steps)")
                ax.set_ylabel("count")
                positive = counts[counts > 0]
                if len(positive) and positive.max() / positive.min() > 100:  # a long tail
                    _log_y(ax)
                    ax.set_ylabel("count (log scale)")
                ax.grid(alpha=0.3)
            else:
                ax.set_axis_off()
            ax.set_title(title, fontsize=9)
        if timeline:
            ax = axes[i, j]
            t, series = timeline
            for name, values, style in series:
                if values is not None:
                    ax.plot(
                        *_break_gaps(t, _floats(values)),
                        style,
                        lw=1.3,
                        marker=".",
                        ms=3,
                        label=name,
                    )
            ax.set_xlabel(run.time_label)
            ax.set_ylabel("staleness (steps)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if i == 0:
                ax.set_title(title, fontsize=9)
        elif i < rows:
            axes[i, j].set_axis_off()
    return _png(fig), source


def _edge_values(run: RunData) -> tuple[dict[tuple, float], str]:
    """Average staleness per directed edge (src, dst) in steps, and what it is."""
    if run.is_ps:
        per_node = _get(run.analysis, "staleness", "tau", "per_node")
        if per_node:
            pairs = ((n["node"], n.get("avg_steps")) for n in per_node)
        else:
            pairs = ((n.get("node"), n.get("tau_avg_steps")) for n in run.summary.get("nodes", []))
        server = run.n_nodes
        return {
            (node, server): value for node, value in pairs if value is not None
        }, "tau avg of the worker's gradients, steps"
    per_edge = _get(run.analysis, "staleness", "apply", "per_edge")
    if per_edge:
        pairs = ((e["src"], e["dst"], e.get("avg_steps")) for e in per_edge)
    else:
        pairs = (
            (
                e.get("src"),
                e.get("dst"),
                e.get("staleness_apply_avg_steps", e.get("staleness_avg_steps")),
            )
            for e in run.summary.get("edges", [])
        )
    return {
        (s, d): v for s, d, v in pairs if v is not None
    }, "S1 avg of deltas applied at dst from src, steps"


def _layout(graph, spec: str) -> dict:
    """Node positions: circular for rings and circulant graphs, the hub in the middle of a
    star, Kamada-Kawai (deterministic) up to 100 nodes, else a spring layout with seed 0."""
    import networkx as nx

    n = graph.number_of_nodes()
    name = spec.split(":")[0].split("/")[-1]
    degrees = dict(graph.degree)
    hub = max(degrees, key=degrees.get) if degrees else None
    if n > 2 and degrees[hub] == n - 1 and graph.number_of_edges() == n - 1:  # a star
        pos = nx.circular_layout(graph.subgraph([v for v in graph.nodes if v != hub]))
        pos[hub] = np.zeros(2)
        return pos
    if n > 300 or name in ("ring", "complete", "exponential"):
        return nx.circular_layout(graph)
    if n <= 100:
        return nx.kamada_kawai_layout(graph)
    return nx.spring_layout(graph, seed=0)


def figure_graph(run: RunData) -> tuple[str | None, str]:
    """The topology with directed edges coloured by average staleness; and a note if not drawn."""
    import matplotlib as mpl
    import networkx as nx

    graph = run.graph
    if graph is None:
        return None, ""
    n = graph.number_of_nodes()
    if n > _MAX_DRAWN_NODES:
        return None, f"graph of {n} nodes not drawn (more than {_MAX_DRAWN_NODES}: unreadable)"
    values, what = _edge_values(run)
    spec = str(_get(run.config, "topology", "spec", default="")) if not run.is_ps else "star"
    pos = _layout(graph, spec)
    size_in = 5.0 if n <= 32 else 7.0
    fig = _figure(size_in + 1.3, size_in)
    ax = fig.add_subplot()
    ax.set_axis_off()
    cmap = mpl.colormaps["plasma"]
    finite = [v for v in values.values() if math.isfinite(v)]
    norm = mpl.colors.Normalize(min(finite, default=0.0), max(finite, default=1.0))
    node_size = 300 if n <= 32 else max(2, 3000 // n)
    server = run.n_nodes if run.is_ps else None
    node_colours = ["#ffd27f" if v == server else "#d9d9d9" for v in graph.nodes]
    nodes = nx.draw_networkx_nodes(
        graph,
        pos,
        ax=ax,
        node_size=node_size,
        node_color=node_colours if n <= 64 else "#555555",
        edgecolors="#555555",
        linewidths=1.0 if n <= 64 else 0.0,
    )
    nodes.set_zorder(3 if n <= 64 else 0)  # small dots of large graphs go under the edges
    if n <= 32:
        labels = {v: ("S" if v == server else str(v)) for v in graph.nodes}
        nx.draw_networkx_labels(graph, pos, labels=labels, ax=ax, font_size=8)
    directed = [(s, d) for s, d in values if graph.has_edge(s, d)]
    missing = [e for e in graph.edges if (e[0], e[1]) not in values and (e[1], e[0]) not in values]
    if missing:
        nx.draw_networkx_edges(graph, pos, edgelist=missing, ax=ax, edge_color="#bbbbbb", width=0.8)
    if run.is_ps or len(directed) > _MAX_ARROW_EDGES:
        # one line per undirected edge, coloured by the mean of its directions
        undirected: dict[tuple, list[float]] = {}
        for s, d in directed:
            undirected.setdefault(tuple(sorted((s, d), key=str)), []).append(values[(s, d)])
        edgelist = list(undirected)
        nx.draw_networkx_edges(
            graph,
            pos,
            edgelist=edgelist,
            ax=ax,
            width=2.0 if n <= 64 else 1.2,
            edge_color=[cmap(norm(float(np.mean(undirected[e])))) for e in edgelist],
        )
    elif directed:
        digraph = nx.DiGraph()
        digraph.add_nodes_from(graph.nodes)
        digraph.add_edges_from(directed)
        nx.draw_networkx_edges(
            digraph,
            pos,
            edgelist=directed,
            ax=ax,
            width=2.0,
            arrowsize=9,
            node_size=node_size,
            connectionstyle="arc3,rad=0.12",
            edge_color=[cmap(norm(values[e])) for e in directed],
        )
    if directed:
        fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=what, shrink=0.8)
    kind = (
        f"{n - 1} workers and the server S" if run.is_ps else f"{_topology_label(run)}, {n} nodes"
    )
    ax.set_title(f"{run.name}: {kind}", fontsize=10)
    note = (
        "no per-edge staleness in summary.json or analysis.json: edges drawn grey"
        if graph.number_of_edges() and not directed
        else ""
    )
    return _png(fig), note


def figure_convergence(run: RunData) -> tuple[str | None, str]:
    """Consensus distance and |grad f(average model)|^2 over time, from ``analysis.json``.

    Returns
    -------
    png : str or None
        Base64 PNG, None when neither curve is present.
    caption : str
        What is drawn.
    """
    conv = _get(run.analysis, "convergence")
    if not conv or not conv.get("t_s"):
        return None, ""
    t = _floats(conv["t_s"])
    exact = conv.get("consensus_exact", True)
    panels = [
        (
            "consensus_distance_rel",
            "consensus distance max_i |x_i - mean| / |mean|"
            + ("" if exact else "\n(estimated from model sketches)"),
        ),
        ("grad_norm_sq_train", "|grad f(average model)|^2 on the training set"),
    ]
    panels = [
        (key, title, _floats(conv.get(key)))
        for key, title in panels
        if (np.isfinite(_floats(conv.get(key))) & (_floats(conv.get(key)) > 0)).any()
    ]
    if not panels:
        return None, ""
    what = {
        "consensus_distance_rel": "the relative consensus distance between the node models"
        + ("" if exact else " (estimated from CountSketches of the models)"),
        "grad_norm_sq_train": "the squared norm of the training-loss gradient at the average model",
    }
    fig = _figure(4.6 * len(panels) + 0.4, 3.0)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (_, title, values) in zip(axes, panels, strict=True):
        keep = np.isfinite(values) & (values > 0)
        ax.plot(t[keep], values[keep], ".-", lw=1.2, ms=3)
        _log_y(ax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(run.time_label)
        ax.grid(alpha=0.3)
    caption = " and ".join(what[key] for key, _, _ in panels)
    return _png(fig), f"{caption[0].upper()}{caption[1:]} over time (log scale)."


def _scaling_points(runs: list[RunData]) -> dict[str, list[tuple[int, float, float | None]]]:
    """S2 (DASGD) or tau (PS) avg and max per run, in series of one algorithm and setup
    (topology and b for DASGD; real and simulated runs apart)."""
    series: dict[str, list] = {}
    for run in runs:
        key = "tau" if run.is_ps else "virtual"
        avg, mx = _avg_max(run, key)
        if avg is None or run.n_nodes is None:
            continue
        if run.is_ps:
            label = f"{run.algorithm}: tau"
        else:
            b = _fmt(_get(run.config, "train", "send_every"))
            label = f"dasgd {_topology_label(run)}, b={b}: S2"
        label += " (simulated)" if run.simulated else ""
        series.setdefault(label, []).append((run.n_nodes, avg, mx))
    return {k: sorted(v) for k, v in sorted(series.items())}


def figure_scaling(runs: list[RunData]) -> str | None:
    """S2 / tau average and maximum against the number of nodes (None without points)."""
    series = _scaling_points(runs)
    if not series:
        return None
    fig = _figure(10, 3.6)
    axes = fig.subplots(1, 2, sharex=True)
    ns = sorted({n for points in series.values() for n, *_ in points})
    for label, points in series.items():
        n, avg, mx = (np.array(col, dtype=np.float64) for col in zip(*points, strict=True))
        line = axes[0].plot(n, avg, "o-", label=label)[0]
        axes[1].plot(n, mx, "s--", color=line.get_color())
    for ax, title in zip(axes, ("average", "maximum"), strict=True):
        ax.plot(
            ns, [k - 1 for k in ns], "x:", color="gray", label="n - 1" if ax is axes[0] else None
        )
        ax.set_title(f"{title} (steps)", fontsize=10)
        ax.set_xlabel("number of nodes / workers n")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        if len(ns) > 1 and ns[-1] / max(ns[0], 1) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(k) for k in ns])
    axes[0].set_ylabel("S2 (DASGD) or tau (PS), steps")
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)
    return _png(fig)


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.4em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; white-space: normal; vertical-align: bottom; max-width: 7em; }
.row { display: flex; flex-wrap: wrap; gap: 0 1.5em; align-items: flex-start; } td:first-child, td:nth-child(2), td:nth-child(4) { text-align: left; }
.scroll { overflow-x: auto; }
figure { margin: 0.6em 0 1.2em 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.85em; color: #555; }
.note { color: #8a5a00; font-size: 0.9em; margin: 0.2em 0; }
"""

# Sets data-figures-loaded on <body> to the number of figures decoded (checked in headless browsers).
_SCRIPT = """
<script>
function dasgdMarkFigures() {
  var loaded = 0;
  for (var i = 0; i < document.images.length; i++) {
    var img = document.images[i];
    if (img.complete && img.naturalWidth > 0) { loaded++; }
  }
  document.body.dataset.figuresLoaded = loaded;
}
window.addEventListener('load', dasgdMarkFigures);
</script>
"""


def _img(name: str, png: str, caption: str) -> str:
    return (
        f'<figure><img data-figure="{html.escape(name)}" alt="{html.escape(caption)}" '
        f'src="data:image/png;base64,{png}"><figcaption>{html.escape(caption)}</figcaption></figure>'
    )


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _unique_names(runs: list[RunData]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            seen[run.name] += 1
            run.name = f"{run.name} ({seen[run.name]})"
        else:
            seen[run.name] = 1


def _run_section(run: RunData, figures: list[str]) -> list[str]:
    """HTML of one run's section; appends each figure's name to ``figures``."""
    anchor = html.escape(run.name)
    parts = [f'<h2 id="{anchor}">{anchor}</h2>']
    notes = run.notes  # the section's own notes join the run's
    wide: list[str] = []  # the curves, full width
    row: list[str] = []  # the smaller figures, side by side where the window is wide enough

    def add(kind: str, png: str | None, caption: str) -> None:
        if png is not None:
            figures.append(f"{run.name}/{kind}")
            (wide if kind == "curves" else row).append(_img(f"{run.name}/{kind}", png, caption))

    curves = node_curves(run)
    average = average_curve(run)
    if run.is_ps and any(c.node == "server" for c in curves):
        average = None  # the server's model is the only model
    if curves or average is not None:
        n_evals = max((int(np.isfinite(c.test_loss).sum()) for c in curves), default=0)
        if curves and n_evals < 3:
            notes.append(
                f"only {n_evals} evaluation(s) per model in the logs: lower --eval-interval-s "
                "for more points on the curves"
            )
        source = (
            "analysis.json" if _get(run.analysis, "nodes") else "the eval records of the JSONL logs"
        )
        what = "the server's model" if run.is_ps else "each node's model"
        add(
            "curves",
            figure_curves(run, curves, average),
            f"Test loss and accuracy of {what}"
            + (" and of the average model" if average is not None else "")
            + f" against {run.time_label.split(' t_s')[0]} and against the gradients of the whole run"
            + f" (from {source}).",
        )
    else:
        notes.append("no eval records in the logs (run with --eval-interval-s 0?): no test curves")

    png, source = figure_staleness(run)
    measure_notes = "".join(
        f" {label}: {m['note']}." for _, label, m in _measures_present(run) if m.get("note")
    )
    add(
        "staleness",
        png,
        "Staleness (ALGORITHMS.md §2), in steps: distribution (where known) and average and "
        f"maximum over time (from {source}).{measure_notes}",
    )
    if png is None:
        notes.append(
            "no staleness figure: no staleness in analysis.json, and the interval records hold "
            "it at fewer than 2 times (a shorter --log-interval-s gives more)"
        )
    png, note = figure_graph(run)
    _, what = _edge_values(run)
    add("graph", png, f"Topology; edge colour: {what}.")
    if note:
        notes.append(note)
    png, caption = figure_convergence(run)
    add("convergence", png, caption)
    if png is None and run.analysis is not None and not run.analysis.get("notes"):
        notes.append("analysis.json has no consensus distance or gradient norm curves")
    parts += [_note(n) for n in notes]
    r = run.summary["run"]
    parts.append(
        f"<p>{html.escape(run.algorithm)}, {_fmt(run.n_nodes)} nodes, {_fmt(r.get('steps'))} gradients, "
        f"directory <code>{html.escape(str(run.path))}</code></p>"
    )
    return parts + wide + (['<div class="row">', *row, "</div>"] if row else [])


def render_report(run_dirs) -> tuple[str, list[str], dict[str, list[str]]]:
    """Build the report of the given run directories.

    Parameters
    ----------
    run_dirs : sequence of path-like
        Finished run directories (each holds ``summary.json``), in table order.

    Returns
    -------
    html : str
        A self-contained HTML document (figures are base64 PNG ``<img>``).
    figures : list of str
        The figure names in document order (``RUN/curves``, ``RUN/graph``, ...,
        ``scaling``); one ``<img data-figure=...>`` each.
    notes : dict of str to list of str
        Per run name, what is missing from its part of the report and why.

    Raises
    ------
    ConfigError
        A run directory is missing or has no readable ``summary.json``;
        matplotlib is not installed.
    """
    if not run_dirs:
        raise ConfigError("no run directory given: dasgd report RUN_DIR [RUN_DIR ...]")
    runs = [load_run(d) for d in run_dirs]
    _import_matplotlib()
    _unique_names(runs)
    figures: list[str] = []
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in table_row(run)) + "</tr>"
        for run in runs
    )
    header = "".join(f"<th>{html.escape(col)}</th>" for col in TABLE_COLUMNS)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>dasgd report: {html.escape(', '.join(r.name for r in runs))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>dasgd report</h1>",
        f"<p>{len(runs)} run(s), generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. "
        "Staleness in steps (ALGORITHMS.md §2): S1 apply staleness per delta application, "
        "S2 virtual-sequence staleness per gradient, S3 pairwise staleness between models, "
        "tau the parameter server's delay (Koloskova et al. 2022, Def. 4).</p>",
        "<h2>Runs</h2>",
        f'<div class="scroll"><table><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table></div>',
    ]
    if len(runs) > 1:
        parts.append("<h2>Staleness against the number of nodes</h2>")
        png = figure_scaling(runs)
        if png is None:
            parts.append(_note("no run has S2 (analysis.json) or tau: nothing to plot"))
        else:
            figures.append("scaling")
            parts.append(
                _img(
                    "scaling",
                    png,
                    "S2 virtual-sequence staleness (DASGD) and tau (parameter server) against "
                    "the number of nodes; dotted: n - 1, the parameter server's tau_avg with n "
                    "always-busy workers (Koloskova et al. 2022, Remark 5).",
                )
            )
            missing = [
                r.name for r in runs if _avg_max(r, "tau" if r.is_ps else "virtual")[0] is None
            ]
            if missing:
                parts.append(_note(f"not in this figure (no S2 or tau): {', '.join(missing)}"))
    for run in runs:
        parts += _run_section(run, figures)
    parts += [_SCRIPT, "</body></html>"]
    return "\n".join(parts) + "\n", figures, {r.name: r.notes for r in runs}


def write_report(run_dirs, out_path) -> tuple[Path, list[str], dict[str, list[str]]]:
    """Write :func:`render_report`'s HTML to ``out_path``.

    Parameters
    ----------
    run_dirs : sequence of path-like
        Finished run directories.
    out_path : path-like
        The HTML file (overwritten); its directory must exist.

    Returns
    -------
    path : Path
        ``out_path``.
    figures, notes
        As returned by :func:`render_report`.

    Raises
    ------
    ConfigError
        As :func:`render_report`; or ``out_path``'s directory does not exist or
        is not writable.
    """
    out = Path(out_path)
    if not out.parent.is_dir():
        raise ConfigError(
            f"cannot write the report to {str(out_path)!r}: directory {str(out.parent)!r} "
            "does not exist"
        )
    if out.is_dir():
        raise ConfigError(f"cannot write the report to {str(out_path)!r}: it is a directory")
    text, figures, notes = render_report(run_dirs)
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot write the report to {str(out_path)!r}: {exc.strerror or exc}"
        ) from None
    return out, figures, notes
