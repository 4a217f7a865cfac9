"""The local control socket every running node serves: status, checkpoint, digest.

`mount.py status/checkpoint/digest/verify` talk to a running node through it instead of
opening its store, so they see the node's live view (seq, lag, standbys, counters) and
a digest taken consistently by the process that owns the store. The socket lives in
the data directory (`ipc://DATA/control.sock`); a unix socket path is limited to about
107 bytes, so a data directory with a long path gets a short one under /tmp named by a
hash of the directory instead. The request/reply format is in replica/protocol.py.

A running node also holds an exclusive lock on `DATA/node.lock` for its lifetime, which
is how a client tells "no node runs here" from "the node does not answer", and how two
nodes are kept off one data directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from journal.errors import FsError

from . import protocol as p
from .common import DropCounter, Started

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
LOCK_NAME = "node.lock"
#: sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class NodeNotRunning(Exception):
    """No node runs on this data directory."""


class ControlError(Exception):
    """The node runs but did not answer, or answered with an error."""


class DataDirBusy(Exception):
    """Another node already runs on this data directory."""


def socket_path(data: str | os.PathLike) -> Path:
    data = Path(data).resolve()
    path = data / SOCKET_NAME
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(os.fsencode(data)).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"tandemfs-{digest}.sock"


def control_endpoint(data: str | os.PathLike) -> str:
    return f"ipc://{socket_path(data)}"


class NodeLock:
    """The exclusive lock a running node holds on its data directory."""

    def __init__(self, data: str | os.PathLike) -> None:
        Path(data).mkdir(parents=True, exist_ok=True)
        self.path = Path(data) / LOCK_NAME
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise DataDirBusy(f"another node runs on {data}") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def node_running(data: str | os.PathLike) -> bool:
    path = Path(data) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class ControlServer:
    """A REP socket in its own thread, dispatching JSON requests to handlers."""

    def __init__(self, data: str | os.PathLike, handlers: dict[str, Handler]) -> None:
        self.endpoint = control_endpoint(data)
        self.path = socket_path(data)
        self.handlers = handlers
        self.drops = DropCounter(log, "control")
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        started = Started()
        self._thread = threading.Thread(target=self._run, args=(started,), name="control", daemon=True)
        self._thread.start()
        started.wait()
        log.info("control socket %s", self.endpoint)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._ctx.term()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _run(self, started: Started) -> None:
        sock = self._ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_CONTROL)
        try:
            sock.bind(self.endpoint)
            os.chmod(self.path, 0o600)
        except (zmq.ZMQError, OSError) as exc:
            sock.close()
            started.fail(exc)
            return
        started.ok()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                raw = sock.recv()
                sock.send(json.dumps(self._answer(raw), default=str).encode())
        finally:
            sock.close()

    def _answer(self, raw: bytes) -> dict[str, Any]:
        try:
            request = p.decode_control(raw, frozenset(self.handlers))
        except p.BadMessage as exc:
            self.drops.drop(exc.kind, exc.detail)
            return {"ok": False, "error": str(exc)}
        try:
            return {"ok": True, **self.handlers[request["cmd"]](request)}
        except FsError as exc:  # a refusal the node foresaw (e.g. no room for a checkpoint)
            log.info("control command %s refused: %s", request["cmd"], exc)
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # the answer says what failed; the node keeps serving
            log.exception("control command %s failed", request["cmd"])
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


#: How often a client waiting for an answer checks that the node still runs (seconds).
LIVENESS_INTERVAL = 0.25


def request(data: str | os.PathLike, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Ask the node running on `data`; raises NodeNotRunning (also when the node stops
    before it answers) or ControlError.

    A request may take long on a live node (a checkpoint of a large store), so the wait is
    bounded by `timeout` only while the node's lock is held: a node that dies (SIGKILL) is
    noticed within LIVENESS_INTERVAL, not after the whole timeout."""
    if not node_running(data):
        raise NodeNotRunning(f"no node runs on {data}")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(control_endpoint(data))
        sock.send(p.encode_control(cmd, **args))
        deadline = time.monotonic() + timeout
        while not sock.poll(int(min(LIVENESS_INTERVAL, max(0.0, deadline - time.monotonic())) * 1000)):
            if not node_running(data):
                raise NodeNotRunning(f"the node on {data} stopped before it answered {cmd!r} (its lock "
                                     f"{Path(data) / LOCK_NAME} is no longer held)")
            if time.monotonic() >= deadline:
                raise ControlError(f"the node on {data} did not answer {cmd!r} within {timeout:.0f}s")
        reply = json.loads(sock.recv())
    finally:
        sock.close()
    if not reply.get("ok"):
        raise ControlError(f"{cmd} failed: {reply.get('error')}")
    return reply
