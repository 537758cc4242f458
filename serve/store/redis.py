"""The Redis store ('redis://[:password@]host:port/db', 'rediss://...'): shared by replicas on several machines.

Every read-modify-write is one Lua script, so it is atomic on the server; scripts read the server's clock
(TIME), so replicas agree on expiry whatever their own clocks. Keys start with `xsilo:`; scripts build some key
names themselves (evicted sessions, a fit's client set), so the store needs a standalone Redis, not a cluster.
A command that fails on a connection error is retried (3 times, exponential backoff), so a Redis restart is
survived; a charge whose reply was lost may then be applied twice (the client is charged, never undercharged).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .base import (ApiKeyRecord, Charge, FitRecord, Refused, SessionRecord, StateStore, StoreError, check_bound,
                   check_charges, check_ttl)

PREFIX = "xsilo:"

# Shared by the scripts: the server's clock in seconds, scores written with microseconds (Lua's default number
# format keeps 14 digits, a tenth of a millisecond at today's dates: too coarse to order sessions by last use).
_LUA_HEAD = """
local P = ARGV[1]
local function clock() local t = redis.call('TIME'); return tonumber(t[1]) + tonumber(t[2]) / 1000000 end
local function num(x) return string.format('%.6f', x) end
local function drop_session(id)
  redis.call('DEL', P .. 's:' .. id, P .. 'sk:' .. id)
  redis.call('ZREM', P .. 'sessions:used', id)
  redis.call('ZREM', P .. 'sessions:expires', id)
end
local function purge_sessions(now)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'sessions:expires', '-inf', num(now))) do
    drop_session(id)
  end
end
"""

# KEYS: one counter per charge; ARGV: prefix, then amount, limit ('' = none), ttl in ms ('' = none) per charge.
# Returns {refused index or -1, its used, its limit, each charge's counter value...}.
_CHARGE = """
local n = #KEYS
local now_values, pending = {}, {}
for i = 1, n do
  if pending[KEYS[i]] == nil then
    local v = tonumber(redis.call('GET', KEYS[i]) or '0')
    now_values[KEYS[i]], pending[KEYS[i]] = v, v
  end
