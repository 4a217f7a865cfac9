"""What the failover drills share: node processes, a write workload that records what fsync
acknowledged, checks of those files, and deadlines.

Nodes are `mount.py` processes in sessions of their own, each with its data directory,
mountpoint and log; every wait has a deadline (DrillError when it passes), and `Nodes.close`
kills every process and unmounts every mountpoint, whatever happened. The drills are run
with the project's virtual environment; `ensure_venv` re-executes them with it when they
were started with another Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MOUNT_PY = REPO / "mount.py"


def ensure_venv() -> None:
    """Re-execute this script with the repository's .venv Python if this one lacks the
    project's dependencies."""
    try:
        import lmdb  # noqa: F401
        import zmq  # noqa: F401
    except ImportError:
        venv = REPO / ".venv" / "bin" / "python"
        if venv.exists() and Path(sys.executable).resolve() != venv.resolve():
            os.execv(str(venv), [str(venv), *sys.argv])
        raise
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


class DrillError(Exception):
    """The drill could not go on (a deadline passed, a node died); not a verdict on the data."""


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DrillError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port_pair(rng: random.Random, host: str = "127.0.0.1") -> int:
    """A port P with P and P+1 free, below the ephemeral range (a connection retried to a
    port nobody listens on could otherwise connect to itself)."""
    for _ in range(500):
        port = rng.randrange(20000, 32000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                a.bind((host, port))
                b.bind((host, port + 1))
            return port
        except OSError:
            continue
    raise DrillError("no free pair of ports")


def unmount(mountpoint: Path) -> None:
    from fs.mounting import unmount as unmount_fuse  # after ensure_venv: the repository's own

    unmount_fuse(mountpoint)


def cli(*args: str, timeout: float = 120, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, str(MOUNT_PY), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


class Node:
    """One node: its data directory and mountpoint, and the process running on them (if any)."""

    def __init__(self, name: str, root: Path, prefix: tuple[str, ...] = ()) -> None:
        self.name = name
        self.data = root / f"{name}-data"
        self.mount = root / f"{name}-mnt"
        self.log_path = root / f"{name}.log"
        self.prefix = prefix  # e.g. nsenter into a network namespace
        self.proc: subprocess.Popen | None = None
        self.mount.mkdir(parents=True, exist_ok=True)

    def start(self, *args: str) -> Node:
        if self.alive():
            raise DrillError(f"{self.name} is already running")
        with open(self.log_path, "ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} mount.py {' '.join(args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen([*self.prefix, sys.executable, str(MOUNT_PY), *args], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self, timeout: float = 5.0) -> dict[str, Any] | None:
        from replica.control import ControlError, NodeNotRunning, request

        try:
            return request(self.data, "status", timeout=timeout)
        except (NodeNotRunning, ControlError):
            return None

    def wait_status(self, predicate: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> dict:
        def check() -> dict | None:
            if not self.alive():
                raise DrillError(f"{self.name} exited ({self.proc.returncode if self.proc else None}) "
                                 f"while waiting for {what}\n{self.tail()}")
            status = self.status()
            return status if status is not None and predicate(status) else None

        return wait_until(check, timeout, f"{self.name}: {what}", interval=0.05)

    def wait_mounted(self, timeout: float = 30.0) -> None:
        def check() -> bool:
            if not self.alive():
                raise DrillError(f"{self.name} exited before mounting\n{self.tail()}")
            return os.path.ismount(self.mount)

        wait_until(check, timeout, f"the mount of {self.name}")

    def kill(self) -> None:
        """SIGKILL to the whole process group: the node dies at an arbitrary instant."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL; the mountpoint is left unmounted."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGCONT)
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
        except ProcessLookupError:
            pass
        finally:
            unmount(self.mount)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        kept = [line for line in text if " DEBUG " not in line][-lines:]
        return f"--- {self.name} log, last {len(kept)} lines ---\n" + "\n".join(kept)


class Nodes:
    """Every node of a drill; `close` stops them all and unmounts, whatever happened."""

    def __init__(self) -> None:
        self.all: list[Node] = []

    def add(self, node: Node) -> Node:
        self.all.append(node)
        return node

    def close(self) -> None:
        for node in self.all:
            try:
                node.stop(timeout=10)
            except Exception as exc:  # keep stopping the others
                print(f"drill: stopping {node.name}: {exc!r}", file=sys.stderr)
        for node in self.all:
            unmount(node.mount)


@dataclass
class Workload:
    """Writers that create files under `root`, fsync each, and record it (path relative to
    the mount, and its SHA-256) only once fsync has returned: the acknowledged files."""

    mount: Path
    root: str
    writers: int = 2
    seed: int = 0
    min_size: int = 512
    max_size: int = 16384
    acked: dict[str, str] = field(default_factory=dict)
    #: When each write's fsync returned (monotonic), by path.
    acked_at: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    unacked_writes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Workload:
        for i in range(self.writers):
            thread = threading.Thread(target=self._write, args=(i,), daemon=True, name=f"writer-{i}")
            thread.start()
            self._threads.append(thread)
        return self

    def _write(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        directory = f"{self.root}/w{index}"
        try:
            os.makedirs(self.mount / directory, exist_ok=True)
        except OSError as exc:
            self.errors.append(f"mkdir: {exc}")
            return
        n = 0
        while not self._stop.is_set():
            rel = f"{directory}/f{n:05d}"
            data = rng.randbytes(rng.randint(self.min_size, self.max_size))
            try:
                fd = os.open(self.mount / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    with self._lock:
                        self.unacked_writes += 1
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.errors.append(f"{rel}: {exc.strerror}")
                return
            with self._lock:
                self.acked[rel] = hashlib.sha256(data).hexdigest()
                self.acked_at[rel] = time.monotonic()
                self.unacked_writes -= 1
            n += 1

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            raise DrillError("a writer did not return (stuck in the filesystem)")

    def count(self) -> int:
        with self._lock:
            return len(self.acked)


def check_files(mount: Path, expected: dict[str, str]) -> list[str]:
    """The files of `expected` missing from `mount` or with other contents."""
    lost = []
    for rel, digest in expected.items():
        try:
            with open(mount / rel, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    lost.append(f"{rel}: contents differ")
        except OSError as exc:
            lost.append(f"{rel}: {exc.strerror}")
    return lost


def probe_writable(mount: Path, name: str) -> bool:
    """One write and one read through the mount; True when both work."""
    path = mount / name
    try:
        with open(path, "wb") as f:
            f.write(b"probe")
        with open(path, "rb") as f:
            return f.read() == b"probe"
    except OSError:
        return False


def writable_primaries(nodes: list[Node]) -> list[str]:
    """Names of the nodes that say they are a primary that accepts writes."""
    found = []
    for node in nodes:
        status = node.status() if node.alive() else None
        if status and status.get("role") == "primary" and not status.get("read_only"):
            found.append(node.name)
    return found


def verify(a: Node, b: Node, deadline: float = 90.0, prefix: tuple[str, ...] = ()) -> tuple[bool, str]:
    result = cli("verify", "--data", str(a.data), "--data", str(b.data), "--deadline", str(deadline),
                 timeout=deadline + 120, prefix=prefix)
    said = result.stdout.strip() or (result.stderr.strip().splitlines() or [""])[-1]
    return result.returncode == 0, said


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def promote(node: Node, *extra: str, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """`mount.py promote --json` on a running standby; its answer, or DrillError."""
    result = cli("promote", "--data", str(node.data), "--json", *extra, timeout=60, prefix=prefix)
    if result.returncode != 0:
        raise DrillError(f"promote of {node.name} failed ({result.returncode}): {result.stderr.strip()}")
    return json.loads(result.stdout)
