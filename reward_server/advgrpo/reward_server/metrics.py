"""Prometheus metrics of one server instance (its own registry, so several can live in a process)."""

from __future__ import annotations

import threading
from typing import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpc_requests = Counter(
            "advgrpo_rpc_requests", "RPCs handled, by method and status code", ["method", "code"], registry=r
        )
        self.rpc_latency = Histogram(
            "advgrpo_rpc_latency_seconds", "RPC latency", ["method"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.images_scored = Counter("advgrpo_images_scored", "Images scored, by model", ["model"], registry=r)
        self.batch_size = Histogram(
            "advgrpo_batch_size_images", "Images per model call", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "advgrpo_batch_requests", "Requests merged per model call", ["model"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "advgrpo_batch_queue_wait_seconds",
            "Wait of a batch's oldest item",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_run = Histogram(
            "advgrpo_batch_run_seconds", "Model time per batch", ["model"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("advgrpo_queue_depth_images", "Images waiting, by model", ["model"], registry=r)
        self.model_version = Gauge("advgrpo_model_version", "Model version", ["model"], registry=r)
        self.updates = Counter(
            "advgrpo_discriminator_updates", "Acknowledged discriminator updates", ["model"], registry=r
        )
        self.update_loss = Gauge("advgrpo_discriminator_loss", "Loss of the last update", ["model"], registry=r)
        self.update_accuracy = Gauge(
            "advgrpo_discriminator_accuracy", "Accuracy after the last update", ["model"], registry=r
        )
        self.reference_score = Gauge(
            "advgrpo_discriminator_reference_score",
            "Mean reference reward after the last update",
            ["model"],
            registry=r,
        )
        self.generated_score = Gauge(
            "advgrpo_discriminator_generated_score",
            "Mean generated reward after the last update",
            ["model"],
            registry=r,
        )
        self.ready = Gauge("advgrpo_ready", "1 when all models are loaded and serving", registry=r)
        self.concurrent_rpcs = Gauge(
            "advgrpo_concurrent_rpcs", "RewardService RPCs in progress (limit: server.max_concurrent_rpcs)", registry=r
        )
        # Fail closed, and say so (advgrpo.reward_server.score_watch).
        self.model_failures = Counter(
            "advgrpo_model_failures", "Model calls that raised (their requests failed)", ["model"], registry=r
        )
        self.nonfinite_scores = Counter(
            "advgrpo_nonfinite_scores",
            "Images scored NaN or infinite (their requests failed)",
            ["model", "kind"],
            registry=r,
        )
        self.groups_scored = Counter(
            "advgrpo_groups_scored", "Groups of two or more images scored, by model", ["model"], registry=r
        )
        self.zero_variance_groups = Counter(
            "advgrpo_zero_variance_groups",
            "Groups whose scores from this model are all equal (GRPO learns nothing from them)",
            ["model"],
            registry=r,
        )
        self.model_scores_constant = Gauge(
            "advgrpo_model_scores_constant",
            "1 when the model gave one value to every image of its recent requests",
            ["model"],
            registry=r,
        )
        self.inflight_decoded_bytes = Gauge(
            "advgrpo_inflight_decoded_bytes",
            "Decoded image bytes held by requests in flight (budget: server.max_inflight_decoded_bytes)",
            registry=r,
        )
        # Mirrors of RewardModel.stats() (see record_model_stats): {stat key: metric}.
        self.model_counters = {
            "feature_cache_hits": Counter(
                "advgrpo_feature_cache_hits", "Feature-cache lookups that skipped the backbone", ["model"], registry=r
            ),
            "feature_cache_misses": Counter(
                "advgrpo_feature_cache_misses", "Feature-cache lookups that ran the backbone", ["model"], registry=r
            ),
            "feature_cache_evictions": Counter(
                "advgrpo_feature_cache_evictions", "Feature-cache entries evicted to make room", ["model"], registry=r
            ),
        }
        self.model_gauges = {
            "feature_cache_bytes": Gauge(
                "advgrpo_feature_cache_bytes", "Bytes of tensors held by the feature cache", ["model"], registry=r
            ),
            "feature_cache_entries": Gauge(
                "advgrpo_feature_cache_entries", "Images held by the feature cache", ["model"], registry=r
            ),
        }
        self._stat_totals: dict[tuple[str, str], float] = {}
        self._stat_lock = threading.Lock()

    def record_model_stats(self, model: str, stats: Mapping[str, float]) -> None:
        """Copies a model's ``stats()`` into the metrics; keys without a metric are ignored.

        Counter stats are totals kept by the model: each call adds the rise since the last one
        (a total that fell, e.g. a rebuilt model, counts from zero again).
        """
        with self._stat_lock:  # models report from their own threads
            for key, value in stats.items():
                if key in self.model_counters:
                    last = self._stat_totals.get((model, key), 0.0)
                    delta = value - last if value >= last else value
                    self._stat_totals[(model, key)] = value
                    self.model_counters[key].labels(model).inc(delta)
                elif key in self.model_gauges:
                    self.model_gauges[key].labels(model).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
