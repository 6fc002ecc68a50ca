"""A request as the engine core sees it: its one home for the request's types and rules.

- `Priority` (the enum the schema, admission and metrics all use) and `request_cost`;
- `RequestLimits`: every limit a request is held to (from the settings and the model card), read by the schema's
  published OpenAPI limits, the route's validation and the core (which checks a submission again, since it may come
  over the process boundary from any front end);
- `GenerationSpec` (what to generate), `Job` (a queued or running request and its future), `JobResult`, and the
  scheduler's per-image state `ImageSlot` / `PausedImage`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.core.progress import Event, Listener

MAX_SEED = 2**53 - 1  # exact in a JSON number / JavaScript double, so schema-driven clients send it unchanged
MIN_TIMEOUT_S = 0.1  # a shorter deadline cannot be met by any request: a client error (422), not a 504
MAX_STEPS = 4096  # the largest max_steps setting
MAX_ENCODER_INTERVAL = MAX_STEPS  # K beyond the steps runs the encoder once, as K = steps does (accepted)
MAX_PREVIEW_EVERY = 4096
MAX_GUIDANCE = 100.0


class Priority(StrEnum):
    INTERACTIVE = "interactive"  # admitted first; may take the slots of batch images at their refresh boundary
    BATCH = "batch"  # every slot the interactive traffic leaves idle; paused (never recomputed) when it needs them


def request_cost(num_images: int, steps: int, encoder_interval: int) -> float:
    """What a request costs, in light-network image-steps per encoder call: num_images x steps / K (K beyond the
    steps runs the encoder once, as K = steps does). Small requests, the cost cap and auto's cheapest K use it."""
    return num_images * steps / min(encoder_interval, steps)


@dataclass(frozen=True)
class RequestLimits:
    """This server's limits for this model: built once from the settings and the model card."""

    num_classes: int
    max_images_per_request: int
    max_steps: int
    max_timeout_s: float
    max_request_cost: float = 0.0  # 0 = no cap
    distilled: tuple[int, int] | None = None  # a few-step student's (steps, K): its steps only, K at most its K
    auto_ks: tuple[int, ...] = ()  # the Ks encoder_interval "auto" may pick (empty: auto not offered)

    def maxima(self) -> dict[str, float]:
        """The fields whose published maximum depends on the server or the model (the OpenAPI document)."""
        steps_max, k_max = self.distilled or (self.max_steps, self.max_steps)
        return {"class_label": self.num_classes - 1, "num_images": self.max_images_per_request, "steps": steps_max,
                "encoder_interval": k_max, "timeout_s": self.max_timeout_s}

    def minima(self) -> dict[str, float]:
        return {"steps": self.distilled[0]} if self.distilled else {}

    def problems(self, label: int | None, num_images: int, steps: int, encoder_interval: int, auto: bool,
                 timeout_s: float | None, guidance_scale: float | None = None) -> list[tuple[str, str]]:
        """(field, what is wrong) for every limit the request breaks; [] when it is within all of them. `label` is
        the class asked for (None = unconditional); `guidance_scale` the one asked for (None = the default)."""
        found: list[tuple[str, str]] = []
        if not self.num_classes:  # an unconditional model: no classes, so nothing to guide towards
            if label is not None:
                found.append(("class_label", "this model is unconditional (its card has no classes): leave it out"))
            if guidance_scale is not None and guidance_scale != 1.0:
                found.append(("guidance_scale", "this model is unconditional (its card has no classes): 1 or left "
                              "out"))
        elif label is not None and not 0 <= label < self.num_classes:
            found.append(("class_label", f"must be < {self.num_classes} (this model's classes) or null"))
        if num_images > self.max_images_per_request:
            found.append(("num_images", f"must be <= {self.max_images_per_request}"))
        if steps > self.max_steps:
            found.append(("steps", f"must be <= {self.max_steps}"))
        if auto and not self.auto_ks:
            found.append(("encoder_interval", "auto is not offered by this server"))
        if not auto and encoder_interval > self.max_steps:
            found.append(("encoder_interval", f"must be <= {self.max_steps} (max_steps)"))
        if self.distilled is not None:  # a few-step student: its own schedule only
            d_steps, d_k = self.distilled
            if steps != d_steps:
                found.append(("steps", f"must be {d_steps} (or left out): this model was distilled for {d_steps} "
                              "steps and samples at no other count"))
            if not auto and encoder_interval > d_k:
                found.append(("encoder_interval", f"must be <= {d_k}: this model was distilled with the encoder "
                              f"every {d_k} steps"))
        cheapest_k = max([encoder_interval, *(self.auto_ks if auto else ())])
        cost = request_cost(num_images, steps, cheapest_k)
        if self.max_request_cost and cost > self.max_request_cost:
            found.append(("num_images", f"this request costs {cost:g} (num_images x steps / encoder_interval), over "
                          f"the server's cap of {self.max_request_cost:g} (DUALRATE_MAX_REQUEST_COST): fewer images "
                          "or steps, or a larger encoder_interval"))
        if timeout_s is not None and timeout_s > self.max_timeout_s:
            found.append(("timeout_s", f"must be <= {self.max_timeout_s:g} (DUALRATE_MAX_TIMEOUT_S)"))
        return found


