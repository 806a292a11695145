"""A qube's forward and inbound lists as the panel edits them.

Every edit reads the list afresh from dom0, changes that list and sends it
whole (``Set+forward`` / ``Set+inbound``). A rule to change or remove is
looked up in the fresh list: if someone else changed or removed it since
the view was drawn, the edit is refused (:class:`StaleViewError`) instead
of writing back an old list, so an edit can never undo another's.

The transport is a function, so the same code runs in dom0 (the project's
qubesd client) and in Qube Manager (qubesadmin's ``qubesd_call``).
"""

from __future__ import annotations

from collections.abc import Sequence

from admin_client_patch.firewall import QubeFirewall
from admin_client_patch.qubesd_client import Call
from firewall_rules import Rule, RuleKind


class StaleViewError(Exception):
    """The rule shown is no longer stored as shown; the message says so plainly."""


class RuleStore:
    """The forward and inbound rules of one qube, edited on fresh reads."""

    def __init__(self, qube: str, call: Call | None = None) -> None:
        self.qube = qube
        self._firewall = QubeFirewall(qube, call)

    def rules(self, kind: RuleKind) -> list[Rule]:
        """The list in force now (``admin.vm.firewall.Get+forward|inbound``)."""
        return self._firewall.rules(kind)

    def save(self, kind: RuleKind, rules: Sequence[Rule]) -> None:
        """Replace the whole list; dom0 stores all of it or refuses all of it."""
        self._firewall.save(kind, rules)

    def paths(self) -> dict[int, str]:
        """Path of each forward, numbered as :meth:`rules` lists them (``GetPaths``)."""
        return self._firewall.paths()

    # --- edits on a fresh list ---------------------------------------------

    def check_current(self, shown: Rule, shown_row: int) -> None:
        """Raise StaleViewError unless ``shown`` is still stored (before opening an edit)."""
        _find(self.rules(shown.kind), shown, shown_row)

    def add(self, rule: Rule) -> None:
        """Append ``rule`` to the list as stored now."""
        self.save(rule.kind, [*self.rules(rule.kind), rule])

    def replace(self, shown: Rule, shown_row: int, new: Rule) -> None:
        """Put ``new`` where ``shown`` is stored now (``shown_row`` is where it was seen)."""
        fresh = self.rules(shown.kind)
        fresh[_find(fresh, shown, shown_row)] = new
        self.save(shown.kind, fresh)

    def remove(self, shown: Rule, shown_row: int) -> None:
        """Delete ``shown`` from the list as stored now."""
        fresh = self.rules(shown.kind)
        del fresh[_find(fresh, shown, shown_row)]
        self.save(shown.kind, fresh)

    def move(self, shown: Rule, shown_row: int, step: int, neighbour: Rule) -> int:
        """Swap ``shown`` with ``neighbour``, shown ``step`` rows away (-1 up, +1 down).

        The first matching inbound rule decides, so the place a user sees is
        the meaning: both rules must still be stored as shown, side by side,
        or the move could land somewhere the user never saw. Returns the
        rule's new row.
        """
        fresh = self.rules(shown.kind)
        row = _find(fresh, shown, shown_row)
        other = row + step
        if not 0 <= other < len(fresh) or fresh[other] != neighbour:
            raise StaleViewError(
                "The order of the rules was changed elsewhere since the list was shown."
                " The list now shows the rules as they are stored; nothing was moved."
            )
        fresh[row], fresh[other] = fresh[other], fresh[row]
        self.save(shown.kind, fresh)
        return other


def _find(fresh: Sequence[Rule], shown: Rule, shown_row: int) -> int:
    """Where ``shown`` is in ``fresh``: its old row if still there, else its first copy."""
    if 0 <= shown_row < len(fresh) and fresh[shown_row] == shown:
        return shown_row
    for row, rule in enumerate(fresh):
        if rule == shown:
            return row
    raise StaleViewError(
        "This rule was changed or removed elsewhere since the list was shown."
        " The list now shows the rules as they are stored; nothing was changed."
    )
