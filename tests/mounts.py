"""Running real tandemfs processes in tests: start, wait with deadlines, always clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fs.mounting import is_mounted, unmount

REPO = Path(__file__).resolve().parent.parent
MOUNT_PY = REPO / "mount.py"


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05,
               on_fail: Callable[[], str] | None = None) -> Any:
    """Poll `condition` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{on_fail()}" if on_fail else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def is_served(mountpoint: str | os.PathLike) -> bool:
    """Whether a live filesystem is mounted on `mountpoint`. A dead FUSE mount left by a
    killed node is still a mountpoint, and the kernel may answer a stat of it from its
    cache for a second; statfs is never cached, and fails there (ENOTCONN)."""
    if not os.path.ismount(mountpoint):
        return False
    try:
        os.statvfs(mountpoint)
    except OSError:
        return False
    return True


def run_cli(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(MOUNT_PY), *args], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"mount.py {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def make_mountpoint(path: Path) -> None:
    """Create the directory `path` unless something (e.g. the dead mount of a killed node,
    which a stat cannot look at) is mounted there already."""
    if not is_mounted(path):
        path.mkdir(parents=True, exist_ok=True)


class Node:
    """One `mount.py` process (primary or standby) and its mountpoint, if any."""

    def __init__(self, args: list[str], log: Path, mountpoint: Path | None = None) -> None:
        self.args = args
        self.log_path = log
        self.mountpoint = mountpoint
        self._log = open(log, "ab")  # noqa: SIM115 - kept open for the process's life
        self.proc = subprocess.Popen([sys.executable, str(MOUNT_PY), *args], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_mounted(self, timeout: float = 20) -> None:
        assert self.mountpoint is not None

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited {self.proc.returncode} before mounting:\n{self.log()}")
            return is_served(self.mountpoint)

        wait_until(ready, timeout, f"mount of {self.mountpoint}")

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM, wait, then SIGKILL; always leaves the mountpoint unmounted."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.kill()
        finally:
            if self.mountpoint is not None:
                unmount(self.mountpoint)
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the crash a power cut or OOM kill looks like to the process."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def start_primary(data: Path, mountpoint: Path, *extra: str, log: Path | None = None,
                  timeout: float = 20) -> Node:
    make_mountpoint(mountpoint)
    node = Node(["primary", "--data", str(data), "--mount", str(mountpoint), *extra],
                log or data.parent / f"{data.name}.log", mountpoint)
    try:
        node.wait_mounted(timeout)
    except BaseException:
        node.stop()
        raise
    return node
