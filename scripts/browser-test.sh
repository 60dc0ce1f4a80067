#!/usr/bin/env bash
# The overview page in a real browser: starts flowmetrics on loopback test ports, feeds it
# flows over OTLP/HTTP (curl, OTLP/JSON), loads http://…/ in headless Chromium, checks the
# numbers the page rendered (per flow, exactly what was sent), that the page does not
# scroll sideways in a 1400×900 window with a 16-character flow name (asked of the page
# itself over the DevTools protocol, --remote-debugging-pipe), and takes a screenshot.
#
# Installs Debian's chromium when it is missing (needs root and apt). Output (the DOM as
# rendered, the screenshot) goes to $BROWSER_TEST_OUT (default target/browser-test).
# BROWSER_TEST_PROFILE=release tests the release binary (default: debug).
# BROWSER_TEST_DEMO=90s also runs flowmetrics-demo that long before the screenshot (how
# docs/overview.png is made) and checks the page against the demo's --summary as well.
# Prints PASS/FAIL lines and a total; exits non-zero on any FAIL.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BROWSER_TEST_OUT:-target/browser-test}
profile=${BROWSER_TEST_PROFILE:-debug}
mkdir -p "$out"

browser=""
for b in chromium chromium-browser; do command -v "$b" >/dev/null && browser=$b && break; done
if [ -z "$browser" ]; then
  echo "browser-test: installing chromium (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
  browser=chromium
fi
command -v curl >/dev/null || { echo "browser-test: needs curl"; exit 1; }

if [ "$profile" = release ]; then cargo build -q --release -p flowmetrics; else cargo build -q -p flowmetrics; fi
bin=target/$profile/flowmetrics

# Free loopback ports, chosen by the kernel.
read -r p_http p_grpc p_metrics < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

work=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

FLOWMETRICS_LISTEN__OTLP_HTTP=127.0.0.1:$p_http FLOWMETRICS_LISTEN__OTLP_GRPC=127.0.0.1:$p_grpc \
  FLOWMETRICS_LISTEN__METRICS=127.0.0.1:$p_metrics "$bin" 2>"$out/flowmetrics.log" &
pid=$!
base=http://127.0.0.1:$p_metrics
for _ in $(seq 100); do
  curl -fsS "$base/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "$base/readyz" >/dev/null || { cat "$out/flowmetrics.log"; echo "FAIL flowmetrics did not start"; exit 1; }

# ---- what is sent, per flow: started, success, failure, cancelled (the rest stay open)
#   signup          7 started: 4 success, 1 failure, 1 cancelled, 1 open
#   export.csv      5 started: 5 success
#   refund.v2:eu-1  2 started: none ended
#   checkout.express 1 started (a 16-character name): none ended
now=$(date +%s)
n=0
event() { # name id outcome offset_seconds
  n=$((n + 1))
  local ts="$(( now - 30 + $4 ))000000000" attrs
  attrs="{\"key\":\"correlation-id\",\"value\":{\"stringValue\":\"$2\"}}"
  [ -n "$3" ] && attrs="$attrs,{\"key\":\"outcome\",\"value\":{\"stringValue\":\"$3\"}}"
  printf '{"traceId":"%032x","spanId":"%016x","name":"op","startTimeUnixNano":"%s","endTimeUnixNano":"%s","events":[{"timeUnixNano":"%s","name":"%s","attributes":[%s]}]}' \
    "$n" "$n" "$ts" "$ts" "$ts" "$1" "$attrs"
}
send() { # span JSON, comma-separated
  local body="{\"resourceSpans\":[{\"resource\":{\"attributes\":[{\"key\":\"service.name\",\"value\":{\"stringValue\":\"browser-test\"}}]},\"scopeSpans\":[{\"spans\":[$1]}]}]}"
  local answer
  answer=$(curl -fsS -X POST "http://127.0.0.1:$p_http/v1/traces" -H 'Content-Type: application/json' -d "$body")
  echo "$answer"
}
starts="" ends=""
add() { if [ -z "${!1}" ]; then printf -v "$1" '%s' "$2"; else printf -v "$1" '%s,%s' "${!1}" "$2"; fi; }
for i in 1 2 3 4 5 6 7; do add starts "$(event flow.signup.start "c$i" "" 0)"; done
for i in 1 2 3 4 5; do add starts "$(event flow.export.csv.start "p$i" "" 0)"; done
for i in 1 2; do add starts "$(event flow.refund.v2:eu-1.start "r$i" "" 0)"; done
add starts "$(event flow.checkout.express.start "e1" "" 0)"
# A hostile name is refused at ingest (invalid_flow_name) and must not appear anywhere.
add starts "$(event 'flow.<img src=x onerror=alert(1)>.start' "x1" "" 0)"
for i in 1 2 3 4; do add ends "$(event flow.signup.end "c$i" success "$i")"; done
add ends "$(event flow.signup.end c5 failure 2)"
add ends "$(event flow.signup.end c6 cancelled 2)"
for i in 1 2 3 4 5; do add ends "$(event flow.export.csv.end "p$i" ok 0)"; done
send "$starts" | grep -q 'invalid flow name' || { echo "FAIL the hostile start was not refused"; exit 1; }
send "$ends" >/dev/null
# Let the sampler take a second sample (every 5 s), so the sparklines have a shape.
sleep 6
summary=""
if [ -n "${BROWSER_TEST_DEMO:-}" ]; then
  if [ "$profile" = release ]; then cargo build -q --release -p flowmetrics-demo; else cargo build -q -p flowmetrics-demo; fi
  summary=$work/sent.json
  "target/$profile/flowmetrics-demo" --endpoint "http://127.0.0.1:$p_http" --rate 15 \
    --duration "$BROWSER_TEST_DEMO" --max-latency 8s --seed 15 --summary "$summary" 2>"$out/demo.log" ||
    { cat "$out/demo.log"; echo "FAIL flowmetrics-demo"; exit 1; }
  sleep 1
