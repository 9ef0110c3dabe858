"""DASGD against centralized ASGD (ps-async) and synchronous SGD (ps-sync), side by side.

One command runs the three algorithms on the same data, model, wire and logs,
for several numbers of nodes, with equal speeds and with one straggler, and
writes a JSON of results, a markdown table and a PNG of test loss against wall
time. For each run: time to a target test loss, gradients to that target,
gradients/s, S_avg/tau_avg, S_max/tau_max and bytes moved.

Two targets from the issue are checked and printed as ratios:

- with the straggler at n = 4, DASGD's time to target is at most 0.6 of
  ps-sync's and no later than ps-async's;
- with a model of at least 1M parameters at n = 8, DASGD's gradients/s is at
  least 1.5x ps-async's (``--big``; throughput only, evaluation off).

Usage::

    python benchmarks/bench_baselines.py                 # n in {2, 4, 8}, ~3 minutes here
    python benchmarks/bench_baselines.py --ns 4 --no-big # one n, quicker

Wall time counts from each process's start of training (process start-up is
not included, for any algorithm). Curves: DASGD is the mean over nodes of each
node's latest test loss; the baselines use the server's model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from dasgd.config import (  # noqa: E402
    DataConfig,
    EmulationConfig,
    ModelConfig,
    RunConfig,
    TopologyConfig,
    TrainConfig,
)
from dasgd.runtime.launch import run  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loss_curve, to_target  # noqa: E402

ALGORITHMS = ("dasgd", "ps-async", "ps-sync")


def one_run(
    args, algorithm: str, n: int, slowdown: str, out_dir: str, *, big: bool = False
) -> dict:
    if big:
        model = ModelConfig("mlp", hidden=(1024, 1024), dtype="float32")
        train = TrainConfig(steps=args.big_steps, lr=args.big_lr, batch_size=8, send_every=n)
        eval_interval_s = None
    else:
        model = ModelConfig(args.model, hidden=tuple(int(h) for h in args.hidden.split(",")))
        train = TrainConfig(
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            send_every=n if args.send_every == "n" else int(args.send_every),
        )
        eval_interval_s = args.eval_interval_s
    config = RunConfig(
        n_nodes=n,
        algorithm=algorithm,
        topology=TopologyConfig(args.topology),
        data=DataConfig(args.dataset),
        model=model,
        train=train,
        emulation=EmulationConfig(slowdown=slowdown),
        out_dir=out_dir,
        log_interval_s=0.1,
        eval_interval_s=eval_interval_s,
        timeout_s=600,
    )
    t = time.monotonic()
    run_dir, summary = run(config, progress=False)
    r = summary["run"]
    key = "staleness" if algorithm == "dasgd" else "tau"
    result = {
        "algorithm": algorithm,
        "n": n,
        "profile": "straggler" if slowdown else "equal",
        "slowdown": slowdown,
        "n_params": summary["model"]["n_params"],
        "gradients": r["steps"],
        "gradients_per_s": r["gradients_per_s"],
        "train_s": r["train_s"],
        "command_s": time.monotonic() - t,
        "staleness_avg_steps": r[f"{key}_avg_steps"],
        "staleness_max_steps": r[f"{key}_max_steps"],
        "bytes_moved": r["bytes_out"],
        "final_test_loss": r["test_loss_mean"],
        "final_test_accuracy": r["test_accuracy_mean"],
        "run_dir": str(run_dir),
    }
    if not big:
        curve = loss_curve(run_dir, algorithm, n)
        result["time_to_target_s"], result["gradients_to_target"] = to_target(
            curve, args.target_loss
        )
        result["curve"] = curve
    return result


def fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def markdown(results: list[dict], target: float) -> str:
    lines = [
        f"| n | profile | algorithm | time to loss {target} (s) | gradients to target | gradients/s | S_avg / tau_avg | S_max / tau_max | MB moved | final test loss | final test acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['n']} | {r['profile']} | {r['algorithm']} | {fmt(r.get('time_to_target_s'))} | "
            f"{fmt(r.get('gradients_to_target'), 'd')} | {fmt(r['gradients_per_s'], '.0f')} | "
            f"{fmt(r['staleness_avg_steps'])} | {fmt(r['staleness_max_steps'], 'd')} | "
            f"{r['bytes_moved'] / 1e6:.1f} | {r['final_test_loss']:.3f} | {r['final_test_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], ns: list[int], target: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG written")
        return False
    profiles = ("equal", "straggler")
    fig, axes = plt.subplots(2, len(ns), figsize=(4.2 * len(ns), 7), squeeze=False, sharey=True)
    for row, profile in enumerate(profiles):
        for col, n in enumerate(ns):
            ax = axes[row][col]
            for r in results:
                if r["n"] == n and r["profile"] == profile and r.get("curve"):
                    t, _, loss = zip(*r["curve"], strict=True)
                    ax.plot(t, loss, label=r["algorithm"])
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"n={n}, {profile}")
            ax.set_xlabel("wall time (s)")
            ax.set_yscale("log")
            if col == 0:
                ax.set_ylabel("test loss")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", default="2,4,8", help="numbers of nodes (default: %(default)s)")
    p.add_argument(
        "--straggler",
        type=float,
        default=4.0,
        help="slowdown of the last node in the straggler profile (default: %(default)s)",
    )
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="mlp")
    p.add_argument("--hidden", default="256", help="MLP hidden sizes (default: %(default)s)")
    p.add_argument(
        "--topology", default="exponential", help="DASGD topology (default: %(default)s)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=500,
        help="gradients per node (ps-sync: rounds) (default: %(default)s)",
    )
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--send-every",
        default="n",
        help="DASGD's b: an int, or n (as in the authors' TensAIR code) (default: %(default)s)",
    )
    p.add_argument(
        "--target-loss", type=float, default=0.15, help="test loss to reach (default: %(default)s)"
    )
    p.add_argument("--eval-interval-s", type=float, default=0.05)
    p.add_argument(
        "--big",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the 1M-parameter throughput comparison at n=8",
    )
    p.add_argument("--big-steps", type=int, default=60)
    p.add_argument("--big-lr", type=float, default=0.0005)
    p.add_argument(
        "--out", default="benchmarks/results", help="where the JSON, markdown and PNG go"
    )
    args = p.parse_args(argv)
    ns = [int(x) for x in args.ns.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = tempfile.mkdtemp(prefix="dasgd-bench-")
    results = []
    for n in ns:
        for slowdown in ("", f"{n - 1}:{args.straggler:g}"):
            for algorithm in ALGORITHMS:
                r = one_run(args, algorithm, n, slowdown, runs_dir)
                results.append(r)
                print(
                    f"n={n} {r['profile']:>9} {algorithm:>8}: to target {fmt(r['time_to_target_s'])} s, "
                    f"{fmt(r['gradients_per_s'], '.0f')} grad/s, S/tau avg {fmt(r['staleness_avg_steps'])}, "
                    f"final loss {r['final_test_loss']:.3f}",
                    flush=True,
                )
    big = []
    if args.big:
        for algorithm in ("dasgd", "ps-async"):
            r = one_run(args, algorithm, 8, "", runs_dir, big=True)
            big.append(r)
            print(
                f"big n=8 {algorithm:>8}: {r['n_params']} params, {r['gradients_per_s']:.0f} grad/s, final loss {r['final_test_loss']:.3f}",
                flush=True,
            )

    print("\n" + markdown(results, args.target_loss))
    ratios = {}

    def pick(n, profile, algorithm):
        return next(
            (
                r
                for r in results
                if (r["n"], r["profile"], r["algorithm"]) == (n, profile, algorithm)
            ),
            None,
        )

    if 4 in ns:
        d, a, s = (pick(4, "straggler", alg) for alg in ALGORITHMS)
        if d["time_to_target_s"] and s["time_to_target_s"]:
            ratios["n4_straggler_dasgd_over_ps_sync_time"] = (
                d["time_to_target_s"] / s["time_to_target_s"]
            )
        if d["time_to_target_s"] and a["time_to_target_s"]:
            ratios["n4_straggler_dasgd_over_ps_async_time"] = (
                d["time_to_target_s"] / a["time_to_target_s"]
            )
    if big:
        ratios["n8_1M_dasgd_over_ps_async_gradients_per_s"] = (
            big[0]["gradients_per_s"] / big[1]["gradients_per_s"]
        )
    print("\nratios (targets: <= 0.6, <= 1.0, >= 1.5):")
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}")
    if big:
        print("\n1M-parameter runs (n=8, float32, batch 8, DASGD b=8):")
        for r in big:
            print(
                f"  {r['algorithm']:>8}: {r['gradients_per_s']:.0f} grad/s, S/tau avg {fmt(r['staleness_avg_steps'])}, "
                f"{r['bytes_moved'] / 1e9:.1f} GB moved, final test loss {r['final_test_loss']:.3f}"
            )
    payload = {
        "argv": sys.argv[1:],
        "args": vars(args),
        "results": results,
        "big": big,
        "ratios": ratios,
        "machine": {"cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    payload["runs_removed"] = runs_dir
    shutil.rmtree(runs_dir, ignore_errors=True)
    (out / "bench_baselines.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / "bench_baselines.md").write_text(markdown(results, args.target_loss) + "\n")
    if plot(results, ns, args.target_loss, out / "bench_baselines.png"):
        print(f"\nwrote {out / 'bench_baselines.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
