"""CurveZMQ for replication traffic: keys, and which sockets must use them.

By default every node of a cluster derives one CURVE keypair from the cluster secret: 32
random bytes in a file of mode 0600 (default DEFAULT_SECRET), which the first primary
creates and the operator copies to the other machines (like DRBD's `shared-secret`).
Every node uses that keypair both as a server and as a client, and admits exactly its
public key, so whoever cannot read the secret file (on one machine: any other local user)
cannot complete a handshake: it reads nothing from the stream and cannot say hello. A
standby never creates the secret; it must find it. A secret file that others could read,
or that belongs to another user, is refused. `--insecure` is the explicit opt-out.

Alternatively each node has its own keypair, made by `mount.py keygen` (ZeroMQ's certificate files:
NAME.key holds the public key, NAME.key_secret both). A node that serves (a primary, or
a standby once promoted) is a CURVE server with its own secret key and admits only the
clients whose public keys lie in its peers directory; a standby is a CURVE client that
knows the public key of the primary it follows. The handshake authenticates both ends
and encrypts every frame, so a message that reaches `protocol.decode` came from a node
the operator admitted.

Traffic that leaves the machine must be protected: `require_for` refuses a non-loopback
endpoint without keys unless the operator says `--insecure` in so many words.

How keys are distributed, and how a node learns whom it talks to:
- One peers directory for the whole cluster: every node's public NAME.key, copied to
  every machine. Every node is given it (`--curve-peers`), so whichever node serves
  admits all the others: standbys, an old primary rejoining as a standby, and the PEER
  probes of another primary (replica/fencing.py), which connect to the side channel as
  clients like any standby.
- A standby names the public key of the primary it follows (`--curve-server`). Once
  promoted it serves with its own secret key and the peers directory, and its PEER probe
  towards the primary it followed uses that same key.
- A PEER probe towards a `--peer` address, whose key no option names, tries the public
  keys in the peers directory other than the node's own, one socket each: only the
  socket holding the right key completes the handshake (the others fail it and are
  closed once the right one has answered). With two nodes there is exactly one such key.
- Admission is decided by the public keys in the peers directory when a client connects;
  a key not admitted makes the directory be read again (at most once a second), so a new
  node's key dropped into it is admitted without restarting the server.

A client that the server refuses gets nothing at all: ZeroMQ ends the connection during
the handshake. `HandshakeWatch` turns the socket's monitor events into a diagnosis (the
primary refuses this node's key, the primary's key is wrong, only one side uses CURVE,
no connection at all), which the standby logs and shows in its status. libzmq never
retries a connection whose handshake the server refused, so the standby and the PEER
probes connect afresh now and then: a key admitted later is used without a restart.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

#: An unknown key re-reads the peers directory at most this often (seconds).
RELOAD_EVERY = 1.0
#: Refused keys are logged at most this often, one line for all of them (seconds).
REFUSED_LOG_EVERY = 60.0
#: Refused keys listed in status (the newest; a total counts all of them).
REFUSED_KEYS_SHOWN = 16
#: Where the cluster secret lives unless --secret names another file.
DEFAULT_SECRET = Path("/etc/tandemfs/cluster.secret")
#: Random bytes in a cluster secret (written as hex, one line).
SECRET_BYTES = 32
#: Domain separation of the key derivation: a cluster secret yields CURVE keys and nothing else.
_KDF_SALT = b"tandemfs cluster secret v1"
_KDF_INFO = b"tandemfs curve25519 secret key"


class SecurityError(Exception):
    """Keys missing, unreadable or not allowed for this endpoint."""


def key_text(key: bytes | None) -> str | None:
    """A public key as text (Z85, 40 characters), as it appears in NAME.key."""
    return None if key is None else key.decode("ascii", "replace")


@dataclass(frozen=True)
class Curve:
    """One node's CURVE keys: its own pair, whom it admits, whom it trusts as primary.

    Keys are kept in Z85 (40 bytes), as `zmq.auth.load_certificate` returns them and as
    libzmq's socket options accept them."""

    public: bytes
    secret: bytes = dataclasses.field(repr=False)
    #: Public keys of the nodes allowed to connect when this node serves.
    peers_dir: Path | None = None
    #: Public key of the primary this node follows (standbys).
    server_public: bytes | None = None
    #: Public keys admitted whatever the peers directory holds (the cluster key).
    members: frozenset[bytes] = frozenset()
    #: The cluster secret the keys were derived from (None: per-node keys).
    secret_file: Path | None = None

    def can_serve(self) -> bool:
        """Whether these keys say whom to admit (a node that serves must know)."""
        return self.peers_dir is not None or bool(self.members)

    def server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def client(self, sock: zmq.Socket) -> None:
        if self.server_public is None:
            raise SecurityError("no public key of the primary to follow (--curve-server or --secret)")
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public

    def towards(self, server_public: bytes) -> Curve:
        """The same keys, as a client of the server whose public key is `server_public`."""
        return dataclasses.replace(self, server_public=server_public)

    def peer_keys(self) -> list[bytes]:
        """The public keys in the peers directory other than this node's own (the keys a
        PEER probe tries towards an address whose key it was not told); with a cluster
        secret, the cluster key, which every node serves with."""
        if self.secret_file is not None:
            return [self.public]
        if self.peers_dir is None:
            return []
        return sorted(key for key in read_peers(self.peers_dir) if key != self.public)

    def describe(self) -> dict[str, Any]:
        """For status: which keys are in use (public keys only)."""
        if self.secret_file is not None:
            return {"mechanism": "curve", "public_key": key_text(self.public),
                    "secret_file": str(self.secret_file)}
        return {"mechanism": "curve", "public_key": key_text(self.public),
                "peers_dir": str(self.peers_dir) if self.peers_dir else None,
                "server_key": key_text(self.server_public)}


