"""The qubesd extension's decisions, with stand-ins for qubesd's VMs (no ``qubes``)."""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core_admin_patch import errors
from core_admin_patch.admin_api import handle_call
from core_admin_patch.extension_core import (
    EXPIRY_SLACK,
    QDB_RESET_EVENTS,
    REPLAN_EVENTS,
    ExpiryTimer,
    ExtensionCore,
    OutboundFirewall,
    firewall_for,
    read_rules,
    upstream_error,
)
from core_admin_patch.planner import SUPPORT_FEATURE
from firewall_rules import Rule, save_firewall_xml

NOW = 1_700_000_000.0
FORWARD = "action=forward forwardtype=external proto=tcp srcports=8443 dstports=443"


class FakeQdb:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.broken = False

    def write(self, path: str, value: str) -> None:
        if self.broken:
            raise OSError("qubesdb gone")
        self.data[path] = value

    def rm(self, path: str) -> None:
        if self.broken:
            raise OSError("qubesdb gone")
        subtree = path.endswith("/")
        for key in [k for k in self.data if k == path or (subtree and k.startswith(path))]:
            del self.data[key]

    def list(self, prefix: str) -> list[str]:
        if self.broken:
            raise OSError("qubesdb gone")
        return sorted(path for path in self.data if path.startswith(prefix))


@dataclass
class FakeVM:
    name: str
    dir_path: str
    netvm: FakeVM | None = None
    ip: ipaddress.IPv4Address | None = None
    provides_network: bool = False
    running: bool = True
    klass: str = "AppVM"
    firewall_conf: str = "firewall.xml"
    features: dict[str, str] = field(default_factory=lambda: {SUPPORT_FEATURE: "1"})
    untrusted_qdb: FakeQdb = field(default_factory=FakeQdb)

    def is_running(self) -> bool:
        return self.running


@dataclass
class System:
    vms: dict[str, FakeVM]
    clock: list[float]
    fired: list[str]
    core: ExtensionCore

    def set_rules(self, name: str, text: str) -> None:
        rules = [Rule.from_api_string(line) for line in text.splitlines()]
        save_firewall_xml(Path(self.vms[name].dir_path) / "firewall.xml", rules, self.clock[0])


@pytest.fixture
def system(tmp_path: Path) -> System:
    def vm(name: str, **kwargs: Any) -> FakeVM:
        (tmp_path / name).mkdir()
        return FakeVM(name, str(tmp_path / name), **kwargs)

    net = vm("sys-net", ip=ipaddress.IPv4Address("10.137.0.5"), provides_network=True)
    fw = vm("sys-firewall", netvm=net, ip=ipaddress.IPv4Address("10.137.0.6"),
            provides_network=True)
    web = vm("web", netvm=fw, ip=ipaddress.IPv4Address("10.137.0.20"))
    dom0 = FakeVM("dom0", None, klass="AdminVM")  # type: ignore[arg-type]  # as qubesd
    vms = {v.name: v for v in (dom0, net, fw, web)}
    clock = [NOW]
    fired: list[str] = []
    core = ExtensionCore(
        domains=lambda: list(vms.values()),
        lookup=vms.__getitem__,
        fire_firewall_changed=lambda v: fired.append(v.name),
        clock=lambda: clock[0],
    )
    return System(vms, clock, fired, core)


def test_collection_never_imports_qubes() -> None:
    assert "qubes" not in sys.modules
    assert "core_admin_patch.extension" not in sys.modules


def test_event_sets() -> None:
    for event in ("domain-start", "domain-shutdown", "domain-qdb-create", "property-set:netvm",
                  "property-set:ip", "property-set:ip6", "firewall-changed",
                  "domain-feature-set:ipv6",
                  "domain-feature-delete:ipv6"):
        assert event in REPLAN_EVENTS
    assert QDB_RESET_EVENTS <= REPLAN_EVENTS


def test_dom0_is_left_out_of_planning(system: System) -> None:
    assert [vm.name for vm in system.core.planned_domains()] == ["sys-net", "sys-firewall", "web"]


