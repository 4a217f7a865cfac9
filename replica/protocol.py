"""The replication wire format: every message between nodes, documented and validated here.

Nothing else in the project builds or parses replication frames, so this module is the
whole contract between a primary and its standbys. Every message is a ZeroMQ multipart
message:

    frame 0  envelope, 28 bytes (big-endian):
               0  2  magic b"TR"
               2  1  protocol version (VERSION)
               3  1  message type (MsgType)
               4 16  cluster id (all zeros only in the HELLO of a node that has no store)
              20  8  epoch: the highest epoch the sender knows
    frame 1  body: a fixed-size struct per type (BODIES), exact length required
    frame 2+ payload frames, per type (below); their number is checked

Sockets and directions
    PUB  (primary, --listen PORT)       -> SUB (standby):     RECORDS, HEARTBEAT, FLUSH
    DEALER (standby) -> ROUTER (primary, PORT+1 or --control): HELLO, FETCH, SNAP_OPEN,
                                                                SNAP_GET, ACK
    ROUTER (primary) -> DEALER (standby):                      WELCOME, REFUSE, RECORDS,
                                                                NOT_RETAINED, SNAP_INFO,
                                                                SNAP_WAIT, SNAP_CHUNK, SNAP_GONE
    DEALER (primary) <-> ROUTER (another primary's side channel): PEER
    DEALER (standby) <-> ROUTER (primary), both ways:           REPAIR_GET, REPAIR_VALUE
Acknowledgements never ride on PUB/SUB. RECORDS means the same on both paths: the live
stream, or the answer to a FETCH.

Types, bodies and payloads
    RECORDS      first_seq u64, count u32, flags u8 (RECORDS_FLUSH: a durable fsync waits on
                 the last of these: flush once they are applied, and ACK at once)
                                                 + count frames, each one journal record
                                                   (journal/records.py), seqs first_seq..
    HEARTBEAT    last_seq u64 (last published), time_ns u64, first_seq u64 (oldest
                 retained), flags u8 (ACK_* : which acks the primary's fsyncs wait for)
    FLUSH        seq u64 (>= 1): RECORDS_FLUSH for records published before the fsync
                 came: flush once seq is applied. Without either, a standby flushes lazily
                 (about once a second).
    HELLO        applied_seq u64                 + 1 frame: node name, UTF-8, 1..64 bytes
    WELCOME      last_seq u64, first_seq u64, flags u8
                                                 + 1 frame: the primary's epoch history, 1..4096
                                                   (epoch u64, first seq u64) pairs, both
                                                   strictly ascending, the last epoch not above
                                                   the envelope's and its first seq <= last_seq
    REFUSE       code u8 (REFUSE_*)              + 1 frame: reason, UTF-8, <= 512 bytes
    FETCH        start u64, stop u64 (records start <= seq < stop; 1 <= start < stop)
    NOT_RETAINED start u64, first_seq u64 (the primary's oldest retained record)
    SNAP_OPEN    snap_id u64 (0: any; else the checkpoint a resumed transfer wants)
    SNAP_INFO    snap_id u64 (= the checkpoint's seq), size u64, chunk u32
    SNAP_WAIT    retry_ms u32 (a checkpoint is being taken: ask again)
    SNAP_GET     snap_id u64, offset u64, length u32 (length <= MAX_CHUNK)
    SNAP_CHUNK   snap_id u64, offset u64, crc32 u32 + 1 frame: the bytes (<= MAX_CHUNK)
    SNAP_GONE    snap_id u64 (not available any more: start over)
    ACK          received u64, durable u64 (durable <= received)
    PEER         last_seq u64, epoch_first_seq u64 (where the sender's epoch began),
                 flags u8 (PEER_*)               + 1 frame: node name, UTF-8, 1..64 bytes
    REPAIR_GET   req_id u64, db u8 (journal/integrity.py DB_TAGS), flags u8 (REPAIR_RANGE)
                                                 + 2 frames: the key (1..263 bytes) and an
                                                   empty frame; with REPAIR_RANGE, the keys
                                                   strictly between the two (each 0..263
                                                   bytes, empty: unbounded)
    REPAIR_VALUE req_id u64, last_seq u64 (the answerer's), status u8 (REPAIR_*)
                                                 + 2 frames: the value, sealed (a block: its
                                                   bytes, as a block holding them; a journal
                                                   record: the record), and for a block the
                                                   answerer's sealed inode (else empty); for a
                                                   range, the first frame holds the entries,
                                                   each klen u16, vlen u32, key, sealed value
    DAMAGED      seq u64: the primary cannot serve the record a FETCH asked for, because its
                 own copy fails its checksum

Snapshot transfer is the ZeroMQ guide's credit-based file transfer: the standby keeps up
to a fixed number of SNAP_GET requests in flight and sends the next one as each chunk
arrives, so the primary never queues more than the standby asked for.

Epochs. The epoch in a message is the highest the sender knows. Messages that speak
for a primary (RECORDS, HEARTBEAT, FLUSH, WELCOME, NOT_RETAINED, SNAP_*) from a lower epoch than
the receiver knows come from a deposed primary and are dropped as stale. A standby's
messages may carry a lower epoch (it has not yet received the new epoch's records; an
old primary rejoining as a standby says HELLO from the epoch it was deposed in): they
are served, and the WELCOME's epoch history lets the standby find where its journal
parted from the primary's. A standby message from a *higher* epoch tells a primary it
has been superseded: the primary stops accepting writes (fencing).

PEER is how primaries find each other (replica/fencing.py). A primary sends one every
half second to each peer it knows (the primary it was promoted from, and --peer
addresses); a primary that receives one answers with its own (flag PEER_REPLY, never
answered). Whoever learns of a higher epoch than its own is fenced; two primaries of
the same epoch are both fenced and report it as fatal; a PEER from a lower epoch is
counted as stale (and its sender learns of the higher epoch from the answer). PEER is
not a standby's message: it is accepted on the ROUTER beside TO_PRIMARY (PEER_TYPES),
and on the prober's DEALER alone.

Validation. `decode` checks everything that can be checked without state (magic, version,
type allowed on this socket, frame count, exact lengths, ranges, UTF-8, record headers
against the envelope); `check_sender` adds cluster and epoch. Both raise `BadMessage`,
whose `kind` names a counter; receivers drop the message and count it. Journal records
are verified again (CRC, cluster, seq) by `Store.apply_records` before anything applies.

Control socket. The local control socket (replica/control.py) speaks JSON: a request
{"v": 1, "cmd": "status" | "checkpoint" | "digest" | "promote", ...} and a reply
{"ok": bool, ...}; it is local to the machine and served by every running node.
`encode_control`/`decode_control` are its codec. "promote" (served by a standby) takes
"force" (bool), and optionally "listen", "control", "mount", "durability", "sync_timeout",
"on_standby_loss" and "peers" (a list of stream addresses); its reply says the epoch
taken, where it began, and how many records the node may lack.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from journal.records import HEADER_SIZE, OVERHEAD, peek_header
from journal.records import MAGIC as RECORD_MAGIC

MAGIC = b"TR"
#: Where a journal record's header holds its cluster id (journal/records.py: bytes 20..36).
_RECORD_CLUSTER = slice(HEADER_SIZE - 20, HEADER_SIZE - 4)
#: 2: RECORDS carries a flags byte (RECORDS_FLUSH), FLUSH is new, and WELCOME carries the
#: primary's epoch history. 3: the records carried are of store format 2 (schema.py); 4: of
#: store format 3 (records checksummed with XXH3-64). A
#: node of another version drops every message as "version" (counted in status, and
#: logged), so nodes of both versions never half-understand each other.
VERSION = 4
CLUSTER_ID_SIZE = 16
NO_CLUSTER = bytes(CLUSTER_ID_SIZE)
_ENVELOPE = struct.Struct(">2sBB16sQ")
ENVELOPE_SIZE = _ENVELOPE.size

#: Most records in one RECORDS message, and most bytes of records in one.
MAX_BATCH_RECORDS = 4096
MAX_BATCH_BYTES = 8 << 20
#: Largest snapshot chunk.
MAX_CHUNK = 4 << 20
MAX_NAME = 64
MAX_REASON = 512
#: Socket-level cap on one inbound frame (ZMQ_MAXMSGSIZE): a forged length cannot make a
#: receiver allocate more. A record is at most one FUSE write plus its header.
MAX_FRAME = MAX_BATCH_BYTES + 4096

ACK_RECEIVED = 0x01
ACK_DURABLE = 0x02
RECORDS_FLUSH = 0x01

REFUSE_CLUSTER = 1  # the standby's store belongs to another cluster
REFUSE_NOT_PRIMARY = 2  # the node asked is not (or no longer) a primary
REFUSE_FULL = 3  # the primary tracks as many standbys as it will (it says hello again later)

REPAIR_FOUND = 0  # the value follows, sealed as the asker stores it
REPAIR_ABSENT = 1  # the answering node holds no such value
REPAIR_DAMAGED = 2  # the answering node's copy is damaged too (or the range is too large)
REPAIR_RANGE = 0x01  # REPAIR_GET: every entry strictly between two keys
#: Database tags of journal/integrity.py: 1 (meta) .. 7 (journal).
MAX_DB_TAG = 7
#: Longest key a REPAIR_GET asks for: an inode and the longest name.
MAX_REPAIR_KEY = 8 + 255

PEER_REPLY = 0x01  # an answer to a PEER: not to be answered
PEER_FENCED = 0x02  # the sender does not accept writes (fenced, or split brain)
#: Longest epoch history a WELCOME carries (each promotion adds one entry).
MAX_HISTORY = 4096
_PAIR = struct.Struct(">QQ")


class MsgType(enum.IntEnum):
    RECORDS = 1
    HEARTBEAT = 2
    FLUSH = 3
    HELLO = 10
    WELCOME = 11
    REFUSE = 12
    FETCH = 13
    NOT_RETAINED = 14
    SNAP_OPEN = 15
    SNAP_INFO = 16
    SNAP_WAIT = 17
    SNAP_GET = 18
    SNAP_CHUNK = 19
    SNAP_GONE = 20
    ACK = 21
    PEER = 22
    REPAIR_GET = 23
    REPAIR_VALUE = 24
    DAMAGED = 25


class Records(NamedTuple):
    first_seq: int
    count: int
    flags: int


class Heartbeat(NamedTuple):
    last_seq: int
    time_ns: int
    first_seq: int
    flags: int


class Hello(NamedTuple):
    applied_seq: int


class Welcome(NamedTuple):
    last_seq: int
    first_seq: int
    flags: int


class Refuse(NamedTuple):
    code: int


class Fetch(NamedTuple):
    start: int
    stop: int


class Flush(NamedTuple):
    seq: int


class NotRetained(NamedTuple):
    start: int
    first_seq: int


class SnapOpen(NamedTuple):
    snap_id: int


class SnapInfo(NamedTuple):
    snap_id: int
    size: int
    chunk: int


class SnapWait(NamedTuple):
    retry_ms: int


class SnapGet(NamedTuple):
    snap_id: int
    offset: int
    length: int


class SnapChunk(NamedTuple):
    snap_id: int
    offset: int
    crc32: int


class SnapGone(NamedTuple):
    snap_id: int


class Ack(NamedTuple):
    received: int
    durable: int


class Peer(NamedTuple):
    last_seq: int
    epoch_first_seq: int
    flags: int


class RepairGet(NamedTuple):
    req_id: int
    db: int
    flags: int


class RepairValue(NamedTuple):
    req_id: int
    last_seq: int
    status: int


class Damaged(NamedTuple):
    seq: int


class _Spec(NamedTuple):
    body: struct.Struct
    tuple_type: type
    #: Payload frames: an exact count, or None for RECORDS (count comes from the body).
    payload: int | None


BODIES: dict[MsgType, _Spec] = {
    MsgType.RECORDS: _Spec(struct.Struct(">QIB"), Records, None),
    MsgType.HEARTBEAT: _Spec(struct.Struct(">QQQB"), Heartbeat, 0),
    MsgType.FLUSH: _Spec(struct.Struct(">Q"), Flush, 0),
    MsgType.HELLO: _Spec(struct.Struct(">Q"), Hello, 1),
    MsgType.WELCOME: _Spec(struct.Struct(">QQB"), Welcome, 1),
    MsgType.REFUSE: _Spec(struct.Struct(">B"), Refuse, 1),
    MsgType.FETCH: _Spec(struct.Struct(">QQ"), Fetch, 0),
    MsgType.NOT_RETAINED: _Spec(struct.Struct(">QQ"), NotRetained, 0),
    MsgType.SNAP_OPEN: _Spec(struct.Struct(">Q"), SnapOpen, 0),
    MsgType.SNAP_INFO: _Spec(struct.Struct(">QQI"), SnapInfo, 0),
    MsgType.SNAP_WAIT: _Spec(struct.Struct(">I"), SnapWait, 0),
    MsgType.SNAP_GET: _Spec(struct.Struct(">QQI"), SnapGet, 0),
    MsgType.SNAP_CHUNK: _Spec(struct.Struct(">QQI"), SnapChunk, 1),
    MsgType.SNAP_GONE: _Spec(struct.Struct(">Q"), SnapGone, 0),
    MsgType.ACK: _Spec(struct.Struct(">QQ"), Ack, 0),
    MsgType.PEER: _Spec(struct.Struct(">QQB"), Peer, 1),
    MsgType.REPAIR_GET: _Spec(struct.Struct(">QBB"), RepairGet, 2),
    MsgType.REPAIR_VALUE: _Spec(struct.Struct(">QQB"), RepairValue, 2),
    MsgType.DAMAGED: _Spec(struct.Struct(">Q"), Damaged, 0),
}

#: What each socket may receive.
STREAM_TYPES = frozenset({MsgType.RECORDS, MsgType.HEARTBEAT, MsgType.FLUSH})
#: Both ways on the side channel: a node asks its peer for a value to repair its own.
REPAIR_TYPES = frozenset({MsgType.REPAIR_GET, MsgType.REPAIR_VALUE})
TO_PRIMARY = frozenset({MsgType.HELLO, MsgType.FETCH, MsgType.SNAP_OPEN, MsgType.SNAP_GET,
                        MsgType.ACK}) | REPAIR_TYPES
TO_STANDBY = frozenset({
    MsgType.WELCOME, MsgType.REFUSE, MsgType.RECORDS, MsgType.NOT_RETAINED, MsgType.SNAP_INFO,
    MsgType.SNAP_WAIT, MsgType.SNAP_CHUNK, MsgType.SNAP_GONE, MsgType.DAMAGED,
}) | REPAIR_TYPES
#: Primary to primary, both ways (see "PEER" above); epochs are judged by replica/fencing.py.
PEER_TYPES = frozenset({MsgType.PEER})
#: Messages that speak for a primary: stale when their epoch is below the receiver's. (A
#: repair answer is judged by what it holds, which its receiver verifies.)
FROM_PRIMARY = STREAM_TYPES | (TO_STANDBY - REPAIR_TYPES)


class BadMessage(Exception):
    """A message that must be dropped. `kind` names the counter it is counted under."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Message:
    type: MsgType
    cluster_id: bytes
    epoch: int
    body: Any  # the NamedTuple of BODIES[type]
    payload: list[bytes]


