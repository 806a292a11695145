"""Namespace plumbing that does what Xen, vif-route-qubes and setup-ip do on Qubes.

- A qube is a namespace ``qlab-<name>`` with the Qubes base ruleset.
- Connecting a client to its netvm is a veth pair: ``vif<domid>.0`` in the
  netvm (interface group 2, the netvm's own address as /32, a /32 route to
  the client, proxy ARP, the client in the antispoof sets) and ``eth0`` in
  the client (its address as /32, the netvm as on-link gateway and default
  route).
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
        commands = [f"address add {address} dev eth0" for address in host.addresses]
        commands += [f"route add {route.to} via {route.via} dev eth0" for route in host.routes]
        netns.ip_batch(ns, commands)


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


def uplink_up(qube: Qube, lan: Lan, port: str) -> None:
    """The physical NIC of an edge netvm: ``eth0`` on the LAN, default route."""
    assert qube.uplink is not None
    ns = netns.namespace(qube.name)
    _plug(ns, port)
    commands = [f"address add {qube.uplink} dev eth0"]
    if lan.gateway is not None:
        commands.append(f"route add default via {lan.gateway} dev eth0")
    netns.ip_batch(ns, commands)


def vif_online(
    netvm: str,
    client: str,
    domid: int,
    client_ip: ipaddress.IPv4Address,
    gateway: ipaddress.IPv4Address,
) -> str:
    """Connect ``client`` to ``netvm``; returns the vif name.

    Antispoof elements go in before the link is up, as vif-route-qubes
    does, so the client never sends unfiltered.
    """
    vif = vif_name(domid)
    netvm_ns, client_ns = netns.namespace(netvm), netns.namespace(client)
    netns.run(["ip", "link", "add", vif, "netns", netvm_ns, "type", "veth",
               "peer", "name", "eth0", "netns", client_ns])
    netns.nft(netvm_ns, client_elements("add", vif, str(client_ip)))
    netns.ip_batch(netvm_ns, [f"link set {vif} group 2", f"link set {vif} up"])
    netns.sysctl(netvm_ns, {f"net/ipv4/conf/{vif}/proxy_arp": "1"})
    netns.ip_batch(netvm_ns, [
        f"route add {client_ip} dev {vif} metric {MAX_DOMID - domid}",
        f"address add {gateway}/32 dev {vif}",
    ])
    netns.ip_batch(client_ns, [
        f"address add {client_ip}/32 dev eth0",
        "link set eth0 up",
        f"route add {gateway} dev eth0 scope link",
        f"route add default via {gateway} dev eth0 onlink",
    ])
    return vif


def vif_offline(netvm: str, vif: str, client_ip: ipaddress.IPv4Address) -> None:
    """Disconnect the client behind ``vif``: antispoof elements out, link gone.

    Deleting the vif also deletes the client's ``eth0`` (a veth pair dies
    whole), as a detached Xen frontend disappears from the client.
    """
    netvm_ns = netns.namespace(netvm)
    if netns.link_exists(netvm_ns, vif):
        netns.run(["ip", "-n", netvm_ns, "link", "delete", vif])
    netns.nft(netvm_ns, client_elements("delete", vif, str(client_ip)))
