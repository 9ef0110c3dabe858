"""The dasgd message format: a msgpack header frame plus one raw array frame.

Every message between nodes is a ZeroMQ multipart message of one or two frames:

========  ==========================================================================
frame     content
========  ==========================================================================
0         msgpack map, the header (fields below); at most ``MAX_HEADER_BYTES``
1         only for ``kind == "delta"``: the delta as raw little-endian bytes of
          ``dtype`` and ``shape`` (C order), sent with ``copy=False``
========  ==========================================================================

Header fields (all required unless marked):

=============  ========  ===============================================================
field          type      meaning
=============  ========  ===============================================================
``v``          int       wire version, :data:`WIRE_VERSION`
``kind``       str       one of :data:`KINDS` (see below)
``origin``     int       node whose local steps the message describes (0..n-1)
``sender``     int       node that put this copy on the wire (a neighbour of the receiver)
``seq``        int       origin's sequence number of the delta (0, 1, ...); for ``fin``:
                         the number of deltas the origin sealed in the whole run; for
                         ``grad``: the model version t the gradient was computed at;
                         for ``model``: the version t of the model sent
``steps``      int       local steps summed in the delta (>= 1); for ``fin``: the
                         origin's total local steps in the run
``base_vv``    bytes     origin's version vector when the delta's window opened,
                         n little-endian uint32 (``delta``; for ``have``: the
                         sender's contiguous delta counts per origin; else empty)
``sender_vv``  bytes     sender's version vector when it sent this copy, n uint32
                         (DASGD kinds only, else empty)
``dtype``      str       ``"float32"`` or ``"float64"`` (kinds with an array, else ``""``)
``shape``      [int]     shape of the array frame (kinds with an array, else ``[]``)
=============  ========  ===============================================================

Kinds: ``delta`` carries parameter changes and is flooded to every node
(ALGORITHMS.md §1, step 4); ``fin`` announces that its origin has stopped
stepping and how many deltas and steps it produced, flooded like a delta;
``complete`` tells a neighbour that the sender holds every delta of the run
(only sent to neighbours, never forwarded). ``have`` (anti-entropy after a node
failure, only to neighbours, never forwarded): ``origin`` is the dead node,
``base_vv`` the sender's per-origin contiguous delta counts (every seq below
is held; its own entry: the deltas it sealed), ``seq`` 0 asks the neighbour to
send the deltas it holds at or above those counts and to answer with its own
``have``, ``seq`` 1 is that answer; a ``have`` whose ``origin`` is its sender
comes from a restarted node that has just installed its state (the neighbour
sends it the deltas and ``fin`` messages it may lack, and expects no answer).
Version vectors (ALGORITHMS.md §2) count local steps per origin.

Restart with state transfer (``--on-node-failure restart``): a restarted node
sends ``join`` to a live neighbour (``origin`` = ``sender`` = the restarted
node, ``seq`` = how many of its own earlier deltas the survivors hold); that
neighbour answers, once it holds them, with ``state``: its model as the array
frame (without its own open window), ``sender_vv`` its version vector,
``base_vv`` its per-origin contiguous delta counts, and one more header field,
``extra``, a map: ``applied`` (deltas applied per origin, n uint32 bytes),
``above`` (list of ``[origin, [seq, ...]]``: deltas applied beyond the
contiguous counts), ``fin_deltas`` and ``fin_steps`` (the ``fin`` totals it
knows per origin, n uint32 bytes, 2**32 - 1 where unknown) and ``failed``
(list of node ids it knows dead).

The parameter-server baselines (:mod:`dasgd.core.ps`) use three more kinds on the
same frames: ``grad`` (worker -> server, a gradient with the model version it
was computed at), ``model`` (server -> worker, the current model and its
version) and ``stop`` (server -> worker, no array). Their node ids are the
workers 0..n-1 and the server n.

Nothing is ever pickled. :func:`decode` validates everything a peer controls and
raises :class:`~dasgd.errors.WireError` on any problem; the node counts and drops
such a message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack
import numpy as np

from ..errors import WireError

WIRE_VERSION = 1
KINDS = ("delta", "fin", "complete", "have", "join", "state", "grad", "model", "stop")
#: kinds whose second frame is an array
ARRAY_KINDS = ("delta", "state", "grad", "model")
#: kinds the DASGD protocol floods or exchanges with neighbours (:class:`NodeProtocol`)
VV_KINDS = ("delta", "fin", "complete", "have")
#: kinds that carry the sender's version vector
SENDER_VV_KINDS = (*VV_KINDS, "state")
#: kinds that carry a ``base_vv`` vector
BASE_VV_KINDS = ("delta", "have", "state")

_NO_VV = np.zeros(0, np.int64)
#: largest sequence number or step count a header may carry (version vectors are uint32)
MAX_COUNT = 2**32 - 1
UNKNOWN_COUNT = MAX_COUNT
DTYPES = ("float32", "float64")
MAX_HEADER_BYTES = 1 << 24
_VV_DTYPE = np.dtype("<u4")

__all__ = [
    "DTYPES",
    "ARRAY_KINDS",
    "KINDS",
    "SENDER_VV_KINDS",
    "UNKNOWN_COUNT",
    "VV_KINDS",
    "WIRE_VERSION",
    "Header",
    "check_finite_array",
    "decode",
    "decode_header",
    "encode_header",
    "vv_from_bytes",
    "vv_to_bytes",
]


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded, validated message header (see the module docstring for fields).

    ``base_vv`` and ``sender_vv`` are int64 arrays of shape (n_nodes,)
    (``base_vv`` has shape (0,) for kinds other than ``delta``).
    """

    kind: str
    origin: int
    sender: int
    seq: int
    steps: int
    base_vv: np.ndarray
    sender_vv: np.ndarray
    dtype: str = ""
    shape: tuple[int, ...] = ()
    extra: dict | None = None

    def replace_sender(self, sender: int, sender_vv: np.ndarray) -> Header:
        """The same message as relayed by ``sender``, whose vector is ``sender_vv``."""
        return Header(
            self.kind,
            self.origin,
            sender,
            self.seq,
            self.steps,
            self.base_vv,
            sender_vv,
            self.dtype,
            self.shape,
            self.extra,
        )


