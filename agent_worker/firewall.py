"""The firewall worker of a NetVM/ProxyVM: a drop-in for upstream's qubes-firewall.

Thin shell around :mod:`agent_worker.qdb_parse` and
:mod:`agent_worker.ruleset`: it reads this qube's QubesDB, resolves
``dsthost`` names, lists the kernel's ``qubes-firewall`` tables and applies
each change as one libnftables transaction. What it reads and writes, the
chains it owns and how it fails are in doc/agent.md.

Every change (a client's rule set completed by dom0, ``/connected-ips``
updated, SIGHUP) recomputes the full target state from what is cached,
re-reading and re-resolving only the client that changed, and sends the
difference to the kernel in a single ``nft`` call for both families. A
transaction applies entirely or not at all, so a client never runs on
half of its new rules.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal, Protocol

import nftables

from agent_worker import forwarding, inbound, routing
from agent_worker.entries import EntryError
from agent_worker.nft_chains import NftError
from agent_worker.qdb_parse import (
    Blocked,
    IPAddress,
    parse_address,
    parse_resolv_conf,
    parse_source,
)
from agent_worker.ruleset import (
    FAMILIES,
    TABLE,
    Desired,
    Family,
    Resolved,
    Source,
    chain_check_commands,
    cleanup_commands,
    desired_table,
    names_to_resolve,
    parse_listing,
    table_definition,
    update_commands,
)

log = logging.getLogger("qubes.firewall")

FIREWALL_DIR = "/qubes-firewall/"
CONNECTED_IPS = forwarding.CONNECTED_IPS
DNS_KEYS = ("/qubes-primary-dns", "/qubes-secondary-dns")
HANDLED_DIR = "/qubes-firewall_handled/"
DNS_INFO_DIR = "/dns/"
WATCHES = (FIREWALL_DIR, *CONNECTED_IPS)
MAX_PATH = 64
RESOLV_CONF = Path("/etc/resolv.conf")
HOOK_DIRS = (Path("/etc/qubes/qubes-firewall.d"), Path("/rw/config/qubes-firewall.d"))
USER_SCRIPT = Path("/rw/config/qubes-firewall-user-script")

Resolver = Callable[[str, Literal[4, 6]], frozenset[IPAddress]]


class QubesDBConnection(Protocol):
    """The calls the worker makes on a ``qubesdb.QubesDB`` to read and write entries."""

    def read(self, path: str) -> bytes | None: ...
    def write(self, path: str, value: str | bytes) -> None: ...
    def rm(self, path: str) -> None: ...
    def multiread(self, path: str) -> dict[str, bytes]: ...
    def list(self, path: str) -> list[str]: ...


class QubesDBWatcher(Protocol):
    """The calls made on the connection kept for watches alone."""

    def watch(self, path: str) -> None: ...
    def watch_fd(self) -> int: ...
    def read_watch(self) -> str: ...


class Nft:
    """The one libnftables context of the worker."""

    def __init__(self) -> None:
        self._ctx = nftables.Nftables()
        self._ctx.set_json_output(True)
        self._ctx.set_handle_output(True)

    def run(self, commands: str, *, check: bool = False) -> str:
        """Run ``commands`` as one transaction (``check``: validate, change nothing)."""
        self._ctx.set_dry_run(check)
        try:
            rc, output, error = self._ctx.cmd(commands)
        finally:
            self._ctx.set_dry_run(False)
        if rc != 0:
            raise NftError(" ".join(error.split()) or f"nft returned {rc}")
        return output

    def list_table(self, family: Family) -> dict[str, Any] | None:
        """The table as nft JSON, or None when it does not exist."""
        try:
            return json.loads(self.run(f"list table {family} {TABLE}"))
        except NftError as err:
            if "No such file or directory" in str(err):
                return None
            raise


def resolve(name: str, version: Literal[4, 6]) -> frozenset[IPAddress]:
    """Addresses of ``name`` in one family; raises OSError or UnicodeError when none."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    infos = socket.getaddrinfo(name, None, family)
    addresses = frozenset(
        address
        for address in (ipaddress.ip_address(info[4][0]) for info in infos)
        if address.version == version
    )
    if not addresses:
        raise OSError(f"no IPv{version} address")
    return addresses


@dataclass
class Changes:
    """What a batch of QubesDB watch events asks the worker to re-read."""

    full: bool = False
    connected: bool = False
    sources: set[str] = field(default_factory=set)


