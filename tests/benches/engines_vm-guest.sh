#!/bin/sh
# Runs on a lab node as root (tests/benches/engines_vm.rs), from
# /var/tmp/lhb (the bench's files: lhmark, rootfs/, bundle/, bb.tar, the
# specs). Issue 14's engine figures, one run:
#   1. start latency, N rounds (round 0 a warm-up), launchers interleaved:
#      the agent (tenantctl engine start as the tenant), systemd-run --scope,
#      systemd-run (service), crun run; "sample LAUNCHER T0 FIRST" lines
#   2. exit -> first restart, R samples (restart.policy always, initial 1ms;
#      a manual start between samples forgets the backoff); "restart EXIT
#      FIRST" lines; then the same with a bare parent ("floor EXIT FIRST"),
#      and that parent in namespaces, the engine's cgroup and the engine's
#      whole confinement ("floor-ns", "floor-cgroup", "floor-confined")
#   3. agent RSS and CPU over IDLE_SECS with 0, then E idle engines;
#      "idle ENGINES RSS_KB HWM_KB TICKS SECS CLK_TCK SHIMS_KB ENGINES_KB
#      MEM_AVAIL_KB" lines
#   4. process creation with and without favordynmods (F spawns per block,
#      K rounds); "forks with|without F US" lines
# Engine events go out between "events" and "end" lines. Every wait is
# bounded; a launcher that fails prints "fail LAUNCHER ..." and the run
# goes on.
set -eu
B=/var/tmp/lhb
L=$B/lhmark
RF=$B/rootfs
W=$B/out
N=${N:-30}
R=${R:-20}
E=${E:-100}
IDLE_SECS=${IDLE_SECS:-60}
DEV=$(readlink -f /dev/disk/by-id/virtio-leasehold-tenant)
CONF=/etc/leasehold/agentd.toml
rm -rf "$W"; mkdir -p "$W"; chmod 755 "$B" "$W"
id tt >/dev/null 2>&1 || useradd -m -G leasehold-tenant tt

echo "guest $(uname -r) $(nproc) $(awk '/^MemTotal/ {print $2}' /proc/meminfo)"
echo "cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "cgroup2 $(awk '$2 == "/sys/fs/cgroup" {print $4}' /proc/self/mounts)"
echo "versions $(systemctl --version | head -n1 | tr ' ' _) $(crun --version | head -n1 | tr ' ' _)"

t() { runuser -u tt -- tenantctl "$@"; }

# Waits (bounded: 300 s) until a tenantctl command's output matches.
until_out() { # pattern command...
    pat=$1; shift; n=0
    until "$@" 2>/dev/null | grep -q -- "$pat"; do
        n=$((n + 1)); [ "$n" -lt 1500 ] || { echo "timeout waiting for $pat from $*" >&2; return 1; }
        sleep 0.2
    done
}

# Waits (bounded: 600 polls, 120 s) until ENGINE's log holds COUNT
# "first" lines (its instances' first instructions); else a "fail WHAT"
# line with the engine's status, and the run goes on.
await_firsts() { # engine count what
    n=0
    until [ "$(t engine logs "$1" | grep -c ' out first ')" -ge "$2" ]; do
        n=$((n + 1)); [ "$n" -lt 600 ] || { echo "fail $3: $(t engine status "$1" | tr '\n' ' ')"; return 0; }
        sleep 0.2
    done
}

agent_idle() {
    n=0
    while landlordctl --json info | grep -q '"running":"'; do
        n=$((n + 1)); [ "$n" -lt 3000 ] || { echo "node never idle" >&2; exit 1; }
        sleep 0.2
    done
}

# The tenant and its volume, as a landlord sets up a node (no fill: the
# bench is about engines; TCG makes the fill's AES slow).
landlordctl --json info | grep -q '"assigned":true' || landlordctl --yes assign bench >/dev/null
systemctl stop leasehold-agentd
sed -i '/^\[storage\]/,$d' "$CONF"
printf '[storage]\nfill_on_init = false\n' >> "$CONF"
# Polkit's answer bounded at 30 s, not the shipped 5, as the VM lab's
# install section does (docs/lab.md): under TCG with tens of idle engines
# polkitd once took longer than 5 s for one start (denied, fail closed: the
# 100-engine figures were lost).
printf '[dbus]\nauth_timeout_ms = 30000\n' >> "$CONF"
if [ "${FAVORDYNMODS:-0}" = 1 ]; then
    # The landlord's node-wide option (docs/engines.md, "favordynmods"): the
    # packaged example drop-in, applied by the engines unit's restart (no
    # engine runs yet).
    install -D -m 0644 /usr/share/doc/leasehold/examples/systemd/leasehold-engines-favordynmods.conf \
        /etc/systemd/system/leasehold-engines.service.d/favordynmods.conf
    systemctl daemon-reload
    systemctl restart leasehold-engines
