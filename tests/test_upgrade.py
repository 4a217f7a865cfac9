"""Upgrading a store of an older format in place (journal/upgrade.py, `mount.py upgrade`)."""

from __future__ import annotations

import stat
from pathlib import Path

import lmdb
import pytest

from journal import ops, upgrade
from journal.check import digest, fsck
from journal.errors import StoreError
from journal.integrity import unseal
from journal.records import restamp
from journal.schema import (
    DB_BLOCKS,
    DB_DIRENTS,
    DB_INODES,
    DB_META,
    DB_SYMLINKS,
    DB_XATTRS,
    META_FORMAT,
    ROOT_INO,
    Databases,
    u64,
)
from journal.state import FsState
from journal.store import Store
from replica.control import NodeLock
from tests.mounts import run_cli

BS = 64 * 1024


def _as_format_2(path: Path) -> None:
    """Rewrite the closed store at `path` as format 2 had it: no value sealed with a
    checksum, inodes without their count of blocks, records with a CRC-32."""
    with lmdb.open(str(path), max_dbs=16, map_size=1 << 30) as env:
        db = Databases(env, create=False)
        with env.begin(write=True) as txn:
            for name, handle in ((DB_META, db.meta), (DB_INODES, db.inodes), (DB_DIRENTS, db.dirents),
                                 (DB_BLOCKS, db.blocks), (DB_SYMLINKS, db.symlinks), (DB_XATTRS, db.xattrs)):
                for key, raw in list(txn.cursor(db=handle)):
                    if name == DB_META and key == META_FORMAT:
                        continue
                    value = bytes(unseal(name, key, raw))
                    txn.put(key, value[:-8] if name == DB_INODES else value, db=handle)
            for key, raw in list(txn.cursor(db=db.journal)):
                txn.put(key, restamp(raw, 2), db=db.journal)
            txn.put(META_FORMAT, u64(2), db=db.meta)


def _as_format_1(path: Path) -> None:
    """Rewrite the closed store at `path` as format 1 had it: format 2, but a block's
    value was its bytes (never a reference), and a record's version byte said 1."""
    with lmdb.open(str(path), max_dbs=16, map_size=1 << 30) as env:
        db = Databases(env, create=False)
        with env.begin(write=True) as txn:
            state = FsState(txn, db)
            blocks = [(bytes(k), bytes(state.block_bytes(k, v))) for k, v in txn.cursor(db=db.blocks)]
            for key, data in blocks:
                state.put_block_data(key, data)
    _as_format_2(path)
    with lmdb.open(str(path), max_dbs=16, map_size=1 << 30) as env:
        db = Databases(env, create=False)
        with env.begin(write=True) as txn:
            for key, value in list(txn.cursor(db=db.blocks)):
                txn.put(key, value[1:], db=db.blocks)
            for key, raw in list(txn.cursor(db=db.journal)):
                txn.put(key, restamp(raw, 1), db=db.journal)
            txn.put(META_FORMAT, u64(1), db=db.meta)


def _contents(store: Store) -> dict[bytes, bytes]:
    out = {}
    with store.reader() as state:
        for name, ino in state.entries(ROOT_INO):
            node = state.inode(ino)
            if stat.S_ISREG(node.mode):
                out[bytes(name)] = state.read(ino, 0, node.size)
    return out


