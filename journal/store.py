"""The store: one LMDB environment whose state and journal change in the same transaction.

`commit(op)` is the primary's path (assign the next seq, apply, append); `apply_records`
is the standby's and the replayer's (verify, apply, append the same bytes). Both run
`apply` in a child transaction per op, so an op that fails validation, or finds the map
full, leaves nothing behind while the rest of its group still commits.

Commits are not flushed to disk one by one: the state and journal reach the page cache
at commit, which survives the death of the process (SIGKILL) but not of the machine.
`sync()` makes everything committed so far durable; fsync and fdatasync call it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import lmdb

from . import ops
from .apply import apply
from .errors import (
    CorruptRecord,
    FsError,
    ReadOnly,
    SequenceGap,
    StoreError,
    StoreFull,
    WrongCluster,
)
from .records import decode_record, encode_record, peek_header
from .schema import (
    DB_JOURNAL,
    FORMAT_VERSION,
    META_CHECKPOINT_SEQ,
    META_CLUSTER_ID,
    META_EPOCH,
    META_EPOCH_HISTORY,
    META_FORMAT,
    META_LAST_SEQ,
    META_ROLE,
    Databases,
    from_u64,
    pack_epoch_history,
    u64,
    unpack_epoch_history,
)
from .state import FsState

log = logging.getLogger(__name__)

DEFAULT_MAX_SIZE = 64 << 30
#: Largest number of queued ops one group commit takes.
GROUP_LIMIT = 256
#: Bytes of write payload one group commit takes before it commits.
GROUP_BYTES = 8 << 20
#: Meta key holding this node's configured size (node-local, like the role).
META_MAX_SIZE = b"max_size"

CommitListener = Callable[[list[tuple[int, bytes]]], None]


def parse_size(text: str) -> int:
    """'64G', '512M', '1048576' -> bytes."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _open_env(path: Path, map_size: int, readonly: bool = False) -> lmdb.Environment:
    return lmdb.open(
        str(path), map_size=map_size, max_dbs=16,
        sync=False, metasync=False, readonly=readonly, max_spare_txns=32, max_readers=512,
        lock=True,
    )


def is_store(path: str | os.PathLike) -> bool:
    return (Path(path) / "data.mdb").exists()


