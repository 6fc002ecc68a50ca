"""The HTTP layer: routes per resource (`routes/`), dependencies (`deps`), and the one place a service error becomes
an HTTP answer (`answers`). `service.app.create_app` assembles them."""

from fastapi import APIRouter

from service.api.routes import generate, health, jobs, model, pages

ROUTERS = [m.router for m in (health, model, generate, jobs, pages)]  # included without prefixes
api_router = APIRouter()
for _router in ROUTERS:
    api_router.include_router(_router)
