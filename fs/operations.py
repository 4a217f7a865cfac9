"""The FUSE operations class: resolve paths, build operations, serve reads.

Thin on purpose. Every decision that changes state (inode numbers, times, owners,
resolved parents) is made here and written into an operation; the store applies it.
File handles are inode numbers, so a file renamed or unlinked while open keeps working.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any

from journal import ops
from journal.errors import NameTooLong, NotFound, ReadOnly
from journal.schema import BLOCK_SIZE, NAME_MAX, ROOT_INO, Inode
from journal.state import FsState
from journal.store import Store

from .aliases import LinkAliases
from .binding import UTIME_NOW, UTIME_OMIT, FuseOSError, Operations, fuse_get_context
from .errors import fuse_errors

log = logging.getLogger(__name__)

POSIX_ACL_PREFIX = "system.posix_acl_"
#: 512-byte sectors in a block, as a shift.
_SECTORS_PER_BLOCK_SHIFT = (BLOCK_SIZE // 512).bit_length() - 1

#: Makes an fsync durable: called with the seq that must be durable before fsync returns
#: and the local flush, which it must call; a replicating node ships the records to its
#: standbys first, so that their flush overlaps the local one.
FsyncHook = Callable[[int, Callable[[], None]], None]


def _split(path: str) -> tuple[bytes, bytes]:
    raw = os.fsencode(path)
    parent, _, name = raw.rstrip(b"/").rpartition(b"/")
    if len(name) > NAME_MAX:
        raise NameTooLong(name[:40])
    return parent or b"/", name


class TandemFS(Operations):
    use_ns = True  # nanosecond timestamps in getattr and utimens

    def __init__(self, store: Store, fsync_hook: FsyncHook | None = None) -> None:
        self.store = store
        self.fsync_hook = fsync_hook
        #: Set by a mount that lets the kernel cache attributes: the names of multi-linked
        #: files to invalidate after a change made through another name.
        self.aliases: LinkAliases | None = None

    # --- helpers --------------------------------------------------------------------
    def _resolve(self, path: str) -> int:
        with self.store.reader() as st:
            return st.resolve(os.fsencode(path))

    def _new_entry(self, st: FsState, path: str) -> tuple[int, bytes, Inode, int, int]:
        """(parent ino, name, parent inode, uid, gid) for a new entry at `path`: owned by
        the caller, in the parent's group if the parent is setgid."""
        parent_path, name = _split(path)
        parent = st.resolve(parent_path)
        node = st.directory(parent)
        uid, gid, _pid = fuse_get_context()
        if node.mode & stat.S_ISGID:
            gid = node.gid
        return parent, name, node, uid, gid

    @staticmethod
    def _attrs(ino: int, node: Any) -> dict[str, int]:
        # st_blocks: what a file occupies (its stored blocks, no more than its size), so
        # that sparse files look sparse.
        stored = node.blocks << _SECTORS_PER_BLOCK_SHIFT
        sectors = (node.size + 511) >> 9
        return {
            "st_ino": ino,
            "st_mode": node.mode,
            "st_nlink": node.nlink,
            "st_uid": node.uid,
            "st_gid": node.gid,
            "st_rdev": node.rdev,
            "st_size": node.size,
            "st_blocks": stored if stored < sectors else sectors,
            "st_blksize": BLOCK_SIZE,
            "st_atime": node.atime_ns,
            "st_mtime": node.mtime_ns,
            "st_ctime": node.ctime_ns,
        }

    def _make(self, path: str, mode: int, rdev: int = 0) -> int:
        with self.store.reader() as st:
            parent, name, parent_node, uid, gid = self._new_entry(st, path)
        if stat.S_ISDIR(mode) and parent_node.mode & stat.S_ISGID:
            mode |= stat.S_ISGID
        ino = self.store.allocate_ino()
        self.store.commit(ops.MakeNode(parent=parent, ino=ino, mode=mode, rdev=rdev, uid=uid, gid=gid,
                                  time_ns=time.time_ns(), name=name))
        return ino

    def _named_if_aliased(self, st: FsState, parent: int, name: bytes) -> int | None:
        """The inode `name` in `parent` names, when hard-link aliases are recorded (while
        none is, no other name can be stale, and the lookup is spared)."""
        return st.find(parent, name) if self.aliases else None

    def _changed(self, ino: int | None, via: str | None = None) -> None:
        if self.aliases is not None and ino in self.aliases:
            self.aliases.changed(ino, via)

    # --- attributes and names -------------------------------------------------------
    @fuse_errors
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        while True:
            seq = self.store.last_seq
            with self.store.reader() as st:
                ino = fh if fh else st.resolve(os.fsencode(path))
                node = st.inode(ino)
            if (self.aliases is not None and node.nlink > 1 and path and not stat.S_ISDIR(node.mode)
                    and self.aliases.seen(ino, path) and self.store.last_seq != seq):
                # Recorded just now, after a change may have invalidated the other names:
                # answer from a state that includes that change.
                continue
            return self._attrs(ino, node)

    @fuse_errors
    def access(self, path: str, amode: int) -> int:
        self._resolve(path)  # the kernel checks permissions (default_permissions)
        if amode & os.W_OK and self.store.read_only_reason:
            raise ReadOnly(self.store.read_only_reason)
        return 0

    @fuse_errors
    def opendir(self, path: str) -> int:
        with self.store.reader() as st:
            ino = st.resolve(os.fsencode(path))
            st.directory(ino)
            return ino

    @fuse_errors
    def readdir(self, path: str, fh: int) -> list[Any]:
        with self.store.reader() as st:
            ino = fh or st.resolve(os.fsencode(path))
            node = st.directory(ino)
            entries: list[Any] = [
                (".", {"st_ino": ino, "st_mode": node.mode}, 0),
                ("..", {"st_ino": node.parent or ROOT_INO, "st_mode": stat.S_IFDIR}, 0),
            ]
            for name, child in st.entries(ino):
                try:
                    mode = st.inode(child).mode
                except NotFound:  # a dangling entry is fsck's to report; list the rest
                    mode = 0
                entries.append((os.fsdecode(name), {"st_ino": child, "st_mode": mode}, 0))
            return entries

    @fuse_errors
    def releasedir(self, path: str, fh: int) -> int:
        return 0

    @fuse_errors
    def readlink(self, path: str) -> str:
        with self.store.reader() as st:
            return os.fsdecode(st.readlink(st.resolve(os.fsencode(path))))

    @fuse_errors
    def mkdir(self, path: str, mode: int) -> int:
        self._make(path, stat.S_IFDIR | (mode & 0o7777))
        return 0

    @fuse_errors
    def mknod(self, path: str, mode: int, dev: int) -> int:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
            raise FuseOSError(errno.EINVAL)
        self._make(path, mode, dev)
        return 0

    @fuse_errors
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return self._make(path, stat.S_IFREG | (mode & 0o7777))

    @fuse_errors
    def symlink(self, target: str, source: str) -> int:
        """`target` is the new link's path, `source` what it points to (ln -s source target)."""
        with self.store.reader() as st:
            parent, name, _node, uid, gid = self._new_entry(st, target)
        self.store.commit(ops.Symlink(parent=parent, ino=self.store.allocate_ino(), uid=uid, gid=gid,
                                 time_ns=time.time_ns(), name=name, target=os.fsencode(source)))
        return 0

    @fuse_errors
    def link(self, target: str, source: str) -> int:
        """`target` is the new name, `source` the existing file (ln source target)."""
        with self.store.reader() as st:
            ino = st.resolve(os.fsencode(source))
            parent, name, *_owner = self._new_entry(st, target)
        self.store.commit(ops.Link(ino=ino, parent=parent, time_ns=time.time_ns(), name=name))
        if self.aliases is not None:
            # The source's node may hold attributes cached while it had one link.
            self.aliases.changed(ino, via=target, also=[source])
        return 0

    @fuse_errors
    def unlink(self, path: str) -> int:
        parent_path, name = _split(path)
        with self.store.reader() as st:
            parent = st.resolve(parent_path)
            ino = self._named_if_aliased(st, parent, name)
        self.store.commit(ops.Unlink(parent=parent, time_ns=time.time_ns(), name=name))
        if self.aliases is not None:
            self.aliases.removed(path)
            self._changed(ino)
        return 0

    @fuse_errors
    def rmdir(self, path: str) -> int:
        parent_path, name = _split(path)
        parent = self._resolve(os.fsdecode(parent_path))
        self.store.commit(ops.Rmdir(parent=parent, time_ns=time.time_ns(), name=name))
        return 0

    @fuse_errors
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        old_parent_path, old_name = _split(old)
        new_parent_path, new_name = _split(new)
        with self.store.reader() as st:
            old_parent = st.resolve(old_parent_path)
            new_parent = st.resolve(new_parent_path)
            moved = self._named_if_aliased(st, old_parent, old_name)
            replaced = self._named_if_aliased(st, new_parent, new_name)
        self.store.commit(ops.Rename(old_parent=old_parent, new_parent=new_parent, flags=flags,
                                time_ns=time.time_ns(), old_name=old_name, new_name=new_name))
        if self.aliases is not None:
            exchange = bool(flags & ops.RENAME_EXCHANGE)
            self.aliases.renamed(old, new, exchange=exchange)
            self._changed(moved, via=new)  # its ctime
            self._changed(replaced, via=old if exchange else None)  # its ctime, or a link less
        return 0

    @fuse_errors
    def chmod(self, path: str, mode: int) -> int:
        ino = self._resolve(path)
        self.store.commit(ops.SetAttr(ino=ino, fields=ops.SET_MODE, mode=mode, uid=0, gid=0,
                                 atime_ns=0, mtime_ns=0, time_ns=time.time_ns()))
        self._changed(ino, path)
        return 0

    @fuse_errors
    def chown(self, path: str, uid: int, gid: int) -> int:
        fields = (ops.SET_UID if uid != -1 else 0) | (ops.SET_GID if gid != -1 else 0)
        ino = self._resolve(path)
        if fields:
            self.store.commit(ops.SetAttr(ino=ino, fields=fields, mode=0, uid=max(uid, 0), gid=max(gid, 0),
                                     atime_ns=0, mtime_ns=0, time_ns=time.time_ns()))
            self._changed(ino, path)
        return 0

    @fuse_errors
    def utimens(self, path: str, times: tuple[Any, Any] | None = None) -> int:
        ino = self._resolve(path)
        now = time.time_ns()
        atime, mtime = times if times is not None else (UTIME_NOW, UTIME_NOW)
        fields = 0
        values = {}
        for bit, key, value in ((ops.SET_ATIME, "atime_ns", atime), (ops.SET_MTIME, "mtime_ns", mtime)):
            if value == UTIME_OMIT:
                values[key] = 0
                continue
            fields |= bit
            values[key] = now if value == UTIME_NOW else int(value)
        if fields:
            self.store.commit(ops.SetAttr(ino=ino, fields=fields, mode=0, uid=0, gid=0, time_ns=now,
                                          **values))
            self._changed(ino, path)
        return 0

    # --- file data ------------------------------------------------------------------
    @fuse_errors
    def open(self, path: str, flags: int) -> int:
        with self.store.reader() as st:
            ino = st.resolve(os.fsencode(path))
            truncate = bool(flags & os.O_TRUNC) and stat.S_ISREG(st.inode(ino).mode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC) and self.store.read_only_reason:
            raise ReadOnly(self.store.read_only_reason)
        if truncate:
            # libfuse3 asks for atomic O_TRUNC: the kernel leaves the truncation to open
            # (the kernel has checked write permission). Like Linux, it sets the times
            # even when the file is already empty.
            self.store.commit(ops.Truncate(ino=ino, size=0, time_ns=time.time_ns()))
            self._changed(ino, path)
        return ino

    @fuse_errors
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self.store.reader() as st:
            return st.read(fh or st.resolve(os.fsencode(path)), offset, size)

    @fuse_errors
    def read_into(self, path: str | None, buf: int, size: int, offset: int, fh: int) -> int:
        """read, for the binding: copies into libfuse's buffer at address `buf`."""
        with self.store.reader(buffers=True) as st:
            return st.read_into(fh or st.resolve(os.fsencode(path or "")), offset, size, buf)

    @fuse_errors
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        ino = fh or self._resolve(path)
        self.store.commit(ops.Write(ino=ino, offset=offset, time_ns=time.time_ns(), data=data))
        self._changed(ino, path)
        return len(data)

    @fuse_errors
    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        ino = fh or self._resolve(path)
        self.store.commit(ops.Truncate(ino=ino, size=length, time_ns=time.time_ns()))
        self._changed(ino, path)
        return 0

    #: close(2) has nothing to flush: every write was committed before it returned. Left
    #: out on purpose (the one operation that is): the kernel takes the ENOSYS of the first
    #: FLUSH as success and sends no more, which spares a round trip on every close.
    flush = None

    @fuse_errors
    def release(self, path: str, fh: int) -> int:
        return 0

    @fuse_errors
    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self._durable()
        return 0

    @fuse_errors
    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        self._durable()
        return 0

    def _durable(self) -> None:
        """Everything committed so far is on disk (and, if replicated, acknowledged)."""
        seq = self.store.last_seq
        if self.fsync_hook is None:
            self.store.sync()
        else:
            self.fsync_hook(seq, self.store.sync)

    @fuse_errors
    def statfs(self, path: str) -> dict[str, int]:
        # The size is what the store may grow to: --max-size, or less where the disk under
        # it cannot hold that much (its free space less a reserve), so df never promises
        # more than a write can get.
        bsize = BLOCK_SIZE
        capacity = self.store.capacity()
        total = capacity // bsize
        free = max(0, (capacity - self.store.used_bytes()) // bsize)
        inodes = self.store.counts()["inodes"]
        max_files = max(inodes, capacity // 4096)
        return {
            "f_bsize": bsize, "f_frsize": bsize, "f_blocks": total, "f_bfree": free,
            "f_bavail": free, "f_files": max_files, "f_ffree": max_files - inodes,
            "f_favail": max_files - inodes, "f_namemax": NAME_MAX,
        }

    # --- extended attributes --------------------------------------------------------
    @fuse_errors
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        with self.store.reader() as st:
            return st.getxattr(st.resolve(os.fsencode(path)), os.fsencode(name))

    @fuse_errors
    def listxattr(self, path: str) -> list[str]:
        with self.store.reader() as st:
            return [os.fsdecode(n) for n in st.listxattr(st.resolve(os.fsencode(path)))]

    @fuse_errors
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        if name.startswith(POSIX_ACL_PREFIX):
            # Stored as plain bytes an ACL would not govern access, and cp -a, which sets the
            # mode through an ACL where one is accepted, would lose permissions: refuse it, so
            # tools fall back to chmod.
            raise FuseOSError(errno.EOPNOTSUPP)
        ino = self._resolve(path)
        self.store.commit(ops.SetXattr(ino=ino, flags=options, time_ns=time.time_ns(),
                                  name=os.fsencode(name), value=value))
        self._changed(ino, path)
        return 0

    @fuse_errors
    def removexattr(self, path: str, name: str) -> int:
        ino = self._resolve(path)
        self.store.commit(ops.RemoveXattr(ino=ino, time_ns=time.time_ns(), name=os.fsencode(name)))
        self._changed(ino, path)
        return 0

    # Not for this filesystem: answered explicitly, never ENOSYS (which would disable
    # the call for the whole mount).
    @fuse_errors
    def fallocate(self, path: str, mode: int, offset: int, size: int, fh: int) -> int:
        raise FuseOSError(errno.EOPNOTSUPP)