end
for i = 1, n do
  local k, amount, limit = KEYS[i], tonumber(ARGV[3 * i - 1]), ARGV[3 * i]
  if limit ~= '' and pending[k] + amount > tonumber(limit) then
    local out = {i - 1, now_values[k], tonumber(limit)}
    for j = 1, n do out[#out + 1] = now_values[KEYS[j]] end
    return out
  end
  pending[k] = pending[k] + amount
end
local out = {-1, 0, 0}
for i = 1, n do
  redis.call('INCRBY', KEYS[i], ARGV[3 * i - 1])
  if ARGV[3 * i + 1] ~= '' then redis.call('PEXPIRE', KEYS[i], ARGV[3 * i + 1]) else redis.call('PERSIST', KEYS[i]) end
  out[#out + 1] = pending[KEYS[i]]
end
return out
"""

# KEYS: counters; ARGV: prefix, amounts. DECRBY keeps a counter's expiry; a missing counter stays missing.
_REFUND = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 and redis.call('DECRBY', KEYS[i], ARGV[i + 1]) < 0 then
    redis.call('SET', KEYS[i], 0, 'KEEPTTL')
  end
end
"""

# ARGV: prefix, id, max_sessions, ttl_ms, keys, has_layer, layer, layer_sha256, key_bytes, created. Returns evicted.
_PUT_SESSION = _LUA_HEAD + """
local id, ttl_ms = ARGV[2], tonumber(ARGV[4])
local now = clock()
purge_sessions(now)
drop_session(id)
local evicted = 0
local excess = redis.call('ZCARD', P .. 'sessions:used') - tonumber(ARGV[3]) + 1
if excess > 0 then
  for _, old in ipairs(redis.call('ZRANGE', P .. 'sessions:used', 0, excess - 1)) do
    drop_session(old)
    evicted = evicted + 1
  end
end
local record = P .. 's:' .. id
redis.call('HSET', record, 'layer_sha256', ARGV[8], 'key_bytes', ARGV[9], 'created', ARGV[10])
if ARGV[6] == '1' then redis.call('HSET', record, 'layer', ARGV[7]) end
redis.call('SET', P .. 'sk:' .. id, ARGV[5], 'PX', ttl_ms)
redis.call('PEXPIRE', record, ttl_ms)
redis.call('ZADD', P .. 'sessions:used', num(now), id)
redis.call('ZADD', P .. 'sessions:expires', num(now + ttl_ms / 1000), id)
return evicted
"""

# ARGV: prefix, id, ttl_ms. Returns the record's fields (never the keys), or nil.
_GET_SESSION = _LUA_HEAD + """
local id, ttl_ms = ARGV[2], tonumber(ARGV[3])
local now = clock()
local expires = redis.call('ZSCORE', P .. 'sessions:expires', id)
if not expires then return false end
local fields = redis.call('HGETALL', P .. 's:' .. id)
if tonumber(expires) <= now or #fields == 0 then drop_session(id); return false end
redis.call('ZADD', P .. 'sessions:used', num(now), id)
redis.call('ZADD', P .. 'sessions:expires', num(now + ttl_ms / 1000), id)
redis.call('PEXPIRE', P .. 's:' .. id, ttl_ms)
redis.call('PEXPIRE', P .. 'sk:' .. id, ttl_ms)
return fields
"""

# ARGV: prefix, id. Returns 1 when the session was live.
_DELETE_SESSION = _LUA_HEAD + """
local expires = redis.call('ZSCORE', P .. 'sessions:expires', ARGV[2])
drop_session(ARGV[2])
if expires and tonumber(expires) > clock() then return 1 end
return 0
"""

_COUNT_SESSIONS = _LUA_HEAD + """
purge_sessions(clock())
return redis.call('ZCARD', P .. 'sessions:used')
"""

# KEYS: the client's fit set (id -> expiry), the fit record. ARGV: prefix, id, per_client, ttl_ms, client, replica,
# created. Returns 1 when claimed.
_CLAIM_FIT = _LUA_HEAD + """
local id, ttl_ms = ARGV[2], tonumber(ARGV[4])
local now = clock()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', num(now))
local held = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], id) then held = held - 1 end
if held >= tonumber(ARGV[3]) then return 0 end
local old = redis.call('HGET', KEYS[2], 'client')
if old and old ~= ARGV[5] then redis.call('ZREM', P .. 'fc:' .. old, id) end
redis.call('HSET', KEYS[2], 'client', ARGV[5], 'replica', ARGV[6], 'created', ARGV[7])
redis.call('PEXPIRE', KEYS[2], ttl_ms)
redis.call('ZADD', KEYS[1], num(now + ttl_ms / 1000), id)
if redis.call('PTTL', KEYS[1]) < ttl_ms then redis.call('PEXPIRE', KEYS[1], ttl_ms) end
return 1
"""

# KEYS: the fit record. ARGV: prefix, id, ttl_ms.
_TOUCH_FIT = _LUA_HEAD + """
local client = redis.call('HGET', KEYS[1], 'client')
if not client then return 0 end
local ttl_ms, set = tonumber(ARGV[3]), P .. 'fc:' .. client
redis.call('ZADD', set, num(clock() + ttl_ms / 1000), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl_ms)
if redis.call('PTTL', set) < ttl_ms then redis.call('PEXPIRE', set, ttl_ms) end
return 1
"""

# KEYS: the fit record. ARGV: prefix, id.
_RELEASE_FIT = """
local client = redis.call('HGET', KEYS[1], 'client')
if client then redis.call('ZREM', ARGV[1] .. 'fc:' .. client, ARGV[2]) end
redis.call('DEL', KEYS[1])
"""

# KEYS: the key's record, the digest -> name index. ARGV: prefix, digest, name, then the record's fields.
# Returns 0 when added, 1 when the name exists, 2 when the digest does.
_ADD_API_KEY = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 2 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 0
"""

_REVOKE_API_KEY = """
if redis.call('HGET', KEYS[1], 'revoked') == '0' then redis.call('HSET', KEYS[1], 'revoked', '1'); return 1 end
return 0
"""


def _ms(ttl_s: float) -> int:
    return max(1, math.ceil(ttl_s * 1000))


def _optional_int(value: bytes | None) -> int | None:
    return None if not value else int(value)


def _text(value: int | None) -> str:
    return "" if value is None else str(value)


class RedisStore(StateStore):
    """State in one Redis database."""

    def __init__(self, url: str, redacted: str):
        self.url = redacted
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5,
                                               health_check_interval=30, retry=Retry(ExponentialBackoff(), 3),
                                               decode_responses=False)
        except (ValueError, redis.RedisError) as exc:
            raise StoreError(f"cannot use the redis URL {redacted} ({exc}); write it as "
                             f"redis://[:password@]host:port/db or rediss://...") from exc
        register = self._redis.register_script
        self._charge, self._refund = register(_CHARGE), register(_REFUND)
        self._put_session, self._get_session = register(_PUT_SESSION), register(_GET_SESSION)
        self._delete_session, self._count_sessions = register(_DELETE_SESSION), register(_COUNT_SESSIONS)
        self._claim_fit, self._touch_fit = register(_CLAIM_FIT), register(_TOUCH_FIT)
        self._release_fit = register(_RELEASE_FIT)
        self._add_api_key, self._revoke_api_key = register(_ADD_API_KEY), register(_REVOKE_API_KEY)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Every redis-py error as a StoreError naming the store and the fix."""
        try:
            yield
        except redis.AuthenticationError as exc:
            raise StoreError(f"redis at {self.url} refused the password ({exc}); put the right one in the URL "
                             f"(redis://:password@host:port/db)") from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreError(f"cannot reach redis at {self.url} ({exc}); start redis-server there or fix the URL's "
                             f"host and port") from exc
        except redis.RedisError as exc:
            raise StoreError(f"redis at {self.url} failed ({exc}); check the server's log (memory limit, "
                             f"read-only replica)") from exc

    # counters
    def charge(self, charges: Sequence[Charge]) -> tuple[Refused | None, list[int]]:
        check_charges(charges)
        if not charges:
            return None, []
        args: list[str | int] = [PREFIX]
        for c in charges:
            args += [c.amount, _text(c.limit), "" if c.ttl_s is None else _ms(c.ttl_s)]
        with self._errors():
            out = self._charge(keys=[PREFIX + "c:" + c.key for c in charges], args=args)
        index, used, limit, values = int(out[0]), int(out[1]), int(out[2]), [int(v) for v in out[3:]]
        return (None if index < 0 else Refused(index, used, limit)), values

    def refund(self, charges: Sequence[Charge]) -> None:
        check_charges(charges)
        if charges:
            with self._errors():
                self._refund(keys=[PREFIX + "c:" + c.key for c in charges], args=[PREFIX, *(c.amount for c in charges)])

    def used(self, key: str) -> int:
        with self._errors():
            value = self._redis.get(PREFIX + "c:" + key)
        return int(value) if value is not None else 0

    # sessions
    def put_session(self, record: SessionRecord, keys: bytes, *, max_sessions: int, ttl_s: float) -> int:
        check_bound(max_sessions, "max_sessions")
        check_ttl(ttl_s)
        with self._errors():
            return int(self._put_session(args=[
                PREFIX, record.session_id, max_sessions, _ms(ttl_s), keys, "0" if record.layer is None else "1",
                record.layer or "", record.layer_sha256, record.key_bytes, repr(float(record.created))]))

    def get_session(self, session_id: str, *, ttl_s: float) -> SessionRecord | None:
        check_ttl(ttl_s)
        with self._errors():
            out = self._get_session(args=[PREFIX, session_id, _ms(ttl_s)])
        if not out:
            return None
        fields = dict(zip(out[::2], out[1::2]))
        layer = fields.get(b"layer")
        return SessionRecord(session_id, None if layer is None else layer.decode(), fields[b"layer_sha256"].decode(),
                             int(fields[b"key_bytes"]), float(fields[b"created"]))

    def session_keys(self, session_id: str) -> bytes | None:
        with self._errors():  # the blob expires with its session (PEXPIRE) and is deleted on eviction
            return self._redis.get(PREFIX + "sk:" + session_id)

    def delete_session(self, session_id: str) -> bool:
        with self._errors():
            return bool(self._delete_session(args=[PREFIX, session_id]))

    def count_sessions(self) -> int:
        with self._errors():
            return int(self._count_sessions(args=[PREFIX]))

    # fits
    def claim_fit(self, record: FitRecord, *, per_client: int, ttl_s: float) -> bool:
        check_bound(per_client, "per_client")
        check_ttl(ttl_s)
        with self._errors():
            return bool(self._claim_fit(
                keys=[PREFIX + "fc:" + record.client, PREFIX + "f:" + record.session_id],
                args=[PREFIX, record.session_id, per_client, _ms(ttl_s), record.client, record.replica,
                      repr(float(record.created))]))

    def get_fit(self, session_id: str) -> FitRecord | None:
        with self._errors():
            fields = self._redis.hgetall(PREFIX + "f:" + session_id)
        if not fields:
            return None
        return FitRecord(session_id, fields[b"client"].decode(), fields[b"replica"].decode(),
                         float(fields[b"created"]))

    def touch_fit(self, session_id: str, *, ttl_s: float) -> None:
        check_ttl(ttl_s)
        with self._errors():
            self._touch_fit(keys=[PREFIX + "f:" + session_id], args=[PREFIX, session_id, _ms(ttl_s)])

    def release_fit(self, session_id: str) -> None:
        with self._errors():
            self._release_fit(keys=[PREFIX + "f:" + session_id], args=[PREFIX, session_id])

    # API keys
    def add_api_key(self, record: ApiKeyRecord) -> None:
        fields = ["name", record.name, "digest", record.digest, "rows_per_client", _text(record.rows_per_client),
                  "fits_per_client", _text(record.fits_per_client), "created", repr(float(record.created)),
                  "revoked", "1" if record.revoked else "0"]
        with self._errors():
            status = int(self._add_api_key(keys=[PREFIX + "k:" + record.name, PREFIX + "kd"],
                                           args=[PREFIX, record.digest, record.name, *fields]))
        if status == 1:
            raise StoreError(f"an API key named {record.name!r} exists; choose another name or revoke it")
        if status == 2:
            raise StoreError("an API key with this digest exists; generate a new key")

    @staticmethod
    def _api_key(fields: dict[bytes, bytes]) -> ApiKeyRecord:
        rows, fits = _optional_int(fields.get(b"rows_per_client")), _optional_int(fields.get(b"fits_per_client"))
        return ApiKeyRecord(fields[b"name"].decode(), fields[b"digest"].decode(), rows, fits,
                            float(fields[b"created"]), fields.get(b"revoked") == b"1")

    def find_api_key(self, digest: str) -> ApiKeyRecord | None:
        with self._errors():
            name = self._redis.hget(PREFIX + "kd", digest)
            fields = self._redis.hgetall(PREFIX.encode() + b"k:" + name) if name is not None else None
        return self._api_key(fields) if fields else None

    def revoke_api_key(self, name: str) -> bool:
        with self._errors():
            return bool(self._revoke_api_key(keys=[PREFIX + "k:" + name], args=[PREFIX]))

    def list_api_keys(self) -> list[ApiKeyRecord]:
        with self._errors():
            names = self._redis.hvals(PREFIX + "kd")
            pipe = self._redis.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(PREFIX.encode() + b"k:" + name)
            records = [self._api_key(fields) for fields in pipe.execute() if fields]
        return sorted(records, key=lambda r: (r.created, r.name))

    # lifecycle
    def ping(self) -> None:
        with self._errors():
            self._redis.ping()

    def close(self) -> None:
        with self._errors():
            self._redis.close()
