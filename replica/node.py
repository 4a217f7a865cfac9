"""A running node: one store, a role (primary or standby), its mount and its services.

Whatever the role, a node serves the local control socket (status, checkpoint, digest),
takes periodic checkpoints and prunes its journal, all in threads of their own. The role
decides the replication half: a primary serves the stream and side channel
(replica/primary.py) and makes fsync wait as its durability mode says; a standby follows
(replica/standby.py) and may mount its state read-only, refusing writes from the store
(EROFS) rather than with the kernel's `ro` option, so that promoting it can turn the same
mount writable in place.

The FUSE loop runs in the main thread (libfuse ends it on SIGTERM/SIGINT); a node without
a mount waits on its own signal handlers instead.

Promotion (decisions in replica/promotion.py). A running standby is promoted in place,
from its control socket (`mount.py promote`) or from its own watchdog after missed
heartbeats (`--auto-promote-after`): it applies what it has already received and stops
following, binds the stream and side channel (if that fails, nothing has changed and it
follows again), commits the BeginEpoch record that starts its epoch, and only then
accepts writes, through the same mount, whose fsync hook starts waiting for standbys.
A stopped standby's data directory is promoted by starting it as a primary that does
the same before it mounts. Either way the new primary keeps sending PEER to the primary
it followed (replica/fencing.py), so that primary is fenced whenever it can be reached.

Security (replica/security.py). A node's CURVE keys are part of its configuration, so a
standby promoted in place serves with the keys it was started with: the cluster key
derived from the cluster secret (or its own secret key, admitting the keys of its peers
directory, and probing its old primary with the public key it followed it by).
Replication traffic that would leave the machine without keys is refused before anything
binds or connects (`check_security`), unless `--insecure`; that holds for the addresses a
promotion chooses by itself too.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fs.binding import session_exiting
from journal.checkpoints import (
    DEFAULT_INTERVAL,
    DEFAULT_KEEP,
    Checkpoints,
    RetentionPolicy,
    prune_point,
)
from journal.errors import StoreDamaged, StoreFull
from journal.integrity import DamagedValue
from journal.schema import META_FENCED, META_ROLE, from_u64
from journal.scrub import ScrubProgress, scrub
from journal.store import Store, is_store

from .control import ControlServer, NodeLock
from .fencing import fenced_on_disk
from .primary import Durability, OnStandbyLoss, PrimaryReplication
from .promotion import (
    PromoteRequest,
    PromotionRefused,
    Takeover,
    check,
    default_addresses,
    inherited_durability,
    next_epoch,
)
from .security import Curve, SecurityError, require_for
from .standby import INCOMING, Follower, State, read_upstream

log = logging.getLogger(__name__)

#: How often the maintenance thread looks at checkpoints and retention (seconds).
MAINTENANCE_TICK = 1.0
#: The maintenance thread prunes once at least this many records can go.
PRUNE_AT_LEAST = 1024
#: A maintenance problem that persists is logged again after this many seconds.
TROUBLE_REPEAT = 600.0
#: Pruning to make room in a full store is logged at most this often (seconds).
FULL_LOG_EVERY = 60.0
#: Entries a standby's data directory may hold before it has a store.
_BOOTSTRAP_LEFTOVERS = {INCOMING, "node.lock", "control.sock", "checkpoints"}
#: How long a promotion waits for a mount it asked for to come up (seconds).
MOUNT_TIMEOUT = 20.0


class WrongRole(Exception):
    """The data directory's last role does not allow what was asked (e.g. `primary` on a
    standby's data, which must be promoted instead)."""


@dataclass
class NodeConfig:
    data: Path
    mount: str | None = None
    max_size: int | None = None
    group_commit: bool = False
    # primary
    #: A primary's stream; a standby's once promoted (None: promotion's default).
    listen: str | None = None
    control: str | None = None  # the side channel: bound by a primary, reached by a standby
    #: What fsync waits for; None (standby): once promoted, as the old primary announced.
    durability: Durability | None = Durability.ASYNC
    sync_timeout: float = 5.0
    on_standby_loss: OnStandbyLoss = OnStandbyLoss.BLOCK
    #: Other nodes' stream addresses: a primary sends them PEER (replica/fencing.py).
    peers: list[str] = field(default_factory=list)
    #: Side channels to send PEER to, when decided already (a stopped standby's promotion).
    peer_channels: list[str] = field(default_factory=list)
    #: Public keys of some of those side channels (the old primary's), for CURVE PEER probes.
    peer_server_keys: dict[str, bytes] = field(default_factory=dict)
    # standby
    primary: str | None = None
    name: str = ""
    #: Promote after this many seconds without a heartbeat (None: never on its own).
    auto_promote_after: float | None = None
    # both
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    checkpoint_interval: float = DEFAULT_INTERVAL
    keep_checkpoints: int = DEFAULT_KEEP
    #: CURVE keys (None: replication in the clear, allowed on loopback or with `insecure`).
    curve: Curve | None = None
    #: Allow replication traffic off this machine without keys.
    insecure: bool = False


