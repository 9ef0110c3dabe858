"""Communication topologies: builders, graph files, validation and mixing matrices.

A topology is an undirected :class:`networkx.Graph` whose nodes are exactly the
integers ``0..n-1`` (node ``i`` is the process of rank ``i``), with no
self-loops, and connected. ``n = 1`` (one node, no edges) is valid everywhere
and means plain SGD.

The CLI and the launcher go through one entry point, :func:`parse_topology`,
which turns a spec string into a validated graph:

==========================  =====================================================
spec                        graph
==========================  =====================================================
``ring``                    cycle over ``--nodes`` nodes (n = 2: one edge)
``path``                    path 0 - 1 - ... - n-1
``complete``                every pair connected
``star``                    node 0 is the hub, n nodes in all
``hypercube``               n must be a power of two
``exponential``             i ~ (i + 2**k) mod n for every 2**k < n
``torus:RxC`` / ``torus``   2-D torus with wraparound (plain: most square R*C = n)
``grid:RxC`` / ``grid``     2-D grid without wraparound
``random-regular[:D]``      connected random D-regular graph (default D = 3,
                            4 for odd n, at most n - 1)
``erdos-renyi[:P]``         connected G(n, P) (default P = 0.5)
``small-world[:K[:P]]``     connected Watts-Strogatz (default K = 4, P = 0.1)
``path/to/file.json``       node-link JSON ("edges" or "links" key)
``path/to/file.graphml``    GraphML
``path/to/file.edgelist``   edge list, one ``u v`` per line (any other extension)
``path/to/file.adjlist``    adjacency list, one ``u v1 v2 ...`` per line
==========================  =====================================================

Every problem with a spec, a parameter or a file raises
:class:`dasgd.errors.TopologyError` with a one-line message that names the bad
value and what would be valid.

Gossip averaging uses the Metropolis-Hastings mixing matrix
(:func:`metropolis_hastings_weights`); its spectral gap
(:func:`spectral_gap`) says how fast consensus is reached: 1 for a complete
graph, close to 0 for rings of many nodes and for graphs with a bottleneck.
"""

from __future__ import annotations

import inspect
import json
import math
import operator
import os
import xml.etree.ElementTree as ElementTree
from typing import Any

import networkx as nx
import numpy as np

from .errors import TopologyError

__all__ = [
    "BUILDERS",
    "complete_graph",
    "describe_topology",
    "erdos_renyi_graph",
    "exponential_graph",
    "format_topology",
    "grid_graph",
    "hypercube_graph",
    "metropolis_hastings_weights",
    "neighbours",
    "parse_topology",
    "path_graph",
    "random_regular_graph",
    "ring_graph",
    "save_topology",
    "small_world_graph",
    "spectral_gap",
    "star_graph",
    "torus_graph",
    "validate_topology",
]

#: Spec name (as typed on the command line) -> one-line help.
BUILDERS: dict[str, str] = {
    "ring": "cycle 0-1-...-(n-1)-0; needs --nodes",
    "path": "path 0-1-...-(n-1), no wraparound; needs --nodes",
    "complete": "every pair of nodes connected; needs --nodes",
    "star": "node 0 is the hub connected to all others; needs --nodes",
    "torus": "2-D torus with wraparound: torus:RxC, or torus with --nodes (most square R x C)",
    "grid": "2-D grid without wraparound: grid:RxC, or grid with --nodes (most square R x C)",
    "hypercube": "hypercube; --nodes must be a power of two",
    "exponential": "static exponential graph, i ~ i + 2**k mod n (Ying et al. 2021); needs --nodes",
    "random-regular": "connected random D-regular graph: random-regular:D (default 3); needs --nodes",
    "erdos-renyi": "connected Erdos-Renyi G(n, P): erdos-renyi:P (default 0.5); needs --nodes",
    "small-world": "connected Watts-Strogatz: small-world:K:P (default K=4, P=0.1); needs --nodes",
}

#: File extensions that make a spec a graph file (compared case-insensitively).
GRAPH_FILE_EXTENSIONS: tuple[str, ...] = (
    ".json",
    ".graphml",
    ".edgelist",
    ".edges",
    ".txt",
    ".adjlist",
)

#: How many samples the random builders draw before giving up on connectivity.
MAX_ATTEMPTS = 100

#: Largest graph for which :func:`format_topology` lists every node's neighbours.
FORMAT_NEIGHBOURS_MAX_NODES = 32

_BUILDER_LIST = ", ".join(BUILDERS)


# ----------------------------------------------------------------------------
# small argument checks
# ----------------------------------------------------------------------------


