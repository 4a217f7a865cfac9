"""CurveZMQ on replication traffic, between real processes over loopback.

A primary and standbys with CURVE keys replicate and reach equal digests; a standby the
primary does not admit (its key is not in the peers directory, it has the wrong key for
the primary, or it has no keys at all) gets nothing, stays up and says why, and a key
added to the peers directory is admitted without restarting anything; a standby promoted
in place serves with its own keys and fences its old primary through CURVE; a
non-loopback address without keys is refused at start; `keygen` writes a private secret.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq.auth

from replica import security
from tests.cluster import Cluster, cli, cluster_fixture, free_port_pair, wait_until  # noqa: F401

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


def test_non_loopback_without_keys_is_refused_at_start(tmp_path: Path) -> None:
    port = free_port_pair()
    mount = tmp_path / "mnt"
    mount.mkdir()
    data = tmp_path / "data"
    primary = cli("primary", "--data", str(data), "--mount", str(mount), "--listen", f"tcp://0.0.0.0:{port}",
                  timeout=30)
    standby = cli("standby", "--data", str(data), "--primary", f"tcp://0.0.0.0:{port}", timeout=30)
    for result in (primary, standby):
        assert result.returncode == 2, result.stderr
        assert f"tcp://0.0.0.0:{port}" in result.stderr and "loopback" in result.stderr
        assert "--insecure" in result.stderr and "Traceback" not in result.stderr
    assert not data.exists() and not os.path.ismount(mount)  # refused before anything was made
    # A standby whose own stream, once promoted, would leave the machine: refused as well.
    later = cli("standby", "--data", str(data), "--primary", f"tcp://127.0.0.1:{port}", "--listen",
                f"tcp://0.0.0.0:{port}", timeout=30)
    assert later.returncode == 2 and "loopback" in later.stderr
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
    clear = cluster.standby(primary, "clear", mount=False)
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