def encode(type_: MsgType, cluster_id: bytes, epoch: int, body: tuple,
           payload: Sequence[bytes] = ()) -> list[bytes]:
    """The frames of one message. Checks what a sender could get wrong by mistake."""
    spec = BODIES[type_]
    if len(cluster_id) != CLUSTER_ID_SIZE:
        raise ValueError(f"cluster id of {len(cluster_id)} bytes")
    if spec.payload is not None and len(payload) != spec.payload:
        raise ValueError(f"{type_.name} takes {spec.payload} payload frames, not {len(payload)}")
    return [_ENVELOPE.pack(MAGIC, VERSION, type_, cluster_id, epoch), spec.body.pack(*body), *payload]


def decode(frames: Sequence[bytes], allowed: frozenset[MsgType]) -> Message:
    """Parse and validate one message received on a socket that accepts `allowed`."""
    if len(frames) < 2:
        raise BadMessage("truncated", f"{len(frames)} frame(s)")
    envelope = bytes(frames[0])
    if len(envelope) != ENVELOPE_SIZE:
        raise BadMessage("malformed", f"envelope of {len(envelope)} bytes")
    magic, version, code, cluster_id, epoch = _ENVELOPE.unpack(envelope)
    if magic != MAGIC:
        raise BadMessage("malformed", "bad magic")
    if version != VERSION:
        raise BadMessage("version", f"protocol version {version}")
    try:
        type_ = MsgType(code)
    except ValueError:
        raise BadMessage("malformed", f"unknown message type {code}") from None
    if type_ not in allowed:
        raise BadMessage("unexpected", f"{type_.name} is not accepted on this socket")
    spec = BODIES[type_]
    body_raw = bytes(frames[1])
    if len(body_raw) != spec.body.size:
        raise BadMessage("malformed", f"{type_.name} body of {len(body_raw)} bytes, not {spec.body.size}")
    body = spec.tuple_type(*spec.body.unpack(body_raw))
    payload = [bytes(f) for f in frames[2:]]
    if spec.payload is not None and len(payload) != spec.payload:
        raise BadMessage("malformed", f"{type_.name} with {len(payload)} payload frames, not {spec.payload}")
    if cluster_id == NO_CLUSTER and type_ is not MsgType.HELLO:
        raise BadMessage("cluster", f"{type_.name} without a cluster id")
    message = Message(type_, cluster_id, epoch, body, payload)
    if epoch == 0 and cluster_id != NO_CLUSTER:
        raise BadMessage("malformed", "epoch 0")
    _VALIDATORS[type_](message)
    return message


