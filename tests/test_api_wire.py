"""The qubesd socket protocol, byte for byte, against the lab's server."""

from __future__ import annotations

import asyncio
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_api_fixture import Dom0, running_dom0

from admin_client_patch import qubesd_client
from admin_client_patch.firewall import QubeFirewall, parse_paths
from lab.qubesd_server import MAX_REQUEST, encode_error, start_server


@pytest.fixture
def dom0(tmp_path: Path) -> Iterator[Dom0]:
    with running_dom0(tmp_path) as running:
        yield running


def raw_call(path: Path, request: bytes) -> bytes:
    """Send bytes as a client would (then shut down writing); all bytes back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def call(dom0: Dom0, method: str, dest: str, payload: bytes = b"", arg: str = "") -> bytes:
    header = f"{method}+{arg} dom0 name {dest}\0".encode()
    return raw_call(dom0.socket_path, header + payload)


class Raised(Exception):
    def __init__(self, exc_type: str, message: str) -> None:
        super().__init__(message)
        self.exc_type = exc_type


def parse_like_qubesadmin(reply: bytes) -> bytes:
    """qubesadmin's reading of a reply, restated independently of our client:
    ``0\\0`` then data; or ``2\\0`` and four NUL-split fields (type, traceback,
    format string, NUL-terminated args) with the message formatted by ``%``."""
    if reply[:2] == b"0\x00":
        return reply[2:]
    assert reply[:2] == b"2\x00", reply
    _, exc_type, _tb, fmt, args = reply.split(b"\x00", 4)
    arg_list = [a.decode() for a in args.split(b"\x00")[:-1]]
    raise Raised(exc_type.decode("ascii"), fmt.decode("utf-8") % tuple(arg_list))


def test_get_default_rule_success_frame(dom0: Dom0) -> None:
    assert call(dom0, "admin.vm.firewall.Get", "web") == b"0\0action=accept\n"


def test_set_then_get_success_frames(dom0: Dom0) -> None:
    reply = call(dom0, "admin.vm.firewall.Set", "web", b"action=drop proto=icmp\naction=accept\n")
    assert reply == b"0\0"
    lines = parse_like_qubesadmin(call(dom0, "admin.vm.firewall.Get", "web")).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(b"action=drop")
    assert dom0.host.reloaded == ["web"]


def test_unknown_qube_error_frame_exact(dom0: Dom0) -> None:
    reply = call(dom0, "admin.vm.firewall.Get", "nosuch")
    assert reply == b"2\0QubesVMNotFoundError\0\0No such domain: 'nosuch'\0"
    with pytest.raises(Raised) as info:
        parse_like_qubesadmin(reply)
    assert info.value.exc_type == "QubesVMNotFoundError"
    assert str(info.value) == "No such domain: 'nosuch'"


def test_unknown_method_is_a_framed_protocol_error(dom0: Dom0) -> None:
    reply = call(dom0, "admin.vm.firewall.Nope", "web")
    assert reply == b"2\0ProtocolError\0\0no such method: 'admin.vm.firewall.Nope'\0"


@pytest.mark.parametrize(
    ("method", "arg", "payload"),
    [
        ("admin.vm.firewall.Get", "x", b""),
        ("admin.vm.firewall.Get", "", b"action=accept\n"),
        ("admin.vm.firewall.Get", "forward", b"action=accept\n"),
        ("admin.vm.firewall.Reload", "", b"x"),
        ("admin.vm.firewall.Reload", "inbound", b""),
        ("admin.vm.firewall.Set", "x", b"action=accept\n"),
        ("admin.vm.firewall.Set", "", b""),  # upstream's Set needs a payload
    ],
)
def test_argument_or_payload_where_none_is_taken(
    dom0: Dom0, method: str, arg: str, payload: bytes
) -> None:
    reply = call(dom0, method, "web", payload, arg)
    assert reply.startswith(b"2\0ProtocolError\0\0")
    assert not dom0.host.firewall_path("web").exists()


FORWARD_443 = b"action=forward forwardtype=external proto=tcp srcports=443-443 dstports=443-443\n"


def test_each_list_has_its_own_get_and_set_frames(dom0: Dom0) -> None:
    assert call(dom0, "admin.vm.firewall.Set", "web", b"action=forward proto=tcp dstports=443\n",
                arg="forward") == b"0\0"
    assert call(dom0, "admin.vm.firewall.Get", "web", arg="forward") == b"0\0" + FORWARD_443
    assert call(dom0, "admin.vm.firewall.Get", "web", arg="inbound") == b"0\0"
    assert call(dom0, "admin.vm.firewall.Get", "web") == b"0\0action=accept\n"
    reply = call(dom0, "admin.vm.firewall.Set", "web", b"action=drop\n" + FORWARD_443)
    assert reply == (
        b"2\0QubesValueError\0\0rule 1 (" + FORWARD_443[:-1] + b") is a forward rule:"
        b" admin.vm.firewall.Set takes outbound rules only, use admin.vm.firewall.Set+forward\0"
    )
    assert call(dom0, "admin.vm.firewall.Get", "web", arg="forward") == b"0\0" + FORWARD_443


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"no terminator at all",
        b"admin.vm.firewall.Get+ dom0 web\0",
        b"admin.vm.firewall.Get+ dom0 uuid web\0",
        b"admin.vm.firewall.Get+ dom0 name web extra\0",
        b"admin.vm.firewall.Get+ dom0 name w\xc3\xa9b\0",
        b"",
    ],
)
def test_framing_errors_get_an_answer(dom0: Dom0, request_bytes: bytes) -> None:
    reply = raw_call(dom0.socket_path, request_bytes)
    assert reply.startswith(b"2\0ProtocolError\0\0")
    assert reply.endswith(b"\0")


def test_keyword_adminvm_means_dom0(dom0: Dom0) -> None:
    reply = raw_call(dom0.socket_path, b"admin.vm.firewall.Get+ dom0 keyword adminvm\0")
    assert reply == b"2\0QubesVMNotFoundError\0\0No such domain: 'dom0'\0"


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ("9web", "VM name contains illegal characters"),
        ("a" * 32, "VM name must be shorter than 32 characters"),
        ("web.xml", "VM name contains illegal characters"),
        ("..", "VM name contains illegal characters"),
        ("default", "VM name cannot be 'none' nor 'default'"),
        ("Domain-0", "VM name cannot be 'Domain-0'"),
        ("web-dm", "VM name cannot end with -dm"),
    ],
)
def test_destination_name_checked_before_lookup(dom0: Dom0, dest: str, message: str) -> None:
    reply = call(dom0, "admin.vm.firewall.Get", dest)
    assert reply == b"2\0QubesValueError\0\0" + message.encode() + b"\0"


def test_bad_line_rejects_everything_and_keeps_file_identical(dom0: Dom0) -> None:
    assert call(dom0, "admin.vm.firewall.Set", "web", b"action=drop\n") == b"0\0"
    before = dom0.host.firewall_path("web").read_bytes()
    reply = call(
        dom0, "admin.vm.firewall.Set", "web", b"action=accept\naction=maybe\naction=drop\n"
    )
    with pytest.raises(Raised) as info:
        parse_like_qubesadmin(reply)
    assert info.value.exc_type == "QubesValueError"
    assert "\n" not in str(info.value)
    assert "maybe" in str(info.value)
    assert dom0.host.firewall_path("web").read_bytes() == before
    assert dom0.host.reloaded == ["web"]  # only the first, good Set


@pytest.mark.parametrize("arg", ["", "forward", "inbound"])
def test_non_ascii_payload_is_a_protocol_error_as_upstream(dom0: Dom0, arg: str) -> None:
    reply = call(dom0, "admin.vm.firewall.Set", "web", "action=accept comment=café\n".encode(),
                 arg=arg)
    assert reply == b"2\0ProtocolError\0\0firewall rules must be ASCII text\0"
    assert not dom0.host.firewall_path("web").exists()


def test_whole_system_refusal_saves_nothing(dom0: Dom0) -> None:
    assert call(dom0, "admin.vm.firewall.Set", "work", FORWARD_443, arg="forward") == b"0\0"
    reply = call(dom0, "admin.vm.firewall.Set", "web", FORWARD_443, arg="forward")
    assert reply == (
        b"2\0QubesValueError\0\0tcp port 443 on 'sys-firewall' is wanted by both"
        b" 'work' (forward rule 0) and 'web' (forward rule 0)\0"
    )
    assert not dom0.host.firewall_path("web").exists()
    assert dom0.host.reloaded == ["work"]


def test_percent_in_message_survives_qubesadmin_formatting(dom0: Dom0) -> None:
    dom0.host.refuse = "100% of ports %s taken"
    reply = call(dom0, "admin.vm.firewall.Set", "web", b"action=drop\n")
    assert b"100%% of ports %%s taken" in reply
    with pytest.raises(Raised) as info:
        parse_like_qubesadmin(reply)
    assert str(info.value) == "100% of ports %s taken"


def test_corrupt_firewall_xml_names_the_qube_and_server_survives(dom0: Dom0) -> None:
    path = dom0.host.firewall_path("web")
    path.parent.mkdir(parents=True)
    path.write_text("<firewall version='2'><rules><rule>")
    with pytest.raises(Raised) as info:
        parse_like_qubesadmin(call(dom0, "admin.vm.firewall.Get", "web"))
    assert info.value.exc_type == "QubesVMError"
    assert str(info.value).startswith("web: firewall rules cannot be loaded")
    assert call(dom0, "admin.vm.firewall.Get", "work") == b"0\0action=accept\n"
    # A broken file is replaced by hand (a Set would have to keep its other lists).
    assert call(dom0, "admin.vm.firewall.Set", "web", b"action=accept\n").startswith(
        b"2\0QubesVMError\0"
    )


def test_unexpected_exception_is_a_generic_qubes_exception(
    dom0: Dom0, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(qube: object) -> None:
        raise RuntimeError("secret internal detail")

    dom0.host.reload = explode  # type: ignore[method-assign]
    reply = call(dom0, "admin.vm.firewall.Reload", "web")
    assert reply.startswith(b"2\0QubesException\0\0")
    assert b"secret" not in reply
    assert "secret internal detail" in caplog.text


def test_request_too_long_is_refused(dom0: Dom0) -> None:
    payload = b"action=accept comment=" + b"x" * MAX_REQUEST + b"\n"
    reply = call(dom0, "admin.vm.firewall.Set", "web", payload)
    assert reply.startswith(b"2\0ProtocolError\0\0request too long")
    assert not dom0.host.firewall_path("web").exists()


def test_reload_applies_again(dom0: Dom0) -> None:
    assert call(dom0, "admin.vm.firewall.Reload", "web") == b"0\0"
    assert dom0.host.reloaded == ["web"]


def test_socket_mode_is_group_only(dom0: Dom0) -> None:
    mode = stat.S_IMODE(dom0.socket_path.stat().st_mode)
    assert mode == 0o660


def test_client_parses_replies_into_typed_errors(
    dom0: Dom0, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUBESD_SOCKET", str(dom0.socket_path))
    assert qubesd_client.qubesd_call("web", "admin.vm.firewall.Get") == b"action=accept\n"
    with pytest.raises(qubesd_client.QubesVMNotFoundError) as info:
        qubesd_client.qubesd_call("nosuch", "admin.vm.firewall.Get")
    assert info.value.remote_type == "QubesVMNotFoundError"
    assert str(info.value) == "No such domain: 'nosuch'"
    with pytest.raises(qubesd_client.QubesException) as generic:
        qubesd_client.qubesd_call("web", "admin.vm.firewall.Nope")
    assert generic.value.remote_type == "ProtocolError"


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"", qubesd_client.QubesDaemonAccessError),
        (b"1\0event", qubesd_client.QubesDaemonCommunicationError),
        (b"2\0QubesValueError\0", qubesd_client.QubesDaemonCommunicationError),
        (encode_error("QubesValueError", "bad"), qubesd_client.QubesValueError),
        (encode_error("SomethingNew", "odd"), qubesd_client.QubesException),
    ],
)
def test_client_reply_parsing(reply: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        qubesd_client.parse_reply(reply)


def test_client_request_bytes_match_qubesadmin() -> None:
    assert qubesd_client.encode_request("web", "admin.vm.firewall.Set", "", b"x\n") == (
        b"admin.vm.firewall.Set+ dom0 name web\0x\n"
    )


def test_stale_socket_replaced_live_one_kept(dom0: Dom0, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        asyncio.run(start_server(dom0.socket_path, dom0.server))
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(stale))

    async def start_and_stop() -> None:
        server = await start_server(stale, dom0.server)
        server.close()
        await server.wait_closed()

    asyncio.run(start_and_stop())


FORWARD = b"action=forward forwardtype=internal proto=udp srcports=5353 dstports=53\n"


def test_get_paths_success_frame_exact(dom0: Dom0) -> None:
    assert call(dom0, "admin.vm.firewall.Set", "work", FORWARD, arg="forward") == b"0\0"
    assert call(dom0, "admin.vm.firewall.GetPaths", "work") == (
        b"0\0000 sys-firewall (10.137.0.6) from its qubes udp/5353"
        b" -> work (10.137.0.21) udp/53\n"
    )
    assert call(dom0, "admin.vm.firewall.GetPaths", "web") == b"0\0"


def test_get_routing_success_frame_exact(dom0: Dom0) -> None:
    assert call(dom0, "admin.vm.firewall.GetRouting", "web") == b"0\0"  # not routed
    dom0.host.qubes["web"].features["routing-method"] = "forward"
    assert call(dom0, "admin.vm.firewall.GetRouting", "web") == (
        b"0\0not exposed: 'web' is not running\n"
    )
    assert call(dom0, "admin.vm.firewall.GetRouting", "web", b"x").startswith(
        b"2\0ProtocolError\0"
    )
    assert call(dom0, "admin.vm.firewall.GetRouting", "web", arg="forward").startswith(
        b"2\0ProtocolError\0"
    )


def test_get_paths_refuses_payload_with_a_framed_error(dom0: Dom0) -> None:
    reply = call(dom0, "admin.vm.firewall.GetPaths", "web", b"x")
    assert reply.startswith(b"2\0ProtocolError\0\0")
    assert call(dom0, "admin.vm.firewall.GetPaths", "nosuch").startswith(
        b"2\0QubesVMNotFoundError\0"
    )


def test_client_reads_paths(dom0: Dom0, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUBESD_SOCKET", str(dom0.socket_path))
    call(dom0, "admin.vm.firewall.Set", "work", FORWARD, arg="forward")
    assert QubeFirewall("work").paths() == {
        0: "sys-firewall (10.137.0.6) from its qubes udp/5353 -> work (10.137.0.21) udp/53"
    }


@pytest.mark.parametrize(
    "reply",
    [b"0 a", b"x a\n", b"01 a\n", b"1\n", b"1 \n", b"1 a\x1b[2J\n", b"1 caf\xc3\xa9\n",
     b"1234567 a\n"],
)
def test_client_refuses_malformed_paths(reply: bytes) -> None:
    with pytest.raises(qubesd_client.QubesDaemonCommunicationError):
        parse_paths(reply)


def test_client_paths_parsing() -> None:
    assert parse_paths(b"") == {}
    assert parse_paths(b"0 a -> b\n12 c (10.0.0.1) tcp/1-2\n") == {
        0: "a -> b", 12: "c (10.0.0.1) tcp/1-2"
    }
