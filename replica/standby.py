"""The standby's side of replication: follow a primary, apply its journal, acknowledge.

The ZeroMQ guide's Clone pattern. The standby SUBscribes to the stream first, then says
HELLO on the side channel, so nothing published after the primary's answer is missed;
records that arrive before the store can take them wait in `pending`, and records the
store already holds are skipped as duplicates. Records apply strictly in seq order with
the same `apply` the primary used (`Store.apply_records`), appended to this node's own
journal, so it could serve as a primary the moment it is promoted.

PUB drops at its high-water mark, so a hole is expected, not exceptional: when a record
arrives ahead of the next expected seq, or a heartbeat announces seqs never received,
the standby FETCHes the missing range. When the primary no longer retains it, the
standby bootstraps from a snapshot: a checkpoint file streamed in chunks on credit
(`SnapshotDownload`), resumable after a crash, installed in place of the store (under a
live mount too: `Store.replace_with`), and then continues from the snapshot's seq.

Rejoining after a failover. The WELCOME carries the primary's epoch history; if this
node holds records the primary does not (an old primary coming back as a standby, or a
standby that received records its new primary never had), its state holds changes that
are not the cluster's: fetching on top of them would mix two histories. The node exports
those divergent records (replica/divergence.py), then rebuilds its store from the
primary's snapshot, keeping its old environment beside the export, and follows from
there. A node without divergent records just catches up by fetching.

What the node has heard from its primary (the highest epoch, the last seq announced, the
acks its fsyncs wait for) is kept in the store's meta (META_UPSTREAM), so that promotion
can refuse a node known to be behind even after a restart, and choose defaults.

Acknowledgements: `received` once records are applied, `durable` once synced. Syncs are
batched: one per pass of the loop when the primary's fsyncs wait for durable acks (so
every record that arrived while the previous sync ran shares the next), else once a
second.

With CURVE keys (replica/security.py) both sockets are CURVE clients of the primary's
public key. A primary that does not admit this node, or whose key is not the one given,
sends it nothing: ZeroMQ ends the connection in the handshake, and nothing ever reaches
the message handlers. So the socket's monitor events are watched (`HandshakeWatch`):
after NO_ANSWER_AFTER seconds without a message the standby logs why the primary does
not answer as far as it can tell (refused key, wrong primary key, only one side using
CURVE, no connection), and status shows it. libzmq gives up a connection whose handshake
was refused; the follower connects again every REFUSED_RETRY seconds, so a key added to
the primary's peers directory is picked up without restarting the standby.

Sends never block: a message the side channel cannot take now (no connection) is
counted and not sent; everything the follower sends is repeated by its timers.

One thread owns both sockets. `handle_stream` and `handle_side` take raw frames and are
the whole of message handling, so tests feed them forged frames directly.
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import zmq

from journal.checkpoints import Checkpoints
from journal.errors import CorruptRecord, SequenceGap, StaleEpoch, StoreError, StoreFull, WrongCluster
from journal.integrity import DamagedValue
from journal.schema import META_FENCED, META_ROLE, META_UPSTREAM, epoch_at
from journal.store import Store, disk_room, inspect_environment, is_store

from . import protocol as p
from .common import (
    ACK_INTERVAL,
    ENV_SNAPSHOT_CREDIT,
    ENV_SUB_RCVHWM,
    DropCounter,
    Started,
    env_int,
    make_socket,
)
from .divergence import Divergence, divergence_point, export
from .repair import Answer, RepairChannel, Repairer, answer_request
from .security import Curve, HandshakeWatch

log = logging.getLogger(__name__)

HELLO_RETRY = 1.0
FETCH_TIMEOUT = 3.0
SNAPSHOT_TIMEOUT = 5.0
#: Records waiting for their predecessors, at most (count and bytes).
PENDING_RECORDS = 200_000
PENDING_BYTES = 256 << 20
#: A record that arrives failing its checksum this often stops the follower.
CORRUPT_LIMIT = 2
#: Records per apply_records call.
APPLY_BATCH = 4096
#: Sync at least this often when the primary does not wait for durable acks.
LAZY_SYNC = 1.0
#: A stopping standby says where it stopped only to a primary heard from this recently
#: (seconds): to a dead one the message would hold the stop for its whole linger.
FAREWELL_WITHIN = 1.0
DEFAULT_CREDIT = 8
INCOMING = "incoming"
#: What the node heard from its primary is written to meta at most this often (seconds).
UPSTREAM_EVERY = 0.5
#: A pass of the follower loop later than this after the previous one means this process
#: was not running (paused, swapped, a VM frozen): the primary's silence meanwhile is not
#: evidence that it died, so silence is counted again from then (seconds).
STALL_LIMIT = 0.5
#: Seconds without any message from the primary after which the standby says why (as far
#: as it can tell), and again at most every NO_ANSWER_LOG_EVERY seconds.
NO_ANSWER_AFTER = 5.0
NO_ANSWER_LOG_EVERY = 30.0
#: A connection the primary refused in the handshake is made again after this long (seconds).
REFUSED_RETRY = 5.0


def _int(mapping: dict[str, object], key: str) -> int:
    value = mapping.get(key, 0)
    return value if isinstance(value, int) else 0


def read_upstream(store: Store) -> dict[str, object]:
    """What this store's node last heard from its primary (META_UPSTREAM), or {}."""
    raw = store.get_meta(META_UPSTREAM)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class State(str, enum.Enum):
    CONNECTING = "connecting"  # HELLO sent, no WELCOME yet
    CATCHING_UP = "catching-up"  # fetching what the stream did not bring
    SNAPSHOT = "snapshot"  # bootstrapping from a snapshot
    FOLLOWING = "following"  # caught up, applying the stream
    REFUSED = "refused"  # the primary will not serve this store (another cluster)
    FAILED = "failed"  # this store cannot apply the primary's journal


