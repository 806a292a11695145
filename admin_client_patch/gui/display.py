"""What the panel's tables show for a rule: one short text per column.

Pure functions of the rule (and the time, for expiry), so the words a
user reads are tested without a screen.
"""

from __future__ import annotations

import time

from firewall_rules import Rule

FORWARD_COLUMNS = ("Type", "Protocol", "Port(s)", "Source", "Expires", "Comment")
INBOUND_COLUMNS = ("Action", "Source", "Protocol", "Port(s)", "Expires", "Comment")

FORWARD_TYPES = {
    "external": "External (from the LAN)",
    "internal": "Internal (from other qubes)",
}
INBOUND_ACTIONS = {"accept": "Allow", "drop": "Block"}


def source_text(rule: Rule) -> str:
    """``any``, an address (``/32`` and ``/128`` left out), or ``qube NAME``."""
    if rule.srcqube is not None:
        return f"qube {rule.srcqube}"
    if rule.srchost is None:
        return "any"
    network = rule.srchost.network
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def duration_text(seconds: float) -> str:
    """``45 s``, ``59 min``, ``2 h 5 min``, ``3 days 4 h``: rounded up to what is shown."""
    seconds = max(0, int(seconds + 0.999))
    if seconds < 60:
        return f"{seconds} s"
    minutes = -(-seconds // 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    unit = "day" if days == 1 else "days"
    return f"{days} {unit} {hours} h" if hours else f"{days} {unit}"


def expiry_text(rule: Rule, now: float) -> str:
    """``never``, ``when the qube stops``, or time left and the local end time."""
    if rule.expire is None:
        return "never"
    if rule.expire.timestamp is None:
        return "when the qube stops"
    end = time.strftime("%Y-%m-%d %H:%M", time.localtime(rule.expire.timestamp))
    return f"in {duration_text(rule.expire.timestamp - now)} ({end})"


def ports_text(rule: Rule) -> str:
    """Forward: ``8080`` when kept, ``8080 → 80`` when changed; else the port(s) or ``any``."""
    if rule.srcports is not None and rule.dstports is not None:
        if str(rule.srcports) == str(rule.dstports):
            return str(rule.dstports)
        return f"{rule.srcports} → {rule.dstports}"
    if rule.dstports is not None:
        return str(rule.dstports)
    if rule.icmptype is not None:
        return f"ICMP type {rule.icmptype}"
    return "any"


def protocol_text(rule: Rule) -> str:
    return "any" if rule.proto is None else str(rule.proto).upper()


def forward_row(rule: Rule, now: float) -> list[str]:
    """The cells of a forward rule, in :data:`FORWARD_COLUMNS` order."""
    return [
        FORWARD_TYPES[str(rule.forwardtype)],
        protocol_text(rule),
        ports_text(rule),
        source_text(rule),
        expiry_text(rule, now),
        "" if rule.comment is None else str(rule.comment),
    ]


def inbound_row(rule: Rule, now: float) -> list[str]:
    """The cells of an inbound rule, in :data:`INBOUND_COLUMNS` order."""
    return [
        INBOUND_ACTIONS[str(rule.action)],
        source_text(rule),
        protocol_text(rule),
        ports_text(rule),
        expiry_text(rule, now),
        "" if rule.comment is None else str(rule.comment),
    ]
