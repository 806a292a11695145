"""The lab's dom0: owns the live topology, wires qubes, fills QubesDB, serves qubesd.

One process, one asyncio loop, so every change (an Admin API call, a qube
start, a netvm change) runs to completion before the next: like qubesd,
there is one place that knows the topology and one order of events.

It plays three roles of a real dom0:

- qubesd: the Admin API on ``$QUBES_LAB_DIR/qubesd.sock`` (the protocol
  lives in :mod:`lab.qubesd_server`, the calls in the NetworkServer this
  class is the host of, as the qubesd extension is on Qubes), and the
  QubesDB entries qubesd writes when qubes start and rules change;
- Xen/libvirt: starting a qube creates its namespace (its "boot"), and
  connecting it to its netvm runs what vif-route-qubes and setup-ip do
  (:mod:`lab.wiring`); a start gets a new domid, hence a new vif name;
- systemd in the qubes: the firewall worker in every qube providing
  network, and the input hook in every qube.

Lab commands (start, stop, set, status, shutdown) arrive as one JSON line
on the private socket ``$QUBES_LAB_DIR/dom0.sock`` (:mod:`lab.control`).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core_admin_patch.errors import QubesException, QubesValueError
from core_admin_patch.network_server import (
    DomainLike,
    ExpiryTimer,
    NetworkServer,
    derived_ip6,
    ipv6_enabled,
)
from firewall_rules import (
    Rule,
    RuleFiles,
    RuleKind,
    RuleLists,
    outbound_qdb_entries,
)
from lab import netns, procs, wiring
from lab.pyshim import qubesdb
from lab.qubesd_server import start_server
from lab.topology import Qube, Topology, TopologyError, load_topology, validate

log = logging.getLogger("qubes-lab.dom0")

DNS = ("10.139.1.1", "10.139.1.2")
#: Services (name, module) started in each qube: the firewall worker where
#: the qube provides network, the input hook everywhere.
FIREWALL = ("firewall", "agent_worker.firewall")
INPUT_HOOK = ("input", "agent_worker.input_hook")
#: How long a start waits for a netvm's worker to apply a client's rules.
HANDLED_TIMEOUT = 10.0


class Dom0Error(Exception):
    """A lab command that cannot be carried out; the message is for the user."""


@dataclass
class Runtime:
    """Live state of one qube, beside its (static) topology entry."""

    running: bool = False
    domid: int | None = None
    #: Backend interface in the netvm, and where/with which address it was made.
    vif: str | None = None
    attached_netvm: str | None = None
    attached_ip: ipaddress.IPv4Address | None = None
    attached_ip6: ipaddress.IPv6Address | None = None
    services: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)


class _Domain:
    """A qube seen the way core_admin_patch.network_server expects a qubesd VM."""

    def __init__(self, dom0: Dom0, name: str) -> None:
        self._dom0 = dom0
        self.name = name
        self.provides_network = dom0.topology.qubes[name].provides_network

    @property
    def netvm(self) -> _Domain | None:
        netvm = self._dom0.topology.qubes[self.name].netvm
        return None if netvm is None else _Domain(self._dom0, netvm)

    @property
    def ip(self) -> ipaddress.IPv4Address:
        return self._dom0.topology.qubes[self.name].ip

    @property
    def ip6(self) -> ipaddress.IPv6Address | None:
        return self._dom0.ip6_of(self.name)

    @property
    def features(self) -> Mapping[str, str]:
        return self._dom0.topology.qubes[self.name].features

    def is_running(self) -> bool:
        return self._dom0.runtime[self.name].running


class Dom0:
    """The topology, the qubes' life cycle and their QubesDB entries.

    The host (core_admin_patch.network_server.DomHost) of the lab's
    NetworkServer, as the qubesd extension is on Qubes.
    """

    def __init__(self, state_dir: Path, topology: Topology) -> None:
        self.state_dir = state_dir
        self.topology = topology
        self.runtime = {name: Runtime() for name in topology.qubes}
        self._next_domid = 1
        self._next_port = 0
        self._dbs: dict[str, qubesdb.QubesDB] = {}
        self._outbound_written: dict[tuple[str, str], dict[str, str]] = {}
        self._expiry: ExpiryTimer | None = None
        #: qubesd holds the rules in memory; the lab reads the files, each parsed once.
        self._rule_files = RuleFiles()
        self.network_server = NetworkServer(self, _EntryWriter(self))
        os.environ["QUBESDB_DIR"] = str(state_dir / "qubesdb")

    # --- DomHost --------------------------------------------------------

    def domains(self) -> Iterable[_Domain]:
        return [_Domain(self, name) for name in self.topology.qubes]

    def domain(self, name: str) -> _Domain:
        if name not in self.topology.qubes:
            raise KeyError(name)
        return _Domain(self, name)

    def read_rules(self, domain: DomainLike) -> RuleLists:
        """The qube's rules; no firewall.xml means upstream's default (accept all)."""
        return self._rule_files.read(self.firewall_path(domain.name))

    def store_rules(self, domain: DomainLike, kind: RuleKind, rules: list[Rule]) -> None:
        """Replace one list in firewall.xml (one atomic write), then apply it."""
        lists = self.read_rules(domain).replaced(kind, rules)
        self._rule_files.save(self.firewall_path(domain.name), lists, time.time())
        self.reload(domain)

    def reload(self, domain: DomainLike) -> None:
        """Rewrite the qube's outbound entries in its netvm, re-plan forwards (firewall-changed)."""
        client = self.topology.qubes[domain.name]
        if (
            self.runtime[client.name].running
            and client.netvm is not None
            and self.runtime[client.netvm].running
        ):
            self._reload_firewall_for(client.netvm, client, strict=False)
        self._refresh()

    # --- paths and helpers ----------------------------------------------

    def firewall_path(self, name: str) -> Path:
        return self.state_dir / "qubes" / name / "firewall.xml"

    def qdb(self, name: str) -> qubesdb.QubesDB:
        """Connection to a running qube's QubesDB (dom0 writes any qube's)."""
        db = self._dbs.get(name)
        if db is None:
            db = self._dbs[name] = qubesdb.QubesDB(name)
        return db

    def _reset_qdb(self, name: str) -> None:
        """A new (or emptied) database for a booting qube, as qubesdb-daemon at boot."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.state_dir / "qubesdb" / "control.sock"))
            sock.sendall(f"add {name}\n".encode())
            reply = sock.makefile().readline().strip()
        if reply != "ok":
            raise Dom0Error(f"QubesDB daemon refused to create the database of {name}: {reply}")

    def _qube(self, untrusted_name: str) -> Qube:
        qube = self.topology.qubes.get(untrusted_name)
        if qube is None:
            raise Dom0Error(f"no such qube: {untrusted_name!r}")
        return qube

    def _running_clients(self, netvm: str) -> list[Qube]:
        return [q for q in self.topology.clients(netvm) if self.runtime[q.name].running]

    # --- IPv6, as qubesd's ip6 / gateway6 / visible_gateway6 -----------------

    def ip6_of(self, name: str) -> ipaddress.IPv6Address | None:
        """The qube's IPv6 address, None when IPv6 is off for it (or it has no network)."""
        qube = self.topology.qubes[name]
        if qube.netvm is None and not qube.provides_network:
            return None
        if not ipv6_enabled(q.features for q in self.topology.netvm_chain(name)):
            return None
        return qube.ip6 or derived_ip6(qube.qid)

    def _gateway6_of(self, client: Qube) -> ipaddress.IPv6Address | None:
        """``/qubes-gateway6``: the netvm's IPv6 address, when IPv6 is on for both."""
        if client.netvm is None or self.ip6_of(client.name) is None:
            return None
        return self.ip6_of(client.netvm)

    # --- QubesDB as qubesd writes it --------------------------------------

    def _create_qdb_entries(self, qube: Qube) -> None:
        """The keys qubesd writes into a starting qube's QubesDB."""
        db = self.qdb(qube.name)
        db.write("/name", qube.name)
        db.write("/type", "AppVM")
        db.write("/qubes-vm-type", qube.vm_type)
        db.write("/qubes-vm-updateable", "False")
        db.write("/qubes-vm-persistence", "rw-only")
        db.write("/qubes-debug-mode", "0")
        db.write("/qubes-base-template", "")
        db.write("/default-user", "user")
        if qube.provides_network:
            self._write_netvm_entries(qube)
            db.write("/qubes-netvm-netmask", wiring.NETMASK)
            db.write("/qubes-netvm-primary-dns", DNS[0])
            db.write("/qubes-netvm-secondary-dns", DNS[1])
        self._write_client_entries(qube)
        services = {"qubes-firewall": "1"} if qube.provides_network else {}
        services.update(
            {key[len("service."):]: value for key, value in qube.features.items()
             if key.startswith("service.")}
        )
        for service, value in services.items():
            db.write(f"/qubes-service/{service}", "1" if value not in ("", "0") else "0")

    def _write_netvm_entries(self, qube: Qube) -> None:
        """What a netvm's clients route through: its address, and ``gateway6`` when IPv6 is on."""
        db = self.qdb(qube.name)
        db.write("/qubes-netvm-network", str(qube.ip))
        db.write("/qubes-netvm-gateway", str(qube.ip))
        gateway6 = self.ip6_of(qube.name)
        if gateway6 is None:
            db.rm("/qubes-netvm-gateway6")
        else:
            db.write("/qubes-netvm-gateway6", str(gateway6))

    def _write_client_entries(self, qube: Qube) -> None:
        """Address, gateway and DNS of a qube; removed when it has no netvm.

        ``/qubes-ip6`` and ``/qubes-gateway6`` only when IPv6 is on for the
        qube (the gateway also needs it on for the netvm), as qubesd.
        """
        db = self.qdb(qube.name)
        keys = ("/qubes-ip", "/qubes-netmask", "/qubes-gateway",
                "/qubes-primary-dns", "/qubes-secondary-dns")
        ip6, gateway6 = self.ip6_of(qube.name), self._gateway6_of(qube)
        for key, value6 in (("/qubes-ip6", ip6), ("/qubes-gateway6", gateway6)):
            if qube.netvm is None or value6 is None:
                db.rm(key)
            else:
                db.write(key, str(value6))
        if qube.netvm is None:
            for key in keys:
                db.rm(key)
            return
        netvm = self.topology.qubes[qube.netvm]
        values = (str(qube.ip), wiring.NETMASK, str(netvm.ip), *DNS)
        for key, value in zip(keys, values, strict=True):
            db.write(key, value)

    def _reload_connected_ips(self, netvm: str) -> None:
        """``/connected-ips`` and ``/connected-ips6``: running clients, which the worker filters."""
        db = self.qdb(netvm)
        clients = self._running_clients(netvm)
        db.write("/connected-ips", " ".join(str(q.ip) for q in clients))
        ips6 = (self.ip6_of(q.name) for q in clients)
        db.write("/connected-ips6", " ".join(str(ip6) for ip6 in ips6 if ip6 is not None))

    def _client_addresses(self, client: Qube) -> list[tuple[int, ipaddress.IPv4Address
                                                           | ipaddress.IPv6Address]]:
        """(family, address) under which the netvm filters the client, as qubesd's loop."""
        ip6 = self.ip6_of(client.name)
        return [(4, client.ip)] + ([] if ip6 is None else [(6, ip6)])

    def _outbound_entries(self, client: Qube, family: int) -> dict[str, str]:
        try:
            outbound = self.read_rules(self.domain(client.name)).outbound
            return outbound_qdb_entries(outbound, family, time.time())
        except Exception as err:  # a broken firewall.xml must fail closed, not open
            log.error("%s: rules unusable, blocking its traffic: %s", client.name, err)
            return {"policy": "drop"}

    def _reload_firewall_for(self, netvm: str, client: Qube, strict: bool = True) -> None:
        """Rewrite ``/qubes-firewall/<ip>/`` (and ``<ip6>/``) in the netvm, marker last, as qubesd.

        Each family gets the entries of its own rules (``addr_family`` 4 or
        6), as qubesd's reload_firewall_for_vm. Then wait for the netvm's
        worker to apply them, so a started qube (or a returned Admin API
        call) already has its rules in nft. ``strict`` makes a worker that
        does not answer an error (qube start); otherwise it is only logged,
        as qubesd does not depend on the agent either.
        """
        db = self.qdb(netvm)
        for family, address in self._client_addresses(client):
            base = f"/qubes-firewall/{address}"
            entries = self._outbound_entries(client, family)
            db.rm(base + "/")
            for key, value in entries.items():
                db.write(f"{base}/{key}", value)
            before = _counter(db.read(f"/qubes-firewall-handled/{address}"))
            db.write(base, "")
            self._outbound_written[(netvm, str(address))] = entries
            try:
                self._wait_handled(netvm, address, before)
            except Dom0Error as err:
                if strict:
                    raise
                log.warning("%s", err)

    def _wait_handled(
        self, netvm: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, before: int
    ) -> None:
        """Wait until the netvm's worker has taken the client's new rules into nft."""
        db = self.qdb(netvm)
        deadline = time.monotonic() + HANDLED_TIMEOUT
        while _counter(db.read(f"/qubes-firewall-handled/{ip}")) <= before:
            if time.monotonic() > deadline:
                raise Dom0Error(
                    f"the firewall worker in {netvm} did not apply the rules of {ip} within "
                    f"{HANDLED_TIMEOUT:.0f}s; see {self.state_dir}/logs/{netvm}-firewall.log"
                )
            time.sleep(0.01)

    def _forget_client(
        self, netvm: str, ip: ipaddress.IPv4Address, ip6: ipaddress.IPv6Address | None
    ) -> None:
        """Remove a departed client's entries from its netvm (completion path last)."""
        db = self.qdb(netvm)
        for address in (ip, ip6):
            if address is not None:
                db.rm(f"/qubes-firewall/{address}/")
                db.rm(f"/qubes-firewall/{address}")
                self._outbound_written.pop((netvm, str(address)), None)
        db.rm(f"/mapped-ip/{ip}/")

    def _refresh(self) -> None:
        """Re-plan forward/input entries and re-arm the expiry timer."""
        next_expiry = self.network_server.refresh(time.time())
        stale = {
            client.name: (netvm, client)
            for client in self.topology.qubes.values()
            for family, address in self._client_addresses(client)
            if (netvm := self.runtime[client.name].attached_netvm) is not None
            and (written := self._outbound_written.get((netvm, str(address)))) is not None
            and self._outbound_entries(client, family) != written
        }
        for netvm, client in stale.values():
            self._reload_firewall_for(netvm, client, strict=False)
        if self._expiry is None:
            if next_expiry is None:
                return
            self._expiry = ExpiryTimer(asyncio.get_running_loop(), self._refresh)
        self._expiry.arm(next_expiry)

    # --- qube life cycle ---------------------------------------------------

    def start(self, name: str) -> None:
        """Boot a qube (and its netvm first, as qubesd does)."""
        qube = self._qube(name)
        runtime = self.runtime[name]
        if runtime.running:
            return
        if qube.netvm is not None:
            self.start(qube.netvm)
        runtime.domid = self._next_domid
        self._next_domid += 1
        log.info("starting %s (domid %d)", name, runtime.domid)
        self._reset_qdb(name)
        self.network_server.qube_reset(name)
        wiring.qube_up(qube)
        if qube.uplink is not None or qube.uplink6 is not None:
            assert self.topology.lan is not None
            wiring.uplink_up(qube, self.topology.lan, f"up{self._next_port}")
            self._next_port += 1
        self._create_qdb_entries(qube)
        if qube.provides_network:
            wiring.ipv6_forwarding(name, self.ip6_of(name) is not None)
            self._reload_connected_ips(name)
            self._start_service(qube, FIREWALL)
        self._start_service(qube, INPUT_HOOK)
        runtime.running = True
        if qube.netvm is not None:
            self._attach(qube)
        for client in self._running_clients(name):
            self._attach(client)
        self._refresh()
        self.save_state()

    def _attach(self, client: Qube) -> None:
        """Connect a running client to its (running) netvm: vif, entries, rules."""
        assert client.netvm is not None
        runtime = self.runtime[client.name]
        assert runtime.domid is not None
        netvm = self.topology.qubes[client.netvm]
        db = self.qdb(netvm.name)
        db.write(f"/mapped-ip/{client.ip}/visible-ip", str(client.ip))
        db.write(f"/mapped-ip/{client.ip}/visible-gateway", str(netvm.ip))
        ip6 = self.ip6_of(client.name)
        runtime.vif = wiring.vif_online(netvm.name, client.name, runtime.domid, client.ip, netvm.ip,
                                        ip6, self._gateway6_of(client))
        runtime.attached_netvm, runtime.attached_ip = netvm.name, client.ip
        runtime.attached_ip6 = ip6
        self._reload_connected_ips(netvm.name)
        self._reload_firewall_for(netvm.name, client)

    def _detach(self, client: Qube) -> None:
        """Undo :meth:`_attach` (the netvm may already be gone)."""
        runtime = self.runtime[client.name]
        netvm, ip, vif = runtime.attached_netvm, runtime.attached_ip, runtime.vif
        ip6 = runtime.attached_ip6
        _forget_attachment(runtime)
        if netvm is None or ip is None or vif is None or not self.runtime[netvm].running:
            return
        wiring.vif_offline(netvm, vif, ip, ip6)
        self._reload_connected_ips(netvm)
        self._forget_client(netvm, ip, ip6)

    def stop(self, name: str, force: bool = False) -> None:
        """Shut a qube down; a netvm with running clients only with ``force``."""
        qube = self._qube(name)
        runtime = self.runtime[name]
        if not runtime.running:
            return
        clients = self._running_clients(name)
        if clients and not force:
            raise Dom0Error(
                f"there are other qubes connected to {name}: "
                f"{', '.join(q.name for q in clients)} (stop them first, or force)"
            )
        log.info("stopping %s", name)
        runtime.running = False
        self._detach(qube)
        for client in clients:
            _forget_attachment(self.runtime[client.name])
        ns = netns.namespace(name)
        if netns.exists(ns):
            procs.terminate(netns.pids(ns))
        for service in list(runtime.services):
            self._stop_service(name, service)
        if netns.exists(ns):
            netns.delete(ns)
        runtime.domid = None
        for key in [k for k in self._outbound_written if k[0] == name]:
            del self._outbound_written[key]
        self._reset_qdb(name)
        self._dbs.pop(name, None)
        self.network_server.qube_reset(name)
        self._drop_shutdown_rules(name)
        self._refresh()
        self.save_state()

    def _drop_shutdown_rules(self, name: str) -> None:
        """The qube is not running: its ``expire=shutdown`` rules go (as qubesd's extension)."""
        try:
            self.network_server.drop_shutdown_rules(name)
        except Exception as err:  # a broken firewall.xml: the stop itself must go on
            log.error("%s: cannot delete its rules that lasted until it stopped: %s", name, err)

    def restart(self, name: str) -> None:
        """Stop and start; a netvm's running clients are re-attached to it."""
        self.stop(name, force=True)
        self.start(name)

    def set_property(self, name: str, prop: str, untrusted_value: str) -> None:
        """``qvm-prefs NAME netvm|ip|ip6|provides_network VALUE``, re-wiring a running qube live.

        ``ip6`` replaces the derived IPv6 address (used while IPv6 is on for
        the qube); ``none`` or ``''`` goes back to the derived one.
        ``provides_network`` changes what dom0 plans at once; as on Qubes, a
        running qube starts (or stops) serving as a netvm at its next start.
        """
        qube = self._qube(name)
        if prop == "provides_network":
            if untrusted_value not in ("true", "false"):
                raise Dom0Error(f"{name}: provides_network is true or false")
            self._change(qube, "provides_network", untrusted_value == "true")
        elif prop == "netvm":
            new_netvm = None if untrusted_value in ("none", "") else untrusted_value
            self._change(qube, "netvm", new_netvm)
        elif prop in ("ip", "ip6"):
            kind = ipaddress.IPv4Address if prop == "ip" else ipaddress.IPv6Address
            if prop == "ip6" and untrusted_value in ("none", ""):
                self._change(qube, prop, None)
                return
            try:
                address = kind(untrusted_value)
            except ValueError as err:
                raise Dom0Error(f"{name}: invalid {prop}: {err}") from None
            self._change(qube, prop, address)
        else:
            raise Dom0Error(
                f"cannot set {prop!r}: only netvm, ip, ip6 and provides_network can be changed"
            )

    def set_feature(self, name: str, feature: str, value: str | None = None) -> None:
        """``qvm-features NAME FEATURE [VALUE]`` (no value: unset it).

        ``ipv6`` is looked up the netvm chain, so setting it on a netvm
        re-wires every running qube below it whose IPv6 changes (addresses,
        gateway, QubesDB keys, outbound entries of both families), live.
        """
        qube = self._qube(name)
        if not feature or any(c.isspace() for c in feature):
            raise Dom0Error(f"invalid feature name {feature!r}")
        affected = [qube, *self.topology.below(name)]
        before = self._ipv6_view(affected)
        if value is None:
            qube.features.pop(feature, None)
        else:
            qube.features[feature] = value
        log.info("%s: feature %s = %r", name, feature, value)
        for other in affected:
            if self.runtime[other.name].running and before[other.name] != self._ipv6_of_one(other):
                self._rewire(other)
        self._refresh()
        self.save_state()

    def _ipv6_of_one(
        self, qube: Qube
    ) -> tuple[ipaddress.IPv6Address | None, ipaddress.IPv6Address | None]:
        return self.ip6_of(qube.name), self._gateway6_of(qube)

    def _ipv6_view(
        self, qubes: list[Qube]
    ) -> dict[str, tuple[ipaddress.IPv6Address | None, ipaddress.IPv6Address | None]]:
        """Each qube's IPv6 address and gateway, to see whom a change re-wires."""
        return {q.name: self._ipv6_of_one(q) for q in qubes}

    def _change(self, qube: Qube, prop: str, value: object) -> None:
        old = getattr(qube, prop)
        if old == value:
            return
        if prop == "netvm":  # as qubesd's property-pre-set:netvm handler does
            self.network_server.check_netvm_change(qube.name, value, time.time())
        below = self.topology.below(qube.name)
        before = self._ipv6_view(below)
        setattr(qube, prop, value)
        try:
            validate(self.topology)
        except TopologyError as err:
            setattr(qube, prop, old)
            raise Dom0Error(f"{qube.name}: cannot set {prop}: {err}") from None
        if (
            prop == "netvm"
            and value is not None
            and self.runtime[qube.name].running
            and not self.runtime[str(value)].running
        ):
            setattr(qube, prop, old)
            raise Dom0Error(f"cannot attach {qube.name} to {value}: {value} is not running")
        log.info("%s: %s %s -> %s", qube.name, prop, old, value)
        if self.runtime[qube.name].running and prop != "provides_network":
            self._rewire(qube)
            # Clients see a new gateway after an ip change; qubes further
            # down may gain or lose IPv6 after a netvm change.
            for other in below:
                if self.runtime[other.name].running and (
                    (prop == "ip" and other.netvm == qube.name)
                    or before[other.name] != self._ipv6_of_one(other)
                ):
                    self._rewire(other)
        self._refresh()
        self.save_state()

    def _rewire(self, qube: Qube) -> None:
        """Detach and re-attach a running qube after its netvm, ip or IPv6 changed."""
        self._detach(qube)
        self._write_client_entries(qube)
        if qube.provides_network:
            self._write_netvm_entries(qube)
            wiring.ipv6_forwarding(qube.name, self.ip6_of(qube.name) is not None)
        if qube.netvm is not None and self.runtime[qube.netvm].running:
            self._attach(qube)

    # --- services ----------------------------------------------------------

    def _start_service(self, qube: Qube, service: tuple[str, str]) -> None:
        label, module = service
        name = f"{qube.name}-{label}"
        self.runtime[qube.name].services[label] = procs.spawn(
            self.state_dir, name, procs.python_argv(module),
            procs.qube_env(self.state_dir, qube.name), netns=netns.namespace(qube.name),
        )

    def _stop_service(self, qube: str, label: str) -> None:
        proc = self.runtime[qube].services.pop(label)
        if proc.poll() is None:
            procs.terminate([proc.pid])
        proc.wait()
        (self.state_dir / "pids" / f"{qube}-{label}.pid").unlink(missing_ok=True)

    def restart_service(self, name: str, service: str) -> None:
        """Stop and start one agent of a running qube, as systemd would restart it.

        The worker's cleanup on stop and its recovery on start are what a
        real agent restart exercises; the qube and its QubesDB stay as they are.
        """
        runtime = self.runtime[self._qube(name).name]
        if service not in runtime.services:
            raise Dom0Error(f"{name} runs no service {service!r}")
        self._stop_service(name, service)
        modules = dict([FIREWALL, INPUT_HOOK])
        self._start_service(self._qube(name), (service, modules[service]))

    # --- whole lab -----------------------------------------------------------

    def boot(self) -> None:
        """The LAN, then every autostart qube (netvms come up with their clients)."""
        if self.topology.lan is not None:
            wiring.switch_up(self.topology.lan)
        for qube in self.topology.qubes.values():
            self.firewall_path(qube.name).parent.mkdir(parents=True, exist_ok=True)
        for qube in self.topology.qubes.values():
            if qube.autostart:
                self.start(qube.name)
        self.save_state()

    def shutdown(self) -> None:
        """Stop every qube (clients before their netvms) and unplug the LAN."""
        while running := [n for n, r in self.runtime.items() if r.running]:
            leaves = [n for n in running if not self._running_clients(n)]
            for name in leaves or running[:1]:
                self.stop(name, force=True)
        for ns in netns.lab_namespaces():
            procs.terminate(netns.pids(ns))
            netns.delete(ns)

    def status(self) -> dict[str, Any]:
        """What ``qubes-lab status`` shows, as data."""
        qubes = []
        for name, qube in self.topology.qubes.items():
            runtime = self.runtime[name]
            qubes.append({
                "name": name,
                "netvm": qube.netvm,
                "ip": str(qube.ip),
                "ip6": None if (ip6 := self.ip6_of(name)) is None else str(ip6),
                "provides_network": qube.provides_network,
                "running": runtime.running,
                "domid": runtime.domid,
                "vif": runtime.vif,
                "services": {
                    label: {"pid": proc.pid, "alive": proc.poll() is None}
                    for label, proc in runtime.services.items()
                },
            })
        return {"dom0_pid": os.getpid(), "qubes": qubes, "topology": self.topology.to_dict()}

    def save_state(self) -> None:
        """topology.json: the live topology and runtime, for status after a crash."""
        path = self.state_dir / "topology.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status(), indent=2) + "\n")
        tmp.replace(path)

    # --- control socket ----------------------------------------------------

    def handle_control(self, untrusted_request: object) -> object:
        """One lab command from :mod:`lab.control`."""
        if not isinstance(untrusted_request, dict):
            raise Dom0Error("request must be a JSON object")
        op = untrusted_request.get("op")
        args = untrusted_request.get("args", {})
        if not isinstance(args, dict) or not all(isinstance(v, str | bool) for v in args.values()):
            raise Dom0Error("args must be an object of strings")
        handlers: dict[str, Callable[..., object]] = {
            "status": self.status,
            "start": self.start,
            "stop": self.stop,
            "restart": self.restart,
            "set": self.set_property,
            "feature": self.set_feature,
            "restart-service": self.restart_service,
        }
        handler = handlers.get(str(op))
        if handler is None:
            raise Dom0Error(f"unknown lab command {op!r}")
        try:
            return handler(**args)
        except TypeError as err:
            raise Dom0Error(f"bad arguments for {op}: {err}") from None


