"""Prometheus metrics in the text exposition format, without a client library
(the app image holds only Debian's aiohttp and psycopg2).

    http_requests_total{status="2xx"}                  counter, by status class
    http_request_duration_seconds_bucket{le="0.1"}     histogram of request latency
    db_query_duration_seconds_bucket{le="0.01"}        histogram of database query time

Dashboards and alert rules read the histograms with histogram_quantile() and the
counter with rate(); the names follow Prometheus' conventions (base units, _total).
"""

from __future__ import annotations

import bisect
import threading

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


class Histogram:
    """Cumulative buckets, a sum and a count; safe from worker threads."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help_text, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.sum += seconds

    def lines(self) -> list[str]:
        with self._lock:
            counts, total = list(self.counts), self.sum
        out = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip((*self.buckets, float("inf")), counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        out += [f"{self.name}_sum {total:.6f}", f"{self.name}_count {running}"]
        return out


REQUESTS = Histogram("http_request_duration_seconds", "Time to answer an HTTP request.", REQUEST_BUCKETS)
QUERIES = Histogram("db_query_duration_seconds", "Time of one database statement.", QUERY_BUCKETS)


def exposition(status_counts: dict[str, int]) -> str:
    lines = ["# HELP http_requests_total HTTP requests answered, by status class.", "# TYPE http_requests_total counter"]
    lines += [f'http_requests_total{{status="{status}"}} {count}' for status, count in sorted(status_counts.items())]
    return "\n".join(lines + REQUESTS.lines() + QUERIES.lines()) + "\n"
