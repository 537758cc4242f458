"""The shared state store: the contract every backend keeps (budgets, sessions, fits, API keys), atomic charges
under several processes, crash safety of the sqlite file, surviving a redis restart, and clear open errors."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serve.store import ApiKeyRecord, Charge, FitRecord, Refused, SessionRecord, StateStore, StoreError, open_store
from serve.store.base import redact
from serve.store.memory import MAX_COUNTERS, MemoryStore
from tests.serve.store.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parents[3]


def session(session_id: str, layer: str | None = "bbc", keys: bytes = b"k" * 1000) -> tuple[SessionRecord, bytes]:
    return SessionRecord(session_id, layer, hashlib.sha256(keys).hexdigest(), len(keys), time.time()), keys


def put(store: StateStore, session_id: str, max_sessions: int = 10, ttl_s: float = 60.0) -> int:
    return store.put_session(*session(session_id), max_sessions=max_sessions, ttl_s=ttl_s)


# --- the contract, on every backend -----------------------------------------------------------------------------

def test_a_charge_list_is_all_or_nothing_and_refused_names_the_first_counter_over_its_limit(store):
    client, head = "rows:addr:1.2.3.4", "rows:addr:1.2.3.4|head:bbc"
    assert store.charge([Charge(client, 3, 5), Charge(head, 2, 2)]) == (None, [3, 2])
    # the head's budget is spent: the client's counter must not be charged either
    assert store.charge([Charge(client, 1, 5), Charge(head, 1, 2)]) == (Refused(1, 2, 2), [3, 2])
    assert (store.used(client), store.used(head)) == (3, 2)
    assert store.charge([Charge(client, 9, 5), Charge(head, 1, 2)])[0] == Refused(0, 3, 5)
    assert store.charge([Charge(client, 2, 5)]) == (None, [5])  # exactly up to the limit
    assert store.charge([Charge("unlimited", 10**6, None)]) == (None, [10**6])
    # two charges to one counter add up before the limit is checked
    assert store.charge([Charge("twice", 3, 4), Charge("twice", 2, 4)]) == (Refused(1, 0, 4), [0, 0])
    assert store.used("twice") == 0


def test_refunds_never_go_below_zero_and_never_create_counters(store):
    store.charge([Charge("c", 5, 10)])
    store.refund([Charge("c", 2, 10)])
    assert store.used("c") == 3
    store.refund([Charge("c", 7, 10), Charge("missing", 4, None)])
    assert (store.used("c"), store.used("missing")) == (0, 0)
    assert store.charge([Charge("missing", 1, 10)]) == (None, [1])  # not -3 + 1
    with pytest.raises(ValueError):
        store.charge([Charge("c", 0, 10)])


def test_sessions_round_trip_with_their_keys_and_delete(store):
    record, keys = session("s1", keys=os.urandom(3 << 20))
    assert store.put_session(record, keys, max_sessions=4, ttl_s=60) == 0
    fused, fused_keys = session("s2", layer=None)
    store.put_session(fused, fused_keys, max_sessions=4, ttl_s=60)
    assert store.get_session("s1", ttl_s=60) == record
    assert store.get_session("s2", ttl_s=60) == fused
    assert store.session_keys("s1") == keys
    assert store.count_sessions() == 2
    assert store.delete_session("s1") is True
    assert store.get_session("s1", ttl_s=60) is None and store.session_keys("s1") is None
    assert store.delete_session("s1") is False
    assert store.get_session("unknown", ttl_s=60) is None
    assert store.count_sessions() == 1


def test_a_full_store_evicts_the_least_recently_used_session_and_its_keys(store):
    for session_id in "abc":
        assert put(store, session_id, max_sessions=3) == 0
    assert store.get_session("a", ttl_s=60) is not None  # a is now the most recently used: b is next out
    assert put(store, "d", max_sessions=3) == 1
    assert store.get_session("b", ttl_s=60) is None and store.session_keys("b") is None
    assert put(store, "e", max_sessions=3) == 1  # c goes
    assert [s for s in "abcde" if store.get_session(s, ttl_s=60)] == ["a", "d", "e"]
    assert put(store, "a", max_sessions=3) == 0  # replacing a session evicts nothing
    assert store.count_sessions() == 3
    assert put(store, "f", max_sessions=1) == 3  # a lower bound evicts down to it


def test_counters_sessions_and_fits_expire_ttl_after_their_last_use(store):
    ttl = 0.6
    store.charge([Charge("idle", 1, None, ttl), Charge("busy", 1, None, ttl), Charge("forever", 1, None)])
    put(store, "idle", ttl_s=ttl)
    put(store, "busy", ttl_s=ttl)
    for fit in ("idle", "busy"):
        assert store.claim_fit(FitRecord(fit, "alice", "r1", time.time()), per_client=2, ttl_s=ttl)
    time.sleep(0.35)
    store.charge([Charge("busy", 1, None, ttl)])
    assert store.get_session("busy", ttl_s=ttl) is not None
    store.touch_fit("busy", ttl_s=ttl)
    time.sleep(0.35)  # idle ones expired 0.6 s after their start, busy ones expire 0.95 s after it
    assert (store.used("idle"), store.used("busy"), store.used("forever")) == (0, 2, 1)
    assert store.charge([Charge("idle", 1, 1, ttl)]) == (None, [1])  # an expired counter starts from zero
    assert store.get_session("idle", ttl_s=ttl) is None and store.session_keys("idle") is None
    assert store.get_session("busy", ttl_s=ttl) is not None and store.session_keys("busy") is not None
    assert store.count_sessions() == 1
    assert store.get_fit("idle") is None and store.get_fit("busy") is not None
    # the expired fit no longer holds one of alice's two slots
    assert store.claim_fit(FitRecord("new", "alice", "r1", time.time()), per_client=2, ttl_s=60)
    assert not store.claim_fit(FitRecord("newer", "alice", "r1", time.time()), per_client=2, ttl_s=60)


def test_fit_claims_are_bounded_per_client_and_released(store):
    def claim(fit: str, client: str) -> bool:
        return store.claim_fit(FitRecord(fit, client, "replica-1", 1.5), per_client=2, ttl_s=60)

    assert claim("f1", "alice") and claim("f2", "alice")
    assert not claim("f3", "alice")
    assert claim("f4", "bob")
    assert store.get_fit("f1") == FitRecord("f1", "alice", "replica-1", 1.5)
    assert store.get_fit("f3") is None
    store.release_fit("f1")
    store.release_fit("never-claimed")
    assert store.get_fit("f1") is None
    assert claim("f3", "alice")
    store.touch_fit("f1", ttl_s=60)  # touching a released fit does not revive it
    assert store.get_fit("f1") is None


def test_api_keys_are_unique_by_name_and_digest_and_revocable(store):
    alice = ApiKeyRecord("alice", hashlib.sha256(b"key-a").hexdigest(), 1000, None, 100.0)
    bob = ApiKeyRecord("bob", hashlib.sha256(b"key-b").hexdigest(), None, 3, 200.0)
    store.add_api_key(bob)
    store.add_api_key(alice)
    with pytest.raises(StoreError, match="alice"):
        store.add_api_key(ApiKeyRecord("alice", "0" * 64, None, None, 300.0))
    with pytest.raises(StoreError, match="digest"):
        store.add_api_key(ApiKeyRecord("carol", alice.digest, None, None, 300.0))
    assert store.find_api_key(alice.digest) == alice
    assert store.find_api_key("f" * 64) is None
    assert store.revoke_api_key("alice") is True
    assert store.revoke_api_key("alice") is False and store.revoke_api_key("nobody") is False
    assert store.find_api_key(alice.digest).revoked
    assert store.list_api_keys() == [ApiKeyRecord("alice", alice.digest, 1000, None, 100.0, revoked=True), bob]


# --- atomic charges under concurrency ---------------------------------------------------------------------------

def _hammer(store: StateStore, threads: int, attempts: int, limit: int, go) -> int:
    """Charge 1 row at a time from `threads` threads (each `attempts` times) once `go` is set; the rows granted."""
    granted, errors = [0] * threads, []

    def work(index: int) -> None:
        go.wait()
        try:
            for _ in range(attempts):
                refused, values = store.charge([Charge("rows:client", 1, limit), Charge("rows:total", 1, None)])
                if refused is None:
                    assert values[0] <= limit
                    granted[index] += 1
        except Exception as exc:  # a thread's exception would otherwise only be printed
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return sum(granted)


def _hammer_process(url: str, threads: int, attempts: int, limit: int, ready, go, results) -> None:
    store = open_store(url)
    ready.put(os.getpid())
    try:
        results.put(_hammer(store, threads, attempts, limit, go))
    except Exception as exc:
        results.put(f"{type(exc).__name__}: {exc}")  # fail the test now, not at the results' timeout
    store.close()


def hammer_processes(url: str, processes: int, threads: int, attempts: int, limit: int) -> int:
    """`_hammer` in `processes` spawned processes started together; the rows granted to all of them."""
    context = multiprocessing.get_context("spawn")
    ready, go, results = context.Queue(), context.Event(), context.Queue()
    workers = [context.Process(target=_hammer_process, args=(url, threads, attempts, limit, ready, go, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=60)
        go.set()  # every process has imported and opened the store: they charge together
        counts = [results.get(timeout=120) for _ in workers]
        assert all(isinstance(count, int) for count in counts), counts
        granted = sum(counts)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    assert [worker.exitcode for worker in workers] == [0] * processes
    return granted


def test_the_memory_store_forgets_the_least_recently_charged_counter_beyond_its_bound():
    store = MemoryStore(max_counters=2)
    store.charge([Charge("a", 1, None), Charge("b", 1, None)])
    store.charge([Charge("a", 1, None)])
    store.charge([Charge("c", 1, None)])
    assert (store.used("a"), store.used("b"), store.used("c")) == (2, 0, 1)
    assert MAX_COUNTERS == 100_000


def test_concurrent_threads_never_get_more_than_the_limit_from_one_memory_store():
    store, go = open_store("memory://"), threading.Event()
    go.set()
    assert _hammer(store, threads=8, attempts=40, limit=200, go=go) == 200
    assert store.used("rows:client") == 200 and store.used("rows:total") == 200


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_concurrent_processes_never_get_more_than_the_limit(backend, request, tmp_path):
    """4 processes x 3 threads race for 200 rows with 300 attempts: exactly 200 granted, each counted once."""
    url = f"sqlite:///{tmp_path / 'hammer.db'}" if backend == "sqlite" else request.getfixturevalue("redis_url")
    processes, threads, attempts, limit = 4, 3, 25, 200
    granted = hammer_processes(url, processes, threads, attempts, limit)
    assert granted == min(limit, processes * threads * attempts)
    with open_store(url) as store:
        assert store.used("rows:client") == granted
        assert store.used("rows:total") == granted  # no charge list was applied in part


# --- crash safety, restarts, open errors --------------------------------------------------------------------------

WRITER = """
import hashlib, os, sys, time
from serve.store import Charge, SessionRecord, open_store

