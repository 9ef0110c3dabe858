"""Tests of dasgd.topology: builders, spec parsing, graph files, mixing matrices."""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from dasgd import topology
from dasgd.errors import TopologyError
from dasgd.topology import (
    BUILDERS,
    complete_graph,
    describe_topology,
    erdos_renyi_graph,
    exponential_graph,
    format_topology,
    grid_graph,
    hypercube_graph,
    metropolis_hastings_weights,
    neighbours,
    parse_topology,
    path_graph,
    random_regular_graph,
    ring_graph,
    save_topology,
    small_world_graph,
    spectral_gap,
    star_graph,
    torus_graph,
    validate_topology,
)

TOPOLOGIES_DIR = Path(__file__).resolve().parent.parent / "topologies"
RANDOM_SPECS = {"random-regular", "erdos-renyi", "small-world"}


def _exponential_degree(n: int) -> int:
    offsets = set()
    step = 1
    while step < n:
        offsets |= {step % n, (-step) % n}
        step *= 2
    return len(offsets - {0})


def _expected_edges(spec: str, n: int) -> int | None:
    """Edge count of the deterministic builders (None: not fixed)."""
    name = spec.split(":")[0]
    if name == "ring":
        return {1: 0, 2: 1}.get(n, n)
    if name in ("path", "star"):
        return n - 1
    if name == "complete":
        return n * (n - 1) // 2
    if name == "hypercube":
        return n * int(math.log2(n)) // 2
    if name == "exponential":
        return n * _exponential_degree(n) // 2
    return None


# (spec, n_nodes) for every builder, including n = 1 and n = 2 where valid.
CONTRACT_CASES = [
    *[("ring", n) for n in (1, 2, 3, 8)],
    *[("path", n) for n in (1, 2, 5)],
    *[("complete", n) for n in (1, 2, 6)],
    *[("star", n) for n in (1, 2, 7)],
    *[("hypercube", n) for n in (1, 2, 8, 16)],
    *[("exponential", n) for n in (1, 2, 6, 8, 13)],
    *[("torus", n) for n in (1, 2, 6, 9, 12, 7)],
    *[("grid", n) for n in (1, 2, 6, 12)],
    *[("random-regular", n) for n in (1, 2, 3, 5, 8, 20)],
    ("random-regular:4", 10),
    *[("erdos-renyi", n) for n in (1, 2, 10)],
    ("erdos-renyi:0.3", 20),
    *[("small-world", n) for n in (1, 2, 3, 5, 12)],
    ("small-world:6:0.3", 20),
]


def test_contract_cases_cover_every_builder():
    assert {spec.split(":")[0] for spec, _ in CONTRACT_CASES} == set(BUILDERS)


@pytest.mark.parametrize(("spec", "n"), CONTRACT_CASES)
def test_builder_contract(spec, n):
    graph = parse_topology(spec, n, seed=7)
    assert isinstance(graph, nx.Graph)
    assert not graph.is_directed() and not graph.is_multigraph()
    assert sorted(graph.nodes) == list(range(n))
    assert all(type(v) is int for v in graph.nodes)
    assert nx.number_of_selfloops(graph) == 0
    assert nx.is_connected(graph)
    assert graph.graph["spec"] == spec
    assert validate_topology(graph, n) is graph
    expected = _expected_edges(spec, n)
    if expected is not None:
        assert graph.number_of_edges() == expected
    if spec == "exponential":
        assert {d for _, d in graph.degree} <= {_exponential_degree(n)}
    if spec.split(":")[0] in RANDOM_SPECS:
        again = parse_topology(spec, n, seed=7)
        assert sorted(again.edges) == sorted(graph.edges)


def test_deterministic_shapes():
    assert sorted(ring_graph(4).edges) == [(0, 1), (0, 3), (1, 2), (2, 3)]
    assert set(star_graph(5).adj[0]) == {1, 2, 3, 4}
    assert [d for _, d in star_graph(5).degree] == [4, 1, 1, 1, 1]
    assert path_graph(4).number_of_edges() == 3
    assert complete_graph(5).number_of_edges() == 10
    assert {d for _, d in hypercube_graph(16).degree} == {4}
    assert set(hypercube_graph(8).adj[5]) == {4, 7, 1}
    # exponential: n = 8 -> offsets +-1, +-2, +-4 -> degree 5 = 2 log2(n) - 1
    assert neighbours(exponential_graph(8), 0) == [1, 2, 4, 6, 7]
    assert {d for _, d in exponential_graph(16).degree} == {7}


