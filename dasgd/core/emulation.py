"""Emulated stragglers and link latency (the kernel here has no netem).

Two specs, both strings so they fit a command line and ``config.json``:

Slowdown (per-node compute speed; ``--slowdown``):

- ``""``: every node at full speed.
- ``"NODE:FACTOR[,NODE:FACTOR...]"``: node NODE computes FACTOR times slower
  (FACTOR >= 1), e.g. ``"2:4"`` makes node 2 a 4x straggler.
- ``"random:SEED[:ALPHA]"``: a heavy-tailed profile: factor_i = 1 + Lomax(ALPHA)
  drawn with SEED (ALPHA = 1.5 by default; smaller = heavier tail), capped at
  :data:`MAX_FACTOR`.

A node with factor f sleeps (f - 1) times the measured duration of each
iteration of its loop (receiving, applying, the local step, sending) after it
(:class:`Slowdown`): a machine f times slower at everything. Its step rate
drops by f while its network stack keeps receiving; sleeps are batched to
~1 ms for accuracy.

Latency (per-link one-way delay in seconds; ``--latency``):

- ``""``: none.
- ``"SECONDS"``: every link.
- ``"U-V:SECONDS[,U-V:SECONDS...]"``: the undirected link U-V (both directions);
  may start with a default, e.g. ``"0.001,0-3:0.05"``.

The transport holds each outgoing message until its due time (a delay queue),
so per-link order is kept. For parameter-server runs the links are
``worker-server`` with the server's id being ``n_nodes``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..errors import ConfigError

__all__ = [
    "MAX_FACTOR",
    "Slowdown",
    "parse_latency",
    "parse_slowdown",
    "resolve_latency",
    "resolve_slowdown",
]

#: Largest slowdown factor a random profile draws.
MAX_FACTOR = 20.0
#: Largest slowdown factor a spec may name.
MAX_EXPLICIT_FACTOR = 1000.0
#: Largest one-way link latency a spec may name, in seconds.
MAX_LATENCY_S = 10.0
_SLEEP_QUANTUM_S = 1e-3


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


class Slowdown:
    """Makes a node ``factor`` times slower by sleeping after its steps.

    Parameters
    ----------
    factor : float
        >= 1; 1 does nothing.

    Notes
    -----
    The owed time accumulates and is slept in pieces of at least 1 ms, so
    short steps (tens of microseconds) are slowed accurately on average.
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.owed_s = 0.0
        self.slept_s = 0.0

    def after_step(self, step_s: float) -> None:
        """Account a step that took ``step_s`` seconds; sleep if enough time is owed."""
        if self.factor <= 1.0:
            return
        self.owed_s += (self.factor - 1.0) * step_s
        if self.owed_s >= _SLEEP_QUANTUM_S:
            t = time.perf_counter()
            time.sleep(self.owed_s)
            slept = time.perf_counter() - t
            self.slept_s += slept
            self.owed_s -= slept
