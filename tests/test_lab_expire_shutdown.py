"""``expire=shutdown`` in the lab: rules that last until the qube stops.

Added with qvm-firewall while web runs, they work like any rule (real TCP
from the LAN and from work); when web stops, dom0 deletes them from its
firewall.xml, so nothing of them is in any QubesDB or nft ruleset, and when
web starts again only its other rules come back.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import wait_for
from gui_lab import qvm_firewall, run_qvm_firewall, stored
from test_lab_forward import UPLINK, WEB, answers, qns_rules, running

from admin_client_patch.qubesd_client import qubesd_call
from lab.control import Lab

pytestmark = pytest.mark.lab

WORK = "10.137.0.21"
FORWARD = ("action=forward", "proto=tcp", "srcports=8080", "dstports=80")
FORWARD_UNTIL_STOP = ("action=forward", "proto=tcp", "srcports=8443", "dstports=443",
                      "expire=shutdown")
INBOUND = ("action=accept", "srcqube=work", "proto=tcp", "dstports=22")
INBOUND_UNTIL_STOP = ("action=accept", "srcqube=work", "proto=tcp", "dstports=2222",
                      "expire=shutdown")
GONE_PORTS = ("8443", "443-443", "2222")


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    yield lab
    lab.start("web")
    for kind in ("forward", "inbound"):
        qubesd_call("web", "admin.vm.firewall.Set", kind, b"")


def mentions(lab: Lab, port: str) -> list[str]:
    """Where ``port`` of ours appears: QubesDB values and nft rules of every running qube."""
    found = []
    for qube in running(lab):
        db = lab.qubesdb(qube)
        for prefix in ("/qns-forward/", "/qns-inbound/", "/qns-input"):
            found += [f"{qube} {path}" for path, value in db.multiread(prefix).items()
                      if f"ports={port}" in value.decode()]
        found += [f"{qube} nft {rule}" for rule in qns_rules(lab, qube) if port in rule]
    return found


def work_reaches_web(lab: Lab, port: int) -> bool:
    with lab.serve("web", "tcp", port, reply=f"web-{port}"):
        return lab.connect("work", "tcp", WEB, port, timeout=0.5) == f"web-{port}"


def test_rules_until_the_qube_stops_are_gone_after_it_stops_and_stay_gone(api: Lab) -> None:
    for words in (FORWARD, FORWARD_UNTIL_STOP, INBOUND, INBOUND_UNTIL_STOP):
        qvm_firewall(api, "web", "add", *words)
    assert sum("expire=shutdown" in line for line in stored(api)) == 2
    wait_for(lambda: answers(api, "lan", "tcp", UPLINK, 8443, served_port=443),
             "the LAN reaches web:443 through sys-net:8443")
    wait_for(lambda: work_reaches_web(api, 2222), "work reaches web:2222")
    assert mentions(api, "8443") and mentions(api, "2222")

    api.stop("web")
    assert [line for line in stored(api) if "expire=shutdown" in line] == []
    assert len([line for line in stored(api) if "srcports=8080" in line]) == 1
    assert any("dstports=22-22" in line for line in stored(api))
    for port in GONE_PORTS:
        assert mentions(api, port) == [], port
    assert qubesd_call("web", "admin.vm.firewall.Get", "forward").count(b"\n") == 1

    api.start("web")
    wait_for(lambda: answers(api, "lan", "tcp", UPLINK, 8080, served_port=80),
             "the rule without expiry is back: the LAN reaches web:80")
    wait_for(lambda: work_reaches_web(api, 22), "work reaches web:22 again")
    for port in GONE_PORTS:
        assert mentions(api, port) == [], port
    assert not answers(api, "lan", "tcp", UPLINK, 8443, served_port=443)
    assert not work_reaches_web(api, 2222)
    assert [line for line in stored(api) if "expire=shutdown" in line] == []


def test_a_stopped_qube_takes_none(api: Lab) -> None:
    api.stop("web")
    result = run_qvm_firewall(api, "web", "add", *FORWARD_UNTIL_STOP)
    assert result.returncode == 1
    assert result.stderr == (
        "qvm-firewall: error: expire=shutdown: 'web' is not running (such a rule lasts"
        " until the qube stops; start it first)\n"
    )
    assert not any("srcports=8443" in line for line in stored(api))
