"""QubesDB stand-in daemon: one in-memory database per qube, as in Qubes.

Each qube's database is served on its own Unix socket
``<dir>/<qube>.sock``. Unix sockets live in the file system, not in a
network namespace, so an agent running inside a qube's namespace reaches
its database exactly like dom0 does.

Wire format (private to this module and :mod:`lab.pyshim.qubesdb`): one
JSON object per line. Requests ``{"op": ..., "path": ..., "value": ...}``
are answered with ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. A connection that sends
``{"op": "watch_channel"}`` is answered with a channel number and from then
on only receives lines ``{"event": PATH}``, one per change matching the
watches registered (over the command connection) with
``{"op": "watch"|"unwatch", "path": ..., "channel": N}``. Keeping events
alone on their socket makes ``watch_fd`` readable exactly when an event is
pending. Values travel as latin-1 text so any byte string survives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
from pathlib import Path

# Limits of the real qubesdb daemon (QDB_MAX_PATH, QDB_MAX_DATA).
MAX_PATH = 64
MAX_DATA = 3072
_PATH_RE = re.compile(r"^/[A-Za-z0-9_./:@-]*$")


class QdbError(Exception):
    """A request the real daemon would refuse."""


def check_path(untrusted_path: object, *, allow_dir: bool) -> str:
    """Validate a path as qubesdb-daemon does, before it touches the store."""
    if not isinstance(untrusted_path, str) or not _PATH_RE.match(untrusted_path):
        raise QdbError("invalid path")
    if len(untrusted_path.encode()) > MAX_PATH:
        raise QdbError("path too long")
    if untrusted_path.endswith("/") and not allow_dir:
        raise QdbError("path must not end with /")
    return untrusted_path


def watch_matches(watched: str, changed: str) -> bool:
    """A watch fires for changes at or below it, or for removal of a parent dir."""
    return changed.startswith(watched) or (changed.endswith("/") and watched.startswith(changed))


class Database:
    """One qube's key-value store and the watch channels listening to it."""

    def __init__(self) -> None:
        self.entries: dict[str, bytes] = {}
        self.watchers: dict[int, tuple[asyncio.StreamWriter, set[str]]] = {}
        self._next_channel = 1

    def notify(self, changed: str) -> None:
        line = (json.dumps({"event": changed}) + "\n").encode()
        for writer, paths in list(self.watchers.values()):
            if any(watch_matches(p, changed) for p in paths):
                writer.write(line)

    def drop_channel(self, writer: asyncio.StreamWriter) -> None:
        for channel, (owner, _) in list(self.watchers.items()):
            if owner is writer:
                del self.watchers[channel]

    def handle(self, request: dict, writer: asyncio.StreamWriter) -> object:
        op = request.get("op")
        if op == "read":
            path = check_path(request.get("path"), allow_dir=False)
            value = self.entries.get(path)
            return None if value is None else value.decode("latin-1")
        if op == "write":
            path = check_path(request.get("path"), allow_dir=False)
            untrusted_value = request.get("value")
            if not isinstance(untrusted_value, str):
                raise QdbError("invalid value")
            value = untrusted_value.encode("latin-1")
            if len(value) > MAX_DATA:
                raise QdbError("value too long")
            self.entries[path] = value
            self.notify(path)
            return None
        if op == "rm":
            path = check_path(request.get("path"), allow_dir=True)
            if path.endswith("/"):
                for key in [k for k in self.entries if k.startswith(path)]:
                    del self.entries[key]
            else:
                self.entries.pop(path, None)
            self.notify(path)
            return None
        if op in ("multiread", "list"):
            prefix = check_path(request.get("path"), allow_dir=True)
            keys = sorted(k for k in self.entries if k.startswith(prefix))
            if op == "list":
                return keys
            return {k: self.entries[k].decode("latin-1") for k in keys}
        if op in ("watch", "unwatch"):
            channel = self.watchers.get(request.get("channel"))  # type: ignore[arg-type]
            if channel is None:
                raise QdbError("no such watch channel")
            path = check_path(request.get("path"), allow_dir=True)
            if op == "watch":
                channel[1].add(path)
            else:
                channel[1].discard(path)
            return None
        if op == "watch_channel":
            channel_id = self._next_channel
            self._next_channel += 1
            self.watchers[channel_id] = (writer, set())
            return channel_id
        raise QdbError("unknown operation")


class Server:
    """Serves one Database per qube name on ``<directory>/<name>.sock``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.databases: dict[str, Database] = {}
        self.servers: dict[str, asyncio.AbstractServer] = {}

    async def add(self, name: str) -> None:
        """Create (or reset, like a qube restart does) the database of ``name``."""
        db = self.databases.get(name)
        if db is not None:
            db.entries.clear()
            return
        db = Database()
        self.databases[name] = db
        sock = self.directory / f"{name}.sock"
        sock.unlink(missing_ok=True)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(db, reader, writer)

        self.servers[name] = await asyncio.start_unix_server(serve, path=str(sock))
        os.chmod(sock, 0o600)

    async def _serve(
        self, db: Database, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise QdbError("request must be an object")
                    reply = {"ok": True, "result": db.handle(request, writer)}
                except (QdbError, ValueError, UnicodeError) as err:
                    reply = {"ok": False, "error": str(err)}
                writer.write((json.dumps(reply) + "\n").encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            db.drop_channel(writer)
            writer.close()


async def serve_forever(directory: Path, names: list[str], ready_file: Path | None) -> None:
    """Run the daemon until SIGTERM/SIGINT; SIGHUP-free, state is in memory only."""
    directory.mkdir(parents=True, exist_ok=True)
    server = Server(directory)
    for name in names:
        await server.add(name)
    control = await asyncio.start_unix_server(
        lambda r, w: _control(server, r, w), path=str(directory / "control.sock")
    )
    if ready_file is not None:
        ready_file.write_text(str(os.getpid()))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    control.close()
    for srv in server.servers.values():
        srv.close()


async def _control(
    server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Control channel: ``add NAME`` creates or resets a qube's database."""
    line = (await reader.readline()).decode(errors="replace").split()
    if len(line) == 2 and line[0] == "add" and re.fullmatch(r"[A-Za-z0-9_.-]{1,31}", line[1]):
        await server.add(line[1])
        writer.write(b"ok\n")
    else:
        writer.write(b"error\n")
    await writer.drain()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="QubesDB stand-in for the lab")
    parser.add_argument("--dir", required=True, type=Path, help="socket directory")
    parser.add_argument("--ready-file", type=Path, help="written with our pid once serving")
    parser.add_argument("names", nargs="*", help="qubes to create databases for")
    args = parser.parse_args()
    asyncio.run(serve_forever(args.dir, args.names, args.ready_file))


if __name__ == "__main__":
    main()
