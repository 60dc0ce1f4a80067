#!/usr/bin/env python3
"""Feeds three flowmetrics replicas that share one Redis with the OpenTelemetry Python
SDK, then checks their summed counters (run by scripts/redis-sdk-test.sh).

One TracerProvider per replica and transport, each with a BatchSpanProcessor and the
official OTLP exporter: replica 0 over HTTP/protobuf, replica 1 over gRPC, replica 2 over
both. Every flow's start goes to one replica and its end to another (never the same
replica: only a shared store pairs them), chosen at random, and about half of the ends are
exported, and answered, before their start is emitted. Some instances never end
(incomplete after the flow timeout), some never start (unmatched ends); outcomes success,
failure (by attribute, or by the end span's ERROR status) and cancelled. The exporters
retry as they do by default; the service recognises a retried event, so the totals must
be exact all the same.

Instances also pass through up to three steps (`flow.<flow>.step`, attribute `step`;
declared for `checkout` in the replicas' config, undeclared for `checkout.payment`), each
exported to the replica that has neither the start nor the end: before the start, with
it, or (ends first) with the end. Some instances send one more step after their end was
exported and answered (unmatched, after_close); every instance that never starts sends a
step (unmatched, no_start); instances that never end stall at their last step.

Once the time-outs are counted, all three /metrics are scraped and summed: started,
completed per outcome, errors per reason, unmatched ends, duration count and sum (each
duration a multiple of 1/4 s, so every sum is exact in floating point and is compared
with ==), in progress 0; per step: reached, time to step and transit (count and sum,
multiples of 1/16 s), stalled by last step, unmatched steps by reason. Prints each mismatch and one summary line,
"sdk-replicas: N passed, N failed"; exits 1 on any mismatch.
"""

import argparse
import random
import sys
import time
import traceback
import urllib.request

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode

# The same correlation ids in both flows: (flow, id) is the instance.
FLOWS = ["checkout", "checkout.payment"]
IDS = 200  # correlation ids per flow
ROUND = 40  # instances per round (ends first, then starts, then the other ends)
# (replica, transport) of each tracer provider.
PROVIDERS = [(0, "http"), (1, "grpc"), (2, "http"), (2, "grpc")]
# The steps of both flows, in order (`checkout` declares them: see redis-sdk-test.sh).
STEPS = ["cart", "paid", "packed"]


def plan(seed, base_ns):
    rng = random.Random(seed)
    instances = []
    for f, flow in enumerate(FLOWS):
        for n in range(IDS):
            kind = (n + 3 * f) % 10
            fate = {0: "start_only", 1: "end_only"}.get(kind, "pair")
            outcome = {2: "failure", 3: "failure", 4: "cancelled"}.get(kind, "success")
            start_via = rng.randrange(len(PROVIDERS))
            others = [
                p
                for p in range(len(PROVIDERS))
                if PROVIDERS[p][0] != PROVIDERS[start_via][0]
            ]
            quarters = (n * 7 + f) % 12 + 1
            start_ns = base_ns + (f * IDS + n) * 1_000_000
            end_via = rng.choice(others)
            end_first = rng.randrange(2) == 0
            # Steps go to the replica that has neither the start nor the end.
            third = [
                p
                for p in range(len(PROVIDERS))
                if PROVIDERS[p][0] not in (PROVIDERS[start_via][0], PROVIDERS[end_via][0])
            ]
            steps = 1 if fate == "end_only" else (n * 5 + f) % 4
            instances.append(
                {
                    "flow": flow,
                    "id": f"o-{n}",
                    "fate": fate,
                    "outcome": outcome,
                    "end_first": end_first,
                    "by_status": fate == "pair" and outcome == "failure" and n % 4 == 2,
                    "start_via": start_via,
                    "end_via": end_via,
                    "start_ns": start_ns,
                    "end_ns": start_ns + quarters * 250_000_000,
                    "quarters": quarters,
                    # Step j at start + (j + 1) * quarters/16 s: before the end.
                    "steps": steps,
                    "step_via": rng.choice(third),
                    # Ends first: the steps go with the end, before the start closes
                    # the instance. Else before the start or with it, at random.
                    "steps_first": end_first or rng.randrange(2) == 0,
                    # One more step after the end was answered: after_close.
                    "late_step": fate == "pair" and steps < len(STEPS) and n % 6 == 5,
                }
            )
    rng.shuffle(instances)
    return instances


def providers_for(http, grpc):
    providers = []
    for replica, transport in PROVIDERS:
        if transport == "http":
            exporter = HttpSpanExporter(
                endpoint=f"http://{http[replica]}/v1/traces", timeout=10
            )
        else:
            exporter = GrpcSpanExporter(
                endpoint=grpc[replica], insecure=True, timeout=10
            )
        resource = Resource.create({"service.name": f"replica-{replica}-{transport}"})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        providers.append(provider)
    return providers


