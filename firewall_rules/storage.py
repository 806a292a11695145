"""firewall.xml: read versions 1, 2 and 3, write version 2, atomically.

Version 2 is upstream's format, and the only one written. Its ``<rules>``
element holds the outbound rules exactly as upstream's ``Firewall.save()``
writes them; forward and inbound rules go in the sibling elements
``<forward-rules>`` and ``<inbound-rules>`` (same ``<rule><properties>``
shape), which upstream's loader never looks at. So qubesd without this
project, backup restore and every other upstream reader see the outbound
rules, and only them. Version 3 (all kinds in ``<rules>``, written by
earlier releases) is read and split by kind; the next save writes version 2.

Reading goes through the same option classes as the Admin API, so a file
edited by hand is held to the same rules.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import lxml.etree

from firewall_rules.errors import FirewallFileError, RuleError
from firewall_rules.options import parse_ipv4, parse_ipv6, shown
from firewall_rules.rule import MAX_RULES, Rule, RuleKind, RuleLists

#: A firewall.xml bigger than this is not ours (MAX_RULES rules fit easily).
FILE_MAX = 16 * 1024 * 1024

#: The element under ``<firewall>`` holding each kind's list.
LIST_ELEMENTS: dict[RuleKind, str] = {
    RuleKind.OUTBOUND: "rules",
    RuleKind.FORWARD: "forward-rules",
    RuleKind.INBOUND: "inbound-rules",
}


def _parser() -> lxml.etree.XMLParser:
    """No entities, no network, no huge trees: the file is data, nothing more.

    Comments and processing instructions stay in the tree: dropping them
    would join the text around them (``10.0.0.1<!---->0``) into a value
    other XML readers do not see. :func:`_children` skips them between
    elements; a ``<property>`` holding one is refused.
    """
    return lxml.etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def _check_attributes(element: lxml.etree._Element, allowed: tuple[str, ...]) -> None:
    """Refuse an attribute outside ``allowed``."""
    for untrusted_name in element.attrib:
        if untrusted_name not in allowed:
            raise RuleError(
                f"unexpected attribute {shown(str(untrusted_name))} on <{element.tag}>"
            )


def _children(element: lxml.etree._Element) -> list[lxml.etree._Element]:
    """The child elements; refuses text, entities and text between them.

    Whitespace (layout) and comments between elements are allowed.
    """
    if (element.text or "").strip():
        raise RuleError(f"unexpected text in <{element.tag}>")
    children = []
    for child in element:
        if (child.tail or "").strip():
            raise RuleError(f"unexpected text in <{element.tag}>")
        if isinstance(child, (lxml.etree._Comment, lxml.etree._ProcessingInstruction)):
            continue
        if not isinstance(child.tag, str):
            raise RuleError(f"unexpected content in <{element.tag}>")
        children.append(child)
    return children


def _only_child(element: lxml.etree._Element, tag: str) -> lxml.etree._Element:
    """The single child element of ``element``, which must be ``<tag>``."""
    children = _children(element)
    if len(children) != 1 or children[0].tag != tag:
        raise RuleError(f"<{element.tag}> must hold exactly one <{tag}> element")
    return children[0]


def _rule_v2(xml_rule: lxml.etree._Element) -> Rule:
    """One ``<rule><properties><property name=...>`` element."""
    if xml_rule.tag != "rule":
        raise RuleError("expected <rule><properties>...")
    _check_attributes(xml_rule, ())
    properties = _only_child(xml_rule, "properties")
    _check_attributes(properties, ())
    untrusted_pairs = []
    for prop in _children(properties):
        untrusted_name = prop.get("name")
        if prop.tag != "property" or untrusted_name is None:
            raise RuleError("expected <property name=...>")
        _check_attributes(prop, ("name",))
        if len(prop):
            raise RuleError(
                f"<property name={shown(untrusted_name)}> holds more than text"
            )
        untrusted_value = prop.text or ""
        untrusted_pairs.append((untrusted_name, untrusted_value))
    return Rule.from_options(untrusted_pairs)


#: Attributes Qubes 3.x wrote; yumProxy is accepted and ignored, as upstream does.
_V1_ROOT_ATTRIBUTES = ("policy", "dns", "icmp", "yumProxy")
_V1_RULE_ATTRIBUTES = ("address", "netmask", "proto", "port", "toport", "expire")


def _v1_dsthost(untrusted_address: str, untrusted_netmask: str) -> str:
    """An address gets its netmask; a host name takes none, as upstream."""
    if parse_ipv4(untrusted_address) is None and parse_ipv6(untrusted_address) is None:
        return untrusted_address
    return f"{untrusted_address}/{untrusted_netmask}"


def _rule_v1(element: lxml.etree._Element, action: str) -> Rule:
    """One Qubes 3.x ``<rule address=.. netmask=.. proto=.. port=.. toport=.. expire=..>``."""
    if element.tag != "rule":
        raise RuleError(f"unexpected element {shown(str(element.tag))} (expected <rule>)")
    _check_attributes(element, _V1_RULE_ATTRIBUTES)
    if _children(element):
        raise RuleError("<rule> takes attributes only, no elements")
    untrusted_pairs = [("action", action)]
    untrusted_address = element.get("address")
    if untrusted_address:
        untrusted_netmask = element.get("netmask", "32")
        untrusted_pairs.append(("dsthost", _v1_dsthost(untrusted_address, untrusted_netmask)))
    untrusted_port, untrusted_toport = element.get("port"), element.get("toport")
    untrusted_proto = element.get("proto")
    if untrusted_port:
        untrusted_ports = (
            f"{untrusted_port}-{untrusted_toport}" if untrusted_toport else untrusted_port
        )
        untrusted_pairs.append(("dstports", untrusted_ports))
        untrusted_proto = untrusted_proto or "tcp"  # Qubes 3.x: a port without protocol meant TCP
    if untrusted_proto and untrusted_proto != "any":
        untrusted_pairs.append(("proto", untrusted_proto))
    untrusted_expire = element.get("expire")
    if untrusted_expire:
        untrusted_pairs.append(("expire", untrusted_expire))
    return Rule.from_options(untrusted_pairs)


def _rules_v1(root: lxml.etree._Element) -> list[Rule]:
    """Qubes 3.x format: a policy, dns/icmp switches and address rules."""
    _check_attributes(root, _V1_ROOT_ATTRIBUTES)
    untrusted_policy = root.get("policy")
    if untrusted_policy not in ("allow", "deny"):
        raise RuleError(f"policy={shown(str(untrusted_policy))} must be allow or deny")
    policy = untrusted_policy

    def action_of(key: str) -> str:
        return "accept" if root.get(key, policy) == "allow" else "drop"

    rules = [
        Rule.from_options([("action", action_of("dns")), ("specialtarget", "dns")]),
        Rule.from_options([("action", action_of("icmp")), ("proto", "icmp")]),
    ]
    exception_action = "drop" if policy == "allow" else "accept"
    for number, element in enumerate(_children(root)):
        try:
            rules.append(_rule_v1(element, exception_action))
        except RuleError as err:
            raise RuleError(f"rule {number}: {err}") from None
    if policy == "allow":
        rules.append(Rule.from_options([("action", "accept")]))
    return rules


def _rule_list(xml_list: lxml.etree._Element) -> list[Rule]:
    """The ``<rule>`` elements of one list element, in order."""
    _check_attributes(xml_list, ())
    rules = []
    for number, xml_rule in enumerate(_children(xml_list)):
        try:
            rules.append(_rule_v2(xml_rule))
        except RuleError as err:
            raise RuleError(f"<{xml_list.tag}> rule {number}: {err}") from None
    return rules


def _lists_v2(root: lxml.etree._Element) -> RuleLists:
    """``<firewall version="2">``: ``<rules>``, then at most one list element per other kind.

    Each list may hold only its own kind: a forward rule in ``<rules>``
    would reach upstream's reader, which would take it for something else.
    """
    kinds = {tag: kind for kind, tag in LIST_ELEMENTS.items()}
    lists: dict[RuleKind, list[Rule]] = {}
    for element in _children(root):
        kind = kinds.get(str(element.tag))
        if kind is None:
            raise RuleError(f"unexpected element {shown(str(element.tag))} in <firewall>")
        if kind in lists:
            raise RuleError(f"<firewall> holds more than one <{element.tag}>")
        lists[kind] = _rule_list(element)
        for number, rule in enumerate(lists[kind]):
            if rule.kind is not kind:
                raise RuleError(
                    f"<{element.tag}> rule {number}: a {rule.kind.value} rule"
                    f" (those belong in <{LIST_ELEMENTS[rule.kind]}>)"
                )
    if RuleKind.OUTBOUND not in lists:
        raise RuleError("<firewall> has no <rules> element")
    return RuleLists(**{kind.value: tuple(rules) for kind, rules in lists.items()})


def _lists_v3(root: lxml.etree._Element) -> RuleLists:
    """Version 3 (earlier releases): every kind in the one ``<rules>`` element."""
    return RuleLists.sorted_out(_rule_list(_only_child(root, "rules")))


def load_firewall_xml(path: Path) -> RuleLists:
    """The rules stored in ``path``; FirewallFileError (naming it) if unusable.

    An unreadable, corrupt or unknown-version file is an error, never "no
    rules": treating it as empty would open the qube to everything. So is
    anything in it the reader would otherwise skip (stray elements, text,
    attributes): what is loaded must be all the file says.
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
    try:
        if root.tag == "QubesFirewallRules":
            lists = RuleLists(outbound=tuple(_rules_v1(root)))
        elif root.tag != "firewall":
            raise RuleError(
                f"root element {shown(str(root.tag))} is not <firewall> (or <QubesFirewallRules>)"
            )
        else:
            _check_attributes(root, ("version",))
            untrusted_version = root.get("version")
            if untrusted_version == "2":
                lists = _lists_v2(root)
            elif untrusted_version == "3":
                lists = _lists_v3(root)
            else:
                raise RuleError(
                    f"unsupported firewall.xml version {shown(str(untrusted_version))}"
                )
    except RuleError as err:
        raise FirewallFileError(f"{path}: {err}") from None
    for kind in RuleKind:
        if len(lists.of(kind)) > MAX_RULES:
            raise FirewallFileError(f"{path}: more than {MAX_RULES} {kind.value} rules")
    return lists


