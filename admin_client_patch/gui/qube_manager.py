"""The panel inside Qube Manager's Settings window (admin_client_patch/qube-manager.patch).

The patch splits the Firewall tab with a vertical splitter, upstream's
outbound rules on top and an empty ``network_server_layout`` below, and
calls :func:`install_panel` from ``VMSettingsWindow.__init__``. The
outbound half stays upstream's own code: it keeps using
``admin.vm.firewall.Get``/``Set`` without argument, which carry outbound
rules only, so saving it can never touch a forward or inbound rule.
"""

from __future__ import annotations

from typing import Any

from admin_client_patch.gui.panel import NetworkServerPanel
from admin_client_patch.gui.rule_store import RuleStore
from admin_client_patch.gui.transport import qubesadmin_call


def install_panel(window: Any) -> NetworkServerPanel:
    """Put the panel for ``window.vm`` into the patched Firewall tab and read its rules.

    ``window`` is Qube Manager's ``VMSettingsWindow``; its qubesadmin app
    carries the panel's calls (qubesd's socket in dom0, qrexec elsewhere).
    """
    store = RuleStore(window.vm.name, qubesadmin_call(window.qubesapp))
    panel = NetworkServerPanel(store, window.network_server_widget)
    window.network_server_layout.addWidget(panel)
    window.network_server_panel = panel
    panel.refresh()
    return panel
