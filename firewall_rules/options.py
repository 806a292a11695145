"""One small class per rule option; each validates in its constructor.

The classes mirror qubes-core-admin's ``qubes/firewall.py`` options (same
names, same printed forms) and close its loose ends: every value is checked
against an explicit grammar before it is stored, so nothing that could
confuse QubesDB, the agent's parser or nft ever gets past here. Values stay
``untrusted_`` until their constructor accepted them.
"""

from __future__ import annotations

import ipaddress
import re
from typing import ClassVar

from firewall_rules.errors import RuleError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Characters upstream allows in a comment (letters, digits, some punctuation, space).
_COMMENT_RE = re.compile(r"\A[A-Za-z0-9:;,./\-_\[\] ]*\Z")
COMMENT_MAX = 1024

_PORT_RE = re.compile(r"\A[0-9]{1,5}\Z")
_PREFIX_RE = re.compile(r"\A(0|[1-9][0-9]{0,2})\Z")
_ICMP_RE = re.compile(r"\A[0-9]{1,3}\Z")
_EPOCH_RE = re.compile(r"\A[0-9]{1,12}\Z")
_IPV4_RE = re.compile(r"\A[0-9.]+\Z")
_IPV6_RE = re.compile(r"\A[0-9A-Fa-f:.]+\Z")

HOSTNAME_MAX = 253
LABEL_MAX = 63
_LABEL_RE = re.compile(r"\A[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\Z")
#: A label that inet_aton() or a resolver could read as a number (010, 0x7f).
_NUMBER_LIKE_RE = re.compile(r"\A(?:0x[0-9a-f]*|[0-9]+)\Z")

#: qubesd's rule for qube names (qubes.vm.validate_name).
_QUBE_NAME_RE = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_-]*\Z")
QUBE_NAME_MAX = 31


def qube_name_problem(untrusted_name: str) -> str | None:
    """Why the text can name no qube, in qubesd's words (``validate_name``); None if it can.

    The one check of qube names: the Admin API's destination, ``srcqube=``
    and qvm-firewall's VMNAME. A name that passes is safe in QubesDB,
    logs and paths.
    """
    if len(untrusted_name) > QUBE_NAME_MAX:
        return f"VM name must be shorter than {QUBE_NAME_MAX + 1} characters"
    if not _QUBE_NAME_RE.match(untrusted_name):
        return "VM name contains illegal characters"
    if untrusted_name == "Domain-0":
        return "VM name cannot be 'Domain-0'"
    if untrusted_name in ("none", "default"):
        return "VM name cannot be 'none' nor 'default'"
    if untrusted_name.endswith("-dm"):
        return "VM name cannot end with -dm"
    return None

#: Names upstream also accepts for dsthost (``--raw`` output uses dst4/dst6).
DSTHOST_ALIASES = ("dsthost", "dst4", "dst6", "dstname")


def shown(untrusted_value: str) -> str:
    """A value quoted for an error message: escaped, and cut if long."""
    if len(untrusted_value) > 60:
        untrusted_value = untrusted_value[:60] + "..."
    return repr(untrusted_value)


class Choice:
    """An option whose value is one of a fixed set of words."""

    key: ClassVar[str]
    choices: ClassVar[tuple[str, ...]]

    def __init__(self, untrusted_value: str) -> None:
        if untrusted_value not in self.choices:
            raise RuleError(
                f"{self.key}={shown(untrusted_value)}: must be one of {', '.join(self.choices)}"
            )
        self.value = untrusted_value

    def __str__(self) -> str:
        return self.value

    def __eq__(self, other: object) -> bool:
        return str(self) == str(other)

    def __hash__(self) -> int:
        return hash(self.value)


class Action(Choice):
    """What the rule does: outbound/inbound accept or drop, or forward."""

    key = "action"
    choices = ("accept", "drop", "forward")


class Proto(Choice):
    """Protocol to match."""

    key = "proto"
    choices = ("tcp", "udp", "icmp")


class SpecialTarget(Choice):
    """Upstream's named destinations; only the qube's DNS servers exist."""

    key = "specialtarget"
    choices = ("dns",)


class ForwardType(Choice):
    """Where a forwarded port is reachable: the LAN (external) or sibling qubes."""

    key = "forwardtype"
    choices = ("external", "internal")


def parse_ipv4(untrusted_text: str) -> ipaddress.IPv4Address | None:
    """A dotted quad in plain decimal; None when the text is no IPv4 address.

    ``ipaddress`` already refuses leading zeros and short forms, which
    inet_aton() would read as octal or as fewer parts (``010.0.0.1``,
    ``127.1``); the character check keeps signs and spaces out.
    """
    if not _IPV4_RE.match(untrusted_text) or untrusted_text.count(".") != 3:
        return None
    try:
        return ipaddress.IPv4Address(untrusted_text)
    except ValueError:
        return None


