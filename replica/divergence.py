"""Divergent records: where this node's journal parted from its primary's, and what it held beyond.

Epochs make two journals comparable without shipping them. Each epoch is written by one
primary only, so two journals hold the same record at seq s exactly when both hold seq s
from the same epoch, and an epoch history ((epoch, first seq), ...) says which epoch every
seq came from. The first seq at which the two histories name different epochs, or the
first seq the primary does not have at all, is the divergence point: every record this
node holds from there on is divergent. Such records were committed here (typically by this
node as a primary, shortly before it died or was cut off) and are not part of the
cluster's history; fetching the primary's records on top of them would silently mix two
histories, so the node is rebuilt from the primary's snapshot instead (replica/standby.py).

Divergent records are never dropped silently. Before the node resynchronises, they are
exported into DATA/divergent/<name>/, where name is epoch<E>-seq<from>-<to> (E: the
primary's epoch):
    report.txt   one line per record: seq, epoch, operation, the paths it touched (inode
                 numbers resolved to paths in this node's state before the resync), and
                 sizes; then every path touched, with its operations. Written last, by
                 rename: its presence means the export is whole.
    records.bin  the records themselves, as stored in the journal (journal/records.py),
                 concatenated; each is self-delimiting and checksummed.
    state/       this node's whole environment as it was before the resync (data.mdb,
                 hard-linked by Store.replace_with(keep_old=...)). Records the journal no
                 longer held (pruned after a checkpoint) are still in effect there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import struct
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lmdb

from journal import ops
from journal.errors import CorruptRecord, NotFound
from journal.integrity import DamagedValue, unseal
from journal.records import decode_record
from journal.schema import DB_DIRENTS, ROOT_INO, Databases, Inode, epoch_at, from_u64, u64
from journal.state import FsState
from journal.store import Store, fsync_path

log = logging.getLogger(__name__)

DIVERGENT_DIR = "divergent"
REPORT = "report.txt"
RAW = "records.bin"
STATE = "state"
SUMMARY = "summary.json"

History = Sequence[tuple[int, int]]


def divergence_point(local: History, local_last: int, primary: History, primary_last: int) -> int | None:
    """The first seq this node holds that is not the primary's record, or None if none is.

    Both epoch histories are step functions of the seq, constant between the first seqs
    either lists, so the first seq at which they differ is one of those first seqs."""
    if local_last <= 0:
        return None
    common = min(local_last, primary_last)
    for seq in sorted({1, *(s for _e, s in local), *(s for _e, s in primary)}):
        if seq > common:
            break
        if epoch_at(local, seq) != epoch_at(primary, seq):
            return seq
    if local_last > primary_last:
        return primary_last + 1
    return None


@dataclass(frozen=True)
class Divergence:
    """One export of divergent records."""

    from_seq: int
    to_seq: int
    #: Records written to records.bin and listed in report.txt.
    records: int
    #: Divergent records the journal no longer held (pruned): only their effect is kept, in state/.
    missing: int
    directory: str
    primary: str
    primary_epoch: int

    @property
    def state_dir(self) -> Path:
        return Path(self.directory) / STATE

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _show(text: str) -> str:
    """A path or name as one unambiguous field of a tab-separated line."""
    if text and text.isprintable() and not any(c.isspace() for c in text):
        return text
    return json.dumps(text)


class _Paths:
    """Inode numbers to paths, in one read transaction of the old state.

    Regular files do not record their directory, so one scan of `dirents` finds the names
    of the inodes asked for; directories record their parent, so the path above them is
    walked upwards, looking each name up in its parent's (short) listing."""

    def __init__(self, txn: lmdb.Transaction, db: Databases, wanted: set[int]) -> None:
        self.txn = txn
        self.db = db
        self.state = FsState(txn, db)
        self.names: dict[int, tuple[int, bytes]] = {}
        wanted.discard(ROOT_INO)
        if wanted:
            for key, value in txn.cursor(db=db.dirents):
                try:
                    child = from_u64(unseal(DB_DIRENTS, key, value))
                except (DamagedValue, struct.error):
                    continue  # a damaged entry names nothing here; scrub reports it
                if child in wanted and child not in self.names:
                    self.names[child] = (from_u64(key[:8]), bytes(key[8:]))

    def _inode(self, ino: int) -> Inode | None:
        try:
            return self.state.inode(ino)
        except (NotFound, DamagedValue):
            return None

    def _name_in(self, parent: int, child: int) -> bytes | None:
        try:
            for name, ino in self.state.entries(parent):
                if ino == child:
                    return bytes(name)
        except DamagedValue:
            return None
        return None

    def path(self, ino: int) -> str | None:
        """The path of `ino` in the old state, or None if it no longer has one."""
        parts: list[bytes] = []
        seen: set[int] = set()
        cur = ino
        while cur != ROOT_INO:
            if cur in seen or len(parts) > 4096:
                return None
            seen.add(cur)
            entry = self.names.get(cur)
            if entry is None:
                node = self._inode(cur)
                if node is None or not stat.S_ISDIR(node.mode) or not node.parent:
                    return None
                name = self._name_in(node.parent, cur)
                if name is None:
                    return None
                entry = self.names[cur] = (node.parent, name)
            parts.append(entry[1])
            cur = entry[0]
        return "/" + "/".join(os.fsdecode(part) for part in reversed(parts))

    def of(self, ino: int) -> str:
        path = self.path(ino)
        return _show(path) if path is not None else f"<inode {ino}, gone>"

    def child(self, parent: int, name: bytes) -> str:
        base = self.path(parent)
        if base is None:
            return f"<inode {parent}, gone>/{_show(os.fsdecode(name))}"
        return _show(base.rstrip("/") + "/" + os.fsdecode(name))


