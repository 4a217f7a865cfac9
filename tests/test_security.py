"""CurveZMQ on replication traffic, between real processes over loopback.

By default every node derives its keys from the cluster secret: the first primary
creates it (mode 0600 in a 0700 directory); a standby that cannot read it, or one
readable by others or owned by another user, fails with one line; another local user
(`nobody`) reads nothing off the stream or the side channel and registers nothing.
Forged HELLOs (no cluster id, another cluster's, malformed, in --insecure mode) register
nothing persistent, and the standbys a primary tracks are bounded.

With per-node keys (--curve-*), a primary and standbys replicate and reach equal digests; a standby the
primary does not admit (its key is not in the peers directory, it has the wrong key for
the primary, or it has no keys at all) gets nothing, stays up and says why, and a key
added to the peers directory is admitted without restarting anything; a standby promoted
in place serves with its own keys and fences its old primary through CURVE; a
non-loopback address without keys is refused at start; `keygen` writes a private secret.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq.auth

from replica import protocol as p
from replica import security
from replica.primary import MAX_STANDBYS
from tests.cluster import REPO, Cluster, cli, cluster_fixture, free_port_pair, wait_until  # noqa: F401

NAMES = ("a", "b", "c")


@dataclass
class Keys:
    """Keypairs a, b, c in `root`; `peers` holds the public keys of a and b only."""

    root: Path
    peers: Path

    def secret(self, name: str) -> str:
        return str(self.root / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.root / f"{name}.key")

    def text(self, name: str) -> str:
        public, _ = zmq.auth.load_certificate(self.public(name))
        return public.decode()

    def serving(self, name: str) -> list[str]:
        return ["--curve-secret", self.secret(name), "--curve-peers", str(self.peers)]

    def following(self, name: str, primary: str) -> list[str]:
        return [*self.serving(name), "--curve-server", self.public(primary)]


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    root, peers = tmp_path / "keys", tmp_path / "peers"
    for name in NAMES:
        security.keygen(root, name)
    peers.mkdir()
    for name in ("a", "b"):
        shutil.copy(root / f"{name}.key", peers)
    return Keys(root, peers)


def write_files(root: Path, count: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"f{i}").write_bytes(os.urandom(2000 + i))


def test_keygen_writes_a_private_secret(tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    result = cli("keygen", "--dir", str(keydir), "--name", "node1")
    assert result.returncode == 0, result.stderr
    public, secret = keydir / "node1.key", keydir / "node1.key_secret"
    assert result.stdout.splitlines() == [f"public: {public}", f"secret: {secret}"]
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    pair = zmq.auth.load_certificate(str(secret))
    assert pair[1] is not None
    assert zmq.auth.load_certificate(str(public)) == (pair[0], None)  # the public file holds no secret
    assert sorted(p.name for p in keydir.iterdir()) == ["node1.key", "node1.key_secret"]
    # Never replaces a key.
    again = cli("keygen", "--dir", str(keydir), "--name", "node1")
    assert again.returncode == 2 and "exists already" in again.stderr
    assert zmq.auth.load_certificate(str(secret)) == pair
    assert "usage" in cli("keygen", "--help").stdout


def one_line(result: subprocess.CompletedProcess) -> str:
    """The single line a refused command wrote (asserting there was one, and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, (
        result.returncode, result.stderr)
    return lines[0]


def test_keying_options_contradicting_each_other_are_refused(tmp_path: Path) -> None:
    port = free_port_pair()
    data = tmp_path / "data"
    secret = tmp_path / "cluster.secret"
    security.create_secret(secret)
    base = ["standby", "--data", str(data), "--primary", f"tcp://0.0.0.0:{port}"]
    assert "contradict" in one_line(cli(*base, "--secret", str(secret), "--insecure", timeout=30))
    security.keygen(tmp_path / "keys", "a")
    assert "give one of them" in one_line(cli(*base, "--secret", str(secret), "--curve-secret",
                                              str(tmp_path / "keys" / "a.key_secret"), timeout=30))
    assert not data.exists()  # refused before anything was made
    # What --insecure and keys mean (without sending anything anywhere).
    with pytest.raises(security.SecurityError):
        security.require_for([f"tcp://0.0.0.0:{port}"], None, insecure=False)
    security.require_for([f"tcp://0.0.0.0:{port}"], None, insecure=True)
    security.require_for([f"tcp://127.0.0.1:{port}", f"tcp://[::1]:{port}", "tcp://localhost:1"], None,
                         insecure=False)


@pytest.mark.fuse
def test_curve_primary_and_standby_replicate(cluster: Cluster, keys: Keys) -> None:
    primary = cluster.primary("p", *keys.serving("a"))
    standby = cluster.standby(primary, "s", *keys.following("b", "a"), mount=False)
    write_files(primary.mount / "d", 12)
    assert cluster.verify(primary, standby, deadline=20).startswith("match")
    p = primary.status()["replication"]["security"]
    assert (p["mechanism"], p["public_key"], p["admitted_keys"], p["refused_keys"]) == (
        "curve", keys.text("a"), 2, {})
    s = standby.status()
    assert s["security"]["public_key"] == keys.text("b") and s["security"]["server_key"] == keys.text("a")
    assert s["standby"]["link"]["state"] == "handshake-ok" and s["problem"] is None
    human = cli("status", "--data", str(standby.data)).stdout
    assert "CURVE" in human and keys.text("a") in human


@pytest.mark.fuse
def test_standby_not_admitted_gets_nothing(cluster: Cluster, keys: Keys) -> None:
    primary = cluster.primary("p", *keys.serving("a"))
    good = cluster.standby(primary, "good", *keys.following("b", "a"), mount=False)
    # c's key is not in the primary's peers directory; d has b's keys but takes c for the
    # primary's; e has no keys at all.
    refused = cluster.standby(primary, "refused", *keys.following("c", "a"), mount=False)
    wrong = cluster.standby(primary, "wrong", *keys.following("b", "c"), mount=False)
    clear = cluster.standby(primary, "clear", "--insecure", mount=False)
    write_files(primary.mount / "d", 10)
    cluster.verify(primary, good, deadline=20)
    expected = {refused: ("refused", "REFUSES this node's CURVE public key"),
                wrong: ("no_detail", "--curve-server is probably not its public key"),
                clear: ("protocol", "one of them uses CURVE keys and the other does not")}
    for proc, (failure, words) in expected.items():
        status = proc.wait_status(lambda s, words=words: words in (s.get("problem") or ""), 15,
                                  "the standby saying why the primary does not answer")
        follower = status["standby"]
        assert status["applied_seq"] == 0 and "last_seq" not in status  # not even a store
        assert follower["state"] == "connecting" and follower["link"]["failure"] == failure
        assert follower["stream_records"] == 0 and follower["fetched_records"] == 0
        assert "THE PRIMARY DOES NOT ANSWER" in proc.log_path.read_text()
    # The primary names the key it refused; it never counted the refused nodes as standbys.
    status = primary.status()
    assert keys.text("c") in status["replication"]["security"]["refused_keys"]
    assert [peer["name"] for peer in status["replication"]["standbys"]] == ["good"]
    assert "REFUSED key" in cli("status", "--data", str(primary.data)).stdout
    # Admitting c's key is a copy into the peers directory: the refused standby follows
    # without a restart of either node.
    shutil.copy(keys.public("c"), keys.peers)
    refused.wait_status(lambda s: s["standby"]["state"] == "following", 20, "following once admitted")
    cluster.verify(primary, refused, deadline=20)
    for proc in (refused, wrong, clear, good):
        assert proc.alive()
        assert proc.stop() == 0, proc.log()


@pytest.mark.fuse
def test_promoted_standby_serves_with_its_own_keys(cluster: Cluster, keys: Keys) -> None:
    primary = cluster.primary("p", *keys.serving("a"))
    standby = cluster.standby(primary, "s", *keys.following("b", "a"))
    write_files(primary.mount / "before", 5)
    cluster.verify(primary, standby, deadline=20)
    # Keys are the standby's own: a running node refuses new ones.
    refused = cli("promote", "--data", str(standby.data), "--curve-secret", keys.secret("c"))
    assert refused.returncode == 2 and "keys it was started with" in refused.stderr
    # Promoted while the old primary still runs: its PEER probe (a CURVE client with the
    # old primary's key) fences the old primary.
    cluster.promote(standby, "--listen", f"tcp://127.0.0.1:{free_port_pair()}")
    fenced = primary.wait_status(lambda s: s.get("fenced"), 10, "fenced by the promoted node's PEER")
    assert "epoch 2" in fenced["fenced"]
    status = standby.status()
    assert status["role"] == "primary" and status["security"]["public_key"] == keys.text("b")
    assert status["replication"]["peer_watch"]["answers"] > 0
    write_files(standby.mount / "after", 5)
    # The old primary rejoins as a standby of the new one, with the new one's public key.
    assert primary.stop() == 0, primary.log()
    rejoined = cluster.rejoin(primary, standby, *keys.following("a", "b"), mount=False)
    cluster.verify(standby, rejoined, deadline=20)
    assert rejoined.status()["standby"]["link"]["state"] == "handshake-ok"


# --- the cluster secret ----------------------------------------------------------------------

def test_cluster_keys_come_from_the_secret_alone(tmp_path: Path) -> None:
    first, second = tmp_path / "one" / "cluster.secret", tmp_path / "two" / "cluster.secret"
    assert security.create_secret(first) and not security.create_secret(first)  # never replaced
    security.create_secret(second)
    a, again, b = security.cluster_keys(first), security.cluster_keys(first), security.cluster_keys(second)
    assert (a.public, a.secret) == (again.public, again.secret) and a.public != b.public
    assert zmq.curve_public(a.secret) == a.public and a.server_public == a.public
    assert a.members == frozenset({a.public}) and a.peer_keys() == [a.public] and a.can_serve()
    assert a.secret != security.derive_keys(first.read_bytes())[1]  # derived, not the file's bytes
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(first.parent).st_mode) == 0o700
    assert len(bytes.fromhex(first.read_text().strip())) == security.SECRET_BYTES
    assert sorted(path.name for path in first.parent.iterdir()) == ["cluster.secret"]  # no scratch left


