"""The Qubes packages, built as ``make rpm`` and ``make deb`` build them, then opened and tried.

A module fixture runs packaging/build.py once. The tests read what is
inside each package (files, owners, modes, units, entry points, man page,
scriptlets) and check it against what the lab runs and against upstream's
own files; they evaluate the qrexec policy with upstream's parser, run the
rpm scriptlets with a recording ``systemctl``, and install and remove both
template packages in an overlay of this Debian system: the deb next to
stand-ins for upstream's packages (which need Qubes' repositories), the rpm
through a real rpm transaction.
"""

from __future__ import annotations

import configparser
import contextlib
import gzip
import hashlib
import io
import json
import modulefinder
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, cannot_run, upstream_dir

from lab.dom0 import FIREWALL, INPUT_HOOK

BUILD = REPO / "packaging" / "build.py"
RPM_SITELIB = "/usr/lib/python3.13/site-packages"
DEB_SITELIB = "/usr/lib/python3/dist-packages"
UNITDIR = "/usr/lib/systemd/system"
DROP_IN = f"{UNITDIR}/qubes-firewall.service.d/30_qubes-network-server.conf"
INPUT_UNIT = "qubes-network-server-input.service"
POST_INSTALL = "/etc/qubes/post-install.d/50-qubes-network-server.sh"
POLICY = "/etc/qubes/policy.d/85-qubes-network-server.policy"
POLICY_INCLUDE = "/etc/qubes/policy.d/include/admin-network-server-rwx"
FEATURE = "supported-feature.qubes-network-server"
PROJECT = ("firewall_rules", "core_admin_patch", "admin_client_patch", "agent_worker", "lab")


@dataclass(frozen=True)
class Built:
    dom0: Path
    fedora: Path
    debian: Path


@dataclass(frozen=True)
class Entry:
    """One member of a package payload."""

    mode: int
    user: str
    group: str
    data: bytes


def tar_entries(archive: bytes) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar:
            path = "/" + member.name.removeprefix("./").rstrip("/")
            if path == "/":
                continue
            data = tar.extractfile(member).read() if member.isfile() else b""  # type: ignore[union-attr]
            kind = stat.S_IFDIR if member.isdir() else stat.S_IFREG
            entries[path] = Entry(kind | member.mode, member.uname, member.gname, data)
    return entries


def output(argv: list[str], **kwargs: object) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs).stdout  # type: ignore[call-overload]


def rpm_payload(rpm: Path) -> dict[str, Entry]:
    with rpm.open("rb") as stream:
        archive = subprocess.run(["rpm2archive", "-"], stdin=stream, check=True,
                                 capture_output=True).stdout
    return tar_entries(archive)


def deb_payload(deb: Path) -> dict[str, Entry]:
    return tar_entries(subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                                      capture_output=True).stdout)


def rpm_tag(rpm: Path, query: str) -> str:
    return output(["rpm", "-qp", "--qf", query, str(rpm)])