def keygen(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (secret, mode 0600) into `directory`.

    The pair is made in a private temporary directory and moved into place, so the secret
    is never readable by others, not even for a moment; existing files are not replaced."""
    if not name or "/" in name or name.startswith("."):
        raise SecurityError(f"not a usable key name: {name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise SecurityError(f"{path} exists already: not replacing a key (remove it first)")
    scratch = Path(tempfile.mkdtemp(prefix=".keygen-", dir=directory))  # mode 0700
    try:
        made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(str(scratch), name))
        os.chmod(made_secret, 0o600)
        os.chmod(made_public, 0o644)
        os.replace(made_secret, secret)
        os.replace(made_public, public)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return public, secret


def load(secret_file: str | os.PathLike, peers_dir: str | os.PathLike | None = None,
         server_public_file: str | os.PathLike | None = None) -> Curve:
    """A node's keys from its NAME.key_secret, its peers directory (to serve) and the public
    key of the primary it follows; raises SecurityError with the reason."""
    try:
        public, secret = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read CURVE keys from {secret_file}: {exc}") from exc
    if secret is None:
        raise SecurityError(f"{secret_file} holds no secret key (give NAME.key_secret)")
    mode = os.stat(secret_file).st_mode
    if stat.S_IMODE(mode) & 0o077:
        log.warning("%s is readable by others (mode %o): chmod 600 it", secret_file, stat.S_IMODE(mode))
    server_public = None
    if server_public_file is not None:
        try:
            server_public, _ = zmq.auth.load_certificate(str(server_public_file))
        except (OSError, ValueError) as exc:
            raise SecurityError(f"cannot read the primary's public key {server_public_file}: {exc}") from exc
    if peers_dir is not None and not Path(peers_dir).is_dir():
        raise SecurityError(f"peers directory {peers_dir} does not exist")
    return Curve(public, secret, Path(peers_dir) if peers_dir else None, server_public)


# --- the cluster secret --------------------------------------------------------------------

def derive_keys(secret: bytes) -> tuple[bytes, bytes]:
    """The cluster's CURVE keypair (public, secret; Z85) from its secret: HKDF-SHA256
    (RFC 5869), salted and labelled for this one use."""
    prk = hmac.new(_KDF_SALT, secret, hashlib.sha256).digest()
    raw = hmac.new(prk, _KDF_INFO + b"\x01", hashlib.sha256).digest()
    secret_key = z85.encode(raw)
    return zmq.curve_public(secret_key), secret_key


def _how_to_copy(path: Path) -> str:
    return (f"copy it from the primary's machine (e.g. scp -p PRIMARY:{path} {path}; mode 0600, owned by the "
            "user that runs tandemfs) or give --secret FILE")


def create_secret(path: str | os.PathLike) -> bool:
    """Create the cluster secret at `path` unless it exists; True if this call made it.

    The file is written under a temporary name (mode 0600 from the start) in the same
    directory and linked into place, so it is never seen half-written or readable by
    others, and of two nodes creating it at once one wins and both use its secret. A
    directory that has to be made is made 0700."""
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            return False
        fd, scratch = tempfile.mkstemp(prefix=".cluster-secret-", dir=path.parent)  # mode 0600
    except OSError as exc:
        raise SecurityError(f"cannot create the cluster secret {path}: {exc.strerror or exc}; give "
                            "--secret FILE") from exc
    try:
        with os.fdopen(fd, "w") as out:
            out.write(os.urandom(SECRET_BYTES).hex() + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(scratch, path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise SecurityError(f"cannot create the cluster secret {path}: {exc.strerror or exc}; give "
                                "--secret FILE") from exc
    finally:
        os.unlink(scratch)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    log.warning("created the cluster secret %s (mode 0600): copy it to every other machine of this cluster",
                path)
    return True


def read_secret(path: str | os.PathLike) -> bytes:
    """The cluster secret in `path`; raises SecurityError (one line: what is wrong, what to
    do) if it is missing, unreadable, readable by others, not this user's, or not a secret."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SecurityError(f"no cluster secret at {path}: {_how_to_copy(path)}") from None
    except OSError as exc:
        raise SecurityError(f"cannot read the cluster secret {path}: {exc.strerror or exc} (it must "
                            "belong to the user that runs tandemfs, mode 0600); give --secret FILE") from None
    with os.fdopen(fd, "rb") as source:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SecurityError(f"the cluster secret {path} is not a regular file")
        if info.st_uid != os.geteuid():
            raise SecurityError(f"the cluster secret {path} belongs to uid {info.st_uid}, not to the user "
                                f"running tandemfs (uid {os.geteuid()}): chown it, or give --secret FILE")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise SecurityError(f"the cluster secret {path} is readable by others (mode "
                                f"{stat.S_IMODE(info.st_mode):o}): chmod 600 it, and make a new secret for "
                                "the cluster if someone may have read it")
        raw = source.read(4 * SECRET_BYTES)
    try:
        secret = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise SecurityError(f"{path} is not a cluster secret ({2 * SECRET_BYTES} hex digits on one line)")
    return secret


def cluster_keys(path: str | os.PathLike, create: bool = False) -> Curve:
    """The CURVE keys every node of the cluster derives from the secret in `path` (made
    first if `create` and there is none: the first primary's start); raises SecurityError."""
    path = Path(path)
    if create:
        create_secret(path)
    public, secret = derive_keys(read_secret(path))
    return Curve(public, secret, server_public=public, members=frozenset({public}),
                 secret_file=path.absolute())


def read_peers(directory: Path) -> set[bytes]:
    """The public keys of the *.key files in `directory` (a file that is not one is skipped)."""
    keys = set()
    for path in sorted(directory.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as exc:
            log.warning("skipping %s in the peers directory: %s", path, exc)
            continue
        if public:
            keys.add(public)
    return keys


class PeerKeys:
    """The ZAP credentials provider: admits the cluster key or the public keys in the peers
    directory, and counts and logs the keys it refuses (a node that follows with a key
    nobody added, or that has another cluster secret); the refused keys it remembers are
    bounded, so a flood of them costs neither memory nor a long status."""

    def __init__(self, directory: Path | None, members: frozenset[bytes] = frozenset(),
                 secret_file: Path | None = None) -> None:
        self.directory = directory
        self.members = members
        self.secret_file = secret_file
        self._lock = threading.Lock()
        self._keys = self._read()
        self._read_at = time.monotonic()
        self.admitted = 0
        self.refused: dict[str, int] = {}
        self.refused_total = 0
        self._logged_at = -REFUSED_LOG_EVERY
        if not self._keys:
            log.warning("the peers directory %s holds no public key (*.key): no node can connect", directory)

    def _read(self) -> set[bytes]:
        return set(self.members) | (read_peers(self.directory) if self.directory is not None else set())

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator's thread with the client's public key in Z85."""
        with self._lock:
            if key not in self._keys and self.directory is not None \
                    and time.monotonic() - self._read_at >= RELOAD_EVERY:
                self._keys = self._read()
                self._read_at = time.monotonic()
            if key in self._keys:
                self.admitted += 1
                return True
            text = key.decode("ascii", "replace")
            self.refused_total += 1
            count = self.refused.pop(text, 0) + 1
            self.refused[text] = count  # the newest last
            while len(self.refused) > REFUSED_KEYS_SHOWN:
                del self.refused[next(iter(self.refused))]
            now = time.monotonic()
            # One line per REFUSED_LOG_EVERY for all keys together: a flood of keys is one line.
            loud = now - self._logged_at >= REFUSED_LOG_EVERY
            if loud:
                self._logged_at = now
            total = self.refused_total
        if loud and self.secret_file is not None:
            log.warning("REFUSED a node whose CURVE public key %s is not this cluster's (%d refused "
                        "handshake(s) so far): it does not hold the cluster secret %s", text, total,
                        self.secret_file)
        elif loud:
            log.warning("REFUSED a node whose CURVE public key %s is not in %s (%d refused handshake(s) so "
                        "far): copy its NAME.key there to admit it", text, self.directory, total)
        return False

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"admitted_keys": len(self._keys), "handshakes_admitted": self.admitted,
                    "refused_keys": dict(self.refused), "refused_handshakes": self.refused_total}


class Admission:
    """A running ZAP handler for one ZeroMQ context (stop it before terminating the context)."""

    def __init__(self, authenticator: ThreadAuthenticator, keys: PeerKeys) -> None:
        self.authenticator = authenticator
        self.keys = keys

    def stop(self) -> None:
        self.authenticator.stop()

    def status(self) -> dict[str, Any]:
        return self.keys.status()


def start_authenticator(ctx: zmq.Context, curve: Curve) -> Admission:
    """ZAP handler admitting exactly the cluster key, or the public keys in the peers directory.

    Start it before any CURVE server socket of `ctx` binds: without a ZAP handler libzmq
    admits every client that completes the handshake."""
    if not curve.can_serve():
        raise SecurityError("serving with CURVE needs a peers directory (--curve-peers)")
    keys = PeerKeys(curve.peers_dir, curve.members, curve.secret_file)
    auth = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
    auth.start()
    auth.configure_curve_callback(domain="*", credentials_provider=keys)
    return Admission(auth, keys)


def is_loopback(endpoint: str) -> bool:
    """Whether a tcp:// (or ipc://, inproc://) endpoint stays on this machine."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name or a wildcard ("*", "0.0.0.0"): may leave the machine


def require_for(endpoints: list[str], curve: Curve | None, insecure: bool) -> None:
    """Refuse to carry replication traffic off the machine in the clear (the command line
    gives every node keys unless --insecure); warn of it in the clear on this machine."""
    if curve is not None or not any(endpoints):
        return
    leaving = [e for e in endpoints if e and not is_loopback(e)]
    if insecure:
        log.warning("replication traffic on %s is NOT authenticated or encrypted (--insecure): %s",
                    ", ".join(e for e in endpoints if e),
                    "anyone who reaches these ports can read it" if leaving else
                    "any user of this machine can read it")
        return
    if not leaving:
        return
    what = "is not a loopback address" if len(leaving) == 1 else "are not loopback addresses"
    raise SecurityError(
        f"{', '.join(leaving)} {what}: replication traffic must use CurveZMQ "
        "(a cluster secret, --secret, or per-node keys, --curve-*), or say --insecure")


# --- what a client's handshakes say ------------------------------------------------------

_FAILED = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no_detail",
}
_WATCHED = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class HandshakeWatch:
    """A client socket's monitor: what became of its connections and handshakes.

    `poll_socket` joins the owner's poller; `drain` reads the events (in the thread that
    owns the socket). `retry_due` tells when a connection the server ended for good (a
    refused key, a mechanism mismatch: libzmq does not reconnect after those) should be
    made again, so that a fixed configuration is picked up without a restart."""

    def __init__(self, sock: zmq.Socket, curve: Curve | None, what: str = "the primary") -> None:
        self.sock = sock
        self.curve = curve
        self.what = what
        self.monitor: zmq.Socket = sock.get_monitor_socket(_WATCHED)
        self.state = "connecting"  # connecting | connected | handshake-ok | handshake-failed
        self.failure: str | None = None
        self.failures = 0
        self.succeeded = 0
        self.connect_attempts = 0
        self.since = time.monotonic()
        self._ended_at: float | None = None

    @property
    def poll_socket(self) -> zmq.Socket:
        return self.monitor

    def drain(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            self._event(int(event["event"]), int(event["value"]))

    def _event(self, event: int, value: int) -> None:
        now = time.monotonic()
        if event == zmq.EVENT_CONNECTED:
            self.state, self.since = "connected", now
        elif event == zmq.EVENT_CONNECT_RETRIED:
            self.connect_attempts += 1
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self.failure is not None:
                log.info("handshake with %s succeeds again", self.what)
            self.state, self.since, self.failure = "handshake-ok", now, None
            self.succeeded += 1
            self._ended_at = None
        elif event in _FAILED:
            kind = _FAILED[event]
            first = self.failure != kind
            self.state, self.since, self.failure = "handshake-failed", now, kind
            self.failures += 1
            if kind in ("refused", "protocol"):
                self._ended_at = now  # libzmq gives this connection up: retry_due reconnects
            if first:
                log.warning("handshake with %s failed: %s", self.what, self.explain())
        elif event == zmq.EVENT_DISCONNECTED and self.state != "handshake-failed":
            self.state, self.since = "connecting", now

    def retry_due(self, after: float) -> bool:
        """True (once) when a connection ended for good at least `after` seconds ago."""
        if self._ended_at is None or time.monotonic() - self._ended_at < after:
            return False
        self._ended_at = None
        return True

    def explain(self) -> str:
        """What is known of why `what` does not answer, in words for an operator."""
        mine = key_text(self.curve.public) if self.curve else None
        shared = self.curve.secret_file if self.curve else None
        if shared is not None and self.failure in ("refused", "no_detail"):
            return (f"the CURVE handshake with {self.what} fails: it does not hold the same cluster "
                    f"secret as this node ({shared}): copy the primary's secret file here")
        if shared is not None and self.failure == "protocol":
            return (f"{self.what} and this node do not speak the same security mechanism: one of them runs "
                    "with --insecure (give it to both nodes, or to neither)")
        if self.failure == "refused":
            return (f"{self.what} REFUSES this node's CURVE public key {mine}: copy this node's NAME.key "
                    "into the --curve-peers directory of the node it connects to")
        if self.failure == "no_detail":
            return (f"the CURVE handshake with {self.what} fails: --curve-server is probably not its public "
                    "key (or its secret key does not match the key given here)")
        if self.failure == "protocol":
            return (f"{self.what} and this node do not speak the same security mechanism: one of them uses "
                    "CURVE keys and the other does not (give both nodes their --curve-* options, or neither)")
        if self.state == "handshake-ok":
            return f"connected to {self.what} (handshake ok), but it does not answer"
        if self.state == "connected":
            return f"connected to {self.what}, handshake not finished"
        return (f"no connection to {self.what} ({self.connect_attempts} attempt(s)): it is down, unreachable "
                "or not listening at this address")

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "failure": self.failure, "handshake_failures": self.failures,
                "handshakes": self.succeeded, "since_seconds": round(time.monotonic() - self.since, 3)}

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)