def check_sender(message: Message, cluster_id: bytes, epoch: int) -> None:
    """Raise BadMessage unless `message` belongs to cluster `cluster_id` and, if it speaks
    for a primary, is not from an epoch older than `epoch` (the receiver's)."""
    if message.cluster_id != cluster_id and not (
            message.type is MsgType.HELLO and message.cluster_id == NO_CLUSTER):
        raise BadMessage("cluster", f"{message.type.name} of cluster {message.cluster_id.hex()}")
    if message.type in FROM_PRIMARY and message.epoch < epoch:
        raise BadMessage("stale_epoch", f"{message.type.name} of epoch {message.epoch} < {epoch}")


# --- per-type validation ----------------------------------------------------------------
def _text(raw: bytes, limit: int, what: str, allow_empty: bool = False) -> str:
    if len(raw) > limit or (not raw and not allow_empty):
        raise BadMessage("malformed", f"{what} of {len(raw)} bytes")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise BadMessage("malformed", f"{what} is not UTF-8") from None


def _records(message: Message) -> None:
    first_seq, count, flags = message.body
    if flags & ~RECORDS_FLUSH:
        raise BadMessage("malformed", f"RECORDS with flags {flags:#x}")
    if len(message.payload) != count:
        raise BadMessage("malformed", f"RECORDS says {count} records, carries {len(message.payload)}")
    if count > MAX_BATCH_RECORDS:
        raise BadMessage("malformed", f"RECORDS of {count} records")
    if first_seq < 1 or first_seq + count > 1 << 63:
        raise BadMessage("malformed", f"RECORDS from seq {first_seq}")
    total = 0
    for i, raw in enumerate(message.payload):
        total += len(raw)
        if len(raw) < OVERHEAD or raw[:2] != RECORD_MAGIC:
            raise BadMessage("record", f"record {i} is not a journal record")
        epoch, seq = peek_header(raw)
        if seq != first_seq + i:
            raise BadMessage("record", f"record {i} has seq {seq}, expected {first_seq + i}")
        if epoch > message.epoch or epoch == 0:
            raise BadMessage("record", f"record {seq} of epoch {epoch} in a message of epoch {message.epoch}")
        if raw[_RECORD_CLUSTER] != message.cluster_id:
            raise BadMessage("cluster", f"record {seq} of another cluster")
    if total > MAX_BATCH_BYTES:
        raise BadMessage("malformed", f"RECORDS of {total} bytes")