def test_set_through_handle_call_writes_every_hop(system: System) -> None:
    handle_call(system.core, "admin.vm.firewall.Set", "", "web", f"{FORWARD}\n".encode(), NOW)
    assert system.fired == ["web"]  # upstream's outbound path and our re-plan follow from it
    system.core.on_domain_event(system.vms["web"], "firewall-changed")
    assert "/qns-forward/10.137.0.20" in system.vms["sys-firewall"].untrusted_qdb.data
    assert "/qns-forward/10.137.0.20" in system.vms["sys-net"].untrusted_qdb.data
    assert "/qns-input" in system.vms["web"].untrusted_qdb.data
    paths = handle_call(system.core, "admin.vm.firewall.GetPaths", "", "web", b"", NOW)
    assert paths.startswith(b"0 sys-net uplink addresses tcp/8443 -> sys-firewall")


def test_events_outside_the_set_do_nothing(system: System) -> None:
    system.set_rules("web", FORWARD)
    system.core.on_domain_event(system.vms["web"], "domain-feature-set:service.cups")
    system.core.on_domain_event(system.vms["web"], "property-set:label")
    system.core.on_app_event("domain-pre-delete")
    assert system.vms["sys-firewall"].untrusted_qdb.data == {}
    system.core.on_app_event("domain-add")
    assert system.vms["sys-firewall"].untrusted_qdb.data != {}


def test_stopped_qube_gets_nothing_then_everything_at_qdb_create(system: System) -> None:
    system.set_rules("web", FORWARD)
    fw = system.vms["sys-firewall"]
    fw.running = False
    system.core.on_domain_event(fw, "domain-shutdown")
    assert fw.untrusted_qdb.data == {}
    fw.running = True
    fw.untrusted_qdb = FakeQdb()  # a new database at boot
    system.core.on_domain_event(fw, "domain-qdb-create")
    assert fw.untrusted_qdb.data["/qns-forward/10.137.0.20"] == ""


def test_target_shutdown_removes_its_forward_from_the_hops(system: System) -> None:
    system.set_rules("web", FORWARD)
    system.core.refresh()
    web = system.vms["web"]
    web.running = False
    system.core.on_domain_event(web, "domain-shutdown")
    assert not any(k.startswith("/qns-forward/10.137.0.20")
                   for k in system.vms["sys-firewall"].untrusted_qdb.data)


def test_failed_write_rewrites_that_qube_later_and_spares_the_others(system: System) -> None:
    system.set_rules("web", FORWARD)
    fw = system.vms["sys-firewall"]
    fw.untrusted_qdb.broken = True
    system.core.refresh()
    assert "/qns-forward/10.137.0.20" in system.vms["sys-net"].untrusted_qdb.data
    assert "/qns-input" in system.vms["web"].untrusted_qdb.data
    fw.untrusted_qdb.broken = False
    system.core.on_domain_event(system.vms["web"], "property-set:ip")
    assert fw.untrusted_qdb.data["/qns-forward/10.137.0.20"] == ""


def test_unreadable_firewall_xml_does_not_stop_the_others(system: System) -> None:
    system.set_rules("web", FORWARD)
    (Path(system.vms["sys-net"].dir_path) / "firewall.xml").write_text("garbage")
    system.core.refresh()
    assert "/qns-forward/10.137.0.20" in system.vms["sys-firewall"].untrusted_qdb.data


