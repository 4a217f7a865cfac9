"""The mounted filesystem driven by the tools its users run: cp, cat, tar, rsync, git, ..."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import Primaries
from tests.mounts import run_cli, wait_until

pytestmark = pytest.mark.fuse

STDLIB = Path(sysconfig.get_paths()["stdlib"])
#: A real source tree of a few hundred files, present wherever Python is.
SOURCE_TREES = [STDLIB / "json", STDLIB / "email", STDLIB / "asyncio", STDLIB / "unittest"]


def sh(*args: str, cwd: Path | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def copy_source_tree(dest: Path) -> Path:
    src = dest.parent / "src-tree"
    if not src.exists():
        src.mkdir()
        for tree in SOURCE_TREES:
            shutil.copytree(tree, src / tree.name, ignore=shutil.ignore_patterns("__pycache__"),
                            symlinks=True)
        os.symlink("json/__init__.py", src / "a-symlink")
        os.link(src / "json" / "decoder.py", src / "a-hardlink")
        os.chmod(src / "json" / "tool.py", 0o750)
    return src


def test_cp_a_then_diff_r(primary, tmp_path):
    src = copy_source_tree(tmp_path)
    mnt = primary.mountpoint
    sh("cp", "-a", str(src), str(mnt / "tree"))
    sh("diff", "-r", "--no-dereference", str(src), str(mnt / "tree"))
    for path in (src / "json" / "tool.py", src / "a-symlink"):
        ours = os.lstat(mnt / "tree" / path.relative_to(src))
        theirs = os.lstat(path)
        assert (ours.st_mode, ours.st_size) == (theirs.st_mode, theirs.st_size)
        assert ours.st_mtime_ns == theirs.st_mtime_ns  # cp -a keeps ns timestamps
    assert os.stat(mnt / "tree" / "a-hardlink").st_nlink == 2
    assert sh("cat", str(mnt / "tree" / "json" / "__init__.py")).stdout == \
        (src / "json" / "__init__.py").read_text()


def test_tar_round_trip(primary, tmp_path):
    src = copy_source_tree(tmp_path)
    mnt = primary.mountpoint
    archive = tmp_path / "tree.tar"
    sh("tar", "cf", str(archive), "-C", str(src), ".")
    (mnt / "x").mkdir()
    sh("tar", "xf", str(archive), "-C", str(mnt / "x"))
    sh("diff", "-r", "--no-dereference", str(src), str(mnt / "x"))
    again = tmp_path / "again.tar"
    sh("tar", "cf", str(again), "-C", str(mnt / "x"), ".")
    (tmp_path / "out").mkdir()
    sh("tar", "xf", str(again), "-C", str(tmp_path / "out"))
    sh("diff", "-r", "--no-dereference", str(src), str(tmp_path / "out"))


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_rsync(primary, tmp_path):
    src = copy_source_tree(tmp_path)
    mnt = primary.mountpoint
    sh("rsync", "-aHX", f"{src}/", f"{mnt}/r/")
    sh("diff", "-r", "--no-dereference", str(src), str(mnt / "r"))
    # A second run finds nothing to transfer: sizes and ns mtimes survived.
    out = sh("rsync", "-aHi", f"{src}/", f"{mnt}/r/").stdout
    assert out.strip() == "", out


def test_git_init_commit(primary):
    repo = primary.mountpoint / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org", "HOME": str(repo)}
    sh("git", "init", "-q", cwd=repo, env=env)
    (repo / "hello.txt").write_text("hello\n")
    (repo / "sub").mkdir()
    (repo / "sub" / "x.py").write_text("print('x')\n")
    sh("git", "add", "-A", cwd=repo, env=env)
    sh("git", "commit", "-q", "-m", "first", cwd=repo, env=env)
    (repo / "hello.txt").write_text("hello again\n")
    sh("git", "commit", "-q", "-am", "second", cwd=repo, env=env)
    assert sh("git", "status", "--porcelain", cwd=repo, env=env).stdout == ""
    assert sh("git", "log", "--oneline", cwd=repo, env=env).stdout.count("\n") == 2
    sh("git", "fsck", "--strict", cwd=repo, env=env)


def test_shell_tools_mv_ln_chmod_touch(primary, tmp_path):
    mnt = primary.mountpoint
    stamp = "2001-02-03 04:05:06.123456789"
    sh("touch", "-d", stamp, str(tmp_path / "reference"))
    sh("sh", "-c", "echo one > a && mkdir d && mv a d/b && ln d/b c && ln -s d/b s && chmod 640 c "
       "&& touch -d '2001-02-03 04:05:06.123456789' s c", cwd=mnt)
    assert (mnt / "s").read_text() == "one\n"
    assert os.readlink(mnt / "s") == "d/b"
    st = os.stat(mnt / "d" / "b")
    assert st.st_nlink == 2 and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == os.stat(tmp_path / "reference").st_mtime_ns
    assert os.stat(mnt / "d").st_nlink == 2 and os.stat(mnt).st_nlink == 3
    sh("sh", "-c", "ln d/b e && stat -c %h d/b", cwd=mnt)
    assert sh("stat", "-c", "%h", "d/b", cwd=mnt).stdout.strip() == "3"  # seen through the other name


def test_overwriting_an_existing_file_truncates_it(primary, tmp_path):
    """O_TRUNC on an existing file (a shell redirect, cp onto it, an editor's save)."""
    mnt = primary.mountpoint
    f = mnt / "f"
    f.write_bytes(b"y" * 100_000)
    os.link(f, mnt / "alias")
    assert os.stat(mnt / "alias").st_size == 100_000
    sh("sh", "-c", "echo x > f", cwd=mnt)
    assert f.read_bytes() == b"x\n"
    assert os.stat(f).st_size == 2 and os.stat(mnt / "alias").st_size == 2
    (tmp_path / "small").write_bytes(b"small")
    sh("cp", str(tmp_path / "small"), str(f))
    assert (mnt / "alias").read_bytes() == b"small"
    with open(f, "w") as out:
        out.write("z")
    assert f.read_text() == "z"
    empty = mnt / "empty"
    empty.write_bytes(b"")
    os.utime(empty, ns=(1_000_000_000, 1_000_000_000))
    sh("sh", "-c", ": > empty", cwd=mnt)  # Linux sets the times even when nothing is cut
    assert os.stat(empty).st_size == 0 and os.stat(empty).st_mtime_ns > 1_000_000_000


def test_hard_links_never_show_stale_attributes(primary):
    """The kernel caches attributes per name: a change made through one name of a file must
    show through every other name at once, whatever the change."""
    mnt = primary.mountpoint
    a, b = mnt / "a", mnt / "b"
    a.write_bytes(b"one")
    assert os.stat(a).st_nlink == 1  # cached while it has a single name
    os.link(a, b)
    assert os.stat(a).st_nlink == 2 and os.stat(b).st_nlink == 2
    mtime = os.stat(a).st_mtime_ns

    os.chmod(b, 0o600)
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    with open(b, "ab") as f:
        f.write(b" two")
    st = os.stat(a)
    assert st.st_size == 7 and st.st_mtime_ns > mtime
    assert a.read_bytes() == b"one two"
    os.utime(b, ns=(1_000_000_000, 2_000_000_123))
    assert os.stat(a).st_mtime_ns == 2_000_000_123
    os.truncate(b, 2)
    assert os.stat(a).st_size == 2 and a.read_bytes() == b"on"
    ctime = os.stat(a).st_ctime_ns
    os.setxattr(b, "user.k", b"v")
    assert os.stat(a).st_ctime_ns > ctime and os.getxattr(a, "user.k") == b"v"

    # Names moved, directories included, stay followed.
    (mnt / "d").mkdir()
    os.rename(b, mnt / "d" / "c")
    assert os.stat(mnt / "d" / "c").st_nlink == 2
    os.rename(mnt / "d", mnt / "e")  # its node, attributes cached, moves with it
    os.chmod(a, 0o604)
    assert stat.S_IMODE(os.stat(mnt / "e" / "c").st_mode) == 0o604
    os.chmod(mnt / "e" / "c", 0o640)
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o640

    # A name less, by unlink or by a rename over it.
    os.link(a, mnt / "f")
    assert os.stat(a).st_nlink == 3 and os.stat(mnt / "f").st_nlink == 3
    os.unlink(mnt / "e" / "c")
    assert os.stat(a).st_nlink == 2 and os.stat(mnt / "f").st_nlink == 2
    (mnt / "other").write_bytes(b"")
    os.rename(mnt / "other", mnt / "f")
    assert os.stat(a).st_nlink == 1
    assert os.stat(mnt / "f").st_nlink == 1 and os.stat(mnt / "f").st_size == 0


def test_posix_semantics(primary):
    mnt = primary.mountpoint
    (mnt / "f").write_bytes(b"x" * 100)
    (mnt / "dir" / "sub").mkdir(parents=True)
    (mnt / "empty").mkdir()
    with pytest.raises(OSError) as e:
        os.rmdir(mnt / "dir")
    assert e.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as e:
        os.rename(mnt / "dir", mnt / "dir" / "sub" / "x")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.rename(mnt / "empty", mnt / "dir")
    assert e.value.errno == errno.ENOTEMPTY
    os.rename(mnt / "dir" / "sub", mnt / "empty")  # replaces an empty directory
    assert sorted(os.listdir(mnt)) == ["dir", "empty", "f"]
    assert os.stat(mnt / "dir").st_nlink == 2
    (mnt / "g").write_bytes(b"new")
    os.rename(mnt / "g", mnt / "f")  # replaces a file
    assert (mnt / "f").read_bytes() == b"new"
    with pytest.raises(OSError) as e:
        os.open(mnt / ("n" * 256), os.O_CREAT | os.O_WRONLY)
    assert e.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as e:
        os.stat(mnt / "f" / "x")
    assert e.value.errno == errno.ENOTDIR
    with pytest.raises(OSError) as e:
        os.link(mnt / "dir", mnt / "dirlink")
    assert e.value.errno == errno.EPERM
    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO(os.stat(mnt / "fifo").st_mode)


def test_parent_times_move(primary):
    mnt = primary.mountpoint
    (mnt / "d").mkdir()
    before = os.stat(mnt / "d")
    time.sleep(0.01)
    (mnt / "d" / "f").write_text("x")
    after = os.stat(mnt / "d")
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns


def test_data_paths(primary):
    mnt = primary.mountpoint
    data = os.urandom(3 * 65536 + 1234)
    (mnt / "big").write_bytes(data)
    assert (mnt / "big").read_bytes() == data
    with open(mnt / "big", "r+b") as f:
        f.seek(70000)
        f.write(b"Z" * 10)
        f.truncate(100000)
        f.truncate(200000)  # grows with zeros, never stale bytes
        f.seek(300000)
        f.write(b"end")
    expected = bytearray(data[:100000]) + bytes(100000) + bytes(100000) + b"end"
    expected[70000:70010] = b"Z" * 10
    assert (mnt / "big").read_bytes() == bytes(expected)
    os.truncate(mnt / "big", 5)
    assert (mnt / "big").read_bytes() == data[:5]


def test_sparse_files_stay_sparse(primary, tmp_path):
    """st_blocks counts what a file occupies: du sees a sparse file as small, and cp
    keeps it sparse."""
    mnt = primary.mountpoint
    with open(mnt / "sparse", "wb") as f:
        f.seek(1 << 30)
        f.write(b"x")
    st = os.stat(mnt / "sparse")
    assert st.st_size == (1 << 30) + 1
    assert st.st_blocks * 512 <= 65536  # one stored block, not 1 GiB
    du = sh("du", "-k", str(mnt / "sparse")).stdout.split()[0]
    assert int(du) <= 64
    (mnt / "dense").write_bytes(os.urandom(200_000))
    assert os.stat(mnt / "dense").st_blocks == -(-200_000 // 512)  # a full file: its size, rounded up
    (mnt / "small").write_bytes(b"abc")
    assert os.stat(mnt / "small").st_blocks == 1
    sh("cp", str(mnt / "sparse"), str(mnt / "copy"))  # cp's default: --sparse=auto
    assert os.stat(mnt / "copy").st_blocks * 512 <= 65536
    assert os.stat(mnt / "copy").st_size == (1 << 30) + 1
    with open(mnt / "copy", "rb") as f:
        f.seek(1 << 30)
        assert f.read() == b"x"
    os.truncate(mnt / "dense", 70_000)
    assert os.stat(mnt / "dense").st_blocks == -(-70_000 // 512)


def test_unlink_while_open_keeps_reading(primary):
    mnt = primary.mountpoint
    (mnt / "f").write_bytes(b"still here")
    with open(mnt / "f", "rb") as f:
        os.unlink(mnt / "f")
        assert not (mnt / "f").exists()
        assert f.read() == b"still here"
    # The kernel releases the file asynchronously; then libfuse removes the hidden name.
    wait_until(lambda: not [n for n in os.listdir(mnt) if n.startswith(".fuse_hidden")], 10,
             "the unlinked file to go once closed")


def test_xattrs(primary):
    f = primary.mountpoint / "f"
    f.write_text("x")
    os.setxattr(f, "user.color", b"blue")
    assert os.getxattr(f, "user.color") == b"blue"
    assert "user.color" in os.listxattr(f)
    with pytest.raises(OSError) as e:
        os.setxattr(f, "user.color", b"red", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    os.removexattr(f, "user.color")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.color")
    assert e.value.errno == errno.ENODATA


def test_permissions_for_another_user():
    # The mount's ancestors must be traversable by the other user, so not under tmp_path.
    root = Path(tempfile.mkdtemp(prefix="tandemfs-perm-"))
    os.chmod(root, 0o755)
    cluster = Primaries(root)
    try:
        mnt = cluster.start().mountpoint
        (mnt / "secret").write_text("x")
        os.chmod(mnt / "secret", 0o600)
        (mnt / "open").write_text("y")
        os.chmod(mnt / "open", 0o644)

        def as_nobody(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(args, capture_output=True, text=True, timeout=30,
                                  user=65534, group=65534, cwd="/")

        assert as_nobody("cat", str(mnt / "open")).stdout == "y"
        denied = as_nobody("cat", str(mnt / "secret"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        denied = as_nobody("sh", "-c", f"echo > {mnt / 'new'}")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        denied = as_nobody("chmod", "777", str(mnt / "open"))
        assert denied.returncode != 0 and "not permitted" in denied.stderr
        assert stat.S_IMODE(os.stat(mnt / "open").st_mode) == 0o644
    finally:
        cluster.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def test_statfs_shows_configured_size(primaries):
    node = primaries.start("small", "--max-size", "8M")
    st = os.statvfs(node.mountpoint)
    assert st.f_blocks * st.f_frsize == 8 << 20
    assert 0 < st.f_bavail < st.f_blocks
    out = sh("df", "-B1", str(node.mountpoint)).stdout.splitlines()[-1].split()
    assert int(out[1]) == 8 << 20


def test_full_store_answers_enospc_and_recovers(primaries):
    node = primaries.start("full", "--max-size", "4M")
    mnt = node.mountpoint
    (mnt / "keep").write_bytes(b"precious")
    chunk = os.urandom(256 * 1024)
    written = 0
    with pytest.raises(OSError) as e, open(mnt / "filler", "wb") as f:
        for _ in range(64):  # 16 MiB: far past the 4 MiB store
            f.write(chunk)
            f.flush()
            written += len(chunk)
    assert e.value.errno == errno.ENOSPC
    assert written < 4 << 20
    assert (mnt / "keep").read_bytes() == b"precious"
    size = os.stat(mnt / "filler").st_size
    assert (mnt / "filler").read_bytes() == (chunk * 64)[:size]  # whatever was accepted is intact
    os.unlink(mnt / "filler")
    (mnt / "after").write_bytes(chunk)  # space came back
    assert (mnt / "after").read_bytes() == chunk
    assert node.stop() == 0
    run_cli("fsck", "--data", str(node.data))


def test_deleted_files_give_their_room_back_without_a_checkpoint(primaries):
    # The journal holds a copy of every write; unless it is pruned as it grows, a small
    # store fills with the history of files long deleted (and checkpoints are 10 min apart).
    node = primaries.start("cycles", "--max-size", "64M")
    mnt = node.mountpoint
    data = os.urandom(20 << 20)  # nearly a third of the store, journaled again on each pass
    for cycle in range(6):
        (mnt / "big").write_bytes(data)
        assert os.stat(mnt / "big").st_size == len(data), f"cycle {cycle}"
        os.unlink(mnt / "big")
    st = os.statvfs(mnt)
    assert st.f_bavail * st.f_frsize > 32 << 20  # df: the room is back
    assert node.stop() == 0
    run_cli("fsck", "--data", str(node.data))


def test_sigterm_and_external_unmount_exit_cleanly(primaries):
    node = primaries.start("a")
    (node.mountpoint / "f").write_text("x")
    assert node.stop() == 0
    assert not os.path.ismount(node.mountpoint)
    node = primaries.start("b")
    subprocess.run(["fusermount3", "-u", str(node.mountpoint)], check=True, timeout=30)
    assert node.proc.wait(timeout=20) == 0
