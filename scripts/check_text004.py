#!/usr/bin/env python3
"""Parses a Prometheus text format 0.0.4 exposition from stdin with prometheus_client's
0.0.4 parser and prints a JSON summary: families, their types and sample counts. Exits
non-zero, with the parser's error, if the text is not valid."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError with the offending line
        print(f"invalid 0.0.4 text: {e}", file=sys.stderr)
        return 1
    summary = {}
    for f in families:
        if f.name in summary:
            print(f"family {f.name} appears twice", file=sys.stderr)
            return 1
        summary[f.name] = {"type": f.type, "help": f.documentation, "samples": len(f.samples)}
    json.dump(summary, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
