# The lab image recipe. Its SHA-256 keys the image cache: change anything
# here (or bump RECIPE_REVISION) and the next `lab build` rebuilds.
RECIPE_REVISION=4
SUITE=bookworm
IMAGE_SIZE=4G
# systemd and the base; the agent's runtime dependencies (the .deb is
# installed offline, the guest has no package mirror); tools for tests.
PACKAGES=(
  systemd-sysv systemd-timesyncd linux-image-amd64 initramfs-tools udev kmod iproute2
  dbus polkitd libpam-systemd openssh-server sudo procps
  libtss2-esys-3.0.2-0 libtss2-tctildr0 libtss2-tcti-device0 libtss2-mu0 libtss2-sys1 libssl3 tpm2-tools
  cryptsetup-bin dmsetup nftables e2fsprogs
  keyutils fio
  busybox-static crun
  # health's smart source and its NVMe SMART events (the .deb only
  # recommends them; the VM faults section)
  smartmontools nvme-cli
)

# Runs on the host after the packages are in; $1 is the rootfs, $2 the
# public key that may log in as root.
customize() {
  local root=$1 pubkey=$2
  echo leasehold-node > "$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 leasehold-node\n' > "$root/etc/hosts"
  echo 'LABEL=root / ext4 rw,relatime 0 1' > "$root/etc/fstab"
  install -d -m 0700 "$root/root/.ssh"
  install -m 0600 "$pubkey" "$root/root/.ssh/authorized_keys"
  cat > "$root/etc/systemd/network/20-wired.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=yes
NET
  # The fault NIC (vagrant/lab's second NIC, MAC 52:54:00:fa:17:01): up,
  # no addresses, so its link going down (QMP set_link) touches nothing else.
  cat > "$root/etc/systemd/network/10-fault-nic.network" <<'NET'
[Match]
MACAddress=52:54:00:fa:17:01

[Network]
DHCP=no
LinkLocalAddressing=no
ConfigureWithoutCarrier=yes
NET
  ln -sf /lib/systemd/system/systemd-networkd.service "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
  # The serial console carries test output; no getty on it.
  ln -sf /dev/null "$root/etc/systemd/system/serial-getty@ttyS0.service"
  # Keep the journal across reboots (the reboot test reads it).
  install -d "$root/var/log/journal"
  # No password for root, no DNS waits in sshd.
  sed -i 's/^#\?UseDNS.*/UseDNS no/' "$root/etc/ssh/sshd_config"
  echo 'root:*' | chroot "$root" chpasswd -e
  # The initramfs must find the virtio root disk on q35.
  printf '%s\n' virtio_pci virtio_blk virtio_net ext4 >> "$root/etc/initramfs-tools/modules"
  chroot "$root" update-initramfs -u -k all >/dev/null
}
