"""Damaged and truncated stores, tried as a failing disk would: nothing wrong is served.

Bytes are changed inside a stopped node's `data.mdb` (where a file's data lies, found by
its contents), then the node runs again: a lone node refuses the damaged data (EIO) and
says where it is; a node with a peer repairs it from the peer; `scrub` finds and repairs
what nobody reads; a standby whose primary's journal is damaged stops following and
says so. A truncated data file is refused by every tool with one line, never a SIGBUS.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from journal import ops
from journal.check import digest, fsck
from journal.checkpoints import Checkpoints
from journal.errors import StoreDamaged
from journal.integrity import DamagedValue
from journal.schema import BLOCK_SIZE, ROOT_INO
from journal.store import Store
from tests.cluster import Cluster, cli, cluster_fixture, wait_until  # noqa: F401 - a fixture
from tests.mounts import run_cli

BS = BLOCK_SIZE


def flip_everywhere(data: Path, pattern: bytes) -> int:
    """Change one byte in the middle of every copy of `pattern` in the stopped store's
    data file, as a bad disk would; returns how many copies there were."""
    path = data / "data.mdb"
    raw = bytearray(path.read_bytes())
    found = 0
    at = raw.find(pattern)
    while at >= 0:
        raw[at + len(pattern) // 2] ^= 0x55
        found += 1
        at = raw.find(pattern, at + 1)
    path.write_bytes(raw)
    return found


def read_error(path: Path) -> int | None:
    """The errno reading `path` fails with, or None if it reads."""
    try:
        path.read_bytes()
    except OSError as exc:
        return exc.errno
    return None


def tracebacks_above_debug(log: str) -> list[str]:
    """The log records above DEBUG that carry a traceback (the nodes here log at DEBUG,
    where the FUSE binding shows the traceback of every errno it returns)."""
    found, level = [], ""
    for line in log.splitlines():
        fields = line.split(" ", 3)
        if len(fields) > 2 and fields[2] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            level = fields[2]
            current = line
        elif line.startswith("Traceback") and level != "DEBUG":
            found.append(current)
    return found


def single_error_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or " CRITICAL " in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --- a store on its own -----------------------------------------------------------------
def _small_store(path: Path) -> bytes:
    """A closed store holding one file of three blocks; returns the file's bytes."""
    content = os.urandom(3 * BS)
    with Store.create(path, max_size=64 << 20) as store:
        ino = store.allocate_ino()
        store.commit(ops.MakeNode(parent=ROOT_INO, ino=ino, mode=stat.S_IFREG | 0o644, rdev=0, uid=0, gid=0,
                                  time_ns=1, name=b"f"))
        store.commit(ops.Write(ino=ino, offset=0, time_ns=2, data=content))
    return content


def test_damaged_bytes_raise_and_are_counted(tmp_path: Path) -> None:
    content = _small_store(tmp_path / "s")
    assert flip_everywhere(tmp_path / "s", content[BS + 100:BS + 164]) >= 1
    with Store(tmp_path / "s") as store:
        with store.reader() as state, pytest.raises(DamagedValue, match=f"data of inode 2 at offset {BS}"):
            state.read(2, 0, 3 * BS)
        with store.reader() as state:
            assert state.read(2, 0, BS) == content[:BS]  # the block beside it is whole
        assert any(f"data of inode 2 at offset {BS}" in problem for problem in fsck(store))
        with pytest.raises(DamagedValue):
            digest(store)
        assert not store.handle_damage(DamagedValue(b"blocks", bytes(16), "test"))  # no peer: not repaired
        assert store.integrity.summary()["damaged_found"] == 1


