"""The qubesd extension inside the real upstream qubesd code (offline ``qubes.Qubes`` apps).

qubesd's own classes, events, Admin API dispatch, DispVM creation and r3
compatibility extension run here, with ours loaded through its ``qubes.ext``
entry point as qubesd loads it. Qubes that "run" get ``is_running`` and a
QubesDB stand-in, as upstream's own tests give them.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_extension_core import FakeQdb
from test_rules import version_3_file
from upstream_qubes import add_qube, call_api, offline_app, upstream_qubes

from core_admin_patch.extension_core import APP_EVENTS, REPLAN_EVENTS
from core_admin_patch.planner import SUPPORT_FEATURE
from firewall_rules import Rule, RuleLists, load_firewall_xml, save_firewall_xml

FORWARD = "action=forward forwardtype=external proto=tcp srcports=8443-8443 dstports=443-443"
INBOUND = "action=accept srcqube=work proto=tcp dstports=22-22"
OUTBOUND = "action=drop proto=icmp\naction=accept\n"


@pytest.fixture(scope="module")
def qubes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with upstream_qubes(tmp_path_factory.mktemp("upstream")) as module:
        yield module


@pytest.fixture
def app(qubes: Any, tmp_path: Path) -> Iterator[Any]:
    """sys-net <- sys-firewall <- web, work; every hop and qube advertises support."""
    with offline_app(tmp_path / "base") as made:
        net = add_qube(made, "sys-net", provides_network=True)
        fw = add_qube(made, "sys-firewall", provides_network=True, netvm=net)
        for name in ("web", "work"):
            add_qube(made, name, netvm=fw)
        made.domains["tpl"].features[SUPPORT_FEATURE] = "1"
        yield made


class QubesDB(FakeQdb):
    def close(self) -> None:
        """qubesd closes a qube's connection when it is done with the qube."""


def run(vm: Any) -> QubesDB:
    """Make ``vm`` look running to qubesd, with a QubesDB of its own."""
    vm.is_running = lambda: True
    vm._qdb_connection = QubesDB()
    return vm._qdb_connection  # type: ignore[no-any-return]


def firewall_file(vm: Any) -> Path:
    return Path(vm.dir_path) / "firewall.xml"


def get(app: Any, dest: str, arg: str = "") -> str:
    return call_api(app, "admin.vm.firewall.Get", dest, arg)  # type: ignore[no-any-return]


def set_rules(app: Any, dest: str, text: str, arg: str = "") -> Any:
    return call_api(app, "admin.vm.firewall.Set", dest, arg, text.encode())


def extension() -> Any:
    """Ours as qubesd loaded it (``qubes`` is importable only once the fixture ran)."""
    from core_admin_patch.extension import NetworkServerExtension

    return NetworkServerExtension()


def core_of(app: Any) -> Any:
    return extension().core(app)


# --- wiring ---------------------------------------------------------------------


def test_loaded_by_qubesd_and_vm_firewall_is_upstreams_with_our_lists(qubes: Any, app: Any) -> None:
    from core_admin_patch.extension import NetworkServerExtension, NetworkServerFirewall

    assert any(isinstance(ext, NetworkServerExtension) for ext in app._extensions)
    web = app.domains["web"]
    assert isinstance(web.firewall, NetworkServerFirewall)
    assert isinstance(web.firewall, qubes.firewall.Firewall)
    assert web.firewall is web.firewall
    assert [rule.api_rule for rule in web.firewall.rules] == ["action=accept"]


def test_handlers_cover_the_event_sets(qubes: Any) -> None:
    from core_admin_patch.extension import NetworkServerExtension

    assert set(NetworkServerExtension.on_domain_event.ha_events) == REPLAN_EVENTS
    assert set(NetworkServerExtension.on_app_event.ha_events) == APP_EVENTS


