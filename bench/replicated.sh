#!/usr/bin/env bash
# Replicated vhost-user-blk benchmark: three hosts in network namespaces on one bridge, the
# volume attached on n1, replicas on n1, n2 and n3, all in one run.
#
# Today's servers are the baselines a user could build from stock parts, qemu-storage-daemon
# (QSD) only:
#   qsd-local   1 replica: n1's QSD exports its local raw file (no replication at all)
#   qsd-quorum  3 replicas: n1's QSD exports a `quorum` node over its local file and NBD clients
#               of n2's and n3's QSDs, each exporting a raw file over NBD
#   qsd-remote  0 local replicas: n1's QSD exports an NBD client of n2's QSD (a volume attached
#               on a node that holds no replica of it)
# and hcblk's cluster mode (one etcd in n1's namespace, one `hcblk daemon` per host, transport
# tcp, --poll $BENCH_HCBLK_POLL), three volumes attached on n1:
#   hcblk-1       1 replica, on n1 (local reads and writes, nothing leaves the node)
#   hcblk-3       3 replicas, on n1, n2 and n3 (writes to all three; reads local)
#   hcblk-remote  1 replica, on n2 (a volume attached on a node that holds none of it: every
#                 read and write crosses the network)
# The hcblk cluster is started once, on the first hcblk measurement, and its volumes are
# written whole first (`blk-bench --workload fill`), as the QSD images are; its daemons stay up
# (idle, sleeping on their sockets) while other kinds are measured. For every workload each
# server kind is measured by blk-bench (libblkio, busy-polled queue, in the root namespace: the
# vhost-user socket is a unix socket), alternating as bench/run.sh does. Then wire-bench
# measures the tcp transport's round trip between n1 and n2 of the same namespaces.
#
# Usage: bench/replicated.sh     (root: network namespaces)
# Environment (defaults in brackets):
#   BENCH_SECONDS [5]  BENCH_WARMUP [1]  BENCH_ROUNDS [1]
#   BENCH_SERVER_CPU [1]  core of n1's server (the one the client talks to)
#   BENCH_PEER_CPU [$BENCH_SERVER_CPU]  core of the other hosts' servers ("": unpinned)
#   BENCH_CLIENT_CPU [0]
#   BENCH_SERVERS ["qsd-local qsd-quorum qsd-remote hcblk-1 hcblk-3 hcblk-remote"]
#   BENCH_WORKLOADS ["randwrite:4k:1 randwrite:4k:32 randread:4k:1 randread:4k:32"]
#   BENCH_QUORUM_VOTE_THRESHOLD [2]  BENCH_QUORUM_READ_PATTERN [fifo]
#   BENCH_HCBLK_POLL [never]  the hcblk daemons' --poll: on two cores, three daemons, etcd and
#               the client share them, and a poller that spins takes the core its peers need
#   BENCH_WIRE [1]  (0: skip wire-bench)  BENCH_WIRE_QD1_OPS [20000]  BENCH_WIRE_QD32_OPS [2048]
#   BENCH_IMG_DIR [bench/out/replicated]  (one image per host)  BENCH_SIZE [1G]
#   BENCH_BUILD [1]  (0: use the binaries already built)
#   BENCH_NICE [-20]  BENCH_QUIET_WAIT [10]  BENCH_QUIET_PCT [10]  (as in bench/run.sh)
#   QSD [/usr/bin/qemu-storage-daemon]  PYTHON [/usr/bin/python3]  ETCD [/usr/bin/etcd]
#   CARGO_TARGET_DIR [target]  where hcblk, blk-bench and wire-bench are built (release)
set -euo pipefail
trap 'echo "bench/replicated.sh: line $LINENO: \"$BASH_COMMAND\" failed" >&2' ERR

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HCBLK_POLL=${BENCH_HCBLK_POLL:-never}
NICE=${BENCH_NICE:--20}

