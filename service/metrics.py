"""The one module that turns the service's figures into Prometheus metrics (base units, _total counters).

The front end counts its own series (requests by outcome, latency, images, K served, classes) with prometheus_client.
The engine core's series come from its status (`service.core.CoreStatus`: the scheduler's snapshot and the core's
counters and histograms), read at each scrape, the same way whether the core runs in this process or its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from service.core import LATENCY_BUCKETS, CoreStatus, Outcome, Priority

MAX_CLASS_SERIES = 100  # per-class image counts only for models with at most this many classes (series stay few)


class CoreCollector(Collector):
    """The engine cores' series, one `model` label value per served model, from the last status the front end read
    of each (`statuses`; a model is absent before its first)."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.statuses: dict[str, CoreStatus] = {}
        self.up: dict[str, bool] = {}  # every served model's core: answered its last status read (alerts.yml)
        self.ready: bool | None = None  # the service's readiness (GET /health/ready) at the last scrape

    def collect(self) -> Iterator[Metric]:
        if self.ready is not None:
            yield GaugeMetricFamily("dualrate_ready", "1 when this replica takes requests (GET /health/ready answers "
                                    "200), 0 while starting, draining or with a stopped or frozen engine core",
                                    value=float(self.ready))
        if self.up:
            up = GaugeMetricFamily("dualrate_engine_core_up", "1 when the model's engine core answered its status at "
                                   "this scrape, 0 when it stopped, froze or did not answer", labels=["model"])
            for model, alive in sorted(self.up.items()):
                up.add_metric([model], float(alive))
            yield up
        merged: dict[str, Metric] = {}
        for model, st in sorted(self.statuses.items()):
            for family in self._collect(model, st):
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()

    def _collect(self, model: str, st: CoreStatus) -> Iterator[Metric]:
        if st.snapshot is None or st.metrics is None:
            return
        snap, m = st.snapshot, st.metrics

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric([model], value)
            return family

        yield gauge("dualrate_queue_depth", "Requests waiting for a slot", snap.queue_depth)
        yield gauge("dualrate_active_images", "Images in the running batch", snap.active_images)
        yield gauge("dualrate_queued_images", "Images of queued requests, waiting for a slot", snap.queued_images)
        yield gauge("dualrate_load_ratio", "(active + queued images) / batch slots: 1 = every slot busy and nothing "
                    "waiting; the autoscaling signal (deploy/k8s)", snap.load_ratio)
        yield gauge("dualrate_encoder_reuse_ratio", "Fraction of light-network rows that reused cached encoder "
                    "features", snap.encoder_reuse_ratio)
        yield gauge("dualrate_paused_images", "Batch images paused at a refresh boundary for interactive ones, "
                    "waiting to resume", snap.paused_images)
        preemptions = CounterMetricFamily("dualrate_preemptions", "Batch images paused for interactive ones",
                                          labels=["model"])
        preemptions.add_metric([model], snap.preemptions_total)
        yield preemptions
        per_priority = GaugeMetricFamily("dualrate_priority_queue_depth", "Requests waiting for a slot, per priority",
                                         labels=["model", "priority"])
        for priority in Priority:
            per_priority.add_metric([model, priority.value], snap.queue_by_priority.get(priority.value, 0))
        yield per_priority
        calls = CounterMetricFamily("dualrate_network_calls", "Network calls", labels=["model", "network"])
        rows = CounterMetricFamily("dualrate_network_rows", "Rows run per network", labels=["model", "network"])
        for net in m.calls:
            calls.add_metric([model, net], m.calls[net])
            rows.add_metric([model, net], m.rows[net])
        yield calls
        yield rows
        for name, doc, label, hists in (
                ("dualrate_network_batch_rows", "Rows per network call", "network", m.batch_rows),
                ("dualrate_network_duration_seconds", "Wall time per network call (not observed inside a fused "
                 "tick)", "network", m.call_seconds),
                ("dualrate_priority_request_duration_seconds", "Latency of requests answered ok by the engine core, "
                 "submission to last image, per priority", "priority", m.priority_seconds)):
            family = HistogramMetricFamily(name, doc, labels=["model", label])
            for key, h in hists.items():
                family.add_metric([model, key], _buckets(h.bounds, h.counts), h.total)
            yield family
        for name, doc, h in (("dualrate_tick_duration_seconds", "One scheduler tick (one denoising step)",
                              m.tick_seconds),
                             ("dualrate_queue_wait_seconds", "Wait for a batch slot", m.queue_wait_seconds)):
            family = HistogramMetricFamily(name, doc, labels=["model"])
            family.add_metric([model], _buckets(h.bounds, h.counts), h.total)
            yield family
        if st.engine is not None:
            info = InfoMetricFamily("dualrate_engine", "Backend, device and precision of the engine", labels=["model"])
            info.add_metric([model], {"backend": str(st.engine.backend), "device": st.engine.device,
                                      "precision": str(st.engine.precision), "policy": self.policy})
            yield info


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    total = 0
    for bound, n in zip([*map(float, bounds), float("inf")], counts, strict=True):
        total += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), total))
    return out