def replication_endpoints(config: NodeConfig, role: str) -> list[str]:
    """Every address this node's replication binds or connects to, as far as known now
    (a promotion's own defaults are checked when it happens)."""
    found: list[str] = []
    peers = [default_side_channel(address) for address in config.peers] + list(config.peer_channels)
    if role == "standby":
        assert config.primary is not None
        found += [config.primary, config.control or default_side_channel(config.primary)]
        if config.listen:
            found += [config.listen]
        found += peers
    elif config.listen:
        found += [config.listen, config.control or default_side_channel(config.listen), *peers]
    return found


def check_security(config: NodeConfig, role: str, endpoints: list[str] | None = None) -> None:
    """Raise SecurityError if this node would carry replication traffic off the machine in
    the clear, or its keys do not fit its role."""
    curve = config.curve
    if curve is not None:
        serving = role == "primary" and bool(config.listen)
        if serving and not curve.can_serve():
            raise SecurityError("serving with CURVE needs --curve-peers DIR: the public keys of the nodes "
                                "allowed to connect")
        if role == "standby" and curve.server_public is None:
            raise SecurityError("a standby with CURVE keys needs --curve-server FILE: the public key "
                                "(NAME.key) of the primary it follows")
    require_for(endpoints if endpoints is not None else replication_endpoints(config, role), curve,
                config.insecure)


def default_side_channel(address: str) -> str:
    """tcp://HOST:PORT -> tcp://HOST:PORT+1."""
    head, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not head.startswith("tcp://"):
        raise ValueError(f"cannot derive a side-channel address from {address!r}; give --control")
    return f"{head}:{int(port) + 1}"


def default_name(data: Path) -> str:
    return f"{socket.gethostname()}:{data.resolve().name}"[:64]