def entry_points(payload: dict[str, Entry], sitelib: str) -> configparser.ConfigParser:
    [path] = [p for p in payload
              if p.startswith(sitelib) and p.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(payload[path].data.decode())
    return parser


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    for tool in ("rpmbuild", "rpm2archive", "dpkg-deb"):
        if shutil.which(tool) is None:
            cannot_run(f"{tool} is missing: scripts/install-deps installs it")
    out = tmp_path_factory.mktemp("packages")
    made: list[Path] = []
    for kind in ("rpm", "deb"):
        made += [Path(line) for line in output(
            [sys.executable, str(BUILD), kind, "--out", str(out)], cwd=REPO).split()]
    [dom0] = [p for p in made if p.name.startswith("qubes-network-server-dom0-")]
    [fedora] = [p for p in made if p.name.startswith("qubes-network-server-agent-")]
    [debian] = [p for p in made if p.suffix == ".deb"]
    return Built(dom0, fedora, debian)


# --- what is inside -------------------------------------------------------


def test_dom0_package_holds_extension_client_man_page_and_policy(built: Built) -> None:
    payload = rpm_payload(built.dom0)
    client = payload["/usr/bin/qvm-firewall-ns"]
    assert (client.mode, client.user, client.group) == (stat.S_IFREG | 0o755, "root", "root")
    assert b"from admin_client_patch.qvm_firewall import main" in client.data
    assert client.data.startswith(b"#!/usr/bin/python3 ")
    points = entry_points(payload, RPM_SITELIB)
    assert dict(points["qubes.ext"]) == {
        "qubes_network_server": "core_admin_patch.extension:NetworkServerExtension"}
    assert dict(points["console_scripts"]) == {
        "qvm-firewall-ns": "admin_client_patch.qvm_firewall:main",
        "qubes-network-server-settings": "admin_client_patch.gui.standalone:main"}
    settings = payload["/usr/bin/qubes-network-server-settings"]
    assert b"from admin_client_patch.gui.standalone import main" in settings.data
    tops = {p.removeprefix(RPM_SITELIB + "/").split("/")[0]
            for p in payload if p.startswith(RPM_SITELIB + "/")}
    assert tops == {"firewall_rules", "core_admin_patch", "admin_client_patch",
                    "qubes_network_server_dom0-0.1.0.dist-info"}
    for path in (POLICY, POLICY_INCLUDE):
        entry = payload[path]
        assert (entry.mode, entry.user, entry.group) == (stat.S_IFREG | 0o664, "root", "qubes")
    flags = dict(line.split(" ", 1)[::-1] for line in rpm_tag(
        built.dom0, "[%{FILEFLAGS:fflags} %{FILENAMES}\n]").splitlines() if " " in line)
    assert flags[POLICY] == "c"  # replaced on upgrade: the user edits the include file
    assert flags[POLICY_INCLUDE] == "cn"
    page = gzip.decompress(payload["/usr/share/man/man1/qvm-firewall-ns.1.gz"].data).decode()
    for word in ("\\fB\\-\\-reload\\fR", "\\fB\\-\\-raw\\fR", "action=forward", "srcqube="):
        assert word in page, word
    requires = set(output(["rpm", "-qp", "--requires", str(built.dom0)]).splitlines())
    assert requires >= {"python(abi) = 3.13", "qubes-core-dom0 >= 4.2", "python3-lxml"}


def test_client_man_page_and_usage_carry_the_installed_name(built: Built, tmp_path: Path) -> None:
    payload = rpm_payload(built.dom0)
    page = gzip.decompress(payload["/usr/share/man/man1/qvm-firewall-ns.1.gz"].data).decode()
    script = tmp_path / "qvm-firewall-ns"
    script.write_bytes(payload["/usr/bin/qvm-firewall-ns"].data)
    usage = output([sys.executable, str(script), "--help"])
    assert usage.startswith("usage: qvm-firewall-ns ")
    assert page.startswith('.TH QVM\\-FIREWALL\\-NS "1"')


def test_template_packages_ship_the_same_files_for_fedora_and_debian(built: Built) -> None:
    def normalised(payload: dict[str, Entry], sitelib: str) -> dict[str, Entry]:
        return {path.replace(sitelib, "SITELIB"): entry for path, entry in payload.items()
                if not path.endswith(".dist-info/INSTALLER")}

    fedora = normalised(rpm_payload(built.fedora), RPM_SITELIB)
    debian = normalised(deb_payload(built.debian), DEB_SITELIB)
    files = {p: e for p, e in debian.items() if stat.S_ISREG(e.mode)}
    assert files == {p: e for p, e in fedora.items() if stat.S_ISREG(e.mode)}
    assert set(files) >= {
        "/usr/bin/qubes-firewall-worker", "/usr/bin/qubes-network-server-input", DROP_IN,
        f"{UNITDIR}/{INPUT_UNIT}", POST_INSTALL,
        "/usr/lib/systemd/system-preset/70-qubes-network-server.preset",
    }


def test_template_package_runs_our_worker_and_input_hook(built: Built) -> None:
    payload = deb_payload(built.debian)
    points = dict(entry_points(payload, DEB_SITELIB)["console_scripts"])
    assert points == {"qubes-firewall-worker": "agent_worker.firewall:main",
                      "qubes-network-server-input": "agent_worker.input_hook:main"}
    for name, target in points.items():
        module, function = target.split(":")
        script = payload[f"/usr/bin/{name}"]
        assert script.mode == stat.S_IFREG | 0o755
        assert f"from {module} import {function}".encode() in script.data
    drop_in = unit_file(payload[DROP_IN].data.decode())
    assert drop_in["ExecStart"] == ["", "/usr/bin/qubes-firewall-worker"]
    assert f"{UNITDIR}/qubes-firewall.service" not in payload  # upstream's stays upstream's
    hook = unit_file(payload[f"{UNITDIR}/{INPUT_UNIT}"].data.decode())
    assert hook["ExecStart"] == ["/usr/bin/qubes-network-server-input"]
    assert hook["WantedBy"] == ["multi-user.target"]
    preset = payload["/usr/lib/systemd/system-preset/70-qubes-network-server.preset"].data
    assert f"enable {INPUT_UNIT}" in preset.decode().splitlines()
    script = payload[POST_INSTALL]
    assert script.mode == stat.S_IFREG | 0o755
    assert f"qvm-features-request {FEATURE}=1" in script.data.decode()
    assert "/etc/qubes/post-install.d" not in "".join(  # removal must take the script along
        subprocess.run(["dpkg-deb", "--info", str(built.debian), "conffiles"],
                       capture_output=True, text=True, check=False).stdout)


def unit_file(text: str) -> dict[str, list[str]]:
    """Every assignment of a unit file (or of files in a row), in order, per key."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def effective_exec_start(assignments: list[str]) -> list[str]:
    """systemd's reading of ExecStart= lines: an empty one clears the list."""
    commands: list[str] = []
    for value in assignments:
        commands = [*commands, value] if value else []
    return commands


def module_closure(modules: Iterable[str]) -> set[str]:
    """Project modules ``modules`` import, directly or not, at any depth (also inside functions)."""
    # lab.pyshim stands in for Qubes' own qubesdb module (python3-qubesdb).
    finder = modulefinder.ModuleFinder(path=[str(REPO)], excludes=["lab.pyshim"])
    for module in modules:
        finder.import_hook(module)
    return {name for name in finder.modules if name.split(".")[0] in PROJECT}


def module_files(modules: Iterable[str]) -> set[str]:
    files = set()
    for module in modules:
        path = module.replace(".", "/")
        files.add(f"{path}/__init__.py" if (REPO / path).is_dir() else f"{path}.py")
    return files


def test_payloads_hold_every_module_the_lab_runs(built: Built) -> None:
    # Template side: the services the lab starts in its qubes, and the
    # package's own entry points.
    debian = deb_payload(built.debian)
    fedora = rpm_payload(built.fedora)
    agent_points = dict(entry_points(debian, DEB_SITELIB)["console_scripts"]).values()
    agent = module_closure([FIREWALL[1], INPUT_HOOK[1]] + [p.split(":")[0] for p in agent_points])
    # dom0 side: what the lab's dom0 and qubesd stand-in import of ours,
    # and the extension and client entry points.
    dom0 = rpm_payload(built.dom0)
    points = entry_points(dom0, RPM_SITELIB)
    dom0_targets = [v.split(":")[0] for group in ("qubes.ext", "console_scripts")
                    for v in points[group].values()]
    served = module_closure(["lab.dom0", "lab.qubesd_server", *dom0_targets])
    for payload, sitelib, modules in (
        (debian, DEB_SITELIB, agent),
        (fedora, RPM_SITELIB, agent),
        (dom0, RPM_SITELIB, {m for m in served if not m.startswith("lab")}),
    ):
        shipped = {p.removeprefix(sitelib + "/") for p in payload if p.startswith(sitelib + "/")}
        assert module_files(modules) <= shipped
        assert not any(p.startswith("lab/") for p in shipped)
    assert "agent_worker.directory" in agent and "core_admin_patch.planner" in served


def upstream_owned(upstream: Path) -> set[str]:
    """Paths upstream's packages install where ours install, by name, from its sources."""
    owned: set[str] = set()
    agent = upstream / "qubes-core-agent-linux"
    for install in (agent / "debian").glob("*.install"):
        for line in install.read_text().splitlines():
            if line and "*" not in line:
                owned.add("/" + line.split()[0].replace("lib/systemd", "usr/lib/systemd", 1)
                          .replace("usr/usr/", "usr/"))
    owned |= {f"/etc/qubes/post-install.d/{p.name}" for p in
              (agent / "qubes-rpc" / "post-install.d").glob("*.sh")}
    for unit in (agent / "vm-systemd").iterdir():
        owned.add(f"{UNITDIR}/{unit.name}")  # units and their .d drop-in folders
        if unit.is_dir():
            owned |= {f"{UNITDIR}/{unit.name}/{p.name}" for p in unit.iterdir()}
    client = upstream / "qubes-core-admin-client"
    scripts = tomllib.loads((client / "pyproject.toml").read_text())["project"]["scripts"]
    owned |= {f"/usr/bin/{name}" for name in scripts}
    pages = (client / "doc" / "manpages").glob("*.rst")
    owned |= {f"/usr/share/man/man1/{page.stem}.1.gz" for page in pages}
    policies = upstream / "qubes-core-admin" / "qubes-rpc-policy"
    owned |= {f"/etc/qubes/policy.d/{p.name}" for p in policies.glob("*.policy")}
    owned |= {f"/etc/qubes/policy.d/include/{p.name}" for p in policies.glob("admin-*")}
    return owned


def test_no_package_installs_a_path_upstream_installs(built: Built) -> None:
    owned = upstream_owned(upstream_dir())
    # The names this check must know, else it proves nothing.
    assert {"/usr/bin/qvm-firewall", "/usr/share/man/man1/qvm-firewall.1.gz",
            f"{UNITDIR}/qubes-firewall.service", "/etc/qubes/policy.d/90-default.policy",
            "/usr/bin/qubes-firewall"} <= owned
    for payload in (rpm_payload(built.dom0), rpm_payload(built.fedora), deb_payload(built.debian)):
        files = {p for p, e in payload.items() if not stat.S_ISDIR(e.mode)}
        assert files.isdisjoint(owned), files & owned


# --- scriptlets ------------------------------------------------------------

SCRIPTLETS = ("PREIN", "POSTIN", "PREUN", "POSTUN", "POSTTRANS")


def run_scriptlet(body: str, argument: str, bin_dir: Path, log: Path) -> list[str]:
    """Run one rpm scriptlet as rpm does (``sh -c body`` with $1), systemctl recorded."""
    log.write_text("")
    subprocess.run(["sh", "-e", "-c", body, "scriptlet", argument], check=True,
                   env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                   capture_output=True)
    return log.read_text().splitlines()


@pytest.fixture
def recording_systemctl(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, log = tmp_path / "bin", tmp_path / "systemctl.log"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (bin_dir / "systemctl").chmod(0o755)
    return bin_dir, log


def scriptlets(rpm: Path) -> dict[str, str]:
    bodies = {tag: rpm_tag(rpm, f"%{{{tag}}}") for tag in SCRIPTLETS}
    return {tag: body for tag, body in bodies.items() if body != "(none)"}


def test_rpm_scriptlets_parse(built: Built) -> None:
    for rpm in (built.dom0, built.fedora):
        for tag, body in scriptlets(rpm).items():
            parsed = subprocess.run(["sh", "-n", "-c", body], capture_output=True, check=False)
            assert parsed.returncode == 0, (rpm.name, tag, parsed.stderr)
    assert rpm_tag(built.dom0, "[%{TRIGGERNAME} %{TRIGGERFLAGS:triggertype}\n]").split() == [
        "qubes-core-dom0", "in"]


def test_dom0_scriptlets_restart_qubesd_on_install_upgrade_and_removal(
    built: Built, recording_systemctl: tuple[Path, Path]
) -> None:
    run = scriptlets(built.dom0)
    bin_dir, log = recording_systemctl
    restart = ["try-restart qubesd.service"]
    # install: %post 1, %posttrans
    assert run_scriptlet(run["POSTIN"], "1", bin_dir, log) == []
    assert run_scriptlet(run["POSTTRANS"], "0", bin_dir, log) == restart
    # upgrade: new %post 2, old %postun 1, new %posttrans
    assert run_scriptlet(run["POSTUN"], "1", bin_dir, log) == []
    # removal: %postun 0 (qubesd must drop the extension whose files are gone)
    assert run_scriptlet(run["POSTUN"], "0", bin_dir, log) == restart


def test_template_rpm_scriptlets_switch_the_firewall_worker(
    built: Built, recording_systemctl: tuple[Path, Path]
) -> None:
    run = scriptlets(built.fedora)
    bin_dir, log = recording_systemctl
    assert run_scriptlet(run["POSTIN"], "1", bin_dir, log) == [f"--no-reload preset {INPUT_UNIT}"]
    assert run_scriptlet(run["POSTIN"], "2", bin_dir, log) == []  # an admin's disable stays
    assert run_scriptlet(run["POSTTRANS"], "0", bin_dir, log) == [
        "daemon-reload", f"try-restart qubes-firewall.service {INPUT_UNIT}"]
    assert run_scriptlet(run["PREUN"], "1", bin_dir, log) == []
    assert run_scriptlet(run["POSTUN"], "1", bin_dir, log) == []
    assert run_scriptlet(run["PREUN"], "0", bin_dir, log) == [
        f"--no-reload disable --now {INPUT_UNIT}"]
    assert run_scriptlet(run["POSTUN"], "0", bin_dir, log) == [
        "daemon-reload", "try-restart qubes-firewall.service"]


def upstream_pythonpath(upstream: Path) -> str:
    core = upstream / "qubes-core-admin"
    return os.pathsep.join(str(p) for p in (core, core / "test-packages",
                                              upstream / "qubes-core-qrexec"))


def test_dom0_trigger_reports_an_extension_that_does_not_load(built: Built, tmp_path: Path) -> None:
    """After an update of qubes-core-dom0 the trigger loads our entry point as qubesd does."""
    upstream = upstream_dir()
    body = rpm_tag(built.dom0, "%{TRIGGERSCRIPTS}").replace("/usr/bin/python3", sys.executable)

    def trigger(pythonpath: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONDONTWRITEBYTECODE": "1"}
        return subprocess.run(["sh", "-c", body], capture_output=True, text=True, env=env,
                              check=True, cwd=tmp_path)

    loads = trigger(upstream_pythonpath(upstream))  # upstream's real qubesd code
    assert loads.stderr == ""
    broken = trigger("")  # a qubesd whose modules the extension cannot import
    assert "WARNING: the qubesd extension does not load" in broken.stderr
    assert "No module named 'qubes'" in broken.stderr


# --- qrexec policy ---------------------------------------------------------

EVALUATE = r"""
import json, pathlib, sys
from qrexec.exc import AccessDenied
from qrexec.policy.parser import FilePolicy, Request
policy = FilePolicy(policy_path=pathlib.Path(sys.argv[1]))
info = json.loads(sys.argv[2])
answers = []
for service, argument in json.loads(sys.argv[3]):
    try:
        policy.evaluate(Request(service, argument, "mgmt", "web", system_info=info))
        answers.append("allow")
    except AccessDenied:
        answers.append("deny")
print(json.dumps(answers))
"""

CALLS = [
    ("admin.vm.firewall.Set", "+"),
    ("admin.vm.firewall.Set", "+forward"),
    ("admin.vm.firewall.Set", "+inbound"),
    ("admin.vm.firewall.Get", "+forward"),
    ("admin.vm.firewall.GetPaths", "+"),
    ("admin.vm.firewall.GetRouting", "+"),
    ("admin.vm.firewall.Reload", "+"),
]


def domain(kind: str, uuid: str) -> dict[str, object]:
    return {"tags": [], "type": kind, "default_dispvm": None, "template_for_dispvms": False,
            "power_state": "Running", "uuid": uuid}


SYSTEM_INFO = {"domains": {
    "dom0": domain("AdminVM", "00000000-0000-0000-0000-000000000000"),
    "mgmt": domain("AppVM", "c9024a97-9b15-46cc-8341-38d75d5d421b"),
    "web": domain("AppVM", "b3eb69d0-f9d9-4c3c-ad5c-454500303ea4"),
}}


def policy_answers(upstream: Path, policy_dir: Path) -> dict[tuple[str, str], str]:
    env = {**os.environ, "PYTHONPATH": upstream_pythonpath(upstream),
           "PYTHONDONTWRITEBYTECODE": "1"}
    answers = json.loads(output([sys.executable, "-c", EVALUATE, str(policy_dir),
                                 json.dumps(SYSTEM_INFO), json.dumps(CALLS)], env=env))
    return dict(zip(CALLS, answers, strict=True))


def test_policy_keeps_exposing_services_apart_from_editing_outbound_rules(
    built: Built, tmp_path: Path
) -> None:
    """Upstream's generated default policy with a management qube granted
    admin-local-rwx: with our snippet it may still edit outbound rules but
    not forwards or inbound rules, until the admin names it in our include."""
    upstream = upstream_dir()
    rpc_policy = upstream / "qubes-core-admin" / "qubes-rpc-policy"
    policy_dir = tmp_path / "policy.d"
    (policy_dir / "include").mkdir(parents=True)
    for include in rpc_policy.glob("admin-*"):
        grant = "mgmt @anyvm allow target=dom0\n" if "local" in include.name else ""
        (policy_dir / "include" / include.name).write_text(include.read_text() + grant)
    shutil.copy(rpc_policy / "91-admin-default-deny.policy", policy_dir)
    subprocess.run(
        [sys.executable, str(rpc_policy / "generate-admin-policy"),
         "--dest", str(policy_dir / "90-admin-default.policy"),
         "--header", str(rpc_policy / "90-admin-default.policy.header")],
        check=True, capture_output=True,
        env={**os.environ, "PYTHONPATH": upstream_pythonpath(upstream),
             "PYTHONDONTWRITEBYTECODE": "1"})
    assert "admin.vm.firewall.Set * include/admin-local-rwx" in (
        policy_dir / "90-admin-default.policy").read_text()

    upstream_only = policy_answers(upstream, policy_dir)
    assert upstream_only[("admin.vm.firewall.Set", "+forward")] == "allow"  # why we ship one
    assert upstream_only[("admin.vm.firewall.GetPaths", "+")] == "deny"
    assert upstream_only[("admin.vm.firewall.GetRouting", "+")] == "deny"

    payload = rpm_payload(built.dom0)
    for path in (POLICY, POLICY_INCLUDE):
        (policy_dir / path.removeprefix("/etc/qubes/policy.d/")).write_bytes(payload[path].data)
    assert policy_answers(upstream, policy_dir) == {
        ("admin.vm.firewall.Set", "+"): "allow",
        ("admin.vm.firewall.Set", "+forward"): "deny",
        ("admin.vm.firewall.Set", "+inbound"): "deny",
        ("admin.vm.firewall.Get", "+forward"): "allow",
        ("admin.vm.firewall.GetPaths", "+"): "allow",
        ("admin.vm.firewall.GetRouting", "+"): "allow",
        ("admin.vm.firewall.Reload", "+"): "allow",
    }

    with (policy_dir / "include" / "admin-network-server-rwx").open("a") as include:
        include.write("mgmt @anyvm allow target=dom0\n")
    granted = policy_answers(upstream, policy_dir)
    assert granted[("admin.vm.firewall.Set", "+forward")] == "allow"
    assert granted[("admin.vm.firewall.Set", "+inbound")] == "allow"


# --- the Debian package in a Debian system -----------------------------------

#: Package managers' own records, logs and the stand-ins' request log: not the template's content.
BOOKKEEPING = ("var/lib/dpkg", "var/lib/rpm", "root/.rpmdb", "var/log", "dev", "var/cache")


def stand_in(tmp: Path, name: str, files: dict[str, tuple[bytes, int]],
             control: dict[str, str] | None = None, depends: str = "") -> Path:
    """A minimal deb named like upstream's package, carrying ``files``."""
    root = tmp / name
    (root / "DEBIAN").mkdir(parents=True)
    fields = f"Package: {name}\nVersion: 4.3.99-1\nArchitecture: all\n"
    fields += f"Maintainer: test <test@invalid.invalid>\nDescription: stand-in for {name}\n"
    if depends:
        fields += f"Depends: {depends}\n"
    (root / "DEBIAN" / "control").write_text(fields)
    for path, (data, mode) in {**files, **{f"/DEBIAN/{k}": (v.encode(), 0o755)
                                           for k, v in (control or {}).items()}}.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(mode)
    if control and "triggers" in control:
        (root / "DEBIAN" / "triggers").chmod(0o644)
    deb = tmp / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


def upstream_stand_ins(tmp: Path, upstream: Path) -> list[Path]:
    """qubes-core-agent (qvm-features-request, the post-install trigger),
    qubes-core-agent-networking (upstream's real qubes-firewall.service) and
    python3-qubesdb (the lab's module with the same API)."""
    unit = (upstream / "qubes-core-agent-linux" / "vm-systemd" / "qubes-firewall.service")
    return [
        stand_in(tmp, "qubes-core-agent", {
            "/usr/bin/qvm-features-request": (
                b'#!/bin/sh\necho "$*" >> /var/log/qvm-features-request.log\n', 0o755),
            "/etc/qubes/post-install.d/.keep": (b"", 0o644),
        }, control={
            # what upstream's postinst does on configure and on its trigger
            "triggers": "interest-noawait /etc/qubes/post-install.d\n",
            "postinst": "#!/bin/sh\nfor s in /etc/qubes/post-install.d/*.sh; do\n"
                        '    [ -x "$s" ] && "$s"\ndone\nqvm-features-request --commit\n',
        }),
        stand_in(tmp, "qubes-core-agent-networking", {
            "/lib/systemd/system/qubes-firewall.service": (unit.read_bytes(), 0o644),
            "/usr/bin/qubes-firewall": (b"#!/bin/sh\nexit 0\n", 0o755),
        }, depends="qubes-core-agent"),
        stand_in(tmp, "python3-qubesdb", {
            f"{DEB_SITELIB}/qubesdb.py": ((REPO / "lab" / "pyshim" / "qubesdb.py").read_bytes(),
                                          0o644),
        }),
    ]


@contextlib.contextmanager
def overlay_root(tmp: Path) -> Iterator[tuple[Path, Path]]:
    """This system seen through an overlay: (merged root, upper layer of changes)."""
    layers = tmp / "layers"
    layers.mkdir()
    mounted: list[Path] = []
    try:
        subprocess.run(["mount", "-t", "tmpfs", "qns-layers", str(layers)], check=True)
        mounted.append(layers)
        for sub in ("upper", "work", "root"):
            (layers / sub).mkdir()
        root = layers / "root"
        subprocess.run(["mount", "-t", "overlay", "qns-root", "-o",
                        f"lowerdir=/,upperdir={layers / 'upper'},workdir={layers / 'work'}",
                        str(root)], check=True)
        mounted.append(root)
        subprocess.run(["mount", "--bind", "/dev", str(root / "dev")], check=True)
        mounted.append(root / "dev")
        yield root, layers / "upper"
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", str(point)], check=False)


State = tuple[str, ...] | None


def path_state(path: Path) -> State:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return ("link", os.readlink(path))
    if stat.S_ISDIR(info.st_mode):
        return ("dir", oct(info.st_mode))
    if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
        return None  # overlay whiteout: removed
    return ("file", oct(info.st_mode), hashlib.sha256(path.read_bytes()).hexdigest())


def changed_paths(root: Path, upper: Path) -> dict[str, State]:
    """What the merged root holds at every path the overlay has touched."""
    states: dict[str, State] = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in [*dirnames, *filenames]:
            relative = str((Path(dirpath) / name).relative_to(upper))
            if not relative.startswith(BOOKKEEPING):
                states[relative] = path_state(root / relative)
    return states


def template_diff(before: dict[str, State], after: dict[str, State]) -> dict[str, tuple]:
    """Paths whose content differs; a path untouched at one time reads as this system's."""
    diff = {}
    for path in set(before) | set(after):
        old = before[path] if path in before else path_state(Path("/") / path)
        new = after[path] if path in after else path_state(Path("/") / path)
        if old != new:
            diff[path] = (old, new)
    return diff


def systemd_settings(root: Path, unit: str) -> dict[str, list[str]]:
    """The unit with its drop-ins, as systemd finds them under ``root``."""
    return unit_file(output(["systemd-analyze", f"--root={root}", "cat-config",
                             f"systemd/system/{unit}"]))


def feature_commits(root: Path) -> list[list[str]]:
    """Each qvm-features-request --commit with the requests before it."""
    commits: list[list[str]] = [[]]
    for line in (root / "var/log/qvm-features-request.log").read_text().splitlines():
        if line == "--commit":
            commits.append([])
        else:
            commits[-1].append(line)
    return commits[:-1]


def dpkg(root: Path, *args: str) -> str:
    return output(["dpkg", f"--root={root}", *args])


def test_debian_package_installs_and_removes_cleanly(built: Built, tmp_path: Path) -> None:
    upstream = upstream_dir()
    if os.geteuid() != 0:
        cannot_run("installing into an overlay of this system needs root (CI runs as root)")
    for tool in ("systemd-analyze", "deb-systemd-helper", "py3compile", "systemctl"):
        if shutil.which(tool) is None:
            cannot_run(f"{tool} is missing: scripts/install-deps installs it")
    stand_ins = upstream_stand_ins(tmp_path, upstream)
    with overlay_root(tmp_path) as (root, upper):
        dpkg(root, "-i", *map(str, stand_ins))
        as_upstream_ships_it = changed_paths(root, upper)
        upstream_exec = effective_exec_start(
            systemd_settings(root, "qubes-firewall.service")["ExecStart"])
        assert upstream_exec == ["/usr/bin/qubes-firewall"]

        dpkg(root, "-i", str(built.debian))
        dpkg(root, "-i", str(built.debian))  # the upgrade path: prerm upgrade, postinst configure
        settings = systemd_settings(root, "qubes-firewall.service")
        assert effective_exec_start(settings["ExecStart"]) == ["/usr/bin/qubes-firewall-worker"]
        assert settings["Type"][-1] == "notify-reload"  # upstream's unit type, kept
        enabled = subprocess.run(["systemctl", f"--root={root}", "is-enabled", INPUT_UNIT],
                                 capture_output=True, text=True, check=False)
        assert enabled.stdout.strip() == "enabled"
        assert f"{FEATURE}=1" in feature_commits(root)[-1]
        assert dpkg(root, "--verify", "qubes-network-server-agent") == ""
        # The installed command runs our code from the installed modules: with
        # no QubesDB to reach it stops with the worker's own error.
        worker = subprocess.run(
            ["chroot", str(root), "/usr/bin/qubes-firewall-worker"], capture_output=True,
            text=True, env={"PATH": "/usr/sbin:/usr/bin", "PYTHONDONTWRITEBYTECODE": "1",
                            "QUBESDB_DIR": "/nonexistent",
                            "QUBESDB_QUBE": "sys-net"}, check=False)
        assert worker.returncode == 1
        assert "QubesDB failed, leaving the ruleset as it is" in worker.stderr
        found = output(["chroot", str(root), "/usr/bin/python3", "-I", "-B", "-c",
                        "import agent_worker.input_hook as m; print(m.__file__)"])
        assert found.strip() == f"{DEB_SITELIB}/agent_worker/input_hook.py"

        dpkg(root, "--remove", "qubes-network-server-agent")
        settings = systemd_settings(root, "qubes-firewall.service")
        assert effective_exec_start(settings["ExecStart"]) == ["/usr/bin/qubes-firewall"]
        assert FEATURE + "=1" not in feature_commits(root)[-1]
        assert template_diff(as_upstream_ships_it, changed_paths(root, upper)) == {}
        dpkg(root, "--purge", "qubes-network-server-agent")
        assert "qubes-network-server-agent" not in dpkg(root, "--get-selections")


def test_fedora_package_installs_and_removes_cleanly(tmp_path: Path) -> None:
    """The template rpm through a real rpm transaction, in an overlay of this system.

    Built for this system's Python (so %post compiles for the Python that
    runs here, the one its %ghost bytecode entries name); upstream's unit and
    the directories Fedora's packages own are put in place first.
    """
    upstream = upstream_dir()
    if os.geteuid() != 0:
        cannot_run("installing into an overlay of this system needs root (CI runs as root)")
    for tool in ("rpmbuild", "systemd-analyze", "systemctl"):
        if shutil.which(tool) is None:
            cannot_run(f"{tool} is missing: scripts/install-deps installs it")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    built = [Path(line) for line in output(
        [sys.executable, str(BUILD), "rpm", "--rpm-python", python, "--out", str(tmp_path)],
        cwd=REPO).split()]
    [agent] = [p for p in built if p.name.startswith("qubes-network-server-agent-")]
    sitelib = Path(f"/usr/lib/python{python}/site-packages")
    unit = upstream / "qubes-core-agent-linux" / "vm-systemd" / "qubes-firewall.service"
    with overlay_root(tmp_path) as (root, upper):
        # What python3-libs, qubes-core-agent and -networking would own.
        for directory in (sitelib, Path("/etc/qubes/post-install.d")):
            (root / directory.relative_to("/")).mkdir(parents=True, exist_ok=True)
        shutil.copy(unit, root / UNITDIR.lstrip("/") / "qubes-firewall.service")
        # Fedora's default: a unit no preset file names stays disabled.
        (root / "usr/lib/systemd/system-preset/99-default-disable.preset").write_text("disable *\n")
        as_upstream_ships_it = changed_paths(root, upper)

        output(["rpm", f"--root={root}", "--install", "--nodeps", str(agent)])
        # The upgrade path: the new package's %post 2, the old one's %preun/%postun 1.
        output(["rpm", f"--root={root}", "--upgrade", "--replacepkgs", "--nodeps", str(agent)])
        settings = systemd_settings(root, "qubes-firewall.service")
        assert effective_exec_start(settings["ExecStart"]) == ["/usr/bin/qubes-firewall-worker"]
        enabled = subprocess.run(["systemctl", f"--root={root}", "is-enabled", INPUT_UNIT],
                                 capture_output=True, text=True, check=False)
        assert enabled.stdout.strip() == "enabled"  # by our preset file
        cache = root / sitelib.relative_to("/") / "agent_worker" / "__pycache__"
        assert (cache / f"firewall.cpython-{python.replace('.', '')}.pyc").is_file()
        assert output(["rpm", f"--root={root}", "--verify", "--nodeps",
                       "qubes-network-server-agent"]) == ""

        output(["rpm", f"--root={root}", "--erase", "qubes-network-server-agent"])
        settings = systemd_settings(root, "qubes-firewall.service")
        assert effective_exec_start(settings["ExecStart"]) == ["/usr/bin/qubes-firewall"]
        assert template_diff(as_upstream_ships_it, changed_paths(root, upper)) == {}
