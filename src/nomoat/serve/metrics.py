"""The server's Prometheus metrics, kept and written by `prometheus_client` in a registry of their own per app.

Counters and histograms are updated from the event loop; gauges (queue depth, running requests, loaded adapters) are
read from the engine when the page is scraped. `render` answers in the format the scraper asks for (the Prometheus
text format, or OpenMetrics when its `Accept` header says so). prometheus_client also writes a `*_created` sample (the
time the series began) beside each counter and histogram.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# name -> (help, label names); prometheus_client adds the `_total` suffix of a counter itself.
COUNTERS = {
    "nomoat_requests_total": ("HTTP requests to the API, by endpoint and status code.", ("endpoint", "status")),
    "nomoat_requests_cancelled_total": ("Generations cancelled because the client went away.", ("endpoint",)),
    "nomoat_requests_rejected_total": ("Requests refused because the queue (or adapter slots) was full.", ("reason",)),
    "nomoat_prompt_tokens_total": ("Prompt tokens of finished generations.", ()),
    "nomoat_completion_tokens_total": ("Generated tokens of finished generations.", ()),
    "nomoat_adapter_loads_total": ("Adapters loaded into memory.", ()),
    "nomoat_adapter_evictions_total": ("Adapters evicted from memory (least recently used first).", ()),
}
HISTOGRAMS = {
    "nomoat_request_duration_seconds": ("Time from receiving a generation request to its last token.", ("endpoint",)),
    "nomoat_time_to_first_token_seconds": ("Time from queueing a generation to its first token.", ()),
}

Gauges = Callable[[], dict[str, tuple[str, float]]]


class _EngineGauges:
    """A collector that reads the gauges at scrape time."""

    def __init__(self, gauges: Gauges) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for name, (text, value) in self.gauges().items():
            yield GaugeMetricFamily(name, text, value=float(value))


class Metrics:
    """The server's counters, histograms and gauges.

    Args:
        gauges: Called at scrape time; returns `{name: (help, value)}` for the gauges (engine state).
    """

    def __init__(self, gauges: Gauges | None = None) -> None:
        self.registry = CollectorRegistry()
        self.counters = {name: Counter(name, text, labels, registry=self.registry)
                         for name, (text, labels) in COUNTERS.items()}  # fmt: skip
        self.histograms = {name: Histogram(name, text, labels, registry=self.registry, buckets=LATENCY_BUCKETS)
                           for name, (text, labels) in HISTOGRAMS.items()}  # fmt: skip
        self.registry.register(_EngineGauges(gauges or (lambda: {})))

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        """Add to a counter."""
        counter = self.counters[name]
        (counter.labels(**labels) if labels else counter).inc(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record a value in a histogram."""
        histogram = self.histograms[name]
        (histogram.labels(**labels) if labels else histogram).observe(value)

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (0 when never incremented)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The page and its content type, in the format `accept` (a request's `Accept` header) asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
