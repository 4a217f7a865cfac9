"""The wire format and the receivers' defences: forged, malformed, truncated, wrong-cluster
and stale-epoch messages are dropped and counted, never applied, never fatal.

The standby's handlers are fed frames directly (a rogue publisher cannot easily be
injected into a SUB socket); the primary's ROUTER gets frames from a real DEALER.
"""

from __future__ import annotations

import os
import struct
import threading
import uuid
import zlib
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from journal import ops
from journal.check import digest
from journal.checkpoints import Checkpoints, RetentionPolicy, prune_point
from journal.records import encode_record
from journal.store import Store
from replica import protocol as p
from replica.control import socket_path
from replica.primary import PrimaryReplication
from replica.standby import Follower, State
from tests.cluster import Cluster, cli, cluster_fixture, wait_until  # noqa: F401 - a fixture

CLUSTER = uuid.UUID(int=7).bytes
OTHER = uuid.UUID(int=8).bytes


def mkdir_op(ino: int, name: bytes) -> ops.Op:
    return ops.MakeNode(parent=1, ino=ino, mode=0o40755, rdev=0, uid=0, gid=0, time_ns=1, name=name)


def records(first: int, count: int, cluster_id: bytes = CLUSTER, epoch: int = 1) -> list[bytes]:
    return [encode_record(cluster_id, epoch, seq, mkdir_op(seq + 100, b"d%d" % seq))
            for seq in range(first, first + count)]


# --- the codec ---------------------------------------------------------------------------
BODY_VALUES = {
    p.MsgType.RECORDS: ((2, 2, p.RECORDS_FLUSH), records(2, 2)),
    p.MsgType.HEARTBEAT: ((9, 123, 3, p.ACK_DURABLE), []),
    p.MsgType.FLUSH: ((9,), []),
    p.MsgType.HELLO: ((5,), [b"node"]),
    p.MsgType.WELCOME: ((9, 1, 0), [p.encode_history([(1, 1), (3, 5)])]),
    p.MsgType.REFUSE: ((p.REFUSE_CLUSTER,), [b"why"]),
    p.MsgType.FETCH: ((3, 10), []),
    p.MsgType.NOT_RETAINED: ((3, 7), []),
    p.MsgType.SNAP_OPEN: ((0,), []),
    p.MsgType.SNAP_INFO: ((7, 1000, 4096), []),
    p.MsgType.SNAP_WAIT: ((250,), []),
    p.MsgType.SNAP_GET: ((7, 4096, 4096), []),
    p.MsgType.SNAP_CHUNK: ((7, 0, zlib.crc32(b"data")), [b"data"]),
    p.MsgType.SNAP_GONE: ((7,), []),
    p.MsgType.ACK: ((9, 8), []),
    p.MsgType.PEER: ((9, 5, p.PEER_REPLY), [b"node"]),
    p.MsgType.REPAIR_GET: ((4, 3, p.REPAIR_RANGE), [b"\0" * 8 + b"a", b"\0" * 8 + b"b"]),
    p.MsgType.REPAIR_VALUE: ((4, 9, p.REPAIR_FOUND), [b"value", b"inode"]),
    p.MsgType.DAMAGED: ((7,), []),
}


@pytest.mark.parametrize("body, payload", [
    ((1, 0, 0), [b"key", b""]),  # no such database
    ((1, 8, 0), [b"key", b""]),
    ((1, 3, 0), [b"", b""]),  # no key
    ((1, 3, 0), [b"key", b"end"]),  # an end without REPAIR_RANGE
    ((1, 3, p.REPAIR_RANGE), [b"b", b"a"]),  # a range that ends before it begins
    ((1, 3, 0x80), [b"key", b""]),
    ((1, 3, 0), [b"k" * (p.MAX_REPAIR_KEY + 1), b""]),
])
def test_malformed_repair_requests_are_refused(body: tuple, payload: list[bytes]) -> None:
    with pytest.raises(p.BadMessage, match="malformed"):
        p.decode(p.encode(p.MsgType.REPAIR_GET, CLUSTER, 1, body, payload), p.TO_PRIMARY)
    with pytest.raises(p.BadMessage, match="malformed"):
        p.decode(p.encode(p.MsgType.REPAIR_VALUE, CLUSTER, 1, (1, 1, 9), [b"", b""]), p.TO_STANDBY)


