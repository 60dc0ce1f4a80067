#!/usr/bin/env bash
# Static validation of the observability stack (no Docker engine, no Grafana needed):
#   - Grafana dashboards: structural lint (scripts/validate_dashboards.py)
#   - Grafana provisioning files: parse, point at the paths compose.yaml mounts
#   - compose.yaml: the Compose Specification JSON schema (scripts/schemas/compose-spec.json,
#     or $COMPOSE_SPEC_SCHEMA) with check-jsonschema (scripts/stack-requirements.txt,
#     installed into the scripts' virtualenv .venv-test/), and `docker-compose config -q`
#     (Debian's docker-compose, installed with apt-get when missing; needs no Docker engine);
#     the image built by one service only, a healthcheck on flowmetrics (`flowmetrics
#     probe`), every depends_on waiting for a healthy service
#   - Dockerfile / .dockerignore: builds both release binaries, keeps the workspace in
#     the build context, pins images, runs as non-root, has CA certificates
# Prints PASS/FAIL lines; exits 1 on any FAIL.
set -uo pipefail
cd "$(dirname "$0")/.."
failed=0
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failed=1; }

python3 scripts/validate_dashboards.py || failed=1

# ---- provisioning
python3 - <<'PY' || failed=1
import re
def read(p):
    return open(p).read()
ok = True
ds = read("grafana/provisioning/datasources/prometheus.yaml")
db = read("grafana/provisioning/dashboards/flowmetrics.yaml")
compose = read("compose.yaml")
m = re.search(r"path: (\S+)", db)
provider_path = m.group(1) if m else "<none>"
checks = [
    ("provisioning: datasource is a Prometheus at http://prometheus:9090, default",
     "type: prometheus" in ds and "url: http://prometheus:9090" in ds and "isDefault: true" in ds),
    ("provisioning: dashboards provider path is where compose.yaml mounts grafana/dashboards",
     f"./grafana/dashboards:{provider_path}:ro" in compose),
    ("provisioning: Grafana home dashboard file is mounted",
     "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH: /etc/grafana/dashboards/flowmetrics.json" in compose),
]
for name, good in checks:
    print(("PASS " if good else "FAIL ") + name)
    ok &= good
raise SystemExit(0 if ok else 1)
PY

# ---- compose.yaml
schema=${COMPOSE_SPEC_SCHEMA:-scripts/schemas/compose-spec.json}
# shellcheck source=scripts/venv.sh
. scripts/venv.sh
if [ ! -f "$schema" ]; then
  fail "no Compose Specification schema at $schema"
elif ! ensure_venv scripts/stack-requirements.txt; then
  fail "check-jsonschema unavailable: compose.yaml not validated against the schema"
elif out=$(check-jsonschema --schemafile "$schema" compose.yaml 2>&1); then
  pass "compose.yaml valid against the Compose Specification schema ($schema)"
else
  echo "$out"; fail "compose.yaml against the Compose Specification schema"
fi
if ! command -v docker-compose >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "validate-stack: installing docker-compose (Debian package)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose; } >/dev/null 2>&1
fi
if ! command -v docker-compose >/dev/null; then
  fail "docker-compose unavailable (apt-get install docker-compose): compose.yaml not checked"
elif out=$(docker-compose -f compose.yaml config -q 2>&1); then
  pass "docker-compose config -q"
else
  echo "$out"; fail "docker-compose config -q"
fi
unpinned=$(grep -E '^\s+image:' compose.yaml | grep -v 'flowmetrics:local' | grep -Ev ':[vV]?[0-9]+\.[0-9]+\.[0-9]+' || true)
if [ -z "$unpinned" ]; then pass "compose.yaml: third-party images pinned to x.y.z versions"
else fail "compose.yaml: unpinned images: $unpinned"; fi
for want in "FLOWMETRICS_LISTEN__OTLP_HTTP: 0.0.0.0:4318" "FLOWMETRICS_LISTEN__OTLP_GRPC: 0.0.0.0:4317" \
  "FLOWMETRICS_LISTEN__METRICS: 0.0.0.0:9464" "--enable-feature=exemplar-storage" \
  "./prometheus:/etc/prometheus:ro" "GF_AUTH_ANONYMOUS_ENABLED" "- flowmetrics-demo"; do
  grep -qF -- "$want" compose.yaml || fail "compose.yaml lacks: $want"
done
builds=$(grep -cE '^\s+build:' compose.yaml)
[ "$builds" -eq 1 ] && pass "compose.yaml: the image is built once (one build:, the others use image: flowmetrics:local)" ||
  fail "compose.yaml: $builds services build the image (one should, the others use its image:)"
grep -qF '"flowmetrics", "probe"' compose.yaml && pass "compose.yaml: flowmetrics healthcheck with flowmetrics probe" ||
  fail "compose.yaml: no healthcheck running flowmetrics probe"
# ruamel.yaml comes with check-jsonschema (in the virtualenv).
plain_depends=$(python3 - <<'PY' || echo "(compose.yaml could not be read)"
from ruamel.yaml import YAML
services = YAML(typ="safe").load(open("compose.yaml"))["services"]
for name, svc in services.items():
    deps = svc.get("depends_on", {})
    if isinstance(deps, list) or any(d.get("condition") != "service_healthy" for d in deps.values()):
        print(name)
    for dep in deps:
        if "healthcheck" not in services[dep]:
            print(f"{name}->{dep} (no healthcheck)")
PY
)
[ -z "$plain_depends" ] && pass "compose.yaml: every depends_on waits for a healthy service" ||
  fail "compose.yaml: depends_on without condition: service_healthy: $plain_depends"
grep -q 'flowmetrics:9464' prometheus/prometheus.yml && pass "prometheus.yml scrapes the compose service flowmetrics:9464" ||
  fail "prometheus.yml does not scrape flowmetrics:9464"

# ---- Dockerfile
if grep -qE 'cargo build --release .*-p flowmetrics -p flowmetrics-demo' Dockerfile &&
  grep -qE '^USER [0-9]' Dockerfile && grep -qE '^FROM rust:\$\{RUST_VERSION\}' Dockerfile &&
  grep -qE '^ARG RUST_VERSION=[0-9]+\.[0-9]+' Dockerfile; then
  pass "Dockerfile: release build of flowmetrics and flowmetrics-demo, pinned toolchain, non-root user"
else fail "Dockerfile: expected a release build of both binaries, a pinned rust image and a non-root USER"; fi
grep -qE 'apt-get install .*ca-certificates' Dockerfile && pass "Dockerfile: runtime image has CA certificates (rediss:// with the system's roots)" ||
  fail "Dockerfile: runtime image lacks ca-certificates"
members=$(python3 -c 'import re;t=open("Cargo.toml").read();m=re.search(r"members\s*=\s*\[([^\]]*)\]",t);print(" ".join(x.strip(" \"") for x in m.group(1).split(",") if x.strip()) if m else "")')
bad=""
for path in Cargo.toml Cargo.lock src $members; do
  [ "$path" = "." ] && continue
  grep -qxE "/?$path/?" .dockerignore && bad="$bad $path"
done
if [ -z "$bad" ]; then pass ".dockerignore keeps the workspace (Cargo.toml, Cargo.lock, src, members: ${members:-none})"
else fail ".dockerignore excludes workspace paths:$bad"; fi

exit $failed
