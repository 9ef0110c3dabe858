"""The papers' predictions, each as expected against measured, with PASS/FAIL (issue 8, part 5).

Claims (ALGORITHMS.md §2-§5; the expected value and the rule of each verdict
are printed in the table):

- C1 ps-async: tau_avg = T(n-1)/(T+n-1) (T = gradients applied; Definition 4,
  in-flight gradients counted) for n in {4, 8, 16}, equal speeds and
  heavy-tailed speeds (Koloskova et al. 2022, Remark 5).
- C2 DASGD, complete graph, b = 1, equal compute time, no latency: the
  virtual-sequence staleness S2 averages about n - 1 (within 20 %).
- C3 DASGD: staleness and the gradients needed to reach the target loss rise
  with the link latency and with b (Tosi & Theobald's bound: O(sigma eps^-2)
  + O(Q S_avg eps^-3/2) + O(S_avg eps^-1)).
- C4 DASGD: one 8x straggler raises S_max, and the apply staleness S1 of its
  own deltas, far more than S_avg (by a factor of 3 or more). Every node
  takes the same number of steps, so the straggler goes on alone after the
  others stop, with deltas stale by nothing: its deltas' S1 is averaged over
  those it sent while all nodes trained (the whole-run figure is printed too).
- C5 ps-async with one 16x straggler: the delay-adaptive step (Eq. 11,
  ``--delay-rule inverse`` and ``drop``) against none: diverges at no step
  size where none converges, and reaches the target sooner.
- C6 asynchronous (ps-async, DASGD) against synchronous mini-batch SGD
  (ps-sync) with one 8x straggler: sooner to the target.
- C7 APAM: the AMSGrad server (``--server-optimizer amsgrad``, Xu et al. 2020)
  against asynchronous SGD under delay (ps-async, tau ~ n - 1): sooner to the
  target.
- C8 DASGD on non-i.i.d. shards (label, Dirichlet alpha 10, 1, 0.1):
  consensus distance and time to target grow as alpha falls.

Engines. ``sim``: :func:`dasgd.sim.simulate` (virtual time, default
:class:`~dasgd.sim.SimCosts`); seconds are virtual. ``real``:
:func:`dasgd.runtime.launch.run`, one process per node (and one server) on
this machine, ipc sockets; seconds are on the run clock (since the launcher's
start, common to all processes). Both
use emulated compute time (``--compute-time``, a sleep per gradient, default
4 ms, times a node's ``--slowdown``) so that real node processes do not
compete for this machine's cores; a real row whose node processes reached
less than 80 % of the nominal gradients/s is marked CPU-bound.

Data and model: digits (scikit-learn, standardized), softmax regression,
float64, batch 32 per gradient; every run gets the same budget of gradients
(3,200 in the simulator, 1,600 with ``--quick``; 800 in real runs: ``steps``
per node = budget / n; ps-sync: rounds). Time to target: the first
evaluation at or below ``--target-loss`` (0.2): for ps-async/ps-sync the server's model, for DASGD
the mean over nodes of each node's latest eval test loss (node models, every
5 ms). Learning rates: every algorithm and setting takes its own best
learning rate of the same grid (0.03, 0.1, 0.3, 1.0; C7, whose AMSGrad needs
rates 100x smaller than SGD, the grid 0.001 ... 1.0 for both) by its mean
time to target over the seeds; a rate at which some seed misses the target
is not eligible. "(edge)" marks a best rate at the end of its grid.
Seeds: ``--seeds`` (0, 1, 2) for the sweeps of C3, C5, C7, C8, the first two
for C6, seed 0 for C1, C2, C4 and every real run; a seed sets the
train/test split, the shards, x0 and the mini-batches.

Fields read (small accessors below): S1 = apply staleness
``run.staleness_apply_{avg,max}_steps`` (``staleness_{avg,max}_steps`` before
the rename), S2 = virtual-sequence staleness
``run.staleness_virtual_{avg,max}_steps`` (computed after the run from the
event logs, so runs keep ``record_events`` on), tau = ``run.tau_{avg,max}_steps``,
per-origin S1 from each node's ``final`` record (``origins``), consensus
distance over time from ``analysis.json`` (``convergence.t_s`` and
``consensus_distance_rel``, ``max_i |x_i - mean| / |mean|`` at every
evaluation instant). A claim whose field a run does not write is reported
PENDING, never PASS. Times to target are quantized by the evaluation interval
(5 ms): "sooner" and "rises" need a difference of more than one interval.

Usage::

    python benchmarks/bench_predictions.py --quick   # 1 seed, few real runs (~2 min here)
    python benchmarks/bench_predictions.py           # full (11-15 min here, busy machine)
    python benchmarks/bench_predictions.py --only C1,C4 --no-real

Writes ``benchmarks/results/bench_predictions.json`` (every run's figures,
the table) and ``.png`` (matplotlib, if installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import NamedTuple

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from dasgd.analysis.metrics import read_events  # noqa: E402
from dasgd.config import (  # noqa: E402
    DataConfig,
    EmulationConfig,
    ModelConfig,
    RunConfig,
    TopologyConfig,
    TrainConfig,
    TransportConfig,
)
from dasgd.core.emulation import resolve_slowdown  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import loss_curve, machine_info, nominal_s, report_load, to_target  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
#: Learning rates every algorithm picks from (by its own best time to target).
GRID = (0.03, 0.1, 0.3, 1.0)
#: C7's grid, for SGD and AMSGrad alike (AMSGrad's useful rates are ~100x smaller).
WIDE_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
#: Gradients per run (all nodes together): simulator (--quick: half), real runs.
SIM_BUDGET, REAL_BUDGET = 3200, 800
#: A real run below this fraction of its nominal gradients/s was CPU-bound.
CPU_BOUND = 0.8
#: Seconds between evaluations (the same instants on every node): the resolution of a time to
#: target, so "sooner" and "rises" need a difference of more than this.
EVAL_INTERVAL_S = 0.005
#: Heavy-tailed speeds: per-node factors 1 + Lomax(1.5) (seed 1: one node at the cap of 20x,
#: the others 1.0-3.3x) and a log-normal compute time per gradient (sigma 1: mean 1.65 median).
HEAVY_SLOWDOWN, HEAVY_SIGMA = "random:1", 1.0


# ---------------------------------------------------------------------------
# runs


class Job(NamedTuple):
    """One run: the engine that measures it and its configuration (out_dir set when run)."""

    engine: str  # "sim" or "real"
    config: RunConfig


def job(
    args: argparse.Namespace,
    engine: str,
    *,
    n: int,
    algorithm: str = "dasgd",
    topology: str = "complete",
    lr: float = 0.1,
    seed: int = 0,
    send_every: int = 1,
    compute_time: str | None = None,
    slowdown: str = "",
    latency: str = "",
    delay_rule: str = "none",
    server_optimizer: str = "sgd",
    alpha: float | None = None,
) -> Job:
    """The run of one claim's setting; everything not named is the benchmark's common setting.

    ``args`` gives the compute time per gradient (``compute_s``) and the
    gradient budgets (``sim_budget``, ``real_budget``).
    """
    budget = args.sim_budget if engine == "sim" else args.real_budget
    sim = engine == "sim"
    config = RunConfig(
        n_nodes=n,
        algorithm=algorithm,
        topology=TopologyConfig(topology),
        data=DataConfig(
            "digits",
            sharding="iid" if alpha is None else "label",
            dirichlet_alpha=0.5 if alpha is None else alpha,
        ),
        model=ModelConfig("softmax", dtype="float64"),
        train=TrainConfig(
            steps=budget // n,
            lr=lr,
            batch_size=32,
            send_every=send_every,
            seed=seed,
            delay_rule=delay_rule,
            server_optimizer=server_optimizer,
        ),
        emulation=EmulationConfig(
            compute_time=compute_time if compute_time is not None else f"{args.compute_s:g}",
            slowdown=slowdown,
            latency=latency,
        ),
        transport=TransportConfig(ready_timeout_s=120, drain_timeout_s=60, send_timeout_s=60),
        log_interval_s=0.5 if sim else 0.25,
        eval_interval_s=EVAL_INTERVAL_S,
        timeout_s=600 if sim else 300,
    )
    return Job(engine, config)


def apply_staleness(run: dict, stat: str):
    """S1 (apply staleness) ``avg`` or ``max`` of a summary's ``run``, in steps (None for PS runs)."""
    return run.get(f"staleness_apply_{stat}_steps", run.get(f"staleness_{stat}_steps"))