class Store:
    """An open store. Thread-safe: any thread may read; writes are serialised."""

    def __init__(self, path: str | os.PathLike, max_size: int | None = None,
                 readonly: bool = False, group_commit: bool = False) -> None:
        self.path = Path(path)
        if not is_store(self.path):
            raise StoreError(f"{self.path} holds no tandemfs store (run a primary on it to create one)")
        self.env = _open_env(self.path, max_size or DEFAULT_MAX_SIZE, readonly)
        self.db = Databases(self.env, create=False)
        with self.env.begin() as txn:
            fmt = txn.get(META_FORMAT, db=self.db.meta)
            if fmt is None or from_u64(fmt) != FORMAT_VERSION:
                raise StoreError(f"{self.path}: unsupported store format {fmt!r}")
            self.cluster_id: bytes = bytes(txn.get(META_CLUSTER_ID, db=self.db.meta))
            stored_size = txn.get(META_MAX_SIZE, db=self.db.meta)
        self.max_size = max_size or (from_u64(stored_size) if stored_size else DEFAULT_MAX_SIZE)
        if max_size is None and stored_size:
            self.env.set_mapsize(self.max_size)
        if max_size is not None and not readonly and stored_size != u64(max_size):
            with self.env.begin(write=True) as txn:
                txn.put(META_MAX_SIZE, u64(max_size), db=self.db.meta)
        self._write_lock = threading.Lock()
        self._load_position()
        self.read_only_reason: str | None = "opened read-only" if readonly else None
        self.listeners: list[CommitListener] = []
        self.group_commit = group_commit
        self._queue: queue.SimpleQueue | None = None
        self._writer: threading.Thread | None = None
        if group_commit and not readonly:
            self._queue = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._group_writer, name="group-commit", daemon=True)
            self._writer.start()

    # --- creation -------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, max_size: int | None = None,
               cluster_id: bytes | None = None, root_uid: int = 0, root_gid: int = 0,
               root_mode: int = 0o755, time_ns: int | None = None, init: bool = True,
               **kwargs) -> Store:
        """A new store; with `init`, seq 1 creates the root (a new cluster)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if is_store(path):
            raise StoreError(f"{path} already holds a store")
        env = _open_env(path, max_size or DEFAULT_MAX_SIZE)
        db = Databases(env, create=True)
        with env.begin(write=True) as txn:
            txn.put(META_FORMAT, u64(FORMAT_VERSION), db=db.meta)
            txn.put(META_CLUSTER_ID, cluster_id or uuid.uuid4().bytes, db=db.meta)
            txn.put(META_EPOCH, u64(1), db=db.meta)
            txn.put(META_LAST_SEQ, u64(0), db=db.meta)
            txn.put(META_MAX_SIZE, u64(max_size or DEFAULT_MAX_SIZE), db=db.meta)
        env.sync(True)
        env.close()
        store = cls(path, max_size=max_size, **kwargs)
        if init:
            store.commit(ops.Init(mode=root_mode, uid=root_uid, gid=root_gid,
                                  time_ns=time.time_ns() if time_ns is None else time_ns))
            store.sync()
        return store

    def close(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            if self._writer is not None:
                self._writer.join(timeout=10)
            self._queue = None
        with contextlib.suppress(lmdb.Error):
            if self.read_only_reason != "opened read-only":
                self.env.sync(True)
        self.env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- position -------------------------------------------------------------------
    def _load_position(self) -> None:
        with self.env.begin() as txn:
            self.last_seq = from_u64(txn.get(META_LAST_SEQ, db=self.db.meta) or u64(0))
            self.epoch = from_u64(txn.get(META_EPOCH, db=self.db.meta) or u64(1))
            self.epoch_history = unpack_epoch_history(txn.get(META_EPOCH_HISTORY, db=self.db.meta))

    def first_seq(self) -> int:
        """The oldest retained journal seq (last_seq + 1 when the journal is empty)."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.db.journal)
            return from_u64(cursor.key()) if cursor.first() else self.last_seq + 1

    def get_meta(self, key: bytes) -> bytes | None:
        with self.env.begin() as txn:
            value = txn.get(key, db=self.db.meta)
            return None if value is None else bytes(value)

    def set_meta(self, key: bytes, value: bytes) -> None:
        with self._write_lock, self.env.begin(write=True) as txn:
            txn.put(key, value, db=self.db.meta)

    @property
    def role(self) -> str:
        raw = self.get_meta(META_ROLE)
        return raw.decode() if raw else "primary"

    # --- reading --------------------------------------------------------------------
    @contextlib.contextmanager
    def reader(self) -> Iterator[FsState]:
        with self.env.begin() as txn:
            yield FsState(txn, self.db)

    def records(self, start: int, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Raw journal records with start <= seq < stop, in one read transaction."""
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.db.journal)
            if not cursor.set_range(u64(start)):
                return
            for key, value in cursor:
                seq = from_u64(key)
                if stop is not None and seq >= stop:
                    return
                yield seq, value

    # --- writing on the primary -----------------------------------------------------
    def commit(self, op: ops.Op) -> int:
        """Apply `op` as the next record; returns its seq once committed (not yet synced)."""
        if self.read_only_reason:
            raise ReadOnly(self.read_only_reason)
        if self._queue is not None:
            future: Future = Future()
            self._queue.put((op, future))
            return future.result()
        with self._write_lock:
            if self.read_only_reason:
                raise ReadOnly(self.read_only_reason)
            seq = self.last_seq + 1
            raw = encode_record(self.cluster_id, self.epoch, seq, op)
            try:
                with self.env.begin(write=True) as txn:
                    apply(FsState(txn, self.db), op)
                    self._append(txn, self.epoch, seq, raw)
            except lmdb.MapFullError as exc:
                raise StoreFull(f"store is full ({self.max_size} bytes)") from exc
            self.last_seq = seq
            self._notify([(seq, raw)])
            return seq

    def _group_writer(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            size = len(getattr(item[0], "data", b""))
            while len(batch) < GROUP_LIMIT and size < GROUP_BYTES:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
                size += len(getattr(item[0], "data", b""))
            self._commit_group(batch)

    def _commit_group(self, batch: list[tuple[ops.Op, Future]]) -> None:
        results: list[tuple[Future, object]] = []
        committed: list[tuple[int, bytes]] = []
        with self._write_lock:
            seq = self.last_seq
            try:
                with self.env.begin(write=True) as txn:
                    for op, future in batch:
                        if self.read_only_reason:
                            results.append((future, ReadOnly(self.read_only_reason)))
                            continue
                        raw = encode_record(self.cluster_id, self.epoch, seq + 1, op)
                        try:
                            with self.env.begin(write=True, parent=txn) as child:
                                apply(FsState(child, self.db), op)
                                self._append(child, self.epoch, seq + 1, raw)
                        except FsError as exc:
                            results.append((future, exc))
                            continue
                        except lmdb.MapFullError:
                            results.append((future, StoreFull(f"store is full ({self.max_size} bytes)")))
                            continue
                        seq += 1
                        committed.append((seq, raw))
                        results.append((future, seq))
            except lmdb.MapFullError:
                committed = []
                results = [(f, StoreFull("store is full")) for _, f in batch]
            except Exception as exc:  # the whole group failed: every caller hears of it
                log.exception("group commit failed")
                committed = []
                results = [(f, exc) for _, f in batch]
            if committed:
                self.last_seq = seq
                self._notify(committed)
        for future, result in results:
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    def _append(self, txn: lmdb.Transaction, epoch: int, seq: int, raw: bytes) -> None:
        txn.put(u64(seq), raw, db=self.db.journal, append=True)
        txn.put(META_LAST_SEQ, u64(seq), db=self.db.meta)
        if not self.epoch_history or epoch > self.epoch_history[-1][0]:
            # The first record of a new epoch: remember where the epoch begins.
            history = unpack_epoch_history(txn.get(META_EPOCH_HISTORY, db=self.db.meta))
            if not history or epoch > history[-1][0]:
                history.append((epoch, seq))
                txn.put(META_EPOCH_HISTORY, pack_epoch_history(history), db=self.db.meta)
            if epoch > from_u64(txn.get(META_EPOCH, db=self.db.meta) or u64(0)):
                txn.put(META_EPOCH, u64(epoch), db=self.db.meta)

    def _notify(self, committed: list[tuple[int, bytes]]) -> None:
        newest_epoch = peek_header(committed[-1][1])[0]
        if not self.epoch_history or newest_epoch > self.epoch_history[-1][0]:
            self._load_position()
        for listener in self.listeners:
            try:
                listener(committed)
            except Exception:
                log.exception("commit listener failed")

    # --- writing on a standby or replayer -------------------------------------------
    def apply_records(self, raws: list[bytes]) -> int:
        """Apply records that follow `last_seq`; duplicates are skipped. Returns last_seq.

        Raises SequenceGap when a record does not follow, CorruptRecord or WrongCluster
        when one fails verification; records before the bad one are committed.
        """
        with self._write_lock:
            seq = self.last_seq
            committed: list[tuple[int, bytes]] = []
            error: Exception | None = None
            try:
                with self.env.begin(write=True) as txn:
                    for raw in raws:
                        try:
                            record = decode_record(raw)
                        except CorruptRecord as exc:
                            error = exc
                            break
                        if record.cluster_id != self.cluster_id:
                            error = WrongCluster(f"record of cluster {record.cluster_id.hex()}")
                            break
                        if record.seq <= seq:
                            continue
                        if record.seq != seq + 1:
                            error = SequenceGap(f"record {record.seq} after {seq}")
                            break
                        with self.env.begin(write=True, parent=txn) as child:
                            try:
                                apply(FsState(child, self.db), record.op)
                            except FsError as exc:
                                # The primary applied it, so we must too: state has diverged.
                                raise StoreError(
                                    f"record {record.seq} ({type(record.op).__name__}) does not apply "
                                    f"here: {exc!r}") from exc
                            self._append(child, record.epoch, record.seq, bytes(raw))
                        seq = record.seq
                        committed.append((seq, bytes(raw)))
            except lmdb.MapFullError as exc:
                raise StoreFull(f"store is full ({self.max_size} bytes)") from exc
            if committed:
                self.last_seq = seq
                self._notify(committed)
        if error is not None:
            raise error
        return seq

    # --- durability, size, checkpoints, pruning -------------------------------------
    def sync(self) -> None:
        """Make every committed transaction durable on disk."""
        self.env.sync(True)

    def used_bytes(self) -> int:
        with self.env.begin() as txn:
            pages = 0
            psize = 4096
            for handle in (self.db.meta, self.db.inodes, self.db.dirents, self.db.blocks,
                           self.db.symlinks, self.db.xattrs, self.db.journal):
                st = txn.stat(handle)
                psize = st["psize"]
                pages += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            main = self.env.stat()
            pages += main["branch_pages"] + main["leaf_pages"] + main["overflow_pages"] + 2
        return pages * psize

    def counts(self) -> dict[str, int]:
        with self.env.begin() as txn:
            return {
                "inodes": txn.stat(self.db.inodes)["entries"],
                "journal_records": txn.stat(self.db.journal)["entries"],
            }

    def checkpoint(self, dest: str | os.PathLike) -> int:
        """Write a consistent compact copy of the store into `dest`; returns its seq."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        self.env.copy(str(dest), compact=True)
        with lmdb.open(str(dest), max_dbs=16, readonly=True, lock=False) as copy:
            meta = copy.open_db(b"meta", create=False)
            with copy.begin() as txn:
                seq = from_u64(txn.get(META_LAST_SEQ, db=meta))
        with self._write_lock, self.env.begin(write=True) as txn:
            txn.put(META_CHECKPOINT_SEQ, u64(seq), db=self.db.meta)
        return seq

    def prune(self, below: int, batch: int = 4096) -> int:
        """Delete journal records with seq < below, in short transactions; returns how many."""
        removed = 0
        while True:
            with self._write_lock, self.env.begin(write=True) as txn:
                cursor = txn.cursor(db=self.db.journal)
                n = 0
                if cursor.first():
                    while n < batch and from_u64(cursor.key()) < below:
                        if not cursor.delete():
                            break
                        n += 1
                        if not cursor.key():
                            break
            removed += n
            if n < batch:
                return removed

    def make_read_only(self, reason: str) -> None:
        """Refuse every later write with EROFS (a standby, or a primary that was fenced)."""
        if self.read_only_reason is None:
            log.warning("store is now read-only: %s", reason)
        self.read_only_reason = reason

    def make_writable(self) -> None:
        self.read_only_reason = None


__all__ = ["Store", "DB_JOURNAL", "parse_size", "is_store", "DEFAULT_MAX_SIZE"]