class FollowerHalted(Exception):
    """Following cannot go on, and restarting would not help (the primary's journal is
    damaged): the follower stops, the node stays up (its mount, its status) for the
    operator to see why."""


class FollowerFatal(Exception):
    """The standby cannot follow this primary; the node must stop and say why."""


class SnapshotDownload:
    """One snapshot transfer into DATA/incoming/, resumable across restarts.

    The part file is `incoming/<snap_id>/data.mdb` (an environment directory, so the
    finished file installs with `Store.replace_with`). `incoming/state.json` records the
    snapshot's id, size and cluster, and how many leading bytes are on disk: it is only
    written after those bytes were fdatasync'ed.
    """

    SAVE_EVERY = 4 << 20

    def __init__(self, data: Path, credit: int) -> None:
        self.root = data / INCOMING
        self.credit = max(1, credit)
        self.snap_id = 0
        self.size = 0
        self.chunk = 0
        self.cluster_id = b""
        self.done = 0  # leading bytes received
        self.saved = 0  # leading bytes recorded in state.json
        self.received: set[int] = set()  # chunk offsets at or beyond `done`
        self.inflight: dict[int, float] = {}  # offset -> time requested
        self.next_offset = 0
        self.opened_at = 0.0  # time SNAP_OPEN was sent (0: not waiting for SNAP_INFO)
        self.retry_at = 0.0
        self.last_progress = 0.0
        self.resumed_from = 0
        self.started_at = 0.0
        self._fd: int | None = None

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def directory(self) -> Path:
        return self.root / str(self.snap_id)

    def wanted(self) -> int:
        """The snapshot a previous run left unfinished, to resume (0: none)."""
        try:
            state = json.loads(self.state_file.read_text())
            return int(state["snap_id"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0

    def begin(self, snap_id: int, size: int, chunk: int, cluster_id: bytes) -> None:
        self.close()
        self.received.clear()
        self.inflight.clear()
        resume = 0
        try:
            state = json.loads(self.state_file.read_text())
            if (state["snap_id"], state["size"], state["cluster_id"]) == (snap_id, size, cluster_id.hex()) \
                    and (self.root / str(snap_id) / "data.mdb").exists():
                resume = int(state["done"]) // chunk * chunk
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass
        self.snap_id, self.size, self.chunk, self.cluster_id = snap_id, size, chunk, cluster_id
        if not resume:
            shutil.rmtree(self.root, ignore_errors=True)
        self._check_room(resume)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.directory / "data.mdb", os.O_WRONLY | os.O_CREAT, 0o600)
        if not resume:
            os.ftruncate(self._fd, size)
        self.done = self.saved = self.next_offset = resume
        self.resumed_from = resume
        self.started_at = self.last_progress = time.monotonic()
        self._save()
        if resume:
            log.info("resuming snapshot %d at byte %d of %d", snap_id, resume, size)
        else:
            log.info("downloading snapshot %d (%d bytes)", snap_id, size)

    def _check_room(self, resume: int) -> None:
        """Refuse a download that the disk cannot hold (beside the reserve a store leaves
        free) before it begins: the part file is sparse, so it would fail only halfway."""
        try:
            on_disk = os.stat(self.directory / "data.mdb").st_blocks * 512 if resume else 0
        except FileNotFoundError:
            on_disk = 0
        room = disk_room(self.root.parent)
        need = max(0, self.size - on_disk)
        if need > room.usable:
            mib = 1 << 20
            raise FollowerFatal(
                f"disk full: {self.root.parent}: the primary's snapshot {self.snap_id} is "
                f"{self.size / mib:.1f} MiB; it needs {(need + room.reserve) / mib:.1f} MiB free there "
                f"({room.reserve / mib:.1f} MiB of them kept in reserve), and {room.free / mib:.1f} MiB "
                f"of {room.total / mib:.1f} MiB are free")

    def _disk_full(self, exc: OSError) -> FollowerFatal:
        return FollowerFatal(f"disk full while receiving snapshot {self.snap_id} ({self.size} bytes, "
                             f"{self.done} received): {disk_room(self.root.parent).describe()}")

    def requests(self) -> list[tuple[int, int]]:
        """(offset, length) of the SNAP_GETs to send now, within the credit."""
        out = []
        now = time.monotonic()
        while len(self.inflight) < self.credit and self.next_offset < self.size:
            length = min(self.chunk, self.size - self.next_offset)
            out.append((self.next_offset, length))
            self.inflight[self.next_offset] = now
            self.next_offset += length
        return out

    def overdue(self) -> list[tuple[int, int]]:
        """Requests to send again after a silence of SNAPSHOT_TIMEOUT."""
        now = time.monotonic()
        if not self.inflight or now - self.last_progress < SNAPSHOT_TIMEOUT:
            return []
        self.last_progress = now
        return [(offset, min(self.chunk, self.size - offset)) for offset in sorted(self.inflight)]

    def accept(self, offset: int, data: bytes) -> bool:
        """Store one chunk; True when the whole file is here."""
        if self._fd is None or offset not in self.inflight or offset % self.chunk:
            raise p.BadMessage("unexpected", f"chunk at {offset} of snapshot {self.snap_id} not asked for")
        if len(data) != min(self.chunk, self.size - offset):
            raise p.BadMessage("malformed", f"chunk at {offset} of {len(data)} bytes")
        try:
            os.pwrite(self._fd, data, offset)
            del self.inflight[offset]
            self.received.add(offset)
            while self.done in self.received:
                self.received.discard(self.done)
                self.done = min(self.size, self.done + self.chunk)
            self.last_progress = time.monotonic()
            if self.done >= self.size:
                os.fsync(self._fd)
                self._save()
                return True
            if self.done - self.saved >= self.SAVE_EVERY:
                os.fdatasync(self._fd)
                self._save()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._disk_full(exc) from exc
            raise
        return False

    def _save(self) -> None:
        state = {"snap_id": self.snap_id, "size": self.size, "cluster_id": self.cluster_id.hex(),
                 "done": self.done}
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)
        self.saved = self.done

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)
        self.snap_id = 0
        self.inflight.clear()
        self.received.clear()

    def progress(self) -> dict[str, object]:
        return {"snap_id": self.snap_id, "size": self.size, "received": self.done,
                "resumed_from": self.resumed_from}


