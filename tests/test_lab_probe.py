"""The probe tool on loopback (no root needed) and its port list syntax."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lab.probe import parse_ports, scan


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _probe(*args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab.probe", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(params=["tcp", "udp"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int, subprocess.Popen[str]]]:
    proto = request.param
    port = _free_port(socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.probe", "serve", proto, str(port), "--reply", "pong",
         "--bind", "127.0.0.1"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == f"listening {proto} {port}"
    yield proto, port, proc
    proc.terminate()
    proc.wait(timeout=5)


def test_connect_gets_the_reply_and_server_prints_the_peer(
    server: tuple[str, int, subprocess.Popen[str]],
) -> None:
    proto, port, proc = server
    result = _probe("connect", proto, "127.0.0.1", str(port))
    assert (result.returncode, result.stdout) == (0, "pong\n")
    assert proc.stdout is not None
    assert proc.stdout.readline().split()[:2] == ["peer", "127.0.0.1"]


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_connect_exits_1_when_nothing_listens(proto: str) -> None:
    port = _free_port(socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    result = _probe("connect", proto, "127.0.0.1", str(port), "--timeout", "1")
    assert result.returncode == 1
    assert "no reply" in result.stderr


def test_scan_finds_exactly_the_open_ports() -> None:
    with socket.socket() as one, socket.socket() as two:
        for sock in (one, two):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        ports = sorted(int(s.getsockname()[1]) for s in (one, two))
        wanted = f"{ports[0] - 2}-{ports[0] + 2},{ports[1]}"
        assert scan("127.0.0.1", parse_ports(wanted), 1.0) == ports


def test_parse_ports() -> None:
    assert parse_ports("22,80,8000-8002") == [22, 80, 8000, 8001, 8002]
    assert parse_ports("5,5,4-5") == [4, 5]
    for bad in ("0", "65536", "9-8", "x", "1,,2"):
        with pytest.raises(ValueError):
            parse_ports(bad)