@pytest.mark.parametrize(("rows", "cols"), [(3, 3), (3, 4), (4, 5)])
def test_torus_is_four_regular_with_2n_edges(rows, cols):
    graph = torus_graph(rows, cols)
    n = rows * cols
    assert graph.number_of_edges() == 2 * n
    assert {d for _, d in graph.degree} == {4}
    # row-major numbering: (r, c) -> r * cols + c, with wraparound
    assert set(graph.adj[0]) == {1, cols - 1, cols, (rows - 1) * cols}
    expected = nx.convert_node_labels_to_integers(
        nx.grid_2d_graph(rows, cols, periodic=True), ordering="sorted"
    )
    assert nx.utils.edges_equal(graph.edges, expected.edges)


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (1, 2), (2, 2), (2, 3), (1, 5)])
def test_small_torus_has_no_duplicate_edges(rows, cols):
    graph = torus_graph(rows, cols)
    expected = nx.grid_2d_graph(rows, cols, periodic=True)
    assert graph.number_of_edges() == expected.number_of_edges()
    assert nx.number_of_selfloops(graph) == 0


def test_grid_and_square_factorization():
    graph = grid_graph(3, 4)
    assert graph.number_of_edges() == 3 * 3 + 4 * 2
    assert set(graph.adj[0]) == {1, 4}
    assert nx.utils.edges_equal(parse_topology("grid", 12).edges, graph.edges)
    assert nx.utils.edges_equal(parse_topology("torus:2x4").edges, torus_graph(2, 4).edges)
    assert nx.utils.edges_equal(parse_topology("torus", 16).edges, torus_graph(4, 4).edges)
    # a prime count has only the 1 x n factorization: a ring
    assert parse_topology("torus", 7).number_of_edges() == 7


def test_random_builders_seeded():
    a = random_regular_graph(12, 3, seed=1)
    assert {d for _, d in a.degree} == {3}
    assert sorted(a.edges) == sorted(random_regular_graph(12, 3, seed=1).edges)
    b = erdos_renyi_graph(15, 0.4, seed=2)
    assert sorted(b.edges) == sorted(erdos_renyi_graph(15, 0.4, seed=2).edges)
    c = small_world_graph(16, 4, 0.2, seed=3)
    assert c.number_of_edges() == 16 * 4 // 2
    assert sorted(c.edges) == sorted(small_world_graph(16, 4, 0.2, seed=3).edges)
    assert nx.is_connected(a) and nx.is_connected(b) and nx.is_connected(c)


def test_random_regular_default_degree():
    assert {d for _, d in parse_topology("random-regular", 8).degree} == {3}
    assert {d for _, d in parse_topology("random-regular", 9).degree} == {4}  # odd n
    assert parse_topology("random-regular", 4).number_of_edges() == 6  # 3 = n - 1


# ----------------------------------------------------------------------------
# error paths: TopologyError whose one-line message names the bad value
# ----------------------------------------------------------------------------


def _raises(fragment: str, func, *args, **kwargs) -> str:
    with pytest.raises(TopologyError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("spec", "n", "fragment"),
    [
        ("foo", 4, "'foo'"),
        ("", 4, "unknown topology ''"),
        ("torus:2by4", None, "'2by4'"),
        ("grid:0x3", None, "'0x3'"),
        ("torus:2x4", 6, "6"),
        ("erdos-renyi:abc", 5, "'abc'"),
        ("erdos-renyi:0", 5, "'0'"),
        ("erdos-renyi:1.5", 5, "'1.5'"),
        ("random-regular:0", 6, "'0'"),
        ("random-regular:x", 6, "'x'"),
        ("random-regular:3", 7, "degree=3"),
        ("random-regular:8", 6, "degree=8"),
        ("small-world:3:0.1", 10, "k=3"),
        ("small-world:4:2", 10, "'2'"),
        ("small-world:four", 10, "'four'"),
        ("small-world:4:0.1:9", 10, "small-world:4:0.1:9"),
        ("ring:5", 5, "ring:5"),
        ("hypercube", 6, "6"),
        ("ring", None, "--nodes"),
        ("torus", None, "torus:RxC"),
        ("ring", 0, "0"),
    ],
)
def test_bad_specs(spec, n, fragment):
    _raises(fragment, parse_topology, spec, n)


