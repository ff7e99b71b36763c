#!/bin/bash
# Boot the hcblk test guest (qemu/build-guest.sh) against a vhost-user-blk
# socket, run one guest mode and report its verdict.
#
#   qemu/run-guest.sh --socket PATH [--mode MODE] [--timeout SECS] [options]
#
# Options:
#   --socket PATH         vhost-user-blk server socket (required)
#   --mode MODE           fio-verify (default) | fio-write | fio-verify-only |
#                         fio-kill | reconnect | resize | read-only | hotplug | info
#                         (see qemu/guest/init)
#   --timeout SECS        wall-clock limit for the whole boot; default 300
#   --queues N            virtio-blk queues (num-queues); default 2
#   --smp N               guest CPUs; default 2 (blk-mq maps queues per CPU, so
#                         fewer CPUs than queues leaves queues idle)
#   --mem MB              guest RAM; default 512
#   --hugepages           back guest RAM with /dev/hugepages instead of memfd
#   --param KEY=VALUE     pass hcblk.KEY=VALUE to the guest (repeatable), e.g.
#                         --param size=32M --param engine=io_uring
#   --on-resize-wait CMD  in resize mode: run CMD (bash -c) once the guest
#                         prints HCBLK-WAIT-RESIZE; HCBLK_GUEST_SECTORS holds the
#                         size it saw. CMD failing fails the run.
#   --reconnect-ms N      let QEMU reconnect to a restarted server (chardev
#                         reconnect-ms=N); default: no reconnect
#   --guest DIR           where build-guest.sh put vmlinuz/initramfs.cpio;
#                         default qemu/build
#   --log FILE            console log; default a new /tmp/hcblk-guest.*.log
#   --accel ACCEL         default tcg (KVM is not assumed to exist)
#   --qmp PATH            a QMP monitor on the Unix socket PATH (QEMU listens; for
#                         hot-plug: chardev-add, device_add, device_del, ...)
#   --hotplug-ports N     N empty PCIe root ports hp0..hp(N-1) to hot-plug devices
#                         into (q35 has no hot-pluggable slot otherwise); default 0
#   --pidfile PATH        QEMU writes its pid there (to kill it from outside)
#
# Exit status: 0 guest PASS, 1 guest FAIL, 2 QEMU ended without a verdict,
# 3 timeout, 4 usage or setup error. The console log is always kept and its
# path printed on stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 4; }
die() { printf 'run-guest: error: %s\n' "$*" >&2; exit 4; }

socket= mode=fio-verify timeout_s=300 queues=2 smp=2 mem_mb=512 hugepages=0
on_resize= reconnect_ms= guest="$here/build" log= accel=tcg qmp= hotplug_ports=0 pidfile=
params=()
while [ $# -gt 0 ]; do
    case "$1" in
    --socket) socket=${2:?}; shift 2 ;;
    --mode) mode=${2:?}; shift 2 ;;
    --timeout) timeout_s=${2:?}; shift 2 ;;
    --queues) queues=${2:?}; shift 2 ;;
    --smp) smp=${2:?}; shift 2 ;;
    --mem) mem_mb=${2:?}; shift 2 ;;
    --hugepages) hugepages=1; shift ;;
    --param) params+=("${2:?}"); shift 2 ;;
    --on-resize-wait) on_resize=${2:?}; shift 2 ;;
    --reconnect-ms) reconnect_ms=${2:?}; shift 2 ;;
    --guest) guest=${2:?}; shift 2 ;;
    --log) log=${2:?}; shift 2 ;;
    --accel) accel=${2:?}; shift 2 ;;
    --qmp) qmp=${2:?}; shift 2 ;;
    --hotplug-ports) hotplug_ports=${2:?}; shift 2 ;;
    --pidfile) pidfile=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) die "unknown option $1 (see --help)" ;;
    esac
done

[ -n "$socket" ] || die "--socket PATH is required"
[ -S "$socket" ] || die "$socket is not a socket (is the vhost-user-blk server running?)"
for n in "$timeout_s" "$queues" "$smp" "$mem_mb" ${reconnect_ms:+"$reconnect_ms"}; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "expected a positive integer, got '$n'"
done
[[ "$hotplug_ports" =~ ^[0-9]+$ ]] && [ "$hotplug_ports" -le 8 ] || die "--hotplug-ports wants 0..8, got '$hotplug_ports'"
[[ "$mode" =~ ^[a-z-]+$ ]] || die "bad mode '$mode'"
for p in "${params[@]}"; do
    # Kernel command line words: no spaces or quotes can survive there.
    [[ "$p" =~ ^[a-z_]+=[A-Za-z0-9._-]+$ ]] || die "bad --param '$p' (want key=value)"
done
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
[ -s "$guest/vmlinuz" ] && [ -s "$guest/initramfs.cpio" ] \
    || die "no guest in $guest: run qemu/build-guest.sh $guest first"