def emit(provider, event, at_ns, attributes, error=False):
    span = provider.get_tracer("sdk-replicas").start_span("work")
    span.add_event(event, attributes, timestamp=at_ns)
    if error:
        span.set_status(Status(StatusCode.ERROR, "flow failed"))
    span.end()


def emit_start(providers, i):
    attributes = {"correlation-id": i["id"]}
    emit(providers[i["start_via"]], f"flow.{i['flow']}.start", i["start_ns"], attributes)


def emit_end(providers, i):
    attributes = {"correlation-id": i["id"]}
    if not i["by_status"]:
        attributes["outcome"] = i["outcome"]
    event = f"flow.{i['flow']}.end"
    emit(providers[i["end_via"]], event, i["end_ns"], attributes, i["by_status"])


def step_ns(i, j):
    return i["start_ns"] + (j + 1) * i["quarters"] * 62_500_000


def emit_step(providers, i, j):
    attributes = {"correlation-id": i["id"], "step": STEPS[j]}
    emit(providers[i["step_via"]], f"flow.{i['flow']}.step", step_ns(i, j), attributes)


def emit_steps(providers, i):
    for j in range(i["steps"]):
        emit_step(providers, i, j)


def flush_all(providers):
    for p in providers:
        if not p.force_flush(timeout_millis=60_000):
            raise RuntimeError("a tracer provider's flush did not finish")


def send(providers, instances):
    def pair(i):
        return i["fate"] == "pair"

    for r in range(0, len(instances), ROUND):
        chunk = instances[r : r + ROUND]
        # Ends first: exported and answered before their starts are emitted.
        for i in chunk:
            if (pair(i) and i["end_first"]) or i["fate"] == "end_only":
                emit_end(providers, i)
            if i["steps_first"] or i["fate"] == "end_only":
                emit_steps(providers, i)
        flush_all(providers)
        for i in chunk:
            if i["fate"] != "end_only":
                emit_start(providers, i)
                if not i["steps_first"]:
                    emit_steps(providers, i)
        flush_all(providers)
        for i in chunk:
            if pair(i) and not i["end_first"]:
                emit_end(providers, i)
        flush_all(providers)
        # Closed, every one of them: a step now finds its instance gone.
        for i in chunk:
            if i["late_step"]:
                emit_step(providers, i, i["steps"])
        flush_all(providers)


def scrape(address):
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        line = line.split(" # ")[0]
        series, value = line.rsplit(" ", 1)
        samples[series] = float(value)
    return samples


def total(scrapes, family, *labels):
    """Sums, over the scrapes, every series of `family` whose labels hold all `labels`."""
    return sum(
        v
        for s in scrapes
        for series, v in s.items()
        if series.startswith(family + "{") and all(label in series for label in labels)
    )


