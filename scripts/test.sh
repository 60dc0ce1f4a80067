#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests that start flowmetrics on
# loopback and talk OTLP/HTTP, OTLP/gRPC and real OpenTelemetry SDK exporters to it.
#
# Its one Python prerequisite (the OpenMetrics reference parser, scripts/test-requirements.txt)
# goes into a virtualenv this script owns, .venv-test/ (or $TEST_VENV), never
# into the system Python. Runs every suite (--no-fail-fast) and ends with one line,
# "N passed, N failed, N skipped", over all of them. A test whose prerequisite is missing
# (redis-server, openssl: scripts/redis-test.sh installs them) returns early, which
# libtest counts as passed; it also writes its name to $SKIPPED_TESTS_FILE
# (tests/common/mod.rs, `skip`), and is counted here as skipped instead. Extra
# arguments go to `cargo test`.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/venv.sh
. scripts/venv.sh
# Tests run `python3`: ensure_venv puts the virtualenv's first on PATH.
ensure_venv scripts/test-requirements.txt || { echo "0 passed, 1 failed, 0 skipped"; exit 1; }

log=$(mktemp)
SKIPPED_TESTS_FILE=$(mktemp)
export SKIPPED_TESTS_FILE
trap 'rm -f "$log" "$SKIPPED_TESTS_FILE"' EXIT
cargo test --workspace --all-targets --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# One "test result: ok. 12 passed; 0 failed; ..." line per suite.
read -r passed failed < <(awk '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i) ~ /^passed;?$/) p += $(i-1)
      if ($(i) ~ /^failed;?$/) f += $(i-1)
    }
  }
  END { print p + 0, f + 0 }' "$log")
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
  echo "test.sh: cargo test failed (exit $status) without a failing test: a build error?"
  failed=1
fi
# Each skipped test once (it may have found several tools missing).
skipped=$(sort -u "$SKIPPED_TESTS_FILE" | grep -c .)
if [ "$skipped" -gt 0 ]; then
  echo "skipped (a prerequisite is missing):"
  sort -u "$SKIPPED_TESTS_FILE" | sed 's/^/  /'
fi
passed=$((passed - skipped))
echo "$passed passed, $failed failed, $skipped skipped"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
