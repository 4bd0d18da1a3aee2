"""Prometheus metrics of one app instance (its own registry, so apps in one process do not mix).

``GET /metrics`` exposes, in the Prometheus text format:

* ``sgmft_http_requests_total{endpoint,status}``: requests by endpoint and status code (``499``:
  the client disconnected before its request was read; ``431``: request head too large);
* ``sgmft_http_request_duration_seconds{endpoint}``: latency histogram;
* ``sgmft_queue_depth{queue}``: posts waiting for a forward (``posts``, ``features``);
* ``sgmft_batch_size{queue}``: posts per forward (histogram);
* ``sgmft_batch_duration_seconds{queue}``: time per forward (histogram);
* ``sgmft_in_flight_requests``: requests being handled now.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENDPOINTS = ("/", "/v1/predict", "/v1/predict/batch", "/v1/predict/features", "/v1/model", "/v1/health",
             "/v1/ready", "/metrics", "/docs", "/openapi.json")


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sgmft_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("sgmft_http_request_duration_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=(.002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.queue = Gauge("sgmft_queue_depth", "posts waiting for a forward", ["queue"], registry=r)
        self.batch = Histogram("sgmft_batch_size", "posts per forward", ["queue"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_seconds = Histogram("sgmft_batch_duration_seconds", "time per forward", ["queue"],
                                       buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10), registry=r)
        self.in_flight = Gauge("sgmft_in_flight_requests", "requests being handled", registry=r)
        self._children: dict = {}

    def track_queues(self, batchers: dict) -> None:
        for name, b in batchers.items():
            self.queue.labels(name).set_function(lambda b=b: b.depth)

    @staticmethod
    def endpoint_label(path: str) -> str:
        if path in ENDPOINTS:
            return path
        if path.startswith("/static"):
            return "/static"
        return "other"   # bounded label set: unknown paths are not labels

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        pair = self._children.get(key)
        if pair is None:        # label lookups cached: this runs for every request
            pair = self._children[key] = (self.requests.labels(endpoint, str(status)), self.latency.labels(endpoint))
        pair[0].inc()
        pair[1].observe(seconds)

    def observe_batch(self, queue: str, size: int, seconds: float) -> None:
        self.batch.labels(queue).observe(size)
        self.batch_seconds.labels(queue).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