def test_get_set_take_our_arguments_reload_stays_upstreams(qubes: Any, app: Any) -> None:
    api = qubes.api.admin.QubesAdminAPI
    assert api.vm_firewall_reload.__module__ == "qubes.api.admin"  # upstream's own
    assert {name for name, _ in api.vm_firewall_get.rpcnames} == {"admin.vm.firewall.Get"}
    assert api.vm_firewall_getpaths.rpcnames == (("admin.vm.firewall.GetPaths", None),)
    set_rules(app, "web", OUTBOUND)
    set_rules(app, "web", f"{FORWARD}\n", "forward")
    set_rules(app, "web", f"{INBOUND}\n", "inbound")
    assert (get(app, "web"), get(app, "web", "forward"), get(app, "web", "inbound")) == (
        OUTBOUND, f"{FORWARD}\n", f"{INBOUND}\n"
    )
    assert call_api(app, "admin.vm.firewall.GetPaths", "web").startswith(
        "0 sys-net uplink addresses tcp/8443 -> sys-firewall"
    )
    assert api.vm_firewall_getrouting.rpcnames == (("admin.vm.firewall.GetRouting", None),)
    assert call_api(app, "admin.vm.firewall.GetRouting", "web") == ""  # not routed
    app.domains["tpl"].features["routing-method"] = "forward"  # its template's counts
    assert call_api(app, "admin.vm.firewall.GetRouting", "web") == (
        "not exposed: 'web' is not running\n"
    )
    with pytest.raises(qubes.exc.ProtocolError):
        call_api(app, "admin.vm.firewall.Get", "web", "outbound")
    with pytest.raises(qubes.exc.ProtocolError):
        call_api(app, "admin.vm.firewall.Reload", "web", "forward")
    with pytest.raises(qubes.exc.ProtocolError, match="not be AdminVM"):
        call_api(app, "admin.vm.firewall.Get", "dom0", "forward")


# --- the file: upstream's <rules>, our lists beside it ---------------------------


def test_every_save_keeps_the_other_lists_in_one_file(qubes: Any, app: Any) -> None:
    web = app.domains["web"]
    set_rules(app, "web", f"{FORWARD}\n", "forward")
    set_rules(app, "web", f"{INBOUND}\n", "inbound")
    set_rules(app, "web", OUTBOUND)  # upstream's own Set handler, then vm.firewall.save()
    web.firewall.save()  # upstream's other code paths call it too (e.g. its expiry timer)
    assert load_firewall_xml(firewall_file(web)) == RuleLists(
        tuple(Rule.from_api_string(line) for line in OUTBOUND.splitlines()),
        (Rule.from_api_string(FORWARD),), (Rule.from_api_string(INBOUND),),
    )
    # upstream's own loader reads the file: the outbound rules, nothing else
    plain = qubes.firewall.Firewall(web)
    assert [rule.api_rule for rule in plain.rules] == OUTBOUND.splitlines()


def test_a_version_3_file_loads_and_is_saved_as_version_2(qubes: Any, app: Any) -> None:
    web = app.domains["web"]
    firewall_file(web).write_text(
        version_3_file(FORWARD, "action=drop proto=icmp", INBOUND, "action=accept")
    )
    web._firewall = None  # qubesd (re)started: the object is made from the file
    with pytest.raises(qubes.exc.QubesVMError):
        qubes.firewall.Firewall(web)  # upstream alone refuses version 3
    assert get(app, "web") == OUTBOUND
    assert get(app, "web", "forward") == f"{FORWARD}\n"
    set_rules(app, "web", "action=accept\n")
    assert '<firewall version="2">' in firewall_file(web).read_text()
    assert [r.api_rule for r in qubes.firewall.Firewall(web).rules] == ["action=accept"]
    assert get(app, "web", "inbound") == f"{INBOUND}\n"


# --- the defects running the real qubesd showed --------------------------------


def test_state_belongs_to_one_app_and_goes_with_it(qubes: Any, tmp_path: Path) -> None:
    """A second app must not act on the first one's qubes, nor keep it alive."""
    with offline_app(tmp_path / "one") as first:
        add_qube(first, "web")
        first_ref = weakref.ref(first)
        assert get(first, "web", "forward") == ""
    del first
    gc.collect()
    assert first_ref() is None
    with offline_app(tmp_path / "two") as second:
        net = add_qube(second, "lone-net", provides_network=True)
        add_qube(second, "lone", netvm=net)
        second.domains["tpl"].features[SUPPORT_FEATURE] = "1"
        set_rules(second, "lone", f"{FORWARD}\n", "forward")
        assert call_api(second, "admin.vm.firewall.GetPaths", "lone").startswith(
            "0 lone-net uplink addresses tcp/8443 -> lone"
        )


