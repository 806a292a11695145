"""The agent's one abstraction: a QubesDB directory of per-address entries, kept as nft state.

Every kind of rule dom0 sends a hop works the same way: a directory
(``/qubes-firewall/``, ``/qns-forward/``, ``/qns-inbound/``,
``/qns-routing/``) holds one subdirectory of entries per address, which
dom0 clears, rewrites key by key and then marks complete by writing the
address's own path last. :class:`EntryDirectory` is the part they share:

- sorting watch events (:func:`classify`): an address counts only once its
  completion path is written; the directory itself, or a parent removed,
  means "read everything again"; ``/connected-ips(6)`` changed;
- reading an address's entries (:func:`read_completed`) and parsing them,
  fail closed per address: one bad entry refuses the address
  (:class:`~agent_worker.entries.Refused`), the reason logged;
- the connected clients of this hop, which rules may point at;
- addresses whose rules nft refused, found one by one in nft's check mode
  and left out until dom0 rewrites them;
- a ``*_handled`` counter per address handled, as upstream counts;
- ending, through conntrack, the flows a change stops admitting.

A kind supplies only its parsing (:meth:`EntryDirectory.parse`) and how a
change reaches the kernel. :class:`ChainDirectory` is that for the kinds
rendered into sets, maps and chains of their own per family (forward,
inbound, routing): it remembers what nft holds of its own and sends only
the difference, in a transaction of its own. The outbound worker
(:class:`agent_worker.firewall.Worker`) brings its own table diff and DNS
write-back as hooks of the same base.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from agent_worker import conntrack, nft_chains
from agent_worker.entries import EntryError, Family, IPAddress, IpVersion, Refused, parse_address
from agent_worker.nft_chains import BaseChainHook, NftError, Runner
from agent_worker.qdb_parse import parse_address_list

log = logging.getLogger("qubes.firewall")

#: this hop's clients, per IP version; rules only ever point at one of them
CONNECTED_IPS: dict[str, IpVersion] = {"/connected-ips": 4, "/connected-ips6": 6}
FAMILIES: tuple[Family, ...] = ("ip", "ip6")
#: what nft may raise on a transaction of ours (a text it refuses, a listing it lacks)
NFT_ERRORS = (NftError, ValueError, KeyError)


class QubesDBConnection(Protocol):
    """The calls made on a ``qubesdb.QubesDB`` to read and write entries."""

    def read(self, path: str) -> bytes | None: ...
    def write(self, path: str, value: str | bytes) -> None: ...
    def rm(self, path: str) -> None: ...
    def multiread(self, path: str) -> dict[str, bytes]: ...
    def list(self, path: str) -> list[str]: ...


@dataclass
class Changes:
    """What a batch of watch events asks a directory to re-read."""

    full: bool = False
    #: addresses (as untrusted text) whose completion path was written
    targets: set[str] = field(default_factory=set)
    #: ``/connected-ips(6)`` changed: re-filter what is rendered
    connected: bool = False
    #: one of the kind's other paths (``WATCHED``) was written
    watched: bool = False


def count_handled(db: QubesDBConnection, path: str) -> None:
    """Add one to a ``*_handled`` counter, as upstream counts each handled change.

    The counter lives in the qube's own QubesDB, so a value that is no
    number restarts it rather than stopping the worker.
    """
    untrusted_count = db.read(path)
    try:
        count = int(untrusted_count or b"0")
    except ValueError:
        count = 0
    db.write(path, str(count + 1))


def read_connected(
    db: QubesDBConnection,
) -> tuple[frozenset[IPAddress], list[tuple[str, str]]]:
    """This hop's connected clients (both families), and ``(path, why)`` of words refused."""
    connected: set[IPAddress] = set()
    problems = []
    for path, version in CONNECTED_IPS.items():
        addresses, refused = parse_address_list(db.read(path), version)
        connected |= addresses
        problems += [(path, problem) for problem in refused]
    return frozenset(connected), problems


def read_completed(db: QubesDBConnection, base: str) -> dict[str, bytes] | None:
    """The entries below ``base`` (keys relative to it) once dom0 wrote ``base``; else None."""
    if db.read(base) is None:
        return None
    return {path[len(base) + 1 :]: value for path, value in db.multiread(base + "/").items()}


