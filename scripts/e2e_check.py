#!/usr/bin/env python3
"""Checks for scripts/e2e.sh against a running Prometheus and flowmetrics (stdlib only).

Subcommands (each prints "PASS <check>" / "FAIL <check>: <why>" lines, exits 1 on a FAIL):
  probe      --otlp URL                 send edge-case flow events (flow "e2e_probe"): a
                                        duplicate start, an end without start, a negative
                                        duration, an invalid outcome
  queries    --prom URL --dashboards DIR --rate-interval 1m [--native-prom URL]
                                        every dashboard variable and panel query, template
                                        variables substituted, must succeed with >= 1 series;
                                        queries of native histograms (the duration family
                                        without _bucket/_sum/_count) go to --native-prom
  rules      --prom URL                 every loaded rule healthy; every recording rule's
                                        query and recorded series non-empty; every alert
                                        expression evaluates without error
  counters   --prom URL --summary PATH [--summary PATH ...] --timeout S
                                        flow counters stored in Prometheus == what the
                                        traffic generator(s) reported sending
  network    --prom URL --summary PATH --timeout S
                                        network counters (records, bytes and packets by
                                        direction) stored in Prometheus == what the
                                        --network-flows generator reported sending
  exemplars  --prom URL                 exemplars with trace_id stored for the duration histogram
  native     --prom URL --flow NAME     a native histogram series stored for the flow's
                                        duration (a flow with histogram: both or native)
"""
import argparse
import json
import os
import re
import sys
import time
import urllib.parse
import urllib.request

FAILED = False


def report(name, ok, why=""):
    global FAILED
    if ok:
        print(f"PASS {name}")
    else:
        FAILED = True
        print(f"FAIL {name}: {why}")


def api(prom, path, post=False, **params):
    """GET (or POST, form-encoded, for long queries) an HTTP API endpoint; returns its JSON."""
    data = urllib.parse.urlencode(params, doseq=True)
    if post:
        req = urllib.request.Request(prom + path, data=data.encode(),
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
    else:
        req = urllib.request.Request(prom + path + ("?" + data if data else ""))
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            body = json.load(r)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
        except ValueError:
            body = {"status": "error", "error": f"HTTP {e.code}"}
    except (urllib.error.URLError, OSError) as e:
        body = {"status": "error", "error": str(e)}
    return body


def query(prom, expr):
    """Returns (result list, error string or None)."""
    b = api(prom, "/api/v1/query", post=True, query=expr)
    if b.get("status") != "success":
        return [], f"{b.get('errorType', '')} {b.get('error', 'unknown error')}".strip()
    return b["data"]["result"], None


def scalar_by(prom, expr, label):
    res, err = query(prom, expr)
    if err:
        raise RuntimeError(err)
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in res}


# ------------------------------------------------------------------ probe
def cmd_probe(a):
    now = time.time_ns()

    def event(name, cid, ts, outcome=None):
        attrs = [{"key": "correlation-id", "value": {"stringValue": cid}}]
        if outcome:
            attrs.append({"key": "outcome", "value": {"stringValue": outcome}})
        return {"timeUnixNano": str(ts), "name": name, "attributes": attrs}

    def send(events):
        spans = [{"traceId": os.urandom(16).hex(), "spanId": os.urandom(8).hex(), "name": "e2e-probe",
                  "kind": 1, "startTimeUnixNano": str(now), "endTimeUnixNano": str(now), "events": [e]}
                 for e in events]
        body = {"resourceSpans": [{"resource": {"attributes": [
            {"key": "service.name", "value": {"stringValue": "e2e-probe"}}]}, "scopeSpans": [{"spans": spans}]}]}
        req = urllib.request.Request(a.otlp.rstrip("/") + "/v1/traces", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.load(r)

    run = f"{now:x}"
    cases = [
        ("duplicate start", [event("flow.e2e_probe.start", f"dup-{run}", now),
                             event("flow.e2e_probe.start", f"dup-{run}", now)], None),
        ("end without a start (unmatched after the flow timeout)",
         [event("flow.e2e_probe.end", f"orphan-{run}", now, "success")], None),
        ("success end before its start (negative duration)",
         [event("flow.e2e_probe.start", f"neg-{run}", now),
          event("flow.e2e_probe.end", f"neg-{run}", now - 1_000_000_000, "success")], None),
        ("invalid outcome (rejected)", [event("flow.e2e_probe.end", f"bad-{run}", now, "done")], "invalid outcome"),
    ]
    for name, events, expect_msg in cases:
        try:
            status, resp = send(events)
            msg = ((resp or {}).get("partialSuccess") or {}).get("errorMessage") or ""
            ok = status == 200 and (expect_msg is None or expect_msg in msg)
            report(f"probe: {name}", ok, f"HTTP {status}, response {resp}")
        except (urllib.error.URLError, OSError, ValueError) as e:
            report(f"probe: {name}", False, str(e))


# ------------------------------------------------------------------ queries
def substitute(expr, values):
    """Replaces $name / ${name} / ${name:fmt} with values[name] (unknown names stay)."""
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), expr)


