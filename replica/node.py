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
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from journal.checkpoints import (
    DEFAULT_INTERVAL,
    DEFAULT_KEEP,
    Checkpoints,
    RetentionPolicy,
    prune_point,
)
from journal.schema import META_ROLE
from journal.store import Store, is_store

from .control import ControlServer, NodeLock
from .primary import Durability, OnStandbyLoss, PrimaryReplication
from .standby import INCOMING, Follower

log = logging.getLogger(__name__)

#: How often the maintenance thread looks at checkpoints and retention (seconds).
MAINTENANCE_TICK = 1.0
#: Entries a standby's data directory may hold before it has a store.
_BOOTSTRAP_LEFTOVERS = {INCOMING, "node.lock", "control.sock", "checkpoints"}


@dataclass
class NodeConfig:
    data: Path
    mount: str | None = None
    max_size: int | None = None
    group_commit: bool = False
    # primary
    listen: str | None = None
    control: str | None = None  # the side channel: bound by a primary, reached by a standby
    durability: Durability = Durability.ASYNC
    sync_timeout: float = 5.0
    on_standby_loss: OnStandbyLoss = OnStandbyLoss.BLOCK
    # standby
    primary: str | None = None
    name: str = ""
    # both
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    checkpoint_interval: float = DEFAULT_INTERVAL
    keep_checkpoints: int = DEFAULT_KEEP


def fuse_session_exiting() -> bool:
    """Called from a FUSE worker thread: is libfuse shutting the session down?

    On SIGTERM/SIGINT libfuse marks its session as exited and then waits for every busy
    worker, so an fsync blocked waiting for a standby (block mode) would hold the process
    forever. The waiting worker polls this and gives up instead. It asks libfuse through
    the binding's ctypes handle; if that is unavailable it answers False (waits go on).
    """
    try:
        from fs import binding

        lib = binding._binding._libfuse  # both fusepy and mfusepy load libfuse as _libfuse
        if lib.fuse_get_session.restype is not ctypes.c_void_p:
            lib.fuse_get_session.restype = ctypes.c_void_p
            lib.fuse_get_session.argtypes = [ctypes.c_void_p]
            lib.fuse_session_exited.argtypes = [ctypes.c_void_p]
        context = lib.fuse_get_context()
        if not context or not context.contents.fuse:
            return False
        session = lib.fuse_get_session(ctypes.c_void_p(context.contents.fuse))
        return bool(session) and bool(lib.fuse_session_exited(ctypes.c_void_p(session)))
    except (ImportError, AttributeError, ValueError):
        return False


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

    # --- store ------------------------------------------------------------------------
    def _adopt(self, store: Store) -> None:
        self.store = store
        self.checkpoints = Checkpoints(store, self.config.keep_checkpoints)
        self._store_ready.set()

    # --- services common to both roles -------------------------------------------------
    def _start_common(self) -> None:
        self._lock = NodeLock(self.config.data)
        self._control = ControlServer(self.config.data, {
            "status": lambda request: self.status(),
            "checkpoint": lambda request: self._checkpoint_command(),
            "digest": lambda request: self._digest(),
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

    def _digest(self) -> dict[str, Any]:
        from journal.check import digest

        store = self._require_store()
        with store.shared():
            value, seq = digest(store)
        return {"digest": value, "seq": seq}

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
                due = time.monotonic() - last_checkpoint >= self.config.checkpoint_interval
                newest = self.checkpoints.newest()
                if requests or (due and (newest is None or newest.seq < self.store.last_seq)):
                    checkpoint = self.checkpoints.take()
                    last_checkpoint = time.monotonic()
                    pruned = self._retain()
                    for future in requests:
                        future.set_result((checkpoint, pruned))
                else:
                    self._retain()
            except Exception as exc:
                log.exception("maintenance failed")
                for future in requests:
                    if not future.done():
                        future.set_exception(exc)

    def _can_maintain(self) -> bool:
        return self.follower is None or self.follower.state.value in ("following", "catching-up")

    def _retain(self) -> dict[str, Any] | None:
        """Prune the journal as far as checkpoints, standbys and the retention bound allow;
        returns what was pruned, if anything."""
        store, checkpoints = self.store, self.checkpoints
        assert store is not None and checkpoints is not None
        newest = checkpoints.newest()
        if newest is None:
            return None
        acks = self.replication.standby_positions() if self.replication else {}
        first = store.first_seq()
        below, given_up = prune_point(self.config.retention, first_seq=first, last_seq=store.last_seq,
                                      checkpoint_seq=newest.seq, standby_acks=acks,
                                      journal_bytes=store.journal_bytes())
        if given_up and self.replication:
            self.replication.forget(given_up)
        if below > first:
            removed = store.prune(below)
            self.last_prune = {"below": below, "removed": removed, "time": time.time()}
            log.info("pruned %d journal records below seq %d", removed, below)
            return self.last_prune
        return None

    def fsync_hook(self, seq: int) -> None:
        """TandemFS's fsync hook on either role: wait as the current durability mode asks.

        Indirect on purpose: a standby promoted in place keeps its mount, and its fsyncs
        start waiting for standbys the moment it starts replicating."""
        replication = self.replication
        if replication is not None:
            replication.wait_replicated(seq)

    # --- status -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "data": str(self.config.data), "pid": os.getpid(),
                               "mount": self.config.mount,
                               "uptime_seconds": round(time.time() - self.started, 1)}
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
            })
        dropped: dict[str, int] = {}
        if self.replication is not None:
            out["replication"] = self.replication.status()
            out["durability"] = self.replication.durability.value
            out["degraded"] = self.replication.degraded
            dropped.update(self.replication.drops.snapshot())
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
            dropped.update(follower["dropped"])
        if self._control is not None:
            for kind, count in self._control.drops.snapshot().items():
                dropped[f"control_{kind}"] = count
        out["dropped"] = dropped
        out["dropped_total"] = sum(dropped.values())
        out["fatal"] = self.fatal
        return out

    # --- running ------------------------------------------------------------------------
    def shutdown(self) -> None:
        self._stop.set()
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
        raise SystemExit(f"{data} is neither empty nor a tandemfs store")
    store = Store.create(data, max_size=config.max_size, group_commit=config.group_commit)
    log.info("created store %s (cluster %s)", data, store.cluster_id.hex())
    return store


