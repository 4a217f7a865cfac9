"""What LMDB's own metadata says a store's data file must hold, checked before it is mapped.

LMDB maps `data.mdb` into memory and trusts it: a page past the end of a truncated file
is a SIGBUS that kills the process with no word of why. So before any tool opens a
store, the file's two meta pages are read with ordinary reads, and the file must be at
least as long as the newest valid one says (its last page number, plus one, times the
page size). The layout read here is LMDB's on-disk format (lmdb.h, mdb.c: MDB_page
header, then MDB_meta) on a 64-bit little-endian machine, the only kind tandemfs runs on.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from .errors import StoreDamaged, StoreError

DATA_FILE = "data.mdb"
MDB_MAGIC = 0xBEEFC0DE
#: MDB_page header: pgno u64, pad u16, flags u16, lower u16, upper u16.
_PAGE_HEADER = 16
#: MDB_meta after the page header: magic u32, version u32, address u64, mapsize u64, two
#: MDB_db of 48 bytes (the first one's leading u32, md_pad, holds the page size), last
#: page number u64, transaction id u64.
_META = struct.Struct("<IIQQ48s48sQQ")
_MIN_PAGE = 512
_MAX_PAGE = 1 << 16


class StoreTruncated(StoreDamaged):
    """The data file is shorter than LMDB's metadata says it is."""


def _read_meta(fd: int, offset: int) -> tuple[int, int, int] | None:
    """(page size, last page number, txnid) of the meta page at `offset`, None if it is
    not a valid one."""
    raw = os.pread(fd, _PAGE_HEADER + _META.size, offset)
    if len(raw) < _PAGE_HEADER + _META.size:
        return None
    magic, _version, _address, _mapsize, free_db, _main, last_pg, txnid = _META.unpack_from(raw, _PAGE_HEADER)
    if magic != MDB_MAGIC:
        return None
    page_size = struct.unpack_from("<I", free_db)[0]
    if not _MIN_PAGE <= page_size <= _MAX_PAGE or page_size & (page_size - 1):
        return None
    return page_size, last_pg, txnid


def required_size(path: str | os.PathLike) -> tuple[int, int]:
    """(actual size, size LMDB's newest meta page requires) of data file `path`;
    raises StoreTruncated or StoreError when the file cannot be a store."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror}") from exc
    try:
        size = os.fstat(fd).st_size
        first = _read_meta(fd, 0)
        if first is None:
            if size < 2 * _MIN_PAGE:
                raise StoreTruncated(f"store file truncated: {size} bytes, not even LMDB's header")
            raise StoreDamaged(f"{path}: not an LMDB data file (no valid meta page at its start); rebuild "
                               "this node from a standby")
        page_size = first[0]
        second = _read_meta(fd, page_size)
    finally:
        os.close(fd)
    if size < 2 * page_size:
        raise StoreTruncated(f"store file truncated: {size} of at least {2 * page_size} bytes")
    newest = max((m for m in (first, second) if m is not None), key=lambda m: m[2])
    return size, (newest[1] + 1) * page_size


def check_data_file(store_dir: str | os.PathLike) -> None:
    """Raise StoreTruncated (one line an operator can act on) if the data file of the store
    in `store_dir` is shorter than its LMDB metadata requires; a missing file is left to
    the caller."""
    path = Path(store_dir) / DATA_FILE
    if not path.exists():
        return
    size, required = required_size(path)
    if size < required:
        raise StoreTruncated(f"store file truncated: {size} of {required} bytes; rebuild this node from "
                             f"a standby ({path})")
