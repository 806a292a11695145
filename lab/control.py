"""The lab from the outside: bring it up and down, drive dom0, run things in qubes.

:class:`Lab` is what ``qubes-lab`` and the tests use. It starts two
daemons (the QubesDB stand-in and :mod:`lab.dom0`), then talks to dom0 over
its private socket for everything that changes the topology, so dom0 stays
the one place that knows it. ``down`` does not need dom0: it finds what to
stop from pid files and the ``qlab-*`` namespace names, so it also cleans
up after a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from lab import netns, procs
from lab.topology import DEFAULT_TOPOLOGY, TopologyError, load_topology

DEFAULT_STATE_DIR = Path("/run/qubes-lab")
UP_TIMEOUT = 60.0
#: State ``down`` removes; ``logs/`` stays for post-mortems.
_STATE_ENTRIES = (
    "qubesdb", "qubes", "pids", "qubesd.sock", "dom0.sock", "topology.json",
    "topology.source", "dom0.ready", "qubesdb.ready",
)


class LabError(Exception):
    """A lab operation failed; the message says what and where to look."""


def state_dir_from_env() -> Path:
    return Path(os.environ.get("QUBES_LAB_DIR", str(DEFAULT_STATE_DIR)))


class _ProbeProcess:
    """A ``probe`` process in a namespace whose stdout lines a thread collects.

    Subclasses say which lines they keep (:meth:`_take`); stopping and the
    ``with`` form are shared.
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            words = line.split()
            with self._lock:
                self._take(words)

    def _take(self, words: list[str]) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=5)
        self._reader.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class Server(_ProbeProcess):
    """A ``probe serve`` running in a namespace; collects the peers it saw."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._peers: list[str] = []
        super().__init__(proc)

    def _take(self, words: list[str]) -> None:
        if len(words) == 3 and words[0] == "peer":
            self._peers.append(words[1])

    @property
    def peers(self) -> list[str]:
        """Source addresses of the connections (or datagrams) seen so far."""
        with self._lock:
            return list(self._peers)


class Talker(_ProbeProcess):
    """A ``probe talk`` running in a namespace: one live flow, and when its answers came."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._answers: list[float] = []
        super().__init__(proc)

    def _take(self, words: list[str]) -> None:
        if len(words) == 2 and words[0] == "echo":
            self._answers.append(float(words[1]))

    @property
    def answers(self) -> list[float]:
        """Wall-clock times (``time.time()``) of the answers received so far."""
        with self._lock:
            return list(self._answers)

    def answered_since(self, when: float) -> bool:
        return any(answer > when for answer in self.answers)


