"""The primary's side of replication: the record stream, the side channel, and durability.

Two threads, one socket each:
- the publisher drains the records the store's commit listener enqueued and PUBlishes
  them in batches, with a heartbeat a few times a second. PUB drops silently at its
  high-water mark, so the stream is only the fast path; standbys repair gaps below.
- the side channel (ROUTER) answers standbys: HELLO, FETCH of a range, snapshot transfer
  in chunks on credit, and ACKs of the seqs a standby has received and made durable.

The commit listener runs inside the store's write lock, so it only appends to a queue.

Durability (DRBD's protocols A/B/C): `async` returns from fsync after the local sync;
`received` waits until some standby has the records; `durable` until some standby has
synced them. If no standby answers within the sync timeout, fsync either keeps waiting
(`block`) or the primary degrades to async (`degrade`) until a standby has caught up
again; both are logged loudly and shown in status.

With CURVE keys (replica/security.py) both sockets are CURVE servers, and a ZAP handler
on this context admits only the cluster key (or the public keys in the peers directory): a
node that is not admitted gets nothing, not even the stream.

Which standbys the primary tracks, and for which it holds the journal back (and records
them in the store, META_STANDBYS, across restarts): only members of the cluster. With
CURVE, the handshake has proven that much of every message that arrives; without it, a
message carrying this cluster's id is the only proof there is. So a HELLO without a
cluster id (a node with no store yet) is answered, so that it can bootstrap, but
registers nothing; the node is tracked once it opens a snapshot (the journal is then
held from the snapshot's seq) or acknowledges records. A HELLO from another cluster or a
newer epoch registers nothing either. At most MAX_STANDBYS are tracked and held for; a
further one is refused (REFUSE_FULL, a rate-limited warning) until the operator forgets
one (`mount.py forget`) or one falls behind the retention bound.

A primary that learns of a higher epoch is fenced (replica/fencing.py): it refuses
writes from then on, and fsyncs still waiting for a standby fail with EIO, since what
they waited for will never be acknowledged by the cluster's new history.

Only fsync, fdatasync and fsyncdir wait. close() after write does not: like a local
filesystem, close promises nothing about durability, and a program that needs the data
safe calls fsync. Making close wait would charge every small-file write a network round
trip without giving programs a guarantee they could rely on elsewhere.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import logging
import os
import queue
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import lmdb
import zmq

from journal.checkpoints import Checkpoint, Checkpoints
from journal.errors import FsError, StoreError
from journal.integrity import DamagedValue
from journal.schema import META_STANDBYS
from journal.store import Store

from . import protocol as p
from .common import (
    ENV_PUB_SNDHWM,
    ENV_SNAPSHOT_CHUNK,
    HEARTBEAT_INTERVAL,
    PEER_TIMEOUT,
    DropCounter,
    Started,
    env_int,
    make_socket,
)
from .fencing import Fencing, PeerWatch
from .repair import Answer, RepairChannel, Repairer, answer_request
from .security import Admission, Curve, start_authenticator

log = logging.getLogger(__name__)

#: How long the publisher lets commits gather before it sends them (seconds), unless an
#: fsync waits on them: one message and one standby transaction for many small commits,
#: instead of a wake-up, a send and an apply for each.
PUBLISH_GATHER = 0.002
#: A checkpoint further behind the last seq than this is too old to bootstrap from.
SNAPSHOT_MAX_BEHIND = 50_000
DEFAULT_CHUNK = 1 << 20
#: Records fetched per FETCH answer, at most (and MAX_BATCH_BYTES of them).
FETCH_RECORDS = 2048
FETCH_BYTES = 4 << 20


#: Standbys tracked (and journal holds recorded) at most: enough for any real cluster, and
#: a bound on what messages from nodes that are not standbys can make the primary keep.
MAX_STANDBYS = 16

#: What the side channel accepts: a standby's messages, and other primaries' PEERs.
ROUTER_TYPES = p.TO_PRIMARY | p.PEER_TYPES


class ReplicationAborted(FsError):
    """An fsync that was waiting for a standby gives up because the node is stopping:
    the data is committed locally but not acknowledged as replicated (EIO)."""

    errno = errno.EIO


class FencedWhileWaiting(FsError):
    """An fsync that was waiting for a standby gives up because this primary was fenced:
    another node has taken over, and will never acknowledge it (EIO)."""

    errno = errno.EIO


class Durability(str, Enum):
    ASYNC = "async"
    RECEIVED = "received"
    DURABLE = "durable"


class OnStandbyLoss(str, Enum):
    BLOCK = "block"
    DEGRADE = "degrade"


@dataclass
class Peer:
    """A standby the primary has heard from."""

    identity: bytes
    name: str
    received: int = 0
    durable: int = 0
    epoch: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    fetches: int = 0
    fetched_records: int = 0
    snapshot_bytes: int = 0

    def connected(self, now: float) -> bool:
        return now - self.last_seen < PEER_TIMEOUT


def _name_of(identity: bytes) -> str:
    """A standby's routing id is its name, '#', and a per-process suffix."""
    return identity.split(b"#", 1)[0].decode(errors="replace") or identity.hex()


