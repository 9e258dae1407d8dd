"""What GET /metrics shows, in Prometheus' text format, from a registry of the app's own.

The scheduler's gauges and token totals are read from Scheduler.stats() when scraped; the HTTP layer
observes time to first token and inter-token latency as tokens reach the client, and counts answers by
route and status. A registry per app, never prometheus_client's global one: two apps in one process (tests)
keep separate counts.
"""

from __future__ import annotations

import time
from typing import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector

from heavylift.defaults import SERVE_ITL_BUCKETS_S, SERVE_TTFT_BUCKETS_S
from .events import Delta, Stats

PREFIX = "heavylift"


class _SchedulerCollector:
    """The scheduler's state at scrape time; nothing while the model loads."""

    def __init__(self, stats: Callable[[], Stats | None]):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        if stats is None:
            return
        for name, value, doc in (("requests_running", stats.running, "Sequences prefilling or decoding."),
                                 ("requests_waiting", stats.waiting, "Requests queued for a free sequence slot."),
                                 ("kv_slots_used", stats.slots_used, "KV cache slots holding a sequence."),
                                 ("kv_slots_total", stats.slots_total, "KV cache slots: --max-seqs.")):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        yield CounterMetricFamily(f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled.", value=stats.prompt_tokens_total)
        yield CounterMetricFamily(f"{PREFIX}_generated_tokens", "Tokens generated.",
                                  value=stats.generated_tokens_total)


class Metrics:
    def __init__(self, stats: Callable[[], Stats | None]):
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(stats))
        ProcessCollector(registry=self.registry)  # the server's resident memory, CPU time, open files
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP answers by route and status code.",
                                ["route", "status"], registry=self.registry)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From a request's arrival to its first "
                              "generated token.", buckets=SERVE_TTFT_BUCKETS_S, registry=self.registry)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Between a request's generated tokens.",
                             buckets=SERVE_ITL_BUCKETS_S, registry=self.registry)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper's Accept header asks for: (body, content type)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    async def timed(self, events: AsyncIterator, arrived: float) -> AsyncIterator:
        """`events` passed through, observing the time to the first generated token from `arrived`
        (time.perf_counter()) and the latency of each token after it (a Delta of k tokens: k equal shares)."""
        last = None
        async for event in events:
            if isinstance(event, Delta) and event.tokens:
                now = time.perf_counter()
                if last is None:
                    self.ttft.observe(now - arrived)
                else:
                    for _ in event.tokens:
                        self.itl.observe((now - last) / len(event.tokens))
                last = now
            yield event
