"""Live replication between real processes over loopback, with real mounts.

Each test starts a primary (mounted, publishing on a free loopback port) and one or more
standbys, drives writes through the primary's mount, and judges the outcome with
`mount.py verify` (equal seqs, equal state digests) and, where a standby is mounted,
`diff -r` of the two trees.
"""

from __future__ import annotations

import email
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from journal.store import Store
from tests.cluster import Cluster, cli, cluster_fixture, wait_until  # noqa: F401 - a fixture

pytestmark = pytest.mark.fuse

#: A real source tree: the standard library's email package (~100 files, nested).
SOURCE_TREE = Path(email.__file__).parent


def write_files(root: Path, prefix: str, count: int, size: int = 3000, fsync: bool = False) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        with open(root / f"{prefix}{i:05d}", "wb") as f:
            f.write(os.urandom(size))
            if fsync:
                os.fsync(f.fileno())


def diff_trees(a: Path, b: Path) -> str:
    result = subprocess.run(["diff", "-r", str(a), str(b)], capture_output=True, text=True, timeout=120)
    return "" if result.returncode == 0 else result.stdout + result.stderr


def standby_stat(status: dict, key: str) -> int:
    return status["standby"][key]


def test_source_tree_replicates_to_mounted_standby(cluster: Cluster) -> None:
    primary = cluster.primary()
    standby = cluster.standby(primary)
    shutil.copytree(SOURCE_TREE, primary.mount / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (primary.mount / "src" / "link").symlink_to("header.py")
    os.link(primary.mount / "src" / "parser.py", primary.mount / "src" / "parser-hardlink.py")
    out = cluster.verify(primary, standby, deadline=60)
    assert out.startswith("match")
    # The read-only mount shows the same tree within about a second (entry cache).
    wait_until(lambda: not diff_trees(primary.mount, standby.mount), 10, "diff -r to come out clean",
               on_fail=lambda: diff_trees(primary.mount, standby.mount)[:2000])
    # Writes on the standby are refused by the filesystem, not by the kernel's ro option.
    with pytest.raises(OSError) as excinfo:
        (standby.mount / "nope").write_bytes(b"x")
    assert excinfo.value.errno == 30  # EROFS
    assert "ro," not in _mount_options(standby.mount)
    # status: the primary lists the standby with its acked seq; the standby reports lag.
    p = primary.wait_status(lambda st: [(peer["name"], peer["received_seq"]) for peer in
                                        st["replication"]["standbys"]] == [("s", st["last_seq"])],
                            5, "the standby's ack (async: it rides on the twice-a-second keepalive)")
    s = standby.status()
    assert s
    assert s["role"] == "standby" and s["lag_records"] == 0 and s["heartbeat_age_seconds"] < 2
    result = cli("status", "--data", str(standby.data), "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["applied_seq"] == p["last_seq"]
    # Stopping with SIGTERM exits 0 and unmounts.
    assert standby.stop() == 0, standby.log()
    assert not os.path.ismount(standby.mount)


def _mount_options(mountpoint: Path) -> str:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[1] == target:
                return fields[3] + ","
    raise AssertionError(f"{mountpoint} is not mounted")


def test_standby_killed_mid_stream_catches_up_on_restart(cluster: Cluster) -> None:
    primary = cluster.primary()
    standby = cluster.standby(primary, mount=False)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            i = 0
            while not stop.is_set():
                write_files(primary.mount / f"w{i}", "f", 20, size=2000)
                i += 1
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        standby.wait_status(lambda s: s["applied_seq"] > 200, 30, "applying the stream")
        standby.kill()
        killed_at = Store(standby.data, readonly=True)
        seq_at_kill = killed_at.last_seq
        killed_at.close()
        wait_until(lambda: primary.status()["last_seq"] > seq_at_kill + 200, 30, "more writes meanwhile")
        standby.start()
        standby.wait_status(lambda s: s["applied_seq"] > seq_at_kill + 100, 30,
                            "catching up while writes go on")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    cluster.verify(primary, standby, deadline=60)
    status = standby.status()
    assert status["standby"]["fetches"] >= 1  # it asked for what it missed while dead
    assert status["standby"]["snapshots"] == 0
    starts = [line for line in standby.log_path.read_text().splitlines()
              if "replica.standby: following" in line]
    assert len(starts) == 2 and starts[-1].endswith(f"from seq {seq_at_kill}")  # resumed from its own seq


def test_standby_started_after_pruning_bootstraps_from_snapshot(cluster: Cluster) -> None:
    primary = cluster.primary("p", "--tail-records", "0")  # nobody to keep a tail for
    shutil.copytree(SOURCE_TREE, primary.mount / "src", ignore=shutil.ignore_patterns("__pycache__"))
    result = cli("checkpoint", "--data", str(primary.data))
    assert result.returncode == 0, result.stderr
    status = primary.status()
    assert status["journal"]["first_seq"] == status["last_seq"] + 1  # all of it pruned
    assert status["last_checkpoint"]["seq"] == status["last_seq"]
    write_files(primary.mount / "after", "f", 10)  # records after the checkpoint: fetched, not in it
    standby = cluster.standby(primary)
    cluster.verify(primary, standby, deadline=60)
    s = standby.status()
    assert s["standby"]["snapshots"] == 1
    assert s["journal"]["last_seq"] == primary.status()["last_seq"]
    wait_until(lambda: not diff_trees(primary.mount, standby.mount), 10, "identical trees",
               on_fail=lambda: diff_trees(primary.mount, standby.mount)[:2000])


def test_restarted_primary_keeps_the_journal_for_a_standby_that_is_away(cluster: Cluster) -> None:
    primary = cluster.primary("p", "--tail-records", "0")  # only known standbys hold the journal
    standby = cluster.standby(primary, mount=False)
    write_files(primary.mount / "before", "f", 10)
    cluster.verify(primary, standby)
    held = standby.status()["applied_seq"]
    assert standby.stop() == 0
    # Its last word on a clean stop: flushed up to here, keep the journal from the next one.
    primary.wait_status(lambda s: s["replication"]["known_standbys"].get("s") == held, 10,
                        "the stopped standby's final position")
    assert primary.stop() == 0
    primary.start()
    primary.wait_ready()
    write_files(primary.mount / "while-away", "f", 50)
    assert cli("checkpoint", "--data", str(primary.data)).returncode == 0  # prunes all it may
    status = primary.status()
    assert status["replication"]["known_standbys"] == {"s": held}
    assert f"s (from seq {held + 1})" in cli("status", "--data", str(primary.data)).stdout
    assert status["journal"]["first_seq"] == held + 1  # pruned up to what the standby needs, no further
    standby.start()
    standby.wait_ready()
    cluster.verify(primary, standby)
    s = standby.status()["standby"]
    assert s["snapshots"] == 0 and s["fetched_records"] >= 50  # caught up from the journal


def test_forgetting_a_standby_that_is_gone_lets_the_journal_go(cluster: Cluster) -> None:
    primary = cluster.primary("p", "--tail-records", "0")
    standby = cluster.standby(primary, mount=False)
    write_files(primary.mount / "a", "f", 10)
    cluster.verify(primary, standby)
    assert standby.stop() == 0
    write_files(primary.mount / "b", "f", 10)
    assert cli("checkpoint", "--data", str(primary.data)).returncode == 0
    assert primary.status()["journal"]["records"] > 10  # kept for the standby that is away
    refused = cli("forget", "--data", str(primary.data), "--standby", "nobody")
    assert refused.returncode == 1 and "no standby 'nobody' is known" in refused.stderr
    result = cli("forget", "--data", str(primary.data), "--standby", "s")
    assert result.returncode == 0, result.stderr
    assert cli("checkpoint", "--data", str(primary.data)).returncode == 0
    status = primary.status()
    assert status["replication"]["known_standbys"] == {} and status["journal"]["records"] == 0
    # If it does come back, it is known again and rebuilt from a snapshot.
    standby.start()
    standby.wait_ready()
    cluster.verify(primary, standby)
    assert standby.status()["standby"]["snapshots"] == 1


def test_small_stores_stay_usable_on_both_nodes_as_files_come_and_go(cluster: Cluster) -> None:
    # Each pass journals a third of the store again, on the primary and on the standby:
    # both must prune what the other no longer needs instead of filling up (a full
    # standby stops following).
    primary = cluster.primary("p", "--max-size", "64M")
    standby = cluster.standby(primary, "s", "--max-size", "64M", mount=False)
    data = os.urandom(20 << 20)
    for _ in range(6):
        (primary.mount / "big").write_bytes(data)
        cluster.verify(primary, standby)
        (primary.mount / "big").unlink()
    cluster.verify(primary, standby)
    status = standby.status()
    assert status["standby"]["state"] == "following" and status["fatal"] is None, status
    # It pruned as it went: 120 MiB went through a 64 MiB store. (How much journal it
    # holds at this instant depends on when its last prune ran: small prunes wait for
    # more records to gather, and a full store prunes at once.)
    journal = status["journal"]
    assert journal["first_seq"] > 1 and journal["bytes"] < 64 << 20, status


def test_interrupted_snapshot_resumes(cluster: Cluster) -> None:
    # Tiny chunks, one in flight: the transfer is slow enough to kill it in the middle.
    primary = cluster.primary("p", "--tail-records", "0", env={"TANDEMFS_SNAPSHOT_CHUNK": "16384"})
    big = primary.mount / "big"
    big.write_bytes(os.urandom(24 << 20))
    assert cli("checkpoint", "--data", str(primary.data)).returncode == 0
    slow = {"TANDEMFS_SNAPSHOT_CREDIT": "1"}
    standby = cluster.standby(primary, mount=False, env=slow, wait=False)
    status = standby.wait_status(
        lambda s: (s.get("standby") or {}).get("snapshot") and 0 < s["standby"]["snapshot"]["received"]
        and s["standby"]["snapshot"]["received"] > 8 << 20, 60, "a snapshot half-way")
    assert status["standby"]["snapshot"]["received"] < status["standby"]["snapshot"]["size"]
    standby.kill()
    standby.env = None  # full speed now
    standby.start()
    cluster.verify(primary, standby, deadline=60)
    assert "resuming snapshot" in standby.log_path.read_text()


def test_forced_stream_drops_are_repaired_by_fetches(cluster: Cluster) -> None:
    primary = cluster.primary(env={"TANDEMFS_PUB_SNDHWM": "1"})
    standby = cluster.standby(primary, mount=False, env={"TANDEMFS_SUB_RCVHWM": "1"})
    shutil.copytree(SOURCE_TREE, primary.mount / "a", ignore=shutil.ignore_patterns("__pycache__"))
    write_files(primary.mount / "b", "f", 300, size=20000)
    cluster.verify(primary, standby, deadline=90)
    status = standby.status()
    # Records were lost on the stream (the primary published more than arrived) and fetched.
    assert status["standby"]["fetched_records"] > 0, status["standby"]
    assert status["standby"]["stream_records"] < status["last_seq"], status["standby"]


def test_two_standbys(cluster: Cluster) -> None:
    primary = cluster.primary()
    first = cluster.standby(primary, "s1")
    second = cluster.standby(primary, "s2", mount=False)
    shutil.copytree(SOURCE_TREE, primary.mount / "src", ignore=shutil.ignore_patterns("__pycache__"))
    cluster.verify(primary, first)
    cluster.verify(primary, second)
    standbys = primary.wait_status(
        lambda s: len([p for p in s["replication"]["standbys"] if p["connected"]
                       and p["received_seq"] == s["last_seq"]]) == 2, 10, "both standbys acked")
    assert sorted(p["name"] for p in standbys["replication"]["standbys"]) == ["s1", "s2"]
    for node in (second, first, primary):
        assert node.stop() == 0, node.log()
        fsck = cli("fsck", "--data", str(node.data))
        assert fsck.returncode == 0, fsck.stdout


def _fsync_in_thread(path: Path) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run() -> None:
        started = time.monotonic()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"must reach the standby")
            os.fsync(fd)
            outcome["seconds"] = time.monotonic() - started
        except OSError as exc:  # what fsync itself answered
            outcome["error"] = exc
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # the mount may be gone by now

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("mode", ["received", "durable"])
def test_replicated_modes_block_while_the_standby_is_stopped(cluster: Cluster, mode: str) -> None:
    primary = cluster.primary("p", "--durability", mode, "--sync-timeout", "1", "--on-standby-loss", "block")
    standby = cluster.standby(primary, mount=False)
    primary.wait_status(lambda s: s["replication"]["standbys"], 10, "the standby to say hello")
    write_files(primary.mount / "before", "f", 3, fsync=True)  # acked: returns promptly
    standby.pause()
    thread, outcome = _fsync_in_thread(primary.mount / "blocked")
    thread.join(timeout=3.0)
    assert thread.is_alive(), f"fsync returned while the only standby was stopped: {outcome}"
    status = primary.wait_status(lambda s: s["replication"]["blocked_fsyncs"] >= 1, 5, "a blocked fsync")
    assert not status["degraded"]
    standby.resume()
    thread.join(timeout=20)
    assert not thread.is_alive() and "seconds" in outcome, outcome
    cluster.verify(primary, standby)
    assert primary.status()["replication"]["blocked_fsyncs"] == 0
    # Stopping the primary while an fsync is blocked fails that fsync (EIO) and still exits.
    standby.pause()
    thread, outcome = _fsync_in_thread(primary.mount / "abandoned")
    primary.wait_status(lambda s: s["replication"]["blocked_fsyncs"] >= 1, 10, "a blocked fsync")
    assert primary.stop() == 0
    thread.join(timeout=10)
    assert isinstance(outcome.get("error"), OSError) and outcome["error"].errno == 5, outcome


def test_durable_mode_degrades_while_the_standby_is_stopped(cluster: Cluster) -> None:
    primary = cluster.primary("p", "--durability", "durable", "--sync-timeout", "1",
                              "--on-standby-loss", "degrade")
    standby = cluster.standby(primary, mount=False)
    primary.wait_status(lambda s: s["replication"]["standbys"], 10, "the standby to say hello")
    standby.pause()
    thread, outcome = _fsync_in_thread(primary.mount / "degraded")
    thread.join(timeout=10)
    assert "seconds" in outcome, outcome
    assert 0.9 <= outcome["seconds"] < 5, outcome
    status = primary.status()
    assert status["degraded"] and status["replication"]["degraded"]
    assert "DEGRADED" in cli("status", "--data", str(primary.data)).stdout
    write_files(primary.mount / "while-degraded", "f", 3, fsync=True)  # async now: no wait
    standby.resume()
    primary.wait_status(lambda s: not s["degraded"], 20, "replication restored")
    cluster.verify(primary, standby)


def test_standby_of_another_cluster_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    primary = cluster.primary()
    Store.create(tmp_path / "s-data").close()  # a store of a cluster of its own
    standby = cluster.standby(primary, mount=False, wait=False)
    wait_until(lambda: standby.proc.poll() is not None, 20, "the standby to give up", on_fail=standby.log)
    assert standby.proc.returncode == 3
    assert "refuses this store" in standby.log_path.read_text()
    assert primary.status()["dropped"].get("cluster", 0) >= 1


def test_mounted_standby_past_the_retention_bound_rebootstraps_under_its_mount(cluster: Cluster) -> None:
    primary = cluster.primary("p", "--retain-records", "20", "--tail-records", "0")
    standby = cluster.standby(primary)
    write_files(primary.mount / "old", "f", 10)
    cluster.verify(primary, standby)
    assert standby.stop() == 0
    # While it is away, the journal grows past the bound and is pruned behind it.
    shutil.copytree(SOURCE_TREE, primary.mount / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (primary.mount / "old" / "f00003").unlink()
    assert cli("checkpoint", "--data", str(primary.data)).returncode == 0
    status = primary.status()
    assert "s" not in status["replication"]["known_standbys"]  # given up on: it fell past the bound
    assert status["journal"]["first_seq"] > status["replication"]["standbys"][0]["received_seq"] + 1
    # Restarted, it mounts what it has, then swaps in a snapshot beneath the live mount.
    standby.start()
    standby.wait_ready()
    cluster.verify(primary, standby)
    assert standby.status()["standby"]["snapshots"] == 1
    wait_until(lambda: not diff_trees(primary.mount, standby.mount), 10, "identical trees",
               on_fail=lambda: diff_trees(primary.mount, standby.mount)[:2000])
    assert standby.stop() == 0
    fsck = cli("fsck", "--data", str(standby.data))
    assert fsck.returncode == 0, fsck.stdout
