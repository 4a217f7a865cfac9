"""The mount against the local filesystem: the same random operations, run on both, must
get the same answers (results and errnos), move the times of the directories they
change, and leave the same tree behind.

Sequences are random but seeded, so a failure names the seed and the operations that led
to it, and replays. Every open file is closed before an operation that removes or moves a
name: libfuse hides an open file that loses its last name (renames it to .fuse_hidden*)
instead of unlinking it, a documented difference of the path-based API that this test
is not about.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import stat
from pathlib import Path

import pytest

from fs.binding import LIBFUSE_MAJOR
from tests.cluster import Cluster, cluster_fixture, wait_until  # noqa: F401 - a fixture

pytestmark = pytest.mark.fuse

SEEDS = [1, 2, 3, 4, 5, 6]
OPS_PER_SEED = 2000
#: A few names, so that operations collide: files, directories and symlinks come and go.
NAMES = ["a", "b", "c", "d1", "d2", "d1/x", "d1/y", "d2/x", "d1/e", "d1/e/z", "d1/e/f", "d2/x/q"]
#: Operations after which open files would be hidden rather than unlinked.
MOVES_NAMES = {"unlink", "rmdir", "rename", "rename2"}
SNAPSHOT_EVERY = 25
WEIGHTS = {"open": 4, "write": 3, "pwrite": 3, "read": 2, "pread": 2, "close": 2}
OPEN_FLAGS = [os.O_RDONLY, os.O_WRONLY, os.O_RDWR]
CREATE_FLAGS = [0, os.O_CREAT, os.O_CREAT | os.O_EXCL, os.O_TRUNC, os.O_CREAT | os.O_TRUNC, os.O_APPEND,
                os.O_CREAT | os.O_APPEND, os.O_DIRECTORY, os.O_NOFOLLOW, os.O_NOFOLLOW | os.O_CREAT]
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:  # AT_FDCWD
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def user_xattrs(path: str) -> tuple[tuple[str, str], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((n, digest(os.getxattr(path, n, follow_symlinks=False)))
                        for n in names if n.startswith("user.")))


def snapshot(root: Path) -> dict[str, tuple]:
    """Everything the two sides must agree on (not times, sizes of directories, inode numbers)."""
    tree: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            mode = None if stat.S_ISLNK(st.st_mode) else stat.S_IMODE(st.st_mode)
            entry: tuple = (stat.S_IFMT(st.st_mode), mode, st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry += (st.st_nlink, st.st_size, digest(f.read()))
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            elif stat.S_ISDIR(st.st_mode):
                entry += (st.st_nlink,)  # 2 + its subdirectories
            tree[os.path.relpath(path, root)] = (*entry, user_xattrs(path))
    return tree


class Side:
    """One filesystem under test: a root and the descriptors opened in it, by slot."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: dict[int, int] = {}

    def close_all(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def do(self, op: str, args: tuple) -> object:
        """The operation's answer: a comparable result, or 'E<errno name>'."""
        try:
            return self._do(op, args)
        except OSError as exc:
            return "E" + errno.errorcode.get(exc.errno, str(exc.errno))

    def _path(self, name: str) -> str:
        return str(self.root / name)

    def _do(self, op: str, args: tuple) -> object:
        path = self._path
        if op == "open":
            name, flags, slot = args
            fd = os.open(path(name), flags | os.O_NONBLOCK, 0o644)  # a FIFO must not wait
            if slot in self.fds:
                os.close(self.fds.pop(slot))
            self.fds[slot] = fd
            return "ok"
        if op in ("close", "write", "pwrite", "read", "pread", "ftruncate", "fstat", "seek_end"):
            fd = self.fds.get(args[0])
            if fd is None:
                return "no descriptor"
            if op == "close":
                os.close(self.fds.pop(args[0]))
                return "ok"
            if op == "write":
                return os.write(fd, args[1])
            if op == "pwrite":
                return os.pwrite(fd, args[1], args[2])
            if op == "read":
                return digest(os.read(fd, args[1]))
            if op == "pread":
                return digest(os.pread(fd, args[1], args[2]))
            if op == "ftruncate":
                os.ftruncate(fd, args[1])
                return "ok"
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return "directory"  # sizes and offsets of directories are the filesystem's own
            if op == "fstat":
                return st.st_size, st.st_nlink, stat.S_IMODE(st.st_mode)
            return os.lseek(fd, args[1], os.SEEK_END)
        name = args[0]
        if op == "stat":
            st = os.stat(path(name))
            if stat.S_ISDIR(st.st_mode):
                return "directory", stat.S_IMODE(st.st_mode)
            return stat.S_IFMT(st.st_mode), st.st_size, st.st_nlink, stat.S_IMODE(st.st_mode)
        if op == "listdir":
            return sorted(os.listdir(path(name)))
        if op == "readlink":
            return os.readlink(path(name))
        if op == "getxattr":
            return digest(os.getxattr(path(name), "user." + args[1]))
        if op == "utime":
            os.utime(path(name), ns=(args[1], args[1]))
            return os.stat(path(name)).st_mtime_ns
        actions = {
            "truncate": lambda: os.truncate(path(name), args[1]),
            "unlink": lambda: os.unlink(path(name)),
            "mkdir": lambda: os.mkdir(path(name), 0o755),
            "rmdir": lambda: os.rmdir(path(name)),
            "rename": lambda: os.rename(path(name), path(args[1])),
            "link": lambda: os.link(path(name), path(args[1])),
            "symlink": lambda: os.symlink(args[1], path(name)),
            "chmod": lambda: os.chmod(path(name), args[1]),
            "chown": lambda: os.chown(path(name), args[1], args[2]),
            "lchown": lambda: os.lchown(path(name), args[1], args[2]),
            "mkfifo": lambda: os.mkfifo(path(name), 0o644),
            "rename2": lambda: renameat2(path(name), path(args[1]), args[2]),
            "setxattr": lambda: os.setxattr(path(name), "user." + args[1], args[2], args[3]),
            "removexattr": lambda: os.removexattr(path(name), "user." + args[1]),
        }
        actions[op]()
        return "ok"


def random_op(rnd: random.Random, with_xattrs: bool) -> tuple[str, tuple]:
    """One call with its arguments. Rename's flags only where libfuse passes them (3)."""
    name, other = rnd.choice(NAMES), rnd.choice(NAMES)
    data = bytes([rnd.randrange(256)]) * rnd.choice([1, 100, 4096, 70_000, 200_000])
    slot = rnd.randrange(3)
    ops: list[tuple[str, tuple]] = [
        ("open", (name, rnd.choice(OPEN_FLAGS) | rnd.choice(CREATE_FLAGS), slot)),
        ("close", (slot,)),
        ("write", (slot, data)),
        ("pwrite", (slot, data, rnd.choice([0, 1, 4095, 65_535, 65_536, 100_000, 300_000]))),
        ("read", (slot, rnd.choice([1, 5000, 100_000]))),
        ("pread", (slot, rnd.choice([10, 70_000]), rnd.choice([0, 65_530, 150_000]))),
        ("ftruncate", (slot, rnd.choice([0, 1, 65_536, 65_537, 150_000, 5_000_000]))),
        ("fstat", (slot,)),
        ("seek_end", (slot, rnd.choice([0, -1, 10]))),
        ("truncate", (name, rnd.choice([0, 3, 70_000]))),
        ("unlink", (name,)),
        ("mkdir", (name,)),
        ("rmdir", (name,)),
        ("rename", (name, other)),
        ("link", (name, other)),
        ("symlink", (name, other)),
        ("chmod", (name, rnd.choice([0o600, 0o755, 0o4755, 0o2755, 0o1777]))),
        ("chown", (name, rnd.choice([-1, 0, 1000]), rnd.choice([-1, 0, 1000]))),
        ("lchown", (name, rnd.choice([-1, 0, 1000]), rnd.choice([-1, 0, 1000]))),
        ("mkfifo", (name,)),
        ("stat", (name,)),
        ("listdir", (rnd.choice(["d1", "d2", "."]),)),
        ("readlink", (name,)),
        ("utime", (name, rnd.choice([1, 10**18 + 123]))),
    ]
    if LIBFUSE_MAJOR >= 3:
        ops.append(("rename2", (name, other, rnd.choice([RENAME_NOREPLACE, RENAME_EXCHANGE]))))
    if with_xattrs:
        ops += [
            ("setxattr", (name, rnd.choice("kl"), data[:rnd.choice([0, 5, 300])],
                          rnd.choice([0, os.XATTR_CREATE, os.XATTR_REPLACE]))),
            ("getxattr", (name, rnd.choice("kl"))),
            ("removexattr", (name, rnd.choice("kl"))),
        ]
    # Data calls come more often than namespace ones, so that files grow before they are
    # reopened, truncated, linked or renamed.
    return rnd.choices(ops, weights=[WEIGHTS.get(op, 1) for op, _args in ops])[0]


def supports_user_xattrs(directory: Path) -> bool:
    probe = directory / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def shown(op: str, args: tuple) -> str:
    return f"{op}({', '.join(f'<{len(a)} bytes>' if isinstance(a, bytes) else repr(a) for a in args)})"


DIRECTORIES = [".", "d1", "d2", "d1/e", "d2/x"]


def directory_times(root: Path) -> dict[str, tuple[int, int]]:
    times = {}
    for name in DIRECTORIES:
        try:
            st = os.lstat(root / name)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            times[name] = (st.st_mtime_ns, st.st_ctime_ns)
    return times


def touched(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """The directories (of those present before and after) whose mtime or ctime moved."""
    return sorted(n for n in before.keys() & after.keys() if before[n] != after[n])


#: Calls that change a directory: its mtime and ctime must move on the mount where they
#: move on the local filesystem.
NAMESPACE_CALLS = {"mkdir", "rmdir", "unlink", "rename", "rename2", "link", "symlink", "mkfifo"}


def times_compared(op: str, args: tuple) -> bool:
    """Whether the directories' times are compared around this call: for the calls that
    add or remove names (creating opens included)."""
    return op in NAMESPACE_CALLS or (op == "open" and bool(args[1] & os.O_CREAT))


def run_against_local(mountpoint: Path, local: Path, seed: int) -> None:
    """OPS_PER_SEED random calls on both; fails at the first answer or tree that differs."""
    sides = (Side(local), Side(mountpoint))
    rnd = random.Random(seed)
    with_xattrs = supports_user_xattrs(local)
    done: list[str] = []
    try:
        for i in range(OPS_PER_SEED):
            op, args = random_op(rnd, with_xattrs)
            if op in MOVES_NAMES:
                for side in sides:
                    side.close_all()
            compare_times = times_compared(op, args)
            before = [directory_times(side.root) for side in sides] if compare_times else []
            expected, got = (side.do(op, args) for side in sides)
            if compare_times:
                # What moved locally must have moved on the mount. Not the other way round:
                # on a filesystem with a coarse clock, a second change within one tick
                # moves nothing, where tandemfs's nanosecond times always move.
                after = [directory_times(side.root) for side in sides]
                unmoved = sorted(set(touched(before[0], after[0])) - set(touched(before[1], after[1])))
                expected, got = (expected, []), (got, unmoved)
            done.append(f"#{i} {shown(op, args)} -> {expected!r}")
            recent = "\n".join(done[-30:])
            assert got == expected, f"seed {seed}, #{i} {shown(op, args)}: mount {got!r}\n{recent}"
            if i % SNAPSHOT_EVERY == 0 or i == OPS_PER_SEED - 1:
                assert snapshot(mountpoint) == snapshot(local), f"seed {seed}, after #{i}\n{recent}"
    finally:
        for side in sides:
            side.close_all()


@pytest.mark.parametrize("seed", SEEDS)
def test_same_answers_as_the_local_filesystem(primary, tmp_path, seed):
    local = tmp_path / "local"
    local.mkdir()
    run_against_local(primary.mountpoint, local, seed)


def test_every_kind_of_call_replicates(cluster: Cluster, tmp_path: Path) -> None:
    """The same sequences through a primary: its standby ends with the same state (digest)
    and its read-only mount shows the local tree."""
    primary = cluster.primary()
    standby = cluster.standby(primary)
    local = tmp_path / "local"
    local.mkdir()
    run_against_local(primary.mount, local, SEEDS[0])
    assert cluster.verify(primary, standby, deadline=60).startswith("match")
    expected = snapshot(local)
    wait_until(lambda: snapshot(standby.mount) == expected, 10, "the standby's mount to show the local tree",
               on_fail=lambda: str(sorted(set(snapshot(standby.mount).items()) ^ set(expected.items()))[:20]))
