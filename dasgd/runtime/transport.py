"""ZeroMQ transport of one node: one PULL inbox, one PUSH socket per neighbour.

The transport moves multipart messages (lists of bytes-like frames) and knows
nothing of models or deltas. Its contract:

- A message to a live neighbour is never dropped. Sends never block the node:
  a send that would block (the neighbour's queue is at its high-water mark) is
  queued in a per-neighbour backlog, in order, and retried by :meth:`flush`.
  The node stops taking local steps while a backlog is long (backpressure) and
  fails with :class:`~dasgd.errors.TransportError` when a neighbour with
  messages waiting for it accepts nothing for ``send_timeout_s``.
- Every socket has LINGER, high-water marks and (the inbox) MAXMSGSIZE set.
- PUB/SUB is not used: it drops silently.

Emulated link latency (the kernel here has no netem; see :mod:`dasgd.core.emulation`):
a link with a one-way delay ``d`` seconds holds each outgoing message in a
per-link delay queue until ``time.monotonic() + d`` after its send, then hands
it to the socket (or the backlog). The delay is constant per link, so the queue
is FIFO and per-link order is kept. Messages inside their delay are "on the
wire": they are not in the backlog, do not trigger backpressure and do not
count as a stall. They only move when the caller calls :meth:`flush` (or sends
on the same link), so a caller with delayed messages calls :meth:`flush` while
:attr:`Transport.has_pending` and bounds its waits by :meth:`Transport.next_due_s`.
A link without delay costs one dict lookup per send and nothing else.

Emulated partitions (``--partition``; :class:`~dasgd.core.emulation.Partitions`)
use the same delay queues: once :meth:`Transport.start_run_clock` has given the
run clock's origin, a message on a link that is cut when it is due (its send
time plus the link's latency) is held in the link's delay queue until the cut
ends (:func:`~dasgd.core.emulation.release_after`), and the link's backlog is
not handed to ZeroMQ during a cut either: a cut TCP link loses nothing, keeps
the order, and delivers nothing while it is down. Messages ZeroMQ took just
before the cut began still arrive (as bytes already in a real link's socket
buffers would). As on a real link, where ZeroMQ queues up to its
high-water mark and then refuses, held messages beyond ``hwm_msgs`` count as
backlog (:meth:`Transport.flush`'s return: backpressure) and, from the moment
they exceed it, towards :meth:`Transport.check_stalled`: a cut shorter than
the send timeout is survived; a longer one that holds more than ``hwm_msgs``
messages is reported as a neighbour that accepts nothing, as a real
partition would be.

Addresses are ``ipc://DIR/node-<id>`` or ``tcp://HOST:PORT``; with port 0 the
operating system picks a free port and :meth:`Transport.start` returns the
address actually bound, which the launcher hands to the neighbours.
"""

from __future__ import annotations

import math
import time
from collections import deque

import zmq

from ..core.emulation import release_after
from ..errors import TransportError

__all__ = ["Transport", "inbox_address"]

#: Monitor events of a refused handshake (a peer without an allowed CURVE key or mechanism).
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def inbox_address(kind: str, node_id: int, *, host: str, base_port: int, ipc_dir: str) -> str:
    """The address node ``node_id`` binds its inbox to.

    Parameters
    ----------
    kind : {"ipc", "tcp"}
    node_id : int
    host : str
        Interface to bind (tcp).
    base_port : int
        tcp port of node 0; node i binds ``base_port + i``. 0: any free port.
    ipc_dir : str
        Directory for ipc socket files (keep it short: paths are limited to ~100 bytes).
    """
    if kind == "ipc":
        return f"ipc://{ipc_dir}/node-{node_id}"
    port = base_port + node_id if base_port else 0
    return f"tcp://{host}:{port}" if port else f"tcp://{host}:*"


