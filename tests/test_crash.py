"""Crash safety by killing the filesystem process mid-work, and journal replay."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fs.mounting import unmount
from journal.check import digest, replay
from journal.store import Store
from tests.mounts import run_cli, start_primary, wait_until
from tests.test_mount import copy_source_tree, sh

pytestmark = pytest.mark.fuse

#: Writes files under the mount as fast as it can; each file is written once, fsynced,
#: renamed into place and its directory fsynced, and only then acknowledged on stdout
#: ("name sha256"). Two threads, so group commits and concurrent FUSE calls happen.
WRITER = textwrap.dedent("""
    import hashlib, os, sys, threading
    root, prefix = sys.argv[1], sys.argv[2]
    lock = threading.Lock()
    def storm(tid):
        os.makedirs(os.path.join(root, f"{prefix}{tid}"), exist_ok=True)
        d = os.open(os.path.join(root, f"{prefix}{tid}"), os.O_RDONLY)
        for i in range(100000):
            name = f"{prefix}{tid}/f{i}"
            data = os.urandom(int.from_bytes(os.urandom(2), "big") * 4 + 1)
            tmp = os.path.join(root, name + ".tmp")
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, os.path.join(root, name))
            os.fsync(d)
            with lock:
                sys.stdout.write(f"{name} {hashlib.sha256(data).hexdigest()}\\n")
                sys.stdout.flush()
    threads = [threading.Thread(target=storm, args=(t,), daemon=True) for t in range(2)]
    for t in threads: t.start()
    for t in threads: t.join()
""")


def acknowledged(path: Path) -> dict[str, str]:
    acks = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[1]) == 64:
            acks[parts[0]] = parts[1]
    return acks


@pytest.mark.parametrize("options, kill_after", [
    ((), (0.0, 0.5)),
    # No journal tail: every second the journal is pruned, which copies the bytes of the
    # files still there out of their records (journal/apply.py detach_record); killed
    # later, a kill may land in a pruning transaction.
    (("--tail-records", "0"), (0.5, 2.5)),
], ids=["journal-kept", "journal-pruned-as-it-grows"])
def test_sigkill_during_write_storm_loses_no_fsynced_file(tmp_path, options, kill_after):
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    all_acks: dict[str, str] = {}
    for round_no in range(3):
        node = start_primary(data, mnt, *options, log=tmp_path / "primary.log")
        try:
            ack_log = tmp_path / f"acks{round_no}.txt"
            with open(ack_log, "w") as out:
                writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt), f"r{round_no}-"],
                                          stdout=out, stderr=subprocess.DEVNULL)
                try:
                    wait_until(lambda log=ack_log: len(acknowledged(log)) >= 20, 30,
                             "first acknowledged files")
                    time.sleep(rng.uniform(*kill_after))
                    node.proc.send_signal(signal.SIGKILL)  # mid-storm, at a random instant
                    node.proc.wait(timeout=30)
                finally:
                    if writer.poll() is None:
                        writer.kill()
                    writer.wait(timeout=30)
        finally:
            node.stop()  # the process is dead: this cleans the dead mount
        unmount(mnt)
        assert not os.path.ismount(mnt)
        all_acks.update(acknowledged(ack_log))
        fsck = run_cli("fsck", "--data", str(data), check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr

        node = start_primary(data, mnt, *options, log=tmp_path / "primary.log")
        try:
            for name, sha in all_acks.items():
                assert hashlib.sha256((mnt / name).read_bytes()).hexdigest() == sha, name
        finally:
            assert node.stop() == 0
    assert len(all_acks) >= 60
    if options:
        with Store(data, readonly=True) as store:
            assert store.first_seq() > 1, "the journal was never pruned"


def test_replaying_the_journal_reproduces_the_state(tmp_path):
    data, mnt = tmp_path / "data", tmp_path / "mnt"
    src = copy_source_tree(tmp_path)
    node = start_primary(data, mnt, log=tmp_path / "primary.log")
    try:
        sh("cp", "-a", str(src), str(mnt / "tree"))
        sh("sh", "-c", "mv tree/json tree/json2 && rm -r tree/email && ln -s json2 tree/j && "
           "truncate -s 100 tree/json2/decoder.py && chmod 700 tree/asyncio", cwd=mnt)
        os.setxattr(mnt / "tree" / "json2", "user.tag", b"v")
    finally:
        assert node.stop() == 0
    with Store(data, readonly=True) as live:
        expected = digest(live)
        with replay(live, tmp_path / "replayed") as copy:
            assert digest(copy) == expected
    assert run_cli("digest", "--data", str(data)).stdout.split()[0] == expected[0]
    assert run_cli("digest", "--data", str(tmp_path / "replayed")).stdout.split()[0] == expected[0]
