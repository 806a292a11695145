"""The qubesd extension's decisions, with stand-ins for qubesd's VMs (no ``qubes``).

A VM's ``firewall`` here holds our own Rule objects where qubesd holds
upstream's (both carry ``api_rule``); test_extension_shell.py runs the
extension inside the real upstream qubesd code.
"""

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
    QDB_RESET_EVENTS,
    REPLAN_EVENTS,
    ExtensionCore,
    our_rules,
    save_lists,
    stored_lists,
    upstream_error,
)
from core_admin_patch.network_server import EXPIRY_SLACK, ExpiryTimer
from core_admin_patch.planner import SUPPORT_FEATURE
from firewall_rules import Rule, RuleKind, RuleLists, load_firewall_xml

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

    def read(self, path: str) -> bytes | None:
        if self.broken:
            raise OSError("qubesdb gone")
        value = self.data.get(path)
        return None if value is None else value.encode()


class FakeFirewall:
    """``vm.firewall`` as extension.NetworkServerFirewall is to the core: three lists, save()."""

    def __init__(self, vm: FakeVM) -> None:
        self.vm = vm
        lists = stored_lists(vm)  # type: ignore[arg-type]
        self.rules: list[Any] = list(lists.outbound)
        self.forward_rules, self.inbound_rules = list(lists.forward), list(lists.inbound)

    def save(self) -> None:
        save_lists(self.vm, self, self.vm.clock[0])  # type: ignore[arg-type]
        self.vm.fire_event("firewall-changed")


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
    clock: list[float] = field(default_factory=lambda: [NOW])
    fired: list[str] = field(default_factory=list)
    _firewall: FakeFirewall | None = None

    def is_running(self) -> bool:
        return self.running

    @property
    def firewall(self) -> FakeFirewall:
        if self._firewall is None:
            self._firewall = FakeFirewall(self)
        return self._firewall

    def fire_event(self, event: str, **kwargs: Any) -> None:
        self.fired.append(event)


@dataclass
class System:
    vms: dict[str, FakeVM]
    clock: list[float]
    core: ExtensionCore

    def set_rules(self, name: str, text: str) -> None:
        """Rules written behind the API's back, as a restored or hand-edited file."""
        vm = self.vms[name]
        firewall = vm.firewall
        lists = RuleLists.sorted_out(Rule.from_api_string(line) for line in text.splitlines())
        firewall.rules = list(lists.outbound)
        firewall.forward_rules, firewall.inbound_rules = list(lists.forward), list(lists.inbound)
        save_lists(vm, firewall, self.clock[0])  # type: ignore[arg-type]

    @property
    def fired(self) -> list[str]:
        """Qubes that got firewall-changed, in order."""
        return [vm.name for vm in self.vms.values() for _ in vm.fired]


@pytest.fixture
def system(tmp_path: Path) -> System:
    clock = [NOW]

    def vm(name: str, **kwargs: Any) -> FakeVM:
        (tmp_path / name).mkdir()
        return FakeVM(name, str(tmp_path / name), clock=clock, **kwargs)

    net = vm("sys-net", ip=ipaddress.IPv4Address("10.137.0.5"), provides_network=True)
    fw = vm("sys-firewall", netvm=net, ip=ipaddress.IPv4Address("10.137.0.6"),
            provides_network=True)
    web = vm("web", netvm=fw, ip=ipaddress.IPv4Address("10.137.0.20"))
    dom0 = FakeVM("dom0", None, klass="AdminVM")  # type: ignore[arg-type]  # as qubesd
    vms = {v.name: v for v in (dom0, net, fw, web)}
    core = ExtensionCore(
        domains=lambda: list(vms.values()), lookup=vms.__getitem__, clock=lambda: clock[0]
    )
    return System(vms, clock, core)


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
    assert [vm.name for vm in system.core.domains()] == ["sys-net", "sys-firewall", "web"]


def api(system: System, method: str, arg: str, qube: str, payload: str = "") -> bytes:
    return handle_call(system.core.server, method, arg, qube, payload.encode(), NOW)