# As in run.sh: a session (autogroup) of our own whose niceness is lowered for the run, so
# other work on a shared machine takes less from the measurement. Signals are passed on.
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
SCPU=${BENCH_SERVER_CPU:-1}
PCPU=${BENCH_PEER_CPU-$SCPU}
CCPU=${BENCH_CLIENT_CPU:-0}
SERVERS=${BENCH_SERVERS:-qsd-local qsd-quorum qsd-remote hcblk-1 hcblk-3 hcblk-remote}
WORKLOADS=${BENCH_WORKLOADS:-randwrite:4k:1 randwrite:4k:32 randread:4k:1 randread:4k:32}
VOTE_THRESHOLD=${BENCH_QUORUM_VOTE_THRESHOLD:-2}
READ_PATTERN=${BENCH_QUORUM_READ_PATTERN:-fifo}
WIRE=${BENCH_WIRE:-1}
WIRE_QD1_OPS=${BENCH_WIRE_QD1_OPS:-20000}
WIRE_QD32_OPS=${BENCH_WIRE_QD32_OPS:-2048}
IMG_DIR=${BENCH_IMG_DIR:-$ROOT/bench/out/replicated}
SIZE=${BENCH_SIZE:-1G}
BUILD=${BENCH_BUILD:-1}
QUIET_WAIT=${BENCH_QUIET_WAIT:-10}
QUIET_PCT=${BENCH_QUIET_PCT:-10}
QSD=${QSD:-/usr/bin/qemu-storage-daemon}
PYTHON=${PYTHON:-/usr/bin/python3}
ETCD=${ETCD:-/usr/bin/etcd}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
HCBLK=$TARGET/release/hcblk
BLK_BENCH=$TARGET/release/blk-bench
WIRE_BENCH=$TARGET/release/wire-bench
PRIO=()
if [[ $NICE != 0 && $(id -u) == 0 ]]; then PRIO=(nice -n "$NICE"); fi
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0

TS=$(date -u +%Y%m%dT%H%M%SZ)
OUT_BASE=$ROOT/bench/out
OUT=$OUT_BASE/replicated-$TS
mkdir -p "$OUT/logs"
WORK=$(mktemp -d /tmp/hcblk-repl.XXXXXX)
FAILED=0

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

[[ $(id -u) == 0 ]] || { log "needs root (network namespaces)"; exit 1; }
for tool in ip ss taskset; do
    command -v "$tool" >/dev/null || { log "missing $tool (Debian: iproute2 / util-linux)"; exit 1; }
done
[[ -x $QSD ]] || { log "missing $QSD (Debian: qemu-system-common)"; exit 1; }

# --- hosts -------------------------------------------------------------------------------
# n1, n2, n3 on 198.18.2.0/24 (benchmarking range, RFC 2544; the tests use 198.18.1.0/24), each
# in a namespace with eth0 cabled by a veth to br0 in a switch namespace. Nothing is created in
# the root namespace. Names carry the pid, so runs never collide.
HOSTS=(n1 n2 n3)
declare -A ADDR=([n1]=198.18.2.11 [n2]=198.18.2.12 [n3]=198.18.2.13)
NS_PREFIX=hcblk-rb$$
SWITCH_NS=$NS_PREFIX-switch
ns() { echo "$NS_PREFIX-$1"; }
CREATED_NS=()

setup_hosts() {
    ip netns add "$SWITCH_NS"
    CREATED_NS+=("$SWITCH_NS")
    ip -n "$SWITCH_NS" link add br0 type bridge
    ip -n "$SWITCH_NS" link set br0 up
    local i=0 h
    for h in "${HOSTS[@]}"; do
        ip netns add "$(ns "$h")"
        CREATED_NS+=("$(ns "$h")")
        ip -n "$(ns "$h")" link add eth0 type veth peer name "p$i" netns "$SWITCH_NS"
        ip -n "$SWITCH_NS" link set "p$i" master br0
        ip -n "$SWITCH_NS" link set "p$i" up
        ip -n "$(ns "$h")" addr add "${ADDR[$h]}/24" dev eth0
        ip -n "$(ns "$h")" link set eth0 up
        ip -n "$(ns "$h")" link set lo up
        i=$((i + 1))
    done
    log "hosts: n1 ${ADDR[n1]}, n2 ${ADDR[n2]}, n3 ${ADDR[n3]} (namespaces $NS_PREFIX-*)"
}

teardown_hosts() {
    local n
    for n in "${CREATED_NS[@]}"; do ip netns del "$n" 2>/dev/null || true; done
    CREATED_NS=()
}

