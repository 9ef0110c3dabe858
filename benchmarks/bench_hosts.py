"""DASGD against a parameter server across emulated hosts with bandwidth-limited links.

The question (issue 9): the parameter server's link is the bottleneck DASGD
exists to avoid. Does DASGD avoid it here, and by how much?

Setup: 4 hosts, each a Linux network namespace with one ``eth0`` on a shared
bridge (:class:`dasgd.runtime.netns.EmulatedHosts`), its link limited by a
``tc`` token bucket (tbf) in both directions to ``--rates`` (default 1 Gbit/s
and 100 Mbit/s); ``--nproc-per-host`` (default 2) node processes per host, so
8 nodes (PS: 8 workers, the server on host 0 sharing its link). Every run is a
real ``dasgd run --nhosts 4`` per host (rendezvous, tcp). The model is an MLP
on digits with ``--hidden`` (default 512,512: 300 k float32 parameters, 1.2 MB
per message) so transfer time matters; every gradient takes an emulated
``--compute-time`` (default 20 ms, a sleep) so 8 nodes on a 2-core machine
measure the network and not the scheduler. Competitors, side by side in one
run for every rate: DASGD on a ring and on an exponential graph (b =
``--send-every``, default 4) and ps-async; each algorithm's learning rate from
``--lrs`` by its own best time to target.

Reported per rate: gradients/s of the whole run, time to a test loss of
``--target`` (DASGD: the average model in ``analysis.json``'s convergence
curve; PS: the server's model; both evaluated every ``--eval-interval-s``),
and the ratios DASGD / ps-async. Needs root (network namespaces); prints why
and exits 0 otherwise.

Usage::

    sudo python benchmarks/bench_hosts.py                       # ~5 min on 2 cores
    sudo python benchmarks/bench_hosts.py --rates 100mbit --lrs 0.05
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

from common import machine_info, report_load

from dasgd.analysis.metrics import read_events
from dasgd.runtime.netns import EmulatedHosts, netns_unavailable

RESULTS = Path(__file__).resolve().parent / "results" / "bench_hosts.json"
ROOT = str(Path(__file__).resolve().parent.parent)
NHOSTS = 4


def time_to_target(run_dir: Path, algorithm: str, target: float) -> float | None:
    """First run-clock time the evaluated model's test loss is <= target (None: never)."""
    if algorithm == "dasgd":
        conv = json.loads((run_dir / "analysis.json").read_text()).get("convergence") or {}
        points = zip(conv.get("t_s", []), conv.get("average_model_test_loss", []), strict=True)
    else:
        points = ((r["t_s"], r["test_loss"]) for r in read_events(run_dir / "server.jsonl", "eval"))
    return next((t for t, loss in points if loss is not None and loss <= target), None)


