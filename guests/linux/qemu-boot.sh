#!/usr/bin/env bash
# Boot the hvkit microVM kernel under QEMU's microvm machine as a reference:
# a busybox initramfs (built by hvkit) prints a marker, runs the command
# given here through hvkit.run="...", and reboots (i8042 reset; -no-reboot
# turns it into a QEMU exit). Prints the wall time to the marker.
#
#   guests/linux/qemu-boot.sh [bzImage|vmlinux] [command...]
#
# HVKIT_LINUX_DIR=<dir with bzImage and vmlinux> skips build.sh.
# Needs qemu-system-x86 and busybox-static. -cpu host without
# arch-capabilities: this host's KVM refuses that MSR (QEMU aborts on it).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
KDIR="${HVKIT_LINUX_DIR:-$("$HERE/build.sh" --print-dir)}"
KIND="${1:-vmlinux}"; shift || true
CMD="${*:-uname -a}"
KERNEL="$KDIR/$KIND"
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" python3 -m hvkit.boot.initramfs_cli \
    initramfs -o "$TMP/initrd.cpio" >/dev/null
KHZ="$(awk -F: '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo)"
APPEND="console=ttyS0 reboot=k panic=-1"
if [ -d /sys/module/kvm_pvm ]; then
    APPEND="$APPEND noxsave clearcpuid=cx16,popcnt,smap,ssse3,erms,fsrm tsc_early_khz=$KHZ"
    APPEND="$APPEND tsc=reliable cryptomgr.notests init_on_alloc=0 pvm_quirks"
    APPEND="$APPEND GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load,-FMA,-FMA4"
fi
APPEND="$APPEND hvkit.run=\"$CMD\""
start=$(date +%s.%N)
timeout 300 qemu-system-x86_64 -M microvm -enable-kvm -cpu host,-arch-capabilities -m 256 \
    -nographic -no-reboot -device i8042 -kernel "$KERNEL" -initrd "$TMP/initrd.cpio" \
    -append "$APPEND" | while IFS= read -r line; do
        case "$line" in
            *HVKIT-INIT-OK*) printf 'qemu-boot.sh: marker after %.2f s\n' \
                                 "$(echo "$(date +%s.%N) - $start" | bc)" ;;
        esac
        printf '%s\n' "$line"
    done
printf 'qemu-boot.sh: QEMU exited after %.2f s\n' "$(echo "$(date +%s.%N) - $start" | bc)"
