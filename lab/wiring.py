"""Namespace plumbing that does what Xen, vif-route-qubes and setup-ip do on Qubes.

- A qube is a namespace ``qlab-<name>`` with the Qubes base ruleset.
- Connecting a client to its netvm is a veth pair: ``vif<domid>.0`` in the
  netvm (interface group 2, the netvm's own address as /32, a /32 route to
  the client, proxy ARP, the client in the antispoof sets) and ``eth0`` in
  the client (its address as /32, the netvm as on-link gateway and default
  route), and the same in IPv6 when it is on (/128 addresses, ``proxy_ndp``).
- The LAN is a bridge in ``qlab-lan-switch``; LAN hosts and the uplink
  ``eth0`` of an edge netvm plug into it.
"""

from __future__ import annotations

import ipaddress

from lab import netns
from lab.base_ruleset import base_ruleset, client_elements
from lab.topology import Lan, Qube

BRIDGE = "br0"
#: Xen's highest domid; vif-route-qubes derives route metrics from it.
MAX_DOMID = 32752
#: Qubes hands out /32 (and /128) addresses: the netmask every qube gets.
NETMASK = "255.255.255.255"


def vif_name(domid: int) -> str:
    """Backend interface name of a client's first NIC, as Xen names it."""
    return f"vif{domid}.0"


def switch_up(lan: Lan) -> None:
    """The LAN switch and every LAN host, plugged in and addressed."""
    switch = netns.namespace(netns.SWITCH)
    netns.create(switch)
    netns.ip_batch(switch, [f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"])
    for index, host in enumerate(lan.hosts):
        ns = netns.namespace(host.name)
        netns.create(ns)
        _plug(ns, f"h{index}")
        commands = [f"address add {address} dev eth0{_nodad(address)}"
                    for address in host.addresses]
        commands += [f"route add {route.to} via {route.via} dev eth0" for route in host.routes]
        netns.ip_batch(ns, commands)


def _nodad(address: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> str:
    """IPv6 addresses skip duplicate address detection, so they work at once (no clash here)."""
    return " nodad" if address.version == 6 else ""


def _plug(ns: str, port: str) -> None:
    """A veth from ``eth0`` in ``ns`` to ``port`` on the switch bridge, both up."""
    switch = netns.namespace(netns.SWITCH)
    netns.run(["ip", "link", "add", port, "netns", switch, "type", "veth",
               "peer", "name", "eth0", "netns", ns])
    netns.ip_batch(switch, [f"link set {port} master {BRIDGE}", f"link set {port} up"])
    netns.ip_batch(ns, ["link set eth0 up"])


def qube_up(qube: Qube) -> None:
    """A booted qube without network: namespace, sysctls, base ruleset."""
    ns = netns.namespace(qube.name)
    netns.create(ns)
    forward = "1" if qube.provides_network else "0"
    netns.sysctl(ns, {"net/ipv4/ip_forward": forward})
    netns.nft(ns, base_ruleset())


def ipv6_forwarding(qube: str, on: bool) -> None:
    """What qubes-network does when ``/qubes-netvm-gateway6`` is set: forward IPv6 too."""
    netns.sysctl(netns.namespace(qube), {"net/ipv6/conf/all/forwarding": "1" if on else "0"})


def uplink_up(qube: Qube, lan: Lan, port: str) -> None:
    """The physical NIC of an edge netvm: ``eth0`` on the LAN, default routes."""
    ns = netns.namespace(qube.name)
    _plug(ns, port)
    commands = []
    if qube.uplink is not None:
        commands.append(f"address add {qube.uplink} dev eth0")
        if lan.gateway is not None:
            commands.append(f"route add default via {lan.gateway} dev eth0")
    if qube.uplink6 is not None:
        commands.append(f"address add {qube.uplink6} dev eth0 nodad")
        if lan.gateway6 is not None:
            commands.append(f"route add default via {lan.gateway6} dev eth0")
    netns.ip_batch(ns, commands)


def vif_online(
    netvm: str,
    client: str,
    domid: int,
    client_ip: ipaddress.IPv4Address,
    gateway: ipaddress.IPv4Address,
    client_ip6: ipaddress.IPv6Address | None = None,
    gateway6: ipaddress.IPv6Address | None = None,
) -> str:
    """Connect ``client`` to ``netvm``; returns the vif name.

    Antispoof elements go in before the link is up, as vif-route-qubes
    does, so the client never sends unfiltered. Without ``client_ip6`` the
    ip6 ``allowed`` set has nothing for this vif, so every IPv6 packet
    from it is dropped, as on Qubes. ``gateway6`` is the netvm's IPv6
    address, present when IPv6 is on for the netvm too.
    """
    vif = vif_name(domid)
    netvm_ns, client_ns = netns.namespace(netvm), netns.namespace(client)
    netns.run(["ip", "link", "add", vif, "netns", netvm_ns, "type", "veth",
               "peer", "name", "eth0", "netns", client_ns])
    elements = client_elements("add", vif, str(client_ip))
    if client_ip6 is not None:
        elements += client_elements("add", vif, str(client_ip6))
    netns.nft(netvm_ns, elements)
    netns.ip_batch(netvm_ns, [f"link set {vif} group 2", f"link set {vif} up"])
    netns.sysctl(netvm_ns, {f"net/ipv4/conf/{vif}/proxy_arp": "1"})
    metric = MAX_DOMID - domid
    netvm_side = [
        f"route add {client_ip} dev {vif} metric {metric}",
        f"address add {gateway}/32 dev {vif}",
    ]
    if client_ip6 is not None:
        netvm_side.append(f"route add {client_ip6}/128 dev {vif} metric {metric}")
    if client_ip6 is not None and gateway6 is not None:
        netvm_side.append(f"address add {gateway6}/128 dev {vif} nodad")
        netns.sysctl(netvm_ns, {f"net/ipv6/conf/{vif}/proxy_ndp": "1"})
    netns.ip_batch(netvm_ns, netvm_side)
    client_side = [
        f"address add {client_ip}/32 dev eth0",
        "link set eth0 up",
        f"route add {gateway} dev eth0 scope link",
        f"route add default via {gateway} dev eth0 onlink",
    ]
    if client_ip6 is not None:
        client_side.insert(1, f"address add {client_ip6}/128 dev eth0 nodad")
    if client_ip6 is not None and gateway6 is not None:
        client_side += [
            f"route add {gateway6}/128 dev eth0",
            f"route add default via {gateway6} dev eth0",
        ]
    netns.ip_batch(client_ns, client_side)
    return vif


def vif_offline(
    netvm: str,
    vif: str,
    client_ip: ipaddress.IPv4Address,
    client_ip6: ipaddress.IPv6Address | None = None,
) -> None:
    """Disconnect the client behind ``vif``: antispoof elements out, link gone.

    Deleting the vif also deletes the client's ``eth0`` (a veth pair dies
    whole), as a detached Xen frontend disappears from the client.
    """
    netvm_ns = netns.namespace(netvm)
    if netns.link_exists(netvm_ns, vif):
        netns.run(["ip", "-n", netvm_ns, "link", "delete", vif])
    elements = client_elements("delete", vif, str(client_ip))
    if client_ip6 is not None:
        elements += client_elements("delete", vif, str(client_ip6))
    netns.nft(netvm_ns, elements)
