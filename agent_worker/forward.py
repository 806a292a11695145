"""Forward steps: from untrusted ``/qns-forward/`` entries to nft rules.

Pure: parsing and rule text only; the worker loop reads QubesDB and
applies the text in one nft transaction. Every value is validated into a
typed object before it can reach nft, and a target with any entry that does
not parse gets no rules at all (its forwarded traffic stays blocked) and a
reason for the log.

Rules go into chains of table ``qubes`` (``ip``/``ip6``), because an accept
verdict only counts if it is reached before the Qubes ``oifgroup 2`` drop
in that same table's forward chain:

- ``qns-dnat``: a nat prerouting base chain with one DNAT per step;
- ``qns-forward``: jumped to from the ``forward`` chain right after the
  user's ``custom-forward``, accepting exactly the new flows our DNAT
  translated (``ct status dnat`` plus the original destination port),
  behind the TCP SYN guard (:data:`agent_worker.input_rules.ONLY_SYN_OPENS`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from agent_worker.conntrack import Flow
from agent_worker.entries import EntryError, parse_network, parse_port_range, parse_words

DNAT_CHAIN = "qns-dnat"
FORWARD_CHAIN = "qns-forward"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_KEY_RE = re.compile(r"[0-9]{4}")
#: most ports one step may take (dom0's limit per forward rule): a rule
#: never takes a whole edge, and a remapped range is one nft map element per port
MAX_FORWARD_PORTS = 1024
_STEP_KEYS = {"proto", "ports", "iif", "daddr", "to", "toports", "srchost"}
_REQUIRED = _STEP_KEYS - {"srchost"}


@dataclass(frozen=True)
class Step:
    """One validated DNAT step of a forward through this hop."""

    proto: Literal["tcp", "udp"]
    ports: tuple[int, int]
    iif: Literal["upstream", "downstream"]
    daddr: Literal["local"] | IPAddress
    to: IPAddress
    toports: tuple[int, int]
    srchost: IPNetwork | None

    @property
    def family(self) -> Literal["ip", "ip6"]:
        return "ip" if self.to.version == 4 else "ip6"


def _address(untrusted_text: str) -> IPAddress:
    """An address in the canonical form dom0 writes (``str(ipaddress)``), nothing else."""
    try:
        address = ipaddress.ip_address(untrusted_text)
    except ValueError as err:
        raise EntryError(f"bad address: {err}") from None
    if str(address) != untrusted_text:
        raise EntryError(f"address {untrusted_text[:50]!r} not in canonical form")
    return address


def parse_step(untrusted_value: str) -> Step:
    """Validate one ``/qns-forward/<ip>/NNNN`` value (doc/qubesdb.md)."""
    untrusted_words = parse_words(untrusted_value, _STEP_KEYS)
    missing = _REQUIRED - untrusted_words.keys()
    if missing:
        raise EntryError(f"missing {', '.join(sorted(missing))}")
    proto = untrusted_words["proto"]
    if proto not in ("tcp", "udp"):
        raise EntryError("proto must be tcp or udp")
    iif = untrusted_words["iif"]
    if iif not in ("upstream", "downstream"):
        raise EntryError("iif must be upstream or downstream")
    to = _address(untrusted_words["to"])
    daddr: Literal["local"] | IPAddress = (
        "local" if untrusted_words["daddr"] == "local" else _address(untrusted_words["daddr"])
    )
    ports = parse_port_range(untrusted_words["ports"])
    toports = parse_port_range(untrusted_words["toports"])
    if ports[1] - ports[0] != toports[1] - toports[0]:
        raise EntryError("ports and toports differ in size")
    size = ports[1] - ports[0] + 1
    if size > MAX_FORWARD_PORTS:
        raise EntryError(f"range of {size} ports: at most {MAX_FORWARD_PORTS}")
    srchost = parse_network(untrusted_words["srchost"]) if "srchost" in untrusted_words else None
    families = {to.version} | ({daddr.version} if daddr != "local" else set())
    if srchost is not None:
        families.add(srchost.version)
    if len(families) != 1:
        raise EntryError("addresses of different families")
    return Step(proto, ports, iif, daddr, to, toports, srchost)  # type: ignore[arg-type]


def parse_target(untrusted_entries: dict[str, bytes]) -> list[Step]:
    """All steps of one target directory, in key order; any bad entry fails it."""
    steps = []
    for untrusted_key in sorted(untrusted_entries):
        if not _KEY_RE.fullmatch(untrusted_key):
            raise EntryError(f"unexpected key {untrusted_key[:20]!r}")
        try:
            untrusted_text = untrusted_entries[untrusted_key].decode("ascii")
        except UnicodeDecodeError:
            raise EntryError(f"entry {untrusted_key}: not ASCII") from None
        try:
            steps.append(parse_step(untrusted_text))
        except EntryError as err:
            raise EntryError(f"entry {untrusted_key}: {err}") from None
    return steps


def _ports_text(ports: tuple[int, int]) -> str:
    return str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"


def _match(step: Step) -> str:
    """Where the packet came from and what it was sent to, before translation."""
    family = step.family
    parts = ["iifgroup != 2" if step.iif == "upstream" else "iifgroup 2"]
    if step.srchost is not None:
        parts.append(f"{family} saddr {step.srchost}")
    return " ".join(parts)


def dnat_rule(step: Step) -> str:
    """The prerouting DNAT of one step; ranges map 1:1 through an nft map."""
    family = step.family
    # always a local destination: a wrong or stale daddr must never catch transit traffic
    where = "fib daddr type local"
    if step.daddr != "local":
        where += f" {family} daddr {step.daddr}"
    head = f"{_match(step)} {where} {step.proto} dport {_ports_text(step.ports)}"
    to = f"[{step.to}]" if step.to.version == 6 else str(step.to)
    if step.ports == step.toports:
        target = f"{to}:{_ports_text(step.toports)}" if step.ports[0] == step.ports[1] else to
        return f"{head} dnat {family} to {target}"
    if step.ports[0] == step.ports[1]:
        return f"{head} dnat {family} to {to}:{step.toports[0]}"
    pairs = ", ".join(
        f"{port} : {port - step.ports[0] + step.toports[0]}"
        for port in range(step.ports[0], step.ports[1] + 1)
    )
    return f"{head} dnat {family} to {step.to} : {step.proto} dport map {{ {pairs} }}"


def accept_rule(step: Step) -> str:
    """Accept exactly the new flows this step translated, ahead of the vif drop.

    Only new ones: their later packets pass Qubes' own ``established`` rule,
    and an ``invalid`` one meets its drop as any other.
    """
    family = step.family
    return (
        f"{_match(step)} ct state new ct status dnat {family} daddr {step.to} "
        f"{step.proto} dport {_ports_text(step.toports)} "
        f"ct original proto-dst {_ports_text(step.ports)} accept"
    )


def chain_rules(steps: list[Step], family: Literal["ip", "ip6"]) -> tuple[list[str], list[str]]:
    """Rule bodies for ``qns-dnat`` and ``qns-forward`` of one family (no SYN guard)."""
    mine = [step for step in steps if step.family == family]
    return [dnat_rule(s) for s in mine], [accept_rule(s) for s in mine]


def step_admits(step: Step, flow: Flow) -> bool:
    """Whether ``flow`` is one this step's DNAT made (to end it when the step goes).

    Its original destination port in ``ports``, translated to ``to`` and the
    matching port of ``toports``, from ``srchost``, sent to ``daddr`` when
    the step names it. The interface it came in by is not tracked.
    """
    if flow.version != step.to.version or flow.proto != step.proto or flow.dport is None:
        return False
    first, last = step.ports
    if not first <= flow.dport <= last:
        return False
    if flow.reply_src != step.to or flow.reply_sport != flow.dport - first + step.toports[0]:
        return False
    if step.daddr != "local" and flow.dst != step.daddr:
        return False
    return step.srchost is None or flow.src in step.srchost