def _heartbeat(message: Message) -> None:
    last_seq, _time_ns, first_seq, _flags = message.body
    if first_seq > last_seq + 1 or first_seq < 1:
        raise BadMessage("malformed", f"HEARTBEAT retains from {first_seq} but ends at {last_seq}")


def _flush(message: Message) -> None:
    if message.body.seq < 1:
        raise BadMessage("malformed", "FLUSH of seq 0")


def _hello(message: Message) -> None:
    _text(message.payload[0], MAX_NAME, "node name")


def _welcome(message: Message) -> None:
    last_seq, first_seq, _flags = message.body
    if first_seq > last_seq + 1 or first_seq < 1:
        raise BadMessage("malformed", f"WELCOME retains from {first_seq} but ends at {last_seq}")
    history = decode_history(message.payload[0])
    if not history:
        raise BadMessage("malformed", "WELCOME without an epoch history")
    if history[-1][0] > message.epoch or history[-1][1] > last_seq:
        raise BadMessage("malformed", f"WELCOME history ends at {history[-1]}, beyond epoch {message.epoch} "
                         f"seq {last_seq}")


def encode_history(history: Sequence[tuple[int, int]]) -> bytes:
    """A WELCOME's epoch history frame."""
    return b"".join(_PAIR.pack(epoch, seq) for epoch, seq in history)


