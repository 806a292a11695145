"""A forward or inbound rule opens exactly what it names: the holes of issue 9, in the lab.

Default lab: the LAN, sys-net (10.137.0.5) with sys-firewall (10.137.0.6) and
direct (10.137.0.8) behind it, web (10.137.0.20) and work (10.137.0.21) behind
sys-firewall; IPv6 on everywhere. Rules go in through ``qvm-firewall`` (the
command line, as a user types it); real TCP from the LAN and from qubes.

- A rule whose target is a ProxyVM (sys-firewall) admits what arrives the
  way the rule says (from the LAN, from its netvm's other qubes), never its
  own client qubes, which Qubes keeps out of it.
- ``srcqube=`` never names a qube that provides network (its address also
  carries every qube behind it): refused at Set, and left out (and
  reported) at the next plan when the qube starts providing network.
- A forward never takes a port a hop serves itself (a listening socket, or
  a port its user opened in ``custom-input``): the hop's worker leaves the
  step out and reports it; and one rule claims at most 1024 ports.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import wait_for

from admin_client_patch import qvm_firewall
from lab.control import Lab

pytestmark = pytest.mark.lab

UPLINK, UPLINK6 = "192.0.2.2", "2001:db8::2"
SYS_NET, SYS_NET6 = "10.137.0.5", "fd09:24ef:4179::a89:5"
SYS_FIREWALL, SYS_FIREWALL6 = "10.137.0.6", "fd09:24ef:4179::a89:6"
QUBES = ("sys-net", "sys-firewall", "web", "work", "direct")


def firewall(*argv: str) -> None:
    """``qvm-firewall ARGV...`` as a user runs it in dom0 (it must succeed)."""
    assert qvm_firewall.main(list(argv)) == 0, f"qvm-firewall {' '.join(argv)} failed"


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """``qvm-firewall ARGV...`` that must fail; its error output."""
    capsys.readouterr()
    assert qvm_firewall.main(list(argv)) != 0, f"qvm-firewall {' '.join(argv)} succeeded"
    return capsys.readouterr().err


def reset(lab: Lab) -> None:
    for qube in QUBES:
        firewall(qube, "reset")
    for qube in QUBES:
        wait_for(lambda q=qube: not lab.qubesdb(q).list("/qns-input"), f"{qube} closed")


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    reset(lab)
    yield lab
    reset(lab)


def reaches(lab: Lab, client: str, host: str, port: int, server: str, served: int) -> bool:
    """Does ``client`` connecting to ``host:port`` get the answer of a server in ``server``?"""
    bind = "::" if ":" in host else "0.0.0.0"
    with lab.serve(server, "tcp", served, reply=f"{server}-{served}", bind=bind):
        return lab.connect(client, "tcp", host, port, timeout=0.5) == f"{server}-{served}"


def test_forward_to_a_proxyvm_is_not_open_to_its_own_qubes(api: Lab) -> None:
    firewall("sys-firewall", "add", "action=forward", "forwardtype=external", "proto=tcp",
             "srcports=2222", "dstports=22")
    for uplink in (UPLINK, UPLINK6):
        wait_for(lambda u=uplink: reaches(api, "lan", u, 2222, "sys-firewall", 22),
                 f"the LAN reaches sys-firewall:22 at {uplink}:2222")
    for client in ("web", "work"):
        for address in (SYS_FIREWALL, SYS_FIREWALL6):
            assert not reaches(api, client, address, 22, "sys-firewall", 22), (client, address)


def test_internal_forward_to_a_proxyvm_is_not_open_to_its_own_qubes(api: Lab) -> None:
    firewall("sys-firewall", "add", "action=forward", "forwardtype=internal", "proto=tcp",
             "srcports=2222", "dstports=22")
    for netvm in (SYS_NET, SYS_NET6):
        wait_for(lambda n=netvm: reaches(api, "direct", n, 2222, "sys-firewall", 22),
                 f"direct reaches sys-firewall:22 at {netvm}:2222")
    for client in ("web", "work"):
        for address, port in ((SYS_FIREWALL, 22), (SYS_FIREWALL6, 22),
                              (SYS_NET, 2222), (SYS_NET6, 2222)):
            assert not reaches(api, client, address, port, "sys-firewall", 22), (client, address)


def test_inbound_rule_of_a_proxyvm_is_not_open_to_its_own_qubes(api: Lab) -> None:
    """A source network that also holds sys-firewall's clients admits only direct."""
    for network in ("10.137.0.0/16", "fd09:24ef:4179::/64"):
        firewall("sys-firewall", "add", "action=accept", f"srchost={network}", "proto=tcp",
                 "dstports=22")
    for address in (SYS_FIREWALL, SYS_FIREWALL6):
        wait_for(lambda a=address: reaches(api, "direct", a, 22, "sys-firewall", 22),
                 f"direct reaches sys-firewall at {address}:22")
    for client in ("web", "work"):
        for address in (SYS_FIREWALL, SYS_FIREWALL6):
            assert not reaches(api, client, address, 22, "sys-firewall", 22), (client, address)


