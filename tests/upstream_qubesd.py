"""A real qubesd app (upstream qubes-core-admin, offline) with our extension, driven by JSON lines.

Started by tests/test_upstream_qubesdb.py with the snapshots on PYTHONPATH.
``qubes.Qubes`` is built as upstream's own Admin API tests build it
(offline, libvirt mocked, storage in a temporary folder); our extension
comes in through its ``qubes.ext`` entry point like every other
extension. Only what needs Xen is played here: a qube's running state and
its QubesDB (a dict per qube). Starting and stopping a qube fire the
events qubesd fires, in its order, so upstream's handlers and ours do
the rest.

The qubes mirror the lab's default topology (lab/topologies/default.toml),
with the qids the lab gives them (lab/topology.py), so both derive the
same IPv6 addresses from them, also after an ``ip`` change.

Each line on stdin is one command; each answer one JSON line on stdout:
``{"op": "start"|"stop", "qube": Q}``, ``{"op": "set", "qube": Q, "prop":
P, "value": V}`` (netvm, ip), ``{"op": "feature", "qube": Q, "name": N,
"value": V or null}``, ``{"op": "api", "qube": Q, "method": M, "arg": A,
"payload": TEXT}``, ``{"op": "qubesdb", "prefix": P}`` (every running
qube's entries under P).

With ``--serve SOCKET`` it serves qubesd's Admin API on SOCKET instead,
for upstream's clients (qubesadmin), until SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
import tempfile
import traceback
import unittest.mock
from pathlib import Path
from typing import Any

import jinja2
import libvirt
import qubes
import qubes.api
import qubes.api.admin
import qubes.app
import qubes.config
import qubes.ext

from lab.topology import DEFAULT_TOPOLOGY, load_topology

#: name -> (netvm, ip, provides network, features), as in the lab's default topology.
SUPPORT = {"supported-feature.qubes-network-server": "1"}
#: What a netvm's template reports on Qubes 4 (its agent runs qubes-firewall).
NETVM = {**SUPPORT, "qubes-firewall": "1"}
TOPOLOGY: dict[str, tuple[str | None, str, bool, dict[str, str]]] = {
    "sys-net": (None, "10.137.0.5", True, {**NETVM, "ipv6": "1"}),
    "sys-firewall": ("sys-net", "10.137.0.6", True, dict(NETVM)),
    "web": ("sys-firewall", "10.137.0.20", False, dict(SUPPORT)),
    "work": ("sys-firewall", "10.137.0.21", False, dict(SUPPORT)),
    "direct": ("sys-net", "10.137.0.8", False, dict(SUPPORT)),
}
#: name -> qid, as the lab's dom0 has them.
QIDS = {name: qube.qid for name, qube in load_topology(DEFAULT_TOPOLOGY).qubes.items()}


class DictQubesDB:
    """A qube's QubesDB as qubesd uses it (write, rm of a key or a ``dir/``, list, read)."""

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}

    def write(self, path: str, value: str) -> None:
        self.entries[path] = value

    def rm(self, path: str) -> None:
        if path.endswith("/"):
            for key in [k for k in self.entries if k.startswith(path)]:
                del self.entries[key]
        else:
            self.entries.pop(path, None)

    def read(self, path: str) -> bytes | None:
        value = self.entries.get(path)
        return None if value is None else value.encode()

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k in self.entries if k.startswith(prefix))

    def close(self) -> None:
        pass


