"""The front end's side of the engine core (RemoteCore) without a core: what its heartbeat reports."""

from __future__ import annotations

import asyncio

from service.core import RemoteCore


def test_a_core_that_has_not_answered_yet_is_starting_not_frozen(tmp_path):
    """A core still importing its libraries answers nothing for seconds: liveness must not call it frozen then (a
    Kubernetes startup probe on /health/live would restart it); once it has answered, silence is a freeze."""

    async def run() -> tuple[str | None, str | None]:
        core = RemoteCore(None, f"ipc://{tmp_path}/none.sock", heartbeat_timeout_s=0.1)
        try:
            core.last_heard -= 10
            before = core.frozen
            core.heard = True
            return before, core.frozen
        finally:
            core.sock.close()
            core.ctx.term()

    before, after = asyncio.run(run())
    assert before is None
    assert after is not None and "has not answered for 10 s" in after