if [ "$hugepages" = 1 ]; then
    grep -qs ' /dev/hugepages hugetlbfs ' /proc/mounts || die "--hugepages: /dev/hugepages is not a mounted hugetlbfs"
    free_kb=$(awk '/^HugePages_Free:/ {f=$2} /^Hugepagesize:/ {s=$2} END {print f*s}' /proc/meminfo)
    [ "$free_kb" -ge $((mem_mb * 1024)) ] \
        || die "--hugepages: only $((free_kb / 1024)) MiB of free hugepages, guest needs $mem_mb MiB"
    memdev="memory-backend-file,id=mem,size=${mem_mb}M,mem-path=/dev/hugepages,share=on,prealloc=on"
else
    # vhost-user needs guest RAM the server can map: share=on is mandatory.
    memdev="memory-backend-memfd,id=mem,size=${mem_mb}M,share=on"
fi

[ -n "$log" ] || log="$(mktemp /tmp/hcblk-guest.XXXXXX.log)"
: >"$log"
echo "run-guest: console log: $log" >&2

append="console=ttyS0 panic=-1 loglevel=4 hcblk.mode=$mode"
for p in "${params[@]}"; do append+=" hcblk.$p"; done

chardev="socket,id=disk0,path=$socket${reconnect_ms:+,reconnect-ms=$reconnect_ms}"
qemu_cmd=(
    qemu-system-x86_64 -accel "$accel" -machine q35 -cpu max -smp "$smp" -m "${mem_mb}M"
    -object "$memdev" -numa node,memdev=mem
    -chardev "$chardev"
    -device "vhost-user-blk-pci,chardev=disk0,num-queues=$queues"
    -kernel "$guest/vmlinuz" -initrd "$guest/initramfs.cpio"
    -append "$append"
    -nographic -no-reboot -nodefaults -serial stdio
)
# Hot-plug on q35 goes into PCIe root ports (native PCIe hot-plug in the guest); each port
# takes one device. Chassis numbers must be unique.
for ((i = 0; i < hotplug_ports; i++)); do
    qemu_cmd+=(-device "pcie-root-port,id=hp$i,bus=pcie.0,chassis=$((i + 1))")
done
[ -z "$qmp" ] || qemu_cmd+=(-qmp "unix:$qmp,server=on,wait=off")
[ -z "$pidfile" ] || qemu_cmd+=(-pidfile "$pidfile")
echo "run-guest: $(printf '%q ' "${qemu_cmd[@]}")" >&2

start=$(date +%s.%N)
"${qemu_cmd[@]}" </dev/null >>"$log" 2>&1 &
qemu_pid=$!
cleanup() {
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
}
trap cleanup EXIT
trap 'cleanup; exit 4' INT TERM

elapsed() { awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN {printf "%.1f", e - s}'; }

resize_done=0
status=
while :; do
    alive=1
    kill -0 "$qemu_pid" 2>/dev/null || alive=0
    if [ "$resize_done" = 0 ] && line=$(grep -a -o -m1 'HCBLK-WAIT-RESIZE [0-9]*' "$log"); then
        resize_done=1
        sectors=$(echo "$line" | tr -d '\r' | awk '{print $2}')
        if [ -z "$on_resize" ]; then
            echo "run-guest: guest waits for a resize but no --on-resize-wait was given" >&2
        else
            echo "run-guest: guest saw $sectors sectors; running: $on_resize" >&2
            if ! HCBLK_GUEST_SECTORS="$sectors" bash -c "$on_resize" >&2; then
                echo "run-guest: --on-resize-wait command failed" >&2
                status=1
                break
            fi
        fi
    fi
    if [ "$alive" = 0 ]; then
        wait "$qemu_pid" && qemu_rc=0 || qemu_rc=$?
        break
    fi
    if awk -v s="$start" -v e="$(date +%s.%N)" -v t="$timeout_s" 'BEGIN {exit !(e - s > t)}'; then
        echo "run-guest: timeout after ${timeout_s}s" >&2
        status=3
        break
    fi
    sleep 0.2
done
cleanup
trap - EXIT

if [ -z "$status" ]; then
    # Unanchored: firmware escape sequences may precede a marker on its line.
    verdict=$(grep -a -o 'HCBLK-RESULT .*' "$log" | tail -n1 | tr -d '\r' || true)
    case "$verdict" in
    "HCBLK-RESULT PASS") status=0 ;;
    "HCBLK-RESULT FAIL"*) status=1 ;;
    *)
        echo "run-guest: QEMU exited (status $qemu_rc) without HCBLK-RESULT; last console lines:" >&2
        tail -n 20 "$log" >&2
        status=2
        ;;
    esac
    [ -z "$verdict" ] || echo "run-guest: $verdict" >&2
fi
echo "run-guest: mode=$mode status=$status elapsed=$(elapsed)s console log: $log" >&2
exit "$status"
