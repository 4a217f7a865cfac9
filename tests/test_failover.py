"""Failover between real processes over loopback, with real mounts: promotion of a running
and of a stopped standby, the refusals, fencing of an old primary that comes back, two
primaries in one epoch, rejoin with divergent records, automatic promotion, and the drill.

Each test kills or stops nodes the way an operator or a crash would, and judges the
outcome by what the nodes say (status, exit codes, printed lines), by what their mounts
do (writes succeed or fail with EROFS), and by `mount.py verify` (equal digests).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from journal.records import OVERHEAD, decode_record
from journal.schema import META_UPSTREAM
from journal.store import Store
from tests.cluster import REPO, Cluster, cli, cluster_fixture, free_port_pair, wait_until  # noqa: F401

pytestmark = pytest.mark.fuse


def write(path: Path, data: bytes, fsync: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            os.fsync(f.fileno())


def refuses_writes(mount: Path) -> bool:
    try:
        (mount / "probe-write").write_bytes(b"x")
    except OSError as exc:
        return exc.errno == errno.EROFS
    return False


def test_promote_running_standby_in_place(cluster: Cluster) -> None:
    primary = cluster.primary()
    standby = cluster.standby(primary)
    for i in range(20):
        write(primary.mount / "before" / f"f{i}", os.urandom(3000))
    cluster.verify(primary, standby)
    assert refuses_writes(standby.mount)
    last = primary.status()["last_seq"]
    mount_dev = os.stat(standby.mount).st_dev
    primary.kill()

    result = cluster.promote(standby)
    takeover = json.loads(result.stdout)
    assert (takeover["epoch"], takeover["took_over_at"], takeover["seq"]) == (2, last, last + 1)
    assert takeover["lacks"] == 0
    assert takeover["listen"] == primary.address  # by default, where the old primary served
    # The same process and the same mount, now writable.
    assert standby.alive() and os.path.ismount(standby.mount) and os.stat(standby.mount).st_dev == mount_dev
    write(standby.mount / "after" / "new", b"written on the promoted node", fsync=True)
    status = standby.status()
    assert status["role"] == "primary" and status["epoch"] == 2 and status["read_only"] is None
    assert status["epoch_history"] == [[1, 1], [2, last + 1]]
    assert status["takeover"]["seq"] == last + 1
    human = cli("status", "--data", str(standby.data)).stdout
    assert "epoch 2 from seq" in human and "promoted" in human
    # Its writes replicate to a new standby (one without a mount).
    second = cluster.standby(standby, "s2", mount=False)
    cluster.verify(standby, second)
    assert second.status()["epoch_history"] == [[1, 1], [2, last + 1]]
    # A second failover: promoting a standby that has no mount mounts one, writable.
    last = standby.status()["last_seq"]
    standby.kill()
    mountpoint = cluster.root / "s2-mnt"
    mountpoint.mkdir()
    takeover = json.loads(cluster.promote(second, "--mount", str(mountpoint)).stdout)
    second.mount = mountpoint  # unmounted at teardown
    assert (takeover["epoch"], takeover["seq"], takeover["mount"]) == (3, last + 1, str(mountpoint))
    assert os.path.ismount(mountpoint)
    assert (mountpoint / "after" / "new").read_bytes() == b"written on the promoted node"
    write(mountpoint / "third", b"epoch 3")
    assert [e for e, _s in second.status()["epoch_history"]] == [1, 2, 3]


def test_promote_stopped_standby_data_dir_then_old_primary_rejoins(cluster: Cluster) -> None:
    primary = cluster.primary()
    standby = cluster.standby(primary, mount=False)
    write(primary.mount / "a", b"kept")
    cluster.verify(primary, standby)
    assert standby.stop() == 0
    primary.kill()

    port = free_port_pair()
    promoted = cluster.take_over(standby, "--listen", f"tcp://127.0.0.1:{port}")
    log = promoted.log_path.read_text()
    assert "took over at seq" in log and "may lack: 0 record(s)" in log
    status = promoted.status()
    assert status["role"] == "primary" and status["epoch"] == 2 and status["takeover"]["forced"] is False
    assert (promoted.mount / "a").read_bytes() == b"kept"
    write(promoted.mount / "b", b"new epoch", fsync=True)
    # The old primary held nothing the new one lacks: it rejoins by fetching, no export.
    rejoined = cluster.rejoin(primary, promoted)
    cluster.verify(promoted, rejoined)
    standby_status = rejoined.status()["standby"]
    assert standby_status["divergence"] is None and standby_status["snapshots"] == 0
    assert not (primary.data / "divergent").exists()


def _set_announced(data: Path, extra: int) -> int:
    """Record in a stopped standby's store that its primary announced `extra` records more
    than it holds: what a standby knows when its primary died before sending them."""
    with Store(data) as store:
        upstream = json.loads(store.get_meta(META_UPSTREAM))
        upstream["last_seq"] = store.last_seq + extra
        store.set_meta(META_UPSTREAM, json.dumps(upstream).encode())
        return store.last_seq


def test_promotion_refusals_and_force(cluster: Cluster) -> None:
    # An empty node: a standby whose primary never answered holds no store.
    nobody = cluster.primary("nobody", listen=True, start=False)
    empty = cluster.standby(nobody, "empty", mount=False)
    result = cli("promote", "--data", str(empty.data))
    assert result.returncode == 1 and "empty" in result.stderr, result.stderr
    assert empty.status()["role"] == "standby"

    primary = cluster.primary()
    standby = cluster.standby(primary)
    write(primary.mount / "f", b"x")
    cluster.verify(primary, standby)
    assert standby.stop() == 0
    assert primary.stop() == 0
    held = _set_announced(standby.data, 7)
    # Behind, stopped: refused, nothing started.
    result = cli("promote", "--data", str(standby.data), "--mount", str(standby.mount), "--secret",
                 str(cluster.secret))
    assert result.returncode == 1, result.stderr
    assert "behind" in result.stderr and "7 record(s)" in result.stderr, result.stderr
    # Nor may it run as a primary of its old primary's epoch.
    result = cli("primary", "--data", str(standby.data), "--mount", str(standby.mount))
    assert result.returncode == 2 and "promote it" in result.stderr, result.stderr
    # Behind, running (its primary is gone; it remembers what was announced): refused, still a standby.
    standby.start().wait_ready()
    result = cluster.promote(standby, expect=1)
    assert "behind" in result.stderr and "7 record(s) fewer" in result.stderr
    assert standby.status()["role"] == "standby" and refuses_writes(standby.mount)
    # Forced: promoted, saying what it may lack.
    result = cluster.promote(standby, "--force")
    takeover = json.loads(result.stdout)
    assert takeover["forced"] and takeover["lacks"] == 7 and takeover["took_over_at"] == held
    write(standby.mount / "g", b"after a forced promotion")
    # The data directory of a node that was last a primary is refused unless forced.
    result = cli("promote", "--data", str(primary.data), "--mount", str(primary.mount), "--secret",
                 str(cluster.secret))
    assert result.returncode == 1 and "last a primary" in result.stderr, result.stderr


def test_returning_old_primary_is_fenced(cluster: Cluster) -> None:
    primary = cluster.primary()
    standby = cluster.standby(primary)
    write(primary.mount / "f", b"before", fsync=True)
    cluster.verify(primary, standby)
    primary.kill()
    port = free_port_pair()  # the new primary serves elsewhere, so the old one can come back as it was
    cluster.promote(standby, "--listen", f"tcp://127.0.0.1:{port}")
    write(standby.mount / "g", b"new epoch")

    # The old primary comes back as a primary, on its old address: the new primary's PEERs
    # reach it and it stops accepting writes, saying why.
    primary.start().wait_ready()
    status = primary.wait_status(lambda s: s["read_only"], 15, "being fenced")
    assert "fenced" in status["read_only"] and "epoch 2" in status["read_only"], status["read_only"]
    assert status["fenced"] and status["replication"]["fenced_by_epoch"] == 2
    with pytest.raises(OSError) as excinfo:
        write(primary.mount / "late", b"must be refused")
    assert excinfo.value.errno == errno.EROFS
    assert "FENCED" in cli("status", "--data", str(primary.data)).stdout
    assert "CRITICAL" in primary.log_path.read_text()
    peers = standby.wait_status(lambda s: s["replication"]["peers"], 10, "the old primary as a peer")
    assert [(p["epoch"], p["fenced"]) for p in peers["replication"]["peers"].values()] == [(1, True)]
    assert writable_primaries(primary, standby) == [standby.name]
    # The fence is on disk: restarted as a primary, it refuses writes from the start.
    assert primary.stop() == 0
    primary.start().wait_ready()
    assert "FENCED" in (primary.status()["read_only"] or "").upper()
    assert refuses_writes(primary.mount)
    assert primary.stop() == 0
    rejoined = cluster.rejoin(primary, standby)
    cluster.verify(standby, rejoined)


def writable_primaries(*procs: object) -> list[str]:
    found = []
    for proc in procs:
        status = proc.status()  # type: ignore[attr-defined]
        if status and status["role"] == "primary" and not status["read_only"]:
            found.append(proc.name)  # type: ignore[attr-defined]
    return found


def test_two_primaries_in_one_epoch_are_fatal(cluster: Cluster) -> None:
    primary = cluster.primary()
    first = cluster.standby(primary, "s1")
    second = cluster.standby(primary, "s2")
    write(primary.mount / "f", b"x")
    cluster.verify(primary, first)
    cluster.verify(primary, second)
    primary.kill()
    port1, port2 = free_port_pair(), free_port_pair()
    # Two operators promote the two standbys, each pointing at the other.
    cluster.promote(first, "--listen", f"tcp://127.0.0.1:{port1}", "--peer", f"tcp://127.0.0.1:{port2}")
    cluster.promote(second, "--listen", f"tcp://127.0.0.1:{port2}", "--peer", f"tcp://127.0.0.1:{port1}")
    for node in (first, second):
        status = node.wait_status(lambda s: s["fatal"], 15, "the split brain to be reported")
        assert status["epoch"] == 2 and "SPLIT BRAIN" in status["fatal"] and status["read_only"]
        assert status["replication"]["split_brain"]["epoch"] == 2
        assert refuses_writes(node.mount)
        assert "FATAL" in cli("status", "--data", str(node.data)).stdout
    assert writable_primaries(first, second) == []


def test_rejoin_exports_divergent_records(cluster: Cluster) -> None:
    primary = cluster.primary()
    standby = cluster.standby(primary)
    write(primary.mount / "base1", b"one")
    write(primary.mount / "base2", b"two")
    cluster.verify(primary, standby)
    assert standby.stop() == 0
    # Written on the old primary alone: these will be divergent.
    write(primary.mount / "lost" / "only-on-old", b"old primary's")
    write(primary.mount / "conflict", b"old primary's version")
    os.rename(primary.mount / "base1", primary.mount / "lost" / "base1-moved")
    (primary.mount / "base2").unlink()
    old_last = primary.status()["last_seq"]
    primary.kill()
    standby.start().wait_ready()
    cluster.promote(standby)
    write(standby.mount / "conflict", b"new primary's version", fsync=True)
    new_status = standby.status()
    begin = new_status["epoch_history"][-1][1]

    rejoined = cluster.rejoin(primary, standby)
    cluster.verify(standby, rejoined)
    divergence = rejoined.status()["standby"]["divergence"]
    assert divergence and (divergence["from_seq"], divergence["to_seq"]) == (begin, old_last)
    assert divergence["records"] == old_last - begin + 1 and divergence["missing"] == 0
    export = Path(divergence["directory"])
    report = (export / "report.txt").read_text()
    for path in ("/lost/only-on-old", "/conflict", "/lost", "/base1 -> /lost/base1-moved", "/base2"):
        assert path in report, report
    assert "Rename" in report and "Unlink" in report and "Write" in report
    # The raw records are all there, in order, as the old primary journaled them.
    raw = (export / "records.bin").read_bytes()
    seqs, pos = [], 0
    while pos < len(raw):
        length = int.from_bytes(raw[pos + 36:pos + 40], "big") + OVERHEAD
        record = decode_record(raw[pos:pos + length])
        assert record.epoch == 1
        seqs.append(record.seq)
        pos += length
    assert seqs == list(range(begin, old_last + 1))
    # The state before the rebuild is kept whole, and it is the old primary's.
    kept = cli("digest", "--data", str(export / "state"))
    assert kept.returncode == 0 and kept.stdout.endswith(f"seq={old_last} epoch=1\n"), kept
    # The rejoined node now shows the new primary's filesystem.
    wait_until(lambda: (rejoined.mount / "conflict").read_bytes() == b"new primary's version", 10,
               "the new primary's version on the rejoined mount")
    assert not (rejoined.mount / "lost").exists() and (rejoined.mount / "base2").exists()
    assert "divergent records" in cli("status", "--data", str(rejoined.data)).stdout


def test_auto_promote_after_missed_heartbeats(cluster: Cluster) -> None:
    primary = cluster.primary("p", "--durability", "durable")
    standby = cluster.standby(primary, "s", "--auto-promote-after", "1")
    write(primary.mount / "acked", b"acknowledged before the crash", fsync=True)
    status = standby.wait_status(lambda s: s["heartbeat_age_seconds"] is not None, 10, "heartbeats")
    assert status["auto_promote_after"] == 1.0
    # A standby that was itself paused heard no heartbeats meanwhile, but that is no sign of a
    # dead primary: once it runs again it reads the heartbeats that queued up, and stays a standby.
    standby.pause()
    wait_until(lambda: primary.status()["replication"]["standbys"][0]["last_seen_seconds"] > 2.5, 10,
               "the standby to be paused for longer than --auto-promote-after")
    standby.resume()
    standby.wait_status(lambda s: s["heartbeat_age_seconds"] < 0.5, 10, "heartbeats again")
    assert standby.status()["role"] == "standby" and "AUTO-PROMOTE" not in standby.log_path.read_text()
    assert "did not run for" in standby.log_path.read_text()
    primary.kill()
    status = standby.wait_status(lambda s: s["role"] == "primary", 15, "promoting itself")
    assert status["takeover"]["auto"] and status["epoch"] == 2
    assert status["durability"] == "durable"  # as the old primary announced
    wait_until(lambda: not refuses_writes(standby.mount), 5, "the mount to take writes")
    assert (standby.mount / "acked").read_bytes() == b"acknowledged before the crash"
    assert "AUTO-PROMOTE" in standby.log_path.read_text()


def test_drill_two_rounds(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "drill"), "--rounds", "2", "--workdir",
                             str(tmp_path / "drill"), "--seed", "7"], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert [line.split(":")[0] for line in rounds] == ["round 1/2", "round 2/2"], result.stdout
    for line in rounds:
        assert " lost 0 " in line and "verify match" in line and "writable primaries 1" in line, line
    summary = next(line for line in lines if line.startswith("summary:"))
    assert "lost 0" in summary and "rounds with two writable primaries 0" in summary
    assert lines[-1] == "drill: PASS"


def _netns_available() -> bool:
    name = f"tandemfs-probe-{os.getpid()}"
    try:
        added = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=30)
        created = added.returncode == 0
    except FileNotFoundError:
        return False
    if created:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return created


def test_partition_drill(tmp_path: Path) -> None:
    if not _netns_available():
        pytest.skip("cannot create network namespaces here")
    drill = REPO / "scripts" / "partition-drill"
    result = subprocess.run([sys.executable, str(drill), "--cut-seconds", "1.5", "--workdir",
                             str(tmp_path / "partition"), "--seed", "11"], capture_output=True, text=True,
                            timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = next(line for line in result.stdout.splitlines() if line.startswith("summary:"))
    assert "lost 0" in summary and "fsyncs returned during the cut 0" in summary, summary
    assert "writable primaries after healing 1" in summary and "digests identical" in summary, summary
    assert result.stdout.splitlines()[-1] == "partition drill: PASS"
    assert not [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                            timeout=30).stdout.split() if ns.startswith("tandemfs-")]
