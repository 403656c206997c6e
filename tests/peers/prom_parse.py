"""Parse Prometheus text exposition from stdin with prometheus_client's own parser and print
every sample as one JSON line: {"family", "type", "name", "labels", "value"}.

A parse error exits non-zero with the parser's message: the test fails on a malformed
exposition, not only on a wrong value."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main() -> None:
    text = sys.stdin.read()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            print(json.dumps({
                "family": family.name,
                "type": family.type,
                "unit": family.unit,
                "name": s.name,
                "labels": s.labels,
                "value": s.value,
            }))


if __name__ == "__main__":
    main()
