from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounts import Node, run_cli, start_primary


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "fuse: needs /dev/fuse and root (mounts a real filesystem)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.path.exists("/dev/fuse") and os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs /dev/fuse and root")
    for item in items:
        if "fuse" in item.keywords:
            item.add_marker(skip)


class Primaries:
    """Starts primaries for a test and stops every one of them afterwards, pass or fail."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[Node] = []

    def start(self, name: str = "p", *extra: str, data: Path | None = None) -> Node:
        data = data or self.root / f"{name}-data"
        node = start_primary(data, self.root / f"{name}-mnt", *extra, log=self.root / f"{name}.log")
        node.data = data  # type: ignore[attr-defined]
        self.nodes.append(node)
        return node

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def primaries(tmp_path: Path) -> Iterator[Primaries]:
    cluster = Primaries(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def primary(primaries: Primaries) -> Iterator[Node]:
    """A mounted primary on a fresh store; fsck must pass once it is stopped."""
    node = primaries.start()
    yield node
    assert node.stop() == 0, node.log()
    run_cli("fsck", "--data", str(node.data))  # type: ignore[attr-defined]