fi

chrome() {
  "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d -p "$work")" "$@" 2>>"$out/chromium.log"
}
rows=4 journeys=0
# With the demo: seven flows, and the journey of checkout (four steps) below the table.
[ -n "$summary" ] && rows=7 journeys=330
# The virtual time budget lets the page run its first poll of /api/flows before the dump.
chrome --virtual-time-budget=5000 --dump-dom "$base/" >"$out/overview.dom.html"
chrome --virtual-time-budget=5000 --hide-scrollbars --window-size=1500,$((210 + 34 * rows + journeys)) \
  --screenshot="$out/overview.png" "$base/" >/dev/null

# The page's own measure of its width at 1400×900: scrollWidth past clientWidth is a
# sideways scroll. Chromium speaks the DevTools protocol on fds 3 and 4 (JSON, each
# message ended by a NUL byte).
python3 - "$browser" "$base/" "$work" >"$out/layout.json" <<'PY' || { echo "FAIL measuring the page's layout"; exit 1; }
import json, os, subprocess, sys, tempfile, time
browser, url, work = sys.argv[1:4]
to_child_r, to_child_w = os.pipe()
from_child_r, from_child_w = os.pipe()
def fds():
    # Out of the way first (either end may be fd 3 or 4), then in place, kept on exec.
    r, w = os.dup(to_child_r), os.dup(from_child_w)
    os.dup2(r, 3)
    os.dup2(w, 4)
    os.set_inheritable(3, True)
    os.set_inheritable(4, True)