def parse_ipv6(untrusted_text: str) -> ipaddress.IPv6Address | None:
    """An IPv6 address without zone index; None otherwise."""
    if ":" not in untrusted_text or not _IPV6_RE.match(untrusted_text):
        return None
    try:
        return ipaddress.IPv6Address(untrusted_text)
    except ValueError:
        return None


def _prefix(key: str, untrusted_value: str, maximum: int) -> int:
    """The prefix length after the '/' of ``untrusted_value``, or ``maximum`` if none."""
    _, slash, untrusted_prefix = untrusted_value.partition("/")
    if not slash:
        return maximum
    if not _PREFIX_RE.match(untrusted_prefix) or int(untrusted_prefix) > maximum:
        raise RuleError(
            f"{key}={shown(untrusted_value)}: prefix length must be 0 to {maximum}"
        )
    return int(untrusted_prefix)


def check_hostname(key: str, untrusted_name: str) -> str:
    """A DNS name in the form the agent will resolve, never a disguised number."""
    if not untrusted_name:
        raise RuleError(f"{key}= needs a value")
    if len(untrusted_name) > HOSTNAME_MAX:
        raise RuleError(f"{key}: host name longer than {HOSTNAME_MAX} characters")
    labels = untrusted_name.split(".")
    for label in labels:
        if not label:
            raise RuleError(f"{key}={shown(untrusted_name)}: empty label in host name")
        if len(label) > LABEL_MAX:
            raise RuleError(
                f"{key}={shown(untrusted_name)}: label longer than {LABEL_MAX} characters"
            )
        if not _LABEL_RE.match(label):
            raise RuleError(
                f"{key}={shown(untrusted_name)}: not an IP address, network or host name"
                " (host names are lower case letters, digits, '-' and '_')"
            )
    if _NUMBER_LIKE_RE.match(labels[-1]) or all(_NUMBER_LIKE_RE.match(x) for x in labels):
        raise RuleError(
            f"{key}={shown(untrusted_name)}: looks like a number, not a host name;"
            " write IPv4 addresses as four decimal numbers without leading zeros"
        )
    return untrusted_name


class DstHost:
    """Destination: IPv4 or IPv6 address or network, or a DNS name.

    ``type`` is what upstream writes to QubesDB (``dst4``, ``dst6`` or
    ``dsthost``); addresses always carry their prefix length, as upstream
    prints them. A network may have host bits set, as upstream allows.
    """

    def __init__(self, untrusted_value: str, untrusted_key: str = "dsthost") -> None:
        if untrusted_key not in DSTHOST_ALIASES:
            raise RuleError(f"unknown option {shown(untrusted_key)}")
        key = untrusted_key
        untrusted_host, slash, _ = untrusted_value.partition("/")
        self.network: IPNetwork | None = None
        if (address4 := parse_ipv4(untrusted_host)) is not None:
            host = untrusted_host
            self.type = "dst4"
            prefix = _prefix(key, untrusted_value, 32)
            self.network = ipaddress.IPv4Network((address4, prefix), strict=False)
            self.value = f"{host}/{prefix}"
        elif (address6 := parse_ipv6(untrusted_host)) is not None:
            host = untrusted_host
            self.type = "dst6"
            prefix = _prefix(key, untrusted_value, 128)
            self.network = ipaddress.IPv6Network((address6, prefix), strict=False)
            self.value = f"{host}/{prefix}"
        elif slash:
            raise RuleError(
                f"{key}={shown(untrusted_value)}: invalid IP address {shown(untrusted_host)}"
            )
        else:
            self.type = "dsthost"
            self.value = check_hostname(key, untrusted_value)
        if key in ("dst4", "dst6") and self.type != key:
            raise RuleError(
                f"{key}={shown(untrusted_value)}: not an IPv{key[-1]} address or network"
            )
        if key == "dstname" and self.type != "dsthost":
            raise RuleError(f"dstname={shown(untrusted_value)}: not a host name")

    def __str__(self) -> str:
        return self.value

    @property
    def rule(self) -> str:
        return f"{self.type}={self.value}"


