"""The conntrack table over ctnetlink: real entries in a throwaway namespace, and replies as bytes.

The namespace tests make real flows (TCP, UDP, ICMP, both families) on
loopback, list them through :mod:`agent_worker.conntrack`, delete some by
their exact tuple and check with the ``conntrack`` tool (an independent
reader of the same table) that exactly those went. The byte tests build
kernel replies by hand and check that a malformed one is a
:class:`~agent_worker.conntrack.ConntrackError`, never another exception.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import shutil
import socket
import struct
from collections.abc import Iterator

import pytest
from conftest import cannot_run
from hypothesis import given, settings
from hypothesis import strategies as st
from worker_netns import CLONE_NEWNET, in_netns, make_netns, ns_run

from agent_worker import conntrack
from agent_worker.conntrack import ConntrackError, Flow, Match
from agent_worker.entries import IpVersion

LOOPBACK, OTHER, LOOPBACK6 = "127.0.0.1", "127.0.0.2", "::1"
#: Makes the namespace track its connections (conntrack hooks in only when a rule needs it).
TRACKING = """table inet tracking {
    chain out {
        type filter hook output priority 0; ct state new counter
    }
}
"""


@pytest.fixture
def netns() -> Iterator[str]:
    for name in make_netns():
        if shutil.which("conntrack") is None:
            cannot_run("conntrack (the tool, the tests' independent reader) is missing:"
                       " scripts/install-deps installs it")
        ns_run(name, "ip", "link", "set", "lo", "up")
        ns_run(name, "nft", "-f", "-", stdin=TRACKING)
        yield name


def tool_listing(ns: str, family: str) -> str:
    """The table as the ``conntrack`` tool prints it."""
    done = ns_run(ns, "conntrack", "-L", "-f", family)
    return done


def _icmp_echo(family: int, proto: int, echo_type: int, address: str, ident: int) -> None:
    """One echo request on a raw socket (the kernel fills in the ICMPv6 checksum)."""
    header = struct.pack("!BBHHH", echo_type, 0, 0, ident, 1)
    if family == socket.AF_INET:
        total = sum(struct.unpack("!4H", header))
        total = (total & 0xFFFF) + (total >> 16)
        header = struct.pack("!BBHHH", echo_type, 0, ~total & 0xFFFF, ident, 1)
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        sock.sendto(header, (address, 0))


def make_flows_and_cut() -> dict[str, object]:
    """Inside the namespace: open flows, list them several ways, end four, list again."""
    listener = socket.create_server((LOOPBACK, 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    for end in (client, server):  # closed with a reset: no FIN to take the flow up again
        end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tcp_port = listener.getsockname()[1]
    udp = []
    for address, port in ((OTHER, 5001), (OTHER, 5002), (LOOPBACK, 5003)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((LOOPBACK, 0))
        sock.sendto(b"x", (address, port))
        udp.append(sock)
    udp6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp6.sendto(b"x", (LOOPBACK6, 5004))
    _icmp_echo(socket.AF_INET, socket.IPPROTO_ICMP, 8, OTHER, 4242)
    _icmp_echo(socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, LOOPBACK6, 4243)

    def listed(version: IpVersion, *filters: str) -> list[Flow]:
        return sorted(conntrack.list_flows(version, list(filters)),
                      key=lambda f: (f.proto, f.dport or 0))

    found: dict[str, object] = {
        "all4": listed(4),
        "all6": listed(6),
        "to_other": listed(4, "--orig-dst", OTHER),
        "tcp": listed(4, "-p", "tcp"),
        "udp_reply_other": listed(4, "-p", "udp", "--reply-src", OTHER),
        "from_loopback_icmp": listed(4, "-p", "icmp", "--orig-src", LOOPBACK),
        "to_loopback6": listed(6, "--orig-dst", LOOPBACK6),
        "udp_reply_loopback6": listed(6, "-p", "udp", "--reply-src", LOOPBACK6),
        # what the kernel alone sent, without this side's own match
        "kernel_tcp": conntrack.NETLINK.list(4, Match(proto="tcp")),
        "kernel_to_other": conntrack.NETLINK.list(4, Match(orig_dst=ipaddress.ip_address(OTHER))),
        "tcp_port": tcp_port,
    }
    flows4 = found["all4"]
    assert isinstance(flows4, list)
    ended = [f for f in flows4 if f.proto == "tcp" or f.dport == 5001 or f.proto == "icmp"]
    ended += [f for f in listed(6) if f.proto == "icmp"]
    found["ended"] = conntrack.end(ended, "test")
    found["ended_again"] = conntrack.end(ended, "test")  # gone already: fine
    found["left4"], found["left6"] = listed(4), listed(6)
    for sock in (client, server, listener, udp6, *udp):
        sock.close()
    return found


def summary(flows: object) -> list[tuple[str, str, str, int | None]]:
    assert isinstance(flows, list)
    return [(f.proto, str(f.src), str(f.dst), f.dport) for f in flows]


def test_real_flows_are_listed_filtered_and_each_deleted_by_its_tuple(netns: str) -> None:
    found = in_netns(netns, make_flows_and_cut)
    port = found["tcp_port"]
    assert summary(found["all4"]) == [
        ("icmp", LOOPBACK, OTHER, None),
        ("tcp", LOOPBACK, LOOPBACK, port),
        ("udp", LOOPBACK, OTHER, 5001), ("udp", LOOPBACK, OTHER, 5002),
        ("udp", LOOPBACK, LOOPBACK, 5003),
    ]
    (icmp,) = [f for f in found["all4"] if f.proto == "icmp"]  # type: ignore[attr-defined]
    assert icmp.icmp == (8, 0, 4242) and icmp.reply_src == ipaddress.ip_address(OTHER)
    (tcp,) = found["tcp"]  # type: ignore[misc]
    assert tcp.reply_src == ipaddress.ip_address(LOOPBACK) and tcp.reply_sport == port
    assert summary(found["all6"]) == [("icmp", LOOPBACK6, LOOPBACK6, None),
                                      ("udp", LOOPBACK6, LOOPBACK6, 5004)]
    assert summary(found["to_other"]) == [("icmp", LOOPBACK, OTHER, None),
                                          ("udp", LOOPBACK, OTHER, 5001),
                                          ("udp", LOOPBACK, OTHER, 5002)]
    assert summary(found["udp_reply_other"]) == [("udp", LOOPBACK, OTHER, 5001),
                                                 ("udp", LOOPBACK, OTHER, 5002)]
    assert summary(found["from_loopback_icmp"]) == [("icmp", LOOPBACK, OTHER, None)]
    assert summary(found["to_loopback6"]) == summary(found["all6"])
    assert summary(found["udp_reply_loopback6"]) == [("udp", LOOPBACK6, LOOPBACK6, 5004)]
    # this kernel (5.9 and later) filters the dump itself (CTA_FILTER)
    assert summary(found["kernel_tcp"]) == summary(found["tcp"])
    assert sorted(summary(found["kernel_to_other"])) == sorted(summary(found["to_other"]))
    assert found["ended"] == found["ended_again"] == 4
    assert summary(found["left4"]) == [("udp", LOOPBACK, OTHER, 5002),
                                       ("udp", LOOPBACK, LOOPBACK, 5003)]
    assert summary(found["left6"]) == [("udp", LOOPBACK6, LOOPBACK6, 5004)]
    # the independent reader agrees: exactly those entries went
    tool4, tool6 = tool_listing(netns, "ipv4"), tool_listing(netns, "ipv6")
    assert "dport=5002" in tool4 and "dport=5003" in tool4 and "dport=5004" in tool6
    assert "dport=5001" not in tool4 and f"dport={port}" not in tool4
    assert "icmp" not in tool4 and "icmpv6" not in tool6


def delete_a_tcp_tuple_without_ports() -> str:
    loopback = ipaddress.ip_address(LOOPBACK)
    try:
        conntrack.NETLINK.delete(Flow(4, "tcp", loopback, loopback, None, None, loopback, None))
    except ConntrackError as err:
        return str(err)
    return "deleted"


def test_a_request_the_kernel_refuses_is_a_conntrack_error(netns: str) -> None:
    assert in_netns(netns, delete_a_tcp_tuple_without_ports) == (
        "deleting a conntrack entry: Invalid argument"
    )


def list_here_then_there(here: str, there: str) -> tuple[int, int, int]:
    """One Netlink object, used in ``here``, then in ``there``, then ``here`` again."""
    table = conntrack.Netlink()
    counts = []
    for name in (here, there, here):
        with open(f"/run/netns/{name}") as namespace:
            if ctypes.CDLL(None, use_errno=True).setns(namespace.fileno(), CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns")
        if name == here and not counts:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"x", (OTHER, 5001))
        counts.append(len(table.list(4, Match())))
    return counts[0], counts[1], counts[2]


def test_the_lasting_socket_follows_the_callers_namespace(netns: str) -> None:
    """The socket is the table of the namespace it was opened in: another one reopens it."""
    for other in make_netns():
        ns_run(other, "ip", "link", "set", "lo", "up")
        ns_run(other, "nft", "-f", "-", stdin=TRACKING)
        assert in_netns(netns, list_here_then_there, netns, other) == (1, 0, 1)


# -- replies as bytes -----------------------------------------------------------

SEQUENCE = 7
CT_NEW = 1 << 8  # ctnetlink subsystem, IPCTNL_MSG_CT_NEW


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def message(kind: int, payload: bytes, sequence: int = SEQUENCE) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 2, sequence, 0) + payload


def tuple_attr(kind: int, src: str, dst: str, sport: int, dport: int) -> bytes:
    addresses = attr(1, socket.inet_aton(src)) + attr(2, socket.inet_aton(dst))
    proto = attr(1, bytes([6])) + attr(2, struct.pack("!H", sport)) + attr(
        3, struct.pack("!H", dport))
    return attr(kind | 0x8000, attr(1 | 0x8000, addresses) + attr(2 | 0x8000, proto))


NFGEN = struct.pack("=BBH", socket.AF_INET, 0, 0)
REPLY_TUPLE = tuple_attr(2, "10.137.0.6", "192.0.2.10", 80, 40000)
#: What the kernel sends for one DNATed TCP flow (status, timeout, mark and id included).
ENTRY_PAYLOAD = (NFGEN + tuple_attr(1, "192.0.2.10", "192.0.2.2", 40000, 8080) + REPLY_TUPLE
                 + attr(3, struct.pack("!I", 0x18e)) + attr(7, struct.pack("!I", 431999))
                 + attr(8, struct.pack("!I", 0)) + attr(12, struct.pack("!I", 99)))
ENTRY = message(CT_NEW, ENTRY_PAYLOAD)
#: An original tuple whose source port has 4 bytes
WIDE_PORT = attr(0x8001, attr(0x8001, attr(1, socket.inet_aton("192.0.2.10"))
                              + attr(2, socket.inet_aton("192.0.2.2")))
                 + attr(0x8002, attr(1, b"\x06") + attr(2, struct.pack("!I", 40000))))
DONE = message(3, struct.pack("=i", 0))
FLOW = Flow(4, "tcp", ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("192.0.2.2"),
            40000, 8080, ipaddress.ip_address("10.137.0.6"), 80)


def test_a_dump_reply_parses_into_original_and_translated_tuples() -> None:
    assert conntrack.read_dump([ENTRY + DONE], SEQUENCE, 4) == [FLOW]
    assert conntrack.read_dump([ENTRY, ENTRY, DONE], SEQUENCE, 4) == [FLOW, FLOW]
    assert conntrack.read_dump([ENTRY + DONE], SEQUENCE, 6) == []  # another family's entry


@pytest.mark.parametrize("cut", range(1, len(ENTRY + DONE)))
def test_a_cut_reply_is_an_error_not_a_crash(cut: int) -> None:
    with pytest.raises(ConntrackError, match=r"^malformed ctnetlink reply: "):
        conntrack.read_dump([(ENTRY + DONE)[:cut]], SEQUENCE, 4)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (message(CT_NEW, b"\x02\x00") + DONE, "entry without its nfgenmsg"),
        (message(CT_NEW, struct.pack("=BBH", socket.AF_INET, 0, 0)) + DONE,
         "entry without its tuples"),
        (message(CT_NEW, struct.pack("=BBH", socket.AF_INET, 0, 0)
                 + attr(1, attr(1, attr(1, b"\x01\x02\x03"))) + attr(2, b"")) + DONE,
         "tuple without its addresses or protocol"),
        (message(CT_NEW, NFGEN + WIDE_PORT + REPLY_TUPLE) + DONE, "attribute 2 of 4 bytes"),
        (message(CT_NEW, ENTRY_PAYLOAD, sequence=8) + DONE, "sequence 8, not 7"),
        (message(0x0110, b"") + DONE, "message type 0x110"),
        (ENTRY, "dump without its end"),
    ],
)
def test_malformed_replies_say_what_is_wrong(reply: bytes, reason: str) -> None:
    with pytest.raises(ConntrackError, match=rf"^malformed ctnetlink reply: {reason}"):
        conntrack.read_dump([reply], SEQUENCE, 4)


def test_an_error_reply_is_a_one_line_conntrack_error() -> None:
    refused = message(2, struct.pack("=i", -errno.EPERM) + bytes(16))
    with pytest.raises(ConntrackError,
                       match=r"^listing conntrack entries: Operation not permitted$"):
        conntrack.read_dump([refused], SEQUENCE, 4)
    with pytest.raises(ConntrackError, match=r"^listing conntrack entries: Interrupted"):
        conntrack.read_dump([ENTRY + message(3, struct.pack("=i", -errno.EINTR))], SEQUENCE, 4)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(ENTRY) - 1), st.integers(0, 255))
def test_any_corrupted_byte_gives_flows_or_a_conntrack_error(at: int, value: int) -> None:
    corrupted = ENTRY[:at] + bytes([value]) + ENTRY[at + 1:]
    try:
        flows = conntrack.read_dump([corrupted + DONE], SEQUENCE, 4)
    except ConntrackError:
        return
    assert all(isinstance(flow, Flow) for flow in flows)


def test_requests_name_the_exact_tuple_and_the_kernel_filter() -> None:
    tuple_orig = conntrack.attributes(conntrack.attributes(conntrack.delete_body(FLOW))[1])
    addresses = conntrack.attributes(tuple_orig[1])
    proto = conntrack.attributes(tuple_orig[2])
    assert addresses == {1: socket.inet_aton("192.0.2.10"), 2: socket.inet_aton("192.0.2.2")}
    assert proto == {1: b"\x06", 2: struct.pack("!H", 40000), 3: struct.pack("!H", 8080)}
    icmp6 = Flow(6, "icmp", ipaddress.ip_address("fd09::15"), ipaddress.ip_address("fd09::14"),
                 None, None, ipaddress.ip_address("fd09::14"), None, (128, 0, 7))
    tuple_orig = conntrack.attributes(conntrack.attributes(conntrack.delete_body(icmp6))[1])
    assert conntrack.attributes(tuple_orig[2]) == {1: b"\x3a", 7: b"\x00\x07", 8: b"\x80",
                                                   9: b"\x00"}
    body = conntrack.attributes(conntrack.dump_body(
        4, Match.parse(["-p", "udp", "--reply-src", "10.137.0.6"])))
    assert struct.unpack("=I", conntrack.attributes(body[25])[1]) == (0b1000,)  # protocol
    assert struct.unpack("=I", conntrack.attributes(body[25])[2]) == (0b1,)  # source
    assert conntrack.dump_body(4, Match()) == b""  # the whole family


def test_filters_are_the_callers_words() -> None:
    assert Match.parse(["-p", "tcp", "--orig-dst", "192.0.2.2"]) == Match(
        proto="tcp", orig_dst=ipaddress.ip_address("192.0.2.2"))
    for bad in (["--orig-port-dst", "80"], ["-p"]):
        with pytest.raises(ValueError, match="conntrack filter"):
            Match.parse(bad)
