"""Runs over several hosts: rank discovery, the rendezvous's checks, and real multi-host runs.

Hosts are emulated on this machine: separate ``dasgd run --host-rank K``
launchers bound to distinct loopback addresses (127.0.0.2, 127.0.0.3, ...)
with separate run directories; as root, network namespaces joined by a bridge
(tests/test_netns.py); and ``mpirun`` (Open MPI) where it is installed.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from dasgd.analysis.metrics import read_events
from dasgd.errors import ConfigError
from dasgd.runtime.rendezvous import (
    HostSpec,
    config_fingerprint,
    hosts_from_env,
    mismatch,
    split_endpoint,
)

from .conftest import wait_for

ROOT = str(Path(__file__).resolve().parent.parent)

# -- ranks and checks --------------------------------------------------------------------------


def test_flags_win_over_the_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    spec = hosts_from_env(env, nhosts=2, host_rank=1, nproc_per_host=4, rdzv_endpoint="h0:1234")
    assert (spec.nhosts, spec.host_rank, spec.nproc_per_host, spec.source) == (2, 1, 4, "flags")


def test_torchrun_environment_is_one_host_per_task_next_to_its_store():
    env = {"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    spec = hosts_from_env(env)
    assert (spec.nhosts, spec.host_rank, spec.nproc_per_host) == (8, 3, 1)
    assert spec.rdzv_endpoint == "10.0.0.1:29501" and spec.source == "torchrun"


def test_open_mpi_environment_needs_an_endpoint_and_says_so():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4"}
    with pytest.raises(
        ConfigError, match="started by openmpi as rank 1 of 4: give --rdzv-endpoint"
    ):
        hosts_from_env(env)
    spec = hosts_from_env(dict(env, DASGD_RDZV_ENDPOINT="127.0.0.1:29400"))
    assert (spec.nhosts, spec.host_rank, spec.rdzv_endpoint) == (4, 1, "127.0.0.1:29400")


def test_slurm_without_scontrol_asks_for_the_endpoint(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[01-02]"}
    with pytest.raises(ConfigError, match="scontrol show hostnames failed"):
        hosts_from_env(env)


def test_a_single_task_or_no_launcher_is_one_host():
    assert not hosts_from_env({}).multi
    assert not hosts_from_env({"RANK": "0", "WORLD_SIZE": "1"}).multi


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(nhosts=2, host_rank=2, nproc_per_host=1, rdzv_endpoint="h:1"), "0..1"),
        (dict(nhosts=2, host_rank=0, rdzv_endpoint="h:1"), "--nproc-per-host"),
        (dict(nhosts=2, host_rank=0, nproc_per_host=1), "--rdzv-endpoint"),
        (dict(nhosts=2, host_rank=0, nproc_per_host=1, rdzv_endpoint="h:99999"), "1..65535"),
        (dict(nhosts=0), "--nhosts"),
    ],
)
def test_bad_host_specs_are_one_line(kwargs, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("-", r"\-")) as info:
        HostSpec(**kwargs)
    assert "\n" not in str(info.value)


def test_endpoint_port_defaults_to_29400():
    assert split_endpoint("h0") == ("h0", 29400)
    assert split_endpoint("[::1]:5") == ("::1", 5)


def test_nodes_are_placed_per_host_and_the_server_on_host_0():
    spec = HostSpec(nhosts=3, host_rank=1, nproc_per_host=2, rdzv_endpoint="h:1")
    assert spec.local_ids(6, ps=False) == [2, 3]
    assert HostSpec(nhosts=3, host_rank=0, nproc_per_host=2, rdzv_endpoint="h:1").local_ids(
        6, ps=True
    ) == [0, 1, 6]


def _join(rank, **over):
    config = {"train": {"lr": 0.05, "steps": 10}, "out_dir": f"runs{rank}", "run_id": None}
    join = {
        "host_rank": rank,
        "nhosts": 2,
        "version": "0.1.0",
        "config": config_fingerprint(config),
        "data_digest": "abc",
    }
    join.update(over)
    return join


def test_the_rendezvous_names_what_differs_between_hosts():
    ref = _join(0)
    assert mismatch(ref, _join(1)) is None  # out_dir and run_id are per host
    assert "runs dasgd 0.2.0, host 0 runs 0.1.0" in mismatch(ref, _join(1, version="0.2.0"))
    other = config_fingerprint({"train": {"lr": 0.1, "steps": 10}})
    assert "train.lr (0.1 vs 0.05)" in mismatch(ref, _join(1, config=other))
    assert "different data" in mismatch(ref, _join(1, data_digest="def"))
    assert "expects 3 hosts" in mismatch(ref, _join(1, nhosts=3))


# -- real runs over loopback "hosts" ---------------------------------------------------------


def free_port(host="127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(tmp_path, rank, nhosts, endpoint, *extra, nproc=2, address=None):
    address = address or f"127.0.0.{rank + 2}"
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = tmp_path / f"host{rank}.out"
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dasgd",
            "run",
            "-q",
            "--nhosts",
            str(nhosts),
            "--host-rank",
            str(rank),
            "--nproc-per-host",
            str(nproc),
            "--rdzv-endpoint",
            endpoint,
            "--bind-address",
            address,
            "--out-dir",
            str(tmp_path / f"h{rank}"),
            "--run-id",
            "r",
            "--steps",
            "60",
            "--batch-size",
            "16",
            "--ready-timeout-s",
            "30",
            "--send-timeout-s",
            "30",
            "--drain-timeout-s",
            "30",
            *extra,
        ],
        stdout=out.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def finish(procs, timeout_s=120):
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=timeout_s))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    return codes


def output(tmp_path, rank) -> str:
    return (tmp_path / f"host{rank}.out").read_text()


def no_process_left(tmp_path):
    """No process of these runs (a node or a launcher) survives on the machine."""

    def gone():
        return not [
            p
            for p in psutil.process_iter(["cmdline"])
            if any(str(tmp_path) in part for part in (p.info["cmdline"] or []))
        ]

    wait_for(gone, 10, "every process of the run to exit")


@pytest.mark.multiprocess
def test_three_loopback_hosts_drain_to_one_model(tmp_path):
    endpoint = f"127.0.0.2:{free_port('127.0.0.2')}"
    procs = [launch(tmp_path, k, 3, endpoint) for k in range(3)]
    assert finish(procs) == [0, 0, 0], [output(tmp_path, k) for k in range(3)]
    run0 = tmp_path / "h0" / "r"
    summary = json.loads((run0 / "summary.json").read_text())
    assert summary["run"]["n_nodes"] == 6 and summary["run"]["steps"] == 6 * 60
    assert summary["checks"]["exactly_once"] and summary["checks"]["all_drained"]
    models = [np.load(run0 / f"node-{i}.npy") for i in range(6)]  # gathered on host 0
    scale = np.linalg.norm(models[0])
    assert all(np.linalg.norm(m - models[0]) <= 1e-6 * scale for m in models)
    # each host wrote its own nodes' files, and got the run's summary
    (run1,) = (tmp_path / "h1").iterdir()
    assert sorted(p.name for p in run1.glob("node-?.npy")) == ["node-2.npy", "node-3.npy"]
    assert sorted(p.name for p in run1.glob("data/shard-*-X.npy")) == [
        "shard-2-X.npy",
        "shard-3-X.npy",
    ]
    assert json.loads((run1 / "summary.json").read_text())["checks"] == summary["checks"]
    # one clock across hosts: no gradient's model holds a gradient that finished later
    analysis = json.loads((run0 / "analysis.json").read_text())
    assert analysis["staleness"]["virtual"]["negative_count"] == 0
    # the nodes advertised their own host's address
    starts = [json.loads(run1.joinpath("node-2.jsonl").read_text().splitlines()[0])]
    assert starts[0]["address"].startswith("tcp://127.0.0.3:")
    no_process_left(tmp_path)


@pytest.mark.multiprocess
def test_ps_async_over_two_hosts_with_the_server_on_host_0(tmp_path):
    endpoint = f"127.0.0.2:{free_port('127.0.0.2')}"
    procs = [launch(tmp_path, k, 2, endpoint, "--algorithm", "ps-async") for k in range(2)]
    assert finish(procs) == [0, 0], [output(tmp_path, k) for k in range(2)]
    summary = json.loads((tmp_path / "h0" / "r" / "summary.json").read_text())
    assert summary["run"]["n_nodes"] == 4 and summary["checks"]["budget_used"]
    assert summary["run"]["staleness_virtual_avg_steps"] == pytest.approx(
        summary["run"]["tau_applied_avg_steps"]
    )


@pytest.mark.multiprocess
def test_a_host_that_never_joins_fails_every_host_within_the_deadline(tmp_path):
    endpoint = f"127.0.0.2:{free_port('127.0.0.2')}"
    t = time.monotonic()
    # 6 s: the nodes of host 0 must start within it on a loaded 2-core machine
    (p,) = [launch(tmp_path, 0, 2, endpoint, "--ready-timeout-s", "6")]
    assert finish([p], timeout_s=60) == [1]
    assert time.monotonic() - t < 40
    lines = output(tmp_path, 0).strip().splitlines()
    assert lines == [
        f"dasgd: error: host(s) [1] did not join the rendezvous at {endpoint} within 6 s "
        "(--ready-timeout-s): are their launchers running with this --rdzv-endpoint?"
    ]
    no_process_left(tmp_path)


@pytest.mark.multiprocess
def test_a_wrong_endpoint_is_one_line_naming_it(tmp_path):
    endpoint = f"127.0.0.2:{free_port('127.0.0.2')}"  # nobody listens there
    p = launch(tmp_path, 1, 2, endpoint, "--ready-timeout-s", "6")
    assert finish([p], timeout_s=60) == [1]
    (line,) = output(tmp_path, 1).strip().splitlines()
    assert f"no start from the rendezvous at {endpoint}" in line
    no_process_left(tmp_path)


@pytest.mark.multiprocess
def test_a_rendezvous_port_in_use_is_a_user_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.2", 0))
        busy.listen()
        endpoint = f"127.0.0.2:{busy.getsockname()[1]}"
        p = launch(tmp_path, 0, 2, endpoint)
        assert finish([p], timeout_s=60) == [2]
    (line,) = output(tmp_path, 0).strip().splitlines()
    assert "cannot bind the rendezvous" in line and "choose a free port" in line
    assert not (tmp_path / "h0").exists()  # nothing was prepared


@pytest.mark.multiprocess
def test_hosts_with_different_configurations_all_stop_with_exit_2(tmp_path):
    endpoint = f"127.0.0.2:{free_port('127.0.0.2')}"
    procs = [launch(tmp_path, 0, 2, endpoint), launch(tmp_path, 1, 2, endpoint, "--lr", "0.1")]
    assert finish(procs) == [2, 2]
    for k in range(2):
        (line,) = output(tmp_path, k).strip().splitlines()
        assert "host 1's configuration differs from host 0's: train.lr (0.1 vs 0.05)" in line
    no_process_left(tmp_path)


@pytest.mark.multiprocess
def test_a_node_dying_on_one_host_stops_every_host(tmp_path):
    endpoint = f"127.0.0.2:{free_port('127.0.0.2')}"
    slow = ("--compute-time", "0.01", "--steps", "3000", "--on-node-failure", "stop")
    procs = [launch(tmp_path, k, 2, endpoint, *slow) for k in range(2)]

    def node_3():
        for p in psutil.process_iter(["cmdline"]):
            cmd = p.info["cmdline"] or []
            if "node" in cmd and str(tmp_path / "h1") in " ".join(cmd) and cmd[-3:-2] == ["3"]:
                return p
        return None

    victim = wait_for(node_3, 60, "node 3's process")
    wait_for(lambda: list((tmp_path / "h1").glob("*/node-3.gradients.bin")), 60, "training")
    victim.kill()
    assert finish(procs) == [1, 1]
    assert "host 1: node 3 exited with code -9" in output(tmp_path, 0)
    assert "node 3 exited with code -9" in output(tmp_path, 1)
    no_process_left(tmp_path)


@pytest.mark.multiprocess
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun (Debian openmpi-bin) missing")
def test_mpirun_starts_one_host_per_task(tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, DASGD_RDZV_ENDPOINT=f"127.0.0.1:{port}")
    cmd = [
        "mpirun",
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        "4",
        "-x",
        "PYTHONPATH",
        "-x",
        "DASGD_RDZV_ENDPOINT",
        sys.executable,
        "-m",
        "dasgd",
        "run",
        "-q",
        "--steps",
        "40",
        "--bind-address",
        "127.0.0.1",
        "--out-dir",
        str(tmp_path),
        "--ready-timeout-s",
        "60",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run0,) = [p for p in tmp_path.iterdir() if "-host" not in p.name]
    summary = json.loads((run0 / "summary.json").read_text())
    assert summary["run"]["n_nodes"] == 4 and summary["checks"]["exactly_once"]
    assert summary["checks"]["consensus_distance_rel"] < 1e-6


# -- CurveZMQ --------------------------------------------------------------------------------


def test_keys_are_written_once_and_never_overwritten_silently(tmp_path, capsys):
    from dasgd.cli import main

    assert main(["keys", str(tmp_path / "k"), "-n", "2"]) == 0
    names = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert names == sorted(
        f"{n}.{s}"
        for n in ("node-0", "node-1", "server", "launcher")
        for s in ("key", "key_secret")
    )
    assert (tmp_path / "k" / "node-0.key_secret").stat().st_mode & 0o077 == 0
    capsys.readouterr()
    assert main(["keys", str(tmp_path / "k"), "-n", "2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "already holds keys" in line and "--force" in line


@pytest.mark.multiprocess
def test_a_peer_without_an_allowed_key_gets_nothing_in_and_the_run_finishes(tmp_path):
    import zmq
    import zmq.auth

    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    subprocess.run(
        [sys.executable, "-m", "dasgd", "keys", str(keys), "-n", "3"],
        check=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    stranger.mkdir()
    zmq.auth.create_certificates(stranger, "mallory")
    env = dict(os.environ, PYTHONPATH=ROOT)
    argv = [
        sys.executable, "-m", "dasgd", "run", "-q", "-n", "3", "--topology", "complete",
        "--transport", "tcp", "--curve-keys", str(keys), "--compute-time", "0.005",
        "--steps", "400", "--out-dir", str(tmp_path / "runs"), "--run-id", "r",
    ]  # fmt: skip
    run = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    log = tmp_path / "runs" / "r" / "node-0.jsonl"
    try:
        start = wait_for(
            lambda: log.exists() and log.read_text().splitlines()[:1], 60, "node 0's start"
        )
        address = json.loads(start[0])["address"]
        ctx = zmq.Context()
        public, secret = zmq.auth.load_certificate(stranger / "mallory.key_secret")
        server_key, _ = zmq.auth.load_certificate(keys / "node-0.key")
        intruders = []
        for curve in (True, False):  # a key the run does not list; no encryption at all
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            if curve:
                sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = (
                    secret,
                    public,
                    server_key,
                )
            sock.connect(address)  # the handshake is tried (and retried) at once
            sock.send_multipart([b"not a dasgd header", b"\x00" * 64], flags=zmq.NOBLOCK)
            intruders.append(sock)
        out, _ = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=10)
    for sock in intruders:
        sock.close(linger=0)
    ctx.term()
    assert run.returncode == 0, out[-2000:]
    final = [json.loads(line) for line in log.read_text().splitlines() if '"final"' in line][-1]
    assert final["auth_rejected"] >= 2  # both intruders were refused at the handshake
    assert final["malformed"] == 0  # nothing reached the protocol
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["checks"]["exactly_once"]


@pytest.mark.multiprocess
def test_two_hosts_with_curve_keys_encrypt_the_rendezvous_and_the_links(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "dasgd", "keys", str(tmp_path / "keys"), "-n", "4"],
        check=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    endpoint = f"127.0.0.2:{free_port('127.0.0.2')}"
    curve = ("--curve-keys", str(tmp_path / "keys"))
    procs = [launch(tmp_path, k, 2, endpoint, *curve) for k in range(2)]
    assert finish(procs) == [0, 0], [output(tmp_path, k) for k in range(2)]
    summary = json.loads((tmp_path / "h0" / "r" / "summary.json").read_text())
    assert summary["checks"]["exactly_once"] and summary["run"]["n_nodes"] == 4


def test_the_rendezvous_drops_malformed_joins_and_still_starts():
    import msgpack
    import zmq

    from dasgd.runtime.rendezvous import HostLink, RendezvousServer

    port = free_port()
    spec = HostSpec(nhosts=2, host_rank=0, nproc_per_host=1, rdzv_endpoint=f"127.0.0.1:{port}")
    server = RendezvousServer(spec, "127.0.0.1", timeout_s=20, silence_s=20, collect=None)
    server.start()
    ctx = zmq.Context.instance()
    stranger = ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(f"tcp://127.0.0.1:{port}")
    for garbage in (b"\x00\xff", msgpack.packb({"kind": "join", "host_rank": 1, "addresses": 5})):
        stranger.send(garbage)
    links = [
        HostLink(HostSpec(**{**spec.__dict__, "host_rank": k}), timeout_s=20) for k in range(2)
    ]
    try:
        wait_for(lambda: server.malformed >= 1, 10, "the malformed join to be dropped")
        for k, link in enumerate(links):
            link.join({"train": {"lr": 0.05}}, "digest", {2 * k: f"tcp://127.0.0.1:{k + 1}"})
        starts = [link.wait_for("start", 10) for link in links]
        assert starts[0]["addresses"] == {"0": "tcp://127.0.0.1:1", "2": "tcp://127.0.0.1:2"}
    finally:
        for link in links:
            link.close()
        stranger.close()
        server.stop()
        server.join(timeout=5)


@pytest.mark.multiprocess
def test_a_host_whose_rendezvous_goes_silent_fails_within_the_send_timeout(tmp_path):
    endpoint = f"127.0.0.2:{free_port('127.0.0.2')}"
    slow = ("--compute-time", "0.01", "--steps", "3000", "--send-timeout-s", "5")
    procs = [launch(tmp_path, k, 2, endpoint, *slow) for k in range(2)]
    wait_for(lambda: list((tmp_path / "h1").glob("*/node-2.gradients.bin")), 60, "training")
    host0 = psutil.Process(procs[0].pid)
    nodes0 = host0.children(recursive=True)
    host0.kill()  # host 0's launcher (and its rendezvous) vanishes without a word
    t = time.monotonic()
    codes = finish(procs, timeout_s=90)
    assert codes[1] == 1 and time.monotonic() - t < 60
    assert "no word from the rendezvous" in output(tmp_path, 1)
    for p in nodes0:  # host 0's orphaned nodes notice their launcher is gone and exit
        wait_for(
            lambda p=p: not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, 60, "node exit"
        )
    no_process_left(tmp_path)


def node_process(tmp_path, host, node):
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "node" in cmd and f"h{host}" in " ".join(cmd) and str(tmp_path) in " ".join(cmd):
            if cmd[cmd.index("--node-id") + 1] == str(node):
                return p
    return None


def training(tmp_path, host, node, intervals=4):
    def logged():
        logs = list((tmp_path / f"h{host}").glob(f"*/node-{node}.jsonl"))
        return logs and len(read_events(logs[0], "interval")) >= intervals

    wait_for(logged, 90, f"node {node} to train")


FAULTY = ("--compute-time", "0.01", "--steps", "800", "--log-interval-s", "0.1")


@pytest.mark.multiprocess
def test_a_node_killed_on_one_host_is_restarted_from_a_neighbours_state(tmp_path):
    """(A node dying under continue over hosts: the silent-host test below.)"""
    endpoint = f"127.0.0.2:{free_port('127.0.0.2')}"
    extra = (*FAULTY, "--on-node-failure", "restart")
    procs = [launch(tmp_path, k, 3, endpoint, *extra) for k in range(3)]
    training(tmp_path, 1, 3)
    node_process(tmp_path, 1, 3).kill()
    assert finish(procs) == [0, 0, 0], [output(tmp_path, k) for k in range(3)]
    summary = json.loads((tmp_path / "h0" / "r" / "summary.json").read_text())
    checks = summary["checks"]
    assert checks["exactly_once"] and checks["consensus_distance_rel"] <= 1e-6, checks
    # restarted on its host, from a neighbour's state (maybe on another host)
    assert summary["run"]["failed_nodes"] == [] and summary["run"]["restarted_nodes"] == [3]
    assert summary["nodes"][3]["steps"] == 800
    no_process_left(tmp_path)


@pytest.mark.multiprocess
@pytest.mark.parametrize("policy", ["continue", "restart"])
def test_a_silent_host_is_declared_lost_and_may_come_back_under_restart(tmp_path, policy):
    """Host 2 freezes (SIGSTOP: no FIN on any socket); under restart a new launcher rejoins."""
    endpoint = f"127.0.0.2:{free_port('127.0.0.2')}"
    extra = (*FAULTY, "--steps", "1000", "--send-timeout-s", "3", "--on-node-failure", policy)
    procs = [launch(tmp_path, k, 3, endpoint, *extra) for k in range(3)]
    training(tmp_path, 2, 4)
    frozen = [
        psutil.Process(procs[2].pid),
        node_process(tmp_path, 2, 4),
        node_process(tmp_path, 2, 5),
    ]
    for p in frozen:
        p.suspend()
    changes = tmp_path / "h0" / "r" / "topology-changes.jsonl"
    try:
        wait_for(lambda: changes.exists() and "removed_node" in changes.read_text(), 60, "loss")
    finally:
        for p in frozen:  # the machine is "rebooted" (and nothing stays stopped if this failed)
            p.kill()
    again = launch(tmp_path, 2, 3, endpoint, *extra)
    codes = finish([procs[0], procs[1], again])
    text = [output(tmp_path, k) for k in range(3)]
    if policy == "continue":  # the run went on without it, and refuses it back
        assert codes == [0, 0, 2], text
        assert "joining again needs --on-node-failure restart" in text[2]
    else:
        assert codes == [0, 0, 0], text
    summary = json.loads((tmp_path / "h0" / "r" / "summary.json").read_text())
    checks = summary["checks"]
    assert checks["exactly_once"] and checks["consensus_distance_rel"] <= 1e-6, checks
    if policy == "continue":
        assert summary["run"]["failed_nodes"] == [4, 5]
        assert summary["nodes"][4]["host_lost"] == 2
        assert "host 2 went silent" in text[0]
    else:
        assert summary["run"]["failed_nodes"] == []
        assert {4, 5} <= set(summary["run"]["restarted_nodes"])
    no_process_left(tmp_path)
