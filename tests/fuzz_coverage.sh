#!/usr/bin/env bash
# Runs one bolero target coverage-guided, under libFuzzer (README, "Fuzzing").
#
#   tests/fuzz_coverage.sh PACKAGE TEST_FILE TEST_FN SECONDS [SANITIZER]
#   tests/fuzz_coverage.sh edgeproxy-dns fuzz_dns any_datagram_gets_a_well_formed_answer_or_none 600
#
# Why not `cargo bolero test`: it builds every test target of the package
# with the coverage flags, and the targets that do not use bolero (most of
# them) then fail to link (`undefined symbol: __sanitizer_cov_trace_cmp8`).
# This builds the one file with the flags cargo-bolero 0.13 uses and runs
# its test the way cargo-bolero does. SANITIZER: none (default; builds in
# minutes) or address (AddressSanitizer, the flag cargo-bolero adds; not
# run through this script yet, and over 20 minutes to build on 2 cores).
# Needs a nightly toolchain (`rustup toolchain install nightly`). The corpus
# and any crash are kept in $FUZZ_WORK (default /var/tmp/edgeproxy-fuzz).
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,15p' "$0"
    exit 2
fi
package=$1 file=$2 test=$3 seconds=$4 sanitizer=${5:-none}
cd "$(dirname "$0")/.."

flags="--cfg fuzzing -Cpasses=sancov-module --cfg fuzzing_libfuzzer"
for arg in inline-8bit-counters level=4 pc-table trace-compares stack-depth; do
    flags="$flags -Cllvm-args=-sanitizer-coverage-$arg"
done
case $sanitizer in
none) ;;
address) flags="$flags -Zsanitizer=address" ;;
*)
    echo "unknown sanitizer $sanitizer (none or address)" >&2
    exit 2
    ;;
esac
# An explicit target, as cargo-bolero passes: build scripts and proc macros
# then build without the coverage flags and sanitizer.
host=$(rustc +nightly -vV | sed -n 's/^host: //p')
target_dir=${CARGO_TARGET_DIR:-/var/tmp/edgeproxy-target}/fuzz-$sanitizer
work=${FUZZ_WORK:-/var/tmp/edgeproxy-fuzz}/$test
mkdir -p "$work/corpus" "$work/crashes"

# One build: its messages go to the terminal, its artifacts (JSON) to the
# filter that finds the test executable.
exe=$(RUSTFLAGS="$flags" RUSTDOCFLAGS="$flags" BOLERO_FUZZER=libfuzzer \
    cargo +nightly test --target "$host" --profile fuzz \
    -p "$package" --test "$file" --target-dir "$target_dir" --no-run \
    --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
[ -n "$exe" ] || { echo "no test executable built for $file" >&2; exit 1; }

echo "fuzzing $test ($exe) for ${seconds}s; corpus and crashes in $work"
BOLERO_TEST_NAME=$test BOLERO_LIBTEST_HARNESS=1 \
    BOLERO_LIBFUZZER_ARGS="$work/corpus $work/crashes -artifact_prefix=$work/crashes/ -timeout=10 -max_total_time=$seconds" \
    "$exe" "$test" --exact --nocapture --quiet --test-threads 1
