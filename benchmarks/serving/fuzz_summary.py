"""Per-route counts from a ``schemathesis run --report ndjson`` report: cases, positive
(valid-by-schema) cases, and answers by status, so a run's reach (how many cases got a 200 on
a generation route, i.e. reached the model) and its 5xx can be recorded.

Each case is counted once, from the ``ScenarioFinished`` events' recorded interactions.

    python -m benchmarks.serving.fuzz_summary schemathesis-report/events.ndjson
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from urllib.parse import urlsplit


def summarize(lines: list[str]) -> dict[str, Counter]:
    routes: dict[str, Counter] = defaultdict(Counter)
    seen: set[str] = set()
    for line in lines:
        finished = json.loads(line).get("ScenarioFinished")
        if not finished or finished["status"] == "skip":
            continue
        rec = finished["recorder"]
        for case_id, it in rec.get("interactions", {}).items():
            if case_id in seen or it.get("response") is None:
                continue
            seen.add(case_id)
            route = f"{it['request']['method']} {urlsplit(it['request']['uri']).path}"
            status = it["response"]["status_code"]
            case = rec["cases"].get(case_id, {}).get("value", {})
            mode = case.get("meta", {}).get("generation", {}).get("mode", "unknown")
            routes[route].update(["cases", mode, str(status), f"{status // 100}xx"])
    return routes


def main() -> None:
    with open(sys.argv[1]) as f:
        routes = summarize(f.readlines())
    total: Counter = Counter()
    for route, c in sorted(routes.items()):
        total.update(c)
        if set(c) - {"cases", "negative", "405", "4xx"}:  # skip "method not allowed" probes
            statuses = {k: v for k, v in sorted(c.items()) if k.isdigit()}
            print(f"{route:30s} cases {c['cases']:5d} positive {c['positive']:4d} {statuses}")
    print(f"total: {total['cases']} cases, {total['5xx']} 5xx, {total['200']} 200")


if __name__ == "__main__":
    main()
