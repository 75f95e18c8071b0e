#!/bin/sh
# Does systemd 252 restart a Delegate=yes unit whose cgroup has controllers
# enabled in cgroup.subtree_control (processes only in leaves)?
set -u
exp() { # $1 = KillMode
  km=$1; u=lh-deleg-$km
  cat > /run/systemd/system/$u.service <<UNIT
[Service]
Delegate=yes
KillMode=$km
ExecStart=/bin/sleep infinity
UNIT
  systemctl daemon-reload
  systemctl start $u
  cg=/sys/fs/cgroup/system.slice/$u.service
  main=$(systemctl show -P MainPID $u)
  echo "== KillMode=$km: main pid $main in $(cat /proc/$main/cgroup)"
  echo "   controllers: $(cat $cg/cgroup.controllers)"
  printf '   enable +memory with the main process still in the unit cgroup: '
  (echo +memory > $cg/cgroup.subtree_control) 2>&1 || true; echo "(subtree_control now: '$(cat $cg/cgroup.subtree_control)')"
  mkdir $cg/holder && echo $main > $cg/holder/cgroup.procs
  echo "+cpu +memory +io +pids" > $cg/cgroup.subtree_control
  mkdir -p $cg/tenant/e1
  echo "+cpu +memory +io +pids" > $cg/tenant/cgroup.subtree_control
  sh -c 'echo $$ > '$cg'/tenant/e1/cgroup.procs; exec sleep infinity' &
  sleep 0.5; eng=$(cat $cg/tenant/e1/cgroup.procs)
  echo "   holder moved, subtree_control '$(cat $cg/cgroup.subtree_control)', engine pid $eng in tenant/e1"
  t0=$(date +%s%N)
  systemctl restart $u; rc=$?
  t1=$(date +%s%N)
  sleep 1
  echo "   systemctl restart: rc=$rc ($(( (t1 - t0) / 1000000 )) ms); ActiveState=$(systemctl show -P ActiveState $u) Result=$(systemctl show -P Result $u) ExecMainStatus=$(systemctl show -P ExecMainStatus $u)"
  echo "   engine $eng alive after restart: $(kill -0 $eng 2>/dev/null && echo yes || echo no)"
  echo "   cgroup after: $(ls -d $cg 2>/dev/null || echo gone); subtree_control '$(cat $cg/cgroup.subtree_control 2>/dev/null)'"
  newmain=$(systemctl show -P MainPID $u); [ "$newmain" != 0 ] && echo "   new main pid $newmain in $(cat /proc/$newmain/cgroup)"
  journalctl -b -u $u --no-pager -o cat | tail -n 6 | sed 's/^/   journal: /'
  systemctl stop $u; kill $eng 2>/dev/null; sleep 0.3
  for d in $cg/tenant/e1 $cg/tenant $cg/holder $cg; do rmdir $d 2>/dev/null; done
  systemctl reset-failed $u 2>/dev/null; rm -f /run/systemd/system/$u.service
}
echo "systemd $(systemctl --version | head -1)"
exp control-group
exp mixed
exp process
systemctl daemon-reload
