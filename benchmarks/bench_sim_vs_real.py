"""The simulator against real runs: one configuration through ``dasgd run`` and ``dasgd simulate``.

Target: the simulator's S_avg (apply staleness, ``summary["run"]["staleness_avg_steps"]``)
and gradients/s (``summary["run"]["gradients_per_s"]``) within 20 % of a real run's.

For every configuration of the grid -- n in {4, 8}, topology ring or complete,
b (``send_every``) in {1, 4}, all nodes equal or node 1 a 4x straggler
(``slowdown="1:4"``) -- the script builds one :class:`~dasgd.config.RunConfig`
(digits, softmax, float64, batch 32, lr 0.05, ``--steps`` local steps per node,
an emulated compute time of ``--compute-time`` per gradient, no evaluation
during the run) and runs it with :func:`dasgd.runtime.launch.run` (one process per node
on this machine) and with :func:`dasgd.sim.simulate` (default
:class:`~dasgd.sim.simulator.SimCosts`, or ``--sim-costs``). It prints side by side S_avg, S_max,
gradients/s, the average model's final test loss and the ratios sim/real, and
PASS/FAIL against the target.

Real runs share this machine's cores. While all nodes train (from the moment
every node has opened its log for ``--steps`` x compute time seconds, or until
the first node exits) a thread samples the node processes' CPU time (psutil,
user + system, all threads): "cores real" is that CPU time per second. Near the
machine's core count the real run is CPU-bound (marked), and its figures are
the machine's, not the algorithm's. "cores sim" is what the simulator modelled:
the host time SimCosts charges for the nodes' steps, messages in and messages
out, per second of virtual training (each simulated node has a host of its
own). "step ms" is a non-straggler node's ``train_s / steps``: the compute time
plus whatever the node adds per step. The "diagnostic" columns simulate
again with ``--diag-compute-time`` (default: every compute time drawn uniformly
within +-2.5 % of the constant, same mean; it broke the lockstep of the
simulator before nodes started at different times, see benchmarks/README.md)
and ``--diag-costs``; the verdict is the plain simulation's.

``--costs`` then measures, in this process, what a real node spends, with the
real machines, drivers and ZeroMQ sockets (ipc) of ``dasgd run``: per gradient,
per local step around it, per message sent (one destination), per message
received and applied, and the overshoot of the driver's emulated-compute wait,
next to the SimCosts the simulator assumes.

Usage::

    python benchmarks/bench_sim_vs_real.py --quick      # n=4, ring and complete, b=1 (~10 s)
    python benchmarks/bench_sim_vs_real.py              # the full grid of 16 (~2 min)
    python benchmarks/bench_sim_vs_real.py --costs --out results.json
    python benchmarks/bench_sim_vs_real.py --diag-costs message_s=120e-6,send_s=16e-6

Raw figures go to ``benchmarks/results/bench_sim_vs_real.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from dasgd.config import (  # noqa: E402
    DataConfig,
    EmulationConfig,
    ModelConfig,
    RunConfig,
    TopologyConfig,
    TrainConfig,
    TransportConfig,
)
from dasgd.runtime.launch import run  # noqa: E402
from dasgd.sim import simulate  # noqa: E402
from dasgd.sim.simulator import SimCosts  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, nominal_s, report_load  # noqa: E402

TARGET = 0.20
#: A real run whose nodes use more than this fraction of the machine's cores is CPU-bound.
CPU_BOUND = 0.8
BATCH = 32
RESULTS = Path(__file__).resolve().parent / "results" / "bench_sim_vs_real.json"


def make_config(args, out_dir: Path, *, n: int, topology: str, b: int, straggler: bool):
    return RunConfig(
        n_nodes=n,
        topology=TopologyConfig(topology),
        data=DataConfig("digits"),
        model=ModelConfig("softmax", dtype="float64"),
        train=TrainConfig(steps=args.steps, lr=0.05, batch_size=BATCH, send_every=b),
        emulation=EmulationConfig(
            compute_time=args.compute_time, slowdown="1:4" if straggler else ""
        ),
        transport=TransportConfig(ready_timeout_s=120, drain_timeout_s=60, send_timeout_s=60),
        out_dir=str(out_dir),
        log_interval_s=0.25,
        eval_interval_s=None,
        timeout_s=300,
    )


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class TrainingCPU(threading.Thread):
    """Samples the CPU time of this process's children (the node processes) while a run trains.

    The window opens when every node has opened its log (``dasgd run`` hands out
    ``start`` first: all nodes are training) and closes ``window_s`` later or
    when the first node exits, whichever is first. :attr:`cpu_s` is the node
    processes' CPU time (user + system, all threads) within it, :attr:`window_s`
    its length.
    """

    PERIOD_S = 0.02

    def __init__(self, run_dir: Path, n: int, window_s: float) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.n, self.max_window_s = run_dir, n, window_s
        self.done = threading.Event()
        self.cpu_s = self.window_s = None

    @staticmethod
    def _sample(procs) -> dict:
        out = {}
        for p in procs:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return out

    def run(self) -> None:
        me = psutil.Process()
        logs = [self.run_dir / f"node-{i}.jsonl" for i in range(self.n)]
        while not self.done.is_set() and not all(p.exists() for p in logs):
            time.sleep(self.PERIOD_S / 4)
        procs = me.children()
        first, t0 = self._sample(procs), time.monotonic()
        last, t1 = first, t0
        while not self.done.is_set() and time.monotonic() - t0 < self.max_window_s:
            time.sleep(self.PERIOD_S)
            now = self._sample(procs)
            if set(now) != set(first):  # a node exited: the window ends at the previous sample
                break
            last, t1 = now, time.monotonic()
        if t1 > t0:
            self.cpu_s = sum(last[pid] - first[pid] for pid in first)
            self.window_s = t1 - t0


def figures(summary: dict, straggler: bool) -> dict:
    r = summary["run"]
    nodes = summary["nodes"]
    fast = [x for x in nodes if not (straggler and x["node"] == 1)]
    return {
        "s_avg": r["staleness_avg_steps"],
        "s_max": r["staleness_max_steps"],
        "grad_per_s": r["gradients_per_s"],
        "loss": r["average_model_test_loss"],
        "train_s": r["train_s"],
        "wall_s": r["wall_s"],
        "step_ms": statistics.median(1e3 * x["train_s"] / x["steps"] for x in fast),
        "msgs_in": sum(x["msgs_in"] for x in nodes),
        "msgs_out": sum(x["msgs_out"] for x in nodes),
        "steps": r["steps"],
        "exactly_once": summary["checks"]["exactly_once"],
    }


def run_real(cfg: RunConfig, straggler: bool, window_s: float) -> dict:
    cfg = cfg.replace(run_id=f"real-{time.time_ns()}")
    sampler = TrainingCPU(Path(cfg.out_dir) / cfg.run_id, cfg.n_nodes, window_s)
    sampler.start()
    cpu0 = _cpu_children()
    try:
        _, summary = run(cfg, progress=False)
    finally:
        sampler.done.set()
        sampler.join()
    out = figures(summary, straggler)
    out["cpu_s"] = _cpu_children() - cpu0  # the node processes' whole lives
    # the cores the nodes used while all of them trained
    out["cores"] = sampler.cpu_s / sampler.window_s if sampler.window_s else float("nan")
    out["cpu_window_s"] = sampler.window_s or float("nan")
    return out


def sim_host_s(summary: dict, costs: SimCosts) -> float:
    """Host seconds SimCosts charges for the nodes' steps and messages (what the simulator modelled)."""
    n_params = summary["model"]["n_params"]
    n = summary["run"]["n_nodes"]
    grad = costs.gradient_fixed_s + costs.gradient_s_per_unit * BATCH * n_params
    per_in = costs.message_s + costs.byte_s * 8 * n_params + costs.vv_entry_s * 2 * n
    return sum(
        x["steps"] * (costs.step_s + grad) + x["msgs_in"] * per_in + x["msgs_out"] * costs.send_s
        for x in summary["nodes"]
    )


