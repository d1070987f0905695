"""Prometheus metrics of one server (its own registry, so that several servers can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ServerMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("megactx_requests", "Finished requests by finish reason", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("megactx_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("megactx_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("megactx_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=_LATENCY_BUCKETS)
        self.tpot = Histogram("megactx_time_per_output_token_seconds", "Time per output token after the first",
                              registry=r, buckets=_LATENCY_BUCKETS)
        self.running = Gauge("megactx_num_requests_running", "Sequences being computed", registry=r)
        self.waiting = Gauge("megactx_num_requests_waiting", "Sequences waiting to start", registry=r)
        self.kv_usage = Gauge("megactx_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", registry=r)
        self.computed = Gauge("megactx_prompt_tokens_computed", "Prompt tokens computed by the model (total)",
                              registry=r)
        self.cached = Gauge("megactx_prompt_tokens_cached", "Prompt tokens taken from a cache (total)", registry=r)
        self.hit_rate = Gauge("megactx_prefix_cache_hit_rate", "Share of prompt tokens taken from the prefix cache",
                              registry=r)
        self.disk_read = Gauge("megactx_kv_cache_disk_blocks_read", "KV blocks read from --kv-cache-dir (total)",
                               registry=r)
        self.disk_written = Gauge("megactx_kv_cache_disk_blocks_written",
                                  "KV blocks written to --kv-cache-dir (total)", registry=r)

    def bind(self, engine) -> None:
        """Gauges read the engine's state at scrape time."""
        self.running.set_function(lambda: len(engine.scheduler.running))
        self.waiting.set_function(lambda: len(engine.scheduler.waiting))
        self.kv_usage.set_function(lambda: engine.allocator.usage)
        self.computed.set_function(lambda: engine.stats["prompt_tokens_computed"])
        self.cached.set_function(lambda: engine.stats["prompt_tokens_cached"])
        self.hit_rate.set_function(lambda: engine.stats["prompt_tokens_cached"] / max(
            1, engine.stats["prompt_tokens_cached"] + engine.stats["prompt_tokens_computed"]))
        self.disk_read.set_function(lambda: engine.stats["blocks_read"])
        self.disk_written.set_function(lambda: engine.stats["blocks_written"])

    def finished(self, out, now: float) -> None:
        for c in out.outputs:
            self.requests.labels(finish_reason=c.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(out.usage.prompt_tokens)
        self.generation_tokens.inc(out.usage.completion_tokens)
        first = out.metrics.get("first_token_time")
        if first is not None:
            self.ttft.observe(first - out.metrics["arrival"])
            n = out.usage.completion_tokens
            if n > 1:
                self.tpot.observe((now - first) / (n - 1))
