"""``make demo``: the main job, in the lab, with the real commands.

Brings the default lab up, then, with qvm-firewall against the lab's
qubesd: an outbound rule allowing and refusing real connections from
``web``, and a forward rule making a page served in ``web`` reachable from
the LAN host through sys-firewall and sys-net; the rule removed, the page
is gone. Every command is printed before it runs; the lab is taken down at
the end whatever happens (``--keep`` leaves it up to explore).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from lab import procs
from lab.control import Lab, LabError

LAN_HOST = "192.0.2.10"
SYS_NET_UPLINK = "192.0.2.2"
PAGE = "Hello from web, served through sys-firewall and sys-net\n"

FETCH = (
    "import sys, urllib.request\n"
    "try:\n"
    "    print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode(), end='')\n"
    "except OSError as err:\n"
    "    print(f'fetch failed: {err}'); sys.exit(1)\n"
)


class DemoError(Exception):
    """A step did not do what the demo says it does."""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def qvm_firewall(lab: Lab, *args: str) -> str:
    """Run the real qvm-firewall against the lab's qubesd, echoing it."""
    print(f"$ qvm-firewall {shlex.join(args)}", flush=True)
    result = lab.exec("dom0", [*procs.python_argv("admin_client_patch.qvm_firewall"), *args])
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        raise DemoError(f"qvm-firewall failed: {result.stderr.strip()}")
    return result.stdout


def expect(what: str, got: bool, wanted: bool) -> None:
    mark = "yes" if got else "no"
    print(f"   {what}: {mark}", flush=True)
    if got != wanted:
        raise DemoError(f"expected {what}: {'yes' if wanted else 'no'}")


def tcp_reachable(lab: Lab, source: str, host: str, port: int) -> bool:
    with lab.serve("lan", "tcp", port):
        return lab.connect(source, "tcp", host, port, timeout=1.0) == "ok"


def fetch(lab: Lab, url: str) -> bool:
    """Fetch ``url`` from the LAN host, printing what came back."""
    print(f"lan$ fetch {url}", flush=True)
    result = lab.exec("lan", [sys.executable, "-c", FETCH, url], timeout=20)
    sys.stdout.write("   " + (result.stdout or result.stderr))
    return result.returncode == 0 and result.stdout == PAGE


def outbound(lab: Lab) -> None:
    say("Outbound (upstream Qubes): web may reach the LAN host on TCP 8080 only")
    qvm_firewall(lab, "web", "add", "--before", "0", "action=accept",
                 f"dsthost={LAN_HOST}", "proto=tcp", "dstports=8080")
    qvm_firewall(lab, "web", "add", "--before", "1", "action=drop")
    qvm_firewall(lab, "web", "list")
    expect(f"web -> {LAN_HOST}:8080", tcp_reachable(lab, "web", LAN_HOST, 8080), True)
    expect(f"web -> {LAN_HOST}:8081", tcp_reachable(lab, "web", LAN_HOST, 8081), False)
    expect(f"work -> {LAN_HOST}:8081", tcp_reachable(lab, "work", LAN_HOST, 8081), True)
    qvm_firewall(lab, "web", "reset")


def forward(lab: Lab, docroot: Path) -> None:
    say("Port forwarding: a web server in web, reachable from the LAN at sys-net:8080")
    (docroot / "index.html").write_text(PAGE)
    server = subprocess.Popen(
        lab.command("web", [sys.executable, "-m", "http.server", "80", "--bind", "0.0.0.0",
                            "--directory", str(docroot)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        url = f"http://{SYS_NET_UPLINK}:8080/"
        expect("page reachable before the rule", fetch(lab, url), False)
        qvm_firewall(lab, "web", "add", "action=forward", "forwardtype=external",
                     "proto=tcp", "srcports=8080", "dstports=80", "comment=demo web server")
        qvm_firewall(lab, "web", "list")
        expect("page reachable with the rule", fetch(lab, url), True)
        say("Only the forwarded port is open: a scan of sys-net's uplink from the LAN")
        open_ports = lab.scan("lan", SYS_NET_UPLINK, "1-1024,8000-8100", timeout=0.3)
        print(f"   open TCP ports at {SYS_NET_UPLINK}: {open_ports}", flush=True)
        if open_ports != [8080]:
            raise DemoError(f"expected only 8080 open, found {open_ports}")
        say("The rule removed: the page is gone")
        qvm_firewall(lab, "web", "del", "--rule-no", "forward:0")
        expect("page reachable after removal", fetch(lab, url), False)
    finally:
        server.terminate()
        server.wait(10)


def run(keep: bool, topology: Path | None) -> int:
    lab = Lab()
    say("Bringing the lab up: LAN host, sys-net, sys-firewall, web, work")
    lab.up(topology)
    try:
        qvm_firewall(lab, "web", "reset")
        outbound(lab)
        with tempfile.TemporaryDirectory(prefix="qns-demo-") as docroot:
            forward(lab, Path(docroot))
        say("Demo done: every step behaved as described")
        return 0
    except (DemoError, LabError) as err:
        print(f"\ndemo failed: {err}", file=sys.stderr)
        for log in ("dom0",):
            print(f"--- last lines of {log}'s log:\n{lab.log_tail(log)}", file=sys.stderr)
        return 1
    finally:
        if keep:
            print(f"\nThe lab stays up (state in {lab.state_dir}); 'qubes-lab down' removes it.")
        else:
            say("Taking the lab down")
            lab.down()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    parser.add_argument("--topology", type=Path, help="topology TOML (default: built-in)")
    args = parser.parse_args(argv)
    return run(args.keep, args.topology)


if __name__ == "__main__":
    sys.exit(main())
