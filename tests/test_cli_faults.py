"""The command line against a hostile user: bad arguments, dead and live mountpoints, nodes
killed under a control client, a reader of stdout that goes away.

Every case runs `mount.py` as a process, the way a user would, and judges it by its exit
code, its stderr and what it left behind (directories, mounts).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fs.mounting import is_mounted, mounts_at
from tests.cluster import Cluster, cluster_fixture, free_port_pair  # noqa: F401
from tests.mounts import MOUNT_PY, REPO, Node, run_cli, wait_until

#: How long a control client may take to notice that its node died (seconds).
NOTICE = 5.0


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The single line a refused command printed; fails unless it exited 2 with exactly
    one line on stderr, no traceback, naming every fragment."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# --- bad arguments ---------------------------------------------------------------------------

# {file}: a regular file; {dir}: an empty directory; {new}: a path that does not exist, in
# an existing directory; {mnt}: an empty directory to mount on.
BAD_ARGUMENTS = [
    ("primary --data {file} --mount {mnt}", "argument --data", "not a directory"),
    ("primary --data {dir}/no/such --mount {mnt}", "argument --data", "parent directory"),
    ("primary --data {new} --mount {mnt} --max-size -5", "argument --max-size", "too small"),
    ("primary --data {new} --mount {mnt} --max-size 0", "argument --max-size", "too small"),
    ("primary --data {new} --mount {mnt} --max-size 1K", "argument --max-size", "too small"),
    ("primary --data {new} --mount {mnt} --max-size 100000T", "argument --max-size", "too large"),
    ("primary --data {new} --mount {mnt} --max-size lots", "argument --max-size", "not a size"),
    ("primary --data {new} --mount {mnt} --max-size infG", "argument --max-size", "not a size"),
    ("primary --data {new} --mount {mnt} --retain-bytes -1", "argument --retain-bytes", "too small"),
    ("primary --data {new} --mount {mnt} --tail-bytes=-1M", "argument --tail-bytes", "too small"),
    ("primary --data {new} --mount {mnt} --retain-records -1", "argument --retain-records", "too small"),
    ("primary --data {new} --mount {mnt} --tail-records x", "argument --tail-records", "not a whole number"),
    ("primary --data {new} --mount {mnt} --keep-checkpoints 0", "argument --keep-checkpoints", "too small"),
    ("primary --data {new} --mount {mnt} --checkpoint-interval 0", "argument --checkpoint-interval",
     "positive"),
    ("primary --data {new} --mount {mnt} --checkpoint-interval -3", "argument --checkpoint-interval",
     "positive"),
    ("primary --data {new} --mount {mnt} --sync-timeout nan", "argument --sync-timeout", "positive"),
    ("primary --data {new} --mount {mnt} --listen foo", "argument --listen", "tcp://HOST:PORT"),
    ("primary --data {new} --mount {mnt} --listen tcp://999.1.1.1:1 --insecure", "argument --listen",
     "not an IP address or a host name"),
    ("primary --data {new} --mount {mnt} --listen tcp://192.0.2.1:7000 --insecure", "argument --listen",
     "not an address of this machine"),
    ("primary --data {new} --mount {mnt} --listen tcp://127.0.0.1:99999", "argument --listen", "1..65535"),
    ("primary --data {new} --mount {mnt} --listen tcp://127.0.0.1:0", "argument --listen", "1..65535"),
    ("primary --data {new} --mount {mnt} --listen tcp://127.0.0.1:65535", "--listen", "give --control"),
    ("primary --data {new} --mount {mnt} --listen tcp://127.0.0.1:7000 --control tcp://127.0.0.1:x",
     "argument --control", "tcp://HOST:PORT"),
    ("primary --data {new} --mount {mnt} --peer tcp://bad_host:7000", "argument --peer", "host name"),
    ("standby --data {file} --primary tcp://127.0.0.1:7000", "argument --data", "not a directory"),
    ("standby --data {dir}/no/such --primary tcp://127.0.0.1:7000", "argument --data", "parent directory"),
    ("standby --data {new} --primary tcp://127.0.0.1:70000", "argument --primary", "1..65535"),
    ("standby --data {new} --primary tcp://300.2.3.4:7000", "argument --primary", "not an IP address"),
    ("standby --data {new} --primary tcp://127.0.0.1:7000 --name " + "n" * 65, "argument --name", "64"),
    ("standby --data {new} --primary tcp://127.0.0.1:7000 --auto-promote-after -1",
     "argument --auto-promote-after", "positive"),
    ("standby --data {new} --primary tcp://127.0.0.1:7000 --listen tcp://127.0.0.1:-1", "argument --listen",
     "tcp://HOST:PORT"),
    ("promote --data {file} --mount {mnt}", "argument --data", "not a directory"),
    ("promote --data {new} --mount {mnt}", "argument --data", "does not exist"),
    ("promote --data {dir} --timeout 0", "argument --timeout", "positive"),
    ("inspect --data {file} --mount {mnt}", "argument --data", "not a directory"),
    ("fsck --data {file}", "argument --data", "not a directory"),
    ("fsck --data {new}", "argument --data", "does not exist"),
    ("digest --data {file}", "argument --data", "not a directory"),
    ("digest --data {dir} --timeout -1", "argument --timeout", "positive"),
    ("upgrade --data {file}", "argument --data", "not a directory"),
    ("status --data {file}", "argument --data", "not a directory"),
    ("status --data {dir} --timeout 0", "argument --timeout", "positive"),
    ("checkpoint --data {file}", "argument --data", "not a directory"),
    ("checkpoint --data {dir} --timeout nope", "argument --timeout", "not a number"),
    ("forget --data {file} --standby s", "argument --data", "not a directory"),
    ("verify --data {file} --data {dir}", "argument --data", "not a directory"),
    ("verify --data {dir} --data {dir} --deadline -1", "argument --deadline", "positive"),
    ("status --data {dir} --bogus", "unrecognized arguments", "--bogus"),
    ("no-such-verb", "invalid choice", "no-such-verb"),
]


@pytest.mark.parametrize(("command", "option", "says"), BAD_ARGUMENTS,
                         ids=[case[0].split(" --data")[0] + ": " + case[1] + " " + case[2]
                              for case in BAD_ARGUMENTS])
def test_a_bad_argument_is_one_line_and_exit_2(tmp_path: Path, command: str, option: str, says: str) -> None:
    places = {"file": tmp_path / "a-file", "dir": tmp_path / "a-dir", "new": tmp_path / "new",
              "mnt": tmp_path / "mnt"}
    places["file"].write_text("not a directory\n")
    places["dir"].mkdir()
    places["mnt"].mkdir()
    args = command.format(**{name: str(path) for name, path in places.items()}).split()
    line = one_line_error(run_cli(*args, timeout=30, check=False), option, says)
    assert line.startswith("mount.py"), line  # the standard usage error: `mount.py VERB: error: ...`
    assert not places["new"].exists() and not (places["dir"] / "no").exists()  # nothing was made
    assert list(places["dir"].iterdir()) == [] and not is_mounted(places["mnt"])


@pytest.mark.parametrize("verb", ["primary", "standby", "promote", "inspect"])
@pytest.mark.parametrize("mountpoint", ["missing", "file"])
def test_a_bad_mountpoint_is_one_line_and_exit_2(tmp_path: Path, verb: str, mountpoint: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    mnt = tmp_path / "mnt"
    if mountpoint == "file":
        mnt.write_text("")
    extra = {"standby": ["--primary", "tcp://127.0.0.1:7000"]}.get(verb, [])
    result = run_cli(verb, "--data", str(data), "--mount", str(mnt), *extra, timeout=30, check=False)
    one_line_error(result, str(mnt), "does not exist" if mountpoint == "missing" else "is not a directory")
    assert list(data.iterdir()) == []


def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    import socket

    port = free_port_pair()
    (tmp_path / "mnt").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run_cli("primary", "--data", str(tmp_path / "data"), "--mount", str(tmp_path / "mnt"),
                         "--listen", f"tcp://127.0.0.1:{port}", timeout=60, check=False)
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line or "Traceback" in line]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert "Address already in use" in errors[0] and str(port) in errors[0]
    assert not is_mounted(tmp_path / "mnt")


# --- mountpoints -----------------------------------------------------------------------------

def dead_mount_left(node: Node) -> None:
    """SIGKILL `node` and check it left what a killed node leaves: a dead FUSE mount."""
    node.kill()
    assert node.mountpoint is not None and is_mounted(node.mountpoint)
    with pytest.raises(OSError) as dead:
        os.statvfs(node.mountpoint)  # (a stat may still be answered from the kernel's cache)
    assert dead.value.errno == errno.ENOTCONN


CLEARED = "cleared the dead mount of"


@pytest.mark.fuse
def test_primary_restarts_on_the_dead_mount_of_its_killed_self(primaries, tmp_path: Path) -> None:
    node = primaries.start("p")
    payload = os.urandom(100_000)
    with open(node.mountpoint / "kept", "wb") as f:
        f.write(payload)
        os.fsync(f.fileno())
    dead_mount_left(node)

    again = primaries.start("p")  # same data, same mountpoint, at once
    assert (again.mountpoint / "kept").read_bytes() == payload
    assert again.log().count(CLEARED) == 1, again.log()
    assert again.log().count("created a new store at") == 1  # the first start only
    (again.mountpoint / "after").write_bytes(b"writable")

    # `inspect` clears one as well (its mount is read-only).
    dead_mount_left(again)
    inspect = Node(["inspect", "--data", str(again.data), "--mount", str(again.mountpoint)],
                   tmp_path / "inspect.log", again.mountpoint)
    try:
        inspect.wait_mounted()
        assert (inspect.mountpoint / "kept").read_bytes() == payload
        assert (inspect.mountpoint / "after").read_bytes() == b"writable"
        assert inspect.log().count(CLEARED) == 1, inspect.log()
    finally:
        assert inspect.stop() == 0, inspect.log()
    run_cli("fsck", "--data", str(again.data))


@pytest.mark.fuse
def test_standby_and_promote_restart_on_dead_mounts(cluster: Cluster) -> None:
    primary = cluster.primary()
    (primary.mount / "f").write_bytes(b"replicated")
    standby = cluster.standby(primary)
    assert "no store at" in standby.log() and "creating one from the primary" in standby.log()
    wait_until(lambda: (standby.mount / "f").exists(), 20, "the file on the standby")

    standby.proc.kill()  # (Proc.kill would unmount)
    standby.proc.wait(timeout=30)
    assert is_mounted(standby.mount)
    again = cluster.standby(primary)  # same name: same data and mountpoint
    assert CLEARED in again.log()
    assert (again.mount / "f").read_bytes() == b"replicated"

    primary.kill()
    again.proc.kill()
    again.proc.wait(timeout=30)
    assert is_mounted(again.mount)
    promoted = cluster.take_over(again)
    assert CLEARED in promoted.log()
    (promoted.mount / "g").write_bytes(b"written after the takeover")
    assert (promoted.mount / "f").read_bytes() == b"replicated"


@pytest.mark.fuse
def test_no_node_mounts_over_a_live_mount(primaries, tmp_path: Path) -> None:
    first = primaries.start("p")
    (first.mountpoint / "mine").write_bytes(b"first")
    store = tmp_path / "other-store"
    store.mkdir()
    for args in (["primary", "--data", str(tmp_path / "second")],
                 ["standby", "--data", str(tmp_path / "second"), "--primary", "tcp://127.0.0.1:7000"],
                 ["inspect", "--data", str(first.data)],
                 ["promote", "--data", str(store)]):
        result = run_cli(*args, "--mount", str(first.mountpoint), timeout=30, check=False)
        one_line_error(result, "already a mountpoint", f"tandemfs:{first.data}", "fuse.tandemfs")
        assert not (tmp_path / "second").exists()
    assert len(mounts_at(first.mountpoint)) == 1
    assert (first.mountpoint / "mine").read_bytes() == b"first"  # the first mount still works
    (first.mountpoint / "still").write_bytes(b"writable")


@pytest.mark.fuse
def test_primary_on_a_new_directory_says_it_creates_a_store(primaries) -> None:
    node = primaries.start("fresh")
    lines = [line for line in node.log().splitlines() if "created a new store at" in line]
    assert len(lines) == 1 and " INFO " in lines[0] and str(node.data) in lines[0], node.log()
    node.stop()
    again = primaries.start("fresh")
    assert again.log().count("created a new store at") == 1  # an existing store is not new


# --- control clients and a node that dies ----------------------------------------------------

def start_client(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(MOUNT_PY), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


@pytest.mark.fuse
def test_control_clients_notice_a_node_killed_while_they_wait(primaries) -> None:
    node = primaries.start("p")
    data = str(node.data)
    node.proc.send_signal(signal.SIGSTOP)  # alive, holding its lock, answering nothing
    try:
        clients = [start_client("checkpoint", "--data", data), start_client("status", "--data", data),
                   start_client("digest", "--data", data, "--timeout", "60")]
        time.sleep(1.5)  # they have asked and wait
        assert all(client.poll() is None for client in clients)
        node.proc.kill()
    finally:
        node.proc.send_signal(signal.SIGCONT)
    killed = time.monotonic()
    node.proc.wait(timeout=30)
    checkpoint, status, digest = clients
    for client in (checkpoint, status):
        client.wait(timeout=NOTICE + 5)
    assert time.monotonic() - killed < NOTICE
    for client in (checkpoint, status):
        err = client.stderr.read()
        assert client.returncode == 1 and "stopped before it answered" in err and "Traceback" not in err, err
    # digest falls back to reading the store itself, which the dead node left consistent
    out, err = digest.communicate(timeout=30)
    assert digest.returncode == 0 and "seq=" in out, err

    for verb in ("checkpoint", "status"):  # asked after the death: at once
        started = time.monotonic()
        result = run_cli(verb, "--data", data, timeout=NOTICE + 5, check=False)
        assert time.monotonic() - started < NOTICE
        assert result.returncode == 1 and "no node runs on" in result.stderr, result.stderr


@pytest.mark.fuse
def test_a_live_node_may_take_longer_than_the_death_check(primaries) -> None:
    node = primaries.start("p")
    (node.mountpoint / "f").write_bytes(b"x")
    node.proc.send_signal(signal.SIGSTOP)
    try:
        client = start_client("checkpoint", "--data", str(node.data))
        time.sleep(NOTICE + 1)
        assert client.poll() is None  # still waiting: the node is alive
    finally:
        node.proc.send_signal(signal.SIGCONT)
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0 and out.startswith("checkpoint seq="), err


@pytest.mark.fuse
def test_status_into_a_pipe_nobody_reads_is_quiet(primaries) -> None:
    node = primaries.start("p")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        result = subprocess.run([sys.executable, str(MOUNT_PY), "status", "--data", str(node.data), "--json"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30, cwd=REPO)
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == "", result.stderr
    shell = subprocess.run(f"{sys.executable} {MOUNT_PY} status --data {node.data} | head -1", shell=True,
                           capture_output=True, text=True, timeout=30, cwd=REPO)
    assert shell.stdout.startswith("role") and shell.stderr == "", shell.stderr