class FakeHandle:
    def __init__(self, when: float, callback: Any) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    def __init__(self) -> None:
        self.now = 500.0  # monotonic, unrelated to the epoch
        self.handles: list[FakeHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> FakeHandle:
        self.handles.append(FakeHandle(when, callback))
        return self.handles[-1]


def test_timer_converts_epoch_to_loop_time_and_rearms() -> None:
    loop, calls, wall = FakeLoop(), [], [NOW]
    timer = ExpiryTimer(loop, lambda: calls.append(1), lambda: wall[0])
    timer.arm(NOW + 30)
    assert loop.handles[0].when == pytest.approx(530 + EXPIRY_SLACK)
    timer.arm(NOW + 30)  # same expiry: left alone
    assert len(loop.handles) == 1
    timer.arm(NOW + 10)
    assert loop.handles[0].cancelled and loop.handles[1].when == pytest.approx(510 + EXPIRY_SLACK)
    timer.arm(NOW - 5)  # already past: as soon as possible
    assert loop.handles[2].when == pytest.approx(500 + EXPIRY_SLACK)
    timer.arm(None)
    assert loop.handles[2].cancelled
    timer.arm(NOW + 1)
    loop.handles[-1].callback()
    assert calls == [1] and timer.expiry is None


def test_timer_callback_errors_are_contained() -> None:
    loop = FakeLoop()

    def boom() -> None:
        raise RuntimeError("x")

    timer = ExpiryTimer(loop, boom, lambda: NOW)
    timer.arm(NOW)
    loop.handles[0].callback()  # logged, not raised into the loop


def test_expiry_removes_the_forward_and_reloads_outbound(system: System) -> None:
    loop = FakeLoop()
    system.core.start_timer(loop)
    system.set_rules("web", f"{FORWARD} expire={int(NOW) + 60}\naction=drop proto=icmp")
    system.core.refresh()
    assert "/qns-forward/10.137.0.20" in system.vms["sys-firewall"].untrusted_qdb.data
    handle = loop.handles[-1]
    assert handle.when == pytest.approx(loop.now + 60 + EXPIRY_SLACK)
    system.clock[0] = NOW + 60 + EXPIRY_SLACK
    handle.callback()
    assert system.fired == ["web"]
    assert not any(k.startswith("/qns-forward/10.137.0.20")
                   for k in system.vms["sys-firewall"].untrusted_qdb.data)
    assert system.core.timer is not None and system.core.timer.expiry is None


def test_admin_context_errors(system: System) -> None:
    with pytest.raises(errors.QubesVMNotFoundError):
        handle_call(system.core, "admin.vm.firewall.Get", "", "nosuch", b"", NOW)
    del system.vms["sys-firewall"].features[SUPPORT_FEATURE]
    with pytest.raises(errors.QubesValueError, match="sys-firewall"):
        handle_call(system.core, "admin.vm.firewall.Set", "", "web", f"{FORWARD}\n".encode(), NOW)


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (errors.QubesVMNotFoundError("x"), ("QubesVMNotFoundError", ("x",))),
        (errors.QubesValueError("bad"), ("QubesValueError", ("bad",))),
        (errors.QubesException("no"), ("QubesException", ("no",))),
        (errors.ProtocolError("p"), ("ProtocolError", ("p",))),
        (errors.PermissionDenied("d"), ("PermissionDenied", ("d",))),
        (ValueError("other"), None),
    ],
)
def test_upstream_error(err: Exception, expected: object) -> None:
    assert upstream_error(err) == expected


def test_upstream_error_keeps_the_vm_of_a_vm_error() -> None:
    vm = object()
    assert upstream_error(errors.QubesVMError(vm, "m")) == ("QubesVMError", (vm, "m"))


def test_outbound_reader_serves_upstream_entries_for_a_v3_file(system: System) -> None:
    system.set_rules("web", f"{FORWARD}\naction=accept srchost=10.137.0.6\n"
                            "action=accept proto=tcp dstports=443\naction=drop")
    path = Path(system.vms["web"].dir_path) / "firewall.xml"
    assert 'version="3"' in path.read_text()
    entries = OutboundFirewall(system.vms["web"], lambda: NOW).qdb_entries(addr_family=4)
    assert entries["policy"] == "drop"
    assert set(entries) == {"policy", "0002", "0003"}  # forward and inbound leave gaps
    assert entries["0003"] == "action=drop"


