"""extension.py, the qubes-importing shell, loaded against a minimal fake ``qubes``.

Real qubesd cannot run here; these fakes restate only the upstream API the
shell relies on (qubes.ext.Extension/handler, qubes.api.method, QubesAdminAPI
method lookup by attribute, qubes.exc names), to check the wiring: handlers
registered for the right events, Admin API methods replaced and added, our
errors re-raised as qubes.exc ones.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from core_admin_patch.extension_core import APP_EVENTS, REPLAN_EVENTS
from core_admin_patch.planner import SUPPORT_FEATURE
from firewall_rules import Rule, save_firewall_xml


class _Exc(Exception):
    pass


def _fake_qubes() -> dict[str, types.ModuleType]:
    qubes = types.ModuleType("qubes")
    ext = types.ModuleType("qubes.ext")
    api = types.ModuleType("qubes.api")
    admin = types.ModuleType("qubes.api.admin")
    exc = types.ModuleType("qubes.exc")
    vm = types.ModuleType("qubes.vm")
    mix = types.ModuleType("qubes.vm.mix")
    net = types.ModuleType("qubes.vm.mix.net")

    class Extension:
        pass

    def handler(*events: str, **kwargs: Any) -> Any:
        def decorator(func: Any) -> Any:
            func.ha_events, func.ha_system = events, kwargs.get("system", False)
            return func
        return decorator

    def method(name: str, *, dest_adminvm: Any, wants_arg: Any, wants_payload: Any,
               scope: Any = None, read: bool = True, write: bool = False,
               execute: bool = False) -> Any:
        def decorator(func: Any) -> Any:
            func.rpcnames = ((name, None),)
            func.api_wants_payload = wants_payload
            return func
        return decorator

    class QubesAdminAPI:
        async def vm_firewall_get(self) -> str:  # upstream's, to be replaced
            return "upstream"

    for name in ("QubesException", "QubesValueError", "QubesVMNotFoundError", "ProtocolError",
                 "PermissionDenied"):
        setattr(exc, name, type(name, (_Exc,), {}))

    class QubesVMError(_Exc):
        def __init__(self, vm: Any, msg: str) -> None:
            super().__init__(msg)
            self.vm = vm

    exc.QubesVMError = QubesVMError  # type: ignore[attr-defined]

    class NetVMMixin:
        pass

    ext.Extension, ext.handler = Extension, handler  # type: ignore[attr-defined]
    api.method = method  # type: ignore[attr-defined]
    admin.QubesAdminAPI = QubesAdminAPI  # type: ignore[attr-defined]
    net.NetVMMixin = NetVMMixin  # type: ignore[attr-defined]
    qubes.ext, qubes.api, qubes.exc, qubes.vm = ext, api, exc, vm  # type: ignore[attr-defined]
    api.admin, vm.mix, mix.net = admin, mix, net  # type: ignore[attr-defined]
    return {m.__name__: m for m in (qubes, ext, api, admin, exc, vm, mix, net)}


@pytest.fixture
def shell(monkeypatch: pytest.MonkeyPatch) -> Any:
    for name, module in _fake_qubes().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "core_admin_patch.extension", raising=False)
    module = importlib.import_module("core_admin_patch.extension")
    yield module
    sys.modules.pop("core_admin_patch.extension", None)


class FakeVM:
    def __init__(self, name: str, dir_path: Path, app: Any) -> None:
        self.name, self.dir_path, self.app = name, str(dir_path), app
        self.firewall_conf = "firewall.xml"
        self.netvm = None
        self.ip = None
        self.provides_network = False
        self.features: dict[str, str] = {}
        self.events: list[str] = []

    def is_running(self) -> bool:
        return False

    def fire_event(self, event: str, **kwargs: Any) -> None:
        self.events.append(event)


class FakeApp:
    def __init__(self, tmp_path: Path) -> None:
        (tmp_path / "web").mkdir()
        self.web = FakeVM("web", tmp_path / "web", self)
        self.domains = {"web": self.web}

    def __iter__(self) -> Any:
        return iter(self.domains.values())


class FakeAPI:
    def __init__(self, app: FakeApp, dest: str, arg: str = "") -> None:
        self.app, self.arg = app, arg
        self.dest = app.domains[dest]  # qubesd resolved it before calling
        self.permission_checked = False
        self.permission_kwargs: list[dict[str, Any]] = []

    def fire_event_for_permission(self, **kwargs: Any) -> None:
        self.permission_checked = True
        self.permission_kwargs.append(kwargs)


def test_handlers_cover_the_event_sets(shell: Any) -> None:
    cls = shell.NetworkServerExtension
    assert set(cls.on_domain_event.ha_events) == REPLAN_EVENTS
    assert not cls.on_domain_event.ha_system
    assert set(cls.on_app_event.ha_events) == APP_EVENTS
    assert cls.on_app_event.ha_system


def test_api_methods_replaced_and_added(shell: Any, tmp_path: Path) -> None:
    shell.NetworkServerExtension()
    api_cls = sys.modules["qubes.api.admin"].QubesAdminAPI
    names = {a: getattr(api_cls, a).rpcnames[0][0] for a in dir(api_cls) if a.startswith("vm_")}
    assert names == {
        "vm_firewall_get": "admin.vm.firewall.Get",
        "vm_firewall_set": "admin.vm.firewall.Set",
        "vm_firewall_reload": "admin.vm.firewall.Reload",
        "vm_firewall_getpaths": "admin.vm.firewall.GetPaths",
        "vm_firewall_getrouting": "admin.vm.firewall.GetRouting",
    }
    app = FakeApp(tmp_path)
    app_ns = types.SimpleNamespace(domains=_Domains(app))
    call = FakeAPI(app_ns, "web")  # type: ignore[arg-type]
    reply = asyncio.run(api_cls.vm_firewall_set(call, b"action=accept srchost=10.137.0.6\n"))
    assert reply == "" and call.permission_checked
    assert app.web.events == ["firewall-changed"]
    got = asyncio.run(api_cls.vm_firewall_get(FakeAPI(app_ns, "web"), b""))  # type: ignore[arg-type]
    assert got.startswith("action=accept srchost=10.137.0.6")
    forward = Rule.from_api_string(
        "action=forward forwardtype=internal proto=tcp srcports=80 dstports=80"
    )
    save_firewall_xml(tmp_path / "web" / "firewall.xml", [forward], 0)
    paths = asyncio.run(
        api_cls.vm_firewall_getpaths(FakeAPI(app_ns, "web"), b"")  # type: ignore[arg-type]
    )
    assert paths.startswith("0 not reachable: ")  # web has no netvm here


def test_our_errors_become_qubes_exc(shell: Any, tmp_path: Path) -> None:
    shell.NetworkServerExtension()
    app = FakeApp(tmp_path)
    app_ns = types.SimpleNamespace(domains=_Domains(app))
    api_cls = sys.modules["qubes.api.admin"].QubesAdminAPI
    exc = sys.modules["qubes.exc"]
    with pytest.raises(exc.QubesValueError):
        asyncio.run(api_cls.vm_firewall_set(FakeAPI(app_ns, "web"), b"action=bogus\n"))  # type: ignore[arg-type]
    with pytest.raises(exc.ProtocolError):
        asyncio.run(api_cls.vm_firewall_get(FakeAPI(app_ns, "web", arg="x"), b""))  # type: ignore[arg-type]
    (tmp_path / "web" / "firewall.xml").write_text("garbage")
    with pytest.raises(exc.QubesVMError) as info:
        asyncio.run(api_cls.vm_firewall_get(FakeAPI(app_ns, "web"), b""))  # type: ignore[arg-type]
    assert info.value.vm is app.web


def test_vm_firewall_is_our_reader(shell: Any, tmp_path: Path) -> None:
    shell.NetworkServerExtension()
    app = FakeApp(tmp_path)
    net_mixin = sys.modules["qubes.vm.mix.net"].NetVMMixin
    entries = net_mixin.firewall.fget(app.web).qdb_entries(addr_family=4)
    assert entries == {"policy": "drop", "0000": "action=accept"}
    # One object per qube (DispVM.__init__ calls clone() on it, then it must still hold the rules)
    assert net_mixin.firewall.fget(app.web) is net_mixin.firewall.fget(app.web)
    disp = FakeVM("disp1", tmp_path / "disp1", app)
    net_mixin.firewall.fget(disp).clone(net_mixin.firewall.fget(app.web))
    assert net_mixin.firewall.fget(disp).rules[0].api_rule == "action=accept"


class _Domains:
    """app.domains: iterable of VMs, indexable by name (KeyError if none)."""

    def __init__(self, app: FakeApp) -> None:
        self._app = app

    def __iter__(self) -> Any:
        return iter(self._app.domains.values())

    def __getitem__(self, name: str) -> FakeVM:
        return self._app.domains[name]


def test_set_parses_then_fires_permission_with_the_rules(shell: Any, tmp_path: Path) -> None:
    shell.NetworkServerExtension()
    app = FakeApp(tmp_path)
    app_ns = types.SimpleNamespace(domains=_Domains(app))
    api_cls = sys.modules["qubes.api.admin"].QubesAdminAPI
    exc = sys.modules["qubes.exc"]
    call = FakeAPI(app_ns, "web")  # type: ignore[arg-type]
    asyncio.run(api_cls.vm_firewall_set(call, b"action=accept srchost=10.137.0.6\naction=drop\n"))
    assert len(call.permission_kwargs) == 1  # one parse, one permission event
    rules = call.permission_kwargs[0]["rules"]
    assert [rule.api_rule for rule in rules] == ["action=accept srchost=10.137.0.6/32",
                                                "action=drop"]
    # A payload that does not parse is refused before any permission event (as upstream).
    bad = FakeAPI(app_ns, "web")  # type: ignore[arg-type]
    with pytest.raises(exc.QubesValueError):
        asyncio.run(api_cls.vm_firewall_set(bad, b"action=bogus\n"))
    assert bad.permission_kwargs == []
    # Refused by a permission handler: nothing is saved.
    def deny(**kwargs: Any) -> None:
        raise exc.PermissionDenied("no")

    denied = FakeAPI(app_ns, "web")  # type: ignore[arg-type]
    denied.fire_event_for_permission = deny  # type: ignore[method-assign]
    with pytest.raises(exc.PermissionDenied):
        asyncio.run(api_cls.vm_firewall_set(denied, b"action=drop\n"))
    got = asyncio.run(api_cls.vm_firewall_get(FakeAPI(app_ns, "web"), b""))  # type: ignore[arg-type]
    assert got.startswith("action=accept srchost=10.137.0.6")
    # Other methods fire it without arguments.
    get = FakeAPI(app_ns, "web")  # type: ignore[arg-type]
    asyncio.run(api_cls.vm_firewall_get(get, b""))
    assert get.permission_kwargs == [{}]


def test_netvm_pre_set_refuses_a_shared_port(shell: Any, tmp_path: Path) -> None:
    ext = shell.NetworkServerExtension()
    assert ext.on_netvm_pre_set.ha_events == ("property-pre-set:netvm",)
    app = FakeApp(tmp_path)
    app_ns = types.SimpleNamespace(domains=_Domains(app))
    forward = Rule.from_api_string(
        "action=forward forwardtype=external proto=tcp srcports=8443 dstports=443"
    )
    vms = {}
    for name, ip in (("net", "10.137.0.5"), ("web", "10.137.0.20"), ("web2", "10.137.0.21")):
        (tmp_path / name).mkdir(exist_ok=True)
        vm = FakeVM(name, tmp_path / name, app_ns)
        vm.ip = ip  # type: ignore[assignment]
        vm.features = {SUPPORT_FEATURE: "1"}
        app.domains[name] = vms[name] = vm
    vms["net"].provides_network = True
    vms["web"].netvm = vms["net"]  # type: ignore[assignment]
    for name in ("web", "web2"):
        save_firewall_xml(tmp_path / name / "firewall.xml", [forward], 0)
    exc = sys.modules["qubes.exc"]
    with pytest.raises(exc.QubesValueError, match="is wanted by both 'web'"):
        ext.on_netvm_pre_set(vms["web2"], "property-pre-set:netvm", name="netvm",
                             newvalue=vms["net"], oldvalue=None)
    ext.on_netvm_pre_set(vms["web2"], "property-pre-set:netvm", name="netvm", newvalue=None)
    # Back to the default netvm (qvm-prefs -D web2 netvm) is checked the same way.
    assert ext.on_netvm_pre_reset.ha_events == ("property-pre-reset:netvm",)
    vms["web2"].property_get_default = {"netvm": vms["net"]}.get  # type: ignore[attr-defined]
    with pytest.raises(exc.QubesValueError, match="is wanted by both 'web'"):
        ext.on_netvm_pre_reset(vms["web2"], "property-pre-reset:netvm", name="netvm")
    vms["web2"].property_get_default = {"netvm": None}.get  # type: ignore[attr-defined]
    ext.on_netvm_pre_reset(vms["web2"], "property-pre-reset:netvm", name="netvm")


def test_domain_load_replans_once_qubesd_loop_runs(shell: Any, tmp_path: Path) -> None:
    ext = shell.NetworkServerExtension()
    assert ext.on_domain_load.ha_events == ("domain-load",)
    app = FakeApp(tmp_path)
    app_ns = types.SimpleNamespace(domains=_Domains(app))
    app.web.app = app_ns
    expire = 4_000_000_000
    rule = Rule.from_api_string(
        f"action=forward forwardtype=external proto=tcp srcports=80 dstports=80 expire={expire}"
    )
    save_firewall_xml(tmp_path / "web" / "firewall.xml", [rule], 0)
    # qubesd's main() sets its loop, then loads qubes.xml (domain-load), then runs the loop.
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        ext.on_domain_load(app.web, "domain-load")
        ext.on_domain_load(app.web, "domain-load")
        core = shell.NetworkServerExtension._core
        assert core.timer is not None and core.timer.expiry is None  # nothing ran yet
        loop.run_until_complete(asyncio.sleep(0))
        assert core.timer.expiry == expire  # the startup re-plan armed the expiry timer
    finally:
        asyncio.set_event_loop(None)
        loop.close()
