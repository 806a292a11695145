"""The lab's qubesd: the real qubesd socket protocol in front of admin_api.

Every call goes to :func:`core_admin_patch.admin_api.handle_call` with the
lab's NetworkServer, method and argument as they came (``Get+forward`` is
method ``admin.vm.firewall.Get``, argument ``forward``).

One connection carries one call. The client sends
``"{method}+{arg} {source} name {dest}\\0"`` and the payload, then shuts
down its write side; the server answers ``0\\0<data>`` on success or
``2\\0<exception class>\\0<traceback>\\0<message>\\0`` on error and closes.
That is what qubesd does and what qubesadmin parses, so the unmodified
qubesadmin (and our qvm-firewall) can talk to the lab.

Before it gets to the firewall, the stock qubesadmin lists the qubes and
reads their properties and features; the lab answers those reads
(:data:`LAB_READS`) from the NetworkServer's snapshot of its qubes, in
qubesd's reply formats, so upstream's unmodified ``qvm-firewall`` runs
against the lab.

Where qubesd just drops the connection (framing errors, oversized
requests, ProtocolError) this server answers with a framed error instead:
the caller always learns why, and an empty reply never hides a mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from core_admin_patch.admin_api import handle_call
from core_admin_patch.errors import (
    PermissionDenied,
    ProtocolError,
    QubesException,
    QubesValueError,
    QubesVMNotFoundError,
)
from core_admin_patch.network_server import NetworkServer
from core_admin_patch.planner import QubeState
from firewall_rules.options import qube_name_problem

log = logging.getLogger("qubes-lab.qubesd")

#: Upper bound of header plus payload, as qubesd's read buffer.
MAX_REQUEST = 65536

SOCKET_MODE = 0o660


def encode_success(data: bytes) -> bytes:
    """Reply frame of a successful call."""
    return b"0\0" + data


def encode_error(exc_type: str, message: str) -> bytes:
    """Reply frame of a failed call, parseable by qubesadmin.

    qubesadmin uses the message as a %-format string (with the arguments
    that would follow it, here none), so a literal ``%`` is doubled; a NUL
    would end the field early, so it is shown escaped. The traceback field
    stays empty, as qubesd sends it only in debug mode.
    """
    safe = message.replace("\0", "\\x00").replace("%", "%%")
    return b"2\0" + exc_type.encode("ascii") + b"\0\0" + safe.encode("utf-8") + b"\0"


class QubesNoSuchPropertyError(QubesException):
    """qubesd's error for a property the qube does not have."""


class QubesFeatureNotFoundError(QubesException):
    """qubesd's error for a feature the qube does not have."""


def _vm_list(qubes: list[QubeState]) -> str:
    """``admin.vm.List``: ``NAME class=CLASS state=STATE`` lines (dom0 too, for all)."""
    lines = [f"{q.name} class=AppVM state={'Running' if q.running else 'Halted'}" for q in qubes]
    if len(qubes) != 1:
        lines.insert(0, "dom0 class=AdminVM state=Running")
    return "".join(line + "\n" for line in lines)


def _properties(qube: QubeState) -> dict[str, tuple[str, str]]:
    """Property -> (qubesd type, value) of what the lab knows of a qube."""
    return {
        "name": ("str", qube.name),
        "netvm": ("vm", qube.netvm or ""),
        "ip": ("str", "" if qube.ip is None else str(qube.ip)),
        "ip6": ("str", "" if qube.ip6 is None else str(qube.ip6)),
        "provides_network": ("bool", str(qube.provides_network)),
    }


def _property_get(qube: QubeState, untrusted_name: str) -> str:
    """``admin.vm.property.Get``: ``default=False type=TYPE VALUE`` (all set explicitly)."""
    found = _properties(qube).get(untrusted_name)
    if found is None:
        raise QubesNoSuchPropertyError(f"Invalid property {untrusted_name!r} of {qube.name}")
    kind, value = found
    return f"default=False type={kind} {value}"


def _feature_get(qube: QubeState, untrusted_name: str) -> str:
    if untrusted_name not in qube.features:
        raise QubesFeatureNotFoundError(f"Feature not set for domain {qube.name}: {untrusted_name}")
    return qube.features[untrusted_name]


#: method -> (takes an argument, answer(the qube, or all of them for dom0's List; arg)).
LAB_READS: dict[str, tuple[bool, Callable[[list[QubeState], str], str]]] = {
    "admin.vm.List": (False, lambda qubes, arg: _vm_list(qubes)),
    "admin.vm.property.List": (
        False, lambda qubes, arg: "".join(f"{name}\n" for name in _properties(qubes[0]))
    ),
    "admin.vm.property.Get": (True, lambda qubes, arg: _property_get(qubes[0], arg)),
    "admin.vm.feature.List": (
        False, lambda qubes, arg: "".join(f"{name}\n" for name in sorted(qubes[0].features))
    ),
    "admin.vm.feature.Get": (True, lambda qubes, arg: _feature_get(qubes[0], arg)),
}

#: A property or feature name, as qrexec lets an argument through.
_ARG_RE = re.compile(r"\A[a-zA-Z0-9_.-]{1,64}\Z")