class PrometheusStats:
    def __init__(self, policy: str = "continuous") -> None:
        """The front end's series in its registry, and the engine core's (`core`, fed by `core_status`)."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dualrate_requests_total", "Requests by model and outcome (model \"\": none known, "
                                "e.g. an unknown model or a body that does not parse)", ["model", "outcome"],
                                registry=r)
        self.request_duration = Histogram("dualrate_request_duration_seconds", "Request latency, arrival to "
                                          "answer", ["model", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("dualrate_images_generated_total", "Images returned to clients", registry=r)
        self.k_used = Histogram("dualrate_encoder_interval", "K that answered requests ran at", ["model", "mode"],
                                buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.within_target = Counter("dualrate_requests_within_target_total", "Requests answered ok within "
                                     "DUALRATE_LATENCY_TARGET_S (their rate is the goodput)", ["model"], registry=r)
        for outcome in Outcome:
            self.requests.labels("", outcome.value)
        self.class_images = Counter("dualrate_class_images_total", "Images returned, per model and requested "
                                    "class_label (class_name from the model card; unconditional: class_label none); "
                                    f"models of more than {MAX_CLASS_SERIES} classes are not counted per class",
                                    ["model", "class_label", "class_name"], registry=r)
        self.model_images = Counter("dualrate_model_images_total", "Images returned, per served model", ["model"],
                                    registry=r)
        self.jobs = Gauge("dualrate_jobs", "Jobs in the store by state (any replica's)", ["state"], registry=r,
                          multiprocess_mode="mostrecent")
        self.job_images = Counter("dualrate_job_images_total", "Job images finished and stored by this replica",
                                  registry=r)
        self.jobs_finished = Counter("dualrate_jobs_finished_total", "Jobs this replica finished, by state",
                                     ["state"], registry=r)
        self.job_checkpoint_seconds = Histogram("dualrate_job_checkpoint_seconds", "Writing one image's checkpoint "
                                                "to the store (count: checkpoint writes)", registry=r,
                                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.job_takeovers = Counter("dualrate_job_lease_takeovers_total", "Running jobs this replica took over "
                                     "after their replica's lease lapsed", registry=r)
        self.job_webhooks = Counter("dualrate_job_webhooks_total", "Webhook delivery attempts by outcome "
                                    "(delivered, failed: retried, refused: host not allowed)", ["outcome"], registry=r)
        for delivery in ("delivered", "failed", "refused"):
            self.job_webhooks.labels(delivery)
        for ended in ("succeeded", "failed"):
            self.jobs_finished.labels(ended)
        self._classes: dict[str, tuple[int, list[str] | None]] = {}
        self.core = CoreCollector(policy)
        self._core_registry = CollectorRegistry()
        self._core_registry.register(self.core)

    def core_status(self, status: CoreStatus | None, model: str) -> None:
        """A model's engine core's latest status: its series in the next exposition (None: none, e.g. the core is
        gone)."""
        self.core.up[model] = status is not None
        if status is None:
            self.core.statuses.pop(model, None)
        else:
            self.core.statuses[model] = status

    def exposition(self) -> bytes:
        """The front end's series and the core's, in the text format. Front-end workers of one service
        (PROMETHEUS_MULTIPROC_DIR set by service.supervisor) report the sum of their own series over all of them."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            front = CollectorRegistry()
            multiprocess.MultiProcessCollector(front)
        else:
            front = self.registry
        return generate_latest(front) + generate_latest(self._core_registry)

    def set_model(self, model: str, num_classes: int, class_names: list[str] | None) -> None:
        """A served model's classes: `class_images` names them where the card does."""
        self._classes[model] = (num_classes, class_names)
        self.model_images.labels(model)
        self.within_target.labels(model)
        for outcome in Outcome:
            self.requests.labels(model, outcome.value)

    def request_answered(self, outcome: str, seconds: float, images: int = 0, *, model: str = "") -> None:
        """Called by the HTTP layer once per request, whatever its outcome."""
        self.requests.labels(model, outcome).inc()
        self.request_duration.labels(model, outcome).observe(seconds)
        if images:
            self.images.inc(images)

    def class_served(self, model: str, class_label: int | None, images: int) -> None:
        self.model_images.labels(model).inc(images)
        classes, names = self._classes.get(model, (0, None))
        if class_label is None:
            self.class_images.labels(model, "none", "unconditional").inc(images)
        elif 0 <= class_label < classes <= MAX_CLASS_SERIES:
            name = names[class_label] if names and class_label < len(names) else str(class_label)
            self.class_images.labels(model, str(class_label), name).inc(images)

    def job_counts(self, counts: dict[str, int]) -> None:
        for state, n in counts.items():
            self.jobs.labels(state).set(n)

    def job_image(self) -> None:
        self.job_images.inc()

    def job_finished(self, state: str) -> None:
        self.jobs_finished.labels(state).inc()

    def job_checkpoint(self, seconds: float) -> None:
        self.job_checkpoint_seconds.observe(seconds)

    def job_lease_takeover(self) -> None:
        self.job_takeovers.inc()

    def job_webhook(self, outcome: str) -> None:
        self.job_webhooks.labels(outcome).inc()

    def served(self, k: int, auto: bool, within_target: bool, model: str = "") -> None:
        self.k_used.labels(model, "auto" if auto else "fixed").observe(k)
        if within_target:
            self.within_target.labels(model).inc()