store, blob, i = open_store(sys.argv[1]), os.urandom(1 << 20), 0
while True:
    i += 1
    keys = i.to_bytes(8, "big") + blob[8:]
    store.put_session(SessionRecord(f"{os.getpid()}-{i}", "bbc", hashlib.sha256(keys).hexdigest(), len(keys),
                                    time.time()), keys, max_sessions=4, ttl_s=600)
    print(store.charge([Charge("rows", 1, None)])[1][0], flush=True)
"""


@pytest.mark.slow
def test_a_sqlite_store_killed_mid_write_reopens_intact(tmp_path):
    """SIGKILL a writer of 1 MB sessions and charges, three times: the file is intact, the counter holds every
    printed charge (and at most the one in flight), and every session still there has all of its key bytes."""
    path = tmp_path / "killed.db"
    url = f"sqlite:///{path}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    session_ids: list[str] = []
    for _ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, cwd=REPO, env=env)
        printed: list[int] = []
        try:
            for _ in range(random.randint(3, 10)):
                line = writer.stdout.readline()
                assert line, f"the writer exited early with {writer.wait()}"
                printed.append(int(line))
            time.sleep(random.uniform(0, 0.03))  # land anywhere in a put_session or a charge
        finally:
            writer.send_signal(signal.SIGKILL)
            rest = writer.communicate(timeout=30)[0]
        assert writer.returncode == -signal.SIGKILL
        printed += [int(line) for line in rest.splitlines() if line.strip()]
        session_ids += [f"{writer.pid}-{i}" for i in range(1, len(printed) + 3)]
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        with open_store(url) as store:
            assert store.used("rows") in (printed[-1], printed[-1] + 1)
            alive = [r for r in (store.get_session(s, ttl_s=600) for s in session_ids) if r is not None]
            assert 3 <= len(alive) <= 4
            for record in alive:
                keys = store.session_keys(record.session_id)
                assert len(keys) == record.key_bytes and hashlib.sha256(keys).hexdigest() == record.layer_sha256


@pytest.mark.slow
def test_a_redis_store_reconnects_after_the_server_restarts():
    with RedisServer() as server:
        store = open_store(server.url)
        assert store.charge([Charge("rows", 2, 10)]) == (None, [2])
        put(store, "s1")
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreError, match=f"127.0.0.1:{server.port}"):
            store.used("rows")  # while it is down: a StoreError, not a redis-py exception
        assert time.monotonic() - started < 10
        server.start()  # same port, no data (no persistence): the same store object works again
        assert store.charge([Charge("rows", 1, 10)]) == (None, [1])
        assert put(store, "s2") == 0 and store.get_session("s2", ttl_s=60) is not None
        store.ping()
        store.close()


def test_open_store_refuses_unknown_urls_naming_the_accepted_forms():
    for url in ("postgres://db/xsilo", "state.db", "memory://somewhere", "sqlite:///", "sqlite://relative.db"):
        with pytest.raises(StoreError, match="sqlite:///") as refused:
            open_store(url)
        if url.startswith("postgres"):
            assert "redis://" in str(refused.value) and "memory://" in str(refused.value)


def test_an_unreachable_redis_is_a_quick_store_error_without_the_password():
    port = free_port()
    started = time.monotonic()
    with pytest.raises(StoreError) as refused:
        open_store(f"redis://:hunter2@127.0.0.1:{port}/0")
    assert time.monotonic() - started < 10
    message = str(refused.value)
    assert f"redis://127.0.0.1:{port}/0" in message and "redis-server" in message and "hunter2" not in message
    assert redact("rediss://user:pw@host:6380/2?password=pw") == "rediss://user@host:6380/2"


def test_unwritable_or_corrupt_sqlite_files_are_store_errors(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="writable"):
        open_store(f"sqlite:///{blocker / 'sub' / 'store.db'}")
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"definitely not sqlite " * 500)
    with pytest.raises(StoreError, match="corrupt"):
        open_store(f"sqlite:///{corrupt}")


def test_sqlite_urls_take_relative_and_absolute_paths_and_create_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///nested/dir/relative.db") as store:
        store.charge([Charge("c", 1, None)])
    assert (tmp_path / "nested" / "dir" / "relative.db").exists()
    with open_store(f"sqlite:///{tmp_path / 'nested' / 'dir' / 'relative.db'}") as store:  # sqlite:////abs/path
        assert store.used("c") == 1
        assert store.url.startswith("sqlite:////")
