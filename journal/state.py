"""A view of the filesystem state inside one LMDB transaction.

Reads serve the FUSE frontend (in short read transactions) and `apply` (inside the
write transaction); the small set of writes is used by `apply` alone. Every value goes
through here sealed (journal/integrity.py): a value read is verified before anything
uses it, so a damaged one raises DamagedValue instead of being served.
"""

from __future__ import annotations

import ctypes
import stat
import struct
from collections.abc import Iterator

import lmdb

from .errors import CorruptRecord, NameTooLong, NoSuchAttribute, NotADirectory, NotFound
from .integrity import CHECKSUM_SIZE, DB_TAGS, DamagedValue, pack_checksum, seal, unseal, xxh3
from .records import verify_record
from .schema import (
    BLOCK_DATA,
    BLOCK_SIZE,
    DB_BLOCKS,
    DB_DIRENTS,
    DB_INODES,
    DB_JOURNAL,
    DB_META,
    DB_SYMLINKS,
    DB_XATTRS,
    INODE_SIZE,
    META_FORMAT,
    META_NEXT_INO,
    NAME_MAX,
    ROOT_INO,
    Databases,
    Inode,
    block_key,
    block_ref_value,
    dirent_key,
    from_u64,
    parse_block_ref,
    u64,
    xattr_key,
)

#: Every database whose values carry a checksum (all of them), in the order a scrub reads them.
SCRUBBED_DBS = (DB_META, DB_INODES, DB_DIRENTS, DB_SYMLINKS, DB_XATTRS, DB_BLOCKS, DB_JOURNAL)
_U64 = struct.Struct(">Q")
_META_TAG = DB_TAGS[DB_META]
_INODES_TAG = DB_TAGS[DB_INODES]
_DIRENTS_TAG = DB_TAGS[DB_DIRENTS]
_SEALED_INODE = INODE_SIZE + CHECKSUM_SIZE
_SEALED_INO = 8 + CHECKSUM_SIZE


#: Sealed values of inodes and directory entries that passed their check, by key. A value
#: read again is checked by comparing it with the bytes that passed (a dict lookup and a
#: memcmp) instead of hashing it: the same bytes under the same key are as good as they
#: were, and a value changed in any way is hashed and checked in full. Most calls read the
#: same few values again (the path's directories, the file a lookup just found).
_GOOD_INODES: dict[bytes, bytes] = {}
_GOOD_DIRENTS: dict[bytes, bytes] = {}
_GOOD_MAX = 1 << 16


