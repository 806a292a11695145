"""Input rules in the target qube: from untrusted ``/qns-input/`` to nft.

Pure, like :mod:`agent_worker.forward_steps`. dom0 writes the openings of the
qube's forwards first, then its inbound rules (accept or drop) in list
order; the rules land in that order in chain ``qns-input`` of table
``qubes`` (both families), jumped to from its ``input`` chain right after
the user's ``custom-input``, so they are reached before the Qubes input
drop and the first match decides. Any entry that does not parse leaves
the chain empty: nothing is opened, and the reason is logged. The same
grammar serves the netvm's ``/qns-inbound/`` (:mod:`agent_worker.inbound`).

Every opening admits only what arrives from the qube's netvm
(``iifgroup != 2``): forwarded and inbound traffic always does, and a
ProxyVM's own client qubes, on its vifs (group 2), stay refused by Qubes'
input rules whatever port the rule names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from agent_worker.conntrack import Flow
from agent_worker.entries import (
    EntryError,
    Family,
    IPNetwork,
    parse_network,
    parse_numbered,
    parse_port_range,
    parse_words,
    port_text,
)

INPUT_CHAIN = "qns-input"
#: First rule of each of our accepting chains: a TCP packet that would
#: start a connection without being a SYN is left to Qubes' rules. The
#: kernel tracks TCP loosely, so after a flow's conntrack entry is deleted
#: its next packet counts as new; without this, a rule that still admits
#: the port would take the cut flow up again mid-stream.
ONLY_SYN_OPENS = "meta l4proto tcp ct state new tcp flags & (fin | syn | rst | ack) != syn return"
#: First rule of each of our chains on the forward path (``qns-forward``,
#: ``qns-inbound``): a packet of a flow already admitted (or invalid, or
#: related) leaves at once, to Qubes' own rules right after our jump. Every
#: rule of ours decides new flows only, so established traffic never walks
#: them, however many there are.
ONLY_NEW_WALK = "ct state != new return"
#: The target's side of every opening: from its netvm, not from its own qubes.
FROM_NETVM = "iifgroup != 2"

_ICMPTYPE_RE = re.compile(r"[0-9]{1,3}")
_KEYS = {"action", "proto", "dstports", "icmptype", "srchost"}


@dataclass(frozen=True)
class Opening:
    """One validated input rule: who may open what."""

    action: Literal["accept", "drop"]
    proto: Literal["tcp", "udp", "icmp"] | None
    dstports: tuple[int, int] | None
    icmptype: int | None
    srchost: IPNetwork | None

    def applies_to(self, family: Family) -> bool:
        return self.srchost is None or (self.srchost.version == 4) == (family == "ip")


def parse_opening(untrusted_value: str) -> Opening:
    """Validate one ``/qns-input/NNNN`` value (doc/qubesdb.md)."""
    untrusted_words = parse_words(untrusted_value, _KEYS)
    action = untrusted_words.get("action")
    if action not in ("accept", "drop"):
        raise EntryError("action must be accept or drop")
    proto = untrusted_words.get("proto")
    if proto not in (None, "tcp", "udp", "icmp"):
        raise EntryError("proto must be tcp, udp or icmp")
    dstports = None
    if "dstports" in untrusted_words:
        if proto not in ("tcp", "udp"):
            raise EntryError("dstports needs proto tcp or udp")
        dstports = parse_port_range(untrusted_words["dstports"])
    icmptype = None
    if "icmptype" in untrusted_words:
        if proto != "icmp" or not _ICMPTYPE_RE.fullmatch(untrusted_words["icmptype"]):
            raise EntryError("icmptype needs proto icmp and a number 0-255")
        icmptype = int(untrusted_words["icmptype"])
        if icmptype > 255:
            raise EntryError("icmptype out of range")
    srchost = parse_network(untrusted_words["srchost"]) if "srchost" in untrusted_words else None
    return Opening(action, proto, dstports, icmptype, srchost)  # type: ignore[arg-type]


def parse_openings(untrusted_entries: dict[str, bytes]) -> list[Opening]:
    """All entries in key order; one bad entry fails the whole set."""
    return parse_numbered(untrusted_entries, parse_opening)


def input_rule(opening: Opening, family: Family) -> str:
    """nft rule body for one opening; only new connections are decided here.

    ``ct state new``: a drop must not cut the replies of connections the
    qube opened itself; established traffic is Qubes' own rules' business.
    """
    parts = []
    if opening.srchost is not None:
        parts.append(f"{family} saddr {opening.srchost}")
    if opening.proto == "icmp":
        icmp = "icmp" if family == "ip" else "icmpv6"
        parts.append(f"meta l4proto {icmp}")
        if opening.icmptype is not None:
            parts.append(f"{icmp} type {opening.icmptype}")
    elif opening.proto is not None:
        parts.append(f"meta l4proto {opening.proto}")
        if opening.dstports is not None:
            parts.append(f"th dport {port_text(opening.dstports)}")
    parts += ["ct state new", opening.action]
    return " ".join(parts)


def chain_rules(openings: list[Opening], family: Family) -> list[str]:
    """Rule bodies of ``qns-input`` for one family: the SYN guard, then entry order."""
    rules = [f"{FROM_NETVM} {input_rule(o, family)}" for o in openings if o.applies_to(family)]
    return [ONLY_SYN_OPENS, *rules] if rules else []


def _matches(opening: Opening, flow: Flow) -> bool:
    """Whether the opening's rule matches the flow's first packet."""
    if opening.srchost is not None and flow.src not in opening.srchost:
        return False
    if opening.proto is None:
        return True
    if opening.proto != flow.proto:
        return False
    if opening.dstports is not None:
        first, last = opening.dstports
        return flow.dport is not None and first <= flow.dport <= last
    if opening.icmptype is not None:
        return flow.icmp is not None and flow.icmp[0] == opening.icmptype
    return True


def admits(openings: Iterable[Opening], flow: Flow) -> bool:
    """What the chain decides for the flow's first packet: the first match, else refused.

    For the conntrack cut; the interface it came in by is not tracked, so
    the caller leaves out flows of the qube's own clients.
    """
    family: Family = "ip" if flow.version == 4 else "ip6"
    for opening in openings:
        if opening.applies_to(family) and _matches(opening, flow):
            return opening.action == "accept"
    return False
