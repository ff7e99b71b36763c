#!/usr/bin/env bash
# The one set-up-and-run command: installs what is missing, builds hcblk, starts the daemon with
# its embedded metadata store, creates a volume, and boots the test guest against it, which
# runs fio with --verify=crc32c on the volume. Leaves the volume (and its data) in
# $HCBLK_DEMO_DIR (default /var/tmp/hcblk-demo) for the next run; needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p hcblk
qemu/build-guest.sh

# Hugepages for the daemon's own buffers; the ones we add are given back on exit.
export HCBLK_HUGEPAGES_STATE=/tmp/hcblk-hugepages.run.added
scripts/hugepages.sh reserve "${HCBLK_HUGEPAGES:-32}"
DEMO=${HCBLK_DEMO_DIR:-/var/tmp/hcblk-demo}
API="$DEMO/api.sock"
HCBLK="$PWD/target/release/hcblk"
mkdir -p "$DEMO"

"$HCBLK" daemon --data-dir "$DEMO/data" --socket-dir "$DEMO/run" --api-socket "$API" \
    --poll adaptive 2>"$DEMO/daemon.log" &
DAEMON=$!
cleanup() {
    kill "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
    scripts/hugepages.sh release
}
trap cleanup EXIT

for _ in $(seq 100); do
    grep -q "hcblk daemon ready" "$DEMO/daemon.log" 2>/dev/null && break
    kill -0 "$DAEMON" 2>/dev/null || { cat "$DEMO/daemon.log" >&2; exit 1; }
    sleep 0.1
done

if ! "$HCBLK" --api-socket "$API" volume info demo >/dev/null 2>&1; then
    "$HCBLK" --api-socket "$API" volume create demo --size 1G --queues 2 --backing file
fi
"$HCBLK" --api-socket "$API" volume info demo
SOCKET=$("$HCBLK" --api-socket "$API" volume info demo | awk '/^socket:/ {print $2}')

echo "== booting the test guest (QEMU, TCG) on $SOCKET: fio --verify=crc32c"
qemu/run-guest.sh --socket "$SOCKET" --queues 2 --mode fio-verify
echo "== guest verified its data through hcblk; daemon log: $DEMO/daemon.log"
