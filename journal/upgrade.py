"""Upgrading, in place, a store written by an older tandemfs to this version's format.

Format 1 -> 2: a block's value was its bytes; now it says what it holds (schema.DB_BLOCKS:
BLOCK_DATA and the bytes, or a reference into the journal). The upgrade tags every block
and re-stamps every record. A block value of format 1 cannot be told from one of format
2, so the key of the last block done is kept in meta in the same transaction as the
block: an upgrade that is interrupted goes on where it stopped when it is run again.

Format 2 -> 3: every value of meta (but the format) and of the state databases is sealed
with its checksum (journal/integrity.py), an inode counts its stored blocks, and a
record's checksum is XXH3-64 instead of CRC-32. A value whose checksum already holds is
done (a format 2 value passes by chance with probability 2^-64), and records carry their
version, so this step needs no mark to go on where it stopped.

Each step works in transactions of bounded size and changes the format in meta last, in
a transaction of its own; a record is re-stamped only after its old checksum was checked.
The store must not be in use (mount.py takes the node's lock for it). Nodes of one format
do not accept another's records, so every node of a cluster is upgraded before any of
them runs again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from .datafile import check_data_file
from .errors import CorruptRecord, StoreError
from .integrity import is_sealed_ok, seal
from .records import record_version, restamp
from .schema import (
    _INODE,
    BLOCK_DATA,
    DB_BLOCKS,
    DB_DIRENTS,
    DB_INODES,
    DB_META,
    DB_SYMLINKS,
    DB_XATTRS,
    FORMAT_VERSION,
    META_FORMAT,
    Databases,
    from_u64,
    u64,
)
from .store import META_MAX_SIZE

log = logging.getLogger(__name__)

#: Meta key: the last block key an interrupted upgrade tagged.
META_UPGRADE_BLOCKS = b"upgrade_blocks_done_to"
#: Bytes of values one upgrade transaction rewrites.
BATCH_BYTES = 16 << 20


@dataclass
class UpgradeReport:
    path: Path
    from_format: int
    blocks: int = 0
    records: int = 0
    #: Values sealed with their checksum (2 -> 3).
    values: int = 0

    def __str__(self) -> str:
        if self.from_format == FORMAT_VERSION:
            return f"{self.path}: already at format {FORMAT_VERSION}"
        return (f"{self.path}: format {self.from_format} -> {FORMAT_VERSION} ({self.blocks} blocks, "
                f"{self.records} journal records, {self.values} values sealed)")


def store_format(path: str | os.PathLike) -> int:
    """The format of the store in directory `path`, which must not be open in this process."""
    check_data_file(path)
    with lmdb.open(str(path), max_dbs=16, readonly=True, lock=False, subdir=True) as env:
        meta = env.open_db(DB_META, create=False)
        with env.begin() as txn:
            raw = txn.get(META_FORMAT, db=meta)
    if raw is None:
        raise StoreError(f"{path}: not a tandemfs store")
    return from_u64(raw)


def upgrade(path: str | os.PathLike) -> UpgradeReport:
    """Bring the store in directory `path` to this version's format; see the module doc."""
    report = UpgradeReport(Path(path), store_format(path))
    if report.from_format == FORMAT_VERSION:
        return report
    if report.from_format not in (1, 2):
        raise StoreError(f"{path}: store format {report.from_format} cannot be upgraded by this "
                         f"tandemfs (format {FORMAT_VERSION})")
    for _ in upgrade_steps(report):
        pass
    log.debug("%s", report)
    return report


def upgrade_steps(report: UpgradeReport) -> Iterator[None]:
    """The upgrade as a generator that yields after each committed transaction: stopping
    it between two steps is what an interruption leaves."""
    env = lmdb.open(str(report.path), map_size=(report.path / "data.mdb").stat().st_size,
                    max_dbs=16, subdir=True)
    try:
        db = Databases(env, create=False)
        with env.begin() as txn:
            fmt = from_u64(txn.get(META_FORMAT, db=db.meta))
            max_size = txn.get(META_MAX_SIZE, db=db.meta)
        if max_size is not None and len(max_size) >= 8 and from_u64(max_size[:8]) > env.info()["map_size"]:
            env.set_mapsize(from_u64(max_size[:8]))  # room to rewrite in, up to the store's size
        if fmt == 1:
            while n := _tag_blocks(env, db):
                report.blocks += n
                yield
            yield from _restamp_all(env, db, report, 2)
            with env.begin(write=True) as txn:
                txn.put(META_FORMAT, u64(2), db=db.meta)
                txn.delete(META_UPGRADE_BLOCKS, db=db.meta)
            env.sync(True)
            yield
        yield from _seal_all(env, db, report)
        yield from _restamp_all(env, db, report, FORMAT_VERSION)
        with env.begin(write=True) as txn:
            txn.put(META_FORMAT, u64(FORMAT_VERSION), db=db.meta)
        env.sync(True)
        yield
    finally:
        env.close()


