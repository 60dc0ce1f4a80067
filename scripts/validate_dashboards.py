#!/usr/bin/env python3
"""Structural lint of the Grafana dashboards in grafana/dashboards/ (stdlib only).

Follows the rules of Grafana's dashboard-linter that can be checked without Grafana:
a `datasource` variable; `job` and `instance` query variables (multi, allValue ".+",
refreshed on time change, from $datasource); every panel with a title, a description, a
valid unit and the templated datasource; every query with job/instance matchers, every
counter inside rate()/increase(), every range = $__rate_interval (recording rules,
level:metric:operations, carry no job/instance: exempt). Plus this project's
own: the flows dashboard has a multi-select `flow` variable from
label_values(flowmetrics_flows_started_total, flow), uses it in every per-flow selector,
has its rows (Rate, Errors, Duration, Flows in progress, Pipeline health, Journey,
Objectives), and shows exemplars on the duration panels.

Prints one "PASS <check>" or "FAIL <check>: <why>" line per check; exits 1 on any FAIL.
Usage: validate_dashboards.py [DASHBOARD.json ...]   (default: grafana/dashboards/*.json)
"""
import glob
import json
import os
import re
import sys

VALID_UNITS = {
    "none", "short", "percent", "percentunit", "s", "ms", "µs", "ns", "m", "h", "d", "dtdurations",
    "bytes", "decbytes", "bits", "Bps", "binBps", "pps", "ops", "reqps", "rps", "cps", "wps", "iops", "opm", "rpm", "cpm", "bool",
}
# Families that carry a `flow` label: on the flows dashboard they must be filtered by $flow.
FLOW_FAMILIES = re.compile(
    r"^flowmetrics_(flows_started_total|flows_completed_total|flow_errors_total|flow_duration_seconds(_bucket|_sum|_count)?"
    r"|flows_in_progress|flows_dropped_total|flow_unmatched_ends_total|flow_negative_durations_total"
    r"|flow_steps_total|flow_step_(duration|transit)_seconds_(bucket|sum|count)|flow_stalled_total"
    r"|flow_steps_unmatched_total"
    r"|flow_objective_target|flow_objective_seconds|flows_overdue|flow_oldest_open_seconds)$")
# A family, or a recording rule (level:metric:operations) of one.
SELECTOR = re.compile(
    r"\b((?:[a-zA-Z_]+:)?(?:flowmetrics|process)_[a-zA-Z0-9_]+(?::[a-zA-Z0-9_]+)?|up)\b"
    r"(\s*\{[^}]*\})?(\s*\[[^\]]*\])?")
RANGE = re.compile(r"\[([^\]]*)\]")
VAR_REF = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}")

results = []


def check(name, ok, why=""):
    results.append((name, ok, why))


def ds_uid(obj):
    ds = obj.get("datasource")
    return ds.get("uid") if isinstance(ds, dict) else ds


