"""apply(state, op): the one deterministic function that changes the filesystem state.

Used for every mutation on the primary, for every record a standby receives, and for
replaying a journal into an empty store. It reads nothing but the op and the state: no
clock, no FUSE, no network. It validates the op against the state before it writes, and
raises a precise FsError when the op is invalid; the caller runs it inside a (child)
transaction that is aborted on any exception, so an invalid op leaves no trace.
"""

from __future__ import annotations

import stat
from collections.abc import Callable

from . import ops
from .errors import (
    AlreadyExists,
    AttributeTooLarge,
    DirectoryNotEmpty,
    FileTooLarge,
    InvalidArgument,
    IsADirectory,
    NameTooLong,
    NoSuchAttribute,
    NotADirectory,
    NotFound,
    NotPermitted,
)
from .records import WRITE_DATA_START, peek_write
from .schema import (
    BLOCK_SIZE,
    META_NEXT_INO,
    PATH_MAX,
    ROOT_INO,
    XATTR_NAME_MAX,
    XATTR_SIZE_MAX,
    Inode,
    block_key,
    parse_block_ref,
    u64,
)
from .state import FsState, check_name

#: Largest file size: keeps block numbers and offsets far inside signed 64-bit.
MAX_FILE_SIZE = 1 << 50


def apply(state: FsState, op: ops.Op, seq: int | None = None) -> None:
    """Apply `op`, which is (or is about to be) the journal's record `seq` in the same
    transaction: a block a Write covers whole then refers to the record's copy of the
    bytes instead of holding its own (schema.DB_BLOCKS). Without `seq` (an op that is not
    journaled here), blocks hold their bytes."""
    if type(op) is ops.Write:
        _write(state, op, seq)  # type: ignore[arg-type]
    else:
        _HANDLERS[type(op)](state, op)


def detach_record(state: FsState, seq: int, record: bytes | memoryview) -> int:
    """Before journal record `seq` (the bytes `record`) is deleted: copy the bytes that
    blocks still refer to in it into those blocks. Returns how many bytes were copied.

    `record` may be a view of the map (a transaction begun with buffers=True, which
    spares pruning a copy of every record): it is read in full before the first write."""
    extent = peek_write(record)
    if extent is None or not extent[2]:
        return 0
    ino, offset, length = extent
    copies = []
    copied = 0
    for block_no in range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1):
        key = block_key(ino, block_no)
        value = state.block_value(key)
        if value is None:
            continue
        ref = parse_block_ref(value)
        if ref is None or ref[0] != seq:
            continue
        _seq, start, size = ref
        # resolve_block verifies the record before its bytes are kept for good.
        copies.append((key, bytes(state.resolve_block(key, value))))
        copied += size
    for key, data in copies:
        state.put_block_data(key, data)
    return copied


# --- helpers ----------------------------------------------------------------------------
def _touch_dir(state: FsState, ino: int, time_ns: int, nlink_delta: int = 0) -> None:
    node = state.inode(ino)
    node.mtime_ns = node.ctime_ns = time_ns
    node.nlink += nlink_delta
    state.put_inode(ino, node)


def _bump_next_ino(state: FsState, ino: int) -> None:
    if ino >= state.next_ino():
        state.put_meta(META_NEXT_INO, u64(ino + 1))


def _new_entry_checks(state: FsState, parent: int, name: bytes, ino: int) -> None:
    check_name(name)
    state.directory(parent)
    if state.find(parent, name) is not None:
        raise AlreadyExists(name)
    if ino <= ROOT_INO or state.has_inode(ino):
        raise InvalidArgument(f"inode number {ino} is taken")


def _delete_inode(state: FsState, ino: int) -> None:
    txn, db = state.txn, state.db
    state.delete_inode(ino)
    txn.delete(u64(ino), db=db.symlinks)
    _delete_prefix(state, db.blocks, u64(ino))
    _delete_prefix(state, db.xattrs, u64(ino))


def _delete_prefix(state: FsState, db: object, prefix: bytes, start: bytes | None = None) -> int:
    """Delete the keys from `start` (default: `prefix`) on that begin with `prefix`;
    returns how many."""
    cursor = state.txn.cursor(db=db)
    if not cursor.set_range(start or prefix):
        return 0
    n = 0
    while cursor.key().startswith(prefix):
        n += 1
        if not cursor.delete():
            break
    return n


