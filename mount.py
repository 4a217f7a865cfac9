#!/usr/bin/env python3
"""tandemfs command line: run a primary or a standby, inspect, checkpoint and compare nodes.

Every verb has --help. Logs go to stderr; results of inspecting verbs go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("tandemfs")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _size(text: str) -> int:
    from journal.store import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 64G)") from exc


def _config(args: argparse.Namespace, **extra: object):
    from pathlib import Path

    from journal.checkpoints import RetentionPolicy
    from replica.node import NodeConfig

    return NodeConfig(
        data=Path(args.data), mount=args.mount, max_size=args.max_size, control=args.control,
        retention=RetentionPolicy(args.retain_records, args.retain_bytes),
        checkpoint_interval=args.checkpoint_interval, keep_checkpoints=args.keep_checkpoints, **extra)


def cmd_primary(args: argparse.Namespace) -> int:
    from replica.control import DataDirBusy
    from replica.node import run_primary
    from replica.primary import Durability, OnStandbyLoss

    if not os.path.isdir(args.mount):
        log.error("mountpoint %s is not a directory", args.mount)
        return 2
    config = _config(args, group_commit=args.group_commit, listen=args.listen,
                     durability=Durability(args.durability), sync_timeout=args.sync_timeout,
                     on_standby_loss=OnStandbyLoss(args.on_standby_loss))
    try:
        return run_primary(config)
    except DataDirBusy as exc:
        log.error("%s", exc)
        return 2


def cmd_standby(args: argparse.Namespace) -> int:
    from replica.control import DataDirBusy
    from replica.node import run_standby

    if args.mount and not os.path.isdir(args.mount):
        log.error("mountpoint %s is not a directory", args.mount)
        return 2
    try:
        return run_standby(_config(args, primary=args.primary, name=args.name or ""))
    except DataDirBusy as exc:
        log.error("%s", exc)
        return 2


def _print_status(status: dict) -> None:
    def line(label: str, value: object) -> None:
        print(f"{label:<22} {value}")

    line("role", status["role"])
    for key in ("cluster_id", "epoch", "last_seq", "applied_seq"):
        if key in status:
            line(key.replace("_", " "), status[key])
    if status.get("read_only"):
        line("read-only", status["read_only"])
    journal = status.get("journal")
    if journal:
        line("journal", f"seq {journal['first_seq']}..{journal['last_seq']}, {journal['records']} records, "
             f"{journal['bytes']} bytes")
    checkpoint = status.get("last_checkpoint")
    line("last checkpoint", "none" if not checkpoint else
         f"seq {checkpoint['seq']}, {checkpoint['size']} bytes, {checkpoint['age_seconds']}s ago")
    replication = status.get("replication")
    if status["role"] == "primary":
        if replication is None:
            line("replication", "off (single node)")
        else:
            state = "DEGRADED to async" if replication["degraded"] else "ok"
            if replication["blocked_fsyncs"]:
                state = f"BLOCKED: {replication['blocked_fsyncs']} fsync(s) waiting " \
                        f"{replication['blocked_seconds']}s"
            line("durability", f"{replication['durability']} (timeout {replication['sync_timeout']}s, "
                 f"on standby loss: {replication['on_standby_loss']}): {state}")
            line("stream", f"{replication['listen']}, side channel {replication['side_channel']}")
            if not replication["standbys"]:
                line("standbys", "none")
            for peer in replication["standbys"]:
                line(f"standby {peer['name']}",
                     f"{'connected' if peer['connected'] else 'DISCONNECTED'}, "
                     f"received {peer['received_seq']}, durable {peer['durable_seq']}, "
                     f"lag {peer['lag_records']} records / "
                     f"{peer['lag_seconds']}s, seen {peer['last_seen_seconds']}s ago")
    standby = status.get("standby")
    if standby:
        line("following", f"{standby['primary']} ({standby['state']})")
        line("lag", f"{standby['lag_records']} records, {standby['lag_seconds']}s "
             f"(primary at {standby['primary_last_seq']})")
        line("heartbeat age", f"{standby['heartbeat_age_seconds']}s")
        line("repairs", f"{standby['fetches']} fetches ({standby['fetched_records']} records), "
             f"{standby['snapshots']} snapshots")
        if standby.get("snapshot"):
            snap = standby["snapshot"]
            line("snapshot", f"{snap['snap_id']}: {snap['received']} of {snap['size']} bytes")
        if standby.get("error"):
            line("error", standby["error"])
    line("dropped messages", ", ".join(f"{k}={v}" for k, v in sorted(status["dropped"].items())) or "none")


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from replica.control import ControlError, NodeNotRunning, request

    try:
        status = request(args.data, "status", timeout=args.timeout)
    except NodeNotRunning as exc:
        if args.json:
            print(json.dumps({"running": False, "data": args.data}))
        log.error("%s", exc)
        return 1
    except ControlError as exc:
        log.error("%s", exc)
        return 1
    status.pop("ok", None)
    status["running"] = True
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from replica.control import ControlError, NodeNotRunning, request

    try:
        reply = request(args.data, "checkpoint", timeout=args.timeout)
    except (NodeNotRunning, ControlError) as exc:
        log.error("%s", exc)
        return 1
    pruned = reply.get("pruned") or {}
    print(f"checkpoint seq={reply['seq']} path={reply['path']} size={reply['size']}"
          + (f" pruned_below={pruned['below']}" if pruned else ""))
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from journal.check import fsck
    from journal.store import Store

    with Store(args.data, readonly=True) as store:
        problems = fsck(store)
        for problem in problems:
            print(problem)
        print(f"{args.data}: {'clean' if not problems else f'{len(problems)} problem(s)'} "
              f"at seq {store.last_seq}")
    return 1 if problems else 0


def _digest_of(data: str, timeout: float) -> tuple[str, int]:
    """(digest, seq) of the store in `data`: through its node if one runs, else offline."""
    from journal.check import digest
    from journal.store import Store
    from replica.control import NodeNotRunning, request

    try:
        reply = request(data, "digest", timeout=timeout)
        return reply["digest"], reply["seq"]
    except NodeNotRunning:
        with Store(data, readonly=True) as store:
            return digest(store)


def _seq_of(data: str, timeout: float) -> int:
    from journal.store import Store
    from replica.control import NodeNotRunning, request

    try:
        return request(data, "status", timeout=timeout)["last_seq"]
    except NodeNotRunning:
        with Store(data, readonly=True) as store:
            return store.last_seq
    except KeyError:
        return -1  # a standby still bootstrapping has no store yet


def cmd_digest(args: argparse.Namespace) -> int:
    from replica.control import ControlError

    try:
        value, seq = _digest_of(args.data, args.timeout)
    except ControlError as exc:
        log.error("%s", exc)
        return 1
    print(f"{value} seq={seq}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import time

    from journal.errors import StoreError
    from replica.control import ControlError

    if len(args.data) != 2:
        log.error("verify takes exactly two --data directories")
        return 2
    a, b = args.data
    deadline = time.monotonic() + args.deadline
    seqs: tuple[int, int] = (-1, -1)
    while True:
        try:
            seqs = (_seq_of(a, args.timeout), _seq_of(b, args.timeout))
            if seqs[0] == seqs[1] and seqs[0] >= 0:
                (da, sa), (db, sb) = _digest_of(a, args.timeout), _digest_of(b, args.timeout)
                if sa == sb:
                    if da == db:
                        print(f"match seq={sa} digest={da}")
                        return 0
                    print(f"MISMATCH at seq={sa}: {a} {da} != {b} {db}")
                    return 1
        except (ControlError, StoreError) as exc:
            log.warning("%s", exc)  # e.g. a standby still bootstrapping: wait
        if time.monotonic() >= deadline:
            print(f"TIMEOUT: {a} at seq {seqs[0]}, {b} at seq {seqs[1]} after {args.deadline}s")
            return 2
        time.sleep(0.2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mount.py", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def node_options(p: argparse.ArgumentParser) -> None:
        from journal.checkpoints import (
            DEFAULT_INTERVAL,
            DEFAULT_KEEP,
            DEFAULT_RETAIN_BYTES,
            DEFAULT_RETAIN_RECORDS,
        )

        p.add_argument("--data", required=True, metavar="DIR", help="the store's data directory")
        p.add_argument("--max-size", type=_size, default=None, metavar="SIZE",
                       help="the store's size limit, e.g. 10G (default: as stored, or 64G for a new store); "
                       "df shows it, and a full store answers ENOSPC")
        p.add_argument("--checkpoint-interval", type=float, default=DEFAULT_INTERVAL, metavar="SECONDS",
                       help="take a checkpoint this often when the journal has grown "
                       f"(default {DEFAULT_INTERVAL:.0f})")
        p.add_argument("--keep-checkpoints", type=int, default=DEFAULT_KEEP, metavar="N",
                       help=f"checkpoints kept in DIR/checkpoints (default {DEFAULT_KEEP})")
        p.add_argument("--retain-records", type=int, default=DEFAULT_RETAIN_RECORDS, metavar="N",
                       help="retention bound: never keep more journal records than this for a lagging "
                       f"standby (default {DEFAULT_RETAIN_RECORDS})")
        p.add_argument("--retain-bytes", type=_size, default=DEFAULT_RETAIN_BYTES, metavar="SIZE",
                       help=f"retention bound in bytes of journal (default {DEFAULT_RETAIN_BYTES >> 30}G)")

    p = verbs.add_parser("primary", help="run a primary: create the store if needed, mount it, replicate",
                         description="Run a primary in the foreground. Creates the store if DIR is "
                         "empty; unmounts and exits 0 on SIGTERM/SIGINT or fusermount -u. With --listen, "
                         "publishes its journal to standbys.")
    node_options(p)
    p.add_argument("--mount", required=True, metavar="MNT", help="the mountpoint (an existing directory)")
    p.add_argument("--group-commit", action=argparse.BooleanOptionalAction, default=False,
                   help="batch operations of concurrent FUSE threads in one transaction "
                   "(default off: measured slower, see README)")
    p.add_argument("--listen", metavar="tcp://HOST:PORT",
                   help="publish the journal stream here (without it: a single node)")
    p.add_argument("--control", metavar="tcp://HOST:PORT2",
                   help="the side channel standbys talk to (default: the --listen port + 1)")
    p.add_argument("--durability", choices=["async", "received", "durable"], default="async",
                   help="what fsync waits for: the local disk only (async), a standby having the records "
                   "(received), or a standby having synced them (durable); default async")
    p.add_argument("--sync-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long fsync waits for a standby's ack before --on-standby-loss applies "
                   "(default 5)")
    p.add_argument("--on-standby-loss", choices=["block", "degrade"], default="block",
                   help="when no standby acks in time: keep fsync waiting (block, default) or fall back to "
                   "async until a standby catches up (degrade)")
    p.set_defaults(func=cmd_primary)

    p = verbs.add_parser("standby", help="follow a primary, optionally with a read-only mount",
                         description="Follow a primary in the foreground: apply its journal to DIR (creating "
                         "the store from the primary if DIR is empty). Exits 0 on SIGTERM/SIGINT, "
                         "unmounting if mounted; exits 3 if the primary's journal cannot be followed.")
    node_options(p)
    p.add_argument("--primary", required=True, metavar="tcp://HOST:PORT",
                   help="the primary's --listen address")
    p.add_argument("--control", metavar="tcp://HOST:PORT2",
                   help="the primary's side channel (default: the --primary port + 1)")
    p.add_argument("--mount", metavar="MNT", help="also mount the state read-only here (writes: EROFS)")
    p.add_argument("--name", help="this standby's name in the primary's status (default: host:dir)")
    p.set_defaults(func=cmd_standby)

    p = verbs.add_parser("status", help="show a running node's role, seqs, lag, standbys, durability",
                         description="Ask the node running on DIR (through its control socket) for its "
                         "status. Exits 1 if no node runs there.")
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    p.set_defaults(func=cmd_status)

    p = verbs.add_parser("checkpoint", help="ask the running node for a checkpoint now",
                         description="Ask the node running on DIR to take a checkpoint now (and prune its "
                         "journal as far as retention allows); prints the checkpoint's seq and path.")
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    p.set_defaults(func=cmd_checkpoint)

    p = verbs.add_parser("fsck", help="check a store's invariants (not mounted)",
                         description="Check every invariant of a store; exits 1 on any violation.")
    p.add_argument("--data", required=True, metavar="DIR")
    p.set_defaults(func=cmd_fsck)

    p = verbs.add_parser("digest", help="print a digest of the filesystem state",
                         description="Print a SHA-256 digest of the filesystem state (not the journal) "
                         "and the seq it was taken at; equal states print equal digests. Asks the running "
                         "node if there is one, else reads the store.")
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")
    p.set_defaults(func=cmd_digest)

    p = verbs.add_parser("verify", help="wait until two nodes reach the same seq and compare digests",
                         description="Wait until the stores in both DIRs (running or not) are at the same "
                         "seq, then compare their digests. Exits 0 on a match, 1 on a mismatch, 2 if "
                         "they do not reach the same seq before the deadline.")
    p.add_argument("--data", required=True, metavar="DIR", action="append", help="give it twice")
    p.add_argument("--deadline", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for equal seqs (default 60)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long one request to a node may take")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from journal.errors import StoreError

    try:
        return args.func(args)
    except StoreError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
