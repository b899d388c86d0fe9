"""`GET /metrics`: the server in Prometheus' text format, for a scraper and its dashboards.

- Counters: the engine's (`/health` `stats`) as they stand at the scrape, each
  `qwen3_tts_<name>_total` (requests, finished, cancelled, timeouts, errors, rejected_queue_full,
  cohorts, joined, widened, narrowed, sessions, frames, retried, worker_restarts, truncated,
  budget_reached (ended at max_new_tokens without EOS: cut), the
  per-voice caches' hits, misses and evictions), the batches formed by size
  (`qwen3_tts_batches_total{size}`) and the audio sent (`qwen3_tts_audio_seconds_total`).
- Gauges: `qwen3_tts_queue` (waiting requests), `qwen3_tts_active` (rows running),
  `qwen3_tts_sessions` (open text sessions), `qwen3_tts_up` (0 while /health says unavailable)
  and the per-voice caches' entries and bytes.
- Histograms per request, from the engine's own clock (`Job.submitted`, `Job.started`), labelled
  `route` ("speech": POST /v1/audio/speech, "batch": the items of POST
  /v1/audio/speech/batch, "session": the WebSocket text sessions):
  `qwen3_tts_queue_wait_seconds` (submitted -> started in a batch),
  `qwen3_tts_time_to_first_audio_seconds` (submitted -> its first audio leaves the engine;
  streamed requests only: a whole file's first audio is all of it) and
  `qwen3_tts_request_duration_seconds` (submitted -> its last audio; requests that finished).
  They time the server's side: the network and the client's reading are not in them.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

try:    # the serve extra installs it; without it the server runs and /metrics says what is missing
    import prometheus_client
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError:
    prometheus_client = None

SAMPLE_RATE = 24000
PREFIX = "qwen3_tts"
# seconds: a GPU's first audio is tens of milliseconds, a CPU's about one second
LATENCY_BUCKETS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0,
                   10.0, 30.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
GAUGE_STATS = ("prefix_cache_entries", "prefix_cache_bytes", "codec_prefix_entries",
               "codec_prefix_bytes")
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST if prometheus_client else "text/plain"
MISSING = ("GET /metrics needs the prometheus-client package: pip install prometheus-client (or "
           "qwen3-tts-jax[serve])")


class _ServerCollector:
    """The engine's counters and the server's gauges, read at each scrape."""

    def __init__(self, server):
        self.server = server

    def collect(self):
        server = self.server
        stats = server.counters()
        sizes = stats.pop("batch_sizes", {})
        for name, value in sorted(stats.items()):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if name in GAUGE_STATS:
                yield GaugeMetricFamily(f"{PREFIX}_{name}", f"engine stat {name}", value=value)
            else:
                yield CounterMetricFamily(f"{PREFIX}_{name}", f"engine counter {name}",
                                          value=value)
        batches = CounterMetricFamily(f"{PREFIX}_batches", "batches formed, by requests in them",
                                      labels=["size"])
        for size, n in sorted(sizes.items()):
            batches.add_metric([str(size)], n)
        yield batches
        for name, value, text in (
                ("queue", server.engine.waiting, "requests waiting to start"),
                ("active", server.engine.active, "rows running"),
                ("sessions", server.sessions_open, "open text sessions"),
                ("up", int(server.engine.health() is None), "1 while /health answers ok")):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=value)


class Metrics:
    """One server's metrics (a registry of its own: several apps in one process do not mix).
    `available` is False without prometheus-client: nothing is observed then."""

    def __init__(self, server):
        self.available = prometheus_client is not None
        if not self.available:
            return
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds",
                                    "submitted -> started in a batch", ["route"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.first_audio = Histogram(f"{PREFIX}_time_to_first_audio_seconds",
                                     "submitted -> first audio out of the engine (streamed)",
                                     ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds",
                                  "submitted -> last audio (finished requests)", ["route"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.audio = Counter(f"{PREFIX}_audio_seconds", "seconds of audio sent", registry=r)
        r.register(_ServerCollector(server))

    def watch(self, job, route: str, emit: Callable[[object], None],
              latencies: bool = True) -> Callable[[object], None]:
        """`emit` for `job` (called on the engine's thread) that also observes its latencies:
        its start at its first item, its first audio, its end (None); without `latencies`
        (a long request's later segments) only its audio."""
        if not self.available:
            return emit
        seen = not latencies

        def observe(item) -> None:
            nonlocal seen
            try:
                now = time.monotonic()
                if not seen and job.started is not None:
                    seen = True
                    self.queue_wait.labels(route).observe(job.started - job.submitted)
                    if isinstance(item, np.ndarray) and job.stream:
                        self.first_audio.labels(route).observe(now - job.submitted)
                if isinstance(item, np.ndarray):
                    self.audio.inc(len(item) / SAMPLE_RATE)
                elif item is None and latencies:
                    self.duration.labels(route).observe(now - job.submitted)
            finally:
                emit(item)

        return observe

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