class SrcHost:
    """Source of inbound or forwarded traffic: an address or network, never a name.

    A name would have to be resolved in a netvm on every change to be safe;
    an address cannot go stale. Host bits must be clear, so what is shown
    is exactly what is matched.
    """

    key = "srchost"

    def __init__(self, untrusted_value: str) -> None:
        host = untrusted_value.partition("/")[0]
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = parse_ipv4(host)
        maximum = 32
        if address is None:
            address, maximum = parse_ipv6(host), 128
        if address is None:
            raise RuleError(
                f"srchost={shown(untrusted_value)}: must be an IP address or network"
                " (not a host name)"
            )
        prefix = _prefix("srchost", untrusted_value, maximum)
        try:
            self.network: IPNetwork = ipaddress.ip_network((address, prefix))
        except ValueError:
            raise RuleError(
                f"srchost={shown(untrusted_value)}: host bits set (did you mean"
                f" {ipaddress.ip_network((address, prefix), strict=False)}?)"
            ) from None
        self.value = str(self.network)

    def __str__(self) -> str:
        return self.value

    @property
    def rule(self) -> str:
        return f"srchost={self.value}"


class SrcQube:
    """Source of inbound or internal-forward traffic named by qube, not by address.

    dom0 resolves the name to the qube's current address from its own
    state each time it plans (never through DNS), so the rule follows the
    qube when its IP changes. The name is checked as qubesd checks VM names
    (:func:`qube_name_problem`), so it is safe in QubesDB, logs and paths.
    """

    key = "srcqube"

    def __init__(self, untrusted_value: str) -> None:
        problem = qube_name_problem(untrusted_value)
        if problem is not None:
            raise RuleError(
                f"srcqube={shown(untrusted_value)}: not a qube name: {problem}"
                " (addresses go in srchost=)"
            )
        self.value = untrusted_value

    def __str__(self) -> str:
        return self.value


class Ports:
    """A port or inclusive range, ``N`` or ``N-M``; printed always as ``N-M``."""

    key: ClassVar[str]

    def __init__(self, untrusted_value: str) -> None:
        untrusted_parts = untrusted_value.split("-")
        if len(untrusted_parts) > 2 or not all(_PORT_RE.match(p) for p in untrusted_parts):
            raise RuleError(f"{self.key}={shown(untrusted_value)}: use PORT or FIRST-LAST")
        numbers = [int(p) for p in untrusted_parts]
        if any(n > 65535 for n in numbers):
            raise RuleError(f"{self.key}={shown(untrusted_value)}: ports go up to 65535")
        self.first, self.last = numbers[0], numbers[-1]
        if self.first > self.last:
            raise RuleError(f"{self.key}={shown(untrusted_value)}: range runs backwards")

    @property
    def count(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    @property
    def rule(self) -> str:
        return f"{self.key}={self.first}-{self.last}"


class DstPorts(Ports):
    """Destination port(s): where the traffic goes (in the target, for forwards)."""

    key = "dstports"


class SrcPorts(Ports):
    """Forward rules: the port(s) at the netvm where the service is reachable."""

    key = "srcports"


class IcmpType:
    """ICMP type number, 0 to 255."""

    def __init__(self, untrusted_value: str) -> None:
        if not _ICMP_RE.match(untrusted_value) or int(untrusted_value) > 255:
            raise RuleError(f"icmptype={shown(untrusted_value)}: must be a number 0 to 255")
        self.value = int(untrusted_value)

    def __str__(self) -> str:
        return str(self.value)

    @property
    def rule(self) -> str:
        return f"icmptype={self.value}"


class Expire:
    """When the rule stops applying: seconds since the epoch (UTC), or ``shutdown``.

    ``expire=shutdown`` (forward and inbound rules only) lasts until the qube
    stops: dom0 deletes the rule when the qube shuts down, so it never comes
    back with the next start. It has no time, so :attr:`timestamp` is None.
    """

    AT_SHUTDOWN = "shutdown"

    def __init__(self, untrusted_value: str) -> None:
        self.timestamp: int | None = None
        if untrusted_value == self.AT_SHUTDOWN:
            return
        if not _EPOCH_RE.match(untrusted_value):
            raise RuleError(
                f"expire={shown(untrusted_value)}: must be seconds since the epoch"
                f" or {self.AT_SHUTDOWN}"
            )
        self.timestamp = int(untrusted_value)

    @property
    def at_shutdown(self) -> bool:
        return self.timestamp is None

    def __str__(self) -> str:
        return self.AT_SHUTDOWN if self.timestamp is None else str(self.timestamp)

    def is_expired(self, now: float) -> bool:
        return self.timestamp is not None and self.timestamp < now


class Comment:
    """Free text for the user; never reaches QubesDB or nft."""

    def __init__(self, untrusted_value: str) -> None:
        if len(untrusted_value) > COMMENT_MAX:
            raise RuleError(f"comment longer than {COMMENT_MAX} characters")
        if not _COMMENT_RE.match(untrusted_value):
            raise RuleError(
                "comment: only letters, digits, spaces and :;,./-_[] are allowed"
            )
        self.value = untrusted_value

    def __str__(self) -> str:
        return self.value
