"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: no client library needed.

Counters and histograms are updated from the event loop and read by `GET /metrics`; gauges (queue depth, running
requests, loaded adapters) are read from the engine when the page is rendered. A lock keeps the page consistent.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return "{" + body + "}"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics).

    Args:
        buckets: Upper bounds, increasing (`+Inf` is added).
    """

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one value."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        """The `_bucket`, `_sum` and `_count` samples."""
        out, total = [], 0
        for bound, n in zip([*self.bounds, float("inf")], self.counts):
            total += n
            out.append(f"{name}_bucket{_labels({**labels, 'le': _num(float(bound))})} {total}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """The server's counters and histograms.

    Args:
        gauges: Called at render time; returns `{name: (help, value)}` for the gauges (engine state).
    """

    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]] | None = None) -> None:
        self.lock = threading.Lock()
        self.gauges = gauges or (lambda: {})
        # name -> (help, {label tuple: value})
        self.counters: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]] = {}
        self.histograms: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], Histogram]]] = {}
        for name, text in (
            ("nomoat_requests_total", "HTTP requests to the API, by endpoint and status code."),
            ("nomoat_requests_cancelled_total", "Generations cancelled because the client went away."),
            ("nomoat_requests_rejected_total", "Requests refused because the queue (or adapter slots) was full."),
            ("nomoat_prompt_tokens_total", "Prompt tokens of finished generations."),
            ("nomoat_completion_tokens_total", "Generated tokens of finished generations."),
            ("nomoat_adapter_loads_total", "Adapters loaded into memory."),
            ("nomoat_adapter_evictions_total", "Adapters evicted from memory (least recently used first)."),
        ):
            self.counters[name] = (text, {})
        for name, text in (
            ("nomoat_request_duration_seconds", "Time from receiving a generation request to its last token."),
            ("nomoat_time_to_first_token_seconds", "Time from queueing a generation to its first token."),
        ):
            self.histograms[name] = (text, {})

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add to a counter."""
        key = tuple(sorted(labels.items()))
        with self.lock:
            series = self.counters[name][1]
            series[key] = series.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record a value in a histogram."""
        key = tuple(sorted(labels.items()))
        with self.lock:
            series = self.histograms[name][1]
            series.setdefault(key, Histogram()).observe(value)

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (0 when never incremented)."""
        with self.lock:
            return self.counters[name][1].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        """The whole page in the Prometheus text format."""
        lines: list[str] = []
        with self.lock:
            for name, (text, series) in self.counters.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} counter"]
                for key, value in sorted(series.items()):
                    lines.append(f"{name}{_labels(dict(key))} {_num(value)}")
                if not series:
                    lines.append(f"{name} 0.0")
            for name, (text, series) in self.histograms.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
                for key, hist in sorted(series.items()):
                    lines += hist.lines(name, dict(key))
        for name, (text, value) in self.gauges().items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {_num(float(value))}"]
        return "\n".join(lines) + "\n"
