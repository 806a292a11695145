"""Ending tracked flows that the rules no longer admit, through the ``conntrack`` tool.

Every hop and the target accept the later packets of a connection on
Qubes' ``ct state established`` rule, so removing the rule that admitted
it stops only new connections. Like upstream's worker, ours deletes the
entries of the flows the new rules no longer admit, once nft holds them:
each caller lists the entries its change concerns (filtered by the tool,
never the whole table), decides with its own rules which to end, and
deletes each by its exact original tuple. Nothing here ever flushes the
table.

A flow cut this way stays cut: the next TCP packet counts as new again
(the kernel tracks TCP loosely) and meets the SYN guard of our chains
(:data:`agent_worker.input_rules.ONLY_SYN_OPENS`); a UDP datagram is a new
flow, decided by the rules in force.

The listing is the tool's text output (``conntrack -L``), one entry per
line: protocol name and number, timeout, optional state, then the
original tuple's ``key=value`` words and the reply tuple's, e.g.::

    tcp 6 431999 ESTABLISHED src=192.0.2.10 dst=192.0.2.2 sport=40000 dport=8080 \
        src=10.137.0.6 dst=192.0.2.10 sport=22 dport=40000 [ASSURED] mark=0 use=1
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from agent_worker.qdb_parse import IPAddress

log = logging.getLogger("qubes.conntrack")

#: Runs the conntrack tool with these arguments, returns what it printed.
Tool = Callable[[list[str]], str]

TOOL_TIMEOUT = 10.0
_PORT_PROTOS = ("tcp", "udp")


class ConntrackError(RuntimeError):
    """The tool could not run or list; the flows stay (logged by the caller)."""


@dataclass(frozen=True)
class Flow:
    """One tracked flow: its original tuple and where it really goes (reply source).

    ``reply_src``/``reply_sport`` are the destination after any DNAT, which is
    what a hop's forward-hook rules saw; without DNAT they equal ``dst``/``dport``.
    ``proto`` is ``icmp`` for ICMPv6 too (as the rules name it).
    """

    version: Literal[4, 6]
    proto: str
    src: IPAddress
    dst: IPAddress
    sport: int | None
    dport: int | None
    reply_src: IPAddress
    reply_sport: int | None
    #: ICMP type, code and id of the original direction
    icmp: tuple[int, int, int] | None = None


def _int(text: str, limit: int) -> int:
    if not text.isdigit() or int(text) > limit:
        raise ValueError(f"bad number {text[:10]!r}")
    return int(text)


def parse_line(line: str, version: Literal[4, 6]) -> Flow | None:
    """One entry of ``conntrack -L -f ipv4|ipv6``; None for anything else."""
    words = line.split()
    if len(words) < 3 or not words[1].isdigit():
        return None
    proto = "icmp" if words[0] == "icmpv6" else words[0]
    seen: dict[str, list[str]] = {}
    for word in words[2:]:
        key, sep, value = word.partition("=")
        if sep:
            seen.setdefault(key, []).append(value)
    try:
        src, reply_src = (ipaddress.ip_address(a) for a in seen["src"][:2])
        dst = ipaddress.ip_address(seen["dst"][0])
        ports = {
            key: [_int(v, 65535) for v in seen.get(key, [])[:2]] for key in ("sport", "dport")
        }
        icmp = None
        if proto == "icmp" and {"type", "code", "id"} <= seen.keys():
            icmp = (_int(seen["type"][0], 255), _int(seen["code"][0], 255),
                    _int(seen["id"][0], 65535))
    except (KeyError, ValueError):
        return None
    if src.version != version or dst.version != version:
        return None
    sport = ports["sport"][0] if ports["sport"] else None
    dport = ports["dport"][0] if ports["dport"] else None
    reply_sport = ports["sport"][1] if len(ports["sport"]) > 1 else None
    return Flow(version, proto, src, dst, sport, dport, reply_src, reply_sport, icmp)


def run_tool(args: list[str]) -> str:
    """``conntrack ARGS`` in this network namespace; its standard output.

    ``-D`` exits 1 when the entry is already gone: that is not an error.
    """
    try:
        result = subprocess.run(
            ["conntrack", *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConntrackError(f"cannot run conntrack: {err}") from None
    if result.returncode not in (0, 1) or (result.returncode == 1 and args[0] != "-D"):
        raise ConntrackError(" ".join(result.stderr.split())[:200] or f"exit {result.returncode}")
    return result.stdout


def _family(version: Literal[4, 6]) -> str:
    return "ipv4" if version == 4 else "ipv6"


def list_flows(version: Literal[4, 6], filters: list[str], tool: Tool = run_tool) -> list[Flow]:
    """Flows of one family matching the tool's ``filters`` (e.g. ``--orig-dst A``)."""
    output = tool(["-L", "-f", _family(version), *filters])
    return [flow for line in output.splitlines() if (flow := parse_line(line, version))]


def delete_args(flow: Flow) -> list[str]:
    """``conntrack -D`` arguments naming exactly this flow's original tuple."""
    proto = "icmpv6" if flow.proto == "icmp" and flow.version == 6 else flow.proto
    args = ["-D", "-f", _family(flow.version), "-p", proto,
            "--orig-src", str(flow.src), "--orig-dst", str(flow.dst)]
    if flow.proto in _PORT_PROTOS and flow.sport is not None and flow.dport is not None:
        args += ["--sport", str(flow.sport), "--dport", str(flow.dport)]
    elif flow.icmp is not None:
        kind = "icmp" if flow.version == 4 else "icmpv6"
        icmp_type, code, ident = flow.icmp
        args += [f"--{kind}-type", str(icmp_type), f"--{kind}-code", str(code),
                 f"--{kind}-id", str(ident)]
    return args


def end(flows: Iterable[Flow], what: str, tool: Tool = run_tool) -> int:
    """Delete each flow's entry; how many were asked to go. Logged per flow."""
    count = 0
    for flow in flows:
        tool(delete_args(flow))
        count += 1
        log.info("ended %s flow %s %s:%s -> %s:%s (%s)", flow.proto, flow.src,
                 flow.sport or "", flow.dst, flow.dport or "", flow.reply_src, what)
    return count


def local_addresses() -> frozenset[IPAddress]:
    """Addresses of this namespace's interfaces (``ip -j address``); empty if unknown."""
    try:
        result = subprocess.run(["ip", "-j", "address"], capture_output=True, text=True,
                                timeout=TOOL_TIMEOUT, check=True)
        interfaces = json.loads(result.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as err:
        log.warning("cannot list this qube's addresses: %s", err)
        return frozenset()
    addresses = set()
    for interface in interfaces if isinstance(interfaces, list) else []:
        for info in interface.get("addr_info", []) if isinstance(interface, dict) else []:
            try:
                addresses.add(ipaddress.ip_address(str(info.get("local"))))
            except ValueError:
                continue
    return frozenset(addresses)
