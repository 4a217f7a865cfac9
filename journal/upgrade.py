"""Upgrading, in place, a store written by an older tandemfs to this version's format.

Format 1 -> 2: a block's value was its bytes; now it says what it holds (schema.DB_BLOCKS:
BLOCK_DATA and the bytes, or a reference into the journal). A record changed only in
its version byte. The upgrade tags every block, and re-stamps every journal record
after checking its checksum, in transactions of bounded size; the format in meta
changes last, in a transaction of its own. A block value of format 1 cannot be told
from one of format 2, so the key of the last block done is kept in meta in the same
transaction as the block: an upgrade that is interrupted (killed, a power cut) goes on
where it stopped when it is run again. Records carry their version, so they need no
such mark.

The store must not be in use (mount.py takes the node's lock for it). Format 2 nodes
do not accept format 1 records, so every node of a cluster is upgraded before any of
them runs again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from .errors import CorruptRecord, StoreError
from .records import record_version, restamp
from .schema import BLOCK_DATA, DB_META, FORMAT_VERSION, META_FORMAT, Databases, from_u64, u64
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

    def __str__(self) -> str:
        if self.from_format == FORMAT_VERSION:
            return f"{self.path}: already at format {FORMAT_VERSION}"
        return (f"{self.path}: format {self.from_format} -> {FORMAT_VERSION} ({self.blocks} blocks, "
                f"{self.records} journal records)")


def store_format(path: str | os.PathLike) -> int:
    """The format of the store in directory `path`, which must not be open in this process."""
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
    if report.from_format != 1:
        raise StoreError(f"{path}: store format {report.from_format} cannot be upgraded by this "
                         f"tandemfs (format {FORMAT_VERSION})")
    for _ in upgrade_steps(report):
        pass
    log.debug("%s", report)
    return report


def upgrade_steps(report: UpgradeReport) -> Iterator[None]:
    """The upgrade of format 1 as a generator that yields after each committed
    transaction: stopping it between two steps is what an interruption leaves."""
    env = lmdb.open(str(report.path), map_size=(report.path / "data.mdb").stat().st_size,
                    max_dbs=16, subdir=True)
    try:
        db = Databases(env, create=False)
        with env.begin() as txn:
            max_size = txn.get(META_MAX_SIZE, db=db.meta)
        if max_size is not None and from_u64(max_size) > env.info()["map_size"]:
            env.set_mapsize(from_u64(max_size))  # room to rewrite in, up to the store's size
        while n := _tag_blocks(env, db):
            report.blocks += n
            yield
        start = b""
        while True:
            n, start = _restamp_records(env, db, start)
            if not n:
                break
            report.records += n
            yield
        with env.begin(write=True) as txn:
            txn.put(META_FORMAT, u64(FORMAT_VERSION), db=db.meta)
            txn.delete(META_UPGRADE_BLOCKS, db=db.meta)
        env.sync(True)
        yield
    finally:
        env.close()


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


def _restamp_records(env: lmdb.Environment, db: Databases, start: bytes) -> tuple[int, bytes]:
    """Re-stamp the next batch of format-1 records from key `start` on as this format;
    returns how many, and the key to go on from."""
    with env.begin(write=True) as txn:
        batch: list[tuple[bytes, bytes]] = []
        size = 0
        cursor = txn.cursor(db=db.journal)
        if not cursor.set_range(start):
            return 0, start
        for key, raw in cursor:
            try:
                if record_version(raw) == FORMAT_VERSION:
                    continue
                batch.append((key, restamp(raw, FORMAT_VERSION)))
            except CorruptRecord as exc:
                raise CorruptRecord(f"journal record {from_u64(key)}: {exc}: fsck the store with the "
                                    "tandemfs that wrote it") from exc
            size += len(raw)
            if size >= BATCH_BYTES:
                break
        for key, raw in batch:
            txn.put(key, raw, db=db.journal)
        return len(batch), (u64(from_u64(batch[-1][0]) + 1) if batch else start)

