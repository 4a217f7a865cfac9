"""Scrub: read every value and record of a store, verify each, repair what is damaged.

Reads verify values as they go, but a value nobody reads (an old file, a journal record
about to be shipped to a standby that reconnects) could rot unseen until the only good
copy is gone. Scrub reads everything: each value's checksum, each block's bytes
(through the record a block refers to, if it does), each journal record's checksum. A
damaged value is handed to the store (`Store.handle_damage`): counted, logged, and
repaired from a peer where the node has one.

It walks in short read transactions (a long-lived reader would keep LMDB from reusing
pages for as long as it lives), so it runs beside a live node's writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lmdb

from .integrity import DamagedValue
from .state import SCRUBBED_DBS
from .store import Store

log = logging.getLogger(__name__)

#: Entries one read transaction of a scrub covers, and bytes.
BATCH_ENTRIES = 2048
BATCH_BYTES = 64 << 20
#: Damaged values listed in a report (the count is always whole).
MAX_LISTED = 100


@dataclass
class ScrubProgress:
    """Where a scrub is; shared with whoever shows it (a progress bar, status)."""

    total_entries: int = 0
    entries: int = 0
    bytes: int = 0
    damaged: int = 0
    repaired: int = 0
    unrepaired: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    database: str = ""
    error: str | None = None

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        """MB/s of value bytes read so far."""
        return self.bytes / 1e6 / max(self.seconds, 1e-6)

    @property
    def fraction(self) -> float:
        if not self.total_entries:
            return 1.0 if self.finished is not None else 0.0
        return min(1.0, self.entries / self.total_entries)

    @property
    def remaining(self) -> int:
        return self.damaged - self.repaired

    def summary(self) -> str:
        where = self.database or "starting"
        state = "done" if self.finished is not None else f"{self.fraction:.0%} ({where})"
        text = (f"{state}: {self.entries} values and records, {self.bytes / 1e6:.1f} MB in "
                f"{self.seconds:.1f}s ({self.rate:.0f} MB/s); {self.damaged} damaged, "
                f"{self.repaired} repaired, {self.remaining} not repaired")
        if self.error:
            text += f"; STOPPED: {self.error}"
        return text

    def as_dict(self) -> dict:
        return {"total_entries": self.total_entries, "entries": self.entries, "bytes": self.bytes,
                "damaged": self.damaged, "repaired": self.repaired, "unrepaired": self.unrepaired,
                "seconds": round(self.seconds, 3), "rate_mb_s": round(self.rate, 1),
                "fraction": round(self.fraction, 4), "finished": self.finished is not None,
                "database": self.database, "error": self.error, "summary": self.summary()}


def scrub(store: Store, progress: ScrubProgress | None = None,
          on_progress: Callable[[ScrubProgress], None] | None = None) -> ScrubProgress:
    """Scrub `store` (see the module doc); returns the finished progress record."""
    progress = progress or ScrubProgress()
    with store.reader() as state:
        progress.total_entries = sum(state.txn.stat(store.handle(name))["entries"] for name in SCRUBBED_DBS)
    try:
        for name in SCRUBBED_DBS:
            progress.database = name.decode()
            start: bytes | None = b""
            while start is not None:
                start = _scrub_batch(store, name, start, progress)
                if on_progress is not None:
                    on_progress(progress)
    except lmdb.Error as exc:
        progress.error = f"the store's LMDB structure is damaged ({exc}): rebuild this node from a standby"
        log.critical("scrub of %s stopped: %s", store.path, progress.error)
    progress.finished = time.monotonic()
    log.info("scrub of %s: %s", store.path, progress.summary())
    return progress


def _scrub_batch(store: Store, name: bytes, start: bytes, progress: ScrubProgress) -> bytes | None:
    """Verify the values of database `name` from key `start` on, in one read transaction;
    returns the key to go on from (None: the database is done)."""
    damaged: list[DamagedValue] = []
    next_start: bytes | None = None
    with store.reader(buffers=True) as state:
        cursor = state.txn.cursor(db=store.handle(name))
        if not (cursor.set_range(start) if start else cursor.first()):
            return None
        entries = size = 0
        for key, raw in cursor:
            if entries >= BATCH_ENTRIES or size >= BATCH_BYTES:
                next_start = bytes(key)
                break
            entries += 1
            size += len(raw)
            try:
                state.verify_entry(name, key, raw)
            except DamagedValue as exc:
                damaged.append(exc)
    progress.entries += entries
    progress.bytes += size
    for exc in damaged:  # outside the transaction: a repair writes
        progress.damaged += 1
        if store.handle_damage(exc):
            progress.repaired += 1
        elif len(progress.unrepaired) < MAX_LISTED:
            progress.unrepaired.append(str(exc))
    return next_start
