"""Journal records: every op survives encode/decode, and damage of any kind is refused
with CorruptRecord and never with any other exception."""

from __future__ import annotations

import dataclasses
import struct

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from journal import ops
from journal.errors import CorruptRecord
from journal.records import HEADER_SIZE, MAGIC, OVERHEAD, Record, decode_record, encode_record, peek_header
from journal.schema import FORMAT_VERSION

I64 = st.integers(-(1 << 63), (1 << 63) - 1)
U64 = st.integers(0, (1 << 64) - 1)
CLUSTER_ID = st.binary(min_size=16, max_size=16)


def op_strategy(cls: type[ops.Op]) -> st.SearchStrategy[ops.Op]:
    fields = {
        f.name: I64 if f.type == "int" else st.binary(max_size=300)
        for f in dataclasses.fields(cls)
    }
    return st.builds(cls, **fields)


ANY_OP = st.one_of([op_strategy(cls) for cls in ops.OP_TYPES])


@st.composite
def records(draw: st.DrawFn) -> tuple[Record, bytes]:
    record = Record(draw(CLUSTER_ID), draw(U64), draw(U64), draw(ANY_OP))
    return record, encode_record(record.cluster_id, record.epoch, record.seq, record.op)


def reseal(raw: bytes | bytearray) -> bytes:
    """Recompute the CRC, so that a check other than the checksum must catch the damage."""
    body = bytes(raw[:-8])
    return body + struct.pack(">Q", xxhash.xxh3_64_intdigest(body))


def assert_refused(raw: bytes | bytearray | memoryview) -> None:
    with pytest.raises(CorruptRecord):
        decode_record(raw)


# --- round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("cls", ops.OP_TYPES, ids=lambda cls: cls.__name__)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), cluster_id=CLUSTER_ID, epoch=U64, seq=U64)
def test_round_trip_of_every_op_type(cls: type[ops.Op], data: st.DataObject, cluster_id: bytes,
                                     epoch: int, seq: int) -> None:
    op = data.draw(op_strategy(cls))
    raw = encode_record(cluster_id, epoch, seq, op)
    assert len(raw) == OVERHEAD + len(op.encode())
    assert decode_record(raw) == Record(cluster_id, epoch, seq, op)
    assert decode_record(memoryview(raw)) == Record(cluster_id, epoch, seq, op)
    assert peek_header(raw) == (epoch, seq)


def test_op_codes_are_distinct_and_every_type_is_covered() -> None:
    codes = [cls.CODE for cls in ops.OP_TYPES]
    assert len(set(codes)) == len(codes) and 0 not in codes
    examples = {
        ops.Init(mode=0o755, uid=0, gid=0, time_ns=1),
        ops.MakeNode(parent=1, ino=2, mode=0o100644, rdev=0, uid=1, gid=2, time_ns=3, name=b"f"),
        ops.Symlink(parent=1, ino=3, uid=0, gid=0, time_ns=4, name=b"l", target=b"/t"),
        ops.Link(ino=2, parent=1, time_ns=5, name=b"g"),
        ops.Unlink(parent=1, time_ns=6, name=b"g"),
        ops.Rmdir(parent=1, time_ns=7, name=b"d"),
        ops.Rename(old_parent=1, new_parent=1, flags=ops.RENAME_EXCHANGE, time_ns=8, old_name=b"a",
                   new_name=b"b"),
        ops.Write(ino=2, offset=10, time_ns=9, data=b"\0" * 70000),
        ops.Truncate(ino=2, size=0, time_ns=10),
        ops.SetAttr(ino=2, fields=ops.SET_MODE | ops.SET_MTIME, mode=0o600, uid=-1, gid=-1, atime_ns=-5,
                    mtime_ns=1 << 62, time_ns=11),
        ops.SetXattr(ino=2, flags=ops.XATTR_CREATE, time_ns=12, name=b"user.k", value=b""),
        ops.RemoveXattr(ino=2, time_ns=13, name=b"user.k"),
        ops.BeginEpoch(epoch=2, time_ns=14),
    }
    assert {type(op) for op in examples} == set(ops.OP_TYPES)
    for seq, op in enumerate(sorted(examples, key=lambda op: op.CODE), start=1):
        raw = encode_record(bytes(range(16)), 3, seq, op)
        assert decode_record(raw) == Record(bytes(range(16)), 3, seq, op)
        assert raw[3] == op.CODE


# --- damage ---------------------------------------------------------------------------
@given(rec=records(), data=st.data())
def test_a_flipped_byte_anywhere_is_refused(rec: tuple[Record, bytes], data: st.DataObject) -> None:
    _record, raw = rec
    pos = data.draw(st.integers(0, len(raw) - 1))
    mask = data.draw(st.integers(1, 255))
    damaged = bytearray(raw)
    damaged[pos] ^= mask
    assert_refused(bytes(damaged))


@given(rec=records(), data=st.data())
def test_flipped_bits_anywhere_are_refused(rec: tuple[Record, bytes], data: st.DataObject) -> None:
    _record, raw = rec
    damaged = bytearray(raw)
    for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=3, unique=True)):
        damaged[pos] ^= 1 << data.draw(st.integers(0, 7))
    assert_refused(bytes(damaged))


