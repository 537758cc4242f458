"""The SQLite store ('sqlite:///path.db'): one file shared by the server's threads and by processes on one machine.

WAL mode, one connection per thread, and every read-modify-write in a BEGIN IMMEDIATE transaction (the file's
write lock, waited for up to BUSY_TIMEOUT_S), so charges are atomic across processes. Expired rows are purged
lazily: those a call meets, and all of them every PURGE_EVERY write transactions of a store object.
"""
from __future__ import annotations

import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from .base import (ApiKeyRecord, Charge, FitRecord, Refused, SessionRecord, StateStore, StoreError, check_bound,
                   check_charges, check_ttl)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 5.0
PURGE_EVERY = 1000

SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires REAL);
CREATE INDEX IF NOT EXISTS counters_expires ON counters (expires) WHERE expires IS NOT NULL;
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, layer TEXT, layer_sha256 TEXT NOT NULL, key_bytes INTEGER NOT NULL,
    created REAL NOT NULL, last_used REAL NOT NULL, expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_last_used ON sessions (last_used);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires);
-- the key blobs (MB each) in their own table, so reading a session record never touches their pages
CREATE TABLE IF NOT EXISTS session_keys (session_id TEXT PRIMARY KEY, keys BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS fits (
    session_id TEXT PRIMARY KEY, client TEXT NOT NULL, replica TEXT NOT NULL, created REAL NOT NULL,
    expires REAL NOT NULL);
CREATE INDEX IF NOT EXISTS fits_client ON fits (client, expires);
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, rows_per_client INTEGER, fits_per_client INTEGER,
    created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
"""
SESSION_COLUMNS = "session_id, layer, layer_sha256, key_bytes, created"
FIT_COLUMNS = "session_id, client, replica, created"
KEY_COLUMNS = "name, digest, rows_per_client, fits_per_client, created, revoked"


class _Connection:
    """A thread's connection; sqlite3.Connection takes no weak references, this holder does. When its thread
    ends, the thread-local drops the holder and the connection closes."""

    __slots__ = ("db", "__weakref__")

    def __init__(self, db: sqlite3.Connection):
        self.db = db


def _api_key(row: tuple) -> ApiKeyRecord:
    return ApiKeyRecord(row[0], row[1], row[2], row[3], row[4], bool(row[5]))


class SqliteStore(StateStore):
    """State in one SQLite file."""

    def __init__(self, url: str, path: Path):
        self.url, self.path = url, path
        self._local = threading.local()
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        self._writes = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder of the store {url} ({exc}); choose a path in a writable "
                             f"folder (sqlite:///relative/path.db or sqlite:////absolute/path.db)") from exc
        with self._errors():
            db = self._db()
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"the store {url} has schema version {version}, newer than this xsilo's "
                                 f"{SCHEMA_VERSION}; upgrade xsilo or use another store file")
            if version < SCHEMA_VERSION:
                with self._write() as db:
                    # executescript() would COMMIT this transaction first: run the statements one by one
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # connections and transactions
    def _db(self) -> sqlite3.Connection:
        holder = getattr(self._local, "connection", None)
        if holder is not None:
            return holder.db
        if self._closed:
            raise StoreError(f"the store {self.url} is closed; open a new one with open_store()")
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"the store {self.url} cannot use WAL mode (journal_mode is {mode}); put it on a "
                                 f"local file system")
            db.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            db.close()
            raise
        holder = _Connection(db)
        self._local.connection = holder
        with self._lock:
            self._connections.add(holder)
        return db

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Every sqlite3 error as a StoreError naming the store and the fix."""
        try:
            yield
        except sqlite3.Error as exc:
            text = str(exc)
            if "locked" in text or "busy" in text:
                fix = (f"another process held the store's write lock for over {BUSY_TIMEOUT_S:g} s; check for a "
                       f"stuck process using the file")
            elif "not a database" in text or "malformed" in text or "corrupt" in text:
                fix = ("the file is corrupt: stop the servers, move it aside and restart (budgets, sessions and API "
                       "keys in it are lost)")
            elif "unable to open" in text or "readonly" in text or "read-only" in text or "disk" in text:
                fix = "choose a writable path on a local disk with free space"
            else:
                fix = "check the file and its folder"
            raise StoreError(f"the store {self.url} failed: {text}; {fix}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A BEGIN IMMEDIATE transaction: committed on success, rolled back on any exception."""
        with self._errors():
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                self._writes += 1
                if self._writes % PURGE_EVERY == 0:
                    self._purge(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, parameters: tuple = ()) -> tuple | None:
        with self._errors():
            return self._db().execute(sql, parameters).fetchone()

    @staticmethod
    def _purge(db: sqlite3.Connection) -> None:
        """Delete every expired row (inside the caller's transaction)."""
        now = time.time()
        db.execute("DELETE FROM counters WHERE expires IS NOT NULL AND expires <= ?", (now,))
        db.execute("DELETE FROM session_keys WHERE session_id IN "
                   "(SELECT session_id FROM sessions WHERE expires <= ?)", (now,))
        db.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
        db.execute("DELETE FROM fits WHERE expires <= ?", (now,))

    # counters
    def charge(self, charges: Sequence[Charge]) -> tuple[Refused | None, list[int]]:
        check_charges(charges)
        with self._write() as db:
            now = time.time()
            values: dict[str, int] = {}
            for key in dict.fromkeys(c.key for c in charges):
                row = db.execute("SELECT value FROM counters WHERE key = ? AND (expires IS NULL OR expires > ?)",
                                 (key, now)).fetchone()
                values[key] = row[0] if row else 0
            pending = dict(values)
            for index, c in enumerate(charges):
                if c.limit is not None and pending[c.key] + c.amount > c.limit:
                    return Refused(index, values[c.key], c.limit), [values[c.key] for c in charges]
                pending[c.key] += c.amount
            expires = {c.key: None if c.ttl_s is None else now + c.ttl_s for c in charges}  # a key's last charge
            db.executemany("INSERT INTO counters (key, value, expires) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE "
                           "SET value = excluded.value, expires = excluded.expires",
                           [(key, value, expires[key]) for key, value in pending.items()])
        return None, [pending[c.key] for c in charges]

    def refund(self, charges: Sequence[Charge]) -> None:
        check_charges(charges)
        with self._write() as db:
            now = time.time()
            db.executemany("UPDATE counters SET value = max(0, value - ?) WHERE key = ? AND "
                           "(expires IS NULL OR expires > ?)", [(c.amount, c.key, now) for c in charges])

    def used(self, key: str) -> int:
        row = self._read("SELECT value FROM counters WHERE key = ? AND (expires IS NULL OR expires > ?)",
                         (key, time.time()))
        return row[0] if row else 0

    # sessions
    @staticmethod
    def _drop_sessions(db: sqlite3.Connection, ids: list[str]) -> None:
        db.executemany("DELETE FROM session_keys WHERE session_id = ?", [(i,) for i in ids])
        db.executemany("DELETE FROM sessions WHERE session_id = ?", [(i,) for i in ids])

    def put_session(self, record: SessionRecord, keys: bytes, *, max_sessions: int, ttl_s: float) -> int:
        check_bound(max_sessions, "max_sessions")
        check_ttl(ttl_s)
        with self._write() as db:
            now = time.time()
            expired = [row[0] for row in db.execute("SELECT session_id FROM sessions WHERE expires <= ?", (now,))]
            self._drop_sessions(db, [*expired, record.session_id])
            live = db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
            evicted = [row[0] for row in db.execute("SELECT session_id FROM sessions ORDER BY last_used, rowid "
                                                    "LIMIT ?", (max(0, live - max_sessions + 1),))]
            self._drop_sessions(db, evicted)
            db.execute(f"INSERT INTO sessions ({SESSION_COLUMNS}, last_used, expires) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (record.session_id, record.layer, record.layer_sha256, record.key_bytes, record.created,
                        now, now + ttl_s))
            db.execute("INSERT INTO session_keys (session_id, keys) VALUES (?, ?)", (record.session_id, keys))
        return len(evicted)

    def get_session(self, session_id: str, *, ttl_s: float) -> SessionRecord | None:
        check_ttl(ttl_s)
        with self._write() as db:
            now = time.time()
            row = db.execute(f"SELECT {SESSION_COLUMNS}, expires FROM sessions WHERE session_id = ?",
                             (session_id,)).fetchone()
            if row is None:
                return None
            if row[5] <= now:
                self._drop_sessions(db, [session_id])
                return None
            db.execute("UPDATE sessions SET last_used = ?, expires = ? WHERE session_id = ?",
                       (now, now + ttl_s, session_id))
        return SessionRecord(*row[:5])

    def session_keys(self, session_id: str) -> bytes | None:
        row = self._read("SELECT k.keys FROM session_keys k JOIN sessions s ON s.session_id = k.session_id "
                         "WHERE k.session_id = ? AND s.expires > ?", (session_id, time.time()))
        return row[0] if row else None

    def delete_session(self, session_id: str) -> bool:
        with self._write() as db:
            row = db.execute("SELECT expires FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
            self._drop_sessions(db, [session_id])
        return row is not None and row[0] > time.time()

    def count_sessions(self) -> int:
        row = self._read("SELECT COUNT(*) FROM sessions WHERE expires > ?", (time.time(),))
        return row[0] if row else 0

    # fits
    def claim_fit(self, record: FitRecord, *, per_client: int, ttl_s: float) -> bool:
        check_bound(per_client, "per_client")
        check_ttl(ttl_s)
        with self._write() as db:
            now = time.time()
            held = db.execute("SELECT COUNT(*) FROM fits WHERE client = ? AND expires > ? AND session_id != ?",
                              (record.client, now, record.session_id)).fetchone()[0]
            if held >= per_client:
                return False
            db.execute(f"INSERT OR REPLACE INTO fits ({FIT_COLUMNS}, expires) VALUES (?, ?, ?, ?, ?)",
                       (record.session_id, record.client, record.replica, record.created, now + ttl_s))
        return True

    def get_fit(self, session_id: str) -> FitRecord | None:
        row = self._read(f"SELECT {FIT_COLUMNS} FROM fits WHERE session_id = ? AND expires > ?",
                         (session_id, time.time()))
        return FitRecord(*row) if row else None

    def touch_fit(self, session_id: str, *, ttl_s: float) -> None:
        check_ttl(ttl_s)
        with self._write() as db:
            now = time.time()
            db.execute("UPDATE fits SET expires = ? WHERE session_id = ? AND expires > ?",
                       (now + ttl_s, session_id, now))

    def release_fit(self, session_id: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM fits WHERE session_id = ?", (session_id,))

    # API keys
    def add_api_key(self, record: ApiKeyRecord) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM api_keys WHERE name = ?", (record.name,)).fetchone():
                raise StoreError(f"an API key named {record.name!r} exists; choose another name or revoke it")
            if db.execute("SELECT 1 FROM api_keys WHERE digest = ?", (record.digest,)).fetchone():
                raise StoreError("an API key with this digest exists; generate a new key")
            db.execute(f"INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                       (record.name, record.digest, record.rows_per_client, record.fits_per_client, record.created,
                        int(record.revoked)))

    def find_api_key(self, digest: str) -> ApiKeyRecord | None:
        row = self._read(f"SELECT {KEY_COLUMNS} FROM api_keys WHERE digest = ?", (digest,))
        return _api_key(row) if row else None

    def revoke_api_key(self, name: str) -> bool:
        with self._write() as db:
            return db.execute("UPDATE api_keys SET revoked = 1 WHERE name = ? AND revoked = 0",
                              (name,)).rowcount == 1

    def list_api_keys(self) -> list[ApiKeyRecord]:
        with self._errors():
            rows = self._db().execute(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created, name").fetchall()
        return [_api_key(row) for row in rows]

    # lifecycle
    def ping(self) -> None:
        self._read("SELECT COUNT(*) FROM sqlite_master")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            holders = list(self._connections)
        for holder in holders:
            holder.db.close()
        self._local = threading.local()
