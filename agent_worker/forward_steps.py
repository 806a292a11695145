"""Forward steps: from untrusted ``/qns-forward/`` entries to nft map elements.

Pure: parsing and nft text only; the worker loop reads QubesDB and
applies the text in one nft transaction. Every value is validated into a
typed object before it can reach nft, and a target with any entry that does
not parse gets no rules at all (its forwarded traffic stays blocked) and a
reason for the log.

Steps are elements of maps, looked up by a fixed handful of rules, so
neither a new connection nor an established packet walks a list as long
as the steps (doc/agent.md):

- table ``qubes-network-server`` (``ip``/``ip6``, ours): the DNAT maps and
  chain ``qns-dnat`` (nat prerouting). One element per port a step takes,
  giving the address and port it goes to, in a map per side the traffic
  arrives from (``iif``) and per shape of key: any local address
  (protocol, port), one address of this hop (address, protocol, port), or
  from ``srchost`` (source, address, protocol, port). The first two are
  hash maps: adding or deleting an element costs the same however many
  there are; only ``srchost`` needs prefixes, hence an interval map, whose
  elements nft reads back before deleting one. Per map, a rule labels a
  connection its key finds (conntrack label :data:`FORWARDED_LABEL`) and the
  next translates it. Only packets to a local address (``fib daddr type
  local``) are looked up: a step never catches transit traffic. Kept apart
  from Qubes' tables so that listing those (the jumps, the user's
  ``custom-input``) never reads thousands of elements. Its chain
  ``qns-reply`` (prerouting, before the routing decision) marks the
  replies of connections a step took in from the uplink, which
  :mod:`agent_worker.reply_route` sends back by the uplink;
- table ``qubes``: chain ``qns-forward``, jumped to from the ``forward``
  chain right after the user's ``custom-forward`` (an accept verdict only
  counts if it is reached before the Qubes ``oifgroup 2`` drop in that same
  table's chain). A packet of a flow already admitted returns at its first
  rule; then the TCP SYN guard (:data:`agent_worker.input_rules.ONLY_SYN_OPENS`);
  then new connections carrying the label, i.e. exactly those a step of
  this hop translated, are accepted.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from agent_worker.conntrack import Flow
from agent_worker.entries import (
    EntryError,
    Family,
    IPAddress,
    IPNetwork,
    family_of,
    parse_address,
    parse_network,
    parse_numbered,
    parse_port_range,
    parse_words,
)
from agent_worker.input_rules import ONLY_NEW_WALK, ONLY_SYN_OPENS

DNAT_CHAIN = "qns-dnat"
FORWARD_CHAIN = "qns-forward"

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
    def family(self) -> Family:
        return family_of(self.to)


#: Step texts whose parse is remembered: dom0 changes a target's directory
#: key by key, and the worker reads it whole again.
PARSED_STEPS = 4096


@functools.lru_cache(maxsize=PARSED_STEPS)
def parse_step(untrusted_value: str) -> Step:
    """Validate one ``/qns-forward/<ip>/NNNN`` value (doc/qubesdb.md).

    A pure function of the text (a refusal is raised again each time).
    """
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
    to = parse_address(untrusted_words["to"])
    daddr: Literal["local"] | IPAddress = (
        "local" if untrusted_words["daddr"] == "local" else parse_address(untrusted_words["daddr"])
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
    return parse_numbered(untrusted_entries, parse_step)


Iif = Literal["upstream", "downstream"]
IIF_MATCH: dict[Iif, str] = {"upstream": "iifgroup != 2", "downstream": "iifgroup 2"}
#: Our table, beside Qubes' ``qubes`` (both families): the DNAT maps and their chain.
NAT_TABLE = "qubes-network-server"
Shape = Literal["local", "addressed", "source"]
#: (side the traffic arrives from, shape of key) -> DNAT map
DNAT_MAPS: dict[tuple[Iif, Shape], str] = {
    (iif, shape): f"qns-dnat-{iif}-{shape}"
    for iif in ("upstream", "downstream")
    for shape in ("local", "addressed", "source")
}
#: every map of the forward steps, in the order they are declared and looked up
OBJECTS = tuple(DNAT_MAPS.values())
#: Conntrack label bit of the connections a step translated, the one thing
#: ``qns-forward`` accepts (Qubes sets no label; a user's own rules may, on
#: other bits).
FORWARDED_LABEL = 127
#: Conntrack label bit of those that came in by the uplink: their replies go
#: back by the uplink (:mod:`agent_worker.reply_route`).
UPLINK_LABEL = 126
#: our table's chain marking those replies, before the routing decision
REPLY_CHAIN = "qns-reply"
#: the packet mark bit of such a reply, the one thing our routing rule matches
REPLY_MARK = 0x10000000
#: Family -> its maps' elements: name -> element texts
Elements = dict[str, frozenset[str]]


def _shape(step: Step) -> Shape:
    if step.srchost is not None:
        return "source"
    return "local" if step.daddr == "local" else "addressed"


def _key_parts(family: Family, shape: Shape) -> tuple[str, str]:
    """(type, lookup expression) of a map's key of that shape."""
    addr = "ipv4_addr" if family == "ip" else "ipv6_addr"
    port = ("inet_proto . inet_service", "meta l4proto . th dport")
    if shape == "local":
        return port
    if shape == "addressed":
        return f"{addr} . {port[0]}", f"{family} daddr . {port[1]}"
    return f"{addr} . {addr} . {port[0]}", f"{family} saddr . {family} daddr . {port[1]}"


