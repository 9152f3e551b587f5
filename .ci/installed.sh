#!/usr/bin/env bash
# CI: hvkit as its users get it. A regular `pip install .` (not editable)
# into a venv of its own, then every example that needs no Linux kernel and
# every benchmark at a smoke-test size, each run from a copy of the tree
# that holds no build products: a script that reaches for the source tree
# (sys.path) instead of the installed package fails here.
#
#   bash .ci/installed.sh          # about 2-3 minutes, needs root and /dev/kvm
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/hvkit-installed.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

mkdir "$WORK/src"
tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.so' \
    --exclude='__pycache__' --exclude='*.egg-info' -cf - . | tar -C "$WORK/src" -xf -
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
echo "hvkit: pip install . (non-editable) into a fresh venv" >&2
if ! "$PY" -m pip install "$WORK/src" >"$WORK/pip.log" 2>&1; then
    cat "$WORK/pip.log" >&2
    exit 1
fi
if grep -E "Deprecat|SetuptoolsWarning" "$WORK/pip.log" >&2; then
    echo "hvkit: pip install . printed the warnings above" >&2
    exit 1
fi

cd "$WORK"     # outside any source tree
SITE="$("$PY" -c 'import hvkit, os; print(os.path.dirname(hvkit.__file__))')"
case "$SITE" in
    "$WORK/venv/"*) ;;
    *) echo "hvkit: imported from $SITE, not from the installed package" >&2; exit 1 ;;
esac
"$PY" -c 'import hvkit._native, hvkit._nvme_native'

failed=0
run() {   # run NAME TIMEOUT SCRIPT ARGS...
    local name="$1" limit="$2"
    shift 2
    local t0=$SECONDS
    if timeout "$limit" "$PY" "$@" >"$WORK/out.log" 2>&1; then
        echo "hvkit: ok    $name ($((SECONDS - t0)) s)" >&2
    else
        echo "hvkit: FAIL  $name (exit $?):" >&2
        tail -n 30 "$WORK/out.log" >&2
        failed=1
    fi
}

for ex in "$WORK"/src/examples/*.py; do
    name="examples/$(basename "$ex")"
    # Examples that boot Linux need the guest kernel; the test suite covers them.
    if grep -q "guests/linux" "$ex"; then
        echo "hvkit: skip  $name (boots Linux)" >&2
        continue
    fi
    run "$name" 120 "$ex"
done

B="$WORK/src/benchmarks"
declare -A seen=()
bench() {   # bench NAME ARGS...: a benchmark at its smoke-test size
    local name="$1"
    shift
    seen[$name]=1
    run "benchmarks/$name" 120 "$B/$name" "$@"
}
skip() { seen[$1]=1; echo "hvkit: skip  benchmarks/$1 ($2)" >&2; }
bench exits.py --quick
bench dedup.py --quick
bench snapshot.py --quick --memory 64M --snapshot-sizes 64M
bench startup.py --runs 3 --seconds 0.5
bench time.py --reps 1 --ms 300 --rate-ms 200
bench storage.py --arrays 2 --image-mib 8 --repeat 1 --dir "$WORK"
if command -v fio >/dev/null; then
    bench nvme.py --ios 64 --qd 1 --disk-mb 16 --dir "$WORK" --fio-seconds 0.2 --modes c_shadow
    bench virtio_blk.py --ios 64 --qd 1 --disk-mb 64 --dir "$WORK" --fio-seconds 0.2 \
        --scenarios virtio-pci virtio-mmio
else
    skip nvme.py "needs fio"
    skip virtio_blk.py "needs fio"
fi
bench vsock.py --rounds 50 --mib 1 --repeat 1
bench net.py --frames 2000 --size 1514 --repeat 1
skip boot.py "boots Linux"
skip linux_restore.py "boots Linux"
# benchlib.py is not a benchmark: the others import it (their folder is on sys.path).
seen[benchlib.py]=1
# A new benchmark needs a line above: it is part of what users install and run.
for b in "$B"/*.py; do
    if [ -z "${seen[$(basename "$b")]:-}" ]; then
        echo "hvkit: FAIL  benchmarks/$(basename "$b"): no smoke-test command in .ci/installed.sh" >&2
        failed=1
    fi
done

echo "hvkit: installed-package check took $((SECONDS - START)) s" >&2
exit "$failed"
