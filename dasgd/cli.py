"""The ``dasgd`` command.

Subcommands::

    dasgd run [OPTIONS]        train with one process per node; prints the summary table
    dasgd summary RUN_DIR      print a finished run's table again (--json for the raw summary)
    dasgd report RUN_DIR...    one self-contained HTML file of tables and figures (-o report.html)
    dasgd topology SPEC        nodes, edges, degrees, diameter, spectral gap of a topology
    dasgd node ...             one node process (started by `dasgd run`, not by hand)

:func:`config_from_args` is a pure function from parsed arguments to a
:class:`~dasgd.config.RunConfig`. User mistakes print one line
(``dasgd: error: ...``) and exit with code 2; a failed run exits 1; Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from . import __version__
from .config import (
    ALGORITHMS,
    DELAY_RULES,
    DTYPES,
    SERVER_OPTIMIZERS,
    SHARDINGS,
    TRANSPORTS,
    DataConfig,
    EmulationConfig,
    ModelConfig,
    RunConfig,
    TopologyConfig,
    TrainConfig,
    TransportConfig,
)
from .errors import ConfigError, DasgdError, NodeFailed
from .ml.models import ACTIVATIONS, MODELS
from .ml.optim import OPTIMIZERS

__all__ = ["build_parser", "config_from_args", "main"]

_DEFAULTS = RunConfig()


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, ``dasgd: error: ...``, exit code 2.

    argparse's own message names the flag and, for ``choices=``, every valid value.
    """

    def error(self, message: str):
        self.exit(2, f"dasgd: error: {message} (see `{self.prog} --help`)\n")


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer sizes like 64 or 128,64, got {text!r}"
        ) from None
    return sizes


