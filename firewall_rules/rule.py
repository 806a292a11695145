"""A firewall rule: its options, its kind, and its printed forms.

A qube has one ordered list per kind (:class:`RuleLists`). Which kind a
rule is follows from its options alone, so a rule never needs a separate
type field: ``action=forward`` is a forward rule, ``accept``/``drop`` with
``srchost=`` or ``srcqube=`` an inbound rule, anything else an upstream
outbound rule.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping

from firewall_rules.errors import RuleError
from firewall_rules.options import (
    DSTHOST_ALIASES,
    Action,
    Comment,
    DstHost,
    DstPorts,
    Expire,
    ForwardType,
    IcmpType,
    Proto,
    SpecialTarget,
    SrcHost,
    SrcPorts,
    SrcQube,
    shown,
)

#: Most ports one forward rule may claim: a rule never hands a whole edge
#: (srcports=1-65535) to one qube, and a remapped range is one nft map
#: element per port in every hop. The agent refuses more, too.
MAX_FORWARD_PORTS = 1024

#: Longest value QubesDB stores; an entry must fit in one.
QDB_VALUE_MAX = 3072

#: Options in the order ``api_rule`` prints them (upstream's order for its
#: options, the new ones next to their kin, comment last).
API_ORDER = (
    "action", "expire", "forwardtype", "srchost", "srcqube", "dsthost", "proto",
    "specialtarget", "srcports", "dstports", "icmptype", "comment",
)

#: Options in the order firewall.xml stores them: upstream's order for its
#: options (``action``, ``comment``, ``expire``, then ``dsthost``, ``proto``,
#: ``specialtarget``, then ``dstports``, ``icmptype``), so an outbound rule
#: is stored byte for byte as upstream's ``Firewall.save()`` stores it; the
#: new options next to their kin.
XML_ORDER = (
    "action", "comment", "expire", "forwardtype", "srchost", "srcqube", "dsthost", "proto",
    "specialtarget", "srcports", "dstports", "icmptype",
)

_FORWARD_ONLY = ("forwardtype", "srcports")

#: What a forward rule that leaves them out gets: reachable from the LAN.
DEFAULT_FORWARDTYPE = "external"


class RuleKind(enum.Enum):
    """Which traffic a rule is about."""

    OUTBOUND = "outbound"
    FORWARD = "forward"
    INBOUND = "inbound"

    @property
    def api_argument(self) -> str:
        """The argument of ``admin.vm.firewall.Get``/``Set`` for this kind's list.

        None for the outbound list: those calls are upstream's, unchanged.
        """
        return "" if self is RuleKind.OUTBOUND else self.value


class Rule:
    """One validated rule; build it with :meth:`from_api_string` or :meth:`from_options`."""

    action: Action
    expire: Expire | None
    forwardtype: ForwardType | None
    srchost: SrcHost | None
    srcqube: SrcQube | None
    dsthost: DstHost | None
    proto: Proto | None
    specialtarget: SpecialTarget | None
    srcports: SrcPorts | None
    dstports: DstPorts | None
    icmptype: IcmpType | None
    comment: Comment | None

    def __init__(self, options: Mapping[str, object]) -> None:
        """Use the factories; this only assembles already-built option objects."""
        for name in API_ORDER:
            setattr(self, name, options.get(name))
        self.kind = self._check()

    @classmethod
    def from_options(cls, untrusted_pairs: Iterable[tuple[str, str]]) -> Rule:
        """Build from ``(key, value)`` pairs, each key at most once."""
        options: dict[str, object] = {}
        for untrusted_key, untrusted_value in untrusted_pairs:
            key = "dsthost" if untrusted_key in DSTHOST_ALIASES else untrusted_key
            if key not in API_ORDER:
                raise RuleError(f"unknown option {shown(untrusted_key)}")
            if key in options:
                raise RuleError(f"option {key}= given twice")
            if key == "dsthost":
                options[key] = DstHost(untrusted_value, untrusted_key)
            else:
                options[key] = _OPTION_TYPES[key](untrusted_value)
        return cls(options)

    @classmethod
    def from_api_string(cls, untrusted_line: str) -> Rule:
        """Parse one Admin API line, ``key=value`` words separated by single spaces.

        As upstream, ``comment=`` takes the rest of the line, spaces included.
        """
        untrusted_words, _, untrusted_comment = untrusted_line.partition("comment=")
        untrusted_words = untrusted_words.rstrip(" ")
        if not untrusted_words:
            raise RuleError("empty rule: action= is required")
        pairs = []
        for untrusted_word in untrusted_words.split(" "):
            untrusted_key, sep, untrusted_value = untrusted_word.partition("=")
            if not untrusted_word:
                raise RuleError("words must be separated by exactly one space")
            if not sep:
                raise RuleError(f"{shown(untrusted_word)} is not key=value")
            pairs.append((untrusted_key, untrusted_value))
        if untrusted_comment:
            pairs.append(("comment", untrusted_comment))
        return cls.from_options(pairs)

    def _check(self) -> RuleKind:
        """Refuse combinations upstream refuses, and those the new kinds forbid."""
        if self.action is None:
            raise RuleError("action= is required")
        if self.dstports is not None and str(self.proto) not in ("tcp", "udp"):
            raise RuleError("dstports= needs proto=tcp or proto=udp")
        if self.icmptype is not None and str(self.proto) != "icmp":
            raise RuleError("icmptype= needs proto=icmp")
        if self.srchost is not None and self.srcqube is not None:
            raise RuleError("srchost= and srcqube= cannot be combined: give one source")
        if str(self.action) == "forward":
            kind = RuleKind.FORWARD
            self._check_forward()
        elif self.srchost is not None or self.srcqube is not None:
            kind = RuleKind.INBOUND
            self._refuse(("dsthost", "specialtarget", *_FORWARD_ONLY), "an inbound rule")
            if self.dstports is not None and self.dstports.first == 0:
                raise RuleError("dstports=: port 0 cannot be opened")
        else:
            kind = RuleKind.OUTBOUND
            self._refuse(_FORWARD_ONLY, "an outbound rule (they need action=forward)")
            if self.expire is not None and self.expire.at_shutdown:
                raise RuleError(
                    "expire=shutdown is for forward and inbound rules only (outbound"
                    " rules are read by upstream tools, which know only EPOCH)"
                )
        qdb_rule = self._qdb_words()
        if len(qdb_rule) > QDB_VALUE_MAX:
            raise RuleError(f"rule longer than {QDB_VALUE_MAX} characters")
        return kind

    def _refuse(self, names: Iterable[str], what: str) -> None:
        for name in names:
            if getattr(self, name) is not None:
                raise RuleError(f"{name}= has no meaning in {what}")

    def _check_forward(self) -> None:
        """Fill the defaults (external, ``srcports`` = ``dstports``), then check.

        The defaults are stored, so ``Get`` shows every forward in full.
        """
        self._refuse(("dsthost", "specialtarget", "icmptype"), "a forward rule")
        for name in ("proto", "dstports"):
            if getattr(self, name) is None:
                raise RuleError(f"action=forward needs {name}=")
        if self.forwardtype is None:
            self.forwardtype = ForwardType(DEFAULT_FORWARDTYPE)
        if self.srcports is None:
            assert self.dstports is not None
            self.srcports = SrcPorts(str(self.dstports))
        if str(self.proto) not in ("tcp", "udp"):
            raise RuleError("action=forward needs proto=tcp or proto=udp")
        if self.srcqube is not None and str(self.forwardtype) != "internal":
            raise RuleError(
                "srcqube= needs forwardtype=internal: an external forward comes from"
                " the LAN, not from a qube (use srchost=)"
            )
        assert self.srcports is not None and self.dstports is not None
        for ports in (self.srcports, self.dstports):
            if ports.first == 0:
                raise RuleError(f"{ports.key}=: port 0 cannot be forwarded")
        if self.srcports.count != self.dstports.count:
            raise RuleError(
                f"srcports={self.srcports} and dstports={self.dstports} must hold the same"
                " number of ports (they map one to one)"
            )
        if self.srcports.count > MAX_FORWARD_PORTS:
            raise RuleError(
                f"srcports={self.srcports} claims {self.srcports.count} ports: a forward rule"
                f" takes at most {MAX_FORWARD_PORTS} (split a larger range into several rules)"
            )

    def _qdb_words(self) -> str:
        words = [f"action={self.action}"]
        if self.dsthost is not None:
            words.append(self.dsthost.rule)
        if self.proto is not None:
            words.append(f"proto={self.proto}")
        if self.specialtarget is not None:
            words.append(f"specialtarget={self.specialtarget}")
        if self.dstports is not None:
            words.append(self.dstports.rule)
        if self.icmptype is not None:
            words.append(self.icmptype.rule)
        return " ".join(words)

    @property
    def qdb_rule(self) -> str:
        """The ``/qubes-firewall/<ip>/NNNN`` value, byte for byte as upstream writes it.

        Only outbound rules go there: today's agents drop all of a qube's
        traffic on an option they do not know.
        """
        if self.kind is not RuleKind.OUTBOUND:
            raise ValueError(f"{self.kind.value} rules have no /qubes-firewall/ entry")
        return self._qdb_words()

    @property
    def api_rule(self) -> str:
        """The canonical Admin API line (what ``Get`` returns)."""
        words = []
        for name in API_ORDER:
            option = getattr(self, name)
            if option is None:
                continue
            rule = getattr(option, "rule", None)
            words.append(rule if rule is not None else f"{name}={option}")
        return " ".join(words)

    def properties(self) -> list[tuple[str, str]]:
        """``(name, value)`` of every option set, as firewall.xml stores them."""
        return [
            (name, str(option))
            for name in XML_ORDER
            if (option := getattr(self, name)) is not None
        ]

    def is_expired(self, now: float) -> bool:
        return self.expire is not None and self.expire.is_expired(now)

    @property
    def expires_at_shutdown(self) -> bool:
        """Whether dom0 deletes this rule when its qube stops (``expire=shutdown``)."""
        return self.expire is not None and self.expire.at_shutdown

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rule):
            return NotImplemented
        return self.api_rule == other.api_rule

    def __hash__(self) -> int:
        return hash(self.api_rule)

    def __repr__(self) -> str:
        return f"Rule({self.api_rule!r})"


_OPTION_TYPES = {
    "action": Action,
    "expire": Expire,
    "forwardtype": ForwardType,
    "srchost": SrcHost,
    "srcqube": SrcQube,
    "proto": Proto,
    "specialtarget": SpecialTarget,
    "srcports": SrcPorts,
    "dstports": DstPorts,
    "icmptype": IcmpType,
    "comment": Comment,
}

#: Most rules one qube may hold: QubesDB entry names have four digits.
MAX_RULES = 9999


def parse_api_payload(untrusted_payload: bytes, now: float) -> list[Rule]:
    """Parse a whole ``Set`` payload: every line valid, or nothing.

    One rule per line; as upstream, the last line may lack its newline.
    Rules already expired are validated, then left out, as upstream's save
    does.
    """
    try:
        untrusted_text = untrusted_payload.decode("ascii")
    except UnicodeDecodeError:
        raise RuleError("firewall rules must be ASCII text") from None
    if not untrusted_text:
        return []
    untrusted_lines = untrusted_text.removesuffix("\n").split("\n")
    if len(untrusted_lines) > MAX_RULES:
        raise RuleError(f"at most {MAX_RULES} rules per qube")
    rules = []
    for number, untrusted_line in enumerate(untrusted_lines):
        try:
            rules.append(Rule.from_api_string(untrusted_line))
        except RuleError as err:
            raise RuleError(f"rule {number} ({shown(untrusted_line)}): {err}") from None
    return [rule for rule in rules if not rule.is_expired(now)]


def default_rules() -> list[Rule]:
    """A qube's outbound rules when none were ever set: accept everything, as in Qubes."""
    return [Rule.from_api_string("action=accept")]


