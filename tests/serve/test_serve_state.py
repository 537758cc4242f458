"""The server's state in a store: budgets survive restarts, replicas share sessions and budgets to the row, issued API
keys, fit slots bounded per client and in time, pinned folders."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from encrypted import ClientKeys, LinearLayout, decrypt, encrypt
from serve.formats.digests import folder_sha256
from serve.formats.exports import load_export
from serve.formats.folders import ExportError
from serve.harness import ServerThread
from serve.identity import KEY_CACHE_S
from serve.server import create_app
from serve.store import open_store

from tests.serve.serve_support import ROOT, json_error, start_xsilo_serve, write_small_export

pytestmark = [pytest.mark.network, pytest.mark.he]

D, K = 16, 3


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return write_small_export(tmp_path_factory.mktemp("state") / "export", d=D, k=K, seed=5)


@pytest.fixture(scope="module")
def layout_keys(export_dir):
    layout = LinearLayout.from_dict(create_app(export_dir, store="memory://").state.service.info["layout"])
    return layout, ClientKeys.generate(layout.profile, layout.rotation_steps)


def expected(export_dir, X: np.ndarray) -> np.ndarray:
    layer = load_export(export_dir)
    return X @ layer.weight.T + layer.bias


def open_session(http: httpx.Client, keys: ClientKeys) -> str:
    response = http.post("/v1/sessions", content=keys.public_bytes())
    assert response.status_code == 201, response.text
    return response.json()["session_id"]


def ask(http: httpx.Client, session: str, layout: LinearLayout, keys: ClientKeys, X: np.ndarray) -> httpx.Response:
    [query] = encrypt(keys, layout, X)
    return http.post(f"/v1/sessions/{session}/infer", content=query)


def test_a_spent_budget_stays_spent_after_a_restart(export_dir, layout_keys):
    """The default store is SQLite under $XSILO_HOME: a restart keeps the budget and the session."""
    layout, keys = layout_keys
    process, url, _ = start_xsilo_serve(export_dir, "--rows_per_client", str(2 * layout.lanes))
    try:
        http = httpx.Client(base_url=url, timeout=60)
        session = open_session(http, keys)
        X = np.random.default_rng(0).normal(size=(2, D))
        for _ in range(2):
            assert ask(http, session, layout, keys, X).status_code == 200
        assert ask(http, session, layout, keys, X).status_code == 429
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    process, url, _ = start_xsilo_serve(export_dir, "--rows_per_client", str(2 * layout.lanes))
    try:
        http = httpx.Client(base_url=url, timeout=60)
        response = ask(http, session, layout, keys, X)  # the old session is known: 429, not 404
        assert response.status_code == 429 and json_error(response.content)["code"] == "budget_exhausted"
        fresh = open_session(http, keys)
        response = ask(http, fresh, layout, keys, X)
        assert response.status_code == 429 and json_error(response.content)["code"] == "budget_exhausted"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.slow)])
def shared_store(request, tmp_path) -> str:
    """A store two replicas share: a SQLite file, or a real redis-server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return request.getfixturevalue("redis_url")


