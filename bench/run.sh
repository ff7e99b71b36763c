#!/usr/bin/env bash
# vhost-user-blk benchmark: hcblk against qemu-storage-daemon, in one run, alternating.
#
# For every workload, each server in turn is started pinned to BENCH_SERVER_CPU, measured by
# blk-bench (libblkio, busy-polled queue) pinned to BENCH_CLIENT_CPU, and stopped, so slow
# drifts of the machine hit all servers alike. Then an idle measurement (hcblk --poll
# adaptive, client connected but silent). Results: bench/out/results-<ts>.json and .png, and
# a markdown table on stdout (also bench/out/results-<ts>.md) to paste into bench/RESULTS.md.
#
# Usage: bench/run.sh            (root is needed only if the hcblk daemon requires it)
# Environment (defaults in brackets):
#   BENCH_SECONDS [5]  BENCH_WARMUP [1]  BENCH_ROUNDS [1]  BENCH_IDLE_SECONDS [10]
#   BENCH_SERVER_CPU [1]  BENCH_CLIENT_CPU [0]
#   BENCH_SERVERS ["qsd-null qsd-file hcblk-null hcblk-ram hcblk-file fio-host"]
#                 hcblk-BACKING runs `--poll always`; hcblk-BACKING-MODE (e.g. hcblk-null-adaptive,
#                 hcblk-null-never) that poll mode, and a -base suffix runs $HCBLK_BASE instead
#                 of $HCBLK (A/B against another build). Shared core: BENCH_SERVER_CPU=BENCH_CLIENT_CPU.
#   BENCH_WORKLOADS ["randread:4k:1 randread:4k:32 randwrite:4k:1 randwrite:4k:32 seqread:128k:8"]
#   BENCH_IDLE ["hcblk-file qsd-file"]  (empty: skip the idle measurement)
#   BENCH_IMG [bench/out/bench.img]  BENCH_SIZE [1G]
#   BENCH_BUILD [1]  (0: use the binaries already in target/release)
#   BENCH_NICE [-20]  niceness of the run's own session (autogroup) and of servers, client and
#                     host fio (root only; 0: unchanged), so background work on a shared
#                     machine takes less from the measurement
#   BENCH_QUIET_WAIT [10]  before each measurement, wait up to this many seconds for the
#                          machine to be idle (below BENCH_QUIET_PCT [10] % of all cores busy)
#   HCBLK_DAEMON_ARGS [""]  extra arguments for `hcblk daemon`
#   HCBLK [target/release/hcblk]  HCBLK_BASE [unset: the build -base servers run]  QSD [/usr/bin/qemu-storage-daemon]  PYTHON [/usr/bin/python3, which has python3-matplotlib]
set -euo pipefail
trap 'echo "bench/run.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NICE=${BENCH_NICE:--20}

# With sched_autogroup (Debian's default) niceness only orders tasks of one session; other
# sessions' work gets an equal share of a core whatever our nice value. So run in a session
# of our own and lower the niceness of that whole autogroup for the run. Signals to this
# outer process are passed on, so Ctrl-C still stops the run and its servers.
if [[ -z ${_HCBLK_BENCH_INNER:-} && $NICE != 0 && $(id -u) == 0 && -w /proc/self/autogroup ]]; then
    _HCBLK_BENCH_INNER=1 setsid "$0" "$@" &
    inner=$!
    trap 'kill -TERM -- "-$inner" 2>/dev/null' INT TERM
    while :; do
        wait "$inner" && rc=0 || rc=$?
        kill -0 "$inner" 2>/dev/null || exit "$rc"
    done
fi
if [[ -n ${_HCBLK_BENCH_INNER:-} ]]; then
    echo "$NICE" >/proc/self/autogroup
