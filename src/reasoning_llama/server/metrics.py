"""Prometheus metrics of one app, in a registry of its own (two apps in one process never collide)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from reasoning_llama.generation import GenerationResult

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "reasoning_llama_requests",
            "API requests by route and HTTP status.",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("reasoning_llama_prompt_tokens", "Prompt tokens admitted.", registry=r)
        self.completion_tokens = Counter(
            "reasoning_llama_completion_tokens",
            "Tokens generated (reasoning, header and answer).",
            registry=r,
        )
        self.finished = Counter(
            "reasoning_llama_generations",
            "Finished generations by finish reason.",
            ["finish_reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "reasoning_llama_queue_depth", "Requests waiting for a batch slot.", registry=r
        )
        self.active_slots = Gauge("reasoning_llama_active_slots", "Batch slots generating now.", registry=r)
        self.time_to_first_token = Histogram(
            "reasoning_llama_time_to_first_token_seconds",
            "From arrival to the first generated text (queueing included).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_rate = Histogram(
            "reasoning_llama_decode_tokens_per_second",
            "Per-request decode speed.",
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "reasoning_llama_generation_seconds",
            "From arrival to the last token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def watch_engine(self, queue_depth: Callable[[], float], active: Callable[[], float]) -> None:
        """Read the gauges from the engine at scrape time rather than tracking them by hand."""
        self.queue_depth.set_function(queue_depth)
        self.active_slots.set_function(active)

    def record_generation(self, result: GenerationResult) -> None:
        """One finished generation, timed by the engine (`result.timings`)."""
        timings = result.timings
        self.completion_tokens.inc(result.completion_tokens)
        self.finished.labels(result.finish_reason).inc()
        self.request_duration.observe(timings["total_s"])
        if "time_to_first_text_s" in timings:
            self.time_to_first_token.observe(timings["time_to_first_text_s"])
        rate = timings.get("decode_tokens_per_s")
        if rate:
            self.decode_rate.observe(rate)

    def render(self) -> bytes:
        return generate_latest(self.registry)
