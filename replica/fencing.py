"""Fencing: how a primary learns that it has been superseded, and stops writing at once.

Two primaries must never both acknowledge writes. An epoch names one primary's reign: a
node takes a new epoch, higher than any it has seen, when it is promoted, and every
record, hello and heartbeat carries the sender's epoch. A primary that hears of a higher
epoch therefore knows that another node was promoted after it: it stops accepting writes
at once (the store answers EROFS, with the reason), fails the fsyncs still waiting for a
standby (EIO: they were never acknowledged), logs CRITICAL, and records the epoch on disk
(META_FENCED) so that a restart as a primary stays read-only. Two primaries claiming the
same epoch is the one case epochs cannot order: both are fenced and it is reported as
fatal, for an operator to decide which history wins.

Where a primary hears of other epochs, i.e. what is detected:
- a standby's messages on its side channel (HELLO, ACK, FETCH, ...) carry the epoch that
  standby knows: a standby of the new primary that connects to the old one fences it;
- PEER exchanges (`PeerWatch`): a primary promoted from a standby keeps sending PEER to
  the side channel of the primary it used to follow, and every primary to the `--peer`
  addresses it was given; a primary that receives one answers with its own. Whichever of
  the two is older is fenced, whichever way the message went, as soon as the two can
  reach each other (within a PEER interval of a partition healing).

What is not detected: a deposed primary that nothing reaches (partitioned away, or back
on an address no peer probes and no standby of the new epoch connects to) keeps accepting
writes until it is reached. In a replicated durability mode with `--on-standby-loss block`
none of its fsyncs return meanwhile (no standby acknowledges them), so it acknowledges
nothing; in async or degrade mode it does, and those writes come back as divergent
records when it rejoins. With two machines and no third party no protocol can do better;
that needs a lease from a coordination service.

With CURVE keys (replica/security.py) a PEER probe is a CURVE client of the other
primary's side channel, admitted like a standby (with the cluster key, or by that node's
peers directory); only admitted nodes can then send an epoch at all. Without keys
(`--insecure`) messages are not authenticated, so a forged higher epoch can fence a primary (a denial
of service, never a lost write).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from journal.errors import StoreError
from journal.schema import META_FENCED, from_u64, u64
from journal.store import Store

from . import protocol as p
from .common import Started, make_socket
from .security import Curve

log = logging.getLogger(__name__)

#: How often a primary sends PEER to each peer it knows (seconds).
PEER_INTERVAL = 0.5
#: A PEER connection attempt is abandoned (and retried) after this long.
CONNECT_TIMEOUT_MS = 1000
#: CRITICAL reports of a split brain repeat at most this often (seconds).
LOUD_EVERY = 5.0
#: Reconnection interval of a probe that tries one of several keys (ms): a wrong key fails
#: the handshake at the other end, which should not be asked ten times a second.
CANDIDATE_RECONNECT_MS = 1000
#: A probe socket without an answer for this long connects afresh (seconds): libzmq never
#: retries a connection whose handshake the other side refused (a key it did not admit),
#: so a key admitted later would otherwise go unused until a restart.
REDIAL_AFTER = 10.0


def fenced_on_disk(store: Store) -> int | None:
    """The epoch that fenced this store while it was a primary, if it still holds: a primary
    restarted on it must not accept writes. Makes the store read-only and says why."""
    raw = store.get_meta(META_FENCED)
    if not raw:
        return None
    epoch = from_u64(raw)
    if epoch < store.epoch:
        return None  # promoted since: the fence was for an older reign
    reason = (f"fenced: this node learned of epoch {epoch} while it was the primary of epoch {store.epoch} "
              f"(another node took over); rejoin it as a standby of the new primary, or promote it "
              f"with --force to take over again")
    log.critical("%s", reason.replace("fenced", "FENCED AT START", 1))
    store.make_read_only(reason)
    return epoch


class Fencing:
    """What one primary knows of other primaries, and the one place that fences it."""

    def __init__(self, store: Store, on_fenced: Callable[[], None] | None = None,
                 check_disk: bool = True) -> None:
        self.store = store
        self._on_fenced = on_fenced or (lambda: None)
        self._lock = threading.Lock()
        self.fenced_by: int | None = None
        self.reason: str | None = None
        self.split_brain: dict[str, Any] | None = None
        self.peers: dict[str, dict[str, Any]] = {}
        self.stale_peers = 0
        self._loud_at = 0.0
        on_disk = fenced_on_disk(store) if check_disk else None
        if on_disk is not None:
            self.fenced_by = on_disk
            self.reason = store.read_only_reason

    @property
    def fenced(self) -> bool:
        return self.fenced_by is not None

    def superseded(self, epoch: int, by: str) -> None:
        """`by` knows epoch `epoch`: if that is above this primary's, stop writing now."""
        mine = self.store.epoch
        if epoch <= mine:
            return
        with self._lock:
            if self.fenced_by is not None and epoch <= self.fenced_by:
                return
            self.fenced_by = epoch
            self.reason = (f"fenced: {by} knows epoch {epoch}, above this primary's epoch {mine}: another "
                           f"node has been promoted")
            reason = self.reason
        log.critical("%s; refusing every write from now on (EROFS)", reason.replace("fenced", "FENCED", 1))
        self._fence(epoch, reason)

    def peer(self, name: str, epoch: int, body: p.Peer) -> None:
        """Another primary said PEER (or answered ours)."""
        mine = self.store.epoch
        with self._lock:
            self.peers[name] = {"epoch": epoch, "epoch_first_seq": body.epoch_first_seq,
                                "last_seq": body.last_seq, "fenced": bool(body.flags & p.PEER_FENCED),
                                "seen": time.time()}
        if epoch > mine:
            self.superseded(epoch, f"primary {name}")
        elif epoch == mine:
            self._split_brain(name, epoch, body)
        else:
            with self._lock:
                self.stale_peers += 1
                loud = self._loud()
            if loud:
                log.warning("primary %s is still running in epoch %d, below this primary's %d: it is told, "
                            "and fences itself", name, epoch, mine)

    def _split_brain(self, name: str, epoch: int, body: p.Peer) -> None:
        mine_first = self.store.epoch_history[-1][1] if self.store.epoch_history else 0
        reason = (f"SPLIT BRAIN: primary {name} also claims epoch {epoch} (began at seq "
                  f"{body.epoch_first_seq}, now at {body.last_seq}; this node began it at seq "
                  f"{mine_first}, now at {self.store.last_seq}); both refuse writes until an operator "
                  "rejoins one of them as a standby of the other")
        with self._lock:
            first = self.split_brain is None
            self.split_brain = {"peer": name, "epoch": epoch, "peer_epoch_first_seq": body.epoch_first_seq,
                                "peer_last_seq": body.last_seq, "epoch_first_seq": mine_first,
                                "last_seq": self.store.last_seq, "detected": time.time()}
            self.fenced_by = epoch
            self.reason = reason
            loud = self._loud() or first
        if loud:
            log.critical("FATAL: TWO PRIMARIES IN EPOCH %d: %s", epoch, reason)
        if first:
            self._fence(epoch, reason)

    def _loud(self) -> bool:
        now = time.monotonic()
        if now - self._loud_at < LOUD_EVERY:
            return False
        self._loud_at = now
        return True

    def _fence(self, epoch: int, reason: str) -> None:
        self.store.make_read_only(reason)
        try:
            self.store.set_meta(META_FENCED, u64(epoch))
        except StoreError as exc:  # still fenced in memory; a restart would not know
            log.error("could not record the fence on disk: %s", exc)
        self._on_fenced()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"fenced_by_epoch": self.fenced_by, "fenced_reason": self.reason,
                    "split_brain": self.split_brain, "peers": dict(self.peers),
                    "stale_peers": self.stale_peers}