def _check_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an ``int`` >= ``minimum`` or raise TopologyError."""
    if isinstance(value, bool):
        raise TopologyError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise TopologyError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if as_int < minimum:
        raise TopologyError(f"{name} must be an integer >= {minimum}, got {as_int}")
    return int(as_int)


def _check_probability(value: Any, name: str, *, allow_zero: bool) -> float:
    """Return ``value`` as a float in [0, 1] (or (0, 1]) or raise TopologyError."""
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    if isinstance(value, bool):
        raise TopologyError(f"{name} must be a number in {interval}, got {value!r}")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise TopologyError(f"{name} must be a number in {interval}, got {value!r}") from None
    low_ok = as_float >= 0.0 if allow_zero else as_float > 0.0
    if not (math.isfinite(as_float) and low_ok and as_float <= 1.0):
        raise TopologyError(f"{name} must be a number in {interval}, got {value!r}")
    return as_float


def _check_seed(seed: Any) -> int | None:
    """Return ``seed`` if it is ``None`` or a non-negative int, else raise TopologyError."""
    if seed is None:
        return None
    if isinstance(seed, bool):
        raise TopologyError(f"seed must be a non-negative integer or None, got {seed!r}")
    try:
        as_int = operator.index(seed)
    except TypeError:
        raise TopologyError(f"seed must be a non-negative integer or None, got {seed!r}") from None
    if as_int < 0:
        raise TopologyError(f"seed must be a non-negative integer or None, got {as_int}")
    return int(as_int)


def _attempt_seed(seed: int | None, attempt: int) -> int | None:
    """Seed of the ``attempt``-th resample: ``seed + attempt``, or None when unseeded."""
    return None if seed is None else seed + attempt


def _empty_graph(n: int) -> nx.Graph:
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    return graph


def _is_connected(graph: nx.Graph) -> bool:
    return graph.number_of_nodes() > 0 and nx.is_connected(graph)


# ----------------------------------------------------------------------------
# deterministic builders
# ----------------------------------------------------------------------------


def ring_graph(n: int) -> nx.Graph:
    """Return the cycle over ``n`` nodes.

    Parameters
    ----------
    n : int
        Number of nodes, >= 1. ``n = 1`` gives a single node and no edge,
        ``n = 2`` a single edge, ``n >= 3`` a cycle with ``n`` edges.

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``; node ``i`` is connected to ``(i +/- 1) mod n``.

    Raises
    ------
    TopologyError
        If ``n`` is not an integer >= 1.
    """
    n = _check_int(n, "ring n")
    graph = _empty_graph(n)
    if n >= 2:
        graph.add_edges_from((i, (i + 1) % n) for i in range(n))
    return graph


def path_graph(n: int) -> nx.Graph:
    """Return the path ``0 - 1 - ... - n-1`` (``n - 1`` edges).

    Parameters
    ----------
    n : int
        Number of nodes, >= 1.

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``.

    Raises
    ------
    TopologyError
        If ``n`` is not an integer >= 1.
    """
    n = _check_int(n, "path n")
    return nx.path_graph(n)


def complete_graph(n: int) -> nx.Graph:
    """Return the complete graph ``K_n`` (``n (n - 1) / 2`` edges).

    Parameters
    ----------
    n : int
        Number of nodes, >= 1.

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``, every pair connected.

    Raises
    ------
    TopologyError
        If ``n`` is not an integer >= 1.
    """
    n = _check_int(n, "complete n")
    return nx.complete_graph(n)


def star_graph(n: int) -> nx.Graph:
    """Return the star with hub 0 and ``n - 1`` leaves.

    Unlike :func:`networkx.star_graph`, ``n`` counts all nodes, hub included.

    Parameters
    ----------
    n : int
        Number of nodes, >= 1.

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``; edges ``(0, i)`` for ``i = 1..n-1``.

    Raises
    ------
    TopologyError
        If ``n`` is not an integer >= 1.
    """
    n = _check_int(n, "star n")
    graph = _empty_graph(n)
    graph.add_edges_from((0, i) for i in range(1, n))
    return graph


def _lattice_graph(rows: int, cols: int, *, periodic: bool) -> nx.Graph:
    """Row-major 2-D lattice: node ``r * cols + c``; wraparound if ``periodic``."""
    graph = _empty_graph(rows * cols)
    for r in range(rows):
        for c in range(cols):
            node = r * cols + c
            if c + 1 < cols:
                graph.add_edge(node, node + 1)
            elif periodic and cols > 2:
                graph.add_edge(node, r * cols)
            if r + 1 < rows:
                graph.add_edge(node, node + cols)
            elif periodic and rows > 2:
                graph.add_edge(node, c)
    return graph


def torus_graph(rows: int, cols: int) -> nx.Graph:
    """Return the 2-D torus of ``rows x cols`` nodes (grid with wraparound).

    Node ``(r, c)`` is numbered ``r * cols + c`` (row-major). A side of length
    1 or 2 gets no wraparound edge (it would duplicate an existing edge or be
    a self-loop), so for ``rows, cols >= 3`` every node has degree 4 and the
    graph has ``2 * rows * cols`` edges; ``torus_graph(1, n)`` is the ring.

    Parameters
    ----------
    rows, cols : int
        Side lengths, each >= 1.

    Returns
    -------
    networkx.Graph
        Nodes ``0..rows*cols-1``.

    Raises
    ------
    TopologyError
        If ``rows`` or ``cols`` is not an integer >= 1.
    """
    rows = _check_int(rows, "torus rows")
    cols = _check_int(cols, "torus cols")
    return _lattice_graph(rows, cols, periodic=True)


def grid_graph(rows: int, cols: int) -> nx.Graph:
    """Return the 2-D grid of ``rows x cols`` nodes without wraparound.

    Node ``(r, c)`` is numbered ``r * cols + c`` (row-major); the graph has
    ``rows (cols - 1) + cols (rows - 1)`` edges.

    Parameters
    ----------
    rows, cols : int
        Side lengths, each >= 1.

    Returns
    -------
    networkx.Graph
        Nodes ``0..rows*cols-1``.

    Raises
    ------
    TopologyError
        If ``rows`` or ``cols`` is not an integer >= 1.
    """
    rows = _check_int(rows, "grid rows")
    cols = _check_int(cols, "grid cols")
    return _lattice_graph(rows, cols, periodic=False)


def hypercube_graph(n: int) -> nx.Graph:
    """Return the hypercube over ``n = 2**d`` nodes.

    Node ``i`` is connected to ``i XOR 2**k`` for ``k = 0..d-1``: every node
    has degree ``d = log2(n)`` and there are ``n d / 2`` edges.

    Parameters
    ----------
    n : int
        Number of nodes, a power of two (1, 2, 4, 8, ...).

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``.

    Raises
    ------
    TopologyError
        If ``n`` is not a power of two.
    """
    n = _check_int(n, "hypercube n")
    if n & (n - 1):
        lower = 1 << (n.bit_length() - 1)
        raise TopologyError(
            f"hypercube needs a power-of-two number of nodes, got {n} (try {lower} or {2 * lower})"
        )
    graph = _empty_graph(n)
    dimension = n.bit_length() - 1
    graph.add_edges_from((i, i ^ (1 << k)) for i in range(n) for k in range(dimension))
    return graph


def exponential_graph(n: int) -> nx.Graph:
    """Return the static exponential graph over ``n`` nodes, made undirected.

    Node ``i`` is connected to ``(i + 2**k) mod n`` for every ``k`` with
    ``2**k < n`` (and hence to ``(i - 2**k) mod n``). It is a circulant graph:
    every node has degree ``|{+/- 2**k mod n}|``, which is ``2 log2(n) - 1``
    when ``n >= 2`` is a power of two.

    Parameters
    ----------
    n : int
        Number of nodes, >= 1.

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``.

    Raises
    ------
    TopologyError
        If ``n`` is not an integer >= 1.

    References
    ----------
    .. [1] B. Ying, K. Yuan, Y. Chen, H. Hu, P. Pan, W. Yin, "Exponential Graph
       is Provably Efficient for Decentralized Deep Training", NeurIPS 2021
       (the "static exponential graph", as in BlueFog's ``ExponentialGraph``).
    """
    n = _check_int(n, "exponential n")
    graph = _empty_graph(n)
    step = 1
    while step < n:
        graph.add_edges_from((i, (i + step) % n) for i in range(n))
        step *= 2
    return graph


# ----------------------------------------------------------------------------
# random builders (always connected)
# ----------------------------------------------------------------------------


def random_regular_graph(n: int, degree: int, *, seed: int | None = None) -> nx.Graph:
    """Return a connected random ``degree``-regular graph over ``n`` nodes.

    Draws :func:`networkx.random_regular_graph` with seeds ``seed``,
    ``seed + 1``, ... until the sample is connected, at most
    :data:`MAX_ATTEMPTS` times.

    Parameters
    ----------
    n : int
        Number of nodes, >= 1.
    degree : int
        Degree of every node: ``degree < n``, ``n * degree`` even, and
        ``degree >= 2`` when ``n >= 3`` (``degree = 0`` only for ``n = 1``,
        ``degree = 1`` only for ``n = 2``). ``degree = 2`` is a single cycle
        and is rarely sampled for large ``n``; prefer ``degree >= 3``.
    seed : int or None, optional
        Seed of the first sample; the same seed gives the same graph.

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``, connected, every node of degree ``degree``.

    Raises
    ------
    TopologyError
        If the constraints on ``n`` and ``degree`` do not hold, or no
        connected sample was drawn in :data:`MAX_ATTEMPTS` attempts.
    """
    n = _check_int(n, "random-regular n")
    degree = _check_int(degree, "random-regular degree", minimum=0)
    seed = _check_seed(seed)
    if degree >= n:
        raise TopologyError(
            f"random-regular degree must be less than the number of nodes, got degree={degree} "
            f"for n={n} (use a degree <= {n - 1})"
        )
    if (n * degree) % 2:
        raise TopologyError(
            f"random-regular needs n * degree even, got n={n}, degree={degree} "
            f"(use an even degree for odd n)"
        )
    if n >= 2 and degree == 0:
        raise TopologyError(f"random-regular degree 0 is disconnected for n={n}; use degree >= 2")
    if n >= 3 and degree == 1:
        raise TopologyError(
            f"random-regular degree 1 is disconnected for n={n} (only n=2 works); use degree >= 2"
        )
    for attempt in range(MAX_ATTEMPTS):
        graph = nx.random_regular_graph(degree, n, seed=_attempt_seed(seed, attempt))
        if _is_connected(graph):
            return nx.Graph(graph)
    raise TopologyError(
        f"random-regular graph with n={n}, degree={degree} was disconnected in all "
        f"{MAX_ATTEMPTS} attempts; use a larger degree (3 or more)"
    )


def erdos_renyi_graph(n: int, p: float, *, seed: int | None = None) -> nx.Graph:
    """Return a connected Erdos-Renyi graph ``G(n, p)``.

    Draws :func:`networkx.gnp_random_graph` with seeds ``seed``,
    ``seed + 1``, ... until the sample is connected, at most
    :data:`MAX_ATTEMPTS` times. ``G(n, p)`` is connected with high
    probability once ``p`` exceeds ``ln(n) / n``.

    Parameters
    ----------
    n : int
        Number of nodes, >= 1.
    p : float
        Probability of each edge, in ``(0, 1]``.
    seed : int or None, optional
        Seed of the first sample; the same seed gives the same graph.

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``, connected.

    Raises
    ------
    TopologyError
        If ``p`` is not in ``(0, 1]``, or no connected sample was drawn in
        :data:`MAX_ATTEMPTS` attempts.
    """
    n = _check_int(n, "erdos-renyi n")
    p = _check_probability(p, "erdos-renyi edge probability p", allow_zero=False)
    seed = _check_seed(seed)
    for attempt in range(MAX_ATTEMPTS):
        graph = nx.gnp_random_graph(n, p, seed=_attempt_seed(seed, attempt))
        if _is_connected(graph):
            return graph
    threshold = math.log(n) / n
    raise TopologyError(
        f"erdos-renyi graph with n={n}, p={p:g} was disconnected in all {MAX_ATTEMPTS} "
        f"attempts; use a larger p (connectivity needs p > ln(n)/n = {threshold:.3g})"
    )


def small_world_graph(n: int, k: int, p: float, *, seed: int | None = None) -> nx.Graph:
    """Return a connected Watts-Strogatz small-world graph.

    Starts from a ring where every node is joined to its ``k`` nearest
    neighbours (``k / 2`` on each side) and rewires each edge with
    probability ``p`` (:func:`networkx.watts_strogatz_graph`), resampling
    with seeds ``seed``, ``seed + 1``, ... until connected, at most
    :data:`MAX_ATTEMPTS` times.

    Parameters
    ----------
    n : int
        Number of nodes, >= 1.
    k : int
        Ring-lattice degree: an even integer with ``2 <= k < n``, or
        ``k = n - 1``, which gives the complete graph (the only choice for
        ``n <= 2``).
    p : float
        Rewiring probability, in ``[0, 1]``.
    seed : int or None, optional
        Seed of the first sample; the same seed gives the same graph.

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``, connected, with ``n k / 2`` edges.

    Raises
    ------
    TopologyError
        If ``k`` or ``p`` is out of range, or no connected sample was drawn in
        :data:`MAX_ATTEMPTS` attempts.

    References
    ----------
    .. [1] D. J. Watts, S. H. Strogatz, "Collective dynamics of 'small-world'
       networks", Nature 393, 440-442 (1998).
    """
    n = _check_int(n, "small-world n")
    k = _check_int(k, "small-world k", minimum=0)
    p = _check_probability(p, "small-world rewiring probability p", allow_zero=True)
    seed = _check_seed(seed)
    if k == n - 1:
        return nx.complete_graph(n)
    if k < 2 or k >= n or k % 2:
        raise TopologyError(
            f"small-world k must be an even integer with 2 <= k < n, or n - 1, got k={k} for n={n}"
        )
    for attempt in range(MAX_ATTEMPTS):
        graph = nx.watts_strogatz_graph(n, k, p, seed=_attempt_seed(seed, attempt))
        if _is_connected(graph):
            return graph
    raise TopologyError(
        f"small-world graph with n={n}, k={k}, p={p:g} was disconnected in all "
        f"{MAX_ATTEMPTS} attempts; use a larger k or a smaller p"
    )


# ----------------------------------------------------------------------------
# validation and queries
# ----------------------------------------------------------------------------


def _preview(items: list[Any], limit: int = 8) -> str:
    """``[a, b, c, ...]``-style preview of at most ``limit`` items."""
    shown = ", ".join(repr(item) for item in items[:limit])
    return "[" + shown + (", ..." if len(items) > limit else "") + "]"


def _preview_set(items: set[int], limit: int = 8) -> str:
    ordered = sorted(items)
    shown = ", ".join(str(item) for item in ordered[:limit])
    return "{" + shown + (", ..." if len(ordered) > limit else "") + "}"


def _check_structure(graph: Any) -> int:
    """Check everything but connectivity; return the number of nodes."""
    if not isinstance(graph, nx.Graph):
        raise TopologyError(f"a topology must be a networkx.Graph, got {type(graph).__name__}")
    if graph.is_directed():
        raise TopologyError(
            "directed graphs are not supported; gossip needs undirected edges "
            "(use graph.to_undirected())"
        )
    if graph.is_multigraph():
        raise TopologyError(
            "multigraphs are not supported; collapse parallel edges with networkx.Graph(graph)"
        )
    n = graph.number_of_nodes()
    if n == 0:
        raise TopologyError("a topology needs at least one node, got an empty graph")
    nodes = list(graph.nodes)
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in nodes)
    if not ints or set(nodes) != set(range(n)):
        try:
            shown = sorted(nodes)
        except TypeError:
            shown = nodes
        raise TopologyError(
            f"topology nodes must be exactly the integers 0..{n - 1}, got labels {_preview(shown)}"
        )
    loops = sorted(v for v, _ in nx.selfloop_edges(graph))
    if loops:
        raise TopologyError(f"self-loops are not supported, found one at node(s) {_preview(loops)}")
    return n


def validate_topology(graph: nx.Graph, n_nodes: int | None = None) -> nx.Graph:
    """Check that ``graph`` is a usable topology and return it unchanged.

    Parameters
    ----------
    graph : networkx.Graph
        Candidate topology.
    n_nodes : int or None, optional
        Expected number of nodes; None accepts any.

    Returns
    -------
    networkx.Graph
        ``graph`` itself.

    Raises
    ------
    TopologyError
        If the graph is directed or a multigraph, has no nodes, its nodes are
        not exactly ``0..n-1``, it has self-loops, it is disconnected (the
        message gives the number of components and the first two), or it has
        a number of nodes other than ``n_nodes``.
    """
    n = _check_structure(graph)
    if not nx.is_connected(graph):
        components = sorted(nx.connected_components(graph), key=min)
        raise TopologyError(
            f"topology is disconnected: {len(components)} components, e.g. "
            f"{_preview_set(components[0])} and {_preview_set(components[1])}; "
            f"every node must be reachable from every other"
        )
    if n_nodes is not None:
        expected = _check_int(n_nodes, "n_nodes")
        if expected != n:
            raise TopologyError(f"topology has {n} nodes but {expected} were asked for (--nodes)")
    return graph


def neighbours(graph: nx.Graph, node: int) -> list[int]:
    """Return the neighbours of ``node`` in ascending order.

    Parameters
    ----------
    graph : networkx.Graph
        A topology.
    node : int
        A node of ``graph``.

    Returns
    -------
    list of int
        Sorted neighbour ids; empty for ``n = 1``.

    Raises
    ------
    TopologyError
        If ``node`` is not a node of ``graph``.
    """
    if isinstance(node, bool) or node not in graph:
        raise TopologyError(
            f"node {node!r} is not in the topology; nodes are 0..{graph.number_of_nodes() - 1}"
        )
    return sorted(graph.adj[node])


def metropolis_hastings_weights(graph: nx.Graph) -> np.ndarray:
    """Return the Metropolis-Hastings mixing matrix of ``graph``.

    ``W[i, j] = 1 / (1 + max(deg(i), deg(j)))`` for every edge ``(i, j)``,
    ``W[i, i] = 1 - sum_{j != i} W[i, j]``, and 0 elsewhere. ``W`` is
    symmetric, nonnegative and doubly stochastic, so gossip with it converges
    to the average on any connected graph.

    Parameters
    ----------
    graph : networkx.Graph
        A topology (nodes ``0..n-1``, undirected, no self-loops).

    Returns
    -------
    ndarray of shape (n, n), dtype float64
        The mixing matrix; row ``i`` holds the weights node ``i`` gives to
        itself and its neighbours.

    Raises
    ------
    TopologyError
        If ``graph`` is not a valid (possibly disconnected) topology.

    References
    ----------
    .. [1] L. Xiao, S. Boyd, "Fast linear iterations for distributed
       averaging", Systems & Control Letters 53(1), 65-78 (2004), Sec. 4.2
       ("Metropolis-Hastings weights").
    """
    n = _check_structure(graph)
    weights = np.zeros((n, n), dtype=np.float64)
    if graph.number_of_edges():
        edges = np.asarray(list(graph.edges), dtype=np.int64)
        degree = np.zeros(n, dtype=np.int64)
        for node, d in graph.degree:
            degree[node] = d
        u, v = edges[:, 0], edges[:, 1]
        w = 1.0 / (1.0 + np.maximum(degree[u], degree[v]))
        weights[u, v] = w
        weights[v, u] = w
    weights[np.diag_indices(n)] = 1.0 - weights.sum(axis=1)
    return weights


def spectral_gap(graph: nx.Graph) -> float:
    """Return the spectral gap ``1 - max(|lambda_2|, |lambda_n|)`` of the MH matrix.

    ``lambda_1 = 1 >= lambda_2 >= ... >= lambda_n`` are the eigenvalues of
    :func:`metropolis_hastings_weights`; ``max(|lambda_2|, |lambda_n|)`` is
    the second-largest eigenvalue modulus, the per-round contraction of the
    distance to consensus. The gap is 1 for a complete graph, 0 for a
    disconnected one, and small for long rings or graphs with a bottleneck.
    Uses a dense eigendecomposition: fine up to a few thousand nodes.

    Parameters
    ----------
    graph : networkx.Graph
        A topology.

    Returns
    -------
    float
        Spectral gap in ``[0, 1]``; 1.0 for ``n = 1``.

    Raises
    ------
    TopologyError
        If ``graph`` is not a valid (possibly disconnected) topology.
    """
    weights = metropolis_hastings_weights(graph)
    n = weights.shape[0]
    if n == 1:
        return 1.0
    eigenvalues = np.linalg.eigvalsh(weights)  # ascending
    second_modulus = max(abs(eigenvalues[-2]), abs(eigenvalues[0]))
    return float(min(1.0, max(0.0, 1.0 - second_modulus)))


#: Largest graph whose diameter and spectral gap :func:`describe_topology` computes.
DESCRIBE_EXACT_MAX_NODES = 2000


def describe_topology(graph: nx.Graph) -> dict[str, Any]:
    """Return summary statistics of a topology as JSON-serializable values.

    Parameters
    ----------
    graph : networkx.Graph
        A valid topology.

    Returns
    -------
    dict
        Exactly the keys ``n_nodes`` (int), ``n_edges`` (int), ``degree_min``
        (int), ``degree_max`` (int), ``degree_mean`` (float), ``diameter``
        (int, hops), ``spectral_gap`` (float, see :func:`spectral_gap`) and
        ``mixing_matrix`` (str, ``"metropolis-hastings"``). Above
        :data:`DESCRIBE_EXACT_MAX_NODES` nodes (simulations) ``diameter`` and
        ``spectral_gap`` are None: they cost O(n E) and O(n^3).

    Raises
    ------
    TopologyError
        If ``graph`` is not a valid topology.
    """
    validate_topology(graph)
    degrees = [d for _, d in graph.degree]
    n = graph.number_of_nodes()
    exact = n <= DESCRIBE_EXACT_MAX_NODES
    return {
        "n_nodes": int(n),
        "n_edges": int(graph.number_of_edges()),
        "degree_min": int(min(degrees)),
        "degree_max": int(max(degrees)),
        "degree_mean": float(sum(degrees) / n),
        "diameter": (int(nx.diameter(graph)) if n > 1 else 0) if exact else None,
        "spectral_gap": spectral_gap(graph) if exact else None,
        "mixing_matrix": "metropolis-hastings",
    }


def format_topology(graph: nx.Graph) -> str:
    """Return a human-readable, multi-line description of a topology.

    Used by ``dasgd topology SPEC``: the spec, then every key of
    :func:`describe_topology` as aligned ``key  value`` lines, then (for at
    most :data:`FORMAT_NEIGHBOURS_MAX_NODES` nodes) one ``node i: j k ...``
    line per node.

    Parameters
    ----------
    graph : networkx.Graph
        A valid topology; ``graph.graph["spec"]`` is shown if set.

    Returns
    -------
    str
        The description, without a trailing newline.

    Raises
    ------
    TopologyError
        If ``graph`` is not a valid topology.
    """
    info = describe_topology(graph)
    rows: list[tuple[str, str]] = [("spec", str(graph.graph.get("spec", "-")))]
    for key, value in info.items():
        if value is None:
            text = f"not computed above {DESCRIBE_EXACT_MAX_NODES} nodes"
        else:
            text = f"{value:.6g}" if isinstance(value, float) else str(value)
        rows.append((key, text))
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {text}" for key, text in rows]
    n = info["n_nodes"]
    if n <= FORMAT_NEIGHBOURS_MAX_NODES:
        lines.append("neighbours:")
        for node in range(n):
            listed = " ".join(str(j) for j in neighbours(graph, node))
            lines.append(f"node {node}: {listed}".rstrip())
    else:
        lines.append(f"neighbours: not listed for more than {FORMAT_NEIGHBOURS_MAX_NODES} nodes")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# graph files
# ----------------------------------------------------------------------------


# networkx 3.4 renamed node_link_graph's `link=` keyword to `edges=` (and 3.6 dropped `link=`)
_NODE_LINK_EDGES_KEYWORD = (
    "edges" if "edges" in inspect.signature(nx.node_link_graph).parameters else "link"
)


def _node_link_graph(data: dict[str, Any], edges_key: str) -> nx.Graph:
    """``nx.node_link_graph`` (undirected, simple) reading edges from ``data[edges_key]``.

    Works on every networkx >= 3.0 (before 3.4 the keyword is ``link``).
    """
    keyword = {_NODE_LINK_EDGES_KEYWORD: edges_key}
    return nx.node_link_graph(data, directed=False, multigraph=False, **keyword)


def _node_link_data(graph: nx.Graph) -> dict[str, Any]:
    """``nx.node_link_data`` with the "edges" key (no FutureWarning on nx 3.4+)."""
    try:
        return nx.node_link_data(graph, edges="edges")
    except TypeError:  # networkx < 3.4 has no `edges` keyword and writes "links"
        return nx.node_link_data(graph)


def save_topology(graph: nx.Graph, path: str | os.PathLike[str]) -> None:
    """Write a topology as node-link JSON, loadable with :func:`parse_topology`.

    Parameters
    ----------
    graph : networkx.Graph
        A valid topology; graph, node and edge attributes must be
        JSON-serializable.
    path : str or os.PathLike
        Destination file, conventionally ending in ``.json``; overwritten.

    Raises
    ------
    TopologyError
        If ``graph`` is not a valid topology, an attribute is not
        JSON-serializable, or the file cannot be written.
    """
    validate_topology(graph)
    data = _node_link_data(graph)
    try:
        text = _dump_node_link(data)
    except (TypeError, ValueError) as exc:
        raise TopologyError(
            f"cannot save topology to {os.fspath(path)!r}: {_one_line(exc)}"
        ) from None
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    except OSError as exc:
        raise TopologyError(
            f"cannot write topology file {os.fspath(path)!r}: {exc.strerror or exc}"
        ) from None


def _dump_node_link(data: dict[str, Any]) -> str:
    """Node-link JSON with one node or edge per line (diff- and eye-friendly)."""
    lines = ["{"]
    keys = sorted(data)
    for index, key in enumerate(keys):
        comma = "," if index < len(keys) - 1 else ""
        value = data[key]
        if isinstance(value, list) and value:
            items = [json.dumps(item, sort_keys=True) for item in value]
            lines.append(f"  {json.dumps(key)}: [")
            lines.extend(f"    {item}," for item in items[:-1])
            lines.append(f"    {items[-1]}")
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)}{comma}")
    lines.append("}")
    return "\n".join(lines)


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line, with its type name."""
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text}"