def _forget_attachment(runtime: Runtime) -> None:
    """The qube is no longer connected (its vif is gone or going)."""
    runtime.vif = runtime.attached_netvm = None
    runtime.attached_ip = runtime.attached_ip6 = None


def _counter(value: bytes | None) -> int:
    try:
        return int(value or b"0")
    except ValueError:
        return 0


class _EntryWriter:
    """core_admin_patch.applier.EntryWriter on the lab's QubesDB (running qubes only)."""

    def __init__(self, dom0: Dom0) -> None:
        self._dom0 = dom0

    def write(self, qube: str, path: str, value: str) -> None:
        if self._dom0.runtime[qube].running:
            self._dom0.qdb(qube).write(path, value)

    def rm(self, qube: str, path: str) -> None:
        if self._dom0.runtime[qube].running:
            self._dom0.qdb(qube).rm(path)

    def list(self, qube: str, prefix: str) -> list[str]:
        if not self._dom0.runtime[qube].running:
            return []
        return list(self._dom0.qdb(qube).list(prefix))

    def read(self, qube: str, path: str) -> bytes | None:
        if not self._dom0.runtime[qube].running:
            return None
        return self._dom0.qdb(qube).read(path)


async def _serve_control(
    dom0: Dom0, stop: asyncio.Event, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        line = await reader.readline()
        try:
            request = json.loads(line)
            if isinstance(request, dict) and request.get("op") == "shutdown":
                stop.set()
                reply: dict[str, object] = {"ok": True, "result": None}
            else:
                reply = {"ok": True, "result": dom0.handle_control(request)}
        except (Dom0Error, QubesException, TopologyError, netns.CommandError,
                qubesdb.Error, ValueError) as err:
            reply = {"ok": False, "error": str(err)}
        except Exception as err:
            log.exception("lab command failed")
            reply = {"ok": False, "error": f"internal error in dom0: {err!r}"}
        writer.write((json.dumps(reply) + "\n").encode())
        await writer.drain()
    finally:
        writer.close()


async def run(state_dir: Path, topology: Topology, ready_file: Path) -> None:
    """Serve until SIGTERM or a shutdown command, then stop everything."""
    dom0 = Dom0(state_dir, topology)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    qubesd = await start_server(state_dir / "qubesd.sock", dom0.network_server)
    control_path = state_dir / "dom0.sock"
    control_path.unlink(missing_ok=True)
    control = await asyncio.start_unix_server(
        lambda r, w: _serve_control(dom0, stop, r, w), path=str(control_path)
    )
    os.chmod(control_path, 0o600)
    try:
        dom0.boot()
        ready_file.write_text(f"{os.getpid()}\n")
        log.info("lab is up")
        await stop.wait()
    finally:
        control.close()
        qubesd.close()
        log.info("shutting down")
        dom0.shutdown()
        (state_dir / "qubesd.sock").unlink(missing_ok=True)
        control_path.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="dom0 of the Qubes lab (started by qubes-lab up)")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--topology", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    try:
        topology = load_topology(args.topology)
    except TopologyError as err:
        log.error("%s", err)
        return 2
    try:
        asyncio.run(run(args.state_dir, topology, args.ready_file))
    except (Dom0Error, QubesValueError, netns.CommandError, qubesdb.Error, OSError) as err:
        log.error("dom0 failed: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
