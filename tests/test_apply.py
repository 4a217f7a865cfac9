"""Operations-level tests: ops committed to a real LMDB store, no FUSE.

Every store a test creates through the `make_store` fixture is run through the
consistency checker when the test ends, so each test is also a test of the invariants.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from journal import ops
from journal.apply import detach_record
from journal.check import digest, fsck, replay
from journal.errors import (
    AlreadyExists,
    DirectoryNotEmpty,
    FsError,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoSuchAttribute,
    NotADirectory,
    NotFound,
    NotPermitted,
    StoreFull,
)
from journal.integrity import seal, unseal
from journal.records import WRITE_DATA_START, decode_record, encode_record
from journal.schema import (
    BLOCK_SIZE,
    DB_BLOCKS,
    DB_DIRENTS,
    DB_INODES,
    DB_JOURNAL,
    DB_META,
    DB_SYMLINKS,
    DB_XATTRS,
    ROOT_INO,
    Inode,
    block_data_value,
    block_key,
    block_ref_value,
    dirent_key,
    pack_epoch_history,
    parse_block_ref,
    u64,
)
from journal.state import FsState
from journal.store import Store, split_write

BS = BLOCK_SIZE
T0 = 1_000_000_000_000
#: Tests do not need the default 64 GiB map.
TEST_MAX_SIZE = 256 << 20


class Fs:
    """Decides inode numbers and times the way the primary does, and commits ops."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.clock = T0

    def now(self) -> int:
        self.clock += 1000
        return self.clock

    def next_ino(self) -> int:
        with self.store.reader() as state:
            return state.next_ino()

    def commit(self, op: ops.Op) -> int:
        return self.store.commit(op)

    # --- namespace ------------------------------------------------------------------
    def mknode(self, parent: int, name: bytes, mode: int, rdev: int = 0) -> int:
        ino = self.next_ino()
        self.commit(ops.MakeNode(parent=parent, ino=ino, mode=mode, rdev=rdev, uid=1000, gid=100,
                                 time_ns=self.now(), name=name))
        return ino

    def create(self, parent: int, name: bytes, perm: int = 0o644) -> int:
        return self.mknode(parent, name, stat.S_IFREG | perm)

    def mkdir(self, parent: int, name: bytes, perm: int = 0o755) -> int:
        return self.mknode(parent, name, stat.S_IFDIR | perm)

    def symlink(self, parent: int, name: bytes, target: bytes) -> int:
        ino = self.next_ino()
        self.commit(ops.Symlink(parent=parent, ino=ino, uid=1000, gid=100, time_ns=self.now(),
                                name=name, target=target))
        return ino

    def link(self, ino: int, parent: int, name: bytes) -> None:
        self.commit(ops.Link(ino=ino, parent=parent, time_ns=self.now(), name=name))

    def unlink(self, parent: int, name: bytes) -> None:
        self.commit(ops.Unlink(parent=parent, time_ns=self.now(), name=name))

    def rmdir(self, parent: int, name: bytes) -> None:
        self.commit(ops.Rmdir(parent=parent, time_ns=self.now(), name=name))

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        self.commit(ops.Rename(old_parent=old_parent, new_parent=new_parent, flags=flags,
                               time_ns=self.now(), old_name=old_name, new_name=new_name))

    # --- data -----------------------------------------------------------------------
    def write(self, ino: int, offset: int, data: bytes) -> None:
        self.commit(ops.Write(ino=ino, offset=offset, time_ns=self.now(), data=data))

    def truncate(self, ino: int, size: int) -> None:
        self.commit(ops.Truncate(ino=ino, size=size, time_ns=self.now()))

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        self.commit(ops.SetXattr(ino=ino, flags=flags, time_ns=self.now(), name=name, value=value))

    def removexattr(self, ino: int, name: bytes) -> None:
        self.commit(ops.RemoveXattr(ino=ino, time_ns=self.now(), name=name))

    # --- reading --------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        with self.store.reader() as state:
            return state.inode(ino)

    def exists(self, ino: int) -> bool:
        try:
            self.inode(ino)
        except NotFound:
            return False
        return True

    def lookup(self, parent: int, name: bytes) -> int:
        with self.store.reader() as state:
            return state.lookup(parent, name)

    def names(self, parent: int) -> dict[bytes, int]:
        with self.store.reader() as state:
            return dict(state.entries(parent))

    def read(self, ino: int, offset: int = 0, size: int | None = None) -> bytes:
        with self.store.reader() as state:
            if size is None:
                size = state.inode(ino).size - offset
            data = state.read(ino, offset, size)
        # The frontend's read copies from the map into a buffer: it must say the same, and
        # write nothing past what it answers.
        canary = bytearray(b"\xa5" * (size + 64))
        address = ctypes.addressof((ctypes.c_char * len(canary)).from_buffer(canary))
        with self.store.reader(buffers=True) as state:
            n = state.read_into(ino, offset, size, address)
        assert n == len(data) and canary[:n] == data
        assert canary[n:] == b"\xa5" * (len(canary) - n)
        return data

    def blocks(self, ino: int) -> dict[int, bytes]:
        with self.store.reader() as state:
            return {no: bytes(data) for no, data in state.blocks(ino)}

    def journal_count(self) -> int:
        return self.store.counts()["journal_records"]


@pytest.fixture
def make_store(tmp_path: Path):
    """A factory of stores in tmp_path; every one of them must pass fsck at the end."""
    stores: list[Store] = []

    def make(**kwargs) -> Store:
        kwargs.setdefault("max_size", TEST_MAX_SIZE)
        store = Store.create(tmp_path / f"store{len(stores)}", time_ns=T0, **kwargs)
        stores.append(store)
        return store

    yield make
    try:
        for store in stores:
            assert fsck(store) == []
    finally:
        for store in stores:
            store.close()


@pytest.fixture
def store(make_store) -> Store:
    return make_store()


@pytest.fixture
def fs(store: Store) -> Fs:
    return Fs(store)


def pattern(length: int, seed: int = 0) -> bytes:
    """Non-zero bytes that differ from block to block, so misplaced data shows."""
    return bytes((i * 7 + seed) % 251 + 1 for i in range(length))


# --- creating -------------------------------------------------------------------------
def test_fresh_store_has_root(fs: Fs) -> None:
    root = fs.inode(ROOT_INO)
    assert stat.S_ISDIR(root.mode) and root.nlink == 2 and root.parent == ROOT_INO
    assert fs.store.last_seq == 1
    assert fs.next_ino() == ROOT_INO + 1