def test_unknown_name_lists_choices():
    message = _raises("'foo'", parse_topology, "foo", 4)
    for name in BUILDERS:
        assert name in message
    assert ".json" in message and ".graphml" in message and ".edgelist" in message


def test_torus_mismatch_names_both():
    message = _raises("torus:2x4", parse_topology, "torus:2x4", 6)
    assert "8" in message and "6" in message


@pytest.mark.parametrize(
    ("func", "args", "fragment"),
    [
        (ring_graph, (0,), "0"),
        (ring_graph, (2.5,), "2.5"),
        (ring_graph, (True,), "True"),
        (hypercube_graph, (12,), "12"),
        (torus_graph, (0, 3), "0"),
        (random_regular_graph, (7, 3), "degree=3"),
        (random_regular_graph, (6, 1), "degree 1"),
        (erdos_renyi_graph, (5, 0.0), "0.0"),
        (erdos_renyi_graph, (5, float("nan")), "nan"),
        (small_world_graph, (10, 1, 0.1), "k=1"),
        (small_world_graph, (10, 12, 0.1), "k=12"),
        (small_world_graph, (10, 4, -0.1), "-0.1"),
    ],
)
def test_builder_errors(func, args, fragment):
    _raises(fragment, func, *args)


def test_random_builders_give_up_after_bounded_attempts(monkeypatch):
    _raises("larger p", erdos_renyi_graph, 60, 0.005, seed=0)
    # force every sample to be disconnected: the builders must stop and say so
    seeds = []

    def two_triangles(*args, seed=None):
        seeds.append(seed)
        return nx.Graph([(0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3)])

    monkeypatch.setattr(nx, "random_regular_graph", two_triangles)
    monkeypatch.setattr(nx, "watts_strogatz_graph", two_triangles)
    _raises("degree=2", random_regular_graph, 6, 2, seed=5)
    assert seeds == list(range(5, 5 + topology.MAX_ATTEMPTS))
    _raises("k=2", small_world_graph, 6, 2, 0.5, seed=0)


def test_bad_seed():
    _raises("'x'", parse_topology, "erdos-renyi", 5, seed="x")


# ----------------------------------------------------------------------------
# graph files
# ----------------------------------------------------------------------------


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.json")
    _raises(f"topology file '{path}' does not exist", parse_topology, path)


def test_malformed_json(tmp_path):
    path = _write(tmp_path / "bad.json", '{"nodes": [')
    message = _raises(path, parse_topology, path)
    assert "cannot parse" in message


def test_json_without_nodes(tmp_path):
    path = _write(tmp_path / "bad.json", "[1, 2, 3]")
    _raises(path, parse_topology, path)


def test_malformed_graphml(tmp_path):
    path = _write(tmp_path / "bad.graphml", "<graphml><graph>")
    _raises(path, parse_topology, path)


def test_edgelist_with_bad_labels(tmp_path):
    path = _write(tmp_path / "bad.edgelist", "a b\nb c\n")
    message = _raises(path, parse_topology, path)
    assert "'a'" in message


def test_disconnected_file(tmp_path):
    path = _write(tmp_path / "split.edgelist", "0 1\n2 3\n")
    message = _raises(path, parse_topology, path)
    assert "2 components" in message and "{0, 1}" in message and "{2, 3}" in message


def test_node_count_mismatch(tmp_path):
    path = str(tmp_path / "ring6.json")
    save_topology(ring_graph(6), path)
    message = _raises(path, parse_topology, path, 4)
    assert "has 6 nodes but 4 were asked for (--nodes)" in message
    assert parse_topology(path, 6).number_of_nodes() == 6


def test_labels_not_zero_to_n(tmp_path):
    path = _write(tmp_path / "gap.edgelist", "0 1\n1 3\n")
    message = _raises(path, parse_topology, path)
    assert "0..2" in message and "3" in message


def test_directed_files(tmp_path):
    data = {"directed": True, "multigraph": False, "graph": {}, "nodes": [{"id": 0}, {"id": 1}]}
    data["edges"] = [{"source": 0, "target": 1}]
    path = _write(tmp_path / "directed.json", json.dumps(data))
    _raises("directed", parse_topology, path)
    digraph = nx.DiGraph([(0, 1), (1, 2)])
    gml = str(tmp_path / "directed.graphml")
    nx.write_graphml(digraph, gml)
    message = _raises(gml, parse_topology, gml)
    assert "directed" in message


