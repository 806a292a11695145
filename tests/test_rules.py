"""firewall_rules: upstream forms pinned, round trips, and hostile input refused."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import lxml.etree
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_worker.forward_steps import MAX_FORWARD_PORTS as AGENT_PORT_LIMIT
from firewall_rules import (
    FirewallFileError,
    Rule,
    RuleError,
    RuleKind,
    RuleLists,
    default_rules,
    load_firewall_xml,
    outbound_qdb_entries,
    parse_api_payload,
    read_rule_lists,
    save_firewall_xml,
)
from firewall_rules.options import DstHost
from firewall_rules.rule import MAX_FORWARD_PORTS as DOM0_PORT_LIMIT
from firewall_rules.storage import firewall_xml_bytes

NOW = 1_800_000_000.0


def api(line: str) -> str:
    return Rule.from_api_string(line).api_rule


# -- upstream canonical forms ------------------------------------------------

UPSTREAM_CANONICAL = [
    ("action=accept", "action=accept"),
    ("action=drop proto=icmp", "action=drop proto=icmp"),
    ("proto=tcp action=accept dstports=443", "action=accept proto=tcp dstports=443-443"),
    ("action=accept dsthost=1.2.3.4", "action=accept dst4=1.2.3.4/32"),
    ("action=accept dsthost=10.0.0.0/8 proto=udp dstports=53",
     "action=accept dst4=10.0.0.0/8 proto=udp dstports=53-53"),
    ("action=accept dst4=10.1.2.3/8", "action=accept dst4=10.1.2.3/8"),
    ("action=accept dsthost=2001:db8::1", "action=accept dst6=2001:db8::1/128"),
    ("action=drop dst6=2001:db8::/32", "action=drop dst6=2001:db8::/32"),
    ("action=accept dsthost=www.example.com", "action=accept dsthost=www.example.com"),
    ("action=accept dstname=example.com", "action=accept dsthost=example.com"),
    ("specialtarget=dns action=accept", "action=accept specialtarget=dns"),
    ("action=drop proto=icmp icmptype=8", "action=drop proto=icmp icmptype=8"),
    ("action=accept proto=tcp dstports=1024-2048 expire=1800000100",
     "action=accept expire=1800000100 proto=tcp dstports=1024-2048"),
    ("action=accept comment=my rule, [x]: ok", "action=accept comment=my rule, [x]: ok"),
]


@pytest.mark.parametrize(("line", "expected"), UPSTREAM_CANONICAL)
def test_upstream_canonical_forms(line: str, expected: str) -> None:
    assert api(line) == expected


def test_comment_takes_the_rest_of_the_line() -> None:
    # As upstream: everything after the first "comment=" is the comment.
    rule = Rule.from_api_string("action=drop comment=proto tcp")
    assert str(rule.comment) == "proto tcp"
    # so an option after the comment is part of it, and "=" is not comment text
    with pytest.raises(RuleError, match="comment: only"):
        Rule.from_api_string("action=drop comment=x proto=tcp")


QDB = [
    ("action=accept", "action=accept"),
    ("action=accept dsthost=1.2.3.4 proto=tcp dstports=80 expire=1800000100 comment=web",
     "action=accept dst4=1.2.3.4/32 proto=tcp dstports=80-80"),
    ("action=drop dsthost=example.com proto=icmp icmptype=0",
     "action=drop dsthost=example.com proto=icmp icmptype=0"),
    ("action=accept specialtarget=dns", "action=accept specialtarget=dns"),
]


@pytest.mark.parametrize(("line", "expected"), QDB)
def test_qubesdb_entry_text_as_upstream(line: str, expected: str) -> None:
    assert Rule.from_api_string(line).qdb_rule == expected


def test_outbound_entries_per_family_with_upstream_numbering() -> None:
    rules = [
        Rule.from_api_string(line)
        for line in (
            "action=accept dsthost=10.0.0.0/8",
            "action=accept dsthost=2001:db8::/32",
            f"action=accept proto=udp expire={int(NOW) - 1}",
            "action=drop",
        )
    ]
    assert outbound_qdb_entries(rules, 4, NOW) == {
        "policy": "drop", "0000": "action=accept dst4=10.0.0.0/8", "0003": "action=drop",
    }
    assert outbound_qdb_entries(rules, 6, NOW) == {
        "policy": "drop", "0001": "action=accept dst6=2001:db8::/32", "0003": "action=drop",
    }


def test_forward_and_inbound_rules_never_become_outbound_entries() -> None:
    forward = Rule.from_api_string("action=forward proto=tcp dstports=80")
    inbound = Rule.from_api_string("action=accept srchost=10.137.0.21")
    for rule in (forward, inbound):
        with pytest.raises(ValueError, match="rules have no"):
            _ = rule.qdb_rule
        with pytest.raises(ValueError, match="rule in an outbound list"):
            outbound_qdb_entries([rule], 4, NOW)


# -- the new kinds -------------------------------------------------------------

NEW_CANONICAL = [
    ("action=forward forwardtype=external proto=tcp srcports=8443 dstports=443",
     "action=forward forwardtype=external proto=tcp srcports=8443-8443 dstports=443-443",
     RuleKind.FORWARD),
    ("dstports=80-81 srcports=8080-8081 proto=udp forwardtype=internal action=forward"
     " srchost=10.137.0.0/24",
     "action=forward forwardtype=internal srchost=10.137.0.0/24 proto=udp"
     " srcports=8080-8081 dstports=80-81",
     RuleKind.FORWARD),
    ("action=accept srchost=10.137.0.21 proto=tcp dstports=22",
     "action=accept srchost=10.137.0.21/32 proto=tcp dstports=22-22", RuleKind.INBOUND),
    ("action=drop srchost=2001:db8::/64", "action=drop srchost=2001:db8::/64", RuleKind.INBOUND),
    ("action=accept srchost=fd09:24ef:4179::a89:15 proto=icmp icmptype=128",
     "action=accept srchost=fd09:24ef:4179::a89:15/128 proto=icmp icmptype=128",
     RuleKind.INBOUND),
    ("proto=tcp srcqube=work action=accept dstports=22",
     "action=accept srcqube=work proto=tcp dstports=22-22", RuleKind.INBOUND),
    ("action=drop srcqube=Disp-1_a expire=1800000100",
     "action=drop expire=1800000100 srcqube=Disp-1_a", RuleKind.INBOUND),
    ("action=forward srcqube=work forwardtype=internal proto=tcp srcports=2222 dstports=22",
     "action=forward forwardtype=internal srcqube=work proto=tcp srcports=2222-2222"
     " dstports=22-22", RuleKind.FORWARD),
    # The design card's own example: forwardtype and srcports take their defaults.
    ("action=forward proto=tcp dstports=443",
     "action=forward forwardtype=external proto=tcp srcports=443-443 dstports=443-443",
     RuleKind.FORWARD),
    ("action=forward forwardtype=internal proto=udp dstports=5000-5010 srcqube=work",
     "action=forward forwardtype=internal srcqube=work proto=udp srcports=5000-5010"
     " dstports=5000-5010", RuleKind.FORWARD),
]


@pytest.mark.parametrize(("line", "expected", "kind"), NEW_CANONICAL)
def test_new_kinds_canonical(line: str, expected: str, kind: RuleKind) -> None:
    rule = Rule.from_api_string(line)
    assert (rule.api_rule, rule.kind) == (expected, kind)
    assert Rule.from_api_string(rule.api_rule).api_rule == expected


def test_forward_attributes_the_planner_reads() -> None:
    rule = Rule.from_api_string(
        "action=forward forwardtype=external proto=tcp srcports=8000-8002 dstports=9000-9002"
        " srchost=192.0.2.0/24 expire=1800000100"
    )
    assert (rule.srcports.first, rule.srcports.last) == (8000, 8002)  # type: ignore[union-attr]
    assert (rule.dstports.first, rule.dstports.last) == (9000, 9002)  # type: ignore[union-attr]
    assert rule.srchost.network == ipaddress.ip_network("192.0.2.0/24")  # type: ignore[union-attr]
    assert str(rule.forwardtype) == "external" and str(rule.proto) == "tcp"
    assert rule.expire.timestamp == 1800000100  # type: ignore[union-attr]
    assert not rule.is_expired(NOW) and rule.is_expired(1800000101)


# -- refused -----------------------------------------------------------------

BAD_LINES = [
    # syntax
    "", " ", " action=accept", "comment=first action=drop", "action=accept  proto=tcp",
    "action", "accept", "action=accept proto", "=accept", "action=accept =tcp",
    "proto=tcp", "comment=only a comment",
    # unknown or duplicate options
    "action=accept colour=blue", "action=accept Action=drop", "action=accept action=drop",
    "action=accept dsthost=1.2.3.4 dst4=1.2.3.4", "action=accept proto=tcp proto=tcp",
    "action=accept dst4=1.2.3.4 dst6=::1",
    # bad choices
    "action=maybe", "action=ACCEPT", "action=accept proto=sctp", "action=accept proto=TCP",
    "action=accept specialtarget=ntp", "action=accept specialtarget=",
    # hosts
    "action=accept dsthost=", "action=accept dsthost=10.0.0.0/33", "action=accept dsthost=::/129",
    "action=accept dsthost=10.0.0.0/", "action=accept dsthost=10.0.0.0/8/8",
    "action=accept dsthost=10.0.0.0/+8", "action=accept dsthost=10.0.0.0/08",
    "action=accept dsthost=010.0.0.1", "action=accept dsthost=0x7f000001",
    "action=accept dsthost=127.1", "action=accept dsthost=2130706433",
    "action=accept dsthost=1.2.3.4.5", "action=accept dsthost=256.0.0.1",
    "action=accept dsthost=Example.com", "action=accept dsthost=exa mple.com",
    "action=accept dsthost=example..com", "action=accept dsthost=example.com.",
    "action=accept dsthost=-example.com", "action=accept dsthost=example-.com",
    "action=accept dsthost=" + "a" * 64 + ".com", "action=accept dsthost=" + "a." * 127 + "com",
    "action=accept dsthost=example.com;reboot", "action=accept dsthost=$(reboot)",
    "action=accept dsthost=a`id`", "action=accept dsthost=fe80::1%eth0",
    "action=accept dst4=2001:db8::1", "action=accept dst6=10.0.0.1",
    "action=accept dstname=10.0.0.1", "action=accept dsthost=foo/24",
    # ports
    "action=accept proto=tcp dstports=", "action=accept proto=tcp dstports=0x50",
    "action=accept proto=tcp dstports=65536", "action=accept proto=tcp dstports=100000",
    "action=accept proto=tcp dstports=-1", "action=accept proto=tcp dstports=80-",
    "action=accept proto=tcp dstports=90-80", "action=accept proto=tcp dstports=1-2-3",
    "action=accept proto=tcp dstports=+80", "action=accept proto=tcp dstports=8 0",
    "action=accept proto=tcp dstports=000080", "action=accept dstports=80",
    "action=accept proto=icmp dstports=80", "action=accept proto=tcp icmptype=8",
    "action=accept proto=icmp icmptype=256", "action=accept proto=icmp icmptype=-1",
    "action=accept proto=icmp icmptype=echo",
    # expire and comment
    "action=accept expire=soon", "action=accept expire=+300", "action=accept expire=-1",
    "action=accept expire=1e9", "action=accept expire=1234567890123",
    "action=accept comment=semi;colon\tand tab", "action=accept comment=quote\"s",
    "action=accept comment=new\rline", "action=accept comment=" + "x" * 1025,
    # forward rules
    "action=forward", "action=forward forwardtype=external proto=tcp srcports=80",
    "action=forward proto=tcp srcports=80", "action=forward dstports=80",
    "action=forward forwardtype=external srcports=80 dstports=80",
    "action=forward forwardtype=external proto=icmp srcports=80 dstports=80",
    "action=forward forwardtype=sideways proto=tcp srcports=80 dstports=80",
    "action=forward forwardtype=external proto=tcp srcports=0 dstports=80",
    "action=forward forwardtype=external proto=tcp srcports=80 dstports=0-1",
    "action=forward forwardtype=external proto=tcp srcports=80-81 dstports=80-82",
    "action=forward forwardtype=external proto=tcp srcports=2000-3024 dstports=5000-6024",
    "action=forward forwardtype=external proto=tcp srcports=80 dstports=80 srchost=example.com",
    "action=forward forwardtype=external proto=tcp srcports=80 dstports=80 srchost=10.0.0.1/8",
    "action=forward forwardtype=external proto=tcp srcports=80 dstports=80 srchost=",
    "action=forward forwardtype=external proto=tcp srcports=80 dstports=80 dsthost=1.2.3.4",
    "action=forward forwardtype=external proto=tcp srcports=80 dstports=80 specialtarget=dns",
    "action=forward forwardtype=external proto=udp srcports=80 dstports=80 icmptype=1",
    "action=accept forwardtype=external", "action=accept proto=tcp srcports=80",
    # inbound rules
    "action=accept srchost=example.com", "action=accept srchost=10.0.0.1/33",
    "action=accept srchost=10.1.0.0/8", "action=accept srchost=2001:db8::1/32",
    "action=accept srchost=010.0.0.1", "action=accept srchost=10.0.0.1 dsthost=10.0.0.2",
    "action=accept srchost=10.0.0.1 specialtarget=dns",
    "action=accept srchost=10.0.0.1 proto=tcp dstports=0",
    "action=accept srchost=10.0.0.1 srcports=22",
    # srcqube: a qube name as qubesd validates it, inbound or internal forwards only
    "action=accept srcqube=", "action=accept srcqube=1work", "action=accept srcqube=-work",
    "action=accept srcqube=work.example", "action=accept srcqube=10.137.0.21",
    "action=accept srcqube=work:1", "action=accept srcqube=work/32",
    "action=accept srcqube=" + "w" * 32, "action=accept srcqube=none",
    "action=accept srcqube=default", "action=accept srcqube=Domain-0",
    "action=accept srcqube=work-dm", "action=accept srcqube=work$(id)",
    "action=accept srcqube=work srchost=10.137.0.21",
    "action=accept srcqube=work dsthost=10.0.0.1", "action=accept srcqube=work srcports=22",
    "action=accept srcqube=work specialtarget=dns",
    "action=accept srcqube=work forwardtype=internal",
    "action=forward forwardtype=external proto=tcp srcports=80 dstports=80 srcqube=work",
    "action=forward forwardtype=internal proto=tcp srcports=80 dstports=80 srcqube=work"
    " srchost=10.137.0.21",
    "action=forward proto=tcp srcports=80 dstports=80 srcqube=work",
]


def test_enough_hostile_lines() -> None:
    assert len(set(BAD_LINES)) == len(BAD_LINES) >= 60


@pytest.mark.parametrize("line", BAD_LINES)
def test_bad_line_refused_with_a_one_line_message(line: str) -> None:
    with pytest.raises(RuleError) as info:
        Rule.from_api_string(line)
    message = str(info.value)
    assert message and "\n" not in message and "\r" not in message and "\t" not in message


@pytest.mark.parametrize("line", BAD_LINES)
def test_bad_line_refuses_the_whole_payload(line: str) -> None:
    payload = f"action=accept\n{line}\naction=drop\n".encode()
    with pytest.raises(RuleError, match=r"^rule 1 \("):
        parse_api_payload(payload, NOW)


def test_payload_framing() -> None:
    assert parse_api_payload(b"", NOW) == []
    assert [r.api_rule for r in parse_api_payload(b"action=drop\n", NOW)] == ["action=drop"]
    # As upstream, the last rule may lack its newline.
    assert [r.api_rule for r in parse_api_payload(b"action=accept\naction=drop", NOW)] == [
        "action=accept", "action=drop"]
    for bad in (b"action=drop\n\n", b"\naction=drop\n", b"\n", "é\n".encode(),
                b"action=drop\r\n"):
        with pytest.raises(RuleError):
            parse_api_payload(bad, NOW)


def test_payload_leaves_out_expired_rules() -> None:
    payload = f"action=accept expire={int(NOW) - 1}\naction=drop\n".encode()
    assert [r.api_rule for r in parse_api_payload(payload, NOW)] == ["action=drop"]


def test_error_messages_say_what_is_wrong() -> None:
    cases = {
        "action=forward forwardtype=external proto=tcp srcports=80-81 dstports=80":
            "same number of ports",
        "action=accept srchost=example.com": "not a host name",
        "action=accept dsthost=010.0.0.1": "looks like a number",
        "action=accept dsthost=10.0.0.0/33": "'10.0.0.0/33'",
        "action=accept colour=blue": "unknown option 'colour'",
        "action=accept proto=tcp proto=udp": "given twice",
        "action=accept srchost=10.1.0.0/8": "did you mean 10.0.0.0/8",
        "action=accept srcqube=1work": "not a qube name",
        "action=accept srcqube=" + "w" * 32: "shorter than 32 characters",
        "action=accept srcqube=sys-net-dm": "cannot end with -dm",
        "action=accept srcqube=work srchost=10.137.0.21": "cannot be combined",
        "action=forward forwardtype=external proto=tcp srcports=80 dstports=80 srcqube=work":
            "needs forwardtype=internal",
    }
    for line, fragment in cases.items():
        with pytest.raises(RuleError, match=None) as info:
            Rule.from_api_string(line)
        assert fragment in str(info.value), (line, str(info.value))


# -- firewall.xml ---------------------------------------------------------------


def test_default_rules() -> None:
    assert [r.api_rule for r in default_rules()] == ["action=accept"]


def _rules(*lines: str) -> tuple[Rule, ...]:
    return tuple(Rule.from_api_string(line) for line in lines)


FORWARD_RULE = "action=forward forwardtype=external proto=tcp srcports=80 dstports=80"
INBOUND_RULE = "action=accept srcqube=work proto=tcp dstports=22"

#: What upstream's Firewall.save() writes for these outbound rules (run against
#: the upstream snapshot: its property order, no XML declaration).
UPSTREAM_SAVED = b"""<firewall version="2">
  <rules>
    <rule>
      <properties>
        <property name="action">accept</property>
        <property name="comment">web server</property>
        <property name="expire">1900000000</property>
        <property name="dsthost">10.0.0.0/8</property>
        <property name="proto">tcp</property>
        <property name="dstports">443</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">drop</property>
        <property name="proto">icmp</property>
        <property name="icmptype">8</property>
      </properties>
    </rule>
    <rule>
      <properties>
        <property name="action">accept</property>
        <property name="specialtarget">dns</property>
      </properties>
    </rule>
  </rules>