class Follower:
    """Follows one primary on behalf of one store (which may not exist yet)."""

    def __init__(self, data: str | os.PathLike, primary: str, control: str, *, store: Store | None,
                 name: str, max_size: int | None = None,
                 on_store: Callable[[Store], None] | None = None,
                 on_fatal: Callable[[str], None] | None = None, curve: Curve | None = None) -> None:
        self.data = Path(data)
        #: CURVE keys to follow with (None: in the clear); `curve.server_public` is the primary's.
        self.curve = curve
        self.primary = primary
        self.control = control
        self.name = name[:p.MAX_NAME]
        self.store = store
        self.max_size = max_size
        self._on_store = on_store or (lambda store: None)
        self._on_fatal = on_fatal or (lambda reason: None)
        self.state = State.CONNECTING
        self.error: str | None = None
        self.drops = DropCounter(log, "replication")
        self.epoch = store.epoch if store else 0
        #: The highest last seq announced by a primary of epoch `seen_epoch` (or this
        #: store's own last seq, when that is higher and nothing newer was heard).
        self.known_last = store.last_seq if store else 0
        # What a previous run heard from this same primary: a standby restarted while its
        # primary is down still knows how far the primary had got.
        upstream = read_upstream(store) if store else {}
        if upstream.get("primary") != primary:
            upstream = {}
        self.seen_epoch = _int(upstream, "epoch")
        self.known_last = max(self.known_last, _int(upstream, "last_seq"))
        self._upstream_saved: dict[str, object] | None = None
        self._upstream_at = 0.0
        #: The divergent records this node exported when it rejoined, if it did.
        self.divergence: Divergence | None = None
        self._resync: Divergence | None = None
        self._drain = False
        self.primary_first = 0
        #: Which acks the primary's fsyncs wait for (heartbeat flags); remembered across restarts.
        self.ack_flags = _int(upstream, "ack_flags")
        self.pending: dict[int, bytes] = {}
        self._pending_bytes = 0
        self._fetch: tuple[int, int, float] | None = None
        self._hello_at = 0.0
        self.last_heartbeat: float | None = None
        #: When the last pass over the sockets began (all that had arrived by then was read),
        #: and since when the loop has run without a stall.
        self.last_pump = 0.0
        self.awake_since = time.monotonic()
        #: When a message from the primary (any, on either socket) last arrived.
        self.last_heard: float | None = None
        self._since = time.monotonic()  # when following began (silence counts from there at most)
        self._watch: HandshakeWatch | None = None
        #: Why the primary does not answer, while it does not (NO_ANSWER_AFTER).
        self.problem: str | None = None
        self._problem_logged = 0.0
        self.heartbeat_time_ns = 0
        self.behind_since: float | None = None
        self.synced = store.last_seq if store else 0
        #: The newest seq the primary asked to have on disk (FLUSH): a durable fsync waits.
        self.flush_wanted = 0
        self._last_sync = time.monotonic()
        self._lazy_sync_running = False
        self._sent_ack = (-1, -1)
        self._ack_at = 0.0
        self.snapshot = SnapshotDownload(self.data, env_int(ENV_SNAPSHOT_CREDIT, DEFAULT_CREDIT))
        self.stats = {"applied_records": 0, "stream_records": 0, "gaps": 0, "fetches": 0,
                      "fetched_records": 0, "snapshots": 0, "snapshot_resumes": 0, "divergent_records": 0,
                      "unsent_messages": 0, "reconnects": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._dealer: zmq.Socket | None = None
        self.outbox: list[list[bytes]] = []  # what would have been sent, with no socket (tests)
        self.identity = self.name.encode() + b"#" + uuid.uuid4().bytes[:4].hex().encode()
        #: Values this store asks its primary for, to repair its own (replica/repair.py).
        self.repair = RepairChannel()
        self._repairers: dict[int, Repairer] = {}
        #: How often the record of each seq arrived failing its checksum (the stream may
        #: drop or mangle one; a second failure means the primary's copy is bad).
        self._corrupt: dict[int, int] = {}
        self._repairing: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.store is not None:
            self._repair_from_primary(self.store)
        self._ctx = zmq.Context()
        started = Started()
        self._thread = threading.Thread(target=self._run, args=(started,), name="follower", daemon=True)
        self._thread.start()
        started.wait()

    def stop(self, drain: bool = False) -> None:
        """Stop following. With `drain`, first apply what has already arrived (records the
        primary sent before it died), without asking for more: promotion's last step."""
        self._drain = drain
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for repairer in self._repairers.values():
            if repairer.store.repairer is repairer:
                repairer.store.repairer = None
        self.snapshot.close()
        if self._ctx is not None:
            self._ctx.term()
        if self.store is not None and self.state not in (State.SNAPSHOT, State.REFUSED):
            self._remember_upstream(time.monotonic(), force=True)

    def _run(self, started: Started) -> None:
        assert self._ctx is not None
        try:
            sub = make_socket(self._ctx, zmq.SUB, self.curve)
        except Exception as exc:  # reported to whoever started the thread
            started.fail(exc)
            return
        try:
            dealer = make_socket(self._ctx, zmq.DEALER, self.curve)
        except Exception as exc:  # reported to whoever started the thread
            sub.close()
            started.fail(exc)
            return
        try:
            watch = HandshakeWatch(dealer, self.curve, f"the primary's side channel {self.control}")
        except zmq.ZMQError as exc:
            sub.close()
            dealer.close()
            started.fail(exc)
            return
        try:
            hwm = env_int(ENV_SUB_RCVHWM, 0)
            if hwm:
                sub.setsockopt(zmq.RCVHWM, hwm)
                sub.setsockopt(zmq.RCVBUF, 4096)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(self.primary)  # subscribe first, then say hello (Clone)
            dealer.setsockopt(zmq.ROUTING_ID, self.identity)
            dealer.connect(self.control)
        except zmq.ZMQError as exc:
            watch.close()
            sub.close()
            dealer.close()
            started.fail(exc)
            return
        self._dealer = dealer
        self._watch = watch
        started.ok()
        if self.curve is not None and self.curve.server_public is not None:
            log.info("replication traffic uses CURVE: the primary's public key is %s, this node's %s",
                     self.curve.server_public.decode(), self.curve.public.decode())
        else:
            log.info("replication traffic is NOT authenticated or encrypted (no CURVE keys)")
        log.info("following %s (side channel %s) as %s from seq %d", self.primary, self.control,
                 self.name, self.store.last_seq if self.store else 0)
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        poller.register(watch.poll_socket, zmq.POLLIN)
        self._since = time.monotonic()
        try:
            self._hello()
            previous = 0.0
            while not self._stop.is_set() and self.state not in (State.REFUSED, State.FAILED):
                poller.poll(50)
                # Passes start at most a poll timeout (plus one pass's work) apart; a longer gap
                # means this process did not run, wherever it was stopped.
                started = time.monotonic()
                if previous and started - previous > STALL_LIMIT:
                    log.warning("the follower did not run for %.1fs (paused?): the primary's silence is "
                                "counted afresh", started - previous)
                    self.awake_since = started
                previous = started
                if self._pump(sub, dealer):
                    self.last_heard = started
                self.last_pump = started  # everything that had arrived by then has been read
                watch.drain()
                if watch.retry_due(REFUSED_RETRY):
                    self._reconnect(sub, dealer)
                self._check_answer(started)
            if self._drain and self.state in (State.FOLLOWING, State.CATCHING_UP):
                for _ in range(20):
                    if not self._pump(sub, dealer):
                        break
                log.info("stopped following at seq %d (primary announced %d)", self.store.last_seq
                         if self.store else 0, self.known_last)
            elif self.last_heard is not None and time.monotonic() - self.last_heard < FAREWELL_WITHIN:
                self._farewell(dealer)  # a clean stop, with a primary to tell
        except FollowerHalted as exc:
            self.state = State.FAILED
            self.error = str(exc)
            log.critical("STOPPED FOLLOWING %s: %s", self.primary, exc)
        except FollowerFatal as exc:
            self._fatal(str(exc), State.FAILED)
        except StoreFull as exc:  # e.g. noting the upstream's position in a full store
            self._fatal(str(exc), State.FAILED)
        except Exception as exc:
            log.exception("follower failed")
            self._fatal(f"follower failed: {exc!r}", State.FAILED)
        finally:
            self._dealer = None
            self._watch = None
            watch.close()
            sub.close()
            dealer.close()

    def _farewell(self, dealer: zmq.Socket) -> None:
        """On a clean stop: flush, and tell the primary what this store now holds, so that
        it keeps the journal from there for when this standby comes back (a lazy flush
        would otherwise leave it holding, or given up on, an older position)."""
        store = self.store
        if store is None or self.state not in (State.FOLLOWING, State.CATCHING_UP):
            return
        store.sync()
        self.synced = store.last_seq
        self._send(p.MsgType.ACK, (store.last_seq, self.synced))
        dealer.setsockopt(zmq.LINGER, 500)  # give the last word half a second to leave

    def _reconnect(self, sub: zmq.Socket, dealer: zmq.Socket) -> None:
        """Connect both sockets afresh (libzmq gave up after a refused handshake)."""
        self.stats["reconnects"] += 1
        log.info("connecting to the primary again (its last handshake was refused)")
        for sock, address in ((sub, self.primary), (dealer, self.control)):
            try:
                sock.disconnect(address)
            except zmq.ZMQError:
                pass  # libzmq already forgot the endpoint
            sock.connect(address)

    def _check_answer(self, now: float) -> None:
        """Say why the primary does not answer, once it has not for NO_ANSWER_AFTER seconds."""
        quiet_since = max(self.last_heard or self._since, self.awake_since)
        silent = now - quiet_since
        if silent < NO_ANSWER_AFTER:
            if self.problem is not None:
                log.info("the primary answers again")
                self.problem = None
                self._problem_logged = 0.0
            return
        why = self._watch.explain() if self._watch else "no socket"
        self.problem = f"no answer from the primary for {silent:.0f}s: {why}"
        if now - self._problem_logged >= NO_ANSWER_LOG_EVERY:
            self._problem_logged = now
            log.warning("THE PRIMARY DOES NOT ANSWER: nothing from %s (side channel %s) for %.0fs, "
                        "state %s: %s", self.primary, self.control, silent, self.state.value, why)

    def _pump(self, sub: zmq.Socket, dealer: zmq.Socket) -> int:
        """Handle what has arrived on both sockets, then step; returns how many messages."""
        handled = 0
        for _ in range(1000):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_stream(frames)
            handled += 1
        for _ in range(1000):
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_side(frames)
            handled += 1
        self._step()
        return handled

    def silence(self) -> float:
        """Seconds without a heartbeat that this follower observed while running: from the
        later of the last heartbeat and the last stall, to the start of its last pass over
        its sockets (which read everything that had arrived by then)."""
        if self.last_heartbeat is None or not self.last_pump:
            return 0.0
        return max(0.0, self.last_pump - max(self.last_heartbeat, self.awake_since))

    def _fatal(self, reason: str, state: State) -> None:
        self.state = state
        self.error = reason
        log.critical("STOPPED FOLLOWING %s: %s", self.primary, reason)
        self._on_fatal(reason)

    def _send(self, type_: p.MsgType, body: tuple, payload: list[bytes] | tuple = ()) -> None:
        cluster_id = self.store.cluster_id if self.store else (self.snapshot.cluster_id or p.NO_CLUSTER)
        frames = p.encode(type_, cluster_id, self.epoch, body, payload)
        if self._dealer is None:
            self.outbox.append(frames)
            return
        try:
            self._dealer.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            # No connection to hand it to (e.g. a refused handshake): the timers repeat it.
            self.stats["unsent_messages"] += 1
            log.debug("not sent (no connection to the primary): %s", type_.name)

    # --- message handling (the whole of it; tests call these two directly) ---------
    def handle_stream(self, frames: list[bytes]) -> None:
        """One message from the SUB socket, then whatever it makes possible."""
        self._on_stream(frames)
        self._step()

    def handle_side(self, frames: list[bytes]) -> None:
        """One message from the DEALER socket, then whatever it makes possible."""
        self._on_side(frames)
        self._step()

    def _cluster(self) -> bytes | None:
        if self.store is not None:
            return self.store.cluster_id
        return self.snapshot.cluster_id or None

    def _on_stream(self, frames: list[bytes]) -> None:
        try:
            msg = p.decode(frames, p.STREAM_TYPES)
            cluster = self._cluster()
            if cluster is None:
                return  # not welcomed yet: nothing to check against, and nothing needs it
            p.check_sender(msg, cluster, self.epoch)
        except p.BadMessage as exc:
            self.drops.drop(exc.kind, exc.detail)
            return
        self._learn_epoch(msg.epoch)
        if msg.type is p.MsgType.HEARTBEAT:
            hb = msg.body
            self.last_heartbeat = time.monotonic()
            self.heartbeat_time_ns = hb.time_ns
            self._heard(msg.epoch, hb.last_seq)
            self.primary_first = hb.first_seq
            self.ack_flags = hb.flags
        elif msg.type is p.MsgType.FLUSH:
            self.flush_wanted = max(self.flush_wanted, msg.body.seq)
        else:
            if msg.body.flags & p.RECORDS_FLUSH:
                self.flush_wanted = max(self.flush_wanted, msg.body.first_seq + msg.body.count - 1)
            self.stats["stream_records"] += len(msg.payload)
            self._heard(msg.epoch, msg.body.first_seq + msg.body.count - 1)
            self._receive(msg.body.first_seq, msg.payload)

    def _on_side(self, frames: list[bytes]) -> None:
        try:
            msg = p.decode(frames, p.TO_STANDBY)
            if msg.type is p.MsgType.REFUSE:
                # It carries the primary's cluster id, which is not ours: only the answer to
                # a hello counts, and only this node's primary can send one on this socket.
                reason = msg.payload[0].decode()
                if self.state is not State.CONNECTING:
                    raise p.BadMessage("unexpected", f"REFUSE outside a hello: {reason}")
                if msg.body.code == p.REFUSE_CLUSTER:
                    self._fatal(f"the primary refuses this store: {reason}", State.REFUSED)
                    return
                raise p.BadMessage("refused", reason)
            cluster = self._cluster()
            if cluster is None and msg.type is p.MsgType.WELCOME:
                cluster = msg.cluster_id  # a node without a store joins the primary's cluster
            if cluster is None:
                raise p.BadMessage("unexpected", f"{msg.type.name} before WELCOME")
            p.check_sender(msg, cluster, self.epoch)
            self._learn_epoch(msg.epoch)
            self._dispatch_side(msg)
        except p.BadMessage as exc:
            self.drops.drop(exc.kind, exc.detail)

    def _heard(self, epoch: int, last_seq: int) -> None:
        """A primary of `epoch` has records up to `last_seq`."""
        if epoch > self.seen_epoch:
            self.seen_epoch = epoch
            self.known_last = max(last_seq, self.store.last_seq if self.store else 0)
        else:
            self.known_last = max(self.known_last, last_seq)

    def _learn_epoch(self, epoch: int) -> None:
        if epoch > self.epoch:
            if self.epoch:
                log.info("primary is at epoch %d (this node knew %d)", epoch, self.epoch)
            self.epoch = epoch

    def _dispatch_side(self, msg: p.Message) -> None:
        t = msg.type
        if t is p.MsgType.WELCOME:
            self._welcome(msg)
        elif t is p.MsgType.RECORDS:
            if self._fetch is None or msg.body.first_seq != self._fetch[0]:
                raise p.BadMessage("unexpected", f"RECORDS from {msg.body.first_seq} not fetched")
            self._fetch = None
            self.stats["fetched_records"] += len(msg.payload)
            self._receive(msg.body.first_seq, msg.payload)
        elif t is p.MsgType.NOT_RETAINED:
            if self._fetch is None:
                raise p.BadMessage("unexpected", "NOT_RETAINED without a fetch")
            self._fetch = None
            self.primary_first = msg.body.first_seq
            log.info("primary retains records from seq %d only; this node needs %d: bootstrapping from "
                     "a snapshot", msg.body.first_seq, msg.body.start)
            self._begin_snapshot()
        elif t is p.MsgType.DAMAGED:
            if self._fetch is None:
                raise p.BadMessage("unexpected", "DAMAGED without a fetch")
            raise FollowerHalted(f"the primary's copy of journal record {msg.body.seq} is damaged (it fails "
                                "its checksum there), so this node cannot follow past it: scrub the primary "
                                "(mount.py scrub), or rebuild this node from a snapshot")
        elif t is p.MsgType.REPAIR_GET:
            body, payload = answer_request(self.store, msg.body, *msg.payload)
            self._send(p.MsgType.REPAIR_VALUE, (msg.body.req_id, *body), payload or [b"", b""])
        elif t is p.MsgType.REPAIR_VALUE:
            value, context = msg.payload
            self.repair.answered(msg.body.req_id, Answer(msg.body.last_seq, msg.body.status, value, context))
        elif t is p.MsgType.SNAP_INFO:
            self._snap_info(msg)
        elif t is p.MsgType.SNAP_WAIT:
            if self.state is not State.SNAPSHOT:
                raise p.BadMessage("unexpected", "SNAP_WAIT outside a snapshot")
            self.snapshot.opened_at = 0.0
            self.snapshot.retry_at = time.monotonic() + msg.body.retry_ms / 1000
        elif t is p.MsgType.SNAP_CHUNK:
            self._snap_chunk(msg)
        elif t is p.MsgType.SNAP_GONE:
            if self.state is not State.SNAPSHOT or msg.body.snap_id != self.snapshot.snap_id:
                raise p.BadMessage("unexpected", f"SNAP_GONE of {msg.body.snap_id}")
            log.warning("snapshot %d is gone from the primary; starting over", msg.body.snap_id)
            self.snapshot.discard()
            self._begin_snapshot()

    def _welcome(self, msg: p.Message) -> None:
        body = msg.body
        self._heard(msg.epoch, body.last_seq)
        self.primary_first = body.first_seq
        self.ack_flags = body.flags
        if self.state is not State.CONNECTING:
            return  # an answer to a repeated hello
        # The primary's word on its last seq replaces whatever this node remembered.
        self.seen_epoch = msg.epoch
        self.known_last = body.last_seq
        history = p.decode_history(msg.payload[0])
        log.info("welcomed by primary of cluster %s, epoch %d, at seq %d (retains from %d)",
                 msg.cluster_id.hex(), msg.epoch, body.last_seq, body.first_seq)
        if self.store is not None:
            point = divergence_point(self.store.epoch_history, self.store.last_seq, history, body.last_seq)
            if point is not None:
                self._diverged(point, msg.epoch, history)
                return
        if self.store is None:
            if self.snapshot.wanted() or body.first_seq > 1:
                self.snapshot.cluster_id = msg.cluster_id
                self._begin_snapshot()
                return
            self._set_store(Store.create(self.data, max_size=self.max_size, cluster_id=msg.cluster_id,
                                         init=False))
            log.info("created an empty store for cluster %s", msg.cluster_id.hex())
        self.state = State.CATCHING_UP

    def _diverged(self, point: int, primary_epoch: int, history: list[tuple[int, int]]) -> None:
        """This node holds records from `point` on that are not the primary's: export them,
        then rebuild from the primary's snapshot (never fetch on top of them)."""
        store = self.store
        assert store is not None
        there = (f"of epoch {epoch_at(history, point)} there" if point <= self.known_last
                 else "not there at all")
        log.warning("DIVERGED: records %d..%d here are not the primary's (seq %d is %s, of epoch %d here): "
                    "exporting them, then rebuilding this node from the primary's snapshot", point,
                    store.last_seq, point, there, epoch_at(store.epoch_history, point))
        try:
            found = export(store, point, primary=self.primary, primary_epoch=primary_epoch,
                           primary_history=history)
        except OSError as exc:
            raise FollowerFatal(f"cannot export the divergent records {point}..{store.last_seq} ({exc}); "
                                "not resynchronising without them") from exc
        self.divergence = self._resync = found
        self.stats["divergent_records"] += found.records
        self.snapshot.discard()  # a partial download of the old history must not be resumed
        self._begin_snapshot()

    def _set_store(self, store: Store) -> None:
        store.make_read_only(f"standby: following {self.primary}")
        if store.role != "standby":
            store.set_meta(META_ROLE, b"standby")
        if store.get_meta(META_FENCED) is not None:
            store.delete_meta(META_FENCED)  # a fence is about a reign as primary, which is over
        self.store = store
        self.synced = store.last_seq
        self.epoch = max(self.epoch, store.epoch)
        self._repair_from_primary(store)
        self._on_store(store)

    def _repair_from_primary(self, store: Store) -> None:
        repairer = self._repairers.setdefault(id(store), Repairer(store, self.repair, "the primary"))
        store.repairer = repairer

    # --- records ----------------------------------------------------------------------
    def _receive(self, first_seq: int, raws: list[bytes]) -> None:
        if raws:
            self.known_last = max(self.known_last, first_seq + len(raws) - 1)
        floor = self.store.last_seq if self.store else 0
        for i, raw in enumerate(raws):
            seq = first_seq + i
            if seq <= floor or seq in self.pending:
                continue
            if len(self.pending) >= PENDING_RECORDS or self._pending_bytes + len(raw) > PENDING_BYTES:
                self.drops.drop("pending_full", f"records from seq {seq} (a fetch will bring them)")
                break
            self.pending[seq] = raw
            self._pending_bytes += len(raw)

    def _apply_pending(self) -> None:
        store = self.store
        if store is None or self.state in (State.CONNECTING, State.SNAPSHOT):
            return
        for seq in [s for s in self.pending if s <= store.last_seq]:
            self._pending_bytes -= len(self.pending.pop(seq))
        while store.last_seq + 1 in self.pending:
            batch = []
            seq = store.last_seq + 1
            while seq in self.pending and len(batch) < APPLY_BATCH:
                raw = self.pending.pop(seq)
                self._pending_bytes -= len(raw)
                batch.append(raw)
                seq += 1
            before = store.last_seq
            try:
                store.apply_records(batch)
            except StaleEpoch as exc:
                self.drops.drop("stale_epoch", str(exc))
            except CorruptRecord as exc:
                bad = store.last_seq + 1
                self._corrupt[bad] = self._corrupt.get(bad, 0) + 1
                if self._corrupt[bad] >= CORRUPT_LIMIT:
                    raise FollowerHalted(f"record {bad} from the primary failed its checksum {CORRUPT_LIMIT} "
                                        f"times ({exc}): its copy is damaged; scrub the primary") from exc
                self.drops.drop("record", f"{exc} (fetched again)")
            except (WrongCluster, SequenceGap) as exc:
                self.drops.drop("record", str(exc))
            except DamagedValue as exc:
                # This store's own copy of something the record changes is damaged: a
                # repair from the primary needs this thread (it owns the socket), so the
                # records wait, and the repair runs beside it.
                self._repair_aside(store, exc)
                break
            except StoreFull as exc:
                raise FollowerFatal(str(exc) if str(exc).startswith("disk full")
                                    else f"this store is full: {exc}") from exc
            except StoreError as exc:
                raise FollowerFatal(f"the primary's journal does not apply here: {exc}") from exc
            self.stats["applied_records"] += store.last_seq - before
            if store.last_seq == before:
                break

    def _repair_aside(self, store: Store, damage: DamagedValue) -> None:
        if self._repairing is not None and self._repairing.is_alive():
            return
        self._repairing = threading.Thread(target=store.handle_damage, args=(damage,), name="repair",
                                           daemon=True)
        self._repairing.start()

    def _ask_for_repairs(self) -> None:
        for request in self.repair.outgoing():
            if self.state in (State.CONNECTING, State.SNAPSHOT) or self._dealer is None:
                self.repair.answered(request.req_id, None)
                continue
            self._send(p.MsgType.REPAIR_GET, *request.frames())

    def _step(self) -> None:
        """Everything that follows from the messages handled so far: apply, fetch, ack."""
        now = time.monotonic()
        self._ask_for_repairs()
        if self.state is State.CONNECTING and now - self._hello_at >= HELLO_RETRY:
            self._hello()
        if self.state is State.SNAPSHOT:
            self._snapshot_timers(now)
        self._apply_pending()
        self._maybe_fetch(now)
        self._ack(now)
        if self.state in (State.FOLLOWING, State.CATCHING_UP):
            self._remember_upstream(now)

    def _remember_upstream(self, now: float, force: bool = False) -> None:
        """Keep what was heard from the primary in meta (META_UPSTREAM), for promotion."""
        store = self.store
        if store is None:
            return
        value = {"primary": self.primary, "control": self.control, "epoch": max(self.seen_epoch, self.epoch),
                 "last_seq": self.known_last, "ack_flags": self.ack_flags}
        if value == self._upstream_saved or (not force and now - self._upstream_at < UPSTREAM_EVERY):
            return
        try:
            store.set_meta(META_UPSTREAM, json.dumps(value).encode())
        except StoreError as exc:
            log.warning("could not record what the primary announced: %s", exc)
            return
        self._upstream_saved = value
        self._upstream_at = now

    def _hello(self) -> None:
        self._hello_at = time.monotonic()
        self._send(p.MsgType.HELLO, (self.store.last_seq if self.store else 0,), [self.name.encode()])

    def _maybe_fetch(self, now: float) -> None:
        store = self.store
        if store is None or self.state not in (State.CATCHING_UP, State.FOLLOWING):
            return
        want = store.last_seq + 1
        if self.pending:
            target = min(self.pending)
        elif self.known_last >= want:
            target = self.known_last + 1
        else:
            target = 0
        if not target:
            if self.state is not State.FOLLOWING:
                log.info("caught up at seq %d; following the stream", store.last_seq)
            self.state = State.FOLLOWING
            self.behind_since = None
            return
        if self.behind_since is None:
            self.behind_since = now
        if self._fetch is not None and now - self._fetch[2] < FETCH_TIMEOUT:
            return
        if self._fetch is None and self.pending and self.state is State.FOLLOWING:
            self.stats["gaps"] += 1
        stop = min(target, want + p.MAX_BATCH_RECORDS)
        self._fetch = (want, stop, now)
        self.stats["fetches"] += 1
        log.debug("fetching [%d, %d)", want, stop)
        self._send(p.MsgType.FETCH, (want, stop))

    def _ack(self, now: float) -> None:
        store = self.store
        if store is None or self.state in (State.CONNECTING, State.SNAPSHOT):
            return
        received = store.last_seq
        if received > self.synced:
            if self.synced < self.flush_wanted <= received:
                store.sync()  # a durable fsync on the primary waits for exactly this
                self.synced = received
                self._last_sync = now
            elif now - self._last_sync >= LAZY_SYNC and not self._lazy_sync_running:
                # Nobody waits on it: flush off the apply path, which a disk flush
                # would otherwise stall for as long as the disk takes (lag spikes).
                self._last_sync = now
                self._lazy_sync_running = True
                threading.Thread(target=self._lazy_sync, args=(store, received), name="lazy-sync",
                                 daemon=True).start()
        # Ack at once what the primary's fsyncs wait for; the rest rides on the keepalive,
        # so an async primary is not interrupted for every batch it published.
        if self.ack_flags & p.ACK_DURABLE:
            urgent = self.synced != self._sent_ack[1]
        elif self.ack_flags & p.ACK_RECEIVED:
            urgent = received != self._sent_ack[0]
        else:
            urgent = False
        if urgent or now - self._ack_at >= ACK_INTERVAL:
            self._send(p.MsgType.ACK, (received, self.synced))
            self._sent_ack = (received, self.synced)
            self._ack_at = now

    def _lazy_sync(self, store: Store, seq: int) -> None:
        try:
            store.sync()
            if store is self.store:  # not replaced by a snapshot meanwhile
                self.synced = max(self.synced, seq)
        except Exception:
            log.exception("background sync of the store failed")
        finally:
            self._lazy_sync_running = False

    # --- snapshots --------------------------------------------------------------------
    def _begin_snapshot(self) -> None:
        if self.state is not State.SNAPSHOT:
            self.stats["snapshots"] += 1
        self.state = State.SNAPSHOT
        self._fetch = None
        self.snapshot.snap_id = 0
        self.snapshot.inflight.clear()
        self._snap_open()

    def _snap_open(self) -> None:
        self.snapshot.opened_at = time.monotonic()
        self.snapshot.retry_at = 0.0
        self._send(p.MsgType.SNAP_OPEN, (self.snapshot.wanted(),))

    def _snapshot_timers(self, now: float) -> None:
        snap = self.snapshot
        if snap.snap_id == 0:
            if snap.retry_at and now >= snap.retry_at:
                self._snap_open()
            elif snap.opened_at and now - snap.opened_at >= SNAPSHOT_TIMEOUT:
                self._snap_open()
            return
        for offset, length in snap.overdue():
            self._send(p.MsgType.SNAP_GET, (snap.snap_id, offset, length))

    def _snap_info(self, msg: p.Message) -> None:
        if self.state is not State.SNAPSHOT or self.snapshot.snap_id:
            raise p.BadMessage("unexpected", "SNAP_INFO not asked for")
        snap_id, size, chunk = msg.body
        if self.store is not None and snap_id <= self.store.last_seq and self._resync is None:
            log.info("snapshot %d is not ahead of this store (seq %d); fetching instead", snap_id,
                     self.store.last_seq)
            self.state = State.CATCHING_UP
            return
        resumed_before = self.snapshot.wanted() == snap_id
        self.snapshot.begin(snap_id, size, chunk, msg.cluster_id)
        if resumed_before and self.snapshot.resumed_from:
            self.stats["snapshot_resumes"] += 1
        self._request_chunks()

    def _request_chunks(self) -> None:
        for offset, length in self.snapshot.requests():
            self._send(p.MsgType.SNAP_GET, (self.snapshot.snap_id, offset, length))

    def _snap_chunk(self, msg: p.Message) -> None:
        snap = self.snapshot
        if self.state is not State.SNAPSHOT or msg.body.snap_id != snap.snap_id:
            raise p.BadMessage("unexpected", f"chunk of snapshot {msg.body.snap_id}")
        if not snap.accept(msg.body.offset, msg.payload[0]):
            self._request_chunks()
            return
        elapsed = time.monotonic() - snap.started_at
        moved = snap.size - snap.resumed_from
        log.info("snapshot %d received: %d bytes in %.2fs (%.0f MB/s)", snap.snap_id, moved, elapsed,
                 moved / max(elapsed, 1e-6) / 1e6)
        self._install_snapshot()

    def _install_snapshot(self) -> None:
        snap = self.snapshot
        snap.close()
        try:
            cluster_id, seq, _epoch = inspect_environment(snap.directory)
            if cluster_id != snap.cluster_id or seq != snap.snap_id:
                raise StoreError(f"snapshot {snap.snap_id} holds cluster {cluster_id.hex()} seq {seq}")
        except StoreError as exc:
            log.error("snapshot is unusable, starting over: %s", exc)
            self.drops.drop("snapshot", str(exc))
            snap.discard()
            self._begin_snapshot()
            return
        if self.store is None:
            if is_store(self.data):
                raise FollowerFatal(f"{self.data} gained a store while bootstrapping")
            self._set_store(Store.from_checkpoint(self.data, snap.directory, max_size=self.max_size))
        else:
            resync = self._resync
            self.store.replace_with(snap.directory, keep_old=resync.state_dir if resync else None)
            self.synced = self.store.last_seq
            self.epoch = max(self.epoch, self.store.epoch)
            if self.store.role != "standby":
                self.store.set_meta(META_ROLE, b"standby")
            if resync is not None:
                self._resync = None
                self._drop_checkpoints_from(resync.from_seq)
                log.warning("rebuilt from the primary's snapshot at seq %d; the state before it is kept in "
                            "%s", self.store.last_seq, resync.state_dir)
            self._upstream_saved = None
            self._remember_upstream(time.monotonic(), force=True)
        snap.discard()
        log.info("bootstrapped from snapshot at seq %d", self.store.last_seq)
        self.state = State.CATCHING_UP

    def _drop_checkpoints_from(self, seq: int) -> None:
        """Delete this node's checkpoints of seq >= `seq`: they hold the divergent history
        (kept whole in the export's state/), and must never be served as the cluster's."""
        assert self.store is not None
        for checkpoint in Checkpoints(self.store).list():
            if checkpoint.seq >= seq:
                shutil.rmtree(checkpoint.path, ignore_errors=True)
                log.info("removed checkpoint %s of the divergent history", checkpoint.path)

    # --- status -----------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        now = time.monotonic()
        watch = self._watch
        applied = self.store.last_seq if self.store else 0
        lag = max(0, self.known_last - applied)
        return {
            "primary": self.primary,
            "side_channel": self.control,
            "name": self.name,
            "state": self.state.value,
            "error": self.error,
            "applied_seq": applied,
            "durable_seq": self.synced,
            "primary_last_seq": self.known_last,
            "primary_epoch": self.seen_epoch,
            "primary_first_seq": self.primary_first,
            "lag_records": lag,
            "lag_seconds": round(now - self.behind_since, 3) if lag and self.behind_since else 0.0,
            "heartbeat_age_seconds": round(now - self.last_heartbeat, 3) if self.last_heartbeat else None,
            "observed_silence_seconds": round(self.silence(), 3),
            "pending_records": len(self.pending),
            "snapshot": self.snapshot.progress() if self.state is State.SNAPSHOT else None,
            "durable_acks_wanted": bool(self.ack_flags & p.ACK_DURABLE),
            "divergence": self.divergence.as_dict() if self.divergence else None,
            **self.stats,
            "dropped": self.drops.snapshot(),
            "problem": self.problem,
            "link": watch.status() if watch else None,
            "security": self.curve.describe() if self.curve else {"mechanism": "none"},
        }
