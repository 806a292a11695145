"""Ending tracked flows that the rules no longer admit, over ctnetlink in this process.

Every hop and the target accept the later packets of a connection on
Qubes' ``ct state established`` rule, so removing the rule that admitted
it stops only new connections. Like upstream's worker, ours deletes the
entries of the flows the new rules no longer admit, once nft holds them:
each caller lists the entries its change concerns (never the whole
table), decides with its own rules which to end, and deletes each by its
exact original tuple. Nothing here ever flushes
the table.

A flow cut this way stays cut: the next TCP packet counts as new again
(the kernel tracks TCP loosely) and meets the SYN guard of our chains
(:data:`agent_worker.input_rules.ONLY_SYN_OPENS`); a UDP datagram is a new
flow, decided by the rules in force.

The table is read and changed as the ``conntrack`` tool does, but without
a process: a lasting netlink socket (``NETLINK_NETFILTER``), one
``IPCTNL_MSG_CT_GET`` dump per listing and one ``IPCTNL_MSG_CT_DELETE`` per
flow. A listing
asks the kernel to filter by family and by the tuple fields the caller
names (``CTA_FILTER``, Linux 5.9 and later; IPv6 addresses excepted, see
:func:`dump_body`); an older kernel ignores the filter and sends the
family's whole table, so the same match is applied here again. Either
way the kernel walks its whole conntrack hash (shared by all namespaces,
sized from the RAM): that walk, not this code, is most of the cost of a
listing (doc/performance.md).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from agent_worker.entries import IPAddress, IpVersion

log = logging.getLogger("qubes.conntrack")

TOOL_TIMEOUT = 10.0

_Reply = TypeVar("_Reply")


class ConntrackError(RuntimeError):
    """The table could not be listed or changed; the flows stay (logged by the caller)."""


@dataclass(frozen=True)
class Flow:
    """One tracked flow: its original tuple and where it really goes (reply source).

    ``reply_src``/``reply_sport`` are the destination after any DNAT, which is
    what a hop's forward-hook rules saw; without DNAT they equal ``dst``/``dport``.
    ``proto`` is ``tcp``, ``udp``, ``icmp`` (for ICMPv6 too, as the rules name
    it) or else the protocol number; ports are set when the kernel tracks
    them for the protocol.
    """

    version: IpVersion
    proto: str
    src: IPAddress
    dst: IPAddress
    sport: int | None
    dport: int | None
    reply_src: IPAddress
    reply_sport: int | None
    #: ICMP type, code and id of the original direction
    icmp: tuple[int, int, int] | None = None


#: the callers' words for a :class:`Match`'s fields, as the conntrack tool spells them
_MATCH_OPTIONS = {"-p": "proto", "--orig-src": "orig_src", "--orig-dst": "orig_dst",
                  "--reply-src": "reply_src"}


@dataclass(frozen=True)
class Match:
    """Which flows a listing wants: each field set must be equal."""

    proto: str | None = None
    orig_src: IPAddress | None = None
    orig_dst: IPAddress | None = None
    reply_src: IPAddress | None = None

    @classmethod
    def parse(cls, filters: list[str]) -> Match:
        """``-p P``, ``--orig-src A``, ``--orig-dst A``, ``--reply-src A`` pairs."""
        if len(filters) % 2:
            raise ValueError(f"conntrack filter without a value: {filters}")
        fields: dict[str, object] = {}
        for option, value in zip(filters[::2], filters[1::2], strict=True):
            name = _MATCH_OPTIONS.get(option)
            if name is None:
                raise ValueError(f"unknown conntrack filter {option!r}")
            fields[name] = value if name == "proto" else ipaddress.ip_address(value)
        return cls(**fields)  # type: ignore[arg-type]

    def admits(self, flow: Flow) -> bool:
        return (
            (self.proto is None or flow.proto == self.proto)
            and (self.orig_src is None or flow.src == self.orig_src)
            and (self.orig_dst is None or flow.dst == self.orig_dst)
            and (self.reply_src is None or flow.reply_src == self.reply_src)
        )


class Tool(Protocol):
    """This namespace's conntrack table as the worker uses it (tests put a stand-in)."""

    def list(self, version: IpVersion, match: Match) -> list[Flow]:
        """Flows of one family, at least those ``match`` admits."""

    def delete(self, flow: Flow) -> None:
        """Delete the entry of exactly this original tuple; gone already is fine."""


