#!/usr/bin/env bash
# End-to-end test of the observability stack, all on loopback:
#   flowmetrics  +  flowmetrics-demo traffic (OTLP/HTTP and OTLP/gRPC)  +  a real Prometheus
#   running prometheus/prometheus.yml (targets rewritten for loopback, 2s scrapes) and
#   prometheus/rules/*.yml.
# Checks:
#   (1) every PromQL expression of every dashboard panel and variable, and of every rule,
#       runs through Prometheus' HTTP API with template variables substituted, and returns
#       series (alert expressions: evaluate without error; they only return series while firing);
#       the objective rules too: every flow gets an objective below (refund its own);
#   (2) the flow counters (and the network counters of the --network-flows generator)
#       Prometheus stored equal what the generators report they sent;
#   (3) promtool check config / check rules / test rules / check metrics (on the 0.0.4
#       text flowmetrics serves to a scraper that asks for it);
#   plus exemplars stored, native histograms stored (flow "payment" runs with
#   histogram: both; a second Prometheus with --enable-feature=native-histograms scrapes
#   the protobuf format: Prometheus 2.42 keeps either the classic or the native buckets
#   of a family, so the classic panels are checked on the first, the native panel on
#   the second), the dashboards' structural lint and the compose file's validation
#   (scripts/validate-stack.sh).
# Installs Debian's prometheus package if missing and builds the release binaries.
# Env: E2E_FLOWMETRICS_BIN / E2E_DEMO_BIN use prebuilt binaries (no cargo build);
#      E2E_PORT_BASE (default 29400) picks the loopback ports; E2E_KEEP=1 keeps the temp dir.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PASSED=0
FAILED=0
pass() { echo "PASS $*"; PASSED=$((PASSED + 1)); }
fail() { echo "FAIL $*"; FAILED=$((FAILED + 1)); }
die() {
  echo "e2e: FATAL: $*" >&2
  fail "$*"
  exit 1
}
# Runs a checker that prints PASS/FAIL lines and adds them to the totals.
tally() {
  local out rc
  out=$("$@" 2>&1)
  rc=$?
  printf '%s\n' "$out"
  PASSED=$((PASSED + $(grep -c '^PASS' <<<"$out")))
  FAILED=$((FAILED + $(grep -c '^FAIL' <<<"$out")))
  if [ "$rc" != 0 ] && ! grep -q '^FAIL' <<<"$out"; then fail "$* exited $rc"; fi
}
step() { echo; echo "== $*"; }

BASE=${E2E_PORT_BASE:-29400}
METRICS_PORT=$((BASE + 64))   # flowmetrics /metrics
OTLP_HTTP_PORT=$((BASE + 18))
OTLP_GRPC_PORT=$((BASE + 17))
PROM_PORT=$((BASE + 90))
PROM="http://127.0.0.1:$PROM_PORT"
PROM_NATIVE_PORT=$((BASE + 91))
PROM_NATIVE="http://127.0.0.1:$PROM_NATIVE_PORT"
FLOW_TIMEOUT=20s
DEMO_DURATION=30s

