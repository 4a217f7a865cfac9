"""A small harness for replication tests: real primary and standby processes on loopback.

Nodes are `python mount.py primary|standby ...` subprocesses with free loopback ports,
each with its own data directory, mountpoint and log. The nodes of one cluster share the
test's own cluster secret (`--secret`, made before any node starts), never the system's
default one, unless a test keys them otherwise (`--curve-secret`, `--insecure`). Every wait has a deadline and
fails with the node logs attached; teardown always resumes stopped processes, sends
SIGTERM then SIGKILL, and unmounts (fusermount3 -u, then lazily), pass or fail.

Failover: `promote` promotes a running standby in place, `take_over` starts a stopped
standby's data directory as the new primary (`mount.py promote` in the foreground), and
`rejoin` starts an old primary's data directory as a standby of the new one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fs.mounting import unmount
from replica.control import ControlError, NodeNotRunning, request
from replica.security import create_secret
from tests.mounts import is_served, make_mountpoint, wait_until

REPO = Path(__file__).resolve().parent.parent
MOUNT_PY = REPO / "mount.py"


def free_port_pair() -> int:
    """A loopback port P such that P and P+1 are both free (the default side channel)."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of loopback ports")


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MOUNT_PY), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


class Proc:
    """One node process."""

    def __init__(self, name: str, role: str, data: Path, mount: Path | None, args: list[str],
                 log: Path, env: dict[str, str] | None, address: str = "") -> None:
        self.name, self.role, self.data, self.mount = name, role, data, mount
        self.address = address  # a primary's stream address
        self.args, self.log_path, self.env = args, log, env
        self.proc: subprocess.Popen | None = None
        self.paused = False

    def start(self) -> Proc:
        environment = {**os.environ, **(self.env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(MOUNT_PY), "-v", *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, cwd=REPO, env=environment,
                                         start_new_session=True)
        return self

    def log(self, tail: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        interesting = [line for line in lines if " DEBUG " not in line]
        return f"--- {self.name} log (last {tail} non-debug lines) ---\n" + "\n".join(interesting[-tail:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The node's status through its control socket; None if it does not answer (yet)."""
        try:
            return request(self.data, "status", timeout=timeout)
        except (NodeNotRunning, ControlError):
            return None

    def wait_status(self, predicate: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> dict:
        def check() -> dict | None:
            if not self.alive():
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}\n{self.log()}")
            status = self.status()
            return status if status is not None and predicate(status) else None

        return wait_until(check, timeout, f"{self.name}: {what}", interval=0.1,
                          on_fail=lambda: f"last status: {self.status()}\n{self.log()}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_status(lambda s: True, timeout, "control socket")
        if self.mount is not None:
            wait_until(lambda: self._check_alive() and is_served(self.mount), timeout,
                       f"mount of {self.name}", on_fail=self.log)

    def _check_alive(self) -> bool:
        if not self.alive():
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}\n{self.log()}")
        return True

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.paused:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL: the process dies at an arbitrary instant."""
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait(timeout=30)
        if self.mount is not None:
            unmount(self.mount)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; always leaves the mountpoint unmounted."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.resume()
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
        finally:
            if self.mount is not None:
                unmount(self.mount)
        return None if self.proc is None else self.proc.returncode


#: Options by which a test keys its nodes itself.
_KEYING = ("--secret", "--curve-secret", "--insecure")


class Cluster:
    """The nodes of one test; `close` stops all of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []
        self.secret = root / "cluster.secret"
        create_secret(self.secret)

    def keyed(self, args: list[str]) -> list[str]:
        """`args` with the test's cluster secret, unless they key the node otherwise."""
        if any(arg in _KEYING for arg in args):
            return args
        return [*args, "--secret", str(self.secret)]

    def primary(self, name: str = "p", *extra: str, listen: bool = True, env: dict[str, str] | None = None,
                start: bool = True, data: Path | None = None) -> Proc:
        data, mount = data or self.root / f"{name}-data", self.root / f"{name}-mnt"
        make_mountpoint(mount)
        args = ["primary", "--data", str(data), "--mount", str(mount)]
        port = 0
        if listen:
            port = free_port_pair()
            args += ["--listen", f"tcp://127.0.0.1:{port}"]
        proc = Proc(name, "primary", data, mount, self.keyed(args + list(extra)), self.root / f"{name}.log",
                    env, address=f"tcp://127.0.0.1:{port}")
        self.procs.append(proc)
        if start:
            proc.start().wait_ready()
        return proc

    def standby(self, primary: Proc, name: str = "s", *extra: str, mount: bool = True,
                env: dict[str, str] | None = None, start: bool = True, wait: bool = True,
                data: Path | None = None) -> Proc:
        data = data or self.root / f"{name}-data"
        mountpoint = self.root / f"{name}-mnt" if mount else None
        args = ["standby", "--data", str(data), "--primary", primary.address, "--name", name]
        if mountpoint is not None:
            make_mountpoint(mountpoint)
            args += ["--mount", str(mountpoint)]
        proc = Proc(name, "standby", data, mountpoint, self.keyed(args + list(extra)),
                    self.root / f"{name}.log", env)
        self.procs.append(proc)
        if start:
            proc.start()
            if wait:
                proc.wait_ready()
        return proc

    def promote(self, proc: Proc, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
        """`mount.py promote --json` on a running standby; asserts its exit code. Once
        promoted, the node's `address` is the stream it now serves."""
        result = cli("promote", "--data", str(proc.data), "--json", *extra)
        assert result.returncode == expect, f"promote exited {result.returncode}: {result.stdout}" \
                                            f"{result.stderr}\n{proc.log()}"
        if result.returncode == 0:
            proc.address = json.loads(result.stdout)["listen"]
            proc.role = "primary"
        return result

    def take_over(self, stopped: Proc, *extra: str, mount: Path | None = None, start: bool = True) -> Proc:
        """A stopped standby's data directory started as the new primary, in the foreground."""
        mountpoint = mount or stopped.mount or self.root / f"{stopped.name}-mnt"
        make_mountpoint(mountpoint)
        name = f"{stopped.name}-promoted"
        proc = Proc(name, "primary", stopped.data, mountpoint,
                    self.keyed(["promote", "--data", str(stopped.data), "--mount", str(mountpoint), *extra]),
                    self.root / f"{name}.log", None)
        self.procs.append(proc)
        if start:
            proc.start().wait_ready()
            status = proc.wait_status(lambda s: s["role"] == "primary" and s.get("replication"), 10,
                                      "serving as the new primary")
            proc.address = status["replication"]["listen"]
        return proc

    def rejoin(self, old: Proc, primary: Proc, *extra: str, mount: bool = True, wait: bool = True) -> Proc:
        """An old primary's data directory started as a standby of `primary`."""
        name = f"{old.name}-rejoined"
        mountpoint = (old.mount or self.root / f"{old.name}-mnt") if mount else None
        args = ["standby", "--data", str(old.data), "--primary", primary.address, "--name", name]
        if mountpoint is not None:
            make_mountpoint(mountpoint)
            args += ["--mount", str(mountpoint)]
        proc = Proc(name, "standby", old.data, mountpoint, self.keyed(args + list(extra)),
                    self.root / f"{name}.log", None)
        self.procs.append(proc)
        proc.start()
        if wait:
            proc.wait_ready()
        return proc

    def logs(self) -> str:
        return "\n".join(proc.log() for proc in self.procs)

    def verify(self, a: Proc, b: Proc, deadline: float = 60.0) -> str:
        """`mount.py verify` on two nodes; returns its output, fails the test on a mismatch."""
        result = cli("verify", "--data", str(a.data), "--data", str(b.data), "--deadline", str(deadline),
                     timeout=deadline + 60)
        assert result.returncode == 0, f"verify: {result.stdout}{result.stderr}\n{self.logs()}"
        return result.stdout

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.resume()
        errors = []
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f"{proc.name}: {exc!r}")
        assert not errors, errors


@pytest.fixture(name="cluster")
def cluster_fixture(tmp_path: Path) -> Iterator[Cluster]:
    """Nodes started through it are all stopped and unmounted at the end of the test."""
    nodes = Cluster(tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()
