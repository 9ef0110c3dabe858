"""The ZeroMQ transport on real sockets: round trip, backlog, stalls, emulated latency, lifecycle.

Every wait has a deadline; lower bounds on latency are strict (a delayed
message must never arrive early), upper bounds generous (a slow machine must
not fail a test).
"""

import shutil
import tempfile
import time

import pytest
import zmq

from dasgd.core.emulation import Partitions, parse_partition
from dasgd.errors import TransportError
from dasgd.runtime.transport import Transport, inbox_address

from .conftest import wait_for

#: Generous upper bound for anything that should happen "soon".
DEADLINE_S = 5.0
#: Large enough that a few messages fill the kernel's socket buffers (~200 KiB).
BIG_BYTES = 256 * 1024


@pytest.fixture
def ipc_dir():
    path = tempfile.mkdtemp(prefix="dt-", dir="/tmp")  # ipc paths are limited to ~100 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def transports():
    """Make started transports; every one is closed with linger 0 at teardown."""
    made = []

    def make(node_id, address, **kwargs):
        t = Transport(node_id, address, **kwargs)
        made.append(t)
        t.start()
        return t

    yield make
    for t in made:
        t.close(linger_s=0)


def ipc(ipc_dir, node_id):
    return inbox_address("ipc", node_id, host="", base_port=0, ipc_dir=ipc_dir)


def pair(transports, ipc_dir, **sender_kwargs):
    """Node 0 (sender) connected to node 1 (receiver)."""
    hwm = sender_kwargs.pop("hwm_msgs", 1000)
    a = transports(0, ipc(ipc_dir, 0), hwm_msgs=hwm, **sender_kwargs)
    b = transports(1, ipc(ipc_dir, 1), hwm_msgs=hwm)
    a.connect({1: b.address})
    return a, b


def recv_one(receiver, sender=None, timeout_s=DEADLINE_S):
    """The next message of ``receiver`` (flushing ``sender`` meanwhile) and when it arrived."""
    deadline = time.monotonic() + timeout_s
    while True:
        frames = receiver.recv()
        if frames is not None:
            return frames, time.monotonic()
        if time.monotonic() > deadline:
            pytest.fail(f"no message within {timeout_s} s")
        if sender is not None:
            sender.flush()
            wait_s = sender.next_due_s()
            receiver.poll(0.005 if wait_s is None else min(0.005, wait_s))
        else:
            receiver.poll(0.005)


def recv_n(receiver, n, sender=None, timeout_s=DEADLINE_S):
    """``n`` messages (each with its arrival time), flushing ``sender`` meanwhile."""
    deadline = time.monotonic() + timeout_s
    return [recv_one(receiver, sender, deadline - time.monotonic()) for _ in range(n)]


def seq(frames) -> int:
    return int.from_bytes(frames[0].bytes, "little")


def message(i: int, payload_bytes: int = 0) -> list:
    frames = [i.to_bytes(4, "little")]
    if payload_bytes:
        frames.append(bytes(payload_bytes))
    return frames


# -- basics -------------------------------------------------------------------


def test_round_trip_and_counters(transports, ipc_dir):
    a, b = pair(transports, ipc_dir)
    a.send(1, [b"head", b"body!"])
    assert a.counters() == {
        "msgs_in": 0,
        "msgs_out": 1,
        "bytes_in": 0,
        "bytes_out": 9,
        "backlog_msgs": 0,
        "delayed_msgs": 0,
    }
    assert not a.has_pending
    frames, _ = recv_one(b)
    assert [f.bytes for f in frames] == [b"head", b"body!"]
    assert b.counters()["msgs_in"] == 1
    assert b.counters()["bytes_in"] == 9
    assert b.recv() is None


def test_zero_copy_frames_and_buffers(transports, ipc_dir):
    a, b = pair(transports, ipc_dir)
    payload = bytearray(b"x" * 1000)
    a.send(1, [b"h", zmq.Frame(memoryview(payload)), memoryview(payload)[:10]])
    assert a.bytes_out == 1 + 1000 + 10
    frames, _ = recv_one(b)
    assert [len(f) for f in frames] == [1, 1000, 10]


# -- backlog and stalls ---------------------------------------------------------


