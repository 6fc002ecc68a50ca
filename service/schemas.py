"""Request and response schemas of the fixed API contract (docs/api.md), with limits and examples. The limits that
depend on the server or the model are `service.core.RequestLimits`' (published into the OpenAPI document by
service.app); the fixed ones are `service.core.request`'s constants."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.core import (
    MAX_ENCODER_INTERVAL,
    MAX_GUIDANCE,
    MAX_PREVIEW_EVERY,
    MAX_SEED,
    MIN_TIMEOUT_S,
    REQUEST_ID,
    Priority,
)

INTEGER_FIELDS = frozenset({"class_label", "num_images", "steps", "encoder_interval", "seed", "preview_every"})


class GenerateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"class_label": 7, "num_images": 4, "encoder_interval": 4, "seed": 42}]},
    )

    # Strict: JSON true is not digit 1 and "7" is not 7. Floats must be finite.
    model: str | None = Field(None, min_length=1, max_length=100, strict=True,
                              description="the served model to draw from (GET /v1/models); optional when the service "
                              "serves one model; an unknown name is 404 with the list")
    class_label: int | None = Field(None, ge=0, strict=True,
                                    description="class 0 to num_classes - 1 (MNIST: digit 0-9); null = unconditional")
    num_images: int = Field(1, ge=1, strict=True,
                            description="images to draw (capped by the server's max_images_per_request)")
    steps: int | None = Field(None, ge=1, strict=True,
                              description="denoising steps N (default: model card; capped by max_steps)")
    encoder_interval: Annotated[int, Field(ge=1, le=MAX_ENCODER_INTERVAL, strict=True)] | Literal["auto"] | None = Field(
        None, description="K: heavy encoder every K-th step (1 = every step; K beyond steps runs it once, as K = steps "
        "does). \"auto\": the service picks "
        "K within the model card's quality budget, raising it only when the latency target is at risk (see "
        "/v1/model's auto_encoder_interval)")
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE, allow_inf_nan=False, strict=True,
                                         description="classifier-free guidance, 0-100 (default: model card)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, strict=True,
                             description="0 to 2^53 - 1; image i uses seed + i; absent = random, reported back")
    priority: Priority | None = Field(
        None, description="interactive: admitted first, and may take a batch image's slot at that image's next "
        "encoder refresh (the batch image pauses and later resumes exactly); batch: every slot interactive traffic "
        "leaves idle. Default: the server's DUALRATE_DEFAULT_PRIORITY")
    timeout_s: float | None = Field(None, ge=MIN_TIMEOUT_S, allow_inf_nan=False, strict=True,
                                    description=f"deadline in seconds, at least {MIN_TIMEOUT_S} (at most the server's "
                                    "max_timeout_s)")

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data: Any) -> Any:
        """JSON Schema's "integer" includes 1.0: take a whole float as its integer in the integer fields (strings and
        booleans stay refused: the fields are strict)."""
        if isinstance(data, dict):
            return {k: int(v) if k in INTEGER_FIELDS and isinstance(v, float) and v.is_integer() and abs(v) < 2**63
                    else v for k, v in data.items()}
        return data

class StreamRequest(GenerateRequest):
    """POST /generate/stream: the /generate body, plus how often to send a preview."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"class_label": 7, "num_images": 2, "encoder_interval": 4, "seed": 42,
                                         "preview_every": 4}]},
    )

    preview_every: int | None = Field(None, ge=0, le=MAX_PREVIEW_EVERY, strict=True,
                                      description="a preview (PNG of the current x0 estimate) every this many steps "
                                      "per image; 0 = none; absent = the server's default; values below the server's "
                                      "minimum are raised to it")


