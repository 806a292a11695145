"""The lab's qubesd: the real qubesd socket protocol in front of admin_api.

One connection carries one call. The client sends
``"{method}+{arg} {source} name {dest}\\0"`` and the payload, then shuts
down its write side; the server answers ``0\\0<data>`` on success or
``2\\0<exception class>\\0<traceback>\\0<message>\\0`` on error and closes.
That is what qubesd does and what qubesadmin parses, so the unmodified
qubesadmin (and our qvm-firewall) can talk to the lab.

Besides the firewall methods (:mod:`core_admin_patch.admin_api`), the
lab answers the reads the stock qubesadmin makes before it gets there
(:data:`LAB_READS`): the qube list, and a qube's properties and features,
from the lab dom0's live topology, in qubesd's reply formats.

Where qubesd just drops the connection (framing errors, oversized
requests, ProtocolError) this server answers with a framed error instead:
the caller always learns why, and an empty reply never hides a mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from core_admin_patch.admin_api import AdminContext, handle_call, validate_qube_name
from core_admin_patch.errors import (
    PermissionDenied,
    ProtocolError,
    QubesException,
    QubesVMNotFoundError,
)
from lab.topology import Qube, Topology

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


@runtime_checkable
class LabInventory(Protocol):
    """The lab dom0 as the read methods see it: its live topology and run state."""

    topology: Topology
    runtime: Mapping[str, Any]

    def ip6_of(self, name: str) -> ipaddress.IPv6Address | None: ...


def _vm_list(inventory: LabInventory, qube: Qube | None) -> str:
    """``admin.vm.List``: ``NAME class=CLASS state=STATE`` lines, dom0 first."""
    lines = [] if qube is not None else ["dom0 class=AdminVM state=Running"]
    for listed in [qube] if qube is not None else list(inventory.topology.qubes.values()):
        state = "Running" if inventory.runtime[listed.name].running else "Halted"
        lines.append(f"{listed.name} class=AppVM state={state}")
    return "".join(line + "\n" for line in lines)


def _properties(inventory: LabInventory, qube: Qube) -> dict[str, tuple[str, str, bool]]:
    """Property -> (qubesd type, value, whether it is the default), as qubesd has them."""
    ip6 = inventory.ip6_of(qube.name)
    return {
        "name": ("str", qube.name, False),
        "klass": ("str", "AppVM", True),
        "netvm": ("vm", qube.netvm or "", False),
        "ip": ("str", str(qube.ip), False),
        "ip6": ("str", "" if ip6 is None else str(ip6), qube.ip6 is None),
        "provides_network": ("bool", str(qube.provides_network), False),
        "autostart": ("bool", str(qube.autostart), False),
    }


def _property_get(inventory: LabInventory, qube: Qube, untrusted_name: str) -> str:
    """``admin.vm.property.Get``: ``default=True|False type=TYPE VALUE``."""
    found = _properties(inventory, qube).get(untrusted_name)
    if found is None:
        raise QubesNoSuchPropertyError(f"Invalid property {untrusted_name!r} of {qube.name}")
    kind, value, is_default = found
    return f"default={is_default} type={kind} {value}"


def _feature_get(qube: Qube, untrusted_name: str) -> str:
    if untrusted_name not in qube.features:
        raise QubesFeatureNotFoundError(f"Feature not set for domain {qube.name}: {untrusted_name}")
    return qube.features[untrusted_name]


#: method -> (takes an argument, answer(inventory, qube or None for dom0, arg)).
LAB_READS: dict[str, tuple[bool, Callable[[LabInventory, Qube | None, str], str]]] = {
    "admin.vm.List": (False, lambda inv, qube, arg: _vm_list(inv, qube)),
    "admin.vm.property.List": (
        False, lambda inv, qube, arg: "".join(f"{name}\n" for name in _properties(inv, qube))
    ),
    "admin.vm.property.Get": (True, lambda inv, qube, arg: _property_get(inv, qube, arg)),
    "admin.vm.feature.List": (
        False, lambda inv, qube, arg: "".join(f"{name}\n" for name in sorted(qube.features))
    ),
    "admin.vm.feature.Get": (True, lambda inv, qube, arg: _feature_get(qube, arg)),
}


#: A property or feature name, as qrexec lets an argument through.
_ARG_RE = re.compile(r"\A[a-zA-Z0-9_.-]{1,64}\Z")


def lab_read(
    inventory: LabInventory, untrusted_method: str, untrusted_arg: str, untrusted_dest: str,
    untrusted_payload: bytes,
) -> bytes:
    """One of :data:`LAB_READS`, checked the way qubesd checks its calls."""
    takes_arg, answer_call = LAB_READS[untrusted_method]
    if untrusted_payload:
        raise ProtocolError(f"{untrusted_method} takes no payload")
    if bool(untrusted_arg) != takes_arg:
        raise ProtocolError(f"{untrusted_method}: argument {'missing' if takes_arg else 'given'}")
    if untrusted_arg and _ARG_RE.match(untrusted_arg) is None:
        raise ProtocolError(f"{untrusted_method}: invalid argument")
    qube: Qube | None = None
    if untrusted_dest != "dom0":
        name = validate_qube_name(untrusted_dest)
        qube = inventory.topology.qubes.get(name)
        if qube is None:
            raise QubesVMNotFoundError(name)
    elif untrusted_method != "admin.vm.List":
        raise ProtocolError(f"{untrusted_method}: dom0 has none in the lab")
    return answer_call(inventory, qube, untrusted_arg).encode("ascii")


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


def answer(ctx: AdminContext, untrusted_request: bytes, now: float) -> bytes:
    """The reply frame for one complete request; never raises, never empty."""
    untrusted_method = "?"
    try:
        untrusted_header, sep, untrusted_payload = untrusted_request.partition(b"\0")
        if not sep:
            raise ProtocolError("request header is not NUL-terminated")
        untrusted_method, untrusted_arg, untrusted_source, untrusted_dest = parse_header(
            untrusted_header
        )
        if untrusted_method in LAB_READS and isinstance(ctx, LabInventory):
            data = lab_read(
                ctx, untrusted_method, untrusted_arg, untrusted_dest, untrusted_payload
            )
        else:
            data = handle_call(
                ctx, untrusted_method, untrusted_arg, untrusted_dest, untrusted_payload, now
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


async def start_server(socket_path: Path, ctx: AdminContext) -> asyncio.AbstractServer:
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
                reply = answer(ctx, untrusted_request, time.time())
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
