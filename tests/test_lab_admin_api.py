"""The Admin API through the lab's qubesd socket reaches QubesDB, the worker and traffic."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from admin_client_patch.qubesd_client import QubesVMNotFoundError, qubesd_call
from lab.control import Lab

pytestmark = pytest.mark.lab

LAN_HOST = "192.0.2.10"
WEB = "10.137.0.20"
ONLY_8080 = (
    f"action=accept dst4={LAN_HOST}/32 proto=tcp dstports=8080-8080\n"
    "action=drop\n"
)


@pytest.fixture
def api(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("QUBESD_SOCKET", str(lab.qubesd_socket))
    yield lab
    qubesd_call("web", "admin.vm.firewall.Set", payload=b"action=accept\n")


def _reachable(lab: Lab, qube: str, port: int) -> bool:
    with lab.serve("lan", "tcp", port):
        return lab.connect(qube, "tcp", LAN_HOST, port, timeout=0.5) == "ok"


def test_set_rewrites_the_netvm_entries_and_the_worker_applies_them(api: Lab) -> None:
    assert _reachable(api, "web", 8081)
    qubesd_call("web", "admin.vm.firewall.Set", payload=ONLY_8080.encode())
    assert (api.state_dir / "qubes" / "web" / "firewall.xml").exists()
    entries = api.qubesdb("sys-firewall").multiread(f"/qubes-firewall/{WEB}/")
    assert entries[f"/qubes-firewall/{WEB}/policy"] == b"drop"
    assert b"dstports=8080-8080" in entries[f"/qubes-firewall/{WEB}/0000"]
    assert _reachable(api, "web", 8080)
    assert not _reachable(api, "web", 8081)
    assert _reachable(api, "work", 8081)  # other qubes keep their own rules


def test_rules_survive_a_restart_of_the_qube_and_of_its_netvm(api: Lab) -> None:
    qubesd_call("web", "admin.vm.firewall.Set", payload=ONLY_8080.encode())
    api.restart("web")
    assert not _reachable(api, "web", 8081)
    api.restart("sys-firewall")
    assert not _reachable(api, "web", 8081)
    assert _reachable(api, "web", 8080)


def test_get_returns_what_was_set(api: Lab) -> None:
    qubesd_call("web", "admin.vm.firewall.Set", payload=ONLY_8080.encode())
    lines = qubesd_call("web", "admin.vm.firewall.Get").decode().splitlines()
    assert lines[-1] == "action=drop"
    assert "dstports=8080-8080" in lines[0]


def test_unknown_qube_is_refused(api: Lab) -> None:
    with pytest.raises(QubesVMNotFoundError):
        qubesd_call("nope", "admin.vm.firewall.Get")