def classify(paths: Iterable[str]) -> Changes:
    """Sort watch events; a client's entries count only once dom0 writes its marker.

    dom0 clears ``/qubes-firewall/IP/``, writes each key, then writes the
    empty value at ``/qubes-firewall/IP``: events below that path belong to
    a set still being written, and the rules in force stay until it is done.
    """
    changes = Changes()
    for path in paths:
        if path in CONNECTED_IPS:
            changes.connected = True
        elif path.startswith(FIREWALL_DIR) and len(path) > len(FIREWALL_DIR):
            rest = path[len(FIREWALL_DIR) :]
            if "/" not in rest:
                changes.sources.add(rest)
        else:
            changes.full = True
    return changes


def dns_info_value(addresses: frozenset[IPAddress]) -> str:
    """The value upstream writes under /dns/: a Python set literal of ``addr/len``."""
    items = ", ".join(f"'{a}/{a.max_prefixlen}'" for a in sorted(addresses))
    return "{" + items + "}"


class Worker:
    """State cached between events, and the steps from QubesDB to the kernel."""

    def __init__(
        self,
        db: QubesDBConnection,
        nft: Nft,
        resolver: Resolver = resolve,
        resolv_conf: Path = RESOLV_CONF,
    ) -> None:
        self.db = db
        self.nft = nft
        self.resolver = resolver
        self.resolv_conf = resolv_conf
        self.sources: dict[IPAddress, Source] = {}
        self.connected: frozenset[IPAddress] = frozenset()
        #: sources whose rules nft refused, blocked until dom0 rewrites them
        self.refused: dict[IPAddress, str] = {}
        #: chain contents of the last transaction nft accepted
        self.applied: dict[Family, dict[str, tuple[str, ...]]] = {f: {} for f in FAMILIES}
        #: addresses routed through this hop from a client (agent_worker.routing)
        self.routed: dict[IPAddress, Source] = {}

    # -- reading QubesDB --------------------------------------------------

    def _read_source(self, address: IPAddress) -> Source | None:
        """A client's rules once dom0 completed them, resolved; None if it has none."""
        base = f"{FIREWALL_DIR}{address}"
        if self.db.read(base) is None:
            return None
        untrusted_entries = {
            path[len(base) + 1 :]: value for path, value in self.db.multiread(base + "/").items()
        }
        return self._resolve_source(address, untrusted_entries)

    def _resolve_source(self, address: IPAddress, untrusted_entries: Mapping[str, bytes]) -> Source:
        """A source's entries parsed and its names resolved, or Blocked and why (logged)."""
        parsed = parse_source(untrusted_entries, address.version)
        if isinstance(parsed, Blocked):
            log.error("blocking all traffic from %s: %s", address, parsed.reason)
            return parsed
        names = {}
        for name in sorted(names_to_resolve(parsed)):
            try:
                names[name] = self.resolver(name, address.version)
            except (OSError, UnicodeError) as err:
                reason = f"cannot resolve {name}: {err}"
                log.error("blocking all traffic from %s: %s", address, reason)
                return Blocked(reason)
        return Resolved(parsed, names)

    def _source_address(self, untrusted_text: str) -> IPAddress | None:
        try:
            return parse_address(untrusted_text)
        except EntryError as err:
            log.error("ignoring %r: %s", FIREWALL_DIR + untrusted_text[:48], err)
            return None

    def _load_source(self, address: IPAddress) -> None:
        source = self._read_source(address)
        self.refused.pop(address, None)
        if source is None:
            if self.sources.pop(address, None) is not None:
                log.info("rules of %s removed", address)
                self.db.rm(f"{DNS_INFO_DIR}{address}/")
        else:
            self.sources[address] = source

    def _load_connected(self) -> None:
        self.connected, problems = forwarding.read_connected(self.db)
        for path, problem in problems:
            log.error("%s: ignoring an entry: %s", path, problem)

    def _dns_servers(self) -> frozenset[IPAddress]:
        """This hop's DNS servers: QubesDB's, and resolv.conf's as upstream uses."""
        servers = set()
        for path in DNS_KEYS:
            untrusted_value = self.db.read(path)
            if untrusted_value:
                try:
                    servers.add(parse_address(untrusted_value.decode("ascii")))
                except (UnicodeDecodeError, EntryError) as err:
                    log.error("%s: ignoring it: %s", path, err)
        try:
            servers |= parse_resolv_conf(self.resolv_conf.read_text(errors="replace"))
        except OSError as err:
            log.warning("cannot read %s: %s", self.resolv_conf, err)
        return frozenset(servers)

    # -- writing back -----------------------------------------------------

    def _record(self, address: IPAddress, recorded: bool) -> None:
        """After handling a client: its resolved names (if applied) and the handled counter."""
        source = self.sources.get(address)
        if recorded and source is not None:
            base = f"{DNS_INFO_DIR}{address}/"
            self.db.rm(base)
            if isinstance(source, Resolved):
                for name, addresses in sorted(source.names.items()):
                    if len(base + name) > MAX_PATH:
                        log.warning("not recording %s for %s: path too long", name, address)
                        continue
                    self.db.write(base + name, dns_info_value(addresses))
        forwarding.count_handled(self.db, f"{HANDLED_DIR}{address}")

    # -- applying ---------------------------------------------------------

    def _effective(self) -> Mapping[IPAddress, Source]:
        sources = {**self.routed, **self.sources}
        for address, reason in self.refused.items():
            sources[address] = Blocked(reason)
        return sources

    def _find_refused(self, desired: Mapping[Family, Desired], error: str) -> bool:
        """Check each client chain nft was asked to change on its own; block the refused."""
        found = False
        for family in FAMILIES:
            for address, chain in desired[family].jumps:
                rules = desired[family].chains[chain]
                if self.applied[family].get(chain) == rules or address in self.refused:
                    continue
                try:
                    self.nft.run(chain_check_commands(family, chain, rules), check=True)
                except NftError as err:
                    reason = f"nft refused its rules: {err}"
                    log.error("blocking all traffic from %s: %s", address, reason)
                    self.refused[address] = reason
                    found = True
        if not found:
            log.error("no single client's rules explain the refusal: %s", error)
        return found

    def _commit(self) -> bool:
        """Bring the kernel to the target state in one transaction; False if refused."""
        dns_servers = self._dns_servers()
        for _attempt in range(2):
            sources = self._effective()
            desired = {
                family: desired_table(
                    family, sources, self.connected | frozenset(self.routed), dns_servers
                )
                for family in FAMILIES
            }
            try:
                kernel = {
                    family: parse_listing(family, self.nft.list_table(family))
                    for family in FAMILIES
                }
                commands = [
                    command
                    for family in FAMILIES
                    for command in update_commands(
                        family, desired[family], kernel[family], self.applied[family]
                    )
                ]
                if commands:
                    self.nft.run("\n".join(commands) + "\n")
            except NftError as err:
                log.error("nft refused the update, the previous ruleset stays: %s", err)
                if not self._find_refused(desired, str(err)):
                    return False
                continue
            self.applied = {family: dict(desired[family].chains) for family in FAMILIES}
            if commands:
                log.info("ruleset updated (%d commands)", len(commands))
            return True
        log.error("nft refused the update again, the previous ruleset stays")
        return False

    def apply(self, handled: Iterable[IPAddress]) -> None:
        """Commit, then write back what upstream writes for each handled client."""
        committed = self._commit()
        for address in sorted(handled, key=lambda a: (a.version, a)):
            self._record(address, committed)

    def set_routed(self, untrusted_routed: Mapping[IPAddress, Mapping[str, bytes]]) -> None:
        """Filter traffic from addresses routed through a client, with their own outbound rules.

        A routed qube's address reaches this hop from the vif of a ProxyVM
        (agent_worker.routing): it counts as a client here, under the
        rules dom0 sent along (``/qns-routing/<address>/out/``). Commits
        only when that changes what is filtered.
        """
        routed = {
            address: self._resolve_source(address, untrusted_entries)
            for address, untrusted_entries in untrusted_routed.items()
        }
        if routed != self.routed:
            self.routed = routed
            self._commit()

    # -- entry points -----------------------------------------------------

    def init_tables(self) -> None:
        """Fresh, empty tables for both families (forward policy drop) in one transaction."""
        self.nft.run("\n".join(c for f in FAMILIES for c in table_definition(f)) + "\n")
        self.applied = {family: {} for family in FAMILIES}

    def reload(self, *, force: bool = False) -> None:
        """Re-read everything; ``force`` also rewrites chains that look unchanged."""
        if force:
            self.applied = {family: {} for family in FAMILIES}
        self.refused.clear()
        untrusted_names = {
            path[len(FIREWALL_DIR) :].split("/", 1)[0] for path in self.db.list(FIREWALL_DIR)
        }
        sources = {}
        for untrusted_name in sorted(untrusted_names):
            address = self._source_address(untrusted_name) if untrusted_name else None
            if address is None:
                continue
            source = self._read_source(address)
            if source is not None:
                sources[address] = source
        for gone in self.sources.keys() - sources.keys():
            self.db.rm(f"{DNS_INFO_DIR}{gone}/")
        self.sources = sources
        self._load_connected()
        self.apply(sources)

    def handle(self, changes: Changes) -> None:
        """React to one batch of watch events."""
        if changes.full:
            self.reload()
            return
        handled = []
        for untrusted_name in sorted(changes.sources):
            address = self._source_address(untrusted_name)
            if address is not None:
                self._load_source(address)
                handled.append(address)
        if changes.connected:
            self._load_connected()
        if handled or changes.connected:
            self.apply(handled)

    def cleanup(self) -> None:
        """Remove both tables, as upstream does on a clean stop."""
        try:
            self.nft.run(cleanup_commands())
        except NftError as err:
            log.error("could not remove the %s tables: %s", TABLE, err)


