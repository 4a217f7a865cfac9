#!/usr/bin/env python3
"""tandemfs command line: run a primary or a standby, promote a standby, inspect,
checkpoint and compare nodes, make CURVE keys.

Every verb has --help. Logs go to stderr; results of inspecting verbs go to stdout.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

log = logging.getLogger("tandemfs")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


# --- argument types: a bad value is one line of usage error and exit 2 --------------------

#: The smallest --max-size: a store needs a few pages of LMDB metadata before any file.
MIN_STORE_SIZE = 1 << 20
#: The largest: LMDB maps the whole size into the address space (x86-64 gives a process
#: 128 TiB of it).
MAX_STORE_SIZE = 64 << 40


def _size_at_least(minimum: int, maximum: int = 1 << 62) -> Callable[[str], int]:
    def size(text: str) -> int:
        from journal.store import parse_size

        try:
            value = parse_size(text)
        except (ValueError, OverflowError) as exc:
            raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 64G)") from exc
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is too small: at least {minimum} bytes"
                                             + (f" ({minimum >> 20}M)" if minimum >= 1 << 20 else ""))
        if value > maximum:
            raise argparse.ArgumentTypeError(f"{text!r} is too large: at most {maximum >> 40}T")
        return value

    return size


_size = _size_at_least(0)


def _seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _count_at_least(minimum: int) -> Callable[[str], int]:
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is too small: at least {minimum}")
        return value

    return count


def _endpoint(bind: bool) -> Callable[[str], str]:
    """tcp://HOST:PORT with PORT in 1..65535. HOST to connect to is an IP address or a host
    name; HOST to bind is an address of this machine (or a name of one), or * for all."""

    def endpoint(text: str) -> str:
        import ipaddress
        import socket

        head, sep, port = text.rpartition(":")
        if not text.startswith("tcp://") or not sep or not port.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is not tcp://HOST:PORT")
        if not 1 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"port {port} of {text!r} is not in 1..65535")
        host = head.removeprefix("tcp://")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if host == "*" and bind:
            return text
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
            labels = host.split(".")
            if not host or len(host) > 253 or host.replace(".", "").isdigit() or not all(
                    label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
                    and not label.startswith("-") for label in labels):
                raise argparse.ArgumentTypeError(f"{host!r} in {text!r} is not an IP address or a host name"
                                                 ) from None
        if not bind:
            return text
        try:
            infos = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))] if literal \
                else [(family, info[0]) for family, _, _, _, info in socket.getaddrinfo(
                    host, None, type=socket.SOCK_STREAM)]
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"{host!r} in {text!r} does not resolve: {exc.strerror}"
                                             ) from None
        for family, address in infos:
            try:
                with socket.socket(family, socket.SOCK_STREAM) as probe:
                    probe.bind((address, 0))
                return text
            except OSError:
                continue
        raise argparse.ArgumentTypeError(f"{host!r} in {text!r} is not an address of this machine")

    return endpoint


def _node_name(text: str) -> str:
    """A node's name as the wire carries it: 1 to 64 bytes of UTF-8."""
    from replica.protocol import MAX_NAME

    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not UTF-8") from None
    if not 1 <= size <= MAX_NAME:
        raise argparse.ArgumentTypeError(f"a node's name is 1 to {MAX_NAME} bytes, not {size}")
    return text


def _data_dir(must_exist: bool, parent_must_exist: bool = False) -> Callable[[str], str]:
    """--data: a directory; one that need not exist yet must not be a file, and where a verb
    creates it, its parent must exist (a typo in a path is an error, not a new tree)."""

    def data(text: str) -> str:
        path = os.path.abspath(text)
        if os.path.isdir(path):
            return text
        if os.path.exists(path):
            raise argparse.ArgumentTypeError(f"{text} is not a directory")
        if must_exist:
            raise argparse.ArgumentTypeError(f"{text} does not exist")
        if parent_must_exist and not os.path.isdir(os.path.dirname(path)):
            raise argparse.ArgumentTypeError(f"{text}: its parent directory {os.path.dirname(path)} does "
                                             "not exist")
        return text

    return data


def _config(args: argparse.Namespace, **extra: object):
    from pathlib import Path

    from journal.checkpoints import RetentionPolicy
    from replica.node import NodeConfig

    return NodeConfig(
        data=Path(args.data), mount=args.mount, max_size=args.max_size, control=args.control,
        retention=RetentionPolicy(args.retain_records, args.retain_bytes, args.tail_records, args.tail_bytes),
        checkpoint_interval=args.checkpoint_interval, keep_checkpoints=args.keep_checkpoints, **extra)