class Lab:
    """A lab whose state lives in ``state_dir`` (default ``$QUBES_LAB_DIR``)."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.state_dir = (state_dir or state_dir_from_env()).resolve()

    # --- up / down ------------------------------------------------------------

    def is_up(self) -> bool:
        """dom0 is alive and answers."""
        if procs.read_pid(self.state_dir, "dom0") is None:
            return False
        try:
            self._call("status")
        except LabError:
            return False
        return True

    def up(self, topology: Path | None = None) -> None:
        """Bring the lab up; a no-op if it is already up with this topology.

        Leftovers of a crashed run are cleaned first. On failure, whatever
        was started is torn down again and the error quotes dom0's log.
        """
        source = (topology or DEFAULT_TOPOLOGY).resolve()
        try:
            load_topology(source)
        except TopologyError as err:
            raise LabError(str(err)) from None
        if self.is_up():
            try:
                running = (self.state_dir / "topology.source").read_text().strip()
            except OSError:
                running = "an unknown topology"
            if running != str(source):
                raise LabError(
                    f"the lab is already up with {running}; run 'qubes-lab down' first"
                )
            return
        self.down()
        for sub in ("qubesdb", "qubes", "logs", "pids"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.state_dir / "topology.source").write_text(f"{source}\n")
        try:
            self._start_daemon("qubesdb", procs.python_argv(
                "lab.qubesdb_server", "--dir", str(self.state_dir / "qubesdb"),
                "--ready-file", str(self.state_dir / "qubesdb.ready"),
            ))
            self._start_daemon("dom0", procs.python_argv(
                "lab.dom0", "--state-dir", str(self.state_dir), "--topology", str(source),
                "--ready-file", str(self.state_dir / "dom0.ready"),
            ))
        except LabError:
            self.down()
            raise

    def _start_daemon(self, name: str, argv: list[str]) -> None:
        ready = self.state_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        proc = procs.spawn(self.state_dir, name, argv, procs.lab_env(self.state_dir))
        deadline = time.monotonic() + UP_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                raise LabError(f"{name} exited with status {proc.returncode}:\n"
                               f"{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise LabError(f"{name} not ready after {UP_TIMEOUT:.0f}s:\n{self.log_tail(name)}")
            time.sleep(0.02)

    def log_tail(self, name: str, lines: int = 20) -> str:
        """Last lines of ``logs/<name>.log``, for error messages."""
        try:
            text = (self.state_dir / "logs" / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def down(self) -> None:
        """Stop everything the lab started and remove its namespaces and state.

        Works without dom0: processes are found through pid files (checked
        to still be ours) and inside the ``qlab-*`` namespaces.
        """
        if self.is_up():
            with contextlib.suppress(LabError):
                self._call("shutdown")
            pid = procs.read_pid(self.state_dir, "dom0")
            deadline = time.monotonic() + 20
            while pid is not None and procs.is_ours(self.state_dir, pid):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        pid_dir = self.state_dir / "pids"
        if pid_dir.is_dir():
            for pid_file in sorted(pid_dir.glob("*.pid")):
                procs.stop_named(self.state_dir, pid_file.stem)
        for ns in netns.lab_namespaces():
            try:
                procs.terminate(netns.pids(ns))
                netns.delete(ns)
            except netns.CommandError as err:
                raise LabError(str(err)) from None
        for entry in _STATE_ENTRIES:
            path = self.state_dir / entry
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    # --- talking to dom0 ---------------------------------------------------

    def _call(self, op: str, **args: str | bool) -> Any:
        """One command to dom0 over ``dom0.sock``; LabError with dom0's message."""
        path = self.state_dir / "dom0.sock"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                sock.sendall((json.dumps({"op": op, "args": args}) + "\n").encode())
                with sock.makefile("rb") as replies:
                    line = replies.readline()
        except OSError as err:
            raise LabError(f"cannot reach dom0 at {path} (is the lab up?): {err}") from None
        try:
            reply = json.loads(line)
        except ValueError:
            raise LabError(f"dom0 gave no answer to {op}; see {self.state_dir}/logs/dom0.log")\
                from None
        if not reply.get("ok"):
            raise LabError(str(reply.get("error")))
        return reply.get("result")

    def status(self) -> dict[str, Any]:
        """Qubes (running, domid, vif, services) and daemons; works with dom0 dead."""
        daemons = {
            name: procs.read_pid(self.state_dir, name) for name in ("dom0", "qubesdb")
        }
        if self.is_up():
            result = self._call("status")
        else:
            try:
                result = json.loads((self.state_dir / "topology.json").read_text())
            except (OSError, ValueError):
                result = {"qubes": []}
            for qube in result["qubes"]:
                for label in qube.get("services", {}):
                    pid = procs.read_pid(self.state_dir, f"{qube['name']}-{label}")
                    qube["services"][label]["alive"] = pid is not None
        result["daemons"] = daemons
        result["namespaces"] = netns.lab_namespaces()
        return result

    def start(self, qube: str) -> None:
        self._call("start", name=qube)

    def stop(self, qube: str, force: bool = False) -> None:
        self._call("stop", name=qube, force=force)

    def restart(self, qube: str) -> None:
        self._call("restart", name=qube)

    def restart_service(self, qube: str, service: str) -> None:
        """Restart one agent in a running qube: ``firewall`` (netvms) or ``input``."""
        self._call("restart-service", name=qube, service=service)

    def set(self, qube: str, prop: str, value: str) -> None:
        """As ``qvm-prefs``: ``netvm`` (name or ``none``), ``ip``, ``ip6``, ``provides_network``."""
        self._call("set", name=qube, prop=prop, untrusted_value=value)

    def set_netvm(self, qube: str, netvm: str | None) -> None:
        self.set(qube, "netvm", netvm or "none")

    def set_ip(self, qube: str, ip: str) -> None:
        self.set(qube, "ip", ip)

    def set_feature(self, qube: str, feature: str, value: str | None) -> None:
        """``qvm-features``-like; None unsets. ``ipv6`` re-wires the qubes below live."""
        if value is None:
            self._call("feature", name=qube, feature=feature)
        else:
            self._call("feature", name=qube, feature=feature, value=value)

    def qube_info(self, qube: str) -> dict[str, Any]:
        """The status entry of one qube."""
        for info in self.status()["qubes"]:
            if info["name"] == qube:
                return dict(info)
        raise LabError(f"no such qube: {qube!r}")

    def vif(self, qube: str) -> str | None:
        """Name of the qube's backend interface in its netvm (None if not connected)."""
        return self.qube_info(qube)["vif"]

    # --- running things --------------------------------------------------------

    @property
    def qubesd_socket(self) -> Path:
        return self.state_dir / "qubesd.sock"

    def env(self, target: str) -> dict[str, str]:
        """Environment for a command in ``target``: a qube, a LAN host or ``dom0``."""
        if target == "dom0":
            return procs.lab_env(self.state_dir, {"QUBESD_SOCKET": str(self.qubesd_socket)})
        return procs.qube_env(self.state_dir, target)

    def command(self, target: str, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside ``target``'s namespace (dom0: as is)."""
        if target == "dom0":
            return list(argv)
        ns = netns.namespace(target)
        if not netns.exists(ns):
            raise LabError(f"{target} is not running (no namespace {ns})")
        return ["ip", "netns", "exec", ns, *argv]

    def exec(
        self, target: str, argv: Sequence[str], check: bool = False, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``target`` and capture its output."""
        command = self.command(target, argv)
        result = subprocess.run(command, env=self.env(target), capture_output=True, text=True,
                                timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise LabError(f"in {target}: {' '.join(argv)} exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()}")
        return result

    def serve(
        self, target: str, proto: str, port: int, reply: str | None = None,
        bind: str | None = None,
    ) -> Server:
        """A ``probe serve`` in ``target``, ready when this returns; stop() it when done.

        It listens on IPv4 unless ``bind`` says otherwise (``"::"``: any IPv6 address).
        """
        argv = procs.python_argv("lab.probe", "serve", proto, str(port))
        if reply is not None:
            argv += ["--reply", reply]
        if bind is not None:
            argv += ["--bind", bind]
        return self._start_server(target, argv)

    def _start_server(self, target: str, argv: list[str]) -> Server:
        """Start a probe server command in ``target``; returns once it listens."""
        proc = subprocess.Popen(
            self.command(target, argv), env=self.env(target), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=procs.REPO,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if not first.startswith("listening"):
            proc.kill()
            _, err = proc.communicate()
            raise LabError(f"probe server in {target} did not start: {err.strip()}")
        return Server(proc)

    def echo(self, target: str, proto: str, port: int, bind: str | None = None) -> Server:
        """A ``probe echo`` in ``target`` (flows stay open), ready when this returns."""
        argv = procs.python_argv("lab.probe", "echo", proto, str(port))
        if bind is not None:
            argv += ["--bind", bind]
        return self._start_server(target, argv)

    def talk(
        self, target: str, proto: str, host: str, port: int, interval: float = 0.05
    ) -> Talker:
        """A live flow from ``target`` to an echo server; stop() it when done."""
        argv = procs.python_argv("lab.probe", "talk", proto, host, str(port),
                                 "--interval", str(interval))
        proc = subprocess.Popen(
            self.command(target, argv), env=self.env(target), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=procs.REPO,
        )
        return Talker(proc)

    def connect(
        self, target: str, proto: str, host: str, port: int, timeout: float = 2.0,
        source: str | None = None,
    ) -> str | None:
        """Connect from ``target``; the server's reply, or None if refused or timed out."""
        argv = procs.python_argv("lab.probe", "connect", proto, host, str(port),
                                 "--timeout", str(timeout))
        if source is not None:
            argv += ["--source", source]
        result = self.exec(target, argv, timeout=timeout + 10)
        if result.returncode == 0:
            return result.stdout.strip()
        if result.returncode == 1:
            return None
        raise LabError(f"probe connect in {target} failed: {result.stderr.strip()}")

    def scan(self, target: str, host: str, ports: str, timeout: float = 1.0) -> list[int]:
        """Open TCP ports of ``host`` seen from ``target``."""
        argv = procs.python_argv("lab.probe", "scan", "tcp", host, ports,
                                 "--timeout", str(timeout))
        result = self.exec(target, argv, check=True, timeout=timeout * 200 + 10)
        return [int(line) for line in result.stdout.split()]

    def nft_json(self, target: str) -> dict[str, Any]:
        """``nft -j list ruleset`` inside ``target``."""
        result = self.exec(target, ["nft", "-j", "list", "ruleset"], check=True)
        return json.loads(result.stdout)

    def qubesdb(self, qube: str) -> Any:
        """A QubesDB connection to a running qube's database (the lab's stand-in)."""
        from lab.pyshim import qubesdb

        os.environ["QUBESDB_DIR"] = str(self.state_dir / "qubesdb")
        try:
            return qubesdb.QubesDB(qube)
        except qubesdb.Error as err:
            raise LabError(f"QubesDB of {qube}: {err}") from None
