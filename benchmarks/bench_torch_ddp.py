"""dasgd against the tool a user would otherwise take: synchronous data-parallel SGD
with ``torch.distributed`` (gloo backend, CPU) and ``DistributedDataParallel``.

Same problem on every side: scikit-learn digits (standardized, split and
sharded i.i.d. by :mod:`dasgd.ml.data` with the same seed), the same MLP
(``64 -> hidden... -> 10``, relu, softmax cross-entropy) started from dasgd's
``x0`` (``build_model("mlp", ...).init_params(seed)``, unpacked per dasgd's flat
layout: all weight matrices ``(fan_in, fan_out)`` in C order, then all biases),
the same per-worker mini-batch stream (``BatchSampler(len(shard), M, seed + 1 +
rank)``), the same step size and number of steps ``S`` per worker.

Competitors, for every worker count ``n`` (``--nodes``):

``torch-ddp``
    ``n`` processes (``multiprocessing`` spawn), ``init_process_group("gloo")``
    on 127.0.0.1, one thread each, the model wrapped in
    ``DistributedDataParallel``, ``torch.optim.SGD``: every step all-reduces
    (averages) the gradients, so it is sequential SGD with batch ``n * M``.
    Rank 0 evaluates the test loss every ``--eval-interval-s`` of training time;
    evaluation time is excluded from its clock (and reported).
``ps-sync``
    dasgd's synchronous parameter-server baseline (``n`` workers and a server
    process, dasgd's ZeroMQ wire): the same algorithm as torch-ddp.
``dasgd-<topology>``
    Decentralized asynchronous SGD on a ring (and the complete graph for
    ``n >= 3``, where it differs from the ring). Every node applies every
    node's update (ALGORITHMS.md section 1), so with the same ``lr`` a round of
    ``n`` node steps moves the model about ``n`` times further than one
    averaged synchronous step.

Reported per competitor: total gradients/s (``n * S / training time``), the
training time until the test loss first reaches ``--target-loss`` (for DASGD:
until every node's model has reached it), the final test accuracy and loss,
and the end-to-end wall time as the script sees it (process start-up included:
importing torch takes ~1.4 s per process here). dasgd's times come from its
logs (``eval`` records, ``summary["run"]``); its clocks include its own (small)
evaluation time, reported as ``eval_s``.

Correctness check: after ``S`` steps the torch-ddp model and ps-sync's
``server.npy`` should agree up to float rounding (gradient summation order
differs); both are also compared with an in-process numpy reference (dasgd's
model, sequential SGD with the averaged gradient of the ``n`` batches).

Every process gets ``OPENBLAS_NUM_THREADS=1`` (and OMP/MKL), torch
``set_num_threads(1)``. Results go to ``benchmarks/results/bench_torch_ddp.json``.

Usage::

    python benchmarks/bench_torch_ddp.py                  # ~60 s on 2 cores
    python benchmarks/bench_torch_ddp.py --nodes 2 4 8 --reps 3
    python benchmarks/bench_torch_ddp.py --hidden 256 --dtype float64 --target-loss 0.15
"""

from __future__ import annotations

import os

THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
os.environ.update(THREAD_ENV)  # before numpy is imported, here and in every child
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on the loopback only

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from dasgd.ml.data import BatchSampler, load_dataset, shard_iid  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_torch_ddp.json"
PLOT = RESULTS.with_suffix(".png")
DATASET = "digits"
TERMINATE_GRACE_S = 5.0


# ---------------------------------------------------------------------------
# the problem, shared by all competitors


def layer_sizes(n_features: int, hidden, n_classes: int) -> list[tuple[int, int]]:
    sizes = (n_features, *hidden, n_classes)
    return list(zip(sizes[:-1], sizes[1:], strict=True))


