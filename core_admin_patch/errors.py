"""Exceptions of the dom0 side, named exactly as qubesd names them.

Only the class name and the message cross the Admin API socket, and
qubesadmin picks its own exception class by that name (``QubesValueError``,
``QubesVMNotFoundError``, ...). Keeping upstream's names and bases means a
real qubesadmin client, and the qubesd extension, see what they expect.
"""

from __future__ import annotations


class QubesException(Exception):
    """An error the user should see: its message goes back to the caller."""


class QubesValueError(QubesException, ValueError):
    """A value (a rule, a name) is invalid; nothing was changed."""


class QubesVMNotFoundError(QubesException, KeyError):
    """The destination qube does not exist."""

    def __init__(self, vmname: str) -> None:
        super().__init__(f"No such domain: {vmname!r}")
        self.vmname = vmname

    def __str__(self) -> str:
        # KeyError would quote the message again.
        return QubesException.__str__(self)


class QubesVMError(QubesException):
    """A problem with one qube's state (here: its stored firewall)."""

    def __init__(self, vm: object, msg: str) -> None:
        super().__init__(msg)
        self.vm = vm


class ProtocolError(AssertionError):
    """The request itself is malformed: a client bug, not a user error.

    Upstream derives it from AssertionError on purpose, so it is not a
    QubesException: only a broken or mismatched client can trigger it.
    """


class PermissionDenied(PermissionError):
    """The request is well formed but the caller may not make it."""