fi
echo "cgroup2 $(awk '$2 == "/sys/fs/cgroup" {print $4}' /proc/self/mounts)"
systemctl start leasehold-agentd
landlordctl --yes volume init --force "$DEV" >/dev/null
agent_idle
# The landlord's budget for the tenant, through its CLI: room for E engines
# (each is a shim and the engine: 2 tasks; 3 before the shim lost its
# signal thread on 2026-12-05).
landlordctl budget set --pids-max 4096 --memory-max 1536M >/dev/null
landlordctl budget show

agent_pid() { systemctl show -p MainPID --value leasehold-agentd; }

# A process's resident KiB: Rss of smaps_rollup, not VmRSS (6.1 folds a
# task's counts into VmRSS only every 64 page faults: a static shim's read a
# few KiB); 0 for a process gone meanwhile.
rss_kb() { awk '/^Rss:/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }

idle_sample() { # engines
    pid=$(agent_pid)
    tck=$(getconf CLK_TCK)
    a=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    s0=$(date +%s%N)
    sleep "$IDLE_SECS"
    b=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    s1=$(date +%s%N)
    rss=$(rss_kb "$pid")
    hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")
    shims=0; engines=0
    for p in $(pgrep -f '^/usr/lib/leasehold/leasehold-engine-shim' || true); do
        grep -q -- '--hold' "/proc/$p/cmdline" 2>/dev/null && continue
        shims=$((shims + $(rss_kb "$p")))
    done
    for p in $(pgrep -x lhmark || true); do
        engines=$((engines + $(rss_kb "$p")))
    done
    avail=$(awk '/^MemAvailable/ {print $2}' /proc/meminfo)
    echo "idle $1 $rss $hwm $((b - a)) $(( (s1 - s0) / 1000000 )) $tck $shims $engines $avail"
    # Where the agent's RSS is (anonymous or file-backed); kept in guest.out.
    echo "smaps $1 $(awk '/^(Rss|Pss_Anon|Pss_File|Anonymous|Private_Dirty):/ {printf "%s%s ", $1, $2}' "/proc/$pid/smaps_rollup")"
}

# 3a. The agent with no engine at all.
idle_sample 0

# 1. Start latency. The agent's engine exits at once (restart never); each
# sample waits until the agent shows it exited.
# One agent round: CLIENT starts ENGINE, t0 into $W/ROW.
agent_round() { # client engine row
    if runuser -u tt -- "$L" spawn "$1" engine start "$2" >> "$W/$3" 2>> "$W/$3.err"; then
        # This round's line in the log, then the exit seen by the agent.
        await_firsts "$2" $((i + 1)) "$3 round $i"
        until_out '"state":"exited"' t --json engine status "$2" || echo "fail $3 round $i: $(t engine status "$2" | tr '\n' ' ')"
    else
        echo "fail $3 round $i: $(tail -n1 "$W/$3.err")"
    fi
}
t engine deploy s "$B/bb.tar" --spec "$B/start.toml" >/dev/null
# A baseline tenantctl (LH_BENCH_BASELINE_TENANTCTL): its own engine,
# first in odd rounds (neither client always finds the bus and polkit
# warmed by the other).
[ ! -x "$B/tenantctl-base" ] || t engine deploy sb "$B/bb.tar" --spec "$B/start.toml" >/dev/null
base_round() { [ ! -x "$B/tenantctl-base" ] || agent_round "$B/tenantctl-base" sb agentbase; }
i=0
while [ "$i" -le "$N" ]; do
    [ $((i % 2)) = 0 ] || base_round
    agent_round tenantctl s agent
    [ $((i % 2)) = 1 ] || base_round
    "$L" spawn systemd-run --quiet --scope "$RF/lhmark" engine >> "$W/scope" 2>> "$W/scope.err" \
        || echo "fail scope round $i: $(tail -n1 "$W/scope.err")"
    "$L" spawn systemd-run --quiet --pipe --wait --collect "$RF/lhmark" engine >> "$W/service" 2>> "$W/service.err" </dev/null \
        || echo "fail service round $i: $(tail -n1 "$W/service.err")"
    "$L" spawn crun --cgroup-manager=cgroupfs run --bundle "$B/bundle" "lhb-$i" >> "$W/crun" 2>> "$W/crun.err" </dev/null \
        || echo "fail crun round $i: $(tail -n1 "$W/crun.err")"
    crun delete -f "lhb-$i" >/dev/null 2>&1 || true
    i=$((i + 1))
done
# The agent's engine printed its "first" lines into its log.
t engine logs s | sed -n 's/.* out first \([0-9]*\)$/first \1/p' >> "$W/agent.first"
if [ -x "$B/tenantctl-base" ]; then
    t engine logs sb | sed -n 's/.* out first \([0-9]*\)$/first \1/p' >> "$W/agentbase.first"
    echo events; t --json engine events; echo end
    t --yes engine rm sb >/dev/null
fi
# 1b. The agent's own path: N+1 starts from one kept D-Bus connection (no
# client start; polkit's yes reused on the connection), back to back.
t engine deploy p "$B/bb.tar" --spec "$B/start.toml" >/dev/null
runuser -u tt -- "$B/lh-dbus-probe" starts $((N + 1)) p > "$W/probe" 2>> "$W/probe.err" \
    || echo "fail probe: $(tail -n1 "$W/probe.err")"
grep '^fail' "$W/probe" | sed 's/^fail/fail probe:/' || true
t engine logs p | sed -n 's/.* out first \([0-9]*\)$/first \1/p' >> "$W/probe.first"
# 1b'. The same with no warm shim: the agent restarted with
# `[engines] warm_shim = false`, then back to the packaged default
# (docs/engines.md, "The warm shim"). The events so far first: a restart
# starts the agent's list again.
# s and p removed before it: an agent's start starts engines marked to run.
echo events; t --json engine events; echo end
t --yes engine rm s >/dev/null
t --yes engine rm p >/dev/null
warm_shim() { # on|off
    systemctl stop leasehold-agentd || echo "fail warm shim $1: stop"
    sed -i '/^warm_shim = false$/d' "$CONF"
    # (The [engines] table went with the cut above; an empty one is kept.)
    grep -q '^\[engines\]' "$CONF" || printf '[engines]\n' >> "$CONF"
    [ "$1" = on ] || sed -i '/^\[engines\]/a warm_shim = false' "$CONF"
    systemctl start leasehold-agentd || echo "fail warm shim $1: start"
    agent_idle
    # Counts every shim started with --warm, handed a start or not: only
    # right with no engine running (s and p are removed above).
    n=0
    until [ "$(pgrep -fc -- '--warm$' || true)" = "$([ "$1" = on ] && echo 1 || echo 0)" ]; do
        n=$((n + 1)); [ "$n" -lt 100 ] || { echo "fail warm shim $1: $(pgrep -fa -- --warm | tr '\n' ' ')"; break; }
        sleep 0.1
    done
    echo "warm-shims-$1 $(pgrep -fc -- '--warm$' || true)"
}
warm_shim off
t engine deploy c "$B/bb.tar" --spec "$B/start.toml" >/dev/null
runuser -u tt -- "$B/lh-dbus-probe" starts $((N + 1)) c > "$W/cold" 2>> "$W/cold.err" \
    || echo "fail cold: $(tail -n1 "$W/cold.err")"
grep '^fail' "$W/cold" | sed 's/^fail/fail cold:/' || true
t engine logs c | sed -n 's/.* out first \([0-9]*\)$/first \1/p' >> "$W/cold.first"
echo events; t --json engine events; echo end
t --yes engine rm c >/dev/null
warm_shim on
# 1c. systemd's own start from one kept connection (as root), the like of
# 1b: "t0" just before StartTransientUnit, "first" from the marker, a scope
# (a waiting child execs the marker once the job is done, as systemd-run
# --scope does) and a service (ExecStart the marker).
for k in scope service; do
    "$B/lh-dbus-probe" units $((N + 1)) "$k" "$RF/lhmark" "$W/u$k" >> "$W/u$k" 2>> "$W/u$k.err" </dev/null \
        || echo "fail u$k: $(tail -n1 "$W/u$k.err")"
    grep '^fail' "$W/u$k" | sed "s/^fail/fail u$k:/" || true
done
rows="agent probe cold scope service crun uscope uservice"
[ ! -x "$B/tenantctl-base" ] || rows="$rows agentbase"
for l in $rows; do
    if [ "$l" = agent ] || [ "$l" = agentbase ] || [ "$l" = probe ] || [ "$l" = cold ]; then
        grep '^t0 ' "$W/$l" | cut -d' ' -f2 > "$W/a.t0"
        cut -d' ' -f2 "$W/$l.first" > "$W/a.first"
    else
        grep '^t0 ' "$W/$l" | cut -d' ' -f2 > "$W/a.t0"
        grep '^first ' "$W/$l" | cut -d' ' -f2 > "$W/a.first"
    fi
    echo "count-$l $(wc -l < "$W/a.t0") t0, $(wc -l < "$W/a.first") first"
    paste -d' ' "$W/a.t0" "$W/a.first" | sed "s/^/sample $l /"
done
echo events; t --json engine events; echo end

# 2. Exit -> first restart: instance A prints, creates the flag, prints its
# exit time and exits 1; the agent restarts it (always, initial 1ms);
# instance B finds the flag, removes it and stays. Then stop, so the next
# manual start begins with a fresh backoff.
t engine deploy r "$B/bb.tar" --spec "$B/restart.toml" >/dev/null
i=0
while [ "$i" -le "$R" ]; do
    t engine start r
    await_firsts r $((2 * (i + 1))) "restart round $i"
    t engine stop r
    until_out '"state":"stopped"' t --json engine status r || echo "fail restart stop $i"
    i=$((i + 1))
done
# Ordered by the marker's own clock (two instances' outputs reach the log
# through two pipes: their order there is not the order of events).
t engine logs r | sed -n 's/.* out \(first\|exit\) \([0-9]*\)$/\1 \2/p' | sort -n -k2 > "$W/r"
echo "restart-lines $(wc -l < "$W/r")"
awk '$1 == "exit" {e = $2; next} $1 == "first" && e != "" {print "restart " e " " $2; e = ""}' "$W/r"
echo events; t --json engine events; echo end
# 2b. The floor of a restart on this node: a bare parent waits for the
# marker's exit and spawns it again (no confinement, no delay, no agent).
"$L" floor "$R" > "$W/floor" 2>> "$W/floor.err" || echo "fail floor: $(tail -n1 "$W/floor.err")"
pairs() { # row file
    awk -v row="$1" '$1 == "exit" {e = $2; next} $1 == "first" && e != "" {print row " " e " " $2; e = ""}' "$2"
}
pairs floor "$W/floor"
# 2c. Where the in-place restart's gap to the floor goes: the same bare
# parent in new pid and mount namespaces (unshare, as root); as root in the
# running engine's cgroup; and inside the running engine's whole
# confinement (the shim's probe path: its namespaces and cgroup, Landlock,
# its uid, no_new_privs, seccomp; the lines through its data dir, as
# stdout is null there). Engine r runs again for this (A, then B stays).
t engine start r
await_firsts r $((2 * (R + 2))) "floor-confined: r not restarted"
# Each step's failure is a "fail" line; the run goes on (set -e would end it).
rd=$(ls -d /run/leasehold/engines/r/*/ 2>/dev/null | head -n1 || true)
# spec.json is one line of JSON; restart.toml has one data dir.
cg=$(sed -n 's/.*"cgroup":"\([^"]*\)".*/\1/p' "$rd/spec.json" 2>/dev/null || true)
data=$(sed -n 's/.*"data_dirs":\[{"host":"\([^"]*\)".*/\1/p' "$rd/spec.json" 2>/dev/null || true)
unshare --fork --pid --mount --mount-proc "$L" floor "$R" > "$W/floorns" 2>> "$W/floorns.err" \
    || echo "fail floor-ns: $(tail -n1 "$W/floorns.err")"
pairs floor-ns "$W/floorns"
if [ -n "$cg" ] && [ -n "$data" ]; then
    sh -c 'echo $$ > "$1/cgroup.procs" && exec "$2" floor "$3"' sh "$cg" "$L" "$R" > "$W/floorcg" 2>> "$W/floorcg.err" \
        || echo "fail floor-cgroup: $(tail -n1 "$W/floorcg.err")"
    pairs floor-cgroup "$W/floorcg"
    rm -f "$data/floor.out"
    /usr/lib/leasehold/leasehold-engine-shim --probe "$rd" 600000 /lhmark floor "$R" /data/floor.out \
        2>> "$W/floorconf.err" || echo "fail floor-confined: exit $? $(tail -n1 "$W/floorconf.err")"
    if [ -f "$data/floor.out" ]; then pairs floor-confined "$data/floor.out"; fi
else
    echo "fail floor-cgroup, floor-confined: no run directory, cgroup or data dir of r ($rd)"
fi
t engine stop r
t --yes engine rm r >/dev/null

# 3b. E idle engines: the image uploaded once into the inbox, each engine
# deployed from it (unpacked into its own root).
t engine upload "$B/bb.tar" --as lhb.tar >/dev/null
t0=$(date +%s%N)
i=1
while [ "$i" -le "$E" ]; do
    t engine deploy "e$i" lhb.tar --from-inbox --spec "$B/idle.toml" >/dev/null || { echo "fail deploy e$i"; break; }
    i=$((i + 1))
done
t1=$(date +%s%N)
i=1
while [ "$i" -le "$E" ]; do
    t engine start "e$i" || { echo "fail start e$i"; break; }
    i=$((i + 1))
done
n=0
until [ "$(t engine ls | grep -c 'ready')" -ge "$E" ]; do
    n=$((n + 1)); [ "$n" -lt 600 ] || { echo "fail: $(t engine ls | grep -vc ready) engines not ready"; break; }
    sleep 1
done
t2=$(date +%s%N)
echo "deploy-all-from-inbox-ms $(( (t1 - t0) / 1000000 )) start-all-ms $(( (t2 - t1) / 1000000 )) ready $(t engine ls | grep -c ready) of $E"
# Let the starts settle (their events, logs and timers) before measuring.
sleep 10
idle_sample "$(t engine ls | grep -c ready)"
cat /sys/fs/cgroup/system.slice/leasehold-engines.service/tenant/pids.current \
    /sys/fs/cgroup/system.slice/leasehold-engines.service/tenant/memory.current | tr '\n' ' ' | sed 's/^/tenant-subtree /'; echo
grep -i threads "/proc/$(agent_pid)/status" | tr '\t\n' '  ' | sed 's/^/agent-/'; echo
ls "/proc/$(agent_pid)/fd" | wc -l | sed 's/^/agent-fds /'

# 4. What favordynmods costs the node's process creation: blocks of F
# spawns of /bin/true from this shell (fork, exec, exit, wait: each takes
# the cgroup threadgroup lock as a reader, which the option keeps in its
# slow mode on 6.1), without and with the option, K rounds, the order
# swapped every round; "forks with|without F MICROSECONDS" lines. Only
# where the run started without it (6.1 takes it off again when a remount
# names the source and the old options, as the lab's engine-runtime step
# does). The idle engines above go on running.
F=${F:-300}
K=${K:-5}
before=$(awk '$2 == "/sys/fs/cgroup" {print $4}' /proc/self/mounts)
fork_block() { # with|without
    s0=$(date +%s%N); j=0
    while [ "$j" -lt "$F" ]; do /bin/true; j=$((j + 1)); done
    s1=$(date +%s%N)
    echo "forks $1 $F $(( (s1 - s0) / 1000 ))"
}
favor() { mount -o remount,favordynmods /sys/fs/cgroup; fork_block with; }
plain() { mount -o "remount,$before" cgroup2 /sys/fs/cgroup; fork_block without; }
case ",$before," in
*,favordynmods,*) echo "fail forks: the run started with favordynmods" ;;
*)
    k=0
    while [ "$k" -lt "$K" ]; do
        if [ $((k % 2)) = 0 ]; then favor; plain; else plain; favor; fi
        k=$((k + 1))
    done
    mount -o "remount,$before" cgroup2 /sys/fs/cgroup
    echo "cgroup2-after $(awk '$2 == "/sys/fs/cgroup" {print $4}' /proc/self/mounts)"
    ;;
esac
echo done