def test_get_of_a_new_disposable_returns_the_rules_it_enforces(qubes: Any, app: Any) -> None:
    web = app.domains["web"]
    set_rules(app, "web", OUTBOUND)
    web.template_for_dispvms = True
    disp = app.add_new_vm("DispVM", template=web, label="red")
    assert not firewall_file(disp).exists()  # cloned in memory, as upstream does
    assert get(app, disp.name) == OUTBOUND
    entries = disp.firewall.qdb_entries(addr_family=4)
    assert entries == {"policy": "drop", "0000": "action=drop proto=icmp", "0001": "action=accept"}


def test_expired_upstream_rules_crash_nothing(qubes: Any, app: Any) -> None:
    web = app.domains["web"]
    web.firewall.rules = [
        qubes.firewall.Rule(None, action="drop", proto="udp", expire=str(int(time.time()) - 60)),
        qubes.firewall.Rule(None, action="accept"),
    ]
    assert get(app, "web") == "action=accept\n"  # upstream leaves the expired one out
    web.template_for_dispvms = True
    disp = app.add_new_vm("DispVM", template=web, label="red")
    assert get(app, disp.name) == "action=accept\n"
    core_of(app).refresh()
    web.firewall.save()
    assert load_firewall_xml(firewall_file(web)) == RuleLists.default()


def test_set_saves_through_vm_firewall_save(qubes: Any, app: Any) -> None:
    web = app.domains["web"]
    saved: list[list[str]] = []
    web.firewall.save = lambda: saved.append(
        [r.api_rule for r in web.firewall.rules] + [r.api_rule for r in web.firewall.forward_rules]
    )
    set_rules(app, "web", "action=drop\n")
    set_rules(app, "web", f"{FORWARD}\n", "forward")
    assert saved == [["action=drop"], ["action=drop", FORWARD]]
    assert not firewall_file(web).exists()


def test_errors_are_upstreams_types(qubes: Any, app: Any) -> None:
    with pytest.raises(qubes.exc.ProtocolError):
        set_rules(app, "web", "action=accept comment=caf\u00e9\n")
    with pytest.raises(qubes.exc.ProtocolError):
        set_rules(app, "web", "action=forward proto=tcp dstports=1 comment=\u00e9\n", "forward")
    with pytest.raises(qubes.exc.ProtocolError):
        set_rules(app, "web", "")  # upstream's Set wants a payload
    assert call_api(app, "admin.vm.firewall.Reload", "web") is None
    with pytest.raises(qubes.exc.QubesValueError) as info:
        set_rules(app, "web", f"action=drop\n{FORWARD}\n")
    assert str(info.value).endswith("use admin.vm.firewall.Set+forward")
    with pytest.raises(qubes.exc.QubesValueError, match="no such qube"):
        set_rules(app, "web", "action=accept srcqube=nosuch\n", "inbound")
    with pytest.raises(qubes.exc.QubesValueError):  # a typo: upstream's parser would crash
        set_rules(app, "web", "action=accept protoxyz=tcp\n")
    assert not firewall_file(app.domains["web"]).exists()


