"""Checksums of every value the store holds, verified whenever a value is read.

LMDB checksums nothing: a flipped bit in `data.mdb` would be served as it is. So every
value of the state databases and of meta ends in an 8-byte XXH3-64 checksum of the value,
seeded with a hash of its database and key: a value that changed, or that landed under
another key or in another database, fails the check. (XXH3 was measured fastest of
zlib's CRC-32, hardware CRC-32C and XXH3 on this project's sizes: 1.5 us for a 64 KiB
block against 3 us and 17 us; docs/benchmarks.md.) Journal records carry a checksum of
their own (records.py), and a block that refers to a record is verified through it.

`seal` adds the checksum, `unseal` verifies and strips it; a mismatch raises
`DamagedValue`, which names what was damaged, so the node can log it, count it, refuse
to serve it (EIO) and repair it from a peer (replica/repair.py).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import xxhash

from .errors import StoreDamaged
from .schema import (
    BLOCK_SIZE,
    DB_BLOCKS,
    DB_DIRENTS,
    DB_INODES,
    DB_JOURNAL,
    DB_META,
    DB_SYMLINKS,
    DB_XATTRS,
)

log = logging.getLogger(__name__)

CHECKSUM_SIZE = 8
_SUM = struct.Struct(">Q")
_U64 = struct.Struct(">Q")
_PAIR = struct.Struct(">QQ")

#: Each database's part in the seed: a value moved between databases fails its check.
DB_TAGS = {DB_META: 1, DB_INODES: 2, DB_DIRENTS: 3, DB_BLOCKS: 4, DB_SYMLINKS: 5, DB_XATTRS: 6,
           DB_JOURNAL: 7}
_xxh3 = xxhash.xxh3_64_intdigest
_pack = _SUM.pack
#: For the hot paths that inline a check (journal/state.py): the hash, and the checksum's
#: packing, as `seal` and `unseal` use them.
xxh3 = _xxh3
pack_checksum = _pack
#: Values up to this size are returned by unseal as copies, larger ones as views.
_COPY_BELOW = 512


def seal(db_name: bytes, key: bytes | memoryview, *parts: bytes | memoryview) -> bytes:
    """The concatenation of `parts` followed by its checksum, as it is stored under `key`
    in `db_name`: one copy of the bytes, however many parts."""
    if len(parts) == 1:
        value = parts[0]
        tail = _pack(_xxh3(value, _xxh3(key, DB_TAGS[db_name])))
        return value + tail if type(value) is bytes else b"".join((value, tail))
    hasher = xxhash.xxh3_64(seed=_xxh3(key, DB_TAGS[db_name]))
    for part in parts:
        hasher.update(part)
    return b"".join((*parts, _pack(hasher.intdigest())))


def unseal(db_name: bytes, key: bytes | memoryview, raw: bytes | memoryview) -> bytes | memoryview:
    """The value stored as `raw` under `key`, verified; raises DamagedValue.

    Every read of the store comes through here, so it is kept to a few C calls: a small
    value is returned as a copy (cheaper than a view), a large one (a block) as a view."""
    end = len(raw) - CHECKSUM_SIZE
    if end < 0:
        raise DamagedValue(db_name, bytes(key), f"value of {len(raw)} bytes is shorter than its checksum")
    value = raw[:end] if end <= _COPY_BELOW else memoryview(raw)[:end]
    if _pack(_xxh3(value, _xxh3(key, DB_TAGS[db_name]))) != raw[end:]:
        raise DamagedValue(db_name, bytes(key), "checksum mismatch")
    return value


def is_sealed_ok(db_name: bytes, key: bytes | memoryview, raw: bytes | memoryview) -> bool:
    try:
        unseal(db_name, key, raw)
    except DamagedValue:
        return False
    return True


class DamagedValue(StoreDamaged):
    """A value of the store failed its checksum (or a record it refers to did): it is
    never served. `where` says what it is in the filesystem's terms."""

    def __init__(self, db_name: bytes, key: bytes, problem: str, seq: int | None = None) -> None:
        self.db_name = db_name
        self.key = key
        self.problem = problem
        #: For a block that refers to a damaged journal record: that record's seq.
        self.seq = seq
        super().__init__(f"damaged {self.where}: {problem}")

    @property
    def where(self) -> str:
        return describe(self.db_name, self.key)

    @property
    def ino(self) -> int | None:
        if self.db_name in (DB_INODES, DB_SYMLINKS, DB_BLOCKS, DB_XATTRS, DB_DIRENTS) and len(self.key) >= 8:
            return _U64.unpack_from(self.key)[0]
        return None