def test_multigraph_file_is_collapsed(tmp_path):
    multi = nx.MultiGraph([(0, 1), (0, 1), (1, 2)])
    path = str(tmp_path / "multi.graphml")
    nx.write_graphml(multi, path)
    graph = parse_topology(path)
    assert not graph.is_multigraph() and graph.number_of_edges() == 2


def test_json_with_links_key_and_string_ids(tmp_path):
    data = {
        "directed": False,
        "multigraph": False,
        "graph": {},
        "nodes": [{"id": "0"}, {"id": "1"}, {"id": "2"}],
        "links": [{"source": "0", "target": "1"}, {"source": "1", "target": "2"}],
    }
    path = _write(tmp_path / "old.json", json.dumps(data))
    graph = parse_topology(path)
    assert sorted(graph.edges) == [(0, 1), (1, 2)]
    assert all(type(v) is int for v in graph.nodes)


def test_edgelist_and_adjlist_formats(tmp_path):
    edges = _write(tmp_path / "g.edges", "# comment\n0 1\n1 2 0.5\n2 0\n")
    assert parse_topology(edges).number_of_edges() == 3
    adj = _write(tmp_path / "g.adjlist", "0 1 2\n1 2\n")
    assert parse_topology(adj).number_of_edges() == 3


@pytest.mark.parametrize("spec", ["ring", "torus:3x4", "random-regular", "complete"])
def test_save_parse_round_trip(tmp_path, spec):
    graph = parse_topology(spec, 12)
    path = tmp_path / "g.json"
    save_topology(graph, path)
    loaded = parse_topology(str(path))
    assert list(loaded.nodes) == list(range(12))
    assert nx.utils.edges_equal(loaded.edges, graph.edges)
    assert loaded.graph["spec"] == str(path)
    assert parse_topology(path).number_of_edges() == graph.number_of_edges()  # PathLike


def test_save_single_node(tmp_path):
    path = str(tmp_path / "one.json")
    save_topology(ring_graph(1), path)
    assert parse_topology(path, 1).number_of_nodes() == 1


def test_save_to_bad_directory(tmp_path):
    path = str(tmp_path / "missing-dir" / "g.json")
    _raises(path, save_topology, ring_graph(3), path)


def test_bundled_topologies_load():
    files = sorted(p for p in TOPOLOGIES_DIR.iterdir() if p.name != "README.md")
    assert len(files) >= 4
    readme = (TOPOLOGIES_DIR / "README.md").read_text(encoding="utf-8")
    for path in files:
        graph = parse_topology(str(path))
        validate_topology(graph)
        assert path.name in readme
        n = int(path.stem.rsplit("-", 1)[1])
        assert graph.number_of_nodes() == n


# ----------------------------------------------------------------------------
# validation, mixing matrix, spectral gap, description
# ----------------------------------------------------------------------------


def test_validate_topology_errors():
    _raises("empty", validate_topology, nx.Graph())
    _raises("directed", validate_topology, nx.DiGraph([(0, 1)]))
    _raises("'a'", validate_topology, nx.Graph([("a", "b")]))
    _raises("self-loop", validate_topology, nx.Graph([(0, 1), (1, 1)]))
    message = _raises("3 components", validate_topology, nx.Graph([(0, 1), (2, 3), (4, 5)]))
    assert "{0, 1}" in message and "{2, 3}" in message
    _raises("5", validate_topology, ring_graph(5), 4)
    _raises("list", validate_topology, [(0, 1)])


def test_neighbours_sorted():
    assert neighbours(ring_graph(5), 0) == [1, 4]
    assert neighbours(ring_graph(1), 0) == []
    _raises("7", neighbours, ring_graph(5), 7)


