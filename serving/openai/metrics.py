"""Prometheus text for /metrics: queue sizes, token counters, TTFT/TPOT histograms, requests per adapter."""

from __future__ import annotations

from alphalora.serving.engine.async_engine import AsyncEngine, Histogram


def _histogram(name: str, help_text: str, histogram: Histogram) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    for bound, count in zip(histogram.bounds, histogram.buckets, strict=True):
        lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
    lines += [f'{name}_bucket{{le="+Inf"}} {histogram.count}', f"{name}_sum {histogram.total}",
              f"{name}_count {histogram.count}"]
    return lines


def render_metrics(engine: AsyncEngine) -> str:
    stats = engine.stats
    blocks = engine.engine.blocks
    lines = [
        "# HELP alphalora_num_requests_running Sequences in the running batch.",
        "# TYPE alphalora_num_requests_running gauge",
        f"alphalora_num_requests_running {engine.num_running}",
        "# HELP alphalora_num_requests_waiting Sequences waiting for admission.",
        "# TYPE alphalora_num_requests_waiting gauge",
        f"alphalora_num_requests_waiting {engine.num_waiting}",
        "# HELP alphalora_prompt_tokens_total Prompt tokens admitted.",
        "# TYPE alphalora_prompt_tokens_total counter",
        f"alphalora_prompt_tokens_total {stats.prompt_tokens_total}",
        "# HELP alphalora_generation_tokens_total Tokens generated.",
        "# TYPE alphalora_generation_tokens_total counter",
        f"alphalora_generation_tokens_total {stats.generation_tokens_total}",
        "# HELP alphalora_kv_cache_usage KV-cache blocks held by sequences, as a share of the pool (cached blocks "
        "no sequence holds count as free).",
        "# TYPE alphalora_kv_cache_usage gauge",
        f"alphalora_kv_cache_usage {1 - blocks.num_free_blocks / blocks.num_blocks:.6f}",
        "# HELP alphalora_prefix_cache_blocks KV-cache blocks registered in the prefix cache.",
        "# TYPE alphalora_prefix_cache_blocks gauge",
        f"alphalora_prefix_cache_blocks {blocks.num_cached_blocks}",
        "# HELP alphalora_prefix_cache_queries_total Prompt tokens looked up in the prefix cache.",
        "# TYPE alphalora_prefix_cache_queries_total counter",
        f"alphalora_prefix_cache_queries_total {engine.engine.scheduler.prefix_queried_tokens}",
        "# HELP alphalora_prefix_cache_hits_total Prompt tokens served from the prefix cache.",
        "# TYPE alphalora_prefix_cache_hits_total counter",
        f"alphalora_prefix_cache_hits_total {engine.engine.scheduler.prefix_hit_tokens}",
        "# HELP alphalora_requests_total Sequences admitted, by adapter.",
        "# TYPE alphalora_requests_total counter",
    ]
    lines += [f'alphalora_requests_total{{adapter="{name}"}} {count}'
              for name, count in sorted(stats.requests_by_adapter.items())]
    lines += _histogram("alphalora_time_to_first_token_seconds", "Time to first token.", stats.ttft_seconds)
    lines += _histogram("alphalora_time_per_output_token_seconds", "Time between output tokens.", stats.tpot_seconds)
    return "\n".join(lines) + "\n"