def _drop_link(state: FsState, ino: int, time_ns: int) -> None:
    """One name of a non-directory is gone: the inode goes with its last name."""
    node = state.inode(ino)
    node.nlink -= 1
    if node.nlink <= 0:
        _delete_inode(state, ino)
    else:
        node.ctime_ns = time_ns
        state.put_inode(ino, node)


# --- handlers ---------------------------------------------------------------------------
def _init(state: FsState, op: ops.Init) -> None:
    if state.has_inode(ROOT_INO):
        raise AlreadyExists("root")
    root = Inode(
        mode=stat.S_IFDIR | (op.mode & 0o7777), nlink=2, uid=op.uid, gid=op.gid, rdev=0, size=0,
        atime_ns=op.time_ns, mtime_ns=op.time_ns, ctime_ns=op.time_ns, parent=ROOT_INO,
    )
    state.put_inode(ROOT_INO, root)
    state.put_meta(META_NEXT_INO, u64(ROOT_INO + 1))


def _make_node(state: FsState, op: ops.MakeNode) -> None:
    _new_entry_checks(state, op.parent, op.name, op.ino)
    is_dir = stat.S_ISDIR(op.mode)
    if stat.S_IFMT(op.mode) == 0 or stat.S_ISLNK(op.mode):
        raise InvalidArgument(f"mode {op.mode:o}")
    node = Inode(
        mode=op.mode, nlink=2 if is_dir else 1, uid=op.uid, gid=op.gid,
        rdev=op.rdev if (stat.S_ISCHR(op.mode) or stat.S_ISBLK(op.mode)) else 0, size=0,
        atime_ns=op.time_ns, mtime_ns=op.time_ns, ctime_ns=op.time_ns,
        parent=op.parent if is_dir else 0,
    )
    state.put_inode(op.ino, node)
    state.put_dirent(op.parent, op.name, op.ino)
    _touch_dir(state, op.parent, op.time_ns, 1 if is_dir else 0)
    _bump_next_ino(state, op.ino)


def _symlink(state: FsState, op: ops.Symlink) -> None:
    _new_entry_checks(state, op.parent, op.name, op.ino)
    if len(op.target) >= PATH_MAX:
        raise NameTooLong("symlink target")
    if not op.target:
        raise NotFound("empty symlink target")
    node = Inode(
        mode=stat.S_IFLNK | 0o777, nlink=1, uid=op.uid, gid=op.gid, rdev=0, size=len(op.target),
        atime_ns=op.time_ns, mtime_ns=op.time_ns, ctime_ns=op.time_ns,
    )
    state.put_inode(op.ino, node)
    state.put_symlink(op.ino, op.target)
    state.put_dirent(op.parent, op.name, op.ino)
    _touch_dir(state, op.parent, op.time_ns)
    _bump_next_ino(state, op.ino)


def _link(state: FsState, op: ops.Link) -> None:
    check_name(op.name)
    node = state.inode(op.ino)
    if stat.S_ISDIR(node.mode):
        raise NotPermitted("hard link to a directory")
    state.directory(op.parent)
    if state.find(op.parent, op.name) is not None:
        raise AlreadyExists(op.name)
    node.nlink += 1
    node.ctime_ns = op.time_ns
    state.put_inode(op.ino, node)
    state.put_dirent(op.parent, op.name, op.ino)
    _touch_dir(state, op.parent, op.time_ns)


def _unlink(state: FsState, op: ops.Unlink) -> None:
    state.directory(op.parent)
    ino = state.lookup(op.parent, op.name)
    if stat.S_ISDIR(state.inode(ino).mode):
        raise IsADirectory(op.name)
    state.delete_dirent(op.parent, op.name)
    _drop_link(state, ino, op.time_ns)
    _touch_dir(state, op.parent, op.time_ns)


def _rmdir(state: FsState, op: ops.Rmdir) -> None:
    state.directory(op.parent)
    ino = state.lookup(op.parent, op.name)
    state.directory(ino)
    if not state.is_empty_directory(ino):
        raise DirectoryNotEmpty(op.name)
    state.delete_dirent(op.parent, op.name)
    _delete_inode(state, ino)
    _touch_dir(state, op.parent, op.time_ns, -1)


def _is_ancestor(state: FsState, ancestor: int, ino: int) -> bool:
    """Whether directory `ancestor` is `ino` or lies on its path to the root."""
    while True:
        if ino == ancestor:
            return True
        if ino == ROOT_INO:
            return False
        ino = state.inode(ino).parent