def read_rule_lists(path: Path) -> RuleLists:
    """A qube's rules: its firewall.xml, or upstream's default when it has none.

    No file means the rules were never set: accept-all outbound, as qubesd.
    Every dom0 host reads a qube's rules through this.
    """
    return load_firewall_xml(path) if path.exists() else RuleLists.default()


def firewall_xml_bytes(lists: RuleLists, now: float) -> bytes:
    """The file content for ``lists``, expired rules left out.

    A list element other than ``<rules>`` is written only when it holds a
    rule, so a qube with outbound rules only gets the very file upstream
    writes.
    """
    root = lxml.etree.Element("firewall", version="2")
    for kind, tag in LIST_ELEMENTS.items():
        kept = [rule for rule in lists.of(kind) if not rule.is_expired(now)]
        if not kept and kind is not RuleKind.OUTBOUND:
            continue
        xml_list = lxml.etree.SubElement(root, tag)
        for rule in kept:
            xml_rule = lxml.etree.SubElement(xml_list, "rule")
            properties = lxml.etree.SubElement(xml_rule, "properties")
            for name, value in rule.properties():
                lxml.etree.SubElement(properties, "property", name=name).text = value
    # No XML declaration: upstream's file has none either.
    return lxml.etree.tostring(root, encoding="UTF-8", xml_declaration=False, pretty_print=True)


def save_firewall_xml(path: Path, lists: RuleLists, now: float) -> None:
    """Replace ``path`` atomically: a crash leaves the old file or the new one.

    Written to a temporary file in the same directory, synced, given mode
    0664 as upstream's umask 002 does, then renamed over the old file.
    """
    data = firewall_xml_bytes(lists, now)
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
