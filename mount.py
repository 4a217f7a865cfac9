#!/usr/bin/env python3
"""tandemfs command line: run a primary or a standby, inspect and check a store.

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


def cmd_primary(args: argparse.Namespace) -> int:
    from fs.mounting import serve
    from fs.operations import TandemFS
    from journal.store import Store, is_store

    if not os.path.isdir(args.mount):
        log.error("mountpoint %s is not a directory", args.mount)
        return 2
    if is_store(args.data):
        store = Store(args.data, max_size=args.max_size, group_commit=args.group_commit)
    else:
        if os.path.isdir(args.data) and os.listdir(args.data):
            log.error("%s is neither empty nor a tandemfs store", args.data)
            return 2
        store = Store.create(args.data, max_size=args.max_size, group_commit=args.group_commit)
        log.info("created store %s (cluster %s)", args.data, store.cluster_id.hex())
    try:
        serve(TandemFS(store), args.mount)
    finally:
        store.close()
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


def cmd_digest(args: argparse.Namespace) -> int:
    from journal.check import digest
    from journal.store import Store

    with Store(args.data, readonly=True) as store:
        value, seq = digest(store)
    print(f"{value} seq={seq}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mount.py", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("primary", help="run a primary: create the store if needed and mount it",
                         description="Run a primary in the foreground. Creates the store if DIR is "
                         "empty; unmounts and exits 0 on SIGTERM/SIGINT or fusermount -u.")
    p.add_argument("--data", required=True, metavar="DIR", help="the store's data directory")
    p.add_argument("--mount", required=True, metavar="MNT", help="the mountpoint (an existing directory)")
    p.add_argument("--max-size", type=_size, default=None, metavar="SIZE",
                   help="the store's size limit, e.g. 10G (default: as stored, or 64G for a new store); "
                   "df shows it, and a full store answers ENOSPC")
    p.add_argument("--group-commit", action=argparse.BooleanOptionalAction, default=False,
                   help="batch operations of concurrent FUSE threads in one transaction "
                   "(default off: measured slower, see README)")
    p.set_defaults(func=cmd_primary)

    p = verbs.add_parser("fsck", help="check a store's invariants (not mounted)",
                         description="Check every invariant of a store; exits 1 on any violation.")
    p.add_argument("--data", required=True, metavar="DIR")
    p.set_defaults(func=cmd_fsck)

    p = verbs.add_parser("digest", help="print a digest of the filesystem state",
                         description="Print a SHA-256 digest of the filesystem state (not the journal) "
                         "and the seq it was taken at; equal states print equal digests.")
    p.add_argument("--data", required=True, metavar="DIR")
    p.set_defaults(func=cmd_digest)
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
