"""Outbound rules of one client qube: untrusted ``/qubes-firewall/`` entries to types.

Pure: no QubesDB, no nft. dom0 writes, for each client address ``IP`` of
this NetVM/ProxyVM, ``/qubes-firewall/IP/policy`` and one
``/qubes-firewall/IP/NNNN`` per rule (doc/qubesdb.md). The grammar is
upstream's: ``action=`` plus any of ``proto= dst4= dst6= dsthost=
dstports= specialtarget= icmptype=``, words separated by single spaces.

Nothing here is trusted until it matches exactly. One entry that does not
parse makes the whole source :class:`Blocked` (its traffic is rejected and
the reason logged), as upstream's worker does: a partial rule set could
open more than the user asked for.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agent_worker.entries import (
    EntryError,
    IPAddress,
    IPNetwork,
    IpVersion,
    Refused,
    parse_address,
    parse_numbered,
    parse_words,
)

Action = Literal["accept", "drop"]
Proto = Literal["tcp", "udp", "icmp"]

_PORTS_RE = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")
_ICMPTYPE_RE = re.compile(r"[0-9]{1,3}")
_DST4_RE = re.compile(r"[0-9.]{7,15}(?:/[0-9]{1,2})?")
_DST6_RE = re.compile(r"[0-9a-fA-F:.]{2,45}(?:/[0-9]{1,3})?")
# dom0 accepts lowercase letters, digits and "-._" in a host name.
_HOSTNAME_RE = re.compile(r"[a-z0-9_.-]{1,253}")
_OPTIONS = {"action", "proto", "dst4", "dst6", "dsthost", "dstports", "specialtarget", "icmptype"}


@dataclass(frozen=True)
class OutboundRule:
    """One validated outbound rule; ``None`` means "any"."""

    action: Action
    proto: Proto | None = None
    dst: IPNetwork | None = None
    dsthost: str | None = None
    dstports: tuple[int, int] | None = None
    icmptype: int | None = None
    dns: bool = False


@dataclass(frozen=True)
class SourceRules:
    """A source's complete rule list and the policy applied after it."""

    rules: tuple[OutboundRule, ...]
    policy: Action


#: A source whose traffic is rejected (the outbound name of a refused address).
Blocked = Refused


def parse_address_list(
    untrusted_value: bytes | None, version: IpVersion
) -> tuple[frozenset[IPAddress], list[str]]:
    """``/connected-ips``-style value: addresses of one family, and what was refused."""
    if not untrusted_value:
        return frozenset(), []
    try:
        untrusted_text = untrusted_value.decode("ascii")
    except UnicodeDecodeError:
        return frozenset(), ["value is not ASCII"]
    addresses = set()
    problems = []
    for untrusted_word in untrusted_text.split():
        try:
            address = parse_address(untrusted_word)
        except EntryError as err:
            problems.append(str(err))
            continue
        if address.version != version:
            problems.append(f"{address} is not an IPv{version} address")
            continue
        addresses.add(address)
    return frozenset(addresses), problems


def _parse_network(untrusted_text: str, version: IpVersion) -> IPNetwork:
    """dst4/dst6: dom0 always adds a prefix; host bits may be set (nft masks them)."""
    pattern = _DST4_RE if version == 4 else _DST6_RE
    if not pattern.fullmatch(untrusted_text):
        raise EntryError(f"bad IPv{version} network {untrusted_text[:50]!r}")
    try:
        network = ipaddress.ip_network(untrusted_text, strict=False)
    except ValueError:
        raise EntryError(f"bad IPv{version} network {untrusted_text[:50]!r}") from None
    if network.version != version:
        raise EntryError(f"bad IPv{version} network {untrusted_text[:50]!r}")
    return network


def _parse_ports(untrusted_text: str) -> tuple[int, int]:
    """``N`` or ``N-M``, 0 <= N <= M <= 65535, as dom0 writes ``dstports``."""
    match = _PORTS_RE.fullmatch(untrusted_text)
    if match is None:
        raise EntryError(f"bad dstports {untrusted_text[:20]!r}")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if not 0 <= first <= last <= 65535:
        raise EntryError(f"dstports {untrusted_text!r} out of order or out of 0-65535")
    return first, last