class Node:
    def __init__(self, config: NodeConfig, role: str) -> None:
        self.config = config
        self.role = role
        self.store: Store | None = None
        self.checkpoints: Checkpoints | None = None
        self.replication: PrimaryReplication | None = None
        self.follower: Follower | None = None
        self.started = time.time()
        self.exit_code = 0
        self.fatal: str | None = None
        self._stop = threading.Event()
        self._store_ready = threading.Event()
        self._checkpoint_requests: list[Future] = []
        self._checkpoint_wanted = threading.Event()
        self._maintenance: threading.Thread | None = None
        self._lock: NodeLock | None = None
        self._control: ControlServer | None = None
        self.last_prune: dict[str, Any] = {}
        self._retain_lock = threading.Lock()
        #: What maintenance could not do ({what: (message, when logged)}), logged once.
        self._trouble: dict[str, tuple[str, float]] = {}
        self._full_logged = -FULL_LOG_EVERY
        self.takeover: Takeover | None = None
        self._promote_lock = threading.Lock()
        #: Wakes the main thread of a standby: stop, or a mount a promotion asked for.
        self._wake = threading.Event()
        self._mount_request: str | None = None
        self.on_fatal: Any = None  # the standby's follower callback, for following again
        #: The newest scrub this node ran (or runs), started by `mount.py scrub`.
        self._scrub: ScrubProgress | None = None
        self._scrub_lock = threading.Lock()

    # --- store ------------------------------------------------------------------------
    def _adopt(self, store: Store) -> None:
        self.store = store
        store.on_full = self._make_room
        self.checkpoints = Checkpoints(store, self.config.keep_checkpoints)
        self._store_ready.set()

    # --- services common to both roles -------------------------------------------------
    def _start_common(self) -> None:
        self._lock = NodeLock(self.config.data)
        self._control = ControlServer(self.config.data, {
            "status": lambda request: self.status(),
            "checkpoint": lambda request: self._checkpoint_command(),
            "forget": self._forget_command,
            "digest": lambda request: self._digest(),
            "promote": self._promote_command,
            "scrub": self._scrub_command,
        })
        self._control.start()
        self._maintenance = threading.Thread(target=self._maintain, name="maintenance", daemon=True)
        self._maintenance.start()

    def request_checkpoint(self) -> Future:
        """A checkpoint from the maintenance thread: resolves to (Checkpoint, prune info or None)."""
        future: Future = Future()
        self._checkpoint_requests.append(future)
        self._checkpoint_wanted.set()
        return future

    def _checkpoint_command(self) -> dict[str, Any]:
        checkpoint, pruned = self.request_checkpoint().result(timeout=3600)
        return {"seq": checkpoint.seq, "path": str(checkpoint.path), "size": checkpoint.size(),
                "pruned": pruned}

    def _forget_command(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("standby")
        if not isinstance(name, str) or not name:
            return {"forgotten": False, "refused": "bad request: no standby name"}
        if self.replication is None:
            return {"forgotten": False, "refused": "this node is not a replicating primary"}
        forgotten = self.replication.forget([name], why="the operator asked")
        if forgotten:
            self.replication.persist_known()
        return {"forgotten": bool(forgotten)}

    def _digest(self) -> dict[str, Any]:
        from journal.check import digest

        store = self._require_store()
        with store.shared():
            found = digest(store)
        return {"digest": found.value, "seq": found.seq, "epoch": found.epoch}

    def _scrub_command(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start a scrub (unless one runs, or the request only asks how it goes); its
        progress as it is now."""
        store = self._require_store()
        with self._scrub_lock:
            running = self._scrub is not None and self._scrub.finished is None
            if request.get("start") and not running:
                self._scrub = ScrubProgress()
                threading.Thread(target=scrub, args=(store, self._scrub), name="scrub", daemon=True).start()
            if self._scrub is None:
                raise RuntimeError("no scrub has run on this node")
            return self._scrub.as_dict()

    def scrub_progress(self) -> dict[str, Any] | None:
        return None if self._scrub is None else self._scrub.as_dict()

    def _require_store(self) -> Store:
        if self.store is None:
            raise RuntimeError("this node has no store yet (bootstrapping)")
        return self.store

    def _maintain(self) -> None:
        last_checkpoint = time.monotonic()
        while not self._stop.is_set():
            self._checkpoint_wanted.wait(MAINTENANCE_TICK)
            if self._stop.is_set():
                break
            if self.store is None or self.checkpoints is None or not self._can_maintain():
                self._stop.wait(0.2)  # e.g. bootstrapping: requests wait until it is done
                continue
            requests, self._checkpoint_requests = self._checkpoint_requests, []
            self._checkpoint_wanted.clear()
            try:
                self.store.fit_map()  # the disk may have filled or emptied meanwhile
                due = time.monotonic() - last_checkpoint >= self.config.checkpoint_interval
                newest = self.checkpoints.newest()
                checkpoint = None
                if requests or (due and (newest is None or newest.seq < self.store.last_seq)):
                    try:
                        checkpoint = self.checkpoints.take()
                    except StoreFull as exc:
                        self._troubled("checkpoint", f"checkpoint skipped: {exc}")
                        for future in requests:
                            future.set_exception(exc)
                        requests = []
                    else:
                        self._untroubled("checkpoint", "checkpoints are taken again")
                        last_checkpoint = time.monotonic()
                pruned = self._retain(eager=bool(requests))
                for future in requests:
                    future.set_result((checkpoint, pruned))
                self._untroubled("maintenance", "maintenance works again")
            except Exception as exc:
                self._maintenance_failed(exc)
                for future in requests:
                    if not future.done():
                        future.set_exception(exc)

    def _maintenance_failed(self, exc: Exception) -> None:
        """Say once why maintenance failed (a damaged value: the store notes it, and repairs
        it from the peer if it can)."""
        if isinstance(exc, StoreFull):
            self._troubled("maintenance", f"cannot prune the journal: {exc}")
        elif isinstance(exc, DamagedValue) and self.store is not None:
            self.store.handle_damage(exc)
        elif isinstance(exc, StoreDamaged):
            self._troubled("maintenance", f"maintenance: {exc}")
        else:
            self._troubled("maintenance", f"maintenance failed: {exc!r}", exc)

    def _troubled(self, what: str, message: str, exc: BaseException | None = None) -> None:
        """Log a maintenance problem once (one that lasts: again after TROUBLE_REPEAT), not on
        every tick; an unexpected one with its traceback, the first time."""
        now = time.monotonic()
        previous = self._trouble.get(what)
        if previous is not None and now - previous[1] < TROUBLE_REPEAT:
            return  # the figures in the message change; the problem does not
        self._trouble[what] = (message, now)
        log.log(logging.WARNING if exc is None else logging.ERROR, "%s", message,
                exc_info=exc if previous is None else None)

    def _untroubled(self, what: str, message: str) -> None:
        if self._trouble.pop(what, None) is not None:
            log.info("%s", message)

    def _can_maintain(self) -> bool:
        return self.follower is None or self.follower.state.value in ("following", "catching-up")

    def _retain(self, eager: bool = False, full: bool = False) -> dict[str, Any] | None:
        """Prune the journal as far as the standbys and the retention bounds allow; returns
        what was pruned, if anything. Small prunes wait for more to gather, unless asked
        for (`eager`: an operator's checkpoint) or the store is `full`."""
        store = self.store
        assert store is not None
        with self._retain_lock:
            if self.replication is not None:
                self.replication.persist_known()
            acks = self.replication.standby_positions() if self.replication else {}
            first = store.first_seq()
            below, given_up = prune_point(self.config.retention.within(store.capacity()), first_seq=first,
                                          last_seq=store.last_seq, standby_acks=acks,
                                          journal_bytes=store.journal_bytes())
            if given_up and self.replication:
                self.replication.forget(given_up)
            if below - first >= (1 if eager or full else PRUNE_AT_LEAST):
                removed = store.prune(below)
                self.last_prune = {"below": below, "removed": removed, "time": time.time()}
                # A store at its bound prunes on every write it refuses: say so now and then.
                loud = full and time.monotonic() - self._full_logged >= FULL_LOG_EVERY
                if loud:
                    self._full_logged = time.monotonic()
                log.log(logging.WARNING if loud else logging.DEBUG,
                        "pruned %d journal records below seq %d%s", removed, below,
                        " to make room in a full store" if full else "")
                return self.last_prune
        return None

    def _make_room(self) -> None:
        """The store's answer to a full map: drop the journal nobody needs, then retry."""
        if self._can_maintain():
            self._retain(full=True)

    # --- promotion ----------------------------------------------------------------------
    def _promote_command(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            promote = PromoteRequest.from_control(request)
        except ValueError as exc:
            return {"promoted": False, "refused": f"bad request: {exc}"}
        try:
            takeover = self.promote(promote)
        except PromotionRefused as exc:
            return {"promoted": False, "refused": str(exc)}
        return {"promoted": True, **takeover.as_dict()}

    def _promotion_mount(self, request: PromoteRequest) -> str | None:
        """The mount a promotion must start (None: keep the one there is); refuses a request
        that does not fit this node."""
        have = self.config.mount
        want = request.mount
        if want and have and os.path.realpath(want) != os.path.realpath(have):
            raise PromotionRefused(f"this standby is mounted at {have}: --mount must name that mount or be "
                                   "left out (the mount turns writable in place)")
        if want and not have:
            from fs.mounting import MountpointError, prepare_mountpoint

            try:
                prepare_mountpoint(want)
            except MountpointError as exc:
                raise PromotionRefused(str(exc)) from exc
            return want
        if not have:
            raise PromotionRefused("this standby has no mount: give --mount MNT to serve the filesystem")
        return None

    def promote(self, request: PromoteRequest) -> Takeover:
        """Make this running standby the primary of a new epoch, in place."""
        with self._promote_lock:
            store, follower = self.store, self.follower
            if self.role != "standby" or follower is None:
                raise PromotionRefused(f"this node is already the primary of epoch "
                                       f"{store.epoch if store else '?'}")
            check(store, follower.known_last, request.force)  # refuse before disturbing anything
            self._serving_plan(request, follower)
            mount = self._promotion_mount(request)
            assert store is not None
            if follower.state is State.SNAPSHOT and not request.force:
                raise PromotionRefused("this node is installing a snapshot from its primary: its store is "
                                       "not whole yet")
            follower.stop(drain=True)
            try:
                lacks = check(store, follower.known_last, request.force)
                replication = self._replication_for(request, follower)
                replication.start()  # binds: if that fails, nothing has changed yet
            except BaseException:
                self._follow_again(follower)
                raise
            took_over_at = store.last_seq
            epoch = next_epoch(store, follower.seen_epoch, follower.epoch)
            try:
                seq = store.begin_epoch(epoch)
            except BaseException:
                replication.stop()
                self._follow_again(follower)
                raise
            store.set_meta(META_ROLE, b"primary")
            self.replication, self.follower, self.role = replication, None, "primary"
            store.make_writable()
            self.takeover = Takeover(
                epoch=epoch, seq=seq, took_over_at=took_over_at, announced=follower.known_last, lacks=lacks,
                listen=replication.listen, control=replication.control,
                durability=replication.durability.value, on_standby_loss=replication.on_standby_loss.value,
                mount=mount or self.config.mount, peers=replication.peer_watch.addresses
                if replication.peer_watch else [], auto=request.auto, forced=request.force)
            log.warning("PROMOTED%s: primary of epoch %d from seq %d (took over after seq %d; the old "
                        "primary announced %d, %d record(s) of it not held here); serving on %s",
                        " automatically" if request.auto else "", epoch, seq, took_over_at,
                        follower.known_last, lacks, replication.listen)
        if mount:
            self._mount_now(mount)
        return self.takeover

    def _serving_plan(self, request: PromoteRequest, follower: Follower) -> tuple[str, str, list[str]]:
        """(stream, side channel, PEER side channels) a promoted standby serves and probes,
        from the request, its configuration and what it heard from its old primary; refuses
        a plan its keys do not allow."""
        config = self.config
        listen, control = request.listen or config.listen, request.control
        if listen is None:
            listen, default_control = default_addresses(follower.primary, follower.control)
            control = control or default_control
        control = control or default_side_channel(listen)
        peers = self._peers([*config.peers, *request.peers], control, follower.control)
        curve = config.curve
        if curve is not None and not curve.can_serve():
            raise PromotionRefused("this standby follows with CURVE keys but was started without "
                                   "--curve-peers: once promoted it must serve with CURVE and know whom to "
                                   "admit. Restart it with --curve-peers DIR, then promote it")
        try:
            require_for([listen, control, *peers], curve, config.insecure)
        except SecurityError as exc:
            raise PromotionRefused(str(exc)) from exc
        return listen, control, peers

    def _replication_for(self, request: PromoteRequest, follower: Follower) -> PrimaryReplication:
        """The replication a promoted standby serves (see `_serving_plan`), with this node's
        own keys; its PEER probe towards the old primary uses the key it followed it by."""
        assert self.store is not None and self.checkpoints is not None
        config = self.config
        listen, control, peers = self._serving_plan(request, follower)
        durability = request.durability or config.durability or inherited_durability(follower.ack_flags)
        curve = config.curve
        known = {follower.control: curve.server_public} if curve and curve.server_public else None
        return PrimaryReplication(
            self.store, self.checkpoints, listen, control, durability=durability,
            sync_timeout=request.sync_timeout or config.sync_timeout,
            on_standby_loss=request.on_standby_loss or config.on_standby_loss,
            request_checkpoint=self.request_checkpoint, stopping=session_exiting, peers=peers,
            name=config.name or default_name(config.data), taking_over=True, curve=curve,
            peer_server_keys=known)

    @staticmethod
    def _peers(streams: list[str], own_control: str, old_primary_control: str | None) -> list[str]:
        """Side channels to send PEER to: the old primary's, and those of --peer nodes; never
        this node's own."""
        found = [old_primary_control] if old_primary_control else []
        found += [default_side_channel(address) for address in streams]
        return [address for i, address in enumerate(found)
                if address != own_control and address not in found[:i]]

    def _follow_again(self, stopped: Follower) -> None:
        """A promotion failed after the follower stopped: follow the same primary again."""
        follower = Follower(self.config.data, stopped.primary, stopped.control, store=self.store,
                            name=stopped.name, max_size=self.config.max_size, on_store=self._adopt,
                            on_fatal=self.on_fatal, curve=self.config.curve)
        if self.store is not None:
            follower._set_store(self.store)
        follower.start()
        self.follower = follower
        log.warning("promotion abandoned; following %s again", stopped.primary)

    def _mount_now(self, mountpoint: str) -> None:
        """Ask the main thread to mount `mountpoint`; wait until it is mounted."""
        self.config.mount = mountpoint
        self._mount_request = mountpoint
        self._wake.set()
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mountpoint):
            if time.monotonic() > deadline or self._stop.is_set():
                raise RuntimeError(f"promoted, but {mountpoint} was not mounted within {MOUNT_TIMEOUT:.0f}s")
            time.sleep(0.02)

    def _auto_promote(self, after: float) -> None:
        """Promote this standby once its primary has been silent for `after` seconds, if it
        had been following and holds everything the primary announced."""
        warned = False
        while not self._stop.wait(0.05):
            follower, store = self.follower, self.store
            if self.role != "standby" or follower is None or store is None:
                return
            if follower.last_heartbeat is None or follower.state is not State.FOLLOWING:
                continue
            silent = follower.silence()
            if silent < after:
                warned = False
                continue
            if follower.known_last > store.last_seq:
                if not warned:
                    log.error("no heartbeat from %s for %.1fs, but not promoting: this node holds seq %d "
                              "of the %d announced", follower.primary, silent, store.last_seq,
                              follower.known_last)
                    warned = True
                continue
            log.critical("AUTO-PROMOTE: no heartbeat from %s for %.1fs (--auto-promote-after %.1f); "
                         "promoting this standby", follower.primary, silent, after)
            try:
                self.promote(PromoteRequest(auto=True))
                return
            except PromotionRefused as exc:
                log.error("auto-promotion refused: %s", exc)
            except Exception:
                log.exception("auto-promotion failed")

    def fsync_hook(self, seq: int, flush_local: Callable[[], None]) -> None:
        """TandemFS's fsync hook on either role: flush, and wait as the durability mode asks.

        Indirect on purpose: a standby promoted in place keeps its mount, and its fsyncs
        start waiting for standbys the moment it starts replicating."""
        replication = self.replication
        if replication is None:
            flush_local()
            return
        replication.publish_now(seq)  # the standbys' flush overlaps ours
        flush_local()
        replication.wait_replicated(seq)

    # --- status -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "data": str(self.config.data), "pid": os.getpid(),
                               "mount": self.config.mount,
                               "uptime_seconds": round(time.time() - self.started, 1),
                               "takeover": self.takeover.as_dict() if self.takeover else None,
                               "auto_promote_after": self.config.auto_promote_after}
        store = self.store
        if store is None:
            out["applied_seq"] = 0  # bootstrapping: no store yet
        else:
            newest = self.checkpoints.newest() if self.checkpoints else None
            out.update({
                "cluster_id": store.cluster_id.hex(),
                "epoch": store.epoch,
                "epoch_history": store.epoch_history,
                "last_seq": store.last_seq,
                "applied_seq": store.last_seq,
                "read_only": store.read_only_reason,
                "journal": {"first_seq": store.first_seq(), "last_seq": store.last_seq,
                            "records": store.counts()["journal_records"], "bytes": store.journal_bytes()},
                "last_checkpoint": None if newest is None else {
                    "seq": newest.seq, "path": str(newest.path), "size": newest.size(),
                    "age_seconds": round(time.time() - newest.time, 1)},
                "last_prune": self.last_prune,
                "integrity": store.integrity.summary(),
                "scrub": self.scrub_progress(),
            })
        dropped: dict[str, int] = {}
        fatal = self.fatal
        if self.replication is not None:
            out["replication"] = self.replication.status()
            out["durability"] = self.replication.durability.value
            out["degraded"] = self.replication.degraded
            dropped.update(self.replication.drops.snapshot())
            fencing = self.replication.fencing
            out["fenced"] = fencing.reason if fencing.fenced else None
            if fencing.split_brain is not None:
                fatal = fencing.reason
        elif self.role == "primary":
            out["replication"] = None
            out["durability"] = "async"
            out["degraded"] = False
        if self.follower is not None:
            follower = self.follower.status()
            out["standby"] = follower
            out["lag_records"] = follower["lag_records"]
            out["lag_seconds"] = follower["lag_seconds"]
            out["heartbeat_age_seconds"] = follower["heartbeat_age_seconds"]
            out["problem"] = follower["problem"]
            dropped.update(follower["dropped"])
        out["security"] = self._security_status()
        if self._control is not None:
            for kind, count in self._control.drops.snapshot().items():
                dropped[f"control_{kind}"] = count
        out["dropped"] = dropped
        out["dropped_total"] = sum(dropped.values())
        out["fatal"] = fatal
        return out

    def _security_status(self) -> dict[str, Any]:
        """How this node's replication traffic is protected (public keys only)."""
        curve = self.config.curve
        if self.replication is not None:
            return self.replication.security_status()
        if curve is not None:
            return curve.describe()
        return {"mechanism": "none", "insecure": self.config.insecure}

    # --- running ------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        self._checkpoint_wanted.set()
        if self.replication is not None:
            self.replication.stop()
        if self.follower is not None:
            self.follower.stop()
        if self._maintenance is not None:
            self._maintenance.join(timeout=30)
        for future in self._checkpoint_requests:
            future.cancel()
        if self._control is not None:
            self._control.stop()
        if self.store is not None:
            self.store.close()
        if self._lock is not None:
            self._lock.release()


def _open_primary_store(config: NodeConfig) -> Store:
    data = config.data
    if is_store(data):
        return Store(data, max_size=config.max_size, group_commit=config.group_commit)
    if data.is_dir() and any(entry.name not in ("node.lock", "control.sock") for entry in data.iterdir()):
        log.error("%s is neither empty nor a tandemfs store", data)
        raise SystemExit(2)
    store = Store.create(data, max_size=config.max_size, group_commit=config.group_commit)
    log.info("created a new store at %s (cluster %s): there was none", data, store.cluster_id.hex())
    return store


def _take_over_offline(store: Store, config: NodeConfig, request: PromoteRequest) -> tuple[int, int, str]:
    """Decide a stopped node's promotion: (new epoch, records it lacks, its last role); fills
    in the node's listen/control/durability/peers from the request and what it heard, and
    refuses (SecurityError) addresses its keys do not allow."""
    upstream = read_upstream(store)
    announced = upstream.get("last_seq", 0)
    seen_epoch = upstream.get("epoch", 0)
    raw_fence = store.get_meta(META_FENCED)
    fenced = from_u64(raw_fence) if raw_fence and from_u64(raw_fence) >= store.epoch else None
    lacks = check(store, announced if isinstance(announced, int) else 0, request.force, store.role, fenced)
    old_primary, old_control = upstream.get("primary"), upstream.get("control")
    if request.listen or config.listen:
        config.listen = request.listen or config.listen
        config.control = request.control or config.control or default_side_channel(config.listen)
    elif isinstance(old_primary, str):
        config.listen, default_control = default_addresses(old_primary, old_control if isinstance(
            old_control, str) else None)
        config.control = request.control or default_control
    else:
        raise PromotionRefused("this node does not know which addresses its old primary used: give --listen")
    ack_flags = upstream.get("ack_flags", 0)
    config.durability = request.durability or config.durability or inherited_durability(
        ack_flags if isinstance(ack_flags, int) else 0)
    config.sync_timeout = request.sync_timeout or config.sync_timeout
    config.on_standby_loss = request.on_standby_loss or config.on_standby_loss
    assert config.control is not None
    config.peers = []
    config.peer_channels = Node._peers([*request.peers], config.control,
                                       old_control if isinstance(old_control, str) else None)
    check_security(config, "primary", [config.listen, config.control, *config.peer_channels])
    if config.curve is not None and config.curve.server_public is not None and isinstance(old_control, str):
        config.peer_server_keys = {old_control: config.curve.server_public}
    epoch = next_epoch(store, seen_epoch if isinstance(seen_epoch, int) else 0)
    return epoch, lacks, store.role


def run_primary(config: NodeConfig, takeover: PromoteRequest | None = None,
                on_promoted: Callable[[Takeover], None] | None = None) -> int:
    """Run a primary in the foreground until its mount ends; returns the exit code.

    With `takeover`, the data directory is a stopped standby's (or, forced, a former
    primary's) and becomes the primary of a new epoch before it mounts; `on_promoted` is
    told how. Raises PromotionRefused (before changing anything) if it must not be,
    WrongRole for a standby's data directory started without `takeover`, and SecurityError
    (before binding) for replication off the machine without keys."""
    from fs.mounting import serve
    from fs.operations import TandemFS

    if takeover is None:
        check_security(config, "primary")  # (a takeover's addresses are checked once decided)
    node = Node(config, "primary")
    lock = NodeLock(config.data)  # before creating anything in the directory
    lock.release()
    if takeover is not None and not is_store(config.data):
        raise PromotionRefused(f"{config.data} holds no store: there is nothing to promote")
    node._adopt(_open_primary_store(config))
    store = node.store
    assert store is not None and node.checkpoints is not None
    try:
        if takeover is not None:
            epoch, lacks, last_role = _take_over_offline(store, config, takeover)
        elif store.role == "standby":
            raise WrongRole(f"{config.data} is a standby's data directory: promote it (mount.py promote "
                            "--data DIR --mount MNT), so that it takes a new epoch, instead of running it as "
                            "a primary of its old primary's epoch")
        node._start_common()
        if config.listen:
            node.replication = PrimaryReplication(
                store, node.checkpoints, config.listen, config.control or default_side_channel(config.listen),
                durability=config.durability or Durability.ASYNC, sync_timeout=config.sync_timeout,
                on_standby_loss=config.on_standby_loss, request_checkpoint=node.request_checkpoint,
                stopping=session_exiting,
                peers=config.peer_channels or [default_side_channel(a) for a in config.peers],
                name=config.name or default_name(config.data), taking_over=takeover is not None,
                curve=config.curve, peer_server_keys=config.peer_server_keys)
            node.replication.start()
        else:
            if config.durability not in (None, Durability.ASYNC):
                log.warning("--durability %s without --listen: there is no standby to wait for",
                            config.durability.value)
            if takeover is None:
                fenced_on_disk(store)
        if takeover is not None:
            took_over_at = store.last_seq
            seq = store.begin_epoch(epoch)
            store.make_writable()
            node.takeover = Takeover(
                epoch=epoch, seq=seq, took_over_at=took_over_at, announced=took_over_at + lacks, lacks=lacks,
                listen=config.listen, control=config.control,
                durability=(config.durability or Durability.ASYNC).value,
                on_standby_loss=config.on_standby_loss.value, mount=config.mount,
                peers=list(config.peer_channels), auto=False, forced=takeover.force)
            log.warning("PROMOTED (stopped %s): primary of epoch %d from seq %d (took over after seq %d, "
                        "%d record(s) announced by the old primary not held here)", last_role, epoch, seq,
                        took_over_at, lacks)
        if store.role != "primary":
            store.set_meta(META_ROLE, b"primary")
        if takeover is not None and on_promoted is not None:
            assert node.takeover is not None
            on_promoted(node.takeover)
        assert config.mount is not None
        serve(TandemFS(store, fsync_hook=node.fsync_hook), config.mount)
    finally:
        node.shutdown()
    return node.exit_code


def run_standby(config: NodeConfig) -> int:
    """Follow a primary in the foreground until SIGTERM/SIGINT; returns the exit code.

    Promoted meanwhile, it goes on as the primary until the same signals (or unmount)."""
    from fs.mounting import serve, unmount
    from fs.operations import TandemFS

    assert config.primary is not None
    check_security(config, "standby")
    node = Node(config, "standby")
    data = config.data
    data.mkdir(parents=True, exist_ok=True)
    NodeLock(data).release()
    if is_store(data):
        node._adopt(Store(data, max_size=config.max_size))
    elif any(entry.name not in _BOOTSTRAP_LEFTOVERS for entry in data.iterdir()):
        log.error("%s is neither empty nor a tandemfs store", data)
        return 2
    else:
        log.info("no store at %s yet: creating one from the primary %s", data, config.primary)

    def on_fatal(reason: str) -> None:
        node.fatal = reason
        node.exit_code = 3
        node._stop.set()
        node._wake.set()
        if config.mount and os.path.ismount(config.mount):
            unmount(config.mount)

    def on_signal(signum: int, frame: object) -> None:
        node._stop.set()
        node._wake.set()

    node.on_fatal = on_fatal
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        node._start_common()
        node.follower = Follower(
            data, config.primary, config.control or default_side_channel(config.primary),
            store=node.store, name=config.name or default_name(data), max_size=config.max_size,
            on_store=node._adopt, on_fatal=on_fatal, curve=config.curve)
        if node.store is not None:
            node.follower._set_store(node.store)
        node.follower.start()
        if config.auto_promote_after is not None:
            threading.Thread(target=node._auto_promote, args=(config.auto_promote_after,),
                             name="auto-promote", daemon=True).start()
        # The main thread mounts (now, or when a promotion asks for it) and runs the FUSE loop.
        while not node._stop.is_set():
            mountpoint = config.mount or node._mount_request
            if mountpoint and node.store is not None:
                # libfuse handles SIGTERM/SIGINT (ending the loop and unmounting) only where
                # they have their default action; a Python handler could not run while the
                # main thread is inside the loop.
                for sig in previous:
                    signal.signal(sig, signal.SIG_DFL)
                try:
                    # ends on SIGTERM/SIGINT or unmount
                    serve(TandemFS(node.store, fsync_hook=node.fsync_hook), mountpoint)
                finally:
                    for sig in previous:
                        signal.signal(sig, on_signal)
                break
            node._wake.wait(0.2)
            node._wake.clear()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        node.shutdown()
    if node.fatal:
        log.error("standby stopped: %s", node.fatal)
    return node.exit_code
