"""How far ``dasgd simulate`` scales, and centralized against decentralized at scales no 2-core machine runs for real.

Part 1, scale: a DASGD simulation of n = 100, 1,000 and 10,000 nodes (ring,
exponential, random-regular:3) with a small model (softmax regression on a
synthetic 16-feature, 4-class set), a few local steps per node. Each case runs
in a child process of its own, which reports the delta applications per second
of the event loop and the child's peak resident memory (``ru_maxrss``).
Target (issue 7): at least 1,000,000 delta applications per minute at 10,000
nodes; memory growing as the n^2 version-vector bookkeeping requires (48 n^2
bytes with int32 counters, see ``dasgd.sim.simulator``).

Part 2, time to target: virtual seconds until the test loss reaches a target,
DASGD (ring, exponential) against ps-async and ps-sync, for n = 16 ... 1,024,
with the transfer time of a 1M-parameter float32 model (``message_bytes`` 4 MB)
over 10 Gbit/s links and 10 ms of emulated compute per gradient; the math runs
on the small model. Every algorithm gets the same budget of 8,192 gradients;
DASGD sends a delta every 4 steps. Each algorithm takes the best learning rate
of a small grid (by its own time to target).

Run ``python benchmarks/bench_simulator.py [--quick] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dasgd.analysis.metrics import read_events
from dasgd.config import (
    DataConfig,
    EmulationConfig,
    ModelConfig,
    RunConfig,
    SimConfig,
    TopologyConfig,
    TrainConfig,
)
from dasgd.sim import simulate

TARGET_APPS_PER_MIN = 1_000_000
#: DASGD's send interval b in part 2 (a delta every 4 steps; the PS sends a model per gradient)
SEND_EVERY = 4
#: Gradients in the whole run of part 2, the same budget for every algorithm and n
BUDGET_GRADIENTS = 8192
#: Exponential graphs above this size are skipped in part 2 (their flooding costs
#: about 2 log2(n) messages per delta application)
EXPONENTIAL_MAX_N = 256


def synthetic_dataset(path: Path, n_samples: int) -> str:
    """A classification set with enough samples for 10,000 shards, as .npz (X, y)."""
    from sklearn.datasets import make_classification

    X, y = make_classification(
        n_samples=n_samples,
        n_features=16,
        n_informative=10,
        n_classes=4,
        class_sep=1.5,
        random_state=0,
    )
    np.savez(path, X=X, y=y)
    return str(path)


def scale_case(
    dataset: str, n: int, topology: str, steps: int, out_dir: str, budget_s: float
) -> dict:
    """One simulation's event loop for at most ``budget_s`` real seconds; runs in a child process."""
    from dasgd.rundir import prepare_run
    from dasgd.sim.simulator import SimCosts, Simulation

    config = RunConfig(
        n_nodes=n,
        topology=TopologyConfig(spec=topology),
        data=DataConfig(dataset=dataset),
        model=ModelConfig(name="softmax"),
        train=TrainConfig(steps=steps, batch_size=8, lr=0.05),
        out_dir=out_dir,
        eval_interval_s=None,
        log_interval_s=10.0,
        record_events=False,  # the simulator's own throughput (events: bench_single_node)
    )
    t = time.perf_counter()
    config, run_dir, context = prepare_run(config, write_shards=False)
    sim = Simulation(config, run_dir, context, SimCosts(), progress=False)
    setup_s = time.perf_counter() - t
    t = time.perf_counter()
    sim.run(max_real_s=budget_s)
    loop_s = time.perf_counter() - t
    applied = int(sum(int(nd.machine.protocol.applied_deltas.sum()) for nd in sim.nodes))
    complete = (not sim.truncated) and all(nd.machine.protocol.complete for nd in sim.nodes)
    return {
        "n": n,
        "topology": topology,
        "steps_per_node": steps,
        "deltas_applied": applied,
        "finished": not sim.truncated,
        "all_complete": complete,
        "setup_s": setup_s,
        "loop_s": loop_s,
        "apps_per_min": applied / loop_s * 60,
        "events": sim.events,
        "messages": sim.messages,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


#: Address-space limit of each case's process: a case that needs more fails alone
#: (MemoryError) instead of pushing the machine (24 GiB) into swap or the OOM killer.
CHILD_MEMORY_BYTES = 16 << 30


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))


def run_child(args: list[str], timeout_s: float) -> dict | None:
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--child", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        print(f"  case {args} exceeded {timeout_s:.0f} s: skipped", flush=True)
        return None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"  case {args} failed: {last}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_to_target(run_dir: Path, algorithm: str, target: float) -> float | None:
    """First virtual time the test loss is <= target (node 0 for DASGD, the server for PS)."""
    name = "node-0" if algorithm == "dasgd" else "server"
    for record in read_events(run_dir / f"{name}.jsonl", "eval"):
        if record["test_loss"] is not None and record["test_loss"] <= target:
            return record["t_s"]
    return None