def _curve(args: argparse.Namespace, role: str):
    """The node's CURVE keys: per-node keys from --curve-*, else the cluster key from the
    cluster secret (--secret; a primary creates it if there is none); None with --insecure,
    or for a primary that does not replicate. Raises SecurityError."""
    from replica.security import DEFAULT_SECRET, SecurityError, cluster_keys, load

    secret, peers, server = args.curve_secret, args.curve_peers, args.curve_server
    if secret is None:
        if peers or server:
            raise SecurityError("--curve-peers and --curve-server need --curve-secret (this node's "
                                "NAME.key_secret, made by mount.py keygen)")
        if args.insecure:
            if args.secret:
                raise SecurityError("--secret and --insecure contradict each other: give one of them")
            return None
        if role == "primary" and not args.listen:
            return None  # a single node: no replication traffic to protect
        return cluster_keys(args.secret or DEFAULT_SECRET, create=role == "primary")
    if args.secret:
        raise SecurityError("--secret and --curve-secret are two ways of keying a node: give one of them")
    if role == "primary" and server:
        raise SecurityError("--curve-server names the primary a standby follows; a primary has none (its "
                            "--peer probes use the keys in --curve-peers)")
    if role == "standby" and server is None:
        raise SecurityError("a standby with CURVE keys needs --curve-server FILE: the public key (NAME.key) "
                            "of the primary it follows")
    curve = load(secret, peers, server)
    if role == "primary" and not args.listen:
        log.warning("--curve-* without --listen: this primary does not replicate, the keys are not used")
    if role == "standby" and peers is None:
        log.warning("no --curve-peers: this standby cannot be promoted in place (a promoted node serves "
                    "with CURVE and must know whose keys to admit)")
    return curve


def _mountpoint_ready(mountpoint: str) -> bool:
    """Whether a node may mount on `mountpoint` (a dead mount of a killed node is cleared
    first); says why not in one line."""
    from fs.mounting import MountpointError, prepare_mountpoint

    try:
        prepare_mountpoint(mountpoint)
    except MountpointError as exc:
        log.error("%s", exc)
        return False
    return True


def cmd_keygen(args: argparse.Namespace) -> int:
    from replica.security import SecurityError, keygen

    try:
        public, secret = keygen(args.dir, args.name)
    except (SecurityError, OSError) as exc:
        log.error("%s", exc)
        return 2
    print(f"public: {public}")
    print(f"secret: {secret}")
    return 0


def cmd_primary(args: argparse.Namespace) -> int:
    from replica.control import DataDirBusy
    from replica.node import WrongRole, run_primary
    from replica.primary import Durability, OnStandbyLoss
    from replica.security import SecurityError

    if not _mountpoint_ready(args.mount):
        return 2
    try:
        config = _config(args, group_commit=args.group_commit, listen=args.listen,
                         durability=Durability(args.durability), sync_timeout=args.sync_timeout,
                         on_standby_loss=OnStandbyLoss(args.on_standby_loss), peers=args.peer or [],
                         name=args.name or "", curve=_curve(args, "primary"), insecure=args.insecure)
        return run_primary(config)
    except (DataDirBusy, WrongRole, SecurityError) as exc:
        log.error("%s", exc)
        return 2


def cmd_standby(args: argparse.Namespace) -> int:
    from replica.control import DataDirBusy
    from replica.node import run_standby
    from replica.primary import Durability, OnStandbyLoss
    from replica.security import SecurityError

    if args.auto_promote_after is not None and not args.mount:
        log.error("--auto-promote-after needs --mount (a promoted node serves the filesystem through its "
                  "mount)")
        return 2
    if args.mount and not _mountpoint_ready(args.mount):
        return 2
    try:
        curve = _curve(args, "standby")
        if curve is not None and not curve.can_serve() and args.auto_promote_after is not None:
            raise SecurityError("--auto-promote-after with CURVE keys needs --curve-peers: a promoted node "
                                "serves with CURVE and must know whose keys to admit")
        config = _config(args, primary=args.primary, name=args.name or "", listen=args.listen,
                         durability=Durability(args.durability) if args.durability else None,
                         sync_timeout=args.sync_timeout, on_standby_loss=OnStandbyLoss(args.on_standby_loss),
                         peers=args.peer or [], auto_promote_after=args.auto_promote_after, curve=curve,
                         insecure=args.insecure)
        return run_standby(config)
    except (DataDirBusy, SecurityError) as exc:
        log.error("%s", exc)
        return 2


def _print_takeover(takeover: dict) -> None:
    how = ("automatically, " if takeover["auto"] else "") + ("forced, " if takeover["forced"] else "")
    print(f"promoted ({how}epoch {takeover['epoch']}): took over at seq {takeover['took_over_at']}; "
          f"epoch {takeover['epoch']} begins at seq {takeover['seq']}")
    print(f"may lack: {takeover['lacks']} record(s) of the {takeover['announced']} the old primary "
          "announced, and any it committed after its last heartbeat (none of those was acknowledged by an "
          "fsync if it waited for this node's durable acks)")
    print(f"serving: {takeover['listen']} (side channel {takeover['control']}), durability "
          f"{takeover['durability']}, on standby loss {takeover['on_standby_loss']}; "
          f"mount {takeover['mount']}"
          + (f"; fencing peers {', '.join(takeover['peers'])}" if takeover["peers"] else ""))
    sys.stdout.flush()


