#!/usr/bin/env bash
# pisnoop: build a Raspberry Pi 4 SD-card image of Debian 12 arm64 with pisnoop provisioned.
#   image/build.sh [-o pisnoop-rpi4.img] [--size 4G] [--wheelhouse DIR] [--mirror URL] [--keep-work]
# As root, on Debian 12 (any architecture; amd64 runs the arm64 root through qemu-user-static).
# The root is made the way Debian's own raspi images are (debootstrap, Debian's kernel linux-image-arm64
# and raspi-firmware, an MBR with a FAT firmware partition RASPIFIRM and an ext4 root RASPIROOT),
# then provisioned offline by ansible/site.yml over a chroot connection from a wheelhouse.
# See image/README.md. Nothing here is device-specific: the first boot (pisnoop-firstboot) makes
# the host keys and reads the management address and the store URI from pisnoop.txt on RASPIFIRM.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=$repo/pisnoop-rpi4.img
size=4G
mirror=${PISNOOP_DEBIAN_MIRROR:-http://deb.debian.org/debian}
wheelhouse=""
keep=0
suite=bookworm
firm_mib=512
cache=${PISNOOP_IMAGE_CACHE:-/var/cache/pisnoop-image}

while [ $# -gt 0 ]; do
  case "$1" in
    -o) out=$(realpath -m "$2"); shift 2 ;;
    --size) size=$2; shift 2 ;;
    --wheelhouse) wheelhouse=$(realpath "$2"); shift 2 ;;
    --mirror) mirror=$2; shift 2 ;;
    --keep-work) keep=1; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf '%s build.sh: %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { echo "build.sh: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || { echo "build.sh: run as root (debootstrap, chroot, mounts)" >&2; exit 2; }
for tool in debootstrap chroot sfdisk mkfs.vfat mcopy mkfs.ext4 truncate; do
  command -v "$tool" >/dev/null || die "$tool not found: apt-get install debootstrap fdisk dosfstools mtools e2fsprogs"
done
playbook=${ANSIBLE_PLAYBOOK:-$repo/.venv/bin/ansible-playbook}
[ -x "$playbook" ] || die "$playbook not found: ./setup.sh --no-demo installs ansible-core into .venv"
python=$(dirname "$playbook")/python

