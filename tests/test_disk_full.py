"""A full disk under a node's data directory: writers get ENOSPC, deleting makes room.

Each test puts a data directory on a real small filesystem (a tmpfs, or ext4 on a loop
device) made for it and taken apart afterwards, pass or fail. The store's --max-size is
left at its default (64G), far beyond those disks: the disk alone bounds the store.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, cli, cluster_fixture  # noqa: F401 - the fixture is used by name
from tests.mounts import run_cli, wait_until

pytestmark = pytest.mark.fuse

MiB = 1 << 20


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=60)


class SmallDisks:
    """Small filesystems for one test; `close` unmounts them and frees their loop devices."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mounts: list[Path] = []
        self.loops: list[str] = []

    def make(self, kind: str, size_mib: int, name: str = "disk") -> Path:
        where = self.root / name
        where.mkdir()
        if kind == "tmpfs":
            done = _run("mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where))
            if done.returncode:
                pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        else:
            image = self.root / f"{name}.img"
            with open(image, "wb") as f:
                f.truncate(size_mib * MiB)
            done = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
            if done.returncode:
                pytest.skip(f"cannot make an ext4 filesystem here: {done.stderr.strip()}")
            done = _run("losetup", "--find", "--show", str(image))
            if done.returncode:
                pytest.skip(f"cannot set up a loop device here: {done.stderr.strip()}")
            self.loops.append(done.stdout.strip())
            done = _run("mount", self.loops[-1], str(where))
            if done.returncode:
                pytest.skip(f"cannot mount a loop device here: {done.stderr.strip()}")
        self.mounts.append(where)
        return where

    def close(self) -> None:
        for where in reversed(self.mounts):
            if _run("umount", str(where)).returncode:
                _run("umount", "-l", str(where))
        for loop in self.loops:
            _run("losetup", "-d", loop)


@pytest.fixture
def small_disks(tmp_path: Path) -> Iterator[SmallDisks]:
    if os.geteuid() != 0:
        pytest.skip("making tmpfs and loop mounts needs root")
    disks = SmallDisks(tmp_path)
    try:
        yield disks
    finally:
        disks.close()


def fill(path: Path, chunk: bytes, most: int) -> tuple[int, OSError]:
    """Append `chunk` to `path` until a write fails (at most `most` bytes); returns the
    bytes written and the error."""
    written = 0
    try:
        with open(path, "ab") as f:
            while written < most:
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as exc:
        return written, exc
    raise AssertionError(f"{most} bytes went into {path} without an error")


def disk_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def no_traceback(log: str) -> None:
    """No record of the log above DEBUG carries a traceback (the FUSE binding's debug
    records show one for every errno it returns, ENOSPC included)."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ )", log)
    shown = [r for r in records if not re.match(r"\S+ \S+ DEBUG ", r)]
    bad = [r for r in shown if "Traceback" in r]
    assert not bad, bad[0][:6000]


def wait_exit(proc: subprocess.Popen, timeout: float, log: Callable[[], str]) -> int:
    return wait_until(lambda: proc.poll() is not None and (proc.returncode,), timeout, "the node to stop",
                      on_fail=log)[0]


@pytest.mark.parametrize("kind,size", [("tmpfs", 128), ("ext4", 160)])
def test_primary_on_a_full_disk_answers_enospc_and_recovers(small_disks, cluster, kind: str, size: int):
    disk = small_disks.make(kind, size)
    data = disk / "data"
    node = cluster.primary("p", listen=False, data=data)
    mnt = node.mount
    assert mnt is not None

    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize <= disk_size(disk), "df promises more than the disk holds"

    keep = os.urandom(MiB)
    (mnt / "keep").write_bytes(keep)
    chunk = os.urandom(MiB)
    written, error = fill(mnt / "filler", chunk, 3 * size * MiB)
    assert error.errno == errno.ENOSPC, error
    assert written > size * MiB // 2, f"only {written} bytes fit on a {size} MiB disk"
    assert (mnt / "keep").read_bytes() == keep
    got = (mnt / "filler").read_bytes()
    assert got == (chunk * (len(got) // len(chunk) + 1))[:len(got)] and len(got) >= written
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize <= disk_size(disk)

    # Deleting makes room again, in the running node.
    os.unlink(mnt / "filler")
    after = os.urandom(16 * MiB)
    (mnt / "after").write_bytes(after)
    assert (mnt / "after").read_bytes() == after

    # Something else fills the disk: still ENOSPC, and room once it goes.
    hog = disk / "hog"
    _hogged, hog_error = fill(hog, chunk, 3 * size * MiB)
    assert hog_error.errno == errno.ENOSPC
    _written, error = fill(mnt / "more", chunk, 3 * size * MiB)
    assert error.errno == errno.ENOSPC, error
    hog.unlink()
    os.unlink(mnt / "more")
    (mnt / "again").write_bytes(chunk)
    assert (mnt / "again").read_bytes() == chunk

    log = node.log(tail=400)
    assert node.stop() == 0, log
    no_traceback(node.log_path.read_text())
    run_cli("fsck", "--data", str(data))

    # A restart finds it whole and writable.
    node.start().wait_ready()
    (mnt / "restarted").write_bytes(chunk)
    assert (mnt / "keep").read_bytes() == keep and (mnt / "after").read_bytes() == after
    st = os.statvfs(mnt)
    assert st.f_blocks * st.f_frsize <= disk_size(disk)
    assert node.stop() == 0
    no_traceback(node.log_path.read_text())
    run_cli("fsck", "--data", str(data))


def test_standby_whose_disk_fills_stops_saying_so(small_disks, cluster, tmp_path):
    primary = cluster.primary("p")
    disk = small_disks.make("tmpfs", 96)
    data = disk / "data"
    standby = cluster.standby(primary, "s", mount=False, data=data)
    standby.wait_status(lambda s: s["standby"]["state"] == "following", 30, "following")

    chunk = os.urandom(MiB)
    with open(primary.mount / "big", "wb") as f:
        for _ in range(160):
            f.write(chunk)
    code = wait_exit(standby.proc, 120, standby.log)
    log = standby.log_path.read_text()
    assert code == 3, log[-4000:]
    stopped = [line for line in log.splitlines() if "standby stopped: disk full: " in line]
    assert stopped and str(data) in stopped[0], log[-4000:]
    assert disk_free(disk) < 16 * MiB, stopped  # it stopped for want of room, not sooner
    no_traceback(log)

    # The primary gives up on it and prunes: a restart would need a snapshot larger than
    # the disk, and refuses before it begins, saying how much it needs.
    assert cli("forget", "--data", str(primary.data), "--standby", "s").returncode == 0
    done = cli("checkpoint", "--data", str(primary.data))
    assert done.returncode == 0, done.stdout + done.stderr
    size = int(done.stdout.split("size=")[1].split()[0])
    assert size > disk_size(disk), done.stdout
    standby.start()
    code = wait_exit(standby.proc, 60, standby.log)
    log = standby.log_path.read_text()
    assert code == 3, log[-4000:]
    refusal = [line for line in log.splitlines() if "disk full: " in line and "snapshot" in line]
    assert refusal and "MiB free there" in refusal[-1], log[-4000:]
    no_traceback(log)
    assert not (data / "incoming").exists() or not any((data / "incoming").rglob("data.mdb"))


def test_checkpoint_that_would_not_fit_is_skipped_once(small_disks, cluster):
    disk = small_disks.make("tmpfs", 96)
    data = disk / "data"
    node = cluster.primary("p", "--checkpoint-interval", "0.2", listen=False, data=data)
    (node.mount / "big").write_bytes(os.urandom(56 * MiB))  # a copy of it would not fit beside it
    wait_until(lambda: "checkpoint skipped" in node.log_path.read_text(), 20, "a skipped checkpoint",
               on_fail=node.log)
    checkpoints = data / "checkpoints"
    time.sleep(3.5)  # a few maintenance ticks: the checkpoint stays due, and skipped
    log = node.log_path.read_text()
    skipped = [line for line in log.splitlines() if "checkpoint skipped: disk full: " in line]
    assert len(skipped) == 1, skipped
    assert "WARNING" in skipped[0] and str(checkpoints) in skipped[0], skipped
    assert not any(checkpoints.glob("[0-9]*")) and not any(checkpoints.glob(".tmp-*"))

    asked = cli("checkpoint", "--data", str(data))
    assert asked.returncode == 1 and "disk full: no room for a checkpoint" in asked.stderr, asked.stderr
    assert "Traceback" not in asked.stderr
    assert node.stop() == 0
    no_traceback(node.log_path.read_text())
