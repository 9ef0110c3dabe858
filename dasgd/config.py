"""Frozen, validated configuration of a run, (de)serialized to JSON for node processes.

A :class:`RunConfig` groups :class:`TopologyConfig`, :class:`DataConfig`,
:class:`ModelConfig`, :class:`TrainConfig` and :class:`TransportConfig`. Each
dataclass validates its values once in ``__post_init__`` and raises
:class:`~dasgd.errors.ConfigError` naming the bad value, the valid range and
the command-line flag that sets it. ``run_config_from_dict(cfg.to_dict())``
round-trips exactly; the launcher writes ``config.json`` in the run directory
and every node reads it back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .core.emulation import parse_compute_time, parse_latency, parse_partition, parse_slowdown
from .errors import ConfigError

__all__ = [
    "ALGORITHMS",
    "EmulationConfig",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "SimConfig",
    "TopologyConfig",
    "TrainConfig",
    "TransportConfig",
    "run_config_from_dict",
]

ALGORITHMS = ("dasgd", "ps-async", "ps-sync")
#: What a run does when a node process dies (``--on-node-failure``).
FAILURE_POLICIES = ("continue", "stop", "restart")
SERVER_OPTIMIZERS = ("sgd", "amsgrad")
DELAY_RULES = ("none", "inverse", "drop")
TRANSPORTS = ("ipc", "tcp")
DTYPES = ("float32", "float64")
SHARDINGS = ("iid", "label")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(
    value, name: str, flag: str, *, integer: bool = False, allow_zero: bool = False
) -> None:
    kind = int if integer else (int, float)
    good = isinstance(value, kind) and not isinstance(value, bool)
    if good and not integer:
        good = math.isfinite(value)
    if good:
        good = value >= 0 if allow_zero else value > 0
    what = "an integer" if integer else "a number"
    bound = ">= 0" if allow_zero else "> 0"
    _check(good, f"{name} must be {what} {bound}, got {value!r} ({flag})")


def _choice(value, choices, name: str, flag: str) -> None:
    _check(
        value in choices, f"unknown {name} {value!r}: choose one of {', '.join(choices)} ({flag})"
    )


@dataclass(frozen=True)
class TopologyConfig:
    """Which graph connects the nodes.

    Attributes
    ----------
    spec : str
        A builder spec (``ring``, ``torus:2x4``, ``random-regular:3`` ...) or a
        graph file; see :func:`dasgd.topology.parse_topology`.
    seed : int
        Seed of random builders.
    """

    spec: str = "ring"
    seed: int = 0

    def __post_init__(self) -> None:
        _check(
            isinstance(self.spec, str) and self.spec.strip() != "",
            f"topology must be a non-empty string, got {self.spec!r} (--topology)",
        )


@dataclass(frozen=True)
class DataConfig:
    """Dataset, split and sharding.

    Attributes
    ----------
    dataset : str
        ``digits``, ``breast_cancer``, ``wine``, ``iris``, or a path to an
        svmlight/LIBSVM or ``.npz`` file.
    test_fraction : float
        Fraction of samples held out for testing, in (0, 1).
    standardize : bool
        Scale features to zero mean and unit variance (fit on the training split).
    sharding : {"iid", "label"}
        I.i.d. shards, or non-i.i.d. shards by label with Dirichlet(alpha).
    dirichlet_alpha : float
        Concentration for ``sharding="label"``; small = skewed.
    """

    dataset: str = "digits"
    test_fraction: float = 0.2
    standardize: bool = True
    sharding: str = "iid"
    dirichlet_alpha: float = 0.5

    def __post_init__(self) -> None:
        _check(
            isinstance(self.dataset, str) and self.dataset != "",
            f"dataset must be a name or path, got {self.dataset!r} (--dataset)",
        )
        tf = self.test_fraction
        _check(
            isinstance(tf, int | float) and 0 < tf < 1,
            f"test fraction must be in (0, 1), got {tf!r} (--test-fraction)",
        )
        _choice(self.sharding, SHARDINGS, "sharding", "--sharding")
        _positive(self.dirichlet_alpha, "Dirichlet alpha", "--dirichlet-alpha")


@dataclass(frozen=True)
class ModelConfig:
    """The model trained on every node.

    Attributes
    ----------
    name : str
        ``softmax``, ``logistic``, ``least_squares`` or ``mlp``.
    hidden : tuple of int
        Hidden layer sizes of the MLP.
    activation : {"relu", "tanh"}
        MLP activation.
    l2 : float
        L2 penalty on weights (>= 0).
    dtype : {"float32", "float64"}
        Dtype of parameters, gradients and deltas.
    """

    name: str = "softmax"
    hidden: tuple[int, ...] = (64,)
    activation: str = "relu"
    l2: float = 0.0
    dtype: str = "float64"

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(self.hidden))
        _check(
            len(self.hidden) > 0 and all(isinstance(h, int) and h > 0 for h in self.hidden),
            f"hidden layer sizes must be positive integers, got {list(self.hidden)} (--hidden)",
        )
        _positive(self.l2, "l2", "--l2", allow_zero=True)
        _choice(self.dtype, DTYPES, "dtype", "--dtype")
        _choice(self.activation, ("relu", "tanh"), "activation", "--activation")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each node.

    Attributes
    ----------
    optimizer : {"sgd", "momentum", "amsgrad"}
        Local update rule; its parameter change is what goes into the delta.
    lr : float
        Step size eta (> 0).
    momentum : float
        Momentum coefficient for ``optimizer="momentum"``, in [0, 1).
    batch_size : int
        Mini-batch size M per local step.
    steps : int or None
        Local steps per node; if None, derived from ``epochs``.
    epochs : float
        Passes over each node's shard (used when ``steps`` is None).
    send_every : int
        Local steps per sent delta (b); ALGORITHMS.md §1.
    server_optimizer : {"sgd", "amsgrad"}
        Update rule of the parameter server (ps-async, ps-sync): SGD, or
        AMSGrad as in APAM (Xu et al., arXiv 2002.09095, Algorithm 1).
    delay_rule : {"none", "inverse", "drop"}
        Delay-adaptive step size (Koloskova et al. 2022, Eq. (11)): for a delay
        tau above ``delay_concurrency``, step lr/tau ("inverse") or drop ("drop").
        ps-async applies it to gradients by their delay tau; DASGD scales a
        received delta by its apply staleness (an extension the papers do not
        analyse; nodes' models then differ).
    delay_concurrency : int or None
        tau_C of the rule; None = the number of nodes (workers).
    max_lead_steps : int or None
        DASGD only, opt-in: a node pauses (still receiving) while it is more
        than this many steps ahead of a neighbour that has not finished
        (stale-synchronous-style bound; must be >= ``send_every``). None: no
        bound, the algorithm of the paper.
    seed : int
        Seed of the split, shards, initial model (the same x_0 on every node)
        and mini-batch sampling (node i uses ``seed + 1 + i``).
    """

    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 32
    steps: int | None = None
    epochs: float = 20.0
    send_every: int = 1
    server_optimizer: str = "sgd"
    delay_rule: str = "none"
    delay_concurrency: int | None = None
    max_lead_steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _choice(self.optimizer, ("sgd", "momentum", "amsgrad"), "optimizer", "--optimizer")
        _positive(self.lr, "learning rate", "--lr")
        _check(
            isinstance(self.momentum, int | float) and 0 <= self.momentum < 1,
            f"momentum must be in [0, 1), got {self.momentum!r} (--momentum)",
        )
        _positive(self.batch_size, "batch size", "--batch-size", integer=True)
        if self.steps is not None:
            _positive(self.steps, "steps", "--steps", integer=True)
        _positive(self.epochs, "epochs", "--epochs")
        _positive(self.send_every, "send interval", "--send-every", integer=True)
        _choice(self.server_optimizer, SERVER_OPTIMIZERS, "server optimizer", "--server-optimizer")
        _choice(self.delay_rule, DELAY_RULES, "delay rule", "--delay-rule")
        if self.delay_concurrency is not None:
            _positive(
                self.delay_concurrency, "delay concurrency", "--delay-concurrency", integer=True
            )
        if self.max_lead_steps is not None:
            _positive(self.max_lead_steps, "max lead", "--max-lead-steps", integer=True)
            _check(
                self.max_lead_steps >= self.send_every,
                f"max lead {self.max_lead_steps} must be >= the send interval {self.send_every} (--max-lead-steps)",
            )
        _check(
            isinstance(self.seed, int) and self.seed >= 0,
            f"seed must be an integer >= 0, got {self.seed!r} (--seed)",
        )


