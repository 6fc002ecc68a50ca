"""GET /v1/model: the model card, the engine, the limits and the delivered image geometry."""

from __future__ import annotations

from fastapi import APIRouter

from dualrate.checkpoint import class_names
from service.api.deps import Authorized, StateDep
from service.core import NotReady
from service.schemas import ModelInfo

router = APIRouter()


@router.get("/v1/model", response_model=ModelInfo, tags=["model"], dependencies=[Authorized])
async def model_info(state: StateDep) -> ModelInfo:
    if state.core is None or not state.ready:
        raise NotReady("the engine is not loaded yet")
    settings, cfg, info = state.settings, state.cfg, state.core.engine_info
    limits = {"max_images_per_request": settings.max_images_per_request, "max_steps": settings.max_steps,
              "max_timeout_s": settings.max_timeout_s, "default_timeout_s": settings.default_timeout_s,
              "max_active_images": settings.max_active_images, "queue_size": settings.queue_size,
              "default_preview_every": settings.default_preview_every, "min_preview_every": settings.min_preview_every}
    image = {"channels": cfg.channels, "sample_size": cfg.image_size, "output_size": cfg.output_size,
             "png_mode": "L" if cfg.channels == 1 else "RGB", "num_classes": cfg.num_classes,
             "class_names": class_names(state.model_card)}
    b = state.budget
    auto = {"allowed": b.allowed, "fid_ratio": {str(k): round(r, 4) for k, r in sorted(b.fid_ratio.items())},
            "fid_ratio_spread": {str(k): round(s, 4) for k, s in sorted(b.fid_ratio_std.items())},
            "quality_budget": b.budget, "latency_target_s": settings.latency_target_s}
    return ModelInfo(name=state.model_card.get("name", settings.checkpoint.name), card=state.model_card,
                     backend=info.backend, device=info.device, precision=info.precision,
                     providers=list(info.providers), policy=settings.policy.value, limits=limits,
                     defaults=state.defaults, image=image, auto_encoder_interval=auto)
