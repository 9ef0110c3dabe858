"""kill -9 of a random node, or a partition, at a random time: do the nodes finish in consensus? And a soak.

The question (issue 10): under ``--on-node-failure continue``, does every run
in which one node process is killed mid-training end with exit code 0 within
a deadline, with the survivors' models equal (consensus distance <= 1e-6)
and every delta a survivor holds held by every survivor?

Setup: ``--trials`` (default 20) runs of ``dasgd run -n 8 --topology
random-regular:3`` (a new graph per trial: ``--topology-seed`` = the trial's
seed), each with ``--steps`` (300) steps of an emulated ``--compute-time``
(20 ms, a sleep, so the runs last long enough to kill a node in on a loaded
2-core machine). In each trial a seeded random generator picks the victim
(any node) and the kill time, uniform over 10-80 % of the nominal training
time (steps x compute time) after the victim's first log record. A run
still going ``--hang-s`` (240) seconds after the kill counts as a hang (and
is stopped).

Reported per trial: victim, kill time, exit code, hang, consensus distance
among survivors, exactly-once among survivors, the repair edges, the dead
node's deltas the survivors drained to and the steps it lost, anti-entropy
deltas pushed and store misses; then the totals against the target (every
trial exits 0, no hang, consensus <= 1e-6 every time). Results go to
``benchmarks/results/bench_faults.json``.

Partitions (issue 10: "a link or host cut for a few seconds and restored:
nothing lost, the run completes with consensus"): ``--partition-trials``
(default 4) runs of the same setup, each with one emulated cut
(``--partition``, in the transport: no root needed), alternately a link
(a random edge of the trial's graph) and a host (a random node cut from all
its neighbours), starting uniform over 10-50 % of the nominal training time
and lasting 1-3 s (far under ``--send-timeout-s`` 60). As root with
iproute2, ``--netns-trials`` (default 1) more: three network-namespace hosts
(2 nodes each, ``exponential`` topology) and host 1's link really cut
(``ip link set ... down``) for 3 s once its nodes train. Reported per trial:
what was cut, when and how long, exit code, hang, consensus, exactly-once,
all drained, no node failed, and the messages the cut held
(``partition_held_msgs``, emulated cuts only). Target: every trial exits 0,
no hang, no node failed, consensus <= 1e-6 and exactly-once every time.

Soak (``--soak [MINUTES]``, default 30; not in CI): instead of the trials,
one long run of the same 8-node random-regular:3 setup with 20 ms emulated
compute time (steps = MINUTES x 60 / compute time, so training lasts at
least MINUTES), no kill and no cut (a steady run: the trials above cover
failures), ``--no-events`` (the per-event logs grow with the run by design).
Every node process's RSS is sampled with psutil every ``--sample-s`` (5 s);
growth per node = last sample / first sample after the warm-up (20 % of the
soak, at most 60 s) - 1; target < 5 % for every node. The growth over the
second half of the samples alone is printed too: a leak keeps growing, a
warm-up effect does not. Results go to
``benchmarks/results/bench_faults_soak.json`` (every sample included).

Restarts (``--restart-trials``, default 6): the same runs under
``--on-node-failure restart``, the victim killed with kill -9 (even trials) or
frozen with SIGSTOP (odd trials: the launcher's heartbeats catch it within
``--heartbeat-timeout-s`` 3); reported per trial: exit code, hang, consensus
and exactly-once among all nodes, the nodes left dead (none expected), the
restarted ones, the step each resumed at and the seconds from the launcher
seeing the death to the new process being linked back. Target: every trial
exits 0 without a hang with every node alive at the end, consensus <= 1e-6
and exactly-once.

Usage::

    python benchmarks/bench_faults.py                 # ~20 x 15 s + 4 cuts on 2 cores
    python benchmarks/bench_faults.py --trials 3 --partition-trials 2   # a quick look
    python benchmarks/bench_faults.py --soak          # 30 minutes (not in CI)
    python benchmarks/bench_faults.py --soak 3        # a short check of the soak
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
from common import machine_info, report_load

from dasgd.analysis.metrics import read_events
from dasgd.runtime.launch import stop_processes
from dasgd.runtime.netns import EmulatedHosts, netns_unavailable
from dasgd.topology import parse_topology

RESULTS = Path(__file__).resolve().parent / "results" / "bench_faults.json"
SOAK_RESULTS = Path(__file__).resolve().parent / "results" / "bench_faults_soak.json"
ROOT = str(Path(__file__).resolve().parent.parent)
N_NODES = 8
#: --heartbeat-timeout-s of the trials that freeze their victim (SIGSTOP).
HEARTBEAT_TIMEOUT_S = 3.0
#: How long the netns trial cuts host 1's link, in seconds.
NETNS_CUT_S = 3.0


def _victim_process(proc: subprocess.Popen, node: int, deadline: float) -> psutil.Process:
    while time.monotonic() < deadline:
        try:
            kids = psutil.Process(proc.pid).children()
        except psutil.NoSuchProcess:
            break
        for kid in kids:
            try:
                cmd = kid.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "--node-id" in cmd and cmd[cmd.index("--node-id") + 1] == str(node):
                return kid
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"node {node}'s process did not appear (launcher exit {proc.poll()})")


def _first_record(log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if log.exists() and read_events(log, "interval"):
            return
        time.sleep(0.02)
    raise RuntimeError(f"no interval record in {log}")


def _write_results(path: Path, args, load_before: float, fields: dict) -> None:
    """The results JSON: when, the machine (load before and after), the arguments, ``fields``."""
    load_after = report_load(load_before)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(load_before=load_before, load_after=load_after),
        "args": vars(args),
        **fields,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def _start_run(out_dir, run_id: str, topology_seed: int, steps: int, args, *extra, stdout=None):
    """``dasgd run -n 8 --topology random-regular:3`` of the benchmark, started in its own session."""
    cmd = [
        sys.executable,
        "-m",
        "dasgd",
        "run",
        "-q",
        "-n",
        str(N_NODES),
        "--topology",
        "random-regular:3",
        "--topology-seed",
        str(topology_seed),
        "--steps",
        str(steps),
        "--compute-time",
        str(args.compute_time),
        "--no-events",
        "--out-dir",
        str(out_dir),
        "--run-id",
        run_id,
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )


def trial(k: int, args, out_dir: Path, *, policy: str = "continue", freeze: bool = False) -> dict:
    """One run with one kill -9 (or, ``freeze``, one SIGSTOP); returns the trial's record."""
    rng = np.random.default_rng([args.seed, k if policy == "continue" else 2000 + k])
    victim = int(rng.integers(N_NODES))
    nominal_s = args.steps * args.compute_time
    kill_after_s = float(rng.uniform(0.1, 0.8)) * nominal_s
    run_id = f"trial-{k}" if policy == "continue" else f"{policy}-{k}"
    extra = ["--eval-interval-s", "0", "--on-node-failure", policy]
    if freeze:
        extra += ["--heartbeat-timeout-s", str(HEARTBEAT_TIMEOUT_S)]
    proc = _start_run(out_dir, run_id, args.seed + k, args.steps, args, *extra)
    record = {
        "trial": k,
        "policy": policy,
        "signal": "SIGSTOP" if freeze else "SIGKILL",
        "victim": victim,
        "kill_after_s": round(kill_after_s, 3),
    }
    try:
        deadline = time.monotonic() + 120
        process = _victim_process(proc, victim, deadline)
        _first_record(out_dir / run_id / f"node-{victim}.jsonl", deadline)
        time.sleep(kill_after_s)  # the kill time is the point of the trial: a benchmark may sleep
        killed_at = time.monotonic()
        try:
            process.suspend() if freeze else process.kill()
            record["killed"] = True
        except psutil.NoSuchProcess:  # it finished first
            record["killed"] = False
        try:
            _, err = proc.communicate(timeout=args.hang_s)
            record["hang"] = False
        except subprocess.TimeoutExpired:
            record["hang"] = True
            stop_processes([proc])
            _, err = proc.communicate(timeout=30)
        record["exit_code"] = proc.returncode
        record["s_after_kill"] = round(time.monotonic() - killed_at, 2)
        record["last_error"] = (err.decode(errors="replace").strip().splitlines() or [""])[-1]
    finally:
        if proc.poll() is None:
            stop_processes([proc])
    summary_path = out_dir / run_id / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        checks = summary["checks"]
        dead = [n for n in summary["nodes"] if n.get("failed")]
        restarts = summary["run"].get("restarts") or []
        record |= {
            "failed_nodes": summary["run"].get("failed_nodes", []),
            "restarted_nodes": summary["run"].get("restarted_nodes", []),
            "rejoin_s": [
                round(r["rejoined_t_s"] - r["detected_t_s"], 2)
                for r in restarts
                if "rejoined_t_s" in r
            ],
            "resumed_at_step": [r.get("steps_held") for r in restarts],
            "consensus_distance_rel": checks["consensus_distance_rel"],
            "exactly_once": checks["exactly_once"],
            "all_drained": checks["all_drained"],
            "delta_store_misses": checks.get("delta_store_misses", 0),
        }
        if dead:
            d = dead[0]
            record |= {
                "added_edges": d.get("added_edges"),
                "dead_fin_deltas": (d.get("fin") or {}).get("deltas"),
                "dead_steps_lost": d.get("steps_lost"),
            }
        finals = [
            read_events(out_dir / run_id / f"node-{i}.jsonl", "final")
            for i in range(N_NODES)
            if i not in record["failed_nodes"]
        ]
        record["deltas_pushed"] = int(sum(f[-1].get("deltas_pushed", 0) for f in finals if f))
    return record


