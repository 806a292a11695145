"""The rule language: outbound (upstream), forward and inbound rules.

Pure code: parsing from Admin API lines and firewall.xml, validation,
canonical output and QubesDB entry text. No Qubes imports, no I/O beyond
firewall.xml itself.
"""

from firewall_rules.errors import FirewallFileError, RuleError
from firewall_rules.rule import (
    Rule,
    RuleKind,
    RuleLists,
    default_rules,
    outbound_qdb_entries,
    parse_api_payload,
)
from firewall_rules.storage import load_firewall_xml, read_rule_lists, save_firewall_xml

__all__ = [
    "FirewallFileError",
    "Rule",
    "RuleError",
    "RuleKind",
    "RuleLists",
    "default_rules",
    "load_firewall_xml",
    "outbound_qdb_entries",
    "parse_api_payload",
    "read_rule_lists",
    "save_firewall_xml",
]
