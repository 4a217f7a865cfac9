"""Mounting: the options tandemfs mounts with, and running the FUSE loop in the foreground.

The loop runs in the calling (main) thread and returns when the filesystem is unmounted:
by SIGTERM/SIGINT (libfuse installs handlers that end the loop and unmount), or by an
external `fusermount -u`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time

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
    """Mount and serve until unmounted."""
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


def is_mounted(mountpoint: str | os.PathLike) -> bool:
    """Whether anything is mounted there, also a dead FUSE mount whose server was killed
    (which os.path.ismount cannot stat)."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


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
