#!/usr/bin/env bash
# The shared correlation store on a Redis Cluster (tests/redis_cluster.rs): each test
# starts three redis-server nodes with cluster mode on free loopback ports (one test with
# TLS, certificates made with openssl), joins them with `redis-cli --cluster create`, and
# stops them at the end. Installs Debian's redis-server, redis-tools and openssl when
# missing; with them required, a missing one fails the suite instead of skipping it. Extra
# arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null ||
  ! command -v openssl >/dev/null; then
  echo "redis-cluster-test.sh: installing redis-server, redis-tools and openssl"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq redis-server redis-tools openssl >/dev/null
fi
redis-server --version
REQUIRE_REDIS_TESTS=1 cargo test --test redis_cluster "$@"