def virtual_staleness(run: dict, stat: str):
    """S2 (virtual-sequence staleness) ``avg`` or ``max``, in steps; None where not written yet."""
    return run.get(f"staleness_virtual_{stat}_steps")


def origin_staleness(run_dir: Path, summary: dict) -> dict[int, dict] | None:
    """S1 of each origin's deltas pooled over every node that applied them: {origin: {avg, max, count}}.

    From ``summary["nodes"][i]["origins"]`` where the summary has them, else
    from each node's ``final`` record (written for runs of at most 512 nodes).
    """
    lists = [x.get("origins") for x in summary["nodes"]]
    if not all(lists):
        lists = []
        for i in range(len(summary["nodes"])):
            finals = read_events(run_dir / f"node-{i}.jsonl", "final")
            if not finals or "origins" not in finals[-1]:
                return None
            lists.append(finals[-1]["origins"])
    pooled: dict[int, dict] = {}
    for entries in lists:
        for e in entries:
            # staleness_apply_* since the S1 rename, staleness_* before
            key = "staleness_apply" if "staleness_apply_count" in e else "staleness"
            if not e[f"{key}_count"]:
                continue
            p = pooled.setdefault(e["origin"], {"total": 0.0, "count": 0, "max": 0})
            p["total"] += e[f"{key}_avg_steps"] * e[f"{key}_count"]
            p["count"] += e[f"{key}_count"]
            p["max"] = max(p["max"], e[f"{key}_max_steps"])
    return {
        k: {"avg": p["total"] / p["count"], "max": p["max"], "count": p["count"]}
        for k, p in sorted(pooled.items())
    }


def consensus_over_time(run_dir: Path, train_s: float) -> dict | None:
    """Mean and max of the relative consensus distance while the nodes trained (``analysis.json``).

    None where the run directory has no ``analysis.json`` or it has no
    ``convergence.consensus_distance_rel`` series.
    """
    path = run_dir / "analysis.json"
    if not path.exists():
        return None
    series = json.loads(path.read_text()).get("convergence") or {}
    if isinstance(series, list):  # records rather than columns
        series = {k: [r.get(k) for r in series] for k in ("t_s", "consensus_distance_rel")}
    values = [
        v
        for t, v in zip(
            series.get("t_s", []), series.get("consensus_distance_rel", []), strict=False
        )
        if v is not None and t <= train_s
    ]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "max": max(values), "samples": len(values)}