def test_srcqube_naming_a_netvm_is_refused_at_set(api: Lab, capsys: pytest.CaptureFixture[str]
                                                  ) -> None:
    error = refused(capsys, "direct", "add", "action=accept", "srcqube=sys-firewall",
                    "proto=tcp", "dstports=22")
    assert len(error.strip().splitlines()) == 1, error
    assert "'sys-firewall' provides network" in error and "srchost=10.137.0.6" in error
    for address in ("10.137.0.8", "fd09:24ef:4179::a89:8"):
        for client in ("web", "work"):  # masqueraded as sys-firewall: refused as ever
            assert not reaches(api, client, address, 22, "direct", 22)
    assert not api.qubesdb("direct").list("/qns-input")


def test_a_source_that_starts_providing_network_is_dropped_and_reported(api: Lab) -> None:
    firewall("web", "add", "action=accept", "srcqube=work", "proto=tcp", "dstports=22")
    wait_for(lambda: reaches(api, "work", "10.137.0.20", 22, "web", 22), "work reaches web:22")
    api.set("work", "provides_network", "true")
    try:
        wait_for(lambda: not reaches(api, "work", "10.137.0.20", 22, "web", 22),
                 "work refused once it provides network")
        assert not api.qubesdb("web").list("/qns-input")
        assert not api.qubesdb("sys-firewall").list("/qns-inbound/")
        log = (api.state_dir / "logs" / "dom0.log").read_text()
        assert "rule not applied: web inbound rule 0: srcqube 'work' provides network" in log
    finally:
        api.set("work", "provides_network", "false")
    wait_for(lambda: reaches(api, "work", "10.137.0.20", 22, "web", 22), "work admitted again")


WEB, WEB6 = "10.137.0.20", "fd09:24ef:4179::a89:14"
SSH_FORWARD = ("action=forward", "forwardtype=external", "proto=tcp", "srcports=22",
               "dstports=22")
MOVED_SSH_FORWARD = ("action=forward", "forwardtype=external", "proto=tcp", "srcports=2222",
                     "dstports=22")


def custom_input(lab: Lab, qube: str, *rule: str) -> None:
    """What a user puts in the qube's /rw/config/qubes-firewall-user-script."""
    lab.exec(qube, ["nft", "add", "rule", "ip", "qubes", "custom-input", *rule], check=True)


def refusal(lab: Lab, hop: str) -> str:
    value = lab.qubesdb(hop).read(f"/qns-forward_refused/{WEB}")
    return "" if value is None else value.decode()


def listing(capsys: pytest.CaptureFixture[str], qube: str) -> str:
    """What ``qvm-firewall QUBE list`` prints."""
    capsys.readouterr()
    firewall(qube, "list")
    return capsys.readouterr().out


