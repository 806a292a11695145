"""The firewall worker of a NetVM/ProxyVM: a drop-in for upstream's qubes-firewall.

Thin shell around :mod:`agent_worker.qdb_parse` and
:mod:`agent_worker.ruleset`: it reads this qube's QubesDB, resolves
``dsthost`` names and applies each change as one libnftables transaction
to the ``qubes-firewall`` tables. What it reads and writes, the chains it
owns and how it fails are in doc/agent.md.

The worker keeps what it last committed (:class:`ruleset.TableState`).
A change (a client's rule set completed by dom0, ``/connected-ips``
updated) re-reads and re-resolves only the clients it names, renders only
their chains and sends the difference to the kernel in a single ``nft``
call for both families, without listing the tables. A transaction applies
entirely or not at all, so a client never runs on half of its new rules.
The clients whose chains a transaction changed are what :meth:`Worker.apply`
returns: the one place that knows "the rules of this client changed".
"""

from __future__ import annotations

import ipaddress
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
from typing import Literal, Protocol

import nftables

from agent_worker import conntrack, forwarding, inbound, outbound_flows, routing
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
    Chains,
    Resolved,
    Source,
    TableState,
    chain_check_commands,
    cleanup_commands,
    client_chains,
    in_order,
    names_to_resolve,
    rebuild_commands,
    rewrite_commands,
    table_definition,
    update_commands,
)

log = logging.getLogger("qubes.firewall")

FIREWALL_DIR = "/qubes-firewall/"
CONNECTED_IPS = forwarding.CONNECTED_IPS
HANDLED_DIR = "/qubes-firewall-handled/"
DNS_INFO_DIR = "/dns/"
WATCHES = (FIREWALL_DIR, *CONNECTED_IPS)
MAX_PATH = 64
RESOLV_CONF = Path("/etc/resolv.conf")
SYSTEM_HOOK_DIR = Path("/etc/qubes/qubes-firewall.d")
USER_HOOK_DIR = Path("/rw/config/qubes-firewall.d")
USER_SCRIPT = Path("/rw/config/qubes-firewall-user-script")
#: Qubes' custom-persist service: /rw/config is not the user's, so nothing there runs
CUSTOM_PERSIST = Path("/var/run/qubes-service/custom-persist")
#: transactions one change may take: a refused client found, then the tables rebuilt
MAX_ATTEMPTS = 4

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
    """The one libnftables context of the worker, reused for every transaction.

    JSON output with handles: the forward and inbound halves list table
    ``qubes`` through this context (:mod:`agent_worker.nft_chains`).
    """

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
        tool: conntrack.Tool = conntrack.NETLINK,
    ) -> None:
        self.db = db
        self.nft = nft
        #: the conntrack table: flows the new rules no longer allow are ended
        self.tool = tool
        self.resolver = resolver
        self.resolv_conf = resolv_conf
        self.sources: dict[IPAddress, Source] = {}
        self.connected: frozenset[IPAddress] = frozenset()
        #: sources whose rules nft refused, blocked until dom0 rewrites them
        self.refused: dict[IPAddress, str] = {}
        #: what the tables hold of ours: the last transaction nft accepted
        self.kernel = TableState()
        #: False once a transaction failed for no client's fault: the kernel's
        #: tables are not what ``kernel`` says, the next change rebuilds them
        self.synced = False
        #: addresses routed through this hop from a client (agent_worker.routing),
        #: filtered with their own rules as clients are
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
        """This hop's DNS servers for ``specialtarget=dns``: resolv.conf's, as upstream.

        Not QubesDB's ``/qubes-primary-dns``: that is the address clients
        send DNS to, which Qubes' DNAT rewrites to a resolv.conf server
        before the forward hook sees the packet.
        """
        try:
            return parse_resolv_conf(self.resolv_conf.read_text(errors="replace"))
        except OSError as err:
            log.warning("cannot read %s: %s", self.resolv_conf, err)
            return frozenset()

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

    def _filtered(self) -> frozenset[IPAddress]:
        """The addresses this hop filters: its connected clients and routed addresses."""
        return self.connected | frozenset(self.routed)

    def _wanted(self, address: IPAddress) -> Chains | None:
        """A client's chains: only while it is connected (or routed) and has rules."""
        if address not in self._filtered():
            return None
        reason = self.refused.get(address)
        source = self.sources.get(address, self.routed.get(address))
        if reason is not None:
            source = Blocked(reason)
        return None if source is None else client_chains(address, source)

    def _clients(self) -> set[IPAddress]:
        """Every client that has, or should have, chains."""
        return (
            (self.connected & self.sources.keys()) | self.routed.keys() | self.kernel.clients.keys()
        )

    def _find_refused(self, changes: Mapping[IPAddress, Chains | None]) -> bool:
        """Check each changed client's chains on their own; block those nft refuses."""
        found = False
        for address, chains in changes.items():
            if chains is None or chains == self.kernel.clients.get(address):
                continue
            if address in self.refused:
                continue
            try:
                self.nft.run(chain_check_commands(address, chains), check=True)
            except NftError as err:
                reason = f"nft refused its rules: {err}"
                log.error("blocking all traffic from %s: %s", address, reason)
                self.refused[address] = reason
                found = True
        return found

    def apply(self, dirty: Iterable[IPAddress], *, rewrite: bool = False) -> set[IPAddress] | None:
        """Bring the clients in ``dirty`` and the sets to the kernel in one transaction.

        ``rewrite``: write every chain and set of ours again, whatever the
        kernel is believed to hold (SIGHUP). Returns the clients whose
        chains changed (the point where a change of a client's rules is
        known), or None when nft refused and the previous ruleset stays.
        """
        dns = self._dns_servers()
        dirty = set(dirty)
        for _attempt in range(MAX_ATTEMPTS):
            rebuild = not self.synced
            addresses = self._clients() if rebuild or rewrite else dirty
            changes = {address: self._wanted(address) for address in addresses}
            target = self.kernel.with_clients(dns, self._filtered(), changes)
            if rebuild:
                target = TableState(dns, self._filtered(), target.clients)
                commands = rebuild_commands(target)
            elif rewrite:
                commands = rewrite_commands(self.kernel, target)
            else:
                commands = update_commands(self.kernel, target, addresses)
            try:
                if commands:
                    self.nft.run("\n".join(commands) + "\n")
            except NftError as err:
                log.error("nft refused the update: %s", err)
                if self._find_refused(changes):
                    continue
                if rebuild:
                    break
                log.error("no client's rules explain it: rebuilding the %s tables", TABLE)
                self.synced = False
                continue
            changed = {
                address
                for address in addresses
                if rebuild or self.kernel.clients.get(address) != target.clients.get(address)
            }
            self.kernel, self.synced = target, True
            if commands:
                log.info("ruleset updated (%d commands)", len(commands))
            return changed
        log.error("nft refused the update again, the previous ruleset stays")
        return None

    def _apply_and_record(self, dirty: Iterable[IPAddress], handled: Iterable[IPAddress],
                          *, rewrite: bool = False) -> None:
        """Apply, then write back what upstream writes for each handled client.

        Then, as upstream's worker, end the flows of each client whose
        chains changed that its rules in force no longer allow.
        """
        changed = self.apply(dirty, rewrite=rewrite)
        for address in in_order(handled):
            self._record(address, changed is not None)
        if changed:
            self._end_flows(changed)

    def _end_flows(self, clients: Iterable[IPAddress]) -> None:
        filtered = self._filtered()
        sources: dict[IPAddress, Source] = {
            address: Blocked(reason) if (reason := self.refused.get(address)) else source
            for address in clients
            if address in filtered
            and (source := self.sources.get(address, self.routed.get(address))) is not None
        }
        try:
            flows = outbound_flows.flows_to_end(sources, sources, self._dns_servers(), self.tool)
            conntrack.end(flows, "outbound rules changed", self.tool)
        except conntrack.ConntrackError as err:
            log.error("cannot end the flows the new rules no longer allow: %s", err)

    def set_routed(self, untrusted_routed: Mapping[IPAddress, Mapping[str, bytes]]) -> None:
        """Filter traffic from addresses routed through a client, with their own outbound rules.

        A routed qube's address reaches this hop from the vif of a ProxyVM
        (agent_worker.routing): it counts as a client here, under the
        rules dom0 sent along (``/qns-routing/<address>/out/``). Applies
        only what changed.
        """
        routed = {
            address: self._resolve_source(address, untrusted_entries)
            for address, untrusted_entries in untrusted_routed.items()
        }
        dirty = {
            address for address in routed.keys() | self.routed.keys()
            if routed.get(address) != self.routed.get(address)
        }
        if dirty:
            self.routed = routed
            changed = self.apply(dirty)
            if changed:
                self._end_flows(changed)

    # -- entry points -----------------------------------------------------

    def init_tables(self) -> None:
        """Fresh, empty tables for both families (forward policy drop) in one transaction."""
        self.nft.run("\n".join(c for f in FAMILIES for c in table_definition(f)) + "\n")
        self.kernel, self.synced = TableState(), True

    def reload(self, *, force: bool = False) -> None:
        """Re-read and re-resolve everything; ``force`` also rewrites what looks unchanged."""
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
        self._apply_and_record(self._clients(), sources, rewrite=force)

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
        dirty = set(handled)
        if changes.connected:
            before = self.connected
            self._load_connected()
            dirty |= before ^ self.connected
        if handled or changes.connected:
            self._apply_and_record(dirty, handled)

    def cleanup(self) -> None:
        """Remove both tables, as upstream does on a clean stop."""
        try:
            self.nft.run(cleanup_commands())
        except NftError as err:
            log.error("could not remove the %s tables: %s", TABLE, err)