def _add_run_options(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    g = p.add_argument_group("nodes and topology")
    g.add_argument(
        "-n",
        "--nodes",
        type=int,
        default=None,
        help="number of node processes (default 4; from the file for a graph file)",
    )
    g.add_argument(
        "--topology",
        default=d.topology.spec,
        help="builder spec (ring, torus:2x4, complete, star, hypercube, exponential, random-regular:D, erdos-renyi:P, small-world:K:P, path, grid:RxC) or a graph file (.json node-link, .graphml, .edgelist); see `dasgd topology` (default: %(default)s)",
    )
    g.add_argument(
        "--topology-seed",
        type=int,
        default=d.topology.seed,
        help="seed of random topologies (default: %(default)s)",
    )
    g.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default=d.algorithm,
        help="training algorithm (default: %(default)s)",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=d.data.dataset,
        help="digits, breast_cancer, wine, iris, or a path to an svmlight/LIBSVM or .npz (X, y) file (default: %(default)s)",
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        default=d.data.test_fraction,
        help="held-out test fraction (default: %(default)s)",
    )
    g.add_argument(
        "--no-standardize",
        action="store_true",
        help="keep raw features (default: zero mean, unit variance)",
    )
    g.add_argument(
        "--sharding",
        choices=SHARDINGS,
        default=d.data.sharding,
        help="i.i.d. shards or non-i.i.d. by label (default: %(default)s)",
    )
    g.add_argument(
        "--dirichlet-alpha",
        type=float,
        default=d.data.dirichlet_alpha,
        help="label skew for --sharding label; small = skewed (default: %(default)s)",
    )

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        choices=MODELS,
        default=d.model.name,
        help="model (default: %(default)s)",
    )
    g.add_argument(
        "--hidden",
        type=_hidden,
        default=d.model.hidden,
        help="MLP hidden layer sizes, e.g. 128,64 (default: 64)",
    )
    g.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default=d.model.activation,
        help="MLP activation (default: %(default)s)",
    )
    g.add_argument(
        "--l2", type=float, default=d.model.l2, help="L2 penalty on weights (default: %(default)s)"
    )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default=d.model.dtype,
        help="parameters and deltas (default: %(default)s)",
    )

    g = p.add_argument_group("training")
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.train.optimizer,
        help="local update rule (default: %(default)s)",
    )
    g.add_argument(
        "--lr", type=float, default=d.train.lr, help="step size eta (default: %(default)s)"
    )
    g.add_argument(
        "--momentum",
        type=float,
        default=d.train.momentum,
        help="momentum for --optimizer momentum (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=d.train.batch_size,
        help="mini-batch size M per local step (default: %(default)s)",
    )
    g.add_argument(
        "--steps", type=int, default=None, help="local steps per node (overrides --epochs)"
    )
    g.add_argument(
        "--epochs",
        type=float,
        default=d.train.epochs,
        help="passes over each node's shard (default: %(default)s)",
    )
    g.add_argument(
        "--send-every",
        type=int,
        default=d.train.send_every,
        help="local steps per sent delta, b (default: %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=d.train.seed,
        help="seed of split, shards, x0 and batches (default: %(default)s)",
    )

    g.add_argument(
        "--server-optimizer",
        choices=SERVER_OPTIMIZERS,
        default=d.train.server_optimizer,
        help="parameter-server update rule for ps-async/ps-sync (default: %(default)s)",
    )
    g.add_argument(
        "--delay-rule",
        choices=DELAY_RULES,
        default=d.train.delay_rule,
        help="delay-adaptive step for delays above --delay-concurrency: inverse is lr/tau (default: %(default)s)",
    )
    g.add_argument(
        "--delay-concurrency",
        type=int,
        default=None,
        help="tau_C of the delay rule (default: the number of nodes)",
    )

    g.add_argument(
        "--max-lead-steps",
        type=int,
        default=None,
        help="DASGD, opt-in: pause while more than this many steps ahead of a live neighbour (default: no bound)",
    )

    g = p.add_argument_group("emulated asynchrony")
    g.add_argument(
        "--slowdown",
        default="",
        help="stragglers: NODE:FACTOR,... (e.g. 2:4) or random:SEED[:ALPHA] (heavy-tailed) (default: none)",
    )
    g.add_argument(
        "--latency",
        default="",
        help="one-way link delay in seconds: SECONDS for all links, or [SECONDS,]U-V:SECONDS,... (default: none)",
    )
    g.add_argument(
        "--compute-time",
        default="",
        metavar="SPEC",
        help="emulated seconds per gradient, waited between reading the model and producing the "
        "update (times --slowdown): SECONDS, lognormal:MEDIAN:SIGMA, exponential:MEAN or "
        "uniform:LOW:HIGH (default: none, the real computation only)",
    )

    g = p.add_argument_group("transport")
    g.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default=None,
        help=f"ipc (one machine) or tcp (default: {d.transport.kind}; tcp over several hosts)",
    )
    g.add_argument(
        "--bind-address",
        "--host",
        dest="host",
        default=None,
        help=f"interface tcp inboxes bind (default: {d.transport.host}; over several hosts "
        "0.0.0.0, all interfaces)",
    )
    g.add_argument(
        "--base-port",
        type=int,
        default=d.transport.base_port,
        help="tcp port of node 0, node i uses base+i; 0 = any free ports (default: %(default)s)",
    )
    g.add_argument(
        "--hwm",
        type=int,
        default=d.transport.hwm_msgs,
        help="ZeroMQ high-water mark in messages (default: %(default)s)",
    )
    g.add_argument(
        "--queue-mib",
        type=float,
        default=d.transport.queue_bytes / 2**20,
        help="at most this many MiB of deltas queued per socket; lowers --hwm for large models (default: %(default)s)",
    )
    g.add_argument(
        "--max-backlog",
        type=int,
        default=d.transport.max_backlog_msgs,
        help="stop stepping while more messages wait for neighbours (default: %(default)s)",
    )
    g.add_argument(
        "--send-timeout-s",
        type=float,
        default=d.transport.send_timeout_s,
        help="a neighbour accepting nothing this long is dead (default: %(default)s)",
    )
    g.add_argument(
        "--ready-timeout-s",
        type=float,
        default=d.transport.ready_timeout_s,
        help="deadline for all nodes to be ready (default: %(default)s)",
    )
    g.add_argument(
        "--drain-timeout-s",
        type=float,
        default=d.transport.drain_timeout_s,
        help="give up draining after this long without messages (default: %(default)s)",
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--out-dir", default=d.out_dir, help="parent of run directories (default: %(default)s)"
    )
    g.add_argument("--run-id", default=None, help="run directory name (default: timestamped)")
    g.add_argument(
        "--log-interval-s",
        type=float,
        default=d.log_interval_s,
        help="seconds between interval records (default: %(default)s)",
    )
    g.add_argument(
        "--timeout-s", type=float, default=None, help="deadline of the whole run (default: none)"
    )
    g.add_argument(
        "--on-node-failure",
        choices=("continue", "stop"),
        default=d.on_node_failure,
        help="a node process dies: the others finish without it and the summary names it "
        "(continue), or the run fails naming it (stop); a dead PS server always stops it "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--delta-store-mib",
        type=float,
        default=d.delta_store_mib,
        help="MiB of recent deltas a node keeps to repair a neighbour after a node failure "
        "(0 = none; default: %(default)s)",
    )
    g.add_argument(
        "--eval-interval-s",
        type=float,
        default=d.eval_interval_s,
        help="seconds between test-set evaluations in the logs; 0 = never (default: %(default)s)",
    )
    g.add_argument(
        "--no-events",
        dest="record_events",
        action="store_false",
        help="do not write the per-event binary logs (gradients, delta applications, model "
        "snapshots); summary.json then lacks S2, S3 and the convergence curves",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_host_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "several hosts",
        "run this host's part of a run over several hosts (README: Several machines); "
        "without --nhosts, ranks come from torchrun, srun or mpirun's environment",
    )
    g.add_argument("--nhosts", type=int, default=None, help="hosts in the run (default: 1)")
    g.add_argument("--host-rank", type=int, default=None, help="this host, 0..nhosts-1")
    g.add_argument(
        "--nproc-per-host",
        type=int,
        default=None,
        help="node processes on each host (nodes = nhosts x nproc-per-host)",
    )
    g.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="host 0's rendezvous address, as the other hosts reach it (port default 29400)",
    )
    g.add_argument(
        "--advertise-address",
        default=None,
        help="address other hosts reach this host's nodes at (default: the interface that "
        "reaches the rendezvous)",
    )
    g.add_argument(
        "--curve-keys",
        default=None,
        metavar="DIR",
        help="encrypt and authenticate every link and the rendezvous with the CurveZMQ keys "
        "in DIR (see `dasgd keys`); peers without a listed public key get nothing in",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dasgd`` command."""
    parser = _Parser(prog="dasgd", description="Decentralized asynchronous SGD over ZeroMQ.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="train with one process per node and print the summary")
    _add_run_options(p)
    _add_host_options(p)
    p = sub.add_parser(
        "simulate",
        help="simulate a run in virtual time (same node logic, many nodes) and print the summary",
        description="A discrete-event simulation of every node, link and message of a run, "
        "driving the same node state machines as `dasgd run` with real models and data. "
        "Takes the options of `dasgd run`, plus link bandwidth and a nominal message size.",
    )
    _add_run_options(p)
    g = p.add_argument_group("simulated links")
    g.add_argument(
        "--bandwidth",
        default="",
        metavar="SPEC",
        help="link bandwidth in bits/s, e.g. 10G, 100Mbit, 1e9; each node's uplink is shared by "
        "its messages (default: infinite)",
    )
    g.add_argument(
        "--message-bytes",
        type=int,
        default=None,
        help="nominal payload bytes of every model/delta/gradient message for transfer times, "
        "e.g. 4000000 for a 1M-parameter float32 model (default: the real size)",
    )
    p = sub.add_parser(
        "keys", help="write CurveZMQ key pairs for --curve-keys (one per node, server, launcher)"
    )
    p.add_argument("dir", help="directory for the keys (created)")
    p.add_argument(
        "-n", "--nodes", type=int, required=True, help="nodes (or PS workers) of the run"
    )
    p.add_argument("--force", action="store_true", help="replace keys already in DIR")
    p = sub.add_parser("summary", help="print the table of a finished run")
    p.add_argument("run_dir", help="a run directory (holds summary.json)")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    p = sub.add_parser(
        "report",
        help="write one self-contained HTML report (tables, curves, staleness) of finished runs",
        description="One HTML file with every figure embedded: the runs' configurations and "
        "results, test loss/accuracy of every node against time and gradients, staleness "
        "histograms, over time and per edge, and S2/tau against the number of nodes. Needs "
        "matplotlib: pip install 'dasgd[report]'.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run directories")
    p.add_argument(
        "-o",
        "--output",
        default="report.html",
        help="the HTML file to write (default: %(default)s)",
    )
    p = sub.add_parser(
        "topology", help="describe a topology: nodes, edges, degrees, diameter, spectral gap"
    )
    p.add_argument("spec", help="builder spec or graph file, as for `dasgd run --topology`")
    p.add_argument(
        "-n", "--nodes", type=int, default=None, help="number of nodes for a builder (default 4)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of random builders (default: %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p = sub.add_parser("node", help="one node process (internal: started by `dasgd run`)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--node-id", type=int, required=True)
    p.add_argument("--control", required=True)
    return parser


def _default_nodes(nodes: int | None, spec: str) -> int | None:
    """``-n`` if given; else None when the spec fixes the size (a file, ``torus:2x4``), else 4."""
    from .errors import TopologyError
    from .topology import parse_topology

    if nodes is not None:
        return nodes
    try:
        parse_topology(spec, None)
    except TopologyError:
        return 4
    return None


def _mib_to_bytes(mib: float) -> int:
    if not (math.isfinite(mib) and mib > 0):
        raise ConfigError(f"queue size must be a number of MiB > 0, got {mib!r} (--queue-mib)")
    return max(1, int(mib * 2**20))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Turn parsed ``dasgd run`` arguments into a validated :class:`RunConfig`.

    Raises
    ------
    ConfigError
        Naming the bad value and its flag.
    """
    return RunConfig(
        n_nodes=_default_nodes(args.nodes, args.topology),
        algorithm=args.algorithm,
        topology=TopologyConfig(spec=args.topology, seed=args.topology_seed),
        data=DataConfig(
            dataset=args.dataset,
            test_fraction=args.test_fraction,
            standardize=not args.no_standardize,
            sharding=args.sharding,
            dirichlet_alpha=args.dirichlet_alpha,
        ),
        model=ModelConfig(
            name=args.model,
            hidden=args.hidden,
            activation=args.activation,
            l2=args.l2,
            dtype=args.dtype,
        ),
        train=TrainConfig(
            optimizer=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            batch_size=args.batch_size,
            steps=args.steps,
            epochs=args.epochs,
            send_every=args.send_every,
            server_optimizer=args.server_optimizer,
            delay_rule=args.delay_rule,
            delay_concurrency=args.delay_concurrency,
            max_lead_steps=args.max_lead_steps,
            seed=args.seed,
        ),
        emulation=EmulationConfig(
            slowdown=args.slowdown, latency=args.latency, compute_time=args.compute_time
        ),
        transport=TransportConfig(
            kind=args.transport or TransportConfig.kind,
            host=args.host or TransportConfig.host,
            base_port=args.base_port,
            hwm_msgs=args.hwm,
            queue_bytes=_mib_to_bytes(args.queue_mib),
            max_backlog_msgs=args.max_backlog,
            send_timeout_s=args.send_timeout_s,
            ready_timeout_s=args.ready_timeout_s,
            drain_timeout_s=args.drain_timeout_s,
        ),
        out_dir=args.out_dir,
        run_id=args.run_id,
        log_interval_s=args.log_interval_s,
        eval_interval_s=args.eval_interval_s or None,
        timeout_s=args.timeout_s,
        record_events=args.record_events,
        on_node_failure=args.on_node_failure,
        delta_store_mib=args.delta_store_mib,
    )


def _cmd_run(args) -> int:
    import dataclasses

    from .analysis.metrics import format_summary
    from .ml.models import MODELS
    from .runtime.launch import run
    from .runtime.rendezvous import hosts_from_env

    hosts = hosts_from_env(
        nhosts=args.nhosts,
        host_rank=args.host_rank,
        nproc_per_host=args.nproc_per_host,
        rdzv_endpoint=args.rdzv_endpoint,
    )
    config = config_from_args(args)
    if hosts.multi:  # several hosts: tcp on all interfaces unless told otherwise
        config = config.replace(
            n_nodes=args.nodes,
            transport=dataclasses.replace(
                config.transport,
                kind=args.transport or "tcp",
                host=args.host or "0.0.0.0",
                advertise_host=args.advertise_address,
            ),
        )
    elif args.advertise_address:
        config = config.replace(
            transport=dataclasses.replace(config.transport, advertise_host=args.advertise_address)
        )
    if args.curve_keys:
        config = config.replace(
            transport=dataclasses.replace(config.transport, curve_keys=args.curve_keys)
        )
    if config.model.name not in MODELS:
        raise ConfigError(
            f"unknown model {config.model.name!r}: choose one of {', '.join(MODELS)} (--model)"
        )
    run_dir, summary = run(config, progress=not args.quiet, hosts=hosts)
    print(format_summary(summary))
    print(f"\nrun directory: {run_dir}")
    undrained = [n["node"] for n in summary["nodes"] if n.get("drained") is False]
    if undrained:
        raise NodeFailed(
            f"node(s) {undrained} stopped draining before every delta arrived (--drain-timeout-s); "
            f"the final models differ; logs in {run_dir}"
        )
    return 0


def _cmd_simulate(args) -> int:
    from .analysis.metrics import format_summary
    from .config import SimConfig
    from .core.emulation import parse_bandwidth
    from .ml.models import MODELS
    from .sim import simulate

    config = config_from_args(args)
    if config.model.name not in MODELS:
        raise ConfigError(
            f"unknown model {config.model.name!r}: choose one of {', '.join(MODELS)} (--model)"
        )
    config = config.replace(
        sim=SimConfig(
            bandwidth_bps=parse_bandwidth(args.bandwidth), message_bytes=args.message_bytes
        )
    )
    run_dir, summary = simulate(config, progress=not args.quiet)
    print(format_summary(summary))
    print(
        f"\nsimulated {summary['run']['wall_s']:.3f} virtual seconds in "
        f"{summary['run']['sim_real_s']:.1f} s ({summary['run']['sim_events']} events)"
    )
    print(f"run directory: {run_dir}")
    return 0


def _cmd_summary(args) -> int:
    from .analysis.metrics import format_summary

    path = Path(args.run_dir) / "summary.json"
    if not path.is_file():
        raise ConfigError(
            f"no summary.json in {args.run_dir!r}: give a finished run directory (runs/<run-id>)"
        )
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    try:
        table = format_summary(summary)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a dasgd summary (missing or malformed {exc})") from None
    print(table)
    return 0


def _cmd_report(args) -> int:
    from .analysis.report import write_report

    path, figures, notes = write_report(args.run_dirs, args.output)
    for name, lines in notes.items():
        for line in lines:
            print(f"{name}: {line}")
    print(f"report: {path} ({len(figures)} figures, {len(notes)} runs)")
    return 0


def _cmd_topology(args) -> int:
    from .topology import describe_topology, format_topology, parse_topology

    graph = parse_topology(args.spec, _default_nodes(args.nodes, args.spec), seed=args.seed)
    print(json.dumps(describe_topology(graph), indent=2) if args.json else format_topology(graph))
    return 0


def _cmd_keys(args) -> int:
    from .runtime.security import write_keys

    names = write_keys(args.dir, args.nodes, force=args.force)
    print(
        f"wrote {len(names)} CurveZMQ key pairs to {args.dir}: {names[0]} .. {names[-3]}, "
        f"{names[-2]}, {names[-1]} (NAME.key public, NAME.key_secret secret); give every host "
        "the public keys and its own secret keys, then pass --curve-keys DIR to `dasgd run`"
    )
    return 0


def _cmd_node(args) -> int:
    from .runtime.node import node_main

    return node_main(args.run_dir, args.node_id, args.control)


def main(argv: list[str] | None = None) -> int:
    """Run the ``dasgd`` command; returns its exit code.

    ``--help`` and ``--version`` return 0, a usage error (unknown flag, bad
    value, a value outside a flag's choices) prints one line and returns 2.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the help, the version or the error
        return exc.code if isinstance(exc.code, int) else 2
    command = {
        "run": _cmd_run,
        "simulate": _cmd_simulate,
        "summary": _cmd_summary,
        "report": _cmd_report,
        "topology": _cmd_topology,
        "node": _cmd_node,
        "keys": _cmd_keys,
    }[args.command]
    try:
        return command(args)
    except ConfigError as exc:
        print(f"dasgd: error: {exc}", file=sys.stderr)
        return 2
    except DasgdError as exc:
        print(f"dasgd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dasgd: interrupted; every node process was stopped", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dasgd ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