def describe(db_name: bytes, key: bytes) -> str:
    """A value's place in words an operator can act on: inode and offset, not keys."""
    try:
        if db_name == DB_BLOCKS and len(key) == _PAIR.size:
            ino, block_no = _PAIR.unpack(key)
            return f"data of inode {ino} at offset {block_no * BLOCK_SIZE}"
        if db_name == DB_INODES and len(key) == 8:
            return f"attributes of inode {_U64.unpack(key)[0]}"
        if db_name == DB_DIRENTS and len(key) > 8:
            return f"directory entry {bytes(key[8:])!r} in directory inode {_U64.unpack_from(key)[0]}"
        if db_name == DB_SYMLINKS and len(key) == 8:
            return f"symlink target of inode {_U64.unpack(key)[0]}"
        if db_name == DB_XATTRS and len(key) > 8:
            return f"extended attribute {bytes(key[8:])!r} of inode {_U64.unpack_from(key)[0]}"
        if db_name == DB_JOURNAL and len(key) == 8:
            return f"journal record {_U64.unpack(key)[0]}"
        if db_name == DB_META:
            return f"store metadata {bytes(key).decode(errors='replace')!r}"
    except struct.error:
        pass
    return f"{db_name.decode()} key {bytes(key).hex()}"


@dataclass
class Damage:
    """One damaged value as the node saw it."""

    db_name: bytes
    key: bytes
    where: str
    problem: str
    seen_ns: int
    repaired: bool = False


@dataclass
class IntegrityMonitor:
    """What a node knows of damage in its store: counters for status and metrics, and
    the recent cases. Logging happens here, once per damaged value, so a file read in a
    loop does not flood the log."""

    found: int = 0
    repaired: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=32))
    _known: dict = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def damaged(self, exc: DamagedValue) -> None:
        """Note a damaged value found; logs CRITICAL the first time it is seen."""
        key = (exc.db_name, exc.key)
        with self._lock:
            case = self._known.get(key)
            if case is not None and not case.repaired:
                return
            self.found += 1
            case = Damage(exc.db_name, exc.key, exc.where, exc.problem, time.time_ns())
            self._known[key] = case
            self.recent.append(case)
            if len(self._known) > 4096:
                self._known.pop(next(iter(self._known)))
        log.critical("damaged %s: %s; it is not served (EIO)", exc.where, exc.problem)

    def repaired_value(self, db_name: bytes, key: bytes, source: str) -> None:
        """Damage noted before (`damaged`) was repaired; counted once per case."""
        with self._lock:
            case = self._known.get((db_name, key))
            if case is not None and not case.repaired:
                case.repaired = True
                self.repaired += 1
        log.warning("repaired %s from %s", describe(db_name, key), source)

    @property
    def unrepaired(self) -> int:
        with self._lock:
            return sum(1 for case in self._known.values() if not case.repaired)

    def summary(self) -> dict:
        with self._lock:
            return {
                "damaged_found": self.found,
                "repaired": self.repaired,
                "unrepaired": sum(1 for case in self._known.values() if not case.repaired),
                "recent": [{"where": c.where, "problem": c.problem, "repaired": c.repaired,
                            "seen_ns": c.seen_ns} for c in list(self.recent)[-8:]],
            }
