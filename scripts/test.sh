#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests that start flowmetrics on
# loopback and talk OTLP/HTTP, OTLP/gRPC and real OpenTelemetry SDK exporters to it.
# Installs the one test prerequisite it needs (the OpenMetrics reference parser, from
# PyPI) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import prometheus_client.openmetrics.parser' 2>/dev/null; then
  echo "test.sh: installing prometheus-client (OpenMetrics reference parser) from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check prometheus-client
fi

cargo test --workspace --all-targets "$@"
