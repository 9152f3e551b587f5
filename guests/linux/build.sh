#!/usr/bin/env bash
# Build the hvkit microVM guest kernel from Debian's linux-source-6.1.
#
#   guests/linux/build.sh [--cache-dir DIR] [--source TARBALL] [--jobs N]
#                         [--force] [--keep-build] [--print-dir]
#
# The result is cached by a hash of (config fragment, patch, source package
# version, this script), so a second run with nothing changed returns at once:
#   <cache>/<hash>/bzImage   the bzImage (64-bit boot protocol)
#   <cache>/<hash>/vmlinux   the ELF kernel (boots through its PVH note)
#   <cache>/<hash>/config    the full .config it was built with
# The default cache is ${HVKIT_CACHE:-~/.cache/hvkit}/linux.
# The last line printed is the output directory (alone with --print-dir).
#
# Needs (Debian): linux-source-6.1 bc flex bison libelf-dev libssl-dev
# build-essential xz-utils.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FRAGMENT="$HERE/microvm.config"
PATCH="$HERE/pvm-syscall-fault.patch"
SOURCE="/usr/src/linux-source-6.1.tar.xz"
CACHE="${HVKIT_CACHE:-$HOME/.cache/hvkit}/linux"
JOBS="$(nproc)"
FORCE=0
KEEP=0
PRINT_DIR=0

while [ $# -gt 0 ]; do
    case "$1" in
        --cache-dir) CACHE="$2"; shift 2 ;;
        --source) SOURCE="$2"; shift 2 ;;
        --jobs|-j) JOBS="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        --keep-build) KEEP=1; shift ;;
        --print-dir) PRINT_DIR=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

log() { if [ "$PRINT_DIR" = 0 ]; then echo "build.sh: $*" >&2; fi; }

if [ ! -f "$SOURCE" ]; then
    echo "build.sh: kernel source $SOURCE not found;" \
         "install it with: apt-get install linux-source-6.1" >&2
    exit 1
fi
for tool in make gcc bc flex bison xz; do
    if ! command -v "$tool" >/dev/null; then
        echo "build.sh: '$tool' is missing; install the build deps:" \
             "apt-get install build-essential bc flex bison libelf-dev libssl-dev xz-utils" >&2
        exit 1
    fi
done

# The source's identity: the Debian package version when the tarball is the
# packaged one, else the tarball's size and mtime.
SRC_ID=""
if command -v dpkg-query >/dev/null && dpkg-query -S "$SOURCE" >/dev/null 2>&1; then
    pkg="$(dpkg-query -S "$SOURCE" | head -1 | cut -d: -f1)"
    SRC_ID="$pkg=$(dpkg-query -W -f='${Version}' "$pkg")"
fi
if [ -z "$SRC_ID" ]; then
    SRC_ID="$(stat -c '%s-%Y' "$SOURCE")"
fi
HASH="$( { cat "$FRAGMENT" "$PATCH" "$0"; echo "$SRC_ID"; } | sha256sum | cut -c1-16)"
OUT="$CACHE/$HASH"

# One build of a given hash at a time: a second run waits for the first and
# then finds its result in the cache instead of rebuilding over it.
mkdir -p "$CACHE"
exec 9>"$CACHE/.$HASH.lock"
if ! flock -n 9; then
    log "another build.sh is building $HASH; waiting for it"
    flock 9
fi

if [ "$FORCE" = 0 ] && [ -f "$OUT/bzImage" ] && [ -f "$OUT/vmlinux" ]; then
    log "cached build for $SRC_ID"
    if [ "$PRINT_DIR" = 0 ]; then
        echo "bzImage: $OUT/bzImage"
        echo "vmlinux: $OUT/vmlinux"
    fi
    echo "$OUT"
    exit 0
fi

mkdir -p "$OUT"
BUILD="$OUT/build"
rm -rf "$BUILD"
mkdir -p "$BUILD"
log "extracting $SOURCE ($SRC_ID)"
tar -xf "$SOURCE" -C "$BUILD" --strip-components=1
cd "$BUILD"
log "applying $(basename "$PATCH")"
patch -p1 --forward --quiet < "$PATCH"

make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m -O . .config "$FRAGMENT" >/dev/null
make -s olddefconfig >/dev/null

# Refuse a kernel that silently lost an option the fragment asks for.
missing=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            if ! grep -qxF "$line" .config; then
                echo "build.sh: $line did not survive olddefconfig (a dependency is missing)" >&2
                missing=1
            fi ;;
        "# CONFIG_"*" is not set")
            sym="$(echo "$line" | awk '{print $2}')"
            if grep -q "^$sym=" .config; then
                echo "build.sh: $sym is still set although the fragment turns it off" >&2
                missing=1
            fi ;;
    esac
done < "$FRAGMENT"
[ "$missing" = 0 ] || exit 1

log "building with $JOBS jobs (about 2 minutes on 2 cores)"
start=$(date +%s)
if ! make -j"$JOBS" bzImage vmlinux >"$OUT/build.log" 2>&1; then
    tail -30 "$OUT/build.log" >&2
    echo "build.sh: kernel build failed; full log in $OUT/build.log" >&2
    exit 1
fi
log "built in $(( $(date +%s) - start )) s"

cp arch/x86/boot/bzImage "$OUT/bzImage.tmp" && mv "$OUT/bzImage.tmp" "$OUT/bzImage"
cp vmlinux "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
cp .config "$OUT/config"
echo "$SRC_ID" > "$OUT/source"
cd "$OUT"
if [ "$KEEP" = 0 ]; then
    rm -rf "$BUILD"
fi
if [ "$PRINT_DIR" = 0 ]; then
    echo "bzImage: $OUT/bzImage"
    echo "vmlinux: $OUT/vmlinux"
fi
echo "$OUT"
