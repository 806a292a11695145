"""Our chains inside the Qubes ``qubes`` tables, applied atomically.

Qubes' base ruleset owns tables ``ip qubes`` and ``ip6 qubes``; an accept
only counts if it is reached before the drops of the same chain, so we
keep our rules in chains of that table (``qns-*``) and hook them in with a
single ``jump`` right after the jump to the user's ``custom-*`` chain. The
user's chains are never touched. A whole update (every chain's new content
and any missing jump) is one nft transaction: it applies entirely or not
at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import nftables

Family = Literal["ip", "ip6"]
TABLE = "qubes"


class NftError(RuntimeError):
    """nft refused a command; the previous ruleset is still in place."""


@dataclass(frozen=True)
class BaseChainHook:
    """Where a ``qns-*`` chain is jumped to from, or how it is declared."""

    parent: str | None  # jump from this chain (after its custom-* jump), or
    declaration: str | None = None  # declare as a base chain with this spec


def run(commands: str) -> str:
    """Run nft commands in one transaction; raise NftError on refusal."""
    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(True)
    rc, output, error = nft.cmd(commands)
    if rc != 0:
        raise NftError(error.strip() or f"nft exited with {rc}")
    return output


def _table_exists(family: Family) -> bool:
    try:
        run(f"list table {family} {TABLE}")
    except NftError:
        return False
    return True


def _jump_position(family: Family, parent: str, chain: str) -> str | None:
    """Command adding the jump to ``chain`` in ``parent``, or None if present."""
    listing = json.loads(run(f"list chain {family} {TABLE} {parent}"))
    custom_handle = None
    for item in listing.get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        for expr in rule.get("expr", []):
            target = expr.get("jump", {}).get("target") if isinstance(expr, dict) else None
            if target == chain:
                return None
            if target == f"custom-{parent}" and custom_handle is None:
                custom_handle = rule["handle"]
    if custom_handle is None:
        return f"insert rule {family} {TABLE} {parent} jump {chain}"
    return f"add rule {family} {TABLE} {parent} position {custom_handle} jump {chain}"


def build_transaction(
    family: Family, chains: Mapping[str, list[str]], hooks: Mapping[str, BaseChainHook]
) -> str:
    """Commands replacing the content of each chain in ``chains``."""
    lines = []
    for chain, rules in chains.items():
        hook = hooks[chain]
        spec = f" {{ {hook.declaration} }}" if hook.declaration else ""
        lines.append(f"add chain {family} {TABLE} {chain}{spec}")
        lines.append(f"flush chain {family} {TABLE} {chain}")
        lines += [f"add rule {family} {TABLE} {chain} {rule}" for rule in rules]
        if hook.parent is not None:
            jump = _jump_position(family, hook.parent, chain)
            if jump is not None:
                lines.append(jump)
    return "\n".join(lines) + "\n"


def apply(
    chains_by_family: Mapping[Family, Mapping[str, list[str]]],
    hooks: Mapping[str, BaseChainHook],
) -> None:
    """Replace our chains in every family whose ``qubes`` table exists, atomically."""
    text = "".join(
        build_transaction(family, chains, hooks)
        for family, chains in chains_by_family.items()
        if _table_exists(family)
    )
    if text:
        run(text)