def cmd_promote(args: argparse.Namespace) -> int:
    import json

    from replica.control import ControlError, DataDirBusy, NodeNotRunning, node_running, request
    from replica.node import run_primary
    from replica.primary import Durability, OnStandbyLoss
    from replica.promotion import PromoteRequest, PromotionRefused
    from replica.security import SecurityError

    wanted = PromoteRequest(
        force=args.force, listen=args.listen, control=args.control, mount=args.mount,
        durability=Durability(args.durability) if args.durability else None, sync_timeout=args.sync_timeout,
        on_standby_loss=OnStandbyLoss(args.on_standby_loss) if args.on_standby_loss else None,
        peers=args.peer or [])
    if node_running(args.data):
        given = [option for option, value in (("--secret", args.secret),
                                              ("--curve-secret", args.curve_secret),
                                              ("--curve-peers", args.curve_peers),
                                              ("--curve-server", args.curve_server),
                                              ("--insecure", args.insecure)) if value]
        if given:
            log.error("%s: a running standby is promoted with the keys it was started with; these options "
                      "apply only when no node runs on %s", ", ".join(given), args.data)
            return 2
        try:
            reply = request(args.data, "promote", timeout=args.timeout, **wanted.to_control())
        except (NodeNotRunning, ControlError) as exc:
            log.error("%s", exc)
            return 2
        if not reply.get("promoted"):
            log.error("promotion refused: %s", reply.get("refused"))
            return 1
        reply.pop("ok", None)
        if args.json:
            print(json.dumps(reply, sort_keys=True))
        else:
            _print_takeover(reply)
        return 0
    if not args.mount:
        log.error("no node runs on %s: give --mount MNT to start its data as the new primary", args.data)
        return 2
    if not _mountpoint_ready(args.mount):  # (a running node checks the mountpoint it is given itself)
        return 2

    def promoted(takeover: object) -> None:
        values = takeover.as_dict()  # type: ignore[attr-defined]
        if args.json:
            print(json.dumps(values, sort_keys=True), flush=True)
        else:
            _print_takeover(values)

    try:
        config = _config(args, sync_timeout=args.sync_timeout or 5.0, durability=None,
                         on_standby_loss=OnStandbyLoss(args.on_standby_loss or "block"), name=args.name or "",
                         curve=_curve(args, "promote"), insecure=args.insecure)
        return run_primary(config, takeover=wanted, on_promoted=promoted)
    except PromotionRefused as exc:
        log.error("promotion refused: %s", exc)
        return 1
    except (DataDirBusy, SecurityError) as exc:
        log.error("%s", exc)
        return 2


def cmd_inspect(args: argparse.Namespace) -> int:
    from fs.mounting import serve
    from fs.operations import TandemFS
    from journal.store import Store, is_store

    if not _mountpoint_ready(args.mount):
        return 2
    if not is_store(args.data):
        log.error("%s holds no store", args.data)
        return 2
    with Store(args.data, readonly=True) as store:
        serve(TandemFS(store), args.mount, read_only=True)
    return 0


def _print_status(status: dict) -> None:
    def line(label: str, value: object) -> None:
        print(f"{label:<22} {value}")

    line("role", status["role"])
    if status.get("fatal"):
        line("FATAL", status["fatal"])
    if status.get("fenced"):
        line("FENCED", status["fenced"])
    for key in ("cluster_id", "epoch", "last_seq", "applied_seq"):
        if key in status:
            line(key.replace("_", " "), status[key])
    if status.get("epoch_history"):
        line("epoch history", ", ".join(f"epoch {e} from seq {s}" for e, s in status["epoch_history"]))
    takeover = status.get("takeover")
    if takeover:
        line("promoted", f"{'automatically ' if takeover['auto'] else ''}to epoch {takeover['epoch']} "
             f"at seq {takeover['seq']} (took over after seq {takeover['took_over_at']}, lacking "
             f"{takeover['lacks']} announced record(s))")
    if status.get("read_only"):
        line("read-only", status["read_only"])
    integrity = status.get("integrity")
    if integrity:
        damaged = integrity["damaged_found"]
        line("DAMAGE" if integrity["unrepaired"] else "integrity",
             f"{damaged} damaged value(s) found, {integrity['repaired']} repaired, {integrity['unrepaired']} "
             "not repaired (never served)" if damaged else "no damage found")
        for case in integrity["recent"]:
            line("  damaged", f"{case['where']}: {case['problem']}"
                 + (" (repaired)" if case["repaired"] else ""))
    scrub = status.get("scrub")
    if scrub:
        line("scrub", scrub["summary"])
    security = status.get("security")
    if security and (status["role"] == "standby" or status.get("replication")):
        line("security", _describe_security(security, status["role"]))
        refused = security.get("refused_keys") or {}
        where = (f"not in {security.get('peers_dir')}" if security.get("peers_dir")
                 else "without the cluster secret")
        for key, count in sorted(refused.items()):
            line("REFUSED key", f"{key} ({count} handshake(s); {where})")
        shown = sum(refused.values())
        if security.get("refused_handshakes", 0) > shown:
            line("REFUSED in all", f"{security['refused_handshakes']} handshake(s), of other keys as well")
    if status.get("problem"):
        line("PROBLEM", status["problem"])
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
            known = replication.get("known_standbys") or {}
            if known:  # including standbys away now (e.g. since this primary restarted)
                line("journal kept for", ", ".join(f"{name} (from seq {seq + 1})"
                                                   for name, seq in sorted(known.items())))
            if replication.get("peer_watch"):
                watch = replication["peer_watch"]
                line("fencing peers", f"{', '.join(watch['addresses'])} ({watch['answers']} answers)")
            for name, peer in (replication.get("peers") or {}).items():
                line(f"peer {name}", f"primary of epoch {peer['epoch']} at seq {peer['last_seq']}"
                     + (" (fenced)" if peer["fenced"] else ""))
    standby = status.get("standby")
    if standby:
        line("following", f"{standby['primary']} ({standby['state']}, epoch {standby['primary_epoch']})")
        line("lag", f"{standby['lag_records']} records, {standby['lag_seconds']}s "
             f"(primary at {standby['primary_last_seq']})")
        age = standby["heartbeat_age_seconds"]
        line("heartbeat age", ("none received" if age is None else f"{age}s")
             + (f" (auto-promote after {status['auto_promote_after']}s)" if status.get("auto_promote_after")
                else ""))
        if standby.get("divergence"):
            div = standby["divergence"]
            line("divergent records", f"{div['records']} (seqs {div['from_seq']}..{div['to_seq']}) "
                 f"exported to {div['directory']}")
        line("repairs", f"{standby['fetches']} fetches ({standby['fetched_records']} records), "
             f"{standby['snapshots']} snapshots")
        if standby.get("snapshot"):
            snap = standby["snapshot"]
            line("snapshot", f"{snap['snap_id']}: {snap['received']} of {snap['size']} bytes")
        if standby.get("error"):
            line("STOPPED FOLLOWING" if standby["state"] == "failed" else "error", standby["error"])
    line("dropped messages", ", ".join(f"{k}={v}" for k, v in sorted(status["dropped"].items())) or "none")


