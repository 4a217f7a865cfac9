"""Self-healing: a value damaged in this node's store is fetched from its peer, verified,
and written back.

A single-disk filesystem can only refuse a damaged block; a replicated one holds another
copy. When a read (or scrub, or pruning) meets a value that fails its checksum, the store
calls its `repairer` (this module's `Repairer`), which asks the peer over the side
channel (REPAIR_GET, answered by REPAIR_VALUE; replica/protocol.py) and accepts the
answer only if it is the same logical value the damaged one was:

- a journal record: records are immutable; the answer must verify, carry the seq asked
  for, this cluster's id and the epoch this node's history gives that seq;
- a block's bytes: the answer comes with the peer's inode, which must equal this node's
  (size, times and all: every change to a file's data changes its ctime, taken from
  the primary's clock and written into the op, so equal inodes mean equal data);
- any other value (an inode, a directory entry, a symlink target, an extended
  attribute): the peer must be at this node's seq, and this node must still be there
  when the value is written.

Meta is node-local and never repaired from a peer. A repair restores the same logical
state, so it is not a journaled operation: it is written in a local transaction, under
the store's write lock, after checking again that the value is still damaged.

Threads: the socket belongs to the replication thread (the primary's side channel, the
standby's follower). A thread that needs a value puts a request in the `RepairChannel`
and waits for the answer with a timeout; the socket thread sends the requests and hands
the answers back.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import NamedTuple

import lmdb

from journal.errors import CorruptRecord, NotFound, StoreError
from journal.integrity import DB_TAGS, DamagedValue, describe, seal, unseal
from journal.records import peek_header, verify_record
from journal.schema import (
    BLOCK_DATA,
    DB_BLOCKS,
    DB_INODES,
    DB_JOURNAL,
    DB_META,
    META_LAST_SEQ,
    epoch_at,
    from_u64,
    u64,
)
from journal.state import FsState
from journal.store import Store, read_meta

from . import protocol as p

log = logging.getLogger(__name__)

#: How long a reader waits for its peer's answer before it fails with EIO.
REPAIR_TIMEOUT = 3.0
_DB_BY_TAG = {tag: name for name, tag in DB_TAGS.items()}


class Request(NamedTuple):
    req_id: int
    db_tag: int
    flags: int
    key: bytes
    end: bytes

    def frames(self) -> tuple[tuple[int, int, int], list[bytes]]:
        """The REPAIR_GET body and payload."""
        return (self.req_id, self.db_tag, self.flags), [self.key, self.end]


@dataclass(frozen=True)
class Answer:
    last_seq: int
    status: int
    value: bytes
    context: bytes


class RepairChannel:
    """Requests for a peer's values, between the threads that wait for them and the
    thread that owns the socket."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._outgoing: deque[Request] = deque()
        self._waiting: dict[int, Future] = {}

    def ask(self, db_name: bytes, key: bytes, end: bytes | None = None,
            timeout: float = REPAIR_TIMEOUT) -> Answer | None:
        """The peer's answer for `key` of `db_name` (with `end`: for every key strictly
        between the two, b"" meaning unbounded), or None (no peer, or no answer in time)."""
        future: Future = Future()
        with self._lock:
            req_id = next(self._ids)
            self._waiting[req_id] = future
            flags = 0 if end is None else p.REPAIR_RANGE
            self._outgoing.append(Request(req_id, DB_TAGS[db_name], flags, key, end or b""))
        try:
            return future.result(timeout)
        except FutureTimeout:
            log.warning("no answer from the peer within %.1fs to repair %s", timeout, key.hex())
            return None
        finally:
            with self._lock:
                self._waiting.pop(req_id, None)

    def outgoing(self) -> list[Request]:
        """The requests to send now (socket thread)."""
        with self._lock:
            requests = list(self._outgoing)
            self._outgoing.clear()
        return requests

    def answered(self, req_id: int, answer: Answer | None) -> bool:
        """Hand an answer to whoever waits for it (socket thread); False if nobody does."""
        with self._lock:
            future = self._waiting.get(req_id)
        if future is None or future.done():
            return False
        future.set_result(answer)
        return True


#: Most entries, and bytes, one ranged answer carries.
MAX_RANGE_ENTRIES = 4096
MAX_RANGE_BYTES = 4 << 20
_ENTRY = struct.Struct(">HI")


def pack_entries(entries: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"".join((_ENTRY.pack(len(k), len(v)), k, v)) for k, v in entries)