def _rename(state: FsState, op: ops.Rename) -> None:
    check_name(op.new_name)
    state.directory(op.old_parent)
    state.directory(op.new_parent)
    src = state.lookup(op.old_parent, op.old_name)
    dst = state.find(op.new_parent, op.new_name)
    src_node = state.inode(src)
    src_is_dir = stat.S_ISDIR(src_node.mode)
    if op.flags & ~(ops.RENAME_NOREPLACE | ops.RENAME_EXCHANGE) or op.flags == (
        ops.RENAME_NOREPLACE | ops.RENAME_EXCHANGE
    ):
        raise InvalidArgument(f"rename flags {op.flags}")
    if src_is_dir and _is_ancestor(state, src, op.new_parent):
        if not (op.old_parent == op.new_parent and op.old_name == op.new_name):
            raise InvalidArgument("cannot move a directory into itself")
    if op.flags & ops.RENAME_EXCHANGE:
        if dst is None:
            raise NotFound(op.new_name)
        _exchange(state, op, src, dst)
        return
    if dst is not None:
        if op.flags & ops.RENAME_NOREPLACE:
            raise AlreadyExists(op.new_name)
        if dst == src:
            return  # two names of one inode: POSIX says do nothing
        dst_node = state.inode(dst)
        dst_is_dir = stat.S_ISDIR(dst_node.mode)
        if src_is_dir and not dst_is_dir:
            raise NotADirectory(op.new_name)
        if dst_is_dir and not src_is_dir:
            raise IsADirectory(op.new_name)
        if dst_is_dir:
            if not state.is_empty_directory(dst):
                raise DirectoryNotEmpty(op.new_name)
            _delete_inode(state, dst)
            _touch_dir(state, op.new_parent, op.time_ns, -1)
        else:
            _drop_link(state, dst, op.time_ns)
    state.delete_dirent(op.old_parent, op.old_name)
    state.put_dirent(op.new_parent, op.new_name, src)
    src_node = state.inode(src)
    src_node.ctime_ns = op.time_ns
    moved_dir = src_is_dir and op.old_parent != op.new_parent
    if moved_dir:
        src_node.parent = op.new_parent
    state.put_inode(src, src_node)
    _touch_dir(state, op.old_parent, op.time_ns, -1 if moved_dir else 0)
    if op.new_parent != op.old_parent:
        _touch_dir(state, op.new_parent, op.time_ns, 1 if moved_dir else 0)


def _exchange(state: FsState, op: ops.Rename, src: int, dst: int) -> None:
    dst_node = state.inode(dst)
    if stat.S_ISDIR(dst_node.mode) and _is_ancestor(state, dst, op.old_parent):
        raise InvalidArgument("cannot move a directory into itself")
    state.put_dirent(op.old_parent, op.old_name, dst)
    state.put_dirent(op.new_parent, op.new_name, src)
    for ino, new_parent in ((src, op.new_parent), (dst, op.old_parent)):
        node = state.inode(ino)
        node.ctime_ns = op.time_ns
        if stat.S_ISDIR(node.mode):
            node.parent = new_parent
        state.put_inode(ino, node)
    if op.old_parent != op.new_parent:
        delta = stat.S_ISDIR(state.inode(src).mode) - stat.S_ISDIR(dst_node.mode)
        _touch_dir(state, op.old_parent, op.time_ns, -delta)
        _touch_dir(state, op.new_parent, op.time_ns, delta)
    else:
        _touch_dir(state, op.old_parent, op.time_ns)


def _regular_file(state: FsState, ino: int) -> Inode:
    node = state.inode(ino)
    if stat.S_ISDIR(node.mode):
        raise IsADirectory(f"inode {ino}")
    if not stat.S_ISREG(node.mode):
        raise InvalidArgument(f"inode {ino} is not a regular file")
    return node


def _write(state: FsState, op: ops.Write, seq: int | None = None) -> None:
    node = _regular_file(state, op.ino)
    end = op.offset + len(op.data)
    if op.offset < 0 or end > MAX_FILE_SIZE:
        raise FileTooLarge(f"write to {end}")
    if not op.data:
        return  # POSIX: writing nothing to a regular file has no other result (no size, no times)
    data = memoryview(op.data)
    pos = op.offset
    while pos < end:
        block_no, within = divmod(pos, BLOCK_SIZE)
        take = min(BLOCK_SIZE - within, end - pos)
        chunk = data[pos - op.offset:pos - op.offset + take]
        key = block_key(op.ino, block_no)
        if within == 0 and (take == BLOCK_SIZE or pos + take >= node.size):
            # The chunk covers everything the block holds: no read-modify-write, and
            # with the record at hand, no second copy of the bytes either.
            if pos >= node.size or not state.has_block(key):
                node.blocks += 1
            if seq is None:
                state.put_block_data(key, chunk)
            else:
                state.put_block_ref(key, seq, WRITE_DATA_START + pos - op.offset, take)
        else:
            value = state.block_value(key)
            if value is None:
                node.blocks += 1
                old = memoryview(b"")
            else:
                old = state.resolve_block(key, value)
            gap = bytes(max(0, within - len(old)))
            state.put_block_data(key, old[:within], gap, chunk, old[within + take:])
        pos += take
    node.size = max(node.size, end)
    node.mtime_ns = node.ctime_ns = op.time_ns
    state.put_inode(op.ino, node)


