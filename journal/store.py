"""The store: one LMDB environment whose state and journal change in the same transaction.

`commit(op)` is the primary's path (assign the next seq, apply, append); `apply_records`
is the standby's and the replayer's (verify, apply, append the same bytes). Both run
`apply` in a child transaction per op, so an op that fails validation, or finds the map
full, leaves nothing behind while the rest of its group still commits.

Commits are not flushed to disk one by one: the state and journal reach the page cache
at commit, which survives the death of the process (SIGKILL) but not of the machine.
`sync()` makes everything committed so far durable; fsync and fdatasync call it.

A standby that fell too far behind replaces its whole environment with a checkpoint of
the primary's (`replace_with`), possibly under a live read-only mount. Every read path
of the store therefore holds a shared lock on the environment for the length of one
short transaction, and the swap takes it exclusively: a reader sees the old state or
the new one, never a closed environment.

The store is as large as `--max-size` (`max_size`) or as its disk can hold, whichever is
smaller. LMDB grows its data file by writing past its end; on a full disk that write
comes up short and LMDB answers EIO. So the map is kept no larger than the data file plus
the disk's free space less a reserve (`fit_map`, at open, when full and on every
maintenance tick): growing past that is LMDB's MapFullError, which the store answers as
StoreFull (ENOSPC) with nothing applied. A disk that something else fills still makes a
commit fail short; that failure, with the disk found full, is StoreFull too. The reserve
is room that writers never take; pruning and deletes, which need pages to free pages, may
take parts of it (`WRITING`, `PRUNING`, `DELETING`), so that a full store can always be
emptied.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import lmdb

from . import ops
from .apply import apply, detach_record
from .datafile import check_data_file
from .errors import (
    CorruptRecord,
    FsError,
    ReadOnly,
    SequenceGap,
    StaleEpoch,
    StoreDamaged,
    StoreError,
    StoreFull,
    WrongCluster,
)
from .integrity import DamagedValue, IntegrityMonitor, describe, seal, unseal
from .records import decode_record, encode_record, peek_header, verify_record
from .schema import (
    BLOCK_SIZE,
    DB_JOURNAL,
    DB_META,
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
#: Bytes of block data one pruning transaction copies out of records before it commits.
PRUNE_COPY_BYTES = 4 << 20
#: Meta key holding this node's configured size (node-local, like the role).
META_MAX_SIZE = b"max_size"
#: How long a remap of the environment waits for readers to leave before it gives up
#: until the next try (seconds): a long reader (a checkpoint's copy) must not stall writes.
REMAP_WAIT = 2.0

#: Ops that give room back, and so may use some of the reserve a full disk keeps.
FREEING_OPS = (ops.Unlink, ops.Rmdir, ops.Rename, ops.Truncate, ops.RemoveXattr)

CommitListener = Callable[[list[tuple[int, bytes]]], None]


class EnvLock:
    """A readers-writer lock guarding which LMDB environment the store has open.

    Readers are many and short (one FUSE call's transaction) and must cost next to
    nothing; the writer is rare (a snapshot swap) and is preferred, so a stream of
    readers cannot starve it. A reader announces itself by appending to a deque, then
    checks for a swap; the swapper raises its flag, then waits for the deque to empty.
    Both steps are single, atomic operations under the GIL, so either the swapper sees
    the reader or the reader sees the flag, and backs off. A thread that already holds
    the shared side may take it again without blocking, so a read path that calls
    another read path cannot deadlock against a waiting swap.
    """

    def __init__(self) -> None:
        self._active: collections.deque[None] = collections.deque()
        self._swapping = False
        self._cond = threading.Condition(threading.Lock())
        self._swap_lock = threading.Lock()
        self._local = threading.local()

    def acquire_shared(self) -> None:
        local = self._local
        depth = getattr(local, "depth", 0)
        if depth:
            local.depth = depth + 1
            return
        while True:
            self._active.append(None)
            if not self._swapping:
                break
            self._active.pop()
            with self._cond:
                self._cond.notify_all()
                while self._swapping:
                    self._cond.wait()
        local.depth = 1

    def release_shared(self) -> None:
        local = self._local
        local.depth -= 1
        if not local.depth:
            self._active.pop()
            if self._swapping:
                with self._cond:
                    self._cond.notify_all()

    def shared(self) -> _Shared:
        return _Shared(self)

    def held_here(self) -> bool:
        """Whether this thread holds the shared side (and so must not ask for the other)."""
        return bool(getattr(self._local, "depth", 0))

    @contextlib.contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        """No reader inside; TimeoutError if readers stay longer than `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._swap_lock:
            with self._cond:
                self._swapping = True
                try:
                    while self._active:
                        if deadline is not None and time.monotonic() > deadline:
                            raise TimeoutError("readers did not leave the store in time")
                        self._cond.wait(0.01)
                except BaseException:
                    self._swapping = False
                    self._cond.notify_all()
                    raise
            try:
                yield
            finally:
                with self._cond:
                    self._swapping = False
                    self._cond.notify_all()


class _Shared:
    __slots__ = ("_lock",)

    def __init__(self, lock: EnvLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_shared()

    def __exit__(self, *exc: object) -> None:
        self._lock.release_shared()


class _Reader:
    """`with store.reader() as state`: a read transaction under the shared lock."""

    __slots__ = ("_store", "_txn", "_buffers")

    def __init__(self, store: Store, buffers: bool = False) -> None:
        self._store = store
        self._buffers = buffers

    def __enter__(self) -> FsState:
        store = self._store
        store._env_lock.acquire_shared()
        try:
            self._txn = store.env.begin(buffers=self._buffers)
        except BaseException:
            store._env_lock.release_shared()
            raise
        return FsState(self._txn, store.db)

    def __exit__(self, *exc: object) -> None:
        try:
            self._txn.abort()
        finally:
            self._store._env_lock.release_shared()


def read_meta(txn: lmdb.Transaction, meta: object, key: bytes) -> bytes | None:
    """Meta value `key`, verified (schema: every meta value is sealed but the format)."""
    raw = txn.get(key, db=meta)
    if raw is None:
        return None
    if key == META_FORMAT:
        return bytes(raw)
    return bytes(unseal(DB_META, key, raw))


def write_meta(txn: lmdb.Transaction, meta: object, key: bytes, value: bytes) -> None:
    txn.put(key, value if key == META_FORMAT else seal(DB_META, key, value), db=meta)


def inspect_environment(path: str | os.PathLike) -> tuple[bytes, int, int]:
    """(cluster id, last seq, epoch) of the store environment in directory `path`, which
    must not be open elsewhere in this process; raises StoreError if it is not a store."""
    check_data_file(path)
    try:
        with lmdb.open(str(path), max_dbs=16, readonly=True, lock=False, subdir=True) as env:
            meta = env.open_db(DB_META, create=False)
            with env.begin() as txn:
                fmt = read_meta(txn, meta, META_FORMAT)
                if fmt is None or len(fmt) != 8 or from_u64(fmt) != FORMAT_VERSION:
                    raise StoreError(_format_problem(path, fmt))
                cluster_id = read_meta(txn, meta, META_CLUSTER_ID)
                last_seq = read_meta(txn, meta, META_LAST_SEQ)
                epoch = read_meta(txn, meta, META_EPOCH)
    except DamagedValue as exc:
        raise StoreError(f"{path}: {exc}; rebuild this node from a standby") from exc
    except lmdb.Error as exc:
        raise StoreError(f"{path}: not a readable store: {exc}") from exc
    if cluster_id is None or last_seq is None:
        raise StoreError(f"{path}: not a tandemfs store (no cluster id or last seq)")
    return bytes(cluster_id), from_u64(last_seq), from_u64(epoch) if epoch else 1


def _format_problem(path: str | os.PathLike, fmt: bytes | None) -> str:
    """What to tell of a store whose format is not this version's."""
    if fmt is None or len(fmt) != 8:
        return f"{path}: not a tandemfs store (no format version)"
    found = from_u64(fmt)
    if found < FORMAT_VERSION:
        return (f"{path}: store format {found} was written by an older tandemfs (this one uses format "
                f"{FORMAT_VERSION}); stop every node of the cluster and run `mount.py upgrade --data DIR` "
                f"on each")
    return (f"{path}: store format {found} was written by a newer tandemfs (this one uses format "
            f"{FORMAT_VERSION})")


def split_write(op: ops.Op) -> list[ops.Op]:
    """A write as block-aligned writes of at most one block each; any other op alone."""
    if not isinstance(op, ops.Write) or op.offset % BLOCK_SIZE + len(op.data) <= BLOCK_SIZE:
        return [op]
    parts: list[ops.Op] = []
    data = memoryview(op.data)  # slices of it share the caller's buffer: no copies
    pos = 0
    while pos < len(data):
        take = BLOCK_SIZE - (op.offset + pos) % BLOCK_SIZE
        parts.append(ops.Write(ino=op.ino, offset=op.offset + pos, time_ns=op.time_ns,
                               data=data[pos:pos + take]))  # type: ignore[arg-type]
        pos += take
    return parts


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


def disk_reserve(total: int) -> int:
    """Bytes of a filesystem of `total` bytes that a store leaves free to writers: a
    thirty-second of it, at least 8 MiB (pruning and deleting need pages too), at most
    64 MiB."""
    return min(64 << 20, max(8 << 20, total // 32))


#: Who grows the store's file, from the least to the most entitled to the disk's reserve:
#: a write keeps it all free; pruning, which must copy what blocks still use before it
#: frees a record, half of it; a delete, which frees at once, a quarter.
WRITING, PRUNING, DELETING = 0, 1, 2


@dataclass(frozen=True)
class DiskRoom:
    """The filesystem under a directory, as a store or a download into it sees it."""

    path: Path
    #: Bytes of the filesystem...
    total: int
    #: ...free to this process...
    free: int
    #: ...and of those, what a store leaves free.
    reserve: int
    #: Bytes of disk that the store's data file occupies already (0: no such file).
    file: int

    @property
    def usable(self) -> int:
        """Bytes a store may still add to its file."""
        return self.usable_for(WRITING)

    def usable_for(self, who: int) -> int:
        """Bytes a store may add to its file for WRITING, PRUNING or DELETING: each keeps
        half as much of the reserve free as the one before it."""
        return max(0, self.free - (self.reserve >> who))

    def describe(self) -> str:
        mib = 1 << 20
        return (f"{self.path}: {self.free / mib:.1f} MiB free of {self.total / mib:.1f} MiB "
                f"({self.reserve / mib:.1f} MiB kept in reserve), the store's file takes "
                f"{self.file / mib:.1f} MiB")


def disk_room(path: str | os.PathLike) -> DiskRoom:
    """The room on the filesystem holding directory `path` (and its data file, if any)."""
    path = Path(path)
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    try:
        file = os.stat(path / "data.mdb").st_blocks * 512
    except FileNotFoundError:
        file = 0
    return DiskRoom(path, total, st.f_bavail * st.f_frsize, disk_reserve(total), file)


def _short_write(exc: lmdb.Error) -> bool:
    """Whether LMDB failed as it does when writing its file fails: EIO for a short write
    (a full disk), or the errno of a failed one."""
    text = str(exc)
    return "Input/output error" in text or "No space left" in text


class Store:
    """An open store. Thread-safe: any thread may read; writes are serialised."""

    def __init__(self, path: str | os.PathLike, max_size: int | None = None,
                 readonly: bool = False, group_commit: bool = False) -> None:
        self.path = Path(path)
        if not is_store(self.path):
            raise StoreError(f"{self.path} holds no tandemfs store (run a primary on it to create one)")
        self._env_lock = EnvLock()
        self._write_lock = threading.Lock()
        self._ino_lock = threading.Lock()
        self._open(max_size, readonly)
        #: Damage found in this store, and repairs made: status and metrics show it.
        self.integrity = IntegrityMonitor()
        #: Set by a node with a live peer: repairs a damaged value from it (replica/repair.py),
        #: returns whether it did.
        self.repairer: Callable[[DamagedValue], bool] | None = None
        self.read_only_reason: str | None = "opened read-only" if readonly else None
        self.listeners: list[CommitListener] = []
        #: Called (from the writing thread, without the write lock) when the store is full:
        #: the node prunes what journal it may. Then the write is tried once more.
        self.on_full: Callable[[], None] | None = None
        self.group_commit = group_commit
        self._queue: queue.SimpleQueue | None = None
        self._writer: threading.Thread | None = None
        if group_commit and not readonly:
            self._queue = queue.SimpleQueue()
            self._writer = threading.Thread(target=self._group_writer, name="group-commit", daemon=True)
            self._writer.start()

    def _open(self, max_size: int | None, readonly: bool) -> None:
        """Open the environment at self.path and load what the store caches of it."""
        check_data_file(self.path)
        try:
            self.env = _open_env(self.path, max_size or DEFAULT_MAX_SIZE, readonly)
        except lmdb.Error as exc:
            raise StoreDamaged(f"{self.path}: not a readable store: {exc}") from exc
        try:
            self.db = Databases(self.env, create=False)
            with self.env.begin() as txn:
                fmt = read_meta(txn, self.db.meta, META_FORMAT)
                if fmt is None or len(fmt) != 8 or from_u64(fmt) != FORMAT_VERSION:
                    raise StoreError(_format_problem(self.path, fmt))
                cluster_id = read_meta(txn, self.db.meta, META_CLUSTER_ID)
                if cluster_id is None:
                    raise StoreError(f"{self.path}: not a tandemfs store (no cluster id)")
                self.cluster_id: bytes = cluster_id
                stored_size = read_meta(txn, self.db.meta, META_MAX_SIZE)
            self.max_size = max_size or (from_u64(stored_size) if stored_size else DEFAULT_MAX_SIZE)
            if not readonly:
                self.env.set_mapsize(self._map_bound())  # no transaction is open yet
            elif max_size is None and stored_size:
                self.env.set_mapsize(self.max_size)
            if max_size is not None and not readonly and stored_size != u64(max_size):
                with self.env.begin(write=True) as txn:
                    write_meta(txn, self.db.meta, META_MAX_SIZE, u64(max_size))
            self._load_position()
        except DamagedValue as exc:
            self.env.close()
            raise StoreDamaged(f"{self.path}: {exc}; rebuild this node from a standby") from exc
        except lmdb.Error as exc:
            self.env.close()
            raise StoreDamaged(f"{self.path}: not a readable store: {exc}") from exc
        except BaseException:
            self.env.close()
            raise

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
            write_meta(txn, db.meta, META_FORMAT, u64(FORMAT_VERSION))
            write_meta(txn, db.meta, META_CLUSTER_ID, cluster_id or uuid.uuid4().bytes)
            write_meta(txn, db.meta, META_EPOCH, u64(1))
            write_meta(txn, db.meta, META_LAST_SEQ, u64(0))
            write_meta(txn, db.meta, META_MAX_SIZE, u64(max_size or DEFAULT_MAX_SIZE))
        env.sync(True)
        env.close()
        store = cls(path, max_size=max_size, **kwargs)
        if init:
            store.commit(ops.Init(mode=root_mode, uid=root_uid, gid=root_gid,
                                  time_ns=time.time_ns() if time_ns is None else time_ns))
            store.sync()
        return store

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, checkpoint: str | os.PathLike,
                        max_size: int | None = None, **kwargs) -> Store:
        """A store at `path` (holding none yet) made of checkpoint directory `checkpoint`,
        whose data file is moved into place (same filesystem)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if is_store(path):
            raise StoreError(f"{path} already holds a store")
        inspect_environment(checkpoint)
        _install_data_file(Path(checkpoint), path)
        return cls(path, max_size=max_size, **kwargs)

    def replace_with(self, checkpoint: str | os.PathLike, keep_old: str | os.PathLike | None = None) -> int:
        """Swap this open store's environment for checkpoint directory `checkpoint`
        (its data file is moved into place); returns the new last_seq.

        Writers are excluded by the write lock and readers by the environment lock, so
        a live mount over this store sees the old state or the new, and nothing between.
        The checkpoint must belong to this store's cluster. A crash at any point leaves
        either the old environment or the new one in place, both whole. With `keep_old`,
        the replaced data file stays whole in that directory (a hard link, so no copy):
        an environment an operator can open, e.g. a node's state before a resync.
        """
        cluster_id, seq, _epoch = inspect_environment(checkpoint)
        if cluster_id != self.cluster_id:
            raise WrongCluster(f"checkpoint {checkpoint} is of cluster {cluster_id.hex()}, "
                               f"not {self.cluster_id.hex()}")
        readonly = self.read_only_reason == "opened read-only"
        with self._write_lock, self._env_lock.exclusive():
            old_seq = self.last_seq
            if keep_old is not None and not readonly:
                self.env.sync(True)
            self.env.close()
            try:
                if keep_old is not None:
                    _keep_data_file(self.path, Path(keep_old))
                _install_data_file(Path(checkpoint), self.path)
            finally:
                # Whether or not the file moved, reopen what is now in place.
                self._open(self.max_size, readonly)
        log.info("store %s replaced by checkpoint at seq %d (was at seq %d)", self.path, seq, old_seq)
        return self.last_seq

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

    # --- room -----------------------------------------------------------------------
    def room(self) -> DiskRoom:
        return disk_room(self.path)

    def capacity(self, who: int = WRITING) -> int:
        """Bytes the store may grow to: `max_size`, or what its disk can hold if less
        (beside the part of the reserve that `who` leaves free)."""
        room = self.room()
        return min(self.max_size, room.file + room.usable_for(who))

    def _map_bound(self, who: int = WRITING) -> int:
        return max(1 << 20, self.capacity(who) // 4096 * 4096)

    def fit_map(self, who: int = WRITING) -> bool:
        """Set the map to what the disk can hold now for `who` (pruning and deleting may
        take parts of the reserve); returns whether the map is as asked.

        Remapping needs every reader of this process out of the environment, so it waits
        for them at most REMAP_WAIT, and it is not done at all from a thread inside a read
        transaction. A change smaller than an eighth of the reserve is not worth stalling
        readers for: the reserve absorbs it."""
        if self.read_only_reason == "opened read-only" or self._env_lock.held_here():
            return False
        want = self._map_bound(who)
        current = self.env.info()["map_size"]
        if abs(want - current) < max(1 << 20, self.room().reserve // 8) and who == WRITING:
            return True
        if not self._write_lock.acquire(timeout=REMAP_WAIT):
            return False
        try:
            with self._env_lock.exclusive(REMAP_WAIT):
                self.env.set_mapsize(want)
        except TimeoutError:
            return False
        finally:
            self._write_lock.release()
        log.debug("store map %d -> %d bytes (%s)", current, self.env.info()["map_size"],
                  self.room().describe())
        return True

    def _full(self) -> StoreFull:
        """The StoreFull to raise now: the disk's, if the disk is what bounds the store."""
        room = self.room()
        if room.file + room.usable < self.max_size:
            return StoreFull(f"disk full: {room.describe()}")
        return StoreFull(f"store is full ({self.max_size} bytes, its --max-size)")

    def _full_or_raise(self, exc: lmdb.Error) -> StoreFull:
        """The StoreFull that LMDB error `exc` means; re-raises `exc` if it is no such thing.

        MapFullError is the map's bound; a failed write of the data file is the disk's,
        once the disk is found (nearly) full: something other than this store took the
        reserve. The transaction was aborted either way, and the environment stays usable."""
        if isinstance(exc, lmdb.MapFullError):
            return self._full()
        if _short_write(exc):
            room = self.room()
            if room.free < room.reserve:
                return self._full()
        raise exc

    # --- position -------------------------------------------------------------------
    def _load_position(self) -> None:
        with self.env.begin() as txn:
            self._next_ino = FsState(txn, self.db).next_ino()
            meta = self.db.meta
            self.last_seq = from_u64(read_meta(txn, meta, META_LAST_SEQ) or u64(0))
            self.epoch = from_u64(read_meta(txn, meta, META_EPOCH) or u64(1))
            self.epoch_history = unpack_epoch_history(read_meta(txn, meta, META_EPOCH_HISTORY))

    def allocate_ino(self) -> int:
        """A new inode number for an op about to be built. Never handed out twice, even
        when the op then fails; numbers are cheap, reuse is not (stale handles)."""
        with self._ino_lock:
            ino = self._next_ino
            self._next_ino += 1
            return ino

    def _note_inode(self, op: ops.Op) -> None:
        """Keep allocate_ino ahead of every inode an applied op created (also a standby's)."""
        if isinstance(op, (ops.MakeNode, ops.Symlink)) and op.ino >= self._next_ino:
            with self._ino_lock:
                self._next_ino = max(self._next_ino, op.ino + 1)

    def first_seq(self) -> int:
        """The oldest retained journal seq (last_seq + 1 when the journal is empty)."""
        with self._env_lock.shared(), self.env.begin() as txn:
            cursor = txn.cursor(db=self.db.journal)
            return from_u64(cursor.key()) if cursor.first() else self.last_seq + 1

    def get_meta(self, key: bytes) -> bytes | None:
        with self._env_lock.shared(), self.env.begin() as txn:
            return read_meta(txn, self.db.meta, key)

    def set_meta(self, key: bytes, value: bytes) -> None:
        try:
            with self._write_lock, self.env.begin(write=True) as txn:
                write_meta(txn, self.db.meta, key, value)
        except lmdb.Error as exc:
            raise self._full_or_raise(exc) from exc

    def delete_meta(self, key: bytes) -> None:
        try:
            with self._write_lock, self.env.begin(write=True) as txn:
                txn.delete(key, db=self.db.meta)
        except lmdb.Error as exc:
            raise self._full_or_raise(exc) from exc

    @property
    def role(self) -> str:
        raw = self.get_meta(META_ROLE)
        return raw.decode() if raw else "primary"

    # --- damage ---------------------------------------------------------------------
    def handle_damage(self, exc: DamagedValue) -> bool:
        """A reader met damaged value `exc`: note it (CRITICAL log once, counters), and
        repair it from a peer if this node has one. Returns whether it was repaired, so
        the reader may try once more; without a repair the reader must fail (EIO)."""
        self.integrity.damaged(exc)
        repairer = self.repairer
        if repairer is None:
            return False
        try:
            return repairer(exc)
        except Exception:
            log.exception("repairing %s failed", exc.where)
            return False

    def handle(self, db_name: bytes) -> object:
        """The handle of named database `db_name`."""
        return self.db.by_name(db_name)

    def repair_value(self, db_name: bytes, key: bytes, raw: bytes,
                     still_valid: Callable[[FsState], bool]) -> bool:
        """Write `raw` (a sealed value, or a verified journal record) as the value of `key`
        in `db_name`, if the value there is still damaged and `still_valid(state)` holds,
        in one local transaction that is not journaled (a repair restores the logical state
        the journal already describes). Returns whether the value is whole now, which is
        also the case when it meanwhile changed or went away."""
        handle = self.handle(db_name)
        with self._write_lock, self._env_lock.shared():
            txn = self.env.begin(write=True)
            try:
                state = FsState(txn, self.db)
                current = txn.get(key, db=handle)
                if current is None or self._is_whole(state, db_name, key, current):
                    return True
                if not still_valid(state):
                    return False
                txn.put(key, raw, db=handle)
                txn.commit()
                return True
            finally:
                txn.abort()  # a no-op after the commit

    def intact_neighbours(self, db_name: bytes, key: bytes,
                          limit: int = 1024) -> tuple[bytes | None, bytes | None]:
        """The nearest keys before and after the stored `key` in `db_name` whose values
        verify (None: none within `limit` entries, or none at all): the bounds of a range
        repair."""
        with self.reader() as state:
            cursor = state.txn.cursor(db=self.handle(db_name))

            def nearest(move: Callable[[], bool]) -> bytes | None:
                cursor.set_key(key)
                for _ in range(limit):
                    if not move():
                        return None
                    if self._is_whole(state, db_name, cursor.key(), cursor.value()):
                        return bytes(cursor.key())
                return None

            if not cursor.set_key(key):
                raise StoreError(f"{describe(db_name, key)} is no longer stored")
            return nearest(cursor.prev), nearest(cursor.next)

    def replace_range(self, db_name: bytes, before: bytes | None, after: bytes | None,
                      entries: list[tuple[bytes, bytes]], still_valid: Callable[[FsState], bool]) -> bool:
        """Replace every entry of `db_name` strictly between `before` and `after` (None:
        unbounded) by `entries` (key, sealed value), in one local transaction that is not
        journaled, if `still_valid(state)` holds; a range repair (replica/repair.py)."""
        handle = self.handle(db_name)
        with self._write_lock, self._env_lock.shared():
            txn = self.env.begin(write=True)
            try:
                state = FsState(txn, self.db)
                if not still_valid(state):
                    return False
                cursor = txn.cursor(db=handle)
                positioned = cursor.set_range(before) if before else cursor.first()
                if positioned and before is not None and cursor.key() == before:
                    positioned = cursor.next()
                while positioned and (after is None or cursor.key() < after):
                    positioned = cursor.delete()
                for key, value in entries:
                    txn.put(key, value, db=handle)
                txn.commit()
                return True
            finally:
                txn.abort()

    @staticmethod
    def _is_whole(state: FsState, db_name: bytes, key: bytes, raw: bytes) -> bool:
        try:
            state.verify_entry(db_name, key, raw)
        except DamagedValue:
            return False
        return True

    # --- reading --------------------------------------------------------------------
    def reader(self, buffers: bool = False) -> contextlib.AbstractContextManager[FsState]:
        """A read transaction; with `buffers`, values are views of the map, valid only
        inside it (for FsState.read_into)."""
        return _Reader(self, buffers)

    def shared(self) -> contextlib.AbstractContextManager[None]:
        """Hold the environment in place (no snapshot swap) while using `env` directly."""
        return self._env_lock.shared()

    def records(self, start: int, stop: int | None = None,
                verify: bool = True) -> Iterator[tuple[int, bytes]]:
        """Raw journal records with start <= seq < stop, in one read transaction, each
        verified (DamagedValue for one that fails) unless `verify` is false.

        The environment stays locked while the iterator lives: consume it promptly."""
        with self._env_lock.shared(), self.env.begin() as txn:
            cursor = txn.cursor(db=self.db.journal)
            if not cursor.set_range(u64(start)):
                return
            for key, value in cursor:
                seq = from_u64(key)
                if stop is not None and seq >= stop:
                    return
                if verify:
                    try:
                        verify_record(value, seq)
                    except CorruptRecord as exc:
                        raise DamagedValue(DB_JOURNAL, bytes(key), str(exc)) from exc
                yield seq, value

    # --- writing on the primary -----------------------------------------------------
    def begin_epoch(self, epoch: int, time_ns: int | None = None) -> int:
        """Make `epoch` this node's writing epoch, beginning with a BeginEpoch record; returns its seq.

        The record is committed through the ordinary path (`_commit_parts`), so it is
        journaled, published to standbys, and `_append` records (epoch, seq) in the epoch
        history. It is committed even while the store refuses writes (a standby being
        promoted) and under the write lock, so no other write can come before it in the
        new epoch; the caller makes the store writable afterwards. It is synced before
        this returns: a node that says it took an epoch has it on disk.
        """
        with self._write_lock:
            current = max(self.epoch, self.epoch_history[-1][0] if self.epoch_history else 0)
            if epoch <= current:
                raise StoreError(f"epoch {epoch} is not above this store's epoch {current}")
            previous = self.epoch
            self.epoch = epoch
            op = ops.BeginEpoch(epoch=epoch, time_ns=time.time_ns() if time_ns is None else time_ns)
            try:
                seq = self._commit_parts([op], force=True)
            except BaseException:
                self.epoch = previous
                raise
        self.sync()
        log.info("epoch %d begins at seq %d", epoch, seq)
        return seq

    def commit(self, op: ops.Op) -> int:
        """Apply `op` as the next record(s); returns the last seq once committed (not synced).

        A write spanning several blocks becomes one record per block, committed in one
        transaction: no journal value is then larger than a block, so the page runs that
        deleted blocks free fit later records, and a nearly full store does not refuse a
        write for want of one large contiguous run.
        """
        if self.read_only_reason:
            raise ReadOnly(self.read_only_reason)
        parts = split_write(op)
        return self._with_room(lambda: self._submit(parts), frees=isinstance(op, FREEING_OPS))

    def _with_room(self, attempt: Callable[[], int], frees: bool = False) -> int:
        """`attempt()`, once more after `make_room` if the store was full. An op that
        `frees` room (a delete) may then take some of the disk's reserve: deleting needs a
        few pages too, and a store too full to delete in would stay full for good."""
        try:
            return attempt()
        except StoreFull:
            self.make_room()
            try:
                return attempt()
            except StoreFull:
                if not frees or not self.fit_map(DELETING):
                    raise
        try:
            return attempt()
        finally:
            self.fit_map()

    def _submit(self, parts: list[ops.Op]) -> int:
        if self._queue is not None:
            future: Future = Future()
            self._queue.put((parts, future))
            return future.result()
        with self._write_lock:
            return self._commit_parts(parts)

    def make_room(self) -> None:
        """What a full store does before it answers ENOSPC: let its owner drop journal
        nobody needs (`on_full`), measure the disk again (room freed outside the store),
        then commit once more, empty. LMDB reuses pages freed by a transaction only from
        the next-but-one on, so after a delete or a prune the empty commit is what makes
        that space available."""
        if self.on_full is not None:
            try:
                self.on_full()
            except StoreFull as exc:
                log.debug("nothing could be pruned: %s", exc)
            except Exception:
                log.exception("making room in a full store failed")
        self.fit_map()
        with self._write_lock:
            self._advance()

    def _commit_parts(self, parts: list[ops.Op], force: bool = False) -> int:
        if self.read_only_reason and not force:
            raise ReadOnly(self.read_only_reason)
        try:
            with self.env.begin(write=True) as txn:
                committed = self._apply_parts(txn, parts, self.last_seq)
        except lmdb.Error as exc:
            raise self._full_or_raise(exc) from exc
        self.last_seq = committed[-1][0]
        self._notify(committed)
        return self.last_seq

    def _apply_parts(self, txn: lmdb.Transaction, parts: list[ops.Op], seq: int) -> list[tuple[int, bytes]]:
        """Apply the parts of one call and journal them as the records after `seq`."""
        state = FsState(txn, self.db, remember_inodes=True)
        # The records go in after all the parts are applied: appending them in one run
        # commits 5-10% faster than interleaved with the parts. A block that a part wrote
        # whole refers to a record not yet appended until then, which is safe because the
        # parts of one call are one op split at block boundaries: no part reads a block
        # that another part wrote.
        for i, op in enumerate(parts, start=seq + 1):
            apply(state, op, i)
            self._note_inode(op)
        committed = []
        for op in parts:
            seq += 1
            raw = encode_record(self.cluster_id, self.epoch, seq, op)
            self._append(txn, self.epoch, seq, raw)
            committed.append((seq, raw))
        write_meta(txn, self.db.meta, META_LAST_SEQ, u64(seq))
        return committed

    def _advance(self) -> None:
        try:
            with self.env.begin(write=True) as txn:
                write_meta(txn, self.db.meta, META_LAST_SEQ, u64(self.last_seq))
        except lmdb.Error as exc:
            self._full_or_raise(exc)  # full is what the caller knows already

    def _group_writer(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            size = sum(len(getattr(op, "data", b"")) for op in item[0])
            while len(batch) < GROUP_LIMIT and size < GROUP_BYTES:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
                size += sum(len(getattr(op, "data", b"")) for op in item[0])
            self._commit_group(batch)

    def _commit_group(self, batch: list[tuple[list[ops.Op], Future]]) -> None:
        results: list[tuple[Future, object]] = []
        committed: list[tuple[int, bytes]] = []
        with self._write_lock:
            seq = self.last_seq
            try:
                with self.env.begin(write=True) as txn:
                    for parts, future in batch:
                        if self.read_only_reason:
                            results.append((future, ReadOnly(self.read_only_reason)))
                            continue
                        try:
                            with self.env.begin(write=True, parent=txn) as child:
                                mine = self._apply_parts(child, parts, seq)
                        except (FsError, DamagedValue) as exc:
                            results.append((future, exc))
                            continue
                        except lmdb.MapFullError as exc:
                            results.append((future, self._full_or_raise(exc)))
                            continue
                        seq += len(mine)
                        committed.extend(mine)
                        results.append((future, seq))
            except lmdb.Error as exc:
                try:
                    failure: Exception = self._full_or_raise(exc)
                except lmdb.Error:
                    log.exception("group commit failed")
                    failure = exc
                committed = []
                results = [(f, failure) for _, f in batch]
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
        """Journal record `seq`; the caller sets META_LAST_SEQ once for the transaction."""
        meta = self.db.meta
        txn.put(u64(seq), raw, db=self.db.journal, append=True)
        if not self.epoch_history or epoch > self.epoch_history[-1][0]:
            # The first record of a new epoch: remember where the epoch begins.
            history = unpack_epoch_history(read_meta(txn, meta, META_EPOCH_HISTORY))
            if not history or epoch > history[-1][0]:
                history.append((epoch, seq))
                write_meta(txn, meta, META_EPOCH_HISTORY, pack_epoch_history(history))
            if epoch > from_u64(read_meta(txn, meta, META_EPOCH) or u64(0)):
                write_meta(txn, meta, META_EPOCH, u64(epoch))

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
        when one fails verification, StaleEpoch when one is of an older epoch than the
        records before it (a deposed primary's); records before the bad one are committed.
        A full store makes room (`make_room`) and tries once more; then it applies the
        records in halves, so that as many go in as fit, before raising StoreFull.
        """
        try:
            return self._with_room(lambda: self._apply_records(raws))
        except StoreFull:
            if len(raws) <= 1:
                raise
        half = len(raws) // 2
        self.apply_records(raws[:half])
        return self.apply_records(raws[half:])

    def _apply_records(self, raws: list[bytes]) -> int:
        with self._write_lock:
            seq = self.last_seq
            epoch = self.epoch_history[-1][0] if self.epoch_history else 0
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
                        if record.epoch < epoch:
                            error = StaleEpoch(f"record {record.seq} of epoch {record.epoch} after records "
                                               f"of epoch {epoch}")
                            break
                        epoch = record.epoch
                        try:
                            apply(FsState(txn, self.db, remember_inodes=True), record.op, record.seq)
                        except FsError as exc:
                            # The primary applied it, so we must too: the states have diverged.
                            raise StoreError(
                                f"record {record.seq} ({type(record.op).__name__}) does not apply "
                                f"here: {exc!r}") from exc
                        self._append(txn, record.epoch, record.seq, bytes(raw))
                        self._note_inode(record.op)
                        seq = record.seq
                        committed.append((seq, bytes(raw)))
                    if committed:
                        write_meta(txn, self.db.meta, META_LAST_SEQ, u64(seq))
            except lmdb.Error as exc:
                raise self._full_or_raise(exc) from exc
            if committed:
                self.last_seq = seq
                self._notify(committed)
        if error is not None:
            raise error
        return seq

    # --- durability, size, checkpoints, pruning -------------------------------------
    def sync(self) -> None:
        """Make every committed transaction durable on disk."""
        with self._env_lock.shared():
            self.env.sync(True)

    def used_bytes(self) -> int:
        with self._env_lock.shared(), self.env.begin() as txn:
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

    def journal_bytes(self) -> int:
        """Bytes of pages the journal database occupies."""
        with self._env_lock.shared(), self.env.begin() as txn:
            st = txn.stat(self.db.journal)
        return (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]

    def counts(self) -> dict[str, int]:
        with self._env_lock.shared(), self.env.begin() as txn:
            return {
                "inodes": txn.stat(self.db.inodes)["entries"],
                "journal_records": txn.stat(self.db.journal)["entries"],
            }

    def checkpoint(self, dest: str | os.PathLike) -> int:
        """Write a consistent compact copy of the store into `dest`; returns its seq.
        StoreFull if the disk under `dest` fills meanwhile (the caller removes `dest`)."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with self._env_lock.shared(), self.env.begin(buffers=True) as txn:
                # Verified in the transaction that is copied: a checkpoint never carries damage
                # to a standby that bootstraps from it, or into a backup.
                damaged = FsState(txn, self.db).damaged_values()
                if not damaged:
                    self.env.copy(str(dest), compact=True, txn=txn)
        except lmdb.Error as exc:
            if _short_write(exc):
                raise StoreFull(f"disk full: a checkpoint filled {disk_room(dest).describe()}") from exc
            raise
        if damaged:
            for exc in damaged:
                self.handle_damage(exc)  # noted, and repaired from a peer if the node has one
            raise StoreDamaged(f"checkpoint not taken: the store holds {len(damaged)} damaged value(s) "
                               f"({damaged[0]}); `mount.py scrub` repairs them from a peer")
        fsync_path(dest / "data.mdb")
        fsync_path(dest)
        _cluster, seq, _epoch = inspect_environment(dest)
        try:
            with self._write_lock, self.env.begin(write=True) as txn:
                write_meta(txn, self.db.meta, META_CHECKPOINT_SEQ, u64(seq))
        except lmdb.Error as exc:
            # Only a note of the newest checkpoint: the checkpoint itself is whole.
            log.debug("checkpoint %d not noted in the store: %s", seq, self._full_or_raise(exc))
        return seq

    def checkpoint_room(self) -> tuple[int, DiskRoom]:
        """(bytes a checkpoint of the store needs at most, the room on its disk now). A
        compact copy holds the pages in use and no more."""
        return self.used_bytes(), self.room()

    def prune(self, below: int, batch: int = 4096) -> int:
        """Delete journal records with seq < below, in short transactions; returns how many.

        The bytes that blocks still refer to in a record are first copied into the blocks
        (`detach_record`); a transaction stops after PRUNE_COPY_BYTES of such copies.
        Deleting needs pages too (copies of the tree's pages, the free list, those copies),
        so in a full store a batch can fail: then an empty commit frees what earlier ones
        released, and the batch is retried smaller. StoreFull only if not even one record
        can go.
        """
        removed = 0
        widened = tried_widening = False
        try:
            while True:
                try:
                    n, more = self._prune_batch(below, batch)
                except lmdb.Error as exc:
                    full = self._full_or_raise(exc)
                    with self._write_lock:
                        self._advance()
                    if not tried_widening:
                        # Pruning is what gives room back: it may take some of the reserve
                        # that writers may not.
                        tried_widening = True
                        widened = self.fit_map(PRUNING)
                        continue
                    if batch == 1:
                        raise StoreFull(f"{full}; not even one journal record could be pruned") from exc
                    batch = max(1, batch // 8)
                    continue
                removed += n
                if not more:
                    return removed
        finally:
            if widened:
                self.fit_map()

    def _prune_batch(self, below: int, batch: int) -> tuple[int, bool]:
        """Prune up to `batch` records below `below` in one transaction; returns how many,
        and whether more may go."""
        # buffers=True: a record is looked at, rarely copied (detach_record reads it whole
        # before it writes); the key is read before the cursor deletes.
        with self._write_lock, self.env.begin(write=True, buffers=True) as txn:
            state = FsState(txn, self.db)
            cursor = txn.cursor(db=self.db.journal)
            n = copied = 0
            if not cursor.first():
                return 0, False
            while (seq := from_u64(cursor.key())) < below:
                if n >= batch or copied >= PRUNE_COPY_BYTES:
                    return n, True
                copied += detach_record(state, seq, cursor.value())
                if not cursor.delete():
                    return n, False
                n += 1
                if not cursor.key():
                    return n, False
        return n, False

    def make_read_only(self, reason: str) -> None:
        """Refuse every later write with EROFS (a standby, or a primary that was fenced)."""
        if self.read_only_reason is None:
            log.warning("store is now read-only: %s", reason)
        self.read_only_reason = reason

    def make_writable(self) -> None:
        self.read_only_reason = None


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory: so that the names in it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_data_file(store_dir: Path, keep_dir: Path) -> None:
    """Hard-link the data file of `store_dir` (closed) into `keep_dir`, durably."""
    keep_dir.mkdir(parents=True, exist_ok=True)
    target = keep_dir / "data.mdb"
    with contextlib.suppress(FileNotFoundError):
        target.unlink()  # left by a resync that crashed before the swap: the same old file
    os.link(store_dir / "data.mdb", target)
    fsync_path(keep_dir)


def _install_data_file(source_dir: Path, store_dir: Path) -> None:
    """Move the data file of environment `source_dir` over `store_dir`'s, durably."""
    fsync_path(source_dir / "data.mdb")
    os.replace(source_dir / "data.mdb", store_dir / "data.mdb")
    fsync_path(store_dir)


__all__ = [
    "Store", "EnvLock", "inspect_environment", "fsync_path", "split_write", "parse_size", "is_store",
    "DEFAULT_MAX_SIZE", "DiskRoom", "disk_room", "disk_reserve",
]
