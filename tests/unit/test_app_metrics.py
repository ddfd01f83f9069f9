"""examples/app's Prometheus exposition, as text (no server needed)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "app"))

from app.metrics import Histogram, exposition  # noqa: E402


def test_a_histogram_counts_cumulatively_up_to_inf():
    h = Histogram("t_seconds", "test", (0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0):
        h.observe(seconds)
    lines = h.lines()
    assert 't_seconds_bucket{le="0.1"} 2' in lines  # le is inclusive
    assert 't_seconds_bucket{le="1.0"} 3' in lines
    assert 't_seconds_bucket{le="+Inf"} 4' in lines
    assert "t_seconds_count 4" in lines and "t_seconds_sum 3.650000" in lines
    assert lines[:2] == ["# HELP t_seconds test", "# TYPE t_seconds histogram"]


def test_the_exposition_holds_counts_and_both_histograms():
    text = exposition({"2xx": 5, "5xx": 1})
    assert 'http_requests_total{status="2xx"} 5\n' in text and 'http_requests_total{status="5xx"} 1\n' in text
    assert "# TYPE http_request_duration_seconds histogram" in text and "# TYPE db_query_duration_seconds histogram" in text
    assert text.endswith("\n")