def _summary_fields(run_dir: Path) -> dict:
    """Exit-independent checks of a finished run directory (empty if it has no summary)."""
    path = run_dir / "summary.json"
    if not path.exists():
        return {}
    summary = json.loads(path.read_text())
    checks = summary["checks"]
    return {
        "failed_nodes": summary["run"].get("failed_nodes", []),
        "consensus_distance_rel": checks["consensus_distance_rel"],
        "exactly_once": checks["exactly_once"],
        "all_drained": checks["all_drained"],
        "wall_s": summary["run"]["wall_s"],
    }


def _finish(proc: subprocess.Popen, hang_s: float, record: dict) -> None:
    """Wait for ``proc`` (a hang past ``hang_s`` is stopped and recorded); exit code, last error."""
    try:
        _, err = proc.communicate(timeout=hang_s)
        record["hang"] = False
    except subprocess.TimeoutExpired:
        record["hang"] = True
        stop_processes([proc])
        _, err = proc.communicate(timeout=30)
    record["exit_code"] = proc.returncode
    record["last_error"] = ((err or b"").decode(errors="replace").strip().splitlines() or [""])[-1]


def partition_trial(k: int, args, out_dir: Path) -> dict:
    """One run with one emulated cut (``--partition``): a link if k is even, else a host."""
    # trial k's draws: row k of one generator's stream (seeds [seed, 1000 + k] drew alike)
    u_start, u_length, u_which = np.random.default_rng([args.seed, 1000]).random((k + 1, 3))[k]
    graph = parse_topology("random-regular:3", N_NODES, seed=args.seed + 1000 + k)
    nominal_s = args.steps * args.compute_time
    start_s = round((0.1 + 0.4 * float(u_start)) * nominal_s, 2)
    duration_s = round(1.0 + 2.0 * float(u_length), 2)
    if k % 2 == 0:
        edges = sorted((min(u, v), max(u, v)) for u, v in graph.edges)
        u, v = edges[int(u_which * len(edges))]
        what = f"{u}-{v}"
    else:
        what = str(int(u_which * N_NODES))
    spec = f"{what}@{start_s}+{duration_s}"
    run_id = f"cut-{k}"
    record = {"trial": k, "kind": "link" if k % 2 == 0 else "host", "partition": spec}
    seed = args.seed + 1000 + k
    extra = ("--eval-interval-s", "0", "--partition", spec)
    proc = _start_run(out_dir, run_id, seed, args.steps, args, *extra)
    try:
        _finish(proc, args.hang_s, record)
    finally:
        if proc.poll() is None:
            stop_processes([proc])
    record |= _summary_fields(out_dir / run_id)
    finals = [
        read_events(out_dir / run_id / f"node-{i}.jsonl", "final")
        for i in range(N_NODES)
        if (out_dir / run_id / f"node-{i}.jsonl").exists()
    ]
    record["held_msgs"] = int(sum(f[-1].get("partition_held_msgs", 0) for f in finals if f))
    return record