def run_hooks(
    system_dir: Path = SYSTEM_HOOK_DIR,
    user_dir: Path = USER_HOOK_DIR,
    user_script: Path = USER_SCRIPT,
    custom_persist: Path = CUSTOM_PERSIST,
) -> None:
    """Run the executables of the qubes-firewall.d directories, then the user script.

    With ``custom_persist`` present only the system directory runs, as
    upstream: the user's directory and script live in /rw/config.
    """
    persist = custom_persist.is_file()
    hook_dirs = [system_dir] if persist else [system_dir, user_dir]
    scripts = [
        path
        for directory in hook_dirs
        if directory.is_dir()
        for path in sorted(directory.iterdir())
        if path.is_file() and os.access(path, os.X_OK)
    ]
    if not persist and user_script.is_file() and os.access(user_script, os.X_OK):
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
    """Tell systemd (``Type=notify-reload``) about ``state`` if it is listening."""
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


def reloading_state() -> str:
    """What ``Type=notify-reload`` wants first on SIGHUP: RELOADING=1 and when, in µs."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


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
    ``halves`` (``/qns-forward/``, ``/qns-inbound/``, ``/qns-routing/``)
    gets the events under its directory, the same SIGHUP and the same
    clean stop, and the sockets and deadline it asks to be woken for; its
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
            sd_notify(reloading_state())
            worker.reload(force=True)
            for half in halves:
                half.reload(force=True)
            sd_notify("READY=1")
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
