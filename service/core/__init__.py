"""The engine core: everything of the service that owns the device. One process runs it (in the HTTP process where
`DUALRATE_ENGINE_PROCESS` is off, in its own `engine-core` process where it is on). It knows no HTTP: the front end
imports only what this package exports (tests/test_layout.py checks both directions).

- `request`: the request's types and rules (`GenerationSpec`, `Job`, `Priority`, `RequestLimits`, `request_cost`).
- `scheduler`: pure and single-threaded, decides each tick (`schedule() -> TickPlan`, `update(plan, outcome)`:
  reaping, admission by `admission`'s policies and priorities, preemption at the encoder boundary, auto-K by `autok`);
  `runner` executes a plan on the device-resident state (`fused`: a whole tick as one captured program); `loop`
  (`EngineLoop`) owns the thread, the lock, the runner and the futures; `progress` hands streamed events over;
  `stats` are the plain figures the front end's `service.metrics` turns into Prometheus series.
- `telemetry`: the request id, the log format (text or JSON) and OpenTelemetry traces, the same in both processes.
- `protocol`: every message between the front end and the core, and the core's whole configuration (`CoreConfig`);
  `handle`: the interface the front end sees (`CoreHandle`; `LocalCore` in-process) and `build_core`;
  `engine_core`: the core's own process (ZeroMQ ROUTER); `client`: its front-end side (`RemoteCore`).
"""

from service.core.admission import Policy
from service.core.autok import QualityBudget
from service.core.client import SHARED_CORE_ENV, CoreDied, RemoteCore, spawn_core, tell_core_to_stop
from service.core.errors import (
                                 Cancelled,
                                 DeadlineExceeded,
                                 EngineFailure,
                                 InternalError,
                                 LimitError,
                                 NotReady,
                                 Outcome,
                                 QueueFull,
                                 ServiceError,
                                 UnknownModel,
                                 new_error_id,
)
from service.core.handle import Built, CoreHandle, EngineFactory, JobHandle, LocalCore, build_core
from service.core.progress import PROGRESS_INTERVAL_S, Event, Listener
from service.core.protocol import CORE_CONFIG_ENV, CoreConfig, CoreStatus
from service.core.request import (
                                 MAX_ENCODER_INTERVAL,
                                 MAX_GUIDANCE,
                                 MAX_PREVIEW_EVERY,
                                 MAX_SEED,
                                 MAX_STEPS,
                                 MIN_TIMEOUT_S,
                                 GenerationSpec,
                                 JobResult,
                                 Priority,
                                 RequestLimits,
                                 request_cost,
)
from service.core.runner import RunnerConfig
from service.core.scheduler import SchedulerConfig
from service.core.stats import CALL_BUCKETS, LATENCY_BUCKETS, ROW_BUCKETS, CoreMetrics, CoreStats, SchedulerSnapshot
from service.core.telemetry import (
                                 LOG_FORMATS,
                                 REQUEST_ID,
                                 REQUEST_ID_HEADER,
                                 TRACING,
                                 accept_request_id,
                                 current_traceparent,
                                 setup_logging,
                                 span,
)

__all__ = [
    "CALL_BUCKETS",
    "CORE_CONFIG_ENV",
    "LATENCY_BUCKETS",
    "LOG_FORMATS",
    "MAX_ENCODER_INTERVAL",
    "MAX_GUIDANCE",
    "MAX_PREVIEW_EVERY",
    "MAX_SEED",
    "MAX_STEPS",
    "MIN_TIMEOUT_S",
    "PROGRESS_INTERVAL_S",
    "REQUEST_ID",
    "REQUEST_ID_HEADER",
    "ROW_BUCKETS",
    "SHARED_CORE_ENV",
    "TRACING",
    "Built",
    "Cancelled",
    "CoreConfig",
    "CoreDied",
    "CoreHandle",
    "CoreMetrics",
    "CoreStats",
    "CoreStatus",
    "DeadlineExceeded",
    "EngineFactory",
    "EngineFailure",
    "Event",
    "GenerationSpec",
    "InternalError",
    "JobHandle",
    "JobResult",
    "LimitError",
    "Listener",
    "LocalCore",
    "NotReady",
    "Outcome",
    "Policy",
    "Priority",
    "QualityBudget",
    "QueueFull",
    "RemoteCore",
    "RequestLimits",
    "RunnerConfig",
    "SchedulerConfig",
    "SchedulerSnapshot",
    "ServiceError",
    "UnknownModel",
    "accept_request_id",
    "build_core",
    "current_traceparent",
    "new_error_id",
    "request_cost",
    "setup_logging",
    "span",
    "spawn_core",
    "tell_core_to_stop",
]
