"""Mounting: the options tandemfs mounts with, and running the FUSE loop in the foreground.

The loop runs in the calling (main) thread and returns when the filesystem is unmounted:
by SIGTERM/SIGINT (libfuse installs handlers that end the loop and unmount), or by an
external `fusermount -u`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .aliases import LinkAliases
from .binding import CAN_INVALIDATE, FUSE, LIBFUSE_MAJOR, NAME, invalidate_path
from .operations import TandemFS

log = logging.getLogger(__name__)

#: Attribute and entry cache lifetimes (seconds). A name or an attribute only changes
#: through this mount on a primary, and the kernel keeps the node it changed up to date;
#: on a following standby they are at most a second old, as its mount promises. The
#: path-based API gives each name of a hard-linked file a node of its own, whose cached
#: attributes a change through another name would leave stale: fs/aliases.py invalidates
#: them, with libfuse3's fuse_invalidate_path. libfuse2 has no such call, so on libfuse2
#: attributes are not cached (`ln a b; chmod 600 b; stat a` must show 600).
ATTR_TIMEOUT = 1.0 if CAN_INVALIDATE else 0.0
ENTRY_TIMEOUT = 1.0


def mount_options(read_only: bool, fsname: str) -> dict[str, object]:
    options: dict[str, object] = {
        "foreground": True,
        "fsname": fsname,
        "subtype": "tandemfs",
        "default_permissions": True,
        "use_ino": True,
        "attr_timeout": ATTR_TIMEOUT,
        "entry_timeout": ENTRY_TIMEOUT,
        "negative_timeout": 0,
        "noatime": True,
    }
    if os.geteuid() == 0:
        options["allow_other"] = True
    if LIBFUSE_MAJOR == 2:
        options["big_writes"] = True
        options["max_write"] = 131072
    if read_only:
        options["ro"] = True
    return options


#: Read-ahead of the mount (KiB). The kernel asks a FUSE filesystem for file data in
#: requests of the mount's read-ahead, 128 KiB by default; each request costs a round trip
#: through the kernel, libfuse and Python, so larger ones read faster (libfuse3 allows
#: requests up to 1 MiB).
READ_AHEAD_KB = 1024


def set_read_ahead(mountpoint: str, kb: int = READ_AHEAD_KB, timeout: float = 30.0) -> None:
    """Once the mount is up, raise its read-ahead (a sysfs knob of the mount's bdi)."""
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mountpoint):
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    dev = os.stat(mountpoint).st_dev
    knob = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(knob, "w") as f:
            f.write(str(kb))
    except OSError as exc:  # not root, or no sysfs: the default read-ahead still works
        log.info("could not set read-ahead of %s to %d KiB: %s", mountpoint, kb, exc)


def serve(operations: TandemFS, mountpoint: str, read_only: bool = False) -> None:
    """Mount and serve until unmounted; raises MountpointError (before mounting) if the
    mountpoint cannot be used (see `prepare_mountpoint`)."""
    prepare_mountpoint(mountpoint)
    threading.Thread(target=set_read_ahead, args=(mountpoint,), name="read-ahead", daemon=True).start()
    log.info("mounting %s on %s (binding %s, libfuse%d%s)", operations.store.path, mountpoint, NAME,
             LIBFUSE_MAJOR, ", read-only" if read_only else "")
    if ATTR_TIMEOUT:
        operations.aliases = LinkAliases(invalidate_path)
    try:
        FUSE(operations, mountpoint, **mount_options(read_only, f"tandemfs:{operations.store.path}"))
    except RuntimeError as exc:
        # libfuse3 reports a loop ended by SIGTERM/SIGINT as an error (8); it has unmounted.
        if os.path.ismount(mountpoint):
            raise
        log.debug("FUSE loop ended with %s", exc)
    finally:
        if operations.aliases is not None:
            operations.aliases.close()
            operations.aliases = None
    log.info("unmounted %s", mountpoint)


class MountpointError(Exception):
    """A mountpoint a node must not mount on: not a directory, or something is mounted
    there (and is not a dead tandemfs mount that could be cleared)."""


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    source: str
    fstype: str

    def describe(self) -> str:
        return f"{self.source} ({self.fstype})"


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_at(mountpoint: str | os.PathLike) -> list[MountEntry]:
    """What is mounted on `mountpoint`, bottom first (the last one is what a lookup sees),
    from /proc/self/mountinfo: unlike a stat, this answers for a dead FUSE mount too."""
    target = os.path.realpath(mountpoint)
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if "-" not in fields[6:]:
                continue
            separator = fields.index("-", 6)
            if _unescape(fields[4]) == target and len(fields) > separator + 2:
                found.append(MountEntry(target, _unescape(fields[separator + 2]), fields[separator + 1]))
    return found


