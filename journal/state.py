"""A view of the filesystem state inside one LMDB transaction.

Reads serve the FUSE frontend (in short read transactions) and `apply` (inside the
write transaction); the small set of writes is used by `apply` alone.
"""

from __future__ import annotations

import ctypes
import stat
from collections.abc import Iterator

import lmdb

from .errors import NameTooLong, NoSuchAttribute, NotADirectory, NotFound, StoreError
from .schema import (
    BLOCK_SIZE,
    META_NEXT_INO,
    NAME_MAX,
    ROOT_INO,
    Databases,
    Inode,
    block_key,
    dirent_key,
    from_u64,
    parse_block_ref,
    u64,
    xattr_key,
)


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer: how a read-only memoryview gives up its address."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def _copy_out(dest: int, value: memoryview, start: int, length: int) -> None:
    """Copy value[start:start + length] to address `dest`; the caller keeps the bounds.

    ctypes.memmove runs without the GIL, so when `value` lies in LMDB's map and its pages
    are not in memory yet, the disk wait of this page fault does not stop other threads.
    """
    view = _PyBuffer()
    _get_buffer(value, ctypes.byref(view), 0)
    try:
        assert 0 <= start and start + length <= view.len
        ctypes.memmove(dest, view.buf + start, length)
    finally:
        _release_buffer(ctypes.byref(view))


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(name[:40])
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise NotFound(name)