def _inodes_of(op: ops.Op) -> Iterable[int]:
    for name in ("ino", "parent", "old_parent", "new_parent"):
        value = getattr(op, name, None)
        if value:
            yield value


def _describe(op: ops.Op, paths: _Paths) -> tuple[list[str], str]:
    """(paths touched, details) of one operation."""
    if isinstance(op, ops.Init):
        return ["/"], f"mode={op.mode:o}"
    if isinstance(op, ops.MakeNode):
        kind = "dir" if stat.S_ISDIR(op.mode) else "file" if stat.S_ISREG(op.mode) else "node"
        return [paths.child(op.parent, op.name)], f"{kind} ino={op.ino} mode={op.mode:o}"
    if isinstance(op, ops.Symlink):
        return [paths.child(op.parent, op.name)], f"ino={op.ino} target={_show(os.fsdecode(op.target))}"
    if isinstance(op, ops.Link):
        return [paths.child(op.parent, op.name)], f"ino={op.ino} also={paths.of(op.ino)}"
    if isinstance(op, (ops.Unlink, ops.Rmdir)):
        return [paths.child(op.parent, op.name)], ""
    if isinstance(op, ops.Rename):
        old = paths.child(op.old_parent, op.old_name)
        new = paths.child(op.new_parent, op.new_name)
        return [old, new], f"flags={op.flags}"
    if isinstance(op, ops.Write):
        return [paths.of(op.ino)], f"ino={op.ino} offset={op.offset} bytes={len(op.data)}"
    if isinstance(op, ops.Truncate):
        return [paths.of(op.ino)], f"ino={op.ino} size={op.size}"
    if isinstance(op, ops.SetAttr):
        fields = [name for bit, name in ((ops.SET_MODE, f"mode={op.mode:o}"), (ops.SET_UID, f"uid={op.uid}"),
                                         (ops.SET_GID, f"gid={op.gid}"), (ops.SET_ATIME, "atime"),
                                         (ops.SET_MTIME, "mtime")) if op.fields & bit]
        return [paths.of(op.ino)], f"ino={op.ino} " + ",".join(fields)
    if isinstance(op, ops.SetXattr):
        return [paths.of(op.ino)], f"ino={op.ino} xattr={_show(os.fsdecode(op.name))} bytes={len(op.value)}"
    if isinstance(op, ops.RemoveXattr):
        return [paths.of(op.ino)], f"ino={op.ino} xattr={_show(os.fsdecode(op.name))}"
    if isinstance(op, ops.BeginEpoch):
        return [], f"epoch={op.epoch}"
    return [], ""


def export_name(primary_epoch: int, from_seq: int, to_seq: int) -> str:
    return f"epoch{primary_epoch}-seq{from_seq}-{to_seq}"




