"""Emulated stragglers and link latency (the kernel here has no netem).

Two specs, both strings so they fit a command line and ``config.json``:

Slowdown (per-node compute speed; ``--slowdown``):

- ``""``: every node at full speed.
- ``"NODE:FACTOR[,NODE:FACTOR...]"``: node NODE computes FACTOR times slower
  (FACTOR >= 1), e.g. ``"2:4"`` makes node 2 a 4x straggler.
- ``"random:SEED[:ALPHA]"``: a heavy-tailed profile: factor_i = 1 + Lomax(ALPHA)
  drawn with SEED (ALPHA = 1.5 by default; smaller = heavier tail), capped at
  :data:`MAX_FACTOR`.

A node with factor f waits (f - 1) times the measured duration of its own
work (receiving, applying, the local step, sending), paid between reading the
model and producing the update (:class:`Slowdown`): a machine f times slower
at everything, whose gradients are computed on an older model. With
``--compute-time``, every emulated gradient time is multiplied by f as well.
Waits are batched to ~1 ms for accuracy.

Compute time (emulated seconds per gradient; ``--compute-time``, see
:func:`parse_compute_time`): a wait between reading the model and producing
the update, during which the node keeps receiving, applying and relaying, as
a node whose gradient runs on an accelerator does. Nodes then do not compete
for CPU cores, so many node processes fit on a small machine.

Latency (per-link one-way delay in seconds; ``--latency``):

- ``""``: none.
- ``"SECONDS"``: every link.
- ``"U-V:SECONDS[,U-V:SECONDS...]"``: the undirected link U-V (both directions);
  may start with a default, e.g. ``"0.001,0-3:0.05"``.

The transport holds each outgoing message until its due time (a delay queue),
so per-link order is kept. For parameter-server runs the links are
``worker-server`` with the server's id being ``n_nodes``.

Partitions (links or hosts cut for a while; ``--partition``, repeatable, see
:func:`parse_partition`):

- ``"U-V@START+DURATION"``: the link U-V is cut, in both directions, from
  run-clock time START seconds for DURATION seconds.
- ``"NODE@START+DURATION"``: node NODE is cut from all its neighbours (a host
  cut), in both directions.
- Several items, comma-separated (or the flag repeated).

A cut emulates a TCP link that is down and comes back: nothing is lost and
nothing arrives during the cut. A message due to leave on a cut link (its
send time plus the link's latency) is held by the sender and leaves, in
order, when the cut ends (:meth:`Partitions.release_s`); the simulator
delays its arrival the same way. Times are on the run clock (seconds since
the launcher said start, the ``t_s`` of the logs; virtual seconds in a
simulation).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError

__all__ = [
    "MAX_FACTOR",
    "ComputeTime",
    "Partitions",
    "Slowdown",
    "parse_bandwidth",
    "parse_compute_time",
    "parse_latency",
    "parse_partition",
    "parse_slowdown",
    "resolve_latency",
    "resolve_partition",
    "resolve_slowdown",
]

#: Largest slowdown factor a random profile draws.
MAX_FACTOR = 20.0
#: Largest slowdown factor a spec may name.
MAX_EXPLICIT_FACTOR = 1000.0
#: Largest one-way link latency a spec may name, in seconds.
MAX_LATENCY_S = 10.0
#: Largest emulated compute time per gradient a spec may name, in seconds.
MAX_COMPUTE_S = 60.0
#: Owed straggler time is paid in waits of at least this long, in seconds.
SLEEP_QUANTUM_S = 1e-3


def _number(text: str, what: str, spec: str, flag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} in {spec!r} is not a number ({flag})") from None
    if not math.isfinite(value):
        raise ConfigError(f"{what} {text!r} in {spec!r} must be finite ({flag})")
    return value


def _node(text: str, spec: str, flag: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        raise ConfigError(f"node {text!r} in {spec!r} must be a node id >= 0 ({flag})")
    return int(text)


def parse_slowdown(spec: str) -> dict:
    """Check a slowdown spec's syntax.

    Returns
    -------
    dict
        ``{"kind": "none"}``, ``{"kind": "nodes", "factors": {node: factor}}`` or
        ``{"kind": "random", "seed": int, "alpha": float}``.

    Raises
    ------
    ConfigError
        Naming the bad part of the spec and the valid forms.
    """
    flag = "--slowdown"
    spec = spec.strip()
    if not spec:
        return {"kind": "none"}
    if spec.startswith("random"):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or parts[0] != "random":
            raise ConfigError(
                f"slowdown {spec!r}: expected random:SEED or random:SEED:ALPHA ({flag})"
            )
        seed = _node(parts[1], spec, flag)
        alpha = _number(parts[2], "alpha", spec, flag) if len(parts) == 3 else 1.5
        if alpha <= 0:
            raise ConfigError(f"alpha {alpha} in {spec!r} must be > 0 ({flag})")
        return {"kind": "random", "seed": seed, "alpha": alpha}
    factors = {}
    for item in spec.split(","):
        node, sep, factor = item.partition(":")
        if not sep:
            raise ConfigError(
                f"slowdown item {item!r} in {spec!r}: expected NODE:FACTOR (e.g. 2:4) or random:SEED ({flag})"
            )
        f = _number(factor, "factor", spec, flag)
        if not 1 <= f <= MAX_EXPLICIT_FACTOR:
            raise ConfigError(
                f"slowdown factor {f} in {spec!r} must be in 1..{MAX_EXPLICIT_FACTOR:g} ({flag})"
            )
        factors[_node(node, spec, flag)] = f
    return {"kind": "nodes", "factors": factors}


def resolve_slowdown(spec: str, n_nodes: int) -> list[float]:
    """Per-node slowdown factors (>= 1), a list of length ``n_nodes``.

    Raises
    ------
    ConfigError
        If the spec is malformed or names a node outside 0..n_nodes-1.
    """
    parsed = parse_slowdown(spec)
    if parsed["kind"] == "none":
        return [1.0] * n_nodes
    if parsed["kind"] == "random":
        rng = np.random.default_rng(parsed["seed"])
        return [float(min(MAX_FACTOR, 1.0 + x)) for x in rng.pareto(parsed["alpha"], size=n_nodes)]
    factors = [1.0] * n_nodes
    for node, f in parsed["factors"].items():
        if node >= n_nodes:
            raise ConfigError(
                f"slowdown names node {node} but the run has nodes 0..{n_nodes - 1} (--slowdown)"
            )
        factors[node] = f
    return factors


def parse_latency(spec: str) -> dict:
    """Check a latency spec's syntax.

    Returns
    -------
    dict
        ``{"default_s": float, "links": {(u, v): seconds}}`` with u < v.

    Raises
    ------
    ConfigError
        Naming the bad part of the spec.
    """
    flag = "--latency"
    out = {"default_s": 0.0, "links": {}}
    spec = spec.strip()
    if not spec:
        return out
    for k, item in enumerate(spec.split(",")):
        link, sep, seconds = item.rpartition(":")
        value = _number(seconds, "latency", spec, flag)
        if not 0 <= value <= MAX_LATENCY_S:
            raise ConfigError(
                f"latency {value} in {spec!r} must be in 0..{MAX_LATENCY_S:g} seconds ({flag})"
            )
        if not sep:
            if k != 0:
                raise ConfigError(
                    f"latency {spec!r}: a default (plain SECONDS) may only come first ({flag})"
                )
            out["default_s"] = value
            continue
        u, dash, v = link.partition("-")
        if not dash:
            raise ConfigError(
                f"latency item {item!r} in {spec!r}: expected U-V:SECONDS, e.g. 0-3:0.05 ({flag})"
            )
        a, b = _node(u, spec, flag), _node(v, spec, flag)
        out["links"][(min(a, b), max(a, b))] = value
    return out


def resolve_latency(spec: str, links) -> dict[tuple[int, int], float]:
    """One-way delay in seconds of every directed link.

    Parameters
    ----------
    spec : str
        A latency spec.
    links : iterable of (int, int)
        The undirected links of the run (topology edges, or worker-server pairs).

    Returns
    -------
    dict
        ``{(src, dst): seconds}`` for both directions of every link with a
        non-zero delay.

    Raises
    ------
    ConfigError
        If the spec is malformed or names a link that does not exist.
    """
    parsed = parse_latency(spec)
    undirected = {(min(u, v), max(u, v)) for u, v in links}
    unknown = sorted(set(parsed["links"]) - undirected)
    if unknown:
        u, v = unknown[0]
        raise ConfigError(f"latency names link {u}-{v}, which is not in the topology (--latency)")
    out = {}
    for u, v in undirected:
        delay = parsed["links"].get((u, v), parsed["default_s"])
        if delay > 0:
            out[(u, v)] = out[(v, u)] = delay
    return out


def parse_partition(spec: str) -> list[dict]:
    """Check a partition spec's syntax (``--partition``).

    Parameters
    ----------
    spec : str
        ``""`` (no cut) or comma-separated items ``U-V@START+DURATION`` (the
        link U-V) or ``NODE@START+DURATION`` (every link of NODE); START >= 0
        and DURATION > 0 in seconds on the run clock.

    Returns
    -------
    list of dict
        One per item: ``{"link": [u, v]}`` (u < v) or ``{"node": k}``, with
        ``"start_s"`` and ``"end_s"`` (run-clock seconds).

    Raises
    ------
    ConfigError
        Naming the bad item and the valid form.
    """
    flag = "--partition"
    form = "U-V@START+DURATION (a link) or NODE@START+DURATION (a host), e.g. 0-1@2+3"
    cuts = []
    spec = spec.strip()
    if not spec:
        return cuts
    for item in spec.split(","):
        item = item.strip()
        what, at, when = item.partition("@")
        start, plus, duration = when.partition("+")
        if not (at and plus and what):
            raise ConfigError(f"partition {item!r}: expected {form} ({flag})")
        start_s = _number(start, "start", item, flag)
        duration_s = _number(duration, "duration", item, flag)
        if start_s < 0:
            raise ConfigError(f"partition {item!r}: start {start_s:g} s must be >= 0 ({flag})")
        if duration_s <= 0:
            raise ConfigError(f"partition {item!r}: duration {duration_s:g} s must be > 0 ({flag})")
        u, dash, v = what.partition("-")
        if dash:
            a, b = _node(u, item, flag), _node(v, item, flag)
            if a == b:
                raise ConfigError(f"partition {item!r}: a link joins two different nodes ({flag})")
            cut = {"link": [min(a, b), max(a, b)]}
        else:
            cut = {"node": _node(what, item, flag)}
        cuts.append({**cut, "start_s": start_s, "end_s": start_s + duration_s})
    return cuts


def resolve_partition(spec: str, links, nodes) -> list[dict]:
    """The cuts of a partition spec, checked against the run's topology.

    Parameters
    ----------
    spec : str
        A :func:`parse_partition` spec.
    links : iterable of (int, int)
        The undirected links of the run (topology edges, or worker-server pairs).
    nodes : iterable of int
        The node ids of the run.

    Returns
    -------
    list of dict
        As :func:`parse_partition`.

    Raises
    ------
    ConfigError
        If the spec is malformed, names a node that is not in the run or a
        link that is not in the topology.
    """
    cuts = parse_partition(spec)
    ids = sorted(nodes)
    valid = f"0..{ids[-1]}" if ids == list(range(len(ids))) else str(ids)
    undirected = {(min(u, v), max(u, v)) for u, v in links}
    for cut in cuts:
        named = cut["link"] if "link" in cut else [cut["node"]]
        for k in named:
            if k not in ids:
                raise ConfigError(
                    f"partition names node {k} but the run has nodes {valid} (--partition)"
                )
        if "link" in cut and tuple(cut["link"]) not in undirected:
            u, v = cut["link"]
            raise ConfigError(
                f"partition names link {u}-{v}, which is not in the topology; node {u}'s "
                f"links go to {sorted(b if a == u else a for a, b in undirected if u in (a, b))} "
                "(--partition)"
            )
    return cuts


class Partitions:
    """When each directed link is cut; no clock (times are run-clock seconds).

    Parameters
    ----------
    cuts : list of dict
        From :func:`resolve_partition` (or ``meta.json``'s ``emulation.partition``).

    Notes
    -----
    A node cut (``{"node": k}``) cuts every link of k, including links made
    later (a repair link after a node failure).
    """

    def __init__(self, cuts=()) -> None:
        self.cuts = [dict(c) for c in cuts]

    def __bool__(self) -> bool:
        return bool(self.cuts)

    def windows(self, src: int, dst: int) -> list[tuple[float, float]]:
        """The cut intervals ``[(start_s, end_s)]`` of link src -> dst, sorted and merged."""
        spans = []
        for cut in self.cuts:
            if "link" in cut:
                hit = sorted((src, dst)) == cut["link"]
            else:
                hit = cut["node"] in (src, dst)
            if hit:
                spans.append((float(cut["start_s"]), float(cut["end_s"])))
        return merge_windows(spans)

    def release_s(self, src: int, dst: int, t_s: float) -> float:
        """The first time >= ``t_s`` at which link src -> dst is not cut (run clock, seconds)."""
        return release_after(self.windows(src, dst), t_s)


def merge_windows(spans) -> list[tuple[float, float]]:
    """Sorted, overlapping or touching ``(start, end)`` intervals merged into disjoint ones."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def release_after(windows, t: float) -> float:
    """The first time >= ``t`` outside every ``[start, end)`` of sorted, disjoint ``windows``.

    Monotone in ``t``, so a FIFO of due times stays a FIFO of release times.
    """
    for start, end in windows:
        if start <= t < end:
            return end
    return t


class Slowdown:
    """Time a node ``factor`` times slower owes for its measured (or modelled) work; no clock.

    A node with factor f owes (f - 1) times the duration of its own work
    (receiving, applying, the gradient, sending) and pays it as a wait
    between reading the model and producing the update, so that its deltas
    are computed on an older model, as a slow machine's are.

    Parameters
    ----------
    factor : float
        >= 1; 1 owes nothing.

    Attributes
    ----------
    owed_s : float
        Time owed and not yet paid, in seconds.
    slept_s : float
        Time paid so far, in seconds.

    Notes
    -----
    The owed time is paid in pieces of at least :data:`SLEEP_QUANTUM_S`, so
    short steps (tens of microseconds) are slowed accurately on average.
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.owed_s = 0.0
        self.slept_s = 0.0

    def owe(self, work_s: float) -> None:
        """Account ``work_s`` seconds of work done at full speed."""
        if self.factor > 1.0:
            self.owed_s += (self.factor - 1.0) * work_s

    def take(self) -> float:
        """The wait to insert now, in seconds (0 while less than a quantum is owed)."""
        if self.owed_s < SLEEP_QUANTUM_S:
            return 0.0
        owed, self.owed_s = self.owed_s, 0.0
        self.slept_s += owed
        return owed


def parse_compute_time(spec: str) -> dict:
    """Check an emulated compute-time spec (``--compute-time``).

    Forms (seconds per gradient):

    - ``""``: none; a gradient takes what the real computation takes.
    - ``"SECONDS"``: constant, e.g. ``"0.005"``.
    - ``"lognormal:MEDIAN:SIGMA"``: log-normal with that median and shape
      (heavy right tail), e.g. ``"lognormal:0.005:0.5"``.
    - ``"exponential:MEAN"``, ``"uniform:LOW:HIGH"``.

    Returns
    -------
    dict
        ``{"kind": "none"|"constant"|"lognormal"|"exponential"|"uniform", ...}``.

    Raises
    ------
    ConfigError
        Naming the bad part of the spec and the valid forms.
    """
    flag = "--compute-time"
    forms = "SECONDS, lognormal:MEDIAN:SIGMA, exponential:MEAN or uniform:LOW:HIGH"
    spec = spec.strip()
    if not spec:
        return {"kind": "none"}
    kind, _, rest = spec.partition(":")
    args = rest.split(":") if rest else []
    arity = {"lognormal": 2, "exponential": 1, "uniform": 2}
    if kind not in arity:
        value = _number(spec, "compute time", spec, flag)
        if not 0 <= value <= MAX_COMPUTE_S:
            raise ConfigError(
                f"compute time {value} in {spec!r} must be in 0..{MAX_COMPUTE_S:g} seconds ({flag})"
            )
        return {"kind": "constant", "seconds": value}
    if len(args) != arity[kind]:
        raise ConfigError(f"compute time {spec!r}: expected {forms} ({flag})")
    values = [_number(a, kind, spec, flag) for a in args]
    if not all(0 <= v <= MAX_COMPUTE_S for v in values):
        raise ConfigError(
            f"compute time {spec!r}: values must be in 0..{MAX_COMPUTE_S:g} seconds ({flag})"
        )
    if kind == "lognormal":
        if values[0] <= 0:
            raise ConfigError(f"compute time {spec!r}: the median must be > 0 ({flag})")
        return {"kind": "lognormal", "median": values[0], "sigma": values[1]}
    if kind == "exponential":
        return {"kind": "exponential", "mean": values[0]}
    if values[0] > values[1]:
        raise ConfigError(f"compute time {spec!r}: LOW must be <= HIGH ({flag})")
    return {"kind": "uniform", "low": values[0], "high": values[1]}


class ComputeTime:
    """Emulated seconds per gradient of one node: a spec's draws times its slowdown factor.

    Parameters
    ----------
    spec : str
        A :func:`parse_compute_time` spec.
    factor : float, default 1.0
        The node's slowdown factor (>= 1): every draw is multiplied by it.
    seed : sequence of int, default (0,)
        Seed of the node's own generator (e.g. ``(run_seed, node_id)``), so
        that adding a node does not change the others' draws.

    Attributes
    ----------
    enabled : bool
        False for the empty spec: :meth:`sample` then always returns 0.
    """

    def __init__(self, spec: str, factor: float = 1.0, seed=(0,)) -> None:
        self.spec = parse_compute_time(spec)
        self.factor = factor
        self.enabled = self.spec["kind"] != "none"
        self._rng = np.random.default_rng(list(seed) + [0x636F6D70])

    def sample(self) -> float:
        """Seconds the next gradient takes (>= 0)."""
        spec = self.spec
        kind = spec["kind"]
        if kind == "none":
            return 0.0
        if kind == "constant":
            value = spec["seconds"]
        elif kind == "lognormal":
            value = spec["median"] * math.exp(spec["sigma"] * self._rng.standard_normal())
        elif kind == "exponential":
            value = self._rng.exponential(spec["mean"]) if spec["mean"] > 0 else 0.0
        else:
            value = self._rng.uniform(spec["low"], spec["high"])
        return float(value) * self.factor


#: Slowest link a simulation takes, in bits per second (slower ones are typos, not links).
MIN_BANDWIDTH_BPS = 1e3
_BANDWIDTH_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_bandwidth(spec: str) -> float | None:
    """Link bandwidth in bits per second from ``--bandwidth`` (simulation only).

    Forms: ``""`` (infinite: None), a number of bits per second (``"1e9"``),
    or a number with a unit ``k``/``M``/``G``/``T``, optionally followed by
    ``bit`` or ``bps`` (``"10G"``, ``"100Mbit"``, ``"2.5Gbps"``).

    Raises
    ------
    ConfigError
        If the spec is not of these forms or not > 0.
    """
    flag = "--bandwidth"
    text = spec.strip().lower()
    if not text:
        return None
    for suffix in ("bps", "bit/s", "bit"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    unit = text[-1:] if text[-1:] in "kmgt" else ""
    number = text[: -len(unit)] if unit else text
    try:
        value = float(number) * _BANDWIDTH_UNITS[unit]
    except ValueError:
        raise ConfigError(
            f"bandwidth {spec!r} is not a number of bits per second with an optional unit "
            f"k, M, G or T, e.g. 10G, 100Mbit or 1e9 ({flag})"
        ) from None
    if not (math.isfinite(value) and value >= MIN_BANDWIDTH_BPS):
        raise ConfigError(
            f"bandwidth {spec!r} must be at least {MIN_BANDWIDTH_BPS:g} bits per second, "
            f"e.g. 10G or 100Mbit ({flag})"
        )
    return value