# --- processes ---------------------------------------------------------------------------
# Every process started for a server, to stop it (n1's first). `ip netns exec`, taskset and
# nice exec their program, so $! is the server's own pid.
PIDS=()

# in_host HOST CPU CMD...: runs CMD inside HOST, pinned to CPU ("" = unpinned), in the background.
in_host() {
    local host=$1 cpu=$2
    shift 2
    local -a pin=()
    [[ -n $cpu ]] && pin=(taskset -c "$cpu")
    "${PRIO[@]}" "${pin[@]}" ip netns exec "$(ns "$host")" "$@" &
}

stop_pid() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "process $pid ignored SIGTERM for 5 s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

stop_servers() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    PIDS=()
    SERVER_PID=
    PEER_PIDS=()
}

cleanup() {
    stop_servers
    stop_hcblk_cluster
    teardown_hosts
    if [[ -n ${HUGEPAGES_ORIG:-} ]]; then echo "$HUGEPAGES_ORIG" >/proc/sys/vm/nr_hugepages || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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

# wait_listen PID HOST PORT: until HOST listens on PORT, failing if PID exits or 10 s pass.
wait_listen() {
    local pid=$1 host=$2 port=$3
    for _ in $(seq 100); do
        [[ -n $(ip netns exec "$(ns "$host")" ss -Hltn "sport = :$port") ]] && return 0
        kill -0 "$pid" 2>/dev/null || { log "server on $host exited before listening on $port"; return 1; }
        sleep 0.1
    done
    log "timed out waiting for $host:$port"
    return 1
}

# --- server kinds ------------------------------------------------------------------------
# start_<kind> LOGFILE: starts every process of the kind, sets SOCK (the vhost-user-blk socket
# on n1), SERVER_PID (n1's server: blk-bench samples its CPU) and PEER_PIDS (the other hosts'
# servers: their CPU is sampled around blk-bench), and appends all pids to PIDS, which
# stop_servers stops. It returns non-zero if anything failed to start.
SOCK=
SERVER_PID=
PEER_PIDS=()
NBD_PORT=10809

# A raw file with the settings of bench/run.sh's qsd-file: O_DIRECT, io_uring.
file_blockdev() { echo "driver=file,node-name=$1,filename=$2,cache.direct=on,aio=io_uring"; }

# n1's QSD: the node graph given as --blockdev arguments, exported on a unix socket. An iothread
# (adaptive polling), as in run.sh: QSD's fastest configuration. The export moves the whole
# graph, NBD clients included, to the iothread.
start_qsd_n1() {
    local logf=$1 node=$2
    shift 2
    SOCK=$WORK/n1-$RANDOM.sock
    local -a args=()
    local b
    for b in "$@"; do args+=(--blockdev "$b"); done
    in_host n1 "$SCPU" "$QSD" "${args[@]}" \
        --object iothread,id=io0 \
        --export "type=vhost-user-blk,id=e0,node-name=$node,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=1,iothread=io0" \
        >>"$logf" 2>&1
    SERVER_PID=$!
    PIDS=("$SERVER_PID" "${PIDS[@]}")
    wait_socket "$SERVER_PID" "$SOCK"
}

# A peer's QSD: its raw image exported over NBD on its address (same file settings, iothread).
start_qsd_nbd_peer() {
    local host=$1 logf=$2
    in_host "$host" "$PCPU" "$QSD" \
        --blockdev "$(file_blockdev d0 "$IMG_DIR/$host.img")" \
        --object iothread,id=io0 \
        --nbd-server "addr.type=inet,addr.host=${ADDR[$host]},addr.port=$NBD_PORT" \
        --export "type=nbd,id=e0,node-name=d0,name=vol,writable=on,iothread=io0" \
        >>"$logf" 2>&1
    local pid=$!
    PIDS+=("$pid")
    PEER_PIDS+=("$pid")
    wait_listen "$pid" "$host" "$NBD_PORT"
}

nbd_blockdev() {
    echo "driver=nbd,node-name=$1,server.type=inet,server.host=${ADDR[$2]},server.port=$NBD_PORT,export=vol"
}

start_qsd_local() {
    start_qsd_n1 "$1" local "$(file_blockdev local "$IMG_DIR/n1.img")"
}

# Writes go to all three children and QEMU completes a quorum write only when every child has
# answered (whatever the threshold): the latency of the slowest replica. vote-threshold=2: a
# write succeeds when at least two children succeeded (one failed replica tolerated, a
# majority). read-pattern=fifo: reads go to the first child, the local file, and only fall
# over to the next child on error; `quorum` would read all three and compare, a verification
# mode no replicated store runs per read. Local-first reads are what hcblk does too, so reads
# compare the read paths, not a vote.
start_qsd_quorum() {
    local logf=$1
    # Other kinds write one replica only; a voting read needs the replicas equal again.
    if [[ $READ_PATTERN == quorum ]]; then
        resync_replicas || return 1
    fi
    start_qsd_nbd_peer n2 "$logf" || return 1
    start_qsd_nbd_peer n3 "$logf" || return 1
    start_qsd_n1 "$logf" q \
        "$(file_blockdev local "$IMG_DIR/n1.img")" \
        "$(nbd_blockdev r2 n2)" \
        "$(nbd_blockdev r3 n3)" \
        "driver=quorum,node-name=q,children.0=local,children.1=r2,children.2=r3,vote-threshold=$VOTE_THRESHOLD,read-pattern=$READ_PATTERN"
}

# n2 and n3 become copies of n1 (replicas start identical, as after a resync).
resync_replicas() {
    local h
    for h in n2 n3; do
        dd if="$IMG_DIR/n1.img" of="$IMG_DIR/$h.img" bs=1M iflag=direct oflag=direct status=none || return 1
    done
}

start_qsd_remote() {
    local logf=$1
    start_qsd_nbd_peer n2 "$logf" || return 1
    start_qsd_n1 "$logf" r2 "$(nbd_blockdev r2 n2)"
}


# --- hcblk cluster -----------------------------------------------------------------------
# etcd in n1's namespace, a daemon per host (n1's pinned to the server core, the others to the
# peer core), three volumes attached on n1. Started once (start_hcblk_cluster), kept for every
# hcblk measurement, stopped at exit.
HCBLK_UP=0
HCBLK_FAILED=0
HCBLK_PIDS=()
declare -A HCBLK_PID=() HCBLK_SOCK=()
ETCD_PID=
HCBLK_PORT=7400
HCBLK_VOLUMES="r1 r3 remote"

hcblk_cli() {
    local host=$1
    shift
    ip netns exec "$(ns "$host")" "$HCBLK" --api-socket "$WORK/hcblk/$host/api.sock" "$@"
}

start_hcblk_cluster() {
    ((HCBLK_UP)) && return 0
    ((HCBLK_FAILED)) && return 1
    HCBLK_FAILED=1
    local logf=$OUT/logs/hcblk-cluster.log h
    mkdir -p "$WORK/hcblk/etcd"
    "${PRIO[@]}" ip netns exec "$(ns n1)" "$ETCD" --name bench --data-dir "$WORK/hcblk/etcd" \
        --listen-client-urls "http://${ADDR[n1]}:2379" --advertise-client-urls "http://${ADDR[n1]}:2379" \
        --listen-peer-urls "http://127.0.0.1:2380" --initial-advertise-peer-urls "http://127.0.0.1:2380" \
        --initial-cluster "bench=http://127.0.0.1:2380" >>"$WORK/hcblk/etcd.log" 2>&1 &
    ETCD_PID=$!
    wait_listen "$ETCD_PID" n1 2379 || { log "etcd did not start (see $WORK/hcblk/etcd.log)"; return 1; }
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/hcblk/secret"
    for h in "${HOSTS[@]}"; do
        local dir=$WORK/hcblk/$h cpu=$PCPU
        [[ $h == n1 ]] && cpu=$SCPU
        mkdir -p "$dir/data" "$dir/run"
        local -a pin=()
        [[ -n $cpu ]] && pin=(--cpus "$cpu")
        in_host "$h" "$cpu" "$HCBLK" daemon --data-dir "$dir/data" --socket-dir "$dir/run" \
            --api-socket "$dir/api.sock" --poll "$HCBLK_POLL" "${pin[@]}" \
            --etcd "http://${ADDR[n1]}:2379" --node "$h" --listen "${ADDR[$h]}:$HCBLK_PORT" \
            --cluster-secret-file "$WORK/hcblk/secret" --transport tcp >"$dir/daemon.log" 2>&1
        HCBLK_PID[$h]=$!
        HCBLK_PIDS+=("${HCBLK_PID[$h]}")
    done
    for h in "${HOSTS[@]}"; do
        local ok=0
        for _ in $(seq 300); do
            grep -q "hcblk daemon ready" "$WORK/hcblk/$h/daemon.log" 2>/dev/null && { ok=1; break; }
            kill -0 "${HCBLK_PID[$h]}" 2>/dev/null || break
            sleep 0.1
        done
        ((ok)) || { log "hcblk daemon on $h did not start:"; tail -n 5 "$WORK/hcblk/$h/daemon.log" >&2; return 1; }
    done
    log "hcblk cluster up (etcd ${ADDR[n1]}:2379, daemons on n1 n2 n3)"
    # r1 and r3 are created on n1 (placement puts a member on the creating node), remote on n2.
    hcblk_cli n1 volume create r1 --size "$SIZE" --replicas 1 --min-replicas 1 >>"$logf" 2>&1 &&
        hcblk_cli n1 volume create r3 --size "$SIZE" --replicas 3 --min-replicas 2 >>"$logf" 2>&1 &&
        hcblk_cli n2 volume create remote --size "$SIZE" --replicas 1 --min-replicas 1 >>"$logf" 2>&1 ||
        { log "hcblk volume create failed (see $logf)"; return 1; }
    local v out
    for v in $HCBLK_VOLUMES; do
        out=$(hcblk_cli n1 volume attach "$v" 2>>"$logf") || { log "hcblk volume attach $v failed (see $logf)"; return 1; }
        HCBLK_SOCK[$v]=$(sed -n 's/^socket: //p' <<<"$out")
        [[ -S ${HCBLK_SOCK[$v]} ]] || { log "hcblk volume attach $v printed no socket: $out"; return 1; }
        hcblk_cli n1 volume info "$v" >>"$logf" 2>&1 || true
    done
    # Written whole, so reads hit the replicas' disks (as the QSD images, written with data).
    for v in $HCBLK_VOLUMES; do
        log "hcblk: filling volume $v ($SIZE)"
        "$BLK_BENCH" --socket "${HCBLK_SOCK[$v]}" --workload fill --bs 1m --qd 8 --warmup 0 \
            --seconds 3600 --label "fill-$v" >>"$logf" 2>&1 || { log "filling $v failed (see $logf)"; return 1; }
    done
    HCBLK_FAILED=0
    HCBLK_UP=1
}

stop_hcblk_cluster() {
    local pid h
    for pid in "${HCBLK_PIDS[@]}"; do stop_pid "$pid"; done
    # The daemons' logs go with the results.
    for h in "${HOSTS[@]}"; do
        [[ -f $WORK/hcblk/$h/daemon.log ]] && cp "$WORK/hcblk/$h/daemon.log" "$OUT/logs/hcblk-$h.log"
    done
    HCBLK_PIDS=()
    [[ -n $ETCD_PID ]] && stop_pid "$ETCD_PID"
    ETCD_PID=
    HCBLK_UP=0
}

# A measurement of one of the cluster's volumes: the cluster keeps running after it
# (stop_servers stops only what is in PIDS).
start_hcblk() {
    local vol=$1 logf=$2
    start_hcblk_cluster || return 1
    SOCK=${HCBLK_SOCK[$vol]}
    SERVER_PID=${HCBLK_PID[n1]}
    PEER_PIDS=("${HCBLK_PID[n2]}" "${HCBLK_PID[n3]}")
    echo "hcblk volume $vol on $SOCK" >>"$logf"
}

start_server() {
    local name=$1 logf=$2
    case $name in
    qsd-local) start_qsd_local "$logf" ;;
    qsd-quorum) start_qsd_quorum "$logf" ;;
    qsd-remote) start_qsd_remote "$logf" ;;
    hcblk-1) start_hcblk r1 "$logf" ;;
    hcblk-3) start_hcblk r3 "$logf" ;;
    hcblk-remote) start_hcblk remote "$logf" ;;
    *) log "unknown server $name"; return 1 ;;
    esac
}