def unpack_entries(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Entries of a ranged answer; raises ValueError for a frame that is not a list of them."""
    entries, at = [], 0
    while at < len(raw):
        if at + _ENTRY.size > len(raw):
            raise ValueError("truncated entry header")
        klen, vlen = _ENTRY.unpack_from(raw, at)
        at += _ENTRY.size
        if at + klen + vlen > len(raw):
            raise ValueError("truncated entry")
        entries.append((raw[at:at + klen], raw[at + klen:at + klen + vlen]))
        at += klen + vlen
    return entries


def answer_request(store: Store | None, body: p.RepairGet, key: bytes,
                   end: bytes) -> tuple[tuple, list[bytes]]:
    """The REPAIR_VALUE body (less the request id) and payload answering a REPAIR_GET,
    read from `store`.

    A value goes out sealed as the asker stores it: a block as a block holding its own
    bytes (wherever they are here), with this node's inode for the asker to compare."""
    db_name = _DB_BY_TAG.get(body.db)
    if store is None or db_name is None or db_name == DB_META:
        return (0, p.REPAIR_ABSENT), []
    try:
        with store.reader() as state:
            txn = state.txn
            last_seq = from_u64(read_meta(txn, store.db.meta, META_LAST_SEQ) or u64(0))
            if body.flags & p.REPAIR_RANGE:
                return _answer_range(state, store, db_name, key, end, last_seq)
            raw = txn.get(key, db=store.handle(db_name))
            if raw is None:
                return (last_seq, p.REPAIR_ABSENT), []
            return (last_seq, p.REPAIR_FOUND), _sealed_for_peer(state, store, db_name, key, raw)
    except (DamagedValue, CorruptRecord) as exc:
        log.error("a peer asked for %s, which is damaged here too: %s", describe(db_name, key), exc)
        return (store.last_seq, p.REPAIR_DAMAGED), []


def _sealed_for_peer(state: FsState, store: Store, db_name: bytes, key: bytes, raw: bytes) -> list[bytes]:
    """[value, context] for one stored value, verified; raises DamagedValue."""
    if db_name == DB_BLOCKS:
        data = state.block_bytes(key, raw)
        ino_key = key[:8]
        inode = state.txn.get(ino_key, db=store.db.inodes)
        if inode is None:
            raise DamagedValue(DB_INODES, ino_key, "a block of an inode that does not exist")
        unseal(DB_INODES, ino_key, inode)
        return [seal(DB_BLOCKS, key, BLOCK_DATA, data), bytes(inode)]
    state.verify_entry(db_name, key, raw)
    return [bytes(raw), b""]


def _answer_range(state: FsState, store: Store, db_name: bytes, start: bytes, end: bytes,
                  last_seq: int) -> tuple[tuple, list[bytes]]:
    if db_name == DB_JOURNAL:
        return (last_seq, p.REPAIR_ABSENT), []
    cursor = state.txn.cursor(db=store.handle(db_name))
    entries: list[tuple[bytes, bytes]] = []
    size = 0
    if cursor.set_range(start) if start else cursor.first():
        for key, raw in cursor:
            if key == start:
                continue
            if end and key >= end:
                break
            value = _sealed_for_peer(state, store, db_name, key, raw)[0]
            entries.append((bytes(key), value))
            size += len(key) + len(value)
            if len(entries) > MAX_RANGE_ENTRIES or size > MAX_RANGE_BYTES:
                return (last_seq, p.REPAIR_DAMAGED), []
    return (last_seq, p.REPAIR_FOUND), [pack_entries(entries), b""]


class Repairer:
    """`store.repairer`: repairs a damaged value of `store` from the peer behind `channel`."""

    def __init__(self, store: Store, channel: RepairChannel, peer: str) -> None:
        self.store = store
        self.channel = channel
        self.peer = peer

    def __call__(self, damage: DamagedValue) -> bool:
        if damage.db_name == DB_META:
            return False
        if damage.db_name == DB_BLOCKS and damage.seq is not None and self._record(damage.seq, damage):
            return True  # the record a block refers to was the damaged part
        if damage.db_name == DB_JOURNAL:
            return self._record(from_u64(damage.key), damage)
        if damage.db_name == DB_BLOCKS:
            return self._block(damage.key)
        return self._value(damage.db_name, damage.key)

    def _record(self, seq: int, damage: DamagedValue) -> bool:
        key = u64(seq)
        answer = self.channel.ask(DB_JOURNAL, key)
        if answer is None or answer.status != p.REPAIR_FOUND:
            return False
        store = self.store
        try:
            verify_record(answer.value, seq)
        except CorruptRecord as exc:
            log.error("the peer's copy of journal record %d does not verify: %s", seq, exc)
            return False
        epoch, _seq = peek_header(answer.value)
        cluster = bytes(answer.value[20:36])
        if cluster != store.cluster_id or epoch != epoch_at(store.epoch_history, seq):
            log.error("the peer's journal record %d is of another history (epoch %d): not taken", seq, epoch)
            return False
        return self._write(DB_JOURNAL, key, answer.value, lambda state: True, damage,
                           f"{self.peer} (journal record {seq})")

    def _block(self, key: bytes) -> bool:
        at = self.store.last_seq
        answer = self.channel.ask(DB_BLOCKS, key)
        if answer is None:
            return False
        if answer.status == p.REPAIR_ABSENT and answer.last_seq == at:
            return self._range(DB_BLOCKS, key, at)  # the damage is in the key itself
        if answer.status != p.REPAIR_FOUND:
            return False
        ino_key = key[:8]
        try:
            value = unseal(DB_BLOCKS, key, answer.value)
            theirs = bytes(unseal(DB_INODES, ino_key, answer.context))
        except DamagedValue as exc:
            log.error("the peer's answer for %s does not verify: %s", describe(DB_BLOCKS, key), exc)
            return False
        if value[:1] != BLOCK_DATA:
            return False

        def same_file(state: FsState) -> bool:
            raw = state.txn.get(ino_key, db=state.db.inodes)
            if raw is None:
                return False
            try:
                return bytes(unseal(DB_INODES, ino_key, raw)) == theirs
            except DamagedValue:
                return False

        return self._write(DB_BLOCKS, key, answer.value, same_file, None, self.peer)

    def _value(self, db_name: bytes, key: bytes) -> bool:
        at = self.store.last_seq
        answer = self.channel.ask(db_name, key)
        if answer is None or answer.status == p.REPAIR_DAMAGED:
            return False
        if answer.last_seq != at:
            log.warning("cannot repair %s now: the peer is at seq %d, this node at %d (scrub again when "
                        "they agree)", describe(db_name, key), answer.last_seq, at)
            return False
        if answer.status == p.REPAIR_ABSENT:
            return self._range(db_name, key, at)  # the damage is in the key itself
        try:
            unseal(db_name, key, answer.value)
        except DamagedValue as exc:
            log.error("the peer's answer does not verify: %s", exc)
            return False
        return self._write(db_name, key, answer.value, lambda state: self.store.last_seq == at, None,
                           self.peer)

    def _range(self, db_name: bytes, key: bytes, at: int) -> bool:
        """A damaged entry the peer does not hold: its key is what is damaged, and the entry
        that should be there is missing. Between the nearest entries on either side that
        verify, take the peer's entries for this node's (both at seq `at`)."""
        before, after = self.store.intact_neighbours(db_name, key)
        answer = self.channel.ask(db_name, before or b"", after or b"")
        if answer is None or answer.status != p.REPAIR_FOUND or answer.last_seq != at:
            return False
        try:
            entries = unpack_entries(answer.value)
            for entry_key, value in entries:
                if (before and entry_key <= before) or (after and entry_key >= after):
                    raise ValueError("an entry outside the range asked for")
                unseal(db_name, entry_key, value)
        except (ValueError, DamagedValue) as exc:
            log.error("the peer's entries around %s do not verify: %s", describe(db_name, key), exc)
            return False
        try:
            done = self.store.replace_range(db_name, before, after, entries,
                                            lambda state: self.store.last_seq == at)
        except (StoreError, lmdb.Error) as exc:
            log.error("could not write the repaired entries around %s: %s", describe(db_name, key), exc)
            return False
        if done:
            self.store.integrity.repaired_value(db_name, key, f"{self.peer} (the entries around it)")
        return done

    def _write(self, db_name: bytes, key: bytes, raw: bytes, still_valid, damage: DamagedValue | None,
               source: str) -> bool:
        """Write the verified `raw`; `damage`: what was damaged, if not this value itself
        (a block whose record this is)."""
        try:
            written = self.store.repair_value(db_name, key, raw, still_valid)
        except (StoreError, lmdb.Error, NotFound) as exc:
            log.error("could not write the repaired %s: %s", describe(db_name, key), exc)
            return False
        if written:
            what = (damage.db_name, damage.key) if damage is not None else (db_name, key)
            self.store.integrity.repaired_value(*what, source)
        return written