def test_standby_without_a_usable_secret_fails_with_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "cluster.secret"
    data = tmp_path / "data"
    base = ["standby", "--data", str(data), "--primary", f"tcp://127.0.0.1:{free_port_pair()}",
            "--secret", str(secret)]
    # Missing: a standby never creates it; it says where it looked and how to copy it.
    line = one_line(cli(*base, timeout=30))
    assert f"no cluster secret at {secret}" in line and "scp" in line and not secret.exists()
    security.create_secret(secret)
    os.chmod(secret, 0o640)
    assert "readable by others (mode 640)" in one_line(cli(*base, timeout=30))
    os.chmod(secret, 0o600)
    nobody = pwd.getpwnam("nobody")
    if os.geteuid() == 0:
        os.chown(secret, nobody.pw_uid, nobody.pw_gid)
        assert f"belongs to uid {nobody.pw_uid}" in one_line(cli(*base, timeout=30))
        os.chown(secret, 0, 0)
    secret.write_text("not a secret\n")
    assert "is not a cluster secret" in one_line(cli(*base, timeout=30))
    assert not data.exists()


def _as_nobody() -> None:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


def run_as_nobody(*args: str) -> subprocess.CompletedProcess:
    """`python ARGS` as the user nobody, with this environment's packages, from /."""
    for python in nobody_pythons():
        return subprocess.run([python, *args], capture_output=True, text=True, timeout=60, cwd="/",
                              env={**os.environ, "PYTHONPATH": site_packages()}, preexec_fn=_as_nobody)
    pytest.skip("no Python interpreter that the user nobody may run")


