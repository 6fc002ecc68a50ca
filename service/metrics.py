"""The one module that turns the scheduler's plain stats into Prometheus metrics (base units, _total counters)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest, multiprocess

from engines import EngineInfo
from service.core.stats import NetworkCall, RequestDone, SchedulerSnapshot, StatsSink, TickStats
from service.errors import Outcome

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MAX_CLASS_SERIES = 100  # per-class image counts only for models with at most this many classes (series stay few)


class PrometheusStats(StatsSink):
    def __init__(self, front: bool = True, core: bool = True) -> None:
        """`front`: the series the HTTP layer counts (requests by outcome, latency, images, K served); `core`: those
        of the scheduler and runner. In one process both share a registry; with the engine core in its own process
        each side has its own, and the front end's /metrics appends the core's (service.core.handle)."""
        self.registry = r = CollectorRegistry()
        if front:
            self.requests = Counter("dualrate_requests_total", "Requests by outcome", ["outcome"], registry=r)
            self.request_duration = Histogram("dualrate_request_duration_seconds", "Request latency, arrival to "
                                              "answer", ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
            self.images = Counter("dualrate_images_generated_total", "Images returned to clients", registry=r)
            self.k_used = Histogram("dualrate_encoder_interval", "K that answered requests ran at", ["mode"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
            self.within_target = Counter("dualrate_requests_within_target_total", "Requests answered ok within "
                                         "DUALRATE_LATENCY_TARGET_S (their rate is the goodput)", registry=r)
            for outcome in Outcome:
                self.requests.labels(outcome.value)
            self.class_images = Counter("dualrate_class_images_total", "Images returned, per requested class_label "
                                        "(class_name from the model card; unconditional: class_label none); models of "
                                        f"more than {MAX_CLASS_SERIES} classes are not counted per class",
                                        ["class_label", "class_name"], registry=r)
            self._class_names: list[str] | None = None
            self._classes = 0
        if core:
            self.queue_wait = Histogram("dualrate_queue_wait_seconds", "Wait for a batch slot",
                                        buckets=LATENCY_BUCKETS, registry=r)
            self.queue_depth = Gauge("dualrate_queue_depth", "Requests waiting for a slot", registry=r)
            self.active_images = Gauge("dualrate_active_images", "Images in the running batch", registry=r)
            self.queued_images = Gauge("dualrate_queued_images", "Images of queued requests, waiting for a slot",
                                       registry=r)
            self.load = Gauge("dualrate_load_ratio", "(active + queued images) / batch slots: 1 = every slot busy and "
                              "nothing waiting; the autoscaling signal (deploy/k8s)", registry=r)
            self.batch_rows = Histogram("dualrate_network_batch_rows", "Rows per network call", ["network"],
                                        buckets=ROW_BUCKETS, registry=r)
            self.call_duration = Histogram("dualrate_network_duration_seconds", "Wall time per network call (not "
                                           "observed inside a fused tick)", ["network"], buckets=CALL_BUCKETS,
                                           registry=r)
            self.calls = Counter("dualrate_network_calls_total", "Network calls", ["network"], registry=r)
            self.rows = Counter("dualrate_network_rows_total", "Rows run per network", ["network"], registry=r)
            self.reuse = Gauge("dualrate_encoder_reuse_ratio",
                               "Fraction of light-network rows that reused cached encoder features", registry=r)
            self.tick_duration = Histogram("dualrate_tick_duration_seconds", "One scheduler tick (one denoising step)",
                                           buckets=CALL_BUCKETS, registry=r)
            self.priority_duration = Histogram("dualrate_priority_request_duration_seconds", "Latency of requests "
                                               "answered ok by the engine core, submission to last image, per "
                                               "priority", ["priority"], buckets=LATENCY_BUCKETS, registry=r)
            self.priority_queue = Gauge("dualrate_priority_queue_depth", "Requests waiting for a slot, per priority",
                                        ["priority"], registry=r)
            self.paused = Gauge("dualrate_paused_images", "Batch images paused at a refresh boundary for interactive "
                                "ones, waiting to resume", registry=r)
            self.preemptions = Counter("dualrate_preemptions_total", "Batch images paused for interactive ones",
                                       registry=r)
            self._preemptions_seen = 0
            self.engine = Info("dualrate_engine", "Backend, device and precision of the engine", registry=r)
            for net in ("encoder", "denoiser"):
                self.calls.labels(net)
                self.rows.labels(net)
            for priority in ("interactive", "batch"):
                self.priority_duration.labels(priority)
                self.priority_queue.labels(priority)

    def exposition(self) -> bytes:
        """This side's series in the text format. Front-end workers of one service (PROMETHEUS_MULTIPROC_DIR set by
        service.supervisor) report the sum over all of them."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            pooled = CollectorRegistry()
            multiprocess.MultiProcessCollector(pooled)
            return generate_latest(pooled)
        return generate_latest(self.registry)

    def set_model(self, num_classes: int, class_names: list[str] | None) -> None:
        """The served model's classes: `class_images` names them where the card does."""
        self._classes, self._class_names = num_classes, class_names

    def set_engine(self, info: EngineInfo, policy: str) -> None:
        self.engine.info({"backend": info.backend, "device": info.device, "precision": info.precision,
                          "policy": policy})

    def network_call(self, call: NetworkCall) -> None:
        self.batch_rows.labels(call.network).observe(call.rows)
        if call.seconds is not None:
            self.call_duration.labels(call.network).observe(call.seconds)
        self.calls.labels(call.network).inc()
        self.rows.labels(call.network).inc(call.rows)

    def tick(self, stats: TickStats) -> None:
        self.tick_duration.observe(stats.seconds)

    def request_done(self, done: RequestDone) -> None:
        if done.outcome == Outcome.OK:
            self.queue_wait.observe(done.queue_seconds)
            self.priority_duration.labels(done.priority).observe(done.total_seconds)

    def request_answered(self, outcome: str, seconds: float, images: int = 0) -> None:
        """Called by the HTTP layer once per request, whatever its outcome."""
        self.requests.labels(outcome).inc()
        self.request_duration.labels(outcome).observe(seconds)
        if images:
            self.images.inc(images)

    def class_served(self, class_label: int | None, images: int) -> None:
        if class_label is None:
            self.class_images.labels("none", "unconditional").inc(images)
        elif 0 <= class_label < self._classes <= MAX_CLASS_SERIES:
            names = self._class_names
            name = names[class_label] if names and class_label < len(names) else str(class_label)
            self.class_images.labels(str(class_label), name).inc(images)

    def served(self, k: int, auto: bool, within_target: bool) -> None:
        self.k_used.labels("auto" if auto else "fixed").observe(k)
        if within_target:
            self.within_target.inc()

    def refresh(self, snap: SchedulerSnapshot) -> None:
        self.queue_depth.set(snap.queue_depth)
        self.active_images.set(snap.active_images)
        self.queued_images.set(snap.queued_images)
        self.load.set(snap.load_ratio)
        self.reuse.set(snap.encoder_reuse_ratio)
        for priority, depth in snap.queue_by_priority.items():
            self.priority_queue.labels(priority).set(depth)
        self.paused.set(snap.paused_images)
        if snap.preemptions_total > self._preemptions_seen:
            self.preemptions.inc(snap.preemptions_total - self._preemptions_seen)
            self._preemptions_seen = snap.preemptions_total
