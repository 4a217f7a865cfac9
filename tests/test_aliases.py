"""The bookkeeping of hard-link aliases (fs/aliases.py); the mounted behaviour is in
test_mount.py (test_hard_links_never_show_stale_attributes)."""

from __future__ import annotations

import threading

from fs.aliases import LinkAliases


class Invalidated:
    """Collects the paths an aliases table asks to invalidate."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path: str) -> None:
        self.paths.append(path)

    def take(self) -> set[str]:
        taken, self.paths = set(self.paths), []
        return taken


def test_a_change_invalidates_the_other_names_only() -> None:
    done = Invalidated()
    aliases = LinkAliases(done)
    assert not aliases
    assert aliases.seen(7, "/a") and aliases.seen(7, "/b") and aliases.seen(8, "/x")
    assert not aliases.seen(7, "/a")  # already known
    assert aliases and 7 in aliases and 9 not in aliases
    aliases.changed(7, via="/a")
    assert done.take() == {"/b"}
    aliases.changed(7, via="/b", also=["/new"])
    assert done.take() == {"/a", "/new"}
    aliases.changed(9)
    assert done.take() == set()
    aliases.removed("/b")
    aliases.changed(7)
    assert done.take() == {"/a"}
    aliases.removed("/a")
    assert 7 not in aliases
    aliases.close()


def test_renames_move_names_and_everything_below_them() -> None:
    done = Invalidated()
    aliases = LinkAliases(done)
    aliases.seen(1, "/d/f")
    aliases.seen(1, "/d/sub/g")
    aliases.seen(1, "/dx")  # shares a prefix with /d, but is not below it
    aliases.seen(2, "/t")
    aliases.renamed("/d", "/e")
    aliases.changed(1)
    assert done.take() == {"/e/f", "/e/sub/g", "/dx"}
    aliases.renamed("/dx", "/t")  # replaces /t: that name of inode 2 is gone
    assert 2 not in aliases
    aliases.changed(1)
    assert done.take() == {"/e/f", "/e/sub/g", "/t"}
    aliases.seen(2, "/u")
    aliases.renamed("/t", "/u", exchange=True)
    aliases.changed(1)
    aliases.changed(2)
    assert done.take() == {"/e/f", "/e/sub/g", "/u", "/t"}
    aliases.changed(2, via="/t")
    assert done.take() == set()
    aliases.close()


def test_too_many_names_are_invalidated_and_forgotten() -> None:
    done = Invalidated()
    aliases = LinkAliases(done, max_paths=3)
    for n in range(3):
        aliases.seen(n, f"/{n}")
    assert done.take() == set()
    aliases.seen(9, "/9")
    assert done.take() == {"/0", "/1", "/2"}
    assert 0 not in aliases and 9 in aliases
    aliases.close()


def test_a_stuck_invalidation_does_not_hold_the_call() -> None:
    """The kernel may wait for the page locks of a write waiting for this very call."""
    release = threading.Event()
    aliases = LinkAliases(lambda path: release.wait(30))
    aliases.seen(1, "/a")
    caller = threading.Thread(target=aliases.changed, args=(1,), daemon=True)
    caller.start()
    caller.join(10)
    try:
        assert not caller.is_alive() and not release.is_set()
    finally:
        release.set()
        aliases.close()