def run_sim(cfg: RunConfig, straggler: bool, costs: SimCosts) -> dict:
    t = time.perf_counter()
    _, summary = simulate(cfg, costs=costs, progress=False)
    out = figures(summary, straggler)
    out["sim_real_s"] = time.perf_counter() - t
    out["host_s"] = sim_host_s(summary, costs)
    return out


def jitter_spec(spec: str, jitter: float) -> str | None:
    """``uniform:(1-j)c:(1+j)c`` for a constant compute time c (None otherwise, or for j = 0)."""
    from dasgd.core.emulation import parse_compute_time

    p = parse_compute_time(spec)
    if p["kind"] != "constant" or not jitter:
        return None
    c = p["seconds"]
    return f"uniform:{c * (1 - jitter):.6g}:{c * (1 + jitter):.6g}"


def sim_costs(text: str) -> SimCosts:
    """``SimCosts`` with fields set from ``"name=value,name=value"`` (empty: the defaults)."""
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in SimCosts.__dataclass_fields__:
            raise SystemExit(
                f"unknown SimCosts field {name!r}: {', '.join(SimCosts.__dataclass_fields__)}"
            )
        fields[name] = float(value)
    return SimCosts(**fields)


def ratio(sim, real):
    return sim / real if real else float("nan")


def bench(args, work: Path) -> list[dict]:
    if args.quick:
        grid = [(4, topo, 1, False) for topo in ("ring", "complete")]
    else:
        grid = list(
            itertools.product(args.ns, ("ring", "complete"), (1, 4), (False, True))
        )  # n, topology, b, straggler
    costs, diag_costs = sim_costs(args.sim_costs), sim_costs(args.diag_costs)
    diag_ct = args.diag_compute_time or jitter_spec(args.compute_time, 0.025)
    if diag_ct == "none":
        diag_ct = None
    # CPU is sampled while every node trains: the first steps * compute time seconds
    window_s = args.steps * nominal_s(args.compute_time)
    rows = []
    for n, topology, b, straggler in grid:
        kw = dict(n=n, topology=topology, b=b, straggler=straggler)
        reals = [
            run_real(make_config(args, work / "real", **kw), straggler, window_s)
            for _ in range(args.reps)
        ]
        real = {k: statistics.median(r[k] for r in reals) for k in reals[0]}
        real["exactly_once"] = all(r["exactly_once"] for r in reals)
        real["cpu_bound"] = real["cores"] > CPU_BOUND * (os.cpu_count() or 1)
        cfg = make_config(args, work / "sim", **kw)
        sim = run_sim(cfg, straggler, costs)
        sim["cores"] = sim["host_s"] / sim["train_s"]
        if diag_ct:  # diagnostic: e.g. the same mean compute time, not the same for every step
            cfg = cfg.replace(
                emulation=EmulationConfig(slowdown=cfg.emulation.slowdown, compute_time=diag_ct)
            )
            diag = sim["diagnostic"] = run_sim(cfg, straggler, diag_costs)
            diag["ratio_s_avg"] = ratio(diag["s_avg"], real["s_avg"])
            diag["ratio_grad_per_s"] = ratio(diag["grad_per_s"], real["grad_per_s"])
            diag["pass"] = (
                abs(diag["ratio_s_avg"] - 1) <= TARGET
                and abs(diag["ratio_grad_per_s"] - 1) <= TARGET
            )
        r_s = ratio(sim["s_avg"], real["s_avg"])
        r_g = ratio(sim["grad_per_s"], real["grad_per_s"])
        ok = abs(r_s - 1) <= TARGET and abs(r_g - 1) <= TARGET
        row = {
            **kw,
            "real": real,
            "real_reps": reals,
            "sim": sim,
            "ratio_s_avg": r_s,
            "ratio_grad_per_s": r_g,
            "pass": ok,
        }
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (
    "| n | topology | b | straggler | S_avg real | sim | sim/real "
    "| S_max real | sim | grad/s real | sim | sim/real | loss real | sim "
    "| step ms real | cores real | sim | verdict | diagnostic S_avg | grad/s | verdict |\n"
    + "|---" * 21
    + "|"
)


