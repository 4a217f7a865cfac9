"""The LMDB schema: every named database, its keys, values and invariants, in one place.

Everything is keyed by inode number, never by path, so a rename touches two dirents and
nothing else. Integers in keys are unsigned 64-bit big-endian so that a cursor walks them
in numeric order (a directory's entries, a file's blocks, the journal's records).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import lmdb

#: 3: every value of meta and of the state databases ends in a checksum (journal/integrity.py),
#: a record's checksum is XXH3-64, and an inode counts its stored blocks. 2: a block's value
#: is either its bytes or a reference into the journal (BLOCK_REF).
FORMAT_VERSION = 3

#: File data lives in fixed blocks of this size. LMDB stores values above ~2 KiB in
#: overflow pages, so a block of tens of KiB costs one page run, and a 4 KiB random write
#: rewrites one block. 64 KiB balances the two.
BLOCK_SIZE = 64 * 1024

ROOT_INO = 1
NAME_MAX = 255
#: Linux's PATH_MAX, also the longest symlink target we accept.
PATH_MAX = 4096
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 64 * 1024

# --- named databases -------------------------------------------------------------------
#: Every value of meta, inodes, dirents, blocks, symlinks and xattrs is stored sealed: the
#: value described below followed by an 8-byte checksum of it, seeded with its database
#: and key (journal/integrity.py). Reading a value verifies it; a mismatch is never served.
#: meta: name -> value. Keys below. `cluster_id` is fixed at creation; `last_seq` is the
#: seq of the newest applied record and equals the journal's last key whenever the journal
#: is non-empty; `next_ino` is greater than every inode number ever allocated.
DB_META = b"meta"
#: inodes: ino (u64 BE) -> packed `Inode`. ino 1 is the root; numbers are never reused.
#: `blocks` equals the number of the inode's entries in `blocks`.
#: nlink equals the number of dirents naming the inode; a directory has 2 plus one per
#: subdirectory ("." and each child's ".."), and records its parent's ino.
DB_INODES = b"inodes"
#: dirents: parent ino (u64 BE) + name bytes -> child ino (u64 BE). A cursor range over
#: one parent is that directory's listing. Every child ino exists in `inodes`.
DB_DIRENTS = b"dirents"
#: blocks: ino (u64 BE) + block number (u64 BE) -> where the block's bytes (up to
#: BLOCK_SIZE) are: BLOCK_DATA followed by the bytes, or BLOCK_REF followed by (seq u64,
#: start u32, length u32): the bytes are `length` bytes at `start` of the journal record
#: `seq`, a Write that covered the whole block. A write's bytes are thus stored once, in
#: its record; pruning copies the bytes a block still refers to into the block before it
#: deletes the record (`apply.detach_record`), so a reference always finds its record. A
#: missing block reads as zeros; no block lies wholly past the file's size, and the bytes
#: of the last block past the size are never stored.
DB_BLOCKS = b"blocks"
BLOCK_DATA = b"D"
BLOCK_REF = b"J"
#: symlinks: ino (u64 BE) -> target bytes, for every S_IFLNK inode and no other.
DB_SYMLINKS = b"symlinks"
#: xattrs: ino (u64 BE) + name bytes -> value bytes. The inode exists.
DB_XATTRS = b"xattrs"
#: journal: seq (u64 BE) -> encoded record (journal/records.py). Dense: from the first
#: retained seq to `last_seq` there is no hole.
DB_JOURNAL = b"journal"

ALL_DBS = (DB_META, DB_INODES, DB_DIRENTS, DB_BLOCKS, DB_SYMLINKS, DB_XATTRS, DB_JOURNAL)
#: The databases that make up the filesystem state proper (what `digest` covers).
STATE_DBS = (DB_INODES, DB_DIRENTS, DB_BLOCKS, DB_SYMLINKS, DB_XATTRS)

# meta keys
META_FORMAT = b"format"
META_CLUSTER_ID = b"cluster_id"  # 16 bytes
META_NEXT_INO = b"next_ino"  # u64 BE
META_LAST_SEQ = b"last_seq"  # u64 BE
META_EPOCH = b"epoch"  # u64 BE, the newest epoch this node has seen or taken
META_EPOCH_HISTORY = b"epoch_history"  # packed (epoch u64, first seq u64) pairs, ascending
META_ROLE = b"role"  # b"primary" or b"standby": what this node last ran as
META_CHECKPOINT_SEQ = b"checkpoint_seq"  # u64 BE: seq covered by the newest checkpoint
#: Node-local, written by a standby: JSON {"primary", "control", "epoch", "last_seq", "ack_flags"}:
#: the primary it follows, the highest epoch it has heard of, the highest last seq a primary of
#: that epoch announced, and which acks that primary's fsyncs wait for. Promotion reads it to
#: refuse a node known to be behind, and to choose defaults for the new primary.
META_UPSTREAM = b"upstream"
#: Node-local, u64 BE: an epoch that fenced this node while it was a primary (a peer knew a
#: higher one, or another primary claimed the same one). A primary restarted on this store
#: stays read-only while this is >= its epoch; promotion (a new, higher epoch) clears it.
META_FENCED = b"fenced"
#: Node-local, written by a primary: JSON {"epoch", "standbys": {name: seq}}: the standbys it
#: holds the journal for and what each has made durable, so that a primary restarted in
#: the same epoch keeps holding it for a standby that is away at the time.
META_STANDBYS = b"standbys"

_U64 = struct.Struct(">Q")
_U64_PAIR = struct.Struct(">QQ")


def u64(value: int) -> bytes:
    return _U64.pack(value)


def from_u64(raw: bytes) -> int:
    return _U64.unpack(raw)[0]


def dirent_key(parent: int, name: bytes) -> bytes:
    return _U64.pack(parent) + name


def block_key(ino: int, block_no: int) -> bytes:
    return _U64_PAIR.pack(ino, block_no)


_BLOCK_REF = struct.Struct(">cQII")


def block_data_value(*parts: bytes | memoryview) -> bytes:
    """A blocks value holding the block's bytes, the concatenation of `parts`."""
    return b"".join((BLOCK_DATA, *parts))


