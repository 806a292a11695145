"""The forward half of the firewall worker: ``/qns-forward/`` to chains of table ``qubes``.

Thin shell around :mod:`agent_worker.forward` (parsing, rule text) and
:mod:`agent_worker.nft_chains` (atomic chain updates). The outbound half
(:class:`agent_worker.firewall.Worker`) owns the ``qubes-firewall`` tables;
this one owns chains ``qns-dnat`` (nat prerouting) and ``qns-forward``
(jumped to from the ``forward`` chain right after ``custom-forward``, so
ahead of the ``oifgroup 2`` drop) in ``ip qubes`` and ``ip6 qubes``.

Each change is its own nft transaction, separate from the outbound one: a
forward nft refuses then never holds back an outbound update, and the
reverse. Within it, both chains of both families change together or not
at all. A target whose entries do not all parse gets no rules at all.

:class:`ChainHalf` is that machinery for any per-target directory; the
inbound half (:mod:`agent_worker.inbound`) is the other one.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from agent_worker import conntrack, hop_ports, nft_chains
from agent_worker.entries import MAX_VALUE, EntryError
from agent_worker.forward import (
    DNAT_CHAIN,
    FORWARD_CHAIN,
    Step,
    chain_rules,
    parse_target,
    step_admits,
)
from agent_worker.input_rules import ONLY_SYN_OPENS
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
CHAINS = (DNAT_CHAIN, FORWARD_CHAIN)
HOOKS = {
    DNAT_CHAIN: BaseChainHook(
        parent=None, declaration="type nat hook prerouting priority dstnat; policy accept;"
    ),
    FORWARD_CHAIN: BaseChainHook(parent="forward"),
}


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
    return sorted(targets.items(), key=lambda item: (item[0].version, item[0]))


def desired_chains(targets: Mapping[IPAddress, Target]) -> dict[Family, dict[str, list[str]]]:
    """Content of both chains in both families, targets in address order."""
    result: dict[Family, dict[str, list[str]]] = {}
    for family in FAMILIES:
        dnat: list[str] = []
        accept: list[str] = []
        for _address, target in by_address(targets):
            if isinstance(target, Refused):
                continue
            more_dnat, more_accept = chain_rules(list(target), family)
            dnat += more_dnat
            accept += more_accept
        guarded = [ONLY_SYN_OPENS, *accept] if accept else []
        result[family] = {DNAT_CHAIN: dnat, FORWARD_CHAIN: guarded}
    return result


def transaction(
    chains: Mapping[Family, Mapping[str, list[str]]],
    runner: Runner,
    names: tuple[str, ...] = CHAINS,
    hooks: Mapping[str, BaseChainHook] = HOOKS,
) -> str:
    """nft text taking both families to ``chains``; empty families lose our chains.

    A family without any rule gets neither chain nor jump, so a hop that
    forwards nothing keeps table ``qubes`` exactly as Qubes made it. A
    family without table ``qubes``, or without the chain our jump goes
    in, is left alone.
    """
    text = ""
    for family in FAMILIES:
        items = nft_chains.list_table(family, runner)
        if items is None:
            continue
        wanted = chains.get(family, {})
        missing = nft_chains.missing_parents(names, hooks, items)
        if any(wanted.values()) and missing:
            log.debug("skipping %s qubes: no chain %s", family, ", ".join(missing))
        elif any(wanted.values()):
            text += nft_chains.build_transaction(
                family, {c: list(wanted.get(c, [])) for c in names}, hooks, runner, items
            )
        else:
            text += nft_chains.removal_commands(family, names, hooks, items)
    return text


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
        self, db: QubesDBConnection, runner: Runner, tool: conntrack.Tool = conntrack.run_tool
    ) -> None:
        self.db = db
        self.runner = runner
        #: runs the conntrack tool, to end the flows a change stops admitting
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

    def parse(self, address: IPAddress, untrusted_entries: dict[str, bytes]) -> tuple[Any, ...]:
        """A target's entries, validated; EntryError if any does not parse."""
        raise NotImplementedError

    def destination(self, address: IPAddress, item: Any) -> IPAddress:
        """The address an item of target ``address`` sends traffic to (must be connected)."""
        raise NotImplementedError

    def desired(self, targets: Mapping[IPAddress, Target]) -> dict[Family, dict[str, list[str]]]:
        """Content of every chain of this half in both families."""
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

    def _transaction(self, targets: Mapping[IPAddress, Target]) -> str:
        return transaction(self.desired(targets), self.runner, self.CHAINS, self.HOOKS)

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
        targets = {a: self._connected_only(a, t) for a, t in self.targets.items()}
        for address, reason in self.refused.items():
            targets[address] = Refused(reason)
        return targets

    def _find_refused(self) -> bool:
        """Check each target's rules alone in nft's check mode; leave out the refused."""
        found = False
        for address, target in by_address(self._effective()):
            if isinstance(target, Refused):
                continue
            try:
                text = self._transaction({address: target})
                if text:
                    self.runner(text, check=True)
            except (NftError, ValueError, KeyError) as err:
                reason = f"nft refused its rules: {err}"
                log.error("no %s to %s: %s", self.LABEL, address, reason)
                self.refused[address] = reason
                found = True
        return found

    def _send(self) -> None:
        text = self._transaction(self._effective())
        if text:
            self.runner(text)

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
        """Bring our chains to the target state in one transaction; False if refused.

        If nft refuses, targets it refuses alone are left out and the rest
        retried; if that fails too, every rule of this half is removed (fail closed).
        """
        for attempt in range(2):
            try:
                self._send()
            except (NftError, ValueError, KeyError) as err:
                log.error("nft refused the %s update: %s", self.KIND, err)
                if attempt == 0 and self._find_refused():
                    continue
                break
            else:
                effective = {
                    a: t for a, t in self._effective().items() if not isinstance(t, Refused)
                }
                count = sum(len(t) for t in effective.values())
                log.info("%s rules updated (%d %s)", self.KIND, count, self.ITEMS)
                self._put_in_force({a: t for a, t in effective.items() if t})
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

    def reload(self) -> None:
        """Re-read every target and rewrite our chains."""
        self.refused.clear()
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
        changed = False
        if changes.connected:
            before = self.desired(self._effective())
            self._load_connected()
            changed = self.desired(self._effective()) != before
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
        if handled or changed:
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
        """Delete our chains and jumps in both families (clean stop, fail closed)."""
        nft_chains.remove({family: self.CHAINS for family in FAMILIES}, self.HOOKS, self.runner)