def label_values(prom, q, values):
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q, re.S)
    if not m:
        return None, f"not a label_values() query: {q}"
    selector, label = substitute(m.group(1), values), m.group(2)
    b = api(prom, f"/api/v1/label/{label}/values", **{"match[]": selector})
    if b.get("status") != "success":
        return None, b.get("error")
    return b["data"], None


# The duration family by its bare name: a native histogram (classic ones have no such series).
NATIVE_SELECTOR = re.compile(r"\bflowmetrics_flow_duration_seconds\b(?!_)")


def cmd_queries(a):
    for path in sorted(f for f in os.listdir(a.dashboards) if f.endswith(".json")):
        d = json.load(open(os.path.join(a.dashboards, path)))
        values = {"__rate_interval": a.rate_interval, "__interval": "15s", "__range": "5m"}
        # Variables in order, as Grafana resolves them: each "All" is the regex of every value.
        for v in d.get("templating", {}).get("list", []):
            name = v.get("name")
            if v.get("type") == "query":
                q = v.get("query")
                q = q.get("query") if isinstance(q, dict) else q
                vals, err = label_values(a.prom, q, values)
                report(f"{path}: variable ${name} = {q}", bool(vals) and err is None,
                       err or "no values")
                # Grafana's multi-value format: regex-escaped values, escaped again for a PromQL string.
                values[name] = "(" + "|".join(re.escape(x).replace("\\", "\\\\") for x in (vals or ["none"])) + ")"
                if vals:
                    print(f"     ${name} -> {values[name]}")
            elif v.get("type") in ("textbox", "constant", "custom"):
                values[name] = str(v.get("query", "")).split(",")[0]
        for p in d.get("panels", []):
            for sub in [p] + p.get("panels", []):
                for t in sub.get("targets", []):
                    expr = substitute(t.get("expr", ""), values)
                    native = a.native_prom and NATIVE_SELECTOR.search(expr)
                    res, err = query(a.native_prom if native else a.prom, expr)
                    one_line = " ".join(t.get("expr", "").split())
                    report(f"{path}: panel {sub.get('title')!r} [{t.get('refId')}] {one_line}",
                           err is None and len(res) > 0, err or "query returned no series")


# ------------------------------------------------------------------ rules
def cmd_rules(a):
    b = api(a.prom, "/api/v1/rules")
    groups = b.get("data", {}).get("groups", []) if b.get("status") == "success" else []
    report("rules: Prometheus loaded the rule files", bool(groups), b.get("error", "no rule groups loaded"))
    for g in groups:
        for r in g["rules"]:
            name = r.get("name")
            kind = "record" if r["type"] == "recording" else "alert"
            healthy = r.get("health") == "ok" and not r.get("lastError")
            res, err = query(a.prom, r["query"])
            if kind == "record":
                stored, err2 = query(a.prom, name)
                # Series that appeared after the group's last evaluation (a time-out just
                # counted, say) are recorded at its next one: wait for it, bounded.
                deadline = time.time() + 2 * float(g.get("interval") or 15) + 5
                while healthy and err is None and res and not stored and time.time() < deadline:
                    time.sleep(1)
                    stored, err2 = query(a.prom, name)
                report(f"rules: {kind} {name} evaluates to series and is recorded",
                       healthy and err is None and res and err2 is None and stored,
                       f"health={r.get('health')} lastError={r.get('lastError')!r} query error={err} "
                       f"series={len(res)} recorded={len(stored)}")
            else:
                # An alert expression returns series only while the alert condition holds;
                # here it must load, be evaluated by Prometheus without error and run via the API.
                report(f"rules: {kind} {name} evaluates without error ({r.get('state')}, {len(res)} series now)",
                       healthy and err is None,
                       f"health={r.get('health')} lastError={r.get('lastError')!r} query error={err}")