def nominal_gradients_per_s(config: RunConfig) -> float:
    """The summary's gradients/s if every gradient took only its emulated compute time.

    ps-async: every worker busy until the server's budget is used, sum of
    1 / (c f_i). DASGD (``steps`` per node; gradients/s = all steps / the
    longest ``train_s``) and ps-sync (every round waits for the slowest):
    n / (c max f_i). c: the mean compute time, f_i: node i's slowdown.
    """
    c = nominal_s(config.emulation.compute_time)
    factors = resolve_slowdown(config.emulation.slowdown, config.n_nodes)
    if config.algorithm == "ps-async":
        return sum(1.0 / (c * f) for f in factors)
    return config.n_nodes / (c * max(factors))


def straggler_phase(run_dir: Path, summary: dict, factors: list[float]) -> dict | None:
    """The slowest DASGD node's steps while every other node still trained, from its eval records.

    Every node takes ``steps`` local steps, so a straggler goes on alone after
    the others have stopped, and its deltas of that phase are stale by nothing;
    this tells how many of its steps were taken before the last other node
    stopped (``others_end_s``: the largest ``train_s`` of the others; every
    process starts training at the run clock's origin). None without a
    straggler.
    """
    slow = max(range(len(factors)), key=factors.__getitem__)
    if factors[slow] <= 1:
        return None
    end_s = max(x["train_s"] for x in summary["nodes"] if x["node"] != slow)
    steps = [
        r["step"] for r in read_events(run_dir / f"node-{slow}.jsonl", "eval") if r["t_s"] <= end_s
    ]
    return {
        "node": slow,
        "others_end_s": end_s,
        "steps_while_all_train": max(steps, default=0),
        "steps": summary["nodes"][slow]["steps"],
    }


def measure(item: Job, work_dir: str, run_id: str) -> dict:
    """Run one job (simulated or real) and extract the figures the claims read; the run directory is removed."""
    from dasgd.runtime.launch import run
    from dasgd.sim import simulate

    config = item.config.replace(out_dir=work_dir, run_id=run_id)
    t = time.perf_counter()
    try:
        if item.engine == "sim":
            run_dir, summary = simulate(config, progress=False)
        else:
            run_dir, summary = run(config, progress=False)
    except Exception as error:  # a failed run is a result (diverged, stalled): say so
        shutil.rmtree(Path(work_dir) / run_id, ignore_errors=True)
        return {"error": f"{type(error).__name__}: {error}"[:400]}
    try:
        out = extract(run_dir, summary, config)
    except Exception as error:  # shown in the table's row, not lost with the whole benchmark
        out = {"error": f"reading the run: {type(error).__name__}: {error}"[:400]}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    out["command_s"] = time.perf_counter() - t
    return out


def extract(run_dir: Path, summary: dict, config: RunConfig) -> dict:
    """The figures the claims read, from a finished run's directory and summary."""
    r, n = summary["run"], summary["run"]["n_nodes"]
    curve = loss_curve(run_dir, config.algorithm, n)
    nominal = nominal_gradients_per_s(config)
    factors = resolve_slowdown(config.emulation.slowdown, n)
    dasgd = config.algorithm == "dasgd"
    out = {
        "error": None,
        "curve": curve,
        "initial_loss": curve[0][2] if curve else None,
        "final_loss": r["average_model_test_loss"],
        "gradients": r["steps"],
        "updates_applied": r.get("updates_applied"),
        "gradients_per_s": r["gradients_per_s"],
        "efficiency": r["gradients_per_s"] / nominal if nominal and r["gradients_per_s"] else None,
        "train_s": r["train_s"],
        "s1_avg": apply_staleness(r, "avg"),
        "s1_max": apply_staleness(r, "max"),
        "s2_avg": virtual_staleness(r, "avg"),
        "s2_max": virtual_staleness(r, "max"),
        "tau_avg": r.get("tau_avg_steps"),
        "tau_max": r.get("tau_max_steps"),
        "slowdown_factors": factors,
        "origins": origin_staleness(run_dir, summary) if dasgd else None,
        "straggler": straggler_phase(run_dir, summary, factors) if dasgd else None,
        "consensus": consensus_over_time(run_dir, r["train_s"]),
        "checks": summary["checks"],
    }
    return out


def run_all(jobs: list[Job], work: Path, workers: int) -> dict[Job, dict]:
    """Simulations in a pool of ``workers`` processes, then real runs one at a time (the machine to themselves)."""
    unique = list(dict.fromkeys(jobs))
    sims = [j for j in unique if j.engine == "sim"]
    reals = [j for j in unique if j.engine == "real"]
    results: dict[Job, dict] = {}
    t0 = time.perf_counter()

    def note(k: int, total: int, j: Job, r: dict) -> None:
        c = j.config
        what = (
            f"{c.algorithm} n={c.n_nodes} lr={c.train.lr:g} seed={c.train.seed}"
            f"{' b=' + str(c.train.send_every) if c.train.send_every > 1 else ''}"
            f"{' lat=' + c.emulation.latency if c.emulation.latency else ''}"
            f"{' slow=' + c.emulation.slowdown if c.emulation.slowdown else ''}"
        )
        status = r["error"] or f"final loss {r['final_loss']:.3f}"
        print(
            f"  [{j.engine} {k}/{total} {time.perf_counter() - t0:5.0f} s] {what}: {status}",
            flush=True,
        )

    if sims:
        print(f"{len(sims)} simulations ({workers} at a time) ...", flush=True)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {
                pool.submit(measure, j, str(work), f"sim-{k}"): j for k, j in enumerate(sims)
            }
            for k, future in enumerate(as_completed(futures), 1):
                j = futures[future]
                results[j] = future.result()
                if k % 20 == 0 or results[j]["error"] or k == len(sims):
                    note(k, len(sims), j, results[j])
    if reals:
        print(f"{len(reals)} real runs, one at a time ...", flush=True)
        for k, j in enumerate(reals, 1):
            results[j] = measure(j, str(work), f"real-{k}")
            note(k, len(reals), j, results[j])
    return results