def decode_history(raw: bytes) -> list[tuple[int, int]]:
    """An epoch history frame: whole pairs, strictly ascending in both epoch and seq."""
    if len(raw) % _PAIR.size or len(raw) > MAX_HISTORY * _PAIR.size:
        raise BadMessage("malformed", f"epoch history of {len(raw)} bytes")
    history = [_PAIR.unpack_from(raw, i) for i in range(0, len(raw), _PAIR.size)]
    for (e1, s1), (e2, s2) in zip(history, history[1:], strict=False):
        if not (e2 > e1 and s2 > s1):
            raise BadMessage("malformed", f"epoch history not ascending: ({e1}, {s1}) then ({e2}, {s2})")
    if history and (history[0][0] < 1 or history[0][1] < 1):
        raise BadMessage("malformed", f"epoch history begins with {history[0]}")
    return history


def _peer(message: Message) -> None:
    last_seq, epoch_first_seq, flags = message.body
    _text(message.payload[0], MAX_NAME, "node name")
    if not 1 <= epoch_first_seq <= last_seq or flags & ~(PEER_REPLY | PEER_FENCED):
        raise BadMessage("malformed", f"PEER with epoch from seq {epoch_first_seq} to {last_seq}, "
                         f"flags {flags:#x}")


def _refuse(message: Message) -> None:
    _text(message.payload[0], MAX_REASON, "reason", allow_empty=True)


