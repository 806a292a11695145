"""Our chains inside the Qubes ``qubes`` tables, applied atomically.

Qubes' base ruleset owns tables ``ip qubes`` and ``ip6 qubes``; an accept
only counts if it is reached before the drops of the same chain, so we
keep our rules in chains of that table (``qns-*``) and hook them in with a
single ``jump`` right after the jump to the user's ``custom-*`` chain. The
user's chains are never touched. A whole update (every chain's new content
and any missing jump) is one nft transaction: it applies entirely or not
at all.

Every function takes the ``runner`` that talks to nft, so the firewall
worker can use its own libnftables context (and nft's check mode) and
tests can look at the text without a kernel.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import nftables

from agent_worker.entries import Family

TABLE = "qubes"

log = logging.getLogger("qubes.nft_chains")


class NftError(RuntimeError):
    """nft refused a command; the previous ruleset is still in place."""


class Runner(Protocol):
    """Runs nft command text as one transaction (``check``: validate only)."""

    def __call__(self, commands: str, *, check: bool = False) -> str: ...


@dataclass(frozen=True)
class BaseChainHook:
    """Where a ``qns-*`` chain is jumped to from, or how it is declared."""

    parent: str | None  # jump from this chain (after its custom-* jump), or
    declaration: str | None = None  # declare as a base chain with this spec
    #: our other chains whose jumps this one must follow when present, so
    #: their verdicts come first whatever order the jumps were added in
    after: tuple[str, ...] = ()


def run(commands: str, *, check: bool = False) -> str:
    """Run nft commands in one transaction; raise NftError on refusal."""
    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(True)
    nft.set_dry_run(check)
    rc, output, error = nft.cmd(commands)
    if rc != 0:
        raise NftError(" ".join(error.split()) or f"nft exited with {rc}")
    return output


def list_table(family: Family, runner: Runner = run) -> list[dict[str, Any]] | None:
    """Items of the family's ``qubes`` table as nft JSON, or None if it does not exist."""
    try:
        output = runner(f"list table {family} {TABLE}")
    except NftError:
        return None
    items = json.loads(output or "{}").get("nftables", [])
    return [item for item in items if isinstance(item, dict)]


def chain_names(family: Family, runner: Runner = run) -> set[str] | None:
    """Names of the chains of the family's ``qubes`` table; None if it has no such table.

    ``list chains`` prints no rules and no set elements: it stays cheap
    however many forwards the table's maps hold.
    """
    try:
        output = runner(f"list chains {family}")
    except NftError:
        return None
    names = {
        str(chain.get("name"))
        for item in json.loads(output or "{}").get("nftables", [])
        if isinstance(item, dict) and isinstance(chain := item.get("chain"), dict)
        and chain.get("table") == TABLE
    }
    return names or None


def table_exists(family: Family, table: str, runner: Runner = run) -> bool:
    """Whether the family has a table of that name (``list tables``: names only)."""
    try:
        output = runner(f"list tables {family}")
    except NftError:
        return False
    return any(
        isinstance(item, dict) and isinstance(found := item.get("table"), dict)
        and found.get("name") == table
        for item in json.loads(output or "{}").get("nftables", [])
    )


def parent_items(
    family: Family, chains: Iterable[str], hooks: Mapping[str, BaseChainHook],
    runner: Runner = run,
) -> list[dict[str, Any]]:
    """The rules (with handles) of the chains our ``chains`` are jumped to from.

    What :func:`build_transaction` and :func:`removal_commands` need to
    place or find the jumps, without listing the rest of the table.
    """
    items: list[dict[str, Any]] = []
    for parent in sorted({hooks[c].parent for c in chains if hooks[c].parent is not None}):
        assert parent is not None
        output = runner(f"list chain {family} {TABLE} {parent}")
        items += [
            item for item in json.loads(output or "{}").get("nftables", [])
            if isinstance(item, dict)
        ]
    return items


def _jumps(items: list[dict[str, Any]], parent: str) -> list[tuple[int, str]]:
    """``(handle, target)`` of every jump in chain ``parent``, in order."""
    found = []
    for item in items:
        rule = item.get("rule")
        if not rule or rule.get("chain") != parent:
            continue
        for expr in rule.get("expr", []):
            target = expr.get("jump", {}).get("target") if isinstance(expr, dict) else None
            if target is not None:
                found.append((int(rule["handle"]), str(target)))
    return found


def _jump_position(
    family: Family, items: list[dict[str, Any]], hook: BaseChainHook, chain: str
) -> list[str]:
    """Commands putting the jump to ``chain`` in place in its parent; none if it is.

    The jump goes right after the last of the user's ``custom-*`` jump and
    the jumps named in ``hook.after``, or first in the chain without any.
    A jump found before one of those counts as missing: it is deleted and
    added again in its place.
    """
    assert hook.parent is not None
    parent = hook.parent
    jumps = _jumps(items, parent)
    anchors = {f"custom-{parent}", *hook.after}
    last_anchor = max((i for i, (_, target) in enumerate(jumps) if target in anchors), default=-1)
    mine = [(i, handle) for i, (handle, target) in enumerate(jumps) if target == chain]
    if mine and all(i > last_anchor for i, _ in mine):
        return []
    lines = [f"delete rule {family} {TABLE} {parent} handle {handle}" for _, handle in mine]
    if last_anchor < 0:
        return [*lines, f"insert rule {family} {TABLE} {parent} jump {chain}"]
    position = jumps[last_anchor][0]
    return [*lines, f"add rule {family} {TABLE} {parent} position {position} jump {chain}"]