# ---------------------------------------------------------------------------
# learning-rate choice and verdict rows


def diverged(r: dict) -> bool:
    """A run that failed, or ended with a non-finite test loss or one above its initial loss."""
    if r["error"]:
        return True
    final, initial = r["final_loss"], r["initial_loss"]
    return not math.isfinite(final) or (initial is not None and final > initial)


class Sweep:
    """One setting over a learning-rate grid and seeds; picks the rate of the best mean time to target."""

    def __init__(self, args, engine: str, grid, seeds, **setting) -> None:
        self.engine, self.grid, self.seeds = engine, tuple(grid), tuple(seeds)
        self.jobs = {
            (lr, s): job(args, engine, lr=lr, seed=s, **setting)
            for lr in self.grid
            for s in self.seeds
        }

    def result(self, results: dict, target: float) -> dict:
        per_lr, best = {}, None
        for lr in self.grid:
            runs = [results[self.jobs[lr, s]] for s in self.seeds]
            hits = [to_target(r["curve"], target) if not r["error"] else (None, None) for r in runs]
            t = [h[0] for h in hits]
            g = [h[1] for h in hits]
            ok = all(x is not None for x in t)
            per_lr[lr] = {
                "ttt_s": t,
                "gradients_to_target": g,
                "final_loss": [None if r["error"] else r["final_loss"] for r in runs],
                "diverged": [diverged(r) for r in runs],
                "ttt_mean_s": statistics.fmean(t) if ok else None,
                "gradients_mean": statistics.fmean(g) if ok else None,
            }
            if ok and (best is None or per_lr[lr]["ttt_mean_s"] < per_lr[best]["ttt_mean_s"]):
                best = lr
        runs = [results[self.jobs[best if best else self.grid[0], s]] for s in self.seeds]
        return {
            "lr": best,
            "edge": best in (self.grid[0], self.grid[-1]),
            "ttt_s": per_lr[best]["ttt_mean_s"] if best else None,
            "gradients": per_lr[best]["gradients_mean"] if best else None,
            "diverged_lrs": [lr for lr in self.grid if any(per_lr[lr]["diverged"])],
            "per_lr": per_lr,
            "runs": runs,  # of the best rate (or the first, if none reached the target)
        }