def run_primary(config: NodeConfig) -> int:
    """Run a primary in the foreground until its mount ends; returns the exit code."""
    from fs.mounting import serve
    from fs.operations import TandemFS

    node = Node(config, "primary")
    lock = NodeLock(config.data)  # before creating anything in the directory
    lock.release()
    node._adopt(_open_primary_store(config))
    store = node.store
    assert store is not None and node.checkpoints is not None
    try:
        if store.role != "primary":
            store.set_meta(META_ROLE, b"primary")
        node._start_common()
        if config.listen:
            node.replication = PrimaryReplication(
                store, node.checkpoints, config.listen, config.control or default_side_channel(config.listen),
                durability=config.durability, sync_timeout=config.sync_timeout,
                on_standby_loss=config.on_standby_loss, request_checkpoint=node.request_checkpoint,
                stopping=fuse_session_exiting)
            node.replication.start()
        elif config.durability is not Durability.ASYNC:
            log.warning("--durability %s without --listen: there is no standby to wait for",
                        config.durability.value)
        serve(TandemFS(store, fsync_hook=node.fsync_hook), config.mount)
    finally:
        node.shutdown()
    return node.exit_code


def run_standby(config: NodeConfig) -> int:
    """Follow a primary in the foreground until SIGTERM/SIGINT; returns the exit code."""
    from fs.mounting import serve, unmount
    from fs.operations import TandemFS

    assert config.primary is not None
    node = Node(config, "standby")
    data = config.data
    data.mkdir(parents=True, exist_ok=True)
    NodeLock(data).release()
    if is_store(data):
        node._adopt(Store(data, max_size=config.max_size))
    elif any(entry.name not in _BOOTSTRAP_LEFTOVERS for entry in data.iterdir()):
        log.error("%s is neither empty nor a tandemfs store", data)
        return 2

    def on_fatal(reason: str) -> None:
        node.fatal = reason
        node.exit_code = 3
        node._stop.set()
        if config.mount and os.path.ismount(config.mount):
            unmount(config.mount) or unmount(config.mount, lazy=True)

    def on_signal(signum: int, frame: object) -> None:
        node._stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        node._start_common()
        node.follower = Follower(
            data, config.primary, config.control or default_side_channel(config.primary),
            store=node.store, name=config.name or default_name(data), max_size=config.max_size,
            on_store=node._adopt, on_fatal=on_fatal)
        if node.store is not None:
            node.follower._set_store(node.store)
        node.follower.start()
        if config.mount:
            while not node._store_ready.wait(0.2):
                if node._stop.is_set():
                    return node.exit_code
            if not node._stop.is_set():
                assert node.store is not None
                # libfuse handles SIGTERM/SIGINT (ending the loop and unmounting) only where
                # they have their default action; a Python handler could not run while the
                # main thread is inside the loop.
                for sig in previous:
                    signal.signal(sig, signal.SIG_DFL)
                try:
                    # ends on SIGTERM/SIGINT or unmount
                    serve(TandemFS(node.store, fsync_hook=node.fsync_hook), config.mount)
                finally:
                    for sig in previous:
                        signal.signal(sig, on_signal)
        else:
            while not node._stop.wait(0.5):
                pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        node.shutdown()
    if node.fatal:
        log.error("standby stopped: %s", node.fatal)
    return node.exit_code
