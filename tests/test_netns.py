"""Several hosts with separate network stacks: network namespaces on a bridge, tbf-limited links.

Needs root (CI runs as root) and iproute2; skipped with the reason otherwise.
"""

import json
import os
import subprocess
import sys
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
            argv = [
                sys.executable,
                "-m",
                "dasgd",
                "run",
                "-q",
                "--nhosts",
                "3",
                "--host-rank",
                str(k),
                "--nproc-per-host",
                "2",
                "--rdzv-endpoint",
                f"{hosts.addresses[0]}:29400",
                "--topology",
                "exponential",
                "--steps",
                "60",
                "--out-dir",
                str(tmp_path / f"h{k}"),
                "--run-id",
                "r",
                "--ready-timeout-s",
                "60",
            ]
            out = (tmp_path / f"out{k}").open("w")
            procs.append(
                subprocess.Popen(
                    hosts.command(k, argv), stdout=out, stderr=subprocess.STDOUT, env=env
                )
            )
        try:
            codes = [p.wait(timeout=180) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
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
