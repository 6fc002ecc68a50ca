from __future__ import annotations

import os

import pytest

from service.process import ServerProcess


@pytest.fixture(scope="module")
def start_server(checkpoint_dir, onnx_dir, tmp_path_factory):  # noqa: ANN001, ANN201
    """Factory: start a real server with given settings; all are stopped at module end."""
    servers: list[ServerProcess] = []

    def start(**settings: object) -> ServerProcess:
        settings.setdefault("threads", int(os.environ.get("DUALRATE_TEST_THREADS", "2")))
        s = ServerProcess(checkpoint_dir, tmp_path_factory.mktemp("server") / "server.log", **settings)
        servers.append(s)
        s.wait_ready()
        return s

    yield start
    for s in servers:
        s.terminate()


@pytest.fixture(scope="module")
def server(start_server):  # noqa: ANN001, ANN201
    return start_server(max_active_images=16, max_images_per_request=8, queue_size=64, max_steps=128)