def test_a_disposable_never_takes_its_templates_forwarded_port(qubes: Any, app: Any) -> None:
    """Decided: disposables and clones inherit outbound rules only (doc/dom0-extension.md)."""
    web = app.domains["web"]
    set_rules(app, "web", OUTBOUND)
    set_rules(app, "web", f"{FORWARD}\n", "forward")
    set_rules(app, "web", f"{INBOUND}\n", "inbound")
    web.template_for_dispvms = True
    disp = app.add_new_vm("DispVM", template=web, label="red", netvm=web.netvm)
    assert disp.name < "web"  # the one the planner would give the port to on a tie
    assert get(app, disp.name) == OUTBOUND
    assert get(app, disp.name, "forward") == get(app, disp.name, "inbound") == ""
    qdbs = {vm.name: run(vm) for vm in app.domains if vm.name not in ("dom0", "tpl")}
    core_of(app).refresh()
    forwarded = [path for path in qdbs["sys-firewall"].data if path.startswith("/qns-forward/")]
    assert forwarded and all(path.startswith(f"/qns-forward/{web.ip}") for path in forwarded)
    # qvm-clone copies what Get returns: outbound rules only
    add_qube(app, "copy", netvm=web.netvm)
    set_rules(app, "copy", get(app, "web"))
    assert get(app, "copy", "forward") == ""


def test_hop_reports_are_read_from_the_hops_qubesdb_as_qubesd_holds_it(
    qubes: Any, app: Any
) -> None:
    """GetPaths and GetRouting read a running hop's ``vm.untrusted_qdb``, upstream's handle."""
    set_rules(app, "web", f"{FORWARD}\n", "forward")
    app.domains["tpl"].features["routing-method"] = "forward"
    qdbs = {vm.name: run(vm) for vm in app.domains if vm.name not in ("dom0", "tpl")}
    web = app.domains["web"]
    net = qdbs["sys-net"].data
    net[f"/qns-forward_refused/{web.ip}"] = "tcp 8443-8443: this qube listens on it"
    net[f"/qns-routing_status/{web.ip}"] = "state=outside"
    assert call_api(app, "admin.vm.firewall.GetPaths", "web").endswith(
        "; REFUSED by sys-net: tcp/8443 is its own (it listens on it)\n"
    )
    assert call_api(app, "admin.vm.firewall.GetRouting", "web").splitlines()[1:] == [
        "  sys-net: NOT exposed: the address is in no network of its uplink",
        "  sys-firewall: no report yet",
    ]


