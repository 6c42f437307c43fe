"""A real Redis for the coordinator's store (the kvstore tests' session server), one key prefix
per test, deleted after it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from services.kvstore.redis_server import RedisServer
from tests.kvstore.conftest import redis_server  # noqa: F401 - the session's Redis


@pytest.fixture
def store_prefix(redis_server: RedisServer) -> Iterator[str]:  # noqa: F811
    prefix = f"test-coord:{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