def site_packages() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def nobody_pythons() -> list[str]:
    """Interpreters of this Python's version that nobody can run with these packages
    (this one may live where nobody cannot reach it, e.g. under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, os.path.realpath(sys.executable), f"/usr/bin/{version}",
                  f"/usr/local/bin/{version}"]
    found = []
    for python in dict.fromkeys(candidates):
        try:
            probe = subprocess.run([python, "-c", "import zmq"], capture_output=True, timeout=60, cwd="/",
                                   env={**os.environ, "PYTHONPATH": site_packages()}, preexec_fn=_as_nobody)
        except OSError:
            continue
        if probe.returncode == 0:
            found.append(python)
    return found[:1]


#: Run as `nobody`: read the secret, then listen on the stream and say HELLO on the side
#: channel, once without keys and once as a CURVE client with a key of its own and the
#: server's public key; prints what it got, as JSON.
INTRUDER = r"""
import json, sys, time
import zmq
sys.path.insert(0, sys.argv[1])
from replica import protocol as p
stream, side, server_key, secret = sys.argv[2:6]
out = {}
try:
    open(secret, "rb").read()
    out["secret"] = "read"
except OSError as exc:
    out["secret"] = type(exc).__name__
ctx = zmq.Context()
for mode in ("null", "curve"):
    sub, dealer = ctx.socket(zmq.SUB), ctx.socket(zmq.DEALER)
    for sock in (sub, dealer):
        sock.linger = 0
        if mode == "curve":
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = server_key.encode()
    sub.subscribe(b"")
    sub.connect(stream)
    dealer.routing_id = b"intruder-" + mode.encode()
    dealer.connect(side)
    got, deadline = 0, time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            hello = p.encode(p.MsgType.HELLO, p.NO_CLUSTER, 0, (0,), [b"intruder"])
            dealer.send_multipart(hello, zmq.NOBLOCK)
        except zmq.Again:
            pass
        for sock in (sub, dealer):
            if sock.poll(100):
                sock.recv_multipart()
                got += 1
    out[mode] = got
    sub.close()
    dealer.close()