def _remember(good: dict[bytes, bytes], key: bytes | memoryview, raw: bytes | memoryview) -> None:
    if len(good) >= _GOOD_MAX:
        good.clear()
    good[bytes(key)] = bytes(raw)


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
    __slots__ = ("txn", "db", "_inodes")

    def __init__(self, txn: lmdb.Transaction, db: Databases, remember_inodes: bool = False) -> None:
        self.txn = txn
        self.db = db
        #: With `remember_inodes` (apply's view): the inodes read (and verified) or written
        #: through this view, by number, since an operation reads the same few inodes
        #: several times. Every write of an inode goes through put_inode or delete_inode,
        #: which keep it current; an Inode handed out is the one kept here, so whoever
        #: changes one puts it (or the transaction is abandoned).
        self._inodes: dict[int, Inode] | None = {} if remember_inodes else None

    # --- sealed values --------------------------------------------------------------
    # The checks of inodes and directory entries, the values every call reads, are inlined
    # (integrity.unseal's, for their fixed sizes): they are most of a lookup's cost otherwise.
    def get_meta(self, key: bytes) -> bytes | memoryview | None:
        raw = self.txn.get(key, db=self.db.meta)
        return None if raw is None else unseal(DB_META, key, raw)

    def put_meta(self, key: bytes, value: bytes) -> None:
        self.txn.put(key, value + pack_checksum(xxh3(value, xxh3(key, _META_TAG))), db=self.db.meta)

    # --- inodes ---------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        remembered = self._inodes
        if remembered is not None and ino in remembered:
            return remembered[ino]
        key = _U64.pack(ino)
        raw = self.txn.get(key, db=self.db.inodes)
        if raw is None:
            raise NotFound(f"inode {ino}")
        if _GOOD_INODES.get(key) != raw:
            if len(raw) != _SEALED_INODE or (pack_checksum(xxh3(raw[:INODE_SIZE], xxh3(key, _INODES_TAG)))
                                             != raw[INODE_SIZE:]):
                value = unseal(DB_INODES, key, raw)  # raises, saying what is wrong; or the size is
                raise DamagedValue(DB_INODES, key, f"value of {len(value)} bytes is not an inode")
            _remember(_GOOD_INODES, key, raw)
        node = Inode.unpack_from(raw)
        if remembered is not None:
            remembered[ino] = node
        return node

    def has_inode(self, ino: int) -> bool:
        return self.txn.get(u64(ino), db=self.db.inodes) is not None

    def put_inode(self, ino: int, inode: Inode) -> None:
        key = _U64.pack(ino)
        value = inode.pack()
        self.txn.put(key, value + pack_checksum(xxh3(value, xxh3(key, _INODES_TAG))), db=self.db.inodes)
        if self._inodes is not None:
            self._inodes[ino] = inode

    def delete_inode(self, ino: int) -> None:
        """Delete inode `ino`'s attributes (apply deletes the rest of it)."""
        self.txn.delete(_U64.pack(ino), db=self.db.inodes)
        if self._inodes is not None:
            self._inodes.pop(ino, None)

    def next_ino(self) -> int:
        raw = self.get_meta(META_NEXT_INO)
        return from_u64(raw) if raw else ROOT_INO + 1

    def directory(self, ino: int) -> Inode:
        node = self.inode(ino)
        if not stat.S_ISDIR(node.mode):
            raise NotADirectory(f"inode {ino}")
        return node

    # --- names ----------------------------------------------------------------------
    def _dirent(self, key: bytes | memoryview, raw: bytes | memoryview) -> int:
        if _GOOD_DIRENTS.get(key) != raw:
            if len(raw) != _SEALED_INO or pack_checksum(xxh3(raw[:8], xxh3(key, _DIRENTS_TAG))) != raw[8:]:
                value = unseal(DB_DIRENTS, key, raw)  # raises, saying what is wrong; or the size is
                raise DamagedValue(DB_DIRENTS, bytes(key),
                                   f"value of {len(value)} bytes is not an inode number")
            _remember(_GOOD_DIRENTS, key, raw)
        return _U64.unpack_from(raw)[0]

    def lookup(self, parent: int, name: bytes) -> int:
        ino = self.find(parent, name)
        if ino is None:
            raise NotFound(name)
        return ino

    def find(self, parent: int, name: bytes) -> int | None:
        key = dirent_key(parent, name)
        raw = self.txn.get(key, db=self.db.dirents)
        return None if raw is None else self._dirent(key, raw)

    def put_dirent(self, parent: int, name: bytes, ino: int) -> None:
        key = dirent_key(parent, name)
        value = _U64.pack(ino)
        self.txn.put(key, value + pack_checksum(xxh3(value, xxh3(key, _DIRENTS_TAG))), db=self.db.dirents)

    def delete_dirent(self, parent: int, name: bytes) -> None:
        self.txn.delete(dirent_key(parent, name), db=self.db.dirents)

    def resolve(self, path: bytes) -> int:
        """Walk `path` (absolute, '/'-separated) from the root to an inode number."""
        ino = ROOT_INO
        get, dirents, good = self.txn.get, self.db.dirents, _GOOD_DIRENTS
        for name in path.split(b"/"):
            if not name:
                continue
            if len(name) > NAME_MAX:
                raise NameTooLong(name[:40])
            key = _U64.pack(ino) + name
            raw = get(key, db=dirents)
            if raw is None:
                if self.has_inode(ino):
                    self.directory(ino)  # ENOTDIR beats ENOENT when a component is a file
                raise NotFound(path)
            # _dirent, inlined: this is every call's path walk.
            if good.get(key) != raw:
                self._dirent(key, raw)
            ino = _U64.unpack_from(raw)[0]
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
            yield key[8:], self._dirent(key, value)

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
            yield block_no * BLOCK_SIZE, self.block_bytes(key, value)

    def blocks(self, ino: int) -> Iterator[tuple[int, memoryview]]:
        """(block number, bytes) of every stored block of `ino`, in order."""
        prefix = u64(ino)
        cursor = self.txn.cursor(db=self.db.blocks)
        if not cursor.set_range(prefix):
            return
        for key, value in cursor:
            if not key.startswith(prefix):
                return
            yield from_u64(key[8:]), self.block_bytes(key, value)

    def has_block(self, key: bytes) -> bool:
        """Whether block `key` is stored; without copying its value out of the map."""
        return self.txn.cursor(db=self.db.blocks).set_key(key)

    def block_value(self, key: bytes) -> memoryview | None:
        """The verified value of block `key` (schema.DB_BLOCKS), None if not stored."""
        raw = self.txn.get(key, db=self.db.blocks)
        return None if raw is None else unseal(DB_BLOCKS, key, raw)

    def block_bytes(self, key: bytes | memoryview, raw: bytes | memoryview) -> memoryview:
        """The bytes the stored (sealed) blocks value `raw` of `key` stands for: its own,
        or those it refers to in the journal (schema.DB_BLOCKS), verified either way; a
        view, without a copy."""
        return self.resolve_block(key, unseal(DB_BLOCKS, key, raw))

    def resolve_block(self, key: bytes | memoryview, value: memoryview) -> memoryview:
        """The bytes of the verified blocks value `value` of `key`."""
        try:
            ref = parse_block_ref(value)
        except ValueError as exc:
            raise DamagedValue(DB_BLOCKS, bytes(key), str(exc)) from exc
        if ref is None:
            return value[1:]
        seq, start, length = ref
        record = self.txn.get(u64(seq), db=self.db.journal)
        if record is None or start + length > len(record):
            raise DamagedValue(DB_BLOCKS, bytes(key), f"it refers to {length} bytes at {start} of journal "
                               f"record {seq}, which the journal does not hold", seq=seq)
        try:
            verify_record(record, seq)
        except CorruptRecord as exc:
            raise DamagedValue(DB_BLOCKS, bytes(key), f"the journal record {seq} holding its bytes is "
                               f"damaged ({exc})", seq=seq) from exc
        return memoryview(record)[start:start + length]

    def put_block_data(self, key: bytes, *parts: bytes | memoryview) -> None:
        """Store the concatenation of `parts` as block `key`'s own bytes."""
        self.txn.put(key, seal(DB_BLOCKS, key, BLOCK_DATA, *parts), db=self.db.blocks)

    def put_block_ref(self, key: bytes, seq: int, start: int, length: int) -> None:
        """Store block `key` as `length` bytes at `start` of journal record `seq`."""
        self.txn.put(key, seal(DB_BLOCKS, key, block_ref_value(seq, start, length)), db=self.db.blocks)

    def readlink(self, ino: int) -> bytes:
        key = u64(ino)
        raw = self.txn.get(key, db=self.db.symlinks)
        if raw is None:
            raise NotFound(f"symlink {ino}")
        return bytes(unseal(DB_SYMLINKS, key, raw))

    def put_symlink(self, ino: int, target: bytes) -> None:
        key = u64(ino)
        self.txn.put(key, seal(DB_SYMLINKS, key, target), db=self.db.symlinks)

    # --- verifying everything -----------------------------------------------------------
    def verify_entry(self, db_name: bytes, key: bytes | memoryview, raw: bytes | memoryview) -> None:
        """Check one stored entry of `db_name` (a value, a block with the record it refers
        to, a journal record); raises DamagedValue."""
        if db_name == DB_JOURNAL:
            try:
                verify_record(raw, from_u64(key))
            except CorruptRecord as exc:
                raise DamagedValue(DB_JOURNAL, bytes(key), str(exc)) from exc
        elif db_name == DB_BLOCKS:
            self.block_bytes(bytes(key), raw)
        elif not (db_name == DB_META and bytes(key) == META_FORMAT):
            unseal(db_name, bytes(key), raw)

    def damaged_values(self, limit: int = 100) -> list[DamagedValue]:
        """Every damaged entry of this transaction (at most `limit`): what a checkpoint,
        which must not copy damage anywhere, checks in the transaction it copies."""
        damaged: list[DamagedValue] = []
        for db_name in SCRUBBED_DBS:
            for key, raw in self.txn.cursor(db=self.db.by_name(db_name)):
                try:
                    self.verify_entry(db_name, key, raw)
                except DamagedValue as exc:
                    damaged.append(exc)
                    if len(damaged) >= limit:
                        return damaged
        return damaged

    # --- xattrs ---------------------------------------------------------------------
    def getxattr(self, ino: int, name: bytes) -> bytes:
        key = xattr_key(ino, name)
        raw = self.txn.get(key, db=self.db.xattrs)
        if raw is None:
            raise NoSuchAttribute(name)
        return bytes(unseal(DB_XATTRS, key, raw))

    def has_xattr(self, ino: int, name: bytes) -> bool:
        return self.txn.get(xattr_key(ino, name), db=self.db.xattrs) is not None

    def put_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        key = xattr_key(ino, name)
        self.txn.put(key, seal(DB_XATTRS, key, value), db=self.db.xattrs)

    def delete_xattr(self, ino: int, name: bytes) -> bool:
        return self.txn.delete(xattr_key(ino, name), db=self.db.xattrs)

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