def _describe_security(security: dict, role: str) -> str:
    if security.get("mechanism") != "curve":
        return "NONE: replication traffic is not authenticated or encrypted" + (
            " (--insecure)" if security.get("insecure") else "")
    parts = [f"CURVE, this node's public key {security['public_key']}"]
    if security.get("server_key"):
        parts.append(("primary's key " if role == "standby" else "old primary's key (fencing probe) ")
                     + security["server_key"])
    if security.get("secret_file"):
        parts.append(f"the cluster key of {security['secret_file']}")
    if security.get("peers_dir"):
        admitted = security.get("admitted_keys")
        parts.append(f"admitting {'the' if admitted is None else admitted} key(s) in {security['peers_dir']}")
    return "; ".join(parts)


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


def cmd_forget(args: argparse.Namespace) -> int:
    from replica.control import ControlError, NodeNotRunning, request

    try:
        reply = request(args.data, "forget", timeout=args.timeout, standby=args.standby)
    except (NodeNotRunning, ControlError) as exc:
        log.error("%s", exc)
        return 1
    if not reply.get("forgotten"):
        log.error("%s", reply.get("refused") or f"no standby {args.standby!r} is known")
        return 1
    print(f"forgot standby {args.standby}: the journal is no longer kept for it")
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


def cmd_upgrade(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import lmdb

    from journal.checkpoints import CHECKPOINT_DIR
    from journal.errors import StoreError
    from journal.store import is_store
    from journal.upgrade import upgrade
    from replica.control import DataDirBusy, NodeLock
    from replica.standby import INCOMING

    data = Path(args.data)
    if not is_store(data):
        log.error("%s holds no store", data)
        return 2
    try:
        lock = NodeLock(data)
    except DataDirBusy:
        log.error("a node runs on %s: stop it first", data)
        return 2
    try:
        print(upgrade(data))
        # Checkpoints are stores too (the snapshots standbys bootstrap from).
        for checkpoint in sorted((data / CHECKPOINT_DIR).glob("*/data.mdb")):
            print(upgrade(checkpoint.parent))
        incoming = data / INCOMING
        if incoming.exists():
            # A snapshot half downloaded in the old format: the next one is fetched afresh.
            shutil.rmtree(incoming)
            print(f"{incoming}: removed a partly downloaded snapshot")
    except (StoreError, lmdb.Error) as exc:
        log.error("upgrade of %s stopped (run it again to go on): %s", data, exc)
        return 1
    finally:
        lock.release()
    return 0


class _ProgressLine:
    """Progress of a long operation: a line redrawn in place on a terminal, a log line
    every few seconds otherwise."""

    def __init__(self, what: str) -> None:
        import time

        self.what = what
        self.tty = sys.stderr.isatty()
        self._clock = time.monotonic
        self._last = 0.0

    def show(self, fraction: float, text: str) -> None:
        now = self._clock()
        if self.tty:
            width = 30
            filled = int(fraction * width)
            sys.stderr.write(f"\r{self.what} [{'#' * filled}{'.' * (width - filled)}] {text[:120]}\x1b[K")
            sys.stderr.flush()
        elif now - self._last >= 5:
            self._last = now
            log.info("%s: %s", self.what, text)

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def cmd_scrub(args: argparse.Namespace) -> int:
    import time

    from journal.scrub import scrub
    from journal.store import Store
    from replica.control import ControlError, NodeNotRunning, request

    line = _ProgressLine(f"scrub {args.data}")
    try:
        progress = request(args.data, "scrub", timeout=args.timeout, start=True)
        while not progress["finished"]:
            line.show(progress["fraction"], progress["summary"])
            time.sleep(0.5)
            progress = request(args.data, "scrub", timeout=args.timeout)
        line.done()
        summary, unrepaired, remaining = progress["summary"], progress["unrepaired"], \
            progress["damaged"] - progress["repaired"]
        error = progress["error"]
    except NodeNotRunning:
        # A stopped store: checked in this process, with no peer to repair from.
        with Store(args.data, readonly=True) as store:
            result = scrub(store, on_progress=lambda p: line.show(p.fraction, p.summary()))
        line.done()
        summary, unrepaired, remaining, error = result.summary(), result.unrepaired, result.remaining, \
            result.error
        if remaining:
            print("(the node is not running: nothing could be repaired; start it with its standby "
                  "attached and scrub again)")
    except ControlError as exc:
        line.done()
        log.error("%s", exc)
        return 1
    for problem in unrepaired:
        print(f"damaged: {problem}")
    print(f"{args.data}: scrub {summary}")
    return 1 if remaining or error else 0


def _digest_of(data: str, timeout: float):
    """The StateDigest of the store in `data`: through its node if one runs, else offline."""
    from journal.check import StateDigest, digest
    from journal.store import Store
    from replica.control import NodeNotRunning, request

    try:
        reply = request(data, "digest", timeout=timeout)
        return StateDigest(reply["digest"], reply["seq"], reply["epoch"])
    except NodeNotRunning:
        with Store(data, readonly=True) as store:
            return digest(store)


def _position_of(data: str, timeout: float) -> tuple[int, int]:
    """(last seq, the epoch of that record) of the store in `data`; (-1, 0) if it has none yet."""
    from journal.schema import epoch_at
    from journal.store import Store
    from replica.control import NodeNotRunning, request

    try:
        status = request(data, "status", timeout=timeout)
        return status["last_seq"], epoch_at(status["epoch_history"], status["last_seq"])
    except NodeNotRunning:
        with Store(data, readonly=True) as store:
            return store.last_seq, epoch_at(store.epoch_history, store.last_seq)
    except KeyError:
        return -1, 0  # a standby still bootstrapping has no store yet


def cmd_digest(args: argparse.Namespace) -> int:
    from replica.control import ControlError

    try:
        value, seq, epoch = _digest_of(args.data, args.timeout)
    except ControlError as exc:
        log.error("%s", exc)
        return 1
    print(f"{value} seq={seq} epoch={epoch}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import time

    from journal.errors import StoreDamaged, StoreError
    from replica.control import ControlError

    if len(args.data) != 2:
        log.error("verify takes exactly two --data directories")
        return 2
    a, b = args.data
    deadline = time.monotonic() + args.deadline
    # Equal seqs mean the same history only in the same epoch: an old primary rejoining
    # may sit at the new primary's seq with records of its own until it is rebuilt.
    positions: tuple[tuple[int, int], tuple[int, int]] = ((-1, 0), (-1, 0))
    while True:
        try:
            positions = (_position_of(a, args.timeout), _position_of(b, args.timeout))
            if positions[0] == positions[1] and positions[0][0] >= 0:
                da, db = _digest_of(a, args.timeout), _digest_of(b, args.timeout)
                if (da.seq, da.epoch) == (db.seq, db.epoch):
                    if da.value == db.value:
                        print(f"match seq={da.seq} epoch={da.epoch} digest={da.value}")
                        return 0
                    print(f"MISMATCH at seq={da.seq} epoch={da.epoch}: {a} {da.value} != {b} {db.value}")
                    return 1
        except StoreDamaged:
            raise  # waiting does not mend a damaged store
        except (ControlError, StoreError) as exc:
            log.warning("%s", exc)  # e.g. a standby still bootstrapping: wait
        if time.monotonic() >= deadline:
            print(f"TIMEOUT: {a} at seq {positions[0][0]} (epoch {positions[0][1]}), {b} at seq "
                  f"{positions[1][0]} (epoch {positions[1][1]}) after {args.deadline}s")
            return 2
        time.sleep(0.2)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (`mount.py VERB: error: ...`, exit 2): the usage text of a
    verb runs to a dozen lines and would bury the error; --help shows it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mount.py", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def node_options(p: argparse.ArgumentParser, must_exist: bool = False) -> None:
        from journal.checkpoints import (
            DEFAULT_INTERVAL,
            DEFAULT_KEEP,
            DEFAULT_RETAIN_BYTES,
            DEFAULT_RETAIN_RECORDS,
            DEFAULT_TAIL_BYTES,
            DEFAULT_TAIL_RECORDS,
        )

        p.add_argument("--data", required=True, metavar="DIR", help="the store's data directory",
                       type=_data_dir(must_exist=must_exist, parent_must_exist=True))
        p.add_argument("--max-size", type=_size_at_least(MIN_STORE_SIZE, MAX_STORE_SIZE), default=None,
                       metavar="SIZE",
                       help="the store's size limit, e.g. 10G (default: as stored, or 64G for a new store); "
                       "the disk under DIR bounds it too; df shows the smaller, and a full store answers "
                       "ENOSPC")
        p.add_argument("--checkpoint-interval", type=_seconds, default=DEFAULT_INTERVAL, metavar="SECONDS",
                       help="take a checkpoint this often when the journal has grown "
                       f"(default {DEFAULT_INTERVAL:.0f})")
        p.add_argument("--keep-checkpoints", type=_count_at_least(1), default=DEFAULT_KEEP, metavar="N",
                       help=f"checkpoints kept in DIR/checkpoints (default {DEFAULT_KEEP})")
        p.add_argument("--retain-records", type=_count_at_least(0), default=DEFAULT_RETAIN_RECORDS,
                       metavar="N",
                       help="retention bound: never keep more journal records than this for a lagging "
                       f"standby (default {DEFAULT_RETAIN_RECORDS})")
        p.add_argument("--retain-bytes", type=_size, default=DEFAULT_RETAIN_BYTES, metavar="SIZE",
                       help="retention bound in bytes of journal (default "
                       f"{DEFAULT_RETAIN_BYTES >> 30}G, at most a quarter of the store's size)")
        p.add_argument("--tail-records", type=_count_at_least(0), default=DEFAULT_TAIL_RECORDS, metavar="N",
                       help="journal records kept when no standby needs them, for one that reconnects "
                       f"(default {DEFAULT_TAIL_RECORDS})")
        p.add_argument("--tail-bytes", type=_size, default=DEFAULT_TAIL_BYTES, metavar="SIZE",
                       help=f"...and at most this many bytes of them (default {DEFAULT_TAIL_BYTES >> 20}M, "
                       "at most a sixteenth of the store's size)")

    def curve_options(p: argparse.ArgumentParser, role: str) -> None:
        from replica.security import DEFAULT_SECRET

        serving = {"primary": "", "standby": "once promoted, ", "promote": ""}[role]
        made = {"primary": "created (mode 0600) if it does not exist",
                "standby": "never created here: copy the primary's", "promote": "copy the primary's"}[role]
        p.add_argument("--secret", metavar="FILE",
                       help=f"the cluster secret (default {DEFAULT_SECRET}; {made}): every node of the "
                       "cluster derives the same CURVE keys from it, so all replication traffic is "
                       "authenticated and encrypted, and whoever cannot read this file can neither read "
                       "the stream nor join. Copy it to every machine of the cluster")
        p.add_argument("--curve-secret", metavar="FILE",
                       help="instead of --secret, per-node keys: this node's NAME.key_secret (mount.py "
                       "keygen)")
        p.add_argument("--curve-peers", metavar="DIR",
                       help=f"{serving}admit only the nodes whose public keys (NAME.key) are in DIR; give "
                       "every node the same directory holding every node's public key"
                       + (" (required to be promoted in place)" if role == "standby" else ""))
        if role == "standby":
            p.add_argument("--curve-server", metavar="FILE",
                           help="the public key (NAME.key) of the primary this standby follows (required "
                           "with --curve-secret); once promoted, it also probes that primary with it")
        elif role == "promote":
            p.add_argument("--curve-server", metavar="FILE",
                           help="the public key (NAME.key) of the primary this node followed, for the "
                           "fencing probe of it (default: try the keys in --curve-peers)")
        else:
            p.set_defaults(curve_server=None)
        p.add_argument("--insecure", action="store_true",
                       help="replicate in the clear, without a cluster secret or keys: anyone who can reach "
                       "the ports (on loopback: any local user) can read the journal and send well-formed "
                       "messages")

    def promotion_options(p: argparse.ArgumentParser, standby: bool) -> None:
        once = "once promoted: " if standby else ""
        p.add_argument("--listen", metavar="tcp://HOST:PORT", type=_endpoint(bind=True),
                       help=f"{once}publish the stream here, side channel on PORT+1 (default: the ports the "
                       "old primary used, on this machine's address towards it; on one machine, the same "
                       "address)")
        p.add_argument("--durability", choices=["async", "received", "durable"], default=None,
                       help=f"{once}what fsync waits for (default: what the old primary announced)")
        p.add_argument("--sync-timeout", type=_seconds, default=5.0 if standby else None, metavar="SECONDS",
                       help=f"{once}how long fsync waits for a standby's ack (default 5)")
        p.add_argument("--on-standby-loss", choices=["block", "degrade"],
                       default="block" if standby else None,
                       help=f"{once}when no standby acks in time: block (default) or degrade to async")
        p.add_argument("--peer", action="append", metavar="tcp://HOST:PORT", type=_endpoint(bind=False),
                       help=f"{once}another node's stream address to exchange epochs with (repeatable; the "
                       "old primary's side channel is always included)")

    p = verbs.add_parser("primary", help="run a primary: create the store if needed, mount it, replicate",
                         description="Run a primary in the foreground. Creates the store if DIR is "
                         "empty; unmounts and exits 0 on SIGTERM/SIGINT or fusermount -u. With --listen, "
                         "publishes its journal to standbys.")
    node_options(p)
    p.add_argument("--mount", required=True, metavar="MNT", help="the mountpoint (an existing directory)")
    p.add_argument("--group-commit", action=argparse.BooleanOptionalAction, default=False,
                   help="batch operations of concurrent FUSE threads in one transaction "
                   "(default off: measured slower, see docs/benchmarks.md)")
    p.add_argument("--listen", metavar="tcp://HOST:PORT", type=_endpoint(bind=True),
                   help="publish the journal stream here (without it: a single node)")
    p.add_argument("--control", metavar="tcp://HOST:PORT2", type=_endpoint(bind=True),
                   help="the side channel standbys talk to (default: the --listen port + 1)")
    p.add_argument("--durability", choices=["async", "received", "durable"], default="async",
                   help="what fsync waits for: the local disk only (async), a standby having the records "
                   "(received), or a standby having synced them (durable); default async")
    p.add_argument("--sync-timeout", type=_seconds, default=5.0, metavar="SECONDS",
                   help="how long fsync waits for a standby's ack before --on-standby-loss applies "
                   "(default 5)")
    p.add_argument("--on-standby-loss", choices=["block", "degrade"], default="block",
                   help="when no standby acks in time: keep fsync waiting (block, default) or fall back to "
                   "async until a standby catches up (degrade)")
    p.add_argument("--peer", action="append", metavar="tcp://HOST:PORT", type=_endpoint(bind=False),
                   help="another node's stream address (repeatable): this primary tells it its epoch and "
                   "learns its (PEER, on that node's side channel PORT+1), so that of two primaries the one "
                   "of the older epoch is fenced as soon as they can reach each other")
    p.add_argument("--name", type=_node_name,
                   help="this node's name in other nodes' status (default: host:dir)")
    curve_options(p, "primary")
    p.set_defaults(func=cmd_primary)

    p = verbs.add_parser("standby", help="follow a primary, optionally with a read-only mount",
                         description="Follow a primary in the foreground: apply its journal to DIR (creating "
                         "the store from the primary if DIR is empty). Exits 0 on SIGTERM/SIGINT, "
                         "unmounting if mounted; exits 3 if the primary's journal cannot be followed.")
    node_options(p)
    p.add_argument("--primary", required=True, metavar="tcp://HOST:PORT", type=_endpoint(bind=False),
                   help="the primary's --listen address")
    p.add_argument("--control", metavar="tcp://HOST:PORT2", type=_endpoint(bind=False),
                   help="the primary's side channel (default: the --primary port + 1)")
    p.add_argument("--mount", metavar="MNT", help="also mount the state read-only here (writes: EROFS)")
    p.add_argument("--name", type=_node_name,
                   help="this standby's name in the primary's status (default: host:dir)")
    promotion_options(p, standby=True)
    p.add_argument("--auto-promote-after", type=_seconds, metavar="SECONDS",
                   help="promote this standby on its own after SECONDS without a heartbeat from the primary "
                   "(only if it had been following and holds every record the primary announced; needs "
                   "--mount). Off by default. WARNING: with two machines and no third party, a network "
                   "partition then leaves BOTH nodes primary (split brain) until the partition heals and "
                   "fencing deposes the old one; writes the old one took meanwhile become divergent "
                   "records. Use it only where that is acceptable")
    curve_options(p, "standby")
    p.set_defaults(func=cmd_standby)

    p = verbs.add_parser(
        "promote", help="make a standby the primary of a new epoch (running: in place; stopped: start it)",
        description="Promote the standby on DIR. If it runs, it stops following (after applying what it "
        "received), takes epoch = highest seen + 1 (journaled as a BeginEpoch record), serves the stream "
        "and side channel, and its read-only mount turns writable in place (or MNT is mounted). If no node "
        "runs on DIR, its data is started as the new primary in the foreground, mounted on MNT (like "
        "`primary`). Refuses an empty node, and one known to be behind the last seq its primary announced, "
        "unless --force. Prints the seq it took over at and how many records it may lack. Exits 0 when "
        "promoted, 1 when refused, 2 on other errors.")
    node_options(p, must_exist=True)
    p.add_argument("--mount", metavar="MNT", help="mount here read-write (required if no node runs on DIR; "
                   "for a running standby without a mount)")
    p.add_argument("--force", action="store_true",
                   help="promote even a node known to be behind (its missing records are lost to the "
                   "cluster), or the data of a node that was last a primary")
    p.add_argument("--control", metavar="tcp://HOST:PORT2", type=_endpoint(bind=True),
                   help="the side channel to serve (default: the old primary's side-channel port on the same "
                   "host as --listen, or --listen's port + 1)")
    promotion_options(p, standby=False)
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.add_argument("--name", type=_node_name, help="a stopped node's name once it runs (default: host:dir)")
    p.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                   help="how long to wait for a running node's answer (default 60)")
    curve_options(p, "promote")
    p.set_defaults(func=cmd_promote)

    p = verbs.add_parser("keygen", help="make a CURVE keypair for one node",
                         description="Write KEYDIR/NAME.key (the public key: copy it into the --curve-peers "
                         "directory of every node, and give it to standbys of this node as --curve-server) "
                         "and KEYDIR/NAME.key_secret (the secret key, mode 0600: it stays on this node, "
                         "--curve-secret). Prints both paths. Never replaces existing files.")
    p.add_argument("--dir", required=True, metavar="KEYDIR", help="where to write the two files (created)")
    p.add_argument("--name", required=True, metavar="NAME", help="the node's name, e.g. its host name")
    p.set_defaults(func=cmd_keygen)

    p = verbs.add_parser("inspect", help="mount a store read-only, without replication",
                         description="Mount the store in DIR read-only (kernel ro, writes EROFS), with no "
                         "replication and no control socket: to look into the state/ a rejoin kept beside "
                         "its divergent records, or into a checkpoint. Ends on SIGTERM/SIGINT or unmount.")
    p.add_argument("--data", required=True, metavar="DIR", type=_data_dir(must_exist=True))
    p.add_argument("--mount", required=True, metavar="MNT")
    p.set_defaults(func=cmd_inspect)

    p = verbs.add_parser("status", help="show a running node's role, seqs, lag, standbys, durability",
                         description="Ask the node running on DIR (through its control socket) for its "
                         "status. Exits 1 if no node runs there.")
    p.add_argument("--data", required=True, metavar="DIR", type=_data_dir(must_exist=False))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS")
    p.set_defaults(func=cmd_status)

    p = verbs.add_parser("checkpoint", help="ask the running node for a checkpoint now",
                         description="Ask the node running on DIR to take a checkpoint now (and prune its "
                         "journal as far as retention allows); prints the checkpoint's seq and path.")
    p.add_argument("--data", required=True, metavar="DIR", type=_data_dir(must_exist=False))
    p.add_argument("--timeout", type=_seconds, default=600.0, metavar="SECONDS")
    p.set_defaults(func=cmd_checkpoint)

    p = verbs.add_parser("forget", help="stop keeping the journal for a standby that is gone",
                         description="Tell the primary running on DIR to stop keeping its journal for "
                         "the standby NAME (as `status` lists it under 'journal kept for'), e.g. one "
                         "taken out of service. If that standby comes back, it says hello again and is "
                         "known again; if the journal it needs is gone by then, it bootstraps from a "
                         "snapshot.")
    p.add_argument("--data", required=True, metavar="DIR", type=_data_dir(must_exist=False))
    p.add_argument("--standby", required=True, metavar="NAME", type=_node_name)
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS")
    p.set_defaults(func=cmd_forget)

    p = verbs.add_parser("fsck", help="check a store's invariants (not mounted)",
                         description="Check every invariant of a store; exits 1 on any violation.")
    p.add_argument("--data", required=True, metavar="DIR", type=_data_dir(must_exist=True))
    p.set_defaults(func=cmd_fsck)

    p = verbs.add_parser("upgrade", help="bring a store written by an older tandemfs to this format",
                         description="Upgrade, in place, the store in DIR (and its checkpoints) to this "
                         "version's format. The node must be stopped; upgrade every node of a cluster "
                         "before starting any. An interrupted upgrade goes on where it stopped when run "
                         "again; on a store already at this format it does nothing.")
    p.add_argument("--data", required=True, metavar="DIR", type=_data_dir(must_exist=True))
    p.set_defaults(func=cmd_upgrade)

    p = verbs.add_parser("scrub", help="verify every value and record of a store, repair what is damaged",
                         description="Read and verify every value and journal record of the store in DIR "
                         "against its checksum. Through the running node if there is one: a damaged value "
                         "is repaired from its peer (a standby, or the primary) when the peer has it. A "
                         "stopped store is only checked. Shows progress, prints a summary; exits 1 if "
                         "damage remains.")
    p.add_argument("--data", required=True, metavar="DIR", type=_data_dir(must_exist=True))
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="how long one request to the running node may take (default 10)")
    p.set_defaults(func=cmd_scrub)

    p = verbs.add_parser("digest", help="print a digest of the filesystem state",
                         description="Print a SHA-256 digest of the filesystem state (not the journal) "
                         "and the seq it was taken at; equal states print equal digests. Asks the running "
                         "node if there is one, else reads the store.")
    p.add_argument("--data", required=True, metavar="DIR", type=_data_dir(must_exist=True))
    p.add_argument("--timeout", type=_seconds, default=300.0, metavar="SECONDS")
    p.set_defaults(func=cmd_digest)

    p = verbs.add_parser("verify", help="wait until two nodes reach the same seq and compare digests",
                         description="Wait until the stores in both DIRs (running or not) are at the same "
                         "seq, then compare their digests. Exits 0 on a match, 1 on a mismatch, 2 if "
                         "they do not reach the same seq before the deadline.")
    p.add_argument("--data", required=True, metavar="DIR", type=_data_dir(must_exist=False), action="append",
                   help="give it twice")
    p.add_argument("--deadline", type=_seconds, default=60.0, metavar="SECONDS",
                   help="how long to wait for equal seqs (default 60)")
    p.add_argument("--timeout", type=_seconds, default=300.0, metavar="SECONDS",
                   help="how long one request to a node may take")
    p.set_defaults(func=cmd_verify)
    return parser


