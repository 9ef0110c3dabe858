"""`dasgd report`: one self-contained HTML file, a figure per section, graceful without analysis.json."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dasgd.analysis.metrics import read_events
from dasgd.cli import main

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    # run id: `dasgd simulate` arguments (virtual time: each takes about a second)
    "ring8": ["-n", "8", "--topology", "ring"],
    "torus12": ["-n", "12", "--topology", "torus:3x4", "--slowdown", "3:4"],
    "ps4": ["-n", "4", "--algorithm", "ps-async"],
}
PER_RUN = ("curves", "staleness", "graph", "convergence")


def run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory):
    """Three simulated run directories (8-node ring, 12-node torus with a straggler, ps-async)."""
    out = tmp_path_factory.mktemp("runs")
    for run_id, args in RUNS.items():
        code = main(
            ["simulate", "-q", *args, "--steps", "200", "--eval-interval-s", "0.01"]
            + ["--log-interval-s", "0.01", "--out-dir", str(out), "--run-id", run_id]
        )
        assert code == 0
    return out


def _measure(rng, mean: float, count: int, t_end: float, *, per_node=None, per_edge=None):
    """A MEASURE of analysis.json (schema format 1) from Poisson samples around ``mean`` steps."""
    samples = rng.poisson(max(mean, 0.1), size=count)
    counts, edges = np.histogram(samples, bins=np.arange(samples.max() + 2))
    t = np.linspace(0.0, t_end, 10)
    measure = {
        "avg_steps": float(samples.mean()),
        "max_steps": int(samples.max()),
        "count": count,
        "histogram": {"bin_edges": edges.tolist(), "counts": counts.tolist()},
        "over_time": {
            "t_s": t.tolist(),
            "avg_steps": (mean + 0.1 * np.sin(t)).tolist(),
            "max_steps": [int(samples.max())] * len(t),
        },
        "per_node": per_node or [],
    }
    if per_edge is not None:
        measure["per_edge"] = per_edge
    return measure


def write_fixture_analysis(run_dir: Path) -> dict:
    """Write an analysis.json of the documented shape (format 1) built from the run's own logs.

    The staleness numbers are synthetic; the per-node curves are the run's eval records.
    """
    rng = np.random.default_rng(0)
    summary = json.loads((run_dir / "summary.json").read_text())
    run = summary["run"]
    n, ps = run["n_nodes"], run["algorithm"] != "dasgd"
    t_end = run["wall_s"]
    nodes = []
    for name in ["server"] if ps else [f"node-{i}" for i in range(n)]:
        evals = read_events(run_dir / f"{name}.jsonl", "eval")
        t = [r["t_s"] for r in evals]
        nodes.append(
            {
                "node": "server" if ps else int(name.split("-")[1]),
                "t_s": t,
                "gradients": np.linspace(0, run["steps"], len(t)).round().tolist(),
                "test_loss": [r["test_loss"] for r in evals],
                "test_accuracy": [r["test_accuracy"] for r in evals],
            }
        )
    t = np.array(nodes[0]["t_s"])
    per_node = [
        {"node": i, "avg_steps": 1.0 + i, "max_steps": 3 + i, "count": 10} for i in range(n)
    ]
    edges = [
        {"src": e["src"], "dst": e["dst"], "avg_steps": e["staleness_avg_steps"], "max_steps": 9}
        | {"count": 5}
        for e in summary["edges"]
    ]
    over = np.linspace(0, t_end, 8)
    analysis = {
        "format": 1,
        "algorithm": run["algorithm"],
        "n_nodes": n,
        "time_base": "virtual seconds since the run began",
        "staleness": {
            "apply": None
            if ps
            else _measure(rng, 3.0, 500, t_end, per_node=per_node, per_edge=edges),
            "virtual": _measure(rng, n - 1, 500, t_end, per_node=per_node),
            "tau": _measure(rng, n - 1, 500, t_end, per_node=per_node) if ps else None,
            "pairwise": None
            if ps
            else {
                "avg_steps": 2.5,
                "max_steps": 7,
                "loose_avg_steps": 4.0,
                "loose_max_steps": 11,
                "sampled_nodes": n,
                "over_time": {
                    "t_s": over.tolist(),
                    "avg_steps": [2.5] * 8,
                    "max_steps": [7] * 8,
                    "loose_avg_steps": [4.0] * 8,
                    "loose_max_steps": [11] * 8,
                },
                "histogram": {"bin_edges": [0, 2, 4, 6, 8], "counts": [10, 20, 5, 1]},
            },
        },
        "convergence": {
            "t_s": t.tolist(),
            "gradients": nodes[0]["gradients"],
            "average_model_test_loss": [None, *nodes[0]["test_loss"][1:]],
            "average_model_test_accuracy": [None, *nodes[0]["test_accuracy"][1:]],
            "grad_norm_sq_train": np.exp(-10 * t).tolist(),
            "consensus_distance_rel": (None if ps else (1e-3 * np.exp(-5 * t)).tolist()),
            "consensus_exact": True,
        },
        "nodes": nodes,
    }
    (run_dir / "analysis.json").write_text(json.dumps(analysis))
    return analysis


@pytest.fixture
def runs(sim_runs, tmp_path):
    """Fresh copies of the simulated runs, with or without analysis.json as a test makes them."""
    pytest.importorskip("matplotlib")
    copies = tmp_path / "runs"
    shutil.copytree(sim_runs, copies)
    return copies


def figures_of(text: str) -> list[str]:
    return re.findall(r'<img data-figure="([^"]+)"', text)


def assert_self_contained(text: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "<link" not in text and "url(" not in text and "@import" not in text
    for src in re.findall(r'<img [^>]*src="([^"]*)"', text):
        assert src.startswith("data:image/png;base64,")
    assert text.count("<img ") == len(figures_of(text))


def test_report_of_runs_without_analysis_json(runs, capsys):
    """Older runs (no analysis.json): a table row, per-node curves from the logs, and notes."""
    for run_id in RUNS:
        (runs / run_id / "analysis.json").unlink(missing_ok=True)
    out = runs / "report.html"
    code, stdout, err = run_main(capsys, "report", *(runs / r for r in RUNS), "-o", out)
    assert code == 0, err
    text = out.read_text()
    assert_self_contained(text)
    figures = figures_of(text)
    for run_id in RUNS:
        assert f"{run_id}/curves" in figures and f"{run_id}/graph" in figures
        assert f"{run_id}/convergence" not in figures
        assert f"<td>{run_id}</td>" in text
        assert f"{run_id}: no analysis.json" in stdout
    # S1 from summary.json's interval records: the DASGD runs still show staleness over time
    assert "ring8/staleness" in figures and "histograms need analysis.json" in text
    assert text.count("no analysis.json (") == len(RUNS)
    assert f"({len(figures)} figures, 3 runs)" in stdout


def test_report_with_analysis_json_has_every_figure(runs, capsys):
    """With analysis.json (documented format 1), every section has its figure."""
    for run_id in RUNS:
        write_fixture_analysis(runs / run_id)
    out = runs / "report.html"
    code, stdout, err = run_main(capsys, "report", *(runs / r for r in RUNS), "-o", out)
    assert code == 0, err
    text = out.read_text()
    assert_self_contained(text)
    expected = ["scaling"] + [f"{r}/{kind}" for r in RUNS for kind in PER_RUN]
    assert figures_of(text) == expected
    assert "no analysis.json" not in text
    # the table: S2 for every run, S3 and S1 for DASGD, tau for PS
    row = re.search(r"<tr><td>ps4</td>(.*?)</tr>", text).group(1)
    assert re.findall(r"<td>([^<]*)</td>", row)[-1] != "–"  # tau avg / max
    row = re.search(r"<tr><td>ring8</td>(.*?)</tr>", text).group(1)
    cells = re.findall(r"<td>([^<]*)</td>", row)
    assert "–" not in cells[-4:-1] and cells[-1] == "–"  # S1, S2, S3; no tau


def test_report_of_runs_with_their_own_analysis_json(runs, capsys):
    """Runs made by this dasgd write analysis.json: every section has its figure."""
    assert all((runs / r / "analysis.json").is_file() for r in RUNS)
    out = runs / "report.html"
    code, stdout, err = run_main(capsys, "report", *(runs / r for r in RUNS), "-o", out)
    assert code == 0, err
    text = out.read_text()
    assert_self_contained(text)
    assert figures_of(text) == ["scaling"] + [f"{r}/{kind}" for r in RUNS for kind in PER_RUN]
    assert "no analysis.json" not in text and stdout.startswith("report: ")
    for run_id in RUNS:  # S2 in every row
        row = re.search(rf"<tr><td>{run_id}</td>(.*?)</tr>", text).group(1)
        assert re.findall(r"<td>([^<]*)</td>", row)[-3] != "–"


def test_report_of_a_run_without_events(tmp_path, capsys):
    """--no-events: analysis.json says why S2/S3/convergence are missing; the rest is drawn."""
    pytest.importorskip("matplotlib")
    code = main(
        ["simulate", "-q", "-n", "4", "--steps", "100", "--no-events"]
        + ["--eval-interval-s", "0.01", "--log-interval-s", "0.01"]
        + ["--out-dir", str(tmp_path), "--run-id", "quiet"]
    )
    assert code == 0
    code, stdout, err = run_main(capsys, "report", tmp_path / "quiet", "-o", tmp_path / "r.html")
    assert code == 0, err
    assert "quiet: analysis.json: events not recorded (--no-events)" in stdout
    text = (tmp_path / "r.html").read_text()
    assert figures_of(text) == ["quiet/curves", "quiet/staleness", "quiet/graph"]
    assert "interval records" in text  # S1 over time from the logs
    row = re.search(r"<tr><td>quiet</td>(.*?)</tr>", text).group(1)
    cells = re.findall(r"<td>([^<]*)</td>", row)
    assert cells[-4] != "–" and cells[-3:] == ["–", "–", "–"]  # S1 from summary.json only


def test_report_reads_summary_edges_under_either_name(runs, capsys):
    """summary.json's per-edge apply staleness may be named staleness_apply_avg_steps."""
    from dasgd.analysis.report import _edge_values, load_run

    path = runs / "ring8"
    (path / "analysis.json").unlink(missing_ok=True)
    summary = json.loads((path / "summary.json").read_text())
    before, _ = _edge_values(load_run(path))
    for e in summary["edges"]:  # one name or the other, as older and newer runs write them
        e.pop("staleness_apply_avg_steps", None)
    (path / "summary.json").write_text(json.dumps(summary))
    assert _edge_values(load_run(path))[0] == before
    for e in summary["edges"]:
        e["staleness_apply_avg_steps"] = e.pop("staleness_avg_steps")
    (path / "summary.json").write_text(json.dumps(summary))
    after, _ = _edge_values(load_run(path))
    assert after == before and len(after) == 16


