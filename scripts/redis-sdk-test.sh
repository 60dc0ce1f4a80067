#!/usr/bin/env bash
# The OpenTelemetry Python SDK against three flowmetrics replicas that share one Redis,
# all on loopback: starts a redis-server on a free port and three replicas of the release
# binary with `correlation.store: redis`, then runs scripts/sdk_replicas.py, which feeds
# them through the official OTLP exporters (HTTP/protobuf and gRPC), each flow's start to
# one replica and its end to another, its steps to the third, ends often first, and checks
# the counters summed over the three /metrics (exact, for every outcome and step family).
#
# Installs Debian's redis-server when it is missing, and the Python packages
# (scripts/sdk-requirements.txt) into the scripts' virtualenv (.venv-test/, scripts/venv.sh).
# Stops everything it started on exit. Ends with "sdk-replicas: N passed, N failed".
# Env: REDIS_SDK_BIN uses a prebuilt flowmetrics (no cargo build);
#      REDIS_SDK_KEEP=1 keeps the temporary directory (config, logs).
set -uo pipefail
cd "$(dirname "$0")/.."

FLOW_TIMEOUT=6  # seconds: the flows' timeout (start-only instances time out after it)
TMP=$(mktemp -d "${TMPDIR:-/tmp}/flowmetrics-redis-sdk.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  if [ "$rc" != 0 ]; then
    for log in "$TMP"/*.log; do
      [ -s "$log" ] && { echo "---- last lines of $(basename "$log")"; tail -n 15 "$log"; }
    done
  fi
  if [ -n "${REDIS_SDK_KEEP:-}" ]; then echo "redis-sdk-test: kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
die() {
  echo "redis-sdk-test: $*" >&2
  echo "sdk-replicas: 0 passed, 1 failed"
  exit 1
}

if ! command -v redis-server >/dev/null; then
  echo "redis-sdk-test: installing redis-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq redis-server >/dev/null || die "could not install redis-server"
fi
redis-server --version
command -v curl >/dev/null || die "curl is required"

# shellcheck source=scripts/venv.sh
. scripts/venv.sh
ensure_venv scripts/sdk-requirements.txt || die "could not set up the Python SDK packages"

if [ -n "${REDIS_SDK_BIN:-}" ]; then
  FM=$REDIS_SDK_BIN
else
  # The release binary: the one scripts/e2e.sh builds and runs too.
  echo "building the release binary (cargo build --release --bin flowmetrics)"
  cargo build --release --quiet --bin flowmetrics || die "cargo build of flowmetrics failed"
  FM=target/release/flowmetrics
fi
[ -x "$FM" ] || die "flowmetrics binary missing: $FM"

# Ten distinct free loopback ports: Redis, then OTLP/HTTP, OTLP/gRPC and /metrics of each
# replica (held open together while chosen, so they differ).
read -r -a PORTS < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(10)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
')
[ "${#PORTS[@]}" = 10 ] || die "could not pick free ports"
REDIS_PORT=${PORTS[0]}

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$TMP" >"$TMP/redis.log" 2>&1 &
PIDS+=($!)
for ((i = 0; i < 50; i++)); do
  [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && break
  sleep 0.2
done
[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] || die "redis-server did not answer"

# The replicas' configuration is this script's alone: none from the caller's environment
# (where an unknown FLOWMETRICS_ key is a config error).
while read -r v; do unset "$v"; done < <(compgen -e | grep '^FLOWMETRICS_')
# What the replicas share; each one's listeners come from FLOWMETRICS_* variables.
cat >"$TMP/flowmetrics.yaml" <<EOF
correlation:
  store: redis
  redis: { url: "redis://127.0.0.1:$REDIS_PORT/0" }
flows:
  default: { timeout: ${FLOW_TIMEOUT}s }
  # Declared steps for one flow; checkout.payment uses the same names undeclared.
  per_flow:
    checkout: { steps: [cart, paid, packed] }
EOF
HTTP=() GRPC=() METRICS=()
for r in 0 1 2; do
  HTTP+=("127.0.0.1:${PORTS[1 + 3 * r]}")
  GRPC+=("127.0.0.1:${PORTS[2 + 3 * r]}")
  METRICS+=("127.0.0.1:${PORTS[3 + 3 * r]}")
  FLOWMETRICS_LISTEN__OTLP_HTTP=${HTTP[r]} FLOWMETRICS_LISTEN__OTLP_GRPC=${GRPC[r]} \
    FLOWMETRICS_LISTEN__METRICS=${METRICS[r]} \
    "$FM" --config "$TMP/flowmetrics.yaml" >"$TMP/replica-$r.log" 2>&1 &
  PIDS+=($!)
done
for r in 0 1 2; do
  for ((i = 0; i < 100; i++)); do
    curl -fsS -o /dev/null "http://${METRICS[r]}/readyz" 2>/dev/null && break
    sleep 0.2
  done
  curl -fsS -o /dev/null "http://${METRICS[r]}/readyz" || die "replica $r never ready"
done
echo "redis-sdk-test: redis-server on 127.0.0.1:$REDIS_PORT, replicas ${METRICS[*]} (/metrics)"

python3 scripts/sdk_replicas.py --timeout "$FLOW_TIMEOUT" \
  --otlp-http "${HTTP[@]}" --otlp-grpc "${GRPC[@]}" --metrics "${METRICS[@]}"