# arm64 binaries on another architecture: binfmt_misc + qemu-user-static with the fix-binary flag
if [ "$(dpkg --print-architecture)" != arm64 ]; then
  [ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
    || die "no qemu-aarch64 binfmt entry: apt-get install qemu-user-static binfmt-support"
  grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "qemu-aarch64 is registered without the F flag"
fi

t_start=$(date +%s)
work=$(mktemp -d /var/tmp/pisnoop-image.XXXXXX)
root=$work/root
mounts=()
cleanup() {
  local m
  for ((i=${#mounts[@]}-1; i>=0; i--)); do m=${mounts[$i]}; umount -l "$m" 2>/dev/null || true; done
  if grep -q " $work/" /proc/mounts; then
    echo "build.sh: something is still mounted under $work: not removing it" >&2
  elif [ "$keep" -eq 0 ]; then
    rm -rf "$work"
  else
    say "work folder kept: $work"
  fi
}
trap cleanup EXIT
mount_in() { mkdir -p "$root$2"; mount "${@:3}" "$1" "$root$2"; mounts+=("$root$2"); }
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

# --- 1. the root: debootstrap, then Debian's kernel and the Raspberry Pi firmware --------------------
say "debootstrap $suite arm64 into $root"
mkdir -p "$cache/debs"
debootstrap --arch=arm64 --variant=minbase --cache-dir="$cache/debs" --components=main,non-free-firmware \
  --include=systemd,systemd-sysv,dbus,udev,kmod,python3,python3-apt,ca-certificates \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; die "debootstrap failed"; }

mount_in proc /proc -t proc
mount_in sysfs /sys -t sysfs
mount_in /dev /dev --bind
mount_in devpts /dev/pts -t devpts
mount_in tmpfs /run -t tmpfs
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"   # start nothing while building
chmod 755 "$root/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$root/etc/resolv.conf"

cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main non-free-firmware
deb $mirror $suite-updates main non-free-firmware
deb http://security.debian.org/debian-security $suite-security main non-free-firmware
EOF
echo pisnoop >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tpisnoop\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
cat >"$root/etc/fstab" <<'EOF'
# pisnoop image: labels, as Debian's raspi images
LABEL=RASPIROOT /              ext4 rw,errors=remount-ro 0 1
LABEL=RASPIFIRM /boot/firmware vfat rw,umask=0077       0 2
EOF
# the firmware's cmdline.txt (written by raspi-firmware's hooks) names the root by label
# (Debian's cmdline.txt has net.ifnames=0: the kernel's names eth0, eth1, ... for the Pi's ports)
cat >"$root/etc/default/raspi-firmware" <<'EOF'
ROOTPART=LABEL=RASPIROOT
# the last console gets the boot messages: the Pi 4's UART
CONSOLES="tty0 ttyS1,115200"
EOF
mkdir -p "$root/boot/firmware"
mount_in tmpfs /boot/firmware -t tmpfs   # raspi-firmware's hooks write the firmware partition's files here

say "kernel, firmware and the base system (apt in the arm64 chroot)"
in_root apt-get update -qq
in_root apt-get install -y -qq --no-install-recommends initramfs-tools >"$work/apt.log" 2>&1 \
  || { tail -30 "$work/apt.log"; die "apt-get install initramfs-tools failed"; }
# virtio: the same initramfs also boots under qemu's virt machine (the image's boot test)
printf 'virtio_pci\nvirtio_blk\nvirtio_net\n' >>"$root/etc/initramfs-tools/modules"
in_root apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold \
  linux-image-arm64 raspi-firmware firmware-brcm80211 \
  ifupdown isc-dhcp-client openssh-server systemd-timesyncd iproute2 iputils-ping procps less \
  e2fsprogs dosfstools fdisk sudo >>"$work/apt.log" 2>&1 || { tail -30 "$work/apt.log"; die "apt-get install failed"; }
kver=$(basename "$(ls -d "$root"/lib/modules/* | sort -V | tail -1)")
[ -e "$root/boot/firmware/cmdline.txt" ] || in_root env DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware
for f in cmdline.txt config.txt start4.elf fixup4.dat bcm2711-rpi-4-b.dtb; do
  [ -e "$root/boot/firmware/$f" ] || die "raspi-firmware did not put $f on the firmware partition"
done
grep -q 'net.ifnames=0' "$root/boot/firmware/cmdline.txt" || die "cmdline.txt without net.ifnames=0"
say "kernel $kver; cmdline.txt: $(cat "$root/boot/firmware/cmdline.txt")"

# management: the onboard port eth0 (net.ifnames=0); pisnoop-firstboot writes its stanza from pisnoop.txt
printf 'source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n' >"$root/etc/network/interfaces"

# --- 2. pisnoop, by the same playbook, offline ------------------------------------------------------
if [ -z "$wheelhouse" ]; then
  wheelhouse=$cache/wheels-arm64
  say "downloading the arm64 wheels into $wheelhouse"
  deps=$("$python" -c 'import sys, tomllib; d = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(" ".join(x for x in d if not x.startswith("systemd-python")))' "$repo/pyproject.toml")
  # shellcheck disable=SC2086
  "$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --platform manylinux2014_aarch64 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp \
    --abi cp311 -d "$wheelhouse" $deps 'nx-27017>=0.8.1'
fi
say "provisioning with ansible/site.yml over the chroot connection (wheelhouse $wheelhouse)"
printf '[pisnoop]\n%s ansible_connection=pisnoop_chroot ansible_python_interpreter=/usr/bin/python3\n' "$root" \
  >"$work/inventory.ini"
cat >"$work/vars.json" <<EOF
{"pisnoop_offline": true, "pisnoop_start_services": false, "pisnoop_wheelhouse": "$wheelhouse",
 "pisnoop_mongodb_local": true, "pisnoop_sensor": "pisnoop",
 "pisnoop_interfaces": {"inside": "eth1", "upstream": "eth2", "mirror": "mirror0"}}
EOF
ANSIBLE_CONFIG=$repo/ansible/ansible.cfg ANSIBLE_NOCOLOR=1 ANSIBLE_LOCAL_TEMP=$work/ansible-tmp \
  PATH="$(dirname "$playbook"):$PATH" \
  "$playbook" -i "$work/inventory.ini" "$repo/ansible/site.yml" -e "@$work/vars.json" >"$work/playbook.log" 2>&1 \
  || { tail -40 "$work/playbook.log"; die "the playbook failed (log: $work/playbook.log, --keep-work keeps it)"; }
grep -A2 'PLAY RECAP' "$work/playbook.log"

# --- 3. what only the device knows: the first boot ---------------------------------------------------
install -m 0755 "$here/pisnoop-firstboot" "$root/usr/local/sbin/pisnoop-firstboot"
install -m 0644 "$here/pisnoop-firstboot.service" "$root/etc/systemd/system/pisnoop-firstboot.service"
in_root systemctl enable pisnoop-firstboot.service >/dev/null
install -m 0644 "$here/pisnoop.txt" "$root/boot/firmware/pisnoop.txt"
rm -f "$root"/etc/ssh/ssh_host_*             # made at first boot: every device its own keys
: >"$root/etc/machine-id"                     # likewise its machine id
rm -f "$root/var/lib/dbus/machine-id"
in_root apt-get clean
rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"
rm -rf "$root"/var/lib/apt/lists/* "$root"/root/.ansible "$root"/tmp/* "$root"/opt/pisnoop/wheelhouse.tar

# --- 4. the image: MBR, FAT firmware partition, ext4 root, filled without loop devices --------------
firmware=$work/firmware
mkdir -p "$firmware"
cp -a "$root/boot/firmware/." "$firmware/"
for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -l "${mounts[$i]}"; done
mounts=()
say "writing $out ($size)"
rm -f "$out"
truncate -s "$size" "$out"
total_mib=$(( $(stat -c %s "$out") / 1048576 ))
root_mib=$(( total_mib - 4 - firm_mib ))
sfdisk --quiet "$out" <<EOF
label: dos
start=4MiB, size=${firm_mib}MiB, type=c, bootable
start=$((4 + firm_mib))MiB, type=83
EOF
truncate -s "${firm_mib}M" "$work/firm.img"
mkfs.vfat -F 32 -n RASPIFIRM "$work/firm.img" >/dev/null
mcopy -s -p -i "$work/firm.img" "$firmware"/* ::/
truncate -s "${root_mib}M" "$work/root.img"
mkfs.ext4 -q -L RASPIROOT -E root_owner=0:0 -d "$root" "$work/root.img"
dd if="$work/firm.img" of="$out" bs=1M seek=4 conv=notrunc,sparse status=none
dd if="$work/root.img" of="$out" bs=1M seek=$((4 + firm_mib)) conv=notrunc,sparse status=none
say "done in $(( $(date +%s) - t_start )) s: $out (kernel $kver). Flash: image/README.md"