def is_mounted(mountpoint: str | os.PathLike) -> bool:
    """Whether anything is mounted there, also a dead FUSE mount whose server was killed
    (which os.path.ismount cannot stat)."""
    return bool(mounts_at(mountpoint))


#: How long a stat of a mountpoint may take before its filesystem counts as hung (seconds).
PROBE_TIMEOUT = 2.0


def _probe(path: str, call: Callable[[str], object] = os.statvfs) -> int | None:
    """The errno `call(path)` fails with (0: it answers); None if it does not answer in time
    (a FUSE server stopped but not dead). statvfs by default: unlike a stat, the kernel
    answers it from no cache, so a mount whose server just died says ENOTCONN at once. The
    call runs in a thread of its own, since it could block for as long as such a server
    sleeps."""
    result: list[int] = []

    def stat() -> None:
        try:
            call(path)
            result.append(0)
        except OSError as exc:
            result.append(exc.errno or errno.EIO)

    thread = threading.Thread(target=stat, name="probe-mountpoint", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT)
    return result[0] if result else None


def _is_tandemfs(entry: MountEntry) -> bool:
    return entry.fstype == "fuse.tandemfs" or entry.source.startswith("tandemfs:")


def _lazy_unmount(path: str) -> bool:
    """Detach whatever is mounted on `path` (lazily: nothing can be in use on a dead mount
    anyway); returns whether that took something off."""
    before = len(mounts_at(path))
    for command in (["fusermount3", "-u", "-z"], ["fusermount", "-u", "-z"], ["umount", "-l"]):
        tool = shutil.which(command[0])
        if tool is None:
            continue
        subprocess.run([tool, *command[1:], path], capture_output=True, timeout=30)
        if len(mounts_at(path)) < before:
            return True
    return False


def prepare_mountpoint(mountpoint: str | os.PathLike) -> None:
    """Make `mountpoint` ready to mount on, or raise MountpointError saying why it is not.

    A dead tandemfs mount (its node was killed: statvfs answers ENOTCONN) is detached, so
    that a node restarts on the same mountpoint by itself. Anything else mounted there,
    alive, hung or of another filesystem, is left alone: a node never mounts over it."""
    path = os.path.realpath(mountpoint)
    for _ in range(8):  # dead mounts may be stacked, one per killed node
        entries = mounts_at(path)
        if not entries:
            break
        top = entries[-1]
        state = _probe(path)
        if state is None:
            raise MountpointError(f"{path} is already a mountpoint: {top.describe()} is mounted there "
                                  "(and does not answer)")
        if state not in (errno.ENOTCONN, errno.ECONNABORTED) or not top.fstype.startswith("fuse"):
            raise MountpointError(f"{path} is already a mountpoint: {top.describe()} is mounted there")
        if not _is_tandemfs(top):
            raise MountpointError(f"{path} holds a dead FUSE mount of {top.describe()}: unmount it first "
                                  f"(fusermount3 -u -z {path})")
        if not _lazy_unmount(path):
            raise MountpointError(f"{path} holds a dead mount of {top.describe()} that could not be "
                                  f"unmounted: unmount it first (fusermount3 -u -z {path})")
        log.info("cleared the dead mount of %s on %s (left by a node that was killed)", top.describe(), path)
    if not os.path.isdir(path):
        state = _probe(path, os.stat)
        reasons = {errno.ENOENT: "does not exist", errno.ENOTDIR: "is not a directory",
                   0: "is not a directory", None: "does not answer"}
        raise MountpointError(f"mountpoint {path} {reasons.get(state) or os.strerror(state or errno.EIO)}")


def unmount(mountpoint: str | os.PathLike, attempts: int = 20) -> bool:
    """Unmount with fusermount3/fusermount, retrying while the mount is busy, then lazily;
    returns whether nothing is mounted there any more."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        return not is_mounted(mountpoint)
    for _ in range(attempts):
        if not is_mounted(mountpoint):
            return True
        subprocess.run([tool, "-u", str(mountpoint)], capture_output=True, timeout=30)
        if not is_mounted(mountpoint):
            return True
        time.sleep(0.1)
    subprocess.run([tool, "-u", "-z", str(mountpoint)], capture_output=True, timeout=30)
    return not is_mounted(mountpoint)
