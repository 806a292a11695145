"""Upstream's outbound worker and ours side by side, judged by real packets.

Two hops, each a network namespace wired like a Qubes NetVM with its
clients behind one vif. In one runs upstream's ``qubes-firewall`` worker
(``qubesagent/firewall.py`` of the upstream snapshot, unchanged, with a
``conntrack`` that lists nothing), in the other ours; each on its own
QubesDB stand-in, fed the same entries the way dom0 writes them. Both see
the same ``/etc/hosts``, ``/etc/resolv.conf`` and ``nsswitch.conf``
(``ip netns exec`` mounts ``/etc/netns/<ns>/*`` over ``/etc``).

A client namespace behind each hop sends the same probes: TCP SYNs, UDP
datagrams and ICMP messages, each tagged with an id (its source port, or
the ICMP identifier field). An observer table in the hop sees what the
``qubes-firewall`` forward chain let through (a forward base chain after
it records the id, then drops the packet) and what it rejected (the
admin-prohibited ICMP errors the hop sends back quote the probe, id
included). A probe in neither set was dropped.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from conftest import upstream_dir
from worker_netns import (
    REPO,
    WorkerProcess,
    in_netns,
    ns_run,
    qubesdb_server,
    require_root,
    start_worker,
    wait_for,
)

from agent_worker.entries import IpVersion
from agent_worker.ruleset import FOLD_FROM
from firewall_rules.rule import Rule, outbound_qdb_entries
from lab.pyshim import qubesdb

Verdict = Literal["accept", "reject", "drop"]
Proto = Literal["tcp", "udp", "icmp"]

UPSTREAM, OURS = "upstream", "ours"
GATEWAY4, GATEWAY6 = "10.137.0.1", "fd09:24ef:4179::1"
CLIENTS4 = ("10.137.0.5", "10.137.0.6", "10.137.0.7", "10.137.0.8")
CLIENTS6 = ("fd09:24ef:4179::a89:5", "fd09:24ef:4179::a89:6")
#: connected, but dom0 wrote no rules for them: both workers must drop them
BARE_CLIENTS = ("10.137.0.9", "fd09:24ef:4179::a89:9")
#: behind the vif but not in /connected-ips (a qube gone, its address not yet reused)
UNLISTED = "10.137.0.10"

#: what both hops resolve names with; dsthost names come from here
HOSTS = {
    "web.example": ("192.0.2.7", "198.51.100.9", "2001:db8::7"),
    "v4only.example": ("192.0.2.20",),
    "v6only.example": ("2001:db8:1::20",),
}
#: a name that resolves nowhere: both workers block the client that names it
MISSING_NAME = "missing.example"
DNS4, DNS6 = "192.0.2.53", "2001:db8::53"
#: both hops' resolv.conf; the loopback stub can never be forwarded to
RESOLV_CONF = f"nameserver {DNS4}\nnameserver {DNS6}\nnameserver 127.0.0.53\n"
#: as dom0 writes them: the address clients ask, not a resolv.conf server
QUBES_DNS = {"/qubes-primary-dns": "10.139.1.1", "/qubes-secondary-dns": "10.139.1.2"}

DESTINATIONS4 = (
    "192.0.2.7", "192.0.2.20", DNS4, "192.0.2.200", "198.51.100.9", "198.51.100.200",
    "203.0.113.130", "10.139.1.1", "10.1.2.3", CLIENTS4[1],
)
DESTINATIONS6 = (
    "2001:db8::7", DNS6, "2001:db8::200", "2001:db8:1::20", "2001:db8:ffff::1", CLIENTS6[1],
)
PORTS = (22, 53, 80, 443, 1024, 8080, 65535)
ICMP_TYPES = {4: (0, 3, 8, 13), 6: (1, 128, 129, 135)}
PREFIXES = {4: (32, 28, 24, 16, 8, 0), 6: (128, 64, 48, 32, 0)}

OBSERVER = """
table inet observe {
  set accepted { type inet_service; }
  set rejected { type inet_service; }
  chain verdicts {
    type filter hook forward priority 10; policy drop;
    meta l4proto { tcp, udp } add @accepted { th sport } drop
    meta l4proto { icmp, ipv6-icmp } add @accepted { @th,32,16 } drop
  }
  chain rejections {
    type filter hook output priority 0; policy accept;
    icmp type destination-unreachable icmp code admin-prohibited @th,136,8 { 6, 17 } add @rejected { @th,224,16 }
    icmp type destination-unreachable icmp code admin-prohibited @th,136,8 1 add @rejected { @th,256,16 }
    icmpv6 type destination-unreachable icmpv6 code admin-prohibited @th,112,8 { 6, 17 } add @rejected { @th,384,16 }
    icmpv6 type destination-unreachable icmpv6 code admin-prohibited @th,112,8 58 add @rejected { @th,416,16 }
  }
}
"""  # noqa: E501 (nft rules read best one per line)
"""The observer: inner header offsets assume IPv4 without options and IPv6 without
extension headers, which is what the probes send (``@th,136,8`` is the quoted
protocol, ``@th,224,16`` the quoted source port, and so on)."""

#: a Destination Options header of padding only (IPV6_DSTOPTS)
IPV6_DSTOPTS = 59
PADDING_DSTOPTS = bytes([0, 0, 1, 4, 0, 0, 0, 0])


@dataclass(frozen=True)
class Probe:
    """One packet a client sends; ``value`` is the port (tcp/udp) or ICMP type."""

    id: int
    source: str
    destination: str
    proto: Proto
    value: int
    #: IPv6 only: put a Destination Options header before the UDP header
    extension_header: bool = False


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _send(probe: Probe) -> socket.socket:
    """Send ``probe`` from a socket bound to its source; the socket is returned open."""
    family = socket.AF_INET6 if ":" in probe.source else socket.AF_INET
    if probe.proto == "tcp":
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((probe.source, probe.id))
        with suppress(BlockingIOError):
            sock.connect((probe.destination, probe.value))
        return sock
    if probe.proto == "udp":
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if probe.extension_header:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_DSTOPTS, PADDING_DSTOPTS)
        sock.bind((probe.source, probe.id))
        sock.sendto(b"probe", (probe.destination, probe.value))
        return sock
    kind = socket.IPPROTO_ICMPV6 if family == socket.AF_INET6 else socket.IPPROTO_ICMP
    sock = socket.socket(family, socket.SOCK_RAW, kind)
    sock.bind((probe.source, 0))
    message = struct.pack("!BBHHH", probe.value, 0, 0, probe.id, 0) + b"probe"
    if family == socket.AF_INET:  # the kernel sums ICMPv6 itself
        message = message[:2] + struct.pack("!H", _checksum(message)) + message[4:]
    sock.sendto(message, (probe.destination, 0))
    return sock


def send_probes(probes: Sequence[Probe]) -> None:
    """Send every probe (run inside a client namespace)."""
    sockets = [_send(probe) for probe in probes]
    for sock in sockets:
        sock.close()


# -- the two hops ----------------------------------------------------------


@dataclass
class Hop:
    """A hop namespace with its client namespace, the observer and a QubesDB."""

    name: str
    client: str
    qube: str
    db: qubesdb.QubesDB | None = None
    worker: WorkerProcess | None = None
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    def handled(self, address: str) -> int:
        assert self.db is not None
        return int(self.db.read(f"/qubes-firewall-handled/{address}") or b"0")

    def verdicts(self, probes: Sequence[Probe]) -> dict[int, Verdict]:
        """Each probe's fate, once the observer's sets stopped growing."""
        seen: tuple[set[int], set[int]] = (set(), set())
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            time.sleep(0.15)
            listing = json.loads(ns_run(self.name, "nft", "-j", "list", "table", "inet", "observe"))
            current: dict[str, set[int]] = {}
            for item in listing["nftables"]:
                if "set" in item:
                    current[item["set"]["name"]] = set(item["set"].get("elem", []))
            now = (current["accepted"], current["rejected"])
            if now == seen:
                break
            seen = now
        accepted, rejected = seen
        ns_run(self.name, "nft", "flush set inet observe accepted; flush set inet observe rejected")
        return {
            p.id: "accept" if p.id in accepted else "reject" if p.id in rejected else "drop"
            for p in probes
        }


def _wire(hop: Hop) -> None:
    """The client behind ``vif1.0`` holds every client address; the hop routes the rest away.

    The uplink is one end of a veth pair whose other end stays in the hop:
    probes never get that far (the observer drops them), it only gives the
    default routes somewhere to point.
    """
    subprocess.run(["ip", "link", "add", "vif1.0", "netns", hop.name, "type", "veth",
                    "peer", "name", "eth0", "netns", hop.client], check=True)
    ns_run(hop.name, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    for sysctl in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                   "net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0",
                   "net.ipv4.icmp_msgs_per_sec=1000000", "net.ipv4.icmp_msgs_burst=1000000"):
        ns_run(hop.name, "sysctl", "-qw", sysctl)
    for link in ("vif1.0", "eth0", "eth1", "lo"):
        ns_run(hop.name, "ip", "link", "set", link, "up")
    ns_run(hop.name, "ip", "address", "add", f"{GATEWAY4}/32", "dev", "vif1.0")
    ns_run(hop.name, "ip", "address", "add", f"{GATEWAY6}/128", "dev", "vif1.0", "nodad")
    ns_run(hop.name, "ip", "route", "add", "default", "dev", "eth0")
    ns_run(hop.name, "ip", "-6", "route", "add", "default", "dev", "eth0")
    for link in ("eth0", "lo"):
        ns_run(hop.client, "ip", "link", "set", link, "up")
    for address in (*CLIENTS4, *CLIENTS6, *BARE_CLIENTS, UNLISTED):
        six = ":" in address
        ns_run(hop.name, "ip", "-6" if six else "-4", "route", "add", address, "dev", "vif1.0")
        ns_run(hop.client, "ip", "address", "add", f"{address}/{128 if six else 32}", "dev",
               "eth0", *(["nodad"] if six else []))
    ns_run(hop.client, "ip", "route", "add", GATEWAY4, "dev", "eth0", "scope", "link")
    ns_run(hop.client, "ip", "route", "add", "default", "via", GATEWAY4, "dev", "eth0", "onlink")
    ns_run(hop.client, "ip", "-6", "route", "add", GATEWAY6, "dev", "eth0")
    ns_run(hop.client, "ip", "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0",
           "onlink")
    ns_run(hop.name, "nft", "-f", "-", stdin=OBSERVER)


def _etc_files(ns: str, resolv_conf: str) -> Path:
    """What ``ip netns exec`` mounts over /etc for both workers: names, DNS, files only."""
    directory = Path("/etc/netns") / ns
    directory.mkdir(parents=True)
    hosts = "".join(f"{a} {name}\n" for name, addresses in HOSTS.items() for a in addresses)
    (directory / "hosts").write_text("127.0.0.1 localhost\n" + hosts)
    (directory / "resolv.conf").write_text(resolv_conf)
    (directory / "nsswitch.conf").write_text("hosts: files\n")
    return directory


def _start_upstream(hop: Hop, qdb_dir: Path, stubs: Path, tmp: Path) -> None:
    """Upstream's worker, as its unit runs it, against the QubesDB stand-in."""
    agent = upstream_dir() / "qubes-core-agent-linux"
    env = {
        "PATH": f"{stubs}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
        "QUBESDB_DIR": str(qdb_dir),
        "QUBESDB_QUBE": hop.qube,
        "PYTHONPATH": f"{agent}:{REPO / 'lab' / 'pyshim'}",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    hop.log = tmp / "upstream.log"
    with hop.log.open("ab") as log:
        hop.process = subprocess.Popen(
            ["ip", "netns", "exec", hop.name, sys.executable, "-c",
             "from qubesagent.firewall import main; main()"],
            env=env, stdout=log, stderr=log, cwd=tmp,
        )


def _stop(hop: Hop) -> None:
    """SIGTERM; upstream's worker only notices it at its next event, so then SIGKILL."""
    if hop.worker is not None:
        hop.worker.stop()
    if hop.process is not None and hop.process.poll() is None:
        hop.process.send_signal(signal.SIGTERM)
        try:
            hop.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            hop.process.kill()
            hop.process.wait(timeout=10)


def dom0_entries(rules: Sequence[str], address: str, policy: str = "drop") -> dict[str, str]:
    """``/qubes-firewall/<address>/`` as dom0 writes ``rules`` (API syntax) for that client.

    ``policy`` other than drop is what older dom0s wrote; agents still read it.
    """
    parsed = [Rule.from_api_string(rule) for rule in rules]
    entries = outbound_qdb_entries(parsed, ipaddress.ip_address(address).version, 0)
    entries["policy"] = policy
    return entries


def write_entries(db: qubesdb.QubesDB, address: str, entries: Mapping[str, str]) -> None:
    """As dom0: clear the client's directory, write its keys, then the marker."""
    base = f"/qubes-firewall/{address}"
    db.rm(base + "/")
    for key, value in entries.items():
        db.write(f"{base}/{key}", value)
    db.write(base, "")


class Pair:
    """Both hops, driven together: same entries in, probes out, verdicts compared."""

    def __init__(self, upstream: Hop, ours: Hop) -> None:
        self.hops = {UPSTREAM: upstream, OURS: ours}

    def write(self, rule_sets: Mapping[str, Mapping[str, str]]) -> None:
        """Write each client's entries to both QubesDBs; wait until both workers handled them."""
        before = {
            (side, address): hop.handled(address)
            for side, hop in self.hops.items()
            for address in rule_sets
        }
        for hop in self.hops.values():
            assert hop.db is not None
            for address, entries in rule_sets.items():
                write_entries(hop.db, address, entries)
        for (side, address), count in before.items():
            hop = self.hops[side]
            wait_for(lambda h=hop, a=address, c=count: h.handled(a) > c, timeout=30,
                     what=f"{side} worker handling {address}; log: {self.log(side)}")

    def remove(self, address: str) -> None:
        """Remove a client's entries as dom0 does; wait until both workers handled it."""
        before = {side: hop.handled(address) for side, hop in self.hops.items()}
        for hop in self.hops.values():
            assert hop.db is not None
            hop.db.rm(f"/qubes-firewall/{address}/")
            hop.db.rm(f"/qubes-firewall/{address}")
        for side, count in before.items():
            hop = self.hops[side]
            wait_for(lambda h=hop, c=count: h.handled(address) > c, timeout=30,
                     what=f"{side} worker handling the removal of {address}")

    def log(self, side: str) -> str:
        hop = self.hops[side]
        return hop.worker.text() if hop.worker is not None else hop.log.read_text(errors="replace")

    def verdicts(self, probes: Sequence[Probe]) -> dict[str, dict[int, Verdict]]:
        """Send ``probes`` through both hops; each probe's verdict in each."""
        for hop in self.hops.values():
            in_netns(hop.client, send_probes, probes)
        return {side: hop.verdicts(probes) for side, hop in self.hops.items()}


@contextmanager
def hop_pair(tmp: Path, resolv_conf: str = RESOLV_CONF,
             initial: Mapping[str, Mapping[str, str]] | None = None) -> Iterator[Pair]:
    """Both hops with their workers running, ``initial`` entries loaded before they start.

    Every client is listed in ``/connected-ips(6)``, and dom0's DNS entries
    are there, as on Qubes.
    """
    require_root()
    upstream_dir()
    stubs = tmp / "stubs"
    stubs.mkdir()
    conntrack = stubs / "conntrack"
    conntrack.write_text("#!/bin/sh\n# upstream lists flows to cut; here there are none\nexit 0\n")
    conntrack.chmod(0o755)
    tag = uuid.uuid4().hex[:8]
    hops = {
        side: Hop(f"qns-d{side[0]}-{tag}", f"qns-c{side[0]}-{tag}", side)
        for side in (UPSTREAM, OURS)
    }
    with ExitStack() as stack:
        for hop in hops.values():
            for ns in (hop.name, hop.client):
                subprocess.run(["ip", "netns", "add", ns], check=True)
                stack.callback(subprocess.run, ["ip", "netns", "delete", ns], check=False)
            stack.callback(shutil.rmtree, _etc_files(hop.name, resolv_conf), True)
            _wire(hop)
        qdb_dir = stack.enter_context(qubesdb_server(tmp, UPSTREAM, OURS))
        for hop in hops.values():
            hop.db = _connect(qdb_dir, hop.qube)
            connected4 = " ".join(a for a in (*CLIENTS4, *BARE_CLIENTS) if ":" not in a)
            connected6 = " ".join(a for a in (*CLIENTS6, *BARE_CLIENTS) if ":" in a)
            hop.db.write("/connected-ips", connected4)
            hop.db.write("/connected-ips6", connected6)
            for path, value in QUBES_DNS.items():
                hop.db.write(path, value)
            for address, entries in (initial or {}).items():
                write_entries(hop.db, address, entries)
        _start_upstream(hops[UPSTREAM], qdb_dir, stubs, tmp)
        stack.callback(_stop, hops[UPSTREAM])
        hops[OURS].worker = start_worker(hops[OURS].name, qdb_dir, tmp / "ours.log",
                                         qube=hops[OURS].qube)
        stack.callback(_stop, hops[OURS])
        pair = Pair(hops[UPSTREAM], hops[OURS])
        for side, hop in hops.items():
            for address in initial or {}:
                wait_for(lambda h=hop, a=address: h.handled(a) > 0, timeout=30,
                         what=f"{side} worker's first load; log: {pair.log(side)}")
        yield pair


def _connect(qdb_dir: Path, qube: str) -> qubesdb.QubesDB:
    """A QubesDB connection to ``qube`` in ``qdb_dir`` (the stand-in finds it in the env)."""
    previous = os.environ.get("QUBESDB_DIR")
    os.environ["QUBESDB_DIR"] = str(qdb_dir)
    try:
        return qubesdb.QubesDB(qube)
    finally:
        if previous is None:
            del os.environ["QUBESDB_DIR"]
        else:
            os.environ["QUBESDB_DIR"] = previous


# -- generated rule sets and probes ----------------------------------------


def _version(address: str) -> IpVersion:
    return 6 if ":" in address else 4


@dataclass
class Generator:
    """dom0-valid outbound rules (API syntax) and probes aimed at them, from one seed."""

    rng: random.Random

    def _destination(self, version: int) -> str:
        return self.rng.choice(DESTINATIONS4 if version == 4 else DESTINATIONS6)

    def _ports(self) -> str:
        first = self.rng.choice(PORTS)
        if self.rng.random() < 0.5:
            return str(first)
        low, high = first - self.rng.randrange(3), first + self.rng.randrange(40)
        return f"{max(0, low)}-{min(65535, high)}"

    def rule(self, version: IpVersion, may_fail: bool = True) -> str:
        """One rule a qube of ``version`` may hold (dom0 leaves out the other family's dstN).

        ``may_fail``: the rule may name a host without an address in ``version``.
        """
        rng = self.rng
        words = [f"action={rng.choice(('accept', 'drop'))}"]
        target = rng.random()
        if target < 0.35:
            other = 6 if version == 4 and rng.random() < 0.15 else version
            base = self._destination(other)
            words.append(f"dst{other}={base}/{rng.choice(PREFIXES[other])}")
        elif target < 0.5:
            # a name without an address of the client's family blocks the whole client
            resolvable = [n for n, a in HOSTS.items() if version in {_version(x) for x in a}]
            failing = [n for n in (*HOSTS, MISSING_NAME) if n not in resolvable]
            names = failing if may_fail and rng.random() < 0.1 else resolvable
            words.append(f"dsthost={rng.choice(names)}")
        special = rng.random() < 0.2
        protos: tuple[str | None, ...] = (None, "tcp", "udp") if special else (
            None, "tcp", "udp", "icmp")
        proto = rng.choice(protos)
        if proto is not None:
            words.append(f"proto={proto}")
        if special:
            words.append("specialtarget=dns")
        if proto in ("tcp", "udp") and rng.random() < 0.7:
            words.append(f"dstports={'53' if special and rng.random() < 0.7 else self._ports()}")
        if proto == "icmp" and rng.random() < 0.6:
            icmptype = rng.choice(ICMP_TYPES[version]) if rng.random() < 0.9 else rng.randrange(256)
            words.append(f"icmptype={icmptype}")
        return " ".join(words)

    def _run_rule(self, version: IpVersion, action: str, proto: str) -> str:
        """A rule of a long run of one verdict and protocol, which folds into sets."""
        words = [f"action={action}"]
        if self.rng.random() < 0.8:
            words.append(f"proto={proto}")
        target = self.rng.random()
        if target < 0.6:
            words.append(f"dst{version}={self._destination(version)}"
                         f"/{self.rng.choice(PREFIXES[version])}")
        elif target < 0.8:
            mine = [n for n, a in HOSTS.items() if version in {_version(x) for x in a}]
            words.append(f"dsthost={self.rng.choice(mine)}")
        if "proto=icmp" in words and self.rng.random() < 0.7:
            words.append(f"icmptype={self.rng.choice(ICMP_TYPES[version])}")
        elif proto != "icmp" and "proto=" + proto in words and self.rng.random() < 0.8:
            words.append(f"dstports={self._ports()}")
        return " ".join(words)

    def rule_set(self, version: IpVersion, folding: bool = False) -> list[str]:
        """Usually a handful of rules; now and then a long list, or long runs of one verdict.

        ``folding``: always the long runs, which ours folds into sets.
        """
        roll = 0.0 if folding else self.rng.random()
        long = roll < 0.25
        count = self.rng.randrange(40, 121) if long else self.rng.randrange(9)
        if roll < 0.1:  # runs of one verdict and protocol, a rule of the other now and then
            count = self.rng.randrange(FOLD_FROM, FOLD_FROM + 80)  # long enough to fold
            action, proto = self.rng.choice(("accept", "drop")), self.rng.choice(
                ("tcp", "udp", "icmp"))
            rules = [self._run_rule(version, action, proto) if self.rng.random() < 0.9
                     else self.rule(version, may_fail=False) for _ in range(count)]
            other = "drop" if action == "accept" else "accept"
            for _ in range(3):  # a later rule shadowed by the other verdict: it may not move
                later = self.rng.randrange(1, len(rules))
                rules.insert(self.rng.randrange(later), rules[later].replace(
                    f"action={action}", f"action={other}", 1))
        else:
            rules = [self.rule(version, may_fail=not long) for _ in range(count)]
        if self.rng.random() < 0.3:
            rules.append("action=accept")  # what qvm-firewall ends most lists with
        return rules

    def changed(self, rules: list[str], version: IpVersion) -> list[str]:
        """The next rule set of a client: kept, edited in a few places, or new."""
        roll = self.rng.random()
        if roll < 0.25:
            return rules
        if roll < 0.7 and rules:
            rules = list(rules)
            for _ in range(self.rng.randrange(1, 4)):
                where = self.rng.randrange(len(rules) + 1)
                edit = self.rng.random()
                if edit < 0.4 or not rules:
                    rules.insert(where, self.rule(version, may_fail=len(rules) < 9))
                elif edit < 0.7:
                    del rules[min(where, len(rules) - 1)]
                else:
                    rules[min(where, len(rules) - 1)] = self.rule(version, may_fail=len(rules) < 9)
            return rules
        return self.rule_set(version)

    def probes(self, source: str, rules: Sequence[str], first_id: int, count: int) -> list[Probe]:
        """At least ``count`` probes from ``source``: half at random, half aimed at its rules.

        Aimed probes take the rules in a shuffled order, so every rule of a
        long list (folded into sets by ours) gets one: the count grows to
        twice the rules aimed at.
        """
        version = _version(source)
        aimed = [r for r in rules if r != "action=accept"]
        self.rng.shuffle(aimed)
        count = max(count, 2 * len(aimed))
        probes = []
        for number in range(count):
            rule = aimed[number // 2 % len(aimed)] if aimed and number % 2 == 0 else None
            probes.append(self._probe(first_id + number, source, version, rule))
        return probes

    def _probe(self, probe_id: int, source: str, version: int, rule: str | None) -> Probe:
        rng = self.rng
        words = dict(word.split("=", 1) for word in rule.split()) if rule else {}
        destination = self._destination(version)
        dst = words.get(f"dst{version}")
        if dst is not None and rng.random() < 0.8:
            destination = dst.split("/")[0]
        name = words.get("dsthost")
        if name in HOSTS and rng.random() < 0.8:
            mine = [a for a in HOSTS[name] if _version(a) == version]
            destination = rng.choice(mine) if mine else destination
        if "specialtarget" in words and rng.random() < 0.8:
            destination = rng.choice((DNS4, "10.139.1.1") if version == 4 else (DNS6,))
        proto = words.get("proto") or rng.choice(("tcp", "udp", "icmp"))
        if proto == "icmp":
            value = int(words.get("icmptype", rng.choice(ICMP_TYPES[version])))
            if rng.random() < 0.2:
                value = rng.choice(ICMP_TYPES[version])
            return Probe(probe_id, source, destination, "icmp", value)
        ports = words.get("dstports")
        if "specialtarget" in words and ports is None:
            ports = "53"
        if ports is None:
            value = rng.choice(PORTS)
        else:
            low, _, high = ports.partition("-")
            first, last = int(low), int(high or low)
            value = rng.choice((first, last, first - 1, last + 1, rng.randint(first, last)))
        return Probe(probe_id, source, destination, proto, min(max(value, 1), 65535))  # type: ignore[arg-type]


def divergences(
    probes: Sequence[Probe], verdicts: Mapping[str, Mapping[int, Verdict]]
) -> list[tuple[Probe, Verdict, Verdict]]:
    """``(probe, upstream's verdict, ours)`` wherever the two differ."""
    return [
        (probe, verdicts[UPSTREAM][probe.id], verdicts[OURS][probe.id])
        for probe in probes
        if verdicts[UPSTREAM][probe.id] != verdicts[OURS][probe.id]
    ]
