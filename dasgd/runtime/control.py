"""The control channel between ``dasgd run`` and its node processes: bootstrap and progress only.

Never training traffic. The launcher binds one ROUTER socket; each node
process connects a DEALER. Every message is one msgpack map (never pickled):

============  =========================  ==============================================
kind          direction                  fields
============  =========================  ==============================================
``ready``     node -> launcher           ``node``, ``address`` (its bound inbox), ``pid``
``start``     launcher -> node           ``addresses`` (node id as str -> inbox address),
                                         ``t0_unix_s`` (the run clock's origin, wall clock)
``progress``  node -> launcher           ``node`` and the fields of an ``interval`` record
``done``      node -> launcher           ``node``
``error``     node -> launcher           ``node``, ``message`` (one line)
``failed``    launcher -> node           ``node`` (the id of a node process that died),
                                         ``t_s`` (when the launcher saw it, run clock),
                                         ``links`` (DASGD: repair edges ``[u, v]``, see
                                         :func:`dasgd.core.failures.repair_links`),
                                         ``addresses`` (node id as str -> inbox address
                                         of every node in ``links``)
``held``      node -> launcher           ``node``, ``failed`` (the dead node) and what
                                         this node holds of it (``deltas``,
                                         ``contiguous``, ``steps``, ``fin_deltas``,
                                         ``fin_steps``: :meth:`NodeProtocol.held
                                         <dasgd.core.protocol.NodeProtocol.held>`)
``fin_of``    launcher -> node           ``node`` (the dead node), ``deltas``, ``steps``:
                                         its ``fin``, derived from every ``held``;
                                         ``lost``: its sequence numbers no survivor
                                         holds (a second death), not awaited
``finished``  launcher -> node           ``node``: a DASGD node process that exited
                                         normally after a failure; its neighbours (a
                                         repair link's too) stop awaiting its ``complete``
``alive``     node -> launcher           ``node``: a heartbeat, every :data:`HEARTBEAT_S`
                                         seconds while it runs (``--heartbeat-timeout-s``)
``rejoined``  launcher -> node           ``node`` (a restarted node), ``address`` (its new
                                         inbox), ``neighbours`` (its neighbours now)
============  =========================  ==============================================

A restarted node's ``start`` has one more field, ``restart``: ``donor`` (the
neighbour whose state it takes), ``deltas`` and ``steps`` (what the survivors
hold of its earlier work), ``neighbours``, ``failed`` (nodes dead now),
``fins`` (dead node id as str -> ``[deltas, steps]``, their derived ``fin``
so far) and ``incarnation`` (1 for its first restart).

A node's progress reports and heartbeats are dropped rather than block it; every other wait
has a deadline. ``failed`` is sent only under ``--on-node-failure continue`` or ``restart``,
to every surviving node of the run; a node reads its control socket at least
every :data:`dasgd.runtime.node.CONTROL_POLL_S` seconds while it runs. A
DASGD node answers ``failed`` with ``held`` (after handling every message
already in its inbox); once every surviving node has answered (or after
``--send-timeout-s``), the launcher sends ``fin_of``.
"""

from __future__ import annotations

import os
import time

import msgpack
import zmq

from ..errors import TransportError

__all__ = ["HEARTBEAT_S", "KINDS", "pack", "recv", "send", "unpack"]

KINDS = (
    "ready",
    "start",
    "progress",
    "done",
    "error",
    "failed",
    "held",
    "fin_of",
    "finished",
    "alive",
    "rejoined",
)
#: Seconds between a running node's ``alive`` heartbeats to its launcher.
HEARTBEAT_S = 1.0


def pack(message: dict) -> bytes:
    """A control message as bytes."""
    return msgpack.packb(message, use_bin_type=True)


def unpack(raw: bytes) -> dict | None:
    """A control message, or None if ``raw`` is not a msgpack map with a known ``kind``."""
    try:
        message = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several types on garbage: all mean "not a message"
        return None
    if not isinstance(message, dict) or message.get("kind") not in KINDS:
        return None
    return message


def send(sock: zmq.Socket, message: dict, *, droppable: bool = False) -> None:
    """Send to the launcher; ``droppable`` messages (progress) are dropped rather than block."""
    try:
        sock.send(pack(message), flags=zmq.NOBLOCK if droppable else 0)
    except zmq.Again:
        pass


def recv(sock: zmq.Socket, timeout_s: float, *, parent_pid: int) -> dict:
    """The next control message from the launcher.

    Raises
    ------
    TransportError
        If none arrives within ``timeout_s`` seconds, or the launcher (the
        process ``parent_pid``) is gone.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransportError(f"no start from the launcher within {timeout_s:.0f} s")
        if sock.poll(min(200, int(remaining * 1000) + 1)):
            message = unpack(sock.recv())
            if message is not None:
                return message
        if os.getppid() != parent_pid:
            raise TransportError("the launcher is gone")
