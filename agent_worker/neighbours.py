"""ARP and IPv6 neighbour discovery on an uplink: who else has an address?

Before an edge NetVM answers for a routed address it probes the LAN for it
(duplicate address detection: RFC 5227 ARP probes, RFC 4862 neighbour
solicitations from ``::``), then announces it (gratuitous ARP, unsolicited
neighbour advertisement) and keeps watching: any other machine that claims
the address is reported and the address announced again (at most every
:data:`DEFEND_INTERVAL`), and one that probes for it is answered, so a
well-behaved host backs off.

Three layers: frames (build and parse, pure), :class:`Guard` (the per-
address decisions, pure, driven by a clock), :class:`Link` (raw packet
sockets on one interface). :mod:`agent_worker.routing` ties them to the
exposure; ``lab.probe neigh`` uses the frames to ask who has an address.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from agent_worker.qdb_parse import IPAddress

ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ICMPV6 = 58
NEIGHBOUR_SOLICITATION, NEIGHBOUR_ADVERTISEMENT = 135, 136
PACKET_OUTGOING = 4

#: Probe three times, 0.2 s apart, then wait 0.5 s for an answer. RFC 5227
#: spreads probes over seconds for hosts that just came up; a LAN host
#: that has the address answers within milliseconds.
PROBES = 3
PROBE_INTERVAL = 0.2
PROBE_WAIT = 0.5
#: A refused address is probed again this often (the owner may be gone).
RETRY_AFTER = 30.0
ANNOUNCEMENTS = 2
ANNOUNCE_INTERVAL = 1.0
#: Against a machine that claims an exposed address, announce it again at
#: most this often (RFC 5227's DEFEND_INTERVAL): caches it turned point
#: back to the edge, and two defenders cannot flood the LAN.
DEFEND_INTERVAL = 10.0


def mac_text(mac: bytes) -> str:
    return ":".join(f"{byte:02x}" for byte in mac)


# -- frames ------------------------------------------------------------------


def _ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_frame(
    op: int, sender_mac: bytes, sender_ip: ipaddress.IPv4Address,
    target_mac: bytes, target_ip: ipaddress.IPv4Address, dst: bytes = BROADCAST,
) -> bytes:
    """An Ethernet ARP frame (``op`` 1 request, 2 reply)."""
    body = struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
    body += sender_mac + sender_ip.packed + target_mac + target_ip.packed
    return _ethernet(dst, sender_mac, ETH_P_ARP, body)


def multicast_mac(address: ipaddress.IPv6Address) -> bytes:
    return b"\x33\x33" + address.packed[-4:]


def solicited_node(address: ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\xff\x02" + b"\x00" * 9 + b"\x01\xff" + address.packed[-3:])


def _icmpv6_frame(
    src_mac: bytes, dst_mac: bytes, src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address,
    message: bytes,
) -> bytes:
    """An Ethernet frame with an ICMPv6 message, checksum filled, hop limit 255 (as ND needs)."""
    pseudo = src.packed + dst.packed + struct.pack("!I3xB", len(message), ICMPV6)
    total = sum(struct.unpack(f"!{len(pseudo + message) // 2}H", pseudo + message))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    checksum = ~total & 0xFFFF
    message = message[:2] + struct.pack("!H", checksum) + message[4:]
    header = struct.pack("!IHBB", 6 << 28, len(message), ICMPV6, 255) + src.packed + dst.packed
    return _ethernet(dst_mac, src_mac, ETH_P_IPV6, header + message)


def solicitation(
    mac: bytes, target: ipaddress.IPv6Address, source: ipaddress.IPv6Address | None = None,
) -> bytes:
    """A neighbour solicitation for ``target``; from ``::`` (a DAD probe) without ``source``."""
    options = b"" if source is None else b"\x01\x01" + mac
    message = struct.pack("!BBH4x", NEIGHBOUR_SOLICITATION, 0, 0) + target.packed + options
    group = solicited_node(target)
    return _icmpv6_frame(mac, multicast_mac(group), source or ipaddress.IPv6Address("::"),
                         group, message)


def advertisement(
    mac: bytes, target: ipaddress.IPv6Address, source: ipaddress.IPv6Address,
) -> bytes:
    """An unsolicited neighbour advertisement of ``target`` to all nodes (override set)."""
    flags = 0x20000000  # override
    message = struct.pack("!BBHI", NEIGHBOUR_ADVERTISEMENT, 0, 0, flags) + target.packed
    message += b"\x02\x01" + mac
    return _icmpv6_frame(mac, multicast_mac(ALL_NODES), source, ALL_NODES, message)


@dataclass(frozen=True)
class Claim:
    """What a frame says about an address: someone uses it, or probes for it."""

    mac: str
    address: IPAddress
    #: a probe (ARP from 0.0.0.0, solicitation from ``::``): it wants the address
    probe: bool = False


def parse_frame(frame: bytes) -> list[Claim]:
    """The claims in one received Ethernet frame (ARP or ICMPv6 ND); none if anything is off.

    ARP: the sender uses its sender address; a request from 0.0.0.0 probes
    its target. ND: an advertisement's sender has its target; a
    solicitation's sender uses its source address, or probes its target
    when that is ``::``.
    """
    if len(frame) < 14:
        return []
    source_mac = mac_text(frame[6:12])
    ethertype = struct.unpack("!H", frame[12:14])[0]
    payload = frame[14:]
    if ethertype == ETH_P_ARP:
        if len(payload) < 28 or payload[:6] != struct.pack("!HHBB", 1, 0x0800, 6, 4):
            return []
        sender = ipaddress.IPv4Address(payload[14:18])
        target = ipaddress.IPv4Address(payload[24:28])
        if int(sender) == 0:
            return [Claim(source_mac, target, probe=True)] if payload[7] == 1 else []
        return [Claim(source_mac, sender)]
    if ethertype != ETH_P_IPV6 or len(payload) < 40 + 24:
        return []
    if payload[0] >> 4 != 6 or payload[6] != ICMPV6 or payload[7] != 255:
        return []
    source = ipaddress.IPv6Address(payload[8:24])
    message = payload[40:]
    target = ipaddress.IPv6Address(message[8:24])
    if message[0] == NEIGHBOUR_ADVERTISEMENT:
        return [Claim(source_mac, target)]
    if message[0] == NEIGHBOUR_SOLICITATION:
        if source.is_unspecified:
            return [Claim(source_mac, target, probe=True)]
        return [Claim(source_mac, source)]
    return []


# -- decisions ---------------------------------------------------------------

State = Literal["probing", "exposed", "conflict", "squatter"]


@dataclass(frozen=True)
class Send:
    """A frame the guard wants sent: a probe, an announcement, or an answer to a prober."""

    kind: Literal["probe", "announce", "defend"]
    address: IPAddress
    iface: str
    #: the prober's MAC (defend only)
    to: str | None = None


@dataclass
class Watch:
    """One address the edge wants to answer for on one uplink."""

    iface: str
    state: State = "probing"
    #: the other machine: owner (conflict) or claimant (squatter)
    mac: str | None = None
    probes: int = 0
    announcements: int = 0
    next_at: float = 0.0
    defended_at: float = float("-inf")


@dataclass
class Guard:
    """Duplicate address detection and conflict watch for the addresses of one edge."""

    watches: dict[IPAddress, Watch] = field(default_factory=dict)

    def sync(self, wanted: Mapping[IPAddress, str], now: float) -> None:
        """Watch exactly ``wanted`` (address -> uplink); a new one (or a new uplink) is probed."""
        for address in self.watches.keys() - wanted.keys():
            del self.watches[address]
        for address, iface in wanted.items():
            watch = self.watches.get(address)
            if watch is None or watch.iface != iface:
                self.watches[address] = Watch(iface, next_at=now)

    def state(self, address: IPAddress) -> tuple[State, str | None] | None:
        watch = self.watches.get(address)
        return None if watch is None else (watch.state, watch.mac)

    def next_deadline(self) -> float | None:
        times = [
            watch.next_at for watch in self.watches.values()
            if watch.state in ("probing", "conflict") or watch.announcements < ANNOUNCEMENTS
        ]
        return min(times, default=None)

    def tick(self, now: float) -> tuple[list[Send], bool]:
        """Frames due at ``now``, and whether a decision changed (exposed, or probed again)."""
        sends, changed = [], False
        for address, watch in sorted(self.watches.items(), key=lambda i: str(i[0])):
            if watch.next_at > now:
                continue
            if watch.state == "conflict":  # look again: the owner may be gone
                self.watches[address] = watch = Watch(watch.iface, next_at=now)
                changed = True
            if watch.state == "probing":
                if watch.probes < PROBES:
                    watch.probes += 1
                    sends.append(Send("probe", address, watch.iface))
                    last = watch.probes == PROBES
                    watch.next_at = now + (PROBE_WAIT if last else PROBE_INTERVAL)
                else:
                    watch.state, changed = "exposed", True
                    watch.next_at = now
            announcing = watch.state in ("exposed", "squatter")
            if announcing and watch.announcements < ANNOUNCEMENTS and watch.next_at <= now:
                watch.announcements += 1
                sends.append(Send("announce", address, watch.iface))
                watch.next_at = now + ANNOUNCE_INTERVAL
        return sends, changed

    def seen(self, iface: str, claims: Iterable[Claim], own_mac: str, now: float
             ) -> tuple[list[Send], bool]:
        """What to do about claims heard on ``iface``; whether a decision changed."""
        sends, changed = [], False
        for claim in claims:
            watch = self.watches.get(claim.address)
            if watch is None or watch.iface != iface or claim.mac == own_mac:
                continue
            if watch.state in ("probing", "conflict"):
                # someone has it, or probes for it at the same time (RFC 5227 2.1.1)
                changed |= watch.state != "conflict" or watch.mac != claim.mac
                watch.state, watch.mac, watch.next_at = "conflict", claim.mac, now + RETRY_AFTER
                continue
            if claim.probe:
                sends.append(Send("defend", claim.address, iface, claim.mac))
            elif now - watch.defended_at >= DEFEND_INTERVAL:
                watch.defended_at = now
                sends.append(Send("announce", claim.address, iface))
            changed |= watch.state != "squatter" or watch.mac != claim.mac
            watch.state, watch.mac = "squatter", claim.mac
        return sends, changed


# -- sockets -----------------------------------------------------------------

SO_ATTACH_FILTER = 26
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP, PACKET_DROP_MEMBERSHIP, PACKET_MR_MULTICAST = 1, 2, 0
#: classic BPF: only ICMPv6 neighbour solicitations and advertisements (no
#: extension headers, as ND requires), so routed traffic never reaches us.
_ND_FILTER = (
    (0x30, 0, 0, 20),  # ldb [20]: IPv6 next header
    (0x15, 0, 4, ICMPV6),  # jeq 58, else drop
    (0x30, 0, 0, 54),  # ldb [54]: ICMPv6 type
    (0x15, 1, 0, NEIGHBOUR_SOLICITATION),
    (0x15, 0, 1, NEIGHBOUR_ADVERTISEMENT),
    (0x06, 0, 0, 0xFFFF),  # accept
    (0x06, 0, 0, 0),  # drop
)


class Link:
    """Raw ARP and ND sockets on one interface (needs CAP_NET_RAW, as the agent has)."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self.arp = self._open(ETH_P_ARP)
        self.nd = self._open(ETH_P_IPV6)
        program = b"".join(struct.pack("HBBI", *insn) for insn in _ND_FILTER)
        self._filter = ctypes.create_string_buffer(program)
        fprog = struct.pack("@HP", len(_ND_FILTER), ctypes.addressof(self._filter))
        self.nd.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        self.mac: bytes = self.arp.getsockname()[4]
        self.groups: set[ipaddress.IPv6Address] = set()

    def _open(self, proto: int) -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
        sock.bind((self.iface, proto))
        sock.setblocking(False)
        return sock

    def fds(self) -> tuple[int, int]:
        return self.arp.fileno(), self.nd.fileno()

    def listen_for(self, addresses: Iterable[ipaddress.IPv6Address]) -> None:
        """Receive the solicitations for ``addresses`` (their solicited-node groups)."""
        wanted = {solicited_node(a) for a in addresses}
        index = socket.if_nametoindex(self.iface)
        for group, option in [(g, PACKET_ADD_MEMBERSHIP) for g in wanted - self.groups] + [
            (g, PACKET_DROP_MEMBERSHIP) for g in self.groups - wanted
        ]:
            mreq = struct.pack("iHH8s", index, PACKET_MR_MULTICAST, 6, multicast_mac(group))
            self.nd.setsockopt(SOL_PACKET, option, mreq)
        self.groups = wanted

    def receive(self) -> list[Claim]:
        """Every claim waiting in either socket (frames this host sent are skipped)."""
        claims = []
        for sock in (self.arp, self.nd):
            while True:
                try:
                    frame, address = sock.recvfrom(2048)
                except BlockingIOError:
                    break
                if address[2] != PACKET_OUTGOING:
                    claims += parse_frame(frame)
        return claims

    def send(self, frame: bytes) -> None:
        sock = self.arp if frame[12:14] == struct.pack("!H", ETH_P_ARP) else self.nd
        sock.send(frame)

    def close(self) -> None:
        self.arp.close()
        self.nd.close()


def frame_for(send: Send, mac: bytes, link_local: ipaddress.IPv6Address | None) -> bytes | None:
    """The frame of a guard's :class:`Send` from ``mac`` (IPv6 needs the uplink's link-local)."""
    address = send.address
    if isinstance(address, ipaddress.IPv4Address):
        zero, none = ipaddress.IPv4Address(0), b"\x00" * 6
        if send.kind == "probe":
            return arp_frame(1, mac, zero, none, address)
        if send.kind == "announce":
            return arp_frame(1, mac, address, none, address)
        to = bytes.fromhex((send.to or "").replace(":", ""))
        return arp_frame(2, mac, address, to, zero, dst=to)
    if send.kind == "probe":
        return solicitation(mac, address)
    if link_local is None:
        return None
    return advertisement(mac, address, link_local)
