"""ARP/NDP frames and the edge's duplicate address decisions, pure.

The frames are checked field by field against the RFCs' layouts (and, in
the lab tests, against real kernels answering them); the Guard is driven
with a fake clock and made-up claims.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_worker import neighbours
from agent_worker.neighbours import (
    ANNOUNCE_INTERVAL,
    PROBE_INTERVAL,
    PROBE_WAIT,
    RETRY_AFTER,
    Claim,
    Guard,
    Send,
    frame_for,
    parse_frame,
)

MAC = bytes.fromhex("020000000001")
OTHER = "02:00:00:00:00:0b"
A4 = ipaddress.IPv4Address("192.0.2.25")
A6 = ipaddress.IPv6Address("2001:db8::25")
LL = ipaddress.IPv6Address("fe80::1")


def ones_complement_ok(frame: bytes) -> bool:
    """The ICMPv6 checksum of a frame verifies (RFC 4443 2.3)."""
    ip = frame[14:]
    message = ip[40:]
    pseudo = ip[8:40] + struct.pack("!I3xB", len(message), 58)
    data = pseudo + message + (b"\0" if len(message) % 2 else b"")
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def test_arp_probe_announce_and_defence() -> None:
    probe = frame_for(Send("probe", A4, "eth0"), MAC, None)
    assert probe is not None
    assert probe[:6] == neighbours.BROADCAST and probe[6:12] == MAC
    assert probe[14 + 14:14 + 18] == b"\0\0\0\0"  # sender 0.0.0.0 (RFC 5227 probe)
    assert parse_frame(probe) == [Claim("02:00:00:00:00:01", A4, probe=True)]
    announce = frame_for(Send("announce", A4, "eth0"), MAC, None)
    assert announce is not None
    assert parse_frame(announce) == [Claim("02:00:00:00:00:01", A4)]
    defend = frame_for(Send("defend", A4, "eth0", OTHER), MAC, None)
    assert defend is not None and defend[:6] == bytes.fromhex("02000000000b")
    assert struct.unpack("!H", defend[20:22])[0] == 2  # a reply
    assert parse_frame(defend) == [Claim("02:00:00:00:00:01", A4)]


def test_neighbour_solicitation_from_the_unspecified_address_is_a_dad_probe() -> None:
    frame = frame_for(Send("probe", A6, "eth0"), MAC, LL)
    assert frame is not None and ones_complement_ok(frame)
    assert frame[:6] == bytes.fromhex("3333ff000025")  # solicited-node group of ::25
    assert ipaddress.IPv6Address(frame[14 + 24:14 + 40]) == ipaddress.IPv6Address("ff02::1:ff00:25")
    assert frame[14 + 7] == 255  # hop limit, or receivers drop it
    assert len(frame) == 14 + 40 + 24  # no source link-layer option from ::
    assert parse_frame(frame) == [Claim("02:00:00:00:00:01", A6, probe=True)]


def test_solicitation_from_an_address_claims_that_address() -> None:
    source = ipaddress.IPv6Address("2001:db8::10")
    frame = neighbours.solicitation(MAC, A6, source)
    assert ones_complement_ok(frame)
    assert frame[-8:] == b"\x01\x01" + MAC
    assert parse_frame(frame) == [Claim("02:00:00:00:00:01", source)]


def test_unsolicited_advertisement() -> None:
    frame = frame_for(Send("announce", A6, "eth0"), MAC, LL)
    assert frame is not None and ones_complement_ok(frame)
    assert frame[:6] == bytes.fromhex("333300000001")
    message = frame[14 + 40:]
    assert message[0] == 136 and message[4] & 0x20  # advertisement, override
    assert message[-8:] == b"\x02\x01" + MAC  # target link-layer address
    assert parse_frame(frame) == [Claim("02:00:00:00:00:01", A6)]
    assert frame_for(Send("announce", A6, "eth0"), MAC, None) is None  # no link-local yet


@given(st.binary(max_size=120))
def test_any_bytes_parse_without_error(untrusted_frame: bytes) -> None:
    for claim in parse_frame(untrusted_frame):
        assert isinstance(claim, Claim)


@pytest.mark.parametrize("cut", [0, 13, 14 + 27])
def test_short_arp_frames_say_nothing(cut: int) -> None:
    assert parse_frame(neighbours.arp_frame(2, MAC, A4, MAC, A4)[:cut]) == []


@pytest.mark.parametrize("cut", [0, 13, 14 + 39, 14 + 40 + 23])
def test_short_ndp_frames_say_nothing(cut: int) -> None:
    assert parse_frame(neighbours.solicitation(MAC, A6)[:cut]) == []


def test_a_relayed_solicitation_with_another_hop_limit_is_ignored() -> None:
    frame = bytearray(neighbours.solicitation(MAC, A6))
    frame[14 + 7] = 64
    assert parse_frame(bytes(frame)) == []


# -- the Guard ----------------------------------------------------------------


def drive(guard: Guard, start: float, end: float, step: float = 0.05) -> list[tuple[float, Send]]:
    """Tick every ``step`` from ``start`` to ``end``: what was sent when."""
    sent = []
    for tick in range(int((end - start) / step + 1e-9) + 1):
        now = round(start + tick * step, 2)
        sends, _ = guard.tick(now)
        sent += [(now, s) for s in sends]
    return sent


def test_probes_then_exposes_and_announces_twice() -> None:
    guard = Guard()
    guard.sync({A4: "eth0"}, 0.0)
    assert guard.state(A4) == ("probing", None)
    sent = drive(guard, 0.0, 3.0)
    probe, announce = Send("probe", A4, "eth0"), Send("announce", A4, "eth0")
    done = round(2 * PROBE_INTERVAL + PROBE_WAIT, 2)
    assert sent == [
        (0.0, probe), (PROBE_INTERVAL, probe), (2 * PROBE_INTERVAL, probe),
        (done, announce), (round(done + ANNOUNCE_INTERVAL, 2), announce),
    ]
    assert guard.state(A4) == ("exposed", None)
    assert guard.next_deadline() is None


def test_an_answer_while_probing_is_a_conflict_probed_again_later() -> None:
    guard = Guard()
    guard.sync({A4: "eth0"}, 0.0)
    guard.tick(0.0)
    _, changed = guard.seen("eth0", [Claim(OTHER, A4)], "02:00:00:00:00:01", 0.1)
    assert changed and guard.state(A4) == ("conflict", OTHER)
    assert drive(guard, 0.2, RETRY_AFTER - 0.1, step=1.0) == []  # no probe, nothing exposed
    sends, changed = guard.tick(0.1 + RETRY_AFTER)
    assert changed and sends == [Send("probe", A4, "eth0")]
    assert guard.state(A4) == ("probing", None)


def test_another_host_probing_at_the_same_time_is_a_conflict() -> None:
    guard = Guard()
    guard.sync({A6: "eth0"}, 0.0)
    guard.seen("eth0", [Claim(OTHER, A6, probe=True)], "02:00:00:00:00:01", 0.1)
    assert guard.state(A6) == ("conflict", OTHER)


def test_claims_of_our_own_mac_another_uplink_or_address_are_ignored() -> None:
    guard = Guard()
    guard.sync({A4: "eth0"}, 0.0)
    own = "02:00:00:00:00:01"
    claims = [Claim(own, A4), Claim(OTHER, ipaddress.IPv4Address("192.0.2.26"))]
    assert guard.seen("eth0", claims, own, 0.1) == ([], False)
    assert guard.seen("eth1", [Claim(OTHER, A4)], own, 0.1) == ([], False)
    assert guard.state(A4) == ("probing", None)


def test_once_exposed_a_claimant_is_a_squatter_and_a_prober_is_answered() -> None:
    guard = Guard()
    guard.sync({A4: "eth0"}, 0.0)
    drive(guard, 0.0, 1.0)
    sends, changed = guard.seen("eth0", [Claim(OTHER, A4, probe=True)], "own", 1.1)
    assert changed and sends == [Send("defend", A4, "eth0", OTHER)]
    assert guard.state(A4) == ("squatter", OTHER)


def test_a_claimant_is_answered_by_an_announcement_at_most_every_defend_interval() -> None:
    guard = Guard()
    guard.sync({A4: "eth0"}, 0.0)
    drive(guard, 0.0, 3.0)
    announce = Send("announce", A4, "eth0")
    assert guard.seen("eth0", [Claim(OTHER, A4)], "own", 3.1) == ([announce], True)
    assert guard.seen("eth0", [Claim(OTHER, A4)], "own", 3.2) == ([], False)
    assert guard.state(A4) == ("squatter", OTHER)
    later = 3.1 + neighbours.DEFEND_INTERVAL
    assert guard.seen("eth0", [Claim(OTHER, A4)], "own", later) == ([announce], False)


def test_sync_forgets_and_restarts() -> None:
    guard = Guard()
    guard.sync({A4: "eth0", A6: "eth0"}, 0.0)
    drive(guard, 0.0, 1.0)
    guard.sync({A4: "eth1"}, 2.0)  # moved to another uplink: probed anew there
    assert guard.state(A4) == ("probing", None)
    assert guard.state(A6) is None
    assert guard.next_deadline() == 2.0
