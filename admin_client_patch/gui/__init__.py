"""The network server panel: a qube's forward and inbound rules in PyQt6.

Reached as ``qubes-network-server-settings VM`` or inside Qube Manager's
Settings window (the patch in ``admin_client_patch/qube-manager/``).
"""