def lint(path):
    base = os.path.basename(path)
    try:
        d = json.load(open(path))
    except (OSError, ValueError) as e:
        check(f"{base}: valid JSON", False, str(e))
        return
    check(f"{base}: valid JSON", True)
    errors = []
    for key in ("uid", "title", "description"):
        if not d.get(key):
            errors.append(f"dashboard has no {key}")
    if d.get("editable") is not False:
        errors.append("dashboard should be editable: false (provisioned)")
    if "flowmetrics" not in d.get("tags", []):
        errors.append('dashboard lacks the "flowmetrics" tag')
    check(f"{base}: dashboard metadata", not errors, "; ".join(errors))

    # ---- variables
    vars_ = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    errors = []
    dss = [v for v in vars_.values() if v.get("type") == "datasource"]
    if len(dss) != 1 or dss[0].get("name") != "datasource" or dss[0].get("label") != "Data source" \
            or dss[0].get("query") != "prometheus":
        errors.append('need exactly one datasource variable: name "datasource", label "Data source", query "prometheus"')
    required = {"job": "Job", "instance": "Instance"}
    if base == "flowmetrics.json":
        required["flow"] = "Flow"
    for name, label in required.items():
        v = vars_.get(name)
        if v is None:
            errors.append(f"missing variable {name}")
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if v.get("type") != "query" or ds_uid(v) not in ("$datasource", "${datasource}"):
            errors.append(f"{name}: must be a query variable on ${{datasource}}")
        if v.get("label") != label:
            errors.append(f"{name}: label should be {label!r}")
        if not v.get("multi") or not v.get("includeAll") or v.get("allValue") != ".+":
            errors.append(f'{name}: must be multi-select with All = ".+"')
        if v.get("refresh") != 2:
            errors.append(f"{name}: must refresh on time range change (refresh: 2)")
        if not re.fullmatch(r"label_values\(.+,\s*" + name + r"\)", q or ""):
            errors.append(f"{name}: query must be label_values(..., {name}), is {q!r}")
    if base == "flowmetrics.json" and "flow" in vars_:
        q = vars_["flow"].get("query")
        if not str(q).startswith("label_values(flowmetrics_flows_started_total"):
            errors.append("flow: must come from label_values(flowmetrics_flows_started_total..., flow)")
    check(f"{base}: template variables", not errors, "; ".join(errors))

    # ---- panels
    panels = d.get("panels", [])
    flat = []
    for p in panels:
        flat.append(p)
        flat.extend(p.get("panels", []))
    ids = [p.get("id") for p in flat]
    check(f"{base}: unique panel ids", len(ids) == len(set(ids)) and None not in ids, f"ids {ids}")
    bad_grid = [p.get("title") for p in flat
                if not p.get("gridPos") or p["gridPos"].get("x", 0) + p["gridPos"].get("w", 0) > 24]
    check(f"{base}: panels fit the 24-column grid", not bad_grid, f"{bad_grid}")
    rows = [p.get("title") for p in flat if p.get("type") == "row"]
    if base == "flowmetrics.json":
        # These rows, in this order; other rows may come between and after them.
        want = ["Rate", "Errors", "Duration", "Flows in progress", "Pipeline health", "Journey",
                "Objectives"]
        it = iter(rows)
        check(f"{base}: rows {want}", all(w in it for w in want), f"rows are {rows}")
    defined = set(vars_) | {"__rate_interval", "__interval", "__range"}
    for p in flat:
        if p.get("type") == "row":
            continue
        title = p.get("title") or f"panel id {p.get('id')}"
        errors = []
        if not p.get("title"):
            errors.append("no title")
        if not (p.get("description") or "").strip():
            errors.append("no description")
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if unit not in VALID_UNITS:
            errors.append(f"unit {unit!r} missing or not a known Grafana unit")
        if ds_uid(p) not in ("$datasource", "${datasource}"):
            errors.append("panel datasource is not ${datasource}")
        targets = p.get("targets") or []
        if not targets:
            errors.append("no targets")
        for t in targets:
            expr = t.get("expr") or ""
            ref = t.get("refId")
            if not expr.strip():
                errors.append(f"{ref}: empty expr")
                continue
            if ds_uid(t) not in ("$datasource", "${datasource}"):
                errors.append(f"{ref}: target datasource is not ${{datasource}}")
            for rng in RANGE.findall(expr):
                if rng != "$__rate_interval":
                    errors.append(f"{ref}: range [{rng}] should be [$__rate_interval]")
            for m in SELECTOR.finditer(expr):
                metric, matchers, rng = m.group(1), m.group(2) or "", m.group(3)
                if not matchers:
                    errors.append(f"{ref}: {metric} has no label matchers")
                if ":" in metric:
                    # A recording rule keeps only its level's labels (job and instance are
                    # summed away); a per-flow one is still filtered by $flow.
                    if base == "flowmetrics.json" and metric.startswith("flow") and 'flow=~"$flow"' not in matchers:
                        errors.append(f'{ref}: {metric} lacks flow=~"$flow"')
                    continue
                for lbl in ("job", "instance"):
                    if f'{lbl}=~"${lbl}"' not in matchers:
                        errors.append(f'{ref}: {metric} lacks {lbl}=~"${lbl}"')
                if base == "flowmetrics.json" and FLOW_FAMILIES.match(metric) and 'flow=~"$flow"' not in matchers:
                    errors.append(f'{ref}: {metric} lacks flow=~"$flow"')
                if metric.endswith("_total"):
                    before = expr[:m.start()].rstrip()
                    if not rng or not re.search(r"\b(rate|irate|increase)\($", before):
                        errors.append(f"{ref}: counter {metric} not directly inside rate()/increase()")
            for a, b in VAR_REF.findall(expr):
                if (a or b) not in defined:
                    errors.append(f"{ref}: undefined variable ${a or b}")
        if base == "flowmetrics.json" and p.get("title") in ("Duration p50 / p95 / p99", "Duration distribution"):
            if not any(t.get("exemplar") for t in targets):
                errors.append("exemplars not enabled")
            if "histogram_quantile" in targets[0].get("expr", "") and \
                    not all("sum by (le, flow)" in t.get("expr", "") for t in targets):
                errors.append("quantiles must be histogram_quantile over sum by (le, flow)")
        check(f"{base}: panel {title!r}", not errors, "; ".join(errors))


def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = argv or sorted(glob.glob(os.path.join(root, "grafana", "dashboards", "*.json")))
    if not paths:
        print("FAIL dashboards: none found")
        return 1
    for p in paths:
        lint(p)
    for name, ok, why in results:
        print(f"PASS {name}" if ok else f"FAIL {name}: {why}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