def format_row(row: dict) -> str:
    r, s = row["real"], row["sim"]
    d = s.get("diagnostic")
    diag = (
        f"| {d['s_avg']:.2f} ({d['ratio_s_avg']:.2f}) | {d['grad_per_s']:.0f} "
        f"({d['ratio_grad_per_s']:.2f}) | {'PASS' if d['pass'] else 'FAIL'} |"
        if d
        else "| - | - | - |"
    )
    return (
        f"| {row['n']} | {row['topology']} | {row['b']} | {'1:4' if row['straggler'] else '-'} "
        f"| {r['s_avg']:.2f} | {s['s_avg']:.2f} | {row['ratio_s_avg']:.2f} "
        f"| {r['s_max']:.0f} | {s['s_max']:.0f} "
        f"| {r['grad_per_s']:.0f} | {s['grad_per_s']:.0f} | {row['ratio_grad_per_s']:.2f} "
        f"| {r['loss']:.4f} | {s['loss']:.4f} | {r['step_ms']:.2f} "
        f"| {r['cores']:.2f}{' CPU-bound' if r['cpu_bound'] else ''} | {s['cores']:.2f} "
        f"| {'PASS' if row['pass'] else 'FAIL'} " + diag
    )


# ---------------------------------------------------------------------------
# --costs: what a real node spends, measured on the runtime's own objects