def is_graph_file_spec(spec: str) -> bool:
    """True if ``spec`` names a graph file rather than a builder (a path or a graph-file extension)."""
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if any(sep in spec for sep in separators):
        return True
    return spec.lower().endswith(GRAPH_FILE_EXTENSIONS)


_PARSE_ERRORS = (
    ValueError,  # includes json.JSONDecodeError and UnicodeDecodeError
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    ElementTree.ParseError,
    nx.NetworkXError,
)


def _read_graph_file(path: str) -> nx.Graph:
    """Parse the file by extension; parser failures become TopologyError."""
    lower = path.lower()
    try:
        if lower.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            if not isinstance(data, dict) or "nodes" not in data:
                raise ValueError('expected a node-link JSON object with "nodes" and "edges"')
            edges_key = "links" if "links" in data and "edges" not in data else "edges"
            if edges_key not in data:
                data = {**data, "edges": []}
            graph = _node_link_graph(data, edges_key)
        elif lower.endswith(".graphml"):
            graph = nx.read_graphml(path)
        elif lower.endswith(".adjlist"):
            graph = nx.read_adjlist(path)
        else:
            graph = nx.read_edgelist(path, nodetype=str, data=False)
    except OSError as exc:
        raise TopologyError(f"cannot read topology file {path!r}: {exc.strerror or exc}") from None
    except _PARSE_ERRORS as exc:
        raise TopologyError(f"cannot parse topology file {path!r}: {_one_line(exc)}") from None
    return graph