# ------------------------------------------------------------------ counters
def cmd_counters(a):
    sent = {}
    for path in a.summary:
        try:
            s = json.load(open(path))["flows"]
        except (OSError, ValueError, KeyError) as e:
            report(f"counters: read generator summary {path}", False, repr(e))
            return
        for flow, c in s.items():
            acc = sent.setdefault(flow, {})
            for k, v in c.items():
                if isinstance(v, dict):  # steps sent, stalled: by step
                    inner = acc.setdefault(k, {})
                    for step, n in v.items():
                        inner[step] = inner.get(step, 0) + int(n)
                else:
                    acc[k] = acc.get(k, 0) + int(v)
    report(f"counters: generator summary lists flows ({', '.join(sorted(sent))})", bool(sent), "no flows in summary")
    if not sent:
        return
    job = 'job="flowmetrics"'
    deadline = time.time() + a.timeout
    while True:
        checks = []
        try:
            started = scalar_by(a.prom, f"sum by (flow) (flowmetrics_flows_started_total{{{job}}})", "flow")
            completed = {}
            for s in query(a.prom, f"sum by (flow, outcome) (flowmetrics_flows_completed_total{{{job}}})")[0]:
                completed[(s["metric"]["flow"], s["metric"]["outcome"])] = float(s["value"][1])
            errors = {}
            for s in query(a.prom, f"sum by (flow, error_reason) (flowmetrics_flow_errors_total{{{job}}})")[0]:
                errors[(s["metric"]["flow"], s["metric"]["error_reason"])] = float(s["value"][1])
            in_progress = scalar_by(a.prom, f"sum by (flow) (flowmetrics_flows_in_progress{{{job}}})", "flow")
            dropped = scalar_by(a.prom, f"sum by (flow) (flowmetrics_flows_dropped_total{{{job}}})", "flow")
            steps, stalled = {}, {}
            after_close = scalar_by(
                a.prom,
                f'sum by (flow) (flowmetrics_flow_steps_unmatched_total{{{job},reason="after_close"}})',
                "flow")
            for s in query(a.prom, f"sum by (flow, step) (flowmetrics_flow_steps_total{{{job}}})")[0]:
                steps[(s["metric"]["flow"], s["metric"]["step"])] = float(s["value"][1])
            for s in query(a.prom, f"sum by (flow, last_step) (flowmetrics_flow_stalled_total{{{job}}})")[0]:
                stalled[(s["metric"]["flow"], s["metric"]["last_step"])] = float(s["value"][1])
        except RuntimeError as e:
            checks = [("counters: query Prometheus", False, str(e))]
        else:
            for flow, c in sorted(sent.items()):
                got = started.get(flow, 0)
                checks.append((f"counters: {flow} started = {c.get('started', 0)} sent",
                               got == c.get("started", 0), f"Prometheus has {got:g}"))
                for outcome in ("success", "failure", "cancelled"):
                    got = completed.get((flow, outcome), 0)
                    checks.append((f"counters: {flow} completed{{outcome={outcome}}} = {c.get(outcome, 0)} sent",
                                   got == c.get(outcome, 0), f"Prometheus has {got:g}"))
                got = errors.get((flow, "failure"), 0)
                checks.append((f"counters: {flow} errors{{failure}} = {c.get('failure', 0)} failure ends sent",
                               got == c.get("failure", 0), f"Prometheus has {got:g}"))
                got = errors.get((flow, "incomplete"), 0)
                checks.append((f"counters: {flow} errors{{incomplete}} = {c.get('unfinished', 0)} never-ended flows sent",
                               got == c.get("unfinished", 0), f"Prometheus has {got:g}"))
                total = sum(completed.get((flow, o), 0) for o in ("success", "failure", "cancelled")) \
                    + errors.get((flow, "incomplete"), 0) + dropped.get(flow, 0) + in_progress.get(flow, 0)
                checks.append((f"counters: {flow} started = completed + incomplete + dropped + in_progress",
                               total == started.get(flow, 0), f"{started.get(flow, 0):g} != {total:g}"))
                # Flow steps (docs/behaviour.md §9): every step sent had its start, so each
                # counts once: reached, or after_close when it arrived after its instance
                # closed (the demo exports some starts, with the steps in the start's span,
                # after their end: the start completes the waiting end, then those steps
                # come). Per step at most what was sent; per flow exactly.
                sent_steps = c.get("steps", {})
                for step, n in sorted(sent_steps.items()):
                    got = steps.get((flow, step), 0)
                    checks.append((f"counters: {flow} steps{{step={step}}} <= {n} sent",
                                   got <= n, f"Prometheus has {got:g}"))
                if sent_steps:
                    got = sum(v for (f, _), v in steps.items() if f == flow)
                    late = after_close.get(flow, 0)
                    n = sum(sent_steps.values())
                    checks.append((f"counters: {flow} steps reached + after_close = {n} sent",
                                   got + late == n, f"Prometheus has {got:g} + {late:g}"))
                for last, n in sorted(c.get("stalled", {}).items()):
                    got = stalled.get((flow, last), 0)
                    checks.append((f"counters: {flow} stalled{{last_step={last}}} = {n} unfinished there",
                                   got == n, f"Prometheus has {got:g}"))
        if all(ok for _, ok, _ in checks) or time.time() > deadline:
            break
        time.sleep(2)
    for c in checks:
        report(*c)


