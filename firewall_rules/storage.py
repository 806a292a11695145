"""firewall.xml: read versions 1, 2 and 3, write 2 or 3, atomically.

Version 2 is upstream's format. A list holding forward or inbound rules is
written as version 3 with the same structure: an older qubesd refuses the
file instead of loading it without ``srchost`` (which would widen a rule).
Reading goes through the same option classes as the Admin API, so a file
edited by hand is held to the same rules.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import lxml.etree

from firewall_rules.errors import FirewallFileError, RuleError
from firewall_rules.options import shown
from firewall_rules.rule import MAX_RULES, Rule, RuleKind

#: A firewall.xml bigger than this is not ours (MAX_RULES rules fit easily).
FILE_MAX = 16 * 1024 * 1024


def _parser() -> lxml.etree.XMLParser:
    """No entities, no network, no huge trees: the file is data, nothing more."""
    return lxml.etree.XMLParser(
        resolve_entities=False, no_network=True, huge_tree=False, remove_comments=True,
        remove_pis=True,
    )


def _rule_v2(xml_rule: lxml.etree._Element, version: str) -> Rule:
    """One ``<rule><properties><property name=...>`` element."""
    properties = xml_rule.find("properties")
    if xml_rule.tag != "rule" or properties is None:
        raise RuleError("expected <rule><properties>...")
    pairs = []
    for prop in properties:
        name = prop.get("name")
        if prop.tag != "property" or name is None:
            raise RuleError("expected <property name=...>")
        pairs.append((name, prop.text or ""))
    rule = Rule.from_options(pairs)
    if version == "2" and rule.kind is not RuleKind.OUTBOUND:
        raise RuleError(f"{rule.kind.value} rule in a version 2 file")
    return rule


def _rules_v1(root: lxml.etree._Element) -> list[Rule]:
    """Qubes 3.x format: a policy, dns/icmp switches and address rules."""
    policy = root.get("policy")
    if policy not in ("allow", "deny"):
        raise RuleError(f"policy={shown(str(policy))} must be allow or deny")

    def action_of(key: str) -> str:
        return "accept" if root.get(key, policy) == "allow" else "drop"

    rules = [
        Rule.from_options([("action", action_of("dns")), ("specialtarget", "dns")]),
        Rule.from_options([("action", action_of("icmp")), ("proto", "icmp")]),
    ]
    exception_action = "drop" if policy == "allow" else "accept"
    for element in root:
        pairs = [("action", exception_action)]
        address = element.get("address")
        if address:
            pairs.append(("dsthost", f"{address}/{element.get('netmask', '32')}"))
        port, toport = element.get("port"), element.get("toport")
        proto = element.get("proto")
        if port:
            pairs.append(("dstports", f"{port}-{toport}" if toport else port))
            proto = proto or "tcp"  # Qubes 3.x: a port without protocol meant TCP
        if proto and proto != "any":
            pairs.append(("proto", proto))
        if element.get("expire"):
            pairs.append(("expire", element.get("expire", "")))
        rules.append(Rule.from_options(pairs))
    if policy == "allow":
        rules.append(Rule.from_options([("action", "accept")]))
    return rules


def load_firewall_xml(path: Path) -> list[Rule]:
    """The rules stored in ``path``; FirewallFileError (naming it) if unusable.

    An unreadable, corrupt or unknown-version file is an error, never "no
    rules": treating it as empty would open the qube to everything.
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read(FILE_MAX + 1)
    except OSError as err:
        raise FirewallFileError(f"{path}: {err.strerror}") from None
    if len(data) > FILE_MAX:
        raise FirewallFileError(f"{path}: larger than {FILE_MAX} bytes")
    try:
        root = lxml.etree.fromstring(data, _parser())
    except lxml.etree.XMLSyntaxError as err:
        raise FirewallFileError(f"{path}: not valid XML: {err}") from None
    version = root.get("version", "1")
    try:
        if root.tag != "firewall" and version != "1":
            raise RuleError(f"root element <{root.tag}> is not <firewall>")
        if version == "1":
            rules = _rules_v1(root)
        elif version in ("2", "3"):
            xml_rules = root.find("rules")
            if xml_rules is None:
                raise RuleError("no <rules> element")
            rules = []
            for number, xml_rule in enumerate(xml_rules):
                try:
                    rules.append(_rule_v2(xml_rule, version))
                except RuleError as err:
                    raise RuleError(f"rule {number}: {err}") from None
        else:
            raise RuleError(f"unsupported firewall.xml version {shown(version)}")
    except RuleError as err:
        raise FirewallFileError(f"{path}: {err}") from None
    if len(rules) > MAX_RULES:
        raise FirewallFileError(f"{path}: more than {MAX_RULES} rules")
    return rules


def firewall_xml_bytes(rules: Iterable[Rule], now: float) -> bytes:
    """The file content for ``rules``, expired ones left out."""
    kept = [rule for rule in rules if not rule.is_expired(now)]
    upstream_only = all(rule.kind is RuleKind.OUTBOUND for rule in kept)
    root = lxml.etree.Element("firewall", version="2" if upstream_only else "3")
    xml_rules = lxml.etree.SubElement(root, "rules")
    for rule in kept:
        properties = lxml.etree.SubElement(lxml.etree.SubElement(xml_rules, "rule"), "properties")
        for name, value in rule.properties():
            lxml.etree.SubElement(properties, "property", name=name).text = value
    return lxml.etree.tostring(root, encoding="UTF-8", xml_declaration=True, pretty_print=True)


def save_firewall_xml(path: Path, rules: Iterable[Rule], now: float) -> None:
    """Replace ``path`` atomically: a crash leaves the old file or the new one.

    Written to a temporary file in the same directory, synced, given mode
    0664 as upstream's umask 002 does, then renamed over the old file.
    """
    data = firewall_xml_bytes(rules, now)
    fd, temporary = tempfile.mkstemp(prefix=".firewall.xml.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o664)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
