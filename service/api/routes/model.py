"""GET /v1/models (every served model), /v1/models/{name} (one), /v1/model (the default one): the model card, the
engine, the limits and the delivered image geometry."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import Authorized, StateDep
from service.core import NotReady
from service.schemas import ErrorBody, ModelInfo, ModelList
from service.state import AppState, ModelEntry

router = APIRouter()


@router.get("/v1/model", response_model=ModelInfo, tags=["model"], dependencies=[Authorized])
async def model_info(state: StateDep) -> ModelInfo:
    """The default model (the only one, or the first of DUALRATE_MODELS)."""
    return describe(state, state.default)


@router.get("/v1/models", response_model=ModelList, tags=["model"], dependencies=[Authorized])
async def models(state: StateDep) -> ModelList:
    """Every served model; requests name one in their `model` field."""
    return ModelList(default=state.default.name, models=[describe(state, e) for e in state.models.values()])


@router.get("/v1/models/{name}", response_model=ModelInfo, tags=["model"], dependencies=[Authorized],
            responses={404: {"model": ErrorBody, "description": "no such model: the body lists the served ones"}})
async def one_model(name: str, state: StateDep) -> ModelInfo:
    return describe(state, state.model(name))


def describe(state: AppState, entry: ModelEntry) -> ModelInfo:
    if entry.core is None or not state.ready:
        raise NotReady("the engine is not loaded yet")
    settings, spec, info = state.settings, entry.spec, entry.core.engine_info
    limits = {"max_images_per_request": settings.max_images_per_request, "max_steps": settings.max_steps,
              "max_timeout_s": settings.max_timeout_s, "default_timeout_s": settings.default_timeout_s,
              "max_active_images": settings.slots(entry.name), "queue_size": settings.queue_size,
              "default_preview_every": settings.default_preview_every, "min_preview_every": settings.min_preview_every}
    s = spec.sample
    square = s.height == s.width and s.output_height == s.output_width
    image = {"channels": s.channels, "sample_size": s.height if square else None,
             "output_size": s.output_height if square else None, "height": s.height, "width": s.width,
             "output_height": s.output_height, "output_width": s.output_width,
             "png_mode": "L" if s.channels == 1 else "RGB", "num_classes": spec.num_classes,
             "class_names": spec.class_names, "format": spec.format, "prediction": spec.diffusion.prediction,
             "time_input": spec.diffusion.time_input}
    b = entry.budget
    auto = {"allowed": b.allowed, "fid_ratio": {str(k): round(r, 4) for k, r in sorted(b.fid_ratio.items())},
            "fid_ratio_spread": {str(k): round(s, 4) for k, s in sorted(b.fid_ratio_std.items())},
            "quality_budget": b.budget, "latency_target_s": settings.latency_target_s}
    return ModelInfo(name=entry.name, card=entry.model_card,
                     backend=info.backend, device=info.device, precision=info.precision,
                     providers=list(info.providers), policy=settings.policy.value, limits=limits,
                     defaults=entry.defaults, image=image, auto_encoder_interval=auto,
                     default=entry is state.default, state=state_info(state, entry))


def state_info(state: AppState, entry: ModelEntry) -> dict[str, float | int | None]:
    """The model's batch slots and what their per-image state takes (the split of DUALRATE_STATE_MEMORY_MB)."""
    settings = state.settings
    slots, per_image = settings.model_state[entry.name]
    budget = settings.state_memory_mb
    return {"slots": slots, "per_image_state_bytes": per_image, "state_bytes": slots * per_image,
            "budget_bytes": None if budget is None else int(budget * 2**20),
            "share_bytes": None if budget is None else int(budget * 2**20 / len(state.models))}