# ------------------------------------------------------------------ network
def cmd_network(a):
    try:
        sent = json.load(open(a.summary))["network"]
    except (OSError, ValueError, KeyError) as e:
        report(f"network: read generator summary {a.summary}", False, repr(e))
        return
    job = 'job="flowmetrics"'
    deadline = time.time() + a.timeout
    while True:
        checks = []
        try:
            records = scalar_by(a.prom, f"sum(flowmetrics_network_flow_records_total{{{job}}})", "")
            got = {"records": records.get("", 0)}
            for family in ("bytes", "packets"):
                by = scalar_by(a.prom, f"sum by (direction) (flowmetrics_network_{family}_total{{{job}}})", "direction")
                for direction in ("forward", "reverse"):
                    got[f"{family} {direction}"] = by.get(direction, 0)
        except RuntimeError as e:
            checks = [("network: query Prometheus", False, str(e))]
        else:
            want = {"records": sent["records"]}
            for family in ("bytes", "packets"):
                for direction in ("forward", "reverse"):
                    want[f"{family} {direction}"] = sent[family][direction]
            for k, v in want.items():
                checks.append((f"network: {k} = {v} sent", got[k] == v, f"Prometheus has {got[k]:g}"))
        if all(ok for _, ok, _ in checks) or time.time() > deadline:
            break
        time.sleep(2)
    for c in checks:
        report(*c)


# ------------------------------------------------------------------ exemplars
def cmd_exemplars(a):
    now = time.time()
    b = api(a.prom, "/api/v1/query_exemplars", query='flowmetrics_flow_duration_seconds_bucket{job="flowmetrics"}',
            start=str(now - 3600), end=str(now))
    data = b.get("data") or []
    n = sum(len(s.get("exemplars", [])) for s in data)
    with_trace = sum(1 for s in data for e in s.get("exemplars", []) if re.fullmatch(r"[0-9a-f]{32}", e["labels"].get("trace_id", "")))
    report(f"exemplars: duration histogram exemplars with a trace_id stored ({with_trace} of {n})",
           b.get("status") == "success" and with_trace > 0, b.get("error") or f"{n} exemplars, {with_trace} with trace_id")


# ------------------------------------------------------------------ native
def cmd_native(a):
    """A native histogram sample comes back from the query API with a `histogram` (not a
    `value`) field; a classic histogram has no sample under the bare family name."""
    expr = f'flowmetrics_flow_duration_seconds{{job="flowmetrics", flow="{a.flow}"}}'
    result, err = query(a.prom, expr)
    if err:
        report(f"native: query {expr}", False, err)
        return
    native = [r for r in result if "histogram" in r]
    count = sum(float(r["histogram"][1].get("count", 0)) for r in native)
    report(f"native: {expr} is a native histogram ({len(native)} series, {count:g} observations)",
           bool(native) and count > 0, f"result: {json.dumps(result)[:300]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("probe"); s.add_argument("--otlp", required=True)
    s = sub.add_parser("queries"); s.add_argument("--prom", required=True)
    s.add_argument("--dashboards", required=True); s.add_argument("--rate-interval", default="1m")
    s.add_argument("--native-prom", default=None)
    s = sub.add_parser("rules"); s.add_argument("--prom", required=True)
    s = sub.add_parser("counters"); s.add_argument("--prom", required=True)
    s.add_argument("--summary", action="append", required=True); s.add_argument("--timeout", type=float, default=60)
    s = sub.add_parser("network"); s.add_argument("--prom", required=True)
    s.add_argument("--summary", required=True); s.add_argument("--timeout", type=float, default=60)
    s = sub.add_parser("exemplars"); s.add_argument("--prom", required=True)
    s = sub.add_parser("native"); s.add_argument("--prom", required=True); s.add_argument("--flow", required=True)
    a = p.parse_args()
    {"probe": cmd_probe, "queries": cmd_queries, "rules": cmd_rules, "counters": cmd_counters,
     "network": cmd_network, "exemplars": cmd_exemplars, "native": cmd_native}[a.cmd](a)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
