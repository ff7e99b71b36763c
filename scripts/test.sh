#!/usr/bin/env bash
# The one test command: installs what is missing, then runs every test tier.
#   unit + in-process (libblkio frontend, crafted chains) -> multi-process (daemon + CLI,
#   peers in network namespaces) -> real QEMU guest running fio --verify -> fuzz targets, time-boxed.
# Needs root (hugepages, network namespaces, QEMU). Longer suites: HCBLK_SOAK=1 (see README).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

# Hugepages for our own buffers (bounce buffers, ram backings); given back on exit.
scripts/hugepages.sh reserve "${HCBLK_TEST_HUGEPAGES:-192}"
trap 'scripts/hugepages.sh release' EXIT

# HCBLK_SOAK=1: the longer suites (more kills, hot-plug cycles, seeds and fuzzing), for
# nightly runs; the default keeps the whole run under half an hour on 2 cores.
if [[ ${HCBLK_SOAK:-0} != 0 ]]; then soak=1; else soak=0; fi
FUZZ_SECONDS=${HCBLK_FUZZ_SECONDS:-$(( soak ? 600 : 30 ))}
# The simulator's seeds (one full run each: thousands of crashes, partitions, owner moves)
# and the wall-clock cap on them; a failing seed replays with `hcblk-sim --seed N --verbose`.
SIM_SEEDS=${HCBLK_SIM_SEEDS:-$(( soak ? 200000 : 5000 ))}
SIM_SECONDS=${HCBLK_SIM_SECONDS:-$(( soak ? 7200 : 300 ))}
TEST_SECONDS=${HCBLK_TEST_SECONDS:-$(( soak ? 7200 : 2700 ))}

echo "== build"
cargo build --workspace --all-targets --locked

echo "== lints (undocumented unsafe is an error) and formatting (rustfmt.toml)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
for manifest in Cargo.toml backend/fuzz/Cargo.toml proto/fuzz/Cargo.toml; do
    cargo fmt --all --check --manifest-path "$manifest" \
        || { echo "error: $manifest: not formatted; run cargo fmt --all --manifest-path $manifest" >&2; exit 1; }
done
echo "   (${SECONDS}s since the start)"

echo "== tests: unit, in-process, multi-process, QEMU guest (at most ${TEST_SECONDS}s)"
LOG=$(mktemp /tmp/hcblk-test.XXXXXX.log)
# A hung test fails the run with the harness's "running for over 60 seconds" lines in the
# log, instead of eating the whole CI budget. timeout signals cargo's whole process group.
if ! timeout -k 30 "$TEST_SECONDS" cargo test --workspace --locked -- --test-threads="${HCBLK_TEST_THREADS:-2}" 2>&1 | tee "$LOG"; then
    echo "== tests failed or did not finish within ${TEST_SECONDS}s (HCBLK_TEST_SECONDS)" >&2
    exit 1
fi
echo "   (${SECONDS}s since the start)"

echo "== deterministic simulation of replication: ${SIM_SEEDS} seeds, at most ${SIM_SECONDS}s"
cargo run --release --locked -p hcblk-replication --features sim --bin hcblk-sim -- \
    --seeds "$SIM_SEEDS" --time-box "$SIM_SECONDS"
echo "   (${SECONDS}s since the start)"

echo "== fuzz targets, ${FUZZ_SECONDS}s each"
for dir in backend/fuzz proto/fuzz; do
    [[ -d $dir ]] || continue
    for target in $(cd "$dir" && RUSTC_BOOTSTRAP=1 cargo fuzz list); do
        echo "-- fuzz $dir $target"
        corpus=()
        if [[ -d $dir/seeds ]]; then
            mkdir -p "$dir/corpus/$target"
            corpus=("corpus/$target" seeds)
        fi
        (cd "$dir" && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" "${corpus[@]}" -- \
            -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 2>&1 | tail -n 5)
    done
done
passed=$(awk '/^test result:/ {sum += $4} END {print sum + 0}' "$LOG")
failed=$(awk '/^test result:/ {sum += $6} END {print sum + 0}' "$LOG")
rm -f "$LOG"
echo "== all tests passed, and every fuzz target ran ${FUZZ_SECONDS}s without a crash"
echo "${passed} passed, ${failed} failed"