class FsState:
    __slots__ = ("txn", "db")

    def __init__(self, txn: lmdb.Transaction, db: Databases) -> None:
        self.txn = txn
        self.db = db

    # --- inodes ---------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        raw = self.txn.get(u64(ino), db=self.db.inodes)
        if raw is None:
            raise NotFound(f"inode {ino}")
        return Inode.unpack(raw)

    def put_inode(self, ino: int, inode: Inode) -> None:
        self.txn.put(u64(ino), inode.pack(), db=self.db.inodes)

    def next_ino(self) -> int:
        raw = self.txn.get(META_NEXT_INO, db=self.db.meta)
        return from_u64(raw) if raw else ROOT_INO + 1

    def directory(self, ino: int) -> Inode:
        node = self.inode(ino)
        if not stat.S_ISDIR(node.mode):
            raise NotADirectory(f"inode {ino}")
        return node

    # --- names ----------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> int:
        raw = self.txn.get(dirent_key(parent, name), db=self.db.dirents)
        if raw is None:
            raise NotFound(name)
        return from_u64(raw)

    def find(self, parent: int, name: bytes) -> int | None:
        raw = self.txn.get(dirent_key(parent, name), db=self.db.dirents)
        return None if raw is None else from_u64(raw)

    def resolve(self, path: bytes) -> int:
        """Walk `path` (absolute, '/'-separated) from the root to an inode number."""
        ino = ROOT_INO
        for name in path.split(b"/"):
            if not name:
                continue
            if len(name) > NAME_MAX:
                raise NameTooLong(name[:40])
            raw = self.txn.get(dirent_key(ino, name), db=self.db.dirents)
            if raw is None:
                if self.txn.get(u64(ino), db=self.db.inodes) is not None:
                    self.directory(ino)  # ENOTDIR beats ENOENT when a component is a file
                raise NotFound(path)
            ino = from_u64(raw)
        return ino

    def entries(self, parent: int, after: bytes | None = None) -> Iterator[tuple[bytes, int]]:
        """(name, ino) of a directory in name order, optionally starting after a name."""
        prefix = u64(parent)
        cursor = self.txn.cursor(db=self.db.dirents)
        start = prefix + after + b"\0" if after is not None else prefix
        if not cursor.set_range(start):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield key[8:], from_u64(value)

    def is_empty_directory(self, ino: int) -> bool:
        for _ in self.entries(ino):
            return False
        return True

    # --- data -----------------------------------------------------------------------
    def read(self, ino: int, offset: int, size: int, file_size: int | None = None) -> bytes:
        """Up to `size` bytes at `offset` (short only at the end of the file)."""
        if file_size is None:
            file_size = self.inode(ino).size
        length = max(0, min(offset + size, file_size) - offset)
        if not length:
            return b""
        buf = bytearray(length)
        self.read_into(ino, offset, length, ctypes.addressof((ctypes.c_char * length).from_buffer(buf)),
                       file_size)
        return bytes(buf)

    def read_into(self, ino: int, offset: int, size: int, dest: int, file_size: int | None = None) -> int:
        """Copy up to `size` bytes at `offset` to the memory at address `dest` (which holds
        `size` bytes at least); returns how many, short only at the end of the file.

        The frontend's read path: the bytes go from the map straight into libfuse's reply
        buffer, once, with the GIL released (see `_copy_out`), when the transaction was
        begun with buffers=True, so that values are views of the map, not copies.
        """
        if file_size is None:
            file_size = self.inode(ino).size
        end = min(offset + size, file_size)
        if offset >= end:
            return 0
        pos = offset  # the file offset filled up to
        for block_start, value in self._blocks_between(ino, offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE):
            lo, hi = max(block_start, pos), min(block_start + len(value), end)
            if hi <= lo:
                continue
            if lo > pos:  # a hole before this block
                ctypes.memset(dest + pos - offset, 0, lo - pos)
            _copy_out(dest + lo - offset, value, lo - block_start, hi - lo)
            pos = hi
        if pos < end:
            ctypes.memset(dest + pos - offset, 0, end - pos)
        return end - offset

    def _blocks_between(self, ino: int, first: int, last: int) -> Iterator[tuple[int, memoryview]]:
        """(file offset, bytes) of the stored blocks first..last of `ino`, in order."""
        cursor = self.txn.cursor(db=self.db.blocks)
        prefix = u64(ino)
        if not cursor.set_range(block_key(ino, first)):
            return
        for key, value in cursor:
            if key[:8] != prefix:
                return
            block_no = from_u64(key[8:])
            if block_no > last:
                return
            yield block_no * BLOCK_SIZE, self.block_bytes(value)

    def blocks(self, ino: int) -> Iterator[tuple[int, memoryview]]:
        """(block number, bytes) of every stored block of `ino`, in order."""
        prefix = u64(ino)
        cursor = self.txn.cursor(db=self.db.blocks)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield from_u64(key[8:]), self.block_bytes(value)

    def block_bytes(self, value: bytes | memoryview) -> memoryview:
        """The bytes a blocks value stands for: its own, or those it refers to in the
        journal (schema.DB_BLOCKS); a view, without a copy."""
        try:
            ref = parse_block_ref(value)
        except ValueError as exc:
            raise StoreError(f"corrupt block: {exc}") from exc
        if ref is None:
            return memoryview(value)[1:]
        seq, start, length = ref
        record = self.txn.get(u64(seq), db=self.db.journal)
        if record is None or start + length > len(record):
            raise StoreError(f"corrupt block: it refers to {length} bytes at {start} of journal record "
                             f"{seq}, which the journal does not hold")
        return memoryview(record)[start:start + length]

    def readlink(self, ino: int) -> bytes:
        raw = self.txn.get(u64(ino), db=self.db.symlinks)
        if raw is None:
            raise NotFound(f"symlink {ino}")
        return raw

    # --- xattrs ---------------------------------------------------------------------
    def getxattr(self, ino: int, name: bytes) -> bytes:
        raw = self.txn.get(xattr_key(ino, name), db=self.db.xattrs)
        if raw is None:
            raise NoSuchAttribute(name)
        return raw

    def listxattr(self, ino: int) -> list[bytes]:
        prefix = u64(ino)
        cursor = self.txn.cursor(db=self.db.xattrs)
        names = []
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    break
                names.append(key[8:])
        return names
