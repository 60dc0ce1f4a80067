#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer) for SECONDS each (default 60),
# starting from its committed seed corpus; new inputs go to a scratch directory, so the
# committed corpus stays as it is. A crash fails the script and leaves its input in
# fuzz/artifacts/<target>/. Installs cargo-fuzz when missing.
#
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address, -Cpasses=sancov-module);
# RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
export RUSTC_BOOTSTRAP=1 CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cargo fuzz build
for target in $(cargo fuzz list); do
  echo "== fuzz $target for ${seconds}s"
  mkdir -p "$scratch/$target"
  cargo fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