def measure_costs(args, work: Path, n: int, count: int = 2000) -> dict:
    """Microseconds per gradient, step, send, received message and wait overshoot of a real node.

    Node 0 (neighbour: node 1 only) takes steps with b = 1 and sends each
    delta to node 1 through the real Driver and Transport (ipc); node 1 is a
    node of an n-node complete graph (pruned relay: it forwards nothing), whose
    Driver receives, decodes and applies them. Both are built by
    ``build_machine`` as a node process builds them; no compute time.
    """
    from dasgd.analysis.metrics import EventLog
    from dasgd.build import build_machine
    from dasgd.core import wire
    from dasgd.core.protocol import adjacency_sets
    from dasgd.rundir import prepare_run
    from dasgd.runtime.node import BufferPool, Driver, queue_limit_msgs
    from dasgd.runtime.transport import Transport

    base = make_config(args, work / "costs", n=n, topology="complete", b=1, straggler=False)
    cfg = base.replace(
        emulation=EmulationConfig(), train=TrainConfig(steps=10 * count, batch_size=BATCH)
    )
    cfg, _, ctx = prepare_run(cfg, write_shards=False)
    ds = ctx["dataset"]
    everyone = set(range(n))
    adjacency = adjacency_sets({k: sorted(everyone - {k}) for k in everyone})

    def driver(i, neighbours, adj):
        idx = ctx["shards"][i]
        machine = build_machine(
            cfg,
            i,
            n_features=ds.n_features,
            n_classes=ds.n_classes,
            shard=(ds.X_train[idx], ds.y_train[idx]),
            neighbours=neighbours,
            adjacency=adj,
        )
        pool = BufferPool(machine.n_params, machine.dtype)
        machine.new_buffer = pool.take
        nbytes = machine.n_params * machine.dtype.itemsize
        transport = Transport(
            i,
            f"ipc://{work}/costs-{i}",
            hwm_msgs=queue_limit_msgs(cfg.transport, nbytes),
            max_message_bytes=nbytes + wire.MAX_HEADER_BYTES + 4096,
        )
        transport.start()
        log = EventLog(work / f"costs-{n}-{i}.jsonl", i, t0=time.monotonic()).open()
        return Driver(machine, cfg, transport, log, pool)

    d0 = driver(0, [1], None)
    d1 = driver(1, sorted(everyone - {1}), adjacency)
    d0.transport.connect({1: f"ipc://{work}/costs-1"})
    out: dict = {"n": n, "n_params": d0.machine.n_params}
    try:
        m0 = d0.machine
        # the gradient alone, on node 0's own shard and batches
        idx = m0.sampler.next_batch()
        grad = np.empty(m0.n_params)
        times = []
        for _ in range(count // 50):
            t = time.perf_counter()
            for _ in range(50):
                m0.model.loss_and_grad(m0.params, m0.X[idx], m0.y[idx], out=grad)
            times.append((time.perf_counter() - t) / 50)
        out["gradient_us"] = statistics.median(times) * 1e6
        # one local step: advance() (gradient, update, open delta, seal), then the send; per
        # batch of 50 steps node 1 receives them. Medians over batches: another job that takes
        # the core for a while spoils a batch, not the figure.
        batch = 50
        per_batch = {"step": [], "send": [], "encode": [], "receive": [], "cpu": []}
        received = 0
        for k0 in range(0, count, batch):
            step_s = send_s = encode_s = recv_s = 0.0
            cpu0 = time.process_time()
            for _ in range(batch):
                t0 = time.perf_counter()
                sends, _ = m0.advance(time.monotonic())
                t1 = time.perf_counter()
                for o in sends:
                    wire.encode_header(o.header)  # what _send does first, timed alone
                t2 = time.perf_counter()
                for o in sends:
                    d0._send(o)
                t3 = time.perf_counter()
                step_s += t1 - t0
                encode_s += t2 - t1
                send_s += t3 - t2
            while received < k0 + batch:  # let node 1 catch up (its queue holds 100)
                if not d1.transport.poll(0.05):
                    continue
                t4 = time.perf_counter()
                received += d1._receive_all()
                recv_s += time.perf_counter() - t4
            per_batch["cpu"].append((time.process_time() - cpu0) / batch)
            for key, v in (("step", step_s), ("send", send_s), ("encode", encode_s)):
                per_batch[key].append(v / batch)
            per_batch["receive"].append(recv_s / batch)
        assert received == count and d1.malformed == 0, (received, d1.malformed)
        assert int(d1.machine.protocol.applied_deltas.sum()) == count
        med = {k: statistics.median(v) * 1e6 for k, v in per_batch.items()}
        out["step_us"] = med["step"] - out["gradient_us"]
        out["send_us"] = med["send"]  # encode the header, copy the 5 KB payload, zmq send
        out["encode_us"] = med["encode"]
        out["receive_us"] = med["receive"]  # poll, recv, decode, on_message (apply), per message
        # both nodes' threads, ZeroMQ's I/O threads included, per step = per message
        out["process_cpu_per_step_us"] = med["cpu"]
        # the emulated-compute wait: how late does Driver._wait_until return, and what CPU does
        # the waiting thread spend (nothing arrives)?
        late, cpu = [], []
        wait_s = nominal_s(args.compute_time) if args.compute_time else 0.004
        for _ in range(200):
            c = time.thread_time()
            due = time.monotonic() + wait_s
            d1._wait_until(due)
            late.append(time.monotonic() - due)
            cpu.append(time.thread_time() - c)
        out["wait_overshoot_us_median"] = statistics.median(late) * 1e6
        out["wait_overshoot_us_p90"] = sorted(late)[int(0.9 * len(late))] * 1e6
        out["wait_cpu_us"] = statistics.median(cpu) * 1e6
        # messages that arrive one by one while node 1 waits (as in a run): a sender thread
        # sends one delta per millisecond; node 1's thread CPU per message, wake-up included
        # (ZeroMQ's I/O threads and the sender excluded)
        import threading

        n_msgs = 400
        go = threading.Event()

        def sender():
            go.wait()
            for _ in range(n_msgs):
                for o in m0.advance(time.monotonic())[0]:
                    d0._send(o)
                time.sleep(0.001)

        thread = threading.Thread(target=sender)
        thread.start()
        applied0 = int(d1.machine.protocol.applied_deltas.sum())
        c = time.thread_time()
        t = time.monotonic()
        go.set()
        while int(d1.machine.protocol.applied_deltas.sum()) < applied0 + n_msgs:
            d1._wait_until(time.monotonic() + wait_s)
            if time.monotonic() - t > 60:
                break
        busy = time.thread_time() - c
        elapsed = time.monotonic() - t
        thread.join()
        handled = int(d1.machine.protocol.applied_deltas.sum()) - applied0
        waits = elapsed / wait_s
        out["receive_woken_us"] = (busy - waits * out["wait_cpu_us"] / 1e6) / handled * 1e6
    finally:
        for d in (d0, d1):
            d.transport.close(linger_s=0.0)
            d.log.close()
    return out


def print_costs(measured: list[dict]) -> None:
    c = SimCosts()
    print("\nHost costs of a real node (this process, ipc, float64 softmax, batch 32), in us:")
    print(
        "| n | params | gradient | step (around it) | send (1 dest) | of which header encode "
        "| receive+apply (batched) | receive+apply (woken per message) "
        "| all threads per step+send+receive | wait overshoot median / p90 | CPU of a wait |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in measured:
        print(
            f"| {m['n']} | {m['n_params']} | {m['gradient_us']:.1f} | {m['step_us']:.1f} "
            f"| {m['send_us']:.1f} | {m['encode_us']:.1f} | {m['receive_us']:.1f} "
            f"| {m['receive_woken_us']:.1f} | {m['process_cpu_per_step_us']:.1f} "
            f"| {m['wait_overshoot_us_median']:.0f} / {m['wait_overshoot_us_p90']:.0f} "
            f"| {m['wait_cpu_us']:.0f} |"
        )
    n_params = measured[0]["n_params"]
    print(
        f"SimCosts now: gradient {1e6 * (c.gradient_fixed_s + c.gradient_s_per_unit * BATCH * n_params):.1f}, "
        f"step {1e6 * c.step_s:.1f}, send {1e6 * c.send_s:.1f}, receive "
        + ", ".join(
            f"{1e6 * (c.message_s + c.byte_s * 8 * n_params + c.vv_entry_s * 2 * m['n']):.1f} (n={m['n']})"
            for m in measured
        )
        + ", wait overshoot not modelled"
    )


def print_table(rows: list[dict]) -> None:
    print("\n" + HEADER)
    for row in rows:
        print(format_row(row))
    passed = sum(r["pass"] for r in rows)
    print(
        f"\n{passed} of {len(rows)} configurations within {TARGET:.0%} on both S_avg and gradients/s"
    )
    diag = [r["sim"]["diagnostic"]["pass"] for r in rows if "diagnostic" in r["sim"]]
    if diag:
        print(f"diagnostic simulation: {sum(diag)} of {len(diag)}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="n=4, ring and complete, b=1, no straggler")
    p.add_argument("--ns", type=int, nargs="+", default=[4, 8], help="node counts (default 4 8)")
    p.add_argument("--steps", type=int, default=300, help="local steps per node (default 300)")
    p.add_argument(
        "--compute-time", default="0.004", help="emulated seconds per gradient (default 0.004)"
    )
    p.add_argument("--reps", type=int, default=1, help="real runs per configuration (median)")
    p.add_argument(
        "--sim-costs",
        default="",
        metavar="NAME=VALUE,...",
        help="SimCosts fields for the simulations (default: SimCosts())",
    )
    p.add_argument(
        "--diag-compute-time",
        default="",
        metavar="SPEC",
        help="compute time of the diagnostic simulation (default: uniform within +-2.5 %% of a "
        "constant --compute-time; none: no diagnostic)",
    )
    p.add_argument(
        "--diag-costs",
        default="",
        metavar="NAME=VALUE,...",
        help="SimCosts fields for the diagnostic simulation (default: SimCosts())",
    )
    p.add_argument("--costs", action="store_true", help="also measure a real node's host costs")
    p.add_argument("--no-grid", action="store_true", help="skip the runs (with --costs)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows, measured = [], []
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        work = Path(tmp)
        if not args.no_grid:
            print(HEADER, flush=True)
            rows = bench(args, work)
        if args.costs:
            measured = [measure_costs(args, work, n) for n in (args.ns if not args.quick else [4])]
    if rows:
        print_table(rows)
    if measured:
        print_costs(measured)
    load_after = report_load(load_before)
    print(f"total {time.perf_counter() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine_info(load_before=load_before, load_after=load_after),
                "args": {k: str(v) for k, v in vars(args).items()},
                "sim_costs": sim_costs(args.sim_costs).__dict__,
                "diag_costs": sim_costs(args.diag_costs).__dict__,
                "rows": rows,
                "costs": measured,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
