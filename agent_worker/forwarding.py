"""The forward half of the firewall worker: ``/qns-forward/`` to maps and chains of ``qubes``.

Thin shell around :mod:`agent_worker.forward` (parsing, elements, rule
text) and :mod:`agent_worker.nft_chains` (chains and jumps). The outbound
half (:class:`agent_worker.firewall.Worker`) owns the ``qubes-firewall``
tables; this one owns, in ``ip qubes`` and ``ip6 qubes``, the maps and sets
holding the steps and the chains looking them up: ``qns-dnat`` (nat
prerouting) and ``qns-forward`` (jumped to from the ``forward`` chain right
after ``custom-forward``, so ahead of the ``oifgroup 2`` drop).

Each change is its own nft transaction, separate from the outbound one: a
forward nft refuses then never holds back an outbound update, and the
reverse. Within it, both families change together or not at all. A target
whose entries do not all parse gets no rules at all.

:class:`ChainHalf` is that machinery for any per-target directory; the
inbound half (:mod:`agent_worker.inbound`) is the other one. It remembers
what nft holds of its own (the state of its last transaction), so a change
sends only the difference (a step is an element added or deleted) and a
change that changes nothing sends nothing; it lists the table's chains only
to create, rewrite or remove its chains and jumps.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from agent_worker import conntrack, hop_ports, nft_chains
from agent_worker.entries import MAX_VALUE, EntryError
from agent_worker.forward import (
    DNAT_CHAIN,
    FORWARD_CHAIN,
    NAT_TABLE,
    OBJECTS,
    Elements,
    Step,
    TakenPorts,
    accept_rules,
    declarations,
    dnat_rules,
    element_key,
    family_elements,
    parse_target,
    step_admits,
)
from agent_worker.nft_chains import BaseChainHook, Family, NftError, Runner
from agent_worker.qdb_parse import IPAddress, parse_address, parse_address_list

log = logging.getLogger("qubes.firewall")

FORWARD_DIR = "/qns-forward/"
#: this hop's clients, per family; rules only ever point at one of them
CONNECTED_IPS: dict[str, Literal[4, 6]] = {"/connected-ips": 4, "/connected-ips6": 6}
HANDLED_DIR = "/qns-forward_handled/"
#: Written by the worker: per target, the steps it refused because they
#: would take a port this hop serves itself, one ``PROTO FIRST-LAST: why`` a line.
REFUSED_DIR = "/qns-forward_refused/"
FAMILIES: tuple[Family, ...] = ("ip", "ip6")
#: our chains in Qubes' table ``qubes``
CHAINS = (FORWARD_CHAIN,)
HOOKS = {FORWARD_CHAIN: BaseChainHook(parent="forward")}
#: our table's chain, holding the DNAT lookups
DNAT_DECLARATION = "type nat hook prerouting priority dstnat; policy accept;"


class QubesDBConnection(Protocol):
    """The qubesdb calls this half makes (a subset of the worker's)."""

    def read(self, path: str) -> bytes | None: ...
    def write(self, path: str, value: str | bytes) -> None: ...
    def multiread(self, path: str) -> dict[str, bytes]: ...
    def list(self, path: str) -> list[str]: ...


@dataclass(frozen=True)
class Refused:
    """A target that gets no forward rules, and why (for the log)."""

    reason: str


Target = tuple[Any, ...] | Refused
#: (family, iif, protocol, first port, last port) a step holds in a DNAT map
Claim = tuple[str, str, str, int, int]
#: Per target address, the items nft holds for it (targets with none left out).
InForce = Mapping[IPAddress, tuple[Any, ...]]


@dataclass
class ForwardChanges:
    """What a batch of watch events asks the forward half to re-read."""

    full: bool = False
    targets: set[str] = field(default_factory=set)
    #: ``/connected-ips(6)`` changed: re-filter what is rendered
    connected: bool = False


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


def ours(path: str, directory: str = FORWARD_DIR) -> bool:
    """Whether a path lies in ``directory`` (so the outbound half can skip it)."""
    return path.startswith(directory) or path == directory.rstrip("/")


def concerns(path: str, directory: str = FORWARD_DIR) -> bool:
    """Whether a watch event may change what ``directory``'s half renders.

    Its entries (ours, or a parent removed) or the connected clients.
    """
    return (
        ours(path, directory)
        or path in CONNECTED_IPS
        or (path.endswith("/") and directory.startswith(path))
    )


def classify(paths: Iterable[str], directory: str = FORWARD_DIR) -> ForwardChanges:
    """Sort watch events; a target counts only once dom0 writes its completion path.

    Events below ``/qns-forward/IP/`` belong to a set still being written
    (dom0 clears the directory, writes each key, then ``/qns-forward/IP``).
    """
    changes = ForwardChanges()
    for path in paths:
        if path in CONNECTED_IPS:
            changes.connected = True
            continue
        if not concerns(path, directory):
            continue
        # "/qns-forward", "/" and the like mean: read every target again
        rest = path[len(directory) :] if path.startswith(directory) else ""
        if not rest:
            changes.full = True
        elif "/" not in rest:
            changes.targets.add(rest)
    return changes


def by_address(targets: Mapping[IPAddress, Target]) -> list[tuple[IPAddress, Target]]:
    """Targets in address order (IPv4 first), so the chains are deterministic."""
    return sorted(targets.items(), key=lambda item: (item[0].version, int(item[0])))


def _taking(steps: Target, served: list[hop_ports.Served]) -> dict[Step, str]:
    """The steps that would take a port the hop serves, each with why."""
    taking = {}
    for step in steps if served and not isinstance(steps, Refused) else ():
        hit = next((s for s in served if s.overlaps(step.proto, step.ports)), None)
        if hit is not None:
            taking[step] = f"{step.proto} {step.ports[0]}-{step.ports[1]}: {hit.why}"
    return taking


def _any_element(elements: Elements) -> bool:
    return any(elements.values())


def element_commands(family: Family, held: Elements, wanted: Elements) -> str:
    """Elements to delete then to add, per map, from ``held`` to ``wanted``."""
    lines = []
    for name in OBJECTS:
        gone = held.get(name, frozenset()) - wanted[name]
        new = wanted[name] - held.get(name, frozenset())
        where = f"{family} {NAT_TABLE} {name}"
        if gone:
            keys = ", ".join(sorted(element_key(element) for element in gone))
            lines.append(f"delete element {where} {{ {keys} }}")
        if new:
            lines.append(f"add element {where} {{ {', '.join(sorted(new))} }}")
    return "".join(line + "\n" for line in lines)


def nat_table_commands(family: Family, wanted: Elements) -> str:
    """Our table written whole: the maps with ``wanted``, then the chain looking them up.

    ``add`` then ``flush``: the same text whether the table, a map or the
    chain exists already or not.
    """
    lines = [f"add table {family} {NAT_TABLE}"]
    for name, declared in declarations(family).items():
        lines += [f"add {declared}", f"flush map {family} {NAT_TABLE} {name}"]
    chain = f"{family} {NAT_TABLE} {DNAT_CHAIN}"
    lines += [f"add chain {chain} {{ {DNAT_DECLARATION} }}", f"flush chain {chain}"]
    lines += [f"add rule {chain} {rule}" for rule in dnat_rules(family)]
    empty = {name: frozenset[str]() for name in OBJECTS}
    return "".join(line + "\n" for line in lines) + element_commands(family, empty, wanted)


def chain_commands(
    family: Family,
    wanted: Mapping[str, list[str]],
    runner: Runner,
    names: tuple[str, ...],
    hooks: Mapping[str, BaseChainHook],
) -> str | None:
    """nft text giving the family's chains ``names`` exactly ``wanted``, whatever they hold now.

    Chains with no rule at all lose their jumps and go, so a hop that
    forwards nothing keeps table ``qubes`` exactly as Qubes made it. None:
    the family cannot take them (no table ``qubes``, or no chain our jump
    goes in; upstream's ``ip6 qubes`` holds only ``prerouting`` while IPv6
    is off). Lists the table's chain names and the parents' rules only.
    """
    present = nft_chains.chain_names(family, runner)
    if present is None:
        return None
    if any(wanted.values()):
        missing = sorted({p for c in names if (p := hooks[c].parent) and p not in present})
        if missing:
            log.debug("skipping %s qubes: no chain %s", family, ", ".join(missing))
            return None
        items = nft_chains.parent_items(family, names, hooks, runner)
        return nft_chains.build_transaction(
            family, {c: list(wanted.get(c, [])) for c in names}, hooks, runner, items
        )
    if not present & set(names):
        return ""
    items = nft_chains.parent_items(family, names, hooks, runner)
    return nft_chains.removal_commands(family, names, hooks, items, present)


class ChainHalf:
    """A half of the worker: one QubesDB directory of targets, kept as ``qns-*`` chains.

    Forwards and inbound rules work the same way (a directory per target
    address, the completion path, a handled counter, fail closed per
    target, one transaction of their own); subclasses say which directory,
    which chains and how entries parse and render.
    """

    DIRECTORY: ClassVar[str]
    HANDLED: ClassVar[str]
    CHAINS: ClassVar[tuple[str, ...]]
    HOOKS: ClassVar[Mapping[str, BaseChainHook]]
    #: for the log: "no {LABEL} to IP", "{KIND} rules updated (N {ITEMS})"
    LABEL: ClassVar[str]
    KIND: ClassVar[str]
    ITEMS: ClassVar[str]

    def __init__(
        self, db: QubesDBConnection, runner: Runner, tool: conntrack.Tool = conntrack.NETLINK
    ) -> None:
        self.db = db
        self.runner = runner
        #: the conntrack table, to end the flows a change stops admitting
        self.tool = tool
        self.targets: dict[IPAddress, Target] = {}
        #: what the last accepted transaction put in force, per target
        self.in_force: dict[IPAddress, tuple[Any, ...]] = {}
        #: targets whose rules nft refused, left out until dom0 rewrites them
        self.refused: dict[IPAddress, str] = {}
        #: this hop's clients (``/connected-ips(6)``); rules point at nothing else
        self.connected: frozenset[IPAddress] = frozenset()
        #: (target, address) left out as not connected, logged once
        self.skipped: set[tuple[IPAddress, IPAddress]] = set()
        #: per family, what nft holds of this half, as :meth:`desired` gives it;
        #: a family missing is unknown, and written whole at the next commit
        self.held: dict[Family, Any] = {}
        #: per target's items (by identity): (the items, the connected clients, what
        #: of them is kept), so an update filters only the targets it changed.
        #: Memos here are keyed by ``id()``: an address hashes in Python, slowly.
        self._kept: dict[int, tuple[Target, frozenset[IPAddress], Target]] = {}

    def parse(self, address: IPAddress, untrusted_entries: dict[str, bytes]) -> tuple[Any, ...]:
        """A target's entries, validated; EntryError if any does not parse."""
        raise NotImplementedError

    def destination(self, address: IPAddress, item: Any) -> IPAddress:
        """The address an item of target ``address`` sends traffic to (must be connected)."""
        raise NotImplementedError

    def desired(self, targets: Mapping[IPAddress, Target]) -> dict[Family, Any]:
        """What every family must hold of this half for ``targets`` (for
        :meth:`family_commands`; equal values: nothing to send)."""
        raise NotImplementedError

    def flows_to_end(self, before: InForce, after: InForce) -> list[conntrack.Flow]:
        """Tracked flows that ``before`` admitted and ``after`` no longer does."""
        raise NotImplementedError

    # -- watch events -----------------------------------------------------

    def ours(self, path: str) -> bool:
        return ours(path, self.DIRECTORY)

    def concerns(self, path: str) -> bool:
        return concerns(path, self.DIRECTORY)

    def classify(self, paths: Iterable[str]) -> ForwardChanges:
        return classify(paths, self.DIRECTORY)

    # -- reading QubesDB --------------------------------------------------

    def _target_address(self, untrusted_text: str) -> IPAddress | None:
        try:
            return parse_address(untrusted_text)
        except EntryError as err:
            log.error("ignoring %r: %s", self.DIRECTORY + untrusted_text[:48], err)
            return None

    def _read_target(self, address: IPAddress) -> Target | None:
        """A target's entries once dom0 completed them; None if it has none."""
        base = f"{self.DIRECTORY}{address}"
        if self.db.read(base) is None:
            return None
        untrusted_entries = {
            path[len(base) + 1 :]: value
            for path, value in self.db.multiread(base + "/").items()
        }
        try:
            return self.parse(address, untrusted_entries)
        except EntryError as err:
            log.error("no %s to %s: %s", self.LABEL, address, err)
            return Refused(str(err))

    def _record(self, address: IPAddress) -> None:
        """Count the handling of a target, as upstream counts a client's."""
        count_handled(self.db, f"{self.HANDLED}{address}")

    # -- applying ---------------------------------------------------------

    def family_commands(self, family: Family, wanted: Any, held: Any | None) -> str | None:
        """nft text taking the family's objects of this half from ``held`` to ``wanted``.

        ``held`` is what the family holds of ours, None when unknown (the
        worker just started, a SIGHUP, a refused transaction): then the
        objects are written whole. None: the family cannot take them now
        (it stays unknown). This default rewrites the chains when they
        differ; the forward half sends element differences instead.
        """
        if held is not None and held == wanted:
            return ""
        return chain_commands(family, wanted, self.runner, self.CHAINS, self.HOOKS)

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

    def _load_connected(self) -> None:
        """Re-read the connected clients (the outbound worker logs garbage in them)."""
        self.connected, _problems = read_connected(self.db)

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

    def _find_refused(self, effective: Mapping[IPAddress, Target]) -> bool:
        """Check each target's rules alone in nft's check mode; leave out the refused."""
        found = False
        for address, target in by_address(effective):
            if isinstance(target, Refused):
                continue
            try:
                text, _holds = self._commands({address: target}, {})
                if text:
                    self.runner(text, check=True)
            except (NftError, ValueError, KeyError) as err:
                reason = f"nft refused its rules: {err}"
                log.error("no %s to %s: %s", self.LABEL, address, reason)
                self.refused[address] = reason
                found = True
        return found

    def _put_in_force(self, after: dict[IPAddress, tuple[Any, ...]]) -> None:
        """Record what nft now holds, and end the flows it no longer admits."""
        before, self.in_force = self.in_force, after
        if before == after:
            return
        try:
            conntrack.end(self.flows_to_end(before, after), f"{self.KIND} rules changed",
                          self.tool)
        except conntrack.ConntrackError as err:
            log.error("cannot end the flows the %s rules no longer admit: %s", self.KIND, err)

    def commit(self) -> bool:
        """Bring our objects to the target state in one transaction; False if refused.

        Only what differs from what nft holds is sent; nothing when nothing
        differs. If nft refuses, targets it refuses alone are left out and
        the rest retried; if that fails too, every rule of this half is
        removed (fail closed).
        """
        for attempt in range(2):
            effective = self._effective()
            try:
                text, holds = self._commands(effective, self.held)
                if text:
                    self.runner(text)
            except (NftError, ValueError, KeyError) as err:
                log.error("nft refused the %s update: %s", self.KIND, err)
                self.held = {}
                if attempt == 0 and self._find_refused(effective):
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
        except (NftError, ValueError, KeyError) as err:
            log.error("could not remove the %s rules either: %s", self.KIND, err)
            return False
        self._put_in_force({})
        return False

    # -- entry points -----------------------------------------------------

    def reload(self, *, force: bool = False) -> None:
        """Re-read every target and apply what changed; ``force``: write our objects whole."""
        self.refused.clear()
        if force:
            self.held = {}
        untrusted_names = {
            path[len(self.DIRECTORY) :].split("/", 1)[0]
            for path in self.db.list(self.DIRECTORY)
        }
        targets: dict[IPAddress, Target] = {}
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
        self.commit()
        for address in sorted(targets.keys() | gone, key=lambda a: (a.version, a)):
            self._record(address)

    def handle(self, changes: ForwardChanges) -> None:
        """React to one batch of watch events."""
        if changes.full:
            self.reload()
            return
        if changes.connected:
            self._load_connected()
        handled = []
        for untrusted_name in sorted(changes.targets):
            address = self._target_address(untrusted_name)
            if address is None:
                continue
            target = self._read_target(address)
            self.refused.pop(address, None)
            if target is None:
                if self.targets.pop(address, None) is not None:
                    log.info("%s to %s removed", self.LABEL, address)
            else:
                self.targets[address] = target
            handled.append(address)
        if handled or changes.connected:
            self.commit()
            for address in handled:
                self._record(address)

    # -- timers and sockets of a half, for the worker's select loop ----------

    def fds(self) -> tuple[int, ...]:
        """Sockets the worker should wait on for this half (none by default)."""
        return ()

    def next_wake(self) -> float | None:
        """When (``time.monotonic()``) this half wants ``wake`` called anyway; None: never."""
        return None

    def wake(self, ready: Collection[int], now: float) -> None:
        """Some of ``fds`` are readable, or ``next_wake`` has come (or neither: a spurious call)."""

    def remove(self) -> None:
        """Delete our objects and jumps in both families (clean stop, fail closed)."""
        self.held = {}
        text, holds = self._commands({}, {})
        if text:
            self.runner(text)
        self.held = holds


class Forwarder(ChainHalf):
    """The forward half: ``/qns-forward/`` steps to the maps and sets ``qns-*`` chains look up.

    A step on a port this hop serves itself (:mod:`agent_worker.hop_ports`)
    is left out, logged, and reported under ``/qns-forward_refused/TARGET``
    in this hop's QubesDB, checked again at every update and SIGHUP. A
    target with a step on a port another target's step already holds (in
    address order) gets no step at all, and is logged.
    """

    DIRECTORY = FORWARD_DIR
    HANDLED = HANDLED_DIR
    CHAINS = CHAINS
    HOOKS = HOOKS
    LABEL = "forwards"
    KIND = "forward"
    ITEMS = "steps"

    def __init__(
        self,
        db: QubesDBConnection,
        runner: Runner,
        tool: conntrack.Tool = conntrack.NETLINK,
        own_sockets: Callable[[], list[hop_ports.Served]] = hop_ports.sockets,
    ) -> None:
        super().__init__(db, runner, tool)
        #: what this hop's own sockets serve (:func:`agent_worker.hop_ports.sockets`)
        self.own_sockets = own_sockets
        #: per target, the steps left out as taking a port this hop serves, and why
        self.taken: dict[IPAddress, dict[Step, str]] = {}
        #: targets left out for a step meeting another target's, and why (logged once)
        self.overlapping: dict[IPAddress, str] = {}
        #: per target, computed from its steps alone and kept while they are the same
        #: object: the steps taking a port served (as :attr:`served` was), its port
        #: claims, its map elements
        self.served: list[hop_ports.Served] = []
        self._on_served: dict[int, tuple[Target, dict[Step, str]]] = {}
        self._claims: dict[int, tuple[Target, list[Claim]]] = {}
        self._elements: dict[int, tuple[Target, tuple[tuple[Family, str, str], ...]]] = {}

    def commit(self) -> bool:
        self._leave_out_own_ports()
        return super().commit()

    def _leave_out_own_ports(self) -> None:
        """Find the steps that would take a port this hop serves; report what changed."""
        steps = [t for t in self.targets.values() if not isinstance(t, Refused) and t]
        served = hop_ports.served(self.runner, self.own_sockets) if steps else []
        if served != self.served:
            self._on_served, self.served = {}, served
        taken: dict[IPAddress, dict[Step, str]] = {}
        memo = {}
        for address, target in self.targets.items():
            if isinstance(target, Refused):
                continue
            known = self._on_served.get(id(target))
            if known is None or known[0] is not target:
                known = (target, _taking(target, served))
            memo[id(target)] = known
            if known[1]:
                taken[address] = known[1]
        self._on_served = memo
        for address in sorted(taken.keys() | self.taken.keys(), key=lambda a: (a.version, a)):
            reasons = taken.get(address, {})
            if reasons == self.taken.get(address, {}):
                continue
            path = f"{REFUSED_DIR}{address}"
            if reasons:
                for reason in reasons.values():
                    log.error("forwards to %s: refusing the step on %s", address, reason)
                self.db.write(path, "\n".join(reasons.values())[:MAX_VALUE])
            else:
                self.db.rm(path)
        self.taken = taken

    def _effective(self) -> dict[IPAddress, Target]:
        targets = super()._effective()
        for address, steps in self.taken.items():
            target = targets.get(address)
            if target is not None and not isinstance(target, Refused):
                targets[address] = tuple(s for s in target if s not in steps)
        return self._without_overlaps(targets)

    def _without_overlaps(self, targets: dict[IPAddress, Target]) -> dict[IPAddress, Target]:
        """Targets with a step on another's ports left out (fail closed), in address order.

        The claims of all steps are sorted once: when no two meet (the usual
        case: dom0 plans none), nothing more is needed.
        """
        claims, memo = [], {}
        for target in targets.values():
            if isinstance(target, Refused):
                continue
            known = self._claims.get(id(target))
            if known is None or known[0] is not target:
                known = (target, [(s.family, s.iif, s.proto, *s.ports) for s in target])
            memo[id(target)] = known
            claims += known[1]
        self._claims = memo
        claims.sort()
        if all(a[:3] != b[:3] or a[4] < b[3] for a, b in itertools.pairwise(claims)):
            self.overlapping = {}
            return targets
        held = TakenPorts()
        overlapping = {}
        for address, target in by_address(targets):
            if isinstance(target, Refused):
                continue
            meeting = held.meets(target)
            if meeting is not None:
                step, other = meeting
                reason = (
                    f"{step.proto} ports {step.ports[0]}-{step.ports[1]} meet those of the"
                    f" step to {other.to} ({other.ports[0]}-{other.ports[1]})"
                )
                overlapping[address] = reason
                targets[address] = Refused(reason)
                if self.overlapping.get(address) != reason:
                    log.error("no %s to %s: %s", self.LABEL, address, reason)
        self.overlapping = overlapping
        return targets

    def parse(self, address: IPAddress, untrusted_entries: dict[str, bytes]) -> tuple[Step, ...]:
        steps = parse_target(untrusted_entries)
        for number, step in enumerate(steps):
            if step.to.version != address.version:
                key = sorted(untrusted_entries)[number]
                raise EntryError(f"entry {key}: to of another family than the target")
        return tuple(steps)

    def destination(self, address: IPAddress, item: Step) -> IPAddress:
        # the next hop (a ProxyVM, client of this hop) or, at the last hop, the target
        return item.to

    def desired(self, targets: Mapping[IPAddress, Target]) -> dict[Family, Elements]:
        """:func:`agent_worker.forward.family_elements` of the targets, each rendered once."""
        found: dict[Family, dict[str, set[str]]] = {
            family: {name: set() for name in OBJECTS} for family in FAMILIES
        }
        memo = {}
        for target in targets.values():
            if isinstance(target, Refused):
                continue
            known = self._elements.get(id(target))
            if known is None or known[0] is not target:
                known = (target, tuple(
                    (family, name, element)
                    for family, maps in family_elements(target).items()
                    for name, elements in maps.items() for element in elements
                ))
            memo[id(target)] = known
            for family, name, element in known[1]:
                found[family][name].add(element)
        self._elements = memo
        return {
            family: {name: frozenset(elements) for name, elements in maps.items()}
            for family, maps in found.items()
        }


    def family_commands(
        self, family: Family, wanted: Elements, held: Elements | None
    ) -> str | None:
        """Element differences while the family holds our objects; else write or remove them.

        Written whole: ``qns-forward`` in table ``qubes`` (or nothing, if
        that table cannot take it) and our table. Removed: both.
        """
        if held is not None and held == wanted:
            return ""
        if held is not None and _any_element(held) and _any_element(wanted):
            return element_commands(family, held, wanted)
        if _any_element(wanted):
            chains = chain_commands(family, {FORWARD_CHAIN: accept_rules()}, self.runner,
                                    self.CHAINS, self.HOOKS)
            return None if chains is None else chains + nat_table_commands(family, wanted)
        chains = chain_commands(family, {FORWARD_CHAIN: []}, self.runner, self.CHAINS,
                                self.HOOKS)
        if nft_chains.table_exists(family, NAT_TABLE, self.runner):
            # the jump and chain first: nothing may point into the table
            return (chains or "") + f"delete table {family} {NAT_TABLE}\n"
        return chains

    def flows_to_end(self, before: InForce, after: InForce) -> list[conntrack.Flow]:
        """Flows a step that went (removed, narrowed, its target gone) had translated.

        Listed per protocol and translated address of the steps that went;
        a flow another step in force still translates the same way stays.
        """
        changed = [(old, after.get(a, ())) for a, old in before.items() if after.get(a) is not old]
        gone = {s for old, _ in changed for s in old} - {s for _, new in changed for s in new}
        if not gone:
            return []
        places = {(s.proto, s.to) for s in gone}
        kept = [s for steps in after.values() for s in steps if (s.proto, s.to) in places]
        ended = []
        for version, proto, to in sorted({(s.to.version, s.proto, s.to) for s in gone}):
            for flow in conntrack.list_flows(version, ["-p", proto, "--reply-src", str(to)],
                                             self.tool):
                if any(step_admits(s, flow) for s in gone) and not any(
                    step_admits(s, flow) for s in kept
                ):
                    ended.append(flow)
        return ended