class Forwarder(ChainHalf):
    """The forward half: ``/qns-forward/`` steps to chains ``qns-dnat``/``qns-forward``.

    A step on a port this hop serves itself (:mod:`agent_worker.hop_ports`)
    is left out, logged, and reported under ``/qns-forward_refused/TARGET``
    in this hop's QubesDB, checked again at every update and SIGHUP.
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
        tool: conntrack.Tool = conntrack.run_tool,
        proc_net: Path = hop_ports.PROC_NET,
    ) -> None:
        super().__init__(db, runner, tool)
        self.proc_net = proc_net
        #: per target, the steps left out as taking a port this hop serves, and why
        self.taken: dict[IPAddress, dict[Step, str]] = {}

    def commit(self) -> bool:
        self._leave_out_own_ports()
        return super().commit()

    def _leave_out_own_ports(self) -> None:
        """Find the steps that would take a port this hop serves; report what changed."""
        steps = [t for t in self.targets.values() if not isinstance(t, Refused) and t]
        served = hop_ports.served(self.runner, self.proc_net) if steps else []
        taken: dict[IPAddress, dict[Step, str]] = {}
        for address, target in self.targets.items():
            if isinstance(target, Refused):
                continue
            for step in target:
                hit = next((s for s in served if s.overlaps(step.proto, step.ports)), None)
                if hit is not None:
                    first, last = step.ports
                    taken.setdefault(address, {})[step] = (
                        f"{step.proto} {first}-{last}: {hit.why}"
                    )
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

    def desired(self, targets: Mapping[IPAddress, Target]) -> dict[Family, dict[str, list[str]]]:
        return desired_chains(targets)

    def flows_to_end(self, before: InForce, after: InForce) -> list[conntrack.Flow]:
        """Flows a step that went (removed, narrowed, its target gone) had translated.

        Listed per protocol and translated address of the steps that went;
        a flow another step in force still translates the same way stays.
        """
        kept = {step for steps in after.values() for step in steps}
        gone = {step for steps in before.values() for step in steps} - kept
        ended = []
        for version, proto, to in sorted({(s.to.version, s.proto, s.to) for s in gone}):
            for flow in conntrack.list_flows(version, ["-p", proto, "--reply-src", str(to)],
                                             self.tool):
                if any(step_admits(s, flow) for s in gone) and not any(
                    step_admits(s, flow) for s in kept
                ):
                    ended.append(flow)
        return ended
