"""Emulated partitions (``--partition``): a cut link holds its messages and delivers them when restored.

One real ``dasgd run`` (4 processes, ring, emulated compute time so that the
run lasts a few seconds) and the same cuts in the simulator: both end with
every delta applied exactly once and the models in consensus, and the
per-event logs show that nothing crossed the cut link while it was cut.
"""

import json

import numpy as np
import pytest

from dasgd.analysis.events import APPLY_DTYPE, read_columns
from dasgd.analysis.metrics import read_events
from dasgd.cli import main

from .test_multiprocess import check_drained_run, start_command

#: A message ZeroMQ took just before the cut began may be applied this long after it began
#: (a busy node handles it late), in seconds.
CUT_SLACK_S = 0.1


def senders_applied(run_dir, node: int, sender: int) -> np.ndarray:
    """Run-clock times (s) at which ``node`` applied a delta that came from neighbour ``sender``."""
    applies = read_columns(run_dir / f"node-{node}.applies.bin", APPLY_DTYPE)
    return applies[applies["sender"] == sender]["t_s"]


def assert_nothing_crossed(run_dir, node: int, sender: int, start_s: float, end_s: float):
    t = senders_applied(run_dir, node, sender)
    during = t[(t > start_s + CUT_SLACK_S) & (t < end_s - 0.05)]
    assert during.size == 0, f"node {node} applied deltas from {sender} during the cut: {during}"
    assert (t < start_s).any(), "nothing crossed the link before the cut: the test proves nothing"
    assert (t >= end_s - 0.05).any(), "nothing crossed the link after the cut"


@pytest.mark.multiprocess
def test_real_run_survives_a_cut_link_with_nothing_lost(tmp_path):
    proc = start_command(
        tmp_path,
        "-n",
        "4",
        "--topology",
        "ring",
        "--steps",
        "400",
        "--compute-time",
        "0.01",
        "--partition",
        "0-1@1+2",
        "--send-timeout-s",
        "30",
    )
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    run_dir = tmp_path / "runs" / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    check_drained_run(run_dir, summary, 4)
    assert summary["emulation"]["partition"] == [{"link": [0, 1], "start_s": 1.0, "end_s": 3.0}]
    # the run lasted beyond the cut, and the cut held messages both ways
    assert summary["run"]["wall_s"] > 3.0
    held = [
        read_events(run_dir / f"node-{i}.jsonl", "final")[0]["partition_held_msgs"]
        for i in range(4)
    ]
    assert held[0] > 0 and held[1] > 0 and held[2] == held[3] == 0, held
    assert_nothing_crossed(run_dir, 1, 0, 1.0, 3.0)
    assert_nothing_crossed(run_dir, 0, 1, 1.0, 3.0)


def test_simulated_cuts_hold_messages_and_end_in_consensus(tmp_path, capsys):
    code = main(
        [
            "simulate",
            "-q",
            "-n",
            "4",
            "--topology",
            "ring",
            "--steps",
            "300",
            "--compute-time",
            "0.01",
            "--partition",
            "0-1@1+1",
            "--partition",
            "3@0.5+1",
            "--out-dir",
            str(tmp_path),
            "--run-id",
            "s",
        ]
    )
    capsys.readouterr()
    assert code == 0
    run_dir = tmp_path / "s"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["checks"]["exactly_once"] and summary["checks"]["all_drained"]
    assert summary["checks"]["consensus_distance_rel"] <= 1e-6
    # virtual time: the cut is exact (no slack needed, but the helper's is harmless)
    for node, sender in ((1, 0), (0, 1)):
        t = senders_applied(run_dir, node, sender)
        assert not ((t >= 1.0) & (t < 2.0)).any()
        assert t.min() < 1.0 and (t >= 2.0).any()
    for node in (0, 2):  # node 3's neighbours: nothing from it during its cut, and no more to it
        t = senders_applied(run_dir, node, 3)
        assert not ((t >= 0.5) & (t < 1.5)).any()
        assert (t >= 1.5).any()
        t = senders_applied(run_dir, 3, node)
        assert not ((t >= 0.5) & (t < 1.5)).any()


def test_simulation_without_cuts_is_unchanged_by_a_cut_after_the_end(tmp_path, capsys):
    """A cut that begins after the run is over changes nothing, bit for bit."""
    base = ["simulate", "-q", "-n", "4", "--topology", "ring", "--steps", "50", "--out-dir"]
    assert main([*base, str(tmp_path), "--run-id", "a"]) == 0
    assert main([*base, str(tmp_path), "--run-id", "b", "--partition", "0-1@1000+1"]) == 0
    capsys.readouterr()
    for i in range(4):
        a = np.load(tmp_path / "a" / f"node-{i}.npy")
        b = np.load(tmp_path / "b" / f"node-{i}.npy")
        assert np.array_equal(a, b)  # the same code path and arithmetic: bit for bit


def test_real_command_refuses_a_link_not_in_the_topology(tmp_path):
    proc = start_command(tmp_path, "-n", "4", "--partition", "0-2@1+1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    err = err.decode()
    assert err.count("\n") == 1 and "link 0-2, which is not in the topology" in err
    assert "Traceback" not in err
