"""The ``dasgd`` command.

Subcommands::

    dasgd run [OPTIONS]        train with one process per node; prints the summary table
    dasgd summary RUN_DIR      print a finished run's table again (--json for the raw summary)
    dasgd report RUN_DIR...    one self-contained HTML file of tables and figures (-o report.html)
    dasgd export RUN_DIR       the run's time series and event logs as CSV, Parquet or TensorBoard
    dasgd topology SPEC        nodes, edges, degrees, diameter, spectral gap of a topology
    dasgd node ...             one node process (started by `dasgd run`, not by hand)

:func:`config_from_args` is a pure function from parsed arguments to a
:class:`~dasgd.config.RunConfig`, :func:`args_from_config` its inverse (``dasgd
run --config runs/ID/config.json`` replays a run; flags given override the
file), and :func:`options_namespace` turns the keyword options of
:func:`dasgd.run` (named as the flags) into the same arguments. User mistakes print one line
(``dasgd: error: ...``) and exit with code 2; a failed run exits 1; Ctrl-C 130.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import signal
import sys
import threading
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
from .ml.models import ACTIVATIONS, MODELS, check_model_name
from .ml.optim import OPTIMIZERS

__all__ = [
    "args_from_config",
    "build_parser",
    "config_from_args",
    "load_config",
    "main",
    "options_namespace",
    "run_config_and_hosts",
]

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


_MODEL_CHOICES = (*MODELS, "torch:MODULE:FACTORY")


def _model_name(text: str) -> str:
    try:
        return check_model_name(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(_MODEL_CHOICES)})"
            if not text.startswith("torch:")
            else f"torch model spec must be torch:MODULE:FACTORY, e.g. torch:mymodels:make_cnn, "
            f"got {text!r}"
        ) from None


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
        type=_model_name,
        default=d.model.name,
        metavar="{" + ",".join(_MODEL_CHOICES) + "}",
        help="model; torch:MODULE:FACTORY is a PyTorch module: FACTORY() in the importable "
        "MODULE returns (torch.nn.Module, loss_fn) (default: %(default)s)",
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
        "--partition",
        action="append",
        default=None,
        metavar="SPEC",
        help="cut a link or a host for a while, then restore it (nothing is lost; messages wait, "
        "in order): U-V@START+DURATION (link U-V) or NODE@START+DURATION (every link of NODE), "
        "seconds on the run clock, e.g. 0-1@2+3; repeatable (default: none)",
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
        choices=("continue", "stop", "restart"),
        default=d.on_node_failure,
        help="a node process dies: the others finish without it and the summary names it "
        "(continue), the run fails naming it (stop), or it is started again and takes a "
        "neighbour's model (restart, DASGD); a dead PS server always stops it "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--max-restarts",
        type=int,
        default=d.max_restarts,
        help="restarts per node under --on-node-failure restart; then as continue "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--heartbeat-timeout-s",
        type=float,
        default=d.heartbeat_timeout_s,
        help="a node process silent this long (hung or stopped) is killed and counts as failed; "
        "keep it above the longest step (default: %(default)s)",
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
    g.add_argument(
        "--tensorboard",
        default=None,
        metavar="DIR",
        help="also write TensorBoard scalars of the run under DIR/<run-id> (needs tensorboardX)",
    )
    g.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="start from a run's config.json (replay it); flags given explicitly override it",
    )


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
    g = p.add_argument_group("failure injection")
    g.add_argument(
        "--kill",
        action="append",
        default=None,
        metavar="NODE@T_S",
        help="node NODE's process dies at virtual time T_S seconds, e.g. 3@0.5 (repeatable, one "
        "per node; DASGD nodes and ps-async workers); the others go on as under "
        "--on-node-failure (default: none)",
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
        "export",
        help="write a run's time series and event logs as CSV, Parquet or TensorBoard scalars",
        description="One table per kind of record, every row labelled with its process: "
        "intervals, evals, finals (from node-<i>.jsonl) and, where the run recorded them, "
        "gradients and applies (the binary event logs).",
    )
    p.add_argument("run_dir", help="a run directory (runs/<run-id>)")
    p.add_argument(
        "--format",
        choices=("csv", "parquet", "tensorboard"),
        default="csv",
        help="csv, parquet (needs pyarrow) or tensorboard (needs tensorboardX) (default: %(default)s)",
    )
    p.add_argument(
        "-o",
        "--out",
        default=None,
        metavar="DIR",
        help="output directory (default: RUN_DIR/export; RUN_DIR/tensorboard for tensorboard)",
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


def _partition_spec(value) -> str:
    """``--partition`` (repeated, or one string from the Python API) as one comma-separated spec."""
    if not value:
        return ""
    if isinstance(value, str):
        return value.strip()
    return ",".join(v.strip() for v in value if v.strip())


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
            slowdown=args.slowdown,
            latency=args.latency,
            compute_time=args.compute_time,
            partition=_partition_spec(getattr(args, "partition", None)),
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
        max_restarts=args.max_restarts,
        heartbeat_timeout_s=args.heartbeat_timeout_s,
    )


def args_from_config(config: RunConfig) -> dict:
    """The ``dasgd run``/``simulate`` arguments (argparse dests) that give ``config``.

    The inverse of :func:`config_from_args`:
    ``config_from_args(Namespace(**defaults, **args_from_config(c))) == c`` for
    every config the command line can express (``transport.check_finite`` has
    no flag and is left at its default).

    Parameters
    ----------
    config : RunConfig

    Returns
    -------
    dict
        argparse dest -> value.
    """
    bw = config.sim.bandwidth_bps
    return {
        "nodes": config.n_nodes,
        "algorithm": config.algorithm,
        "topology": config.topology.spec,
        "topology_seed": config.topology.seed,
        "dataset": config.data.dataset,
        "test_fraction": config.data.test_fraction,
        "no_standardize": not config.data.standardize,
        "sharding": config.data.sharding,
        "dirichlet_alpha": config.data.dirichlet_alpha,
        "model": config.model.name,
        "hidden": tuple(config.model.hidden),
        "activation": config.model.activation,
        "l2": config.model.l2,
        "dtype": config.model.dtype,
        "optimizer": config.train.optimizer,
        "lr": config.train.lr,
        "momentum": config.train.momentum,
        "batch_size": config.train.batch_size,
        "steps": config.train.steps,
        "epochs": config.train.epochs,
        "send_every": config.train.send_every,
        "server_optimizer": config.train.server_optimizer,
        "delay_rule": config.train.delay_rule,
        "delay_concurrency": config.train.delay_concurrency,
        "max_lead_steps": config.train.max_lead_steps,
        "seed": config.train.seed,
        "slowdown": config.emulation.slowdown,
        "latency": config.emulation.latency,
        "compute_time": config.emulation.compute_time,
        "partition": [config.emulation.partition] if config.emulation.partition else None,
        "transport": config.transport.kind,
        "host": config.transport.host,
        "advertise_address": config.transport.advertise_host,
        "curve_keys": config.transport.curve_keys,
        "base_port": config.transport.base_port,
        "hwm": config.transport.hwm_msgs,
        "queue_mib": config.transport.queue_bytes / 2**20,
        "max_backlog": config.transport.max_backlog_msgs,
        "send_timeout_s": config.transport.send_timeout_s,
        "ready_timeout_s": config.transport.ready_timeout_s,
        "drain_timeout_s": config.transport.drain_timeout_s,
        "out_dir": config.out_dir,
        "run_id": config.run_id,
        "log_interval_s": config.log_interval_s,
        "timeout_s": config.timeout_s,
        "eval_interval_s": config.eval_interval_s or 0.0,
        "record_events": config.record_events,
        "on_node_failure": config.on_node_failure,
        "delta_store_mib": config.delta_store_mib,
        "max_restarts": config.max_restarts,
        "heartbeat_timeout_s": config.heartbeat_timeout_s,
        "bandwidth": "" if bw is None else repr(float(bw)),
        "message_bytes": config.sim.message_bytes,
        "kill": [f"{node}@{t_s!r}" for node, t_s in config.sim.kills] or None,
    }


def sim_config_from_args(args: argparse.Namespace):
    """The :class:`~dasgd.config.SimConfig` of ``dasgd simulate``'s arguments.

    Raises
    ------
    ConfigError
        A bad ``--bandwidth``, ``--message-bytes`` or ``--kill``.
    """
    from .config import SimConfig
    from .core.emulation import parse_bandwidth

    return SimConfig(
        bandwidth_bps=parse_bandwidth(args.bandwidth),
        message_bytes=args.message_bytes,
        kills=getattr(args, "kill", None) or (),
    )


def load_config(source) -> RunConfig:
    """A :class:`RunConfig` from a run's ``config.json``, a run directory, a dict or a RunConfig.

    Raises
    ------
    ConfigError
        A missing or unreadable file, or one that is not a dasgd configuration.
    """
    from .config import run_config_from_dict

    if isinstance(source, RunConfig):
        return source
    if isinstance(source, dict):
        return run_config_from_dict(source)
    if not isinstance(source, str | os.PathLike):
        raise ConfigError(
            f"config must be a RunConfig, a dict or the path of a config.json, got "
            f"{type(source).__name__} (--config)"
        )
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(path)!r} not found: give a run's config.json (--config)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc} (--config)") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{str(path)!r} is not a dasgd config.json (--config)")
    try:
        return run_config_from_dict(values)
    except TypeError as exc:
        raise ConfigError(f"{str(path)!r} is not a dasgd config.json ({exc}) (--config)") from None


def _run_subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _merge(base: dict, given: dict, keep_run_id: bool) -> dict:
    """``base`` (from a config) with ``given`` (explicit flags or options) on top."""
    merged = dict(base)
    if not keep_run_id:
        merged["run_id"] = None  # the old run's directory exists: a replay makes a new one
    merged.update(given)
    if "topology" in given and "nodes" not in given:
        merged["nodes"] = None  # sized by the new topology, as on a fresh command line
    return merged


def _replay(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> argparse.Namespace:
    """``args`` with the values of ``--config`` wherever no flag was given explicitly."""
    sub = _run_subparser(parser, args.command)
    saved = [(a, a.default) for a in sub._actions]
    try:  # parse again with every default suppressed: what remains was given
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given = vars(parser.parse_args(argv))
    finally:
        for action, default in saved:
            action.default = default
    given.pop("command", None)
    given.pop("config", None)
    base = args_from_config(load_config(args.config))
    merged = _merge(vars(args) | base, given, keep_run_id=False)
    return argparse.Namespace(**merged)


def options_namespace(command: str, config=None, options: dict | None = None) -> argparse.Namespace:
    """Parsed-argument equivalent of ``dasgd COMMAND`` with a config and keyword options.

    Parameters
    ----------
    command : {"run", "simulate"}
    config : RunConfig, dict or path-like, optional
        Starting point: a :class:`RunConfig`, its dict, or a run's
        ``config.json`` / run directory (then its ``run_id`` is dropped: a new
        run directory is made). Default: the command's defaults.
    options : dict, optional
        Named as the command's long flags with ``_`` for ``-`` (``nodes``,
        ``topology``, ``lr``, ``send_every``, ``no_events``, ``quiet``...);
        values as Python objects (``hidden=(128, 64)``, ``no_events=True``) or
        as the strings the command line takes (``hidden="128,64"``).

    Returns
    -------
    argparse.Namespace
        For :func:`config_from_args`.

    Raises
    ------
    ConfigError
        An unknown option (the message lists the valid ones), a value outside
        an option's choices, or one its flag's parser rejects.
    """
    parser = build_parser()
    sub = _run_subparser(parser, command)
    args = vars(parser.parse_args([command]))
    if config is not None:
        keep = isinstance(config, RunConfig | dict)
        args = _merge(args | args_from_config(load_config(config)), {}, keep_run_id=keep)
    by_name: dict[str, argparse.Action] = {}
    for action in sub._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--config"):
                by_name[flag[2:].replace("-", "_")] = action
    given = {}
    for name, value in (options or {}).items():
        action = by_name.get(name)
        if action is None:
            raise ConfigError(
                f"unknown option {name!r}: valid options are {', '.join(sorted(by_name))}"
            )
        flag = "--" + name.replace("_", "-")
        if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r} ({flag})")
            value = action.const if value else not action.const
        elif isinstance(value, str) and action.type not in (None, str):
            try:
                value = action.type(value)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise ConfigError(f"{name}={value!r} is invalid: {exc} ({flag})") from None
        elif name == "hidden" and isinstance(value, int) and not isinstance(value, bool):
            value = (value,)
        elif name == "hidden" and isinstance(value, list):
            value = tuple(value)
        elif name == "model" and value is not None and not isinstance(value, str):
            value = _factory_spec(value)  # a factory function: its torch:MODULE:FACTORY
        if action.choices is not None and value not in action.choices:
            raise ConfigError(
                f"unknown {name} {value!r}: choose one of {', '.join(map(str, action.choices))} ({flag})"
            )
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        given[action.dest] = value
    return argparse.Namespace(**_merge(args, given, keep_run_id=True))


def _factory_spec(factory) -> str:
    try:
        from .ml.torch_model import spec_of
    except ImportError as exc:
        raise ConfigError(
            f"a model factory needs PyTorch, which cannot be imported ({exc}): "
            "pip install 'dasgd[torch]'"
        ) from None
    return spec_of(factory)


def run_config_and_hosts(args: argparse.Namespace, environ=None):
    """The :class:`RunConfig` and this launcher's hosts (``dasgd run``'s several-host options).

    ``environ`` (default :data:`os.environ`) is where scheduler ranks are
    read from when ``--nhosts`` is not given; the Python API passes ``{}``.

    :func:`config_from_args`, then, for a run over several hosts (``--nhosts``
    or a torchrun/SLURM/Open MPI environment: see
    :func:`dasgd.runtime.rendezvous.hosts_from_env`), tcp on all interfaces
    unless told otherwise, and ``--advertise-address``, ``--curve-keys``.

    Returns
    -------
    config : RunConfig
    hosts : dasgd.runtime.rendezvous.HostSpec
    """
    import dataclasses

    from .runtime.rendezvous import hosts_from_env

    hosts = hosts_from_env(
        environ,
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
    return config, hosts


def _cmd_run(args) -> int:
    from .analysis.metrics import format_summary
    from .runtime.launch import run

    config, hosts = run_config_and_hosts(args)
    check_model_name(config.model.name)
    _check_tensorboard(args)
    run_dir, summary = run(config, progress=not args.quiet, hosts=hosts)
    print(format_summary(summary))
    print(f"\nrun directory: {run_dir}")
    _write_tensorboard(args, run_dir)
    undrained = [n["node"] for n in summary["nodes"] if n.get("drained") is False]
    if undrained:
        raise NodeFailed(
            f"node(s) {undrained} stopped draining before every delta arrived (--drain-timeout-s); "
            f"the final models differ; logs in {run_dir}"
        )
    return 0


def _cmd_simulate(args) -> int:
    from .analysis.metrics import format_summary
    from .sim import simulate

    config = config_from_args(args)
    check_model_name(config.model.name)
    _check_tensorboard(args)
    config = config.replace(sim=sim_config_from_args(args))
    run_dir, summary = simulate(config, progress=not args.quiet)
    print(format_summary(summary))
    print(
        f"\nsimulated {summary['run']['wall_s']:.3f} virtual seconds in "
        f"{summary['run']['sim_real_s']:.1f} s ({summary['run']['sim_events']} events)"
    )
    print(f"run directory: {run_dir}")
    _write_tensorboard(args, run_dir)
    undrained = [n["node"] for n in summary["nodes"] if n.get("drained") is False]
    if undrained:  # only after a failure: the anti-entropy could not repair (--delta-store-mib)
        raise NodeFailed(
            f"node(s) {undrained} stopped draining before every delta arrived (--drain-timeout-s); "
            f"the final models differ; logs in {run_dir}"
        )
    return 0


def _check_tensorboard(args) -> None:
    if getattr(args, "tensorboard", None):
        from .analysis.export import check_tensorboard

        check_tensorboard()  # before the run, not after it


def _write_tensorboard(args, run_dir) -> None:
    if getattr(args, "tensorboard", None):
        from .analysis.export import write_tensorboard

        print(f"tensorboard: {write_tensorboard(run_dir, args.tensorboard)}")


def _cmd_export(args) -> int:
    from .analysis.export import export_run

    for path in export_run(args.run_dir, args.format, args.out):
        print(path)
    return 0


def _cmd_summary(args) -> int:
    from .analysis.metrics import format_summary
    from .rundir import read_summary

    path = Path(args.run_dir) / "summary.json"
    summary = read_summary(args.run_dir)
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
    ``kill -USR1 PID`` makes a running ``dasgd`` print every thread's stack to
    stderr (:mod:`faulthandler`), to see where a launcher or node waits.
    """
    if argv is None and threading.current_thread() is threading.main_thread():
        try:  # the command line only (not main([...]) from Python, where stderr may be no file)
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
        except (OSError, ValueError, AttributeError):
            pass
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the help, the version or the error
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "config", None):
        try:
            args = _replay(parser, args, sys.argv[1:] if argv is None else argv)
        except ConfigError as exc:
            print(f"dasgd: error: {exc}", file=sys.stderr)
            return 2
    command = {
        "run": _cmd_run,
        "simulate": _cmd_simulate,
        "summary": _cmd_summary,
        "report": _cmd_report,
        "export": _cmd_export,
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