def test_outbound_reader_fails_closed(tmp_path: Path) -> None:
    web = FakeVM("web", str(tmp_path / "web"))
    path = tmp_path / "web" / "firewall.xml"
    path.parent.mkdir()
    assert OutboundFirewall(web).qdb_entries() == {"policy": "drop", "0000": "action=accept"}
    path.write_text("<firewall version='9'/>")
    assert OutboundFirewall(web).qdb_entries() == {"policy": "drop"}


class TemplateFeatures(dict[str, str]):
    """qubesd's Features: ``check_with_template`` walks the template chain."""

    def __init__(self, template: FakeVM | None = None, **values: str) -> None:
        super().__init__(values)
        self.template = template

    def check_with_template(self, feature: str, default: object) -> object:
        if feature in self:
            return self[feature]
        if self.template is None:
            return default
        return self.template.features.check_with_template(feature, default)  # type: ignore[attr-defined]


def test_support_feature_of_a_template_based_hop_is_read_from_its_template(
    system: System,
) -> None:
    # qubesd stores supported-feature.* requests of a template-based qube on its template
    template = FakeVM("fedora", "", klass="TemplateVM",
                      features=TemplateFeatures(**{SUPPORT_FEATURE: "1"}))
    for name in ("sys-net", "sys-firewall", "web"):
        system.vms[name].features = TemplateFeatures(template)
    handle_call(system.core, "admin.vm.firewall.Set", "", "web", f"{FORWARD}\n".encode(), NOW)
    system.core.refresh()
    assert "/qns-forward/10.137.0.20" in system.vms["sys-firewall"].untrusted_qdb.data
    # The qube's own value still wins over its template's (qubesd's lookup order).
    system.vms["sys-firewall"].features = TemplateFeatures(template, **{SUPPORT_FEATURE: ""})
    with pytest.raises(errors.QubesValueError, match="sys-firewall"):
        handle_call(system.core, "admin.vm.firewall.Set", "", "web", f"{FORWARD}\n".encode(), NOW)


@pytest.mark.parametrize("method", ["admin.vm.firewall.Get", "admin.vm.firewall.GetPaths",
                                    "admin.vm.firewall.Reload"])
def test_dom0_has_no_firewall(system: System, method: str) -> None:
    with pytest.raises(errors.QubesValueError, match=r"^dom0 has no firewall$"):
        handle_call(system.core, method, "", "dom0", b"", NOW)
    with pytest.raises(errors.QubesValueError, match=r"^dom0 has no firewall$"):
        handle_call(system.core, "admin.vm.firewall.Set", "", "dom0", b"action=drop\n", NOW)


def test_qube_missing_from_the_plan_is_a_one_line_error(system: System, tmp_path: Path) -> None:
    # Found by name (qubesd resolved it) but not among the planned domains
    # (e.g. removed in between): no KeyError traceback.
    (tmp_path / "ghost").mkdir()
    ghost = FakeVM("ghost", str(tmp_path / "ghost"), netvm=system.vms["sys-firewall"],
                   ip=ipaddress.IPv4Address("10.137.0.30"))
    vms = dict(system.vms)
    core = ExtensionCore(
        domains=lambda: list(system.vms.values()),
        lookup={**vms, "ghost": ghost}.__getitem__,
        fire_firewall_changed=lambda v: None,
        clock=lambda: NOW,
    )
    save_firewall_xml(Path(ghost.dir_path) / "firewall.xml", [Rule.from_api_string(FORWARD)], NOW)
    with pytest.raises(errors.QubesVMNotFoundError):
        handle_call(core, "admin.vm.firewall.Set", "", "ghost", f"{FORWARD}\n".encode(), NOW)
    with pytest.raises(errors.QubesVMNotFoundError):
        handle_call(core, "admin.vm.firewall.GetPaths", "", "ghost", b"", NOW)


def _add_vm(system: System, tmp_path: Path, name: str, **kwargs: Any) -> FakeVM:
    (tmp_path / name).mkdir()
    system.vms[name] = FakeVM(name, str(tmp_path / name), **kwargs)
    return system.vms[name]