def _check_together(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments taken together (None: nothing)."""
    derived = {"primary": "listen", "standby": "primary"}.get(args.verb)
    address = getattr(args, derived, None) if derived else None
    if address and not args.control and address.endswith(":65535"):
        return f"--{derived} {address}: the side channel would be on port 65535 + 1; give --control"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check_together(args)
    if problem:
        parser.exit(2, f"{parser.prog} {args.verb}: error: {problem}\n")
    _setup_logging(args.verbose)
    import lmdb
    import zmq

    from fs.mounting import MountpointError
    from journal.errors import StoreDamaged, StoreError
    from replica.security import SecurityError

    try:
        return args.func(args)
    except (StoreDamaged, lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError) as exc:
        log.error("%s", exc)  # the store's file is the problem, not the command
        return 1
    except (StoreError, SecurityError, MountpointError) as exc:
        log.error("%s", exc)
        return 2
    except zmq.ZMQError as exc:  # e.g. a --listen port another process holds
        log.error("cannot open a replication socket: %s", exc)
        return 2
    except lmdb.Error as exc:  # e.g. a map larger than this machine can map
        log.error("cannot use the store: %s", exc)
        return 2


def run() -> int:
    """main(), quiet when the reader of stdout goes away (`mount.py status | head -1`)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush of stdout again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # as a process killed by SIGPIPE
    return code


if __name__ == "__main__":
    sys.exit(run())