def _load_known_standbys(store: Store) -> dict[str, int]:
    """The standbys a primary of this store's epoch recorded (persist_known); {} if another
    epoch's (this node has followed or been promoted since) or unreadable."""
    raw = store.get_meta(META_STANDBYS)
    if not raw:
        return {}
    try:
        saved = json.loads(raw)
        if saved["epoch"] != store.epoch:
            return {}
        known = {str(name): int(seq) for name, seq in saved["standbys"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("ignoring an unreadable list of known standbys in the store")
        return {}
    if len(known) > MAX_STANDBYS:
        kept = dict(sorted(known.items(), key=lambda item: (-item[1], item[0]))[:MAX_STANDBYS])
        log.warning("the store lists %d known standbys, more than the %d tracked: keeping the journal "
                    "only for the %d most advanced", len(known), MAX_STANDBYS, MAX_STANDBYS)
        known = kept
    if known:
        log.info("holding the journal for standbys known before the restart: %s",
                 ", ".join(f"{name} (seq {seq})" for name, seq in sorted(known.items())))
    return known


class PrimaryReplication:
    """Serves the stream and the side channel of one primary store."""

    def __init__(self, store: Store, checkpoints: Checkpoints, listen: str, control: str,
                 durability: Durability = Durability.ASYNC, sync_timeout: float = 5.0,
                 on_standby_loss: OnStandbyLoss = OnStandbyLoss.BLOCK,
                 request_checkpoint: Callable[[], object] | None = None,
                 stopping: Callable[[], bool] | None = None, peers: Sequence[str] = (),
                 name: str = "primary", taking_over: bool = False, curve: Curve | None = None,
                 peer_server_keys: dict[str, bytes] | None = None) -> None:
        """`taking_over`: this node is about to begin a new epoch (promotion), which supersedes
        any fence recorded on its store, so that fence is not applied. `curve`: serve with
        CurveZMQ; `peer_server_keys`: the public keys of the side channels in `peers` that
        are known (the primary a promoted node followed), for its PEER probes."""
        self.store = store
        self.checkpoints = checkpoints
        self.listen = listen
        self.control = control
        self.durability = durability
        self.sync_timeout = sync_timeout
        self.on_standby_loss = on_standby_loss
        self._request_checkpoint = request_checkpoint or (lambda: None)
        #: Polled by a blocked fsync: is the node being stopped (e.g. SIGTERM to the mount)?
        self._stopping = stopping or (lambda: False)
        self.drops = DropCounter(log, "side-channel")
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        #: Set by a waiting fsync: publish now, do not let commits gather.
        self._publish_now = threading.Event()
        #: The newest seq a durable fsync waits for, and the newest FLUSH sent.
        self._flush_seq = 0
        self._flush_sent = 0
        self._queue: queue.SimpleQueue[list[tuple[int, bytes]] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        # Shared between the side channel (writer) and fsync waiters / status (readers).
        self._cond = threading.Condition()
        self._peers: dict[bytes, Peer] = {}
        #: name -> the newest seq each standby holds (durably, once it acks), for retention;
        #: kept in the store's meta, so that a restart does not forget a standby that is away.
        self._names: dict[str, int] = {} if taking_over else _load_known_standbys(store)
        self._persisted = dict(self._names)
        self.degraded = False
        self.degraded_since: float | None = None
        self.waiting = 0
        self.blocked_since: float | None = None
        self.fsync_waits = 0
        self.fsync_timeouts = 0
        self.name = name[:p.MAX_NAME]
        self.curve = curve
        self.admission: Admission | None = None
        #: Tells this process's own PEERs apart from another primary's (a peer address that
        #: turns out to be this node's own side channel).
        self.instance = uuid.uuid4().hex[:8].encode()
        self.fencing = Fencing(store, on_fenced=self._wake, check_disk=not taking_over)
        self.peer_watch = PeerWatch(store, self.fencing, list(peers),
                                    b"peer:" + self.name.encode() + b"#" + self.instance,
                                    self.name, curve=curve,
                                    server_keys=peer_server_keys) if peers else None
        # Publisher state (published seq and when, for lag in seconds).
        self.published_seq = store.last_seq
        self._published_times: deque[tuple[int, float]] = deque(maxlen=100_000)
        self.stream_messages = 0
        self._snap_files: dict[int, tuple[int, int, float]] = {}  # snap_id -> (fd, size, last use)
        self._chunk = env_int(ENV_SNAPSHOT_CHUNK, DEFAULT_CHUNK)
        #: Values this store asks its standbys for, to repair its own (replica/repair.py).
        self.repair = RepairChannel()
        self._repairer = Repairer(store, self.repair, "a standby")

    # --- life cycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.curve is not None:
            # Before anything binds: a CURVE server without a ZAP handler admits any client.
            try:
                self.admission = start_authenticator(self._ctx, self.curve)
            except BaseException:
                self.stop()
                raise
        self.store.listeners.append(self._on_commit)
        for target, name in ((self._publish_loop, "publisher"), (self._side_loop, "side-channel")):
            started = Started()
            thread = threading.Thread(target=target, args=(started,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
            try:
                started.wait()
            except BaseException:
                self.stop()
                raise
        if self.peer_watch is not None:
            try:
                self.peer_watch.start()
            except BaseException:
                self.stop()
                raise
        self.store.repairer = self._repairer
        log.info("replicating: stream on %s, side channel on %s, durability %s (timeout %.1fs, on "
                 "standby loss: %s)", self.listen, self.control, self.durability.value,
                 self.sync_timeout, self.on_standby_loss.value)
        if self.curve is not None:
            log.info("replication traffic uses CURVE: this node's public key is %s, admitting %s",
                     self.curve.public.decode(),
                     f"the holders of the cluster secret {self.curve.secret_file}"
                     if self.curve.secret_file else f"the keys in {self.curve.peers_dir}")
        else:
            log.info("replication traffic is NOT authenticated or encrypted (no CURVE keys)")

    @property
    def fenced_by(self) -> int | None:
        return self.fencing.fenced_by

    def _wake(self) -> None:
        """Fenced: fsyncs waiting for a standby must look again (and fail)."""
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        if self.store.repairer is self._repairer:
            self.store.repairer = None
        self._stop.set()
        self._queue.put(None)
        self._publish_now.set()
        with self._cond:
            self._cond.notify_all()
        if self.peer_watch is not None:
            self.peer_watch.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._on_commit in self.store.listeners:
            self.store.listeners.remove(self._on_commit)
        self.persist_known()  # the newest positions, for the next start
        for fd, _size, _used in self._snap_files.values():
            os.close(fd)
        self._snap_files.clear()
        if self.admission is not None:
            self.admission.stop()  # its ZAP socket lives in this context
            self.admission = None
        self._ctx.term()

    def _on_commit(self, committed: list[tuple[int, bytes]]) -> None:
        """Store listener, called inside the write lock: enqueue, nothing else."""
        self._queue.put(committed)

    # --- the stream -------------------------------------------------------------------
    def _publish_loop(self, started: Started) -> None:
        try:
            pub = make_socket(self._ctx, zmq.PUB, self.curve)
        except Exception as exc:  # reported to whoever started the thread
            started.fail(exc)
            return
        try:
            hwm = env_int(ENV_PUB_SNDHWM, 0)
            if hwm:
                pub.setsockopt(zmq.SNDHWM, hwm)
                pub.setsockopt(zmq.SNDBUF, 4096)
                log.warning("stream high-water mark forced to %d messages (test setting)", hwm)
            pub.bind(self.listen)
        except zmq.ZMQError as exc:
            pub.close()
            started.fail(exc)
            return
        started.ok()
        next_beat = 0.0
        try:
            while not self._stop.is_set():
                timeout = max(0.0, next_beat - time.monotonic())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = []
                if item is None:
                    break
                if item and not self._publish_now.is_set():
                    self._publish_now.wait(PUBLISH_GATHER)
                self._publish_now.clear()
                pending = list(item)
                while len(pending) < p.MAX_BATCH_RECORDS:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._stop.set()
                        break
                    pending.extend(more)
                flush = self._flush_seq
                if flush > self._flush_sent and (not pending or flush < pending[0][0]):
                    # Its records went out before the fsync came: ask on its own.
                    self._flush_sent = flush
                    pub.send_multipart(p.encode(p.MsgType.FLUSH, self.store.cluster_id, self.store.epoch,
                                                (flush,)))
                if pending:
                    self._publish(pub, pending)
                if time.monotonic() >= next_beat:
                    self._heartbeat(pub)
                    next_beat = time.monotonic() + HEARTBEAT_INTERVAL
        finally:
            pub.close()

    def _publish(self, pub: zmq.Socket, records: list[tuple[int, bytes]]) -> None:
        epoch = self.store.epoch
        start = 0
        while start < len(records):
            end, size = start, 0
            while (end < len(records) and end - start < p.MAX_BATCH_RECORDS
                   and (size == 0 or size + len(records[end][1]) <= p.MAX_BATCH_BYTES // 2)):
                size += len(records[end][1])
                end += 1
            batch = records[start:end]
            first_seq = batch[0][0]
            # A batch must be dense; a hole (never expected) splits it.
            for i, (seq, _raw) in enumerate(batch):
                if seq != first_seq + i:
                    end = start + i
                    batch = records[start:end]
                    break
            flags = 0
            flush = self._flush_seq
            if self._flush_sent < flush <= batch[-1][0]:
                flags = p.RECORDS_FLUSH  # the common case: the fsync's own records, still here
                self._flush_sent = flush
            frames = p.encode(p.MsgType.RECORDS, self.store.cluster_id, epoch, (first_seq, len(batch), flags),
                              [raw for _seq, raw in batch])
            pub.send_multipart(frames, copy=size < 65536)
            self.stream_messages += 1
            self.published_seq = batch[-1][0]
            self._published_times.append((self.published_seq, time.monotonic()))
            start = end

    def _heartbeat(self, pub: zmq.Socket) -> None:
        body = (self.published_seq, time.time_ns(), self.store.first_seq(), self._ack_flags())
        pub.send_multipart(p.encode(p.MsgType.HEARTBEAT, self.store.cluster_id, self.store.epoch, body))

    def _ack_flags(self) -> int:
        if self.durability is Durability.DURABLE:
            return p.ACK_DURABLE
        if self.durability is Durability.RECEIVED:
            return p.ACK_RECEIVED
        return 0

    # --- the side channel -------------------------------------------------------------
    def _side_loop(self, started: Started) -> None:
        try:
            router = make_socket(self._ctx, zmq.ROUTER, self.curve)
        except Exception as exc:  # reported to whoever started the thread
            started.fail(exc)
            return
        try:
            router.bind(self.control)
        except zmq.ZMQError as exc:
            router.close()
            started.fail(exc)
            return
        started.ok()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._ask_for_repairs(router)
                if not poller.poll(50):
                    self._expire_snapshot_files()
                    continue
                for _ in range(256):
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(frames, router.send_multipart)
        finally:
            router.close()

    def handle(self, frames: list[bytes], send: Callable[[list[bytes]], None]) -> None:
        """Handle one message from the ROUTER (identity frame first); never raises."""
        if len(frames) < 2:
            self.drops.drop("truncated", "no frames after the identity")
            return
        identity, rest = frames[0], frames[1:]

        def reply(type_: p.MsgType, body: tuple, payload: list[bytes] | tuple = ()) -> None:
            send([identity, *p.encode(type_, self.store.cluster_id, self.store.epoch, body, payload)])

        try:
            msg = p.decode(rest, ROUTER_TYPES)
            if msg.type is p.MsgType.HELLO and msg.cluster_id not in (self.store.cluster_id, p.NO_CLUSTER):
                reply(p.MsgType.REFUSE, (p.REFUSE_CLUSTER,),
                      [f"this primary serves cluster {self.store.cluster_id.hex()}; your store is of "
                       f"cluster {msg.cluster_id.hex()}".encode()])
                raise p.BadMessage("cluster", f"HELLO from cluster {msg.cluster_id.hex()}")
            p.check_sender(msg, self.store.cluster_id, self.store.epoch)
            if msg.type is p.MsgType.PEER:
                self._peer(identity, msg, reply)
                return
            if msg.epoch > self.store.epoch and msg.cluster_id == self.store.cluster_id:
                # (A node without a store says HELLO without a cluster: it knows no epoch of ours.)
                self.fencing.superseded(msg.epoch, f"standby {_name_of(identity)}")
            self._dispatch(identity, msg, reply)
        except p.BadMessage as exc:
            self.drops.drop(exc.kind, f"from {identity[:80]!r}: {exc.detail}")
        except Exception:  # a bug must not take the primary down; it is counted and logged
            log.exception("side channel failed on a message from %r", identity[:80])
            self.drops.drop("error", "handler failed")

    def _ask_for_repairs(self, router: zmq.Socket) -> None:
        """Send the repair requests of this store's readers to the most advanced standby."""
        requests = self.repair.outgoing()
        if not requests:
            return
        with self._cond:
            alive = [peer for peer in self._peers.values() if peer.connected(time.monotonic())]
        if not alive:
            for request in requests:
                self.repair.answered(request.req_id, None)
            return
        target = max(alive, key=lambda peer: peer.received).identity
        for request in requests:
            body, payload = request.frames()
            router.send_multipart([target, *p.encode(p.MsgType.REPAIR_GET, self.store.cluster_id,
                                                     self.store.epoch, body, payload)])

    def _peer(self, identity: bytes, msg: p.Message, reply: Callable) -> None:
        """Another primary's PEER: judge the epochs, and answer so that it can judge too."""
        if identity.endswith(b"#" + self.instance):
            return  # this node's own PEER, sent to an address that turned out to be its own
        if msg.epoch < self.store.epoch:
            self.drops.drop("stale_epoch", f"PEER of epoch {msg.epoch} < {self.store.epoch} from "
                            f"{identity[:80]!r} (answered: it learns of this epoch)")
        self.fencing.peer(msg.payload[0].decode(), msg.epoch, msg.body)
        if not msg.body.flags & p.PEER_REPLY:
            store = self.store
            first = store.epoch_history[-1][1] if store.epoch_history else 1
            flags = p.PEER_REPLY | (p.PEER_FENCED if self.fencing.fenced else 0)
            reply(p.MsgType.PEER, (max(store.last_seq, first), first, flags), [self.name.encode()])

    def _dispatch(self, identity: bytes, msg: p.Message, reply: Callable) -> None:
        t = msg.type
        if t is p.MsgType.HELLO:
            name = msg.payload[0].decode()
            applied = msg.body.applied_seq
            member = msg.cluster_id == self.store.cluster_id and msg.epoch <= self.store.epoch
            if applied > self.store.last_seq and member:
                log.warning("standby %s says it applied seq %d, beyond this primary's %d", name, applied,
                            self.store.last_seq)
            if member and not self._register(identity, name, applied, msg.epoch):
                self.drops.drop("standbys_full", f"HELLO from standby {name!r}: this primary tracks "
                                f"{MAX_STANDBYS} standbys already (mount.py forget one that is gone)")
                reply(p.MsgType.REFUSE, (p.REFUSE_FULL,),
                      [f"the primary tracks {MAX_STANDBYS} standbys already".encode()])
                return
            log.log(logging.INFO if member else logging.DEBUG,
                    "standby %s said hello at seq %d, epoch %d (primary at %d, epoch %d)%s", name, applied,
                    msg.epoch, self.store.last_seq, self.store.epoch,
                    "" if member else ": not tracked until it has a store of this cluster")
            history = self.store.epoch_history or [(self.store.epoch, 1)]
            reply(p.MsgType.WELCOME, (self.store.last_seq, self.store.first_seq(), self._ack_flags()),
                  [p.encode_history(history)])
            return
        peer = self._touch(identity, msg.epoch)
        if t is p.MsgType.ACK:
            self._ack(peer, msg.body.received, msg.body.durable)
        elif t is p.MsgType.REPAIR_GET:
            body, payload = answer_request(self.store, msg.body, *msg.payload)
            reply(p.MsgType.REPAIR_VALUE, (msg.body.req_id, *body), payload or [b"", b""])
        elif t is p.MsgType.REPAIR_VALUE:
            value, context = msg.payload
            self.repair.answered(msg.body.req_id, Answer(msg.body.last_seq, msg.body.status, value, context))
        elif t is p.MsgType.FETCH:
            self._fetch(peer, msg.body.start, msg.body.stop, reply)
        elif t is p.MsgType.SNAP_OPEN:
            self._snap_open(peer, msg.body.snap_id, reply)
        elif t is p.MsgType.SNAP_GET:
            self._snap_get(peer, msg.body, reply)

    def _register(self, identity: bytes, name: str, applied: int, epoch: int) -> bool:
        """Track a member's HELLO (and hold the journal from where it is); False if
        MAX_STANDBYS others are tracked already."""
        with self._cond:
            for other, peer in list(self._peers.items()):
                if peer.name == name and other != identity:
                    del self._peers[other]  # the same standby, restarted
            if name not in self._names and len(self._names) >= MAX_STANDBYS:
                return False
            peer = self._session(identity, name)
            if peer is None:
                return False
            peer.name, peer.received, peer.epoch = name, min(applied, self.store.last_seq), epoch
            peer.durable = min(peer.durable, peer.received)
            peer.last_seen = time.monotonic()
            self._names[name] = peer.received
            self._cond.notify_all()
            return True

    def _session(self, identity: bytes, name: str) -> Peer | None:
        """The session of `identity`, made if there is room (standbys not heard from for
        PEER_TIMEOUT make room); called with self._cond held."""
        peer = self._peers.get(identity)
        if peer is not None:
            return peer
        if len(self._peers) >= MAX_STANDBYS:
            now = time.monotonic()
            for other, old in list(self._peers.items()):
                if not old.connected(now):
                    del self._peers[other]
            if len(self._peers) >= MAX_STANDBYS:
                return None
        peer = Peer(identity, name)
        self._peers[identity] = peer
        return peer

    def _hold(self, peer: Peer, seq: int) -> None:
        """Hold the journal after `seq` for this standby, if it is of this epoch (or an
        older one) and there is room; called with self._cond held."""
        if peer.epoch > self.store.epoch:
            return
        if peer.name not in self._names and len(self._names) >= MAX_STANDBYS:
            self.drops.drop("standbys_full", f"not holding the journal for standby {peer.name!r}: "
                            f"{MAX_STANDBYS} standbys are tracked already")
            return
        self._names[peer.name] = seq

    def _touch(self, identity: bytes, epoch: int) -> Peer:
        with self._cond:
            peer = self._session(identity, _name_of(identity))
            if peer is None:
                raise p.BadMessage("standbys_full", f"{MAX_STANDBYS} standbys are tracked already")
            peer.last_seen = time.monotonic()
            peer.epoch = epoch
            return peer

    def _ack(self, peer: Peer, received: int, durable: int) -> None:
        last = self.store.last_seq
        if received > last:
            raise p.BadMessage("bogus", f"ACK of seq {received} beyond the last seq {last}")
        with self._cond:
            peer.received, peer.durable = received, durable
            # Retention counts what the standby has on disk: after a crash of its machine,
            # records it had only received may be gone and must still be fetchable.
            self._hold(peer, durable)
            if self.degraded and self._acked(peer) >= self.published_seq:
                self.degraded = False
                self.degraded_since = None
                log.warning("REPLICATION RESTORED: standby %s has caught up (seq %d); durability %s "
                            "again", peer.name, received, self.durability.value)
            self._cond.notify_all()

    def _fetch(self, peer: Peer, start: int, stop: int, reply: Callable) -> None:
        first = self.store.first_seq()
        if start < first:
            reply(p.MsgType.NOT_RETAINED, (start, first))
            return
        raws: list[bytes] = []
        size = 0
        try:
            with contextlib.closing(self.store.records(start, min(stop, start + FETCH_RECORDS))) as rows:
                for _seq, raw in rows:
                    raws.append(bytes(raw))
                    size += len(raw)
                    if size >= FETCH_BYTES:
                        break
        except DamagedValue as exc:
            # Served up to the damaged record; that one never. The repair asks the standbys,
            # so it runs in a thread of its own: this thread owns the socket it needs.
            threading.Thread(target=self.store.handle_damage, args=(exc,), name="repair", daemon=True).start()
            if not raws:
                reply(p.MsgType.DAMAGED, (start + len(raws),))
                return
        peer.fetches += 1
        peer.fetched_records += len(raws)
        reply(p.MsgType.RECORDS, (start, len(raws), 0), raws)

    def _snap_open(self, peer: Peer, wanted: int, reply: Callable) -> None:
        found = self.checkpoints.find(wanted) if wanted else None
        if found is None:
            found = self.checkpoints.newest()
            if found is None or self.store.last_seq - found.seq > SNAPSHOT_MAX_BEHIND \
                    or found.seq + 1 < self.store.first_seq():
                self._request_checkpoint()
                reply(p.MsgType.SNAP_WAIT, (250,))
                return
        with self._cond:
            self._hold(peer, found.seq)  # what it needs once the snapshot is in place
        reply(p.MsgType.SNAP_INFO, (found.seq, found.size(), self._chunk))

    def _snap_get(self, peer: Peer, body: p.SnapGet, reply: Callable) -> None:
        entry = self._snap_files.get(body.snap_id)
        if entry is None:
            checkpoint: Checkpoint | None = self.checkpoints.find(body.snap_id)
            if checkpoint is None:
                reply(p.MsgType.SNAP_GONE, (body.snap_id,))
                return
            try:
                fd = os.open(checkpoint.data_file, os.O_RDONLY)
            except FileNotFoundError:
                reply(p.MsgType.SNAP_GONE, (body.snap_id,))
                return
            entry = (fd, os.fstat(fd).st_size, time.monotonic())
        fd, size, _used = entry
        self._snap_files[body.snap_id] = (fd, size, time.monotonic())
        if body.offset >= size:
            raise p.BadMessage("malformed", f"SNAP_GET at {body.offset} past the end ({size})")
        data = os.pread(fd, min(body.length, size - body.offset), body.offset)
        peer.snapshot_bytes += len(data)
        reply(p.MsgType.SNAP_CHUNK, (body.snap_id, body.offset, zlib.crc32(data)), [data])

    def _expire_snapshot_files(self) -> None:
        now = time.monotonic()
        for snap_id, (fd, _size, used) in list(self._snap_files.items()):
            if now - used > 60:
                os.close(fd)
                del self._snap_files[snap_id]

    # --- durability -------------------------------------------------------------------
    def _acked(self, peer: Peer) -> int:
        return peer.durable if self.durability is Durability.DURABLE else peer.received

    def _satisfied(self, seq: int) -> bool:
        now = time.monotonic()
        return any(self._acked(peer) >= seq for peer in self._peers.values() if peer.connected(now))

    def publish_now(self, seq: int, again: bool = False) -> None:
        """An fsync waits for `seq`: send what has been committed without letting it
        gather, and in durable mode ask the standbys to flush through `seq` (FLUSH; `again`:
        even if asked before, in case that message was lost)."""
        if self.durability is Durability.ASYNC:
            return
        if self.durability is Durability.DURABLE and (seq > self._flush_seq or again):
            self._flush_seq = max(self._flush_seq, seq)
            if again:
                self._flush_sent = 0
            self._queue.put([])  # wakes the publisher even if nothing is left to publish
        self._publish_now.set()

    def wait_replicated(self, seq: int) -> None:
        """The fsync hook: return once `seq` is replicated as the durability mode asks (the
        hook has called publish_now(seq) before its local flush).

        Raises ReplicationAborted if the node stops while the fsync waits (block mode)."""
        if self.durability is Durability.ASYNC:
            return
        with self._cond:
            self.fsync_waits += 1
            if self.degraded or self._satisfied(seq):
                return
            deadline = time.monotonic() + self.sync_timeout
            self.waiting += 1
            warned = aborted = False
            try:
                while not self._satisfied(seq):
                    if self.fencing.fenced:
                        log.error("fsync of seq %d failed unreplicated: %s", seq, self.fencing.reason)
                        aborted = True
                        raise FencedWhileWaiting(f"seq {seq} not replicated: {self.fencing.reason}")
                    if self._stop.is_set() or self._stopping():
                        log.error("fsync of seq %d abandoned unreplicated: the node is stopping", seq)
                        aborted = True
                        raise ReplicationAborted(f"seq {seq} not replicated")
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        if self.on_standby_loss is OnStandbyLoss.DEGRADE:
                            self._degrade(seq)
                            return
                        if not warned:
                            warned = True
                            self.fsync_timeouts += 1
                            self.blocked_since = self.blocked_since or time.monotonic()
                            log.error("REPLICATION STALLED: no standby acknowledged seq %d (%s) within "
                                      "%.1fs; fsync keeps blocking (--on-standby-loss block)", seq,
                                      self.durability.value, self.sync_timeout)
                        remaining = 1.0
                    if not self._cond.wait(min(remaining, 0.25)):
                        self.publish_now(seq, again=True)
            finally:
                self.waiting -= 1
                if not self.waiting:
                    if self.blocked_since is not None and not aborted:
                        log.warning("REPLICATION RESUMED: fsync waits released after %.1fs",
                                    time.monotonic() - self.blocked_since)
                    self.blocked_since = None

    def _degrade(self, seq: int) -> None:
        self.fsync_timeouts += 1
        if not self.degraded:
            self.degraded = True
            self.degraded_since = time.time()
            log.error("REPLICATION DEGRADED: no standby acknowledged seq %d (%s) within %.1fs; "
                      "running as async until a standby catches up (--on-standby-loss degrade)",
                      seq, self.durability.value, self.sync_timeout)
        self._cond.notify_all()

    # --- what others ask --------------------------------------------------------------
    def standby_positions(self) -> dict[str, int]:
        """Known standbys (by name) and the newest seq each has made durable (or, since its
        hello, holds in its store), for retention."""
        with self._cond:
            return dict(self._names)

    def persist_known(self) -> None:
        """Record the known standbys' positions in the store, if they changed (called by
        the maintenance thread, about once a second)."""
        with self._cond:
            names = dict(self._names)
        if names == self._persisted:
            return
        value = json.dumps({"epoch": self.store.epoch, "standbys": names}, sort_keys=True)
        try:
            self.store.set_meta(META_STANDBYS, value.encode())
        except (StoreError, lmdb.Error) as exc:  # a full store: next time
            log.debug("could not record the known standbys: %s", exc)
            return
        self._persisted = names

    def forget(self, names: list[str],
               why: str = "it fell behind the retention bound; it will need a snapshot") -> list[str]:
        """Stop holding the journal for these standbys; returns those that were known."""
        forgotten = []
        with self._cond:
            for name in names:
                if self._names.pop(name, None) is not None:
                    forgotten.append(name)
                    log.warning("no longer keeping the journal for standby %s: %s", name, why)
        return forgotten

    def _lag_seconds(self, acked: int, now: float) -> float:
        if acked >= self.published_seq:
            return 0.0
        times = self._published_times
        i = bisect.bisect_right(times, acked, key=lambda item: item[0])
        return round(now - times[i][1], 3) if i < len(times) else 0.0

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        with self._cond:
            peers = list(self._peers.values())
            standbys = [{
                "name": peer.name,
                "connected": peer.connected(now),
                "received_seq": peer.received,
                "durable_seq": peer.durable,
                "lag_records": max(0, self.store.last_seq - self._acked(peer)),
                "lag_seconds": self._lag_seconds(self._acked(peer), now),
                "last_seen_seconds": round(now - peer.last_seen, 3),
                "epoch": peer.epoch,
                "fetches": peer.fetches,
                "fetched_records": peer.fetched_records,
                "snapshot_bytes": peer.snapshot_bytes,
            } for peer in peers]
            return {
                "listen": self.listen,
                "side_channel": self.control,
                "durability": self.durability.value,
                "sync_timeout": self.sync_timeout,
                "on_standby_loss": self.on_standby_loss.value,
                "degraded": self.degraded,
                "degraded_since": self.degraded_since,
                "blocked_fsyncs": self.waiting,
                "blocked_seconds": round(now - self.blocked_since, 3) if self.blocked_since else 0.0,
                "fsync_waits": self.fsync_waits,
                "fsync_timeouts": self.fsync_timeouts,
                "published_seq": self.published_seq,
                "stream_messages": self.stream_messages,
                "standbys": standbys,
                "known_standbys": dict(self._names),
                **self.fencing.status(),
                "peer_watch": self.peer_watch.status() if self.peer_watch else None,
                "dropped": self.drops.snapshot(),
                "security": self.security_status(),
            }

    def security_status(self) -> dict[str, object]:
        if self.curve is None:
            return {"mechanism": "none"}
        admission = self.admission.status() if self.admission else {}
        return {**self.curve.describe(), **admission}