def test_netvm_change_that_would_share_a_port_is_refused(system: System, tmp_path: Path) -> None:
    system.set_rules("web", FORWARD)  # claims tcp/8443 on sys-firewall and sys-net
    web2 = _add_vm(system, tmp_path, "web2", ip=ipaddress.IPv4Address("10.137.0.21"))
    system.set_rules("web2", FORWARD)
    with pytest.raises(errors.QubesValueError, match=r"8443 on 'sys-net' is wanted by both"):
        system.core.check_netvm_change(web2, system.vms["sys-net"])
    system.core.check_netvm_change(web2, None)  # disconnecting never conflicts
    # A netvm with no port in common is fine.
    other = _add_vm(system, tmp_path, "sys-net2", ip=ipaddress.IPv4Address("10.137.0.7"),
                    provides_network=True)
    system.core.check_netvm_change(web2, other)
    system.core.check_netvm_change(web2, "sys-net2")  # a name, as older qubesd may pass


def test_moving_a_hop_checks_the_forwards_behind_it(system: System, tmp_path: Path) -> None:
    system.set_rules("web", FORWARD)
    fw2 = _add_vm(system, tmp_path, "sys-firewall2", ip=ipaddress.IPv4Address("10.137.0.8"),
                  provides_network=True)
    _add_vm(system, tmp_path, "web2", netvm=fw2, ip=ipaddress.IPv4Address("10.137.0.21"))
    system.set_rules("web2", FORWARD)
    with pytest.raises(errors.QubesValueError, match="'web2'"):
        system.core.check_netvm_change(fw2, system.vms["sys-net"])


def test_an_existing_conflict_elsewhere_does_not_block_an_unrelated_change(
    system: System, tmp_path: Path,
) -> None:
    system.set_rules("web", FORWARD)
    _add_vm(system, tmp_path, "web2", netvm=system.vms["sys-firewall"],
            ip=ipaddress.IPv4Address("10.137.0.21"))
    system.set_rules("web2", FORWARD)  # written behind the API's back: already a conflict
    lone = _add_vm(system, tmp_path, "lone", ip=ipaddress.IPv4Address("10.137.0.22"))
    system.core.check_netvm_change(lone, system.vms["sys-net"])


class SoonLoop(FakeLoop):
    """FakeLoop that also queues ``call_soon`` callbacks (run when the loop starts)."""

    def __init__(self) -> None:
        super().__init__()
        self.soon: list[Any] = []

    def call_soon(self, callback: Any) -> FakeHandle:
        self.soon.append(callback)
        return FakeHandle(self.now, callback)


def test_load_schedules_one_startup_refresh_that_reconciles_and_arms_expiry(
    system: System,
) -> None:
    # qubesd restarted: a rule expired while it was down, another expires later
    system.set_rules("web", f"{FORWARD} expire={int(NOW) - 10}\n"
                            "action=forward forwardtype=external proto=tcp srcports=2222 "
                            f"dstports=22 expire={int(NOW) + 60}")
    stale = system.vms["sys-firewall"].untrusted_qdb
    stale.data.update({"/qns-forward/10.137.0.20/0000": "left by the old qubesd",
                       "/qns-forward/10.137.0.20": ""})
    loop = SoonLoop()
    for vm in system.vms.values():  # domain-load fires on every qube
        system.core.on_load(vm, loop)
    assert len(loop.soon) == 1 and loop.handles == []
    loop.soon[0]()  # the loop starts
    entries = stale.data
    assert "left by the old qubesd" not in entries.values()
    assert any("2222" in value for value in entries.values())
    assert system.core.timer is not None and system.core.timer.expiry == int(NOW) + 60
    assert loop.handles[-1].when == pytest.approx(loop.now + 60 + EXPIRY_SLACK)


@dataclass
class EventVM(FakeVM):
    events: list[str] = field(default_factory=list)

    def fire_event(self, event: str, **kwargs: Any) -> None:
        self.events.append(event)


ALL_KINDS = f"{FORWARD}\naction=accept srchost=10.137.0.6\naction=accept proto=tcp dstports=443\n" \
    "action=drop"