def vv_to_bytes(vv: np.ndarray) -> bytes:
    """Version vector (n,) of non-negative ints -> n little-endian uint32 bytes."""
    return np.asarray(vv).astype(_VV_DTYPE, copy=False).tobytes()


def vv_from_bytes(raw: bytes, n_nodes: int) -> np.ndarray:
    """Inverse of :func:`vv_to_bytes`; returns int64 (n_nodes,).

    Raises
    ------
    WireError
        If ``raw`` is not ``4 * n_nodes`` bytes.
    """
    if not isinstance(raw, bytes | bytearray) or len(raw) != 4 * n_nodes:
        got = len(raw) if isinstance(raw, bytes | bytearray) else type(raw).__name__
        raise WireError(f"version vector has {got} bytes, expected {4 * n_nodes}")
    return np.frombuffer(raw, dtype=_VV_DTYPE).astype(np.int64)


def encode_header(header: Header) -> bytes:
    """Serialize a header to the msgpack bytes of frame 0."""
    body = {
        "v": WIRE_VERSION,
        "kind": header.kind,
        "origin": header.origin,
        "sender": header.sender,
        "seq": header.seq,
        "steps": header.steps,
        "base_vv": vv_to_bytes(header.base_vv) if header.kind in BASE_VV_KINDS else b"",
        "sender_vv": vv_to_bytes(header.sender_vv) if header.kind in SENDER_VV_KINDS else b"",
        "dtype": header.dtype,
        "shape": list(header.shape),
    }
    if header.kind == "state":
        body["extra"] = header.extra
    return msgpack.packb(body, use_bin_type=True)


def _state_extra(extra, n_nodes: int) -> dict:
    """Validate a ``state`` message's ``extra`` map (see the module docstring)."""
    if not isinstance(extra, dict):
        raise WireError(f"state message's extra is {type(extra).__name__}, expected a map")
    out = {}
    for key in ("applied", "fin_deltas", "fin_steps"):
        out[key] = vv_from_bytes(extra.get(key), n_nodes)
    failed = extra.get("failed")
    if not isinstance(failed, list) or not all(type(k) is int and 0 <= k < n_nodes for k in failed):
        raise WireError(f"state message's failed list {failed!r} is not node ids")
    out["failed"] = failed
    above = extra.get("above")
    if not isinstance(above, list):
        raise WireError("state message's above is not a list")
    parsed = {}
    for entry in above:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or type(entry[0]) is not int
            or not 0 <= entry[0] < n_nodes
            or not isinstance(entry[1], list)
            or not all(type(q) is int and 0 <= q <= MAX_COUNT for q in entry[1])
        ):
            raise WireError(
                f"state message's above entry {str(entry)[:80]} is not [origin, [seq, ...]]"
            )
        parsed[entry[0]] = entry[1]
    out["above"] = parsed
    return out


def _int_field(body: dict, key: str, low: int, high: int | None = None) -> int:
    value = body.get(key)
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise WireError(f"header field {key!r} is {value!r}, expected an int {bound}")
    return value