def expected(instances, flow):
    e = dict.fromkeys(
        ["started", "success", "failure", "cancelled", "incomplete", "unmatched"], 0
    )
    e["duration_sum"] = 0.0
    e["after_close"] = e["no_start"] = 0
    # Per step: reached, sum of time to step, sum of transit; stalled by last step.
    e["steps"] = {s: [0, 0.0, 0.0] for s in STEPS}
    e["stalled"] = dict.fromkeys(["start"] + STEPS, 0)
    for i in instances:
        if i["flow"] != flow:
            continue
        if i["fate"] == "end_only":
            e["unmatched"] += 1
            e["no_start"] += i["steps"]
            continue
        e["started"] += 1
        e["after_close"] += 1 if i["late_step"] else 0
        for j in range(i["steps"]):
            reached = e["steps"][STEPS[j]]
            reached[0] += 1
            reached[1] += (step_ns(i, j) - i["start_ns"]) / 1e9
            reached[2] += i["quarters"] / 16
        if i["fate"] == "start_only":
            e["incomplete"] += 1
            e["stalled"][STEPS[i["steps"] - 1] if i["steps"] else "start"] += 1
        else:
            e[i["outcome"]] += 1
            if i["outcome"] == "success":
                e["duration_sum"] += i["quarters"] * 0.25
    return e


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--otlp-http", nargs=3, required=True, metavar="HOST:PORT")
    ap.add_argument("--otlp-grpc", nargs=3, required=True, metavar="HOST:PORT")
    ap.add_argument("--metrics", nargs=3, required=True, metavar="HOST:PORT")
    ap.add_argument("--timeout", type=float, required=True, help="the flows' timeout, s")
    ap.add_argument("--seed", type=int, default=0x5EED)
    args = ap.parse_args()

    instances = plan(args.seed, time.time_ns())
    ends_first = sum(1 for i in instances if i["fate"] == "pair" and i["end_first"])
    steps = sum(i["steps"] + i["late_step"] for i in instances)
    print(
        f"sdk-replicas: {len(instances)} instances in {len(FLOWS)} flows, "
        f"{ends_first} ends exported before their start, {steps} steps, over {len(PROVIDERS)} "
        "tracer providers (replica 0 http, 1 grpc, 2 both)"
    )
    providers = providers_for(args.otlp_http, args.otlp_grpc)
    t0 = time.monotonic()
    send(providers, instances)
    print(f"sdk-replicas: sent and flushed in {time.monotonic() - t0:.1f} s")

    expect = {flow: expected(instances, flow) for flow in FLOWS}
    # Wait for the time-outs (start-only instances, ends that never met a start).
    give_up = time.monotonic() + args.timeout + 20
    while True:
        scrapes = [scrape(m) for m in args.metrics]
        done = all(
            total(scrapes, "flowmetrics_flow_errors_total", f'flow="{flow}"', "incomplete")
            >= e["incomplete"]
            and total(scrapes, "flowmetrics_flow_unmatched_ends_total", f'flow="{flow}"')
            >= e["unmatched"]
            and total(
                scrapes, "flowmetrics_flow_steps_unmatched_total", f'flow="{flow}"', "no_start"
            )
            >= e["no_start"]
            for flow, e in expect.items()
        )
        if done or time.monotonic() > give_up:
            break
        time.sleep(0.2)
    # A moment more: nothing may be counted twice late.
    time.sleep(0.5)
    scrapes = [scrape(m) for m in args.metrics]

    passed, failed = 0, 0

    def check(what, actual, want):
        nonlocal passed, failed
        if actual == want:
            passed += 1
        else:
            failed += 1
            print(f"FAIL {what}: {actual} summed over the replicas, expected {want}")

    for flow, e in expect.items():
        f = f'flow="{flow}"'

        def get(family, *labels):
            return total(scrapes, family, f, *labels)

        check(f"{flow} started", get("flowmetrics_flows_started_total"), e["started"])
        for outcome in ["success", "failure", "cancelled"]:
            check(
                f"{flow} completed{{{outcome}}}",
                get("flowmetrics_flows_completed_total", f'outcome="{outcome}"'),
                e[outcome],
            )
        check(
            f"{flow} errors{{failure}}",
            get("flowmetrics_flow_errors_total", 'error_reason="failure"'),
            e["failure"],
        )
        check(
            f"{flow} errors{{incomplete}}",
            get("flowmetrics_flow_errors_total", 'error_reason="incomplete"'),
            e["incomplete"],
        )
        check(
            f"{flow} unmatched ends",
            get("flowmetrics_flow_unmatched_ends_total"),
            e["unmatched"],
        )
        check(
            f"{flow} duration count",
            get("flowmetrics_flow_duration_seconds_count"),
            e["success"],
        )
        check(
            f"{flow} duration sum",
            get("flowmetrics_flow_duration_seconds_sum"),
            e["duration_sum"],
        )
        for step, (reached, to_step, transit) in e["steps"].items():
            st = f'step="{step}"'
            check(f"{flow} steps{{{step}}}", get("flowmetrics_flow_steps_total", st), reached)
            check(
                f"{flow} time to {step} count",
                get("flowmetrics_flow_step_duration_seconds_count", st),
                reached,
            )
            check(
                f"{flow} time to {step} sum",
                get("flowmetrics_flow_step_duration_seconds_sum", st),
                to_step,
            )
            check(
                f"{flow} transit {step} count",
                get("flowmetrics_flow_step_transit_seconds_count", st),
                reached,
            )
            check(
                f"{flow} transit {step} sum",
                get("flowmetrics_flow_step_transit_seconds_sum", st),
                transit,
            )
        for last, n in e["stalled"].items():
            check(
                f"{flow} stalled{{{last}}}",
                get("flowmetrics_flow_stalled_total", f'last_step="{last}"'),
                n,
            )
        for reason in ["after_close", "no_start"]:
            check(
                f"{flow} unmatched steps{{{reason}}}",
                get("flowmetrics_flow_steps_unmatched_total", f'reason="{reason}"'),
                e[reason],
            )
        check(f"{flow} in progress", get("flowmetrics_flows_in_progress"), 0)
        check(f"{flow} dropped", get("flowmetrics_flows_dropped_total"), 0)
        check(
            f"{flow} negative durations",
            get("flowmetrics_flow_negative_durations_total"),
            0,
        )
    check("rejected events", total(scrapes, "flowmetrics_flow_events_rejected_total"), 0)
    # Each replica was fed over its transports.
    for r, s in enumerate(scrapes):
        for transport in ["http", "grpc"]:
            fed = (r, transport) in PROVIDERS
            requests = total([s], "flowmetrics_otlp_requests_total", f'transport="{transport}"')
            check(f"replica {r} fed over {transport}", requests > 0, fed)

    for p in providers:
        p.shutdown()
    print(f"sdk-replicas: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # a client or scrape error: still one summary line
        traceback.print_exc()
        print("sdk-replicas: 0 passed, 1 failed")
        sys.exit(1)