# -- netlink, as linux/netlink.h, linux/netfilter/nfnetlink*.h name it -----------

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW, IPCTNL_MSG_CT_GET, IPCTNL_MSG_CT_DELETE = 0, 1, 2
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_FILTER = 1, 2, 25
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_SRC = {4: 1, 6: 3}
CTA_IP_DST = {4: 2, 6: 4}
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
#: ICMP id, type and code attributes per family
CTA_PROTO_ICMP = {4: (4, 5, 6), 6: (7, 8, 9)}
CTA_FILTER_ORIG_FLAGS, CTA_FILTER_REPLY_FLAGS = 1, 2
FILTER_IP_SRC, FILTER_IP_DST, FILTER_PROTO_NUM = 1 << 0, 1 << 1, 1 << 3

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, resource id
_ATTR = struct.Struct("=HH")  # nlattr: length, type
_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
_ADDRESS_SIZE = {4: 4, 6: 16}
_PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp"}
_RECEIVE_SIZE = 1 << 16


def _malformed(what: str) -> ConntrackError:
    return ConntrackError(f"malformed ctnetlink reply: {what}")


def _attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + bytes(-length % 4)


def _nest(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _proto_number(proto: str, version: IpVersion) -> int:
    if proto == "icmp":
        return 1 if version == 4 else 58
    numbers = {name: number for number, name in _PROTO_NAMES.items() if name != "icmp"}
    if proto in numbers:
        return numbers[proto]
    if proto.isdigit() and int(proto) < 256:
        return int(proto)
    raise ValueError(f"unknown protocol {proto[:20]!r}")


def request(kind: int, flags: int, sequence: int, version: IpVersion, body: bytes) -> bytes:
    """One ctnetlink message: header, nfgenmsg of the family, attributes."""
    payload = _NFGEN.pack(_FAMILY[version], 0, 0) + body
    return _HEADER.pack(_HEADER.size + len(payload), NFNL_SUBSYS_CTNETLINK << 8 | kind,
                        NLM_F_REQUEST | flags, sequence, 0) + payload


def dump_body(version: IpVersion, match: Match) -> bytes:
    """The dump's kernel filter (``CTA_FILTER``) for ``match``; empty for the whole family.

    A tuple's protocol is the same both ways, so it is matched in the
    original. Addresses are left to the kernel for IPv4 only: Linux 6.18
    (here) compares IPv6 addresses the wrong way round, its filter sending
    the entries whose address differs; IPv6 addresses are matched here.
    """
    kernel = match if version == 4 else Match(proto=match.proto)
    orig_ip = b""
    orig_flags = reply_flags = 0
    if kernel.orig_src is not None:
        orig_ip += _attr(CTA_IP_SRC[version], kernel.orig_src.packed)
        orig_flags |= FILTER_IP_SRC
    if kernel.orig_dst is not None:
        orig_ip += _attr(CTA_IP_DST[version], kernel.orig_dst.packed)
        orig_flags |= FILTER_IP_DST
    orig = _nest(CTA_TUPLE_IP, orig_ip) if orig_ip else b""
    if kernel.proto is not None:
        number = _proto_number(kernel.proto, version)
        orig += _nest(CTA_TUPLE_PROTO, _attr(CTA_PROTO_NUM, bytes([number])))
        orig_flags |= FILTER_PROTO_NUM
    body = _nest(CTA_TUPLE_ORIG, orig) if orig else b""
    if kernel.reply_src is not None:
        body += _nest(CTA_TUPLE_REPLY, _nest(CTA_TUPLE_IP, _attr(CTA_IP_SRC[version],
                                                                 kernel.reply_src.packed)))
        reply_flags |= FILTER_IP_SRC
    if not body:
        return b""
    return body + _nest(CTA_FILTER, _attr(CTA_FILTER_ORIG_FLAGS, struct.pack("=I", orig_flags)),
                        _attr(CTA_FILTER_REPLY_FLAGS, struct.pack("=I", reply_flags)))


def delete_body(flow: Flow) -> bytes:
    """``CTA_TUPLE_ORIG`` naming exactly this flow's original tuple."""
    proto = [_attr(CTA_PROTO_NUM, bytes([_proto_number(flow.proto, flow.version)]))]
    if flow.icmp is not None:
        icmp_type, code, ident = flow.icmp
        id_attr, type_attr, code_attr = CTA_PROTO_ICMP[flow.version]
        proto += [_attr(id_attr, struct.pack("!H", ident)), _attr(type_attr, bytes([icmp_type])),
                  _attr(code_attr, bytes([code]))]
    elif flow.sport is not None and flow.dport is not None:
        proto += [_attr(CTA_PROTO_SRC_PORT, struct.pack("!H", flow.sport)),
                  _attr(CTA_PROTO_DST_PORT, struct.pack("!H", flow.dport))]
    return _nest(CTA_TUPLE_ORIG, _nest(CTA_TUPLE_IP, _attr(CTA_IP_SRC[flow.version],
                                                           flow.src.packed),
                                       _attr(CTA_IP_DST[flow.version], flow.dst.packed)),
                 _nest(CTA_TUPLE_PROTO, *proto))


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """Each netlink message in ``data``: type, sequence, payload; lengths checked."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < _HEADER.size:
            raise _malformed("short message header")
        length, kind, _flags, sequence, _port = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise _malformed(f"message length {length}")
        yield kind, sequence, data[offset + _HEADER.size:offset + length]
        offset += (length + 3) & ~3


def attributes(data: bytes) -> dict[int, bytes]:
    """The attributes at one level of ``data`` by type (flags stripped); lengths checked."""
    found = {}
    offset, size, unpack = 0, len(data), _ATTR.unpack_from
    while offset < size:
        if size - offset < _ATTR.size:
            raise _malformed("short attribute")
        length, kind = unpack(data, offset)
        end = offset + length
        if length < _ATTR.size or end > size:
            raise _malformed(f"attribute length {length}")
        found[kind & NLA_TYPE_MASK] = data[offset + _ATTR.size:end]
        offset = (end + 3) & ~3
    return found


def _number(attrs: dict[int, bytes], kind: int, size: int) -> int | None:
    value = attrs.get(kind)
    if value is None:
        return None
    if len(value) != size:
        raise _malformed(f"attribute {kind} of {len(value)} bytes")
    return int.from_bytes(value, "big")


#: an address from its bytes; a table's flows share few addresses, and building one is
#: a good part of parsing an entry
_address = functools.lru_cache(maxsize=1024)(ipaddress.ip_address)


def _tuple(data: bytes | None, version: IpVersion) -> tuple[
    IPAddress, IPAddress, int, int | None, int | None, tuple[int, int, int] | None
]:
    """Source, destination, protocol, ports, ICMP of a ``CTA_TUPLE_*``."""
    if data is None:
        raise _malformed("entry without its tuples")
    attrs = attributes(data)
    ip = attributes(attrs.get(CTA_TUPLE_IP, b""))
    proto = attributes(attrs.get(CTA_TUPLE_PROTO, b""))
    size = _ADDRESS_SIZE[version]
    addresses = [ip.get(CTA_IP_SRC[version]), ip.get(CTA_IP_DST[version])]
    number = _number(proto, CTA_PROTO_NUM, 1)
    if number is None or any(a is None or len(a) != size for a in addresses):
        raise _malformed("tuple without its addresses or protocol")
    src, dst = (_address(a) for a in addresses)  # type: ignore[arg-type]
    sport = _number(proto, CTA_PROTO_SRC_PORT, 2)
    dport = _number(proto, CTA_PROTO_DST_PORT, 2)
    icmp = None
    if number in (1, 58):
        id_attr, type_attr, code_attr = CTA_PROTO_ICMP[version]
        fields = (_number(proto, type_attr, 1), _number(proto, code_attr, 1),
                  _number(proto, id_attr, 2))
        if None not in fields:
            icmp = fields
    return src, dst, number, sport, dport, icmp  # type: ignore[return-value]


def parse_entry(payload: bytes, version: IpVersion) -> Flow | None:
    """One ``IPCTNL_MSG_CT_NEW`` of a dump as a flow; None for another family."""
    if len(payload) < _NFGEN.size:
        raise _malformed("entry without its nfgenmsg")
    if payload[0] != _FAMILY[version]:
        return None
    attrs = attributes(payload[_NFGEN.size:])
    src, dst, number, sport, dport, icmp = _tuple(attrs.get(CTA_TUPLE_ORIG), version)
    reply_src, _, _, reply_sport, _, _ = _tuple(attrs.get(CTA_TUPLE_REPLY), version)
    return Flow(version, _PROTO_NAMES.get(number, str(number)), src, dst, sport, dport,
                reply_src, reply_sport, icmp)


def _error(payload: bytes) -> int:
    """The (negative) errno of an ``NLMSG_ERROR`` or ``NLMSG_DONE``; 0 for success."""
    if len(payload) < 4:
        raise _malformed("error message without its code")
    return int(struct.unpack_from("=i", payload)[0])


def _failed(what: str, code: int) -> ConntrackError:
    return ConntrackError(f"{what}: {os.strerror(-code)}")


def read_dump(data: Iterable[bytes], sequence: int, version: IpVersion) -> list[Flow]:
    """The flows of a dump's replies (each one datagram) up to ``NLMSG_DONE``."""
    flows = []
    for datagram in data:
        for kind, seen, payload in messages(datagram):
            if seen != sequence:
                raise _malformed(f"sequence {seen}, not {sequence}")
            if kind == NLMSG_DONE:
                if len(payload) >= 4 and (code := _error(payload)) < 0:
                    raise _failed("listing conntrack entries", code)
                return flows
            if kind == NLMSG_ERROR:
                if (code := _error(payload)) < 0:
                    raise _failed("listing conntrack entries", code)
            elif kind == NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW:
                if (flow := parse_entry(payload, version)) is not None:
                    flows.append(flow)
            elif kind != NLMSG_NOOP:
                raise _malformed(f"message type {kind:#x}")
    raise _malformed("dump without its end")


def read_ack(data: Iterable[bytes], sequence: int) -> None:
    """The answer to a deletion: success, or the entry already gone; else an error."""
    for kind, seen, payload in messages(next(iter(data))):
        if kind != NLMSG_ERROR or seen != sequence:
            raise _malformed(f"message type {kind:#x} answering a deletion")
        code = _error(payload)
        if code < 0 and code != -errno.ENOENT:
            raise _failed("deleting a conntrack entry", code)
        return
    raise _malformed("deletion without its answer")


def _namespace() -> int:
    """The calling thread's network namespace (its inode)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


class Netlink:
    """The kernel's table of the caller's network namespace, over one lasting socket.

    The socket stays open: closing a ``NETLINK_NETFILTER`` socket waits for
    nf_tables to finish freeing what the last transaction removed (an RCU
    grace period, 10-15 ms here), and the worker ends flows right after its
    transactions. A new one is opened when the caller is in another
    namespace, and after any error (what is left unread on it is not to be
    trusted). One thread at a time.
    """

    def __init__(self, timeout: float = TOOL_TIMEOUT) -> None:
        self.timeout = timeout
        self._sequence = 0
        self._socket: socket.socket | None = None
        self._namespace = 0

    def _connected(self) -> socket.socket:
        namespace = _namespace()
        if self._socket is None or namespace != self._namespace:
            self.close()
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                 NETLINK_NETFILTER)
            try:
                sock.settimeout(self.timeout)
                sock.bind((0, 0))
            except OSError:
                sock.close()
                raise
            self._socket, self._namespace = sock, namespace
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _datagrams(self, sock: socket.socket) -> Iterator[bytes]:
        while True:
            data, _, flags, _ = sock.recvmsg(_RECEIVE_SIZE)
            if flags & socket.MSG_TRUNC:
                raise _malformed("message longer than the receive buffer")
            yield data

    def _request(self, message: bytes, read: Callable[[Iterator[bytes]], _Reply]) -> _Reply:
        """Send ``message``, and ``read`` what comes back; any failure drops the socket."""
        try:
            sock = self._connected()
            sock.sendall(message)
            return read(self._datagrams(sock))
        except OSError as err:
            self.close()
            raise ConntrackError(f"ctnetlink: {err.strerror or err}") from None
        except ConntrackError:
            self.close()
            raise

    def _next(self) -> int:
        self._sequence = self._sequence % 0xFFFFFFFF + 1
        return self._sequence

    def list(self, version: IpVersion, match: Match) -> list[Flow]:
        sequence = self._next()
        message = request(IPCTNL_MSG_CT_GET, NLM_F_DUMP, sequence, version,
                          dump_body(version, match))
        return self._request(message, lambda data: read_dump(data, sequence, version))

    def delete(self, flow: Flow) -> None:
        sequence = self._next()
        message = request(IPCTNL_MSG_CT_DELETE, NLM_F_ACK, sequence, flow.version,
                          delete_body(flow))
        self._request(message, lambda data: read_ack(data, sequence))


#: the default table: this process's network namespace
NETLINK = Netlink()


def list_flows(version: IpVersion, filters: list[str], tool: Tool = NETLINK) -> list[Flow]:
    """Flows of one family matching ``filters`` (e.g. ``--orig-dst A``, see :class:`Match`)."""
    match = Match.parse(filters)
    return [flow for flow in tool.list(version, match) if match.admits(flow)]


def end(flows: Iterable[Flow], what: str, tool: Tool = NETLINK) -> int:
    """Delete each flow's entry; how many were asked to go. Logged per flow."""
    count = 0
    for flow in flows:
        tool.delete(flow)
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
