"""A real redis-server for the session; every test gets its own key prefix, deleted after it."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator

import pytest
import redis

from services.kvstore.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail(
            "redis-server is not installed: the kvstore tests need a real Redis "
            "(`make setup` installs Debian's redis-server when run as root)",
            pytrace=False,
        )
    with RedisServer(embedded=False) as server:
        yield server


@pytest.fixture
def kv_prefix(redis_server: RedisServer) -> Iterator[str]:
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_server.url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
