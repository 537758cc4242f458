"""`store`: one StateStore per test, over every backend (the redis one on a real redis-server, marked slow)."""
from __future__ import annotations

from typing import Iterator

import pytest

from serve.store import StateStore, open_store
from tests.serve.store.redis_server import redis_server, redis_url  # noqa: F401 (fixtures)


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.slow)])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh store's URL: memory://, a new sqlite file, or the session redis-server's flushed db."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'store.db'}"
    return request.getfixturevalue("redis_url")


@pytest.fixture
def store(store_url: str) -> Iterator[StateStore]:
    opened = open_store(store_url)
    yield opened
    opened.close()