# --- measuring ---------------------------------------------------------------------------
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

# Clock ticks of user+system time of all threads of the given pids (0 for a gone pid).
cpu_ticks() {
    local total=0 pid t
    for pid in "$@"; do
        t=$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}

# Output files are named IDX__SERVER__WORKLOAD__BS__QD.{json,error} (as run.sh's), plus
# .peers.json: the peers' CPU over the whole blk-bench run (warmup included; the load is the
# same throughout), as percent of one core summed over the peers.
measure() {
    local idx=$1 server=$2 wl=$3 bs=$4 qd=$5
    local base="$OUT/${idx}__${server}__${wl}__${bs}__${qd}"
    local logf="$OUT/logs/${idx}__${server}__${wl}__${bs}__${qd}.log"
    if ! start_server "$server" "$logf"; then
        log "$server: failed to start (see $logf)"
        echo "server failed to start" >"$base.error"; FAILED=1; stop_servers; return 0
    fi
    local hz t0 t1 c0 c1 line rc=0
    hz=$(getconf CLK_TCK)
    c0=$(cpu_ticks "${PEER_PIDS[@]}"); t0=$(date +%s.%N)
    line=$("${PRIO[@]}" taskset -c "$CCPU" "$BLK_BENCH" --socket "$SOCK" --workload "$wl" --bs "$bs" \
        --qd "$qd" --seconds "$SECONDS_PER" --warmup "$WARMUP" --server-pid "$SERVER_PID" \
        --cpu "$CCPU" --label "$server" --json "$base.json" 2>>"$logf") || rc=$?
    c1=$(cpu_ticks "${PEER_PIDS[@]}"); t1=$(date +%s.%N)
    if ((rc == 0)); then
        log "$line"
        if ((${#PEER_PIDS[@]} > 0)); then
            awk -v c="$((c1 - c0))" -v hz="$hz" -v t0="$t0" -v t1="$t1" -v n="${#PEER_PIDS[@]}" \
                'BEGIN { printf "{\"peers\": %d, \"peer_cpu_pct\": %.1f}\n", n, 100 * c / hz / (t1 - t0) }' \
                >"$base.peers.json"
        fi
    else
        log "$server $wl $bs qd$qd: blk-bench failed: $(tail -n 3 "$logf" | tr '\n' ' ')"
        tail -n 20 "$logf" >"$base.error"; FAILED=1
    fi
    stop_servers
}

# wire-bench's transport round trip between n1 (client) and n2 (serving), the hosts above.
measure_wire() {
    local logf=$OUT/logs/wire.log
    ip netns exec "$(ns n2)" "$WIRE_BENCH" serve --host "${ADDR[n2]}" >"$WORK/wire-serve.out" 2>>"$logf" &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 100); do
        grep -q READY "$WORK/wire-serve.out" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if ! grep -q READY "$WORK/wire-serve.out" 2>/dev/null; then
        log "wire-bench serve did not start (see $logf)"
        echo "wire-bench serve did not start" >"$OUT/wire.error"; FAILED=1; stop_servers; return 0
    fi
    if ip netns exec "$(ns n1)" "$WIRE_BENCH" client --host "${ADDR[n2]}" --qd1-ops "$WIRE_QD1_OPS" \
        --qd32-ops "$WIRE_QD32_OPS" --out "$OUT/wire.md" >/dev/null 2>>"$logf"; then
        log "wire-bench n1 -> n2 done"
    else
        log "wire-bench client failed: $(tail -n 3 "$logf" | tr '\n' ' ')"
        tail -n 20 "$logf" >"$OUT/wire.error"; FAILED=1
    fi
    stop_servers
}

# --- build -------------------------------------------------------------------------------
if [[ $BUILD == 1 ]]; then
    log "cargo build --release -p hcblk-bench -p hcblk"
    (cd "$ROOT" && cargo build --release -p hcblk-bench -p hcblk >&2)
fi
[[ -x $BLK_BENCH ]] || { log "missing $BLK_BENCH"; exit 1; }
if [[ $SERVERS == *hcblk-* ]]; then
    [[ -x $HCBLK ]] || { log "missing $HCBLK"; exit 1; }
    [[ -x $ETCD ]] || { log "missing $ETCD (Debian: etcd-server)"; exit 1; }
    # Three daemons with --hugepages-mb 64 each.
    page_kb=$(awk '/^Hugepagesize:/ {print $2}' /proc/meminfo)
    need=$(((3 * 64 << 10) / page_kb))
    free=$(awk '/^HugePages_Free:/ {print $2}' /proc/meminfo)
    if ((free < need)); then
        HUGEPAGES_ORIG=$(cat /proc/sys/vm/nr_hugepages)
        echo $((HUGEPAGES_ORIG + need - free)) >/proc/sys/vm/nr_hugepages
        log "reserved $((need - free)) more hugepages for the hcblk daemons"
    fi
fi
[[ $WIRE == 0 || -x $WIRE_BENCH ]] || { log "missing $WIRE_BENCH"; exit 1; }

# --- images ------------------------------------------------------------------------------
size_bytes() {
    local s=$1 n=${1%[kKmMgGtT]}
    case ${s: -1} in
        k|K) echo $((n << 10)) ;; m|M) echo $((n << 20)) ;;
        g|G) echo $((n << 30)) ;; t|T) echo $((n << 40)) ;; *) echo "$n" ;;
    esac
}
SIZE_BYTES=$(size_bytes "$SIZE")
# One image per host, written with data (not fallocated: reads of unwritten extents return
# zeros without touching the device). The replicas start identical, as after a resync.
mkdir -p "$IMG_DIR"
for h in "${HOSTS[@]}"; do
    img=$IMG_DIR/$h.img
    if [[ ! -f $img || $(stat -c %s "$img") != "$SIZE_BYTES" || -f $img.partial ]]; then
        log "writing $SIZE image $img"
        touch "$img.partial"
        if [[ $h == n1 ]]; then
            dd if=/dev/urandom of="$img" bs=1M count=$((SIZE_BYTES >> 20)) oflag=direct status=none
            # A new n1 makes the others stale too.
            rm -f "$IMG_DIR/n2.img" "$IMG_DIR/n3.img"
        else
            dd if="$IMG_DIR/n1.img" of="$img" bs=1M iflag=direct oflag=direct status=none
        fi
        rm -f "$img.partial"
    fi
