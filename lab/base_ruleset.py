"""The nft ruleset every Qubes qube boots with, for the lab's namespaces.

The same tables, chains, rules, hooks and priorities as qubes-core-agent-linux
loads at boot (its ``qubes-ipv4.nft``, ``qubes-ipv6.nft`` and
``qubes-antispoof.nft``; tests/test_upstream_base_ruleset.py compares the
two whenever the upstream snapshots are there), so that our agent and the
lab tests meet exactly what a real qube has, no stricter:

- table ``qubes`` (ip and ip6) with base chains ``prerouting`` (raw,
  antispoof), ``input`` (policy drop, ``jump custom-input`` first),
  ``forward`` (``jump custom-forward`` first, then only the ``oifgroup 2``
  drop: no new connection towards downstream qubes; everything else is
  forwarded, as on Qubes) and ``postrouting`` (masquerade except towards
  downstream qubes);
- ``custom-input``/``custom-forward`` stay empty: they belong to the user;
- sets ``downstream`` (addresses of connected clients) and ``allowed``
  (interface . address pairs a client may send from).

One addition, made at network start on a real netvm by
``qubes-setup-dnat-to-ns``: the ``ip qubes`` chain ``dnat-dns`` (dstnat), left
empty in the lab (no DNS servers there).

Interfaces towards downstream qubes (``vifN.M``) are in interface group 2.
"""

from __future__ import annotations

import ipaddress

#: What a downstream qube may send to its netvm itself (the input chain's middle).
_INPUT = {
    "ip": """ct state invalid counter drop
        iifgroup 2 meta l4proto udp udp dport 68 counter drop
        ct state related,established accept
        iifgroup 2 meta l4proto icmp accept
        iif lo accept
        iifgroup 2 counter reject with icmp type host-prohibited""",
    "ip6": """ct state invalid counter drop
        ct state related,established accept
        iifgroup 2 goto _icmpv6
        iif lo accept
        meta l4proto udp ip6 saddr fe80::/64 ip6 daddr fe80::/64 udp dport 546 accept
        meta l4proto ipv6-icmp accept""",
}

#: Downstream qubes may send ICMPv6 (neighbour discovery) to their netvm,
#: never router advertisements or redirects; anything else is refused.
_ICMPV6_CHAIN = """
    chain _icmpv6 {
        meta l4proto != ipv6-icmp counter reject with icmpv6 type admin-prohibited
        icmpv6 type { nd-router-advert, nd-redirect } counter drop
        accept
    }
"""

#: qubes-setup-dnat-to-ns's chain (IPv4 only); empty in the lab.
_DNS_CHAIN = """
    chain dnat-dns {
        type nat hook prerouting priority dstnat; policy accept;
    }
"""


def _filter_table(family: str) -> str:
    """qubes-ipv4.nft / qubes-ipv6.nft: NAT, input and forward of one family."""
    extra = _ICMPV6_CHAIN if family == "ip6" else _DNS_CHAIN
    return f"""table {family} qubes {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifgroup 2 accept
        oif lo accept
        masquerade
    }}
{extra}
    chain input {{
        type filter hook input priority filter; policy drop;
        jump custom-input
        {_INPUT[family]}
        counter
    }}

    chain forward {{
        type filter hook forward priority filter; policy accept;
        jump custom-forward
        ct state invalid counter drop
        ct state related,established accept
        oifgroup 2 counter drop
    }}

    chain custom-input {{
    }}

    chain custom-forward {{
    }}
}}
"""


def _antispoof_table(family: str) -> str:
    """qubes-antispoof.nft, one family: what a client may send from, and where."""
    addr_type, saddr = ("ipv4_addr", "ip saddr") if family == "ip" else ("ipv6_addr", "ip6 saddr")
    return f"""table {family} qubes {{
    set downstream {{
        type {addr_type}
    }}

    set allowed {{
        type ifname . {addr_type}
    }}

    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifgroup 2 goto antispoof
        {saddr} @downstream counter drop
    }}

    chain antispoof {{
        iifname . {saddr} @allowed accept
        counter drop
    }}
}}
"""


def base_ruleset() -> str:
    """nft script creating tables ``ip qubes`` and ``ip6 qubes`` in a fresh namespace.

    Meant for a namespace without these tables: applied twice, rules would
    be doubled (as on a qube, the ruleset is loaded once at boot).
    """
    return "\n".join(
        [_filter_table("ip"), _filter_table("ip6"), _antispoof_table("ip"), _antispoof_table("ip6")]
    )


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