def declarations(family: Family) -> dict[str, str]:
    """``map`` declaration (as after ``add``) of each DNAT map, by name."""
    addr = "ipv4_addr" if family == "ip" else "ipv6_addr"
    declared = {}
    for (_iif, shape), name in DNAT_MAPS.items():
        key, _lookup = _key_parts(family, shape)
        flags = " flags interval;" if shape == "source" else ""
        declared[name] = (
            f"map {family} {NAT_TABLE} {name} {{ type {key} : {addr} . inet_service;{flags} }}"
        )
    return declared


def dnat_rules(family: Family) -> list[str]:
    """``qns-dnat``: local TCP and UDP only; per map, label what it finds, then translate it.

    What came in by the uplink gets :data:`UPLINK_LABEL` too.
    """
    rules = ["fib daddr type != local return", "meta l4proto != { tcp, udp } return"]
    for (iif, shape), name in DNAT_MAPS.items():
        _key, lookup = _key_parts(family, shape)
        labels = f"ct label set {FORWARDED_LABEL}"
        if iif == "upstream":
            labels += f" ct label set {UPLINK_LABEL}"
        rules.append(f"{IIF_MATCH[iif]} {lookup} @{name} {labels}")
        rules.append(
            f"{IIF_MATCH[iif]} meta l4proto {{ tcp, udp }} dnat {family} to {lookup} map @{name}"
        )
    return rules


def reply_rules() -> list[str]:
    """``qns-reply``: a reply of a connection a step took in from the uplink gets
    :data:`REPLY_MARK`, other bits of the mark kept."""
    return [f"ct direction reply ct label {UPLINK_LABEL} meta mark set meta mark | {REPLY_MARK:#x}"]


def accept_rules() -> list[str]:
    """``qns-forward``: established packets out, the SYN guard, then what a step translated."""
    return [ONLY_NEW_WALK, ONLY_SYN_OPENS, f"ct label {FORWARDED_LABEL} accept"]


def dnat_elements(step: Step) -> tuple[tuple[str, str], ...]:
    """(map, element) of one step: one per port, giving the address and port it goes to."""
    shape = _shape(step)
    daddr = str(step.daddr)
    if shape == "source" and step.daddr == "local":
        daddr = "0.0.0.0/0" if step.to.version == 4 else "::/0"
    parts = {"local": [], "addressed": [daddr], "source": [str(step.srchost), daddr]}[shape]
    key = " . ".join([*parts, step.proto])
    shift = step.toports[0] - step.ports[0]
    return tuple(
        (DNAT_MAPS[(step.iif, shape)], f"{key} . {port} : {step.to} . {port + shift}")
        for port in range(step.ports[0], step.ports[1] + 1)
    )


def family_elements(steps: Iterable[Step]) -> dict[Family, Elements]:
    """Every map's elements in each family for ``steps`` (empty maps included)."""
    found: dict[Family, dict[str, set[str]]] = {
        family: {name: set() for name in OBJECTS} for family in ("ip", "ip6")
    }
    for step in steps:
        maps = found[step.family]
        for name, element in dnat_elements(step):
            maps[name].add(element)
    return {
        family: {name: frozenset(elements) for name, elements in maps.items()}
        for family, maps in found.items()
    }


def element_key(element: str) -> str:
    """What deletes a map element: its key, without ``: value``."""
    return element.partition(" : ")[0]


class TakenPorts:
    """The ports of the steps kept so far, per DNAT map and protocol, found by bisection.

    Keys of an nft interval map must not overlap (nft would either refuse
    the transaction or pick one of them); dom0 never plans two steps on one
    port of a hop, so a step meeting another only comes from entries it did
    not write. Kept ranges are disjoint: only the last one starting at or
    below a step's last port can meet it.
    """

    def __init__(self) -> None:
        self._starts: dict[tuple[str, str, str], list[int]] = {}
        self._held: dict[tuple[str, str, str], list[tuple[int, Step]]] = {}

    def holder(self, step: Step) -> Step | None:
        """The kept step sharing a port and a map with ``step``, if any."""
        key = (step.family, step.iif, step.proto)
        starts = self._starts.get(key, [])
        index = bisect.bisect_right(starts, step.ports[1])
        if index and self._held[key][index - 1][0] >= step.ports[0]:
            return self._held[key][index - 1][1]
        return None

    def add(self, step: Step) -> None:
        key = (step.family, step.iif, step.proto)
        starts = self._starts.setdefault(key, [])
        index = bisect.bisect_right(starts, step.ports[0])
        starts.insert(index, step.ports[0])
        self._held.setdefault(key, []).insert(index, (step.ports[1], step))

    def meets(self, steps: tuple[Step, ...]) -> tuple[Step, Step] | None:
        """(step, kept step) where one of ``steps`` meets a kept one or an earlier of them.

        None: all of them are kept.
        """
        if len(steps) == 1:
            (step,) = steps
            other = self.holder(step)
            if other is not None:
                return step, other
            self.add(step)
            return None
        own = TakenPorts()
        for step in steps:
            other = self.holder(step) or own.holder(step)
            if other is not None:
                return step, other
            own.add(step)
        for step in steps:
            self.add(step)
        return None


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