def test_a_forward_never_takes_a_service_of_the_edge(
    api: Lab, capsys: pytest.CaptureFixture[str]
) -> None:
    """sys-net serves SSH to the LAN (opened in custom-input); web asks for port 22.

    sys-net keeps its service, and ``qvm-firewall web list`` tells the user
    why the forward does not work; moved to another port, it works.
    """
    custom_input(api, "sys-net", "tcp", "dport", "22", "accept")
    try:
        with api.serve("sys-net", "tcp", 22, reply="sys-net-ssh"), \
                api.serve("web", "tcp", 22, reply="web-ssh"):
            assert api.connect("lan", "tcp", UPLINK, 22, timeout=0.5) == "sys-net-ssh"
            firewall("web", "add", *SSH_FORWARD)
            wait_for(lambda: refusal(api, "sys-net") != "", "sys-net reports the refusal")
            report = refusal(api, "sys-net")
            assert report == "tcp 22-22: this qube listens on it"  # the first reason found
            assert api.connect("lan", "tcp", UPLINK, 22, timeout=0.5) == "sys-net-ssh"
            assert api.connect("lan", "tcp", UPLINK6, 22, timeout=0.5) is None  # v4 server
            assert refusal(api, "sys-firewall") == ""  # it serves nothing on 22
            assert (
                f"  forward:0: sys-net uplink addresses tcp/22 -> sys-firewall ({SYS_FIREWALL})"
                f" tcp/22 -> web ({WEB}) tcp/22 (IPv6: {WEB6} too);"
                " REFUSED by sys-net: tcp/22 is its own (it listens on it)\n"
            ) in listing(capsys, "web")
            firewall("web", "del", "--rule-no", "forward:0")
            firewall("web", "add", *MOVED_SSH_FORWARD)
            wait_for(lambda: api.connect("lan", "tcp", UPLINK, 2222, timeout=0.5) == "web-ssh",
                     "the moved forward")
            assert refusal(api, "sys-net") == ""  # the report goes with the step
            assert "REFUSED" not in listing(capsys, "web")
            assert api.connect("lan", "tcp", UPLINK, 22, timeout=0.5) == "sys-net-ssh"
    finally:
        api.exec("sys-net", ["nft", "flush", "chain", "ip", "qubes", "custom-input"], check=True)


def test_a_port_opened_or_listened_on_alone_is_not_taken(api: Lab) -> None:
    custom_input(api, "sys-net", "meta", "l4proto", "tcp", "th", "dport", "{", "2200-2201",
                 "}", "accept")
    try:
        with api.serve("sys-firewall", "udp", 5300, reply="sys-firewall-udp"):
            firewall("web", "add", "action=forward", "forwardtype=external", "proto=tcp",
                     "srcports=2201", "dstports=80")
            firewall("web", "add", "action=forward", "forwardtype=external", "proto=udp",
                     "srcports=5300", "dstports=53")
            firewall("web", "add", *HTTP_FORWARD)
            wait_for(lambda: reaches(api, "lan", UPLINK, 8080, "web", 80), "the other forward")
            wait_for(lambda: "opened it in custom-input" in refusal(api, "sys-net"),
                     "sys-net refuses 2201")
            wait_for(lambda: "udp 5300-5300: this qube listens" in refusal(api, "sys-firewall"),
                     "sys-firewall refuses 5300")
            assert not reaches(api, "lan", UPLINK, 2201, "web", 80)
            with api.serve("web", "udp", 53, reply="web-udp"):
                assert api.connect("lan", "udp", UPLINK, 5300, timeout=0.5) is None
    finally:
        api.exec("sys-net", ["nft", "flush", "chain", "ip", "qubes", "custom-input"], check=True)


HTTP_FORWARD = ("action=forward", "forwardtype=external", "proto=tcp", "srcports=8080",
                "dstports=80")


def test_one_rule_claims_at_most_1024_ports(api: Lab, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    error = refused(capsys, "web", "add", "action=forward", "forwardtype=external",
                    "proto=tcp", "srcports=1-65535", "dstports=1-65535")
    # upstream's way: usage, then the one-line reason
    assert error.strip().splitlines()[-1] == (
        "qvm-firewall: error: srcports=1-65535 claims 65535 ports: a forward rule takes at"
        " most 1024 (split a larger range into several rules)"
    )
    assert not api.qubesdb("sys-net").list("/qns-forward/")
