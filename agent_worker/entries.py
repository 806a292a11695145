"""Strict parsing of QubesDB values, shared by every kind of entry: the
outbound rules, the forward steps, the input and inbound openings, the
routing entries. Here live the one address parser, the one ``key=value``
word splitter, the one loop over a directory's ``NNNN`` entries, and the
names of the two kinds of "family".

QubesDB is written by dom0, but an agent must not trust that it is well
formed: a value that does not match exactly is refused, never guessed at.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: An IP version, as ``ipaddress`` numbers it.
IpVersion = Literal[4, 6]
#: An nft address family: ``ip`` (IPv4) or ``ip6``.
Family = Literal["ip", "ip6"]

# Keys are lowercase words with digits (``dst4``); values never hold a space
# or a quote: each field is then validated by its own parser.
_WORD_RE = re.compile(r"([a-z0-9]+)=([A-Za-z0-9_.:/-]+)")
_PORTS_RE = re.compile(r"(0|[1-9][0-9]{0,4})-(0|[1-9][0-9]{0,4})")
_ADDRESS_RE = re.compile(r"[0-9a-f.:]{2,39}")
_NUMBERED_KEY_RE = re.compile(r"[0-9]{4}")
MAX_VALUE = 3072

Parsed = TypeVar("Parsed")


class EntryError(ValueError):
    """An entry that cannot be used; the message says why, for the log."""


@dataclass(frozen=True)
class Refused:
    """An address whose entries are refused as a whole (fail closed); ``reason`` is for the log."""

    reason: str


def family_of(address: IPAddress) -> Family:
    """The nft family holding rules about ``address``."""
    return "ip" if address.version == 4 else "ip6"


def parse_address(untrusted_text: str) -> IPAddress:
    """An address in the canonical form dom0 writes (``str(ipaddress)``), nothing else."""
    if not _ADDRESS_RE.fullmatch(untrusted_text):
        raise EntryError(f"not an address: {untrusted_text[:40]!r}")
    try:
        address = ipaddress.ip_address(untrusted_text)
    except ValueError:
        raise EntryError(f"not an address: {untrusted_text!r}") from None
    if str(address) != untrusted_text:
        raise EntryError(f"address {untrusted_text!r} not in canonical form")
    return address


def parse_words(
    untrusted_value: str, allowed: set[str], what: Literal["key", "option"] = "key"
) -> dict[str, str]:
    """Split ``k=v k=v`` into a dict, refusing unknown, repeated or odd words.

    ``what`` names a key in the messages: upstream's outbound grammar says
    "unsupported option", ours "unknown key".
    """
    unknown = "unknown key" if what == "key" else "unsupported option"
    if len(untrusted_value) > MAX_VALUE:
        raise EntryError("value too long")
    words: dict[str, str] = {}
    for untrusted_word in untrusted_value.split(" "):
        match = _WORD_RE.fullmatch(untrusted_word)
        if match is None:
            raise EntryError(f"malformed word {untrusted_word[:40]!r}")
        key, value = match.groups()
        if key not in allowed:
            raise EntryError(f"{unknown} {key[:20]!r}")
        if key in words:
            raise EntryError(f"repeated {what} {key!r}")
        words[key] = value
    return words


def parse_numbered(
    untrusted_entries: Mapping[str, bytes],
    parse_one: Callable[[str], Parsed],
    *,
    item: str = "entry",
    unexpected: str = "key",
) -> list[Parsed]:
    """Each ``NNNN`` entry of a directory parsed, in key order; one bad entry fails them all.

    The error names the entry (``{item} NNNN: why``), so the log says which
    one dom0 must rewrite.
    """
    parsed = []
    for untrusted_key in sorted(untrusted_entries):
        if not _NUMBERED_KEY_RE.fullmatch(untrusted_key):
            raise EntryError(f"unexpected {unexpected} {untrusted_key[:20]!r}")
        try:
            untrusted_text = untrusted_entries[untrusted_key].decode("ascii")
        except UnicodeDecodeError:
            raise EntryError(f"{item} {untrusted_key}: not ASCII") from None
        try:
            parsed.append(parse_one(untrusted_text))
        except EntryError as err:
            raise EntryError(f"{item} {untrusted_key}: {err}") from None
    return parsed


def port_text(ports: tuple[int, int]) -> str:
    """A port range as nft writes it: ``N`` for one port, else ``N-M``."""
    first, last = ports
    return str(first) if first == last else f"{first}-{last}"


def parse_port_range(untrusted_text: str) -> tuple[int, int]:
    """``N-M`` with 1 <= N <= M <= 65535, in decimal without leading zeros (as dom0 writes)."""
    match = _PORTS_RE.fullmatch(untrusted_text)
    if match is None:
        raise EntryError(f"bad port range {untrusted_text[:20]!r}")
    first, last = int(match.group(1)), int(match.group(2))
    if not 1 <= first <= last <= 65535:
        raise EntryError(f"port range {first}-{last} out of order or out of 1-65535")
    return first, last


def parse_network(untrusted_text: str) -> IPNetwork:
    """An address with prefix, host bits clear, in canonical form."""
    try:
        network = ipaddress.ip_network(untrusted_text, strict=True)
    except ValueError as err:
        raise EntryError(f"bad network: {err}") from None
    if str(network) != untrusted_text:
        raise EntryError(f"network {untrusted_text[:50]!r} not in canonical form")
    return network