def _populate(path: Path) -> tuple[tuple, dict[bytes, bytes], tuple]:
    """A store with blocks of both kinds, records and a checkpoint; returns the digests of
    the store and of the checkpoint, and the files' contents."""
    with Store.create(path, max_size=256 << 20) as store:
        t = iter(range(10**6))

        def make(name: bytes) -> int:
            ino = store.allocate_ino()
            store.commit(ops.MakeNode(parent=ROOT_INO, ino=ino, mode=stat.S_IFREG | 0o644, rdev=0,
                                      uid=0, gid=0, time_ns=next(t), name=name))
            return ino

        a, b = make(b"a"), make(b"b")
        store.commit(ops.Write(ino=a, offset=0, time_ns=next(t), data=bytes(range(256)) * (3 * BS // 256)))
        store.commit(ops.Write(ino=a, offset=BS + 7, time_ns=next(t), data=b"partial"))
        store.commit(ops.Truncate(ino=a, size=2 * BS + 3, time_ns=next(t)))
        store.commit(ops.SetXattr(ino=a, flags=0, time_ns=next(t), name=b"user.k", value=b"v"))
        store.prune(store.last_seq - 2)  # a's blocks now hold their bytes; b's will refer to records
        store.commit(ops.Write(ino=b, offset=0, time_ns=next(t), data=b"b" * (BS + 11)))
        store.checkpoint(path / "checkpoints" / "tmp")
        (path / "checkpoints" / "tmp").rename(path / "checkpoints" / str(store.last_seq))
        store.commit(ops.Write(ino=b, offset=5, time_ns=next(t), data=b"after the checkpoint"))
        return digest(store), _contents(store), _checkpoint_digest(path)


def _checkpoint_digest(path: Path) -> tuple:
    (checkpoint,) = (path / "checkpoints").glob("[0-9]*")
    with Store(checkpoint, readonly=True) as store:
        return digest(store)


def _entries(path: Path) -> tuple[int, int]:
    """(blocks, journal records) of the closed store at `path`."""
    with lmdb.open(str(path), max_dbs=16, readonly=True, lock=False) as env:
        db = Databases(env, create=False)
        with env.begin() as txn:
            return txn.stat(db.blocks)["entries"], txn.stat(db.journal)["entries"]


def _sealable(path: Path) -> int:
    """How many values of the closed store at `path` an upgrade to format 3 seals."""
    with lmdb.open(str(path), max_dbs=16, readonly=True, lock=False) as env:
        db = Databases(env, create=False)
        with env.begin() as txn:
            return sum(txn.stat(h)["entries"] for h in (db.meta, db.inodes, db.dirents, db.blocks,
                                                         db.symlinks, db.xattrs)) - 1  # not the format


AS_FORMAT = {1: _as_format_1, 2: _as_format_2}


@pytest.mark.parametrize("old", [1, 2])
def test_upgrade_of_an_older_store(tmp_path: Path, old: int) -> None:
    data = tmp_path / "data"
    state, contents, checkpoint_state = _populate(data)
    (checkpoint,) = (data / "checkpoints").glob("[0-9]*")
    AS_FORMAT[old](data)
    AS_FORMAT[old](checkpoint)
    with pytest.raises(StoreError, match=f"format {old} was written by an older tandemfs.*mount.py upgrade"):
        Store(data)

    (blocks, records), (cp_blocks, cp_records) = _entries(data), _entries(checkpoint)
    assert blocks == cp_blocks == 5 and records > 1 and cp_records > 1
    values, cp_values = _sealable(data), _sealable(checkpoint)
    tagged, stamps = (blocks, 2) if old == 1 else (0, 1)  # format 1's records are re-stamped twice

    result = run_cli("upgrade", "--data", str(data))
    assert result.stdout.splitlines() == [
        f"{data}: format {old} -> 3 ({tagged} blocks, {stamps * records} journal records, "
        f"{values} values sealed)",
        f"{checkpoint}: format {old} -> 3 ({tagged and cp_blocks} blocks, {stamps * cp_records} journal "
        f"records, {cp_values} values sealed)",
    ]
    with Store(data) as store:
        assert fsck(store) == []
        assert digest(store) == state
        assert _contents(store) == contents
    assert _checkpoint_digest(data) == checkpoint_state

    again = run_cli("upgrade", "--data", str(data))
    assert again.stdout.splitlines() == [f"{data}: already at format 3", f"{checkpoint}: already at format 3"]


@pytest.mark.parametrize("old, steps", [(1, 1), (1, 3), (1, 8), (2, 1), (2, 5), (2, 20)])
def test_an_interrupted_upgrade_goes_on_where_it_stopped(tmp_path: Path, monkeypatch, old: int,
                                                         steps: int) -> None:
    data = tmp_path / "data"
    state, contents, _ = _populate(data)
    AS_FORMAT[old](data)
    monkeypatch.setattr(upgrade, "BATCH_BYTES", 1)  # one value per transaction
    report = upgrade.UpgradeReport(data, old)
    run = upgrade.upgrade_steps(report)
    for _ in range(steps):  # stopped between two transactions
        next(run)
    run.close()
    assert upgrade.store_format(data) == old
    assert 0 < report.blocks + report.records + report.values == steps

    finished = upgrade.upgrade(data)
    assert finished.from_format == old
    with Store(data) as store:
        assert fsck(store) == []
        assert digest(store) == state
        assert _contents(store) == contents


def test_upgrade_refuses_a_store_in_use(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _populate(data)
    _as_format_1(data)
    lock = NodeLock(data)  # what a running node holds
    try:
        result = run_cli("upgrade", "--data", str(data), check=False)
    finally:
        lock.release()
    assert result.returncode == 2 and "stop it first" in result.stderr
    assert upgrade.store_format(data) == 1