def end_flows(
    flows: Callable[[], list[conntrack.Flow]],
    what: str,
    tool: conntrack.Tool,
    logger: logging.Logger = log,
) -> None:
    """End the tracked ``flows()`` that ``what`` (changed) stopped admitting; log a failure."""
    try:
        conntrack.end(flows(), f"{what} changed", tool)
    except conntrack.ConntrackError as err:
        logger.error("cannot end the flows the %s no longer admit: %s", what, err)


def ours(path: str, directory: str) -> bool:
    """Whether a path lies in ``directory``."""
    return path.startswith(directory) or path == directory.rstrip("/")


def concerns(path: str, directory: str) -> bool:
    """Whether a watch event may change what ``directory``'s kind renders.

    Its entries (ours, or a parent removed) or the connected clients.
    """
    return (
        ours(path, directory)
        or path in CONNECTED_IPS
        or (path.endswith("/") and directory.startswith(path))
    )


def classify(paths: Iterable[str], directory: str) -> Changes:
    """Sort watch events; an address counts only once dom0 writes its completion path.

    Events below ``DIRECTORY/IP/`` belong to a set still being written
    (dom0 clears the directory, writes each key, then ``DIRECTORY/IP``);
    the rules in force stay until it is done.
    """
    changes = Changes()
    for path in paths:
        if path in CONNECTED_IPS:
            changes.connected = True
            continue
        if not concerns(path, directory):
            continue
        # "/qns-forward", "/" and the like mean: read every address again
        rest = path[len(directory) :] if path.startswith(directory) else ""
        if not rest:
            changes.full = True
        elif "/" not in rest:
            changes.targets.add(rest)
    return changes


def address_order(address: IPAddress) -> tuple[int, int]:
    """Sort key: IPv4 first, then by address, so chains and logs are deterministic."""
    return address.version, int(address)


Item = TypeVar("Item")


def by_address(targets: Mapping[IPAddress, Item]) -> list[tuple[IPAddress, Item]]:
    """Targets in address order (:func:`address_order`)."""
    return sorted(targets.items(), key=lambda item: address_order(item[0]))


Parsed = TypeVar("Parsed")


