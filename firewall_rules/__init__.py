"""The rule language: outbound (upstream), forward and inbound rules.

Pure code: parsing from Admin API lines and firewall.xml, validation,
canonical output and QubesDB entry text. No Qubes imports, no I/O beyond
firewall.xml itself.

firewall.xml (:mod:`firewall_rules.storage`, lxml) is imported on first
use: the client and the agent never read it, and qvm-firewall's start-up
time is spent mostly on imports.
"""

from typing import Any

from firewall_rules.errors import FirewallFileError, RuleError
from firewall_rules.rule import (
    Rule,
    RuleKind,
    RuleLists,
    default_rules,
    outbound_qdb_entries,
    parse_api_payload,
)

#: Names of firewall_rules.storage this package gives on first use.
_STORAGE = ("RuleFiles", "load_firewall_xml", "read_rule_lists", "save_firewall_xml")


def __getattr__(name: str) -> Any:
    """``from firewall_rules import save_firewall_xml`` imports the storage module then."""
    if name in _STORAGE:
        from firewall_rules import storage

        return getattr(storage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FirewallFileError",
    "Rule",
    "RuleError",
    "RuleFiles",
    "RuleKind",
    "RuleLists",
    "default_rules",
    "load_firewall_xml",
    "outbound_qdb_entries",
    "parse_api_payload",
    "read_rule_lists",
    "save_firewall_xml",
]