def test_two_replicas_share_sessions_and_budgets_to_the_row(export_dir, layout_keys, shared_store):
    """A session opened on one replica is answered by the other, and concurrent queries on both never pass the
    per-client budget: exactly budget / lanes answers, all correct."""
    layout, keys = layout_keys
    url = shared_store
    queries_allowed = 12
    options = {"store": url, "rows_per_client": queries_allowed * layout.lanes, "max_concurrency": 2}
    X = np.random.default_rng(1).normal(size=(layout.lanes, D))
    want = expected(export_dir, X)
    with ServerThread(create_app(export_dir, replica_id="a", **options)) as a, \
            ServerThread(create_app(export_dir, replica_id="b", **options)) as b:
        session = open_session(httpx.Client(base_url=a.url, timeout=60), keys)
        codes: list[int] = []
        lock = threading.Lock()

        def worker(base: str) -> None:
            http = httpx.Client(base_url=base, timeout=60)
            for _ in range(6):
                response = ask(http, session, layout, keys, X)
                if response.status_code == 200:
                    got = decrypt(keys, layout, [response.content], len(X))
                    assert np.allclose(got, want, atol=1e-3)
                with lock:
                    codes.append(response.status_code)

        threads = [threading.Thread(target=worker, args=(base,)) for base in (a.url, b.url, a.url, b.url)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(set(codes)) == [200, 429]
        assert codes.count(200) == queries_allowed
        health = httpx.get(f"{b.url}/healthz").json()
        assert health["sessions"] == 1 and health["replica_id"] == "b"
        assert httpx.delete(f"{b.url}/v1/sessions/{session}").status_code == 204
        assert ask(httpx.Client(base_url=a.url, timeout=60), session, layout, keys, X).status_code == 404


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightning_modules.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_issued_keys_each_have_a_budget_and_are_revoked_without_a_restart(export_dir, layout_keys, tmp_path):
    layout, keys = layout_keys
    url = f"sqlite:///{tmp_path / 'state.db'}"
    issued = run_cli("keys", "add", "alice", "--rows_per_client", str(layout.lanes), "--store", url)
    assert issued.returncode == 0, issued.stderr
    alice = issued.stdout.strip()
    bob = run_cli("keys", "add", "bob", "--store", url).stdout.strip()
    assert alice.startswith("xsk_") and bob.startswith("xsk_") and alice != bob
    assert run_cli("keys", "add", "bob", "--store", url).returncode == 2  # a name is issued once
    listed = [json.loads(line) for line in run_cli("keys", "list", "--store", url).stdout.splitlines()]
    assert {row["name"] for row in listed} == {"alice", "bob"} and alice not in json.dumps(listed)
    X = np.random.default_rng(2).normal(size=(1, D))
    with ServerThread(create_app(export_dir, store=url, api_keys=True, rows_per_client=3 * layout.lanes)) as server:
        anonymous = httpx.Client(base_url=server.url, timeout=60)
        assert anonymous.post("/v1/sessions", content=keys.public_bytes()).status_code == 401
        as_alice = httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {alice}"})
        as_bob = httpx.Client(base_url=server.url, timeout=60, headers={"X-API-Key": bob})
        session = open_session(as_alice, keys)
        assert ask(as_alice, session, layout, keys, X).status_code == 200
        assert ask(as_alice, session, layout, keys, X).status_code == 429  # alice's own budget: one query
        for _ in range(3):  # bob has the server's default, and the same session id does not share alice's
            assert ask(as_bob, session, layout, keys, X).status_code == 200
        assert ask(as_bob, session, layout, keys, X).status_code == 429
        assert run_cli("keys", "revoke", "bob", "--store", url).returncode == 0
        revoked = time.monotonic()
        while (response := as_bob.get("/v1/model")).status_code == 200:  # a replica trusts a found key ≤ 1 s
            assert time.monotonic() - revoked < KEY_CACHE_S + 0.5
            time.sleep(0.05)
        assert response.status_code == 401 and json_error(response.content)["code"] == "unauthorized"
        assert as_alice.get("/v1/model").status_code == 200
    assert run_cli("keys", "revoke", "carol", "--store", url).returncode == 2


def test_the_folders_served_can_be_pinned(export_dir, tmp_path):
    digest = folder_sha256(export_dir)
    create_app(export_dir, store="memory://", expect_sha256=[digest])  # the pinned content starts
    edited = tmp_path / "edited"
    edited.mkdir()
    for path in export_dir.iterdir():
        (edited / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["label_names"] = ["x", "y", "z"]  # relabelled: the manifest's own sha256 fields still match
    (edited / "manifest.json").write_text(json.dumps(manifest))
    create_app(edited, store="memory://")  # unpinned, it would be served
    with pytest.raises(ExportError, match="expect_sha256"):
        create_app(edited, store="memory://", expect_sha256=[digest])
    with pytest.raises(ValueError, match="64 lowercase hex"):
        create_app(export_dir, store="memory://", expect_sha256=["abc"])


@pytest.mark.slow
def test_a_store_outage_is_a_503_and_the_server_recovers(export_dir, layout_keys, redis_url, redis_server):
    """Redis stops mid-session: requests get 503 store_unavailable (never a 500), /readyz says so, and once Redis is
    back (empty: it keeps nothing on disk here) the client re-opens its session and is answered."""
    layout, keys = layout_keys
    X = np.zeros((1, D))
    with ServerThread(create_app(export_dir, store=redis_url)) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        session = open_session(http, keys)
        assert ask(http, session, layout, keys, X).status_code == 200
        redis_server.stop()
        response = ask(http, session, layout, keys, X)
        assert response.status_code == 503 and json_error(response.content)["code"] == "store_unavailable"
        assert "Retry-After" in response.headers
        assert http.get("/readyz").status_code == 503
        assert http.get("/healthz").status_code == 200
        redis_server.start()
        assert http.get("/readyz").status_code == 200
        response = ask(http, session, layout, keys, X)
        assert response.status_code == 404 and json_error(response.content)["code"] == "session_not_found"
        assert ask(http, open_session(http, keys), layout, keys, X).status_code == 200


@pytest.mark.slow
def test_a_replica_killed_mid_write_leaves_a_consistent_store(export_dir, layout_keys, tmp_path):
    """SIGKILL an `xsilo serve` while four clients query it: the SQLite store opens clean, and the budget charged is
    the rows answered, plus at most the requests in flight when it died."""
    import sqlite3

    layout, keys = layout_keys
    store = tmp_path / "state.db"
    process, url, _ = start_xsilo_serve(export_dir, "--store", f"sqlite:///{store}")
    session = open_session(httpx.Client(base_url=url, timeout=60), keys)
    answered = [0] * 4
    X = np.random.default_rng(3).normal(size=(1, D))
    [query] = encrypt(keys, layout, X)

    def worker(i: int) -> None:
        http = httpx.Client(base_url=url, timeout=10)
        while True:
            try:
                response = http.post(f"/v1/sessions/{session}/infer", content=query)
            except httpx.TransportError:
                return
            if response.status_code == 200:
                answered[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    process.kill()  # SIGKILL: no drain, no cleanup
    process.wait(30)
    for thread in threads:
        thread.join(30)
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    process, url, _ = start_xsilo_serve(export_dir, "--store", f"sqlite:///{store}")
    try:
        assert httpx.get(f"{url}/healthz").json()["sessions"] == 1  # the session survived the kill
        with open_store(f"sqlite:///{store}") as state:
            rows = state.used("rows:addr:127.0.0.1|fused")
        assert sum(answered) > 0
        assert sum(answered) * layout.lanes <= rows <= (sum(answered) + 4) * layout.lanes
        response = ask(httpx.Client(base_url=url, timeout=60), session, layout, keys, X)
        assert response.status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