def _restamp_all(env: lmdb.Environment, db: Databases, report: UpgradeReport, version: int) -> Iterator[None]:
    start = b""
    while True:
        n, start = _restamp_records(env, db, start, version)
        if not n:
            return
        report.records += n
        yield


def _seal_all(env: lmdb.Environment, db: Databases, report: UpgradeReport) -> Iterator[None]:
    """Seal every value of meta and the state databases not sealed yet (2 -> 3)."""
    for name, handle in ((DB_META, db.meta), (DB_INODES, db.inodes), (DB_DIRENTS, db.dirents),
                         (DB_BLOCKS, db.blocks), (DB_SYMLINKS, db.symlinks), (DB_XATTRS, db.xattrs)):
        start: bytes | None = b""
        while start is not None:
            n, start = _seal_batch(env, db, name, handle, start)
            report.values += n
            if n:
                yield


def _seal_batch(env: lmdb.Environment, db: Databases, name: bytes, handle: object,
                start: bytes) -> tuple[int, bytes | None]:
    """Seal the values of one database not sealed yet, from key `start` on, up to
    BATCH_BYTES of them; returns how many, and the key to go on from (None: done)."""
    with env.begin(write=True) as txn:
        cursor = txn.cursor(db=handle)
        if not (cursor.set_range(start) if start else cursor.first()):
            return 0, None
        batch: list[tuple[bytes, bytes]] = []
        size = 0
        next_start: bytes | None = None
        for key, value in cursor:
            if size >= BATCH_BYTES:
                next_start = key
                break
            if (name == DB_META and key == META_FORMAT) or is_sealed_ok(name, key, value):
                continue
            if name == DB_INODES:
                value = _with_block_count(txn, db, key, value)
            batch.append((key, seal(name, key, value)))
            size += len(value)
        for key, value in batch:
            txn.put(key, value, db=handle)
        return len(batch), next_start


def _with_block_count(txn: lmdb.Transaction, db: Databases, key: bytes, value: bytes) -> bytes:
    """A format 2 inode (without the count of its stored blocks) with it."""
    if len(value) == _INODE.size:
        return value
    count = 0
    cursor = txn.cursor(db=db.blocks)
    if cursor.set_range(key):
        for block_key in cursor.iternext(keys=True, values=False):
            if block_key[:8] != key:
                break
            count += 1
    return value + u64(count)


def _tag_blocks(env: lmdb.Environment, db: Databases) -> int:
    """Tag the next batch of format-1 blocks; returns how many (0: none are left)."""
    with env.begin(write=True) as txn:
        done_to = txn.get(META_UPGRADE_BLOCKS, db=db.meta)
        cursor = txn.cursor(db=db.blocks)
        if not (cursor.set_range(done_to) if done_to else cursor.first()):
            return 0
        batch: list[tuple[bytes, bytes]] = []
        size = 0
        for key, value in cursor:
            if key == done_to:
                continue
            batch.append((key, value))
            size += len(value)
            if size >= BATCH_BYTES:
                break
        for key, value in batch:
            txn.put(key, BLOCK_DATA + value, db=db.blocks)
        if batch:
            txn.put(META_UPGRADE_BLOCKS, batch[-1][0], db=db.meta)
        return len(batch)


def _restamp_records(env: lmdb.Environment, db: Databases, start: bytes, version: int) -> tuple[int, bytes]:
    """Re-stamp the next batch of older records from key `start` on as of `version`;
    returns how many, and the key to go on from."""
    with env.begin(write=True) as txn:
        batch: list[tuple[bytes, bytes]] = []
        size = 0
        cursor = txn.cursor(db=db.journal)
        if not cursor.set_range(start):
            return 0, start
        for key, raw in cursor:
            try:
                if record_version(raw) >= version:
                    continue
                batch.append((key, restamp(raw, version)))
            except CorruptRecord as exc:
                raise CorruptRecord(f"journal record {from_u64(key)}: {exc}: fsck the store with the "
                                    "tandemfs that wrote it") from exc
            size += len(raw)
            if size >= BATCH_BYTES:
                break
        for key, raw in batch:
            txn.put(key, raw, db=db.journal)
        return len(batch), (u64(from_u64(batch[-1][0]) + 1) if batch else start)