@pytest.mark.parametrize("spec", ["ring", "star", "torus", "exponential", "erdos-renyi", "path"])
def test_metropolis_hastings_weights(spec):
    graph = parse_topology(spec, 9)
    weights = metropolis_hastings_weights(graph)
    assert weights.shape == (9, 9) and weights.dtype == np.float64
    # the diagonal is 1 - (a sum of the row's weights): a few ulps from exact
    np.testing.assert_allclose(weights, weights.T, rtol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    assert (weights >= 0).all()
    degree = dict(graph.degree)
    for i, j in graph.edges:
        # exact: the same single division as the implementation
        assert weights[i, j] == 1 / (1 + max(degree[i], degree[j]))
    mask = ~(nx.to_numpy_array(graph, nodelist=range(9)).astype(bool) | np.eye(9, dtype=bool))
    assert (weights[mask] == 0).all()


def test_metropolis_hastings_hand_values():
    # path 0-1-2: degrees 1, 2, 1 -> edge weights 1/3
    weights = metropolis_hastings_weights(path_graph(3))
    expected = np.array([[2, 1, 0], [1, 1, 1], [0, 1, 2]]) / 3
    np.testing.assert_allclose(weights, expected)
    np.testing.assert_allclose(metropolis_hastings_weights(complete_graph(5)), np.full((5, 5), 0.2))
    np.testing.assert_allclose(metropolis_hastings_weights(ring_graph(1)), [[1.0]])


# eigvalsh of a symmetric matrix of norm 1 is accurate to a few ulps times n
GAP_ABS = 1e-12


def test_spectral_gap_values():
    # K_n: W = J / n has eigenvalues 1, 0, ..., 0 -> gap 1
    assert spectral_gap(complete_graph(6)) == pytest.approx(1.0, abs=GAP_ABS)
    assert spectral_gap(ring_graph(1)) == 1.0  # exact: n = 1 is answered without eigenvalues
    # ring of 8 with MH weights 1/3: eigenvalues (1 + 2 cos(2 pi k / 8)) / 3
    assert spectral_gap(ring_graph(8)) == pytest.approx(1 - (1 + math.sqrt(2)) / 3, abs=GAP_ABS)
    # path of 3 (hand matrix above): eigenvalues 1, 2/3, 0 -> gap 1/3
    assert spectral_gap(path_graph(3)) == pytest.approx(1 / 3, abs=GAP_ABS)
    assert spectral_gap(ring_graph(8)) < spectral_gap(complete_graph(8))
    barbell = parse_topology(str(TOPOLOGIES_DIR / "barbell-8.json"))
    assert spectral_gap(barbell) < spectral_gap(ring_graph(8))
    assert spectral_gap(nx.Graph([(0, 1), (2, 3)])) == pytest.approx(0.0, abs=GAP_ABS)


def test_describe_topology():
    info = describe_topology(parse_topology("torus:3x4"))
    assert list(info) == [
        "n_nodes",
        "n_edges",
        "degree_min",
        "degree_max",
        "degree_mean",
        "diameter",
        "spectral_gap",
        "mixing_matrix",
    ]
    assert info["n_nodes"] == 12 and info["n_edges"] == 24
    # exact: 48 / 12
    assert info["degree_min"] == info["degree_max"] == 4 and info["degree_mean"] == 4.0
    assert info["diameter"] == 3
    assert info["mixing_matrix"] == "metropolis-hastings"
    assert json.loads(json.dumps(info)) == info
    assert type(info["spectral_gap"]) is float
    single = describe_topology(ring_graph(1))
    assert single["diameter"] == 0 and single["spectral_gap"] == 1.0


def test_format_topology():
    text = format_topology(parse_topology("ring", 4))
    lines = text.splitlines()
    assert lines[0].split() == ["spec", "ring"]
    for key in describe_topology(ring_graph(4)):
        assert any(line.split()[0] == key for line in lines)
    assert "node 0: 1 3" in lines
    assert "node 3: 0 2" in lines
    big = format_topology(parse_topology("ring", 40))
    assert "node 0:" not in big
    assert format_topology(ring_graph(1)).splitlines()[-1] == "node 0:"


def test_describe_skips_diameter_and_spectral_gap_of_huge_graphs():
    # O(n E) and O(n^3): not computed above DESCRIBE_EXACT_MAX_NODES (simulations)
    n = topology.DESCRIBE_EXACT_MAX_NODES + 1
    info = topology.describe_topology(topology.parse_topology("ring", n))
    assert info["n_nodes"] == n and info["n_edges"] == n
    assert info["diameter"] is None and info["spectral_gap"] is None
    assert "not computed above" in topology.format_topology(topology.parse_topology("ring", n))