def _interval_step(log: Path | None) -> int:
    if log is None or not log.exists():
        return 0
    step = 0
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "interval":
            step = rec["step"]
    return step


def netns_trial(k: int, args, out_dir: Path) -> dict:
    """Three namespace hosts, 2 nodes each; host 1's link really down for NETNS_CUT_S seconds."""
    record = {
        "trial": k,
        "kind": "netns host",
        "partition": f"host 1 (nodes 2, 3) {NETNS_CUT_S:g} s",
    }
    env = dict(os.environ, PYTHONPATH=ROOT)
    tag = f"bf{os.getpid() % 10000}{k}"
    with EmulatedHosts(3, net=79, tag=tag) as hosts:
        procs = []
        try:
            for h in range(3):
                argv = [
                    sys.executable,
                    "-m",
                    "dasgd",
                    "run",
                    "-q",
                    "--nhosts",
                    "3",
                    "--host-rank",
                    str(h),
                    "--nproc-per-host",
                    "2",
                    "--rdzv-endpoint",
                    f"{hosts.addresses[0]}:29400",
                    "--topology",
                    "exponential",
                    "--steps",
                    str(args.steps),
                    "--compute-time",
                    str(args.compute_time),
                    "--eval-interval-s",
                    "0",
                    "--no-events",
                    "--out-dir",
                    str(out_dir / f"ns{k}-h{h}"),
                    "--run-id",
                    "r",
                ]
                procs.append(
                    subprocess.Popen(
                        hosts.command(h, argv),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        env=env,
                    )
                )
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and all(p.poll() is None for p in procs):
                logs = [
                    next((out_dir / f"ns{k}-h1").glob(f"r*/node-{i}.jsonl"), None) for i in (2, 3)
                ]
                if min(_interval_step(log) for log in logs) >= 30:
                    break
                time.sleep(0.05)
            cut_at = time.monotonic()
            hosts.set_link_up(1, False)
            try:
                time.sleep(NETNS_CUT_S)  # the cut's length is the point of the trial
            finally:
                hosts.set_link_up(1, True)
            record["cut_s"] = round(time.monotonic() - cut_at, 2)
            codes, hang = [], False
            for p in procs:
                sub = {}
                _finish(p, args.hang_s, sub)
                codes.append(sub["exit_code"])
                hang |= sub["hang"]
                if sub["exit_code"]:
                    record["last_error"] = sub["last_error"]
            record["exit_code"] = max(codes, key=abs)
            record["exit_codes"] = codes
            record["hang"] = hang
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
    record |= _summary_fields(out_dir / f"ns{k}-h0" / "r")
    return record


