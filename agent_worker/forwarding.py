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
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from agent_worker import nft_chains
from agent_worker.entries import EntryError
from agent_worker.forward import DNAT_CHAIN, FORWARD_CHAIN, Step, chain_rules, parse_target
from agent_worker.nft_chains import BaseChainHook, Family, NftError, Runner
from agent_worker.qdb_parse import IPAddress, parse_address

log = logging.getLogger("qubes.firewall")

FORWARD_DIR = "/qns-forward/"
HANDLED_DIR = "/qns-forward_handled/"
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


Target = tuple[Step, ...] | Refused


@dataclass
class ForwardChanges:
    """What a batch of watch events asks the forward half to re-read."""

    full: bool = False
    targets: set[str] = field(default_factory=set)


def ours(path: str) -> bool:
    """Whether a path lies in ``/qns-forward/`` (so the outbound half can skip it)."""
    return path.startswith(FORWARD_DIR) or path == FORWARD_DIR.rstrip("/")


def concerns(path: str) -> bool:
    """Whether a watch event may change forward entries (ours, or a parent removed)."""
    return ours(path) or (path.endswith("/") and FORWARD_DIR.startswith(path))


def classify(paths: Iterable[str]) -> ForwardChanges:
    """Sort watch events; a target counts only once dom0 writes its completion path.

    Events below ``/qns-forward/IP/`` belong to a set still being written
    (dom0 clears the directory, writes each key, then ``/qns-forward/IP``).
    """
    changes = ForwardChanges()
    for path in paths:
        if not concerns(path):
            continue
        # "/qns-forward", "/" and the like mean: read every target again
        rest = path[len(FORWARD_DIR) :] if path.startswith(FORWARD_DIR) else ""
        if not rest:
            changes.full = True
        elif "/" not in rest:
            changes.targets.add(rest)
    return changes


def desired_chains(targets: Mapping[IPAddress, Target]) -> dict[Family, dict[str, list[str]]]:
    """Content of both chains in both families, targets in address order."""
    result: dict[Family, dict[str, list[str]]] = {}
    for family in FAMILIES:
        dnat: list[str] = []
        accept: list[str] = []
        for address in sorted(targets, key=lambda a: (a.version, a)):
            target = targets[address]
            if isinstance(target, Refused):
                continue
            more_dnat, more_accept = chain_rules(list(target), family)
            dnat += more_dnat
            accept += more_accept
        result[family] = {DNAT_CHAIN: dnat, FORWARD_CHAIN: accept}
    return result


def transaction(chains: Mapping[Family, Mapping[str, list[str]]], runner: Runner) -> str:
    """nft text taking both families to ``chains``; empty families lose our chains.

    A family without any forward gets neither chain nor jump, so a hop that
    forwards nothing keeps table ``qubes`` exactly as Qubes made it. A
    family without table ``qubes`` is left alone.
    """
    text = ""
    for family in FAMILIES:
        items = nft_chains.list_table(family, runner)
        if items is None:
            continue
        wanted = chains.get(family, {})
        if any(wanted.values()):
            text += nft_chains.build_transaction(
                family, {c: list(wanted.get(c, [])) for c in CHAINS}, HOOKS, runner, items
            )
        else:
            text += nft_chains.removal_commands(family, CHAINS, HOOKS, items)
    return text