def missing_parents(
    chains: Iterable[str], hooks: Mapping[str, BaseChainHook], items: list[dict[str, Any]]
) -> list[str]:
    """Parent chains our ``chains`` are jumped to from that the table lacks.

    Upstream creates ``ip6 qubes`` with only ``prerouting`` when IPv6 is
    off: a jump into a missing ``input`` would make nft refuse the whole
    transaction, the other family's part included.
    """
    present = {
        item["chain"].get("name") for item in items if isinstance(item.get("chain"), dict)
    }
    parents = {hooks[c].parent for c in chains if hooks[c].parent is not None}
    return sorted(p for p in parents if p is not None and p not in present)


def build_transaction(
    family: Family,
    chains: Mapping[str, list[str]],
    hooks: Mapping[str, BaseChainHook],
    runner: Runner = run,
    items: list[dict[str, Any]] | None = None,
) -> str:
    """Commands replacing the content of each chain in ``chains``.

    ``items`` is the table's current listing (read through ``runner`` if
    not given): it tells which jumps are already in place.
    """
    if items is None:
        items = list_table(family, runner) or []
    lines = []
    for chain, rules in chains.items():
        hook = hooks[chain]
        spec = f" {{ {hook.declaration} }}" if hook.declaration else ""
        lines.append(f"add chain {family} {TABLE} {chain}{spec}")
        lines.append(f"flush chain {family} {TABLE} {chain}")
        lines += [f"add rule {family} {TABLE} {chain} {rule}" for rule in rules]
        if hook.parent is not None:
            lines += _jump_position(family, items, hook, chain)
    return "\n".join(lines) + "\n"


def removal_commands(
    family: Family,
    chains: Iterable[str],
    hooks: Mapping[str, BaseChainHook],
    items: list[dict[str, Any]],
    present: Iterable[str] | None = None,
) -> str:
    """Commands deleting the jumps to ``chains`` and the chains themselves, if present.

    Jumps go first in the same transaction: a chain still jumped to cannot
    be deleted. ``present`` names the table's chains (default: the chains
    ``items`` hold, a listing of the whole table).
    """
    wanted = set(chains)
    if present is None:
        present = {
            item["chain"]["name"] for item in items if "chain" in item and "name" in item["chain"]
        }
    lines = []
    for parent in sorted({hooks[c].parent for c in wanted if hooks[c].parent is not None}):
        assert parent is not None
        lines += [
            f"delete rule {family} {TABLE} {parent} handle {handle}"
            for handle, target in _jumps(items, parent)
            if target in wanted
        ]
    for chain in sorted(wanted & set(present)):
        lines += [f"flush chain {family} {TABLE} {chain}", f"delete chain {family} {TABLE} {chain}"]
    return "".join(line + "\n" for line in lines)


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
    present = chain_names(family, runner)
    if present is None:
        return None
    if any(wanted.values()):
        missing = sorted({p for c in names if (p := hooks[c].parent) and p not in present})
        if missing:
            log.debug("skipping %s qubes: no chain %s", family, ", ".join(missing))
            return None
        items = parent_items(family, names, hooks, runner)
        return build_transaction(
            family, {c: list(wanted.get(c, [])) for c in names}, hooks, runner, items
        )
    if not present & set(names):
        return ""
    items = parent_items(family, names, hooks, runner)
    return removal_commands(family, names, hooks, items, present)


def apply(
    chains_by_family: Mapping[Family, Mapping[str, list[str]]],
    hooks: Mapping[str, BaseChainHook],
    runner: Runner = run,
) -> None:
    """Replace our chains in every family whose ``qubes`` table exists, atomically.

    A family whose table lacks a parent chain is skipped (logged at debug).
    """
    text = ""
    for family, chains in chains_by_family.items():
        items = list_table(family, runner)
        if items is None:
            continue
        missing = missing_parents(chains, hooks, items)
        if missing:
            log.debug("skipping %s %s: no chain %s", family, TABLE, ", ".join(missing))
            continue
        text += build_transaction(family, chains, hooks, runner, items)
    if text:
        runner(text)


def remove(
    chains_by_family: Mapping[Family, Iterable[str]],
    hooks: Mapping[str, BaseChainHook],
    runner: Runner = run,
) -> None:
    """Delete our chains and the jumps to them in every family, atomically."""
    text = ""
    for family, chains in chains_by_family.items():
        items = list_table(family, runner)
        if items is not None:
            text += removal_commands(family, chains, hooks, items)
    if text:
        runner(text)