fi
SECONDS_PER=${BENCH_SECONDS:-5}
WARMUP=${BENCH_WARMUP:-1}
ROUNDS=${BENCH_ROUNDS:-1}
IDLE_SECONDS=${BENCH_IDLE_SECONDS:-10}
SCPU=${BENCH_SERVER_CPU:-1}
CCPU=${BENCH_CLIENT_CPU:-0}
SERVERS=${BENCH_SERVERS:-qsd-null qsd-file hcblk-null hcblk-ram hcblk-file fio-host}
WORKLOADS=${BENCH_WORKLOADS:-randread:4k:1 randread:4k:32 randwrite:4k:1 randwrite:4k:32 seqread:128k:8}
IDLE=${BENCH_IDLE-hcblk-file qsd-file}
IMG=${BENCH_IMG:-$ROOT/bench/out/bench.img}
SIZE=${BENCH_SIZE:-1G}
BUILD=${BENCH_BUILD:-1}
QUIET_WAIT=${BENCH_QUIET_WAIT:-10}
PRIO=()
if [[ $NICE != 0 && $(id -u) == 0 ]]; then PRIO=(nice -n "$NICE"); fi
QUIET_PCT=${BENCH_QUIET_PCT:-10}
QSD=${QSD:-/usr/bin/qemu-storage-daemon}
# Debian's interpreter: python3-matplotlib is installed for it, not for a pyenv/venv python
# that may come first in PATH.
PYTHON=${PYTHON:-/usr/bin/python3}
HCBLK=${HCBLK:-$ROOT/target/release/hcblk}
BLK_BENCH=$ROOT/target/release/blk-bench
# A failing blk-bench prints its error chain; a backtrace on top only buries it.
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0

TS=$(date -u +%Y%m%dT%H%M%SZ)
OUT_BASE=$ROOT/bench/out
OUT=$OUT_BASE/run-$TS
mkdir -p "$OUT/logs"
WORK=$(mktemp -d /tmp/hcblk-bench.XXXXXX)
SERVER_PID=
FAILED=0

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server $SERVER_PID ignored SIGTERM for 5 s; killing it"
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
    fi
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}

HUGEPAGES_ORIG=
cleanup() {
    stop_server
    if [[ -n $HUGEPAGES_ORIG ]]; then
        echo "$HUGEPAGES_ORIG" >/proc/sys/vm/nr_hugepages || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

size_bytes() {
    local s=$1 n=${1%[kKmMgGtT]}
    case ${s: -1} in
        k|K) echo $((n << 10)) ;; m|M) echo $((n << 20)) ;;
        g|G) echo $((n << 30)) ;; t|T) echo $((n << 40)) ;; *) echo "$n" ;;
    esac
}
SIZE_BYTES=$(size_bytes "$SIZE")

# Waits until $2 is a socket, failing if process $1 exits or 10 s pass.
wait_socket() {
    local pid=$1 path=$2
    for _ in $(seq 100); do
        [[ -S $path ]] && return 0
        kill -0 "$pid" 2>/dev/null || { log "server exited before creating $path"; return 1; }
        sleep 0.1
    done
    log "timed out waiting for $path"
    return 1
}

