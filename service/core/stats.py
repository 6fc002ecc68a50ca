"""Plain stats the engine core emits and accumulates; the front end's `service.metrics` turns them into Prometheus
series.

Nothing here imports prometheus_client: the scheduler, loop and runner talk to a `StatsSink` (the default drops
everything); `CoreStats` is the sink that counts, and its `metrics()` is a plain value (`CoreMetrics`) that travels in
the core's status, across the process boundary where the core runs in its own process, the same way where it runs in
the front end's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from service.core.request import Priority

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NETWORKS = ("encoder", "denoiser")
PRIORITIES = tuple(p.value for p in Priority)


@dataclass(frozen=True)
class NetworkCall:
    network: str  # "encoder" | "denoiser"
    rows: int  # batch rows (a guided image contributes a conditional and an unconditional row)
    seconds: float | None  # wall time of the call (async encoder calls: submit -> ready); None inside a fused tick


@dataclass(frozen=True)
class TickStats:
    active_images: int  # images advanced by this tick
    encoder_rows: int  # rows whose features were refreshed
    denoiser_rows: int  # rows run by the light network
    seconds: float


@dataclass(frozen=True)
class RequestDone:
    outcome: str  # a service.core.errors.Outcome: ok, timeout, cancelled, engine_error, unavailable
    images: int
    queue_seconds: float
    total_seconds: float
    priority: str = Priority.INTERACTIVE.value


@dataclass(frozen=True)
class SchedulerSnapshot:
    queue_depth: int  # requests waiting for a slot
    queued_images: int
    active_images: int
    free_slots: int
    encoder_rows_total: int
    denoiser_rows_total: int
    queue_by_priority: dict[str, int] = field(default_factory=dict)  # requests waiting, per priority
    paused_images: int = 0  # batch images paused for interactive ones, waiting to resume
    preemptions_total: int = 0

    @property
    def load_ratio(self) -> float:
        """(active + queued images) / batch slots: above 1, images wait; the signal to scale replicas on."""
        slots = self.active_images + self.free_slots
        return (self.active_images + self.queued_images) / slots if slots else 0.0

    @property
    def encoder_reuse_ratio(self) -> float:
        """Fraction of light-network rows that reused cached features instead of fresh ones."""
        return 0.0 if self.denoiser_rows_total == 0 else 1.0 - self.encoder_rows_total / self.denoiser_rows_total


class StatsSink:
    """Receives the scheduler's stats; the default drops them."""

    def network_call(self, call: NetworkCall) -> None: ...

    def tick(self, stats: TickStats) -> None: ...

    def request_done(self, done: RequestDone) -> None: ...


@dataclass
class Histogram:
    """Counts per upper bound (the last one +Inf), and the sum: what a Prometheus histogram holds."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bound, not cumulative; one more for +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.total += value

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


@dataclass
class CoreMetrics:
    """The engine core's counters and histograms, as of one moment (a copy)."""

    calls: dict[str, int]  # per network
    rows: dict[str, int]  # per network
    batch_rows: dict[str, Histogram]  # rows per network call
    call_seconds: dict[str, Histogram]  # wall time per network call (not observed inside a fused tick)
    tick_seconds: Histogram
    queue_wait_seconds: Histogram  # of requests answered ok
    priority_seconds: dict[str, Histogram]  # submission to last image, requests answered ok, per priority


class CoreStats(StatsSink):
    """The sink that counts (thread-safe: the runner reports from the tick thread, the status reads from another)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._m = CoreMetrics(
            calls=dict.fromkeys(NETWORKS, 0), rows=dict.fromkeys(NETWORKS, 0),
            batch_rows={n: Histogram(ROW_BUCKETS) for n in NETWORKS},
            call_seconds={n: Histogram(CALL_BUCKETS) for n in NETWORKS}, tick_seconds=Histogram(CALL_BUCKETS),
            queue_wait_seconds=Histogram(LATENCY_BUCKETS),
            priority_seconds={p: Histogram(LATENCY_BUCKETS) for p in PRIORITIES})

    def network_call(self, call: NetworkCall) -> None:
        m = self._m
        with self._lock:
            m.calls[call.network] += 1
            m.rows[call.network] += call.rows
            m.batch_rows[call.network].observe(call.rows)
            if call.seconds is not None:
                m.call_seconds[call.network].observe(call.seconds)

    def tick(self, stats: TickStats) -> None:
        with self._lock:
            self._m.tick_seconds.observe(stats.seconds)

    def request_done(self, done: RequestDone) -> None:
        if done.outcome != "ok":
            return
        with self._lock:
            self._m.queue_wait_seconds.observe(done.queue_seconds)
            self._m.priority_seconds.setdefault(done.priority, Histogram(LATENCY_BUCKETS)).observe(done.total_seconds)

    def metrics(self) -> CoreMetrics:
        m = self._m
        with self._lock:
            return CoreMetrics(dict(m.calls), dict(m.rows), {k: h.copy() for k, h in m.batch_rows.items()},
                               {k: h.copy() for k, h in m.call_seconds.items()}, m.tick_seconds.copy(),
                               m.queue_wait_seconds.copy(), {k: h.copy() for k, h in m.priority_seconds.items()})
