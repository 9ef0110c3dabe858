"""kill -9 of a random node at a random time: do the survivors finish, without hanging, in consensus?

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

Usage::

    python benchmarks/bench_faults.py                 # ~20 x 15 s on 2 cores
    python benchmarks/bench_faults.py --trials 3      # a quick look
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

RESULTS = Path(__file__).resolve().parent / "results" / "bench_faults.json"
ROOT = str(Path(__file__).resolve().parent.parent)
N_NODES = 8


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


def trial(k: int, args, out_dir: Path) -> dict:
    """One run with one kill -9; returns the trial's record."""
    rng = np.random.default_rng([args.seed, k])
    victim = int(rng.integers(N_NODES))
    nominal_s = args.steps * args.compute_time
    kill_after_s = float(rng.uniform(0.1, 0.8)) * nominal_s
    run_id = f"trial-{k}"
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
        str(args.seed + k),
        "--steps",
        str(args.steps),
        "--compute-time",
        str(args.compute_time),
        "--eval-interval-s",
        "0",
        "--no-events",
        "--out-dir",
        str(out_dir),
        "--run-id",
        run_id,
    ]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    )
    record = {"trial": k, "victim": victim, "kill_after_s": round(kill_after_s, 3)}
    try:
        deadline = time.monotonic() + 120
        process = _victim_process(proc, victim, deadline)
        _first_record(out_dir / run_id / f"node-{victim}.jsonl", deadline)
        time.sleep(kill_after_s)  # the kill time is the point of the trial: a benchmark may sleep
        killed_at = time.monotonic()
        try:
            process.kill()
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
        record |= {
            "failed_nodes": summary["run"].get("failed_nodes", []),
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--compute-time", type=float, default=0.02)
    parser.add_argument("--hang-s", type=float, default=240.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.trials < 1 or args.steps < 10 or args.compute_time <= 0 or args.hang_s <= 0:
        print(
            "bench_faults.py: --trials >= 1, --steps >= 10, --compute-time > 0, --hang-s > 0",
            file=sys.stderr,
        )
        return 2
    load_before = os.getloadavg()[0]
    records = []
    header = (
        f"{'trial':>5} {'victim':>6} {'kill_s':>6} {'exit':>4} {'hang':>4} {'consensus':>9} "
        f"{'once':>4} {'dead_fin':>8} {'lost':>5} {'pushed':>6} {'miss':>4}  repair"
    )
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
        f"\n{ok_exit}/{n} exited 0, {hangs} hangs, {consensus}/{n} with consensus <= 1e-6 and "
        f"exactly-once among survivors ({killed}/{n} victims killed before they finished); "
        f"target {n}/{n}, 0, {n}/{n}: {'met' if ok_exit == n and not hangs and consensus == n else 'NOT met'}"
    )
    load_after = report_load(load_before)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": machine_info(load_before=load_before, load_after=load_after),
                "args": vars(args),
                "trials": records,
                "exited_0": ok_exit,
                "hangs": hangs,
                "consensus": consensus,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
