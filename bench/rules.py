"""Rule parsing and firewall.xml: cost per rule of a realistic mix against trivial rules.

Measured for N rules (default 100, 1000 and 9999, the most one list of a qube may
hold): ``parse_api_payload`` (what ``admin.vm.firewall.Set`` does with its
payload), ``firewall_xml_bytes`` (serialising), ``save_firewall_xml``
(serialise, write, fsync, rename) and ``load_firewall_xml``.

Baselines in the same run: the same work for N trivial ``action=accept``
lines, and a plain ``str.split`` of the payload into ``{key: value}``
dicts (the least any parser must do), so the ratios show what validation
and the lxml round trip cost per rule.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from bench.common import best_time, print_table, ratio, sizes_parser
from firewall_rules import RuleLists, load_firewall_xml, parse_api_payload, save_firewall_xml
from firewall_rules.storage import firewall_xml_bytes

DEFAULT_SIZES = (100, 1000, 9999)


def mixed_line(number: int, now: float) -> str:
    """One of five realistic rule shapes: outbound, forward, inbound, comments, expiry."""
    port = 1024 + number % 60000
    shape = number % 5
    if shape == 0:
        network = f"10.{number // 256 % 256}.{number % 256}.0/24"
        return f"action=accept dst4={network} proto=tcp dstports={port}"
    if shape == 1:
        return f"action=accept dsthost=host{number}.example.com proto=udp dstports=53-54"
    if shape == 2:
        return (
            f"action=forward forwardtype=external proto=tcp srcports={port} dstports=443 "
            f"srchost=192.168.{number % 256}.0/24 expire={int(now) + 86400} "
            f"comment=web server number {number}"
        )
    if shape == 3:
        return f"action=accept srchost=10.137.0.{number % 250 + 2} proto=tcp dstports=22"
    return f"action=drop dst6=2001:db8::{number % 65536:x}/128 proto=icmp icmptype=8"


def payload(lines: Sequence[str]) -> bytes:
    """An Admin API ``Set`` payload: one rule per line, each ending in a newline."""
    return "".join(line + "\n" for line in lines).encode("ascii")


def split_only(data: bytes) -> list[dict[str, str]]:
    """The least a parser must do: lines, words, ``key=value``; no validation."""
    return [
        dict(word.partition("=")[::2] for word in line.split(" "))
        for line in data.decode("ascii").splitlines()
    ]


def row(op: str, n: int, micro: dict[str, float], split: float | None) -> list[object]:
    """One table row; ``split`` is the str.split baseline (parsing only)."""
    return [
        op,
        n,
        f"{micro['mixed'] * n / 1000:.1f}",
        f"{micro['mixed']:.2f}",
        f"{micro['trivial']:.2f}",
        ratio(micro["mixed"], micro["trivial"]),
        "" if split is None else f"{split:.2f}",
        "" if split is None else ratio(micro["mixed"], split),
    ]


def per_rule(works: dict[str, Callable[[], object]], n: int) -> dict[str, float]:
    """Best microseconds per rule of each kind's work."""
    return {kind: best_time(work, max_runs=10) / n * 1e6 for kind, work in works.items()}


def measure(sizes: Sequence[int]) -> list[list[object]]:
    """One row per operation and size (see :func:`row`)."""
    now = time.time()
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="qns-bench-rules.") as tmp:
        path = Path(tmp) / "firewall.xml"
        for n in sizes:
            mixed = payload([mixed_line(i, now) for i in range(n)])
            runs = {"mixed": mixed, "trivial": payload(["action=accept"] * n)}
            split = best_time(partial(split_only, mixed)) / n * 1e6
            parsed = {kind: parse_api_payload(data, now) for kind, data in runs.items()}
            assert len(parsed["mixed"]) == n, "every mixed rule must parse"
            stored = {kind: RuleLists.sorted_out(rules) for kind, rules in parsed.items()}
            ops: dict[str, dict[str, Callable[[], object]]] = {
                "parse_api_payload": {
                    kind: partial(parse_api_payload, data, now) for kind, data in runs.items()
                },
                "firewall_xml_bytes": {
                    kind: partial(firewall_xml_bytes, lists, now) for kind, lists in stored.items()
                },
                "save_firewall_xml": {
                    kind: partial(save_firewall_xml, path, lists, now)
                    for kind, lists in stored.items()
                },
            }
            for op, works in ops.items():
                is_parse = op == "parse_api_payload"
                rows.append(row(op, n, per_rule(works, n), split if is_parse else None))
            load: dict[str, float] = {}
            for kind, lists in stored.items():
                save_firewall_xml(path, lists, now)
                assert len(load_firewall_xml(path).all()) == n
                load[kind] = per_rule({kind: partial(load_firewall_xml, path)}, n)[kind]
            rows.append(row("load_firewall_xml", n, load, None))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Print the rules table."""
    args = sizes_parser(__doc__.splitlines()[0], DEFAULT_SIZES).parse_args(argv)
    rows = measure(args.sizes)
    print_table(
        "rules: N rules of a realistic mix vs N trivial `action=accept` (best of runs)",
        ["operation", "N", "mixed ms", "mixed us/rule", "trivial us/rule", "mixed/trivial",
         "split us/rule", "mixed/split"],
        rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