def test_a_checkpoint_never_copies_damage(tmp_path: Path) -> None:
    content = _small_store(tmp_path / "s")
    with Store(tmp_path / "s") as store:
        checkpoints = Checkpoints(store, keep=2)
        assert checkpoints.take().seq == store.last_seq  # a whole store: taken
    assert flip_everywhere(tmp_path / "s", content[2 * BS + 10:2 * BS + 74]) >= 1
    with Store(tmp_path / "s") as store:
        store.commit(ops.SetAttr(ino=2, fields=ops.SET_MODE, mode=0o600, uid=0, gid=0, atime_ns=0,
                                 mtime_ns=0, time_ns=3))  # something new to checkpoint
        checkpoints = Checkpoints(store, keep=2)
        with pytest.raises(StoreDamaged, match=f"checkpoint not taken: .*data of inode 2 at offset {2 * BS}"):
            checkpoints.take()
        assert [c.seq for c in checkpoints.list()] == [store.last_seq - 1]  # only the older one
        assert not list((tmp_path / "s" / "checkpoints").glob(".tmp-*"))
        assert store.integrity.summary()["damaged_found"] == 2  # the block, and the record holding it


@pytest.mark.parametrize("verb", ["fsck", "digest", "scrub", "upgrade", "primary", "standby", "inspect",
                                  "verify"])
def test_a_truncated_store_is_one_line_and_exit_1(tmp_path: Path, verb: str) -> None:
    data = tmp_path / "s"
    _small_store(data)
    path = data / "data.mdb"
    size = path.stat().st_size
    os.truncate(path, size // 2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = {
        "primary": ["--mount", str(mnt)],
        "standby": ["--primary", "tcp://127.0.0.1:9", "--mount", str(mnt), "--insecure"],
        "inspect": ["--mount", str(mnt)],
        "verify": ["--data", str(data), "--deadline", "1"],
    }.get(verb, [])
    result = run_cli(verb, "--data", str(data), *args, check=False, timeout=60)
    assert result.returncode == 1, result.stderr
    line = single_error_line(result)
    assert f"store file truncated: {size // 2} of " in line and "rebuild this node from a standby" in line
    assert not os.path.ismount(mnt)