child = subprocess.Popen(
    [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
     "--disable-background-networking", "--disable-component-update", "--disable-sync",
     "--window-size=1400,900", "--remote-debugging-pipe",
     "--user-data-dir=" + tempfile.mkdtemp(dir=work), "about:blank"],
    preexec_fn=fds, close_fds=False,
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
os.close(to_child_r); os.close(from_child_w)
reader = os.fdopen(from_child_r, "rb")
buffered = b""
next_id = 0
def call(method, params=None, session=None):
    global next_id, buffered
    next_id += 1
    msg = {"id": next_id, "method": method, "params": params or {}}
    if session: msg["sessionId"] = session
    os.write(to_child_w, json.dumps(msg).encode() + b"\0")
    while True:
        while b"\0" not in buffered:
            chunk = reader.read1(65536)
            if not chunk: raise SystemExit("chromium closed the pipe")
            buffered += chunk
        raw, buffered = buffered.split(b"\0", 1)
        reply = json.loads(raw)
        if reply.get("id") == next_id:
            if "error" in reply: raise SystemExit(f"{method}: {reply['error']}")
            return reply["result"]
try:
    target = call("Target.createTarget", {"url": url})["targetId"]
    session = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    measure = ("JSON.stringify({rows: document.querySelectorAll('#flows tbody tr').length, "
               "scrollWidth: document.documentElement.scrollWidth, "
               "clientWidth: document.documentElement.clientWidth, "
               "tableRight: Math.ceil((document.getElementById('flows') || document.body).getBoundingClientRect().right), "
               "innerWidth: window.innerWidth, innerHeight: window.innerHeight})")
    give_up = time.time() + 20
    while True:
        got = json.loads(call("Runtime.evaluate", {"expression": measure, "returnByValue": True},
                              session)["result"]["value"])
        if got["rows"] > 0 or time.time() > give_up: break
        time.sleep(0.2)
    print(json.dumps(got))
finally:
    child.kill()
    child.wait()
PY

python3 - "$out/overview.dom.html" "$summary" "$out/layout.json" <<'PY'
import json
import sys
from html.parser import HTMLParser

class Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.row, self.cell, self.body = {}, None, None, {}
        self.links, self.imgs = [], 0
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body": self.body = a
        if tag == "a": self.links.append(a.get("href"))
        if tag == "img": self.imgs += 1
        if tag == "tr" and "data-flow" in a:
            self.row = self.rows.setdefault(a["data-flow"], {})
        if tag == "td" and self.row is not None:
            self.cell = (a.get("class") or "").split(" ")[0]
            self.row[self.cell] = ""
    def handle_endtag(self, tag):
        if tag == "td": self.cell = None
        if tag == "tr": self.row = None
    def handle_data(self, data):
        if self.row is not None and self.cell: self.row[self.cell] += data

p = Rows()
p.feed(open(sys.argv[1], encoding="utf-8").read())
want = {
    "signup":         dict(started=7, success=4, failure=1, cancelled=1, in_progress=1, incomplete=0),
    "export.csv":     dict(started=5, success=5, failure=0, cancelled=0, in_progress=0, incomplete=0),
    "refund.v2:eu-1": dict(started=2, success=0, failure=0, cancelled=0, in_progress=2, incomplete=0),
    "checkout.express": dict(started=1, success=0, failure=0, cancelled=0, in_progress=1, incomplete=0),
}
passed = failed = 0
def check(name, good, detail=""):
    global passed, failed
    print(("PASS " if good else "FAIL ") + name + ("" if good else f": {detail}"))
    if good: passed += 1
    else: failed += 1

if sys.argv[2]:
    for flow, c in json.load(open(sys.argv[2]))["flows"].items():
        want[flow] = dict(started=c["started"], success=c["success"], failure=c["failure"],
                          cancelled=c["cancelled"], in_progress=c["unfinished"], incomplete=0)
check("page rendered one row per flow sent", set(p.rows) == set(want), sorted(p.rows))
for flow, cols in want.items():
    got = p.rows.get(flow, {})
    for col, n in cols.items():
        check(f"{flow}: {col} = {n}", got.get(col, "").strip() == str(n), repr(got.get(col)))
    check(f"{flow}: a sparkline cell", "spark" in got, got)
check("signup: error ratio 1 failure of 6 ends", p.rows.get("signup", {}).get("error_ratio") == "16.7%",
      p.rows.get("signup", {}).get("error_ratio"))
check("export.csv: p50 shown", p.rows.get("export.csv", {}).get("p50", "—") != "—", p.rows.get("export.csv"))
check("the page refreshed itself from /api/flows", p.body.get("data-source") == "live", p.body)
check("the page links to /metrics", "/metrics" in p.links, p.links)
layout = json.load(open(sys.argv[3]))
check("layout measured in a 1400x900 window", layout["innerWidth"] == 1400 and layout["rows"] > 0, layout)
check("no sideways scroll at 1400x900 with a 16-character flow name",
      layout["scrollWidth"] <= layout["clientWidth"] and layout["tableRight"] <= layout["clientWidth"],
      layout)
check("percentile headers say they are bucket estimates",
      all(h in open(sys.argv[1], encoding="utf-8").read() for h in ("p50 ≈", "p95 ≈", "p99 ≈", "from buckets")),
      "headers")
check("no markup from a flow name reached the DOM", p.imgs == 0 and "onerror" not in open(sys.argv[1]).read(), p.imgs)
print(f"browser-test: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
test -s "$out/overview.png" && echo "PASS screenshot: $out/overview.png" || { echo "FAIL no screenshot"; exit 1; }
