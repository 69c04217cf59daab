"""Prometheus metrics (prometheus_client, one registry per app so tests can build several)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics, generate_latest

disable_created_metrics()  # the *_created series double the output and no dashboard reads them

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# the paths that get their own label; anything else is "other" (no label per random URL)
ROUTES = ("/", "/health/live", "/health/ready", "/v1/metadata", "/v1/predict", "/metrics", "/docs", "/openapi.json")
STATUS_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
                413: "too_large", 415: "unsupported_media_type", 422: "bad_image", 503: "unavailable"}


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("xray_http_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "status"], registry=r)
        self.errors = Counter("xray_errors", "Failed requests and images by kind", ["kind"], registry=r)
        self.latency = Histogram("xray_http_request_duration_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("xray_images", "Images by outcome (classified, error, ood)", ["outcome"], registry=r)
        self.batch_size = Histogram("xray_batch_size", "Images per onnxruntime run", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.inference = Histogram("xray_inference_seconds", "onnxruntime time per batch", buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.decode = Histogram("xray_decode_seconds", "Decode + preprocess time per image", buckets=LATENCY_BUCKETS,
                                registry=r)
        self.in_flight = Gauge("xray_requests_in_flight", "Predict requests admitted and not yet answered",
                               registry=r)
        self.queue_depth = Gauge("xray_queue_depth", "Images decoded and waiting for the model", registry=r)
        self.model = Info("xray_model", "The model being served", registry=r)
        self.outbox_backlog = Gauge("xray_dicom_outbox_backlog", "DICOM reports on disk waiting for the PACS",
                                    registry=r)
        self.outbox_oldest = Gauge("xray_dicom_outbox_oldest_age_seconds",
                                   "Age of the oldest DICOM report waiting for the PACS (0: none)", registry=r)

    def observe_request(self, path: str, method: str, status: int, seconds: float):
        route = route_label(path)
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(STATUS_KINDS.get(status, "internal" if status >= 500 else "client")).inc()

    def observe_batch(self, size: int, seconds: float):
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"
