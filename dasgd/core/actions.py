"""What a core state machine tells its driver to do next (the ``wait`` of ``advance``).

Every machine (:class:`~dasgd.core.node.DasgdNode`,
:class:`~dasgd.core.ps.PSWorker`, :class:`~dasgd.core.ps.PSServer`) answers
``advance(now, ...)`` with ``(sends, wait)``: the messages to put on the wire
now (:class:`~dasgd.core.protocol.Outgoing`), then either a time to wait until
(a float on the driver's clock; messages keep being handled meanwhile) or one
of these names.
"""

__all__ = [
    "CONTINUE",
    "DONE",
    "WAIT_BACKLOG",
    "WAIT_DRAIN",
    "WAIT_LEAD",
    "WAIT_MESSAGE",
    "WAIT_STATE",
    "WAITS",
]

#: Nothing to wait for: handle what has arrived, then advance again.
CONTINUE = "continue"
#: Wait for the next message (a PS worker for its model, the server for gradients).
WAIT_MESSAGE = "message"
#: DASGD's lead bound holds the node: wait for a message from a slower neighbour.
WAIT_LEAD = "lead"
#: Too much waits to be sent (backpressure): let the transport drain.
WAIT_BACKLOG = "backlog"
#: Finished stepping: wait for the other nodes' deltas.
WAIT_DRAIN = "drain"
#: A restarted DASGD node waits for its neighbour's state (``--on-node-failure restart``).
WAIT_STATE = "state"
#: Finished: write the results and stop.
DONE = "done"
#: The names that mean "handle messages until one arrives".
WAITS = (WAIT_MESSAGE, WAIT_LEAD, WAIT_BACKLOG, WAIT_DRAIN, WAIT_STATE)