def fmt(value, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def best_text(b: dict, unit: str = "s") -> str:
    if b["lr"] is None:
        return "target not reached at any lr"
    edge = " (edge)" if b["edge"] else ""
    value = fmt(b["ttt_s"], ".3f") + " s" if unit == "s" else fmt(b["gradients"], ".0f")
    return f"{value} (lr {b['lr']:g}{edge})"


def engine_text(engine: str, runs) -> str:
    """The engine; for real runs, a warning where node processes were CPU-bound."""
    if engine == "sim":
        return "sim"
    eff = [r["efficiency"] for r in runs if not r["error"] and r.get("efficiency")]
    if eff and min(eff) < CPU_BOUND:
        return f"real (CPU-bound: {min(eff):.0%} of nominal grad/s)"
    return "real"


def row(
    claim, setting, engine, expected, measured, ok, runs=(), *, pending=False, detail=None
) -> dict:
    """One line of the table; ``detail`` (e.g. every rate's times) goes to the JSON only."""
    verdict = "PENDING" if pending else ("PASS" if ok else "FAIL")
    out = {
        "claim": claim,
        "setting": setting,
        "engine": engine_text(engine, runs),
        "expected": expected,
        "measured": measured,
        "verdict": verdict,
    }
    if detail is not None:
        out["detail"] = detail
    return out


def figure(title: str, best: dict) -> dict:
    """A plot panel: each label's loss curve at its best rate, seed of the sweep's first run."""
    return {
        "title": title,
        "curves": {
            f"{label} (lr {b['lr'] if b['lr'] else '-'})": b["runs"][0]["curve"]
            for label, b in best.items()
            if not b["runs"][0]["error"]
        },
    }


def lr_table(best: dict) -> dict:
    """Per label: the chosen rate and every rate's times, gradients and final losses."""
    return {label: {k: v for k, v in b.items() if k != "runs"} for label, b in best.items()}


def rising(values, margin: float = 0.0) -> bool:
    """Each value above the previous by more than ``margin`` (None anywhere: not shown to rise)."""
    return all(v is not None for v in values) and all(
        b > a + margin for a, b in zip(values, values[1:], strict=False)
    )


def sooner(a: float | None, b: float | None) -> bool:
    """Time to target ``a`` earlier than ``b`` by more than one evaluation interval (b None: never)."""
    return a is not None and (b is None or a < b - EVAL_INTERVAL_S)


#: What "sooner" requires, for the expected column.
SOONER = f"by > {1e3 * EVAL_INTERVAL_S:g} ms (one eval interval)"


def arrow(values, spec: str = ".1f") -> str:
    return " -> ".join(fmt(v, spec) for v in values)


# ---------------------------------------------------------------------------
# the claims: each returns its jobs and a judge turning results into rows


def claim_tau(args):
    """C1: ps-async tau_avg = T(n-1)/(T+n-1), equal and heavy-tailed speeds."""
    profiles = {
        "equal": {},
        "heavy-tailed": {
            "slowdown": HEAVY_SLOWDOWN,
            "compute_time": f"lognormal:{args.compute_s:g}:{HEAVY_SIGMA:g}",
        },
    }
    cases = [
        (engine, n, name, job(args, engine, n=n, algorithm="ps-async", **kw))
        for engine, ns in (("sim", (4, 8, 16)), ("real", args.real_ns))
        for n in ns
        for name, kw in profiles.items()
    ]

    def judge(R):
        rows = []
        for engine, n, name, j in cases:
            r = R[j]
            if r["error"]:
                rows.append(row("C1", f"n={n} {name}", engine, "-", r["error"], False))
                continue
            T = r["updates_applied"]
            expected = T * (n - 1) / (T + n - 1)
            ok = abs(r["tau_avg"] - expected) <= 1e-6 * expected
            factors = r["slowdown_factors"]
            rows.append(
                row(
                    "C1",
                    f"ps-async n={n} {name}"
                    + (f" (factors 1.0-{max(factors):.0f}x)" if max(factors) > 1 else ""),
                    engine,
                    f"tau_avg = {expected:.4f} (T = {T})",
                    f"tau_avg {r['tau_avg']:.4f}, tau_max {r['tau_max']}",
                    ok,
                    [r],
                )
            )
        return rows

    return [c[-1] for c in cases], judge


def claim_s2(args):
    """C2: DASGD, complete graph, b = 1, equal compute time: S2_avg close to n - 1."""
    cases = [
        (engine, n, job(args, engine, n=n))
        for engine, ns in (("sim", (4, 8, 16)), ("real", args.real_ns))
        for n in ns
    ]

    def judge(R):
        rows = []
        for engine, n, j in cases:
            r = R[j]
            setting = f"dasgd complete n={n} b=1"
            expected = f"S2_avg = {n - 1} +- 20 %"
            if r["error"]:
                rows.append(row("C2", setting, engine, expected, r["error"], False))
            elif r["s2_avg"] is None:
                rows.append(
                    row(
                        "C2",
                        setting,
                        engine,
                        expected,
                        f"S2 not in summary.json yet; S1_avg {r['s1_avg']:.2f}",
                        False,
                        [r],
                        pending=True,
                    )
                )
            else:
                ok = abs(r["s2_avg"] / (n - 1) - 1) <= 0.2
                rows.append(
                    row(
                        "C2",
                        setting,
                        engine,
                        expected,
                        f"S2_avg {r['s2_avg']:.2f} (S2_max {fmt(r['s2_max'], '.0f')}; "
                        f"S1_avg {r['s1_avg']:.2f})",
                        ok,
                        [r],
                    )
                )
        return rows

    return [c[-1] for c in cases], judge


def claim_latency_and_b(args):
    """C3: staleness and gradients to target rise with latency and with b."""
    n = 8
    latencies = (0.0, 0.004, 0.016, 0.064)
    bs = (1, 4, 16)
    lat_sweeps = [
        Sweep(args, "sim", GRID, args.seeds, latency=f"{lat:g}" if lat else "", n=n)
        for lat in latencies
    ]
    b_sweeps = [Sweep(args, "sim", GRID, args.seeds, send_every=b, n=n) for b in bs]
    # real runs: staleness only (one rate, one seed)
    real_n = min(args.real_ns)
    real = {
        "lat": [job(args, "real", n=real_n, latency=lat) for lat in ("", "0.016")],
        "b": [job(args, "real", n=real_n, send_every=b) for b in (1, 16)],
    }
    jobs = [j for s in lat_sweeps + b_sweeps for j in s.jobs.values()]
    if args.real_ns and not args.quick:
        jobs += real["lat"] + real["b"]

    def staleness(runs):
        """Mean S1 and S2 over the runs (None where a run failed or lacks the field)."""
        s1 = [None if r["error"] else r["s1_avg"] for r in runs]
        s2 = [None if r["error"] else r["s2_avg"] for r in runs]
        return tuple(
            statistics.fmean(x) if all(v is not None for v in x) else None for x in (s1, s2)
        )

    def judge(R):
        rows = []
        for name, sweeps, labels in (
            ("latency", lat_sweeps, [f"{1e3 * x:g} ms" for x in latencies]),
            ("b", b_sweeps, [f"b={b}" for b in bs]),
        ):
            best = [s.result(R, args.target_loss) for s in sweeps]
            detail = lr_table(dict(zip(labels, best, strict=True)))
            # staleness at the chosen rate's runs (staleness barely depends on the rate)
            stale = [staleness(b["runs"]) for b in best]
            s1 = [x[0] for x in stale]
            s2 = [x[1] for x in stale]
            setting = f"dasgd complete n={n}, {', '.join(labels)}; seeds {list(args.seeds)}"
            rows.append(
                row(
                    "C3",
                    f"S1_avg vs {name}: {setting}",
                    "sim",
                    "rises at every step",
                    arrow(s1) + (f" (S2: {arrow(s2)})" if all(s2) else ""),
                    rising(s1),
                    detail={"s1_avg": s1, "s2_avg": s2},
                )
            )
            grads = [b["gradients"] for b in best]
            # the resolution of gradients to target: the gradients of one eval interval
            margin = n * EVAL_INTERVAL_S / args.compute_s
            rows.append(
                row(
                    "C3",
                    f"gradients to loss {args.target_loss:g} vs {name}: {setting}",
                    "sim",
                    f"rise at every step, by > {margin:g} (one eval interval)",
                    arrow(grads, ".0f")
                    + " (lr "
                    + ", ".join(
                        f"{b['lr']:g}{'*' if b['edge'] else ''}" if b["lr"] else "-" for b in best
                    )
                    + ")",
                    rising(grads, margin),
                    detail=detail,
                )
            )
        if args.real_ns and not args.quick:
            for name, jobs_, labels in (
                ("latency", real["lat"], ("0 ms", "16 ms")),
                ("b", real["b"], ("b=1", "b=16")),
            ):
                runs = [R[j] for j in jobs_]
                s1 = [None if r["error"] else r["s1_avg"] for r in runs]
                rows.append(
                    row(
                        "C3",
                        f"S1_avg vs {name}: dasgd complete n={real_n}, {', '.join(labels)}, lr 0.1",
                        "real",
                        "rises",
                        arrow(s1),
                        rising(s1),
                        runs,
                    )
                )
        return rows

    return jobs, judge


def claim_straggler_staleness(args):
    """C4: one 8x straggler raises S_max and its own deltas' S1 far more than S_avg."""
    cases = []
    for engine, n in (("sim", 8),) + ((("real", min(args.real_ns)),) if args.real_ns else ()):
        equal = job(args, engine, n=n)
        slow = job(args, engine, n=n, slowdown=f"{n - 1}:8")
        cases.append((engine, n, equal, slow))

    def judge(R):
        rows = []
        for engine, n, ej, sj in cases:
            e, s = R[ej], R[sj]
            setting = f"dasgd complete n={n} b=1, node {n - 1} 8x"
            if e["error"] or s["error"]:
                rows.append(row("C4", setting, engine, "-", e["error"] or s["error"], False))
                continue
            avg_ratio = s["s1_avg"] / e["s1_avg"]
            max_ratio = s["s1_max"] / e["s1_max"]
            s2 = (
                f"; S2 max {e['s2_max']} -> {s['s2_max']}, avg {e['s2_avg']:.2f} -> {s['s2_avg']:.2f}"
                if None not in (e["s2_avg"], s["s2_avg"])
                else ""
            )
            rows.append(
                row(
                    "C4",
                    setting,
                    engine,
                    "S1 max ratio >= 3x S1 avg ratio (straggler / equal)",
                    f"S1 max {e['s1_max']} -> {s['s1_max']} ({max_ratio:.1f}x), "
                    f"avg {e['s1_avg']:.2f} -> {s['s1_avg']:.2f} ({avg_ratio:.2f}x){s2}",
                    max_ratio >= 3 * avg_ratio,
                    [e, s],
                )
            )
            origins = s["origins"]
            if origins is None:
                rows.append(
                    row(
                        "C4",
                        setting,
                        engine,
                        "straggler's deltas S1 >= 3x S_avg",
                        "no per-origin staleness in the logs",
                        False,
                        [s],
                    )
                )
                continue
            own = origins[n - 1]
            others = statistics.fmean(v["avg"] for k, v in origins.items() if k != n - 1)
            # its deltas sent after the others stopped are stale by 0: average over the ones
            # sent while all trained (b = 1: one delta per step, applied at n - 1 nodes)
            phase = s["straggler"]
            k = phase["steps_while_all_train"]
            shared = own["avg"] * own["count"] / ((n - 1) * k) if k else None
            rows.append(
                row(
                    "C4",
                    setting,
                    engine,
                    "S1 of the straggler's deltas sent while all train >= 3x S_avg",
                    f"{fmt(shared, '.1f')} over its first {k} of {phase['steps']} deltas "
                    f"(whole run {own['avg']:.1f}, max {own['max']}; others' deltas "
                    f"{others:.1f}); S_avg {s['s1_avg']:.2f}",
                    shared is not None and shared >= 3 * s["s1_avg"],
                    [s],
                    detail={"origins": origins, "straggler": phase},
                )
            )
        return rows

    return [j for c in cases for j in c[2:]], judge


def claim_delay_rule(args):
    """C5: delay-adaptive step (inverse, drop) against none, ps-async with a 16x straggler."""
    rules = ("none", "inverse", "drop")
    setups = [("sim", 8, args.seeds)]
    if args.real_ns and not args.quick:
        setups.append(("real", min(args.real_ns), (0,)))
    sweeps = {
        (engine, rule): Sweep(
            args,
            engine,
            GRID,
            seeds,
            n=n,
            algorithm="ps-async",
            slowdown=f"{n - 1}:16",
            delay_rule=rule,
        )
        for engine, n, seeds in setups
        for rule in rules
    }

    def judge(R):
        rows = []
        for engine, n, seeds in setups:
            best = {rule: sweeps[engine, rule].result(R, args.target_loss) for rule in rules}
            none = best["none"]
            setting = f"ps-async n={n}, node {n - 1} 16x; seeds {list(seeds)}"
            first = len(rows)
            for rule in ("inverse", "drop"):
                b = best[rule]
                runs = [r for s in (b, none) for r in s["runs"]]
                new = sorted(set(b["diverged_lrs"]) - set(none["diverged_lrs"]))
                rows.append(
                    row(
                        "C5",
                        f"{rule}: {setting}",
                        engine,
                        "diverges at no lr where none converges",
                        f"diverged at lr: {rule} {b['diverged_lrs'] or '-'}, "
                        f"none {none['diverged_lrs'] or '-'}",
                        not new,
                        runs,
                    )
                )
                ok = sooner(b["ttt_s"], none["ttt_s"])
                rows.append(
                    row(
                        "C5",
                        f"{rule}: {setting}",
                        engine,
                        f"time to loss {args.target_loss:g} < none's {SOONER}",
                        f"{best_text(b)} vs none {best_text(none)}",
                        ok,
                        runs,
                    )
                )
            rows[first]["detail"] = lr_table(best)
            if engine == "sim":
                rows[first]["figure"] = figure(f"C5: ps-async n={n}, node {n - 1} 16x", best)
        return rows

    return [j for s in sweeps.values() for j in s.jobs.values()], judge


def claim_async_vs_sync(args):
    """C6: ps-async and DASGD against ps-sync with one 8x straggler: time to target."""
    algorithms = ("ps-async", "dasgd", "ps-sync")
    setups = [("sim", 8, args.seeds[:2])]
    if args.real_ns and not args.quick:
        setups.append(("real", min(args.real_ns), (0,)))
    sweeps = {
        (engine, a): Sweep(args, engine, GRID, seeds, n=n, algorithm=a, slowdown=f"{n - 1}:8")
        for engine, n, seeds in setups
        for a in algorithms
    }

    def judge(R):
        rows = []
        for engine, n, seeds in setups:
            best = {a: sweeps[engine, a].result(R, args.target_loss) for a in algorithms}
            sync = best["ps-sync"]
            first = len(rows)
            for a in ("ps-async", "dasgd"):
                b = best[a]
                ok = sooner(b["ttt_s"], sync["ttt_s"])
                ratio = (
                    f"; ratio {b['ttt_s'] / sync['ttt_s']:.2f}"
                    if b["ttt_s"] and sync["ttt_s"]
                    else ""
                )
                rows.append(
                    row(
                        "C6",
                        f"{a}{' complete b=1' if a == 'dasgd' else ''} vs ps-sync: n={n}, "
                        f"node {n - 1} 8x; seeds {list(seeds)}",
                        engine,
                        f"time to loss {args.target_loss:g} < ps-sync's {SOONER}",
                        f"{best_text(b)} vs {best_text(sync)}{ratio}",
                        ok,
                        b["runs"] + sync["runs"],
                    )
                )
            rows[first]["detail"] = lr_table(best)
            if engine == "sim":
                rows[first]["figure"] = figure(f"C6: n={n}, node {n - 1} 8x", best)
        return rows

    return [j for s in sweeps.values() for j in s.jobs.values()], judge


def claim_apam(args):
    """C7: APAM's AMSGrad server against asynchronous SGD under delay (ps-async, tau ~ n - 1)."""
    setups = [("sim", 16, args.seeds)]
    if args.real_ns and not args.quick:
        setups.append(("real", max(args.real_ns), (0,)))
    sweeps = {
        (engine, opt): Sweep(
            args,
            engine,
            WIDE_GRID,
            seeds,
            n=n,
            algorithm="ps-async",
            server_optimizer=opt,
        )
        for engine, n, seeds in setups
        for opt in ("sgd", "amsgrad")
    }

    def judge(R):
        rows = []
        for engine, n, seeds in setups:
            sgd = sweeps[engine, "sgd"].result(R, args.target_loss)
            ams = sweeps[engine, "amsgrad"].result(R, args.target_loss)
            tau = statistics.fmean(r["tau_avg"] for r in ams["runs"] if not r["error"])
            ok = sooner(ams["ttt_s"], sgd["ttt_s"])
            rows.append(
                row(
                    "C7",
                    f"ps-async n={n} (tau_avg {tau:.1f}), amsgrad vs sgd server; "
                    f"seeds {list(seeds)}",
                    engine,
                    f"AMSGrad's time to loss {args.target_loss:g} < SGD's {SOONER}",
                    f"{best_text(ams)} vs {best_text(sgd)}",
                    ok,
                    ams["runs"] + sgd["runs"],
                    detail=lr_table({"amsgrad": ams, "sgd": sgd}),
                )
            )
            if engine == "sim":
                rows[-1]["figure"] = figure(f"C7: ps-async n={n}", {"amsgrad": ams, "sgd": sgd})
        return rows

    return [j for s in sweeps.values() for j in s.jobs.values()], judge


def claim_non_iid(args):
    """C8: non-i.i.d. shards: consensus distance and time to target grow as alpha falls."""
    alphas = (10.0, 1.0, 0.1)
    setups = [("sim", 8, args.seeds)]
    if args.real_ns and not args.quick:
        setups.append(("real", min(args.real_ns), (0,)))
    sweeps = {
        (engine, a): Sweep(args, engine, GRID, seeds, n=n, topology="ring", alpha=a)
        for engine, n, seeds in setups
        for a in alphas
    }

    def judge(R):
        rows = []
        for engine, n, seeds in setups:
            best = [sweeps[engine, a].result(R, args.target_loss) for a in alphas]
            setting = f"dasgd ring n={n}, alpha {', '.join(f'{a:g}' for a in alphas)}; seeds {list(seeds)}"
            # consensus distance grows with the step size: compare the alphas at each rate
            per_lr, missing = {}, False
            for lr in GRID:
                means = []
                for a in alphas:
                    runs = [R[sweeps[engine, a].jobs[lr, seed]] for seed in seeds]
                    cons = [None if r["error"] else r["consensus"] for r in runs]
                    missing |= any(c is None for c in cons)
                    means.append(None if missing else statistics.fmean(c["mean"] for c in cons))
                per_lr[lr] = means
            expected = "consensus distance (mean while training) rises as alpha falls, at every lr"
            if missing:
                rows.append(
                    row(
                        "C8",
                        setting,
                        engine,
                        expected,
                        "no consensus-distance series in analysis.json",
                        False,
                        pending=True,
                    )
                )
            else:
                rows.append(
                    row(
                        "C8",
                        setting,
                        engine,
                        expected,
                        "; ".join(f"lr {lr:g}: {arrow(m, '.3g')}" for lr, m in per_lr.items()),
                        all(rising(m) for m in per_lr.values()),
                        [R[j] for a in alphas for j in sweeps[engine, a].jobs.values()],
                        detail={"consensus_mean_by_lr": per_lr},
                    )
                )
            ttt = [b["ttt_s"] for b in best]
            rows.append(
                row(
                    "C8",
                    setting,
                    engine,
                    f"time to loss {args.target_loss:g} rises as alpha falls, "
                    f"each step by > {1e3 * EVAL_INTERVAL_S:g} ms",
                    arrow(ttt, ".3f")
                    + " s (lr "
                    + ", ".join(
                        f"{b['lr']:g}{'*' if b['edge'] else ''}" if b["lr"] else "-" for b in best
                    )
                    + ")",
                    rising(ttt, EVAL_INTERVAL_S),
                    [r for b in best for r in b["runs"]],
                    detail=lr_table({f"alpha {a:g}": b for a, b in zip(alphas, best, strict=True)}),
                )
            )
            if engine == "sim":
                rows[-1]["figure"] = figure(
                    f"C8: dasgd ring n={n}",
                    {f"alpha {a:g}": b for a, b in zip(alphas, best, strict=True)},
                )
        return rows

    return [j for s in sweeps.values() for j in s.jobs.values()], judge


CLAIMS = {
    "C1": claim_tau,
    "C2": claim_s2,
    "C3": claim_latency_and_b,
    "C4": claim_straggler_staleness,
    "C5": claim_delay_rule,
    "C6": claim_async_vs_sync,
    "C7": claim_apam,
    "C8": claim_non_iid,
}


# ---------------------------------------------------------------------------
# output


def markdown(rows: list[dict]) -> str:
    lines = [
        "| claim | setting | engine | expected | measured | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['claim']} | {r['setting']} | {r['engine']} | {r['expected']} "
            f"| {r['measured']} | **{r['verdict']}** |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], target: float, path: Path) -> bool:
    """The rows' figures (C5-C8, simulator): test loss against virtual time at each label's best rate."""
    panels = [r["figure"] for r in rows if r.get("figure")]
    if not panels:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no PNG written")
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, curve in panel["curves"].items():
            points = [(t, loss) for t, _, loss in curve if t > 0]
            if points:
                t, loss = zip(*points, strict=True)
                ax.plot(t, loss, label=label, linewidth=1)
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_title(panel["title"], fontsize=8)
        ax.set_xlabel("virtual s (seed 0)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(0.08, 3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="one seed; real runs only for C1, C2, C4 at n = 4 (~2 min)",
    )
    p.add_argument("--only", default="", help="claims to run, e.g. C1,C4 (default: all)")
    p.add_argument(
        "--seeds",
        default="0,1,2",
        help="seeds of the sweeps (default %(default)s; --quick: 0)",
    )
    p.add_argument(
        "--real-ns",
        default="4,8",
        help="node counts of real runs (default %(default)s; --quick: 4)",
    )
    p.add_argument("--no-real", action="store_true", help="simulator only")
    p.add_argument(
        "--compute-s",
        type=float,
        default=0.004,
        help="emulated seconds per gradient (default %(default)s)",
    )
    p.add_argument("--target-loss", type=float, default=0.2, help="default %(default)s")
    p.add_argument(
        "--jobs", type=int, default=2, help="simulations at a time (default %(default)s)"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "bench_predictions.json")
    args = p.parse_args(argv)
    args.seeds = (0,) if args.quick else tuple(int(s) for s in args.seeds.split(","))
    args.real_ns = () if args.no_real else tuple(int(s) for s in args.real_ns.split(","))
    if args.quick and args.real_ns:
        args.real_ns = (min(args.real_ns),)
    args.sim_budget = SIM_BUDGET // 2 if args.quick else SIM_BUDGET
    args.real_budget = REAL_BUDGET
    args.only = [c.strip().upper() for c in args.only.split(",") if c.strip()] or list(CLAIMS)
    unknown = set(args.only) - set(CLAIMS)
    if unknown:
        p.error(f"unknown claims {sorted(unknown)}: choose from {', '.join(CLAIMS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    planned = {name: CLAIMS[name](args) for name in args.only}
    jobs = [j for js, _ in planned.values() for j in js]
    with tempfile.TemporaryDirectory(prefix="bench-predictions-") as tmp:
        results = run_all(jobs, Path(tmp), args.jobs)
    rows = [r for _, judge in planned.values() for r in judge(results)]
    wall_s = time.perf_counter() - t0
    table = markdown(rows)
    print("\n" + table)
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("PASS", "FAIL", "PENDING")}
    print(
        f"\n{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['PENDING']} PENDING; "
        f"target loss {args.target_loss:g}; seeds {list(args.seeds)}; "
        f"{sum(j.engine == 'sim' for j in set(jobs))} simulations, "
        f"{sum(j.engine == 'real' for j in set(jobs))} real runs; wall {wall_s:.0f} s"
    )
    load_after = report_load(load_before)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = [
        {
            "engine": j.engine,
            "config": j.config.to_dict(),
            **{k: v for k, v in r.items() if k != "curve"},
            "curve_points": len(r.get("curve") or []),
        }
        for j, r in results.items()
    ]
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "argv": sys.argv[1:],
                "machine": machine_info(load_before=load_before, load_after=load_after),
                "settings": {
                    "target_loss": args.target_loss,
                    "seeds": list(args.seeds),
                    "real_ns": list(args.real_ns),
                    "compute_s": args.compute_s,
                    "grid": GRID,
                    "wide_grid": WIDE_GRID,
                    "sim_budget_gradients": args.sim_budget,
                    "real_budget_gradients": args.real_budget,
                },
                "wall_s": wall_s,
                "rows": rows,
                "table": table,
                "runs": runs,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    print(f"results: {args.out}")
    if plot(rows, args.target_loss, args.out.with_suffix(".png")):
        print(f"figure: {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
