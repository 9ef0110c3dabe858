"""Wire format: round trip, and every malformed message raises WireError."""

import msgpack
import numpy as np
import pytest

from dasgd.core import wire
from dasgd.core.wire import Header
from dasgd.errors import WireError

N = 4


def delta_header(**over):
    fields = dict(
        kind="delta",
        origin=1,
        sender=2,
        seq=7,
        steps=3,
        base_vv=np.array([1, 2, 3, 4]),
        sender_vv=np.array([5, 6, 7, 8]),
        dtype="float64",
        shape=(5,),
    )
    fields.update(over)
    return Header(**fields)


def frames(header=None, payload=None):
    payload = np.arange(5, dtype=np.float64) if payload is None else payload
    return [wire.encode_header(header or delta_header()), payload.tobytes()]


def decode(fr, **kw):
    args = dict(dtype="float64", n_params=5)
    args.update(kw)
    return wire.decode(fr, N, **args)


def test_delta_round_trip_is_zero_copy_view():
    fr = frames()
    header, delta = decode(fr)
    assert (header.kind, header.origin, header.sender, header.seq, header.steps) == (
        "delta",
        1,
        2,
        7,
        3,
    )
    assert header.base_vv.tolist() == [1, 2, 3, 4] and header.sender_vv.tolist() == [5, 6, 7, 8]
    assert header.base_vv.dtype == np.int64
    np.testing.assert_array_equal(delta, np.arange(5.0))  # exact: the same bytes
    assert not delta.flags.writeable
    # zero copy: the array is a view of the received payload frame's buffer
    assert np.shares_memory(delta, np.frombuffer(fr[1], dtype=np.uint8))


def test_control_message_round_trip():
    h = Header("fin", 3, 3, 10, 40, np.zeros(0, np.int64), np.array([1, 2, 3, 40]))
    header, delta = decode([wire.encode_header(h)])
    assert delta is None and (header.kind, header.seq, header.steps) == ("fin", 10, 40)


def test_header_is_msgpack_not_pickle():
    raw = wire.encode_header(delta_header())
    body = msgpack.unpackb(raw)
    assert body["v"] == wire.WIRE_VERSION and body["kind"] == "delta"
    assert not raw.startswith(b"\x80")  # pickle protocol marker


def _raw(**changes):
    body = msgpack.unpackb(wire.encode_header(delta_header()))
    body.update(changes)
    return msgpack.packb({k: v for k, v in body.items() if v is not ...}, use_bin_type=True)


@pytest.mark.parametrize(
    ("fr", "match"),
    [
        ([], "empty"),
        ([b"\xc1garbage", b""], "msgpack"),
        ([msgpack.packb([1, 2]), b""], "map"),
        ([_raw(v=99), b""], "version"),
        ([_raw(kind="gradient"), b""], "kind"),
        ([_raw(origin=4), b""], "origin"),
        ([_raw(origin=-1), b""], "origin"),
        ([_raw(sender="2"), b""], "sender"),
        ([_raw(seq=...), b""], "seq"),
        ([_raw(steps=0), b""], "steps"),
        ([_raw(steps=2**64 - 1), b""], "steps"),
        ([_raw(seq=2**32), b""], "seq"),
        ([_raw(base_vv=b"\x00" * 12), b""], "version vector"),
        ([_raw(sender_vv=[1, 2, 3, 4]), b""], "version vector"),
        ([_raw(dtype="int8"), b""], "dtype"),
        ([_raw(shape=[5, 1]), b""], "shape"),
        ([_raw(shape=[0]), b""], "shape"),
    ],
)
def test_malformed_headers_raise_wire_error(fr, match):
    with pytest.raises(WireError, match=match):
        decode(fr)


def test_payload_mismatches_raise_wire_error():
    with pytest.raises(WireError, match="expected float64\\[6\\]"):
        decode(frames(), n_params=6)
    with pytest.raises(WireError, match="float32"):
        decode(frames(), dtype="float32")
    with pytest.raises(WireError, match="bytes"):
        decode([frames()[0], b"\x00" * 39])
    with pytest.raises(WireError, match="frames"):
        decode(frames() + [b"x"])
    with pytest.raises(WireError, match="frames"):
        decode(frames()[:1])
    bad = np.arange(5.0)
    bad[3] = np.nan
    with pytest.raises(WireError, match="NaN"):
        decode(frames(payload=bad))
    bad[3] = np.inf
    with pytest.raises(WireError, match="NaN or inf"):
        decode(frames(payload=bad))
    # with the check off, the caller takes responsibility
    _, delta = decode(frames(payload=bad), check_finite=False)
    assert np.isinf(delta[3])


def test_oversized_header_rejected():
    with pytest.raises(WireError, match="exceeds"):
        wire.decode_header(b"\x00" * (wire.MAX_HEADER_BYTES + 1), N)