def run_hooks(hook_dirs: Iterable[Path] = HOOK_DIRS, user_script: Path = USER_SCRIPT) -> None:
    """Run the executables of the qubes-firewall.d directories, then the user script."""
    scripts = [
        path
        for directory in hook_dirs
        if directory.is_dir()
        for path in sorted(directory.iterdir())
        if path.is_file() and os.access(path, os.X_OK)
    ]
    if user_script.is_file() and os.access(user_script, os.X_OK):
        scripts.append(user_script)
    for script in scripts:
        try:
            status = subprocess.call([str(script)])
        except OSError as err:
            log.error("cannot run %s: %s", script, err)
            continue
        if status != 0:
            log.warning("%s exited with status %d", script, status)


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about ``state`` if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as err:
        log.warning("cannot notify systemd: %s", err)


class _Signals:
    """SIGTERM/SIGINT ask to stop, SIGHUP to reload; a pipe wakes the select loop."""

    def __init__(self) -> None:
        self.stop = False
        self.reload = False
        self.wake_fd, write_fd = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload = True
        else:
            self.stop = True

    def drain(self) -> None:
        try:
            while os.read(self.wake_fd, 512):
                pass
        except BlockingIOError:
            pass


def _pending_events(watcher: QubesDBWatcher, fd: int) -> list[str]:
    """The event that woke us and every one already waiting behind it."""
    paths = [watcher.read_watch()]
    while select.select([fd], [], [], 0)[0]:
        paths.append(watcher.read_watch())
    return paths


