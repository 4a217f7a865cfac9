"""Operations: the self-contained, deterministic description of one change to the filesystem.

Everything `apply` needs is in the op: inode numbers, timestamps, owners and the resolved
parent inodes were decided by the primary before the op was built, so replaying the same
ops on any node yields byte-identical state.

Payload encoding (versioned with the record, see records.py): the op's int fields packed
as big-endian signed 64-bit integers in declaration order, then each bytes field as a
u32 big-endian length followed by the bytes.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import ClassVar

from .errors import CorruptRecord


@dataclass(frozen=True)
class Op:
    CODE: ClassVar[int] = 0

    def encode(self) -> bytes:
        return b"".join(self.encode_parts())

    def encode_parts(self) -> list[bytes]:
        """The payload as pieces to join, so a record is built with one copy of the data."""
        codec = _CODECS[type(self)]
        parts = [codec.ints.pack(*(getattr(self, name) for name in codec.int_names))]
        for name in codec.bytes_names:
            value = getattr(self, name)
            parts.append(_LEN.pack(len(value)))
            parts.append(value)
        return parts


@dataclass(frozen=True)
class Init(Op):
    """Creates the root directory of an empty store; always seq 1."""

    CODE: ClassVar[int] = 1
    mode: int
    uid: int
    gid: int
    time_ns: int


@dataclass(frozen=True)
class MakeNode(Op):
    """create, mknod and mkdir: a new inode named `name` in `parent`."""

    CODE: ClassVar[int] = 2
    parent: int
    ino: int
    mode: int
    rdev: int
    uid: int
    gid: int
    time_ns: int
    name: bytes


@dataclass(frozen=True)
class Symlink(Op):
    CODE: ClassVar[int] = 3
    parent: int
    ino: int
    uid: int
    gid: int
    time_ns: int
    name: bytes
    target: bytes


@dataclass(frozen=True)
class Link(Op):
    CODE: ClassVar[int] = 4
    ino: int
    parent: int
    time_ns: int
    name: bytes


@dataclass(frozen=True)
class Unlink(Op):
    CODE: ClassVar[int] = 5
    parent: int
    time_ns: int
    name: bytes


@dataclass(frozen=True)
class Rmdir(Op):
    CODE: ClassVar[int] = 6
    parent: int
    time_ns: int
    name: bytes


RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class Rename(Op):
    CODE: ClassVar[int] = 7
    old_parent: int
    new_parent: int
    flags: int
    time_ns: int
    old_name: bytes
    new_name: bytes


@dataclass(frozen=True)
class Write(Op):
    CODE: ClassVar[int] = 8
    ino: int
    offset: int
    time_ns: int
    data: bytes


@dataclass(frozen=True)
class Truncate(Op):
    CODE: ClassVar[int] = 9
    ino: int
    size: int
    time_ns: int


# SetAttr.fields bits: which attributes the op sets.
SET_MODE = 1
SET_UID = 2
SET_GID = 4
SET_ATIME = 8
SET_MTIME = 16


@dataclass(frozen=True)
class SetAttr(Op):
    """chmod, chown and utimens; `time_ns` is the new ctime."""

    CODE: ClassVar[int] = 10
    ino: int
    fields: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    time_ns: int


XATTR_CREATE = 1
XATTR_REPLACE = 2


@dataclass(frozen=True)
class SetXattr(Op):
    CODE: ClassVar[int] = 11
    ino: int
    flags: int
    time_ns: int
    name: bytes
    value: bytes


@dataclass(frozen=True)
class RemoveXattr(Op):
    CODE: ClassVar[int] = 12
    ino: int
    time_ns: int
    name: bytes


@dataclass(frozen=True)
class BeginEpoch(Op):
    """The first record a newly promoted primary writes: where its epoch begins."""

    CODE: ClassVar[int] = 13
    epoch: int
    time_ns: int


_LEN = struct.Struct(">I")


class _Codec:
    def __init__(self, cls: type[Op]) -> None:
        self.cls = cls
        fields = dataclasses.fields(cls)
        self.int_names = [f.name for f in fields if f.type == "int"]
        self.bytes_names = [f.name for f in fields if f.type == "bytes"]
        assert len(self.int_names) + len(self.bytes_names) == len(fields), cls
        self.ints = struct.Struct(">" + "q" * len(self.int_names))

    def decode(self, payload: bytes | memoryview) -> Op:
        try:
            values = dict(zip(self.int_names, self.ints.unpack_from(payload, 0), strict=True))
            pos = self.ints.size
            for name in self.bytes_names:
                (length,) = _LEN.unpack_from(payload, pos)
                pos += _LEN.size
                if pos + length > len(payload):
                    raise CorruptRecord(f"{self.cls.__name__}.{name} runs past the payload")
                values[name] = bytes(payload[pos:pos + length])
                pos += length
        except struct.error as exc:
            raise CorruptRecord(f"truncated {self.cls.__name__} payload") from exc
        if pos != len(payload):
            raise CorruptRecord(f"{len(payload) - pos} trailing bytes after {self.cls.__name__}")
        return self.cls(**values)


OP_TYPES: tuple[type[Op], ...] = (
    Init, MakeNode, Symlink, Link, Unlink, Rmdir, Rename, Write, Truncate, SetAttr,
    SetXattr, RemoveXattr, BeginEpoch,
)
_CODECS = {cls: _Codec(cls) for cls in OP_TYPES}
_BY_CODE = {cls.CODE: _CODECS[cls] for cls in OP_TYPES}
assert len(_BY_CODE) == len(OP_TYPES)
assert _CODECS[Write].bytes_names == ["data"]
#: Where a Write's data begins in its encoded payload (after its ints and the data's length).
WRITE_DATA_OFFSET = _CODECS[Write].ints.size + _LEN.size


def write_extent(payload: bytes | memoryview, at: int = 0) -> tuple[int, int, int]:
    """(ino, offset, data length) of the Write payload encoded at `at` of `payload`,
    without decoding (copying) its data."""
    codec = _CODECS[Write]
    ints = dict(zip(codec.int_names, codec.ints.unpack_from(payload, at), strict=True))
    (length,) = _LEN.unpack_from(payload, at + codec.ints.size)
    return ints["ino"], ints["offset"], length


def decode_op(code: int, payload: bytes | memoryview) -> Op:
    codec = _BY_CODE.get(code)
    if codec is None:
        raise CorruptRecord(f"unknown operation code {code}")
    return codec.decode(payload)
