#!/usr/bin/env bash
# pisnoop: boot a built image under qemu-system-aarch64 until every service reports READY.
#   image/qemu-boot.sh [pisnoop-rpi4.img] [--timeout 3600] [--smp 2]
# The image's own kernel and initramfs (read out of its root partition) on qemu's `virt` machine,
# its disk on virtio, a copy-on-write overlay so the image stays as built (and 2 GiB larger, so the
# first boot's root growth is exercised). No KVM here: the CPU is emulated, expect minutes.
# Networking stays inside qemu: eth0 is user-mode networking with restrict=on (DHCP from qemu, no
# way out), eth1 and eth2 (the bridge's ports) are hub ports with nothing else on them.
# systemd prints "Started <unit>" on the console when a Type=notify service sent READY=1: the script
# waits for that line from each pisnoop service and prints the time since qemu started.
# Outside the test suite (slow); run it niced when the machine is shared: nice -n 19 image/qemu-boot.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
image=$(dirname "$here")/pisnoop-rpi4.img
timeout=3600
smp=2
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) timeout=$2; shift 2 ;;
    --smp) smp=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "qemu-boot.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    *) image=$(realpath "$1"); shift ;;
  esac
done
[ -f "$image" ] || { echo "qemu-boot.sh: no image $image (build it: image/build.sh)" >&2; exit 2; }
for tool in qemu-system-aarch64 qemu-img sfdisk debugfs; do
  command -v "$tool" >/dev/null || { echo "qemu-boot.sh: $tool not found: apt-get install qemu-system-arm qemu-utils fdisk e2fsprogs" >&2; exit 2; }
done

work=$(mktemp -d /var/tmp/pisnoop-qemu.XXXXXX)
qemu_pid=""
kept=/var/tmp/pisnoop-qemu-console.log
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then kill "$qemu_pid"; wait "$qemu_pid" 2>/dev/null || true; fi
  # the console (with the journal forwarded to it) outlives the run: it is what shows why a service did not start
  [ -f "$work/console.log" ] && cp "$work/console.log" "$kept" && echo "qemu-boot.sh: console kept in $kept"
  rm -rf "$work"
}
trap cleanup EXIT

# the root partition (the second) of the image: its kernel and initramfs, read with debugfs at its offset
start=$(sfdisk --json "$image" | python3 -c 'import json,sys; print(json.load(sys.stdin)["partitiontable"]["partitions"][1]["start"])')
rootfs="$image?offset=$((start * 512))"
kernel=$(debugfs -R "ls -p /boot" "$rootfs" 2>/dev/null | tr '/' '\n' | grep -E '^vmlinuz-' | sort -V | tail -1)
[ -n "$kernel" ] || { echo "qemu-boot.sh: no /boot/vmlinuz-* in the image's root partition" >&2; exit 1; }
kver=${kernel#vmlinuz-}
debugfs -R "dump /boot/$kernel $work/vmlinuz" "$rootfs" 2>/dev/null
debugfs -R "dump /boot/initrd.img-$kver $work/initrd.img" "$rootfs" 2>/dev/null
[ -s "$work/vmlinuz" ] && [ -s "$work/initrd.img" ] || { echo "qemu-boot.sh: could not read the kernel $kver" >&2; exit 1; }
qemu-img create -q -f qcow2 -F raw -b "$image" "$work/disk.qcow2" "$(( $(stat -c %s "$image") + 2 * 1024 * 1024 * 1024 ))"

# an emulated CPU starts Python services many times slower than a Pi: give them longer than systemd's 90 s
slow="systemd.default_timeout_start_sec=1200"
# unit names only on the console (a description makes systemd cut the line at 80 columns, the name with it)
names="systemd.status_unit_format=name systemd.journald.forward_to_console=1"
console=$work/console.log
: >"$console"
t0=$(date +%s.%N)
qemu-system-aarch64 -M virt -cpu cortex-a72 -smp "$smp" -m 2048 -display none -monitor none \
  -serial "file:$console" -no-reboot \
  -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
  -append "root=LABEL=RASPIROOT rw rootwait console=ttyAMA0 net.ifnames=0 systemd.show_status=1 $names $slow" \
  -drive "if=none,id=disk,file=$work/disk.qcow2,format=qcow2" -device virtio-blk-pci,drive=disk \
  -netdev user,id=mgmt,restrict=on -device virtio-net-pci,netdev=mgmt,romfile= \
  -netdev hubport,id=inside,hubid=1 -device virtio-net-pci,netdev=inside,romfile= \
  -netdev hubport,id=upstream,hubid=2 -device virtio-net-pci,netdev=upstream,romfile= &
qemu_pid=$!
echo "qemu-boot.sh: booting $image (kernel $kver) under qemu-system-aarch64 pid $qemu_pid, console $console"

elapsed() { python3 -c "import sys,time; print(f'{time.time() - float(sys.argv[1]):.0f}')" "$t0"; }
declare -A seen=()
want=(pisnoop-firstboot pisnoop-store pisnoop-controller pisnoop-snooper pisnoop-analyser)
while :; do
  if ! kill -0 "$qemu_pid" 2>/dev/null; then
    tail -40 "$console"; echo "qemu-boot.sh: qemu ended before every service was READY" >&2; exit 1
  fi
  for unit in "${want[@]}"; do
    if [ -z "${seen[$unit]:-}" ] && grep -aq "Started.*$unit\.service\|Finished.*$unit\.service" "$console"; then
      seen[$unit]=$(elapsed)
      echo "qemu-boot.sh: $unit ready after ${seen[$unit]} s"
    fi
  done
  # a failed start is restarted by systemd (Restart=on-failure); one that hit its start limit is final
  if grep -aq "pisnoop.*start-limit-hit\|Start request repeated too quickly" "$console"; then
    grep -a "pisnoop" "$console" | tail -20; echo "qemu-boot.sh: a pisnoop service failed for good" >&2; exit 1
  fi
  [ "${#seen[@]}" -eq "${#want[@]}" ] && break
  if [ "$(elapsed)" -gt "$timeout" ]; then
    tail -40 "$console"; echo "qemu-boot.sh: not every service READY within $timeout s: ${!seen[*]}" >&2; exit 1
  fi
  sleep 2
done
grep -a "pisnoop-firstboot:" "$console" | sed 's/^/  /' || true
failed=$(grep -ac "Failed to start.*pisnoop" "$console" || true)
[ "$failed" -eq 0 ] || echo "qemu-boot.sh: $failed failed start(s) of a pisnoop service before it came up (restarted by systemd)"
echo "qemu-boot.sh: every pisnoop service READY $(elapsed) s after qemu started (kernel $kver, $smp emulated cortex-a72)"
