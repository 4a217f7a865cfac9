"""Small pieces both ends of replication share: socket setup, counters, loud-but-bounded logs.

Each ZeroMQ socket belongs to one thread; a thread that owns sockets binds or connects
them itself and reports the outcome to whoever started it (`Started`), so a port already
in use fails the command at start instead of leaving a node that serves nothing.

Every replication socket is made by `make_socket`, which is also where CurveZMQ is set
(replica/security.py): the sockets that bind (PUB, ROUTER) are CURVE servers, the ones
that connect (SUB, DEALER) CURVE clients, so no socket can be left in the clear by
forgetting it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter

import zmq

from .protocol import MAX_FRAME
from .security import Curve

#: Heartbeats per second on the stream (the design asks for "a few times a second").
HEARTBEAT_INTERVAL = 0.2
#: A standby that said nothing for this long is disconnected (it acks at least twice a second).
PEER_TIMEOUT = 3.0
#: How often a standby acknowledges when nothing changed (its keepalive).
ACK_INTERVAL = 0.5

#: Test hooks: tiny high-water marks and kernel buffers make the PUB drop messages.
ENV_PUB_SNDHWM = "TANDEMFS_PUB_SNDHWM"
ENV_SUB_RCVHWM = "TANDEMFS_SUB_RCVHWM"
ENV_SNAPSHOT_CHUNK = "TANDEMFS_SNAPSHOT_CHUNK"
ENV_SNAPSHOT_CREDIT = "TANDEMFS_SNAPSHOT_CREDIT"


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        logging.getLogger(__name__).warning("ignoring %s=%r: not an integer", name, raw)
        return default


#: Socket kinds that bind (CURVE servers) and that connect (CURVE clients).
SERVER_KINDS = (zmq.PUB, zmq.ROUTER)
CLIENT_KINDS = (zmq.SUB, zmq.DEALER)


def make_socket(ctx: zmq.Context, kind: int, curve: Curve | None = None) -> zmq.Socket:
    """A socket with the options every replication socket has; with `curve`, a CURVE
    server (PUB, ROUTER: the context needs a ZAP handler, `security.start_authenticator`)
    or a client of `curve.server_public` (SUB, DEALER)."""
    sock = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        if kind in (zmq.SUB, zmq.ROUTER, zmq.DEALER):
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME)
        if curve is not None:
            if kind in SERVER_KINDS:
                curve.server(sock)
            elif kind in CLIENT_KINDS:
                curve.client(sock)
            else:
                raise ValueError(f"no CURVE role for socket type {kind}")
    except BaseException:
        sock.close()
        raise
    return sock


class Started:
    """A thread's report that its sockets are bound (or why they are not)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.error: BaseException | None = None

    def ok(self) -> None:
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._event.set()

    def wait(self, timeout: float = 10.0) -> None:
        if not self._event.wait(timeout):
            raise TimeoutError("replication thread did not start")
        if self.error is not None:
            raise self.error


class DropCounter:
    """Messages dropped, by kind; logs each kind at most once per `every` seconds."""

    def __init__(self, logger: logging.Logger, what: str, every: float = 5.0) -> None:
        self.counts: Counter[str] = Counter()
        self._log = logger
        self._what = what
        self._every = every
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def drop(self, kind: str, detail: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            now = time.monotonic()
            if now - self._last.get(kind, -self._every) < self._every:
                return
            self._last[kind] = now
            total = self.counts[kind]
        self._log.warning("dropped %s message (%s, %d so far): %s", self._what, kind, total, detail)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())