def test_report_notes_an_unreadable_analysis_json(runs, capsys):
    (runs / "ring8" / "analysis.json").write_text("{broken")
    code, stdout, _ = run_main(capsys, "report", runs / "ring8", "-o", runs / "r.html")
    assert code == 0
    assert "ring8: analysis.json is not valid JSON" in stdout
    (runs / "ring8" / "analysis.json").write_text(json.dumps({"format": 99}))
    code, stdout, _ = run_main(capsys, "report", runs / "ring8", "-o", runs / "r.html")
    assert code == 0 and "format 99" in stdout


def test_report_of_a_run_without_eval_records(runs, capsys):
    """A run evaluated never (--eval-interval-s 0): no curves, one note, the rest of the report."""
    path = runs / "ring8"
    (path / "analysis.json").unlink(missing_ok=True)
    for log in path.glob("node-*.jsonl"):
        records = [r for r in read_events(log) if r["kind"] != "eval"]
        log.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stdout, _ = run_main(capsys, "report", path, "-o", runs / "r.html")
    assert code == 0
    assert "no eval records" in stdout
    assert figures_of((runs / "r.html").read_text()) == ["ring8/staleness", "ring8/graph"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "nope", "does not exist"),
        (lambda tmp: tmp, "no summary.json in"),
        (lambda tmp: (tmp / "summary.json").write_text("{oops") and tmp, "is not valid JSON"),
        (lambda tmp: (tmp / "summary.json").write_text("[1]") and tmp, "expected a JSON object"),
    ],
)
def test_bad_run_dir_is_one_line_exit_2(tmp_path, capsys, make, message):
    code, out, err = run_main(capsys, "report", make(tmp_path), "-o", tmp_path / "r.html")
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_missing_output_directory_is_one_line_exit_2(sim_runs, tmp_path, capsys):
    code, _, err = run_main(capsys, "report", sim_runs / "ring8", "-o", tmp_path / "no" / "r.html")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1