def unpack(flat: np.ndarray, shapes) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """dasgd's MLP layout: ``[W_1.ravel(), ..., W_L.ravel(), b_1, ..., b_L]``, ``W_l`` (fan_in, fan_out)."""
    Ws, bs, pos = [], [], 0
    for fan_in, fan_out in shapes:
        Ws.append(flat[pos : pos + fan_in * fan_out].reshape(fan_in, fan_out))
        pos += fan_in * fan_out
    for _, fan_out in shapes:
        bs.append(flat[pos : pos + fan_out])
        pos += fan_out
    if pos != flat.size:
        raise ValueError(f"flat vector has {flat.size} entries, the layout {shapes} needs {pos}")
    return Ws, bs


def prepare_problem(args, n: int, work: Path) -> dict:
    """Write what the torch ranks load (shards, test split, x0) and return the in-memory copies."""
    from dasgd.ml.models import build_model

    ds = load_dataset(DATASET, seed=args.seed)
    shards = shard_iid(ds.n_train, n, seed=args.seed)
    model = build_model("mlp", ds.n_features, ds.n_classes, hidden=tuple(args.hidden))
    x0 = model.init_params(seed=args.seed, dtype=np.dtype(args.dtype))
    work.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(shards):
        np.save(work / f"shard-{i}-X.npy", ds.X_train[idx])
        np.save(work / f"shard-{i}-y.npy", ds.y_train[idx])
    np.save(work / "test-X.npy", ds.X_test)
    np.save(work / "test-y.npy", ds.y_test)
    np.save(work / "x0.npy", x0)
    shapes = layer_sizes(ds.n_features, args.hidden, ds.n_classes)
    return {"ds": ds, "shards": shards, "model": model, "x0": x0, "shapes": shapes}


def numpy_reference(problem: dict, args, n: int) -> np.ndarray:
    """Sequential SGD with the mean gradient of the n workers' batches, dasgd's model, in-process."""
    ds, model = problem["ds"], problem["model"]
    dt = np.dtype(args.dtype)
    Xs = [ds.X_train[s].astype(dt) for s in problem["shards"]]
    ys = [ds.y_train[s] for s in problem["shards"]]
    samplers = [
        BatchSampler(len(s), args.batch_size, seed=args.seed + 1 + i)
        for i, s in enumerate(problem["shards"])
    ]
    x = problem["x0"].copy()
    g = np.empty_like(x)
    total = np.empty_like(x)
    for _ in range(args.steps):
        total.fill(0)
        for i in range(n):
            idx = samplers[i].next_batch()
            model.loss_and_grad(x, Xs[i][idx], ys[i][idx], out=g)
            total += g
        total /= n
        x -= dt.type(sync_lr(args, n)) * total
    return x


# ---------------------------------------------------------------------------
# torch side: one DDP rank per process