def test_damaged_lmdb_structure_is_reported_not_a_traceback(tmp_path: Path) -> None:
    data = tmp_path / "s"
    with Store.create(data, max_size=64 << 20) as store:
        for i in range(300):  # enough entries for branch pages in every database
            ino = store.allocate_ino()
            store.commit(ops.MakeNode(parent=ROOT_INO, ino=ino, mode=stat.S_IFREG | 0o644, rdev=0, uid=0,
                                      gid=0, time_ns=i, name=b"file-%04d-%s" % (i, b"x" * 100)))
    path = data / "data.mdb"
    raw = bytearray(path.read_bytes())
    page = 4096
    for at in range(4 * page, len(raw), page):  # every page's header but the first few: garbage
        raw[at + 10:at + 16] = b"\xff" * 6
    path.write_bytes(raw)
    for verb in ("fsck", "digest", "scrub"):
        result = run_cli(verb, "--data", str(data), check=False)
        assert result.returncode == 1, (verb, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr + result.stdout, result.stderr
        assert "damaged" in (result.stdout + result.stderr).lower() or "corrupt" in result.stderr.lower()


# --- a lone node, mounted -----------------------------------------------------------------
@pytest.mark.fuse
def test_a_lone_node_refuses_damaged_data_with_eio(cluster: Cluster) -> None:
    primary = cluster.primary("p", listen=False)
    content = os.urandom(2 * BS)
    (primary.mount / "damaged").write_bytes(content)
    (primary.mount / "partial").write_bytes(b"x" * 100)
    with open(primary.mount / "partial", "r+b") as f:  # a partial write: the block holds its own bytes
        f.seek(10)
        f.write(b"tandemfs partial block marker")
    (primary.mount / "whole").write_bytes(b"whole file")
    primary.stop()
    assert flip_everywhere(primary.data, content[BS + 1000:BS + 1064]) >= 1
    assert flip_everywhere(primary.data, b"tandemfs partial block marker") >= 1

    primary.start().wait_ready()
    assert read_error(primary.mount / "damaged") == errno.EIO
    assert read_error(primary.mount / "partial") == errno.EIO
    assert (primary.mount / "whole").read_bytes() == b"whole file"
    with open(primary.mount / "damaged", "rb") as f:
        assert f.read(BS) == content[:BS]  # the undamaged block still reads
    log = primary.log_path.read_text()
    assert log.count(f"CRITICAL journal.integrity: damaged data of inode 2 at offset {BS}") == 1
    assert tracebacks_above_debug(log) == []
    status = primary.status()
    assert status["integrity"]["damaged_found"] == 2 and status["integrity"]["unrepaired"] == 2
    assert "DAMAGE" in cli("status", "--data", str(primary.data)).stdout

    scrubbed = cli("scrub", "--data", str(primary.data))
    assert scrubbed.returncode == 1, scrubbed.stdout + scrubbed.stderr
    # Each file's block and the journal record holding its bytes: four values.
    assert "4 damaged, 0 repaired, 4 not repaired" in scrubbed.stdout
    assert scrubbed.stdout.count("damaged: ") == 4
    primary.stop()
    for verb in ("digest", "fsck", "scrub"):
        result = cli(verb, "--data", str(primary.data))
        assert result.returncode == 1 and "Traceback" not in result.stderr, (verb, result.stderr)


# --- with a peer ------------------------------------------------------------------------
@pytest.mark.fuse
def test_damage_is_repaired_from_the_peer_both_ways(cluster: Cluster) -> None:
    primary = cluster.primary("p")
    standby = cluster.standby(primary, "s")
    content = os.urandom(3 * BS)
    (primary.mount / "f").write_bytes(content)
    (primary.mount / "d").mkdir()
    (primary.mount / "d" / "named-for-the-scrub").write_bytes(b"small")
    cluster.verify(primary, standby)

    # On the primary: the file's data, and a directory entry nobody reads before the scrub.
    primary.stop()
    assert flip_everywhere(primary.data, content[BS + 1000:BS + 1064]) >= 1
    assert flip_everywhere(primary.data, b"named-for-the-scrub") >= 1
    primary.start().wait_ready()
    primary.wait_status(lambda s: any(p["connected"] for p in s["replication"]["standbys"]), 30,
                        "the standby back")
    assert (primary.mount / "f").read_bytes() == content
    assert "repaired data of inode 2 at offset 65536 from a standby" in primary.log_path.read_text()
    scrubbed = cli("scrub", "--data", str(primary.data))
    assert scrubbed.returncode == 0, scrubbed.stdout + scrubbed.stderr
    # The entry's name (in its key: repaired with the entries around it) and the record of
    # the create that named it.
    assert "2 damaged, 2 repaired, 0 not repaired" in scrubbed.stdout
    assert (primary.mount / "d" / "named-for-the-scrub").read_bytes() == b"small"

    # On the standby: its copy of the file's data, read through its read-only mount.
    standby.stop()
    assert flip_everywhere(standby.data, content[2 * BS + 500:2 * BS + 564]) >= 1
    standby.start().wait_ready()
    standby.wait_status(lambda s: s["standby"]["state"] == "following", 30, "following again")
    assert (standby.mount / "f").read_bytes() == content
    assert "repaired data of inode 2 at offset 131072 from the primary" in standby.log_path.read_text()
    assert standby.status()["integrity"]["repaired"] == 1
    cluster.verify(primary, standby)
    for node in (primary, standby):
        node.stop()
        assert run_cli("fsck", "--data", str(node.data), check=False).returncode == 0


@pytest.mark.fuse
def test_a_standby_stops_at_a_damaged_record_of_its_primary(cluster: Cluster) -> None:
    primary = cluster.primary("p")
    content = os.urandom(BS)
    (primary.mount / "f").write_bytes(content)
    primary.stop()
    assert flip_everywhere(primary.data, content[100:164]) >= 1
    primary.start().wait_ready()

    standby = cluster.standby(primary, "s", mount=False)
    status = standby.wait_status(lambda s: s["standby"]["state"] == "failed", 30, "stopped following")
    assert "damaged" in status["standby"]["error"] and "scrub the primary" in status["standby"]["error"]
    log = standby.log_path.read_text()
    assert log.count("CRITICAL") == 1 and "STOPPED FOLLOWING" in log
    assert tracebacks_above_debug(log) == []
    assert primary.status()["integrity"]["damaged_found"] >= 1
    fetches = standby.status()["standby"]["fetches"]
    assert fetches < 10  # it does not fetch the bad record forever
    assert "STOPPED FOLLOWING" in cli("status", "--data", str(standby.data)).stdout
    assert "DAMAGE" in cli("status", "--data", str(primary.data)).stdout