class EntryDirectory(Generic[Parsed]):
    """One QubesDB directory of per-address entries, kept in the kernel.

    Subclasses name the directory and say how an address's entries parse
    (:meth:`parse`) and how a change is applied (:meth:`apply_reloaded`,
    :meth:`apply_handled`); reading, events, fail-closed parsing, refused
    addresses, handled counters and the flow cut are here.
    """

    DIRECTORY: ClassVar[str]
    HANDLED: ClassVar[str]
    #: for the log: "no {LABEL} to IP", "{KIND} rules changed"
    LABEL: ClassVar[str]
    KIND: ClassVar[str]
    #: whether this kind logs the words of ``/connected-ips(6)`` it ignores (one kind does)
    LOGS_CONNECTED: ClassVar[bool] = False
    #: QubesDB paths outside the directory this kind follows too (:meth:`watched_changed`)
    WATCHED: ClassVar[tuple[str, ...]] = ()

    def __init__(self, db: QubesDBConnection, tool: conntrack.Tool = conntrack.NETLINK) -> None:
        self.db = db
        #: the conntrack table, to end the flows a change stops admitting
        self.tool = tool
        #: per address, its entries parsed (or refused, and why), as dom0 completed them
        self.targets: dict[IPAddress, Parsed | Refused] = {}
        #: addresses whose rules nft refused, left out until dom0 rewrites them
        self.refused: dict[IPAddress, str] = {}
        #: this hop's clients (``/connected-ips(6)``); rules point at nothing else
        self.connected: frozenset[IPAddress] = frozenset()

    # -- what a kind supplies ------------------------------------------------

    def parse(self, address: IPAddress, untrusted_entries: dict[str, bytes]) -> Parsed:
        """An address's entries, validated; EntryError (the reason) if any does not parse."""
        raise NotImplementedError

    def apply_reloaded(self, gone: set[IPAddress], *, force: bool) -> None:
        """Apply after every address was read again (``gone``: those no longer there)."""
        raise NotImplementedError

    def apply_handled(self, handled: list[IPAddress], moved: frozenset[IPAddress]) -> None:
        """Apply after a batch of events: ``handled`` re-read, ``moved`` (dis)connected."""
        raise NotImplementedError

    def forget(self) -> None:
        """Forget what the kernel is believed to hold (SIGHUP): write it whole next."""

    def watched_changed(self) -> None:
        """One of :attr:`WATCHED` was written."""

    def removed(self, address: IPAddress) -> None:
        """An address's entries went (dom0 removed its completion path)."""
        log.info("%s to %s removed", self.LABEL, address)

    def log_refusal(self, address: IPAddress, reason: str) -> None:
        """An address gets no rules at all, for ``reason``."""
        log.error("no %s to %s: %s", self.LABEL, address, reason)

    # -- watch events -----------------------------------------------------

    def ours(self, path: str) -> bool:
        return ours(path, self.DIRECTORY)

    def concerns(self, path: str) -> bool:
        return concerns(path, self.DIRECTORY) or path in self.WATCHED

    def classify(self, paths: Iterable[str]) -> Changes:
        paths = list(paths)
        changes = classify(paths, self.DIRECTORY)
        changes.watched = any(path in self.WATCHED for path in paths)
        return changes

    # -- reading QubesDB --------------------------------------------------

    def _target_address(self, untrusted_text: str) -> IPAddress | None:
        try:
            return parse_address(untrusted_text)
        except EntryError as err:
            log.error("ignoring %r: %s", self.DIRECTORY + untrusted_text[:48], err)
            return None

    def parsed(self, address: IPAddress, untrusted_entries: dict[str, bytes]) -> Parsed | Refused:
        """:meth:`parse`, failing closed: the address refused, and why (logged)."""
        try:
            return self.parse(address, untrusted_entries)
        except EntryError as err:
            self.log_refusal(address, str(err))
            return Refused(str(err))

    def _read_target(self, address: IPAddress) -> Parsed | Refused | None:
        """An address's entries once dom0 completed them; None if it has none."""
        untrusted_entries = read_completed(self.db, f"{self.DIRECTORY}{address}")
        return None if untrusted_entries is None else self.parsed(address, untrusted_entries)

    def _load_target(self, address: IPAddress) -> None:
        target = self._read_target(address)
        self.refused.pop(address, None)
        if target is None:
            if self.targets.pop(address, None) is not None:
                self.removed(address)
        else:
            self.targets[address] = target

    def _load_connected(self) -> None:
        self.connected, problems = read_connected(self.db)
        for path, problem in problems if self.LOGS_CONNECTED else ():
            log.error("%s: ignoring an entry: %s", path, problem)

    # -- shared steps of applying -------------------------------------------

    def count_handled(self, address: IPAddress) -> None:
        """Count the handling of an address, as upstream counts a client's."""
        count_handled(self.db, f"{self.HANDLED}{address}")

    def _refuse_failing(
        self, candidates: Iterable[tuple[IPAddress, Any]], check: Callable[[IPAddress, Any], None]
    ) -> bool:
        """Check each candidate's rules alone (nft's check mode); leave out those refused."""
        found = False
        for address, rendered in candidates:
            try:
                check(address, rendered)
            except NFT_ERRORS as err:
                reason = f"nft refused its rules: {err}"
                self.log_refusal(address, reason)
                self.refused[address] = reason
                found = True
        return found

    def end_flows(self, flows: Callable[[], list[conntrack.Flow]]) -> None:
        """End the tracked ``flows()`` a change stopped admitting (logged if conntrack fails)."""
        end_flows(flows, f"{self.KIND} rules", self.tool)

    # -- entry points -----------------------------------------------------

    def reload(self, *, force: bool = False) -> None:
        """Re-read every address and apply what changed; ``force``: write ours whole."""
        self.refused.clear()
        if force:
            self.forget()
        untrusted_names = {
            path[len(self.DIRECTORY) :].split("/", 1)[0] for path in self.db.list(self.DIRECTORY)
        }
        targets: dict[IPAddress, Parsed | Refused] = {}
        for untrusted_name in sorted(untrusted_names):
            address = self._target_address(untrusted_name) if untrusted_name else None
            if address is None:
                continue
            target = self._read_target(address)
            if target is not None:
                targets[address] = target
        gone = self.targets.keys() - targets.keys()
        self.targets = targets
        self._load_connected()
        self.apply_reloaded(gone, force=force)

    def handle(self, changes: Changes) -> None:
        """React to one batch of watch events."""
        if changes.watched:
            self.watched_changed()
        if changes.full:
            self.reload()
            return
        before = self.connected
        if changes.connected:
            self._load_connected()
        handled = []
        for untrusted_name in sorted(changes.targets):
            address = self._target_address(untrusted_name)
            if address is not None:
                self._load_target(address)
                handled.append(address)
        if handled or changes.connected:
            self.apply_handled(handled, before ^ self.connected)

    # -- timers and sockets of a kind, for the worker's select loop ----------

    def fds(self) -> tuple[int, ...]:
        """Sockets the worker should wait on for this kind (none by default)."""
        return ()

    def next_wake(self) -> float | None:
        """When (``time.monotonic()``) this kind wants ``wake`` called anyway; None: never."""
        return None

    def wake(self, ready: Collection[int], now: float) -> None:
        """Some of ``fds`` are readable, or ``next_wake`` has come (or neither: a spurious call)."""