@given(rec=records(), data=st.data())
def test_a_truncated_record_is_refused(rec: tuple[Record, bytes], data: st.DataObject) -> None:
    _record, raw = rec
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert_refused(raw[:cut])
    assert_refused(memoryview(raw)[:cut])


@given(rec=records(), extra=st.binary(min_size=1, max_size=50))
def test_trailing_bytes_are_refused(rec: tuple[Record, bytes], extra: bytes) -> None:
    _record, raw = rec
    assert_refused(raw + extra)


@given(rec=records(), magic=st.binary(min_size=2, max_size=2).filter(lambda m: m != MAGIC))
def test_wrong_magic_is_refused(rec: tuple[Record, bytes], magic: bytes) -> None:
    _record, raw = rec
    with pytest.raises(CorruptRecord, match="magic"):
        decode_record(reseal(magic + raw[2:]))


@given(rec=records(), version=st.integers(0, 255).filter(lambda v: v != FORMAT_VERSION))
def test_wrong_version_is_refused(rec: tuple[Record, bytes], version: int) -> None:
    _record, raw = rec
    with pytest.raises(CorruptRecord, match="version"):
        decode_record(reseal(raw[:2] + bytes([version]) + raw[3:]))


@given(rec=records(), code=st.integers(0, 255).filter(lambda c: c not in {cls.CODE for cls in ops.OP_TYPES}))
def test_unknown_operation_code_is_refused(rec: tuple[Record, bytes], code: int) -> None:
    _record, raw = rec
    with pytest.raises(CorruptRecord, match="unknown operation"):
        decode_record(reseal(raw[:3] + bytes([code]) + raw[4:]))


@given(rec=records(), delta=st.integers(-(1 << 31), 1 << 31).filter(bool))
def test_wrong_payload_length_is_refused(rec: tuple[Record, bytes], delta: int) -> None:
    _record, raw = rec
    (length,) = struct.unpack_from(">I", raw, HEADER_SIZE - 4)
    wrong = (length + delta) % (1 << 32)
    assert_refused(reseal(raw[:HEADER_SIZE - 4] + struct.pack(">I", wrong) + raw[HEADER_SIZE:]))


def _with_payload(raw: bytes, payload: bytes, code: int | None = None) -> bytes:
    """`raw` with its payload replaced, every length and the CRC made consistent again."""
    head = bytearray(raw[:HEADER_SIZE])
    if code is not None:
        head[3] = code
    head[HEADER_SIZE - 4:] = struct.pack(">I", len(payload))
    return reseal(bytes(head) + payload + b"\0\0\0\0")


@given(rec=records(), data=st.data())
def test_damaged_payload_with_a_valid_checksum_is_refused(rec: tuple[Record, bytes],
                                                         data: st.DataObject) -> None:
    """The payload's own framing is checked too, not only the CRC around it."""
    record, raw = rec
    payload = record.op.encode()
    if data.draw(st.booleans()) or not payload:
        extra = data.draw(st.binary(min_size=1, max_size=20))
        assert_refused(_with_payload(raw, payload + extra))  # trailing bytes inside the payload
    else:
        cut = data.draw(st.integers(0, len(payload) - 1))
        assert_refused(_with_payload(raw, payload[:cut]))  # a field runs past the payload


WITH_BYTES = [cls for cls in ops.OP_TYPES if any(f.type == "bytes" for f in dataclasses.fields(cls))]


@given(op=st.one_of([op_strategy(cls) for cls in WITH_BYTES]), extra=st.integers(1, 1 << 20))
def test_a_bytes_field_running_past_the_payload_is_refused(op: ops.Op, extra: int) -> None:
    raw = encode_record(bytes(16), 1, 1, op)
    payload = op.encode()
    at = 8 * sum(1 for f in dataclasses.fields(op) if f.type == "int")  # the first length prefix
    (actual,) = struct.unpack_from(">I", payload, at)
    damaged = payload[:at] + struct.pack(">I", actual + extra) + payload[at + 4:]
    assert_refused(_with_payload(raw, damaged))


@settings(max_examples=300)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_corrupt_record(raw: bytes) -> None:
    try:
        decode_record(raw)
    except CorruptRecord:
        pass


@settings(max_examples=300)
@given(rec=records(), code=st.integers(0, 255), payload=st.binary(max_size=120))
def test_arbitrary_payload_with_a_valid_checksum_decodes_or_is_refused(
        rec: tuple[Record, bytes], code: int, payload: bytes) -> None:
    """Garbage that passes the CRC (a bug on the sender) still gives CorruptRecord or an op."""
    _record, raw = rec
    sealed = _with_payload(raw, payload, code)
    try:
        decoded = decode_record(sealed)
    except CorruptRecord:
        return
    assert decoded.op.CODE == code
    assert encode_record(decoded.cluster_id, decoded.epoch, decoded.seq, decoded.op) == sealed


def test_empty_and_header_only_records_are_refused() -> None:
    raw = encode_record(bytes(16), 1, 1, ops.Truncate(ino=2, size=0, time_ns=1))
    for cut in (b"", raw[:2], raw[:HEADER_SIZE], raw[:OVERHEAD - 1]):
        assert_refused(cut)
    with pytest.raises(CorruptRecord):
        peek_header(raw[:OVERHEAD - 1])