@pytest.mark.parametrize("type_", list(p.MsgType))
def test_every_message_round_trips(type_: p.MsgType) -> None:
    body, payload = BODY_VALUES[type_]
    frames = p.encode(type_, CLUSTER, 3, body, payload)
    allowed = frozenset(p.MsgType)
    msg = p.decode(frames, allowed)
    assert (msg.type, msg.cluster_id, msg.epoch, tuple(msg.body), msg.payload) == \
        (type_, CLUSTER, 3, body, payload)
    # Any truncation of the envelope or the body, a missing or an extra frame, is refused.
    # (A payload's own integrity is the record's CRC or the chunk's, checked elsewhere.)
    for i, frame in enumerate(frames[:2]):
        for cut in {0, 1, len(frame) // 2, len(frame) - 1} - {len(frame)}:
            broken = frames[:i] + [frame[:cut]] + frames[i + 1:]
            with pytest.raises(p.BadMessage):
                p.decode(broken, allowed)
    for broken in (frames[:1], frames[:-1] if payload else None, [*frames, b"extra"]):
        if broken is not None:
            with pytest.raises(p.BadMessage):
                p.decode(broken, allowed)


def test_another_protocol_version_is_dropped_as_such() -> None:
    frames = p.encode(p.MsgType.HEARTBEAT, CLUSTER, 1, (1, 0, 1, 0))
    for version in (p.VERSION - 1, p.VERSION + 1):
        envelope = bytearray(frames[0])
        envelope[2] = version
        with pytest.raises(p.BadMessage) as exc:
            p.decode([bytes(envelope), *frames[1:]], p.STREAM_TYPES)
        assert exc.value.kind == "version"


def test_flush_requests_are_checked() -> None:
    with pytest.raises(p.BadMessage):  # a flush of nothing
        p.decode(p.encode(p.MsgType.FLUSH, CLUSTER, 1, (0,)), p.STREAM_TYPES)
    with pytest.raises(p.BadMessage):  # a RECORDS flag nobody defined
        p.decode(p.encode(p.MsgType.RECORDS, CLUSTER, 1, (2, 2, 0x80), records(2, 2)), p.STREAM_TYPES)
    with pytest.raises(p.BadMessage):  # the stream's, never the side channel's
        p.decode(p.encode(p.MsgType.FLUSH, CLUSTER, 1, (5,)), p.TO_STANDBY)


def test_senders_are_checked_for_cluster_and_epoch() -> None:
    msg = p.decode(p.encode(p.MsgType.HEARTBEAT, CLUSTER, 2, (1, 0, 1, 0)), p.STREAM_TYPES)
    p.check_sender(msg, CLUSTER, 2)
    with pytest.raises(p.BadMessage) as exc:
        p.check_sender(msg, OTHER, 2)
    assert exc.value.kind == "cluster"
    with pytest.raises(p.BadMessage) as exc:
        p.check_sender(msg, CLUSTER, 3)
    assert exc.value.kind == "stale_epoch"
    # A standby's message may lag the primary's epoch: it has not seen the new records yet.
    ack = p.decode(p.encode(p.MsgType.ACK, CLUSTER, 1, (1, 1)), p.TO_PRIMARY)
    p.check_sender(ack, CLUSTER, 3)
    # Records in a batch must agree with the envelope.
    with pytest.raises(p.BadMessage):
        p.decode(p.encode(p.MsgType.RECORDS, CLUSTER, 1, (2, 2, 0), records(2, 2, OTHER)), p.STREAM_TYPES)
    with pytest.raises(p.BadMessage):
        p.decode(p.encode(p.MsgType.RECORDS, CLUSTER, 1, (3, 2, 0), records(2, 2)), p.STREAM_TYPES)
    with pytest.raises(p.BadMessage):
        p.decode(p.encode(p.MsgType.RECORDS, CLUSTER, 1, (2, 2, 0), records(2, 2, epoch=2)), p.STREAM_TYPES)


# --- retention ---------------------------------------------------------------------------
def test_prune_point_keeps_what_standbys_need_a_tail_and_no_more_than_the_bound() -> None:
    policy = RetentionPolicy(retain_records=2000, retain_bytes=1 << 30, tail_records=100, tail_bytes=1 << 30)
    kw = {"first_seq": 1, "last_seq": 5000, "journal_bytes": 5000 * 100}
    # No standby: only the tail is kept, whatever the checkpoints.
    assert prune_point(policy, standby_acks={}, **kw) == (4901, [])
    # Standbys hold what they still need (the record after their acknowledgement).
    assert prune_point(policy, standby_acks={"a": 4950, "b": 4999}, **kw) == (4901, [])
    assert prune_point(policy, standby_acks={"a": 3500, "b": 4100}, **kw) == (3501, [])
    # A standby that needs more than the bound allows no longer holds the journal.
    assert prune_point(policy, standby_acks={"dead": 10, "live": 4300}, **kw) == (4301, ["dead"])
    # The byte bounds: 100 bytes a record, 50 000 bytes kept -> 500 records; 2 000 -> 20.
    by_bytes = RetentionPolicy(retain_records=10**9, retain_bytes=50_000,
                               tail_records=10**9, tail_bytes=2_000)
    assert prune_point(by_bytes, standby_acks={"a": 4400}, **kw) == (4981, ["a"])
    assert prune_point(by_bytes, standby_acks={"a": 4600}, **kw) == (4601, [])
    # Never below what is already gone; an empty journal prunes nothing.
    assert prune_point(policy, standby_acks={"a": 4400}, first_seq=4500, last_seq=5000,
                       journal_bytes=0) == (4500, [])
    assert prune_point(policy, standby_acks={}, first_seq=5001, last_seq=5000, journal_bytes=0) == (5001, [])


def test_retention_bounds_shrink_to_fit_a_small_store() -> None:
    policy = RetentionPolicy().within(64 << 20)
    assert policy.retain_bytes == 16 << 20 and policy.tail_bytes == 4 << 20
    assert RetentionPolicy().within(1 << 40) == RetentionPolicy()


# --- the store swap under readers ---------------------------------------------------------
def test_replace_with_checkpoint_under_concurrent_readers(tmp_path: Path) -> None:
    source = Store.create(tmp_path / "src", cluster_id=CLUSTER, time_ns=1)
    target = Store.create(tmp_path / "dst", cluster_id=CLUSTER, init=False)
    target.apply_records([raw for _seq, raw in source.records(1)])
    for ino in range(2, 200):
        source.commit(mkdir_op(ino, b"n%d" % ino))
    seq = source.checkpoint(tmp_path / "ckpt")
    stop = threading.Event()
    failures: list[BaseException] = []
    reads = [0]

    def reader() -> None:
        try:
            while not stop.is_set():
                with target.reader() as state:
                    names = [name for name, _ino in state.entries(1)]
                    assert len(names) in (0, 198)  # the old state or the new, nothing between
                target.counts()
                reads[0] += 1
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: reads[0] > 50, 10, "readers running")
    assert target.replace_with(tmp_path / "ckpt") == seq
    wait_until(lambda: reads[0] > 500, 10, "readers on the new environment")
    stop.set()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert digest(target) == digest(source)
    # It goes on applying after the swap.
    more = encode_record(CLUSTER, 1, seq + 1, mkdir_op(500, b"after"))
    assert target.apply_records([more]) == seq + 1
    source.close()
    target.close()


