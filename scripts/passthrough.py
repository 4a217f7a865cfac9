#!/usr/bin/env python3
"""Reference passthrough FUSE filesystem, the yardstick for ``scripts/bench``.

    python scripts/passthrough.py SOURCE_DIR MOUNTPOINT

Mirrors SOURCE_DIR at MOUNTPOINT through the same fusepy-API binding and the same mount
options as tandemfs (multithreaded, ``use_ino``, ``default_permissions``, ``allow_other``,
the same entry cache timeout, big writes on libfuse2, nanosecond times), so that the
difference between the two measures what tandemfs itself costs, not what FUSE and
Python cost. One option differs: attributes are not cached (``attr_timeout=0``), as in
libfuse's own passthrough example, because a passthrough cannot know of changes made to
its source tree beneath it; tandemfs can, since every change goes through its mount.
Every call is one or two system calls on the source tree; open files keep a real file
descriptor in ``fh`` and are written with pwrite and read with preadv straight into
libfuse's buffer (the same shortcut tandemfs's reads take).

Runs in the foreground; SIGTERM, SIGINT or an external ``fusermount -u`` unmounts and
exits 0. The binding is chosen like tandemfs's: ``TANDEMFS_FUSE=mfusepy`` (libfuse3, the
default) or ``TANDEMFS_FUSE=fusepy`` (libfuse2).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import importlib
import os
import stat
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
NS = 1_000_000_000
#: fuse_main_real's answer when its loop ended on a signal (libfuse3).
LOOP_ENDED = 8


def _local_binding():
    """Pick mfusepy (on libfuse3) or fusepy (libfuse2) by TANDEMFS_FUSE."""
    which = os.environ.get("TANDEMFS_FUSE", "mfusepy").strip().lower()
    if which == "mfusepy":
        # mfusepy looks for libfuse2 first; tandemfs's binding wants libfuse3.
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
        return importlib.import_module("mfusepy")
    if which == "fusepy":
        return importlib.import_module("fuse")
    raise SystemExit(f"TANDEMFS_FUSE must be mfusepy or fusepy, not {which!r}")


def load_binding():
    """The binding module tandemfs uses (fs.binding), or the same selection done here."""
    if (REPO_ROOT / "fs" / "binding.py").exists():
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        return importlib.import_module("fs.binding")
    return _local_binding()


binding = load_binding()
FUSE = binding.FUSE
FuseOSError = binding.FuseOSError
Operations = binding.Operations
fuse_get_context = binding.fuse_get_context


def libfuse_major() -> int:
    """Major version of the libfuse the binding loaded (fusepy only speaks libfuse2)."""
    for mod in (binding, sys.modules.get("mfusepy")):
        value = getattr(mod, "fuse_version_major", None)
        if isinstance(value, int):
            return value
    return 2


def mount_options(major: int) -> tuple[dict, str]:
    """The options tandemfs mounts with, and where they came from.

    Taken from fs.mounting when it exists, so that the reference follows tandemfs's
    choices; otherwise the same set written out here. Big writes are options on libfuse2
    only (libfuse3 negotiates large writes by itself).
    """
    if (REPO_ROOT / "fs" / "mounting.py").exists():
        mounting = importlib.import_module("fs.mounting")
        opts = dict(mounting.mount_options(False, "passthrough"))
        opts["fsname"] = "passthrough"
        opts["attr_timeout"] = 0
        if "subtype" in opts:
            opts["subtype"] = "passthrough"
        source = "fs.mounting"
    else:
        opts = {
            "foreground": True,
            "fsname": "passthrough",
            "default_permissions": True,
            "allow_other": True,
            "use_ino": True,
            "attr_timeout": 0,
            "entry_timeout": 1,
            "negative_timeout": 0,
        }
        if major == 2:
            opts["big_writes"] = True
            opts["max_write"] = 131072
        source = "built in"
    # Multithreaded and in the foreground, whatever the table says.
    opts["foreground"] = True
    opts.pop("nothreads", None)
    return opts, source


def _marker(value) -> str | None:
    """Say whether one utimens time is the marker "now", "omit", or a real time (None).

    fs.binding hands the UTIME_NOW / UTIME_OMIT markers over as strings; the raw bindings
    fold them into tv_sec * 10**9 + tv_nsec, with tv_sec undefined, so only the remainder
    tells them apart from a real time.
    """
    if isinstance(value, str):
        return value
    if value % NS == UTIME_NOW % NS:
        return "now"
    if value % NS == UTIME_OMIT % NS:
        return "omit"
    return None


def _resolve_time(value, current: int, now: int) -> int:
    marker = _marker(value)
    if marker == "now":
        return now
    if marker == "omit":
        return current
    return value


def _stat_dict(st: os.stat_result) -> dict:
    return {
        "st_mode": st.st_mode,
        "st_ino": st.st_ino,
        "st_nlink": st.st_nlink,
        "st_uid": st.st_uid,
        "st_gid": st.st_gid,
        "st_rdev": st.st_rdev,
        "st_size": st.st_size,
        "st_blocks": st.st_blocks,
        "st_blksize": st.st_blksize,
        "st_atime": st.st_atime_ns,
        "st_mtime": st.st_mtime_ns,
        "st_ctime": st.st_ctime_ns,
    }


def _entry_type(entry: os.DirEntry) -> int:
    """The S_IFMT bits of a directory entry, from d_type where the source fills it in."""
    if entry.is_symlink():
        return stat.S_IFLNK
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)


def _renameat2(old: str, new: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), new)


class Passthrough(Operations):
    """Every path is SOURCE_DIR + path; errors are the OSError of the underlying call."""

    use_ns = True

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.euid = os.geteuid()
        self.egid = os.getegid()

    def _full(self, path: str) -> str:
        return self.root + path if path != "/" else self.root

    def _own(self, full: str) -> None:
        """Give a new node to the caller, as a local filesystem would."""
        uid, gid, _pid = fuse_get_context()
        if uid != self.euid or gid != self.egid:
            os.lchown(full, uid, gid)

    # attributes

    def getattr(self, path, fh=None):
        if fh is not None:
            return _stat_dict(os.fstat(fh))
        return _stat_dict(os.lstat(self._full(path)))

    def access(self, path, amode):
        if not os.access(self._full(path), amode, follow_symlinks=False):
            raise FuseOSError(errno.EACCES)
        return 0

    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)
        return 0

    def chown(self, path, uid, gid):
        os.lchown(self._full(path), uid, gid)
        return 0

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)
        return 0

    def utimens(self, path, times=None):
        full = self._full(path)
        if times is None:
            os.utime(full, follow_symlinks=False)
            return 0
        atime, mtime = times
        if _marker(atime) or _marker(mtime):
            current = os.lstat(full)
            now = time.time_ns()
            atime = _resolve_time(atime, current.st_atime_ns, now)
            mtime = _resolve_time(mtime, current.st_mtime_ns, now)
        os.utime(full, ns=(atime, mtime), follow_symlinks=False)
        return 0

    def statfs(self, path):
        sv = os.statvfs(self._full(path))
        return {
            key: getattr(sv, key)
            for key in (
                "f_bsize",
                "f_frsize",
                "f_blocks",
                "f_bfree",
                "f_bavail",
                "f_files",
                "f_ffree",
                "f_favail",
                "f_flag",
                "f_namemax",
            )
        }

    # extended attributes: the source's, so a missing one is ENODATA

    def getxattr(self, path, name, position=0):
        return os.getxattr(self._full(path), name, follow_symlinks=False)

    def listxattr(self, path):
        return os.listxattr(self._full(path), follow_symlinks=False)

    def setxattr(self, path, name, value, options, position=0):
        os.setxattr(self._full(path), name, value, options, follow_symlinks=False)
        return 0

    def removexattr(self, path, name):
        os.removexattr(self._full(path), name, follow_symlinks=False)
        return 0

    # namespace

    def readdir(self, path, fh):
        # Inode numbers and types, as tandemfs gives them: with use_ino, a bare name would
        # reach the kernel with inode 0, which readdir(3) hides.
        full = self._full(path)
        parent = full if path == "/" else os.path.dirname(full)
        entries = [
            (".", {"st_ino": os.lstat(full).st_ino, "st_mode": stat.S_IFDIR}, 0),
            ("..", {"st_ino": os.lstat(parent).st_ino, "st_mode": stat.S_IFDIR}, 0),
        ]
        with os.scandir(full) as it:
            for entry in it:
                entries.append((entry.name, {"st_ino": entry.inode(), "st_mode": _entry_type(entry)}, 0))
        return entries

    def readlink(self, path):
        return os.readlink(self._full(path))

    def mknod(self, path, mode, dev):
        full = self._full(path)
        os.mknod(full, mode, dev)
        self._own(full)
        return 0

    def mkdir(self, path, mode):
        full = self._full(path)
        os.mkdir(full, mode)
        self._own(full)
        return 0

    def rmdir(self, path):
        os.rmdir(self._full(path))
        return 0

    def unlink(self, path):
        os.unlink(self._full(path))
        return 0

    def symlink(self, target, source):
        """Create the link ``target`` whose content is ``source`` (ln -s source target)."""
        full = self._full(target)
        os.symlink(source, full)
        self._own(full)
        return 0

    def link(self, target, source):
        """Create the hard link ``target`` to the existing ``source`` (ln source target)."""
        os.link(self._full(source), self._full(target))
        return 0

    def rename(self, old, new, flags=0):
        # RENAME_NOREPLACE / RENAME_EXCHANGE reach here through fs.binding on libfuse3.
        if flags:
            _renameat2(self._full(old), self._full(new), flags)
        else:
            os.rename(self._full(old), self._full(new))
        return 0

    # files

    def create(self, path, mode, fi=None):
        # mfusepy passes the open flags; fusepy passes nothing.
        flags = fi if isinstance(fi, int) else os.O_RDWR
        full = self._full(path)
        fd = os.open(full, flags | os.O_CREAT, mode)
        try:
            self._own(full)
        except OSError:
            os.close(fd)
            raise
        return fd

    def open(self, path, flags):
        return os.open(self._full(path), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY))

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def read_into(self, path, buf, size, offset, fh):
        # As tandemfs reads: straight into libfuse's buffer, without the GIL (preadv).
        return os.preadv(fh, [(ctypes.c_char * size).from_address(buf)], offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    # Like tandemfs, no flush: nothing is buffered here, and the descriptor is closed in
    # release, so close(2) needs no round trip (the kernel stops sending FLUSH after the
    # first ENOSYS). A reference that kept it would pay a cost tandemfs does not.
    flush = None

    def fsync(self, path, datasync, fh):
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)
        return 0

    def fsyncdir(self, path, datasync, fh):
        fd = os.open(self._full(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Reference passthrough FUSE mount (same binding and options as tandemfs).",
    )
    parser.add_argument("source", help="directory to expose")
    parser.add_argument("mountpoint", help="where to mount it")
    parser.add_argument("--debug", action="store_true", help="libfuse debug output on stderr")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.source):
        parser.error(f"{args.source} is not a directory")
    if not os.path.isdir(args.mountpoint):
        parser.error(f"{args.mountpoint} is not a directory")

    major = libfuse_major()
    opts, source = mount_options(major)
    if args.debug:
        opts["debug"] = True
    shown = ",".join(k if v is True else f"{k}={v}" for k, v in opts.items() if v is not False)
    print(
        f"passthrough: {args.source} on {args.mountpoint} pid {os.getpid()} "
        f"binding {binding.__name__} libfuse{major}; options ({source}): {shown}",
        file=sys.stderr,
        flush=True,
    )
    # FUSE() returns once the filesystem is unmounted: libfuse handles SIGTERM/SIGINT
    # itself by leaving its loop and unmounting. libfuse3 reports a loop ended by a
    # signal as error 8, which the binding raises; that is the normal way out.
    try:
        FUSE(Passthrough(args.source), args.mountpoint, **opts)
    except RuntimeError as exc:
        if exc.args != (LOOP_ENDED,) or os.path.ismount(args.mountpoint):
            raise
    print(f"passthrough: {args.mountpoint} unmounted", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
