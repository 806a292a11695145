"""The nft ruleset every Qubes qube boots with, for the lab's namespaces.

Written for the lab from the documented behaviour of qubes-core-agent-linux
(its ipv4/ipv6 base tables and the antispoof sets that vif-route-qubes
fills), so that our agent and tests meet the same tables, chains, hooks and
priorities as on a real qube. What matters to the project:

- table ``qubes`` (ip and ip6) with base chains ``prerouting`` (raw,
  antispoof), ``dnat-dns`` (dstnat, filled by the DNS helper on real
  Qubes), ``input`` (policy drop, ``jump custom-input`` first), ``forward``
  (``jump custom-forward`` first, then ``oifgroup 2`` drop: no traffic
  between downstream qubes) and ``postrouting`` (masquerade except towards
  downstream qubes);
- ``custom-input``/``custom-forward`` stay empty: they belong to the user;
- sets ``downstream`` (addresses of connected clients) and ``allowed``
  (interface . address pairs a client may send from).

Interfaces towards downstream qubes (``vifN.M``) are in interface group 2.
"""

from __future__ import annotations

import ipaddress

# Per family: address type, source match, and the input chain's middle part
# (what a downstream qube may send to its netvm itself).
_FAMILY_TEXT = {
    "ip": {
        "addr_type": "ipv4_addr",
        "saddr": "ip saddr",
        "input": """ct state invalid counter drop
        iifgroup 2 meta l4proto udp udp dport 68 counter drop
        ct state related,established accept
        iifgroup 2 meta l4proto icmp accept
        iif lo accept
        iifgroup 2 counter reject with icmp type host-prohibited""",
        "extra_chains": "",
    },
    "ip6": {
        "addr_type": "ipv6_addr",
        "saddr": "ip6 saddr",
        "input": """ct state invalid counter drop
        ct state related,established accept
        iifgroup 2 goto _icmpv6
        iif lo accept
        meta l4proto udp ip6 saddr fe80::/64 ip6 daddr fe80::/64 udp dport 546 accept
        meta l4proto ipv6-icmp accept""",
        # Downstream qubes may send ICMPv6 (neighbour discovery) but never
        # router advertisements or redirects; anything else is refused.
        "extra_chains": """
    chain _icmpv6 {
        meta l4proto != ipv6-icmp counter reject with icmpv6 type admin-prohibited
        icmpv6 type { nd-router-advert, nd-redirect } counter drop
        accept
    }
""",
    },
}


def _table(family: str) -> str:
    """One family's ``qubes`` table, as a fresh qube has it."""
    text = _FAMILY_TEXT[family]
    return f"""table {family} qubes {{
    set downstream {{
        type {text["addr_type"]}
    }}

    set allowed {{
        type ifname . {text["addr_type"]}
    }}

    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        {text["saddr"]} @downstream counter drop
    }}

    chain antispoof {{
        iifname . {text["saddr"]} @allowed accept
        counter drop
    }}

    chain dnat-dns {{
        type nat hook prerouting priority dstnat; policy accept;
    }}

    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifgroup 2 accept
        oif lo accept
        masquerade
    }}

    chain input {{
        type filter hook input priority filter; policy drop;
        jump custom-input
        {text["input"]}
        counter
    }}
{text["extra_chains"]}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        jump custom-forward
        ct state invalid counter drop
        ct state related,established accept
        iifgroup != 2 counter drop
        oifgroup 2 counter drop
    }}

    chain custom-input {{
    }}

    chain custom-forward {{
    }}
}}
"""


def base_ruleset() -> str:
    """nft script creating tables ``ip qubes`` and ``ip6 qubes`` in a fresh namespace.

    Meant for a namespace without these tables: applied twice, rules would
    be doubled (as on a qube, the ruleset is loaded once at boot).
    """
    return _table("ip") + "\n" + _table("ip6")


def _family(address: str) -> str:
    return "ip6" if ipaddress.ip_address(address).version == 6 else "ip"


def client_elements(command: str, vif: str, address: str) -> str:
    """nft script adding or deleting a client in the antispoof sets, as vif-route-qubes.

    ``command`` is ``add`` (vif online) or ``delete`` (vif offline). The
    client may then send only from ``address`` on ``vif``, and that address
    is refused on every other interface.
    """
    if command not in ("add", "delete"):
        raise ValueError(f"unknown command {command!r}")
    family = _family(address)
    addr = ipaddress.ip_address(address).compressed
    return (
        f"{command} element {family} qubes downstream {{ {addr} }}\n"
        f'{command} element {family} qubes allowed {{ "{vif}" . {addr} }}\n'
    )