def _fetch(message: Message) -> None:
    start, stop = message.body
    if not 1 <= start < stop:
        raise BadMessage("malformed", f"FETCH [{start}, {stop})")


def _snap_get(message: Message) -> None:
    snap_id, _offset, length = message.body
    if not snap_id or not 0 < length <= MAX_CHUNK:
        raise BadMessage("malformed", f"SNAP_GET of {length} bytes of snapshot {snap_id}")


def _snap_info(message: Message) -> None:
    snap_id, _size, chunk = message.body
    if not snap_id or not 0 < chunk <= MAX_CHUNK:
        raise BadMessage("malformed", f"SNAP_INFO with chunk {chunk} of snapshot {snap_id}")


def _snap_chunk(message: Message) -> None:
    data = message.payload[0]
    if len(data) > MAX_CHUNK or not data:
        raise BadMessage("malformed", f"SNAP_CHUNK of {len(data)} bytes")
    if zlib.crc32(data) != message.body.crc32:
        raise BadMessage("checksum", f"SNAP_CHUNK at {message.body.offset}")


def _ack(message: Message) -> None:
    received, durable = message.body
    if durable > received:
        raise BadMessage("malformed", f"ACK durable {durable} > received {received}")


def _repair_get(message: Message) -> None:
    key, end = message.payload
    ranged = message.body.flags == REPAIR_RANGE
    if (not 1 <= message.body.db <= MAX_DB_TAG or message.body.flags & ~REPAIR_RANGE
            or len(key) > MAX_REPAIR_KEY or len(end) > MAX_REPAIR_KEY or (not ranged and (not key or end))
            or (ranged and key and end and key >= end)):
        raise BadMessage("malformed", f"REPAIR_GET of db {message.body.db}, flags {message.body.flags}, "
                         f"keys of {len(key)} and {len(end)} bytes")