</firewall>
"""

UPSTREAM_LINES = (
    "action=accept expire=1900000000 dst4=10.0.0.0/8 proto=tcp dstports=443-443"
    " comment=web server",
    "action=drop proto=icmp icmptype=8",
    "action=accept specialtarget=dns",
)


def test_outbound_only_file_is_upstreams_byte_for_byte() -> None:
    assert firewall_xml_bytes(RuleLists(_rules(*UPSTREAM_LINES)), NOW) == UPSTREAM_SAVED


def test_other_kinds_go_in_sibling_elements_of_a_version_2_file(tmp_path: Path) -> None:
    lists = RuleLists(_rules(*UPSTREAM_LINES), _rules(FORWARD_RULE), _rules(INBOUND_RULE))
    data = firewall_xml_bytes(lists, NOW)
    root = lxml.etree.fromstring(data)
    assert root.get("version") == "2"
    assert [child.tag for child in root] == ["rules", "forward-rules", "inbound-rules"]
    # <rules> is exactly what upstream writes for the outbound list alone
    upstream_rules = lxml.etree.fromstring(UPSTREAM_SAVED).find("rules")
    assert lxml.etree.tostring(root.find("rules"), with_tail=False) == lxml.etree.tostring(
        upstream_rules, with_tail=False)
    assert b'<property name="srcqube">work</property>' in data
    path = tmp_path / "firewall.xml"
    save_firewall_xml(path, lists, NOW)
    assert load_firewall_xml(path) == lists


def test_an_empty_kind_writes_no_element() -> None:
    data = firewall_xml_bytes(RuleLists((), (), _rules(INBOUND_RULE)), NOW)
    assert [child.tag for child in lxml.etree.fromstring(data)] == ["rules", "inbound-rules"]


def version_3_file(*lines: str) -> str:
    """firewall.xml as earlier releases wrote it: every kind in <rules>, version 3."""
    rules = "".join(
        "<rule><properties>" + "".join(
            f'<property name="{name}">{value}</property>'
            for name, value in Rule.from_api_string(line).properties()
        ) + "</properties></rule>"
        for line in lines
    )
    return f'<firewall version="3"><rules>{rules}</rules></firewall>'


def test_version_3_file_is_read_split_by_kind_and_saved_as_version_2(tmp_path: Path) -> None:
    """Earlier releases kept every kind in <rules> and wrote version 3."""
    path = tmp_path / "firewall.xml"
    path.write_text(version_3_file(
        FORWARD_RULE, "action=accept proto=tcp dstports=443", INBOUND_RULE,
        "action=drop srchost=10.137.0.0/16", "action=drop",
    ))
    lists = load_firewall_xml(path)
    assert lists == RuleLists(
        _rules("action=accept proto=tcp dstports=443", "action=drop"),
        _rules(FORWARD_RULE),
        _rules(INBOUND_RULE, "action=drop srchost=10.137.0.0/16"),
    )
    save_firewall_xml(path, lists, NOW)
    assert b'<firewall version="2">' in path.read_bytes()
    assert load_firewall_xml(path) == lists


def test_rule_lists_hold_one_kind_each() -> None:
    with pytest.raises(RuleError, match="forward rule in the outbound list"):
        RuleLists(outbound=_rules(FORWARD_RULE))
    with pytest.raises(RuleError, match="outbound rule in the inbound list"):
        RuleLists(inbound=_rules("action=drop"))
    lists = RuleLists.sorted_out(_rules("action=drop", INBOUND_RULE, FORWARD_RULE))
    assert lists.replaced(RuleKind.FORWARD, ()) == RuleLists(_rules("action=drop"), (),
                                                             _rules(INBOUND_RULE))
    assert lists.of(RuleKind.INBOUND) == _rules(INBOUND_RULE)
    assert RuleLists.default() == RuleLists(_rules("action=accept"))


def test_upstream_v2_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "firewall.xml"
    path.write_text(
        "<?xml version='1.0' encoding='UTF-8'?>\n<firewall version=\"2\"><rules>"
        '<rule><properties><property name="action">accept</property>'
        '<property name="comment">web</property>'
        '<property name="dsthost">1.2.3.4/32</property><property name="proto">tcp</property>'
        '<property name="dstports">443</property></properties></rule>'
        '<rule><properties><property name="action">drop</property></properties></rule>'
        "</rules></firewall>"
    )
    assert [r.api_rule for r in load_firewall_xml(path).outbound] == [
        "action=accept dst4=1.2.3.4/32 proto=tcp dstports=443-443 comment=web",
        "action=drop",
    ]


def test_v1_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "firewall.xml"
    path.write_text(
        '<QubesFirewallRules policy="deny" dns="allow" icmp="deny">'
        '<rule address="192.168.0.0" netmask="16" port="22" />'
        '<rule address="1.2.3.4" proto="udp" port="5000" toport="5010" />'
        '<rule address="10.0.0.1" proto="any" />'
        "</QubesFirewallRules>"
    )
    assert [r.api_rule for r in load_firewall_xml(path).outbound] == [
        "action=accept specialtarget=dns",
        "action=drop proto=icmp",
        "action=accept dst4=192.168.0.0/16 proto=tcp dstports=22-22",
        "action=accept dst4=1.2.3.4/32 proto=udp dstports=5000-5010",
        "action=accept dst4=10.0.0.1/32",
    ]


def test_v1_host_name_takes_no_netmask(tmp_path: Path) -> None:
    path = tmp_path / "firewall.xml"
    path.write_text(
        '<QubesFirewallRules policy="deny" dns="allow" icmp="allow" yumProxy="allow">\n'
        '  <rule address="www.example.com" netmask="32" proto="tcp" port="443" />\n'
        '  <rule address="2001:db8::" netmask="32" />\n'
        "</QubesFirewallRules>\n"
    )
    assert [r.api_rule for r in load_firewall_xml(path).outbound][2:] == [
        "action=accept dsthost=www.example.com proto=tcp dstports=443-443",
        "action=accept dst6=2001:db8::/32",
    ]


def test_layout_whitespace_and_comments_between_elements_read(tmp_path: Path) -> None:
    path = tmp_path / "firewall.xml"
    path.write_text(
        '<?xml version="1.0"?>\n<!-- hand edited -->\n<firewall version="2">\n'
        "  <rules>\n    <!-- web -->\n    <rule>\n      <properties>\n"
        '        <property name="action">accept</property>\n'
        "        <!-- anything -->\n"
        '        <property name="dsthost">10.0.0.1</property>\n'
        "      </properties>\n    </rule>\n  </rules>\n</firewall>\n"
    )
    assert [r.api_rule for r in load_firewall_xml(path).outbound] == [
        "action=accept dst4=10.0.0.1/32"]


def _v2(rules: str, version: str = "2") -> str:
    return f'<firewall version="{version}"><rules>{rules}</rules></firewall>'


_ACCEPT = '<property name="action">accept</property>'
_DROP_RULE = '<rule><properties><property name="action">drop</property></properties></rule>'

BAD_FILES = {
    "not xml": "nothing like xml",
    "truncated": '<firewall version="2"><rules><rule>',
    "unknown version": '<firewall version="4"><rules/></firewall>',
    "no rules element": '<firewall version="2"/>',
    "bad rule": '<firewall version="2"><rules><rule><properties>'
                '<property name="action">maybe</property></properties></rule></rules></firewall>',
    "unknown property": '<firewall version="2"><rules><rule><properties>'
                        '<property name="action">accept</property>'
                        '<property name="evil">1</property></properties></rule></rules></firewall>',
    "inbound rule in v2 <rules>": _v2(
        f'<rule><properties>{_ACCEPT}<property name="srchost">10.0.0.1</property>'
        "</properties></rule>"
    ),
    "srcqube in v2 <rules>": _v2(
        f'<rule><properties>{_ACCEPT}<property name="srcqube">work</property>'
        "</properties></rule>"
    ),
    "outbound rule in <forward-rules>": f'<firewall version="2"><rules/>'
                                        f"<forward-rules>{_DROP_RULE}</forward-rules></firewall>",
    "forward rule in <inbound-rules>": '<firewall version="2"><rules/><inbound-rules><rule>'
                                       '<properties><property name="action">forward</property>'
                                       '<property name="proto">tcp</property>'
                                       '<property name="dstports">80</property>'
                                       "</properties></rule></inbound-rules></firewall>",
    "second <forward-rules>": '<firewall version="2"><rules/><forward-rules/><forward-rules/>'
                              "</firewall>",
    "siblings without <rules>": '<firewall version="2"><forward-rules/></firewall>',
    "siblings in v3": f'<firewall version="3"><rules>{_DROP_RULE}</rules><inbound-rules/>'
                      "</firewall>",
    "attribute on <inbound-rules>": '<firewall version="2"><rules/><inbound-rules x="1"/>'
                                    "</firewall>",
    "bad srcqube in v3": '<firewall version="3"><rules><rule><properties>'
                         '<property name="action">accept</property>'
                         '<property name="srcqube">10.137.0.21</property>'
                         "</properties></rule></rules></firewall>",
    "entity": '<!DOCTYPE f [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
              '<firewall version="2"><rules><rule><properties>'
              '<property name="action">&x;</property></properties></rule></rules></firewall>',
    "v1 bad policy": '<QubesFirewallRules policy="maybe"/>',
    "wrong root": '<rules version="2"><rules/></rules>',
    # Content a reader taking only .text would ignore: what it then loads is
    # not what the file says (an expire cut to 1 drops the rule as expired).
    "element inside property": _v2(
        f'<rule><properties>{_ACCEPT}<property name="expire">1<b/>9999999999</property>'
        "</properties></rule>"
    ),
    "comment inside property": _v2(
        f'<rule><properties>{_ACCEPT}<property name="dsthost">10.0.0.1<!---->0</property>'
        "</properties></rule>"
    ),
    "entity inside property": '<!DOCTYPE f [<!ENTITY x "0">]>' + _v2(
        f'<rule><properties>{_ACCEPT}<property name="dsthost">10.0.0.1&x;</property>'
        "</properties></rule>"
    ),
    "text after property": _v2(
        f'<rule><properties>{_ACCEPT}<property name="dsthost">10.0.0.1</property>0'
        "</properties></rule>"
    ),
    "text in properties": _v2(f"<rule><properties>junk{_ACCEPT}</properties></rule>"),
    "text in rule": _v2(f"<rule>junk<properties>{_ACCEPT}</properties></rule>"),
    "text in rules": _v2(f"junk{_DROP_RULE}"),
    "text after rule": _v2(f"{_DROP_RULE}junk"),
    "text in firewall": f'<firewall version="2">junk<rules>{_DROP_RULE}</rules></firewall>',
    "extra element in rule": _v2(
        f"<rule><properties>{_ACCEPT}</properties><properties>{_ACCEPT}</properties></rule>"
    ),
    "other element in rule": _v2(f"<rule><properties>{_ACCEPT}</properties><x/></rule>"),
    "second rules element": f'<firewall version="2"><rules>{_DROP_RULE}</rules>'
                            f"<rules><rule><properties>{_ACCEPT}</properties></rule></rules>"
                            "</firewall>",
    "other element in firewall": f'<firewall version="2"><rules>{_DROP_RULE}</rules><x/>'
                                 "</firewall>",
    "attribute on property": _v2(
        '<rule><properties><property name="action" x="1">drop</property></properties></rule>'
    ),
    "attribute on rule": _v2(f'<rule x="1"><properties>{_ACCEPT}</properties></rule>'),
    "attribute on firewall": f'<firewall version="2" x="1"><rules>{_DROP_RULE}</rules>'
                             "</firewall>",
    "v1 other element": '<QubesFirewallRules policy="deny"><x address="1.2.3.4"/>'
                        "</QubesFirewallRules>",
    "v1 unknown attribute": '<QubesFirewallRules policy="deny">'
                            '<rule address="1.2.3.4" srchost="10.0.0.1"/></QubesFirewallRules>',
    "v1 unknown root attribute": '<QubesFirewallRules policy="deny" x="1"/>',
    "v1 element in rule": '<QubesFirewallRules policy="deny"><rule address="1.2.3.4">'
                          "<x/></rule></QubesFirewallRules>",
    "v1 text": '<QubesFirewallRules policy="deny">junk<rule address="1.2.3.4"/>'
               "</QubesFirewallRules>",
    "v1 other root": '<foo policy="deny"><rule address="1.2.3.4"/></foo>',
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_an_error_naming_it(tmp_path: Path, name: str) -> None:
    path = tmp_path / "firewall.xml"
    path.write_text(BAD_FILES[name])
    with pytest.raises(FirewallFileError) as info:
        load_firewall_xml(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_dsthost_refuses_a_key_that_is_no_destination() -> None:
    with pytest.raises(RuleError, match="unknown option 'srchost'"):
        DstHost("1.2.3.4", "srchost")


def test_missing_file_is_an_error_unless_the_rules_were_never_set(tmp_path: Path) -> None:
    with pytest.raises(FirewallFileError, match="No such file"):
        load_firewall_xml(tmp_path / "firewall.xml")
    assert read_rule_lists(tmp_path / "firewall.xml") == RuleLists.default()
    (tmp_path / "firewall.xml").write_text("<firewall/>")
    with pytest.raises(FirewallFileError):
        read_rule_lists(tmp_path / "firewall.xml")


def test_save_is_atomic_and_mode_0664(tmp_path: Path) -> None:
    path = tmp_path / "firewall.xml"
    lists = RuleLists(_rules("action=drop proto=icmp"))
    save_firewall_xml(path, lists, NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664
    assert load_firewall_xml(path) == lists
    assert [p.name for p in tmp_path.iterdir()] == ["firewall.xml"]


def test_save_leaves_out_expired_rules(tmp_path: Path) -> None:
    path = tmp_path / "firewall.xml"
    expiring = f"expire={int(NOW) + 10}"
    lists = RuleLists(_rules(f"action=accept {expiring}", "action=drop"),
                      _rules(f"{FORWARD_RULE} {expiring}"), _rules(f"{INBOUND_RULE} {expiring}"))
    save_firewall_xml(path, lists, NOW + 20)
    assert load_firewall_xml(path) == RuleLists(_rules("action=drop"))


def test_failed_save_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "firewall.xml"
    save_firewall_xml(path, RuleLists.default(), NOW)
    before = path.read_bytes()
    with pytest.raises(OSError):
        save_firewall_xml(tmp_path / "missing-dir" / "firewall.xml", RuleLists(), NOW)
    assert path.read_bytes() == before


# -- property-based round trips --------------------------------------------------

ports = st.integers(1, 65535)
comments = st.text(
    alphabet="abcXYZ019:;,./-_[] ", min_size=1, max_size=40
).filter(lambda c: c.strip(" ") == c and "comment=" not in c)
ipv4_nets = st.builds(
    lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
    st.ip_addresses(v=4), st.integers(0, 32),
)
ipv6_nets = st.builds(
    lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
    st.ip_addresses(v=6), st.integers(0, 128),
)
qube_names = st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9_-]{0,30}\Z").filter(
    lambda n: n not in ("none", "default") and not n.endswith("-dm")
)
hostnames = st.lists(
    st.from_regex(r"\A[a-z][a-z0-9-]{0,10}[a-z0-9]\Z"), min_size=1, max_size=4
).map(".".join)
expires = st.integers(1_900_000_000, 2_000_000_000)


@st.composite
def port_range(draw: st.DrawFn, size: int | None = None) -> tuple[int, int]:
    if size is None:
        size = draw(st.integers(1, 50))
    first = draw(st.integers(1, 65536 - size))
    return first, first + size - 1


def _tail(draw: st.DrawFn) -> list[str]:
    words = []
    if draw(st.booleans()):
        words.append(f"expire={draw(expires)}")
    if draw(st.booleans()):
        words.append(f"comment={draw(comments)}")
    return words


@st.composite
def outbound_lines(draw: st.DrawFn) -> str:
    words = [f"action={draw(st.sampled_from(['accept', 'drop']))}"]
    host = draw(st.one_of(st.none(), ipv4_nets, ipv6_nets, hostnames))
    if host is not None:
        words.append(f"dsthost={host}")
    proto = draw(st.sampled_from([None, "tcp", "udp", "icmp"]))
    if proto is not None:
        words.append(f"proto={proto}")
    if proto in ("tcp", "udp") and draw(st.booleans()):
        first, last = draw(port_range())
        words.append(f"dstports={first}-{last}")
    if proto == "icmp" and draw(st.booleans()):
        words.append(f"icmptype={draw(st.integers(0, 255))}")
    if host is None and draw(st.booleans()):
        words.append("specialtarget=dns")
    return " ".join(draw(st.permutations(words)) + _tail(draw))


@st.composite
def forward_lines(draw: st.DrawFn) -> str:
    size = draw(st.integers(1, 20))
    forwardtype = draw(st.sampled_from(["external", "internal"]))
    src, dst = draw(port_range(size)), draw(port_range(size))
    words = [
        "action=forward",
        f"forwardtype={forwardtype}",
        f"proto={draw(st.sampled_from(['tcp', 'udp']))}",
        f"srcports={src[0]}-{src[1]}", f"dstports={dst[0]}-{dst[1]}",
    ]
    source = draw(st.one_of(st.none(), ipv4_nets, ipv6_nets))
    if source is not None:
        words.append(f"srchost={source}")
    elif forwardtype == "internal" and draw(st.booleans()):
        words.append(f"srcqube={draw(qube_names)}")
    return " ".join(draw(st.permutations(words)) + _tail(draw))


@st.composite
def inbound_lines(draw: st.DrawFn) -> str:
    words = [
        f"action={draw(st.sampled_from(['accept', 'drop']))}",
        draw(st.one_of(
            st.builds("srchost={}".format, st.one_of(ipv4_nets, ipv6_nets)),
            st.builds("srcqube={}".format, qube_names),
        )),
    ]
    proto = draw(st.sampled_from([None, "tcp", "udp", "icmp"]))
    if proto is not None:
        words.append(f"proto={proto}")
    if proto in ("tcp", "udp") and draw(st.booleans()):
        first, last = draw(port_range())
        words.append(f"dstports={first}-{last}")
    return " ".join(draw(st.permutations(words)) + _tail(draw))


any_line = st.one_of(outbound_lines(), forward_lines(), inbound_lines())


@given(any_line)
def test_api_round_trip(line: str) -> None:
    rule = Rule.from_api_string(line)
    again = Rule.from_api_string(rule.api_rule)
    assert again.api_rule == rule.api_rule and again.kind is rule.kind


@given(st.lists(any_line, max_size=8))
def test_xml_round_trip(tmp_path_factory: pytest.TempPathFactory, lines: list[str]) -> None:
    lists = RuleLists.sorted_out(Rule.from_api_string(line) for line in lines)
    path = tmp_path_factory.mktemp("xml") / "firewall.xml"
    save_firewall_xml(path, lists, NOW)
    assert load_firewall_xml(path) == lists


@given(st.lists(any_line, max_size=8))
def test_payload_round_trip(lines: list[str]) -> None:
    rules = [Rule.from_api_string(line) for line in lines]
    payload = "".join(r.api_rule + "\n" for r in rules).encode()
    assert parse_api_payload(payload, NOW) == rules


@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
def test_arbitrary_text_never_crashes(untrusted_line: str) -> None:
    try:
        rule = Rule.from_api_string(untrusted_line)
    except RuleError as err:
        assert "\n" not in str(err)
    else:
        assert Rule.from_api_string(rule.api_rule) == rule


def test_a_forward_claims_at_most_the_agents_port_limit() -> None:
    assert DOM0_PORT_LIMIT == AGENT_PORT_LIMIT == 1024
    Rule.from_api_string(
        "action=forward forwardtype=external proto=tcp srcports=2000-3023 dstports=5000-6023"
    )
    Rule.from_api_string(
        "action=forward forwardtype=external proto=tcp srcports=2000-3023 dstports=2000-3023"
    )
    for line in (
        "action=forward forwardtype=external proto=tcp srcports=1-65535 dstports=1-65535",
        "action=forward forwardtype=internal proto=udp srcports=2000-3024 dstports=2000-3024",
    ):
        with pytest.raises(RuleError, match=r"claims \d+ ports: a forward rule takes at most 1024"):
            Rule.from_api_string(line)
