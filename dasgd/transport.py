"""ZeroMQ transport of one node: one PULL inbox, one PUSH socket per neighbour.

The transport moves multipart messages (lists of bytes-like frames) and knows
nothing of models or deltas. Its contract:

- A message to a live neighbour is never dropped. Sends never block the node:
  a send that would block (the neighbour's queue is at its high-water mark) is
  queued in a per-neighbour backlog, in order, and retried by :meth:`flush`.
  The node stops taking local steps while a backlog is long (backpressure) and
  fails with :class:`~dasgd.errors.TransportError` when a neighbour accepts
  nothing for ``send_timeout_s``.
- Every socket has LINGER, high-water marks and (the inbox) MAXMSGSIZE set.
- PUB/SUB is not used: it drops silently.

Addresses are ``ipc://DIR/node-<id>`` or ``tcp://HOST:PORT``; with port 0 the
operating system picks a free port and :meth:`Transport.start` returns the
address actually bound, which the launcher hands to the neighbours.
"""

from __future__ import annotations

import time
from collections import deque

import zmq

from .errors import TransportError

__all__ = ["Transport", "inbox_address"]


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

    Notes
    -----
    The constructor stores settings only; :meth:`start` creates and binds the
    sockets and :meth:`close` (idempotent) releases them. Usable as a context
    manager.
    """

    def __init__(
        self,
        node_id: int,
        bind_address: str,
        *,
        hwm_msgs: int = 1000,
        max_message_bytes: int = -1,
        linger_s: float = 5.0,
    ) -> None:
        self.node_id = node_id
        self.bind_address = bind_address
        self.hwm_msgs = hwm_msgs
        self.max_message_bytes = max_message_bytes
        self.linger_s = linger_s
        self.address: str | None = None
        self._ctx: zmq.Context | None = None
        self._inbox: zmq.Socket | None = None
        self._out: dict[int, zmq.Socket] = {}
        self._backlog: dict[int, deque] = {}
        self._last_progress: dict[int, float] = {}
        self._poller: zmq.Poller | None = None
        self.msgs_out = 0
        self.bytes_out = 0
        self.msgs_in = 0
        self.bytes_in = 0

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
        try:
            inbox.bind(self.bind_address)
        except zmq.ZMQError as exc:
            inbox.close(linger=0)
            self.close()
            raise TransportError(
                f"node {self.node_id} cannot bind {self.bind_address}: {exc.strerror}"
            ) from None
        self._inbox = inbox
        self.address = inbox.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller = zmq.Poller()
        self._poller.register(inbox, zmq.POLLIN)
        return self.address

    def connect(self, addresses: dict[int, str]) -> None:
        """Open one PUSH socket per neighbour; ``addresses`` maps neighbour id -> inbox address."""
        for node, address in addresses.items():
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, int(self.linger_s * 1000))
            sock.setsockopt(zmq.SNDHWM, self.hwm_msgs)
            sock.connect(address)
            self._out[node] = sock
            self._backlog[node] = deque()
            self._last_progress[node] = time.monotonic()

    def close(self, linger_s: float | None = None) -> None:
        """Close every socket (waiting at most ``linger_s`` for queued sends) and the context."""
        if self._ctx is None:
            return
        linger_ms = int((self.linger_s if linger_s is None else linger_s) * 1000)
        for sock in self._out.values():
            sock.close(linger=linger_ms)
        if self._inbox is not None:
            self._inbox.close(linger=0)
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

        If the neighbour's queue is full, or earlier messages wait for it, the
        message joins its backlog (order kept) and :meth:`flush` sends it later.
        Frames may be bytes, buffers or ``zmq.Frame`` objects (sent zero-copy).
        """
        backlog = self._backlog[to]
        if backlog or not self._try_send(to, frames):
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

    def flush(self) -> int:
        """Send what the backlogs hold, as far as the neighbours accept it.

        Returns
        -------
        int
            Messages still waiting in all backlogs.
        """
        waiting = 0
        for to, backlog in self._backlog.items():
            while backlog and self._try_send(to, backlog[0]):
                backlog.popleft()
            waiting += len(backlog)
        return waiting

    @property
    def backlog_msgs(self) -> int:
        """Messages waiting in all backlogs."""
        return sum(len(b) for b in self._backlog.values())

    def check_stalled(self, timeout_s: float) -> None:
        """Raise if a neighbour with a backlog accepted nothing for ``timeout_s`` seconds.

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

    def counters(self) -> dict:
        """Messages and bytes moved so far."""
        return {
            "msgs_in": self.msgs_in,
            "msgs_out": self.msgs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "backlog_msgs": self.backlog_msgs,
        }


def _nbytes(frame) -> int:
    if isinstance(frame, bytes | bytearray):
        return len(frame)
    if isinstance(frame, zmq.Frame):
        return len(frame)
    return memoryview(frame).nbytes