class Transport:
    """The sockets of one node.

    Parameters
    ----------
    node_id : int
        This node (written into nothing; used in error messages).
    bind_address : str
        Address of this node's inbox (see :func:`inbox_address`).
    hwm_msgs : int
        ZeroMQ send and receive high-water marks, in messages.
    max_message_bytes : int
        Largest message the inbox accepts (ZMQ_MAXMSGSIZE); a peer sending a
        larger one is disconnected by ZeroMQ.
    linger_s : float
        How long :meth:`close` waits for queued messages to leave.
    latency_s : dict of int to float, optional
        Emulated one-way delay in seconds per destination neighbour id; a
        neighbour that is absent or has 0 gets no delay.
    partitions : dasgd.core.emulation.Partitions, optional
        Emulated cuts of this node's links, on the run clock; they take
        effect once :meth:`start_run_clock` is called.
    curve : dasgd.runtime.security.CurveKeys, optional
        Encrypt every link with CurveZMQ: the inbox accepts only clients with a
        public key of the run (handshakes refused are counted as
        ``auth_rejected``), and every outgoing socket authenticates with this
        node's key pair.
    key_name : callable, optional
        ``key_name(node_id) -> str``: the key pair name of a node (with ``curve``).

    Raises
    ------
    ValueError
        If a delay in ``latency_s`` is negative or not finite.

    Notes
    -----
    The constructor stores settings only; :meth:`start` creates and binds the
    sockets and :meth:`close` (idempotent) releases them. Usable as a context
    manager.

    Each message is in one of three places until ZeroMQ takes it: a delay
    queue (:attr:`delayed_msgs`; links with latency only), a backlog
    (:attr:`backlog_msgs`; refused by a full ZeroMQ queue) or nowhere (handed
    to ZeroMQ, counted in ``msgs_out``/``bytes_out``). Per link, messages
    leave in the order they were sent.
    """

    def __init__(
        self,
        node_id: int,
        bind_address: str,
        *,
        hwm_msgs: int = 1000,
        max_message_bytes: int = -1,
        linger_s: float = 5.0,
        latency_s: dict[int, float] | None = None,
        partitions=None,
        curve=None,
        key_name=None,
    ) -> None:
        latency_s = dict(latency_s or {})
        for to, delay_s in latency_s.items():
            if not (math.isfinite(delay_s) and delay_s >= 0):
                raise ValueError(
                    f"node {node_id}: latency to neighbour {to} must be finite and >= 0 s, "
                    f"got {delay_s!r}"
                )
        self.node_id = node_id
        self.bind_address = bind_address
        self.hwm_msgs = hwm_msgs
        self.max_message_bytes = max_message_bytes
        self.linger_s = linger_s
        self.latency_s = latency_s
        self.partitions = partitions
        # the run clock's origin on time.monotonic's clock (start_run_clock); None: no cuts yet
        self._t0: float | None = None
        # links with a cut only: neighbour -> sorted disjoint [(start, end)] on time.monotonic
        self._cuts: dict[int, list[tuple[float, float]]] = {}
        # cut links holding more than hwm_msgs messages: neighbour -> since when (monotonic)
        self._over_since: dict[int, float] = {}
        #: messages a cut held (their release came later than their due time)
        self.partition_held_msgs = 0
        self.address: str | None = None
        self._ctx: zmq.Context | None = None
        self._inbox: zmq.Socket | None = None
        self._out: dict[int, zmq.Socket] = {}
        self._backlog: dict[int, deque] = {}
        # links with a delay only: neighbour -> (delay_s, deque of (due_s, frames))
        self._delayed: dict[int, tuple[float, deque]] = {}
        # per neighbour: last time it accepted a message, or its backlog became non-empty
        self._last_progress: dict[int, float] = {}
        self._poller: zmq.Poller | None = None
        self._failed: set[int] = set()
        #: messages not sent because their neighbour had failed (:meth:`disconnect`)
        self.msgs_to_failed = 0
        self.msgs_out = 0
        self.bytes_out = 0
        self.msgs_in = 0
        self.bytes_in = 0
        self.curve = curve
        self.key_name = key_name or (lambda node: f"node-{node}")
        self.auth_rejected = 0
        self._auth = None
        self._monitor: zmq.Socket | None = None

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> str:
        """Create the context and bind the inbox.

        Returns
        -------
        str
            The address bound (with the real port when the port was 0).

        Raises
        ------
        TransportError
            If the address cannot be bound (e.g. the port is in use).
        """
        self._ctx = zmq.Context()
        inbox = self._ctx.socket(zmq.PULL)
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.setsockopt(zmq.RCVHWM, self.hwm_msgs)
        inbox.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        if self.curve is not None:
            self._auth = self.curve.authenticator(self._ctx)
            self.curve.make_server(inbox, self.key_name(self.node_id))
        try:
            inbox.bind(self.bind_address)
        except zmq.ZMQError as exc:
            inbox.close(linger=0)
            self.close()
            raise TransportError(
                f"node {self.node_id} cannot bind {self.bind_address}: {exc.strerror}"
            ) from None
        self._inbox = inbox
        if self.curve is not None:  # before any peer connects (they learn the address later)
            self._monitor = inbox.get_monitor_socket(_HANDSHAKE_FAILED)
        self.address = inbox.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(inbox, zmq.POLLIN)
        return self.address

    def connect(self, addresses: dict[int, str]) -> None:
        """Open one PUSH socket per neighbour; ``addresses`` maps neighbour id -> inbox address.

        A neighbour dropped with :meth:`disconnect` (a restarted node) is connected anew.
        """
        for node, address in addresses.items():
            self._failed.discard(node)
            old = self._out.pop(node, None)
            if old is not None:
                old.close(linger=0)
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, int(self.linger_s * 1000))
            sock.setsockopt(zmq.SNDHWM, self.hwm_msgs)
            if self.curve is not None:
                self.curve.make_client(sock, self.key_name(self.node_id), self.key_name(node))
            sock.connect(address)
            self._out[node] = sock
            self._backlog[node] = deque()
            self._last_progress[node] = time.monotonic()
            delay_s = self.latency_s.get(node, 0.0)
            if delay_s > 0:
                self._delayed[node] = (delay_s, deque())
            if self._t0 is not None:
                self._arm(node)

    def start_run_clock(self, t0: float) -> None:
        """Give the run clock's origin (on :func:`time.monotonic`): the emulated cuts take effect.

        Parameters
        ----------
        t0 : float
            ``time.monotonic()`` at run-clock time 0 (the launcher's start).
        """
        self._t0 = t0
        for node in self._out:
            self._arm(node)

    def _arm(self, to: int) -> None:
        """Schedule the cuts of the link to ``to`` (it then goes through a delay queue)."""
        if not self.partitions:
            return
        windows = self.partitions.windows(self.node_id, to)
        if not windows:
            return
        self._cuts[to] = [(self._t0 + a, self._t0 + b) for a, b in windows]
        if to not in self._delayed:
            self._delayed[to] = (0.0, deque())

    def _cut_since(self, to: int, now: float) -> float | None:
        """When the cut of the link to ``to`` in force at ``now`` began; None if it is not cut."""
        for start, end in self._cuts.get(to, ()):
            if start <= now < end:
                return start
        return None

    def disconnect(self, node: int) -> int:
        """Drop a dead neighbour: close its socket at once and discard what waits for it.

        Later sends to it are dropped and counted (``msgs_to_failed``), never
        queued, so a dead neighbour can neither block this node nor make it
        linger at :meth:`close`. Idempotent; a node never connected is only
        remembered.

        Returns
        -------
        int
            Messages discarded (backlog and delay queue; those ZeroMQ had
            already taken are discarded with the socket, uncounted).
        """
        self._failed.add(node)
        dropped = len(self._backlog.pop(node, ()))
        link = self._delayed.pop(node, None)
        if link is not None:
            dropped += len(link[1])
        self._last_progress.pop(node, None)
        self._cuts.pop(node, None)
        self._over_since.pop(node, None)
        sock = self._out.pop(node, None)
        if sock is not None:
            sock.close(linger=0)
        self.msgs_to_failed += dropped
        return dropped

    def close(self, linger_s: float | None = None) -> None:
        """Close every socket (waiting at most ``linger_s`` for queued sends) and the context.

        Delayed messages already due are handed to ZeroMQ first (behind the
        backlog, without blocking); those still inside their delay are dropped:
        close means the run is over, and they are still "on the wire".
        """
        if self._ctx is None:
            return
        if self.delayed_msgs:
            self.flush()
            for _, queue in self._delayed.values():
                queue.clear()
        linger_ms = int((self.linger_s if linger_s is None else linger_s) * 1000)
        for sock in self._out.values():
            sock.close(linger=linger_ms)
        if self._monitor is not None:
            self._count_rejections()
            self._inbox.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None
        if self._inbox is not None:
            self._inbox.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._out.clear()
        self._inbox = None
        self._ctx.term()
        self._ctx = None

    def __enter__(self) -> Transport:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sending ------------------------------------------------------------
    def send(self, to: int, frames: list) -> None:
        """Send one multipart message to neighbour ``to`` without blocking.

        On a link with latency the message joins the link's delay queue, due
        ``latency_s[to]`` seconds from now; :meth:`flush` (or a later send on
        the same link) hands it over when due. Otherwise, if the neighbour's
        queue is full or earlier messages wait for it, the message joins its
        backlog (order kept) and :meth:`flush` sends it later. Frames may be
        bytes, buffers or ``zmq.Frame`` objects (sent zero-copy; a delayed
        message keeps its frames referenced until it is handed over).
        A message to a neighbour dropped by :meth:`disconnect` is discarded.
        """
        if to in self._failed:
            self.msgs_to_failed += 1
            return
        link = self._delayed.get(to)
        if link is not None:
            now = time.monotonic()
            queue = link[1]
            due = now + link[0]
            cuts = self._cuts.get(to)
            if cuts:
                released = release_after(cuts, due)
                if released > due:
                    self.partition_held_msgs += 1
                    if (
                        to not in self._over_since
                        and len(queue) + len(self._backlog[to]) >= self.hwm_msgs
                    ):
                        self._over_since[to] = now  # a real link's queue would refuse it
                due = released
            queue.append((due, frames))
            if queue[0][0] <= now:
                self._release_due(to, queue, now)
                self._drain(to, self._backlog[to])
            return
        backlog = self._backlog[to]
        if backlog:
            backlog.append(frames)
        elif not self._try_send(to, frames):
            self._last_progress[to] = time.monotonic()  # the stall clock starts now
            backlog.append(frames)

    def _try_send(self, to: int, frames: list) -> bool:
        try:
            self._out[to].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self.msgs_out += 1
        self.bytes_out += sum(_nbytes(f) for f in frames)
        self._last_progress[to] = time.monotonic()
        return True

    def _drain(self, to: int, backlog: deque) -> None:
        if self._cuts and backlog and self._cut_since(to, time.monotonic()) is not None:
            return  # a cut link delivers nothing; its backlog waits for the end of the cut
        while backlog and self._try_send(to, backlog[0]):
            backlog.popleft()

    def _release_due(self, to: int, queue: deque, now: float) -> None:
        """Move the messages of ``queue`` due by ``now`` to the end of ``to``'s backlog."""
        backlog = self._backlog[to]
        if not backlog:
            self._last_progress[to] = now  # time spent in the delay is not a stall
        while queue and queue[0][0] <= now:
            backlog.append(queue.popleft()[1])

    def flush(self) -> int:
        """Hand due delayed messages and the backlogs to ZeroMQ, as far as the neighbours accept.

        Per link, due delayed messages go behind the link's backlog (order kept).

        Returns
        -------
        int
            Messages still waiting in all backlogs (refused by ZeroMQ); messages
            still inside their delay are not counted, nor those a cut holds
            unless they exceed the high-water mark (a real link's queue would
            refuse those).
        """
        if self._delayed:
            now = time.monotonic()
            for to, (_, queue) in self._delayed.items():
                if queue and queue[0][0] <= now:
                    self._release_due(to, queue, now)
        waiting = 0
        for to, backlog in self._backlog.items():
            self._drain(to, backlog)
            waiting += len(backlog)
        if self._over_since:
            now = time.monotonic()
            for to in list(self._over_since):
                held = len(self._delayed[to][1]) + len(self._backlog[to])
                if self._cut_since(to, now) is None or held <= self.hwm_msgs:
                    del self._over_since[to]
                else:
                    # the link counts as max(backlog, held beyond the mark): add the difference
                    waiting += max(0, held - self.hwm_msgs - len(self._backlog[to]))
        return waiting

    @property
    def backlog_msgs(self) -> int:
        """Messages waiting in all backlogs (refused by ZeroMQ so far)."""
        return sum(len(b) for b in self._backlog.values())

    @property
    def backlog_bytes(self) -> int:
        """Bytes of the messages waiting in all backlogs (computed on demand)."""
        return sum(
            _nbytes(f) for backlog in self._backlog.values() for frames in backlog for f in frames
        )

    @property
    def delayed_msgs(self) -> int:
        """Messages inside their emulated delay, in all delay queues."""
        return sum(len(queue) for _, queue in self._delayed.values())

    @property
    def has_pending(self) -> bool:
        """True while a backlog or a delay queue holds a message: keep calling :meth:`flush`."""
        return any(self._backlog.values()) or any(queue for _, queue in self._delayed.values())

    def max_delay_s(self) -> float:
        """The longest a message sent now, or one already delayed, may still be held, in seconds.

        The largest link latency, or longer while an emulated cut holds
        messages (until the last of them is due).
        """
        longest = max(self.latency_s.values(), default=0.0)
        if self._cuts:
            now = time.monotonic()
            for _, queue in self._delayed.values():
                if queue:
                    longest = max(longest, queue[-1][0] - now)
        return longest

    def wait_cap_s(self, cap_s: float) -> float:
        """``cap_s``, shortened so that a wait ends when the next delayed message is due."""
        due = self.next_due_s()
        return cap_s if due is None else min(cap_s, due)

    def next_due_s(self) -> float | None:
        """Seconds until the earliest delayed message is due (0 if overdue); None if none is delayed.

        Callers bound their poll timeouts by it, so delayed messages leave on time.
        """
        heads = [queue[0][0] for _, queue in self._delayed.values() if queue]
        if not heads:
            return None
        return max(0.0, min(heads) - time.monotonic())

    def check_stalled(self, timeout_s: float) -> None:
        """Raise if a neighbour with a backlog accepted nothing for ``timeout_s`` seconds.

        The clock of a neighbour runs from the later of its last accepted
        message and the moment its backlog became non-empty; time a message
        spends inside its emulated delay does not count. On a link inside an
        emulated cut holding more than ``hwm_msgs`` messages, it runs from the
        later of its last accepted message and the moment the held messages
        exceeded the high-water mark (when a real link's queue would have
        begun to refuse them).

        Raises
        ------
        TransportError
            Naming the neighbour, the backlog and the time waited.
        """
        now = time.monotonic()
        for to, backlog in self._backlog.items():
            if backlog and now - self._last_progress[to] > timeout_s:
                raise TransportError(
                    f"node {self.node_id}: neighbour {to} accepted no message for "
                    f"{now - self._last_progress[to]:.1f} s ({len(backlog)} waiting); is it alive?"
                )
        for to, over_since in self._over_since.items():
            if self._cut_since(to, now) is None:
                continue
            held = len(self._backlog[to]) + len(self._delayed[to][1])
            since = max(over_since, self._last_progress[to])
            if now - since > timeout_s:
                raise TransportError(
                    f"node {self.node_id}: neighbour {to} accepted no message for "
                    f"{now - since:.1f} s ({held} waiting; the link is cut by --partition "
                    "for longer than --send-timeout-s)"
                )

    # -- receiving ----------------------------------------------------------
    def poll(self, timeout_s: float) -> bool:
        """Wait at most ``timeout_s`` for the inbox to become readable; True if it is."""
        return bool(self._poller.poll(max(0, int(timeout_s * 1000))))

    def recv(self) -> list | None:
        """One message from the inbox as a list of ``zmq.Frame``, or None if none is waiting."""
        try:
            frames = self._inbox.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        self.msgs_in += 1
        self.bytes_in += sum(len(f) for f in frames)
        return frames

    def _count_rejections(self) -> None:
        """Count the handshakes the inbox refused (a peer without an allowed key)."""
        while self._monitor.poll(0):
            try:
                self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.auth_rejected += 1

    def counters(self) -> dict:
        """Messages and bytes moved so far, and messages waiting (backlogs, delay queues).

        With CurveZMQ also ``auth_rejected``: handshakes the inbox refused.
        """
        if self._monitor is not None:
            self._count_rejections()
            return {**self._counters(), "auth_rejected": self.auth_rejected}
        return self._counters()

    def _counters(self) -> dict:
        return {
            "msgs_in": self.msgs_in,
            "msgs_out": self.msgs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "backlog_msgs": self.backlog_msgs,
            "delayed_msgs": self.delayed_msgs,
        } | ({"partition_held_msgs": self.partition_held_msgs} if self.partitions else {})


def _nbytes(frame) -> int:
    if isinstance(frame, bytes | bytearray):
        return len(frame)
    if isinstance(frame, zmq.Frame):
        return len(frame)
    return memoryview(frame).nbytes