def _truncate(state: FsState, op: ops.Truncate) -> None:
    node = _regular_file(state, op.ino)
    if op.size < 0 or op.size > MAX_FILE_SIZE:
        raise FileTooLarge(f"truncate to {op.size}")
    if op.size < node.size:
        keep_blocks, tail = divmod(op.size, BLOCK_SIZE)
        if tail:
            key = block_key(op.ino, keep_blocks)
            value = state.block_value(key)
            if value is not None and len(old := state.resolve_block(key, value)) > tail:
                ref = parse_block_ref(value)
                # A reference shortens without a copy; a block's own bytes are cut.
                if ref is None:
                    state.put_block_data(key, old[:tail])
                else:
                    state.put_block_ref(key, ref[0], ref[1], tail)
            keep_blocks += 1
        node.blocks -= _delete_prefix(state, state.db.blocks, u64(op.ino), block_key(op.ino, keep_blocks))
    node.size = op.size
    node.mtime_ns = node.ctime_ns = op.time_ns
    state.put_inode(op.ino, node)


def _set_attr(state: FsState, op: ops.SetAttr) -> None:
    node = state.inode(op.ino)
    if op.fields & ops.SET_MODE:
        node.mode = stat.S_IFMT(node.mode) | (op.mode & 0o7777)
    if op.fields & ops.SET_UID:
        node.uid = op.uid
    if op.fields & ops.SET_GID:
        node.gid = op.gid
    if op.fields & ops.SET_ATIME:
        node.atime_ns = op.atime_ns
    if op.fields & ops.SET_MTIME:
        node.mtime_ns = op.mtime_ns
    node.ctime_ns = op.time_ns
    state.put_inode(op.ino, node)


def _check_xattr_name(name: bytes) -> None:
    if not name:
        raise InvalidArgument("empty xattr name")
    if len(name) > XATTR_NAME_MAX:
        raise NameTooLong("xattr name")


def _set_xattr(state: FsState, op: ops.SetXattr) -> None:
    _check_xattr_name(op.name)
    if len(op.value) > XATTR_SIZE_MAX:
        raise AttributeTooLarge(op.name)
    node = state.inode(op.ino)
    exists = state.has_xattr(op.ino, op.name)
    if op.flags & ops.XATTR_CREATE and exists:
        raise AlreadyExists(op.name)
    if op.flags & ops.XATTR_REPLACE and not exists:
        raise NoSuchAttribute(op.name)
    state.put_xattr(op.ino, op.name, op.value)
    node.ctime_ns = op.time_ns
    state.put_inode(op.ino, node)


def _remove_xattr(state: FsState, op: ops.RemoveXattr) -> None:
    _check_xattr_name(op.name)
    node = state.inode(op.ino)
    if not state.delete_xattr(op.ino, op.name):
        raise NoSuchAttribute(op.name)
    node.ctime_ns = op.time_ns
    state.put_inode(op.ino, node)


def _begin_epoch(state: FsState, op: ops.BeginEpoch) -> None:
    """A marker: the store records the epoch change from the record's header."""


_HANDLERS: dict[type, Callable[[FsState, ops.Op], None]] = {
    ops.Init: _init,
    ops.MakeNode: _make_node,
    ops.Symlink: _symlink,
    ops.Link: _link,
    ops.Unlink: _unlink,
    ops.Rmdir: _rmdir,
    ops.Rename: _rename,
    ops.Write: _write,
    ops.Truncate: _truncate,
    ops.SetAttr: _set_attr,
    ops.SetXattr: _set_xattr,
    ops.RemoveXattr: _remove_xattr,
    ops.BeginEpoch: _begin_epoch,
}
assert set(_HANDLERS) == set(ops.OP_TYPES)