def lab_read(
    server: NetworkServer, untrusted_method: str, untrusted_arg: str, untrusted_dest: str,
    untrusted_payload: bytes, now: float,
) -> bytes:
    """One of :data:`LAB_READS`, checked the way qubesd checks its calls."""
    takes_arg, answer_call = LAB_READS[untrusted_method]
    if untrusted_payload:
        raise ProtocolError(f"{untrusted_method} takes no payload")
    if bool(untrusted_arg) != takes_arg:
        raise ProtocolError(f"{untrusted_method}: argument {'missing' if takes_arg else 'given'}")
    if untrusted_arg and _ARG_RE.match(untrusted_arg) is None:
        raise ProtocolError(f"{untrusted_method}: invalid argument")
    qubes = server.snapshot(now).qubes
    if untrusted_dest == "dom0":
        if untrusted_method != "admin.vm.List":
            raise ProtocolError(f"{untrusted_method}: dom0 has none in the lab")
        return answer_call(sorted(qubes.values(), key=lambda q: q.name), "").encode("ascii")
    problem = qube_name_problem(untrusted_dest)
    if problem is not None:
        raise QubesValueError(problem)
    qube = qubes.get(untrusted_dest)
    if qube is None:
        raise QubesVMNotFoundError(untrusted_dest)
    return answer_call([qube], untrusted_arg).encode("ascii")


def parse_header(untrusted_header: bytes) -> tuple[str, str, str, str]:
    """Split ``method+arg source dest_type dest`` into method, arg, source, dest."""
    try:
        untrusted_text = untrusted_header.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("request header is not ASCII") from None
    untrusted_fields = untrusted_text.split(" ")
    if len(untrusted_fields) != 4:
        raise ProtocolError("malformed request header")
    untrusted_call, untrusted_source, untrusted_dest_type, untrusted_dest = untrusted_fields
    if (untrusted_dest_type, untrusted_dest) == ("keyword", "adminvm"):
        untrusted_dest_type, untrusted_dest = "name", "dom0"
    if untrusted_dest_type != "name":
        raise ProtocolError("only an explicit destination name is supported")
    untrusted_method, _, untrusted_arg = untrusted_call.partition("+")
    return untrusted_method, untrusted_arg, untrusted_source, untrusted_dest


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """Everything the client sends before shutting down its write side."""
    untrusted_request = bytearray()
    while chunk := await reader.read(MAX_REQUEST):
        untrusted_request += chunk
        if len(untrusted_request) > MAX_REQUEST:
            raise ProtocolError(f"request too long (more than {MAX_REQUEST} bytes)")
    return bytes(untrusted_request)


def answer(server: NetworkServer, untrusted_request: bytes, now: float) -> bytes:
    """The reply frame for one complete request; never raises, never empty."""
    untrusted_method = "?"
    try:
        untrusted_header, sep, untrusted_payload = untrusted_request.partition(b"\0")
        if not sep:
            raise ProtocolError("request header is not NUL-terminated")
        untrusted_method, untrusted_arg, untrusted_source, untrusted_dest = parse_header(
            untrusted_header
        )
        if untrusted_method in LAB_READS:
            data = lab_read(
                server, untrusted_method, untrusted_arg, untrusted_dest, untrusted_payload, now
            )
        else:
            data = handle_call(
                server, untrusted_method, untrusted_arg, untrusted_dest, untrusted_payload, now
            )
    except (QubesException, ProtocolError, PermissionDenied) as exc:
        log.info("call %r refused: %s: %s", untrusted_method, type(exc).__name__, exc)
        return encode_error(type(exc).__name__, str(exc))
    except Exception:
        log.exception("call %r failed", untrusted_method)
        return encode_error(
            "QubesException", f"{untrusted_method}: internal error in qubesd, see its log"
        )
    log.info("call %r from %r to %r done", untrusted_method, untrusted_source, untrusted_dest)
    return encode_success(data)


def _remove_stale_socket(socket_path: Path) -> None:
    """Remove a socket left by a dead server; refuse to steal a live one."""
    if not socket_path.exists():
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path))
        except ConnectionRefusedError:
            socket_path.unlink()
            return
    raise FileExistsError(errno.EEXIST, "qubesd socket is in use", str(socket_path))


async def start_server(socket_path: Path, network_server: NetworkServer) -> asyncio.AbstractServer:
    """Serve the Admin API on ``socket_path`` until the server is closed.

    Calls are handled one at a time in the event loop, so two Set calls
    never interleave their check, save and apply.
    """

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                untrusted_request = await _read_request(reader)
            except ProtocolError as exc:
                reply = encode_error(type(exc).__name__, str(exc))
            else:
                reply = answer(network_server, untrusted_request, time.time())
            writer.write(reply)
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError as err:  # the client went away; nothing to tell it
            log.info("qubesd client disconnected early: %s", err)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    _remove_stale_socket(socket_path)
    server = await asyncio.start_unix_server(serve, path=str(socket_path))
    os.chmod(socket_path, SOCKET_MODE)
    return server
