from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(max_active_images=16, max_images_per_request=8, queue_size=64, max_steps=128)