def decode_header(raw: bytes, n_nodes: int) -> Header:
    """Parse and validate frame 0.

    Parameters
    ----------
    raw : bytes
        The msgpack header frame.
    n_nodes : int
        Number of nodes of the run; bounds node ids and version-vector lengths.

    Returns
    -------
    Header

    Raises
    ------
    WireError
        On any malformed field, unknown kind or wrong wire version.
    """
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        body = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise WireError(f"header is a {type(body).__name__}, expected a map")
    if body.get("v") != WIRE_VERSION:
        raise WireError(f"wire version {body.get('v')!r}, expected {WIRE_VERSION}")
    kind = body.get("kind")
    if kind not in KINDS:
        raise WireError(f"unknown message kind {kind!r}, expected one of {', '.join(KINDS)}")
    origin = _int_field(body, "origin", 0, n_nodes - 1)
    sender = _int_field(body, "sender", 0, n_nodes - 1)
    # counts travel as uint32 in version vectors: larger values are never legitimate
    seq = _int_field(body, "seq", 0, MAX_COUNT)
    steps = _int_field(body, "steps", 1 if kind in ("delta", "grad") else 0, MAX_COUNT)
    sender_vv = vv_from_bytes(body.get("sender_vv"), n_nodes) if kind in SENDER_VV_KINDS else _NO_VV
    if kind == "have":
        if seq > 1:
            raise WireError(f"have with seq {seq}: 0 (a request) or 1 (an answer)")
        base_vv = vv_from_bytes(body.get("base_vv"), n_nodes)
        return Header(kind, origin, sender, seq, steps, base_vv, sender_vv)
    if kind not in ARRAY_KINDS:
        return Header(kind, origin, sender, seq, steps, _NO_VV, sender_vv)
    base_vv = vv_from_bytes(body.get("base_vv"), n_nodes) if kind in BASE_VV_KINDS else _NO_VV
    extra = _state_extra(body.get("extra"), n_nodes) if kind == "state" else None
    dtype = body.get("dtype")
    if dtype not in DTYPES:
        raise WireError(f"dtype {dtype!r}, expected one of {', '.join(DTYPES)}")
    shape = body.get("shape")
    if not isinstance(shape, list) or len(shape) != 1 or type(shape[0]) is not int or shape[0] < 1:
        raise WireError(f"shape {shape!r}, expected [n_params] with n_params >= 1")
    return Header(kind, origin, sender, seq, steps, base_vv, sender_vv, dtype, (shape[0],), extra)


def decode(
    frames: list,
    n_nodes: int,
    *,
    dtype: str,
    n_params: int,
    check_finite: bool = True,
) -> tuple[Header, np.ndarray | None]:
    """Validate a whole message and view its array frame without copying.

    Parameters
    ----------
    frames : list of bytes-like or zmq.Frame
        The multipart message as received.
    n_nodes : int
        Number of nodes of the run.
    dtype : {"float32", "float64"}
        The run's parameter dtype; a delta of another dtype is rejected.
    n_params : int
        The model's number of parameters; a delta of another shape is rejected.
    check_finite : bool, default True
        Reject deltas containing NaN or inf (one extra pass over the data; a
        delta whose finite values overflow when summed is rejected too).

    Returns
    -------
    header : Header
    array : ndarray of shape (n_params,) and the run's dtype, read-only, or None
        A zero-copy view of frame 1 for kinds in :data:`ARRAY_KINDS`; None otherwise.

    Raises
    ------
    WireError
        If anything about the message is malformed.
    """
    if not frames:
        raise WireError("empty message")
    header = decode_header(_as_bytes(frames[0]), n_nodes)
    if header.kind not in ARRAY_KINDS:
        if len(frames) != 1:
            raise WireError(f"{header.kind} message has {len(frames)} frames, expected 1")
        return header, None
    if len(frames) != 2:
        raise WireError(f"{header.kind} message has {len(frames)} frames, expected 2")
    if header.dtype != dtype or header.shape != (n_params,):
        raise WireError(
            f"{header.kind} of {header.dtype}{list(header.shape)}, expected {dtype}[{n_params}]"
        )
    payload = frames[1]
    buffer = payload.buffer if hasattr(payload, "buffer") else memoryview(payload)
    expected = n_params * np.dtype(dtype).itemsize
    if buffer.nbytes != expected:
        raise WireError(f"delta frame has {buffer.nbytes} bytes, expected {expected}")
    delta = np.frombuffer(buffer, dtype=np.dtype(dtype).newbyteorder("<"))
    if check_finite:
        check_finite_array(header, delta)
    return header, delta


def check_finite_array(header: Header, array: np.ndarray) -> None:
    """Raise :class:`~dasgd.errors.WireError` if ``array`` holds NaN or inf.

    One BLAS pass and no temporary: ``dot(a, a)`` is NaN or inf if any element
    is (measured 253 us for 4 MB out of cache, against 376 us for a min and a
    max reduction). It also rejects arrays whose squared norm overflows
    (elements beyond ~1e19 in float32, ~1e154 in float64), which no usable
    delta has. Callers that may drop the message anyway (a duplicate delta)
    decode with ``check_finite=False`` and call this only for messages they use.
    """
    if not math.isfinite(float(np.dot(array, array))):
        raise WireError(f"{header.kind} {header.origin}:{header.seq} contains NaN or inf")


def _as_bytes(frame) -> bytes:
    if hasattr(frame, "bytes"):
        return frame.bytes
    return bytes(frame)
