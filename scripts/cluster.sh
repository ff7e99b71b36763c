#!/usr/bin/env bash
# A three-node hcblk cluster on this one machine, each node in its own network namespace (as if
# three hosts on one switch), with one etcd; for trying cluster mode and replication by hand.
#
#   scripts/cluster.sh up        # builds hcblk (release), starts etcd and n1, n2, n3
#   scripts/cluster.sh hcblk N ARGS...   # runs `hcblk ARGS` against node N's daemon
#   scripts/cluster.sh kill N    # kill -9 node N's daemon (its replicas fall out of sync)
#   scripts/cluster.sh start N   # starts node N's daemon again (it resyncs what it missed)
#   scripts/cluster.sh down      # stops everything, removes the namespaces (data is kept)
#
# Nodes n1, n2, n3 are 198.18.4.11-13/24 (the benchmarking range, RFC 2544) in namespaces
# hcblk-c-n1.. cabled to a bridge in hcblk-c-switch; etcd listens on n1's address. State and
# logs live in $HCBLK_CLUSTER_DIR (default /var/tmp/hcblk-cluster). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${HCBLK_CLUSTER_DIR:-/var/tmp/hcblk-cluster}
HCBLK=${HCBLK:-$PWD/target/release/hcblk}
ETCD=${ETCD:-/usr/bin/etcd}
NODES=(n1 n2 n3)
declare -A ADDR=([n1]=198.18.4.11 [n2]=198.18.4.12 [n3]=198.18.4.13)
SWITCH=hcblk-c-switch
PORT=7400
ns() { echo "hcblk-c-$1"; }
die() { echo "error: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "needs root (network namespaces, hugepages)"

node_up() { [[ -f $DIR/$1/pid ]] && kill -0 "$(cat "$DIR/$1/pid")" 2>/dev/null; }

start_node() {
    local n=$1
    [[ -n ${ADDR[$n]:-} ]] || die "no node $n (n1, n2, n3)"
    node_up "$n" && die "$n is already running (pid $(cat "$DIR/$n/pid"))"
    mkdir -p "$DIR/$n/data" "$DIR/$n/run"
    # The log is kept across starts: only this start's lines count.
    local from
    from=$(($(wc -l <"$DIR/$n/daemon.log" 2>/dev/null || echo 0) + 1))
    # Interrupt-driven polling: three daemons share this machine's cores with the VMs.
    ip netns exec "$(ns "$n")" setsid "$HCBLK" daemon --data-dir "$DIR/$n/data" --socket-dir "$DIR/$n/run" \
        --api-socket "$DIR/$n/api.sock" --poll never --hugepages-mb 8 \
        --etcd "http://${ADDR[n1]}:2379" --node "$n" --zone "zone-$n" --listen "${ADDR[$n]}:$PORT" \
        --cluster-secret-file "$DIR/secret" --transport tcp >>"$DIR/$n/daemon.log" 2>&1 </dev/null &
    echo $! >"$DIR/$n/pid"
    for _ in $(seq 300); do
        tail -n "+$from" "$DIR/$n/daemon.log" | grep -q "hcblk daemon ready" && { echo "$n up (${ADDR[$n]}:$PORT)"; return 0; }
        node_up "$n" || break
        sleep 0.1
    done
    tail -n 5 "$DIR/$n/daemon.log" >&2
    die "$n did not start (log: $DIR/$n/daemon.log)"
}

up() {
    [[ -x $HCBLK ]] || { scripts/install-deps.sh; PATH="$HOME/.cargo/bin:$PATH" cargo build --release --locked -p hcblk; }
    [[ -x $ETCD ]] || scripts/install-deps.sh
    ip netns list | grep -q "^$SWITCH" && die "already up (scripts/cluster.sh down first)"
    # Each daemon wants 8 MiB free at start (half of it for its replica service's staging),
    # and attached volumes take their bounce buffers from the pool too: 64 MiB in all.
    HCBLK_HUGEPAGES_STATE=$DIR/hugepages.added scripts/hugepages.sh reserve 32
    mkdir -p "$DIR"
    [[ -f $DIR/secret ]] || { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/secret"; chmod 600 "$DIR/secret"; }
    ip netns add "$SWITCH"
    ip -n "$SWITCH" link add br0 type bridge
    ip -n "$SWITCH" link set br0 up
    local i=0 n
    for n in "${NODES[@]}"; do
        ip netns add "$(ns "$n")"
        ip -n "$(ns "$n")" link add eth0 type veth peer name "p$i" netns "$SWITCH"
        ip -n "$SWITCH" link set "p$i" master br0
        ip -n "$SWITCH" link set "p$i" up
        ip -n "$(ns "$n")" addr add "${ADDR[$n]}/24" dev eth0
        ip -n "$(ns "$n")" link set eth0 up
        ip -n "$(ns "$n")" link set lo up
        i=$((i + 1))
    done
    mkdir -p "$DIR/etcd"
    ip netns exec "$(ns n1)" setsid "$ETCD" --name hcblk --data-dir "$DIR/etcd/data" \
        --listen-client-urls "http://${ADDR[n1]}:2379" --advertise-client-urls "http://${ADDR[n1]}:2379" \
        --listen-peer-urls "http://127.0.0.1:2380" --initial-advertise-peer-urls "http://127.0.0.1:2380" \
        --initial-cluster "hcblk=http://127.0.0.1:2380" >>"$DIR/etcd/etcd.log" 2>&1 </dev/null &
    echo $! >"$DIR/etcd/pid"
    for _ in $(seq 100); do
        [[ -n $(ip netns exec "$(ns n1)" ss -Hltn "sport = :2379") ]] && break
        sleep 0.1
    done
    [[ -n $(ip netns exec "$(ns n1)" ss -Hltn "sport = :2379") ]] || die "etcd did not start (log: $DIR/etcd/etcd.log)"
    echo "etcd up (http://${ADDR[n1]}:2379)"
    for n in "${NODES[@]}"; do start_node "$n"; done
    echo "try: scripts/cluster.sh hcblk n1 volume create vm1 --size 1G --replicas 3"
    echo "     scripts/cluster.sh hcblk n1 volume attach vm1     # prints the vhost-user socket"
}

down() {
    local n pid
    for n in "${NODES[@]}" etcd; do
        [[ -f $DIR/$n/pid ]] || continue
        pid=$(cat "$DIR/$n/pid")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$DIR/$n/pid"
    done
    for n in "${NODES[@]}"; do ip netns del "$(ns "$n")" 2>/dev/null || true; done
    ip netns del "$SWITCH" 2>/dev/null || true
    [[ -f $DIR/hugepages.added ]] && HCBLK_HUGEPAGES_STATE=$DIR/hugepages.added scripts/hugepages.sh release
    echo "down (data kept in $DIR)"
}

case ${1:-} in
up) up ;;
down) down ;;
start) start_node "${2:?node}" ;;
kill)
    node_up "${2:?node}" || die "${2} is not running"
    kill -KILL "$(cat "$DIR/$2/pid")"
    rm -f "$DIR/$2/pid"
    echo "$2 killed"
    ;;
hcblk)
    n=${2:?node}
    shift 2
    exec ip netns exec "$(ns "$n")" "$HCBLK" --api-socket "$DIR/$n/api.sock" "$@"
    ;;
*) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
