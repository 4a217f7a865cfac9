"""Promotion: the rules by which a standby becomes the primary of a new epoch.

The mechanics live in replica/node.py (in place, for a running standby; or by starting a
stopped standby's data directory as a primary); the decisions live here, so both paths
decide the same way:

- Refusal. A node with no filesystem (no store, or nothing applied) cannot serve, forced
  or not. A node known to be behind (the last seq its old primary announced, in
  heartbeats and remembered in META_UPSTREAM, is above what it holds) would lose those
  records, so it is refused unless forced. The data directory of a node that was last a
  primary is refused unless forced: it may have been deposed, and promoting it would
  depose whoever took over.
- The epoch: one above every epoch the node has seen (its journal's, the epochs its
  primary's messages carried, an epoch that fenced it), so that it supersedes them all.
- Defaults, so that the usual failover is one command: the new primary serves on the
  ports its old primary used, on this machine's address towards the old primary (on one
  machine: the same address, so clients and the old primary, rejoining as a standby, use
  the address they already know); it keeps the durability mode its old primary
  announced, and `--on-standby-loss block` like any primary.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from journal.schema import META_FENCED, from_u64
from journal.store import Store

from . import protocol as p
from .primary import Durability, OnStandbyLoss

log = logging.getLogger(__name__)


class PromotionRefused(Exception):
    """The node must not be promoted (as things stand, or at all); the message says why."""


@dataclass
class PromoteRequest:
    force: bool = False
    listen: str | None = None
    control: str | None = None  # this node's own side channel once primary
    mount: str | None = None
    durability: Durability | None = None  # None: as the old primary announced
    sync_timeout: float | None = None
    on_standby_loss: OnStandbyLoss | None = None
    peers: list[str] = field(default_factory=list)  # other nodes' stream addresses
    auto: bool = False  # the standby's own missed-heartbeat watchdog asked

    def to_control(self) -> dict[str, Any]:
        out = asdict(self)
        out["durability"] = self.durability.value if self.durability else None
        out["on_standby_loss"] = self.on_standby_loss.value if self.on_standby_loss else None
        return out

    @classmethod
    def from_control(cls, request: dict[str, Any]) -> PromoteRequest:
        """From a control request; raises ValueError on a malformed one."""
        peers = request.get("peers") or []
        if not isinstance(peers, list) or not all(isinstance(a, str) for a in peers):
            raise ValueError("peers must be a list of addresses")
        for key in ("listen", "control", "mount"):
            if request.get(key) is not None and not isinstance(request[key], str):
                raise ValueError(f"{key} must be a string")
        timeout = request.get("sync_timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ValueError("sync_timeout must be a positive number")
        return cls(
            force=bool(request.get("force")), listen=request.get("listen"), control=request.get("control"),
            mount=request.get("mount"),
            durability=Durability(request["durability"]) if request.get("durability") else None,
            sync_timeout=timeout,
            on_standby_loss=(OnStandbyLoss(request["on_standby_loss"]) if request.get("on_standby_loss")
                             else None),
            peers=peers, auto=bool(request.get("auto")))


@dataclass
class Takeover:
    """What a promotion did: the answer to `mount.py promote`, and part of status."""

    epoch: int
    #: The BeginEpoch record: the first of the new epoch.
    seq: int
    #: The last seq this node held when it took over.
    took_over_at: int
    #: The last seq the old primary announced, as far as this node heard.
    announced: int
    #: Records the old primary announced that this node does not hold (promoted with --force).
    lacks: int
    listen: str | None
    control: str | None
    durability: str
    on_standby_loss: str
    mount: str | None
    peers: list[str]
    auto: bool
    forced: bool
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(store: Store | None, announced: int, force: bool, last_role: str = "standby",
          fenced_by: int | None = None) -> int:
    """Raise PromotionRefused unless the node may be promoted; returns how many records the
    old primary announced that it lacks (nonzero only when forced)."""
    if store is None or store.last_seq == 0:
        raise PromotionRefused("this node is empty: it holds no filesystem to serve (not even --force can "
                               "promote it); start it as a standby of a live primary first")
    if last_role == "primary" and not force:
        if fenced_by is not None:
            raise PromotionRefused(f"this node was a primary, fenced when it learned of epoch {fenced_by}: "
                                   "another node took over. Rejoin it as a standby of that node; --force "
                                   "promotes it anyway and makes the other node's writes divergent")
        raise PromotionRefused("this data directory was last a primary's, not a standby's: if another node "
                               "took over since, promoting this one deposes it. Run `mount.py primary` to "
                               "restart it as it was, or --force to start a new epoch")
    lacks = max(0, announced - store.last_seq)
    if lacks and not force:
        raise PromotionRefused(
            f"this node is behind: its primary announced seq {announced}, it holds {store.last_seq} "
            f"({lacks} record(s) fewer). Promoting it would lose them: wait for it to catch up, bring the "
            "old primary back, or give --force to accept the loss")
    return lacks


def next_epoch(store: Store, *seen: int) -> int:
    """One above every epoch this node knows of: its journal's, what its primary's messages
    carried (`seen`), and an epoch that fenced it."""
    known = [store.epoch, *(e for e, _s in store.epoch_history), *seen]
    fenced = store.get_meta(META_FENCED)
    if fenced:
        known.append(from_u64(fenced))
    return max(known) + 1


def inherited_durability(ack_flags: int) -> Durability:
    """The durability mode an old primary announced in its heartbeats' flags."""
    if ack_flags & p.ACK_DURABLE:
        return Durability.DURABLE
    if ack_flags & p.ACK_RECEIVED:
        return Durability.RECEIVED
    return Durability.ASYNC


def _split_tcp(address: str) -> tuple[str, int]:
    head, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not head.startswith("tcp://"):
        raise ValueError(f"not a tcp://HOST:PORT address: {address!r}")
    return head.removeprefix("tcp://").strip("[]"), int(port)


def _local_address_towards(host: str, port: int) -> str | None:
    """This machine's IPv4 address on the route to host:port (no packet is sent)."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(infos[0][4])
            return probe.getsockname()[0]
    except (OSError, IndexError):
        return None


def default_addresses(upstream_primary: str, upstream_control: str | None) -> tuple[str, str]:
    """(stream, side channel) a promoted standby serves on when not told: the ports its old
    primary used, on this machine's address towards it (all interfaces if there is no
    route to it now, e.g. during a partition)."""
    host, port = _split_tcp(upstream_primary)
    control_port = _split_tcp(upstream_control)[1] if upstream_control else port + 1
    local = _local_address_towards(host, port) or "*"
    return f"tcp://{local}:{port}", f"tcp://{local}:{control_port}"

