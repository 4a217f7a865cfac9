"""Checkpoints of a store and the policy that decides how much journal to keep.

A checkpoint is a consistent compact copy of the environment (`Store.checkpoint`) kept
in `DATA/checkpoints/SEQ/`, where SEQ is the last seq it contains. It is written into a
temporary directory and renamed into place, so a directory with a number for a name is
always a whole checkpoint. It is a whole copy on the store's own disk: one that would not
fit there beside the reserve the store leaves free is not begun (StoreFull). Checkpoints
bootstrap new or far-behind standbys (streamed by the primary as a snapshot) and are the
recovery point for backups.

The journal is kept for standbys, not for the checkpoint: it is pruned below what every
known standby still needs (the record after the newest it has acknowledged), except for a
short tail kept for whoever reconnects. It does not wait for a checkpoint to cover it:
waiting let the journal of a lone primary fill the store between checkpoints (on a
64 MiB store, writing and deleting a 20 MiB file four times left room for only 2 MiB),
and a standby that needs records no longer held is served a fresh checkpoint anyway. A
dead standby must not hold the journal forever either: past a retention bound (records
or bytes) its acknowledgement stops counting, and when it comes back it re-bootstraps
from a snapshot. The byte bounds are cut to fractions of the store's size, so the
journal never takes most of a small store. `prune_point` is that rule as a pure
function, so it is tested on its own.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import StoreFull
from .store import Store, fsync_path

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
#: Checkpoints kept; older ones are deleted once a newer one is in place.
DEFAULT_KEEP = 2
#: Retention bound: the journal never keeps more records than this for a lagging standby.
DEFAULT_RETAIN_RECORDS = 1_000_000
#: ...nor more bytes than this.
DEFAULT_RETAIN_BYTES = 2 << 30
#: The tail kept when no standby needs more: this many records at most...
DEFAULT_TAIL_RECORDS = 10_000
#: ...and this many bytes.
DEFAULT_TAIL_BYTES = 64 << 20
#: A periodic checkpoint is taken this often (seconds) when the journal has grown.
DEFAULT_INTERVAL = 600.0


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    path: Path
    #: Wall-clock time the checkpoint was completed (its directory's mtime).
    time: float

    @property
    def data_file(self) -> Path:
        return self.path / "data.mdb"

    def size(self) -> int:
        return self.data_file.stat().st_size


@dataclass(frozen=True)
class RetentionPolicy:
    #: The most journal a lagging standby may hold back, in records...
    retain_records: int = DEFAULT_RETAIN_RECORDS
    #: ...and in bytes.
    retain_bytes: int = DEFAULT_RETAIN_BYTES
    #: The tail kept for a standby that reconnects, in records...
    tail_records: int = DEFAULT_TAIL_RECORDS
    #: ...and in bytes.
    tail_bytes: int = DEFAULT_TAIL_BYTES

    def within(self, store_size: int) -> RetentionPolicy:
        """This policy with its byte bounds cut to fit a store of `store_size` bytes: a
        lagging standby holds at most a quarter of it, the tail a sixteenth."""
        return replace(self, retain_bytes=min(self.retain_bytes, store_size // 4),
                       tail_bytes=min(self.tail_bytes, store_size // 16))


def prune_point(policy: RetentionPolicy, *, first_seq: int, last_seq: int,
                standby_acks: dict[str, int], journal_bytes: int) -> tuple[int, list[str]]:
    """(seq to prune below, names of standbys given up on) for the current position.

    A standby that acknowledged seq n still needs n + 1 onwards. A standby whose need lies
    further back than the retention bound (in records, or in bytes estimated from the
    journal's mean record size) no longer holds the journal back. Whatever the standbys,
    the newest records up to the tail bound are kept.
    """
    records = max(0, last_seq - first_seq + 1)
    per_record = journal_bytes / records if records and journal_bytes else 0.0

    def keep(most_records: int, most_bytes: int) -> int:
        return min(most_records, int(most_bytes / per_record)) if per_record else most_records

    below = last_seq + 1 - keep(policy.tail_records, policy.tail_bytes)
    bound = last_seq + 1 - keep(policy.retain_records, policy.retain_bytes)  # older needs are given up
    given_up = []
    for name, acked in standby_acks.items():
        need = acked + 1
        if need < bound:
            given_up.append(name)
        else:
            below = min(below, need)
    return max(below, first_seq), given_up


class Checkpoints:
    """The checkpoints of one store: taking, listing and expiring them."""

    def __init__(self, store: Store, keep: int = DEFAULT_KEEP) -> None:
        self.store = store
        self.root = store.path / CHECKPOINT_DIR
        self.keep = max(1, keep)
        self._lock = threading.Lock()  # one checkpoint at a time
        self._counter = 0

    def list(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first."""
        found = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for entry in entries:
            if entry.name.isdigit() and (Path(entry.path) / "data.mdb").exists():
                found.append(Checkpoint(int(entry.name), Path(entry.path), entry.stat().st_mtime))
        return sorted(found, key=lambda c: c.seq)

    def newest(self) -> Checkpoint | None:
        found = self.list()
        return found[-1] if found else None

    def find(self, seq: int) -> Checkpoint | None:
        return next((c for c in self.list() if c.seq == seq), None)

    def take(self) -> Checkpoint:
        """A new checkpoint of the store as it is now (or the newest, if nothing changed)."""
        with self._lock:
            newest = self.newest()
            if newest is not None and newest.seq == self.store.last_seq:
                return newest
            # A checkpoint is a whole copy on the store's own disk: one that would not fit
            # is not begun (and one that fills the disk anyway is removed).
            need, room = self.store.checkpoint_room()
            if need > room.usable:
                raise StoreFull(f"disk full: no room for a checkpoint of up to {need / (1 << 20):.1f} MiB "
                                f"in {self.root}: {room.describe()}")
            self.root.mkdir(exist_ok=True)
            self._counter += 1
            tmp = self.root / f".tmp-{os.getpid()}-{self._counter}"
            shutil.rmtree(tmp, ignore_errors=True)
            started = time.monotonic()
            try:
                seq = self.store.checkpoint(tmp)
                final = self.root / str(seq)
                if final.exists():
                    shutil.rmtree(tmp)
                else:
                    os.rename(tmp, final)
                    fsync_path(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            checkpoint = Checkpoint(seq, final, final.stat().st_mtime)
            log.info("checkpoint at seq %d: %s (%d bytes, %.2f s)", seq, final, checkpoint.size(),
                     time.monotonic() - started)
            self._expire()
            return checkpoint

    def _expire(self) -> None:
        for old in self.list()[:-self.keep]:
            shutil.rmtree(old.path, ignore_errors=True)
            log.info("removed old checkpoint %s", old.path)
        for entry in self.root.glob(".tmp-*"):
            if not entry.name.startswith(f".tmp-{os.getpid()}-"):
                shutil.rmtree(entry, ignore_errors=True)  # left by a process that died


