"""One validated settings object, read from the environment (prefix DUALRATE_). Invalid values stop the start."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from dualrate.checkpoint import DEFAULT_CHECKPOINT, checkpoint_problem, distilled_schedule, read_card
from engines import Backend, BackendUnavailable, EngineConfig, Precision, Resolved, resolve
from export.card import CardError, ModelCard, model_spec
from service.core import MAX_STEPS, CoreConfig, Policy, Priority, QualityBudget, RequestLimits, RunnerConfig, SchedulerConfig, request_cost

# Reserved slots are lent to large images expected to finish within this many latency targets (6 s by default): the
# longest a small request then waits for a slot (issue 21's overload: 128-step images on 8 slots took ~4.6 s here).
LEND_HORIZON_TARGETS = 3.0


class Toggle(StrEnum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DUALRATE_", extra="forbid")

    host: str = Field("127.0.0.1", description="address uvicorn binds")
    port: int = Field(8000, ge=1, le=65535, description="port uvicorn listens on")
    backend: Backend = Field(Backend.ONNXRUNTIME, description="onnxruntime | torch | tensorrt | auto")
    precision: Precision = Field(Precision.FP32, description="fp32 | tf32 | bf16 | fp16: each backend runs its own "
                                 "set (onnxruntime fp32; torch all, tf32 on CUDA; tensorrt fp16) and refuses the rest")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto = cuda:0 if present, else cpu")
    checkpoint: Path = Field(DEFAULT_CHECKPOINT, description="the model folder: model_card.json and its format's two "
                             "networks (this project's safetensors, ONNX graphs or torch.export programs: "
                             "docs/own-model.md)")
    model_repository: Path | None = Field(None, description="a folder of model folders (each named as its model, "
                                          "[a-z0-9][a-z0-9._-]*): serve every model in it, or those DUALRATE_MODELS "
                                          "lists; replaces DUALRATE_CHECKPOINT (docs/own-model.md)")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="with DUALRATE_MODEL_REPOSITORY: the models to serve, comma-separated (the "
        "first is the default model of /v1/model); default every model folder, the first by name the default")
    max_active_images: int = Field(32, ge=1, le=512, description="images advanced together per tick (batch slots; "
                                   "each served model has as many)")
    state_memory_mb: float | None = Field(None, gt=0, description="device memory for the served models' per-image "
                                          "state (samples and feature caches), split evenly between the models: "
                                          "each gets min(max_active_images, its share / its per-image state) slots; "
                                          "unset: every model has max_active_images")
    queue_size: int = Field(64, ge=1, le=100_000, description="requests waiting for a slot before 429 (small "
                            "requests have as many places again of their own while reserved_slots > 0)")
    max_images_per_request: int = Field(16, ge=1, description="num_images cap of one request (<= max_active_images)")
    max_steps: int = Field(256, ge=1, le=MAX_STEPS, description="steps cap of one request")
    default_timeout_s: float = Field(120.0, gt=0, description="deadline of a request that names none")
    max_timeout_s: float = Field(600.0, gt=0, description="the longest deadline a request may ask for")
    max_body_bytes: int = Field(65_536, ge=256, description="larger request bodies are refused with 413 unread")
    max_header_bytes: int = Field(32_768, ge=1024, le=1_048_576, description="request line + headers larger than this "
                                  "get 431 and the connection is closed (nothing larger is buffered)")
    max_headers: int = Field(100, ge=8, le=10_000, description="requests with more headers get 431")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="a request's head must arrive within this many "
                                    "seconds of the connection's first byte (or of the previous response): else 408, "
                                    "closed")
    body_timeout_s: float = Field(30.0, gt=0, le=600, description="a request's body must arrive within this many "
                                  "seconds of its head: else 408, closed")
    max_connections: int = Field(2048, ge=1, le=1_000_000, description="open connections (and requests in flight) "
                                 "beyond this get 503 at once (uvicorn's limit_concurrency; per front-end worker)")
    drain_timeout_s: float | None = Field(None, gt=0, description="longest drain after SIGTERM before the requests "
                                          "still running are cancelled (503); default max_timeout_s + 10")
    core_heartbeat_timeout_s: float = Field(5.0, gt=0, le=600, description="an engine core that answers no heartbeat "
                                            "(or has work and completes no tick) for this long is reported frozen: "
                                            "/health/live and /health/ready answer 503, new requests 503, waiting ones "
                                            "503 at their deadline; a forced drain waits this long for the core's "
                                            "answers before killing it")
    signal_grace_s: float = Field(5.0, ge=0, description="repeated SIGTERM/SIGINT within this many seconds of the "
                                  "first are ignored (make and process groups deliver one Ctrl-C twice); a later one "
                                  "cancels what is still running and exits at once")
    policy: Policy = Field(Policy.CONTINUOUS, description="continuous (step-level) | request (whole requests)")
    threads: int = Field(0, ge=0, description="CPU threads per network (0 = library default)")
    cuda_graphs: bool = Field(False, description="torch backend on CUDA: capture graphs per batch bucket")
    compile: Toggle = Field(Toggle.AUTO, description="torch backend: torch.compile both networks per batch bucket at "
                            "start-up (cached on disk beside the ONNX export); auto = on with CUDA, off on the CPU "
                            "(docs/cpu_backends.md)")
    buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=list, description="batch buckets (rows) of compiled and captured calls, comma-separated; "
        "default powers of two up to 2 x max_active_images")
    low_precision: str = Field("autocast", pattern=r"^(autocast|weights)$", description="torch bf16/fp16: autocast "
                               "(fp32 weights) or weights (weights cast to bf16/fp16)")
    engine_process: Toggle = Field(Toggle.AUTO, description="run the engine core (scheduler, runner, device) in its "
                                   "own process, HTTP in this one; auto = on with CUDA, off on the CPU "
                                   "(docs/cpu_backends.md)")
    frontend_workers: int = Field(1, ge=1, le=64, description="HTTP front-end processes over one engine core (more "
                                  "than 1 runs the core in its own process; service.supervisor)")
    fused_tick: Toggle = Field(Toggle.AUTO, description="torch backend: each tick as one program (on CUDA one "
                               "captured graph per bucket); auto = on with CUDA")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated (or a JSON list); if set, every API route (/generate, "
        "/generate/stream, /v1/...) requires Authorization: Bearer <key> (health and /metrics stay open)")
    overlap_encoder: bool = Field(True, description="run the light network on rows that reuse features while the "
                                  "encoder refreshes the others (off: one light-network call per tick after the encoder)")
    align_encoder: bool = Field(True, description="admit an image at the next tick where the images with the same "
                                "encoder_interval refresh (waits < K ticks), so they share encoder calls")
    default_preview_every: int = Field(4, ge=0, description="/generate/stream: a preview every this many steps when the "
                                       "request does not say (0 = none)")
    min_preview_every: int = Field(2, ge=1, description="/generate/stream: the most often a request may ask for a "
                                   "preview (smaller preview_every values are raised to this)")
    latency_target_s: float = Field(2.0, gt=0, description="the latency a default request should stay within "
                                    "(p95): encoder_interval auto raises K when it is at risk; requests answered "
                                    "within it are counted (dualrate_requests_within_target_total)")
    quality_budget: float = Field(1.15, ge=1.0, description="encoder_interval auto may use the Ks whose published FID "
                                  "is at most this multiple of K = 1's (the model card's sweep)")
    max_request_cost: float = Field(0.0, ge=0, description="refuse (422) requests costing more than num_images x steps / "
                                    "encoder_interval (auto: its largest allowed K); 0 = no cap")
    reserved_slots: int | None = Field(None, ge=0, description="batch slots kept for small requests (at most a default "
                                       "request's num_images x steps / encoder_interval) while one waits, lent to large "
                                       "requests while none does; default max_active_images // 8")
    priorities: bool = Field(True, description="interactive requests first: batch images pause at their next encoder "
                             "refresh (exactly resumable) while interactive images wait for a slot; false = one class")
    default_priority: Priority = Field(Priority.INTERACTIVE, description="priority of requests that name none: "
                                       "interactive | batch")
    max_paused_images: int | None = Field(None, ge=0, le=100_000, description="batch images held paused at most "
                                          "(each keeps its sample in host memory: channels x size^2 x 4 bytes); "
                                          "default 4 x max_active_images")
    warmup: bool = Field(True, description="run both networks at start (and compile, where compiling) before ready")
    log_level: str = Field("info", pattern=r"^(debug|info|warning|error)$", description="debug | info | warning | "
                           "error")
    deadline_admission: bool = Field(True, description="refuse at submission (429 + Retry-After) a request whose "
                                     "predicted latency at the current load lies past its deadline (timeout_s), or, "
                                     "for an interactive encoder_interval \"auto\" request, past "
                                     "DUALRATE_LATENCY_TARGET_S")
    interactive_slowdown: float = Field(3.0, ge=0, description="while interactive images run, a tick may take at "
                                        "most this many times their own tick: batch images (jobs) pause at their "
                                        "encoder refresh until it fits (0 = no limit)")
    job_store: str = Field("sqlite:///artifacts/jobs/jobs.db", description="where /v1/jobs keeps its jobs: "
                           "sqlite:///PATH (an embedded file; one replica, or front-end workers of one host), "
                           "postgresql://USER:PASSWORD@HOST/DB (several replicas), or off")
    job_ttl_s: float = Field(86_400.0, gt=0, description="a finished job and its images are deleted this long after "
                             "it ended")
    job_checkpoint_s: float = Field(5.0, ge=0, description="a running job image's state is written at an encoder "
                                    "refresh at most this often (0 = never: a resumed image starts over)")
    job_lease_s: float = Field(30.0, gt=0, description="a replica's claim on a running job, renewed every fifth of "
                               "it; a job whose lease lapses (its replica died) is taken over by another")
    webhook_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated hosts (host, host:port or *.domain) a job's webhook may "
        "call; empty = webhooks off (the server calls no address a client chose)")
    webhook_secret: SecretStr | None = Field(None, description="the HMAC-SHA256 key that signs webhook bodies "
                                             "(Dualrate-Signature); required with DUALRATE_WEBHOOK_ALLOW")
    webhook_attempts: int = Field(5, ge=1, le=20, description="delivery attempts per webhook, 1 s, 2 s, 4 s, ... "
                                  "apart")
    log_format: Literal["text", "json"] = Field("text", description="text (one line per record, `request_id=` at its "
                                                "end) or json (one object per line: time, level, logger, process, "
                                                "message, request_id and the request's fields)")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if not text:
                raise ValueError("set but blank: unset DUALRATE_API_KEYS to serve without keys, or give at least one "
                                 "key (a blank value would silently turn authentication off)")
            if text.startswith("["):
                try:
                    keys = json.loads(text)
                except json.JSONDecodeError as e:
                    raise ValueError("a JSON list of strings or comma-separated keys") from e
            else:
                keys = [k.strip() for k in text.split(",") if k.strip()]
            if isinstance(keys, list) and not any(str(k).strip() for k in keys):
                raise ValueError("set but holds no key (only separators, or an empty list): unset DUALRATE_API_KEYS "
                                 "to serve without keys, or give at least one key (e.g. a compose line ${A},${B} "
                                 "with both unset would silently turn authentication off)")
            return keys
        return v

    @field_validator("models", "webhook_allow", mode="before")
    @classmethod
    def _split_names(cls, v: Any) -> Any:
        """A comma-separated list of names (models, webhook hosts), blanks dropped."""
        if isinstance(v, str):
            return [m.strip() for m in v.split(",") if m.strip()]
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("buckets", mode="before")
    @classmethod
    def _split_buckets(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [int(x) for x in v.replace(",", " ").split()]
        return v

    @field_validator("api_keys", mode="after")
    @classmethod
    def _keys_ascii(cls, v: list[SecretStr]) -> list[SecretStr]:
        if any(not k.get_secret_value().isascii() or not k.get_secret_value() for k in v):
            raise ValueError("keys must be non-empty printable ASCII (they travel in an HTTP header)")
        return v

    @cached_property
    def resolved(self) -> Resolved:
        """The backend and device, resolved once (auto -> a concrete backend): every `auto` switch derives from it."""
        return self.resolve_for(self.model_spec.format)

    def resolve_for(self, fmt: str) -> Resolved:
        """The backend and device for a model of card format `fmt` (auto picks per format)."""
        return resolve(self.backend, None if self.device == "auto" else self.device, self.precision, fmt)

    @cached_property
    def served_models(self) -> dict[str, Path]:
        """name -> model folder, the default model first: the repository's (all, or DUALRATE_MODELS in its order),
        else DUALRATE_CHECKPOINT's one (named as its folder, or `model` if that name is not a model name)."""
        if self.model_repository is None:
            name = self.checkpoint.name.lower()
            return {name if MODEL_NAME.match(name) else "model": self.checkpoint}
        if self.models:
            return {m: self.model_repository / m for m in self.models}
        return {d.name: d for d in sorted(self.model_repository.iterdir()) if (d / "model_card.json").is_file()}

    @property
    def default_model(self) -> str:
        return next(iter(self.served_models))

    @cached_property
    def model_spec(self) -> ModelCard:
        """The default model's contract (export/card.py): geometry, classes, diffusion, I/O names, defaults."""
        return model_spec(self.model_card())

    def _on(self, toggle: Toggle, capable: bool, res: Resolved | None = None) -> bool:
        """A switch: on, off, or auto = on where the resolved backend can and runs on CUDA."""
        return toggle is Toggle.ON or (toggle is Toggle.AUTO and capable and (res or self.resolved).on_cuda)

    @property
    def use_engine_process(self) -> bool:
        return self._on(self.engine_process, True) or (self.frontend_workers > 1 and self.engine_process is not Toggle.OFF)

    def model_card(self, name: str | None = None) -> dict[str, Any]:
        """A served model's card (the default model's when `name` is None)."""
        return read_card(self.served_models[name or self.default_model])

    @cached_property
    def model_state(self) -> dict[str, tuple[int, int]]:
        """name -> (batch slots, per-image state bytes) of each served model: DUALRATE_MAX_ACTIVE_IMAGES each, or
        what its even share of DUALRATE_STATE_MEMORY_MB holds, at most that."""
        from export.check import per_image_state_bytes

        out = {}
        share = None if self.state_memory_mb is None else self.state_memory_mb * 2**20 / len(self.served_models)
        for name, folder in self.served_models.items():
            per_image = per_image_state_bytes(folder)
            slots = self.max_active_images if share is None else min(self.max_active_images, int(share // per_image))
            out[name] = (slots, per_image)
        return out

    def slots(self, name: str | None = None) -> int:
        return self.model_state[name or self.default_model][0]

    def request_limits(self, card: dict[str, Any], name: str | None = None) -> RequestLimits:
        """Every limit a request is held to, for this server and served model `name` of `card`."""
        spec = model_spec(card)
        budget = QualityBudget.from_card(card, self.quality_budget, spec.defaults.encoder_interval)
        return RequestLimits(num_classes=spec.num_classes,
                             max_images_per_request=min(self.max_images_per_request, self.slots(name)),
                             max_steps=self.max_steps, max_timeout_s=self.max_timeout_s,
                             max_request_cost=self.max_request_cost, distilled=distilled_schedule(card),
                             auto_ks=tuple(budget.allowed))

    def core_config(self, card: dict[str, Any], name: str | None = None) -> CoreConfig:
        """The engine core's one typed configuration for served model `name` (the default model's when None),
        resolved from these settings and its card (a request costing no more than the card's default one is small)."""
        spec = model_spec(card)
        defaults = spec.defaults
        res = self.resolve_for(spec.format)
        slots = self.slots(name)
        engine = EngineConfig(backend=res.backend, device=res.device, max_batch=2 * slots,
                              precision=self.precision, threads=self.threads_for(res), cuda_graphs=self.cuda_graphs,
                              compile=self._on(self.compile, res.spec.compiles, res), buckets=tuple(self.buckets),
                              low_precision=self.low_precision)
        scheduler = SchedulerConfig(
            max_active_images=slots, queue_size=self.queue_size, policy=self.policy,
            align_encoder=self.align_encoder, reserved_slots=self.reserved_for(slots),
            small_cost=request_cost(1, defaults.steps, defaults.encoder_interval),
            lend_horizon_s=LEND_HORIZON_TARGETS * self.latency_target_s, priorities=self.priorities,
            max_paused_images=self.max_paused_images if self.max_paused_images is not None else 4 * slots,
            interactive_slowdown=self.interactive_slowdown, deadline_admission=self.deadline_admission,
            admit_target_s=self.latency_target_s)
        return CoreConfig(checkpoint=str(self.served_models[name or self.default_model]), engine=engine,
                          scheduler=scheduler, runner=RunnerConfig(overlap_encoder=self.overlap_encoder,
                                                                   fused=self._on(self.fused_tick,
                                                                                  res.spec.fused_tick, res)),
                          limits=self.request_limits(card, name), quality_budget=self.quality_budget,
                          latency_target_s=self.latency_target_s, warmup=self.warmup, log_level=self.log_level,
                          log_format=self.log_format)

    def threads_for(self, res: Resolved) -> int:
        """CPU threads per network of one model's engine: DUALRATE_THREADS, or where that is 0 (the library's default:
        every core) and several models share the CPU, the cores split between them (measured on 2 cores with one
        model flooded: the other's p99 latency 1.99-2.41x its idle p99 with every engine on every core, 1.14x with one
        core each, at the price of the flooded model's capacity, 12.2-12.3 -> 9.5 requests/s; docs/runs/models.md)."""
        n = len(self.served_models)
        if self.threads or n == 1 or res.on_cuda:
            return self.threads
        return max(1, (os.cpu_count() or 1) // n)

    def reserved_for(self, slots: int) -> int:
        """Slots kept for small requests out of a model's `slots` (DUALRATE_RESERVED_SLOTS, at most all but one)."""
        return min(self.reserved_slots, slots - 1) if self.reserved_slots is not None else slots // 8

    @property
    def listens_beyond_loopback(self) -> bool:
        """DUALRATE_HOST is not a loopback address (0.0.0.0, ::, a public address or a host name other than
        localhost): other machines may reach the port."""
        host = self.host.strip("[]")
        if host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True

    @property
    def api_key_bytes(self) -> list[bytes]:
        return [k.get_secret_value().encode("utf-8") for k in self.api_keys]

    @property
    def effective_drain_timeout_s(self) -> float:
        return self.drain_timeout_s if self.drain_timeout_s is not None else self.max_timeout_s + 10.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.model_repository is not None:
            if not self.model_repository.is_dir():
                raise ValueError(f"DUALRATE_MODEL_REPOSITORY {self.model_repository} is not a folder: give a folder "
                                 "of model folders")
            bad = [m for m in self.models if not MODEL_NAME.match(m)]
            if bad:
                raise ValueError(f"DUALRATE_MODELS: {', '.join(bad)}: a model's name is [a-z0-9][a-z0-9._-]*")
            if len(set(self.models)) != len(self.models):
                raise ValueError("DUALRATE_MODELS names a model twice")
            if not self.served_models:
                raise ValueError(f"DUALRATE_MODEL_REPOSITORY {self.model_repository} holds no model folder (a folder "
                                 "with a model_card.json)")
            if len(self.served_models) > 1 and self.frontend_workers > 1:
                raise ValueError("DUALRATE_FRONTEND_WORKERS > 1 serves one model: list one in DUALRATE_MODELS, or "
                                 "run one service per model")
        elif self.models:
            raise ValueError("DUALRATE_MODELS selects models of DUALRATE_MODEL_REPOSITORY, which is not set")
        several = len(self.served_models) > 1
        backends = []  # each served model's resolved backend, checked against the precision and switches below
        for name, folder in self.served_models.items():
            where = f"model {name}: " if several else ""
            problem = model_problem(folder)
            if problem is not None:
                raise ValueError(where + problem)
            card_spec = model_spec(read_card(folder))
            steps = card_spec.defaults.steps
            if steps > self.max_steps:
                raise ValueError(f"{where}DUALRATE_MAX_STEPS ({self.max_steps}) is below the model card's default "
                                 f"steps ({steps}): every request that leaves steps out would be refused; set "
                                 f"DUALRATE_MAX_STEPS >= {steps}")
            try:
                backends.append(self.resolve_for(card_spec.format).spec)
            except BackendUnavailable as e:
                hint = " (set DUALRATE_DEVICE=cuda or auto)" if "CUDA" in str(e) else ""
                raise ValueError(f"{where}DUALRATE_BACKEND={self.backend}: {e}{hint}") from None
        if self.state_memory_mb is not None:
            for name, (slots, per_image) in self.model_state.items():
                if slots < 1:
                    raise ValueError(f"DUALRATE_STATE_MEMORY_MB ({self.state_memory_mb:g}) split between "
                                     f"{len(self.served_models)} model(s) holds no image of model {name} (one takes "
                                     f"{per_image / 2**20:.2f} MB): raise it")
        if self.job_store != "off" and not re.match(r"^(sqlite(\+aiosqlite)?:///|postgres(ql)?(\+asyncpg)?://)",
                                                     self.job_store):
            raise ValueError(f"DUALRATE_JOB_STORE={self.job_store}: sqlite:///PATH, postgresql://USER:PASSWORD@HOST/DB "
                             "or off")
        if self.webhook_allow and self.webhook_secret is None:
            raise ValueError("DUALRATE_WEBHOOK_ALLOW turns webhooks on: set DUALRATE_WEBHOOK_SECRET too (the key that "
                             "signs them, so receivers can tell them from forgeries)")
        if self.max_images_per_request > self.max_active_images:
            raise ValueError(f"DUALRATE_MAX_IMAGES_PER_REQUEST ({self.max_images_per_request}) must be <= "
                             f"DUALRATE_MAX_ACTIVE_IMAGES ({self.max_active_images}): a request must fit the batch")
        if self.reserved_slots is not None and self.reserved_slots >= self.max_active_images:
            raise ValueError(f"DUALRATE_RESERVED_SLOTS ({self.reserved_slots}) must be < DUALRATE_MAX_ACTIVE_IMAGES "
                             f"({self.max_active_images}): large requests need a slot too")
        if self.default_timeout_s > self.max_timeout_s:
            raise ValueError(f"DUALRATE_DEFAULT_TIMEOUT_S ({self.default_timeout_s:g}) must be <= "
                             f"DUALRATE_MAX_TIMEOUT_S ({self.max_timeout_s:g})")
        if self.precision is Precision.TF32 and self.device == "cpu":
            raise ValueError("DUALRATE_PRECISION=tf32 needs a CUDA device (set DUALRATE_DEVICE=cuda or another precision)")
        for spec in backends:
            if self.precision not in spec.precisions:
                raise ValueError(f"DUALRATE_BACKEND={spec.backend} runs DUALRATE_PRECISION="
                                 f"{' or '.join(sorted(spec.precisions))} only, not {self.precision}")
            for name, toggle, capable in (("COMPILE", self.compile, spec.compiles),
                                          ("FUSED_TICK", self.fused_tick, spec.fused_tick)):
                if toggle is Toggle.ON and not capable:
                    raise ValueError(f"DUALRATE_{name}=on is a torch-backend option, not DUALRATE_BACKEND="
                                     f"{spec.backend}'s" + (" (auto resolved to it)" if self.backend is Backend.AUTO
                                                            else ""))
        if self.frontend_workers > 1 and self.engine_process is Toggle.OFF:
            raise ValueError("DUALRATE_FRONTEND_WORKERS > 1 needs the engine core in its own process "
                             "(DUALRATE_ENGINE_PROCESS on or auto)")
        if any(b < 1 for b in self.buckets):
            raise ValueError("DUALRATE_BUCKETS must be positive row counts")
        return self


MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def model_problem(folder: Path) -> str | None:
    """Why `folder` cannot be served, in one line (None: it can): a missing folder or card, a card that breaks the
    contract (every field known and allowed; a "dualrate" card whose schedule the sampler would not follow), a file
    its format needs; for formats onnx and torch-export the checker's run of both networks (python -m export.check)."""
    from export.card import read_spec

    card_path = Path(folder) / "model_card.json"
    try:
        fmt = json.loads(card_path.read_text()).get("format", "dualrate") if card_path.is_file() else "dualrate"
    except (ValueError, AttributeError):
        fmt = "dualrate"
    if fmt == "dualrate" and (problem := checkpoint_problem(folder)) is not None:
        return problem
    try:
        read_spec(Path(folder))
    except CardError as e:
        return f"{card_path}: {'; '.join(e.problems)}"
    if fmt != "dualrate":  # a model of another's making: its graphs are run once, as python -m export.check runs them
        from export.check import check_model

        problems, _ = check_model(Path(folder))
        if problems:
            return f"{folder}: {'; '.join(problems)} (python -m export.check {folder} says the same)"
    return None


# DUALRATE_* variables that are read elsewhere, not settings: the export/engine caches, the process wiring between
# the supervisor, the front ends and the engine core, and the test suite's.
OTHER_VARIABLES = frozenset({"DUALRATE_ONNX_CACHE", "DUALRATE_ENGINE_CACHE", "DUALRATE_CORE_ADDRESS",
                             "DUALRATE_SHARED_CORE", "DUALRATE_WORKER_FD", "DUALRATE_TEST_THREADS",
                             "DUALRATE_TEST_CHECKPOINT"})


# Words a user may reach for, and the setting each means (matched like names: SLOTZ finds slots).
ALIASES = {"SLOTS": "MAX_ACTIVE_IMAGES", "BATCH": "MAX_ACTIVE_IMAGES", "BATCH_SIZE": "MAX_ACTIVE_IMAGES",
           "ACTIVE_IMAGES": "MAX_ACTIVE_IMAGES", "MODEL": "CHECKPOINT", "MODEL_DIR": "CHECKPOINT",
           "MODEL_PATH": "CHECKPOINT", "REPOSITORY": "MODEL_REPOSITORY", "MODELS_DIR": "MODEL_REPOSITORY",
           "KEY": "API_KEYS", "API_KEY": "API_KEYS", "TOKEN": "API_KEYS", "TOKENS": "API_KEYS",
           "WORKERS": "FRONTEND_WORKERS", "TIMEOUT": "DEFAULT_TIMEOUT_S", "QUEUE": "QUEUE_SIZE",
           "BIND": "HOST", "ADDRESS": "HOST", "LISTEN": "HOST", "GPU": "DEVICE", "K": "MAX_STEPS",
           "ENGINE": "BACKEND", "RUNTIME": "BACKEND", "DTYPE": "PRECISION", "THREAD": "THREADS"}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line per DUALRATE_* variable that no setting reads (a typo such as DUALRATE_PROT), with the nearest setting:
    by name, or by meaning (DUALRATE_SLOTS -> DUALRATE_MAX_ACTIVE_IMAGES, what the ready line calls slots)."""
    known = {f"DUALRATE_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    lines = []
    for var in sorted(v for v in environ if v.upper().startswith("DUALRATE_") and v.upper() not in known):
        word = var.upper().removeprefix("DUALRATE_")
        # Compared without the common prefix (which would make any two names look alike).
        candidates = {n.removeprefix("DUALRATE_"): n for n in known} | {a: f"DUALRATE_{s}" for a, s in ALIASES.items()}
        best_score, best = max((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in sorted(candidates))
        near = candidates[best] if best_score >= 0.7 else None
        lines.append(f"{var} is not a setting and is ignored" + (f" (did you mean {near}?)" if near else ""))
    return lines


def describe_settings_error(e: ValidationError | SettingsError) -> list[str]:
    """One line per invalid setting, naming the environment variable and what it expects; never the value (it may
    be a secret)."""
    if isinstance(e, SettingsError):
        return [f"invalid settings: {e}"]
    lines = []
    for err in e.errors(include_input=False, include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        var = f"DUALRATE_{field.upper()}" if field else "settings"
        info = Settings.model_fields.get(field)
        hint = f" ({info.description})" if info is not None and info.description else ""
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{var}: {msg}{hint}")
    return lines
