"""Hard-link aliases: the kernel nodes whose cached attributes a change to a file makes stale.

The mount lets the kernel cache attributes (see mounting.ATTR_TIMEOUT): every change on a
primary goes through its own mount, and the kernel keeps the node it changed up to date.
But the path-based FUSE API gives every *path* its own kernel node, so after
`ln a b; chmod 600 b` the node of `a` would show the old mode until its cache expired.

Every attribute the kernel caches comes from an answer of getattr, so the paths whose
answer showed a regular file with more than one link are all the nodes that can go stale
this way. They are recorded here, by inode; after a change to such an inode the others
are invalidated before the call that changed it returns.

Invalidations run in a thread of their own, and a call waits for them at most
`WAIT_SECONDS`. The kernel drops a node's cached pages with its attributes and must lock
them to do so; a write holds the locks of its own pages until it is answered, so two
writes through two names of one file, each waiting in the other's page locks, would wait
forever. The bounded wait breaks that cycle and nothing else.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

#: The longest a call waits for the invalidations it asked for (seconds).
WAIT_SECONDS = 0.1
#: Recorded paths beyond which all are invalidated and forgotten (bounds the memory a
#: tree of many hard links, a backup's for instance, can take).
MAX_PATHS = 65536


class LinkAliases:
    def __init__(self, invalidate: Callable[[str], None], max_paths: int = MAX_PATHS) -> None:
        self._invalidate = invalidate
        self._max_paths = max_paths
        self._lock = threading.Lock()
        self._paths: dict[int, set[str]] = {}
        self._inode_of: dict[str, int] = {}
        self._work: queue.SimpleQueue[tuple[list[str], threading.Event] | None] = queue.SimpleQueue()
        threading.Thread(target=self._invalidator, name="invalidate-aliases", daemon=True).start()

    def __bool__(self) -> bool:
        """Whether any path is recorded: calls that would need a lookup to know which inode
        they change skip it while there is none."""
        return bool(self._inode_of)

    def __contains__(self, ino: int) -> bool:
        return ino in self._paths

    def seen(self, ino: int, path: str) -> bool:
        """Record that getattr answered for `path`, a name of multi-linked `ino`; returns
        whether it was new (the caller must then make sure its answer is not older than a
        change that invalidated the other names before this one was recorded)."""
        flush: list[str] = []
        with self._lock:
            if self._inode_of.get(path) == ino:
                return False
            self._drop(path)
            if len(self._inode_of) >= self._max_paths:
                flush = list(self._inode_of)
                self._paths.clear()
                self._inode_of.clear()
            self._paths.setdefault(ino, set()).add(path)
            self._inode_of[path] = ino
        if flush:
            log.info("%d hard-link aliases recorded: invalidating and forgetting them all", len(flush))
            self._run(flush)
        return True

    def changed(self, ino: int | None, via: str | None = None, also: Iterable[str] = ()) -> None:
        """`ino` changed through `via` (whose node the kernel updates itself): invalidate the
        other recorded names of `ino`, and `also`."""
        targets = list(also)
        if ino is not None:
            with self._lock:
                targets.extend(p for p in self._paths.get(ino, ()) if p != via)
        if targets:
            self._run(targets)

    def removed(self, path: str) -> None:
        with self._lock:
            self._drop(path)

    def renamed(self, old: str, new: str, exchange: bool = False) -> None:
        """Follow a rename in the recorded paths: the kernel moves nodes with their names."""
        with self._lock:
            if not self._inode_of:
                return
            if not exchange:
                self._drop(new)
            moves = {}
            for path in self._inode_of:
                for src, dst in ((old, new), (new, old)) if exchange else ((old, new),):
                    if path == src or path.startswith(src + "/"):
                        moves[path] = dst + path[len(src):]
                        break
            inodes = {path: self._inode_of.pop(path) for path in moves}
            for path, ino in inodes.items():
                self._paths[ino].discard(path)
            for path, ino in inodes.items():
                self._paths[ino].add(moves[path])
                self._inode_of[moves[path]] = ino

    def _drop(self, path: str) -> None:
        ino = self._inode_of.pop(path, None)
        if ino is not None:
            names = self._paths[ino]
            names.discard(path)
            if not names:
                del self._paths[ino]

    def _run(self, paths: list[str]) -> None:
        done = threading.Event()
        self._work.put((paths, done))
        if not done.wait(WAIT_SECONDS):
            log.debug("invalidating %d alias(es) took over %.1fs; not waiting longer", len(paths),
                      WAIT_SECONDS)

    def _invalidator(self) -> None:
        while (item := self._work.get()) is not None:
            paths, done = item
            for path in paths:
                try:
                    self._invalidate(path)
                except Exception:
                    log.exception("invalidating %s failed", path)
            done.set()

    def close(self) -> None:
        self._work.put(None)
