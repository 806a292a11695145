"""The hook in a target qube that opens its INPUT for forwarded flows.

A qube that serves a forward (or admits an inbound rule) runs no firewall
worker, so this small service does the target's part: on start and each
time dom0 completes ``/qns-input`` in the qube's QubesDB, it rebuilds chain
``qns-input`` in one nft transaction. Entries that do not parse open
nothing, and the log says why. Then it ends the tracked flows to this
qube that the old openings admitted and the new ones do not
(:mod:`agent_worker.conntrack`).
"""

from __future__ import annotations

import logging
import signal
import sys

import qubesdb

from agent_worker import conntrack, nft_chains
from agent_worker.directory import end_flows, read_completed, read_connected
from agent_worker.entries import EntryError, IPAddress, parse_address
from agent_worker.input_rules import INPUT_CHAIN, Opening, admits, chain_rules, parse_openings

log = logging.getLogger("qubes-network-server-input")

MARKER = "/qns-input"
#: This qube's own addresses, as dom0 writes them.
OWN_ADDRESS_KEYS = ("/qubes-ip", "/qubes-ip6")
HOOKS = {INPUT_CHAIN: nft_chains.BaseChainHook(parent="input")}


def read_openings(db: qubesdb.QubesDB) -> list[Opening]:
    """The openings dom0 completed, or none while a set is incomplete or bad."""
    untrusted_entries = read_completed(db, MARKER)
    if untrusted_entries is None:
        return []
    try:
        return parse_openings(untrusted_entries)
    except EntryError as err:
        log.error("refusing input openings, nothing opened: %s", err)
        return []


def _apply(openings: list[Opening]) -> None:
    nft_chains.apply(
        {family: {INPUT_CHAIN: chain_rules(openings, family)} for family in ("ip", "ip6")},
        HOOKS,
    )


def own_addresses(db: qubesdb.QubesDB) -> frozenset[IPAddress]:
    """This qube's addresses from QubesDB; a value that is no address is left out."""
    addresses = set()
    for key in OWN_ADDRESS_KEYS:
        untrusted_value = db.read(key)
        if not untrusted_value:
            continue
        try:
            addresses.add(parse_address(untrusted_value.decode("ascii")))
        except (UnicodeDecodeError, EntryError) as err:
            log.error("%s: ignoring it: %s", key, err)
    return frozenset(addresses)


def flows_to_end(
    db: qubesdb.QubesDB, before: list[Opening], after: list[Opening], tool: conntrack.Tool
) -> list[conntrack.Flow]:
    """Flows to this qube that ``before`` admitted and ``after`` does not.

    Only flows sent to one of its addresses and delivered here (not
    translated onwards), from elsewhere: not from itself and not from its
    own clients when it is a ProxyVM (they never pass ``qns-input``).
    """
    mine = own_addresses(db)
    clients, _problems = read_connected(db)
    ended = []
    for address in sorted(mine, key=lambda a: (a.version, a)):
        for flow in conntrack.list_flows(address.version, ["--orig-dst", str(address)], tool):
            if (
                flow.reply_src == address
                and flow.src not in mine
                and flow.src not in clients
                and admits(before, flow)
                and not admits(after, flow)
            ):
                ended.append(flow)
    return ended


def _end_flows(
    db: qubesdb.QubesDB, before: list[Opening], after: list[Opening], tool: conntrack.Tool
) -> None:
    if before != after:
        end_flows(lambda: flows_to_end(db, before, after, tool), "input openings", tool, log)


def update(
    db: qubesdb.QubesDB, in_force: list[Opening], tool: conntrack.Tool = conntrack.NETLINK
) -> list[Opening]:
    """Apply the current openings (if nft refuses them, close everything); what is in force.

    ``in_force`` is what the previous update left; flows it admitted that
    the new openings do not are ended.
    """
    openings = read_openings(db)
    try:
        _apply(openings)
    except nft_chains.NftError as err:
        log.error("nft refused the input openings, closing them all: %s", err)
        try:
            _apply([])
        except nft_chains.NftError as again:
            log.error("nft refused emptying them too, removing the chain: %s", again)
            close_all()
        _end_flows(db, in_force, [], tool)
        return []
    log.info("input openings applied: %d", len(openings))
    _end_flows(db, in_force, openings, tool)
    return openings


def close_all() -> None:
    """Remove ``qns-input`` and its jump: a stopped hook leaves nothing open behind it."""
    try:
        nft_chains.remove({family: [INPUT_CHAIN] for family in ("ip", "ip6")}, HOOKS)
    except nft_chains.NftError as err:
        log.error("could not remove the input openings: %s", err)
        return
    log.info("input openings removed")


def main() -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    db = qubesdb.QubesDB()
    db.watch(MARKER)
    try:
        in_force = update(db, [])
        while True:
            if db.read_watch() == MARKER:
                in_force = update(db, in_force)
    finally:
        close_all()


if __name__ == "__main__":
    sys.exit(main())