def test_backlog_never_blocks_keeps_order_and_loses_nothing(transports, ipc_dir):
    a, b = pair(transports, ipc_dir, hwm_msgs=2)
    n = 40
    t0 = time.monotonic()
    for i in range(n):
        a.send(1, message(i, BIG_BYTES))  # the receiver reads nothing yet
    assert time.monotonic() - t0 < DEADLINE_S
    waiting = a.flush()
    assert waiting > 0
    assert waiting == a.backlog_msgs == a.counters()["backlog_msgs"]
    assert a.has_pending
    assert a.delayed_msgs == 0
    assert a.msgs_out + waiting == n
    received = recv_n(b, n, sender=a)
    assert [seq(frames) for frames, _ in received] == list(range(n))
    assert a.flush() == 0
    assert not a.has_pending
    assert a.msgs_out == b.msgs_in == n
    assert a.bytes_out == b.bytes_in == n * (4 + BIG_BYTES)
    assert b.recv() is None


def stall_time(sender, timeout_s):
    """Call flush + check_stalled until it raises; the error and when it was raised."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        sender.flush()
        try:
            sender.check_stalled(timeout_s=timeout_s)
        except TransportError as exc:
            return exc, time.monotonic()
        wait_s = sender.next_due_s()
        sender.poll(0.005 if wait_s is None else min(0.005, wait_s))  # a bounded wait, not a sleep
    pytest.fail(f"check_stalled did not raise within {DEADLINE_S} s")


def test_check_stalled_names_the_neighbour(transports, ipc_dir):
    a, b = pair(transports, ipc_dir, hwm_msgs=2)
    a.check_stalled(timeout_s=0.0)  # nothing waiting: never stalled
    t0 = time.monotonic()
    for i in range(40):
        a.send(1, message(i, BIG_BYTES))
    assert a.backlog_msgs > 0
    exc, t_raised = stall_time(a, timeout_s=0.2)
    assert t_raised - t0 > 0.2
    assert "neighbour 1" in str(exc)
    assert "waiting" in str(exc)


def test_idle_link_is_not_a_stall(transports, ipc_dir):
    """The stall clock starts when the backlog fills, not at the link's last accepted message.

    Nobody is bound at the neighbour's address, so ZeroMQ queues exactly
    ``hwm_msgs`` messages (no kernel buffers) and refuses the next one.
    """
    a = transports(0, ipc(ipc_dir, 0), hwm_msgs=2)
    a.connect({1: ipc(ipc_dir, 1)})
    a.send(1, message(0))
    a.send(1, message(1))
    assert a.msgs_out == 2
    t_idle = time.monotonic()
    wait_for(lambda: time.monotonic() - t_idle > 0.5, DEADLINE_S, "an idle link")
    t_send = time.monotonic()
    a.send(1, message(2))
    assert a.backlog_msgs == 1
    # refused for at most (now - t_send); the last accepted message is > 0.5 s older
    a.check_stalled(timeout_s=time.monotonic() - t_send + 0.4)
    exc, t_raised = stall_time(a, timeout_s=0.2)
    assert t_raised - t_send > 0.2
    assert "neighbour 1" in str(exc)


def test_no_backlog_no_stall_while_receiver_reads(transports, ipc_dir):
    a, b = pair(transports, ipc_dir, hwm_msgs=2)
    for i in range(20):
        a.send(1, message(i, BIG_BYTES))
    deadline = time.monotonic() + DEADLINE_S
    got = 0
    while got < 20 and time.monotonic() < deadline:
        a.flush()
        a.check_stalled(timeout_s=DEADLINE_S)
        if b.poll(0.005):
            while b.recv() is not None:
                got += 1
    assert got == 20


# -- latency --------------------------------------------------------------------


def test_latency_delays_a_message(transports, ipc_dir):
    a, b = pair(transports, ipc_dir, latency_s={1: 0.2})
    assert a.next_due_s() is None
    t0 = time.monotonic()
    a.send(1, message(7))
    assert a.delayed_msgs == 1
    assert a.counters()["delayed_msgs"] == 1
    assert a.has_pending
    assert 0 <= a.next_due_s() <= 0.2
    assert a.msgs_out == 0
    assert a.flush() == 0  # delayed messages are on the wire, not a backlog
    assert a.backlog_msgs == 0
    a.check_stalled(timeout_s=0.0)  # time inside the delay is not a stall

    # not there at 0.1 s, with the sender flushing all along (if it is there, it is not early)
    while time.monotonic() - t0 < 0.1:
        a.flush()
        if b.poll(0.005):
            assert time.monotonic() - t0 >= 0.2

    frames, t_recv = recv_one(b, sender=a)
    assert seq(frames) == 7
    assert t_recv - t0 >= 0.2  # never early
    assert t_recv - t0 < DEADLINE_S
    assert a.delayed_msgs == 0
    assert not a.has_pending
    assert a.next_due_s() is None
    assert a.msgs_out == 1


def test_latency_burst_keeps_order(transports, ipc_dir):
    a, b = pair(transports, ipc_dir, latency_s={1: 0.2})
    n = 50
    sent_at = []
    for i in range(n):
        sent_at.append(time.monotonic())
        a.send(1, message(i, 100))
    assert a.delayed_msgs == n
    received = recv_n(b, n, sender=a)
    assert [seq(frames) for frames, _ in received] == list(range(n))
    for (_, t_recv), t_sent in zip(received, sent_at, strict=True):
        assert t_recv - t_sent >= 0.2
    assert received[-1][1] - sent_at[0] < DEADLINE_S
    assert a.msgs_out == b.msgs_in == n
    assert not a.has_pending


def test_latency_with_backlog_keeps_order(transports, ipc_dir):
    """Due messages go behind the backlog; delayed ones never count as backlog."""
    a, b = pair(transports, ipc_dir, hwm_msgs=2, latency_s={1: 0.1})
    n = 30
    for i in range(n):
        a.send(1, message(i, BIG_BYTES))
    assert a.flush() == 0
    assert a.delayed_msgs == n
    wait_for(lambda: a.flush() > 0, DEADLINE_S, "due messages refused into the backlog")
    assert a.delayed_msgs + a.backlog_msgs + a.msgs_out == n
    received = recv_n(b, n, sender=a)
    assert [seq(frames) for frames, _ in received] == list(range(n))
    assert not a.has_pending


def test_time_in_delay_is_not_a_stall(transports, ipc_dir):
    """A delayed message refused when due: the stall clock starts at its release, not before."""
    a = transports(0, ipc(ipc_dir, 0), hwm_msgs=2, latency_s={1: 0.3})
    a.connect({1: ipc(ipc_dir, 1)})  # nobody bound: ZeroMQ queues exactly 2 messages
    a.send(1, message(0))
    a.send(1, message(1))
    wait_for(lambda: a.flush() == 0 and a.msgs_out == 2, DEADLINE_S, "2 messages accepted")
    t_send = time.monotonic()
    a.send(1, message(2))  # due 0.3 s from now, then refused: the queue is full
    exc, t_raised = stall_time(a, timeout_s=0.2)
    assert t_raised - t_send > 0.3 + 0.2
    assert a.backlog_msgs == 1
    assert "neighbour 1" in str(exc)


def test_link_without_latency_is_unaffected(transports, ipc_dir):
    a = transports(0, ipc(ipc_dir, 0), latency_s={1: 0.2, 3: 0.5})
    b = transports(1, ipc(ipc_dir, 1))
    c = transports(2, ipc(ipc_dir, 2))
    a.connect({1: b.address, 2: c.address})
    a.send(1, message(1))
    a.send(2, message(2))
    assert a.delayed_msgs == 1
    assert a.msgs_out == 1  # handed to ZeroMQ at once
    frames, _ = recv_one(c)  # arrives without any flush
    assert seq(frames) == 2
    frames, _ = recv_one(b, sender=a)
    assert seq(frames) == 1


def test_next_due_is_the_earliest(transports, ipc_dir):
    a = transports(0, ipc(ipc_dir, 0), latency_s={1: 0.2, 2: 3.0})
    b = transports(1, ipc(ipc_dir, 1))
    c = transports(2, ipc(ipc_dir, 2))
    a.connect({1: b.address, 2: c.address})
    a.send(2, message(2))
    assert 0.2 < a.next_due_s() <= 3.0
    a.send(1, message(1))
    assert 0 <= a.next_due_s() <= 0.2
    assert a.delayed_msgs == 2
    wait_for(lambda: a.next_due_s() == 0.0, DEADLINE_S, "the short link's message to fall due")
    assert a.delayed_msgs == 2  # overdue but not flushed yet
    frames, _ = recv_one(b, sender=a)
    assert seq(frames) == 1
    assert a.delayed_msgs == 1
    assert a.has_pending
    assert 0 < a.next_due_s() <= 3.0


def test_zero_latency_means_none(transports, ipc_dir):
    a, b = pair(transports, ipc_dir, latency_s={1: 0.0})
    a.send(1, message(1))
    assert a.msgs_out == 1
    assert a.delayed_msgs == 0
    assert a.next_due_s() is None


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_latency_is_refused(bad):
    with pytest.raises(ValueError, match="neighbour 3"):
        Transport(0, "ipc:///tmp/unused", latency_s={3: bad})


def test_close_hands_over_due_and_drops_the_rest(transports, ipc_dir):
    a = transports(0, ipc(ipc_dir, 0), latency_s={1: 0.05, 2: 30.0})
    b = transports(1, ipc(ipc_dir, 1))
    c = transports(2, ipc(ipc_dir, 2))
    a.connect({1: b.address, 2: c.address})
    a.send(1, message(1))
    a.send(2, message(2))
    wait_for(lambda: a.next_due_s() == 0.0, DEADLINE_S, "the short link's message to fall due")
    t0 = time.monotonic()
    a.close(linger_s=DEADLINE_S)
    assert time.monotonic() - t0 < DEADLINE_S
    assert a.delayed_msgs == 0
    assert a.msgs_out == 1  # the due one was handed over, the other dropped
    frames, _ = recv_one(b)
    assert seq(frames) == 1
    assert not c.poll(0.05)


# -- lifecycle ------------------------------------------------------------------


# -- partitions (emulated cuts) ---------------------------------------------------------


def cut_pair(transports, ipc_dir, spec, t0, **sender_kwargs):
    """Node 0 -> node 1 with the cuts of ``spec`` on a run clock that started at ``t0``."""
    a, b = pair(transports, ipc_dir, partitions=Partitions(parse_partition(spec)), **sender_kwargs)
    a.start_run_clock(t0)
    return a, b


def test_cut_holds_messages_and_delivers_them_in_order_at_its_end(transports, ipc_dir):
    t0 = time.monotonic()
    a, b = cut_pair(transports, ipc_dir, "0-1@0.2+0.4", t0)
    assert a.counters()["partition_held_msgs"] == 0
    a.send(1, message(0))  # before the cut: at once
    assert seq(recv_one(b, sender=a)[0]) == 0
    wait_for(lambda: time.monotonic() - t0 >= 0.25, DEADLINE_S, "the cut")
    n = 20
    for i in range(1, n + 1):
        a.send(1, message(i, 100))
    assert a.delayed_msgs == n and a.msgs_out == 1
    assert a.counters()["partition_held_msgs"] == n
    assert a.flush() == 0  # held messages are on the wire: no backpressure
    a.check_stalled(timeout_s=DEADLINE_S)
    received = recv_n(b, n, sender=a)
    assert [seq(frames) for frames, _ in received] == list(range(1, n + 1))
    assert all(t - t0 >= 0.6 for _, t in received)  # nothing arrives during the cut
    assert not a.has_pending
    a.send(1, message(99))  # after the cut: at once again
    assert seq(recv_one(b, sender=a)[0]) == 99
    assert a.partition_held_msgs == n


def test_cut_takes_effect_only_on_the_run_clock_and_only_on_its_link(transports, ipc_dir):
    spec = "0-1@0+30"
    a = transports(0, ipc(ipc_dir, 0), partitions=Partitions(parse_partition(spec)))
    b = transports(1, ipc(ipc_dir, 1))
    c = transports(2, ipc(ipc_dir, 2))
    a.connect({1: b.address, 2: c.address})
    a.send(1, message(0))  # the run clock has not started: no cut yet
    assert seq(recv_one(b, sender=a)[0]) == 0
    a.start_run_clock(time.monotonic())
    a.send(1, message(1))
    a.send(2, message(2))
    assert seq(recv_one(c, sender=a)[0]) == 2
    assert a.delayed_msgs == 1
    assert 29 < a.next_due_s() <= 30  # held until the end of the cut
    assert a.max_delay_s() > 29


def test_cut_with_latency_holds_until_the_later_of_both(transports, ipc_dir):
    t0 = time.monotonic()
    a, b = cut_pair(transports, ipc_dir, "0-1@0+0.3", t0, latency_s={1: 0.1})
    a.send(1, message(0))  # due at 0.1 s, inside the cut: released at 0.3 s
    frames, t_recv = recv_one(b, sender=a)
    assert t_recv - t0 >= 0.3
    t_send = time.monotonic()
    a.send(1, message(1))  # after the cut: the latency only
    frames, t_recv = recv_one(b, sender=a)
    assert seq(frames) == 1 and t_recv - t_send >= 0.1
    assert a.partition_held_msgs == 1


def test_a_host_cut_cuts_links_connected_later(transports, ipc_dir):
    """A repair link to a cut host (connected after the clock started) is cut too."""
    a = transports(0, ipc(ipc_dir, 0), partitions=Partitions(parse_partition("2@0+30")))
    c = transports(2, ipc(ipc_dir, 2))
    a.start_run_clock(time.monotonic())
    a.connect({2: c.address})
    a.send(2, message(5))
    assert a.delayed_msgs == 1 and a.partition_held_msgs == 1
    assert a.disconnect(2) == 1  # a dead neighbour's held messages are discarded


def test_backlog_does_not_drain_during_a_cut(transports, ipc_dir):
    """Messages refused before the cut stay in the backlog until it ends (a real link delivers nothing)."""
    a = transports(
        0, ipc(ipc_dir, 0), hwm_msgs=2, partitions=Partitions(parse_partition("0-1@0.3+0.5"))
    )
    t0 = time.monotonic()
    a.start_run_clock(t0)
    a.connect({1: ipc(ipc_dir, 1)})  # nobody bound yet: ZeroMQ queues exactly 2 messages
    for i in range(5):
        a.send(1, message(i))
    assert a.msgs_out == 2 and a.backlog_msgs == 3
    wait_for(lambda: time.monotonic() - t0 >= 0.35, DEADLINE_S, "the cut")
    b = transports(1, ipc(ipc_dir, 1), hwm_msgs=2)  # the neighbour binds during the cut
    got = []
    while time.monotonic() - t0 < 0.7:
        a.flush()
        if b.poll(0.005):
            while (frames := b.recv()) is not None:
                got.append(seq(frames))
    assert got == [0, 1]  # what ZeroMQ had taken before the cut; the backlog waited
    assert a.backlog_msgs == 3
    rest = recv_n(b, 3, sender=a)
    assert [seq(frames) for frames, _ in rest] == [2, 3, 4]
    assert all(t - t0 >= 0.8 for _, t in rest)


def test_a_cut_is_backpressure_and_a_stall_once_it_holds_more_than_the_high_water_mark(
    transports, ipc_dir
):
    t0 = time.monotonic()
    a, b = cut_pair(transports, ipc_dir, "0-1@0+30", t0, hwm_msgs=3)
    for i in range(3):  # up to the mark: a real link's queue takes them
        a.send(1, message(i))
    assert a.flush() == 0
    t_over = time.monotonic()
    a.check_stalled(timeout_s=0.0)  # cut, but not beyond the mark: no stall
    for i in range(3, 5):
        a.send(1, message(i))
    assert a.flush() == 2  # beyond the mark: backpressure, as a refused send
    a.check_stalled(timeout_s=0.3)  # over the mark for less than the timeout: survived
    exc, t_raised = stall_time(a, timeout_s=0.3)
    assert t_raised - t_over > 0.3
    assert "neighbour 1" in str(exc) and "--partition" in str(exc)


def test_bind_failure_names_the_address(transports):
    a = transports(0, "tcp://127.0.0.1:*")
    assert a.address.startswith("tcp://127.0.0.1:")
    with pytest.raises(TransportError, match=a.address.replace(".", r"\.")):
        transports(1, a.address)


def test_close_twice_and_context_manager(ipc_dir):
    t = Transport(0, ipc(ipc_dir, 0))
    t.close()  # never started: nothing to release
    with Transport(0, ipc(ipc_dir, 0), linger_s=0) as t:
        assert t.address == ipc(ipc_dir, 0)
        t.connect({1: ipc(ipc_dir, 1)})  # nobody there: the message waits in ZeroMQ
        t.send(1, message(1))
    t.close()
    t.close()
    assert t._ctx is None
