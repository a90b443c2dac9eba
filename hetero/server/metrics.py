"""Prometheus metrics under vLLM's names with a `hetero:` prefix, in a registry of this app's own
(no global state: two apps in one process do not mix their numbers).

Gauges and the engine's counters are read from `EngineHandle.stats()` when /metrics is scraped;
the latency histograms are observed by the routes as requests finish. The CPU expert engine's
busy share is `rate(hetero:cpu_experts_busy_seconds_total[1m])`."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from hetero.engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)


class _EngineCollector:
    """The engine's state at scrape time."""

    def __init__(self, state) -> None:
        self.state = state

    def collect(self):
        loaded = self.state.loaded
        if loaded is None:
            return
        s = loaded.handle.stats()
        for name, doc, value in (
            ("num_requests_running", "Requests in the engine's running batch.", s.running),
            ("num_requests_waiting", "Requests waiting for admission.", s.waiting),
            ("kv_pages_used", "KV cache pages held by requests or cached.", s.pages_used),
            ("kv_pages_free", "KV cache pages free.", s.pages_free),
            ("kv_page_size_tokens", "Tokens a KV cache page.", s.page_size),
            (
                "kv_cache_usage_perc",
                "Share of KV pages used.",
                s.pages_used / max(s.pages_total, 1),
            ),
        ):
            yield GaugeMetricFamily(f"hetero:{name}", doc, value=value)
        for name, doc, value in (
            ("prompt_tokens", "Prompt tokens of admitted requests.", s.prompt_tokens),
            ("prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.",
             s.prefix_hit_tokens),
            ("generation_tokens", "Tokens generated.", s.generated_tokens),
            ("num_preemptions", "Requests preempted for lack of KV pages.", s.preemptions),
            ("engine_steps", "Engine steps run.", s.steps),
        ):  # fmt: skip
            yield CounterMetricFamily(f"hetero:{name}", doc, value=value)
        if s.cpu_busy_s is not None:
            yield CounterMetricFamily(
                "hetero:cpu_experts_busy_seconds",
                "Seconds the CPU expert engine computed (its busy share is the rate).",
                value=s.cpu_busy_s,
            )


class Metrics:
    def __init__(self, state) -> None:
        self.registry = r = CollectorRegistry()
        r.register(_EngineCollector(state))
        self.ttft = Histogram("hetero:time_to_first_token_seconds", "Arrival to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("hetero:time_per_output_token_seconds",
                              "Mean time between a request's output tokens.",
                              buckets=TPOT_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("hetero:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.started = Counter("hetero:requests_started", "Engine requests submitted.",
                               registry=r)  # fmt: skip
        self.finished = Counter("hetero:request_success", "Engine requests finished, by reason.",
                                ["finished_reason"], registry=r)  # fmt: skip

    def abandoned(self, n: int) -> None:
        """Requests whose client left before they finished (released, finish reason abort)."""
        self.finished.labels("abort").inc(n)

    def requests_started(self, n: int) -> None:
        self.started.inc(n)

    def observe(self, out: RequestOutput, arrived: float) -> None:
        """Called with every output; a request's figures are taken from the outputs that carry
        them (TTFT on the first token, TPOT and the end on the last). `arrived`: when the
        request came in (time.perf_counter)."""
        if out.ttft_s is not None:
            self.ttft.observe(out.ttft_s)
        if not out.finished:
            return
        self.finished.labels(out.finish_reason).inc()
        if out.tpot_s is not None:
            self.tpot.observe(out.tpot_s)
        self.e2e.observe(time.perf_counter() - arrived)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
