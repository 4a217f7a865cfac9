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

from .binding import FUSE, LIBFUSE_MAJOR, NAME
from .operations import TandemFS

log = logging.getLogger(__name__)

#: Attribute and entry cache lifetimes (seconds). The high-level API gives each path its
#: own kernel node, so attributes cached for one hard link would stay stale after a change
#: through another (`ln a b; stat -c %h a` would say 1): attributes are not cached.
#: Entries are: a name only changes through this mount on a primary, and on a following
#: standby a stale name lasts at most a second.
ATTR_TIMEOUT = 0.0
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


def serve(operations: TandemFS, mountpoint: str, read_only: bool = False) -> None:
    """Mount and serve until unmounted."""
    log.info("mounting %s on %s (binding %s, libfuse%d%s)", operations.store.path, mountpoint, NAME,
             LIBFUSE_MAJOR, ", read-only" if read_only else "")
    try:
        FUSE(operations, mountpoint, **mount_options(read_only, f"tandemfs:{operations.store.path}"))
    except RuntimeError as exc:
        # libfuse3 reports a loop ended by SIGTERM/SIGINT as an error (8); it has unmounted.
        if os.path.ismount(mountpoint):
            raise
        log.debug("FUSE loop ended with %s", exc)
    log.info("unmounted %s", mountpoint)


def unmount(mountpoint: str, lazy: bool = False) -> bool:
    """Unmount with fusermount3/fusermount; returns whether it worked."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        return False
    args = [tool, "-u"] + (["-z"] if lazy else []) + [mountpoint]
    return subprocess.run(args, capture_output=True, timeout=30).returncode == 0
