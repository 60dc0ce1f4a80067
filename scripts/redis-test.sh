#!/usr/bin/env bash
# The shared-store suites against a real redis-server: the store's rules
# (tests/redis_store.rs), its overdue counts (tests/redis_objectives.rs) and its flow
# steps (tests/redis_steps.rs), three replicas on one Redis fed raw OTLP, with faults (a
# replica stopped, Redis stopped and restarted, Redis out of memory refusing writes)
# (tests/redis_replicas.rs) and with flow steps (tests/redis_replicas_steps.rs), three
# replicas fed by the OpenTelemetry Rust SDK's exporters
# (tests/redis_sdk.rs), and TLS with a CA of the test's own (tests/redis_tls.rs,
# certificates made with openssl). The tests start and stop their own servers
# (tests/common/redis.rs: a free loopback port, a temporary directory, no persistence
# unless the test needs it). Installs Debian's redis-server and openssl when missing;
# with them required, a missing one fails the suites instead of skipping them. Extra
# arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null || ! command -v openssl >/dev/null; then
  echo "redis-test.sh: installing redis-server and openssl"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq redis-server openssl >/dev/null
fi
redis-server --version
REQUIRE_REDIS_TESTS=1 cargo test --test redis_objectives --test redis_store --test redis_steps --test redis_replicas --test redis_replicas_steps --test redis_sdk --test redis_tls "$@"
