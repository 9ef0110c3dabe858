"""Runs over several hosts: who runs which nodes, and the rendezvous of their launchers.

A run over H hosts has one ``dasgd run`` launcher per host (started by hand, by
ssh, or one per task by ``torchrun``, ``srun`` or ``mpirun``). Host K runs
nodes ``K * P .. K * P + P - 1`` (P = ``--nproc-per-host``; host 0 also runs
the parameter server of a ``ps-*`` run). Each host prepares its own run
directory from the same configuration (the dataset is loaded on every host,
the shards come from the global seed), spawns its nodes and collects their
inbox addresses; then the launchers meet at the **rendezvous**: host 0 binds
``--rdzv-endpoint`` and every launcher (host 0's too) connects to it. This is
bootstrap and bookkeeping only, never training traffic.

Messages (one msgpack map each, never pickled; a ``result`` carries files as
extra raw frames):

============  ===============  =====================================================
kind          direction        fields
============  ===============  =====================================================
``join``      host -> rank 0   ``host_rank``, ``nhosts``, ``version``, ``config``
                               (without per-host fields), ``data_digest``,
                               ``addresses`` (node id as str -> advertised inbox)
``start``     rank 0 -> host   ``addresses`` (every node), ``t0_unix_s``
``alive``     both ways        (every :data:`HEARTBEAT_S`; silence for the
                               transport's ``send_timeout_s`` fails the run)
``failed``    host -> rank 0   ``host_rank``, ``message`` (one line)
``result``    host -> rank 0   ``host_rank``, ``names`` (file names); frames: contents
``done``      rank 0 -> host   ``summary`` (JSON text of the run's summary.json)
``abort``     rank 0 -> host   ``message``, ``exit_code`` (2: a user mistake)
``event``     host -> rank 0   under ``--on-node-failure continue|restart``: what the
                               host saw (``event``: ``node_down`` with ``node`` and
                               ``record``, ``held`` with ``report``, ``exited`` or
                               ``ready`` with ``node`` and ``address``)
``act``       rank 0 -> host   ``actions``: the failure coordinator's decisions
                               (:mod:`dasgd.runtime.coordinator`), carried out by
                               each host for the nodes it runs
============  ===============  =====================================================

Node failures over several hosts (``--on-node-failure continue`` or
``restart``, DASGD and ps-async): host 0 runs the one
:class:`~dasgd.runtime.coordinator.FailureCoordinator`; a host that goes silent
for ``--send-timeout-s`` (its machine or network gone, no FIN needed) has all
its nodes declared dead, and under ``restart`` a launcher started again with
that ``--host-rank`` joins the running run (``start`` then carries
``rejoin: true``) and its nodes take their neighbours' state.

Host 0 checks that every host runs the same dasgd version and the same
configuration on the same data before anything trains; a mismatch is one line
naming the host and the differing fields, on every host, exit code 2. At the
end every host sends its nodes' files (logs, final models, event logs) to host
0, whose run directory then holds the whole run and whose ``summary.json`` has
the same checks as a one-machine run; every host receives that summary.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import zmq

from .. import __version__
from ..errors import ConfigError, NodeFailed

__all__ = [
    "HEARTBEAT_S",
    "HostLink",
    "HostSpec",
    "RendezvousServer",
    "advertise_address_for",
    "config_fingerprint",
    "data_digest",
    "hosts_from_env",
]

#: Seconds between heartbeats on the rendezvous links.
HEARTBEAT_S = 1.0
#: Port of the rendezvous when an endpoint gives none (torchrun's convention).
DEFAULT_RDZV_PORT = 29400
KINDS = ("join", "start", "alive", "failed", "result", "done", "abort", "event", "act")
#: Fields of the configuration that differ legitimately between hosts.
PER_HOST_FIELDS = (
    "out_dir",
    "run_id",
    "transport.host",
    "transport.advertise_host",
    "transport.curve_keys",
)


@dataclass(frozen=True)
class HostSpec:
    """Which part of a run this launcher starts.

    Attributes
    ----------
    nhosts : int
        Hosts (launchers) in the run.
    host_rank : int
        This host, 0..nhosts-1; host 0 runs the rendezvous.
    nproc_per_host : int or None
        Node processes per host; None: all nodes on one host (nhosts 1).
    rdzv_endpoint : str or None
        ``HOST:PORT`` of the rendezvous (host 0's address as the others reach it).
    source : str
        Where the ranks came from: ``flags``, ``torchrun``, ``slurm`` or ``openmpi``.
    """

    nhosts: int = 1
    host_rank: int = 0
    nproc_per_host: int | None = None
    rdzv_endpoint: str | None = None
    source: str = "flags"

    def __post_init__(self) -> None:
        where = "--nhosts" if self.source == "flags" else f"the {self.source} environment"
        if not (isinstance(self.nhosts, int) and self.nhosts >= 1):
            raise ConfigError(f"number of hosts must be >= 1, got {self.nhosts!r} ({where})")
        if not (isinstance(self.host_rank, int) and 0 <= self.host_rank < self.nhosts):
            raise ConfigError(
                f"host rank must be in 0..{self.nhosts - 1}, got {self.host_rank!r} "
                f"(--host-rank or {where})"
            )
        if self.nproc_per_host is not None and not (
            isinstance(self.nproc_per_host, int) and self.nproc_per_host >= 1
        ):
            raise ConfigError(
                f"processes per host must be >= 1, got {self.nproc_per_host!r} (--nproc-per-host)"
            )
        if self.nhosts > 1:
            if self.nproc_per_host is None:
                raise ConfigError(
                    f"a run over {self.nhosts} hosts needs --nproc-per-host (node processes per host)"
                )
            if not self.rdzv_endpoint:
                raise ConfigError(
                    f"a run over {self.nhosts} hosts needs --rdzv-endpoint HOST:PORT (host 0's address)"
                )
            split_endpoint(self.rdzv_endpoint)

    @property
    def multi(self) -> bool:
        return self.nhosts > 1

    def n_nodes(self) -> int | None:
        """Nodes (or PS workers) of the whole run, or None on one host."""
        return self.nhosts * self.nproc_per_host if self.multi else None

    def local_ids(self, n_nodes: int, ps: bool) -> list[int]:
        """Node ids this host runs (host 0 also runs the parameter server, id ``n_nodes``)."""
        if not self.multi:
            return list(range(n_nodes + ps))
        first = self.host_rank * self.nproc_per_host
        ids = list(range(first, first + self.nproc_per_host))
        return ids + ([n_nodes] if ps and self.host_rank == 0 else [])


def _resolve(host: str) -> str:
    """An IP address for ``host`` (names are resolved; ZeroMQ binds addresses or interfaces)."""
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror:
        return host


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` (port optional: :data:`DEFAULT_RDZV_PORT`) as (host, port).

    Raises
    ------
    ConfigError
        If the port is not an integer in 1..65535 or the host is empty.
    """
    host, sep, port = endpoint.rpartition(":")
    if not sep:
        host, port = endpoint, str(DEFAULT_RDZV_PORT)
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 1 <= number <= 65535:
        raise ConfigError(
            f"rendezvous endpoint {endpoint!r} is not HOST:PORT with a port in 1..65535 (--rdzv-endpoint)"
        )
    return host, number


def _first_slurm_host(environ) -> str:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError("SLURM_JOB_NODELIST is not set: give --rdzv-endpoint HOST:PORT")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        raise ConfigError(
            f"cannot expand SLURM_JOB_NODELIST {nodelist!r} (scontrol show hostnames failed): "
            "give --rdzv-endpoint HOST:PORT"
        ) from None
    return out[0]


def hosts_from_env(
    environ=None,
    *,
    nhosts: int | None = None,
    host_rank: int | None = None,
    nproc_per_host: int | None = None,
    rdzv_endpoint: str | None = None,
) -> HostSpec:
    """The host spec from flags, or else from the environment of torchrun, SLURM or Open MPI.

    Flags given explicitly win. Without ``--nhosts``, a launcher started by
    ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``),
    ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``) or ``mpirun`` of Open MPI
    (``OMPI_COMM_WORLD_RANK``, ``OMPI_COMM_WORLD_SIZE``) is one host of one
    node process per task (``--nproc-per-host`` 1 unless given). The
    rendezvous endpoint is then ``--rdzv-endpoint``, else ``DASGD_RDZV_ENDPOINT``,
    else torchrun's ``MASTER_ADDR`` with port ``MASTER_PORT + 1`` (torchrun's
    own store holds ``MASTER_PORT``), else SLURM's first host of the job
    with port 29400.

    Raises
    ------
    ConfigError
        On inconsistent or missing values (one line naming them).
    """
    env = os.environ if environ is None else environ
    if nhosts is not None or host_rank is not None:
        return HostSpec(
            nhosts=1 if nhosts is None else nhosts,
            host_rank=host_rank or 0,
            nproc_per_host=nproc_per_host,
            rdzv_endpoint=rdzv_endpoint or env.get("DASGD_RDZV_ENDPOINT"),
        )
    for source, rank_var, size_var in (
        ("torchrun", "RANK", "WORLD_SIZE"),
        ("slurm", "SLURM_PROCID", "SLURM_NTASKS"),
        ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ):
        if rank_var in env and size_var in env:
            try:
                rank, size = int(env[rank_var]), int(env[size_var])
            except ValueError:
                raise ConfigError(
                    f"{rank_var}={env[rank_var]!r} and {size_var}={env[size_var]!r} must be integers"
                ) from None
            if size == 1:
                break
            endpoint = rdzv_endpoint or env.get("DASGD_RDZV_ENDPOINT")
            if endpoint is None and source == "torchrun" and "MASTER_ADDR" in env:
                endpoint = f"{env['MASTER_ADDR']}:{int(env.get('MASTER_PORT', 29500)) + 1}"
            if endpoint is None and source == "slurm":
                endpoint = f"{_first_slurm_host(env)}:{DEFAULT_RDZV_PORT}"
            if endpoint is None:
                raise ConfigError(
                    f"started by {source} as rank {rank} of {size}: give --rdzv-endpoint "
                    "HOST:PORT (the first rank's host) or set DASGD_RDZV_ENDPOINT"
                )
            return HostSpec(
                nhosts=size,
                host_rank=rank,
                nproc_per_host=nproc_per_host or 1,
                rdzv_endpoint=endpoint,
                source=source,
            )
    return HostSpec(nproc_per_host=nproc_per_host)


def advertise_address_for(endpoint: str) -> str:
    """The address of this machine's interface that reaches ``endpoint`` (no packet is sent)."""
    host, port = split_endpoint(endpoint)
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(
            f"cannot resolve the rendezvous host {host!r}: {exc.strerror} (--rdzv-endpoint)"
        ) from None
    with socket.socket(family[0], socket.SOCK_DGRAM) as s:
        s.connect(family[4])  # UDP connect: picks the route, sends nothing
        return s.getsockname()[0]


def config_fingerprint(config_dict: dict) -> dict:
    """The configuration without the fields that differ legitimately between hosts, flattened."""
    flat: dict = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = value

    walk("", config_dict)
    for key in PER_HOST_FIELDS:
        flat.pop(key, None)
    return flat


def data_digest(dataset) -> str:
    """SHA-256 of the loaded, split and standardized data (every host must hold the same)."""
    h = hashlib.sha256()
    for array in (dataset.X_train, dataset.y_train, dataset.X_test, dataset.y_test):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def _pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _unpack(raw: bytes) -> dict | None:
    try:
        message = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # garbage from a stranger on the port: not a message
        return None
    if not isinstance(message, dict) or message.get("kind") not in KINDS:
        return None
    return message


def _valid_join(message: dict) -> bool:
    """True if a ``join`` has the fields and types the rendezvous uses."""
    addresses = message.get("addresses")
    return (
        isinstance(message.get("host_rank"), int)
        and isinstance(message.get("config"), dict)
        and isinstance(message.get("data_digest"), str)
        and isinstance(addresses, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in addresses.items())
    )


def mismatch(reference: dict, join: dict) -> str | None:
    """One line saying how a host's ``join`` differs from host 0's, or None if it does not."""
    rank = join.get("host_rank")
    if join.get("version") != reference["version"]:
        return (
            f"host {rank} runs dasgd {join.get('version')}, host 0 runs {reference['version']}: "
            "install the same version on every host"
        )
    if join.get("nhosts") != reference["nhosts"]:
        return f"host {rank} expects {join.get('nhosts')} hosts, host 0 expects {reference['nhosts']} (--nhosts)"
    theirs, ours = join.get("config") or {}, reference["config"]
    differing = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if differing:
        shown = ", ".join(f"{k} ({theirs.get(k)!r} vs {ours.get(k)!r})" for k in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        return f"host {rank}'s configuration differs from host 0's: {shown}{more}"
    if join.get("data_digest") != reference["data_digest"]:
        return (
            f"host {rank} loaded different data than host 0 (same --dataset name or path, "
            "different content): give every host the same file"
        )
    return None


class RendezvousServer(threading.Thread):
    """Host 0's rendezvous: a ROUTER on the endpoint, run in a thread of host 0's launcher.

    Parameters
    ----------
    spec : HostSpec
    bind_host : str
        Interface to bind when the endpoint's host is not an address of this
        machine (``0.0.0.0``: all).
    timeout_s : float
        Deadline for every host to join after host 0 did (``--ready-timeout-s``).
    silence_s : float
        Silence after which a host is declared lost (``--send-timeout-s``).
    collect : callable
        ``collect(files) -> summary dict``: called with ``{name: bytes}`` of every
        other host's files once all have sent them; writes them and the summary.

    Attributes
    ----------
    error : str or None
        Why the run was aborted (set before the abort is sent).
    """

    def __init__(
        self,
        spec: HostSpec,
        bind_host: str,
        timeout_s: float,
        silence_s: float,
        collect,
        curve=None,
        make_coordinator=None,
        host_nodes=None,
    ) -> None:
        super().__init__(name="dasgd-rendezvous", daemon=True)
        self.spec = spec
        self.timeout_s = timeout_s
        self.silence_s = silence_s
        self.collect = collect
        # (addresses, t0_unix_s) -> FailureCoordinator or None; host rank -> its node ids
        self.make_coordinator = make_coordinator
        self.host_nodes = host_nodes or (lambda rank: [])
        self.coordinator = None
        self.error: str | None = None
        self.malformed = 0
        self._abort_message: dict | None = None
        self._halt = threading.Event()
        host, port = split_endpoint(spec.rdzv_endpoint)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._auth = None
        if curve is not None:  # only launchers holding the run's keys get in
            self._auth = curve.authenticator(self._ctx)
            curve.make_server(self._sock, "launcher")
        # the endpoint's own address if it is one of this machine's, else the bind interface
        for where in (host, bind_host):
            try:
                self._sock.bind(f"tcp://{_resolve(where)}:{port}")
                break
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EADDRNOTAVAIL or exc.errno == errno.EADDRNOTAVAIL:
                    continue
                self._sock.close(linger=0)
                self._stop_auth()
                raise ConfigError(
                    f"cannot bind the rendezvous on {where}:{port}: {exc.strerror} "
                    "(--rdzv-endpoint: choose a free port on host 0)"
                ) from None
        else:
            self._sock.close(linger=0)
            self._stop_auth()
            raise ConfigError(
                f"the rendezvous endpoint {spec.rdzv_endpoint} is not an address of host 0 and "
                f"{bind_host} cannot be bound (--rdzv-endpoint, --bind-address)"
            )

    def stop(self) -> None:
        """Ask the thread to end (it closes its socket)."""
        self._halt.set()

    def close(self) -> None:
        """Release the socket of a server whose thread never started."""
        if not self.is_alive():
            self._sock.close(linger=0)
            self._stop_auth()

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def _broadcast(self, identities, message: dict) -> None:
        raw = _pack(message)
        for identity in identities:
            try:
                self._sock.send_multipart([identity, raw], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a host that left cannot be told

    def _abort(self, identities, message: str, exit_code: int) -> None:
        self.error = message
        self._abort_message = {"kind": "abort", "message": message, "exit_code": exit_code}
        self._broadcast(identities, self._abort_message)

    def run(self) -> None:
        try:
            self._serve()
            if self.error is not None:  # tell launchers that come late too, until stopped
                while not self._halt.is_set():
                    identity, message, _ = self._recv(0.2)
                    if message is not None:
                        self._broadcast([identity], self._abort_message)
        finally:
            self._sock.close(linger=1000)
            self._stop_auth()

    def _recv(self, timeout_s: float):
        if self._halt.is_set() or not self._sock.poll(int(max(timeout_s, 0) * 1000) + 1):
            return None, None, None
        frames = self._sock.recv_multipart()
        if len(frames) < 2:
            return None, None, None
        return frames[0], _unpack(frames[1]), frames[2:]

    def _serve(self) -> None:
        n = self.spec.nhosts
        joins: dict[int, dict] = {}
        who: dict[int, bytes] = {}
        # the others get timeout_s from host 0's own join (its nodes take time to start)
        deadline = time.monotonic() + 2 * self.timeout_s
        while len(joins) < n:
            remaining = deadline - time.monotonic()
            if self._halt.is_set():
                return
            if remaining <= 0:
                missing = sorted(set(range(n)) - set(joins))
                self._abort(
                    who.values(),
                    f"host(s) {missing} did not join the rendezvous at {self.spec.rdzv_endpoint} "
                    f"within {self.timeout_s:.0f} s (--ready-timeout-s): are their launchers running "
                    "with this --rdzv-endpoint?",
                    1,
                )
                return
            identity, message, _ = self._recv(min(remaining, 0.2))
            if message is not None and message["kind"] == "failed":  # a host failed to start
                self._abort(
                    [*who.values(), identity],
                    f"host {message.get('host_rank')}: {message.get('message')}",
                    int(message.get("exit_code") or 1),
                )
                return
            if message is None or message["kind"] != "join":
                continue
            if not _valid_join(message):  # malformed: dropped and counted, never fatal
                self.malformed += 1
                continue
            rank = message.get("host_rank")
            if not isinstance(rank, int) or not 0 <= rank < n or rank in joins:
                self._abort(
                    [*who.values(), identity],
                    f"a launcher joined as host {rank!r}: ranks must be 0..{n - 1}, each once (--host-rank)",
                    2,
                )
                return
            joins[rank] = message
            who[rank] = identity
            if rank == 0:
                deadline = time.monotonic() + self.timeout_s
            if 0 in joins:
                for r, j in joins.items():
                    why = mismatch(joins[0], j) if r != 0 else None
                    if why:
                        self._abort(who.values(), why, 2)
                        return
        addresses: dict[str, str] = {}
        for j in joins.values():
            addresses.update(j["addresses"])
        t0_unix_s = time.time()
        self._broadcast(
            who.values(), {"kind": "start", "addresses": addresses, "t0_unix_s": t0_unix_s}
        )
        if self.make_coordinator is not None:
            self.coordinator = self.make_coordinator(
                {int(k): v for k, v in addresses.items()}, t0_unix_s
            )
        self._supervise(who, joins[0], t0_unix_s)

    def _coordinate(self, who: dict[int, bytes], decide) -> bool:
        """Run one coordinator call and broadcast its actions; False once the run is aborted."""
        try:
            actions = decide()
        except Exception as exc:  # a bug must not silence host 0: every host learns why
            self._abort(who.values(), f"host 0's failure coordinator failed: {exc!r}", 1)
            return False
        return self._act(who, actions)

    def _act(self, who: dict[int, bytes], actions) -> bool:
        """Broadcast the coordinator's actions; False (after an abort) if no worker is left."""
        if actions:
            self._broadcast(who.values(), {"kind": "act", "actions": actions})
        c = self.coordinator
        if c is not None and all(j in c.failures for j in range(c.n)):
            self._abort(who.values(), "every node of the run died", 1)
            return False
        return True

    def _supervise(self, who: dict[int, bytes], reference: dict, t0_unix_s: float) -> None:
        n = self.spec.nhosts
        rank_of = {identity: rank for rank, identity in who.items()}
        last_heard = dict.fromkeys(who, time.monotonic())
        files: dict[str, bytes] = {}
        reported: set[int] = set()
        lost: set[int] = set()
        next_beat = 0.0
        coordinator = self.coordinator
        while not self._halt.is_set():
            now = time.monotonic()
            if now >= next_beat:
                self._broadcast(who.values(), {"kind": "alive"})
                next_beat = now + HEARTBEAT_S
            silent = [
                r for r, t in last_heard.items() if r not in reported and now - t > self.silence_s
            ]
            if silent and (coordinator is None or 0 in silent):
                self._abort(
                    who.values(),
                    f"host(s) {silent} went silent for {self.silence_s:.0f} s (launcher killed or "
                    "network lost)",
                    1,
                )
                return
            for r in silent:  # the run goes on without them (their nodes are dead)
                lost.add(r)
                rank_of.pop(who.pop(r), None)
                del last_heard[r]
                why = f"host {r} went silent for {self.silence_s:.0f} s (--send-timeout-s)"
                nodes = self.host_nodes(r)
                lose = functools.partial(coordinator.host_lost, r, nodes, why)
                if not self._coordinate(who, lose):
                    return
            if coordinator is not None and not self._coordinate(who, coordinator.tick):
                return
            if len(reported) == n - len(lost) and reported:
                self._finish(who, files)
                return
            identity, message, extra = self._recv(HEARTBEAT_S / 4)
            if message is None:
                continue
            if identity not in rank_of:
                if message["kind"] == "join":  # a lost host's launcher started again?
                    self._rejoin(
                        who, rank_of, last_heard, lost, identity, message, reference, t0_unix_s
                    )
                continue
            rank = rank_of[identity]
            last_heard[rank] = time.monotonic()
            if message["kind"] == "failed":
                self._abort(
                    who.values(),
                    f"host {rank}: {message.get('message')}",
                    int(message.get("exit_code") or 1),
                )
                return
            if message["kind"] == "event" and coordinator is not None:
                try:
                    actions = coordinator.handle(message)
                except (KeyError, TypeError, ValueError, IndexError):
                    self.malformed += 1  # dropped and counted, never fatal
                    continue
                if not self._act(who, actions):
                    return
            if message["kind"] == "result" and rank not in reported:
                names = message.get("names") or []
                if len(names) != len(extra):
                    continue
                if rank != 0:  # host 0's files are in its own run directory already
                    for name, content in zip(names, extra, strict=True):
                        files[Path(name).name] = content
                reported.add(rank)

    def _rejoin(self, who, rank_of, last_heard, lost, identity, message, reference, t0_unix_s):
        """A launcher joins the running run as a lost host (``--on-node-failure restart``)."""
        rank = message.get("host_rank")
        refuse = None
        if not _valid_join(message):
            self.malformed += 1
            return
        if rank not in lost:
            refuse = (
                f"a launcher joined as host {rank!r} while the run is going: only a host lost "
                f"during the run ({sorted(lost) or 'none'}) may join again"
            )
        elif self.coordinator is None or self.coordinator.config.on_node_failure != "restart":
            refuse = (
                f"host {rank} was lost and the run goes on without it: joining again needs "
                "--on-node-failure restart"
            )
        elif not self.coordinator.can_return(rank):
            refuse = (
                f"host {rank} came back too late: its nodes' deltas were settled without it "
                "(--ready-timeout-s after they were found dead)"
            )
        else:
            refuse = mismatch(reference, message)
        if refuse:
            raw = _pack({"kind": "abort", "message": refuse, "exit_code": 2})
            try:
                self._sock.send_multipart([identity, raw], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            return
        lost.discard(rank)
        who[rank] = identity
        rank_of[identity] = rank
        last_heard[rank] = time.monotonic()
        nodes = self.coordinator.host_back(rank)
        addresses = {str(k): v for k, v in self.coordinator.addresses.items()}
        addresses.update(message["addresses"])
        self._broadcast(
            [identity],
            {
                "kind": "start",
                "addresses": addresses,
                "t0_unix_s": t0_unix_s,
                "rejoin": True,
                "restart_nodes": nodes,  # the others were settled without this host
            },
        )

    def _finish(self, who: dict[int, bytes], files: dict[str, bytes]) -> None:
        """Write the files and the summary (in a thread: heartbeats go on), then send ``done``."""
        outcome: dict = {}

        def work():
            try:
                outcome["summary"] = self.collect(files)
            except Exception as exc:  # the summary failed: every host learns why
                outcome["error"] = f"host 0 could not write the summary: {exc}"

        worker = threading.Thread(target=work, name="dasgd-summary", daemon=True)
        worker.start()
        while worker.is_alive() and not self._halt.is_set():
            self._broadcast(who.values(), {"kind": "alive"})
            worker.join(HEARTBEAT_S)
            while self._recv(0)[1] is not None:  # the hosts' heartbeats: nothing to do
                pass
        if "summary" in outcome:
            self._broadcast(
                who.values(), {"kind": "done", "summary": json.dumps(outcome["summary"])}
            )
        elif "error" in outcome:
            self._abort(who.values(), outcome["error"], 1)


class HostLink:
    """One launcher's connection to the rendezvous (host 0's launcher connects too).

    Parameters
    ----------
    spec : HostSpec
    timeout_s : float
        Silence from the rendezvous after which the run fails.
    curve : dasgd.runtime.security.CurveKeys, optional
        Encrypt the link with the ``launcher`` key pair.
    """

    def __init__(self, spec: HostSpec, timeout_s: float, curve=None) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        host, port = split_endpoint(spec.rdzv_endpoint)
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        if curve is not None:
            curve.make_client(self._sock, "launcher", "launcher")
        self._sock.connect(f"tcp://{host}:{port}")
        self._last_heard = time.monotonic()
        self._next_beat = 0.0
        self.joined = False
        self.started = False  # silence counts once the run has started

    def close(self) -> None:
        self._sock.close(linger=2000)

    def send(self, message: dict, frames=()) -> None:
        self._sock.send_multipart([_pack(message), *frames])

    def join(self, config_dict: dict, digest: str, addresses: dict[int, str]) -> None:
        self.send(
            {
                "kind": "join",
                "host_rank": self.spec.host_rank,
                "nhosts": self.spec.nhosts,
                "version": __version__,
                "config": config_fingerprint(config_dict),
                "data_digest": digest,
                "addresses": {str(k): v for k, v in addresses.items()},
            }
        )
        self.joined = True
        self._last_heard = time.monotonic()

    def poll(self, timeout_s: float = 0.0) -> dict | None:
        """The next message from the rendezvous (None if none); raises on abort or silence.

        Raises
        ------
        ConfigError
            The rendezvous aborted the run for a user mistake (exit code 2).
        NodeFailed
            The rendezvous aborted the run, or went silent for ``timeout_s``.
        """
        now = time.monotonic()
        if self.joined and now >= self._next_beat:
            self.send({"kind": "alive"})
            self._next_beat = now + HEARTBEAT_S
        if not self._sock.poll(int(timeout_s * 1000)):
            if self.started and time.monotonic() - self._last_heard > self.timeout_s:
                raise NodeFailed(
                    f"no word from the rendezvous at {self.spec.rdzv_endpoint} for "
                    f"{self.timeout_s:.0f} s: is host 0's launcher running there (--rdzv-endpoint)?"
                )
            return None
        message = _unpack(self._sock.recv_multipart()[0])
        self._last_heard = time.monotonic()
        if message is None:
            return None
        if message["kind"] == "abort":
            text = str(message.get("message"))
            raise ConfigError(text) if message.get("exit_code") == 2 else NodeFailed(text)
        if message["kind"] == "start":
            self.started = True
        return message

    def wait_for(self, kind: str, deadline_s: float, on_idle=None) -> dict:
        """Poll until a message of ``kind`` arrives (``on_idle()`` between polls), or fail at the deadline."""
        deadline = time.monotonic() + deadline_s
        while True:
            message = self.poll(0.1)
            if message is not None and message["kind"] == kind:
                return message
            if on_idle is not None:
                on_idle()
            if time.monotonic() > deadline:
                raise NodeFailed(
                    f"host {self.spec.host_rank}: no {kind} from the rendezvous at "
                    f"{self.spec.rdzv_endpoint} within {deadline_s:.0f} s: is host 0's launcher "
                    "running there, with the same --nhosts?"
                )