print(json.dumps(out))
"""


@pytest.mark.fuse
def test_another_local_user_reads_nothing_and_registers_nothing(cluster: Cluster) -> None:
    """The README's one-machine commands (here with the test's own secret file)."""
    primary = cluster.primary("p")
    standby = cluster.standby(primary, "s", mount=False)
    write_files(primary.mount / "d", 8)
    cluster.verify(primary, standby, deadline=20)
    status = primary.status()
    keys = security.cluster_keys(cluster.secret)
    assert status["replication"]["security"]["mechanism"] == "curve"
    assert status["replication"]["security"]["public_key"] == keys.public.decode()
    assert stat.S_IMODE(os.stat(cluster.secret).st_mode) == 0o600
    side = status["replication"]["side_channel"]
    # The test's directory is closed to nobody: a copy of the secret in an open one shows
    # that the file itself (mode 0600) is what keeps nobody out.
    open_dir = Path(f"/tmp/tandemfs-secret-{os.getpid()}")
    open_dir.mkdir(mode=0o755)
    try:
        visible = open_dir / "cluster.secret"
        shutil.copy2(cluster.secret, visible)
        run = run_as_nobody("-c", INTRUDER, str(REPO), primary.address, side, keys.public.decode(),
                            str(visible))
        assert run.returncode == 0, run.stderr
        got = json.loads(run.stdout)
        # A standby run by nobody cannot use the secret: one line, exit 2.
        refused = run_as_nobody(str(REPO / "mount.py"), "standby", "--data", str(open_dir / "data"),
                                "--primary", primary.address, "--secret", str(visible))
    finally:
        shutil.rmtree(open_dir)
    assert got == {"secret": "PermissionError", "null": 0, "curve": 0}, got
    assert "cannot read the cluster secret" in one_line(refused) and "Permission denied" in refused.stderr
    # The primary refused the key of nobody's CURVE attempt, and tracks the real standby alone.
    status = primary.status()["replication"]
    assert status["security"]["refused_handshakes"] >= 1
    assert [peer["name"] for peer in status["standbys"]] == ["s"]
    assert list(status["known_standbys"]) == ["s"]
    assert "intruder" not in primary.log_path.read_text()


class Forger:
    """A DEALER on the side channel of an --insecure primary, sending whatever it likes."""

    def __init__(self, ctx: zmq.Context, side: str, identity: bytes) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.routing_id = identity
        self.sock.connect(side)
        self.replies: list[p.Message] = []

    def send(self, cluster_id: bytes, epoch: int, name: bytes, applied: int = 0) -> None:
        self.sock.send_multipart(p.encode(p.MsgType.HELLO, cluster_id, epoch, (applied,), [name]))

    def drain_until(self, done: object, timeout: float = 20.0) -> None:
        """Read replies until `done(replies)` holds."""
        deadline = time.monotonic() + timeout
        while not done(self.replies):  # type: ignore[operator]
            assert time.monotonic() < deadline, f"{len(self.replies)} replies"
            if self.sock.poll(100):
                self.replies.append(p.decode(self.sock.recv_multipart(), p.TO_STANDBY))

    def refusals(self, code: int) -> int:
        return sum(1 for msg in self.replies if msg.type is p.MsgType.REFUSE and msg.body.code == code)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.fuse
def test_forged_hellos_register_nothing_persistent(cluster: Cluster) -> None:
    primary = cluster.primary("p", "--insecure")
    standby = cluster.standby(primary, "s", "--insecure", mount=False)
    write_files(primary.mount / "d", 5)
    cluster.verify(primary, standby, deadline=20)
    status = primary.status()
    side = status["replication"]["side_channel"]
    cluster_id, epoch = bytes.fromhex(status["cluster_id"]), status["epoch"]
    other_cluster = bytes(reversed(cluster_id))
    ctx = zmq.Context()
    try:
        # Thousands from one identity: no cluster id (answered, for a bootstrap), another
        # cluster's (refused), a malformed epoch 0 (dropped); the last one's REFUSE says
        # every earlier message was handled.
        same = Forger(ctx, side, b"forger#1")
        for i in range(2000):
            same.send(p.NO_CLUSTER, 0, f"zero{i}".encode())
        for i in range(500):
            same.send(other_cluster, epoch, f"other{i}".encode())
        for i in range(200):  # this cluster's envelope, a body of the wrong size
            envelope = p.encode(p.MsgType.HELLO, cluster_id, epoch, (0,), [b"x"])[0]
            same.sock.send_multipart([envelope, b"\0" * 5, f"bad{i}".encode()])
        same.send(other_cluster, epoch, b"last")
        same.drain_until(lambda replies: sum(1 for m in replies if m.type is p.MsgType.REFUSE) >= 501, 60)
        assert same.refusals(p.REFUSE_CLUSTER) == 501
        same.close()
        # A thousand identities, one zero-cluster HELLO each.
        for batch in range(10):
            forgers = [Forger(ctx, side, f"many{batch}-{i}#x".encode()) for i in range(100)]
            for forger in forgers:
                forger.send(p.NO_CLUSTER, 0, forger.sock.routing_id.split(b"#")[0])
            for forger in forgers:
                forger.drain_until(lambda replies: replies, 20)
                assert forger.replies[0].type is p.MsgType.WELCOME
                forger.close()
    finally:
        ctx.destroy(linger=0)
    status = primary.status()["replication"]
    assert [peer["name"] for peer in status["standbys"]] == ["s"]
    assert list(status["known_standbys"]) == ["s"]
    # Nothing of it survives a restart: the primary holds the journal for the real standby alone.
    assert primary.stop() == 0, primary.log()
    primary.start().wait_ready()
    assert list(primary.status()["replication"]["known_standbys"]) == ["s"]
    primary.wait_status(lambda s: [x["name"] for x in s["replication"]["standbys"]] == ["s"]
                        and s["replication"]["standbys"][0]["connected"], 20, "the standby back")
    human = cli("status", "--data", str(primary.data)).stdout
    assert len(human.splitlines()) < 40, human
    write_files(primary.mount / "after", 3)
    cluster.verify(primary, standby, deadline=20)


@pytest.mark.fuse
def test_tracked_standbys_are_bounded(cluster: Cluster) -> None:
    """Without keys, this cluster's id is all a HELLO can prove (anyone who reads the
    stream knows it): how many standbys that makes the primary track is bounded."""
    primary = cluster.primary("p", "--insecure")
    standby = cluster.standby(primary, "s", "--insecure", mount=False)
    cluster.verify(primary, standby, deadline=20)
    status = primary.status()
    cluster_id, epoch = bytes.fromhex(status["cluster_id"]), status["epoch"]
    ctx = zmq.Context()
    try:
        forger = Forger(ctx, status["replication"]["side_channel"], b"forger#1")
        for i in range(100):
            forger.send(cluster_id, epoch, f"forged{i}".encode())
        forger.drain_until(lambda replies: len(replies) >= 100)
        assert forger.refusals(p.REFUSE_FULL) == 100 - (MAX_STANDBYS - 1)
        forger.close()
    finally:
        ctx.destroy(linger=0)
    replication = primary.status()["replication"]
    assert len(replication["known_standbys"]) == MAX_STANDBYS and "s" in replication["known_standbys"]
    assert len(replication["standbys"]) <= MAX_STANDBYS
    assert replication["dropped"]["standbys_full"] == 100 - (MAX_STANDBYS - 1)
    assert "standbys_full" in primary.log_path.read_text()
    write_files(primary.mount / "d", 3)  # the real standby still follows
    cluster.verify(primary, standby, deadline=20)
