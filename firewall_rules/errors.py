"""Errors of the rule language; messages are one line, meant for the user."""

from __future__ import annotations


class RuleError(ValueError):
    """A rule (or rule list) that cannot be accepted, and why."""


class FirewallFileError(RuleError):
    """firewall.xml cannot be read as a rule list; the message names the file."""
