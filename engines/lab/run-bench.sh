#!/bin/sh
# In the guest: the bench in a delegated scope, favordynmods off then on.
# A cgroup2 remount (with a source: otherwise libmount merges the old
# options back in) applies exactly the options given: keep systemd's
# (nsdelegate, memory_recursiveprot).
cd "$(dirname "$0")"
N=${1:-50}  # ORDER="on off" to swap the order
orig=$(awk '$2=="/sys/fs/cgroup"{print $4}' /proc/self/mounts)
keep=$(echo "$orig" | tr , '\n' | grep -E '^(nsdelegate|memory_recursiveprot|memory_localevents)$' | paste -sd,)
echo "== cgroup2 options at start: $orig (kept: $keep)"
for mode in ${ORDER:-off on}; do
  if [ $mode = on ]; then mount -o remount,nosuid,nodev,noexec,relatime,$keep,favordynmods none /sys/fs/cgroup; else mount -o remount,nosuid,nodev,noexec,relatime,$keep none /sys/fs/cgroup; fi
  echo "== favordynmods $mode: $(awk '$2=="/sys/fs/cgroup"{print $4}' /proc/self/mounts)"
  LEASEHOLD_TEST_DELEGATED=1 systemd-run --quiet --scope -p Delegate=yes --unit=lh-bench-$mode ./launch_latency $N 2>&1
done
mount -o remount,nosuid,nodev,noexec,relatime,$keep none /sys/fs/cgroup
echo "== restored: $(awk '$2=="/sys/fs/cgroup"{print $4}' /proc/self/mounts)"