def _repair_value(message: Message) -> None:
    value, context = message.payload
    if message.body.status not in (REPAIR_FOUND, REPAIR_ABSENT, REPAIR_DAMAGED):
        raise BadMessage("malformed", f"REPAIR_VALUE status {message.body.status}")
    if message.body.status != REPAIR_FOUND and (value or context):
        raise BadMessage("malformed", "REPAIR_VALUE without a value carries one")


def _none(message: Message) -> None:
    pass


_VALIDATORS = {
    MsgType.RECORDS: _records,
    MsgType.HEARTBEAT: _heartbeat,
    MsgType.FLUSH: _flush,
    MsgType.HELLO: _hello,
    MsgType.WELCOME: _welcome,
    MsgType.REFUSE: _refuse,
    MsgType.FETCH: _fetch,
    MsgType.NOT_RETAINED: _none,
    MsgType.SNAP_OPEN: _none,
    MsgType.SNAP_INFO: _snap_info,
    MsgType.SNAP_WAIT: _none,
    MsgType.SNAP_GET: _snap_get,
    MsgType.SNAP_CHUNK: _snap_chunk,
    MsgType.SNAP_GONE: _none,
    MsgType.ACK: _ack,
    MsgType.PEER: _peer,
    MsgType.REPAIR_GET: _repair_get,
    MsgType.REPAIR_VALUE: _repair_value,
    MsgType.DAMAGED: _none,
}
assert set(_VALIDATORS) == set(MsgType) == set(BODIES)


# --- control socket ----------------------------------------------------------------------
CONTROL_VERSION = 1
CONTROL_COMMANDS = frozenset({"status", "checkpoint", "digest", "promote"})
MAX_CONTROL = 1 << 20


def encode_control(cmd: str, **args: Any) -> bytes:
    return json.dumps({"v": CONTROL_VERSION, "cmd": cmd, **args}).encode()


def decode_control(raw: bytes, commands: frozenset[str] = CONTROL_COMMANDS) -> dict[str, Any]:
    """A control request; raises BadMessage when it is not one."""
    if len(raw) > MAX_CONTROL:
        raise BadMessage("malformed", f"control request of {len(raw)} bytes")
    try:
        request = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise BadMessage("malformed", "control request is not JSON") from None
    if not isinstance(request, dict) or request.get("v") != CONTROL_VERSION:
        raise BadMessage("version", "control request of another version")
    if request.get("cmd") not in commands:
        raise BadMessage("unexpected", f"control command {request.get('cmd')!r}")
    return request
