#!/bin/sh
# favordynmods' cost on 6.1: fork+exit+exec of 1000 /bin/true, off/on/off/on.
orig=$(awk '$2=="/sys/fs/cgroup"{print $4}' /proc/self/mounts)
keep=$(echo "$orig" | tr , '\n' | grep -E '^(nsdelegate|memory_recursiveprot|memory_localevents)$' | paste -sd,)
for mode in off on off on; do
  if [ $mode = on ]; then mount -o remount,nosuid,nodev,noexec,relatime,$keep,favordynmods none /sys/fs/cgroup; else mount -o remount,nosuid,nodev,noexec,relatime,$keep none /sys/fs/cgroup; fi
  t0=$(date +%s%N)
  busybox sh -c 'i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done'
  t1=$(date +%s%N)
  echo "favordynmods $mode: 1000 fork+exec+exit of /bin/true: $(( (t1 - t0) / 1000000 )) ms"
done
mount -o remount,nosuid,nodev,noexec,relatime,$keep none /sys/fs/cgroup
echo "restored: $(awk '$2=="/sys/fs/cgroup"{print $4}' /proc/self/mounts)"