class PeerWatch:
    """Sends PEER to other primaries' side channels, and hands their answers to `Fencing`.

    One thread, one DEALER per address. The sockets are IMMEDIATE: a PEER is sent only on
    a live connection, never queued for a peer that is away (a stale probe delivered on
    reconnection would say nothing the next one does not).

    With CURVE, a probe is a client of the other side channel: with the public key given
    for that address in `server_keys`, or else one DEALER per candidate key (the peers
    directory's other keys). Only the right key completes the handshake, so only that
    socket is ever connected; once it has answered, the others are closed. A socket that
    has had no answer for REDIAL_AFTER seconds connects afresh."""

    def __init__(self, store: Store, fencing: Fencing, addresses: list[str], identity: bytes,
                 name: str, curve: Curve | None = None, server_keys: dict[str, bytes] | None = None) -> None:
        self.store = store
        self.fencing = fencing
        self.addresses = addresses
        self.identity = identity
        self.name = name
        self.curve = curve
        self.server_keys = dict(server_keys or {})
        #: address -> the public key its probe uses (or how many candidates it tries).
        self.keys: dict[str, str] = {}
        self.sent = 0
        self.answers = 0
        self.dropped = 0
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        started = Started()
        self._thread = threading.Thread(target=self._run, args=(started,), name="peer-watch", daemon=True)
        self._thread.start()
        started.wait()
        log.info("watching for other primaries at %s", ", ".join(self.addresses))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._ctx.term()

    def _frames(self) -> list[bytes]:
        store = self.store
        flags = p.PEER_FENCED if self.fencing.fenced else 0
        first = store.epoch_history[-1][1] if store.epoch_history else 1
        return p.encode(p.MsgType.PEER, store.cluster_id, store.epoch,
                        (max(store.last_seq, first), first, flags), [self.name.encode()])

    def _keys_for(self, address: str) -> list[Curve | None]:
        """The security of each probe socket towards `address` (None: in the clear)."""
        if self.curve is None:
            return [None]
        known = self.server_keys.get(address)
        if known is not None:
            self.keys[address] = known.decode("ascii", "replace")
            return [self.curve.towards(known)]
        candidates = self.curve.peer_keys()
        if not candidates:
            log.warning("no public key to probe %s with: the peers directory %s holds no key but this "
                        "node's own; not probing it", address, self.curve.peers_dir)
        self.keys[address] = f"trying {len(candidates)} key(s) of the peers directory"
        return [self.curve.towards(key) for key in candidates]

    def _run(self, started: Started) -> None:
        sockets: dict[zmq.Socket, str] = {}  # socket -> the address it probes
        keys: dict[zmq.Socket, bytes] = {}  # socket -> the public key it expects (CURVE)
        try:
            for address in self.addresses:
                securities = self._keys_for(address)
                for security in securities:
                    sock = make_socket(self._ctx, zmq.DEALER, security)
                    sockets[sock] = address
                    if security is not None and security.server_public is not None:
                        keys[sock] = security.server_public
                    sock.setsockopt(zmq.IMMEDIATE, 1)
                    # A connect into a cut link must not sit in SYN retransmits for long after the
                    # link heals: give up on it and try afresh.
                    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
                    if len(securities) > 1:
                        sock.setsockopt(zmq.RECONNECT_IVL, CANDIDATE_RECONNECT_MS)
                    sock.setsockopt(zmq.ROUTING_ID, self.identity)
                    sock.connect(address)
        except Exception as exc:  # reported to whoever started the thread
            for sock in sockets:
                sock.close()
            started.fail(exc)
            return
        started.ok()
        poller = zmq.Poller()
        for sock in sockets:
            poller.register(sock, zmq.POLLIN)
        next_probe = 0.0
        heard = {sock: time.monotonic() for sock in sockets}  # last answer (or dial)
        try:
            while not self._stop.is_set():
                self._redial(sockets, heard)
                if time.monotonic() >= next_probe:
                    frames = self._frames()
                    for sock in sockets:
                        try:
                            sock.send_multipart(frames, zmq.NOBLOCK)
                            self.sent += 1
                        except zmq.Again:
                            pass  # not connected: nothing is queued
                    next_probe = time.monotonic() + PEER_INTERVAL
                for sock, _event in poller.poll(100):
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    if self._answer(frames):
                        heard[sock] = time.monotonic()
                        self._settle(sock, sockets, keys, poller)
        finally:
            for sock in sockets:
                sock.close()

    def _redial(self, sockets: dict[zmq.Socket, str], heard: dict[zmq.Socket, float]) -> None:
        now = time.monotonic()
        for sock, address in sockets.items():
            if now - heard.get(sock, now) < REDIAL_AFTER:
                continue
            heard[sock] = now
            try:
                sock.disconnect(address)
            except zmq.ZMQError:
                pass  # libzmq already forgot the endpoint (a refused handshake)
            sock.connect(address)

    def _settle(self, answered: zmq.Socket, sockets: dict[zmq.Socket, str], keys: dict[zmq.Socket, bytes],
                poller: zmq.Poller) -> None:
        """`answered` holds the right key for its address: close the other candidates."""
        address = sockets[answered]
        others = [sock for sock, where in sockets.items() if where == address and sock is not answered]
        if not others:
            return
        for sock in others:
            poller.unregister(sock)
            sock.close()
            del sockets[sock]
            keys.pop(sock, None)
        self.keys[address] = keys[answered].decode("ascii", "replace")
        log.info("probing %s with the public key %s (it answered)", address, self.keys[address])

    def _answer(self, frames: list[bytes]) -> bool:
        """Hand a PEER answer to `Fencing`; False if it was dropped."""
        try:
            msg = p.decode(frames, p.PEER_TYPES)
            p.check_sender(msg, self.store.cluster_id, self.store.epoch)
        except p.BadMessage as exc:
            self.dropped += 1
            log.debug("dropped a PEER answer: %s", exc)
            return False
        self.answers += 1
        self.fencing.peer(msg.payload[0].decode(), msg.epoch, msg.body)
        return True

    def status(self) -> dict[str, Any]:
        return {"addresses": self.addresses, "sent": self.sent, "answers": self.answers,
                "dropped": self.dropped, "keys": dict(self.keys) if self.curve else None}
