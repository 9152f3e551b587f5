#!/usr/bin/env bash
# System packages hvkit needs, in one place. Run as root on Debian.
#   bash scripts/install-deps.sh          what building and running hvkit needs
#   bash scripts/install-deps.sh --test   plus what the whole test suite needs
set -euo pipefail

packages=(build-essential make gcc linux-libc-dev python3 python3-dev python3-venv python3-pip
          busybox-static)
if [[ "${1:-}" == "--test" ]]; then
    # the hvkit guest kernel's source and build tools, Debian's stock kernel
    # (booted by the tests), qemu-img/qemu-io for the storage tests, debugfs
    # (e2fsprogs) to read the ext2 file Linux wrote through virtio-blk
    packages+=(linux-source-6.1 bc flex bison libelf-dev libssl-dev xz-utils lz4 cpio fio
               linux-image-cloud-amd64 qemu-utils e2fsprogs)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "hvkit: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