# --- a standby's handlers fed forged frames ------------------------------------------------
def _follower(tmp_path: Path) -> Follower:
    data = tmp_path / f"standby-{uuid.uuid4().hex[:6]}"
    store = Store.create(data, cluster_id=CLUSTER, init=False)
    # Seq 1 at epoch 2, so that epoch-1 messages are stale here.
    store.apply_records([encode_record(CLUSTER, 2, 1, ops.Init(mode=0o755, uid=0, gid=0, time_ns=1))])
    follower = Follower(data, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", store=store, name="t")
    follower._set_store(store)
    follower.state = State.FOLLOWING
    return follower


frame = st.binary(max_size=96)
envelope = st.builds(
    lambda type_, cid, epoch: struct.pack(">2sBB16sQ", b"TR", 1, type_, cid, epoch),
    st.sampled_from([t.value for t in p.MsgType] + [0, 3, 99, 255]),
    st.sampled_from([CLUSTER, OTHER, bytes(16)]),
    st.sampled_from([0, 1, 2, 3, 2**64 - 1]),
)
forged = st.one_of(
    st.lists(frame, max_size=6),
    st.tuples(envelope, st.lists(frame, max_size=5)).map(lambda t: [t[0], *t[1]]),
    st.tuples(envelope, st.binary(min_size=8, max_size=24), st.lists(frame, max_size=3)).map(
        lambda t: [t[0], t[1], *t[2]]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(forged, min_size=1, max_size=20))
def test_standby_survives_forged_frames(tmp_path: Path, frames: list[list[bytes]]) -> None:
    follower = _follower(tmp_path)
    store = follower.store
    assert store is not None
    before = digest(store)
    for message in frames:
        follower.handle_stream(message)
        follower.handle_side(message)
    assert digest(store) == before
    # Well-formed messages of the right cluster may move the state machine (a forged
    # NOT_RETAINED after a fetch starts a snapshot), but never to a fatal state.
    assert follower.state in (State.FOLLOWING, State.CATCHING_UP, State.SNAPSHOT)
    # No message is acceptable on both sockets, so each was dropped (and counted) at least once.
    assert follower.drops.total() >= len(frames)
    store.close()


def test_standby_drops_well_formed_forgeries(tmp_path: Path) -> None:
    follower = _follower(tmp_path)
    store = follower.store
    assert store is not None and store.epoch == 2
    before = digest(store)
    # Another cluster, a stale epoch, and a record whose checksum is wrong.
    follower.handle_stream(p.encode(p.MsgType.RECORDS, OTHER, 2, (2, 1, 0), records(2, 1, OTHER, 2)))
    follower.handle_stream(p.encode(p.MsgType.RECORDS, CLUSTER, 1, (2, 1, 0), records(2, 1, CLUSTER, 1)))
    bad = bytearray(records(2, 1, CLUSTER, 2)[0])
    bad[-1] ^= 0xFF
    follower.handle_stream(p.encode(p.MsgType.RECORDS, CLUSTER, 2, (2, 1, 0), [bytes(bad)]))
    follower.handle_side(p.encode(p.MsgType.SNAP_CHUNK, CLUSTER, 2, (5, 0, zlib.crc32(b"x")), [b"x"]))
    follower.handle_stream(p.encode(p.MsgType.HEARTBEAT, CLUSTER, 1, (10**6, 0, 1, 0)))
    assert digest(store) == before
    counts = follower.drops.snapshot()
    assert counts["cluster"] == 1 and counts["stale_epoch"] == 2 and counts["record"] == 1
    assert counts["unexpected"] == 1
    # The genuine record still applies afterwards.
    follower.handle_stream(p.encode(p.MsgType.RECORDS, CLUSTER, 2, (2, 1, 0), records(2, 1, CLUSTER, 2)))
    assert store.last_seq == 2
    store.close()


# --- the primary's ROUTER fed forged frames from a DEALER ---------------------------------
@pytest.mark.fuse
def test_primary_survives_forged_frames(cluster: Cluster) -> None:
    # In the clear, so that forged frames reach the parser (with CURVE they end at the handshake).
    primary = cluster.primary("p", "--insecure")
    (primary.mount / "f").write_bytes(b"before")
    status = primary.status()
    assert status is not None
    cluster_id = bytes.fromhex(status["cluster_id"])
    side = status["replication"]["side_channel"]
    last_seq = status["last_seq"]
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(side)
    sent = [0]
    genuine_envelopes = st.builds(
        lambda type_, epoch: struct.pack(">2sBB16sQ", b"TR", 1, type_, cluster_id, epoch),
        st.sampled_from([t.value for t in p.TO_PRIMARY] + [1, 2, 11]), st.sampled_from([0, 1]))
    hostile = st.one_of(forged, st.tuples(genuine_envelopes, st.lists(frame, max_size=3)).map(
        lambda t: [t[0], *t[1]]))

    @settings(max_examples=300, deadline=None, database=None)
    @given(message=hostile)
    def send(message: list[bytes]) -> None:
        if message:
            dealer.send_multipart(message)
            sent[0] += 1

    try:
        send()
        control = ctx.socket(zmq.REQ)
        control.setsockopt(zmq.LINGER, 0)
        control.connect(f"ipc://{socket_path(primary.data)}")
        for garbage in (b"\xff\xfe", b"[]", b'{"v": 1, "cmd": "rm -rf"}', b'{"v": 9, "cmd": "status"}'):
            control.send(garbage)
            assert control.poll(5000), "the control socket stopped answering"
            assert b'"ok": false' in control.recv()
        control.close()
        # Well-formed but bogus: an ACK beyond the primary's last seq, a FETCH from another cluster.
        dealer.send_multipart(p.encode(p.MsgType.ACK, cluster_id, 1, (last_seq + 10**6, 0)))
        dealer.send_multipart(p.encode(p.MsgType.FETCH, OTHER, 1, (1, 5)))
        status = primary.wait_status(lambda s: s["replication"]["dropped"].get("bogus", 0) >= 1
                                     and s["replication"]["dropped"].get("cluster", 0) >= 1, 20,
                                     "the forged ACK and FETCH to be counted")
    finally:
        dealer.close()
        ctx.term()
    assert primary.alive()
    assert status["last_seq"] == last_seq  # nothing a peer sends changes the primary's state
    assert status["read_only"] is None
    assert status["replication"]["dropped"].get("cluster", 0) >= 1
    assert sum(status["replication"]["dropped"].values()) >= sent[0] // 2
    assert sum(v for k, v in status["dropped"].items() if k.startswith("control_")) == 4
    # Still a working primary and replication source.
    (primary.mount / "g").write_bytes(b"after")
    standby = cluster.standby(primary, "s", "--insecure", mount=False)
    cluster.verify(primary, standby)


# --- the control socket and the offline command line ---------------------------------------
def test_control_socket_path_stays_within_the_unix_limit(tmp_path: Path) -> None:
    short = tmp_path / "d"
    assert socket_path(short) == short.resolve() / "control.sock"
    deep = tmp_path / ("x" * 120)
    fallback = socket_path(deep)
    assert len(os.fsencode(fallback)) <= 107 and fallback.parent != deep
    assert socket_path(deep) == fallback  # stable: a client finds the node's socket
    assert socket_path(tmp_path / ("y" * 120)) != fallback


def test_status_and_verify_without_running_nodes(tmp_path: Path) -> None:
    a = Store.create(tmp_path / "a")
    b = Store.create(tmp_path / "b")  # another cluster: same seq, different state
    a.close()
    b.close()
    result = cli("status", "--data", str(tmp_path / "a"))
    assert result.returncode == 1 and "no node runs" in result.stderr
    result = cli("verify", "--data", str(tmp_path / "a"), "--data", str(tmp_path / "b"), "--deadline", "5")
    assert result.returncode == 1 and result.stdout.startswith("MISMATCH"), result
    result = cli("verify", "--data", str(tmp_path / "a"), "--data", str(tmp_path / "a"), "--deadline", "5")
    assert result.returncode == 0 and result.stdout.startswith("match"), result
    digest_line = cli("digest", "--data", str(tmp_path / "a")).stdout
    assert digest_line.endswith("seq=1 epoch=1\n")


def test_verify_does_not_compare_one_seq_of_two_epochs(tmp_path: Path) -> None:
    # An old primary with records the new one never got, at the new primary's seq: the
    # same number, another history. verify waits (here: until its deadline), never
    # compares them, and so never reports a mismatch that is only a moment in a rejoin.
    old = Store.create(tmp_path / "old", time_ns=1)
    new = Store.create(tmp_path / "new", cluster_id=old.cluster_id, init=False)
    new.apply_records([raw for _seq, raw in old.records(1)])
    old.commit(ops.MakeNode(parent=1, ino=old.allocate_ino(), mode=0o100644, rdev=0, uid=0, gid=0,
                            time_ns=2, name=b"divergent"))
    new.begin_epoch(2)
    assert old.last_seq == new.last_seq == 2
    old.close()
    new.close()
    result = cli("verify", "--data", str(tmp_path / "old"), "--data", str(tmp_path / "new"),
                 "--deadline", "1")
    assert result.returncode == 2 and result.stdout.startswith("TIMEOUT"), result
    assert "(epoch 1)" in result.stdout and "(epoch 2)" in result.stdout


# --- the primary's side channel, driven in-process ------------------------------------------
def test_snapshot_serving(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "p", cluster_id=CLUSTER, time_ns=1)
    for ino in range(2, 50):
        store.commit(mkdir_op(ino, b"n%d" % ino))
    checkpoints = Checkpoints(store)
    asked: list[int] = []
    primary = PrimaryReplication(store, checkpoints, "tcp://127.0.0.1:1", "tcp://127.0.0.1:2",
                                 request_checkpoint=lambda: asked.append(1))
    sent: list[list[bytes]] = []
    identity = b"s#0001"

    def ask(type_: p.MsgType, body: tuple) -> p.Message:
        sent.clear()
        primary.handle([identity, *p.encode(type_, CLUSTER, 1, body)], sent.append)
        assert len(sent) == 1 and sent[0][0] == identity
        return p.decode(sent[0][1:], p.TO_STANDBY)

    try:
        # No checkpoint yet: wait, and one is asked for.
        assert ask(p.MsgType.SNAP_OPEN, (0,)).type is p.MsgType.SNAP_WAIT and asked == [1]
        checkpoint = checkpoints.take()
        info = ask(p.MsgType.SNAP_OPEN, (0,))
        assert info.type is p.MsgType.SNAP_INFO and info.body.snap_id == checkpoint.seq == store.last_seq
        data = b""
        while len(data) < info.body.size:
            chunk = ask(p.MsgType.SNAP_GET, (info.body.snap_id, len(data), info.body.chunk))
            assert chunk.type is p.MsgType.SNAP_CHUNK and chunk.body.offset == len(data)
            data += chunk.payload[0]
        assert data == checkpoint.data_file.read_bytes()
        assert ask(p.MsgType.SNAP_GET, (999, 0, 10)).type is p.MsgType.SNAP_GONE
        # A resumed transfer asks for its snapshot by id and gets it while it exists.
        assert ask(p.MsgType.SNAP_OPEN, (checkpoint.seq,)).body.snap_id == checkpoint.seq
        # Fetching below what is retained says so; within it, the records come back.
        store.prune(10)
        gone = ask(p.MsgType.FETCH, (5, 20))
        assert gone.type is p.MsgType.NOT_RETAINED and gone.body.first_seq == 10
        got = ask(p.MsgType.FETCH, (10, 20))
        assert got.type is p.MsgType.RECORDS and (got.body.first_seq, got.body.count) == (10, 10)
        assert got.payload == [raw for _seq, raw in store.records(10, 20)]
    finally:
        primary.stop()
        store.close()