# start_server NAME LOGFILE [POLL]: sets SERVER_PID and SOCK.
start_server() {
    local name=$1 logf=$2 poll=${3:-always}
    local dir
    dir=$(mktemp -d "$WORK/$name.XXXX")
    SOCK=$dir/vhost.sock
    case $name in
    qsd-null | qsd-file)
        local blockdev
        if [[ $name == qsd-null ]]; then
            # read-zeroes=off: no memset per read, qemu-storage-daemon's fastest null device.
            blockdev=driver=null-co,node-name=d0,size=$SIZE_BYTES,read-zeroes=off
        else
            blockdev=driver=file,node-name=d0,filename=$IMG,cache.direct=on,aio=io_uring
        fi
        # An iothread: its adaptive polling is qemu-storage-daemon's fastest configuration
        # (the main loop does not poll as aggressively).
        "${PRIO[@]}" taskset -c "$SCPU" "$QSD" \
            --blockdev "$blockdev" \
            --object iothread,id=io0 \
            --export "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1,iothread=io0" \
            >"$logf" 2>&1 &
        SERVER_PID=$!
        wait_socket "$SERVER_PID" "$SOCK"
        ;;
    hcblk-*)
        # hcblk-BACKING[-MODE][-base]
        local rest=${name#hcblk-} api=$dir/api.sock bin=$HCBLK
        if [[ $rest == *-base ]]; then
            bin=${HCBLK_BASE:-}
            [[ -n $bin ]] || { log "$name: set HCBLK_BASE to the hcblk binary to compare with"; return 1; }
            rest=${rest%-base}
        fi
        local backing=${rest%%-*}
        [[ $rest == *-* ]] && poll=${rest#*-}
        case $backing in null | ram | file) ;; *) log "unknown server $name"; return 1 ;; esac
        case $poll in always | adaptive | never) ;; *) log "$name: unknown poll mode $poll"; return 1 ;; esac
        local -a path_arg=()
        [[ $backing == file ]] && path_arg=(--path "$IMG")
        # shellcheck disable=SC2086 # HCBLK_DAEMON_ARGS is a word list on purpose
        "${PRIO[@]}" taskset -c "$SCPU" "$bin" daemon --data-dir "$dir/data" --socket-dir "$dir/sock" \
            --api-socket "$api" --poll "$poll" --cpus "$SCPU" ${HCBLK_DAEMON_ARGS:-} \
            >"$logf" 2>&1 &
        SERVER_PID=$!
        wait_socket "$SERVER_PID" "$api" || return 1
        local created
        created=$("$bin" --api-socket "$api" volume create bench --size "$SIZE" \
            --backing "$backing" "${path_arg[@]}" --queues 1 2>>"$logf") || {
            log "volume create failed (see $logf)"; return 1; }
        SOCK=$(sed -n 's/^socket: //p' <<<"$created")
        [[ -n $SOCK ]] || { log "volume create printed no socket: $created"; return 1; }
        wait_socket "$SERVER_PID" "$SOCK"
        ;;
    *)
        log "unknown server $name"
        return 1
        ;;
    esac
}