done

# --- metadata ----------------------------------------------------------------------------
COMMAND="$(env | { grep -E '^(BENCH_[A-Z_]*|QSD|PYTHON|CARGO_TARGET_DIR)=' || true; } | sort | sed -E "s/=(.*)/='\1'/" | tr '\n' ' ')bench/replicated.sh"
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
    "server_cpu": "$SCPU", "peer_cpu": "$PCPU", "client_cpu": "$CCPU",
    "quorum": {"vote_threshold": $VOTE_THRESHOLD, "read_pattern": "$READ_PATTERN"},
    "hosts": {"n1": "${ADDR[n1]}", "n2": "${ADDR[n2]}", "n3": "${ADDR[n3]}"},
    "size": "$SIZE",
    "git": sh("git -C $ROOT rev-parse --short HEAD 2>/dev/null") or "uncommitted",
    "kernel": platform.release(),
    "cpu_model": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
    "nproc": sh("nproc"),
    "qemu_storage_daemon": sh("$QSD --version | head -1"),
    "loadavg_start": open("/proc/loadavg").read().split()[:3],
}, open(sys.argv[1], "w"), indent=2)
EOF

# --- measurements ------------------------------------------------------------------------
setup_hosts
log "results in $OUT; n1's server on core $SCPU, peers on ${PCPU:-any core}, client on core $CCPU"
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
if [[ $WIRE != 0 ]]; then
    wait_quiet
    measure_wire
fi

# --- report ------------------------------------------------------------------------------
cp /proc/loadavg "$OUT/loadavg-end"
"$PYTHON" "$ROOT/bench/replicated_report.py" --run-dir "$OUT" \
    --json "$OUT_BASE/replicated-$TS.json" --markdown "$OUT_BASE/replicated-$TS.md" \
    --png "$OUT_BASE/replicated-$TS.png"
cat "$OUT_BASE/replicated-$TS.md"
log "wrote $OUT_BASE/replicated-$TS.{json,md,png}"
if [[ $FAILED != 0 ]]; then
    log "some measurements failed (see *.error and logs/ in $OUT)"
    exit 1
fi