def _ddp_rank(rank: int, world: int, port: int, work: str, opts: dict) -> None:
    """Body of one torch rank (runs in a spawned child). Rank 0 writes ``torch-result.json``."""
    import datetime as _dt
    import gc

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    work = Path(work)
    np_dtype = np.dtype(opts["dtype"])
    t_dtype = {"float32": torch.float32, "float64": torch.float64}[opts["dtype"]]
    X = np.load(work / f"shard-{rank}-X.npy").astype(np_dtype)
    y = np.load(work / f"shard-{rank}-y.npy")
    x0 = np.load(work / "x0.npy")
    shapes = [tuple(s) for s in opts["shapes"]]
    Ws, bs = unpack(x0, shapes)
    layers: list[nn.Module] = []
    linears = []
    for k, (fan_in, fan_out) in enumerate(shapes):
        lin = nn.Linear(fan_in, fan_out, dtype=t_dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(Ws[k].T)))
            lin.bias.copy_(torch.from_numpy(bs[k].copy()))
        linears.append(lin)
        layers.append(lin)
        if k < len(shapes) - 1:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=_dt.timedelta(seconds=opts["timeout_s"]),
    )
    ddp = optimizer = None
    try:
        ddp = DDP(net)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=opts["lr"])
        loss_fn = nn.CrossEntropyLoss()
        sampler = BatchSampler(len(y), opts["batch_size"], seed=opts["seed"] + 1 + rank)
        if rank == 0:
            Xt = torch.from_numpy(np.load(work / "test-X.npy").astype(np_dtype))
            yt = torch.from_numpy(np.load(work / "test-y.npy"))
        evals: list[dict] = []
        eval_s = 0.0

        def evaluate(step: int, t_train: float) -> None:
            with torch.no_grad():
                logits = net(Xt)
                loss = float(loss_fn(logits, yt))
                acc = float((logits.argmax(1) == yt).double().mean())
            evals.append({"t_s": t_train, "step": step, "test_loss": loss, "test_accuracy": acc})

        dist.barrier()
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        if rank == 0:
            evaluate(0, 0.0)
            eval_s = time.perf_counter() - t0
        last_eval = 0.0
        interval = opts["eval_interval_s"]

        def sgd_step() -> None:
            idx = sampler.next_batch()
            xb = torch.from_numpy(X[idx])
            yb = torch.from_numpy(y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(xb), yb)
            loss.backward()  # DDP all-reduces (averages) the gradients here
            optimizer.step()

        for step in range(1, opts["steps"] + 1):
            sgd_step()
            if rank == 0:
                t = time.perf_counter()
                t_train = t - t0 - eval_s
                if t_train - last_eval >= interval or step == opts["steps"]:
                    evaluate(step, t_train)
                    last_eval = t_train
                    eval_s += time.perf_counter() - t
        train_s = time.perf_counter() - t0 - eval_s
        train_cpu_s = time.process_time() - cpu0
        (work / f"torch-cpu-{rank}.json").write_text(json.dumps({"train_cpu_s": train_cpu_s}))
        if rank == 0:
            flat = np.concatenate(
                [lin.weight.detach().numpy().T.ravel() for lin in linears]
                + [lin.bias.detach().numpy().ravel() for lin in linears]
            ).astype(np_dtype)
            np.save(work / "torch-final.npy", flat)
        # where a step's time goes (after the measured run; the model is saved already)
        k = opts["breakdown_steps"]
        breakdown = {}
        if k > 0:
            t_breakdown = time.perf_counter()
            dist.barrier()
            t = time.perf_counter()
            with ddp.no_sync():  # forward, backward, SGD step: no communication
                for _ in range(k):
                    sgd_step()
            breakdown["local_step_us"] = (time.perf_counter() - t) / k * 1e6
            buf = torch.zeros(sum(q.numel() for q in net.parameters()), dtype=t_dtype)
            dist.barrier()
            t = time.perf_counter()
            for _ in range(k):
                dist.all_reduce(buf)
            breakdown["allreduce_us"] = (time.perf_counter() - t) / k * 1e6
            breakdown["allreduce_floats"] = buf.numel()
            breakdown["duration_s"] = time.perf_counter() - t_breakdown
        if rank == 0:
            result = {
                "train_s": train_s,
                "eval_s": eval_s,
                "steps": opts["steps"],
                "evals": evals,
                "torch_version": torch.__version__,
                "breakdown": breakdown,
            }
            (work / "torch-result.json").write_text(json.dumps(result))
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        # DDP's reducer holds the process group: drop it (and the reference cycles of the
        # module) first, so that destroy_process_group frees the last reference and gloo's
        # threads are joined now, not in C++ destructors while the interpreter shuts down
        ddp = optimizer = None
        gc.collect()
        dist.destroy_process_group()