def test_r3_compatibility_never_sees_forward_or_inbound_rules(
    qubes: Any, app: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A netvm without the qubes-firewall feature gets iptables lines from vm.firewall."""
    import qubes.vm.qubesvm

    set_rules(app, "web", "action=drop proto=icmp\naction=accept\n")
    set_rules(app, "web", f"{FORWARD}\n", "forward")
    set_rules(app, "web", f"{INBOUND}\n", "inbound")
    fw, web = app.domains["sys-firewall"], app.domains["web"]
    monkeypatch.setattr(qubes.vm.qubesvm.QubesVM, "xid",
                        property(lambda vm: 7 if vm.name == "web" else -1))
    qdb = run(fw)
    run(web)
    web.fire_event("firewall-changed")
    rules = qdb.data["/qubes-iptables-domainrules/7"]
    assert rules.splitlines()[1:] == [
        f"-A FORWARD -s {web.ip} -p icmp -j DROP",
        f"-A FORWARD -s {web.ip} -j ACCEPT",
        f"-A FORWARD -s {web.ip} -j DROP",
        "COMMIT",
    ]
    # upstream's own entries for the qubes-firewall worker: outbound only, too
    assert {k: v for k, v in qdb.data.items() if k.startswith(f"/qubes-firewall/{web.ip}/")} == {
        f"/qubes-firewall/{web.ip}/policy": "drop",
        f"/qubes-firewall/{web.ip}/0000": "action=drop proto=icmp",
        f"/qubes-firewall/{web.ip}/0001": "action=accept",
    }


def test_permission_events_carry_upstreams_rules_and_the_argument(qubes: Any, app: Any) -> None:
    seen: list[tuple[str, list[str]]] = []

    def record(subject: Any, event: str, dest: Any, arg: str, rules: Any = None,
               **kwargs: Any) -> None:
        seen.append((arg, [type(rule).__module__ for rule in rules or []]))

    app.domains["dom0"].add_handler("admin-permission:admin.vm.firewall.Set", record)
    set_rules(app, "web", "action=drop\n")
    set_rules(app, "web", f"{FORWARD}\n", "forward")
    assert seen == [("", ["qubes.firewall"]), ("forward", ["firewall_rules.rule"])]


def test_netvm_change_that_would_share_a_port_is_vetoed(qubes: Any, app: Any) -> None:
    set_rules(app, "web", f"{FORWARD}\n", "forward")
    other = add_qube(app, "other-net", provides_network=True)
    lone = add_qube(app, "lone", netvm=other)
    set_rules(app, "lone", f"{FORWARD}\n", "forward")  # another edge: no clash
    with pytest.raises(qubes.exc.QubesValueError, match=r"is wanted by both 'web' .* and 'lone'"):
        lone.netvm = app.domains["sys-firewall"]
    assert lone.netvm is other


def test_qubesd_start_replans_once_its_loop_runs(qubes: Any, app: Any) -> None:
    expire = int(time.time()) + 3600
    web = app.domains["web"]
    save_firewall_xml(
        firewall_file(web),
        RuleLists(forward=(Rule.from_api_string(f"{FORWARD} expire={expire}"),)), time.time(),
    )
    web._firewall = None
    app.save()
    loaded = qubes.Qubes(app._store, offline_mode=True)  # fires domain-load on each qube
    try:
        core = core_of(loaded)
        assert core.timer is not None and core.timer.expiry is None  # nothing ran yet
        asyncio.get_event_loop().run_until_complete(asyncio.sleep(0))
        assert core.timer.expiry == expire  # the startup re-plan armed the expiry timer
    finally:
        loaded.close()


# --- expire=shutdown ------------------------------------------------------------

SHUTDOWN_FORWARD = (
    "action=forward expire=shutdown forwardtype=external proto=tcp srcports=8080-8080"
    " dstports=80-80"
)
SHUTDOWN_INBOUND = "action=accept expire=shutdown srcqube=work"


def test_domain_shutdown_deletes_the_rules_that_lasted_until_then(qubes: Any, app: Any) -> None:
    web = app.domains["web"]
    save_firewall_xml(firewall_file(web), RuleLists(
        outbound=(Rule.from_api_string("action=accept"),),
        forward=(Rule.from_api_string(FORWARD), Rule.from_api_string(SHUTDOWN_FORWARD)),
        inbound=(Rule.from_api_string(SHUTDOWN_INBOUND), Rule.from_api_string(INBOUND)),
    ), time.time())  # stored while web ran (Set of a running qube needs libvirt here)
    web._firewall = None
    # Our handler as qubesd calls it; the event's other (upstream) handlers need libvirt.
    extension().on_domain_event(web, "domain-shutdown")
    assert get(app, "web", "forward") == f"{FORWARD}\n"
    assert get(app, "web", "inbound") == f"{INBOUND}\n"
    assert get(app, "web") == "action=accept\n"
    stored = load_firewall_xml(firewall_file(web))
    assert not any(rule.expires_at_shutdown for rule in stored.all())


def test_expire_shutdown_is_refused_for_a_qube_that_is_not_running(qubes: Any, app: Any) -> None:
    with pytest.raises(qubes.exc.QubesValueError, match="'web' is not running"):
        set_rules(app, "web", f"{SHUTDOWN_FORWARD}\n", "forward")
    assert get(app, "web", "forward") == ""


def test_qubesd_start_deletes_them_for_qubes_that_are_not_running(qubes: Any, app: Any) -> None:
    """dom0 went down without stopping the qube: at qubesd's start it is not running."""
    web = app.domains["web"]
    save_firewall_xml(
        firewall_file(web),
        RuleLists(forward=(Rule.from_api_string(FORWARD),
                           Rule.from_api_string(SHUTDOWN_FORWARD))), time.time(),
    )
    web._firewall = None
    app.save()
    loaded = qubes.Qubes(app._store, offline_mode=True)  # fires domain-load on each qube
    try:
        assert get(loaded, "web", "forward") == f"{FORWARD}\n"
        forward = load_firewall_xml(firewall_file(web)).forward
        assert [rule.api_rule for rule in forward] == [FORWARD]
    finally:
        loaded.close()
