"""Lab stand-in for the ``qubesdb`` Python module of Qubes OS.

Same API as the real module (``QubesDB``, ``Error``; ``read``, ``write``,
``rm``, ``multiread``, ``list``, ``watch``, ``unwatch``, ``read_watch``,
``watch_fd``, ``close``), talking to :mod:`lab.qubesdb_server`. Lab
processes get this directory on ``PYTHONPATH`` so that ``import qubesdb``
in the agent resolves here; on Qubes the real module is imported instead.

``QubesDB()`` opens the database of the qube named by ``$QUBESDB_QUBE``;
``QubesDB(name)`` opens another qube's database, as dom0 does. Sockets are
looked up in ``$QUBESDB_DIR``.
"""

from __future__ import annotations

import json
import os
import socket


class Error(Exception):
    """Raised like the real module's ``qubesdb.Error``."""


class _Channel:
    """One line-oriented JSON connection to the daemon.

    ``buffered``: read replies through a buffer, for a channel that only
    ever carries the reply to the request just sent (commands). A watch
    channel must not (its events are waited for with ``select`` on the
    socket: an event read ahead into a buffer would never wake it).
    """

    def __init__(self, path: str, buffered: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as err:
            self.sock.close()
            raise Error(f"cannot connect to QubesDB at {path}: {err}") from err
        self._reader = self.sock.makefile("rb") if buffered else None

    def send(self, request: dict) -> None:
        try:
            self.sock.sendall((json.dumps(request) + "\n").encode())
        except OSError as err:
            raise Error(f"QubesDB connection lost: {err}") from err

    def receive(self) -> dict:
        """Read one line: buffered, or byte by byte so nothing past it leaves the kernel."""
        if self._reader is not None:
            try:
                whole = self._reader.readline()
            except OSError as err:
                raise Error(f"QubesDB connection lost: {err}") from err
            if not whole.endswith(b"\n"):
                raise Error("QubesDB connection closed")
            return json.loads(whole)
        line = bytearray()
        while not line.endswith(b"\n"):
            try:
                chunk = self.sock.recv(1)
            except OSError as err:
                raise Error(f"QubesDB connection lost: {err}") from err
            if not chunk:
                raise Error("QubesDB connection closed")
            line += chunk
        return json.loads(line)

    def call(self, request: dict) -> object:
        self.send(request)
        reply = self.receive()
        if not reply.get("ok"):
            raise Error(reply.get("error", "QubesDB error"))
        return reply.get("result")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self.sock.close()


class QubesDB:
    """Connection to one qube's database."""

    def __init__(self, vmname: str | None = None) -> None:
        name = vmname if vmname is not None else os.environ.get("QUBESDB_QUBE")
        if not name:
            raise Error("no qube name: set QUBESDB_QUBE or pass one")
        directory = os.environ.get("QUBESDB_DIR", "/run/qubes-lab/qubesdb")
        self._socket_path = os.path.join(directory, f"{name}.sock")
        self._commands = _Channel(self._socket_path, buffered=True)
        self._watches: _Channel | None = None
        self._watch_channel_id = 0

    def read(self, path: str) -> bytes | None:
        value = self._commands.call({"op": "read", "path": path})
        return None if value is None else str(value).encode("latin-1")

    def write(self, path: str, value: str | bytes) -> None:
        if isinstance(value, str):
            value = value.encode()
        self._commands.call({"op": "write", "path": path, "value": value.decode("latin-1")})

    def rm(self, path: str) -> None:
        self._commands.call({"op": "rm", "path": path})

    def multiread(self, path: str) -> dict[str, bytes]:
        result = self._commands.call({"op": "multiread", "path": path})
        assert isinstance(result, dict)
        return {key: str(value).encode("latin-1") for key, value in result.items()}

    def list(self, path: str) -> list[str]:
        result = self._commands.call({"op": "list", "path": path})
        assert isinstance(result, list)
        return [str(key) for key in result]

    def _watch_channel(self) -> _Channel:
        if self._watches is None:
            self._watches = _Channel(self._socket_path)
            channel_id = self._watches.call({"op": "watch_channel"})
            assert isinstance(channel_id, int)
            self._watch_channel_id = channel_id
        return self._watches

    def watch(self, path: str) -> None:
        self._watch_channel()
        self._commands.call({"op": "watch", "path": path, "channel": self._watch_channel_id})

    def unwatch(self, path: str) -> None:
        self._watch_channel()
        self._commands.call({"op": "unwatch", "path": path, "channel": self._watch_channel_id})

    def read_watch(self) -> str:
        """Block until a watched path changes and return that path."""
        message = self._watch_channel().receive()
        if "event" not in message:
            raise Error("unexpected message on watch channel")
        return str(message["event"])

    def watch_fd(self) -> int:
        """File descriptor that becomes readable when a watch fired."""
        return self._watch_channel().sock.fileno()

    def close(self) -> None:
        self._commands.close()
        if self._watches is not None:
            self._watches.close()