def test_without_matplotlib_the_command_says_how_to_install_it(
    sim_runs, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import fails
    code, _, err = run_main(capsys, "report", sim_runs / "ring8", "-o", tmp_path / "r.html")
    assert code == 2
    assert "pip install 'dasgd[report]'" in err and err.count("\n") == 1


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_report_renders_in_headless_chromium(runs, tmp_path):
    """Every figure decodes in a real browser (the page's script counts loaded images)."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    (runs / "ps4" / "analysis.json").unlink()  # one older run among them
    from dasgd.analysis.report import write_report

    out, figures, _ = write_report([runs / r for r in RUNS], tmp_path / "report.html")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1400,4000",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", out.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'<body[^>]*data-figures-loaded="(\d+)"', dom.stdout)
    assert loaded, "the page's load script did not run"
    legacy = ["ps4/curves", "ps4/staleness", "ps4/graph"]  # tau over time from server.jsonl
    assert (
        figures == ["scaling"] + [f"{r}/{k}" for r in RUNS if r != "ps4" for k in PER_RUN] + legacy
    )
    assert int(loaded.group(1)) == len(figures)
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", out.resolve().as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 10_000


@pytest.mark.multiprocess
def test_report_of_a_real_two_node_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code, _, err = run_main(
        capsys,
        "run",
        "-q",
        "-n",
        "2",
        "--steps",
        "100",
        "--eval-interval-s",
        "0.02",
        "--out-dir",
        tmp_path,
        "--run-id",
        "real",
    )
    assert code == 0, err
    code, _, err = run_main(capsys, "report", tmp_path / "real", "-o", tmp_path / "r.html")
    assert code == 0, err
    text = (tmp_path / "r.html").read_text()
    assert_self_contained(text)
    assert "real/curves" in figures_of(text) and "real/graph" in figures_of(text)