TMP=$(mktemp -d "${TMPDIR:-/tmp}/flowmetrics-e2e.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
  if [ "$FAILED" != 0 ] || [ "$rc" != 0 ]; then
    for log in "$TMP"/*.log; do
      [ -s "$log" ] && { echo "---- last lines of $(basename "$log")"; tail -n 15 "$log"; }
    done
  fi
  if [ -n "${E2E_KEEP:-}" ]; then echo "e2e: kept $TMP"; else rm -rf "$TMP"; fi
  echo
  echo "e2e: $PASSED passed, $FAILED failed"
  if [ "$FAILED" != 0 ] && [ "$rc" = 0 ]; then exit 1; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # url seconds
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- prerequisites
step "prerequisites"
scripts/install-prometheus.sh || die "could not install Debian's prometheus package"
echo "$(prometheus --version 2>&1 | head -1)"
command -v curl >/dev/null || die "curl is required"

if [ -n "${E2E_FLOWMETRICS_BIN:-}" ] || [ -n "${E2E_DEMO_BIN:-}" ]; then
  FM=${E2E_FLOWMETRICS_BIN:-target/release/flowmetrics}
  DEMO=${E2E_DEMO_BIN:-target/release/flowmetrics-demo}
else
  echo "building release binaries (cargo build --release --bin flowmetrics -p flowmetrics-demo)"
  cargo build --release --quiet --bin flowmetrics || die "cargo build of flowmetrics failed"
  cargo build --release --quiet -p flowmetrics-demo || die "cargo build of flowmetrics-demo (demo/) failed"
  FM=target/release/flowmetrics
  DEMO=target/release/flowmetrics-demo
fi
[ -x "$FM" ] || die "flowmetrics binary missing: $FM"
[ -x "$DEMO" ] || die "traffic generator missing: $DEMO (workspace member demo/, binary flowmetrics-demo)"
"$DEMO" --help 2>&1 | grep -q -- '--summary' ||
  die "$DEMO does not look like flowmetrics-demo (no --summary option in --help)"

for p in $METRICS_PORT $OTLP_HTTP_PORT $OTLP_GRPC_PORT $PROM_PORT; do
  port_free "$p" || die "port 127.0.0.1:$p is in use (set E2E_PORT_BASE)"
done

# ---------------------------------------------------------------- static checks (3)
step "promtool and stack validation"
if promtool check config prometheus/prometheus.yml >"$TMP/promtool.out" 2>&1; then
  pass "promtool check config prometheus/prometheus.yml"
else cat "$TMP/promtool.out"; fail "promtool check config prometheus/prometheus.yml"; fi
if promtool check rules prometheus/rules/*.yml >"$TMP/promtool.out" 2>&1; then
  pass "promtool check rules prometheus/rules/*.yml ($(grep -ho '[0-9]* rules found' "$TMP/promtool.out" | awk '{s+=$1} END {print s}') rules)"
else cat "$TMP/promtool.out"; fail "promtool check rules prometheus/rules/*.yml"; fi
if promtool test rules prometheus/tests/*.yml >"$TMP/promtool.out" 2>&1; then
  pass "promtool test rules prometheus/tests/*.yml ($(cat prometheus/tests/*.yml | grep -c '^- name: ') test groups)"
else cat "$TMP/promtool.out"; fail "promtool test rules prometheus/tests/*.yml"; fi
# Every recording rule and alert is exercised by a unit test.
untested=""
for r in $(sed -nE 's/^ *- (record|alert): *([^ ]+).*/\2/p' prometheus/rules/*.yml); do
  grep -qE "(alertname: $r\$|expr: .*\b$r\b)" prometheus/tests/*.yml || untested="$untested $r"
done
if [ -z "$untested" ]; then pass "every recording rule and alert has a promtool unit test"
else fail "rules without a unit test:$untested"; fi
tally scripts/validate-stack.sh

# ---------------------------------------------------------------- start the stack
step "start flowmetrics, Prometheus and the traffic generator on loopback"
FLOWMETRICS_LISTEN__METRICS=127.0.0.1:$METRICS_PORT \
  FLOWMETRICS_LISTEN__OTLP_HTTP=127.0.0.1:$OTLP_HTTP_PORT \
  FLOWMETRICS_LISTEN__OTLP_GRPC=127.0.0.1:$OTLP_GRPC_PORT \
  FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT=$FLOW_TIMEOUT \
  FLOWMETRICS_FLOWS__PER_FLOW__PAYMENT__HISTOGRAM=both \
  FLOWMETRICS_FLOWS__DEFAULT__OBJECTIVE__TARGET=0.95 \
  FLOWMETRICS_FLOWS__DEFAULT__OBJECTIVE__WITHIN=2s \
  FLOWMETRICS_FLOWS__PER_FLOW__REFUND__OBJECTIVE__TARGET=0.9 \
  FLOWMETRICS_LOG__LEVEL=warn \
  "$FM" >"$TMP/flowmetrics.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$METRICS_PORT/readyz" 20 || die "flowmetrics not ready on 127.0.0.1:$METRICS_PORT"
pass "flowmetrics ready (flow timeout $FLOW_TIMEOUT)"

# The repo's Prometheus config, targets rewritten for loopback, 2s scrapes and rule evaluations.
mkdir -p "$TMP/prometheus" "$TMP/data"
cp -r prometheus/rules "$TMP/prometheus/"
# The 28-day budget group runs every 5m: here every 2s, so that it has data in time.
sed -i 's/^    interval: 5m$/    interval: 2s/' "$TMP/prometheus/rules/flowmetrics-objectives-recording.yml"
grep -q '^    interval: 2s$' "$TMP/prometheus/rules/flowmetrics-objectives-recording.yml" \
  || die "rewriting the objective rules' budget interval failed"
sed -e "s/flowmetrics:9464/127.0.0.1:$METRICS_PORT/" \
  -e "s/localhost:9090/127.0.0.1:$PROM_PORT/" \
  -e 's/^\(  scrape_interval:\) 15s/\1 2s/' \
  -e 's/^\(  evaluation_interval:\) 15s/\1 2s/' \
  -e 's/^\(  scrape_timeout:\) 10s/\1 2s/' \
  prometheus/prometheus.yml >"$TMP/prometheus/prometheus.yml"
for want in "127.0.0.1:$METRICS_PORT" "127.0.0.1:$PROM_PORT" "scrape_interval: 2s" "evaluation_interval: 2s"; do
  grep -q "$want" "$TMP/prometheus/prometheus.yml" || die "rewriting prometheus.yml for loopback failed ($want)"
done
promtool check config "$TMP/prometheus/prometheus.yml" >/dev/null 2>&1 || die "rewritten prometheus.yml invalid"
prometheus --config.file="$TMP/prometheus/prometheus.yml" \
  --storage.tsdb.path="$TMP/data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" \
  --enable-feature=exemplar-storage \
  --log.level=warn >"$TMP/prometheus.log" 2>&1 &
PIDS+=($!)
wait_http "$PROM/-/ready" 30 || die "Prometheus not ready on $PROM"
pass "Prometheus ready ($PROM, exemplar storage on)"
# The same job from a Prometheus that scrapes native histograms (protobuf first).
mkdir -p "$TMP/prometheus-native" "$TMP/data-native"
printf '%s\n' "global: { scrape_interval: 2s, scrape_timeout: 2s }" "scrape_configs:" \
  "  - job_name: flowmetrics" \
  "    static_configs: [{ targets: [\"127.0.0.1:$METRICS_PORT\"] }]" \
  >"$TMP/prometheus-native/prometheus.yml"
prometheus --config.file="$TMP/prometheus-native/prometheus.yml" \
  --storage.tsdb.path="$TMP/data-native" \
  --web.listen-address="127.0.0.1:$PROM_NATIVE_PORT" \
  --enable-feature=native-histograms \
  --log.level=warn >"$TMP/prometheus-native.log" 2>&1 &
PIDS+=($!)
wait_http "$PROM_NATIVE/-/ready" 30 || die "Prometheus (native histograms) not ready on $PROM_NATIVE"
pass "Prometheus with native histograms ready ($PROM_NATIVE)"

# Two generators at once: OTLP/HTTP and OTLP/gRPC, each writing what it sent.
"$DEMO" --endpoint "http://127.0.0.1:$OTLP_HTTP_PORT" --protocol http --rate 15 \
  --duration "$DEMO_DURATION" --seed 42 --max-latency 5s --summary "$TMP/sent-http.json" \
  >"$TMP/demo-http.log" 2>&1 &
DEMO_HTTP=$!
PIDS+=($DEMO_HTTP)
sleep 0.2
"$DEMO" --endpoint "http://127.0.0.1:$OTLP_GRPC_PORT" --protocol grpc --rate 5 \
  --duration "$DEMO_DURATION" --seed 43 --max-latency 5s --summary "$TMP/sent-grpc.json" \
  >"$TMP/demo-grpc.log" 2>&1 &
DEMO_GRPC=$!
PIDS+=($DEMO_GRPC)
# Flow Spans (network dashboard and rules), over gRPC: the selective scanner's path.
"$DEMO" --network-flows --endpoint "http://127.0.0.1:$OTLP_GRPC_PORT" --protocol grpc --rate 10 \
  --duration "$DEMO_DURATION" --seed 44 --summary "$TMP/sent-network.json" \
  >"$TMP/demo-network.log" 2>&1 &
DEMO_NETWORK=$!
PIDS+=($DEMO_NETWORK)

# Edge cases the generator does not make: duplicates, unmatched ends, negative durations,
# rejected events (flow "e2e_probe", kept out of the counter comparison).
tally python3 scripts/e2e_check.py probe --otlp "http://127.0.0.1:$OTLP_HTTP_PORT"

# ---------------------------------------------------------------- (1) queries
step "wait for scrapes, then run every dashboard and rule query (\$__rate_interval=1m)"
sleep 25
targets=$(curl -fsS "$PROM/api/v1/targets" 2>/dev/null)
if python3 -c 'import json,sys; t=json.load(sys.stdin)["data"]["activeTargets"]; sys.exit(not t or any(x["health"]!="up" for x in t))' <<<"$targets"; then
  pass "Prometheus scrapes flowmetrics and itself (all targets up)"
else fail "Prometheus targets not all up: $targets"; fi
# Dashboards once the flow timeout has passed for the probe's unmatched end.
tally python3 scripts/e2e_check.py queries --prom "$PROM" --native-prom "$PROM_NATIVE" \
  --dashboards grafana/dashboards --rate-interval 1m
tally python3 scripts/e2e_check.py rules --prom "$PROM"

# ---------------------------------------------------------------- (2) counters
step "wait for the generators to finish, then compare counters with what they sent"
for pid in $DEMO_HTTP $DEMO_GRPC $DEMO_NETWORK; do
  if wait "$pid"; then pass "flowmetrics-demo (pid $pid) exited 0"; else fail "flowmetrics-demo (pid $pid) failed (see its log)"; fi
done
for f in "$TMP/sent-http.json" "$TMP/sent-grpc.json"; do
  [ -s "$f" ] || fail "flowmetrics-demo wrote no summary $f"
  [ -s "$f" ] && echo "     $(basename "$f"): $(cat "$f")"
done
# Never-ended flows turn incomplete after $FLOW_TIMEOUT (+2s); poll until Prometheus agrees.
tally python3 scripts/e2e_check.py counters --prom "$PROM" \
  --summary "$TMP/sent-http.json" --summary "$TMP/sent-grpc.json" --timeout 60
[ -s "$TMP/sent-network.json" ] && echo "     sent-network.json: $(cat "$TMP/sent-network.json")"
tally python3 scripts/e2e_check.py network --prom "$PROM" --summary "$TMP/sent-network.json" --timeout 30
tally python3 scripts/e2e_check.py exemplars --prom "$PROM"
tally python3 scripts/e2e_check.py native --prom "$PROM_NATIVE" --flow payment

# ---------------------------------------------------------------- (3) promtool check metrics
step "promtool check metrics on a scrape of /metrics"
# promtool (Prometheus 2.x) reads the 0.0.4 text format, which flowmetrics serves when asked.
if curl -fsS -H 'Accept: text/plain;version=0.0.4' "http://127.0.0.1:$METRICS_PORT/metrics" \
  -o "$TMP/metrics.txt"; then
  if promtool check metrics <"$TMP/metrics.txt" >"$TMP/promtool.out" 2>&1; then
    pass "promtool check metrics ($(grep -c '^# TYPE' "$TMP/metrics.txt") families)"
  else cat "$TMP/promtool.out"; fail "promtool check metrics"; fi
else fail "scrape http://127.0.0.1:$METRICS_PORT/metrics"; fi