Target = tuple[Any, ...] | Refused
#: Per target address, the items nft holds for it (targets with none left out).
InForce = Mapping[IPAddress, tuple[Any, ...]]


class ChainDirectory(EntryDirectory[tuple[Any, ...]]):
    """A directory kept as objects of its own per family (chains, sets, maps) in one transaction.

    Forwards, inbound rules and routed addresses: an address's entries are
    a tuple of items, each pointing at a connected client
    (:meth:`destination`); a kind renders them per family (:meth:`desired`)
    and, if it likes, turns a difference into element updates
    (:meth:`family_commands`). It remembers what nft holds of its own (the
    state of its last transaction), so a change sends only the difference
    and a change that changes nothing sends nothing; its transactions are
    its own, so one kind refused never holds back another.
    """

    CHAINS: ClassVar[tuple[str, ...]]
    HOOKS: ClassVar[Mapping[str, BaseChainHook]]
    #: for the log: "{KIND} rules updated (N {ITEMS})"
    ITEMS: ClassVar[str]

    def __init__(
        self, db: QubesDBConnection, runner: Runner, tool: conntrack.Tool = conntrack.NETLINK
    ) -> None:
        super().__init__(db, tool)
        self.runner = runner
        #: what the last accepted transaction put in force, per target
        self.in_force: dict[IPAddress, tuple[Any, ...]] = {}
        #: (target, address) left out as not connected, logged once
        self.skipped: set[tuple[IPAddress, IPAddress]] = set()
        #: per family, what nft holds of this kind, as :meth:`desired` gives it;
        #: a family missing is unknown, and written whole at the next commit
        self.held: dict[Family, Any] = {}
        #: per target's items (by identity): (the items, the connected clients, what
        #: of them is kept), so an update filters only the targets it changed.
        #: Memos here are keyed by ``id()``: an address hashes in Python, slowly.
        self._kept: dict[int, tuple[Target, frozenset[IPAddress], Target]] = {}

    def destination(self, address: IPAddress, item: Any) -> IPAddress:
        """The address an item of target ``address`` sends traffic to (must be connected)."""
        raise NotImplementedError

    def desired(self, targets: Mapping[IPAddress, Target]) -> dict[Family, Any]:
        """What every family must hold of this kind for ``targets`` (for
        :meth:`family_commands`; equal values: nothing to send)."""
        raise NotImplementedError

    def flows_to_end(self, before: InForce, after: InForce) -> list[conntrack.Flow]:
        """Tracked flows that ``before`` admitted and ``after`` no longer does."""
        raise NotImplementedError

    # -- EntryDirectory -------------------------------------------------------

    def forget(self) -> None:
        self.held = {}

    def apply_reloaded(self, gone: set[IPAddress], *, force: bool) -> None:
        self.commit()
        for address in sorted(self.targets.keys() | gone, key=address_order):
            self.count_handled(address)

    def apply_handled(self, handled: list[IPAddress], moved: frozenset[IPAddress]) -> None:
        self.commit()
        for address in handled:
            self.count_handled(address)

    # -- applying ---------------------------------------------------------

    def family_commands(self, family: Family, wanted: Any, held: Any | None) -> str | None:
        """nft text taking the family's objects of this kind from ``held`` to ``wanted``.

        ``held`` is what the family holds of ours, None when unknown (the
        worker just started, a SIGHUP, a refused transaction): then the
        objects are written whole. None: the family cannot take them now
        (it stays unknown). This default rewrites the chains when they
        differ; the forward kind sends element differences instead.
        """
        if held is not None and held == wanted:
            return ""
        return nft_chains.chain_commands(family, wanted, self.runner, self.CHAINS, self.HOOKS)

    def _commands(
        self, targets: Mapping[IPAddress, Target], held: Mapping[Family, Any]
    ) -> tuple[str, dict[Family, Any]]:
        """The text for ``targets``, and what each family holds once nft accepted it."""
        wanted = self.desired(targets)
        text, holds = "", {}
        for family in FAMILIES:
            part = self.family_commands(family, wanted[family], held.get(family))
            if part is not None:
                text += part
                holds[family] = wanted[family]
        return text, holds

    def _connected_only(self, address: IPAddress, target: Target) -> Target:
        """The items of a target that point at a connected client; the others logged once.

        A stale entry (dom0 missed removing it) must never reach a qube
        that reuses the address, so only clients of this hop count.
        """
        if isinstance(target, Refused):
            return target
        destinations = [self.destination(address, item) for item in target]
        if all(to in self.connected for to in destinations):  # as dom0 writes them
            if self.skipped:
                self.skipped.difference_update((address, to) for to in destinations)
            return target
        kept = []
        for item in target:
            to = self.destination(address, item)
            if to in self.connected:
                self.skipped.discard((address, to))
                kept.append(item)
            elif (address, to) not in self.skipped:
                self.skipped.add((address, to))
                log.warning("%s to %s: leaving out what goes to %s: not a connected client",
                            self.LABEL, address, to)
        return tuple(kept)

    def _effective(self) -> dict[IPAddress, Target]:
        targets, kept = self.targets.copy(), {}
        for address, target in self.targets.items():
            known = self._kept.get(id(target))
            if known is None or known[0] is not target or known[1] is not self.connected:
                known = (target, self.connected, self._connected_only(address, target))
            kept[id(target)] = known
            if known[2] is not target:
                targets[address] = known[2]
        self._kept = kept
        for address, reason in self.refused.items():
            targets[address] = Refused(reason)
        return targets

    def _check_alone(self, address: IPAddress, target: Target) -> None:
        text, _holds = self._commands({address: target}, {})
        if text:
            self.runner(text, check=True)

    def _put_in_force(self, after: dict[IPAddress, tuple[Any, ...]]) -> None:
        """Record what nft now holds, and end the flows it no longer admits."""
        before, self.in_force = self.in_force, after
        if before != after:
            self.end_flows(lambda: self.flows_to_end(before, after))

    def commit(self) -> bool:
        """Bring our objects to the target state in one transaction; False if refused.

        Only what differs from what nft holds is sent; nothing when nothing
        differs. If nft refuses, targets it refuses alone are left out and
        the rest retried; if that fails too, every rule of this kind is
        removed (fail closed).
        """
        for attempt in range(2):
            effective = self._effective()
            try:
                text, holds = self._commands(effective, self.held)
                if text:
                    self.runner(text)
            except NFT_ERRORS as err:
                log.error("nft refused the %s update: %s", self.KIND, err)
                self.held = {}
                alone = [(a, t) for a, t in by_address(effective) if not isinstance(t, Refused)]
                if attempt == 0 and self._refuse_failing(alone, self._check_alone):
                    continue
                break
            else:
                self.held = holds
                kept = effective.copy()
                for address in [a for a, t in kept.items() if isinstance(t, Refused) or not t]:
                    del kept[address]
                if text:
                    count = sum(len(t) for t in kept.values())
                    log.info("%s rules updated (%d %s)", self.KIND, count, self.ITEMS)
                self._put_in_force(kept)
                return True
        log.error("removing every %s rule", self.KIND)
        try:
            self.remove()
        except NFT_ERRORS as err:
            log.error("could not remove the %s rules either: %s", self.KIND, err)
            return False
        self._put_in_force({})
        return False

    def stop(self) -> None:
        """Clean stop of the worker: nothing of this kind left in the kernel."""
        self.remove()

    def remove(self) -> None:
        """Delete our objects and jumps in both families (clean stop, fail closed)."""
        self.held = {}
        text, holds = self._commands({}, {})
        if text:
            self.runner(text)
        self.held = holds
