"""How the panel reaches the Admin API: dom0's socket, or qubesadmin elsewhere.

In dom0 the project's own client talks to qubesd's socket. In a GUI qube
(and inside Qube Manager) qubesadmin carries the calls over qrexec; its
exceptions are turned into the project's, so the panel handles one kind.
"""

from __future__ import annotations

import os
from typing import Any

from admin_client_patch.qubesd_client import Call, QubesException, qubesd_call, socket_path


def qubesadmin_call(app: Any) -> Call:
    """A :data:`Call` over a ``qubesadmin.Qubes`` app (its ``qubesd_call``)."""
    import qubesadmin.exc  # only where qubesadmin is installed

    def call(dest: str, method: str, arg: str, payload: bytes) -> bytes:
        try:
            return bytes(app.qubesd_call(dest, method, arg or None, payload or None))
        except qubesadmin.exc.QubesException as err:
            raise QubesException(str(err), type(err).__name__) from None

    return call


def default_call() -> Call:
    """dom0's socket when there is one, else qubesadmin (a GUI qube), else the socket.

    The last case fails on first use with a message naming the socket.
    """
    if os.path.exists(socket_path()):
        return qubesd_call
    try:
        import qubesadmin
    except ImportError:
        return qubesd_call
    return qubesadmin_call(qubesadmin.Qubes())