# Percent of all cores busy over half a second, from /proc/stat.
busy_pct() {
    local a b
    a=$(head -1 /proc/stat); sleep 0.5; b=$(head -1 /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {
        n = split(a, x); split(b, y); t = 0
        for (i = 2; i <= n; i++) t += y[i] - x[i]
        idle = (y[5] - x[5]) + (y[6] - x[6])
        print (t > 0) ? int(100 * (t - idle) / t) : 0 }'
}

# On a shared machine other work would land on the measured cores; start each measurement
# when the machine is quiet (bounded wait), and let plot.py flag what got disturbed anyway.
wait_quiet() {
    [[ $QUIET_WAIT == 0 ]] && return 0
    local start=$SECONDS busy
    while busy=$(busy_pct); ((busy > QUIET_PCT)); do
        if ((SECONDS - start >= QUIET_WAIT)); then
            log "machine still ${busy}% busy after ${QUIET_WAIT} s; measuring anyway"
            return 0
        fi
        sleep 1
    done
}

# Output files are named IDX__SERVER__WORKLOAD__BS__QD.{json,error} for plot.py.
measure() {
    local idx=$1 server=$2 wl=$3 bs=$4 qd=$5
    local base="$OUT/${idx}__${server}__${wl}__${bs}__${qd}"
    local logf="$OUT/logs/${idx}__${server}__${wl}__${bs}__${qd}.log"
    if [[ $server == fio-host || $server == fio-server-core ]]; then
        # fio-host runs on the client's core and leaves the server's core to the kernel's
        # completion work (the disk interrupt's core here); fio-server-core runs on the
        # server's core, with the same one core for everything that a server has.
        local cpu=$CCPU
        [[ $server == fio-server-core ]] && cpu=$SCPU
        # The guest's job file, pointed at the image: what the device gives io_uring directly.
        if BLK_DEV=$IMG BLK_IOENGINE=io_uring BLK_RUNTIME=$SECONDS_PER BLK_RAMP=$WARMUP \
            "${PRIO[@]}" taskset -c "$cpu" fio --output-format=json --output="$base.json" \
            "$ROOT/bench/jobs/$wl-$bs-qd$qd.fio" >"$logf" 2>&1; then
            log "$server $wl $bs qd$qd: $("$PYTHON" -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; d=j["write" if j["write"]["io_bytes"] else "read"]; print("%.0f IOPS p50=%.2fus" % (d["iops"], d["lat_ns"]["percentile"]["50.000000"]/1000))' "$base.json")"
        else
            log "$server $wl $bs qd$qd: fio failed (see $logf)"
            echo "fio failed" >"$base.error"; rm -f "$base.json"; FAILED=1
        fi
        return 0
    fi
    if ! start_server "$server" "$logf"; then
        echo "server failed to start" >"$base.error"; FAILED=1; stop_server; return 0
    fi
    local line
    if line=$("${PRIO[@]}" taskset -c "$CCPU" "$BLK_BENCH" --socket "$SOCK" --workload "$wl" --bs "$bs" \
        --qd "$qd" --seconds "$SECONDS_PER" --warmup "$WARMUP" --server-pid "$SERVER_PID" \
        --cpu "$CCPU" --label "$server" --json "$base.json" 2>>"$logf"); then
        log "$line"
    else
        log "$server $wl $bs qd$qd: blk-bench failed: $(tail -n 3 "$logf" | tr '\n' ' ')"
        tail -n 20 "$logf" >"$base.error"; FAILED=1
    fi
    stop_server
}

measure_idle() {
    local idx=$1 server=$2
    local base="$OUT/${idx}__${server}__idle__4k__1"
    local logf="$OUT/logs/${idx}__${server}__idle.log"
    if ! start_server "$server" "$logf" adaptive; then
        echo "server failed to start" >"$base.error"; FAILED=1; stop_server; return 0
    fi
    local line
    if line=$("${PRIO[@]}" taskset -c "$CCPU" "$BLK_BENCH" --socket "$SOCK" --workload idle --bs 4k --qd 1 \
        --seconds "$IDLE_SECONDS" --warmup "$WARMUP" --server-pid "$SERVER_PID" \
        --cpu "$CCPU" --label "$server" --json "$base.json" 2>>"$logf"); then
        log "$line"
    else
        log "$server idle: blk-bench failed: $(tail -n 3 "$logf" | tr '\n' ' ')"
        tail -n 20 "$logf" >"$base.error"; FAILED=1
    fi
    stop_server
}

# --- build -------------------------------------------------------------------------------
if [[ $BUILD == 1 ]]; then
    pkgs=(-p hcblk-bench)
    [[ "$SERVERS $IDLE" == *hcblk-* ]] && pkgs+=(-p hcblk)
    log "cargo build --release ${pkgs[*]}"
    (cd "$ROOT" && cargo build --release "${pkgs[@]}" >&2)
fi
[[ -x $BLK_BENCH ]] || { log "missing $BLK_BENCH"; exit 1; }

# --- image -------------------------------------------------------------------------------
# Written with data, not fallocated: reads of unwritten extents return zeros without touching
# the device, which would flatter every file backend.
if [[ ! -f $IMG || $(stat -c %s "$IMG") != "$SIZE_BYTES" || -f $IMG.partial ]]; then
    log "writing $SIZE image $IMG"
    mkdir -p "$(dirname "$IMG")"
    touch "$IMG.partial"
    dd if=/dev/urandom of="$IMG" bs=1M count=$((SIZE_BYTES >> 20)) oflag=direct status=none
    rm -f "$IMG.partial"
fi

# --- hugepages ---------------------------------------------------------------------------
# Every hcblk daemon needs its own --hugepages-mb (default 64, reserved here with margin: 128 MiB);
# the ram backing lives in hugepages too. Reserve what is missing and give it back on exit.
if [[ "$SERVERS" == *hcblk-* ]]; then
    page_kb=$(awk '/^Hugepagesize:/ {print $2}' /proc/meminfo)
    free=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
    need=$(((128 << 10) / page_kb))
    if [[ "$SERVERS" == *hcblk-ram* ]]; then
        need=$((need + (SIZE_BYTES >> 10) / page_kb))
    fi
    if ((free < need)); then
        total=$(cat /proc/sys/vm/nr_hugepages)
        if [[ $(id -u) == 0 ]]; then
            HUGEPAGES_ORIG=$total
            echo $((total + need - free)) >/proc/sys/vm/nr_hugepages
            log "reserved $((need - free)) more hugepages for hcblk ($(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo) free)"
        else
            log "hcblk needs $need free hugepages, $free free and not root: it will fail"
        fi
    fi
fi

# --- metadata ----------------------------------------------------------------------------
# The command as invoked, with every setting taken from the environment.
COMMAND="$(env | { grep -E '^(BENCH_[A-Z_]*|HCBLK|HCBLK_BASE|HCBLK_DAEMON_ARGS|QSD|PYTHON)=' || true; } | sort | sed -E "s/=(.*)/='\1'/" | tr '\n' ' ')bench/run.sh"
"$PYTHON" - "$OUT/meta.json" <<EOF
import json, sys, platform, subprocess
def sh(c):
    try:
        return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception as e:
        return str(e)
json.dump({
    "timestamp": "$TS",
    "command": """$COMMAND""",
    "servers": """$SERVERS""".split(),
    "workloads": """$WORKLOADS""".split(),
    "seconds": $SECONDS_PER, "warmup": $WARMUP, "rounds": $ROUNDS,
    "idle_seconds": $IDLE_SECONDS,
    "server_cpu": $SCPU, "client_cpu": $CCPU,
    "image": """$IMG""", "size": """$SIZE""",
    "git": sh("git -C $ROOT rev-parse --short HEAD 2>/dev/null") or "uncommitted",
    "kernel": platform.release(),
    "cpu_model": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
    "nproc": sh("nproc"),
    "qemu_storage_daemon": sh("$QSD --version | head -1"),
    "fio": sh("fio --version"),
    "loadavg_start": open("/proc/loadavg").read().split()[:3],
}, open(sys.argv[1], "w"), indent=2)
EOF

# --- measurements ------------------------------------------------------------------------
log "results in $OUT; servers on core $SCPU, client on core $CCPU"
idx=0
for round in $(seq "$ROUNDS"); do
    for w in $WORKLOADS; do
        IFS=: read -r wl bs qd <<<"$w"
        for server in $SERVERS; do
            idx=$((idx + 1))
            wait_quiet
            measure "$(printf %03d $idx)" "$server" "$wl" "$bs" "$qd"
        done
    done
    log "round $round done"
done
for server in $IDLE; do
    idx=$((idx + 1))
    wait_quiet
    measure_idle "$(printf %03d $idx)" "$server"
done

# --- report ------------------------------------------------------------------------------
cp /proc/loadavg "$OUT/loadavg-end"
"$PYTHON" "$ROOT/bench/plot.py" --run-dir "$OUT" \
    --json "$OUT_BASE/results-$TS.json" \
    --png "$OUT_BASE/results-$TS.png" \
    --markdown "$OUT_BASE/results-$TS.md"
cat "$OUT_BASE/results-$TS.md"
log "wrote $OUT_BASE/results-$TS.{json,png,md}"
if [[ $FAILED != 0 ]]; then
    log "some measurements failed (see *.error and logs/ in $OUT)"
    exit 1
fi