def serve(
    worker: Worker,
    watcher: QubesDBWatcher,
    signals: _Signals,
    halves: Sequence[forwarding.ChainHalf] = (),
) -> None:
    """Start up like upstream's worker, then follow QubesDB until asked to stop.

    ``watcher`` is a connection used for nothing but watches, so every event
    waits in its socket and ``select`` on it never misses one. Each of
    ``halves`` (``/qns-forward/``, ``/qns-inbound/``) gets the events under
    its directory, the same SIGHUP and the same clean stop; its
    transactions are its own.
    """
    worker.init_tables()
    run_hooks()
    sd_notify("READY=1")
    for path in (*WATCHES, *(half.DIRECTORY for half in halves)):
        watcher.watch(path)
    fd = watcher.watch_fd()
    worker.reload()
    for half in halves:
        half.reload()
    log.info("started")
    while not signals.stop:
        deadlines = [when for half in halves if (when := half.next_wake()) is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        sockets = [sock for half in halves for sock in half.fds()]
        ready = select.select([fd, signals.wake_fd, *sockets], [], [], timeout)[0]
        signals.drain()
        if signals.stop:
            break
        if signals.reload:
            signals.reload = False
            log.info("SIGHUP: reloading every client's rules")
            worker.reload(force=True)
            for half in halves:
                half.reload()
            continue
        if fd in ready:
            paths = _pending_events(watcher, fd)
            outbound = [p for p in paths if not any(half.ours(p) for half in halves)]
            if outbound:
                worker.handle(classify(outbound))
            for half in halves:
                if any(half.concerns(p) for p in paths):
                    half.handle(half.classify(paths))
        for half in halves:
            half.wake(ready, time.monotonic())
    # What the halves opened closes while the outbound filter still stands.
    for half in halves:
        log.info("stopping, removing the %s chains", half.KIND)
        try:
            half.remove()
        except (NftError, ValueError, KeyError) as err:
            log.error("could not remove the %s chains: %s", half.KIND, err)
    log.info("stopping, removing the %s tables", TABLE)
    worker.cleanup()


def main() -> int:
    # Imported here: the real module on Qubes, lab/pyshim's in the lab; the
    # rest of this module is importable (and tested) without either.
    import qubesdb

    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="qubes-firewall: %(levelname)s: %(message)s"
    )
    signals = _Signals()
    try:
        db, nft = qubesdb.QubesDB(), Nft()
        worker = Worker(db, nft)
        halves = (
            forwarding.Forwarder(db, nft.run),
            inbound.Inbound(db, nft.run),
            routing.Router(db, nft.run, worker.set_routed),
        )
        serve(worker, qubesdb.QubesDB(), signals, halves)
    except qubesdb.Error as err:
        log.error("QubesDB failed, leaving the ruleset as it is: %s", err)
        return 1
    except NftError as err:
        log.error("cannot create the %s tables: %s", TABLE, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