@dataclasses.dataclass(frozen=True)
class RuleLists:
    """A qube's rules: one ordered list per kind, as firewall.xml keeps them.

    The kinds never share a list: upstream's code reads and writes the
    outbound list only, so a forward or inbound rule can never reach it.
    Rules keep their expiry; users of a list leave out what has expired.
    """

    outbound: tuple[Rule, ...] = ()
    forward: tuple[Rule, ...] = ()
    inbound: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        for kind in RuleKind:
            for rule in self.of(kind):
                if rule.kind is not kind:
                    raise RuleError(f"{rule.kind.value} rule in the {kind.value} list")

    @classmethod
    def default(cls) -> RuleLists:
        """A qube whose rules were never set: upstream's accept-all, nothing else."""
        return cls(outbound=tuple(default_rules()))

    @classmethod
    def sorted_out(cls, rules: Iterable[Rule]) -> RuleLists:
        """One mixed list (a version 3 firewall.xml) split by kind, each keeping its order.

        Rules of different kinds never applied to the same traffic, so the
        split changes nothing a qube enforces.
        """
        kinds: dict[RuleKind, list[Rule]] = {kind: [] for kind in RuleKind}
        for rule in rules:
            kinds[rule.kind].append(rule)
        return cls(**{kind.value: tuple(kept) for kind, kept in kinds.items()})

    def of(self, kind: RuleKind) -> tuple[Rule, ...]:
        return getattr(self, kind.value)  # type: ignore[no-any-return]

    def replaced(self, kind: RuleKind, rules: Iterable[Rule]) -> RuleLists:
        """The same lists with the ``kind`` list replaced by ``rules``."""
        return dataclasses.replace(self, **{kind.value: tuple(rules)})

    def all(self) -> tuple[Rule, ...]:
        return self.outbound + self.forward + self.inbound


def outbound_qdb_entries(
    rules: Iterable[Rule], addr_family: int | None, now: float
) -> dict[str, str]:
    """Entries of ``/qubes-firewall/<ip>/`` as upstream qubesd writes them.

    ``rules`` is the outbound list; rules of the other address family and
    expired rules leave gaps in the numbering, exactly as upstream's; the
    agent reads the entries in key order.
    """
    skip_type = {4: "dst6", 6: "dst4"}.get(addr_family) if addr_family else None
    entries = {"policy": "drop"}
    for number, rule in enumerate(rules):
        if rule.kind is not RuleKind.OUTBOUND:
            raise ValueError(f"{rule.kind.value} rule in an outbound list: {rule.api_rule}")
        if rule.is_expired(now):
            continue
        if rule.dsthost is not None and rule.dsthost.type == skip_type:
            continue
        entries[f"{number:04}"] = rule.qdb_rule
    return entries