def test_create_mkdir_mknod(fs: Fs) -> None:
    f = fs.create(ROOT_INO, b"file", 0o640)
    d = fs.mkdir(ROOT_INO, b"dir")
    fifo = fs.mknode(ROOT_INO, b"fifo", stat.S_IFIFO | 0o600, rdev=1234)
    chr_dev = fs.mknode(ROOT_INO, b"null", stat.S_IFCHR | 0o666, rdev=0x0103)
    assert (f, d, fifo, chr_dev) == (2, 3, 4, 5)
    assert fs.next_ino() == 6
    assert fs.names(ROOT_INO) == {b"file": f, b"dir": d, b"fifo": fifo, b"null": chr_dev}

    node = fs.inode(f)
    assert node.mode == stat.S_IFREG | 0o640 and node.nlink == 1 and node.size == 0
    assert (node.uid, node.gid, node.parent) == (1000, 100, 0)
    assert fs.inode(d).mode == stat.S_IFDIR | 0o755
    assert fs.inode(d).nlink == 2 and fs.inode(d).parent == ROOT_INO
    assert stat.S_ISFIFO(fs.inode(fifo).mode) and fs.inode(fifo).rdev == 0
    assert stat.S_ISCHR(fs.inode(chr_dev).mode) and fs.inode(chr_dev).rdev == 0x0103
    assert fs.inode(ROOT_INO).nlink == 3

    with pytest.raises(AlreadyExists):
        fs.create(ROOT_INO, b"file")
    with pytest.raises(NotADirectory):
        fs.create(f, b"inside-a-file")
    with pytest.raises(NotFound):
        fs.create(999, b"no-parent")
    with pytest.raises(InvalidArgument):
        fs.mknode(ROOT_INO, b"typeless", 0o644)
    with pytest.raises(InvalidArgument):  # an inode number already in use
        fs.commit(ops.MakeNode(parent=ROOT_INO, ino=f, mode=stat.S_IFREG | 0o644, rdev=0, uid=0,
                               gid=0, time_ns=fs.now(), name=b"again"))


def test_directory_nlink_follows_subdirectories(fs: Fs) -> None:
    a = fs.mkdir(ROOT_INO, b"a")
    assert fs.inode(ROOT_INO).nlink == 3
    b = fs.mkdir(a, b"b")
    fs.mkdir(a, b"c")
    fs.create(a, b"file")
    fs.mknode(a, b"fifo", stat.S_IFIFO | 0o644)
    assert fs.inode(a).nlink == 4
    fs.mkdir(b, b"deeper")
    assert (fs.inode(a).nlink, fs.inode(b).nlink) == (4, 3)

    fs.rename(a, b"c", ROOT_INO, b"c")
    assert (fs.inode(ROOT_INO).nlink, fs.inode(a).nlink) == (4, 3)
    fs.rmdir(b, b"deeper")
    fs.rmdir(a, b"b")
    assert (fs.inode(ROOT_INO).nlink, fs.inode(a).nlink) == (4, 2)
    fs.rmdir(ROOT_INO, b"c")
    assert fs.inode(ROOT_INO).nlink == 3
    fs.unlink(a, b"file")
    fs.unlink(a, b"fifo")
    fs.rmdir(ROOT_INO, b"a")
    assert fs.inode(ROOT_INO).nlink == 2
    assert not fs.exists(a) and not fs.exists(b)


def test_parent_times_follow_changes(fs: Fs) -> None:
    a = fs.mkdir(ROOT_INO, b"a")
    b = fs.mkdir(ROOT_INO, b"b")
    root_atime = fs.inode(ROOT_INO).atime_ns

    fs.create(a, b"f")
    t = fs.clock
    assert (fs.inode(a).mtime_ns, fs.inode(a).ctime_ns) == (t, t)
    assert fs.inode(b).mtime_ns < t

    fs.rename(a, b"f", b, b"g")
    t = fs.clock
    for d in (a, b):
        assert (fs.inode(d).mtime_ns, fs.inode(d).ctime_ns) == (t, t)
    assert fs.inode(fs.lookup(b, b"g")).ctime_ns == t

    fs.unlink(b, b"g")
    t = fs.clock
    assert (fs.inode(b).mtime_ns, fs.inode(b).ctime_ns) == (t, t)
    assert fs.inode(a).mtime_ns < t

    fs.rmdir(ROOT_INO, b"a")
    assert fs.inode(ROOT_INO).mtime_ns == fs.inode(ROOT_INO).ctime_ns == fs.clock
    assert fs.inode(ROOT_INO).atime_ns == root_atime


def test_unlink_keeps_other_hard_links(fs: Fs) -> None:
    d = fs.mkdir(ROOT_INO, b"d")
    f = fs.create(ROOT_INO, b"f")
    fs.write(f, 0, pattern(BS + 10))
    fs.setxattr(f, b"user.k", b"v")
    fs.link(f, d, b"g")
    assert fs.inode(f).nlink == 2 and fs.inode(f).ctime_ns == fs.clock
    assert fs.lookup(d, b"g") == f

    fs.unlink(ROOT_INO, b"f")
    assert fs.inode(f).nlink == 1
    assert fs.read(f) == pattern(BS + 10)
    assert b"f" not in fs.names(ROOT_INO)

    fs.unlink(d, b"g")
    assert not fs.exists(f)
    assert fs.blocks(f) == {}
    with fs.store.reader() as state:
        assert state.listxattr(f) == []
    with pytest.raises(NotFound):
        fs.unlink(d, b"g")


def test_unlink_and_rmdir_check_the_type(fs: Fs) -> None:
    fs.mkdir(ROOT_INO, b"d")
    fs.create(ROOT_INO, b"f")
    with pytest.raises(IsADirectory):
        fs.unlink(ROOT_INO, b"d")
    with pytest.raises(NotADirectory):
        fs.rmdir(ROOT_INO, b"f")
    with pytest.raises(NotFound):
        fs.rmdir(ROOT_INO, b"missing")


def test_rmdir_refuses_a_non_empty_directory(fs: Fs) -> None:
    d = fs.mkdir(ROOT_INO, b"d")
    fs.create(d, b"f")
    with pytest.raises(DirectoryNotEmpty):
        fs.rmdir(ROOT_INO, b"d")
    assert fs.lookup(ROOT_INO, b"d") == d
    fs.unlink(d, b"f")
    fs.rmdir(ROOT_INO, b"d")
    assert not fs.exists(d)


# --- rename ---------------------------------------------------------------------------
def test_rename_replaces_a_file(fs: Fs) -> None:
    src = fs.create(ROOT_INO, b"src")
    dst = fs.create(ROOT_INO, b"dst")
    fs.write(dst, 0, b"old contents")
    fs.rename(ROOT_INO, b"src", ROOT_INO, b"dst")
    assert fs.names(ROOT_INO) == {b"dst": src}
    assert not fs.exists(dst) and fs.blocks(dst) == {}

    # A replaced file that has another name lives on under it.
    keep = fs.create(ROOT_INO, b"keep")
    fs.link(keep, ROOT_INO, b"alias")
    fs.rename(ROOT_INO, b"dst", ROOT_INO, b"alias")
    assert fs.inode(keep).nlink == 1
    assert fs.names(ROOT_INO) == {b"alias": src, b"keep": keep}