@dataclass(frozen=True)
class GenerationSpec:
    label: int  # a class, or the model's null label for unconditional
    num_images: int
    steps: int
    encoder_interval: int
    guidance_scale: float
    seed: int
    deadline: float | None = None  # time.monotonic() deadline
    auto: bool = False  # encoder_interval "auto": the scheduler picks K at submission (service.core.autok)
    priority: Priority = Priority.INTERACTIVE
    request_id: str = ""  # the front end's X-Request-ID: on the core's log lines about this request
    traceparent: str = ""  # W3C trace context of the front end's request span ("" when tracing is off)
    # A job's image resumed from a checkpoint (service.jobs; one image per spec): it starts at `start_step` from the
    # sample `start_sample` (float32 bytes of the model's sample shape), with `start_encoder_calls` made so far. A
    # checkpoint is taken at an encoder refresh, so the resumed image's first tick refreshes its features as the
    # uninterrupted run's did, and its noise is a function of seed and step: the result is the same, byte for byte.
    start_step: int = 0
    start_sample: bytes = b""
    start_encoder_calls: int = 0
    checkpoint_every_s: float = 0.0  # > 0: a `checkpoint` event at an encoder refresh at most this often (service.jobs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "priority", Priority(self.priority))


@dataclass
class JobResult:
    images: list[np.ndarray]  # uint8 each: (H, W) grayscale or (H, W, 3) RGB, the model's delivered size
    seeds: list[int]
    encoder_calls: int  # per image
    denoiser_calls: int
    queue_seconds: float
    compute_seconds: float
    encoder_interval: int = 0  # the K the images ran at (an "auto" request's is the scheduler's pick)


@dataclass(eq=False)
class Job:
    spec: GenerationSpec
    future: Future = field(default_factory=Future)  # resolved with a JobResult or a ServiceError by the engine loop
    submitted: float = field(default_factory=time.monotonic)
    first_admitted: float | None = None
    next_image: int = 0  # images admitted so far
    done_images: int = 0
    images: list[np.ndarray | None] = field(default_factory=list)
    encoder_calls: int = 0
    cancelled: bool = False
    listener: Listener | None = None  # streamed events (service.core.progress), called on the engine loop's thread
    preview_every: int = 0  # a preview every this many steps of each image (0 = none); only with a listener
    queue_position: int = 0  # requests ahead of it when it was queued
    pending: list[Event] = field(default_factory=list)  # its previews not handed over yet
    ticks: int = 0  # ticks that ran any of its images (counted only while tracing: a span attribute)
    last_checkpoint: float = field(default_factory=time.monotonic)  # when its images last sent a checkpoint

    def cancel(self) -> None:
        """Called from any thread (client disconnect); the slot is freed at the next tick."""
        self.cancelled = True


@dataclass(eq=False)
class ImageSlot:
    job: Job
    index: int  # image index within its job
    slot: int  # the runner's state row (sample, feature cache rows)
    guided: bool
    times: list[float]  # t_0 = 1 > t_1 > ... > t_N = 0 as float32 values
    step: int = 0
    tau: float = 1.0
    encoder_calls: int = 0


@dataclass(eq=False)
class PausedImage:
    """A batch image taken out of its slot at an encoder-refresh boundary: its whole state is its sample z (host
    memory) and its step; the features it held were about to be recomputed, so nothing is lost and resuming is
    exact (the noise is a function of seed and step). `z` is None until the tick that paused it has read it."""

    image: ImageSlot  # as it stood (slot no longer its own)
    paused_at: float
    z: Any = None  # np.ndarray once read
