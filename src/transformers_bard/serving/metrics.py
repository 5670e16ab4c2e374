"""`GET /metrics` of `transformers-bard serve`: counters kept by the HTTP layer, written in Prometheus' text
exposition format (version 0.0.4) by hand, so that serving needs no metrics library.

Counters are updated from the event loop's thread only; gauges are read from the engine when scraped.
"""

from __future__ import annotations

import bisect
import collections

PREFIX = "transformers_bard"
# upper bounds (seconds) of the latency histogram's buckets; +Inf is added when written
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Chat-completion requests by final HTTP status, completion tokens sent, and request latency."""

    def __init__(self):
        self.requests: collections.Counter = collections.Counter()  # status code -> requests
        self.generated_tokens = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket (not cumulative), +Inf last
        self.latency_sum = 0.0

    def finish(self, status: int, seconds: float) -> None:
        """One chat-completion request ended with `status` after `seconds` (a stream: when its last event was
        sent, or its client left)."""
        self.requests[int(status)] += 1
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def render(self, *, waiting: int, running: int, engine_up: bool, tokens_per_forward: float | None) -> str:
        """The exposition text; `waiting`, `running`, `engine_up` and `tokens_per_forward` are the gauges now."""
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP {PREFIX}_{name} {help_text}")
            lines.append(f"# TYPE {PREFIX}_{name} {kind}")
            for suffix, labels, value in samples:
                label_text = "{" + ",".join(f'{key}="{val}"' for key, val in labels) + "}" if labels else ""
                lines.append(f"{PREFIX}_{name}{suffix}{label_text} {_number(value)}")

        metric("requests_total", "counter", "Chat completion requests answered, by HTTP status (499: the client "
               "left).", [("", (("status", str(status)),), count) for status, count in sorted(self.requests.items())])
        metric("generated_tokens_total", "counter", "Completion tokens sent to clients.",
               [("", (), self.generated_tokens)])
        metric("queue_length", "gauge", "Requests accepted and not yet decoding (being prepared or waiting for a "
               "row).", [("", (), waiting)])
        metric("running_rows", "gauge", "Requests decoding now.", [("", (), running)])
        metric("engine_up", "gauge", "1 while the engine's thread runs, 0 once it died.", [("", (), int(engine_up))])
        if tokens_per_forward is not None:
            metric("tokens_per_forward", "gauge", "Tokens per decoding forward over the rows that finished "
                   "(DESIGN 4.5).", [("", (), tokens_per_forward)])
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.latency_counts):
            cumulative += count
            buckets.append(("_bucket", (("le", _number(bound)),), cumulative))
        metric("request_duration_seconds", "histogram", "Chat completion latency, from arrival to the last byte.",
               [*buckets, ("_sum", (), self.latency_sum), ("_count", (), cumulative)])
        return "\n".join(lines) + "\n"


def _number(value) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))