def test_rename_replaces_an_empty_directory(fs: Fs) -> None:
    a = fs.mkdir(ROOT_INO, b"a")
    b = fs.mkdir(ROOT_INO, b"b")
    src = fs.mkdir(a, b"src")
    dst = fs.mkdir(b, b"dst")
    fs.rename(a, b"src", b, b"dst")
    assert not fs.exists(dst)
    assert fs.lookup(b, b"dst") == src and fs.inode(src).parent == b
    assert (fs.inode(a).nlink, fs.inode(b).nlink, fs.inode(ROOT_INO).nlink) == (2, 3, 4)

    # Same parent: two subdirectories become one.
    fs.mkdir(b, b"other")
    assert fs.inode(b).nlink == 4
    fs.rename(b, b"dst", b, b"other")
    assert fs.inode(b).nlink == 3 and fs.names(b) == {b"other": src}


def test_rename_refusals(fs: Fs) -> None:
    d = fs.mkdir(ROOT_INO, b"d")
    sub = fs.mkdir(d, b"sub")
    fs.create(sub, b"f")
    fs.mkdir(ROOT_INO, b"full")
    fs.create(fs.lookup(ROOT_INO, b"full"), b"x")
    fs.create(ROOT_INO, b"file")
    fs.mkdir(ROOT_INO, b"empty")
    before = digest(fs.store)

    with pytest.raises(DirectoryNotEmpty):
        fs.rename(ROOT_INO, b"d", ROOT_INO, b"full")
    with pytest.raises(InvalidArgument):
        fs.rename(ROOT_INO, b"d", sub, b"d2")
    with pytest.raises(InvalidArgument):
        fs.rename(ROOT_INO, b"d", d, b"d2")
    with pytest.raises(IsADirectory):
        fs.rename(ROOT_INO, b"file", ROOT_INO, b"empty")
    with pytest.raises(NotADirectory):
        fs.rename(ROOT_INO, b"empty", ROOT_INO, b"file")
    with pytest.raises(NotFound):
        fs.rename(ROOT_INO, b"missing", ROOT_INO, b"x")
    with pytest.raises(NotADirectory):
        fs.rename(ROOT_INO, b"file", fs.lookup(ROOT_INO, b"file"), b"x")
    with pytest.raises(InvalidArgument):
        fs.rename(ROOT_INO, b"file", ROOT_INO, b"x", flags=ops.RENAME_NOREPLACE | ops.RENAME_EXCHANGE)
    assert digest(fs.store)[0] == before[0]

    # Renaming a directory onto its own name is allowed and changes nothing.
    fs.rename(ROOT_INO, b"d", ROOT_INO, b"d")
    assert fs.lookup(ROOT_INO, b"d") == d


def test_rename_noreplace(fs: Fs) -> None:
    a = fs.create(ROOT_INO, b"a")
    b = fs.create(ROOT_INO, b"b")
    with pytest.raises(AlreadyExists):
        fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", flags=ops.RENAME_NOREPLACE)
    assert fs.names(ROOT_INO) == {b"a": a, b"b": b}
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"c", flags=ops.RENAME_NOREPLACE)
    assert fs.names(ROOT_INO) == {b"b": b, b"c": a}


def test_rename_exchange_file_and_directory_across_parents(fs: Fs) -> None:
    p = fs.mkdir(ROOT_INO, b"p")
    q = fs.mkdir(ROOT_INO, b"q")
    f = fs.create(p, b"f")
    d = fs.mkdir(q, b"d")
    fs.create(d, b"inside")
    assert (fs.inode(p).nlink, fs.inode(q).nlink) == (2, 3)

    fs.rename(p, b"f", q, b"d", flags=ops.RENAME_EXCHANGE)
    assert fs.names(p) == {b"f": d} and fs.names(q) == {b"d": f}
    assert (fs.inode(p).nlink, fs.inode(q).nlink) == (3, 2)
    assert fs.inode(d).parent == p and fs.inode(f).parent == 0
    assert fs.inode(d).nlink == 2 and fs.inode(f).nlink == 1
    t = fs.clock
    assert fs.inode(p).mtime_ns == fs.inode(q).mtime_ns == t
    assert fs.inode(d).ctime_ns == fs.inode(f).ctime_ns == t

    with pytest.raises(NotFound):
        fs.rename(p, b"f", q, b"missing", flags=ops.RENAME_EXCHANGE)
    with pytest.raises(InvalidArgument):  # the directory would land inside itself
        fs.rename(ROOT_INO, b"p", p, b"f", flags=ops.RENAME_EXCHANGE)
    with pytest.raises(InvalidArgument):
        fs.rename(p, b"f", ROOT_INO, b"p", flags=ops.RENAME_EXCHANGE)


def test_rename_exchange_two_directories(fs: Fs) -> None:
    p = fs.mkdir(ROOT_INO, b"p")
    a = fs.mkdir(p, b"a")
    b = fs.mkdir(ROOT_INO, b"b")
    fs.mkdir(b, b"child")
    fs.rename(p, b"a", ROOT_INO, b"b", flags=ops.RENAME_EXCHANGE)
    assert fs.lookup(p, b"a") == b and fs.lookup(ROOT_INO, b"b") == a
    assert fs.inode(a).parent == ROOT_INO and fs.inode(b).parent == p
    assert (fs.inode(ROOT_INO).nlink, fs.inode(p).nlink) == (4, 3)


def test_rename_between_hard_links_is_a_no_op(fs: Fs) -> None:
    d = fs.mkdir(ROOT_INO, b"d")
    f = fs.create(ROOT_INO, b"f")
    fs.link(f, d, b"g")
    before_seq = fs.store.last_seq
    state_before = digest(fs.store)[0]
    fs.rename(ROOT_INO, b"f", d, b"g")
    assert fs.store.last_seq == before_seq + 1  # recorded, but changes nothing
    assert digest(fs.store)[0] == state_before
    assert fs.names(ROOT_INO)[b"f"] == f and fs.names(d) == {b"g": f}
    assert fs.inode(f).nlink == 2


# --- link and names -------------------------------------------------------------------
def test_link_to_a_directory_is_not_permitted(fs: Fs) -> None:
    d = fs.mkdir(ROOT_INO, b"d")
    with pytest.raises(NotPermitted):
        fs.link(d, ROOT_INO, b"alias")
    f = fs.create(ROOT_INO, b"f")
    with pytest.raises(AlreadyExists):
        fs.link(f, ROOT_INO, b"d")
    with pytest.raises(NotFound):
        fs.link(999, ROOT_INO, b"ghost")


def test_names_longer_than_255_bytes(fs: Fs) -> None:
    long_name, longest = b"n" * 256, b"n" * 255
    f = fs.create(ROOT_INO, b"f")
    seq = fs.store.last_seq
    with pytest.raises(NameTooLong):
        fs.create(ROOT_INO, long_name)
    with pytest.raises(NameTooLong):
        fs.mkdir(ROOT_INO, long_name)
    with pytest.raises(NameTooLong):
        fs.symlink(ROOT_INO, long_name, b"target")
    with pytest.raises(NameTooLong):
        fs.link(f, ROOT_INO, long_name)
    with pytest.raises(NameTooLong):
        fs.rename(ROOT_INO, b"f", ROOT_INO, long_name)
    assert fs.store.last_seq == seq
    fs.create(ROOT_INO, longest)
    fs.link(f, ROOT_INO, b"m" * 255)
    assert longest in fs.names(ROOT_INO)