def _int_labels(graph: nx.Graph, path: str) -> nx.Graph:
    """Turn digit-string node labels ("0", "12") into ints; leave others for validation."""
    mapping: dict[Any, Any] = {}
    for node in graph.nodes:
        if isinstance(node, str) and node.strip().isascii() and node.strip().isdigit():
            mapping[node] = int(node.strip())
    if not mapping:
        return graph
    new_labels = [mapping.get(node, node) for node in graph.nodes]
    if len(set(new_labels)) != len(new_labels):
        raise TopologyError(
            f"topology file {path!r} has node labels that collide as integers: "
            f"{_preview(list(graph.nodes))}"
        )
    return nx.relabel_nodes(graph, mapping, copy=True)


def _load_file(path: str, n_nodes: int | None) -> nx.Graph:
    if not os.path.exists(path):
        raise TopologyError(f"topology file {path!r} does not exist")
    if os.path.isdir(path):
        raise TopologyError(f"topology file {path!r} is a directory, not a graph file")
    graph = _read_graph_file(path)
    if graph.is_directed():
        raise TopologyError(
            f"topology file {path!r} holds a directed graph; directed graphs are not "
            f'supported; store it undirected ("directed": false / edgedefault="undirected")'
        )
    if graph.is_multigraph():
        graph = nx.Graph(graph)  # collapse parallel edges
    graph = _int_labels(graph, path)
    # Put nodes in 0..n-1 order so iteration order does not depend on the file.
    ordered = nx.Graph()
    ordered.graph.update(graph.graph)
    ordered.add_nodes_from(sorted(graph.nodes(data=True), key=_label_sort_key))
    ordered.add_edges_from(sorted(graph.edges(data=True), key=_edge_sort_key))
    try:
        n = _check_structure(ordered)
        if n_nodes is not None and n != n_nodes:
            raise TopologyError(
                f"topology file {path!r} has {n} nodes but {n_nodes} were asked for (--nodes)"
            )
        validate_topology(ordered)
    except TopologyError as exc:
        message = str(exc)
        if path in message:
            raise
        raise TopologyError(f"topology file {path!r}: {message}") from None
    return ordered


