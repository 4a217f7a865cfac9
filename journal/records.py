"""Journal records: an operation stamped with its place in the cluster's history.

The same bytes are stored in every node's journal and shipped on the wire, so a record
is verified (magic, version, length, checksum) wherever it is read.

Layout (big-endian):

    offset  size  field
    0       2     magic b"TJ"
    2       1     format version (schema.FORMAT_VERSION)
    3       1     operation code (ops.py)
    4       8     epoch
    12      8     seq
    20      16    cluster id
    36      4     payload length n
    40      n     operation payload (ops.py)
    40+n    8     XXH3-64 of bytes [0, 40+n) (format 2: 4 bytes, CRC-32)
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import xxhash

from .errors import CorruptRecord
from .ops import WRITE_DATA_OFFSET, Op, Write, decode_op, write_extent
from .schema import FORMAT_VERSION

MAGIC = b"TJ"
_HEADER = struct.Struct(">2sBBQQ16sI")
_CRC = struct.Struct(">Q")
#: Format 2's trailer, which `restamp` still reads.
_CRC32 = struct.Struct(">I")
_xxh3 = xxhash.xxh3_64_intdigest
HEADER_SIZE = _HEADER.size
OVERHEAD = _HEADER.size + _CRC.size
#: Where a Write's data begins in its record: blocks refer to it there (schema.BLOCK_REF).
WRITE_DATA_START = HEADER_SIZE + WRITE_DATA_OFFSET
#: Where the header holds the format version and the operation code.
_VERSION_AT = len(MAGIC)
_CODE_AT = _VERSION_AT + 1


def record_version(raw: bytes | memoryview) -> int:
    """The format version a record says it is of, without verifying it."""
    if len(raw) < OVERHEAD:
        raise CorruptRecord(f"record of {len(raw)} bytes is shorter than its header")
    return raw[_VERSION_AT]


@dataclass(frozen=True)
class Record:
    cluster_id: bytes
    epoch: int
    seq: int
    op: Op


def encode_record(cluster_id: bytes, epoch: int, seq: int, op: Op) -> bytes:
    parts = op.encode_parts()
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, op.CODE, epoch, seq, cluster_id, sum(map(len, parts)))
    hasher = xxhash.xxh3_64(head)
    for part in parts:
        hasher.update(part)
    return b"".join((head, *parts, _CRC.pack(hasher.intdigest())))


def peek_header(raw: bytes | memoryview) -> tuple[int, int]:
    """(epoch, seq) of a record without verifying it; for routing, never for applying."""
    if len(raw) < OVERHEAD:
        raise CorruptRecord("record shorter than its header")
    _magic, _version, _code, epoch, seq, _cid, _n = _HEADER.unpack_from(raw, 0)
    return epoch, seq


def peek_write(raw: bytes | memoryview) -> tuple[int, int, int] | None:
    """(ino, offset, data length) of a Write record, None for a record of another op;
    without verifying it or copying its data (the journal's own records, e.g. to prune)."""
    if len(raw) < WRITE_DATA_START or raw[_CODE_AT] != Write.CODE:
        return None
    return write_extent(raw, HEADER_SIZE)


def restamp(raw: bytes | memoryview, version: int) -> bytes:
    """The record `raw`, of format 1, 2 or this one, stamped as of `version` with its
    checksum recomputed in that version's kind (formats 1 and 2: CRC-32; 3: XXH3-64);
    raises CorruptRecord if its checksum does not hold (for upgrades, and for tests that
    make old stores)."""
    old_trailer = _CRC if record_version(raw) >= 3 else _CRC32
    if len(raw) < HEADER_SIZE + old_trailer.size:
        raise CorruptRecord(f"record of {len(raw)} bytes is shorter than its header")
    end = len(raw) - old_trailer.size
    body = memoryview(raw)[:end]
    expected = _xxh3(body) if old_trailer is _CRC else zlib.crc32(body)
    if expected != old_trailer.unpack_from(raw, end)[0]:
        raise CorruptRecord(f"checksum mismatch in record seq {peek_header(raw)[1]}")
    stamped = bytearray(body)
    stamped[_VERSION_AT] = version
    if version >= 3:
        return bytes(stamped) + _CRC.pack(_xxh3(stamped))
    return bytes(stamped) + _CRC32.pack(zlib.crc32(stamped))


def _checked(raw: bytes | memoryview) -> tuple[int, int, int, bytes, int]:
    """(op code, epoch, seq, cluster id, end of payload) of a record whose framing and
    checksum hold; raises CorruptRecord saying what does not."""
    if len(raw) < OVERHEAD:
        raise CorruptRecord(f"record of {len(raw)} bytes is shorter than its header")
    magic, version, code, epoch, seq, cluster_id, length = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise CorruptRecord("bad record magic")
    if version != FORMAT_VERSION:
        raise CorruptRecord(f"unsupported record format version {version}")
    if HEADER_SIZE + length + _CRC.size != len(raw):
        raise CorruptRecord(f"record length {len(raw)} does not match its payload length {length}")
    end = HEADER_SIZE + length
    if _xxh3(memoryview(raw)[:end]) != _CRC.unpack_from(raw, end)[0]:
        raise CorruptRecord(f"checksum mismatch in record seq {seq}")
    return code, epoch, seq, cluster_id, end


def decode_record(raw: bytes | memoryview) -> Record:
    code, epoch, seq, cluster_id, end = _checked(raw)
    return Record(bytes(cluster_id), epoch, seq, decode_op(code, memoryview(raw)[HEADER_SIZE:end]))


def verify_record(raw: bytes | memoryview, seq: int | None = None) -> None:
    """Check a record's framing and checksum (and that it is record `seq`) without decoding
    its op: a block that refers to it is about to be served, or it is about to be sent;
    raises CorruptRecord."""
    own_seq = _checked(raw)[2]
    if seq is not None and own_seq != seq:
        raise CorruptRecord(f"record stored as seq {seq} says seq {own_seq}")
