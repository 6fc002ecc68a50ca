"""Run the service: `python -m service` (settings from DUALRATE_* environment variables; see README).

SIGTERM / SIGINT: stop admitting (new requests get 503, /health/ready turns 503), finish every accepted request,
then exit. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import uvicorn
from pydantic import ValidationError

from service.app import create_app, drain
from service.settings import Settings

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """On the first signal, drain the scheduler while still answering HTTP (503 for new work), then exit."""

    def handle_exit(self, sig: int, frame) -> None:
        state = self.config.loaded_app_state if hasattr(self.config, "loaded_app_state") else None
        if state is None or state.draining or self.should_exit:
            super().handle_exit(sig, frame)
            return
        log.info("signal %d: draining (no new requests; finishing accepted ones)", sig)
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit(state)))

    async def _drain_then_exit(self, state) -> None:
        await drain(state)
        log.info("drained; shutting down")
        self.should_exit = True


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"invalid settings (DUALRATE_* environment variables):\n{e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.max_timeout_s))
    config.loaded_app_state = app.state.dualrate  # type: ignore[attr-defined]
    server = DrainingServer(config)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
