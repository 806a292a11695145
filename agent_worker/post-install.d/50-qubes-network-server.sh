#!/bin/sh
# Tell dom0 that this template's qubes run the Qubes network server agent,
# so it may plan forward and inbound entries for them (qubes-post-install
# hook, run at template install and update as /etc/qubes/post-install.d/).
qvm-features-request supported-feature.qubes-network-server=1
