"""The inbound kind of the firewall worker: ``/qns-inbound/`` to chain ``qns-inbound``.

An inbound rule of qube T (``action=accept|drop srchost=NET [proto=]
[dstports=|icmptype=]``) decides which of T's sibling qubes may open
connections to T. Qubes drops all traffic between the qubes of one netvm
in table ``qubes``' forward chain (``oifgroup 2 counter drop``: towards a
vif), so the netvm's worker puts T's rules, in order, into chain
``qns-inbound`` of that table, jumped to from ``forward`` after the user's
``custom-forward`` and after our ``qns-forward`` (forwards are decided
first, as in T's own INPUT), ahead of that drop. A packet no rule matches
falls through to Qubes' drop: the default stays deny.

Every rule matches ``iifgroup 2`` (the sender is one of this netvm's
qubes, whose source address the antispoof chain already checked), T's
address, the rule's source and ``ct state new``: only new connections are
decided here, replies are accepted by Qubes' own ``established`` rule.
The sender's outbound rules (table ``qubes-firewall``) still apply to its
traffic, in the same hook: both must let it through.

Entries use the grammar of ``/qns-input/`` (:mod:`agent_worker.input_rules`)
with ``srchost`` required and of the target's family. One bad entry and
the target gets no rule at all (its siblings stay refused), as forwards.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent_worker import conntrack
from agent_worker.directory import ChainDirectory, InForce, Target, address_order, by_address
from agent_worker.entries import (
    EntryError,
    Family,
    IPAddress,
    Refused,
    family_of,
    parse_numbered,
)
from agent_worker.input_rules import (
    ONLY_NEW_WALK,
    ONLY_SYN_OPENS,
    Opening,
    admits,
    input_rule,
    parse_opening,
)
from agent_worker.nft_chains import BaseChainHook

INBOUND_DIR = "/qns-inbound/"
HANDLED_DIR = "/qns-inbound_handled/"
INBOUND_CHAIN = "qns-inbound"
HOOKS = {INBOUND_CHAIN: BaseChainHook(parent="forward", after=("qns-forward",))}


def parse_target(address: IPAddress, untrusted_entries: dict[str, bytes]) -> list[Opening]:
    """All rules of one target directory, in key order; any bad entry fails it."""

    def parse_one(untrusted_text: str) -> Opening:
        rule = parse_opening(untrusted_text)
        if rule.srchost is None:
            raise EntryError("missing srchost")
        if rule.srchost.version != address.version:
            raise EntryError("srchost of another family than the target")
        return rule

    return parse_numbered(untrusted_entries, parse_one)


def forward_rule(address: IPAddress, rule: Opening) -> str:
    """nft rule body in the netvm's ``qns-inbound`` for one rule of target ``address``."""
    family = family_of(address)
    return f"iifgroup 2 {family} daddr {address} {input_rule(rule, family)}"


def desired_chains(targets: Mapping[IPAddress, Target]) -> dict[Family, dict[str, list[str]]]:
    """``qns-inbound`` in both families: targets in address order, rules in key order."""
    result: dict[Family, dict[str, list[str]]] = {"ip": {}, "ip6": {}}
    for family, version in (("ip", 4), ("ip6", 6)):
        rules = [
            forward_rule(address, rule)
            for address, target in by_address(targets)
            if address.version == version and not isinstance(target, Refused)
            for rule in target
        ]
        result[family][INBOUND_CHAIN] = [ONLY_NEW_WALK, ONLY_SYN_OPENS, *rules] if rules else []
    return result


class Inbound(ChainDirectory):
    """The inbound kind: ``/qns-inbound/`` rules to chain ``qns-inbound``."""

    DIRECTORY = INBOUND_DIR
    HANDLED = HANDLED_DIR
    CHAINS = (INBOUND_CHAIN,)
    HOOKS = HOOKS
    LABEL = "inbound rules"
    KIND = "inbound"
    ITEMS = "rules"

    def parse(self, address: IPAddress, untrusted_entries: dict[str, bytes]) -> tuple[Opening, ...]:
        return tuple(parse_target(address, untrusted_entries))

    def destination(self, address: IPAddress, item: Opening) -> IPAddress:
        return address

    def desired(self, targets: Mapping[IPAddress, Target]) -> dict[Family, dict[str, list[str]]]:
        return desired_chains(targets)

    def flows_to_end(self, before: InForce, after: InForce) -> list[conntrack.Flow]:
        """Flows from a sibling to a target whose rules admitted them and admit them no more.

        Only targets whose rules changed (or that left) are listed, and only
        untranslated flows from this netvm's other clients: a flow some
        other rule of the user let through (``custom-forward``) stays.
        """
        ended = []
        changed = [a for a in before if after.get(a) != before[a]]
        for address in sorted(changed, key=address_order):
            old, new = before[address], after.get(address, ())
            for flow in conntrack.list_flows(address.version, ["--orig-dst", str(address)],
                                             self.tool):
                if (
                    flow.reply_src == address
                    and flow.src in self.connected
                    and flow.src != address
                    and admits(old, flow)
                    and not admits(new, flow)
                ):
                    ended.append(flow)
        return ended