def soak(args) -> int:
    """One long run; every node's RSS sampled; growth after the warm-up per node."""
    minutes = args.soak
    steps = int(round(minutes * 60 / args.compute_time))
    warmup_s = min(60.0, 0.2 * minutes * 60)
    load_before = os.getloadavg()[0]
    samples = []
    record = {"minutes": minutes, "steps": steps, "warmup_s": warmup_s}
    print(
        f"soak: dasgd run -n {N_NODES} --topology random-regular:3 --steps {steps} "
        f"--compute-time {args.compute_time} (>= {minutes:g} min); RSS every {args.sample_s:g} s, "
        f"warm-up {warmup_s:.0f} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        proc = _start_run(tmp, "soak", args.seed, steps, args, stdout=subprocess.DEVNULL)
        t_start = time.monotonic()
        deadline = t_start + 3 * minutes * 60 + 300  # far beyond a loaded machine's run
        nodes: dict[int, psutil.Process] = {}
        try:
            launcher = psutil.Process(proc.pid)
            next_sample = t_start
            while proc.poll() is None and time.monotonic() < deadline:
                for kid in launcher.children():
                    try:
                        cmdline = kid.cmdline()
                    except psutil.NoSuchProcess:
                        continue
                    if "--node-id" in cmdline:
                        nodes.setdefault(int(cmdline[cmdline.index("--node-id") + 1]), kid)
                rss = {}
                for node, process in sorted(nodes.items()):
                    try:
                        if process.status() != psutil.STATUS_ZOMBIE:  # an exited node reads 0
                            rss[node] = process.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                if len(rss) == N_NODES and all(rss.values()):  # while every node runs
                    try:
                        launcher_rss = launcher.memory_info().rss
                    except psutil.NoSuchProcess:
                        launcher_rss = None
                    samples.append(
                        {
                            "t_s": round(time.monotonic() - t_start, 2),
                            "rss_bytes": rss,
                            "launcher_rss_bytes": launcher_rss,
                        }
                    )
                next_sample += args.sample_s
                time.sleep(max(0.0, next_sample - time.monotonic()))  # the sampling period
            record["hang"] = proc.poll() is None
            if record["hang"]:
                stop_processes([proc])
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                stop_processes([proc])
        record["exit_code"] = proc.returncode
        record["last_error"] = (err.decode(errors="replace").strip().splitlines() or [""])[-1]
        record["wall_s"] = round(time.monotonic() - t_start, 1)
        record |= _summary_fields(Path(tmp) / "soak")
    after = [s for s in samples if s["t_s"] >= warmup_s]
    growth, late = {}, {}
    if len(after) >= 2:
        first, middle, last = after[0], after[len(after) // 2], after[-1]
        for node in range(N_NODES):
            growth[node] = last["rss_bytes"][node] / first["rss_bytes"][node] - 1.0
            # a leak grows on; a warm-up effect does not: the second half alone tells them apart
            late[node] = last["rss_bytes"][node] / middle["rss_bytes"][node] - 1.0
        record["first_after_warmup"] = first
        record["middle"] = middle
        record["last"] = last
    record["growth_rel"] = growth
    record["growth_second_half_rel"] = late
    print(f"{'node':>4} {'RSS_first_MB':>12} {'RSS_last_MB':>11} {'growth':>7} {'2nd_half':>8}")
    for node, g in growth.items():
        print(
            f"{node:>4} {record['first_after_warmup']['rss_bytes'][node] / 2**20:>12.1f} "
            f"{record['last']['rss_bytes'][node] / 2**20:>11.1f} {100 * g:>6.2f}% "
            f"{100 * late[node]:>7.2f}%"
        )
    worst = max(growth.values()) if growth else None
    met = (
        worst is not None
        and worst < 0.05
        and record["exit_code"] == 0
        and not record["hang"]
        and record.get("exactly_once")
    )
    print(
        f"\n{len(samples)} samples over {record['wall_s']:.0f} s (warm-up {warmup_s:.0f} s); exit "
        f"{record['exit_code']}, hang {'yes' if record['hang'] else 'no'}, consensus "
        f"{record.get('consensus_distance_rel', float('nan')):.1e}, exactly-once "
        f"{'yes' if record.get('exactly_once') else 'NO'}; largest RSS growth "
        + ("-" if worst is None else f"{100 * worst:.2f} %")
        + ("" if not late else f" ({100 * max(late.values()):.2f} % over the second half)")
        + f" (target < 5 % per node): {'met' if met else 'NOT met'}"
    )
    _write_results(
        SOAK_RESULTS,
        args,
        load_before,
        {
            **record,
            "samples": samples,
        },
    )
    print(f"results: {SOAK_RESULTS}")
    return 0 if met else 1


def _print_cut(r: dict) -> None:
    cons = r.get("consensus_distance_rel")
    print(
        f"{r['trial']:>5} {r['kind']:>10} {r['partition']:>22} {r.get('exit_code')!s:>4} "
        f"{'yes' if r.get('hang') else 'no':>4} {'-' if cons is None else f'{cons:.1e}':>9} "
        f"{'yes' if r.get('exactly_once') else 'NO':>4} "
        f"{'yes' if r.get('all_drained') else 'NO':>7} {len(r.get('failed_nodes', [])):>6} "
        f"{r.get('held_msgs', '-')!s:>6}",
        flush=True,
    )


def _cut_ok(r: dict) -> bool:
    return (
        r.get("exit_code") == 0
        and not r.get("hang")
        and not r.get("failed_nodes")
        and r.get("consensus_distance_rel") is not None
        and r["consensus_distance_rel"] <= 1e-6
        and bool(r.get("exactly_once"))
        and bool(r.get("all_drained"))
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--compute-time", type=float, default=0.02)
    parser.add_argument("--hang-s", type=float, default=240.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart-trials", type=int, default=6)
    parser.add_argument("--partition-trials", type=int, default=4)
    parser.add_argument("--netns-trials", type=int, default=1)
    parser.add_argument(
        "--soak",
        type=float,
        nargs="?",
        const=30.0,
        default=None,
        metavar="MINUTES",
        help="instead of the trials: one run of at least MINUTES (default 30), RSS sampled",
    )
    parser.add_argument("--sample-s", type=float, default=5.0)
    args = parser.parse_args()
    if (
        args.trials < 0
        or args.restart_trials < 0
        or args.partition_trials < 0
        or args.netns_trials < 0
        or args.steps < 10
        or args.compute_time <= 0
        or args.hang_s <= 0
        or args.sample_s <= 0
        or (args.soak is not None and args.soak <= 0)
    ):
        print(
            "bench_faults.py: --trials, --restart-trials, --partition-trials, --netns-trials >= 0, "
            "--steps >= 10, "
            "--compute-time > 0, --hang-s > 0, --sample-s > 0, --soak MINUTES > 0",
            file=sys.stderr,
        )
        return 2
    if args.soak is not None:
        return soak(args)
    load_before = os.getloadavg()[0]
    records = []
    header = (
        f"{'trial':>5} {'victim':>6} {'kill_s':>6} {'exit':>4} {'hang':>4} {'consensus':>9} "
        f"{'once':>4} {'dead_fin':>8} {'lost':>5} {'pushed':>6} {'miss':>4}  repair"
    )
    if args.trials:
        print(header)
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        for k in range(args.trials):
            r = trial(k, args, Path(tmp))
            records.append(r)
            cons = r.get("consensus_distance_rel")
            print(
                f"{k:>5} {r['victim']:>6} {r['kill_after_s']:>6.2f} {r.get('exit_code')!s:>4} "
                f"{'yes' if r.get('hang') else 'no':>4} "
                f"{'-' if cons is None else f'{cons:.1e}':>9} "
                f"{'yes' if r.get('exactly_once') else 'NO':>4} {r.get('dead_fin_deltas')!s:>8} "
                f"{r.get('dead_steps_lost')!s:>5} {r.get('deltas_pushed')!s:>6} "
                f"{r.get('delta_store_misses')!s:>4}  {r.get('added_edges')}",
                flush=True,
            )
        restarts = []
        if args.restart_trials:
            print(
                f"\n{'trial':>5} {'signal':>7} {'victim':>6} {'kill_s':>6} {'exit':>4} {'hang':>4} "
                f"{'consensus':>9} {'once':>4} {'failed':>6} {'restarted':>9} {'resumed':>7} rejoin_s"
            )
        for k in range(args.restart_trials):  # even: kill -9, odd: SIGSTOP (heartbeats)
            r = trial(k, args, Path(tmp), policy="restart", freeze=k % 2 == 1)
            restarts.append(r)
            cons = r.get("consensus_distance_rel")
            print(
                f"{k:>5} {r['signal']:>7} {r['victim']:>6} {r['kill_after_s']:>6.2f} "
                f"{r.get('exit_code')!s:>4} {'yes' if r.get('hang') else 'no':>4} "
                f"{'-' if cons is None else f'{cons:.1e}':>9} "
                f"{'yes' if r.get('exactly_once') else 'NO':>4} {r.get('failed_nodes')!s:>6} "
                f"{r.get('restarted_nodes')!s:>9} {r.get('resumed_at_step')!s:>7} "
                f"{r.get('rejoin_s')}",
                flush=True,
            )
        cuts = []
        if args.partition_trials or args.netns_trials:
            print(
                f"\n{'trial':>5} {'kind':>10} {'partition':>22} {'exit':>4} {'hang':>4} "
                f"{'consensus':>9} {'once':>4} {'drained':>7} {'failed':>6} {'held':>6}"
            )
        for k in range(args.partition_trials):
            cuts.append(partition_trial(k, args, Path(tmp)))
            _print_cut(cuts[-1])
        why_not = netns_unavailable() if args.netns_trials else None
        if why_not:
            print(f"netns trials skipped: {why_not}")
        else:
            for k in range(args.netns_trials):
                cuts.append(netns_trial(k, args, Path(tmp)))
                _print_cut(cuts[-1])
    ok_exit = sum(r.get("exit_code") == 0 for r in records)
    hangs = sum(bool(r.get("hang")) for r in records)
    consensus = sum(
        r.get("consensus_distance_rel") is not None
        and r["consensus_distance_rel"] <= 1e-6
        and r.get("exactly_once")
        for r in records
    )
    killed = sum(bool(r.get("killed")) for r in records)
    n = len(records)
    print(
        ""
        if not n
        else f"\n{ok_exit}/{n} exited 0, {hangs} hangs, {consensus}/{n} with consensus <= 1e-6 and "
        f"exactly-once among survivors ({killed}/{n} victims killed before they finished); "
        f"target {n}/{n}, 0, {n}/{n}: {'met' if ok_exit == n and not hangs and consensus == n else 'NOT met'}"
    )
    restarts_ok = sum(
        r.get("exit_code") == 0
        and not r.get("hang")
        and not r.get("failed_nodes")
        and r.get("consensus_distance_rel") is not None
        and r["consensus_distance_rel"] <= 1e-6
        and bool(r.get("exactly_once"))
        for r in restarts
    )
    if restarts:
        print(
            f"restarts: {restarts_ok}/{len(restarts)} exited 0 without a hang, every victim "
            f"restarted (none left dead), consensus <= 1e-6 and exactly-once among all nodes; "
            f"target {len(restarts)}/{len(restarts)}: "
            f"{'met' if restarts_ok == len(restarts) else 'NOT met'}"
        )
    cuts_ok = sum(_cut_ok(r) for r in cuts)
    if cuts:
        print(
            f"partitions: {cuts_ok}/{len(cuts)} exited 0 without a hang or a failed node, with "
            f"consensus <= 1e-6, exactly-once and every node drained; target {len(cuts)}/"
            f"{len(cuts)}: {'met' if cuts_ok == len(cuts) else 'NOT met'}"
            + (f" (netns trials skipped: {why_not})" if why_not else "")
        )
    _write_results(
        RESULTS,
        args,
        load_before,
        {
            "trials": records,
            "exited_0": ok_exit,
            "hangs": hangs,
            "consensus": consensus,
            "restart_trials": restarts,
            "restarts_ok": restarts_ok,
            "partition_trials": cuts,
            "partitions_ok": cuts_ok,
            "netns_skipped": why_not,
        },
    )
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
