#!/bin/sh
# Runs on a lab node as root (tests/benches/volume.rs): erase time of the
# tenant volume at several sizes, then fio on the raw disk, a cryptsetup
# plain mapping with defaults and one with Leasehold's cipher settings, and
# Leasehold's mapping with and without the dm-crypt workqueues (3 rounds). Prints "erase SIZE RUN CALL_MS REMAKE_MS ERASED_MS" lines and
# fio JSON between "fio CONFIG JOB" and "end" lines.
set -eu
DEV=$(readlink -f /dev/disk/by-id/virtio-leasehold-tenant)
CONF=/etc/leasehold/agentd.toml
id tt >/dev/null 2>&1 || useradd -m -G leasehold-tenant tt
landlordctl --json info | grep -q '"assigned":true' || landlordctl --yes assign bench >/dev/null

fresh_volume() { # device [bypass]
    systemctl stop leasehold-agentd
    rm -f /var/lib/leasehold/volume.json
    sed -i '/^\[storage\]/,$d' "$CONF"
    printf '[storage]\nbypass_workqueues = %s\nfill_on_init = false\n' "${2:-false}" >> "$CONF"
    systemctl start leasehold-agentd
    landlordctl --yes volume init --force "$1" >/dev/null
    # The agent prepares standby keys at start: wait for an idle node.
    while landlordctl --json info | grep -q '"running":"'; do sleep 0.05; done
}

ms() { echo $(( $(date +%s%N) / 1000000 )); }

for size in 1G 64G 1T; do
    f=/var/tmp/bench-$size.img
    rm -f "$f"; truncate -s "$size" "$f"
    loop=$(losetup -f --show "$f")
    fresh_volume "$loop"
    for run in 1 2 3; do
        echo data > /srv/leasehold/tenant/file
        t0=$(ms)
        out=$(runuser -u tt -- tenantctl --json --yes rotate)
        t1=$(ms)
        erased=$(echo "$out" | sed -n 's/.*\\"erased_ms\\":\([0-9]*\).*/\1/p')
        # The new empty volume follows the reply: time until it is open.
        n=0
        until landlordctl --json volume status | grep -q '"state":"open"'; do
            n=$((n + 1)); [ "$n" -lt 1200 ] || { echo "volume not remade" >&2; exit 1; }
            sleep 0.05
        done
        t2=$(ms)
        # Then the standby keys for the next rotation: each rotation is
        # measured on an idle node.
        n=0
        while landlordctl --json info | grep -q '"running":"'; do
            n=$((n + 1)); [ "$n" -lt 1200 ] || { echo "node never idle" >&2; exit 1; }
            sleep 0.05
        done
        echo "erase $size $run $((t1 - t0)) $((t2 - t1)) ${erased:-?}"
    done
    systemctl stop leasehold-agentd
    losetup -d "$loop"; rm -f "$f"
done

job() { # config device
    for j in seqread:read:1M:16 seqwrite:write:1M:16 randread:randread:4k:32 randwrite:randwrite:4k:32; do
        name=${j%%:*}; rest=${j#*:}; rw=${rest%%:*}; rest=${rest#*:}; bs=${rest%%:*}; qd=${rest#*:}
        echo "fio $1 $name"
        fio --name="$name" --filename="$2" --rw="$rw" --bs="$bs" --iodepth="$qd" --direct=1 \
            --ioengine=libaio --runtime=10 --time_based --size=384M --output-format=json
        echo end
    done
}

plain() { # config [cryptsetup options]: a plain mapping with a random key
    name=$1; shift
    key=$(mktemp); head -c 64 /dev/urandom > "$key"
    cryptsetup open --type plain --key-file "$key" "$@" "$DEV" bench-plain
    rm -f "$key"
    echo "mapping $name $(cryptsetup status bench-plain | sed -n 's/^ *\(cipher\|keysize\|sector size\): *//p' | tr ' \n' '_ ')"
    job "$name" /dev/mapper/bench-plain
    cryptsetup close bench-plain
}

# Rounds interleave the configurations, so a slow minute of the host
# does not land on one of them only; the report takes medians.
for round in 1 2 3; do
    systemctl stop leasehold-agentd
    job raw "$DEV"
    plain cryptsetup-plain
    plain cryptsetup-xts --cipher aes-xts-plain64 --key-size 512 --sector-size 4096
    for bypass in false true; do
        fresh_volume "$DEV" "$bypass"
        nsenter -t 1 -m -- umount /srv/leasehold/tenant
        job "leasehold-bypass-$bypass" /dev/mapper/leasehold-tenant
    done
done
systemctl stop leasehold-agentd
sed -i '/^\[storage\]/,$d' "$CONF"
grep -m1 -o 'aes\|sha_ni' /proc/cpuinfo | sort -u | tr '\n' ' '; echo cpu-flags