def block_ref_value(seq: int, start: int, length: int) -> bytes:
    """A blocks value referring to `length` bytes at `start` of journal record `seq`."""
    return _BLOCK_REF.pack(BLOCK_REF, seq, start, length)


def parse_block_ref(value: bytes | memoryview) -> tuple[int, int, int] | None:
    """(seq, start, length) of a reference value; None for a value holding its bytes.
    Raises ValueError for a value that is neither."""
    kind = value[:1]
    if kind == BLOCK_DATA:
        return None
    if kind == BLOCK_REF and len(value) == _BLOCK_REF.size:
        _kind, seq, start, length = _BLOCK_REF.unpack(value)
        return seq, start, length
    raise ValueError(f"malformed block value of {len(value)} bytes beginning {bytes(value[:1])!r}")


def xattr_key(ino: int, name: bytes) -> bytes:
    return _U64.pack(ino) + name


def pack_epoch_history(history: list[tuple[int, int]]) -> bytes:
    return b"".join(_U64_PAIR.pack(epoch, seq) for epoch, seq in history)


def unpack_epoch_history(raw: bytes | None) -> list[tuple[int, int]]:
    if not raw:
        return []
    return [_U64_PAIR.unpack_from(raw, i) for i in range(0, len(raw), _U64_PAIR.size)]


def epoch_at(history: Sequence[tuple[int, int]], seq: int) -> int:
    """The epoch that wrote `seq` according to an epoch history of (epoch, first seq)
    pairs (0: before the history begins)."""
    epoch = 0
    for e, first in history:
        if first > seq:
            break
        epoch = e
    return epoch


_INODE = struct.Struct(">IIIIQQqqqQQQ")
INODE_SIZE = _INODE.size


@dataclass(slots=True)
class Inode:
    """An inode's attributes. Times are nanoseconds since the epoch."""

    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int = 0
    #: For directories, the ino of the one directory holding it (the root holds itself),
    #: so that rename can refuse to move a directory into its own subtree. 0 otherwise.
    parent: int = 0
    #: How many blocks the file has stored (holes are not stored): st_blocks, so that a
    #: sparse file looks sparse to du and cp.
    blocks: int = 0

    def pack(self) -> bytes:
        return _INODE.pack(
            self.mode, self.nlink, self.uid, self.gid, self.rdev, self.size,
            self.atime_ns, self.mtime_ns, self.ctime_ns, self.generation, self.parent, self.blocks,
        )

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Inode:
        return cls(*_INODE.unpack(raw))

    @classmethod
    def unpack_from(cls, raw: bytes | memoryview) -> Inode:
        """The inode at the start of `raw` (a sealed value: the checksum follows)."""
        return cls(*_INODE.unpack_from(raw))


class Databases:
    """Handles of the named databases of one environment."""

    def __init__(self, env: lmdb.Environment, create: bool) -> None:
        if create:
            with env.begin(write=True) as txn:
                handles = [env.open_db(name, txn=txn, create=True) for name in ALL_DBS]
        else:
            handles = [env.open_db(name, create=False) for name in ALL_DBS]
        (self.meta, self.inodes, self.dirents, self.blocks, self.symlinks, self.xattrs,
         self.journal) = handles

    def by_name(self, name: bytes) -> object:
        return {DB_META: self.meta, DB_INODES: self.inodes, DB_DIRENTS: self.dirents, DB_BLOCKS: self.blocks,
                DB_SYMLINKS: self.symlinks, DB_XATTRS: self.xattrs, DB_JOURNAL: self.journal}[name]

    def state(self) -> list[tuple[bytes, object]]:
        return [
            (DB_INODES, self.inodes), (DB_DIRENTS, self.dirents), (DB_BLOCKS, self.blocks),
            (DB_SYMLINKS, self.symlinks), (DB_XATTRS, self.xattrs),
        ]
