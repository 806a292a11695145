"""A minimal Admin API client for dom0, speaking qubesd's socket protocol.

It sends a call the way qubesadmin's ``QubesLocal.qubesd_call`` does and
reads the reply the way qubesadmin's ``_parse_qubesd_response`` does, so
it works against the real qubesd as well as the lab's stand-in. Errors
come back as typed exceptions that keep the remote class name.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

DEFAULT_SOCKET = "/var/run/qubesd.sock"

#: An Admin API transport: ``call(dest, method, arg, payload) -> reply data``,
#: raising QubesException. :func:`qubesd_call` is dom0's; the GUI also runs
#: over qubesadmin (admin_client_patch/gui/transport.py).
Call = Callable[[str, str, str, bytes], bytes]


class QubesException(Exception):
    """Any failed call; ``remote_type`` is qubesd's exception class name.

    The message is always one line, ready for ``qvm-firewall: error: ...``.
    """

    def __init__(self, message: str, remote_type: str = "") -> None:
        super().__init__(" ".join(message.split()) or "qubesd refused the call")
        self.remote_type = remote_type or type(self).__name__


class QubesValueError(QubesException, ValueError):
    """qubesd refused a value (a rule, a name)."""


class QubesVMNotFoundError(QubesException, KeyError):
    """The qube does not exist."""

    def __str__(self) -> str:
        return QubesException.__str__(self)


class QubesVMError(QubesException):
    """A problem with the qube's state (e.g. its stored firewall)."""


class QubesDaemonCommunicationError(QubesException):
    """qubesd could not be reached, or answered something unreadable."""


class QubesDaemonAccessError(QubesDaemonCommunicationError):
    """qubesd closed the connection without an answer."""


#: Remote class names with a client class of their own; the rest map to
#: QubesException, as in qubesadmin.
_BY_NAME: dict[str, type[QubesException]] = {
    cls.__name__: cls for cls in (QubesValueError, QubesVMNotFoundError, QubesVMError)
}


def socket_path() -> str:
    """Where qubesd listens: ``$QUBESD_SOCKET``, else the Qubes default."""
    return os.environ.get("QUBESD_SOCKET") or DEFAULT_SOCKET


def encode_request(dest: str, method: str, arg: str = "", payload: bytes = b"") -> bytes:
    """The bytes a dom0 client sends for one call."""
    try:
        return f"{method}+{arg} dom0 name {dest}\0".encode("ascii") + payload
    except UnicodeEncodeError:
        raise QubesValueError(f"not a valid qube name: {dest!r}") from None


def parse_reply(untrusted_reply: bytes) -> bytes:
    """The data of a success frame; raises the matching exception otherwise."""
    if not untrusted_reply:
        raise QubesDaemonAccessError(
            "got empty response from qubesd, see its log for details"
        )
    if untrusted_reply.startswith(b"0\0"):
        return untrusted_reply[2:]
    if untrusted_reply.startswith(b"2\0"):
        untrusted_fields = untrusted_reply.split(b"\0", 4)
        if len(untrusted_fields) != 5:
            raise QubesDaemonCommunicationError("truncated error reply from qubesd")
        _, untrusted_type, _traceback, untrusted_format, untrusted_args = untrusted_fields
        remote_type = untrusted_type.decode("ascii", "replace")
        args = tuple(a.decode("utf-8", "replace") for a in untrusted_args.split(b"\0")[:-1])
        template = untrusted_format.decode("utf-8", "replace")
        try:
            message = template % args
        except (TypeError, ValueError):
            message = template
        raise _BY_NAME.get(remote_type, QubesException)(message, remote_type)
    raise QubesDaemonCommunicationError("invalid response format from qubesd")


def qubesd_call(dest: str, method: str, arg: str = "", payload: bytes = b"") -> bytes:
    """Make one Admin API call as dom0 and return its reply data."""
    path = socket_path()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as err:
            raise QubesDaemonCommunicationError(
                f"failed to connect to qubesd at {path}: {err.strerror or err}"
            ) from None
        try:
            sock.sendall(encode_request(dest, method, arg, payload))
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # qubesd answered before reading it all; its reply says why
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as err:
            raise QubesDaemonCommunicationError(
                f"connection to qubesd lost: {err.strerror or err}"
            ) from None
    return parse_reply(b"".join(chunks))
