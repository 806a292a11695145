"""The hook in a target qube that opens its INPUT for forwarded flows.

A qube that serves a forward (or admits an inbound rule) runs no firewall
worker, so this small service does the target's part: on start and each
time dom0 completes ``/qns-input`` in the qube's QubesDB, it rebuilds chain
``qns-input`` in one nft transaction. Entries that do not parse open
nothing, and the log says why.
"""

from __future__ import annotations

import logging
import signal
import sys

import qubesdb

from agent_worker import nft_chains
from agent_worker.entries import EntryError
from agent_worker.input_rules import INPUT_CHAIN, Opening, chain_rules, parse_openings

log = logging.getLogger("qubes-network-server-input")

MARKER = "/qns-input"
HOOKS = {INPUT_CHAIN: nft_chains.BaseChainHook(parent="input")}


def read_openings(db: qubesdb.QubesDB) -> list[Opening]:
    """The openings dom0 completed, or none while a set is incomplete or bad."""
    if db.read(MARKER) is None:
        return []
    untrusted_entries = {
        path[len(MARKER) + 1 :]: value for path, value in db.multiread(MARKER + "/").items()
    }
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


def update(db: qubesdb.QubesDB) -> None:
    """Apply the current openings; if nft refuses them, close everything."""
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
        return
    log.info("input openings applied: %d", len(openings))


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
        update(db)
        while True:
            if db.read_watch() == MARKER:
                update(db)
    finally:
        close_all()


if __name__ == "__main__":
    sys.exit(main())
