#!/usr/bin/env bash
# Usage: scripts/hugepages.sh reserve N   -- make sure N hugepages are free, adding our own
#        scripts/hugepages.sh release     -- give back the pages we added
# The pool is machine-wide: we only add (and later remove) pages of our own.
set -euo pipefail
STATE=${HCBLK_HUGEPAGES_STATE:-/tmp/hcblk-hugepages.added}
POOL=/proc/sys/vm/nr_hugepages
free_pages() { awk '/HugePages_Free/ {print $2}' /proc/meminfo; }
case "${1:-}" in
reserve)
    want=${2:?how many pages}
    free=$(free_pages)
    if (( free < want )); then
        add=$(( want - free ))
        total=$(cat "$POOL")
        echo $(( total + add )) > "$POOL"
        got=$(( $(cat "$POOL") - total ))
        echo $(( $(cat "$STATE" 2>/dev/null || echo 0) + got )) > "$STATE"
        if (( $(free_pages) < want )); then
            echo "error: hugepage pool: wanted $want free 2 MiB pages, the kernel gave $(free_pages) (memory fragmented or too small)" >&2
            exit 1
        fi
    fi
    ;;
release)
    added=$(cat "$STATE" 2>/dev/null || echo 0)
    if (( added > 0 )); then
        total=$(cat "$POOL")
        echo $(( total > added ? total - added : 0 )) > "$POOL"
    fi
    rm -f "$STATE"
    ;;
*)
    echo "usage: $0 reserve N | release" >&2
    exit 2
    ;;
esac
