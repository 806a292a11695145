"""Q qubes x 10 forwards in the lab: one Set each, then until every hop holds them all.

A lab of its own (a temporary state directory; the namespaces of
``$QUBES_LAB_NS_PREFIX``, so it does not run while a lab of that prefix is
up): a LAN host, ``sys-net`` (uplink on the LAN), ``sys-firewall``, and Q
qubes behind ``sys-firewall``, each with its input hook, every hop with its
worker. IPv6 off, as Qubes' default. Each qube is given 10 forwards in one
``admin.vm.firewall.Set+forward`` (8 external tcp, 1 external udp, 1
internal tcp; ports never clash), one qube after the other, as fast as
the lab's qubesd answers; each Set is checked, saved, planned and written
into every hop's QubesDB before it returns (the lab's qubesd also waits,
as it does for every rule change, for the netvm's worker to take the
qube's outbound rules).

Measured:

- ``Sets s``: from the first Set sent to the last one answered;
- ``converged s``: from the last Set answered until every hop's worker has
  handled every target: each hop's ``/qns-forward_handled/<ip>`` counter of
  each qube (which the worker raises once the target's steps are in nft)
  has moved past its value before the Sets;
- ``steps``: forward steps each hop holds then (sys-firewall, sys-net).

Then a LAN client connects through both hops to the last forward set, so
the figures are those of forwards that work.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from admin_client_patch.qubesd_client import qubesd_call
from bench.common import print_table, sizes_parser
from lab.control import Lab

DEFAULT_SIZES = (100,)
HOPS = ("sys-firewall", "sys-net")
HANDLED = "/qns-forward_handled/"
UPLINK = "192.0.2.2"
FORWARDS_PER_QUBE = 10
#: Give up waiting for the hops this long after the last Set.
CONVERGE_TIMEOUT = 120.0
FIRST_PORT = 20000


def topology(count: int) -> str:
    """The lab's TOML: a LAN, sys-net, sys-firewall and ``count`` qubes behind it."""
    support = '{ "supported-feature.qubes-network-server" = "1" }'
    text = f"""\
[lan]
network = "192.0.2.0/24"
gateway = "192.0.2.1"

[[lan.hosts]]
name = "lan"
addresses = ["192.0.2.10", "192.0.2.1"]

[[qubes]]
name = "sys-net"
netvm = "none"
ip = "10.137.0.5"
provides_network = true
uplink = "{UPLINK}/24"
features = {support}

[[qubes]]
name = "sys-firewall"
netvm = "sys-net"
ip = "10.137.0.6"
provides_network = true
features = {support}
"""
    for number in range(count):
        text += f"""
[[qubes]]
name = "{qube_name(number)}"
netvm = "sys-firewall"
ip = "{qube_ip(number)}"
features = {support}
"""
    return text


def qube_name(number: int) -> str:
    return f"q{number:03}"


def qube_ip(number: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address("10.137.1.1") + number


def forward_lines(number: int) -> list[str]:
    """The 10 forwards of qube ``number``: 8 external tcp, 1 external udp, 1 internal tcp."""
    first = FIRST_PORT + number * FORWARDS_PER_QUBE
    lines = []
    for index in range(FORWARDS_PER_QUBE):
        port = first + index
        kind, proto = "external", "tcp"
        if index == 8:
            proto = "udp"
        elif index == 9:
            kind = "internal"
        lines.append(f"action=forward forwardtype={kind} proto={proto} srcports={port}"
                     f" dstports={8000 + index}")
    return lines


def handled(lab: Lab, hop: str) -> dict[str, int]:
    """The hop worker's handled counter per target address."""
    counters = lab.qubesdb(hop).multiread(HANDLED)
    return {path[len(HANDLED):]: int(value or b"0") for path, value in counters.items()}


def steps_in(lab: Lab, hop: str) -> int:
    """Forward steps written into the hop's QubesDB (what it must hold)."""
    return sum(1 for path in lab.qubesdb(hop).list("/qns-forward/") if path.count("/") == 3)


def converge(lab: Lab, count: int) -> list[object]:
    """Set every qube's forwards, then wait for both hops; one table row."""
    os.environ["QUBESD_SOCKET"] = str(lab.qubesd_socket)
    before = {hop: handled(lab, hop) for hop in HOPS}
    start = time.perf_counter()
    for number in range(count):
        payload = "".join(line + "\n" for line in forward_lines(number)).encode()
        qubesd_call(qube_name(number), "admin.vm.firewall.Set", "forward", payload)
    last_set = time.perf_counter()
    targets = [str(qube_ip(number)) for number in range(count)]
    waiting = set(HOPS)
    while waiting:
        for hop in sorted(waiting):
            now = handled(lab, hop)
            if all(now.get(ip, 0) > before[hop].get(ip, 0) for ip in targets):
                waiting.discard(hop)
        if time.perf_counter() - last_set > CONVERGE_TIMEOUT:
            raise RuntimeError(f"hops {sorted(waiting)} did not converge within"
                               f" {CONVERGE_TIMEOUT:.0f}s; see {lab.state_dir}/logs")
        time.sleep(0.005)
    converged = time.perf_counter()
    check_last_forward(lab, count - 1)
    return [count, count * FORWARDS_PER_QUBE, f"{last_set - start:.2f}",
            f"{(last_set - start) / count * 1000:.0f}", f"{converged - last_set:.2f}",
            " / ".join(str(steps_in(lab, hop)) for hop in HOPS)]


def check_last_forward(lab: Lab, number: int) -> None:
    """A LAN client reaches the last qube's first forward through both hops."""
    line = forward_lines(number)[0]
    words = dict(word.split("=", 1) for word in line.split())
    with lab.serve(qube_name(number), "tcp", int(words["dstports"]), reply="converged"):
        reply = lab.connect("lan", "tcp", UPLINK, int(words["srcports"]))
    if reply != "converged":
        raise RuntimeError(f"the LAN client got {reply!r} through forward {line!r}")


def unavailable() -> str | None:
    """Why the benchmark must not run now: a lab of the same namespace prefix is up."""
    if Lab().is_up():
        return f"a lab is up in {Lab().state_dir} (its namespaces would go): qubes-lab down first"
    return None


def measure(sizes: Sequence[int]) -> list[list[object]]:
    """One row per number of qubes, each in a lab of its own."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    rows = []
    for count in sizes:
        with tempfile.TemporaryDirectory(prefix="qns-bench-converge.") as tmp:
            path = Path(tmp) / "topology.toml"
            path.write_text(topology(count))
            lab = Lab(Path(tmp) / "lab")
            try:
                lab.up(path)
                rows.append(converge(lab, count))
            finally:
                lab.down()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the convergence table."""
    args = sizes_parser(__doc__.splitlines()[0], DEFAULT_SIZES).parse_args(argv)
    print_table(
        "converge: one Set+forward per qube, back to back, in the lab; seconds",
        ["qubes", "forwards", "Sets s", "ms per Set", "converged s after last Set",
         "steps per hop (sys-firewall / sys-net)"],
        measure(args.sizes),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