def _ddp_entry(rank: int, world: int, port: int, work: str, opts: dict) -> None:
    """Run one rank and leave with ``os._exit``: exit code 0 once its files are written, else 1.

    Skipping the interpreter's shutdown is deliberate: torch 2.13's C++ objects (gloo
    worker threads, the rendezvous store) can still be alive in static destructors at
    shutdown, and a joinable ``std::thread`` destroyed there aborts the process
    ("terminate called without an active exception", SIGABRT) after its work is done.
    """
    code = 0
    try:
        _ddp_rank(rank, world, port, work, opts)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def children_cpu_s() -> float:
    """User + system CPU seconds of all reaped children of this process so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_all(procs) -> None:
    """Terminate live children, wait for them against one deadline, kill the rest, reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + TERMINATE_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(TERMINATE_GRACE_S)


def run_torch(problem: dict, args, n: int, work: Path) -> dict:
    """Spawn n DDP ranks, wait for them (with a deadline) and read rank 0's results."""
    for name in (
        "torch-result.json",
        "torch-final.npy",
        *(f"torch-cpu-{r}.json" for r in range(n)),
    ):
        (work / name).unlink(missing_ok=True)
    opts = {
        "dtype": args.dtype,
        "shapes": problem["shapes"],
        "lr": sync_lr(args, n),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "seed": args.seed,
        "eval_interval_s": args.eval_interval_s,
        "timeout_s": args.timeout_s,
        "breakdown_steps": args.breakdown_steps,
    }
    ctx = mp.get_context("spawn")
    port = free_port()
    cpu0 = children_cpu_s()
    t_start = time.perf_counter()
    procs = [
        ctx.Process(target=_ddp_entry, args=(r, n, port, str(work), opts), name=f"ddp-rank-{r}")
        for r in range(n)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout_s
        while any(p.is_alive() for p in procs):
            bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if bad:
                raise RuntimeError(f"torch rank(s) failed (rank, exit code): {bad}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"torch ranks did not finish within {args.timeout_s:.0f} s")
            procs[0].join(0.05)
        bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"torch rank(s) failed (rank, exit code): {bad}")
    finally:
        stop_all(procs)
    cpu_s = children_cpu_s() - cpu0
    result = json.loads((work / "torch-result.json").read_text())
    # the breakdown runs after training: not part of the run's wall time
    wall_s = time.perf_counter() - t_start - result["breakdown"].get("duration_s", 0.0)
    train_cpu_s = sum(
        json.loads((work / f"torch-cpu-{r}.json").read_text())["train_cpu_s"] for r in range(n)
    )
    final = np.load(work / "torch-final.npy")
    evals = result["evals"]
    return {
        "system": "torch-ddp",
        "gradients_per_s": n * args.steps / result["train_s"],
        "train_s": result["train_s"],
        "eval_s": result["eval_s"],
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "train_cpu_s": train_cpu_s,
        "time_to_target_s": first_below(evals, args.target_loss),
        "final_test_loss": evals[-1]["test_loss"],
        "final_test_accuracy": evals[-1]["test_accuracy"],
        "curves": {"0": [[e["t_s"], e["step"], e["test_loss"]] for e in evals]},
        "torch_version": result["torch_version"],
        "breakdown": result["breakdown"],
        "_final": final,
    }


# ---------------------------------------------------------------------------
# dasgd side


def sync_lr(args, n: int) -> float:
    """Step size of the synchronous systems (torch-ddp, ps-sync): lr, or n * lr (linear scaling)."""
    return args.lr * n if args.sync_lr == "linear" else args.lr


def first_below(evals: list[dict], target: float) -> float | None:
    for e in evals:
        if e["test_loss"] is not None and e["test_loss"] <= target:
            return float(e["t_s"])
    return None


def run_dasgd(problem: dict, args, n: int, algorithm: str, topology: str, out_dir: Path) -> dict:
    from dasgd.analysis.metrics import read_events
    from dasgd.config import ModelConfig, RunConfig, TopologyConfig, TrainConfig, TransportConfig
    from dasgd.runtime.launch import run

    config = RunConfig(
        n_nodes=n,
        algorithm=algorithm,
        topology=TopologyConfig(spec=topology, seed=args.seed),
        model=ModelConfig(name="mlp", hidden=tuple(args.hidden), dtype=args.dtype),
        train=TrainConfig(
            optimizer="sgd",
            lr=args.lr if algorithm == "dasgd" else sync_lr(args, n),
            batch_size=args.batch_size,
            steps=args.steps,
            seed=args.seed,
        ),
        transport=TransportConfig(ready_timeout_s=min(60.0, args.timeout_s)),
        out_dir=str(out_dir),
        log_interval_s=args.eval_interval_s,
        eval_interval_s=args.eval_interval_s,
        timeout_s=args.timeout_s,
    )
    cpu0 = children_cpu_s()
    t_start = time.perf_counter()
    run_dir, summary = run(config, progress=False)
    wall_s = time.perf_counter() - t_start
    cpu_s = children_cpu_s() - cpu0
    r = summary["run"]
    if algorithm == "dasgd":
        logs = {str(i): run_dir / f"node-{i}.jsonl" for i in range(n)}
    else:
        logs = {"server": run_dir / "server.jsonl"}
    curves, reached, eval_s = {}, [], 0.0
    for key, path in logs.items():
        evals = read_events(path, "eval")
        curves[key] = [[e["t_s"], e["step"], e["test_loss"]] for e in evals]
        reached.append(first_below(evals, args.target_loss))
        finals = read_events(path, "final")
        eval_s = max(eval_s, finals[-1].get("eval_s", 0.0) if finals else 0.0)
    ttt = None if any(t is None for t in reached) else max(reached)  # every node reached it
    name = "ps-sync" if algorithm == "ps-sync" else f"dasgd-{topology}"
    out = {
        "system": name,
        "gradients_per_s": r["gradients_per_s"],
        "train_s": r["train_s"],
        "eval_s": eval_s,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "launcher_wall_s": r["wall_s"],
        "time_to_target_s": ttt,
        "time_to_target_first_node_s": min((t for t in reached if t is not None), default=None),
        "final_test_loss": r["test_loss_mean"],
        "final_test_accuracy": r["test_accuracy_mean"],
        "curves": curves,
        "run_dir": str(run_dir),
    }
    if algorithm == "dasgd":
        out["average_model_test_loss"] = r["average_model_test_loss"]
        out["average_model_test_accuracy"] = r["average_model_test_accuracy"]
        out["staleness_avg_steps"] = r["staleness_avg_steps"]
        out["train_plus_drain_s"] = max(x["train_s"] + x["drain_s"] for x in summary["nodes"])
        out["consensus_distance_rel"] = summary["checks"]["consensus_distance_rel"]
        for key in ("deltas_sealed", "deltas_applied", "duplicates", "msgs_out", "bytes_out"):
            out[key] = r[key]
        out["exactly_once"] = summary["checks"]["exactly_once"]
        out["_final"] = np.mean([np.load(run_dir / f"node-{i}.npy") for i in range(n)], axis=0)
    else:
        out["_final"] = np.load(run_dir / "server.npy")
    return out


# ---------------------------------------------------------------------------
# reporting


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-300))


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def aggregate(reps: list[dict]) -> dict:
    keys = (
        "gradients_per_s",
        "train_s",
        "eval_s",
        "wall_s",
        "cpu_s",
        "time_to_target_s",
        "final_test_loss",
        "final_test_accuracy",
    )
    agg = {k: median_or_none([r.get(k) for r in reps]) for k in keys}
    agg["target_reached"] = f"{sum(r['time_to_target_s'] is not None for r in reps)}/{len(reps)}"
    return agg


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def print_table(results: dict, args) -> None:
    header = (
        f"{'n':>3} {'system':<16} {'grad/s':>8} {'train_s':>8} {'t->target':>9} "
        f"{'reached':>7} {'test_acc':>8} {'test_loss':>9} {'wall_s':>7} {'cpu_s':>6} "
        f"{'grad/s ratio':>12} {'ttt ratio':>9}"
    )
    print()
    print(
        f"digits, MLP 64-{'-'.join(map(str, args.hidden))}-10 ({args.dtype}), batch {args.batch_size}"
        f"/worker, lr {args.lr} (synchronous systems: {'n * lr' if args.sync_lr == 'linear' else 'lr'}"
        f"), {args.steps} steps/worker, target test loss {args.target_loss}, "
        f"eval every {args.eval_interval_s} s, median of {args.reps} rep(s)"
    )
    print(
        "grad/s and t->target on the training clock (DASGD: until every node reached the "
        "target); wall_s and cpu_s (all processes) of the whole run, start-up included"
    )
    print("ratios are system / torch-ddp (grad/s: >1 = faster; time-to-target: <1 = faster)")
    print(header)
    print("-" * len(header))
    for n, systems in results.items():
        base = systems.get("torch-ddp", {}).get(
            "median", {"gradients_per_s": None, "time_to_target_s": None}
        )
        for name, entry in systems.items():
            m = entry["median"]
            print(
                f"{n:>3} {name:<16} {fmt(m['gradients_per_s'], '.0f'):>8} "
                f"{fmt(m['train_s'], '.2f'):>8} {fmt(m['time_to_target_s'], '.2f'):>9} "
                f"{m['target_reached']:>7} {fmt(m['final_test_accuracy'], '.4f'):>8} "
                f"{fmt(m['final_test_loss'], '.4f'):>9} {fmt(m['wall_s'], '.1f'):>7} "
                f"{fmt(m['cpu_s'], '.1f'):>6} "
                f"{fmt(ratio(m['gradients_per_s'], base['gradients_per_s']), '.2f'):>12} "
                f"{fmt(ratio(m['time_to_target_s'], base['time_to_target_s']), '.2f'):>9}"
            )
        print("-" * len(header))