def test_set_forward_saves_through_vm_firewall_and_writes_every_hop(system: System) -> None:
    web = system.vms["web"]
    web.firewall.rules = [Rule.from_api_string("action=drop")]  # upstream's, in memory
    api(system, "admin.vm.firewall.Set", "forward", "web", f"{FORWARD}\n")
    assert web.fired == ["firewall-changed"]  # upstream's outbound path and our re-plan follow
    # vm.firewall.save() wrote the outbound list it holds and the new forward list, together
    assert load_firewall_xml(Path(web.dir_path) / "firewall.xml") == RuleLists(
        (Rule.from_api_string("action=drop"),), (Rule.from_api_string(FORWARD),)
    )
    system.core.on_domain_event(web, "firewall-changed")
    assert "/qns-forward/10.137.0.20" in system.vms["sys-firewall"].untrusted_qdb.data
    assert "/qns-forward/10.137.0.20" in system.vms["sys-net"].untrusted_qdb.data
    assert "/qns-input" in web.untrusted_qdb.data
    paths = api(system, "admin.vm.firewall.GetPaths", "", "web")
    assert paths.startswith(b"0 sys-net uplink addresses tcp/8443 -> sys-firewall")
    assert api(system, "admin.vm.firewall.Get", "forward", "web") == (
        f"{Rule.from_api_string(FORWARD).api_rule}\n".encode()
    )


def test_outbound_rules_are_upstreams_to_store(system: System) -> None:
    with pytest.raises(errors.ProtocolError, match="upstream's own Set"):
        system.core.store_rules(system.vms["web"], RuleKind.OUTBOUND, [])


def test_read_rules_is_what_vm_firewall_holds_in_memory(system: System) -> None:
    """A new DispVM's rules were cloned into its firewall object, not saved yet."""
    web = system.vms["web"]
    web.firewall.rules = [Rule.from_api_string("action=drop proto=icmp")]
    assert system.core.read_rules(web).outbound == (Rule.from_api_string("action=drop proto=icmp"),)
    assert not (Path(web.dir_path) / "firewall.xml").exists()


class ExpiredUpstreamRule:
    """An upstream Rule whose expire has passed: its api_rule is None."""

    api_rule = None


def test_expired_upstream_rules_are_left_out_not_a_crash(system: System) -> None:
    web = system.vms["web"]
    web.firewall.rules = [ExpiredUpstreamRule(), Rule.from_api_string("action=drop")]
    assert our_rules(web.firewall.rules) == (Rule.from_api_string("action=drop"),)
    system.core.on_expiry()
    web.firewall.save()
    assert load_firewall_xml(Path(web.dir_path) / "firewall.xml").outbound == (
        Rule.from_api_string("action=drop"),
    )


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


def test_expiry_removes_the_forward(system: System) -> None:
    loop = FakeLoop()
    system.core.start_timer(loop)
    system.set_rules("web", f"{FORWARD} expire={int(NOW) + 60}\naction=drop proto=icmp")
    system.core.refresh()
    assert "/qns-forward/10.137.0.20" in system.vms["sys-firewall"].untrusted_qdb.data
    handle = loop.handles[-1]
    assert handle.when == pytest.approx(loop.now + 60 + EXPIRY_SLACK)
    system.clock[0] = NOW + 60 + EXPIRY_SLACK
    handle.callback()
    assert system.fired == []  # no outbound rule expired: upstream's entries stay as they are
    assert not any(k.startswith("/qns-forward/10.137.0.20")
                   for k in system.vms["sys-firewall"].untrusted_qdb.data)
    assert system.core.timer is not None and system.core.timer.expiry is None


def test_an_expired_outbound_rule_has_upstream_rewrite_its_entries(system: System) -> None:
    loop = FakeLoop()
    system.core.start_timer(loop)
    system.set_rules("web", f"action=accept proto=tcp expire={int(NOW) + 60}\naction=drop")
    system.core.refresh()
    system.clock[0] = NOW + 60 + EXPIRY_SLACK
    loop.handles[-1].callback()
    assert system.fired == ["web"]  # upstream's firewall-changed handler leaves it out


