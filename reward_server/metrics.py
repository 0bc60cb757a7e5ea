"""Prometheus metrics of one server instance (its own registry, so several can live in a process)."""

from __future__ import annotations

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
            "advgrpo_batch_queue_wait_seconds", "Wait of a batch's oldest item", ["model"],
            buckets=_LATENCY_BUCKETS, registry=r,
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
            "advgrpo_discriminator_reference_score", "Mean reference reward after the last update", ["model"],
            registry=r,
        )
        self.generated_score = Gauge(
            "advgrpo_discriminator_generated_score", "Mean generated reward after the last update", ["model"],
            registry=r,
        )
        self.ready = Gauge("advgrpo_ready", "1 when all models are loaded and serving", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
