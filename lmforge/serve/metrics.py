"""Prometheus metrics for `GET /metrics`: what an operator watches on a serving dashboard.

Counters and histograms are updated as responses and requests finish, and each finished request
logs its usage (prompt and generated tokens, time to first token) on the `lmforge.serve`
logger, so a log shows the bill per request and /metrics the running totals; the engine's live state
(queue length, running sequences, KV blocks, prefix-cache hit rate) is read from
`AsyncLLMEngine.stats` at scrape time. Each app has its own registry, so several servers (or
tests) in one process never mix their numbers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from lmforge.engine.llm_engine import EngineStats
from lmforge.generation.generate import RequestOutput

logger = logging.getLogger("lmforge.serve")

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Gauges read from the engine when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.stats = stats

    def collect(self):
        stats = self.stats()
        if stats is None:  # still loading
            return
        for name, help, value in (
                ("lmforge_requests_waiting", "Requests queued for the engine", stats.num_waiting),
                ("lmforge_sequences_running", "Sequences in the running batch", stats.num_running),
                ("lmforge_kv_blocks_used", "Paged KV-cache blocks held by sequences", stats.kv_blocks_used),
                ("lmforge_kv_blocks_total", "Paged KV-cache blocks in the pool", stats.kv_blocks_total),
                ("lmforge_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / looked up",
                 stats.prefix_cache_hit_rate),
                ("lmforge_preemptions", "Sequences preempted (recomputed later) so far", stats.num_preemptions)):
            yield GaugeMetricFamily(name, help, value=value)


class ResponseCounter:
    """ASGI middleware counting responses by route and status. (Starlette's BaseHTTPMiddleware would hide
    client disconnects from the routes, which must see them to abort abandoned requests.)"""

    def __init__(self, app, counter: Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def send_and_note_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:  # the router put the matched route in the shared scope
            route = getattr(scope.get("route"), "path", "unmatched")
            self.counter.labels(route=route, status=str(status["code"])).inc()


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.registry = CollectorRegistry()
        self.responses = Counter("lmforge_http_responses", "HTTP responses by route and status",
                                 ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("lmforge_generation_tokens", "Generated tokens of finished requests",
                                         registry=self.registry)
        self.time_to_first_token = Histogram("lmforge_time_to_first_token_seconds", "Arrival to first token",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("lmforge_inter_token_latency_seconds",
                                             "Mean time between output tokens, per request",
                                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(stats))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    async def track(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Pass a request's deltas through, recording its figures when it finishes."""
        generated = 0
        async for delta in stream:
            generated += sum(len(part.token_ids) for part in delta.outputs)
            if delta.finished:
                self.prompt_tokens.inc(len(delta.prompt_token_ids))
                self.generation_tokens.inc(generated)
                _log_usage(delta, generated)
                metrics = delta.metrics
                if metrics is not None and metrics.time_to_first_token is not None:
                    self.time_to_first_token.observe(metrics.time_to_first_token)
                if metrics is not None and metrics.time_per_output_token is not None:
                    self.inter_token_latency.observe(metrics.time_per_output_token)
            yield delta


def _log_usage(output: RequestOutput, generated: int) -> None:
    """One line per finished request: its tokens and timings."""
    metrics = output.metrics
    timing = ""
    if metrics is not None and metrics.time_to_first_token is not None:
        timing = f", first token after {metrics.time_to_first_token:.3f} s"
    logger.info("request %s: %d prompt + %d generated tokens%s", output.request_id, len(output.prompt_token_ids),
                generated, timing)
