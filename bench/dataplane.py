"""Forwarded traffic through a hop holding K forward steps: TCP throughput, new connections/s.

Three network namespaces (``$QUBES_LAB_NS_PREFIX`` + ``dp<pid>...``, always
deleted): a LAN client, a hop wired as a Qubes netvm (the Qubes base
ruleset, the client on its uplink) and a qube behind the hop's vif
(:mod:`lab.wiring`). The hop holds K forward steps: two the traffic takes
(uplink tcp 8080 to the qube's iperf3 on 5201, uplink tcp 8081 to a
connection counter on 9000, :mod:`bench.connrate`) and K-2 to other
clients, sorted before them. Layouts:

- ``maps``: this release, put in place by the worker's own code
  (``Forwarder.reload()`` inside the hop's namespace): map elements and a
  handful of lookups; a packet of an established flow leaves our chain at
  its first rule;
- ``rules`` (the baseline): the same steps as one DNAT rule and one accept
  rule each (``bench.nft.steps_as_rules``), the layout of the previous
  release, where every packet walks the accept rules.

Measured from the client through the hop's DNAT: TCP throughput (iperf3, one
stream) and new TCP connections per second (one client, one after the
other). Every configuration runs ``--rounds`` times, alternating; the
figures are medians, and ratios are against ``maps`` with 10 steps.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from agent_worker import forward_steps
from agent_worker.firewall import Nft
from agent_worker.forwarder import FORWARD_DIR, Forwarder
from bench.common import REPO, print_table, ratio
from bench.nft import RULES_REMOVAL, MemoryQubesDB, inside, steps_as_rules
from lab import netns, wiring
from lab.topology import Qube

UPLINK, CLIENT_ADDRESS = "192.0.2.2", "192.0.2.10"
HOP_ADDRESS = ipaddress.IPv4Address("10.137.0.5")
#: the qube behind the hop: above every dummy target, so its steps sort last
QUBE_ADDRESS = ipaddress.IPv4Address("10.137.250.20")
IPERF_PORT, COUNTER_PORT = 5201, 9000
FORWARDED = {8080: IPERF_PORT, 8081: COUNTER_PORT}
DEFAULT_SIZES = (10, 1000)
SECONDS = 2.0


def step_entries(count: int) -> dict[str, str]:
    """``/qns-forward/`` of the hop: the two steps the traffic takes, and ``count - 2`` others."""
    entries: dict[str, str] = {}
    clients = [QUBE_ADDRESS]
    for number in range(max(count - len(FORWARDED), 0)):
        target = ipaddress.IPv4Address("10.137.1.0") + number
        clients.append(target)
        base = f"{FORWARD_DIR}{target}"
        entries[f"{base}/0000"] = (f"proto=tcp ports={20000 + number}-{20000 + number}"
                                   f" iif=upstream daddr=local to={target} toports=80-80")
        entries[base] = ""
    base = f"{FORWARD_DIR}{QUBE_ADDRESS}"
    for key, (port, toport) in enumerate(FORWARDED.items()):
        entries[f"{base}/{key:04}"] = (f"proto=tcp ports={port}-{port} iif=upstream"
                                       f" daddr=local to={QUBE_ADDRESS} toports={toport}-{toport}")
    entries[base] = ""
    entries["/connected-ips"] = " ".join(str(client) for client in clients)
    return entries


class Network:
    """The client, the hop and the qube, wired; :meth:`close` takes it all down."""

    def __init__(self) -> None:
        tag = f"dp{os.getpid()}"
        self.client, self.hop, self.qube = (f"{tag}c", f"{tag}h", f"{tag}q")
        self.names = [netns.namespace(name) for name in (self.client, self.hop, self.qube)]
        try:
            self._wire()
        except BaseException:
            self.close()
            raise

    def _wire(self) -> None:
        client, hop, _qube = self.names
        wiring.qube_up(Qube(self.hop, None, HOP_ADDRESS, qid=1, provides_network=True))
        wiring.qube_up(Qube(self.qube, self.hop, QUBE_ADDRESS, qid=2))
        wiring.vif_online(self.hop, self.qube, 1, QUBE_ADDRESS, HOP_ADDRESS)
        # what the qube's input hook opens for its forwards (Qubes' input drops the rest)
        ports = ", ".join(str(port) for port in FORWARDED.values())
        netns.nft(netns.namespace(self.qube),
                  f"add rule ip qubes custom-input tcp dport {{ {ports} }} accept\n")
        netns.create(client)
        netns.run(["ip", "link", "add", "eth0", "netns", hop, "type", "veth",
                   "peer", "name", "eth0", "netns", client])
        netns.ip_batch(hop, [f"address add {UPLINK}/24 dev eth0", "link set eth0 up"])
        netns.ip_batch(client, [f"address add {CLIENT_ADDRESS}/24 dev eth0", "link set eth0 up"])

    def close(self) -> None:
        for name in self.names:
            if netns.exists(name):
                netns.delete(name)

    def spawn(self, where: str, argv: Sequence[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", netns.namespace(where), *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                cwd=REPO)

    def output(self, where: str, argv: Sequence[str]) -> str:
        return subprocess.run(["ip", "netns", "exec", netns.namespace(where), *argv],
                              capture_output=True, text=True, check=True, cwd=REPO,
                              timeout=SECONDS + 30).stdout


@contextmanager
def servers(network: Network) -> Iterator[None]:
    """iperf3 and the connection counter in the qube, for the whole run."""
    iperf = network.spawn(network.qube, ["iperf3", "-s", "-p", str(IPERF_PORT)])
    counter = network.spawn(network.qube, [sys.executable, "-m", "bench.connrate", "serve",
                                           str(COUNTER_PORT)])
    try:
        assert counter.stdout is not None
        if counter.stdout.readline().strip() != "ready":
            raise RuntimeError("the connection counter did not start")
        time.sleep(0.2)  # iperf3 prints nothing when ready
        yield
    finally:
        for process in (iperf, counter):
            process.terminate()
            process.wait(timeout=10)


def throughput(network: Network) -> float:
    """Bits per second of one TCP stream from the client through the hop."""
    report = json.loads(network.output(network.client, [
        "iperf3", "-c", UPLINK, "-p", "8080", "-t", str(SECONDS), "-J",
        "--connect-timeout", "3000"]))
    return float(report["end"]["sum_received"]["bits_per_second"])


def connection_rate(network: Network) -> float:
    """New TCP connections per second from the client through the hop."""
    made = network.output(network.client, [sys.executable, "-m", "bench.connrate", "connect",
                                           UPLINK, "8081", str(SECONDS)])
    return int(made) / SECONDS


@contextmanager
def maps(network: Network, count: int) -> Iterator[None]:
    """The worker's layout, put in place by its own code inside the hop.

    The libnftables context is made inside: its netlink socket belongs to
    the namespace it was opened in.
    """
    with inside(netns.namespace(network.hop)):
        half = Forwarder(MemoryQubesDB(step_entries(count)), Nft().run)
        half.reload()
    try:
        yield
    finally:
        with inside(netns.namespace(network.hop)):
            half.remove()


@contextmanager
def rules(network: Network, count: int) -> Iterator[None]:
    """The baseline: one DNAT and one accept rule per step."""
    steps = [forward_steps.parse_step(value) for path, value in sorted(step_entries(count).items())
             if path.count("/") == 3]
    with inside(netns.namespace(network.hop)):
        nft = Nft()  # in the hop's namespace, as above
        nft.run(steps_as_rules(steps))
    try:
        yield
    finally:
        with inside(netns.namespace(network.hop)):
            nft.run(RULES_REMOVAL)


LAYOUTS: dict[str, Callable[[Network, int], object]] = {"maps": maps, "rules": rules}


def measure(sizes: Sequence[int], rounds: int = 3) -> list[list[object]]:
    """One row per layout and K."""
    configurations = [(layout, count) for layout in LAYOUTS for count in sizes]
    found: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in configurations}
    network = Network()
    try:
        with servers(network):
            for _ in range(rounds):
                for layout, count in configurations:
                    with LAYOUTS[layout](network, count):  # type: ignore[attr-defined]
                        found[(layout, count)].append(
                            (throughput(network), connection_rate(network)))
    finally:
        network.close()
    medians = {
        c: (statistics.median(t for t, _ in runs), statistics.median(r for _, r in runs))
        for c, runs in found.items()
    }
    base = medians.get(("maps", 10)) or next(iter(medians.values()))
    return [
        [layout, count, f"{bits / 1e9:.2f}", ratio(bits, base[0], 2), f"{rate:.0f}",
         ratio(rate, base[1], 2)]
        for (layout, count), (bits, rate) in medians.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the data plane table (needs root, ``ip netns`` and iperf3)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=lambda t: [int(p) for p in t.split(",") if p],
                        default=list(DEFAULT_SIZES))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print_table(
        "dataplane: through one hop holding K forward steps (medians; ratios against maps, 10)",
        ["layout", "K steps", "TCP Gbit/s", "throughput ratio", "new conn/s", "conn/s ratio"],
        measure(args.sizes, args.rounds),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

