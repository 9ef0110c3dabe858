"""Several hosts with separate network stacks: network namespaces on a bridge, tbf-limited links.

Needs root (CI runs as root) and iproute2; skipped with the reason otherwise.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dasgd.runtime.netns import EmulatedHosts, netns_unavailable

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable())),
]

ROOT = str(Path(__file__).resolve().parent.parent)


def test_three_namespace_hosts_with_two_processes_each_drain_to_one_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    with EmulatedHosts(3, rate="100mbit") as hosts:
        procs = []
        for k in range(3):
            argv = _host_argv(hosts, k, tmp_path, "--topology", "exponential", "--steps", "60")
            out = (tmp_path / f"out{k}").open("w")
            procs.append(
                subprocess.Popen(
                    hosts.command(k, argv), stdout=out, stderr=subprocess.STDOUT, env=env
                )
            )
        try:
            codes = [p.wait(timeout=180) for p in procs]
        finally:
            _reap(procs)
    assert codes == [0, 0, 0], [(tmp_path / f"out{k}").read_text()[-1500:] for k in range(3)]
    run0 = tmp_path / "h0" / "r"
    summary = json.loads((run0 / "summary.json").read_text())
    assert summary["run"]["n_nodes"] == 6
    assert summary["checks"]["exactly_once"] and summary["checks"]["all_drained"]
    models = [np.load(run0 / f"node-{i}.npy") for i in range(6)]
    scale = np.linalg.norm(models[0])
    assert all(np.linalg.norm(m - models[0]) <= 1e-6 * scale for m in models)
    # every node advertised its own host's address, found from the route to the rendezvous
    for i in range(6):
        start = json.loads((run0 / f"node-{i}.jsonl").read_text().splitlines()[0])
        assert start["address"].startswith(f"tcp://{hosts.addresses[i // 2]}:")


#: How long the test cuts a host's link, in seconds (well under --send-timeout-s).
CUT_S = 3.0
#: Data the kernel had received before the cut may be applied this long after it began, in s.
CUT_SLACK_S = 0.3


def _reap(procs) -> None:
    """Kill and reap any launcher still running (after a failed assertion or a timeout)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def _host_argv(hosts, k, tmp_path, *extra):
    return [
        sys.executable,
        "-m",
        "dasgd",
        "run",
        "-q",
        "--nhosts",
        str(hosts.n),
        "--host-rank",
        str(k),
        "--nproc-per-host",
        "2",
        "--rdzv-endpoint",
        f"{hosts.addresses[0]}:29400",
        "--out-dir",
        str(tmp_path / f"h{k}"),
        "--run-id",
        "r",
        "--ready-timeout-s",
        "60",
        *extra,
    ]


def _interval_step(log: Path) -> int:
    """The step of the last ``interval`` record of a node's log (0 if none yet)."""
    if log is None or not log.exists():
        return 0
    step = 0
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("kind") == "interval":
            step = record["step"]
    return step


def test_a_host_cut_off_for_3_s_mid_training_loses_nothing(tmp_path):
    """Host 1's link goes down (``ip link set ... down``) for 3 s during training and comes back.

    Every host exits 0; every delta reaches every node exactly once; the models
    agree; and nothing crossed the cut while it lasted (the per-event logs).
    """
    from dasgd.analysis.events import APPLY_DTYPE, read_columns

    from .conftest import wait_for

    env = dict(os.environ, PYTHONPATH=ROOT)
    extra = ("--topology", "exponential", "--steps", "300", "--compute-time", "0.02")
    with EmulatedHosts(3, net=78, tag=f"c{os.getpid() % 100000}") as hosts:
        procs = []
        try:
            for k in range(3):
                out = (tmp_path / f"out{k}").open("w")
                procs.append(
                    subprocess.Popen(
                        hosts.command(k, _host_argv(hosts, k, tmp_path, *extra)),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )

            # host 1 runs nodes 2 and 3: cut it once both are training
            # (a host other than 0 names its run directory r-host1-XXXX)
            def logs():
                return [next((tmp_path / "h1").glob(f"r*/node-{i}.jsonl"), None) for i in (2, 3)]

            wait_for(
                lambda: (
                    min(_interval_step(log) for log in logs()) >= 30
                    or any(p.poll() is not None for p in procs)
                ),
                120,
                "host 1's nodes to train",
            )
            assert all(p.poll() is None for p in procs), "a host exited before the cut"
            cut_unix_s = time.time()
            hosts.set_link_up(1, False)
            try:
                assert not hosts.link_is_up(1)
                wait_for(lambda: time.time() - cut_unix_s >= CUT_S, 2 * CUT_S, "the cut's end")
            finally:
                hosts.set_link_up(1, True)
            restore_unix_s = time.time()
            assert hosts.link_is_up(1)
            codes = [p.wait(timeout=180) for p in procs]
        finally:
            _reap(procs)
    assert codes == [0, 0, 0], [(tmp_path / f"out{k}").read_text()[-1500:] for k in range(3)]
    run0 = tmp_path / "h0" / "r"
    summary = json.loads((run0 / "summary.json").read_text())
    checks = summary["checks"]
    assert not summary["run"].get("failed_nodes"), summary["run"]
    assert checks["exactly_once"] and checks["all_drained"], checks
    assert checks["consensus_distance_rel"] <= 1e-6
    models = [np.load(run0 / f"node-{i}.npy") for i in range(6)]
    scale = np.linalg.norm(models[0])
    assert all(np.linalg.norm(m - models[0]) <= 1e-6 * scale for m in models)
    # the cut on the run clock (one machine: every host's wall clock is the same)
    t0_unix_s = json.loads((run0 / "node-0.jsonl").read_text().splitlines()[0])["t0_unix_s"]
    cut_s, restore_s = cut_unix_s - t0_unix_s, restore_unix_s - t0_unix_s
    host_of = {i: i // 2 for i in range(6)}
    after = 0
    for node in range(6):
        applies = read_columns(run0 / f"node-{node}.applies.bin", APPLY_DTYPE)
        across = np.array([(host_of[s] == 1) != (host_of[node] == 1) for s in applies["sender"]])
        t = applies["t_s"][across] if across.size else np.empty(0)
        during = t[(t > cut_s + CUT_SLACK_S) & (t < restore_s)]
        assert during.size == 0, f"node {node} applied deltas across the cut during it: {during}"
        after += int((t >= restore_s).sum())
    assert after > 0, "no delta crossed after the restore: the cut was not mid-training"