def ttt_case(dataset, algorithm, topology, n, lr, steps, target, out_dir) -> dict:
    config = RunConfig(
        n_nodes=n,
        algorithm=algorithm,
        topology=TopologyConfig(spec=topology),
        data=DataConfig(dataset=dataset),
        model=ModelConfig(name="softmax"),
        train=TrainConfig(steps=steps, batch_size=16, lr=lr, send_every=SEND_EVERY),
        emulation=EmulationConfig(compute_time="0.01"),
        sim=SimConfig(bandwidth_bps=10e9, message_bytes=4_000_000),
        out_dir=out_dir,
        eval_interval_s=0.05,
        log_interval_s=1.0,
        record_events=False,  # time to target reads the eval records only
    )
    run_dir, summary = simulate(config, progress=False)
    return {
        "algorithm": algorithm if algorithm != "dasgd" else f"dasgd-{topology}",
        "n": n,
        "lr": lr,
        "ttt_s": time_to_target(run_dir, algorithm, target),
        "final_loss": summary["run"].get(
            "average_model_test_loss", summary["run"].get("server_test_loss")
        ),
        "virtual_s": summary["run"]["wall_s"],
        "real_s": summary["run"]["sim_real_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n up to 1,000 and 64 only")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-ttt", action="store_true")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=120.0,
        help="real seconds of event loop per scale case (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        with tempfile.TemporaryDirectory() as out_dir:
            if kind == "scale":
                dataset, n, topology, steps, budget_s = rest
                result = scale_case(dataset, int(n), topology, int(steps), out_dir, float(budget_s))
            else:
                dataset, algorithm, topology, n, lr, steps, target = rest
                result = ttt_case(
                    dataset,
                    algorithm,
                    topology,
                    int(n),
                    float(lr),
                    int(steps),
                    float(target),
                    out_dir,
                )
        print(json.dumps(result))
        return 0

    results: dict = {"date": time.strftime("%Y-%m-%d"), "scale": [], "time_to_target": []}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = synthetic_dataset(Path(tmp) / "synthetic.npz", 60_000)
        if not args.skip_scale:
            print("== scale: delta applications per minute (event loop) and peak memory")
            print(
                f"(each case's event loop stops after {args.budget_s:.0f} s of real time "
                "if unfinished)"
            )
            print(
                f"{'n':>6} {'topology':>17} {'steps':>5} {'applied':>11} {'setup s':>8} "
                f"{'loop s':>7} {'apps/min':>11} {'peak MiB':>9} {'48n^2 MiB':>10} finished"
            )
            cases = [(100, 20), (1000, 3)] + ([] if args.quick else [(10000, 1)])
            for n, steps in cases:
                for topology in ("ring", "random-regular:3", "exponential"):
                    r = run_child(
                        ["scale", dataset, str(n), topology, str(steps), str(args.budget_s)],
                        args.budget_s * 4 + 600,
                    )
                    if r is None:
                        continue
                    results["scale"].append(r)
                    done = "complete" if r["all_complete"] else "no (budget)"
                    print(
                        f"{n:>6} {topology:>17} {steps:>5} {r['deltas_applied']:>11} "
                        f"{r['setup_s']:>8.1f} {r['loop_s']:>7.1f} {r['apps_per_min']:>11.0f} "
                        f"{r['peak_rss_mib']:>9.0f} {48 * n * n / 2**20:>10.0f} {done}",
                        flush=True,
                    )
            big = [r for r in results["scale"] if r["n"] == 10000]
            if big:
                best = max(r["apps_per_min"] for r in big)
                verdict = "PASS" if best >= TARGET_APPS_PER_MIN else "FAIL"
                print(
                    f"target >= {TARGET_APPS_PER_MIN:,} applications/min at n = 10,000: "
                    f"best {best:,.0f} -> {verdict}"
                )
        if not args.skip_ttt:
            target = 0.8
            sizes = [16, 64] if args.quick else [16, 64, 256, 1024]
            lrs = [0.02, 0.1]
            print(
                f"\n== time to test loss {target} (virtual s), 4 MB messages, 10 Gbit/s, "
                "10 ms compute per gradient; best lr of",
                lrs,
            )
            print(
                f"{'n':>6} "
                + " ".join(
                    f"{a:>16}" for a in ("dasgd-ring", "dasgd-exponential", "ps-async", "ps-sync")
                )
            )
            for n in sizes:
                row = {}
                for algorithm, topology in (
                    ("dasgd", "ring"),
                    ("dasgd", "exponential"),
                    ("ps-async", "ring"),
                    ("ps-sync", "ring"),
                ):
                    if topology == "exponential" and n > EXPONENTIAL_MAX_N:
                        continue
                    steps = max(2, BUDGET_GRADIENTS // n)  # the same gradient budget in all
                    best = None
                    for lr in lrs:
                        r = run_child(
                            [
                                "ttt",
                                dataset,
                                algorithm,
                                topology,
                                str(n),
                                str(lr),
                                str(steps),
                                str(target),
                            ],
                            1800,
                        )
                        if r is None:
                            continue
                        results["time_to_target"].append(r)
                        if r["ttt_s"] is not None and (best is None or r["ttt_s"] < best["ttt_s"]):
                            best = r
                    name = algorithm if algorithm != "dasgd" else f"dasgd-{topology}"
                    row[name] = best
                cells = []
                for name in ("dasgd-ring", "dasgd-exponential", "ps-async", "ps-sync"):
                    b = row.get(name)
                    cells.append(f"{b['ttt_s']:>9.3f} lr{b['lr']:<5g}" if b else f"{'-':>16}")
                print(f"{n:>6} " + " ".join(cells), flush=True)
            print("('-': the target was not reached within the budget)")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
