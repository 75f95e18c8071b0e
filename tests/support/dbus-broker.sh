#!/bin/bash
# dbus-broker as the lab's bus instead of dbus-daemon (LabOptions::dbus_broker),
# outside systemd. Runs in a mount namespace of its own (unshare -m) so the
# paths dbus-broker-launch insists on are private to it:
# - /run/systemd/journal/socket: it logs there and exits without one;
# - /run/dbus/system_bus_socket: with --scope system it connects to the system
#   bus, i.e. to itself, through that path.
# - /usr/bin/dbus-broker: the launcher starts the broker from that path; when
#   the package is only unpacked (scripts/install-deps does not install it:
#   installed, it becomes the system bus at the next boot), ROOT/usr/bin is
#   laid over /usr/bin here.
# usage: dbus-broker.sh SOCKET CONFIG ROOT
set -eu
sock=$1 conf=$2 root=$3
mount --make-rprivate /
if [[ $root != / ]]; then
    mount -t overlay overlay -o "lowerdir=$root/usr/bin:/usr/bin" /usr/bin
fi
for d in /run/systemd /run/dbus; do mkdir -p $d; mount -t tmpfs tmpfs $d; done
mkdir /run/systemd/journal
# The journal sink must be bound before the bus can start: the launcher exits
# without it, resetting the first connection (seen in CI, a loaded host:
# socat started in the background had not bound yet). systemd-socket-activate
# binds first and says so: that line is the event waited for; it hands the
# socket to socat at the first datagram.
coproc journal_sink {
    exec systemd-socket-activate --datagram -l /run/systemd/journal/socket \
        socat -u FD:3 /dev/null 2>&1
}
journal=$journal_sink_PID
read -r line <&"${journal_sink[0]}"
[[ $line == Listening* ]] || { echo "journal sink: $line" >&2; kill $journal; exit 1; }
# Drained from now on: a pipe nobody reads fills, and a sink blocked on its
# stderr stops taking the broker's log datagrams, which can stall the bus.
# Through a copy: bash closes a coproc's descriptors in background children.
exec {sink_out}<&"${journal_sink[0]}"
cat <&"$sink_out" >&2 &
ln -s "$sock" /run/dbus/system_bus_socket
# The broker starts at the first connection, with the listening socket.
# systemd-socket-activate makes the socket 0644; callers need write access
# (the policy decides who may do what, as with dbus-daemon): chmod it once
# it says it listens, then report READY.
ready() {
    while read -r line; do
        case $line in Listening*) chmod 0666 "$sock"; echo READY >&2 ;; esac
    done
}
systemd-socket-activate -l "$sock" dbus-broker-launch --scope system --config-file "$conf" 2> >(ready) &
bus=$!
trap 'kill $bus $journal 2>/dev/null; wait' TERM INT
wait $bus