#: rules remembered by parse_rule: a long list edited in one place parses only that rule
PARSED_RULES_KEPT = 4096


@functools.lru_cache(maxsize=PARSED_RULES_KEPT)
def parse_rule(untrusted_value: str, version: IpVersion) -> OutboundRule:
    """Validate one ``/qubes-firewall/IP/NNNN`` value for a source of ``version``.

    Pure, so its results are kept (a value that fails raises each time).
    """
    words = parse_words(untrusted_value, _OPTIONS, "option")
    action = words.get("action")
    if action not in ("accept", "drop"):
        raise EntryError("action must be accept or drop")
    proto = words.get("proto")
    if proto not in (None, "tcp", "udp", "icmp"):
        raise EntryError("proto must be tcp, udp or icmp")
    if len(words.keys() & {"dst4", "dst6", "dsthost"}) > 1:
        raise EntryError("more than one of dst4, dst6, dsthost")
    dst = None
    if "dst4" in words:
        if version != 4:
            raise EntryError("dst4 rule for an IPv6 source")
        dst = _parse_network(words["dst4"], 4)
    if "dst6" in words:
        if version != 6:
            raise EntryError("dst6 rule for an IPv4 source")
        dst = _parse_network(words["dst6"], 6)
    dsthost = words.get("dsthost")
    if dsthost is not None and not _HOSTNAME_RE.fullmatch(dsthost):
        raise EntryError(f"bad dsthost {dsthost[:50]!r}")
    dstports = None
    if "dstports" in words:
        if proto not in ("tcp", "udp"):
            raise EntryError("dstports needs proto tcp or udp")
        dstports = _parse_ports(words["dstports"])
    icmptype = None
    if "icmptype" in words:
        if proto != "icmp" or not _ICMPTYPE_RE.fullmatch(words["icmptype"]):
            raise EntryError("icmptype needs proto icmp and a number")
        icmptype = int(words["icmptype"])
        if icmptype > 255:
            raise EntryError("icmptype out of 0-255")
    special = words.get("specialtarget")
    if special not in (None, "dns"):
        raise EntryError("specialtarget must be dns")
    return OutboundRule(
        action=action,  # type: ignore[arg-type]
        proto=proto,  # type: ignore[arg-type]
        dst=dst,
        dsthost=dsthost,
        dstports=dstports,
        icmptype=icmptype,
        dns=special == "dns",
    )


def parse_source(
    untrusted_entries: Mapping[str, bytes], version: IpVersion
) -> SourceRules | Blocked:
    """All entries of one source, keyed relative to its directory.

    Keys are ``policy`` and ``NNNN``; rules apply in key order, then the policy.
    """
    untrusted_rules = {k: v for k, v in untrusted_entries.items() if k != "policy"}
    try:
        parsed = parse_numbered(
            untrusted_rules, lambda text: parse_rule(text, version), item="rule", unexpected="entry"
        )
    except EntryError as err:
        return Blocked(str(err))
    if "policy" not in untrusted_entries:
        return Blocked("no policy entry")
    try:
        untrusted_policy = untrusted_entries["policy"].decode("ascii")
    except UnicodeDecodeError:
        return Blocked("policy: not ASCII")
    if untrusted_policy not in ("accept", "drop"):
        return Blocked(f"bad policy {untrusted_policy[:20]!r}")
    policy: Action = untrusted_policy  # type: ignore[assignment]
    return SourceRules(tuple(parsed), policy)


def parse_resolv_conf(text: str) -> frozenset[IPAddress]:
    """Nameserver addresses a hop sends DNS to (upstream's source for specialtarget=dns).

    Loopback, unspecified and link-local addresses, and any with a zone id
    (``fe80::1%eth0``, which nft refuses), are left out: forwarded traffic
    never goes there (a local stub resolver such as systemd-resolved's, a
    router on the uplink's link).
    """
    servers = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            if "%" in fields[1]:
                continue
            try:
                address = ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            if not (address.is_loopback or address.is_unspecified or address.is_link_local):
                servers.add(address)
    return frozenset(servers)
