"""Strict parsing of our QubesDB values (``key=value`` words), shared by
the forward steps and the input openings.

QubesDB is written by dom0, but an agent must not trust that it is well
formed: a value that does not match exactly is refused, never guessed at.
"""

from __future__ import annotations

import ipaddress
import re

_WORD_RE = re.compile(r"([a-z]+)=([A-Za-z0-9.:/-]+)")
_PORTS_RE = re.compile(r"(0|[1-9][0-9]{0,4})-(0|[1-9][0-9]{0,4})")
MAX_VALUE = 3072


class EntryError(ValueError):
    """An entry that cannot be used; the message says why, for the log."""


def parse_words(untrusted_value: str, allowed: set[str]) -> dict[str, str]:
    """Split ``k=v k=v`` into a dict, refusing unknown, repeated or odd words."""
    if len(untrusted_value) > MAX_VALUE:
        raise EntryError("value too long")
    words: dict[str, str] = {}
    for untrusted_word in untrusted_value.split(" "):
        match = _WORD_RE.fullmatch(untrusted_word)
        if match is None:
            raise EntryError(f"malformed word {untrusted_word[:40]!r}")
        key, value = match.groups()
        if key not in allowed:
            raise EntryError(f"unknown key {key!r}")
        if key in words:
            raise EntryError(f"repeated key {key!r}")
        words[key] = value
    return words


def parse_port_range(untrusted_text: str) -> tuple[int, int]:
    """``N-M`` with 1 <= N <= M <= 65535, in decimal without leading zeros (as dom0 writes)."""
    match = _PORTS_RE.fullmatch(untrusted_text)
    if match is None:
        raise EntryError(f"bad port range {untrusted_text[:20]!r}")
    first, last = int(match.group(1)), int(match.group(2))
    if not 1 <= first <= last <= 65535:
        raise EntryError(f"port range {first}-{last} out of order or out of 1-65535")
    return first, last


def parse_network(untrusted_text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An address with prefix, host bits clear, in canonical form."""
    try:
        network = ipaddress.ip_network(untrusted_text, strict=True)
    except ValueError as err:
        raise EntryError(f"bad network: {err}") from None
    if str(network) != untrusted_text:
        raise EntryError(f"network {untrusted_text[:50]!r} not in canonical form")
    return network
