"""/metrics in Prometheus' text format: queue sizes, token counters, TTFT/TPOT histograms, requests per adapter.

The engine keeps plain counters (it knows nothing of HTTP); this collector turns them into metric families
at scrape time, and `prometheus_client` writes the text, escaping label values (adapter names are the
user's) as the format requires. Besides its own `alphalora_*` names it writes the `vllm:` gauges that
LoRA-aware routers read (the Kubernetes Gateway API Inference Extension's model server protocol): queue
sizes, KV-cache usage and `vllm:lora_requests_info`, so the server drops in where vLLM was.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from alphalora.serving.engine.adapters import registered_name
from alphalora.serving.engine.async_engine import AsyncEngine, Histogram


def _histogram(name: str, help_text: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(repr(float(bound)), count) for bound, count in zip(histogram.bounds, histogram.buckets, strict=True)]
    return HistogramMetricFamily(name, help_text, buckets=[*buckets, ("+Inf", histogram.count)],
                                 sum_value=histogram.total)


class EngineCollector:
    """Reads an AsyncEngine's counters when Prometheus scrapes."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name

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
                                value=blocks.usage)
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
        yield from self._vllm_gauges()

    def _vllm_gauges(self):
        """vLLM's names, labels and meanings for the gauges routers read."""
        engine, labels = self.engine, ["model_name"]
        scheduler, blocks = engine.engine.scheduler, engine.engine.blocks
        for name, help_text, value in [
                ("vllm:num_requests_running", "Number of requests in model execution batches.", engine.num_running),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", engine.num_waiting),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", blocks.usage)]:
            gauge = GaugeMetricFamily(name, help_text, labels=labels)
            gauge.add_metric([self.model_name], value)
            yield gauge
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
        info.add_metric([str(engine.engine.config.max_loras), _adapter_names(list(scheduler.waiting)),
                         _adapter_names(list(scheduler.running))], time.time())
        yield info


def _adapter_names(sequences) -> str:
    """The adapters in use, comma-joined (an unloaded adapter's sequences under its own name)."""
    names = {registered_name(seq.adapter) for seq in sequences if seq.adapter}
    return ",".join(sorted(names))


def metrics_registry(engine: AsyncEngine, model_name: str) -> CollectorRegistry:
    """A registry of this server's own (not the process-wide default one, so that several apps can coexist)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name))
    return registry


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The scrape's body and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