def one_run(args, hosts: EmulatedHosts, algorithm: str, topology: str, lr: float, work: Path):
    tag = f"{algorithm}-{topology}-{lr}-{time.time_ns()}"
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = []
    for k in range(NHOSTS):
        argv = [
            sys.executable, "-m", "dasgd", "run", "-q",
            "--nhosts", str(NHOSTS), "--host-rank", str(k),
            "--nproc-per-host", str(args.nproc_per_host),
            "--rdzv-endpoint", f"{hosts.addresses[0]}:29400",
            "--algorithm", algorithm, "--topology", topology,
            "--model", "mlp", "--hidden", args.hidden, "--dtype", "float32",
            "--lr", str(lr), "--batch-size", "32", "--steps", str(args.steps),
            "--send-every", str(args.send_every), "--compute-time", str(args.compute_time),
            "--eval-interval-s", str(args.eval_interval_s),
            "--out-dir", str(work / f"h{k}"), "--run-id", tag,
            "--ready-timeout-s", "120", "--send-timeout-s", "120", "--drain-timeout-s", "120",
        ]  # fmt: skip
        out = (work / f"{tag}-host{k}.out").open("w")
        procs.append(
            subprocess.Popen(hosts.command(k, argv), stdout=out, stderr=subprocess.STDOUT, env=env)
        )
    t = time.perf_counter()
    try:
        codes = [p.wait(timeout=args.timeout_s) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    wall_s = time.perf_counter() - t
    if codes != [0] * NHOSTS:
        tail = (work / f"{tag}-host0.out").read_text()[-400:]
        return {"ok": False, "codes": codes, "error": tail.strip().splitlines()[-1:]}
    run_dir = work / "h0" / tag
    summary = json.loads((run_dir / "summary.json").read_text())
    run = summary["run"]
    return {
        "ok": True,
        "wall_s": wall_s,
        "train_s": run["train_s"],
        "gradients": run["steps"],
        "gradients_per_s": run["gradients_per_s"],
        "ttt_s": time_to_target(run_dir, algorithm, args.target),
        "final_test_loss": run["average_model_test_loss"],
        "bytes_out": run["bytes_out"],
        "staleness_virtual_avg_steps": run.get("staleness_virtual_avg_steps"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rates", nargs="+", default=["1gbit", "100mbit"], help="tc rates per host link"
    )
    p.add_argument("--nproc-per-host", type=int, default=2)
    p.add_argument("--hidden", default="512,512", help="MLP hidden sizes (default: %(default)s)")
    p.add_argument(
        "--steps", type=int, default=150, help="gradients per node (default: %(default)s)"
    )
    p.add_argument("--send-every", type=int, default=4, help="DASGD's b (default: %(default)s)")
    p.add_argument("--compute-time", type=float, default=0.02, help="seconds per gradient")
    p.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.03], help="learning-rate grid")
    p.add_argument("--target", type=float, default=0.2, help="test-loss target")
    p.add_argument("--eval-interval-s", type=float, default=0.25)
    p.add_argument("--timeout-s", type=float, default=600.0, help="deadline of one run")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    why = netns_unavailable()
    if why:
        print(f"bench_hosts: skipped: {why}")
        return 0
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]
    competitors = [("dasgd", "ring"), ("dasgd", "exponential"), ("ps-async", "ring")]
    results = []
    work = Path(tempfile.mkdtemp(prefix="dhosts-", dir="/tmp"))
    for rate in args.rates:
        with EmulatedHosts(NHOSTS, rate=rate) as hosts:
            for algorithm, topology in competitors:
                best = None
                for lr in args.lrs:
                    r = one_run(args, hosts, algorithm, topology, lr, work)
                    r.update(rate=rate, algorithm=algorithm, topology=topology, lr=lr)
                    name = algorithm if algorithm != "dasgd" else f"dasgd-{topology}"
                    ttt = r.get("ttt_s")
                    print(
                        f"  {rate:>8} {name:>17} lr {lr:<5} "
                        + (
                            f"grad/s {r['gradients_per_s']:7.0f}  time to target "
                            f"{'-' if ttt is None else f'{ttt:.2f} s'}  final loss "
                            f"{r['final_test_loss']:.3f}"
                            if r["ok"]
                            else f"FAILED {r['codes']}: {r['error']}"
                        ),
                        flush=True,
                    )
                    results.append(r)
                    key = (r.get("ttt_s") is None, r.get("ttt_s") or 0.0)
                    if r["ok"] and (best is None or key < best[0]):
                        best = (key, r)
                if best is not None:
                    best[1]["best_lr"] = True
    print(
        f"\n{NHOSTS} hosts x {args.nproc_per_host} processes, MLP {args.hidden} float32, "
        f"compute time {args.compute_time} s/gradient, DASGD b = {args.send_every}; "
        f"each algorithm at its best lr of {args.lrs} (by time to test loss {args.target})"
    )
    head = f"{'link':>8} {'competitor':>17} {'lr':>5} {'grad/s':>8} {'ttt_s':>7} {'x ps grad/s':>11} {'ps ttt / ttt':>12}"
    print(head)
    print("-" * len(head))
    for rate in args.rates:
        best = {
            (r["algorithm"], r["topology"]): r
            for r in results
            if r["rate"] == rate and r.get("best_lr")
        }
        ps = best.get(("ps-async", "ring"))
        for (algorithm, topology), r in best.items():
            name = algorithm if algorithm != "dasgd" else f"dasgd-{topology}"
            speed = r["gradients_per_s"] / ps["gradients_per_s"] if ps else None
            ttt_ratio = (
                ps["ttt_s"] / r["ttt_s"] if ps and ps.get("ttt_s") and r.get("ttt_s") else None
            )
            print(
                f"{rate:>8} {name:>17} {r['lr']:>5} {r['gradients_per_s']:>8.0f} "
                f"{'-' if r['ttt_s'] is None else format(r['ttt_s'], '.2f'):>7} "
                f"{'-' if speed is None else format(speed, '.2f'):>11} "
                f"{'-' if ttt_ratio is None else format(ttt_ratio, '.2f'):>12}"
            )
    load_after = report_load(load_before)
    doc = {
        "benchmark": "bench_hosts",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_1min": {"before": load_before, "after": load_after},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "results": results,
        "wall_s": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {args.out} ({doc['wall_s']:.0f} s); run directories in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
