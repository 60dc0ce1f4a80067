#!/usr/bin/env python3
"""Parses an OpenMetrics exposition with the reference parser (prometheus_client's
openmetrics parser) and prints a JSON summary: families, their types, sample counts,
and exemplars. Exits non-zero, with the parser's error, if the text is not valid."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> int:
    text = open(sys.argv[1], encoding="utf-8").read()
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as e:  # the parser raises ValueError with the offending line
        print(f"invalid OpenMetrics: {e}", file=sys.stderr)
        return 1
    summary = {}
    for f in families:
        exemplars = [
            {"labels": s.exemplar.labels, "value": s.exemplar.value}
            for s in f.samples
            if s.exemplar is not None
        ]
        summary[f.name] = {
            "type": f.type,
            "help": f.documentation,
            "samples": len(f.samples),
            "exemplars": exemplars,
        }
    json.dump(summary, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