def plot(results: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (n, systems) in zip(axes[0], results.items(), strict=True):
        for name, entry in systems.items():
            curves = entry["reps"][0]["curves"]
            key = "0" if "0" in curves else next(iter(curves))
            pts = np.array(curves[key], dtype=float)
            ax.plot(pts[:, 0], pts[:, 2], marker=".", label=name)
        ax.axhline(args.target_loss, color="grey", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("test loss (node 0 / server / rank 0)")
        ax.set_title(f"n = {n}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4], help="worker counts n")
    p.add_argument("--hidden", type=int, nargs="+", default=[64], help="MLP hidden layer sizes")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--batch-size", type=int, default=32, help="mini-batch M per worker")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument(
        "--sync-lr",
        choices=("same", "linear"),
        default="same",
        help="step size of torch-ddp and ps-sync: the same lr, or n * lr (the linear scaling "
        "rule; DASGD applies every node's step, so it already moves ~n times further per round)",
    )
    p.add_argument("--steps", type=int, default=1500, help="steps S per worker")
    p.add_argument("--target-loss", type=float, default=0.2, help="test loss to reach")
    p.add_argument("--eval-interval-s", type=float, default=0.05)
    p.add_argument(
        "--topologies", nargs="+", default=["ring", "complete"], help="DASGD graphs to run"
    )
    p.add_argument("--reps", type=int, default=1, help="repetitions (medians are reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--breakdown-steps",
        type=int,
        default=300,
        help="after the run, time this many torch steps without communication and bare "
        "all-reduces of the parameter vector (0: skip)",
    )
    p.add_argument("--timeout-s", type=float, default=300.0, help="deadline of every run")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    p.add_argument("--plot", action="store_true", help=f"also write {PLOT.name} (matplotlib)")
    p.add_argument("--keep-runs", action="store_true", help="keep the run directories in /tmp")
    return p.parse_args(argv)


def main(argv=None) -> int:
    try:
        import torch
    except ImportError as exc:
        print(
            f"torch is not installed ({exc}): pip install -e '.[torch]' (torch>=2.0; CPU build: "
            "pip install torch==2.13.0 first) "
            "to compare against torch.distributed DDP; skipping"
        )
        return 0
    args = parse_args(argv)
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        print("this torch build has no torch.distributed gloo backend; skipping")
        return 0
    t_script = time.perf_counter()
    load0 = os.getloadavg()
    if load0[0] > (os.cpu_count() or 1) / 2:
        print(
            f"warning: 1-min load average {load0[0]:.1f} on {os.cpu_count()} cores: other work is "
            "running, timings will be noisy (the load before each run is recorded)"
        )
    root = Path(tempfile.mkdtemp(prefix="bench-torch-ddp-", dir="/tmp"))
    results: dict = {}
    checks: dict = {}
    failures: list[str] = []
    try:
        for n in args.nodes:
            work = root / f"n{n}" / "torch"
            problem = prepare_problem(args, n, work)
            systems = [("ps-sync", "star")]
            for topo in args.topologies:
                if n <= 2 and topo == "complete" and "ring" in args.topologies:
                    continue  # for n <= 2 the complete graph is the ring
                systems.append(("dasgd", topo))
            runs: dict[str, list[dict]] = {}
            finals: dict[str, np.ndarray] = {}
            for rep in range(args.reps):
                order = [("torch", None), *systems]
                k = rep % len(order)  # rotate so slow phases of the machine hit everyone alike
                for alg, topo in order[k:] + order[:k]:
                    load = os.getloadavg()[0]
                    label = "torch-ddp" if alg == "torch" else f"{alg} on {topo}"
                    try:
                        if alg == "torch":
                            res = run_torch(problem, args, n, work)
                        else:
                            res = run_dasgd(problem, args, n, alg, topo, root / f"n{n}" / "dasgd")
                    except Exception as exc:  # one competitor failing does not stop the others
                        why = " ".join(str(exc).split()) or type(exc).__name__
                        failures.append(f"n={n} rep {rep + 1} {label}: {why}")
                        print(
                            f"n={n} rep {rep + 1}/{args.reps} {label} failed ({why}); "
                            "going on with the others",
                            flush=True,
                        )
                        continue
                    print(
                        f"n={n} rep {rep + 1}/{args.reps} {res['system']:<15} "
                        f"{res['gradients_per_s']:8.0f} grad/s, train {res['train_s']:.2f} s, "
                        f"to target {fmt(res['time_to_target_s'], '.2f')} s, "
                        f"test loss {res['final_test_loss']:.4f}, wall {res['wall_s']:.1f} s, "
                        f"load before {load:.1f}",
                        flush=True,
                    )
                    res["loadavg_1min_before"] = load
                    final = res.pop("_final")
                    finals.setdefault(res["system"], final)  # the first repetition's model
                    runs.setdefault(res["system"], []).append(res)
            ordered = ["torch-ddp", "ps-sync", *[f"dasgd-{t}" for _, t in systems[1:]]]
            results[n] = {
                s: {"median": aggregate(runs[s]), "reps": runs[s]} for s in ordered if s in runs
            }
            if "torch-ddp" not in finals or "ps-sync" not in finals:
                continue  # nothing to compare (the failure was reported above)
            reference = numpy_reference(problem, args, n)
            tf, pf = finals["torch-ddp"], finals["ps-sync"]
            checks[n] = {
                "torch_vs_ps_sync_rel": rel_diff(tf, pf),
                "torch_vs_numpy_reference_rel": rel_diff(tf, reference),
                "ps_sync_vs_numpy_reference_rel": rel_diff(pf, reference),
                "distance_from_x0_rel": rel_diff(pf, problem["x0"]),
                "torch_initial_test_loss": results[n]["torch-ddp"]["reps"][0]["curves"]["0"][0][2],
                "dasgd_initial_test_loss": results[n]["ps-sync"]["reps"][0]["curves"]["server"][0][
                    2
                ],
            }
        print_table(results, args)
        print()
        print(
            "correctness: final parameters after S steps, relative L2 difference "
            "|a - b| / |b| (same data, seeds, x0, lr); both are sequential SGD with batch n * M"
        )
        for n, c in checks.items():
            print(
                f"  n={n}: torch-ddp vs ps-sync server.npy {c['torch_vs_ps_sync_rel']:.2e}; "
                f"vs numpy reference: torch {c['torch_vs_numpy_reference_rel']:.2e}, "
                f"ps-sync {c['ps_sync_vs_numpy_reference_rel']:.2e} "
                f"(models moved {c['distance_from_x0_rel']:.2f} from x0); initial test loss "
                f"torch {c['torch_initial_test_loss']:.6f}, dasgd {c['dasgd_initial_test_loss']:.6f}"
            )
        tol = 1e-3 if args.dtype == "float32" else 1e-9
        agree = bool(checks) and all(c["torch_vs_ps_sync_rel"] < tol for c in checks.values())
        print(
            f"  {'AGREE' if agree else 'DIFFER' if checks else 'NOT COMPARED'} (tolerance "
            f"{tol:g}: float rounding only, the gradient summation order differs)"
        )
        print()
        print("where a synchronous step's time goes (median of the repetitions)")
        for n, systems in results.items():
            if "torch-ddp" not in systems or "ps-sync" not in systems:
                continue
            bds = [r["breakdown"] for r in systems["torch-ddp"]["reps"] if r["breakdown"]]
            per_step = 1e6 * systems["torch-ddp"]["median"]["train_s"] / args.steps
            ps_round = 1e6 * systems["ps-sync"]["median"]["train_s"] / args.steps
            line = f"  n={n}: torch-ddp {per_step:.0f} us/step"
            if bds:
                local = statistics.median(b["local_step_us"] for b in bds)
                allreduce = statistics.median(b["allreduce_us"] for b in bds)
                line += (
                    f" (without communication {local:.0f} us; a bare gloo all-reduce of "
                    f"{bds[0]['allreduce_floats']} floats {allreduce:.0f} us)"
                )
            print(line + f"; dasgd ps-sync {ps_round:.0f} us/round")
        script_s = time.perf_counter() - t_script
        payload = {
            "benchmark": "bench_torch_ddp",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "torch": torch.__version__,
                "numpy": np.__version__,
                "loadavg_at_start": list(load0),
                "loadavg_at_end": list(os.getloadavg()),
            },
            "settings": {
                "dataset": DATASET,
                "model": f"mlp {args.hidden} relu",
                "dtype": args.dtype,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "sync_lr": args.sync_lr,
                "steps": args.steps,
                "target_loss": args.target_loss,
                "eval_interval_s": args.eval_interval_s,
                "reps": args.reps,
                "seed": args.seed,
                "nodes": args.nodes,
                "topologies": args.topologies,
            },
            "results": {str(n): v for n, v in results.items()},
            "ratios_vs_torch": {
                str(n): {
                    s: {
                        "gradients_per_s": ratio(
                            v["median"]["gradients_per_s"],
                            systems_["torch-ddp"]["median"]["gradients_per_s"],
                        ),
                        "time_to_target": ratio(
                            v["median"]["time_to_target_s"],
                            systems_["torch-ddp"]["median"]["time_to_target_s"],
                        ),
                    }
                    for s, v in systems_.items()
                    if s != "torch-ddp"
                }
                for n, systems_ in results.items()
                if "torch-ddp" in systems_
            },
            "failures": failures,
            "correctness": {str(n): c for n, c in checks.items()},
            "correctness_agree": agree,
            "script_s": script_s,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.out} ({script_s:.0f} s in all)")
        if args.plot:
            plot(results, args, PLOT)
            print(f"wrote {PLOT}")
    finally:
        if args.keep_runs:
            print(f"run directories kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if failures:
        print(f"{len(failures)} competitor run(s) failed: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