def export(store: Store, from_seq: int, *, primary: str, primary_epoch: int,
           primary_history: History) -> Divergence:
    """Export this store's records from `from_seq` on (see the module docstring).

    Idempotent: an export already complete for the same range is returned as it is, so a
    node that crashes while resynchronising exports once. Raises OSError if it cannot
    write the export; the caller must then not resynchronise."""
    to_seq = store.last_seq
    directory = store.path / DIVERGENT_DIR / export_name(primary_epoch, from_seq, to_seq)
    summary_file = directory / SUMMARY
    if (directory / REPORT).exists() and summary_file.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return Divergence(**json.loads(summary_file.read_text()))
    directory.mkdir(parents=True, exist_ok=True)
    first = max(from_seq, store.first_seq())
    missing = first - from_seq
    lines: list[str] = []
    touched: dict[str, Counter[str]] = defaultdict(Counter)
    count = 0
    with store.shared(), store.env.begin() as txn:
        journal = store.db.journal
        wanted: set[int] = set()
        for _key, raw in _journal(txn, journal, first, to_seq):
            with contextlib.suppress(CorruptRecord):
                wanted.update(_inodes_of(decode_record(raw).op))
        paths = _Paths(txn, store.db, wanted)
        raw_tmp = directory / (RAW + ".tmp")
        with open(raw_tmp, "wb") as out:
            for seq, raw in _journal(txn, journal, first, to_seq):
                out.write(raw)
                count += 1
                try:
                    record = decode_record(raw)
                except CorruptRecord as exc:
                    lines.append(f"{seq}\t?\tCORRUPT\t\t{exc}")
                    continue
                name = type(record.op).__name__
                touched_paths, details = _describe(record.op, paths)
                for path in touched_paths:
                    touched[path][name] += 1
                lines.append(f"{seq}\t{record.epoch}\t{name}\t{' -> '.join(touched_paths)}\t{details}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(raw_tmp, directory / RAW)
    result = Divergence(from_seq, to_seq, count, missing, str(directory), primary, primary_epoch)
    _write_report(directory, store, result, primary_history, lines, touched)
    tmp = directory / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(result.as_dict()))
    os.replace(tmp, summary_file)
    fsync_path(directory)
    log.warning("exported %d divergent record(s), seqs %d..%d, to %s", count, from_seq, to_seq, directory)
    return result


def _journal(txn: lmdb.Transaction, db: object, first: int, last: int) -> Iterable[tuple[int, bytes]]:
    cursor = txn.cursor(db=db)
    if not cursor.set_range(u64(first)):
        return
    for key, value in cursor:
        seq = from_u64(key)
        if seq > last:
            return
        yield seq, bytes(value)


def _write_report(directory: Path, store: Store, result: Divergence, primary_history: History,
                  lines: list[str], touched: dict[str, Counter[str]]) -> None:
    local = store.epoch_history
    head = [
        "# tandemfs: divergent records",
        f"# node {store.path}, cluster {store.cluster_id.hex()}",
        f"# This node's journal parted from the primary's ({result.primary}, epoch {result.primary_epoch}) "
        f"at seq {result.from_seq}.",
        f"# Epoch history here: {local}; the primary's: {list(primary_history)}.",
        f"# Records {result.from_seq}..{result.to_seq} were committed on this node and are NOT part of the "
        "cluster's history:",
        "# the node was then rebuilt from the primary, so their effects are gone from its filesystem.",
        "# Nothing is lost: the records are in records.bin (journal records, concatenated), and the whole",
        "# state before the rebuild is in state/: look into it with `mount.py inspect --data",
        f"# {directory / STATE} --mount MNT` (read-only), and copy what must be kept into the live",
        "# filesystem through the primary's mount. Delete this directory once done.",
    ]
    if result.missing:
        head.append(f"# {result.missing} record(s) from seq {result.from_seq} were no longer in the journal "
                    "(pruned after a checkpoint): they are not listed, their effects are in state/.")
    head += [f"# {result.records} record(s) listed below; paths as they were before the rebuild.",
             "# seq\tepoch\toperation\tpaths\tdetails"]
    tail = ["", f"# paths touched ({len(touched)}): path\toperations"]
    for path in sorted(touched):
        ops_done = ", ".join(f"{name} x{n}" if n > 1 else name for name, n in sorted(touched[path].items()))
        tail.append(f"# {path}\t{ops_done}")
    tmp = directory / (REPORT + ".tmp")
    with open(tmp, "w") as out:
        out.write("\n".join(head + lines + tail) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, directory / REPORT)


def list_exports(data: str | os.PathLike) -> list[Divergence]:
    """The complete exports in data directory `data`, oldest first."""
    root = Path(data) / DIVERGENT_DIR
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(root.iterdir(), key=lambda e: e.stat().st_mtime):
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
                if (entry / REPORT).exists():
                    found.append(Divergence(**json.loads((entry / SUMMARY).read_text())))
    return found