class Forwarder:
    """State cached between events, and the steps from ``/qns-forward/`` to the kernel."""

    def __init__(self, db: QubesDBConnection, runner: Runner) -> None:
        self.db = db
        self.runner = runner
        self.targets: dict[IPAddress, Target] = {}
        #: targets whose rules nft refused, left out until dom0 rewrites them
        self.refused: dict[IPAddress, str] = {}

    # -- reading QubesDB --------------------------------------------------

    def _target_address(self, untrusted_text: str) -> IPAddress | None:
        try:
            return parse_address(untrusted_text)
        except EntryError as err:
            log.error("ignoring %s%s: %s", FORWARD_DIR, untrusted_text[:48], err)
            return None

    def _read_target(self, address: IPAddress) -> Target | None:
        """A target's steps once dom0 completed them; None if it has none."""
        base = f"{FORWARD_DIR}{address}"
        if self.db.read(base) is None:
            return None
        untrusted_entries = {
            path[len(base) + 1 :]: value
            for path, value in self.db.multiread(base + "/").items()
        }
        try:
            steps = parse_target(untrusted_entries)
        except EntryError as err:
            log.error("no forwards to %s: %s", address, err)
            return Refused(str(err))
        return tuple(steps)

    def _record(self, address: IPAddress) -> None:
        """Count the handling of a target, as upstream counts a client's."""
        path = f"{HANDLED_DIR}{address}"
        untrusted_count = self.db.read(path)
        try:
            count = int(untrusted_count or b"0")
        except ValueError:
            count = 0
        self.db.write(path, str(count + 1))

    # -- applying ---------------------------------------------------------

    def _effective(self) -> dict[IPAddress, Target]:
        targets = dict(self.targets)
        for address, reason in self.refused.items():
            targets[address] = Refused(reason)
        return targets

    def _find_refused(self) -> bool:
        """Check each target's rules alone in nft's check mode; leave out the refused."""
        found = False
        effective = self._effective()
        for address in sorted(effective, key=lambda a: (a.version, a)):
            target = effective[address]
            if isinstance(target, Refused):
                continue
            try:
                text = transaction(desired_chains({address: target}), self.runner)
                if text:
                    self.runner(text, check=True)
            except (NftError, ValueError, KeyError) as err:
                reason = f"nft refused its rules: {err}"
                log.error("no forwards to %s: %s", address, reason)
                self.refused[address] = reason
                found = True
        return found

    def _send(self) -> None:
        text = transaction(desired_chains(self._effective()), self.runner)
        if text:
            self.runner(text)

    def commit(self) -> bool:
        """Bring our chains to the target state in one transaction; False if refused.

        If nft refuses, targets it refuses alone are left out and the rest
        retried; if that fails too, every forward is removed (fail closed).
        """
        for attempt in range(2):
            try:
                self._send()
            except (NftError, ValueError, KeyError) as err:
                log.error("nft refused the forward update: %s", err)
                if attempt == 0 and self._find_refused():
                    continue
                break
            else:
                targets = self._effective().values()
                count = sum(len(t) for t in targets if not isinstance(t, Refused))
                log.info("forward rules updated (%d steps)", count)
                return True
        log.error("removing every forward rule")
        try:
            self.remove()
        except (NftError, ValueError, KeyError) as err:
            log.error("could not remove the forward rules either: %s", err)
        return False

    # -- entry points -----------------------------------------------------

    def reload(self) -> None:
        """Re-read every target and rewrite our chains."""
        self.refused.clear()
        untrusted_names = {
            path[len(FORWARD_DIR) :].split("/", 1)[0]
            for path in self.db.list(FORWARD_DIR)
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
        self.commit()
        for address in sorted(targets.keys() | gone, key=lambda a: (a.version, a)):
            self._record(address)

    def handle(self, changes: ForwardChanges) -> None:
        """React to one batch of watch events."""
        if changes.full:
            self.reload()
            return
        handled = []
        for untrusted_name in sorted(changes.targets):
            address = self._target_address(untrusted_name)
            if address is None:
                continue
            target = self._read_target(address)
            self.refused.pop(address, None)
            if target is None:
                if self.targets.pop(address, None) is not None:
                    log.info("forwards to %s removed", address)
            else:
                self.targets[address] = target
            handled.append(address)
        if handled:
            self.commit()
            for address in handled:
                self._record(address)

    def remove(self) -> None:
        """Delete our chains and jumps in both families (clean stop, fail closed)."""
        nft_chains.remove({family: CHAINS for family in FAMILIES}, HOOKS, self.runner)