def test_admin_context_errors(system: System) -> None:
    with pytest.raises(errors.QubesVMNotFoundError):
        api(system, "admin.vm.firewall.Get", "forward", "nosuch")
    del system.vms["sys-firewall"].features[SUPPORT_FEATURE]
    with pytest.raises(errors.QubesValueError, match="sys-firewall"):
        api(system, "admin.vm.firewall.Set", "forward", "web", f"{FORWARD}\n")


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
    api(system, "admin.vm.firewall.Set", "forward", "web", f"{FORWARD}\n")
    system.core.refresh()
    assert "/qns-forward/10.137.0.20" in system.vms["sys-firewall"].untrusted_qdb.data
    # The qube's own value still wins over its template's (qubesd's lookup order).
    system.vms["sys-firewall"].features = TemplateFeatures(template, **{SUPPORT_FEATURE: ""})
    with pytest.raises(errors.QubesValueError, match="sys-firewall"):
        api(system, "admin.vm.firewall.Set", "forward", "web", f"{FORWARD}\n")


@pytest.mark.parametrize(("method", "arg"), [("admin.vm.firewall.Get", "forward"),
                                           ("admin.vm.firewall.GetPaths", "")])
def test_dom0_has_no_firewall(system: System, method: str, arg: str) -> None:
    with pytest.raises(errors.QubesValueError, match=r"^dom0 has no firewall$"):
        api(system, method, arg, "dom0")
    with pytest.raises(errors.QubesValueError, match=r"^dom0 has no firewall$"):
        api(system, "admin.vm.firewall.Set", "inbound", "dom0", "")


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
        clock=lambda: NOW,
    )
    ghost.firewall.forward_rules = [Rule.from_api_string(FORWARD)]
    with pytest.raises(errors.QubesVMNotFoundError):
        handle_call(core.server, "admin.vm.firewall.Set", "forward", "ghost",
                    f"{FORWARD}\n".encode(), NOW)
    with pytest.raises(errors.QubesVMNotFoundError):
        handle_call(core.server, "admin.vm.firewall.GetPaths", "", "ghost", b"", NOW)


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


def test_get_routing_reads_each_hops_report_from_its_qubesdb(system: System) -> None:
    web = system.vms["web"]
    web.features = {SUPPORT_FEATURE: "1", "routing-method": "forward"}
    web.ip = ipaddress.IPv4Address("192.0.2.25")
    system.vms["sys-net"].untrusted_qdb.data["/qns-routing_status/192.0.2.25"] = (
        "state=exposed iface=eth0"
    )
    system.vms["sys-firewall"].untrusted_qdb.broken = True  # a hop going down
    assert api(system, "admin.vm.firewall.GetRouting", "", "web") == (
        b"192.0.2.25: LAN -> sys-net -> sys-firewall -> web\n"
        b"  sys-net: exposed on eth0, answering for the address\n"
        b"  sys-firewall: no report yet\n"
    )
    assert api(system, "admin.vm.firewall.GetRouting", "", "sys-net") == b""


def test_get_paths_reads_each_hops_refusal_from_its_qubesdb(system: System) -> None:
    """As GetRouting: the hop's report read from its QubesDB, shown only in dom0's words."""
    api(system, "admin.vm.firewall.Set", "forward", "web", f"{FORWARD}\n")
    path = (b"0 sys-net uplink addresses tcp/8443 -> sys-firewall (10.137.0.6) tcp/8443"
            b" -> web (10.137.0.20) tcp/443")
    assert api(system, "admin.vm.firewall.GetPaths", "", "web") == path + b"\n"
    net = system.vms["sys-net"]
    report = "/qns-forward_refused/10.137.0.20"
    net.untrusted_qdb.data[report] = "tcp 8443-8443: its user opened it in custom-input"
    assert api(system, "admin.vm.firewall.GetPaths", "", "web") == path + (
        b"; REFUSED by sys-net: tcp/8443 is its own (its user opened it in custom-input)\n"
    )
    net.untrusted_qdb.data[report] = "tcp 8443-8443: \x1b]0;owned\x07 its user opened it"
    assert api(system, "admin.vm.firewall.GetPaths", "", "web") == path + (
        b"; sys-net may have refused it: its report is unreadable\n"
    )
    net.untrusted_qdb.broken = True  # going down: no report, the path alone
    assert api(system, "admin.vm.firewall.GetPaths", "", "web") == path + b"\n"