# --- data -----------------------------------------------------------------------------
def test_write_and_read_across_block_boundaries(fs: Fs) -> None:
    f = fs.create(ROOT_INO, b"f")
    data = pattern(3 * BS + 123)
    fs.write(f, 0, data)
    assert fs.inode(f).size == len(data)
    assert fs.read(f) == data
    assert fs.read(f, BS - 5, 10) == data[BS - 5:BS + 5]
    assert fs.read(f, 2 * BS - 1, BS + 2) == data[2 * BS - 1:3 * BS + 1]
    assert fs.read(f, len(data) - 3, 100) == data[-3:]  # short read at the end
    assert fs.read(f, len(data), 10) == b""
    assert sorted(fs.blocks(f)) == [0, 1, 2, 3]
    assert all(len(v) == BS for no, v in fs.blocks(f).items() if no < 3)

    # A write straddling a boundary in the middle of the file.
    fs.write(f, BS - 3, b"XXXXXX")
    expected = bytearray(data)
    expected[BS - 3:BS + 3] = b"XXXXXX"
    assert fs.read(f) == bytes(expected)
    assert fs.inode(f).mtime_ns == fs.inode(f).ctime_ns == fs.clock


def test_sparse_holes_read_as_zeros(fs: Fs) -> None:
    f = fs.create(ROOT_INO, b"f")
    fs.write(f, 5 * BS + 10, b"tail")
    assert fs.inode(f).size == 5 * BS + 14
    assert sorted(fs.blocks(f)) == [5]
    assert fs.read(f) == bytes(5 * BS + 10) + b"tail"
    fs.write(f, 2 * BS + 100, b"middle")
    assert sorted(fs.blocks(f)) == [2, 5]
    expected = bytearray(5 * BS + 14)
    expected[2 * BS + 100:2 * BS + 106] = b"middle"
    expected[5 * BS + 10:] = b"tail"
    assert fs.read(f) == bytes(expected)
    assert fs.read(f, 3 * BS, BS) == bytes(BS)


