"""/metrics in Prometheus' text format: queue sizes, token counters, TTFT/TPOT histograms, requests per adapter.

The engine keeps plain counters (it knows nothing of HTTP); this collector turns them into metric families
at scrape time, and `prometheus_client` writes the text, escaping label values (adapter names are the
user's) as the format requires.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from alphalora.serving.engine.async_engine import AsyncEngine, Histogram


def _histogram(name: str, help_text: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(repr(float(bound)), count) for bound, count in zip(histogram.bounds, histogram.buckets, strict=True)]
    return HistogramMetricFamily(name, help_text, buckets=[*buckets, ("+Inf", histogram.count)],
                                 sum_value=histogram.total)


class EngineCollector:
    """Reads an AsyncEngine's counters when Prometheus scrapes."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        engine, stats = self.engine, self.engine.stats
        blocks, scheduler = engine.engine.blocks, engine.engine.scheduler
        yield GaugeMetricFamily("alphalora_num_requests_running", "Sequences in the running batch.",
                                value=engine.num_running)
        yield GaugeMetricFamily("alphalora_num_requests_waiting", "Sequences waiting for admission.",
                                value=engine.num_waiting)
        yield CounterMetricFamily("alphalora_prompt_tokens", "Prompt tokens admitted.", value=stats.prompt_tokens_total)
        yield CounterMetricFamily("alphalora_generation_tokens", "Tokens generated.",
                                  value=stats.generation_tokens_total)
        yield GaugeMetricFamily("alphalora_kv_cache_usage", "KV-cache blocks held by sequences, as a share of the "
                                "pool (cached blocks no sequence holds count as free).",
                                value=1 - blocks.num_free_blocks / blocks.num_blocks)
        yield GaugeMetricFamily("alphalora_prefix_cache_blocks", "KV-cache blocks registered in the prefix cache.",
                                value=blocks.num_cached_blocks)
        yield CounterMetricFamily("alphalora_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=scheduler.prefix_queried_tokens)
        yield CounterMetricFamily("alphalora_prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                                  value=scheduler.prefix_hit_tokens)
        requests = CounterMetricFamily("alphalora_requests", "Sequences admitted, by adapter.", labels=["adapter"])
        for name, count in sorted(stats.requests_by_adapter.items()):
            requests.add_metric([name], count)
        yield requests
        yield _histogram("alphalora_time_to_first_token_seconds", "Time to first token.", stats.ttft_seconds)
        yield _histogram("alphalora_time_per_output_token_seconds", "Time between output tokens.", stats.tpot_seconds)


def metrics_registry(engine: AsyncEngine) -> CollectorRegistry:
    """A registry of this server's own (not the process-wide default one, so that several apps can coexist)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return registry


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The scrape's body and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