def test_one_firewall_object_per_qube(system: System) -> None:
    web = system.vms["web"]
    assert firewall_for(web) is firewall_for(web)
    assert firewall_for(web) is not firewall_for(system.vms["sys-net"])


def test_clone_for_a_disposable_copies_every_rule_kind_and_saves_later(
    system: System, tmp_path: Path,
) -> None:
    system.set_rules("web", ALL_KINDS)  # web is the disposable template here
    disp = EventVM("disp1234", str(tmp_path / "disp1234"), netvm=system.vms["sys-firewall"],
                   ip=ipaddress.IPv4Address("10.138.4.210"))
    # DispVM.__init__: self.firewall.clone(template.firewall), before its directory exists
    firewall_for(disp).clone(firewall_for(system.vms["web"]))
    assert not Path(disp.dir_path).exists()
    assert [r.api_rule for r in firewall_for(disp).rules] == \
        [r.api_rule for r in firewall_for(system.vms["web"]).rules]
    assert [r.api_rule for r in read_rules(disp)] == [r.api_rule for r in firewall_for(disp).rules]
    entries = firewall_for(disp).qdb_entries(addr_family=4)
    assert entries == {"policy": "drop", "0002": "action=accept proto=tcp dstports=443-443",
                       "0003": "action=drop"}  # not upstream's default accept-all
    Path(disp.dir_path).mkdir()
    firewall_for(disp).save()
    saved = Path(disp.dir_path) / "firewall.xml"
    assert 'version="3"' in saved.read_text()
    template_rules = read_rules(system.vms["web"])
    assert [r.api_rule for r in read_rules(disp)] == [r.api_rule for r in template_rules]
    assert disp.events == ["firewall-changed"]


def test_clone_onto_an_existing_qube_saves_at_once(system: System, tmp_path: Path) -> None:
    system.set_rules("web", ALL_KINDS)
    copy = EventVM("copy", str(tmp_path / "copy"))
    Path(copy.dir_path).mkdir()
    firewall_for(copy).clone(firewall_for(system.vms["web"]))
    assert len(read_rules(copy)) == 4 and (Path(copy.dir_path) / "firewall.xml").exists()
    # A later Set writes firewall.xml directly: the file wins over anything held in memory.
    system.vms["copy"] = copy
    handle_call(system.core, "admin.vm.firewall.Set", "", "copy", b"action=drop\n", NOW)
    assert [r.api_rule for r in firewall_for(copy).rules] == ["action=drop"]


def test_clone_of_an_unreadable_firewall_refuses_instead_of_accepting_all(
    system: System, tmp_path: Path,
) -> None:
    (Path(system.vms["web"].dir_path) / "firewall.xml").write_text("garbage")
    disp = EventVM("disp1", str(tmp_path / "disp1"))
    with pytest.raises(errors.QubesVMError):
        firewall_for(disp).clone(firewall_for(system.vms["web"]))
    Path(disp.dir_path).mkdir()
    assert not (Path(disp.dir_path) / "firewall.xml").exists()


def test_routing_method_set_on_the_template_counts(system: System) -> None:
    # As Rudd-O's extension reads it: check_with_template, the qube's own value first.
    template = FakeVM("fedora", "", klass="TemplateVM",
                      features=TemplateFeatures(**{"routing-method": "forward"}))
    web = system.vms["web"]
    web.features = TemplateFeatures(template, **{SUPPORT_FEATURE: "1"})
    web.ip = ipaddress.IPv4Address("192.0.2.25")
    system.core.refresh()
    assert "/qns-routing/192.0.2.25" in system.vms["sys-net"].untrusted_qdb.data
    web.features = TemplateFeatures(template, **{SUPPORT_FEATURE: "1", "routing-method": ""})
    system.core.refresh()
    assert "/qns-routing/192.0.2.25" not in system.vms["sys-net"].untrusted_qdb.data
    assert "domain-feature-set:routing-method" in REPLAN_EVENTS
    assert "domain-feature-delete:routing-method" in REPLAN_EVENTS
