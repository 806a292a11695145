"""The firewall worker of a NetVM/ProxyVM: a drop-in for upstream's qubes-firewall.

The outbound kind (:class:`Worker`, an
:class:`~agent_worker.directory.EntryDirectory` for ``/qubes-firewall/``)
is a thin shell around :mod:`agent_worker.qdb_parse` and
:mod:`agent_worker.ruleset`: it resolves ``dsthost`` names and applies each
change as one libnftables transaction to the ``qubes-firewall`` tables.
:func:`serve` runs it beside the chain kinds (forward, inbound, routing).
What it reads and writes, the chains it owns and how it fails are in
doc/agent.md.

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

import ctypes
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
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import nftables

from agent_worker import conntrack, forwarder, inbound, outbound_flows, routing
from agent_worker.directory import (
    CONNECTED_IPS,
    NFT_ERRORS,
    ChainDirectory,
    EntryDirectory,
    QubesDBConnection,
)
from agent_worker.entries import EntryError, IPAddress, IpVersion
from agent_worker.nft_chains import NftError
from agent_worker.qdb_parse import (
    Blocked,
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
HANDLED_DIR = "/qubes-firewall-handled/"
DNS_INFO_DIR = "/dns/"
MAX_PATH = 64
RESOLV_CONF = Path("/etc/resolv.conf")
SYSTEM_HOOK_DIR = Path("/etc/qubes/qubes-firewall.d")
USER_HOOK_DIR = Path("/rw/config/qubes-firewall.d")
USER_SCRIPT = Path("/rw/config/qubes-firewall-user-script")
#: Qubes' custom-persist service: /rw/config is not the user's, so nothing there runs
CUSTOM_PERSIST = Path("/var/run/qubes-service/custom-persist")
#: transactions one change may take: a refused client found, then the tables rebuilt
MAX_ATTEMPTS = 4

Resolver = Callable[[str, IpVersion], frozenset[IPAddress]]


class QubesDBWatcher(Protocol):
    """The calls made on the connection kept for watches alone."""

    def watch(self, path: str) -> None: ...
    def watch_fd(self) -> int: ...
    def read_watch(self) -> str: ...


class Nft:
    """The one libnftables context of the worker, reused for every transaction.

    JSON output with handles: the forward, inbound and routing kinds list table
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


def resolve(name: str, version: IpVersion) -> frozenset[IPAddress]:
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


def dns_info_value(addresses: frozenset[IPAddress]) -> str:
    """The value upstream writes under /dns/: a Python set literal of ``addr/len``."""
    items = ", ".join(f"'{a}/{a.max_prefixlen}'" for a in sorted(addresses))
    return "{" + items + "}"


class Worker(EntryDirectory[Source]):
    """The outbound kind: ``/qubes-firewall/`` to the ``qubes-firewall`` tables.

    Its hooks on :class:`~agent_worker.directory.EntryDirectory`: names
    resolved while parsing, the table diff of :mod:`agent_worker.ruleset`
    as its apply, and the ``/dns/`` write-back of what it resolved.
    """

    DIRECTORY = FIREWALL_DIR
    HANDLED = HANDLED_DIR
    LABEL = "outbound rules"
    KIND = "outbound"
    LOGS_CONNECTED = True

    def __init__(
        self,
        db: QubesDBConnection,
        nft: Nft,
        resolver: Resolver = resolve,
        resolv_conf: Path = RESOLV_CONF,
        tool: conntrack.Tool = conntrack.NETLINK,
    ) -> None:
        super().__init__(db, tool)
        self.nft = nft
        self.resolver = resolver
        self.resolv_conf = resolv_conf
        #: what the tables hold of ours: the last transaction nft accepted
        self.kernel = TableState()
        #: False once a transaction failed for no client's fault: the kernel's
        #: tables are not what ``kernel`` says, the next change rebuilds them
        self.synced = False
        #: addresses routed through this hop from a client (agent_worker.routing),
        #: filtered with their own rules as clients are
        self.routed: dict[IPAddress, Source] = {}

    # -- EntryDirectory ---------------------------------------------------

    def parse(self, address: IPAddress, untrusted_entries: dict[str, bytes]) -> Resolved:
        """A source's entries parsed and its names resolved; EntryError if either fails."""
        parsed = parse_source(untrusted_entries, address.version)
        if isinstance(parsed, Blocked):
            raise EntryError(parsed.reason)
        names = {}
        for name in sorted(names_to_resolve(parsed)):
            try:
                names[name] = self.resolver(name, address.version)
            except (OSError, UnicodeError) as err:
                raise EntryError(f"cannot resolve {name}: {err}") from None
        return Resolved(parsed, names)

    def log_refusal(self, address: IPAddress, reason: str) -> None:
        log.error("blocking all traffic from %s: %s", address, reason)

    def removed(self, address: IPAddress) -> None:
        log.info("rules of %s removed", address)
        self.db.rm(f"{DNS_INFO_DIR}{address}/")

    def apply_reloaded(self, gone: set[IPAddress], *, force: bool) -> None:
        for address in gone:
            self.db.rm(f"{DNS_INFO_DIR}{address}/")
        self._apply_and_record(self._clients(), self.targets, rewrite=force)

    def apply_handled(self, handled: list[IPAddress], moved: frozenset[IPAddress]) -> None:
        self._apply_and_record(set(handled) | moved, handled)

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
        source = self.targets.get(address)
        if recorded and source is not None:
            base = f"{DNS_INFO_DIR}{address}/"
            self.db.rm(base)
            if isinstance(source, Resolved):
                for name, addresses in sorted(source.names.items()):
                    if len(base + name) > MAX_PATH:
                        log.warning("not recording %s for %s: path too long", name, address)
                        continue
                    self.db.write(base + name, dns_info_value(addresses))
        self.count_handled(address)

    # -- applying ---------------------------------------------------------

    def _filtered(self) -> frozenset[IPAddress]:
        """The addresses this hop filters: its connected clients and routed addresses."""
        return self.connected | frozenset(self.routed)

    def _wanted(self, address: IPAddress) -> Chains | None:
        """A client's chains: only while it is connected (or routed) and has rules."""
        if address not in self._filtered():
            return None
        reason = self.refused.get(address)
        source = self.targets.get(address, self.routed.get(address))
        if reason is not None:
            source = Blocked(reason)
        return None if source is None else client_chains(address, source)

    def _clients(self) -> set[IPAddress]:
        """Every client that has, or should have, chains."""
        return (
            (self.connected & self.targets.keys()) | self.routed.keys() | self.kernel.clients.keys()
        )

    def _find_refused(self, changes: Mapping[IPAddress, Chains | None]) -> bool:
        """Check each changed client's chains on their own; block those nft refuses."""
        return self._refuse_failing(
            (
                (address, chains)
                for address, chains in changes.items()
                if chains is not None
                and chains != self.kernel.clients.get(address)
                and address not in self.refused
            ),
            lambda address, chains: self.nft.run(
                chain_check_commands(address, chains), check=True
            ),
        )

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
        """End the flows of ``clients`` their rules in force refuse; DNS servers as in force
        (the ones the transaction just applied: resolv.conf is read once per change)."""
        filtered = self._filtered()
        sources: dict[IPAddress, Source] = {
            address: Blocked(reason) if (reason := self.refused.get(address)) else source
            for address in clients
            if address in filtered
            and (source := self.targets.get(address, self.routed.get(address))) is not None
        }
        self.end_flows(
            lambda: outbound_flows.flows_to_end(sources, sources, self.kernel.dns, self.tool)
        )

    def set_routed(self, untrusted_routed: Mapping[IPAddress, Mapping[str, bytes]]) -> None:
        """Filter traffic from addresses routed through a client, with their own outbound rules.

        A routed qube's address reaches this hop from the vif of a ProxyVM
        (agent_worker.routing): it counts as a client here, under the
        rules dom0 sent along (``/qns-routing/<address>/out/``). Applies
        only what changed.
        """
        routed = {
            address: self.parsed(address, dict(untrusted_entries))
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


#: glibc's malloc_trim (None elsewhere, e.g. musl): see _return_freed_memory
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)


