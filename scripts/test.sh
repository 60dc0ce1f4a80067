#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests that start flowmetrics on
# loopback and talk OTLP/HTTP, OTLP/gRPC and real OpenTelemetry SDK exporters to it.
#
# Its one Python prerequisite (the OpenMetrics reference parser, scripts/test-requirements.txt)
# goes into a virtualenv this script owns, .venv-test/ (or $FLOWMETRICS_TEST_VENV), never
# into the system Python. Runs every suite (--no-fail-fast) and ends with one line,
# "N passed, N failed", over all of them. Extra arguments go to `cargo test`.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${FLOWMETRICS_TEST_VENV:-.venv-test}
requirements=scripts/test-requirements.txt

make_venv() { python3 -m venv "$venv" >/dev/null 2>&1; }
if [ ! -x "$venv/bin/python3" ]; then
  echo "test.sh: creating the test virtualenv $venv"
  rm -rf "$venv"
  if ! make_venv; then
    # Debian ships venv (ensurepip) separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "test.sh: python3 -m venv failed; installing python3-venv (Debian)"
      rm -rf "$venv"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && make_venv
    fi
  fi
  [ -x "$venv/bin/python3" ] || { echo "test.sh: cannot create $venv (python3 -m venv; on Debian: apt-get install python3-venv)"; echo "0 passed, 1 failed"; exit 1; }
fi
stamp=$venv/.requirements
if ! cmp -s "$requirements" "$stamp"; then
  echo "test.sh: installing $requirements into $venv"
  if "$venv/bin/python3" -m pip install --quiet --disable-pip-version-check -r "$requirements"; then
    cp "$requirements" "$stamp"
  else
    echo "test.sh: pip install into $venv failed"; echo "0 passed, 1 failed"; exit 1
  fi
fi
# Tests run `python3`: the virtualenv's.
export PATH="$PWD/$venv/bin:$PATH" VIRTUAL_ENV="$PWD/$venv"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
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
echo "$passed passed, $failed failed"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