def test_overwrite_in_the_middle(fs: Fs) -> None:
    f = fs.create(ROOT_INO, b"f")
    data = bytearray(pattern(2 * BS))
    fs.write(f, 0, bytes(data))
    for offset, chunk in ((100, b"abc"), (BS // 2, pattern(BS, 9)), (2 * BS - 1, b"!")):
        fs.write(f, offset, chunk)
        data[offset:offset + len(chunk)] = chunk
    assert fs.inode(f).size == 2 * BS
    assert fs.read(f) == bytes(data)


def test_truncate_down_then_up_reads_zeros(fs: Fs) -> None:
    f = fs.create(ROOT_INO, b"f")
    data = pattern(3 * BS)
    fs.write(f, 0, data)
    fs.truncate(f, BS + 100)
    assert fs.read(f) == data[:BS + 100]
    assert sorted(fs.blocks(f)) == [0, 1]
    fs.truncate(f, 3 * BS)
    assert fs.inode(f).size == 3 * BS
    assert fs.read(f) == data[:BS + 100] + bytes(2 * BS - 100)

    # Regrowing by a write past the end must not resurrect the old bytes either.
    fs.truncate(f, 10)
    fs.write(f, BS + 50, b"Z")
    assert fs.read(f) == data[:10] + bytes(BS + 40) + b"Z"


def test_truncate_to_unaligned_and_aligned_sizes(fs: Fs) -> None:
    f = fs.create(ROOT_INO, b"f")
    data = pattern(2 * BS + 7)
    fs.write(f, 0, data)
    fs.truncate(f, BS + 1)
    assert fs.read(f) == data[:BS + 1]
    assert {no: len(v) for no, v in fs.blocks(f).items()} == {0: BS, 1: 1}
    fs.truncate(f, BS)
    assert {no: len(v) for no, v in fs.blocks(f).items()} == {0: BS}
    fs.truncate(f, 0)
    assert fs.blocks(f) == {} and fs.read(f) == b""
    assert fs.inode(f).mtime_ns == fs.clock


def test_data_ops_refuse_non_regular_files(fs: Fs) -> None:
    d = fs.mkdir(ROOT_INO, b"d")
    fifo = fs.mknode(ROOT_INO, b"fifo", stat.S_IFIFO | 0o644)
    with pytest.raises(IsADirectory):
        fs.write(d, 0, b"x")
    with pytest.raises(IsADirectory):
        fs.truncate(d, 0)
    with pytest.raises(InvalidArgument):
        fs.write(fifo, 0, b"x")
    with pytest.raises(NotFound):
        fs.write(999, 0, b"x")


def test_empty_write_changes_nothing(fs: Fs) -> None:
    f = fs.create(ROOT_INO, b"f")
    fs.write(f, 0, b"abc")
    before = fs.inode(f)
    fs.write(f, 10 * BS, b"")
    assert fs.inode(f) == before
    assert fs.read(f) == b"abc"


# --- symlinks, attributes, xattrs -----------------------------------------------------
def test_symlink_and_readlink(fs: Fs) -> None:
    target = b"../some/where/" + b"x" * 300
    s = fs.symlink(ROOT_INO, b"link", target)
    node = fs.inode(s)
    assert stat.S_ISLNK(node.mode) and node.size == len(target) and node.nlink == 1
    with fs.store.reader() as state:
        assert state.readlink(s) == target
    with pytest.raises(NotFound):
        fs.symlink(ROOT_INO, b"empty", b"")
    with pytest.raises(InvalidArgument):
        fs.write(s, 0, b"x")
    fs.unlink(ROOT_INO, b"link")
    with fs.store.reader() as state, pytest.raises(NotFound):
        state.readlink(s)


def test_setattr_keeps_the_file_type(fs: Fs) -> None:
    f = fs.create(ROOT_INO, b"f")
    d = fs.mkdir(ROOT_INO, b"d")
    for ino, kind in ((f, stat.S_IFREG), (d, stat.S_IFDIR)):
        fs.commit(ops.SetAttr(ino=ino, fields=ops.SET_MODE, mode=stat.S_IFLNK | 0o4700, uid=0, gid=0,
                              atime_ns=0, mtime_ns=0, time_ns=fs.now()))
        assert fs.inode(ino).mode == kind | 0o4700
        assert fs.inode(ino).ctime_ns == fs.clock

    before = fs.inode(f)
    fs.commit(ops.SetAttr(ino=f, fields=ops.SET_UID | ops.SET_ATIME, mode=0, uid=42, gid=43,
                          atime_ns=5, mtime_ns=6, time_ns=fs.now()))
    after = fs.inode(f)
    assert (after.uid, after.gid, after.atime_ns, after.mtime_ns) == (42, before.gid, 5, before.mtime_ns)
    fs.commit(ops.SetAttr(ino=f, fields=ops.SET_GID | ops.SET_MTIME, mode=0, uid=0, gid=43,
                          atime_ns=0, mtime_ns=6, time_ns=fs.now()))
    after = fs.inode(f)
    assert (after.uid, after.gid, after.atime_ns, after.mtime_ns) == (42, 43, 5, 6)
    assert after.ctime_ns == fs.clock


def test_xattr_flags_and_removal(fs: Fs) -> None:
    f = fs.create(ROOT_INO, b"f")
    with pytest.raises(NoSuchAttribute):
        fs.setxattr(f, b"user.a", b"1", flags=ops.XATTR_REPLACE)
    fs.setxattr(f, b"user.a", b"1", flags=ops.XATTR_CREATE)
    with pytest.raises(AlreadyExists):
        fs.setxattr(f, b"user.a", b"2", flags=ops.XATTR_CREATE)
    fs.setxattr(f, b"user.a", b"2", flags=ops.XATTR_REPLACE)
    fs.setxattr(f, b"user.b", b"")
    fs.setxattr(f, b"user.b", b"3")
    assert fs.inode(f).ctime_ns == fs.clock
    with fs.store.reader() as state:
        assert state.listxattr(f) == [b"user.a", b"user.b"]
        assert state.getxattr(f, b"user.a") == b"2"
        assert state.getxattr(f, b"user.b") == b"3"

    fs.removexattr(f, b"user.a")
    with pytest.raises(NoSuchAttribute):
        fs.removexattr(f, b"user.a")
    with pytest.raises(NameTooLong):
        fs.setxattr(f, b"u" * 256, b"x")
    with fs.store.reader() as state:
        assert state.listxattr(f) == [b"user.b"]
        with pytest.raises(NoSuchAttribute):
            state.getxattr(f, b"user.a")
    with pytest.raises(NotFound):
        fs.setxattr(999, b"user.a", b"1")


# --- failures, a full store, group commit ---------------------------------------------
def test_failed_op_leaves_no_trace(fs: Fs) -> None:
    d = fs.mkdir(ROOT_INO, b"d")
    fs.create(d, b"f")
    seq, records, state = fs.store.last_seq, fs.journal_count(), digest(fs.store)
    failing = [
        lambda: fs.rmdir(ROOT_INO, b"d"),
        lambda: fs.create(d, b"f"),
        lambda: fs.unlink(ROOT_INO, b"nope"),
        lambda: fs.rename(ROOT_INO, b"d", d, b"inside"),
        lambda: fs.link(d, ROOT_INO, b"dirlink"),
        lambda: fs.truncate(d, 0),
    ]
    for op in failing:
        with pytest.raises(FsError):
            op()
        assert fs.store.last_seq == seq
    assert fs.journal_count() == records
    assert digest(fs.store) == state
    assert max(seq for seq, _raw in fs.store.records(1)) == seq
    assert fs.next_ino() == d + 2
    # The next successful op takes the very next seq.
    fs.create(ROOT_INO, b"g")
    assert fs.store.last_seq == seq + 1


@pytest.mark.parametrize("group_commit", [False, True], ids=["per-op", "group"])
def test_full_store(make_store, group_commit: bool) -> None:
    store = make_store(max_size=1 << 20, group_commit=group_commit)
    fs = Fs(store)
    big = fs.create(ROOT_INO, b"big")
    seq = store.last_seq
    with pytest.raises(StoreFull):
        fs.write(big, 0, pattern(2 << 20))
    assert store.last_seq == seq and fs.inode(big).size == 0

    # Small ops still go through.
    fs.mkdir(ROOT_INO, b"d")
    fs.write(big, 0, b"small")
    fs.setxattr(big, b"user.k", b"v")

    # Fill the store with a file one block per op until it refuses.
    filler = fs.create(ROOT_INO, b"filler")
    blocks = 0
    while True:
        try:
            fs.write(filler, blocks * BS, pattern(BS, blocks))
        except StoreFull:
            break
        blocks += 1
        assert blocks < 64, "a 1 MiB store took 4 MiB of data"
    assert blocks >= 2
    assert fs.read(filler) == b"".join(pattern(BS, i) for i in range(blocks))

    # Deleting the file frees its blocks for later writes, once the journal that holds
    # their bytes goes: as on a node, a full store prunes what nobody needs.
    fs.unlink(ROOT_INO, b"filler")
    store.on_full = lambda: store.prune(store.last_seq + 1)
    moderate = max(1, blocks // 3)
    try:
        fs.write(big, 0, pattern(moderate * BS))
    except StoreFull:
        pytest.fail(f"deleting a file of {blocks} blocks did not make room for a write of {moderate}")
    assert fs.read(big) == pattern(moderate * BS)


def test_group_commit_from_many_threads(make_store) -> None:
    store = make_store(group_commit=True)
    fs = Fs(store)
    with store.reader() as state:
        inos = itertools.count(state.next_ino())
    ino_lock = threading.Lock()
    seqs: list[int] = []
    seq_lock = threading.Lock()
    failures: list[BaseException] = []
    threads_n, rounds = 8, 25
    heard: list[int] = []
    store.listeners.append(lambda committed: heard.extend(seq for seq, _raw in committed))

    def worker(n: int) -> None:
        try:
            mine: list[int] = []
            d_ino = _alloc()
            mine.append(store.commit(ops.MakeNode(
                parent=ROOT_INO, ino=d_ino, mode=stat.S_IFDIR | 0o755, rdev=0, uid=n, gid=n,
                time_ns=T0 + n, name=b"t%d" % n)))
            for i in range(rounds):
                ino = _alloc()
                name = b"f%d" % i
                mine.append(store.commit(ops.MakeNode(
                    parent=d_ino, ino=ino, mode=stat.S_IFREG | 0o644, rdev=0, uid=n, gid=n,
                    time_ns=T0 + i, name=name)))
                mine.append(store.commit(ops.Write(ino=ino, offset=i * 100, time_ns=T0 + i,
                                                   data=pattern(1000 + i, n))))
                try:  # a failing op inside a group must not take a seq
                    store.commit(ops.MakeNode(
                        parent=d_ino, ino=_alloc(), mode=stat.S_IFREG | 0o644, rdev=0, uid=n,
                        gid=n, time_ns=T0 + i, name=name))
                except AlreadyExists:
                    pass
                else:
                    raise AssertionError("duplicate name accepted")
                if i % 2:
                    mine.append(store.commit(ops.Unlink(parent=d_ino, time_ns=T0 + i, name=name)))
            with seq_lock:
                seqs.extend(mine)
        except BaseException as exc:
            failures.append(exc)

    def _alloc() -> int:
        with ino_lock:
            return next(inos)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    expected = threads_n * (1 + rounds * 2 + rounds // 2)
    assert sorted(seqs) == list(range(2, 2 + expected))
    assert heard == list(range(2, 2 + expected))  # every commit announced once, in order
    assert store.last_seq == 1 + expected
    assert [seq for seq, _raw in store.records(1)] == list(range(1, 2 + expected))
    for n in range(threads_n):
        d = fs.lookup(ROOT_INO, b"t%d" % n)
        assert sorted(fs.names(d)) == sorted(b"f%d" % i for i in range(rounds) if i % 2 == 0)
        f = fs.lookup(d, b"f4")
        assert fs.read(f) == bytes(400) + pattern(1004, n)


# --- the checker ----------------------------------------------------------------------
def _db_name(store: Store, db: object) -> bytes:
    db_set = store.db
    names = {id(db_set.meta): DB_META, id(db_set.inodes): DB_INODES, id(db_set.dirents): DB_DIRENTS,
             id(db_set.blocks): DB_BLOCKS, id(db_set.symlinks): DB_SYMLINKS, id(db_set.xattrs): DB_XATTRS,
             id(db_set.journal): DB_JOURNAL}
    return names[id(db)]


def _raw_put(store: Store, db: object, key: bytes, value: bytes | None, sealed: bool = True) -> None:
    """Put `value` behind apply's back; sealed with a valid checksum (a logical damage
    the checksum cannot see) unless `sealed` is false or it is a journal record."""
    name = _db_name(store, db)
    if value is not None and sealed and name != DB_JOURNAL:
        value = seal(name, key, value)
    with store.env.begin(write=True) as txn:
        if value is None:
            txn.delete(key, db=db)
        else:
            txn.put(key, value, db=db)


def _flip(store: Store, db: object, key: bytes, at: int = 0) -> None:
    """Flip one bit of the stored value of `key`, as a bad disk or a stray write would."""
    with store.env.begin(write=True) as txn:
        raw = bytearray(txn.get(key, db=db))
        raw[at] ^= 0x10
        txn.put(key, bytes(raw), db=db)


def _raw_get(store: Store, db: object, key: bytes) -> bytes:
    """The stored value of `key`, without its checksum."""
    with store.env.begin() as txn:
        value = txn.get(key, db=db)
    assert value is not None
    return bytes(unseal(_db_name(store, db), key, value))


@pytest.mark.parametrize("damage, expected", [
    ("orphan", "orphan"),
    ("nlink", "nlink"),
    ("dangling dirent", "names missing inode"),
    ("block past size", "past the file size"),
    ("long block", "more than a block"),
    ("malformed block", "malformed block value"),
    ("dangling block reference", "which the journal does not hold"),
    ("block reference to another op", "not a write to that inode"),
    ("block reference off its start", "not at the block's start"),
    ("missing symlink", "has no target"),
    ("directory parent", "records parent"),
    ("directory cycle", "not reachable"),
    ("journal hole", "hole"),
    ("journal crc", "checksum"),
    ("last_seq", "last_seq"),
    ("next_ino", "next_ino"),
    ("xattr of nobody", "inode does not exist"),
    ("block of a directory", "not a regular file"),
    ("symlink size", "target of 6 bytes"),
    ("dirent names the root", "root inode 1 is named"),
    ("epoch history", "epoch history not ascending"),
    ("foreign record", "is not the store's"),
    ("record seq", "header says seq"),
    ("flipped block byte", "damaged data of inode"),
    ("flipped inode byte", "damaged attributes of inode"),
    ("flipped dirent byte", "damaged directory entry b'f'"),
    ("flipped symlink byte", "damaged symlink target"),
    ("flipped xattr byte", "damaged extended attribute b'user.k'"),
    ("flipped meta byte", "damaged store metadata 'epoch'"),
    ("flipped referred record byte", "damaged data of inode"),
    ("block count", "stored blocks"),
])
def test_fsck_reports_damage(tmp_path: Path, damage: str, expected: str) -> None:
    """The checker the other tests rely on does see broken invariants."""
    with Store.create(tmp_path / "s", max_size=TEST_MAX_SIZE, time_ns=T0) as store:
        fs = Fs(store)
        a = fs.mkdir(ROOT_INO, b"a")
        b = fs.mkdir(a, b"b")
        f = fs.create(a, b"f")
        fs.write(f, 0, pattern(BS + 5))
        s = fs.symlink(ROOT_INO, b"s", b"target")
        fs.create(ROOT_INO, b"g")
        assert fsck(store) == []
        db = store.db
        node = fs.inode(f)
        if damage == "orphan":
            _raw_put(store, db.dirents, dirent_key(ROOT_INO, b"g"), None)
        elif damage == "nlink":
            _raw_put(store, db.inodes, u64(f), _with(node, nlink=2).pack())
        elif damage == "dangling dirent":
            _raw_put(store, db.dirents, dirent_key(a, b"ghost"), u64(12345))
        elif damage == "block past size":
            _raw_put(store, db.inodes, u64(f), _with(node, size=BS).pack())
        elif damage == "long block":
            _raw_put(store, db.blocks, block_key(f, 0), block_data_value(bytes(BS + 1)))
        elif damage == "malformed block":
            _raw_put(store, db.blocks, block_key(f, 0), b"Zjunk")
        elif damage == "dangling block reference":
            _raw_put(store, db.blocks, block_key(f, 0), block_ref_value(9999, WRITE_DATA_START, 10))
        elif damage == "block reference to another op":
            _raw_put(store, db.blocks, block_key(f, 0), block_ref_value(2, WRITE_DATA_START, 1))
        elif damage == "block reference off its start":
            ref = parse_block_ref(_raw_get(store, db.blocks, block_key(f, 0)))
            assert ref is not None  # a write that covered the whole block refers to its record
            _raw_put(store, db.blocks, block_key(f, 0), block_ref_value(ref[0], ref[1] + 1, 100))
        elif damage == "missing symlink":
            _raw_put(store, db.symlinks, u64(s), None)
        elif damage == "directory parent":
            _raw_put(store, db.inodes, u64(b), _with(fs.inode(b), parent=ROOT_INO).pack())
        elif damage == "directory cycle":
            # a/b is renamed into b behind apply's back: a and b name each other.
            _raw_put(store, db.dirents, dirent_key(ROOT_INO, b"a"), None)
            _raw_put(store, db.dirents, dirent_key(b, b"a"), u64(a))
            _raw_put(store, db.inodes, u64(a), _with(fs.inode(a), parent=b).pack())
            _raw_put(store, db.inodes, u64(b), _with(fs.inode(b), nlink=3).pack())
            _raw_put(store, db.inodes, u64(ROOT_INO), _with(fs.inode(ROOT_INO), nlink=2).pack())
        elif damage == "journal hole":
            _raw_put(store, db.journal, u64(3), None)
        elif damage == "journal crc":
            with store.env.begin() as txn:
                raw = bytearray(txn.get(u64(2), db=db.journal))
            raw[-1] ^= 0xFF
            _raw_put(store, db.journal, u64(2), bytes(raw))
        elif damage == "last_seq":
            _raw_put(store, db.meta, b"last_seq", u64(store.last_seq + 1))
        elif damage == "next_ino":
            _raw_put(store, db.meta, b"next_ino", u64(f))
        elif damage == "xattr of nobody":
            _raw_put(store, db.xattrs, u64(777) + b"user.x", b"v")
        elif damage == "block of a directory":
            _raw_put(store, db.blocks, block_key(a, 0), block_data_value(b"x"))
        elif damage == "symlink size":
            _raw_put(store, db.inodes, u64(s), _with(fs.inode(s), size=7).pack())
        elif damage == "dirent names the root":
            _raw_put(store, db.dirents, dirent_key(a, b"up"), u64(ROOT_INO))
        elif damage == "epoch history":
            _raw_put(store, db.meta, b"epoch_history", pack_epoch_history([(1, 1), (3, 9), (2, 12)]))
        elif damage in ("foreign record", "record seq"):
            cluster = bytes(16) if damage == "foreign record" else store.cluster_id
            seq = 2 if damage == "foreign record" else 99
            raw = encode_record(cluster, 1, seq, ops.Truncate(ino=f, size=0, time_ns=1))
            _raw_put(store, db.journal, u64(2), raw)
        elif damage == "flipped block byte":
            fs.write(f, 3, b"abc")  # a partial write: block 0 now holds its own bytes
            _flip(store, db.blocks, block_key(f, 0), at=20)
        elif damage == "flipped inode byte":
            _flip(store, db.inodes, u64(f), at=20)
        elif damage == "flipped dirent byte":
            _flip(store, db.dirents, dirent_key(a, b"f"), at=7)
        elif damage == "flipped symlink byte":
            _flip(store, db.symlinks, u64(s), at=2)
        elif damage == "flipped xattr byte":
            fs.setxattr(f, b"user.k", b"value")
            _flip(store, db.xattrs, u64(f) + b"user.k", at=0)
        elif damage == "flipped meta byte":
            _flip(store, db.meta, b"epoch", at=7)
        elif damage == "flipped referred record byte":
            ref = parse_block_ref(_raw_get(store, db.blocks, block_key(f, 0)))
            assert ref is not None
            _flip(store, db.journal, u64(ref[0]), at=ref[1] + 100)
        elif damage == "block count":
            _raw_put(store, db.inodes, u64(f), _with(node, blocks=node.blocks + 1).pack())
        problems = fsck(store)
        assert problems, damage
        assert any(expected in p for p in problems), problems


def _with(node: Inode, **changes: int) -> Inode:
    return dataclasses.replace(node, **changes)


def test_digest_ignores_node_local_meta_and_journal(make_store) -> None:
    a, b = make_store(cluster_id=bytes(16)), make_store(cluster_id=bytes(16))
    for store in (a, b):
        fs = Fs(store)
        f = fs.create(ROOT_INO, b"f")
        fs.write(f, 0, b"data")
    assert digest(a) == digest(b)
    b.set_meta(b"role", b"standby")
    b.set_meta(b"epoch", u64(7))
    b.prune(below=3)
    assert digest(a) == digest(b)
    Fs(b).write(2, 0, b"D")
    assert digest(a)[0] != digest(b)[0] and digest(b)[1] == digest(a)[1] + 1

    # The same ops in another cluster: the cluster id is part of the digest.
    c = make_store()
    f = Fs(c).create(ROOT_INO, b"f")
    Fs(c).write(f, 0, b"data")
    assert digest(c)[0] != digest(a)[0]


# --- random sequences of ops ----------------------------------------------------------
NAMES = (b"a", b"b", b"c")
OFFSETS = (0, 1, 100, BS - 1, BS, BS + 7, 3 * BS - 2)
LENGTHS = (0, 1, 50, BS - 1, BS + 3)
SIZES = (0, 1, 99, BS - 1, BS, BS + 1, 2 * BS + 3)
KINDS = ("mkdir", "create", "create", "write", "write", "truncate", "rename", "unlink", "link", "rmdir",
         "symlink", "setxattr")
#: Stands in for an inode that does not exist: the op must then fail cleanly.
MISSING = 10**9


def _tree(fs: Fs) -> tuple[list[int], list[tuple[int, bytes, int]], list[tuple[int, bytes, int]]]:
    """(directories, every entry, entries of regular files) reachable from the root.

    An entry is (parent, name, child)."""
    dirs, entries, files = [ROOT_INO], [], []
    with fs.store.reader() as state:
        for parent in dirs:  # grows while it is walked: a breadth-first walk
            for name, child in state.entries(parent):
                entries.append((parent, name, child))
                mode = state.inode(child).mode
                if stat.S_ISDIR(mode):
                    dirs.append(child)
                elif stat.S_ISREG(mode):
                    files.append((parent, name, child))
    return dirs, entries, files


def _draw_op(fs: Fs, data: st.DataObject) -> ops.Op:
    dirs, entries, files = _tree(fs)
    kind = data.draw(st.sampled_from(KINDS))
    if not entries and kind not in ("mkdir", "create", "symlink"):
        kind = "mkdir"
    # Now and then an op names a directory or inode that does not exist.
    parent = data.draw(st.sampled_from(dirs if len(dirs) < 3 else [*dirs, MISSING]))
    name = data.draw(st.sampled_from(NAMES))
    t = fs.now()
    if kind in ("mkdir", "create", "symlink"):
        ino = fs.next_ino()
        if kind == "symlink":
            return ops.Symlink(parent=parent, ino=ino, uid=0, gid=0, time_ns=t, name=name, target=b"../x")
        mode = stat.S_IFDIR | 0o755 if kind == "mkdir" else stat.S_IFREG | 0o644
        return ops.MakeNode(parent=parent, ino=ino, mode=mode, rdev=0, uid=0, gid=0, time_ns=t, name=name)
    if kind in ("write", "truncate") and files and data.draw(st.integers(0, 3)):
        entries = files  # mostly, but not always, a regular file
    old_parent, old_name, target = data.draw(st.sampled_from(entries))
    if kind == "write":
        offset, length = data.draw(st.sampled_from(OFFSETS)), data.draw(st.sampled_from(LENGTHS))
        return ops.Write(ino=target, offset=offset, time_ns=t, data=pattern(length, t // 1000 % 251))
    if kind == "truncate":
        return ops.Truncate(ino=target, size=data.draw(st.sampled_from(SIZES)), time_ns=t)
    if kind == "setxattr":
        flags = data.draw(st.sampled_from((0, ops.XATTR_CREATE, ops.XATTR_REPLACE)))
        return ops.SetXattr(ino=target, flags=flags, time_ns=t, name=b"user.x", value=name)
    if kind == "unlink":
        return ops.Unlink(parent=old_parent, time_ns=t, name=old_name)
    if kind == "rmdir":
        return ops.Rmdir(parent=old_parent, time_ns=t, name=old_name)
    if kind == "link":
        return ops.Link(ino=target, parent=parent, time_ns=t, name=name)
    flags = data.draw(st.sampled_from((0, 0, ops.RENAME_NOREPLACE, ops.RENAME_EXCHANGE)))
    return ops.Rename(old_parent=old_parent, new_parent=parent, flags=flags, time_ns=t,
                      old_name=old_name, new_name=name)


def _run(fs: Fs, op: ops.Op, contents: dict[int, bytearray]) -> None:
    """Commit `op`, check that a failure leaves no trace, and track file contents."""
    kind = type(op).__name__
    seq = fs.store.last_seq
    try:
        fs.commit(op)
    except FsError as exc:
        event(f"{kind} failed: {type(exc).__name__}")
        assert fs.store.last_seq == seq
        return
    event(f"{kind} applied")
    assert fs.store.last_seq == seq + len(split_write(op))  # one record per block written
    if isinstance(op, ops.MakeNode) and stat.S_ISREG(op.mode):
        contents[op.ino] = bytearray()
    elif isinstance(op, ops.Write):
        data = contents[op.ino]
        if op.data:
            if len(data) < op.offset:
                data.extend(bytes(op.offset - len(data)))
            data[op.offset:op.offset + len(op.data)] = op.data
    elif isinstance(op, ops.Truncate):
        data = contents[op.ino]
        del data[op.size:]
        data.extend(bytes(op.size - len(data)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), n_ops=st.integers(1, 40))
def test_random_op_sequences(data: st.DataObject, n_ops: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with Store.create(Path(tmp) / "source", max_size=TEST_MAX_SIZE, time_ns=T0) as store:
            fs = Fs(store)
            contents: dict[int, bytearray] = {}
            for _ in range(n_ops):
                _run(fs, _draw_op(fs, data), contents)
            assert fsck(store) == []

            # File contents match a plain model of every regular file still alive.
            with store.reader() as state:
                for ino, expected in contents.items():
                    try:
                        node = state.inode(ino)
                    except NotFound:
                        continue
                    assert node.size == len(expected)
                    assert state.read(ino, 0, node.size) == bytes(expected)

            # Replaying the journal rebuilds the same state.
            with replay(store, Path(tmp) / "replayed") as copy:
                assert fsck(copy) == []
                assert digest(copy) == digest(store)

            # Records re-encode to exactly the stored bytes.
            for seq, raw in store.records(1):
                record = decode_record(raw)
                assert record.seq == seq
                assert encode_record(record.cluster_id, record.epoch, record.seq, record.op) == raw

            # Pruning any part of the journal changes nothing of the state: the bytes blocks
            # referred to in pruned records are copied into them.
            state = digest(store)
            store.prune(data.draw(st.integers(1, store.last_seq + 1), label="prune below"))
            assert digest(store) == state
            assert fsck(store) == []
            with store.reader() as state_now:
                for ino, expected in contents.items():
                    with contextlib.suppress(NotFound):
                        assert state_now.read(ino, 0, state_now.inode(ino).size) == bytes(expected)


def test_replay_refuses_a_pruned_journal(store: Store, tmp_path: Path) -> None:
    fs = Fs(store)
    fs.create(ROOT_INO, b"f")
    fs.create(ROOT_INO, b"g")
    store.prune(below=2)
    with pytest.raises(Exception, match="begins at seq 2"):
        replay(store, tmp_path / "copy")


def test_replay_of_a_fresh_store(store: Store, tmp_path: Path) -> None:
    with replay(store, tmp_path / "copy") as copy:
        assert copy.cluster_id == store.cluster_id
        assert copy.last_seq == 1 and digest(copy) == digest(store)
        assert fsck(copy) == []


def _block_kinds(store: Store, ino: int) -> dict[int, str]:
    """Block number -> "ref" (its bytes are in a journal record) or "data" (its own)."""
    with store.env.begin() as txn:
        cursor = txn.cursor(db=store.db.blocks)
        kinds = {}
        if cursor.set_range(u64(ino)):
            for key, value in cursor:
                if key[:8] != u64(ino):
                    break
                ref = parse_block_ref(unseal(DB_BLOCKS, key, value))
                kinds[int.from_bytes(key[8:], "big")] = "data" if ref is None else "ref"
        return kinds


def test_whole_block_writes_refer_to_the_journal_until_pruned(make_store) -> None:
    store = make_store()
    fs = Fs(store)
    f = fs.create(ROOT_INO, b"f")
    expected = bytearray(pattern(2 * BS + 100))
    fs.write(f, 0, bytes(expected))  # two whole blocks and the file's last bytes: stored once
    assert _block_kinds(store, f) == {0: "ref", 1: "ref", 2: "ref"}
    fs.write(f, 10, b"xyz")  # a read-modify-write: the block holds its own bytes
    expected[10:13] = b"xyz"
    assert _block_kinds(store, f) == {0: "data", 1: "ref", 2: "ref"}
    fs.truncate(f, BS + 7)  # the last block still refers, to fewer bytes
    del expected[BS + 7:]
    assert _block_kinds(store, f) == {0: "data", 1: "ref"}
    assert fs.read(f) == expected and fsck(store) == []

    state = digest(store)
    assert store.prune(store.last_seq + 1) == store.last_seq
    assert store.counts()["journal_records"] == 0
    assert _block_kinds(store, f) == {0: "data", 1: "data"}
    assert fs.read(f) == expected
    assert digest(store) == state  # where a block's bytes are is not part of the state

    fs.write(f, BS, pattern(BS, 3))  # after the prune, a new whole-block write refers again
    assert _block_kinds(store, f) == {0: "data", 1: "ref"}
    assert fs.read(f) == expected[:BS] + pattern(BS, 3)


def test_pruning_copies_only_the_bytes_blocks_still_refer_to(make_store) -> None:
    store = make_store()
    fs = Fs(store)
    f = fs.create(ROOT_INO, b"f")
    fs.write(f, 0, pattern(BS, 1))
    first = store.last_seq
    fs.write(f, 0, pattern(BS, 2))  # the block now refers to this record, not the first
    second = store.last_seq
    fs.write(f, BS, pattern(5, 3))
    g = fs.create(ROOT_INO, b"g")
    fs.write(g, 0, pattern(BS, 4))
    gone = store.last_seq
    fs.unlink(ROOT_INO, b"g")
    txn = store.env.begin(write=True)
    try:
        state = FsState(txn, store.db)
        assert [detach_record(state, seq, txn.get(u64(seq), db=store.db.journal))
                for seq in (first, second, second + 1, gone)] == [0, BS, 5, 0]
        assert detach_record(state, second, txn.get(u64(second), db=store.db.journal)) == 0  # done
    finally:
        txn.abort()


def test_multi_block_write_becomes_one_record_per_block(make_store) -> None:
    store = make_store()
    fs = Fs(store)
    ino = fs.create(ROOT_INO, b"f")
    seq = store.last_seq
    data = pattern(3 * BS + 10)
    fs.write(ino, BS - 5, data)  # 5 bytes, three whole blocks, 5 bytes
    assert store.last_seq == seq + 5
    records = [decode_record(raw) for _, raw in store.records(seq + 1)]
    assert [(r.op.offset, len(r.op.data)) for r in records] == [
        (BS - 5, 5), (BS, BS), (2 * BS, BS), (3 * BS, BS), (4 * BS, 5)]
    assert fs.read(ino)[BS - 5:] == data