@dataclass(frozen=True)
class TransportConfig:
    """Sockets, deadlines and message limits.

    Attributes
    ----------
    kind : {"ipc", "tcp"}
        ``ipc`` (Unix sockets, one machine) or ``tcp``.
    host : str
        Interface the tcp inboxes bind (``--bind-address``; ``0.0.0.0``: all).
    advertise_host : str or None
        Address other nodes reach this host's inboxes at (a run over several
        hosts sets it: ``--advertise-address``, default the interface that
        reaches the rendezvous); None: the bound address.
    curve_keys : str or None
        Directory of CurveZMQ keys (``dasgd keys``): encrypt and authenticate
        every socket between nodes and between launchers; None: plain.
    base_port : int
        Node i binds ``base_port + i``; 0 lets the OS choose free ports.
    hwm_msgs : int
        ZeroMQ high-water mark per socket, in messages; nodes lower it so that
        one link never queues more than ``queue_bytes`` of deltas.
    queue_bytes : int
        Bound on the delta bytes one socket queues (see ``hwm_msgs``).
    max_backlog_msgs : int
        A node stops taking local steps while more messages than this wait for
        its neighbours (backpressure); it keeps receiving.
    send_timeout_s : float
        A neighbour that accepts nothing for this long is declared dead.
    ready_timeout_s : float
        Deadline for all nodes to bind and report ready.
    drain_timeout_s : float
        At the end, a node gives up draining after this long without any message.
    check_finite : bool
        Reject received deltas that contain NaN or inf.
    """

    kind: str = "ipc"
    host: str = "127.0.0.1"
    advertise_host: str | None = None
    curve_keys: str | None = None
    base_port: int = 0
    hwm_msgs: int = 100
    queue_bytes: int = 64 << 20
    max_backlog_msgs: int = 32
    send_timeout_s: float = 60.0
    ready_timeout_s: float = 60.0
    drain_timeout_s: float = 60.0
    check_finite: bool = True

    def __post_init__(self) -> None:
        _choice(self.kind, TRANSPORTS, "transport", "--transport")
        _check(
            isinstance(self.base_port, int)
            and (self.base_port == 0 or 1024 <= self.base_port <= 65535),
            f"base port must be 0 (any free port) or in 1024..65535, got {self.base_port!r} (--base-port)",
        )
        _positive(self.hwm_msgs, "high-water mark", "--hwm", integer=True)
        _positive(self.queue_bytes, "queue bytes", "--queue-mib", integer=True)
        _positive(self.max_backlog_msgs, "max backlog", "--max-backlog", integer=True)
        for name in ("send_timeout_s", "ready_timeout_s", "drain_timeout_s"):
            _positive(getattr(self, name), name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class EmulationConfig:
    """Emulated stragglers and link latency (see :mod:`dasgd.core.emulation`).

    Attributes
    ----------
    slowdown : str
        ``""``, ``"NODE:FACTOR,..."`` (e.g. ``"2:4"``) or ``"random:SEED[:ALPHA]"``.
    latency : str
        ``""``, ``"SECONDS"`` or ``"[SECONDS,]U-V:SECONDS,..."`` one-way per link.
    compute_time : str
        Emulated seconds per gradient, waited between reading the model and
        producing the update (times each node's slowdown factor): ``""``
        (none), ``"SECONDS"``, ``"lognormal:MEDIAN:SIGMA"``,
        ``"exponential:MEAN"`` or ``"uniform:LOW:HIGH"``.
    partition : str
        Emulated cuts on the run clock: ``""`` (none) or comma-separated
        ``"U-V@START+DURATION"`` (a link) and ``"NODE@START+DURATION"`` (every
        link of a node), in seconds.
    """

    slowdown: str = ""
    latency: str = ""
    compute_time: str = ""
    partition: str = ""

    def __post_init__(self) -> None:
        parse_slowdown(self.slowdown)
        parse_latency(self.latency)
        parse_compute_time(self.compute_time)
        parse_partition(self.partition)


def parse_kill(spec) -> tuple[int, float]:
    """One ``--kill`` value: ``"NODE@T_S"`` (e.g. ``"3@0.5"``) or a pair ``(node, t_s)``.

    Returns
    -------
    node : int
    t_s : float
        Virtual seconds since the run started, >= 0.

    Raises
    ------
    ConfigError
        Naming the bad value and the expected form.
    """
    form = "expected NODE@SECONDS with a node id >= 0 and a time >= 0 s, e.g. 3@0.5 (--kill)"
    if isinstance(spec, str):
        node_text, sep, t_text = spec.strip().partition("@")
        if not sep:
            raise ConfigError(f"kill {spec!r}: {form}")
        try:
            node, t_s = int(node_text), float(t_text)
        except ValueError:
            raise ConfigError(f"kill {spec!r}: {form}") from None
    elif isinstance(spec, list | tuple) and len(spec) == 2:
        node, t_s = spec
        if isinstance(node, bool) or not isinstance(node, int) or isinstance(t_s, bool):
            raise ConfigError(f"kill {spec!r}: {form}")
        if not isinstance(t_s, int | float):
            raise ConfigError(f"kill {spec!r}: {form}")
        t_s = float(t_s)
    else:
        raise ConfigError(f"kill {spec!r}: {form}")
    if node < 0 or not (math.isfinite(t_s) and t_s >= 0):
        raise ConfigError(f"kill {spec!r}: {form}")
    return node, t_s


def parse_kills(specs) -> tuple[tuple[int, float], ...]:
    """Every ``--kill`` value (see :func:`parse_kill`), sorted by time then node.

    Raises
    ------
    ConfigError
        A bad value, or a node killed twice (naming it).
    """
    if isinstance(specs, str):
        specs = [specs]
    if specs is None:
        return ()
    kills = [parse_kill(spec) for spec in specs]
    seen: dict[int, float] = {}
    for node, t_s in kills:
        if node in seen:
            raise ConfigError(
                f"node {node} is killed twice (at {seen[node]:g} s and {t_s:g} s): "
                "give each node at most one --kill"
            )
        seen[node] = t_s
    return tuple(sorted(kills, key=lambda k: (k[1], k[0])))


@dataclass(frozen=True)
class SimConfig:
    """What only ``dasgd simulate`` models (a real run has real links).

    Attributes
    ----------
    bandwidth_bps : float or None
        Link bandwidth in bits per second; each host's uplink serializes its
        outgoing messages one after the other (the parameter server's uplink
        is the one that saturates first). None: infinite.
    message_bytes : int or None
        Nominal payload size of every array message, in bytes, for transfer
        times (e.g. a 1M-parameter model's 4 MB while the math runs on a small
        model). None: the real payload size.
    kills : tuple of (int, float)
        Failure injection (``--kill NODE@T_S``): ``(node, t_s)`` pairs, node
        ``node``'s process dying at virtual time ``t_s`` seconds (see
        :mod:`dasgd.sim.simulator`). Given as such pairs or as ``"NODE@T_S"``
        strings; stored as pairs sorted by time, then node. At most one per
        node; ``t_s >= 0``. Which nodes are valid is checked against the run
        (:func:`dasgd.sim.simulator.check_kills`).
    """

    bandwidth_bps: float | None = None
    message_bytes: int | None = None
    kills: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kills", parse_kills(self.kills))
        if self.bandwidth_bps is not None:
            _positive(self.bandwidth_bps, "bandwidth", "--bandwidth")
        if self.message_bytes is not None:
            _positive(self.message_bytes, "message bytes", "--message-bytes", integer=True)
            _check(
                self.message_bytes <= 1 << 40,
                f"message bytes must be at most 1 TiB ({1 << 40}), got {self.message_bytes!r} "
                "(--message-bytes)",
            )


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run.

    Attributes
    ----------
    n_nodes : int or None
        Number of nodes; None takes it from a topology file.
    algorithm : {"dasgd", "ps-async", "ps-sync"}
        Decentralized ASGD, or the centralized baselines: asynchronous SGD with
        a parameter server (Koloskova et al. 2022, Algorithm 1) and synchronous
        mini-batch SGD; for those ``n_nodes`` is the number of workers.
    out_dir : str
        Parent directory of run directories.
    run_id : str or None
        Name of the run directory; None makes a timestamped one.
    log_interval_s : float
        Seconds between interval records in the node logs (and progress updates).
    eval_interval_s : float or None
        Seconds between evaluations of a node's model on the test split (logged
        as ``eval`` records, for loss-against-time curves); None: never.
    timeout_s : float or None
        Deadline of the whole run; None for none.
    record_events : bool
        Write the per-event binary logs (every gradient and delta application,
        model snapshots at evaluations: :mod:`dasgd.analysis.events`) that the
        virtual-sequence and pairwise staleness and the convergence curves of
        ``analysis.json`` need. False keeps only the JSONL logs.
    on_node_failure : {"continue", "stop", "restart"}
        When a node process dies: ``continue`` tells the survivors, which
        finish their steps without it (DASGD nodes, and ps-async workers); the
        run exits 0 and the summary names it. ``stop`` ends the run at once
        with :class:`~dasgd.errors.NodeFailed` naming the node. ``restart``
        (DASGD) starts the node's process again, which takes a live
        neighbour's model and version vector and continues its remaining
        steps; after ``max_restarts`` restarts of one node, or for a node that
        had finished its steps, it acts as ``continue`` (ps-async: as
        ``continue``). A dead parameter server, a dead ps-sync worker and a
        failure before every node is ready always stop it. Over several
        hosts the same holds, and a host that goes silent counts as the
        death of all its nodes.
    max_restarts : int
        Restarts allowed per node under ``restart`` (``--max-restarts``).
    heartbeat_timeout_s : float
        A running node process that sends its launcher nothing for this long
        (hung, stopped, or its machine frozen) is killed and counts as failed
        (``--heartbeat-timeout-s``); nodes send a heartbeat every
        :data:`~dasgd.runtime.control.HEARTBEAT_S` seconds between steps and
        during an emulated gradient, so it must exceed the longest real
        gradient or evaluation.
    delta_store_mib : float
        MiB of recent deltas each DASGD node keeps (oldest evicted first) to
        send to a neighbour that lacks them after a node failure
        (anti-entropy); 0 keeps none.
    """

    n_nodes: int | None = 4
    algorithm: str = "dasgd"
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    emulation: EmulationConfig = field(default_factory=EmulationConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    out_dir: str = "runs"
    run_id: str | None = None
    log_interval_s: float = 0.25
    eval_interval_s: float | None = 1.0
    timeout_s: float | None = None
    record_events: bool = True
    on_node_failure: str = "continue"
    delta_store_mib: float = 16.0
    max_restarts: int = 3
    heartbeat_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.n_nodes is not None:
            _positive(self.n_nodes, "number of nodes", "-n/--nodes", integer=True)
        _choice(self.algorithm, ALGORITHMS, "algorithm", "--algorithm")
        _choice(self.on_node_failure, FAILURE_POLICIES, "failure policy", "--on-node-failure")
        if not (
            isinstance(self.delta_store_mib, int | float) and 0 <= self.delta_store_mib < 2**20
        ):
            raise ConfigError(
                f"--delta-store-mib must be between 0 and 2**20 MiB, got {self.delta_store_mib!r}"
            )
        _positive(
            self.max_restarts, "max restarts", "--max-restarts", integer=True, allow_zero=True
        )
        _positive(self.heartbeat_timeout_s, "heartbeat timeout", "--heartbeat-timeout-s")
        _positive(self.log_interval_s, "log interval", "--log-interval-s")
        if self.eval_interval_s is not None:
            _positive(self.eval_interval_s, "eval interval", "--eval-interval-s")
        if self.timeout_s is not None:
            _positive(self.timeout_s, "timeout", "--timeout-s")

    def replace(self, **changes) -> RunConfig:
        """A copy with top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return dataclasses.asdict(self)


_SECTIONS = {
    "topology": TopologyConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "transport": TransportConfig,
    "emulation": EmulationConfig,
    "sim": SimConfig,
}


def _from_dict(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    _check(
        not unknown,
        f"unknown {where} field(s) {', '.join(unknown)}: valid are {', '.join(sorted(names))}",
    )
    return cls(**values)


def run_config_from_dict(values: dict) -> RunConfig:
    """Inverse of :meth:`RunConfig.to_dict`.

    Raises
    ------
    ConfigError
        On unknown fields or invalid values.
    """
    values = dict(values)
    for key, cls in _SECTIONS.items():
        if key in values:
            values[key] = _from_dict(cls, values[key], key)
    return _from_dict(RunConfig, values, "run config")