class JobRequest(GenerateRequest):
    """POST /v1/jobs: the /generate body (priority batch unless it says otherwise; no timeout_s: a job has no
    deadline), plus a webhook called when the job ends."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"class_label": 7, "num_images": 8, "seed": 42}]},
    )

    timeout_s: None = Field(None, description="not for jobs: a job has no deadline (cancel it with DELETE "
                            "/v1/jobs/{id})")  # type: ignore[assignment]
    webhook: str | None = Field(None, min_length=8, max_length=2048, description="http(s) URL to POST the job's "
                                "status to when it ends, signed (Dualrate-Signature); only hosts in the server's "
                                "DUALRATE_WEBHOOK_ALLOW")


class JobImage(BaseModel):
    index: int
    seed: int
    url: str = Field(description="the PNG: GET it with the same API key")


class JobOut(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model: str
    status_url: str
    num_images: int
    steps: int
    created_at: float = Field(description="Unix seconds")
    updated_at: float
    finished_at: float | None = None
    expires_at: float | None = Field(None, description="when a finished job and its images are deleted "
                                     "(DUALRATE_JOB_TTL_S after it ended)")
    step: int = Field(description="running: the least advanced running image's step")
    images_done: int
    queue_position: int | None = Field(None, description="queued: jobs ahead of it")
    images: list[JobImage] = Field(description="the finished images (all of them once succeeded)")
    error: dict[str, Any] | None = Field(None, description="failed: the error body /generate would answer, plus "
                                         "its status")
    resumed: int | None = Field(None, description="times the job was taken over after its replica stopped (it "
                                "went on from its checkpoints)")


class JobList(BaseModel):
    jobs: list[JobOut]
    next: int | None = Field(description="pass as `after` for the next page; null on the last")


class ImageOut(BaseModel):
    png_base64: str = Field(description="PNG, base64: the model's delivered size and mode (see /v1/model's image: "
                            "output_height x output_width and png_mode, L or RGB)")
    seed: int


class Timings(BaseModel):
    queue_ms: float
    compute_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    model: str = Field(description="the served model that drew the images (GET /v1/models)")
    images: list[ImageOut]
    class_label: int | None
    steps: int
    encoder_interval: int = Field(description="the K the images ran at (for \"auto\", the one the service picked)")
    encoder_interval_auto: bool = Field(False, description="true when the request asked for \"auto\"")
    guidance_scale: float
    encoder_calls: int = Field(description="encoder calls per image = ceil(steps / encoder_interval)")
    denoiser_calls: int = Field(description="light network calls per image = steps")
    timings: Timings
    request_id: str = Field(default_factory=lambda: REQUEST_ID.get(), description="the request's id (the X-Request-ID it "
                            "sent, or one the service made; also the answer's X-Request-ID header)")


class ErrorBody(BaseModel):
    error: str = Field(description="kind: invalid_request, queue_full, unavailable, timeout, internal, ...")
    message: str
    error_id: str | None = Field(None, description="an internal or engine error's id, also in the service's log")
    details: list[dict[str, Any]] | None = None
    request_id: str | None = Field(default_factory=lambda: REQUEST_ID.get() or None,
                                   description="the request's id (its X-Request-ID header): on every log line "
                                   "about it")


class ModelInfo(BaseModel):
    name: str = Field(description="the name requests give in their `model` field")
    default: bool = Field(True, description="the model /v1/model describes (the only one, or the first served)")
    state: dict[str, Any] = Field(default_factory=dict, description="slots (this model's batch slots), "
                                  "per_image_state_bytes (a sample and its conditional and unconditional feature "
                                  "caches, float32), state_bytes (slots x that), budget_bytes (DUALRATE_STATE_MEMORY_MB; "
                                  "null: none) and share_bytes (this model's even share of it)")
    card: dict[str, Any]
    backend: str
    device: str
    precision: str
    providers: list[str]
    policy: str
    limits: dict[str, Any]
    defaults: dict[str, Any]
    auto_encoder_interval: dict[str, Any] = Field(default_factory=dict, description="what encoder_interval \"auto\" "
                                                  "may pick: allowed Ks, their FID / FID(K=1) and its spread, the budget and the "
                                                  "latency target")
    image: dict[str, Any] = Field(description="channels, height, width (the samples), output_height, output_width (the "
                                  "PNGs' size), sample_size and output_size (the same for a square model, else null), "
                                  "png_mode, num_classes (0: unconditional), class_names (index = class_label; null "
                                  "where the card has none), format, prediction, time_input")


class ModelList(BaseModel):
    default: str = Field(description="the default model's name (/v1/model)")
    models: list[ModelInfo]

