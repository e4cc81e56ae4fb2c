"""Prometheus metrics, named like vLLM's with a `treespec:` prefix, in a registry owned by one app.

Engine totals (tokens, drafts, acceptances) are read from the AsyncEngine's snapshot at scrape time;
latency histograms are observed by the server as each request's deltas arrive.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from treespec.engine.async_engine import EngineSnapshot, RequestDelta

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)


class EngineCollector(Collector):
    """Gauges and counters straight from the engine's totals (no double bookkeeping in the server)."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot | None], model_name: str) -> None:
        self._snapshot, self._model = snapshot, model_name

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot() or EngineSnapshot()
        stats, labels = snap.stats, ["model_name"]
        yield self._gauge("num_requests_running", "Requests in the running batch.", snap.num_running)
        yield self._gauge("num_requests_waiting", "Requests in the waiting queue.", snap.num_waiting)
        for name, doc, value in (
                ("prompt_tokens", "Prompt tokens admitted.", stats.num_prompt_tokens),
                ("generation_tokens", "Tokens generated.", stats.num_generation_tokens),
                ("spec_decode_num_drafts", "Steps that verified at least one draft token.", stats.num_drafts),
                ("spec_decode_num_draft_tokens", "Draft tokens verified.", stats.num_draft_tokens),
                ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", stats.num_accepted_tokens)):
            c = CounterMetricFamily(f"treespec:{name}", doc, labels=labels)
            c.add_metric([self._model], value)
            yield c
        per_pos = CounterMetricFamily("treespec:spec_decode_num_accepted_tokens_per_pos",
                                      "Steps that accepted a draft token at this tree depth (0 = first).",
                                      labels=["model_name", "position"])
        for pos, count in enumerate(stats.accepted_per_position):
            per_pos.add_metric([self._model, str(pos)], count)
        yield per_pos
        done = CounterMetricFamily("treespec:request_success", "Finished requests (choices) by finish reason.",
                                   labels=["model_name", "finished_reason"])
        for reason, count in snap.finished.items():
            done.add_metric([self._model, reason.value], count)
        yield done

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(f"treespec:{name}", doc, labels=["model_name"])
        g.add_metric([self._model], value)
        return g


class ServerMetrics:
    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot | None]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(snapshot, model_name))
        kw = {"labelnames": ["model_name"], "registry": self.registry}
        self.ttft = Histogram("treespec:time_to_first_token_seconds", "Arrival to first token.",
                              buckets=_LATENCY_BUCKETS, **kw).labels(model_name)
        self.itl = Histogram("treespec:inter_token_latency_seconds",
                             "Time per output token after the first (a step's gap shared by its tokens).",
                             buckets=_LATENCY_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram("treespec:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=_LATENCY_BUCKETS, **kw).labels(model_name)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)


class RequestTimer:
    """Observes one request's latencies from the publish times of its deltas."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self._last: dict[int, float] = {}  # choice index -> time of its last token

    def observe(self, delta: RequestDelta) -> None:
        if delta.token_ids:
            last = self._last.get(delta.index)
            if last is None:
                self.metrics.ttft.observe(max(0.0, delta.time - self.arrival))
            else:
                gap = max(0.0, delta.time - last) / len(delta.token_ids)
                for _ in delta.token_ids:
                    self.metrics.itl.observe(gap)
            self._last[delta.index] = delta.time
        if delta.finish_reason is not None:
            self.metrics.e2e.observe(max(0.0, delta.time - self.arrival))
