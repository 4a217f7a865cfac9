"""Checks of a store: the consistency checker, the state digest and the replayer.

`apply` promises that every op either leaves the schema's invariants (schema.py) intact
or raises and leaves nothing behind. `fsck` is the independent judge of that promise:
it reads the whole store in one read transaction and reports every invariant that does
not hold, so the tests can run it after each test and an operator can run it on a node's
data directory. It is linear in the size of the store (cursor scans and dicts of counts),
because the stores it must judge hold hundreds of thousands of inodes.

`digest` condenses the replicated filesystem state into one hash, so two nodes can be
compared without shipping their data: equal digests at equal seqs mean equal state.

`replay` rebuilds a store from nothing but a journal. Since `apply` is deterministic, the
rebuilt state must have the same digest as the source; the tests rely on that, and an
operator can use it to recover a store whose state databases are damaged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import struct
from dataclasses import dataclass
from typing import NamedTuple

import lmdb

from .errors import CorruptRecord, StoreError
from .integrity import DamagedValue, is_sealed_ok, unseal
from .records import WRITE_DATA_START, decode_record, peek_write
from .schema import (
    BLOCK_SIZE,
    DB_DIRENTS,
    DB_INODES,
    DB_META,
    DB_SYMLINKS,
    DB_XATTRS,
    FORMAT_VERSION,
    META_CLUSTER_ID,
    META_EPOCH,
    META_EPOCH_HISTORY,
    META_FORMAT,
    META_LAST_SEQ,
    META_NEXT_INO,
    NAME_MAX,
    ROOT_INO,
    STATE_DBS,
    Databases,
    Inode,
    epoch_at,
    from_u64,
    parse_block_ref,
    unpack_epoch_history,
)
from .state import FsState
from .store import Store, read_meta

log = logging.getLogger(__name__)

Txn = lmdb.Transaction

#: Records fed to `Store.apply_records` per transaction by `replay`.
REPLAY_BATCH = 512

_U64 = struct.Struct(">Q")
_PAIR = struct.Struct(">QQ")


@dataclass(slots=True)
class _Node:
    """What the checker keeps of one inode."""

    mode: int
    nlink: int
    size: int
    parent: int
    blocks: int = 0  # stored blocks the inode counts
    stored: int = 0  # entries in `blocks` found for it
    names: int = 0  # dirents naming it
    subdirs: int = 0  # dirents in it naming a directory
    named_in: int = 0  # for a directory: the parent of (one of) the dirents naming it


Nodes = dict[int, _Node]


def _u64_or_none(raw: bytes | None) -> int | None:
    if raw is None or len(raw) != _U64.size:
        return None
    return _U64.unpack(raw)[0]


def fsck(store: Store) -> list[str]:
    """Every violated invariant of `store`, as human-readable lines; empty when clean.

    Safe on a live store: it reads one snapshot, and holds the environment in place
    against a checkpoint swap meanwhile."""
    problems: list[str] = []
    with store.shared(), store.env.begin() as txn:
        db = store.db
        try:
            nodes = _check_inodes(txn, db, problems)
            _check_dirents(txn, db, nodes, problems)
            _check_links(nodes, problems)
            _check_blocks(txn, db, nodes, problems)
            _check_block_counts(nodes, problems)
            _check_symlinks(txn, db, nodes, problems)
            _check_xattrs(txn, db, nodes, problems)
            cluster_id = _check_meta(txn, db, nodes, problems)
            _check_journal(txn, db, cluster_id, problems)
        except lmdb.Error as exc:
            # LMDB's own structures are damaged (a B-tree page, a free list): what was
            # found so far stands, and the rest cannot be walked.
            problems.append(f"the store's LMDB structure is damaged ({exc}); the check stopped there: "
                            "rebuild this node from a standby")
    if problems:
        log.warning("fsck of %s found %d problems", store.path, len(problems))
    return problems


def _check_inodes(txn: Txn, db: Databases, problems: list[str]) -> Nodes:
    nodes: Nodes = {}
    for key, value in txn.cursor(db=db.inodes):
        ino = _u64_or_none(key)
        if ino is None:
            problems.append(f"inodes: malformed key {bytes(key).hex()}")
            continue
        try:
            inode = Inode.unpack(unseal(DB_INODES, key, value))
        except DamagedValue as exc:
            problems.append(str(exc))
            continue
        except struct.error:
            problems.append(f"inode {ino}: malformed value of {len(value)} bytes")
            continue
        nodes[ino] = _Node(inode.mode, inode.nlink, inode.size, inode.parent, blocks=inode.blocks)
        if stat.S_IFMT(inode.mode) == 0:
            problems.append(f"inode {ino}: mode {inode.mode:o} has no file type")
        if not stat.S_ISDIR(inode.mode) and inode.parent != 0:
            problems.append(f"inode {ino}: non-directory records parent {inode.parent}")
        if not stat.S_ISREG(inode.mode) and not stat.S_ISLNK(inode.mode) and inode.size != 0:
            problems.append(f"inode {ino}: size {inode.size} on a {stat.filemode(inode.mode)[0]} inode")
    root = nodes.get(ROOT_INO)
    if root is None:
        if nodes:
            problems.append("root inode 1 is missing")
    elif not stat.S_ISDIR(root.mode):
        problems.append(f"root inode 1 is not a directory (mode {root.mode:o})")
    elif root.parent != ROOT_INO:
        problems.append(f"root inode 1 records parent {root.parent}, not itself")
    return nodes


def _valid_name(name: bytes) -> bool:
    return (0 < len(name) <= NAME_MAX and b"/" not in name and b"\0" not in name
            and name not in (b".", b".."))


def _check_dirents(txn: Txn, db: Databases, nodes: Nodes, problems: list[str]) -> None:
    for key, value in txn.cursor(db=db.dirents):
        if len(key) <= _U64.size:
            problems.append(f"dirents: malformed key {bytes(key).hex()}")
            continue
        parent = _U64.unpack_from(key)[0]
        name = bytes(key[_U64.size:])
        where = f"dirent {parent}/{name!r}"
        if not _valid_name(name):
            problems.append(f"{where}: invalid name")
        try:
            value = unseal(DB_DIRENTS, key, value)
        except DamagedValue as exc:
            problems.append(str(exc))
            continue
        child = _u64_or_none(bytes(value))
        if child is None:
            problems.append(f"{where}: malformed value {bytes(value).hex()}")
            continue
        parent_node = nodes.get(parent)
        if parent_node is None:
            problems.append(f"{where}: parent inode does not exist")
        elif not stat.S_ISDIR(parent_node.mode):
            problems.append(f"{where}: parent inode is not a directory")
        node = nodes.get(child)
        if node is None:
            problems.append(f"{where}: names missing inode {child}")
            continue
        node.names += 1
        if stat.S_ISDIR(node.mode):
            node.named_in = parent
            if parent_node is not None:
                parent_node.subdirs += 1


def _check_links(nodes: Nodes, problems: list[str]) -> None:
    """nlink, the single name and parent of directories, and reachability from the root."""
    for ino, node in nodes.items():
        if stat.S_ISDIR(node.mode):
            expected = 2 + node.subdirs
            if ino == ROOT_INO:
                if node.names:
                    problems.append(f"root inode 1 is named by {node.names} dirents")
            elif node.names != 1:
                problems.append(f"directory {ino} is named by {node.names} dirents, not exactly one")
            elif node.parent != node.named_in:
                problems.append(
                    f"directory {ino} records parent {node.parent} but is named in {node.named_in}")
        else:
            expected = node.names
        if node.nlink != expected:
            problems.append(f"inode {ino}: nlink {node.nlink}, expected {expected}")
    # A directory is reachable when the chain of dirents naming it, its parent, and so on
    # reaches the root; follow each chain once, remembering the verdict for every
    # directory on it. (A file named inside an unreachable directory is lost with it.)
    reachable: dict[int, bool] = {ROOT_INO: ROOT_INO in nodes}
    for ino, node in nodes.items():
        if not stat.S_ISDIR(node.mode) or ino in reachable:
            continue
        chain: list[int] = []
        on_chain: set[int] = set()
        cur = ino
        verdict = False
        while True:
            if cur in reachable:
                verdict = reachable[cur]
                break
            cur_node = nodes.get(cur)
            if cur in on_chain or cur_node is None or cur_node.names != 1 or not stat.S_ISDIR(
                    cur_node.mode):
                break  # a cycle, a dangling parent, or a directory not named exactly once
            chain.append(cur)
            on_chain.add(cur)
            cur = cur_node.named_in
        for member in chain:
            reachable[member] = verdict
    for ino, node in nodes.items():
        if ino == ROOT_INO:
            continue
        if stat.S_ISDIR(node.mode):
            if not reachable.get(ino, False):
                problems.append(f"directory {ino} is not reachable from the root")
        elif node.names == 0:
            problems.append(f"inode {ino} is an orphan: no dirent names it")


def _check_blocks(txn: Txn, db: Databases, nodes: Nodes, problems: list[str]) -> None:
    state = FsState(txn, db)
    for key, raw in txn.cursor(db=db.blocks):
        if len(key) != _PAIR.size:
            problems.append(f"blocks: malformed key {bytes(key).hex()}")
            continue
        ino, block_no = _PAIR.unpack(key)
        where = f"block {block_no} of inode {ino}"
        node = nodes.get(ino)
        if node is not None:
            node.stored += 1
        try:
            value = state.block_bytes(key, raw)
            ref = parse_block_ref(raw[:-8])
        except StoreError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if ref is not None:
            _check_block_ref(txn, db, ino, block_no, ref, problems)
        if node is None:
            problems.append(f"{where}: inode does not exist")
            continue
        if not stat.S_ISREG(node.mode):
            problems.append(f"{where}: inode is not a regular file")
        if len(value) > BLOCK_SIZE:
            problems.append(f"{where}: holds {len(value)} bytes, more than a block")
        start = block_no * BLOCK_SIZE
        if start >= node.size:
            problems.append(f"{where}: lies wholly at or past the file size {node.size}")
        elif start + len(value) > node.size:
            problems.append(f"{where}: stores {start + len(value) - node.size} bytes past the "
                            f"file size {node.size}")


def _check_block_counts(nodes: Nodes, problems: list[str]) -> None:
    for ino, node in nodes.items():
        if node.blocks != node.stored:
            problems.append(f"inode {ino}: counts {node.blocks} stored blocks, {node.stored} are stored")


def _check_block_ref(txn: Txn, db: Databases, ino: int, block_no: int, ref: tuple[int, int, int],
                     problems: list[str]) -> None:
    """A block that refers to the journal refers to the bytes a Write of its inode wrote
    to its start."""
    seq, start, length = ref
    where = f"block {block_no} of inode {ino}, referring to journal record {seq}"
    # The record's checksum and header are _check_journal's to judge; here, what it wrote.
    extent = peek_write(txn.get(_U64.pack(seq), db=db.journal) or b"")
    if extent is None or extent[0] != ino:
        problems.append(f"{where}: the record is not a write to that inode")
        return
    _ino, offset, data_length = extent
    if start < WRITE_DATA_START or start - WRITE_DATA_START + length > data_length:
        problems.append(f"{where}: {length} bytes at {start} lie outside the record's data")
    elif offset + start - WRITE_DATA_START != block_no * BLOCK_SIZE:
        problems.append(f"{where}: the bytes were written at file offset "
                        f"{offset + start - WRITE_DATA_START}, not at the block's start")


def _check_symlinks(txn: Txn, db: Databases, nodes: Nodes, problems: list[str]) -> None:
    with_target: set[int] = set()
    for key, raw in txn.cursor(db=db.symlinks):
        ino = _u64_or_none(key)
        if ino is None:
            problems.append(f"symlinks: malformed key {bytes(key).hex()}")
            continue
        with_target.add(ino)
        try:
            value = unseal(DB_SYMLINKS, key, raw)
        except DamagedValue as exc:
            problems.append(str(exc))
            continue
        node = nodes.get(ino)
        if node is None:
            problems.append(f"symlink target of inode {ino}: inode does not exist")
        elif not stat.S_ISLNK(node.mode):
            problems.append(f"symlink target of inode {ino}: inode is not a symlink")
        elif len(value) != node.size:
            problems.append(f"symlink {ino}: target of {len(value)} bytes but size {node.size}")
    for ino, node in nodes.items():
        if stat.S_ISLNK(node.mode) and ino not in with_target:
            problems.append(f"symlink {ino} has no target")


def _check_xattrs(txn: Txn, db: Databases, nodes: Nodes, problems: list[str]) -> None:
    for key, raw in txn.cursor(db=db.xattrs):
        if len(key) <= _U64.size:
            problems.append(f"xattrs: malformed key {bytes(key).hex()}")
            continue
        if not is_sealed_ok(DB_XATTRS, key, raw):
            problems.append(str(DamagedValue(DB_XATTRS, bytes(key), "checksum mismatch")))
        ino = _U64.unpack_from(key)[0]
        if ino not in nodes:
            problems.append(f"xattr {bytes(key[_U64.size:])!r} of inode {ino}: inode does not exist")


def _meta_reader(txn: Txn, db: Databases, problems: list[str]):
    """read_meta that reports a damaged value as a problem and reads it as missing."""

    def get(key: bytes) -> bytes | None:
        try:
            return read_meta(txn, db.meta, key)
        except DamagedValue as exc:
            problems.append(str(exc))
            return None

    return get


def _check_meta(txn: Txn, db: Databases, nodes: Nodes, problems: list[str]) -> bytes | None:
    get = _meta_reader(txn, db, problems)
    for key, raw in txn.cursor(db=db.meta):
        if key != META_FORMAT and not is_sealed_ok(DB_META, key, raw):
            problems.append(str(DamagedValue(DB_META, bytes(key), "checksum mismatch")))
    fmt = _u64_or_none(get(META_FORMAT))
    if fmt != FORMAT_VERSION:
        problems.append(f"meta: format {fmt}, expected {FORMAT_VERSION}")
    cluster_id = get(META_CLUSTER_ID)
    if cluster_id is None or len(cluster_id) != 16:
        problems.append(f"meta: cluster id {cluster_id!r} is not 16 bytes")
        cluster_id = None
    raw_next = get(META_NEXT_INO)
    next_ino = _u64_or_none(raw_next)
    if raw_next is not None and next_ino is None:
        problems.append(f"meta: malformed next_ino {bytes(raw_next).hex()}")
    elif nodes:
        highest = max(nodes)
        if next_ino is None or next_ino <= highest:
            problems.append(f"meta: next_ino {next_ino} is not above the highest inode {highest}")
    epoch = _u64_or_none(get(META_EPOCH))
    if epoch is None:
        problems.append("meta: epoch is missing or malformed")
    raw_history = get(META_EPOCH_HISTORY)
    if raw_history is not None and len(raw_history) % _PAIR.size:
        problems.append(f"meta: epoch history of {len(raw_history)} bytes is not whole pairs")
    elif raw_history:
        history = [_PAIR.unpack_from(raw_history, i) for i in range(0, len(raw_history), _PAIR.size)]
        for (e1, s1), (e2, s2) in zip(history, history[1:], strict=False):
            if not (e2 > e1 and s2 > s1):
                problems.append(f"meta: epoch history not ascending: ({e1}, {s1}) then ({e2}, {s2})")
        if epoch is not None and epoch < max(e for e, _ in history):
            problems.append(f"meta: epoch {epoch} is below epoch history {history}")
    if _u64_or_none(get(META_LAST_SEQ)) is None:
        problems.append("meta: last_seq is missing or malformed")
    return None if cluster_id is None else bytes(cluster_id)


def _check_journal(txn: Txn, db: Databases, cluster_id: bytes | None, problems: list[str]) -> None:
    last_seq = _u64_or_none(_meta_reader(txn, db, [])(META_LAST_SEQ))
    prev_seq: int | None = None
    prev_epoch = 0
    for key, value in txn.cursor(db=db.journal):
        seq = _u64_or_none(key)
        if seq is None:
            problems.append(f"journal: malformed key {bytes(key).hex()}")
            continue
        if prev_seq is not None and seq != prev_seq + 1:
            problems.append(f"journal: hole between seq {prev_seq} and {seq}")
        prev_seq = seq
        try:
            record = decode_record(value)
        except CorruptRecord as exc:
            problems.append(f"journal record {seq}: {exc}")
            continue
        if cluster_id is not None and record.cluster_id != cluster_id:
            problems.append(f"journal record {seq}: cluster id {record.cluster_id.hex()} is not the "
                            f"store's {cluster_id.hex()}")
        if record.seq != seq:
            problems.append(f"journal record {seq}: header says seq {record.seq}")
        if record.epoch < prev_epoch:
            problems.append(f"journal record {seq}: epoch {record.epoch} after epoch {prev_epoch}")
        prev_epoch = max(prev_epoch, record.epoch)
    if prev_seq is not None and last_seq is not None and prev_seq != last_seq:
        problems.append(f"journal: last record is seq {prev_seq} but meta last_seq is {last_seq}")


class StateDigest(NamedTuple):
    value: str
    seq: int
    #: The epoch of the record at `seq`: two stores at the same seq hold the same history
    #: only if it is also of the same epoch (an old primary's divergent records are not).
    epoch: int


def digest(store: Store) -> StateDigest:
    """The SHA-256 hex digest of the filesystem state, with the seq and epoch it is at,
    read in one transaction.

    Covers the cluster id and every database of schema.STATE_DBS in cursor order; not
    the journal, nor meta that is local to a node (epoch, role, sizes, seqs). Values are
    verified as they are read (DamagedValue) and hashed without their checksums. Each
    database contributes its length-prefixed name and entry count, then each entry its
    length-prefixed key and value, so no two different states hash the same bytes. A
    block's value is hashed as the bytes it stands for: whether a block still refers to
    the journal depends on when a node last pruned, not on the state.
    """
    h = hashlib.sha256()
    with store.shared(), store.env.begin() as txn:
        handles = dict(store.db.state())
        meta = store.db.meta
        cluster_id = read_meta(txn, meta, META_CLUSTER_ID) or b""
        last_seq = from_u64(read_meta(txn, meta, META_LAST_SEQ) or bytes(8))
        epoch = epoch_at(unpack_epoch_history(read_meta(txn, meta, META_EPOCH_HISTORY)), last_seq)
        h.update(_U64.pack(len(cluster_id)))
        h.update(cluster_id)
        for name in STATE_DBS:
            handle = handles[name]
            h.update(_U64.pack(len(name)))
            h.update(name)
            h.update(_U64.pack(txn.stat(handle)["entries"]))
            blocks = FsState(txn, store.db) if handle == store.db.blocks else None
            for key, value in txn.cursor(db=handle):
                value = blocks.block_bytes(key, value) if blocks is not None else unseal(name, key, value)
                h.update(_U64.pack(len(key)))
                h.update(key)
                h.update(_U64.pack(len(value)))
                h.update(value)
    return StateDigest(h.hexdigest(), last_seq, epoch)


def replay(source: Store, dest_path: str | os.PathLike, batch: int = REPLAY_BATCH) -> Store:
    """A new store at `dest_path` built by applying every record of `source`'s journal.

    The new store has the source's cluster id and no Init of its own: its seq 1 is the
    source's. The source's journal must still begin at seq 1.
    """
    first = source.first_seq()
    if first != 1:
        raise StoreError(f"{source.path}: journal begins at seq {first}, not 1; cannot replay")
    dest = Store.create(dest_path, max_size=source.max_size, cluster_id=source.cluster_id, init=False)
    try:
        start = 1
        while True:
            raws = [raw for _seq, raw in source.records(start, start + batch)]
            if not raws:
                break
            dest.apply_records(raws)
            start += len(raws)
        dest.sync()
    except BaseException:
        dest.close()
        raise
    log.info("replayed %d records of %s into %s", dest.last_seq, source.path, dest.path)
    return dest