def _label_sort_key(item: tuple[Any, dict[str, Any]]) -> tuple[int, Any]:
    node = item[0]
    if isinstance(node, int) and not isinstance(node, bool):
        return (0, node)
    return (1, str(node))


def _edge_sort_key(item: tuple[Any, Any, dict[str, Any]]) -> tuple[tuple[int, Any], ...]:
    u, v, _ = item
    a, b = _label_sort_key((u, {})), _label_sort_key((v, {}))
    return (min(a, b), max(a, b))


# ----------------------------------------------------------------------------
# spec parsing
# ----------------------------------------------------------------------------


def _most_square(n: int) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows * cols = n``, ``rows <= cols``, as square as possible."""
    rows = math.isqrt(n)
    while n % rows:
        rows -= 1
    return rows, n // rows


def _parse_size(value: str, name: str, spec: str) -> tuple[int, int]:
    parts = value.lower().split("x")
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        rows, cols = (int(part) for part in parts)
        if rows >= 1 and cols >= 1:
            return rows, cols
    raise TopologyError(
        f"bad {name} size {value!r} in {spec!r}: expected ROWSxCOLS with both >= 1, e.g. {name}:2x4"
    )


def _parse_param_int(value: str, what: str, spec: str, example: str) -> int:
    text = value.strip()
    if text.isascii() and text.isdigit() and int(text) >= 1:
        return int(text)
    raise TopologyError(
        f"bad {what} {value!r} in {spec!r}: expected a positive integer, e.g. {example}"
    )


def _parse_param_float(
    value: str, what: str, spec: str, example: str, *, allow_zero: bool
) -> float:
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    low_ok = number >= 0.0 if allow_zero else number > 0.0
    if math.isfinite(number) and low_ok and number <= 1.0:
        return number
    raise TopologyError(
        f"bad {what} {value!r} in {spec!r}: expected a number in {interval}, e.g. {example}"
    )


def _default_regular_degree(n: int) -> int:
    """3, or 4 for odd n (n * degree must be even), capped at n - 1."""
    degree = 3 if n % 2 == 0 else 4
    return min(degree, n - 1)


def _build_from_spec(spec: str, n_nodes: int | None, seed: int | None) -> nx.Graph:
    name, *params = spec.split(":")
    name = name.strip().lower().replace("_", "-")
    if name not in BUILDERS:
        raise TopologyError(
            f"unknown topology {spec!r}: choose one of {_BUILDER_LIST}, "
            f"or a graph file (.json, .graphml, .edgelist)"
        )
    max_params = {"torus": 1, "grid": 1, "random-regular": 1, "erdos-renyi": 1, "small-world": 2}
    allowed = max_params.get(name, 0)
    if len(params) > allowed:
        usage = {
            0: f"{name} takes no parameters (give the node count with --nodes)",
            1: f"expected {name}:VALUE",
            2: f"expected {name}:K:P",
        }[allowed]
        raise TopologyError(f"too many parameters in topology {spec!r}: {usage}")

    if name in ("torus", "grid"):
        builder = torus_graph if name == "torus" else grid_graph
        if params and params[0].strip():
            rows, cols = _parse_size(params[0], name, spec)
            if n_nodes is not None and rows * cols != n_nodes:
                raise TopologyError(
                    f"topology {spec!r} has {rows * cols} nodes but {n_nodes} were asked for "
                    f"(--nodes); use {name}:RxC with R*C = {n_nodes} or drop --nodes"
                )
            return builder(rows, cols)
        if n_nodes is None:
            raise TopologyError(
                f"topology {spec!r} needs a size: {name}:RxC (e.g. {name}:2x4) "
                f"or a node count (--nodes N)"
            )
        return builder(*_most_square(n_nodes))

    if n_nodes is None:
        raise TopologyError(f"topology {spec!r} needs a node count (--nodes N)")
    value = params[0].strip() if params else ""

    if name == "ring":
        return ring_graph(n_nodes)
    if name == "path":
        return path_graph(n_nodes)
    if name == "complete":
        return complete_graph(n_nodes)
    if name == "star":
        return star_graph(n_nodes)
    if name == "hypercube":
        return hypercube_graph(n_nodes)
    if name == "exponential":
        return exponential_graph(n_nodes)
    if name == "random-regular":
        if value:
            degree = _parse_param_int(value, "degree", spec, "random-regular:3")
        else:
            degree = _default_regular_degree(n_nodes)
        return random_regular_graph(n_nodes, degree, seed=seed)
    if name == "erdos-renyi":
        p = 0.5
        if value:
            p = _parse_param_float(
                value, "edge probability", spec, "erdos-renyi:0.5", allow_zero=False
            )
        return erdos_renyi_graph(n_nodes, p, seed=seed)
    # small-world
    k = min(4, n_nodes - 1)
    if value:
        k = _parse_param_int(value, "neighbour count K", spec, "small-world:4:0.1")
    p = 0.1
    if len(params) > 1 and params[1].strip():
        p = _parse_param_float(
            params[1].strip(), "rewiring probability P", spec, "small-world:4:0.1", allow_zero=True
        )
    return small_world_graph(n_nodes, k, p, seed=seed)


def parse_topology(
    spec: str | os.PathLike[str], n_nodes: int | None = None, *, seed: int | None = 0
) -> nx.Graph:
    """Turn a topology spec (a builder name or a graph file) into a validated graph.

    See the module docstring for the grammar: ``ring``, ``torus:2x4``,
    ``random-regular:3``, ``small-world:4:0.1``, ``topologies/barbell-8.json``.
    A spec containing a path separator or ending in ``.json``, ``.graphml``,
    ``.edgelist``, ``.edges``, ``.txt`` or ``.adjlist`` is read as a file.

    Parameters
    ----------
    spec : str or os.PathLike
        Builder spec or graph file path.
    n_nodes : int or None, optional
        Number of nodes (the CLI's ``--nodes``). Required by every builder
        except ``torus:RxC`` / ``grid:RxC``; for a file, None takes the count
        from the file and any other value must match it.
    seed : int or None, optional
        Seed of the random builders (``random-regular``, ``erdos-renyi``,
        ``small-world``); None draws a fresh graph each call.

    Returns
    -------
    networkx.Graph
        A graph that passes :func:`validate_topology`, with
        ``graph.graph["spec"] = spec``.

    Raises
    ------
    TopologyError
        If the name is unknown, a parameter is malformed or out of range, the
        file is missing, malformed, directed or not a valid topology, or the
        node count disagrees with ``n_nodes``.
    """
    if n_nodes is not None:
        n_nodes = _check_int(n_nodes, "number of nodes (--nodes)")
    seed = _check_seed(seed)
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
        is_file = True
    elif isinstance(spec, str):
        spec = spec.strip()
        is_file = is_graph_file_spec(spec)
    else:
        raise TopologyError(
            f"topology spec must be a string such as 'ring' or a file path, got {spec!r}"
        )
    if is_file:
        graph = _load_file(spec, n_nodes)
    else:
        graph = _build_from_spec(spec, n_nodes, seed)
        validate_topology(graph, n_nodes)
    graph.graph["spec"] = spec
    return graph
