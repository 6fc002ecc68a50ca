"""Plain stats the scheduler emits; `service.metrics` turns them into Prometheus metrics.

Nothing here imports prometheus_client: the scheduler talks to a `StatsSink`, whose default does nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    outcome: str  # a service.errors.Outcome: ok, timeout, cancelled, engine_error, unavailable
    images: int
    queue_seconds: float
    total_seconds: float
    priority: str = "interactive"


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
