"""``qubes-lab``: a Qubes network without Xen, one network namespace per qube.

    qubes-lab up [--topology FILE]     bring the lab up (idempotent)
    qubes-lab down                     stop and remove everything (also after a crash)
    qubes-lab status                   qubes, addresses, vifs, processes
    qubes-lab exec QUBE -- CMD...      run CMD in a qube, a LAN host, or dom0
    qubes-lab start|stop|restart QUBE  qube life cycle
    qubes-lab set QUBE netvm NAME|none / ip ADDR / ip6 ADDR|none / provides_network true|false
    qubes-lab features QUBE NAME VALUE|--unset   e.g. features sys-net ipv6 1

The state lives in ``$QUBES_LAB_DIR`` (default /run/qubes-lab). Point
qvm-firewall at the lab with ``export QUBESD_SOCKET=$QUBES_LAB_DIR/qubesd.sock``
or run it as ``qubes-lab exec dom0 -- qvm-firewall ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lab.control import Lab, LabError
from lab.netns import CommandError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qubes-lab",
        description="A Qubes network without Xen: one network namespace per qube.",
        epilog="State directory: $QUBES_LAB_DIR (default /run/qubes-lab).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="bring the lab up (no-op if already up)")
    up.add_argument("--topology", type=Path, help="topology TOML file (default: built-in)")
    commands.add_parser("down", help="stop everything and remove namespaces and state")
    status = commands.add_parser("status", help="show qubes, addresses, vifs, processes")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    run = commands.add_parser("exec", help="run a command in a qube, LAN host or dom0")
    run.add_argument("target", help="qube, LAN host, or dom0 (QUBESD_SOCKET set)")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    for name, text in (("start", "start a qube (and its netvm)"),
                       ("stop", "stop a qube"), ("restart", "stop and start a qube")):
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("qube")
        if name == "stop":
            cmd.add_argument("--force", action="store_true",
                             help="also when other running qubes use it as netvm")
    prefs = commands.add_parser(
        "set", help="change netvm, ip or ip6 (re-wiring live), or provides_network"
    )
    prefs.add_argument("qube")
    prefs.add_argument("property", choices=("netvm", "ip", "ip6", "provides_network"))
    prefs.add_argument("value", help="netvm: a qube name or 'none'; ip: an IPv4 address;"
                       " ip6: an IPv6 address, or 'none' for the derived one;"
                       " provides_network: true or false")
    features = commands.add_parser(
        "features", help="set or unset a feature like qvm-features (ipv6 re-wires live)"
    )
    features.add_argument("qube")
    features.add_argument("feature", help="e.g. ipv6 ('1': on for it and below, '': off)")
    value = features.add_mutually_exclusive_group(required=True)
    value.add_argument("value", nargs="?", help="the new value ('' is a value: ipv6 off)")
    value.add_argument("--unset", action="store_true", help="remove the feature")
    return parser


def _print_status(status: dict[str, Any]) -> None:
    daemons = status["daemons"]
    for name in ("dom0", "qubesdb"):
        pid = daemons.get(name)
        print(f"{name}: {'running, pid ' + str(pid) if pid else 'not running'}")
    if not daemons.get("dom0") and status["qubes"]:
        print("dom0 is gone: below is the last state it saved; 'qubes-lab down' cleans up")
    rows = [("QUBE", "NETVM", "IP", "IP6", "STATE", "DOMID", "VIF", "PROCESSES")]
    for qube in status["qubes"]:
        services = " ".join(
            f"{label}={'up' if info['alive'] else 'DEAD'}"
            for label, info in sorted(qube.get("services", {}).items())
        )
        rows.append((
            qube["name"], qube["netvm"] or "-", qube["ip"], qube.get("ip6") or "-",
            "running" if qube["running"] else "halted",
            str(qube["domid"] or "-"), qube["vif"] or "-", services or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    lan = status.get("topology", {}).get("lan")
    if lan:
        for host in lan["hosts"]:
            print(f"LAN host {host['name']}: {', '.join(host['addresses'])}")
    print(f"namespaces: {' '.join(status['namespaces']) or '-'}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    lab = Lab()
    try:
        if args.command == "up":
            lab.up(args.topology)
            print(f"lab is up; export QUBESD_SOCKET={lab.qubesd_socket} for qvm-firewall")
        elif args.command == "down":
            lab.down()
        elif args.command == "status":
            status = lab.status()
            if args.json:
                print(json.dumps(status, indent=2))
            else:
                _print_status(status)
        elif args.command == "exec":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not command:
                print("qubes-lab exec: missing command (qubes-lab exec QUBE -- CMD...)",
                      file=sys.stderr)
                return 2
            wrapped = lab.command(args.target, command)
            os.execvpe(wrapped[0], wrapped, lab.env(args.target))
        elif args.command == "start":
            lab.start(args.qube)
        elif args.command == "stop":
            lab.stop(args.qube, force=args.force)
        elif args.command == "restart":
            lab.restart(args.qube)
        elif args.command == "set":
            lab.set(args.qube, args.property, args.value)
        elif args.command == "features":
            lab.set_feature(args.qube, args.feature, None if args.unset else args.value)
    except (LabError, CommandError) as err:
        print(f"qubes-lab: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"qubes-lab: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
