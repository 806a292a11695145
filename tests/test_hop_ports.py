"""What a hop serves itself, pure: /proc/net listings and custom-input rules as nft lists them."""

from __future__ import annotations

import json
from pathlib import Path

from agent_worker import hop_ports

# /proc/net/tcp: 0.0.0.0:22 listening, 127.0.0.1:631 listening (loopback only), an
# established connection from local port 8080.
TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   1: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0
   2: 0600890A:1F90 0A00000A:9C40 01 00000000:00000000 00:00000000 00000000     0
"""
# /proc/net/udp6: [::]:5353 unconnected, [::1]:53 (loopback), a connected client socket.
UDP6 = """  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07
   1: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 07
   2: 00000000000000000000000000000000:A000 B80D0120000000000000000001000000:0035 01
"""


def test_sockets_serving_others_count_loopback_and_clients_do_not(tmp_path: Path) -> None:
    assert hop_ports.listening("tcp", TCP) == {22}
    assert hop_ports.listening("udp", UDP6) == {5353}
    (tmp_path / "tcp").write_text(TCP)
    (tmp_path / "udp6").write_text(UDP6)
    assert hop_ports.sockets(tmp_path) == [
        hop_ports.Served("tcp", 22, 22, "this qube listens on it"),
        hop_ports.Served("udp", 5353, 5353, "this qube listens on it"),
    ]


def _rule(*exprs: object) -> dict[str, object]:
    return {"family": "ip", "table": "qubes", "chain": "custom-input", "expr": list(exprs)}


def _dport(protocol: str, right: object) -> dict[str, object]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": protocol, "field": "dport"}},
                      "right": right}}


def test_accept_rules_naming_ports_open_them() -> None:
    l4proto_udp = {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}
    rules = [
        _rule(_dport("tcp", 22), {"accept": None}),
        _rule(_dport("tcp", {"set": [80, {"range": [8000, 8010]}]}), {"counter": None},
              {"accept": None}),
        _rule(l4proto_udp, _dport("th", 5353), {"accept": None}),
        _rule(_dport("th", 7000), {"accept": None}),  # no protocol named: both
        _rule(_dport("tcp", 23), {"drop": None}),  # closes, does not serve
        _rule({"accept": None}),  # no port named: claims nothing
    ]
    why = "its user opened it in custom-input"
    assert hop_ports.opened(rules) == [
        hop_ports.Served("tcp", 22, 22, why),
        hop_ports.Served("tcp", 80, 80, why),
        hop_ports.Served("tcp", 8000, 8010, why),
        hop_ports.Served("udp", 5353, 5353, why),
        hop_ports.Served("tcp", 7000, 7000, why),
        hop_ports.Served("udp", 7000, 7000, why),
    ]
    listing = json.dumps({"nftables": [{"metainfo": {}}, {"rule": rules[0]}]})
    assert hop_ports.custom_input(lambda _cmd, **_kw: listing) == [
        hop_ports.Served("tcp", 22, 22, why), hop_ports.Served("tcp", 22, 22, why)
    ]
    assert hop_ports.Served("tcp", 8000, 8010, why).overlaps("tcp", (8010, 8020))
    assert not hop_ports.Served("tcp", 8000, 8010, why).overlaps("udp", (8005, 8005))