def _return_freed_memory() -> None:
    """Give the heap pages a change left free back to the kernel, before sleeping.

    A big change (a thousand steps or rules: its command text, nft's parse,
    the netlink messages) frees megabytes inside the heap, which glibc keeps
    resident for the life of the hop, a qube of a few hundred MiB. Costs
    about 0.3 ms after such a change, microseconds otherwise
    (doc/performance.md).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


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
    chain_kinds: Sequence[ChainDirectory] = (),
) -> None:
    """Start up like upstream's worker, then follow QubesDB until asked to stop.

    ``watcher`` is a connection used for nothing but watches, so every event
    waits in its socket and ``select`` on it never misses one. The outbound
    worker and each of ``chain_kinds`` (``/qns-forward/``, ``/qns-inbound/``,
    ``/qns-routing/``) are directories alike: each gets the events under its
    own directory, the same SIGHUP and the same clean stop, and the sockets
    and deadline it asks to be woken for; their transactions are their own.
    """
    kinds: tuple[EntryDirectory[Any], ...] = (worker, *chain_kinds)
    worker.init_tables()
    run_hooks()
    sd_notify("READY=1")
    for path in dict.fromkeys((*(kind.DIRECTORY for kind in kinds), *CONNECTED_IPS,
                               *(path for kind in kinds for path in kind.WATCHED))):
        watcher.watch(path)
    fd = watcher.watch_fd()
    for kind in kinds:
        kind.reload()
    _return_freed_memory()
    log.info("started")
    while not signals.stop:
        deadlines = [when for kind in kinds if (when := kind.next_wake()) is not None]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        sockets = [sock for kind in kinds for sock in kind.fds()]
        ready = select.select([fd, signals.wake_fd, *sockets], [], [], timeout)[0]
        signals.drain()
        if signals.stop:
            break
        if signals.reload:
            signals.reload = False
            log.info("SIGHUP: reloading every client's rules")
            sd_notify(reloading_state())
            for kind in kinds:
                kind.reload(force=True)
            sd_notify("READY=1")
            _return_freed_memory()
            continue
        if fd in ready:
            paths = _pending_events(watcher, fd)
            for kind in kinds:
                if any(kind.concerns(p) for p in paths):
                    kind.handle(kind.classify(paths))
        for kind in kinds:
            kind.wake(ready, time.monotonic())
        _return_freed_memory()
    # What the chain kinds opened closes while the outbound filter still stands.
    for chain_kind in chain_kinds:
        log.info("stopping, removing the %s chains", chain_kind.KIND)
        try:
            chain_kind.stop()
        except NFT_ERRORS as err:
            log.error("could not remove the %s chains: %s", chain_kind.KIND, err)
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
        chain_kinds = (
            forwarder.Forwarder(db, nft.run),
            inbound.Inbound(db, nft.run),
            routing.Router(db, nft.run, worker.set_routed),
        )
        serve(worker, qubesdb.QubesDB(), signals, chain_kinds)
    except qubesdb.Error as err:
        log.error("QubesDB failed, leaving the ruleset as it is: %s", err)
        return 1
    except NftError as err:
        log.error("cannot create the %s tables: %s", TABLE, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
