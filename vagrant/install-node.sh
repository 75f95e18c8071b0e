#!/bin/sh
# Installs the Leasehold package on a node and waits until the agent is up.
# Used by vagrant/lab (QEMU lab) and the Vagrantfile (libvirt), so both
# provision nodes the same way. Usage: install-node.sh PATH/TO/leasehold.deb
set -eu
deb=$1
if ! dpkg -i "$deb" >/tmp/leasehold-dpkg.log 2>&1; then
    # Missing dependencies: fetch them if the node has a package mirror.
    if ! apt-get -y -f install >>/tmp/leasehold-dpkg.log 2>&1; then
        cat /tmp/leasehold-dpkg.log
        exit 1
    fi
fi
if ! timeout 120 sh -c 'until systemctl is-active -q leasehold-agentd; do sleep 1; done'; then
    systemctl status leasehold-agentd --no-pager || true
    journalctl -u leasehold-agentd --no-pager | tail -n 40
    exit 1
fi
echo "leasehold: $(dpkg-query -W -f='${Version}' leasehold) installed; leasehold-agentd active"