class RealQubesd:
    """The app, its qubes, and what "running" means here."""

    def __init__(self, base: Path) -> None:
        for patch in (
            unittest.mock.patch.dict(qubes.config.system_path, {"qubes_base_dir": str(base)}),
            unittest.mock.patch("qubes.config.qubes_base_dir", str(base)),
            unittest.mock.patch.dict(qubes.config.defaults["pool_configs"]["varlibqubes"],
                                     {"dir_path": str(base)}),
            unittest.mock.patch("qubes.app.validate_kernel", lambda obj, key, value: None),
            # dom0's own QubesDB watch: a Xen-side daemon this app does not have
            unittest.mock.patch("qubes.vm.LocalVM.start_qdb_watch", lambda self, loop=None: None),
        ):
            patch.start()
        self.running: set[str] = set()
        running = self.running
        for patch in (  # a qube runs when this says so (every qube, also ones made later)
            unittest.mock.patch("qubes.vm.qubesvm.QubesVM.is_running",
                                lambda vm: vm.name in running),
            unittest.mock.patch("qubes.vm.qubesvm.QubesVM.is_paused", lambda vm: False),
            # what Xen would tell of the host (for default memory sizes)
            unittest.mock.patch("qubes.app.QubesHost.memory_total", 16 * 1024 * 1024),
        ):
            patch.start()
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        app = qubes.Qubes(str(base / "qubes.xml"), load=False, offline_mode=True)
        app.vmm = unittest.mock.Mock(spec=qubes.app.VMMConnection)
        app.vmm.offline_mode = False  # is_running is ours (above), libvirt calls are no-ops
        # a running domain's libvirt XML, read when its network is detached
        domain = app.vmm.libvirt_conn.lookupByUUID.return_value
        domain.XMLDesc.return_value = "<domain/>"
        # the power state libvirt reports (admin.vm.List): as upstream's Admin API tests
        domain.state.return_value = [libvirt.VIR_DOMAIN_SHUTOFF, 0]
        domain.ID.return_value = -1  # no Xen domain id
        app.vmm.xs.read.return_value = ""  # no start time known
        # libvirt XML templates from the snapshot, not an installed dom0's /usr/share/qubes
        templates = Path(qubes.__file__).parent.parent / "templates"
        app.env.loader = jinja2.FileSystemLoader(str(templates))
        app.load_initial_values()
        self.loop.run_until_complete(app.setup_pools())
        app.default_kernel = "1.0"
        app.default_netvm = None
        app.save = unittest.mock.Mock()
        app.add_new_vm("TemplateVM", label="black", name="tpl", maxmem=400)
        app.default_template = "tpl"
        self.app = app
        for name, (_, ip, provides, features) in TOPOLOGY.items():
            vm = app.add_new_vm("AppVM", qid=QIDS[name], name=name, label="red",
                                ip=ip, provides_network=provides, maxmem=400)
            Path(vm.dir_path).mkdir(parents=True, exist_ok=True)
            for key, value in features.items():
                vm.features[key] = value
        for name, (netvm, *_) in TOPOLOGY.items():
            app.domains[name].netvm = None if netvm is None else app.domains[netvm]
        if not any(type(ext).__module__.startswith("core_admin_patch")
                   for ext in app._extensions):
            raise RuntimeError("our extension is not among qubesd's extensions")

    def start(self, qube: str) -> None:
        """What qubesd does around a qube's boot, Xen left out."""
        vm = self.app.domains[qube]
        if vm.netvm is not None and not vm.netvm.is_running():
            self.start(vm.netvm.name)
        self.loop.run_until_complete(vm.fire_event_async("domain-pre-start"))
        vm.fire_event("domain-pre-spawn")
        self.running.add(qube)
        vm._qdb_connection = DictQubesDB()
        self.loop.run_until_complete(vm.fire_event_async("domain-spawn"))
        vm.create_qdb_entries()  # fires domain-qdb-create
        self.loop.run_until_complete(vm.fire_event_async("domain-start", start_guid=False))

    def stop(self, qube: str) -> None:
        vm = self.app.domains[qube]
        vm.fire_event("domain-pre-shutdown", force=True)
        self.running.discard(qube)
        vm._qdb_connection = None
        self.loop.run_until_complete(vm.fire_event_async("domain-shutdown"))

    def set(self, qube: str, prop: str, value: str | None) -> None:
        vm = self.app.domains[qube]
        if prop == "netvm":
            vm.netvm = None if value in (None, "", "none") else self.app.domains[value]
        elif prop == "ip":
            vm.ip = value
        else:
            raise ValueError(f"no such property here: {prop}")

    def feature(self, qube: str, name: str, value: str | None) -> None:
        features = self.app.domains[qube].features
        if value is None:
            if name in features:
                del features[name]
        else:
            features[name] = value

    def api(self, qube: str, method: str, arg: str, payload: str) -> Any:
        call = qubes.api.admin.QubesAdminAPI(
            self.app, b"dom0", method.encode(), qube.encode(), arg.encode()
        )
        return self.loop.run_until_complete(call.execute(untrusted_payload=payload.encode()))

    def qubesdb(self, prefix: str) -> dict[str, dict[str, str]]:
        return {
            name: {key: db.entries[key] for key in db.list(prefix)}
            for name in sorted(self.running)
            if (db := self.app.domains[name]._qdb_connection) is not None
        }


def serve(qubesd: RealQubesd, socket_path: str) -> None:
    """qubesd's Admin API on ``socket_path`` (its own protocol class), until SIGTERM.

    The qubes get their storage first, as ``qvm-create`` would, so calls
    that copy volumes (``qvm-clone``) find them.
    """
    loop = qubesd.loop
    for vm in qubesd.app.domains:
        if vm.klass != "AdminVM":
            loop.run_until_complete(vm.create_on_disk())
    server = loop.run_until_complete(loop.create_unix_server(
        functools.partial(qubes.api.QubesDaemonProtocol, qubes.api.admin.QubesAdminAPI,
                          app=qubesd.app),
        path=socket_path,
    ))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    print(json.dumps({"ok": True, "result": "ready"}), flush=True)
    loop.run_forever()
    server.close()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="qns-qubesd-") as base:
        qubesd = RealQubesd(Path(base))
        for name in TOPOLOGY:
            qubesd.start(name)
        if sys.argv[1:2] == ["--serve"]:
            serve(qubesd, sys.argv[2])
            return 0
        print(json.dumps({"ok": True, "result": "ready"}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            op = request.pop("op")
            try:
                result = getattr(qubesd, op)(**request)
                reply = {"ok": True, "result": result}
            except Exception as err:
                reply = {"ok": False, "error": f"{type(err).__name__}: {err}",
                         "traceback": traceback.format_exc()}
            print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
