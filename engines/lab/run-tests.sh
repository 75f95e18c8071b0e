#!/bin/sh
# In the guest: T1 tests inside a delegated scope, as the engines unit would hold them.
cd "$(dirname "$0")"
echo "== $(uname -r); $(systemctl --version | head -1); $(cat /sys/kernel/security/lsm 2>/dev/null)"
echo "== root cgroup.subtree_control: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
grep cgroup2 /proc/self/mounts
echo "== without delegation (cgroups at the root of the hierarchy)"
./real_launch 2>&1
echo "== delegated scope (systemd-run --scope -p Delegate=yes), LEASEHOLD_TEST_DELEGATED=1"
LEASEHOLD_TEST_DELEGATED=1 systemd-run --quiet --scope -p Delegate=yes --unit=lh-real-launch ./real_launch 2>&1
echo "rc=$?"
