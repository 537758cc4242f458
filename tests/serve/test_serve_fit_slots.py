"""Private-fit slots cannot be held by one client: one open fit per client, kept alive only by progress, bounded in
lifetime, free of slow uploads; a fit whose accumulators live on another replica answers a clear 409."""
from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import pytest

from encrypted import FitKeys, GramPlan, encrypt_chunk
from serve.harness import ServerThread
from serve.server import create_app

from tests.serve.serve_support import json_error, write_small_public_states

pytestmark = [pytest.mark.network, pytest.mark.he]

D_A, D_B = 6, 12


@pytest.fixture(scope="module")
def public_dir(tmp_path_factory):
    return write_small_public_states(tmp_path_factory.mktemp("fit-slots") / "public", n=40, d=D_B)


@pytest.fixture(scope="module")
def keys(public_dir):
    plan = create_app(public=public_dir, store="memory://").state.service.fit.plan(D_A)
    return FitKeys.generate(plan)


def open_fit(http: httpx.Client, keys: FitKeys, fingerprint: str) -> httpx.Response:
    return http.post("/v1/fit/sessions", params={"source_dim": D_A, "fingerprint": fingerprint},
                     content=keys.public_bytes())


def fingerprint(http: httpx.Client) -> str:
    return http.get("/v1/model").json()["public_set"]["fingerprint"]


def code(response: httpx.Response) -> str:
    return json_error(response.content)["code"]


def test_one_client_holds_one_fit_slot(public_dir, keys):
    app = create_app(public=public_dir, store="memory://", max_fit_sessions=2, fits_per_client=None)
    with ServerThread(app) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        first = open_fit(http, keys, fingerprint(http))
        assert first.status_code == 201
        second = open_fit(http, keys, fingerprint(http))
        assert second.status_code == 429 and code(second) == "fit_slots_exhausted"
        assert http.delete(f"/v1/fit/sessions/{first.json()['session_id']}").status_code == 204
        assert open_fit(http, keys, fingerprint(http)).status_code == 201


def test_only_progress_keeps_a_fit_alive(public_dir, keys):
    app = create_app(public=public_dir, store="memory://", fit_session_ttl_s=1.0, fits_per_client=None)
    with ServerThread(app) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        session = open_fit(http, keys, fingerprint(http)).json()["session_id"]
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline:  # refused requests (a chunk out of order) do not count as progress
            response = http.post(f"/v1/fit/sessions/{session}/parts/0/chunks/1", content=b"x")
            assert response.status_code in (404, 409)
            time.sleep(0.2)
        response = http.post(f"/v1/fit/sessions/{session}/parts/0/chunks/0", content=b"x")
        assert response.status_code == 404 and code(response) == "fit_session_not_found"
        assert open_fit(http, keys, fingerprint(http)).status_code == 201  # its slot was freed


def test_a_fit_ends_after_its_lifetime_however_it_progresses(public_dir, keys):
    app = create_app(public=public_dir, store="memory://", fit_session_ttl_s=60, fit_session_max_s=2.0,
                     fits_per_client=None)
    with ServerThread(app) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        opened = open_fit(http, keys, fingerprint(http)).json()
        plan, session = GramPlan.from_dict(opened["plan"]), opened["session_id"]

        def send(part: int) -> httpx.Response:
            rows = np.random.default_rng(part).normal(size=(plan.rows(part, 0), D_A))
            return http.post(f"/v1/fit/sessions/{session}/parts/{part}/chunks/0",
                             content=encrypt_chunk(keys, plan, part, 0, rows))

        time.sleep(1.0)
        assert send(0).status_code == 200  # progress, 1 s before the lifetime ends
        time.sleep(1.2)
        response = send(1)
        assert response.status_code == 404 and code(response) == "fit_session_not_found"
        assert open_fit(http, keys, fingerprint(http)).status_code == 201


def test_a_slow_key_upload_holds_no_fit_slot(public_dir, keys):
    app = create_app(public=public_dir, store="memory://", max_fit_sessions=1, body_timeout_s=20)
    with ServerThread(app) as server:
        http = httpx.Client(base_url=server.url, timeout=60)
        body = keys.public_bytes()
        slow = socket.create_connection(("127.0.0.1", server.port))
        try:
            slow.sendall((f"POST /v1/fit/sessions?source_dim={D_A}&fingerprint={fingerprint(http)} HTTP/1.1\r\n"
                          f"Host: x\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[:1000])
            time.sleep(0.3)
            other = httpx.Client(base_url=server.url, timeout=60, headers={"X-Forwarded-For": "ignored"})
            assert open_fit(other, keys, fingerprint(other)).status_code == 201
        finally:
            slow.close()


def test_a_fit_held_by_another_replica_answers_409_and_can_be_closed_anywhere(public_dir, keys, tmp_path):
    options = {"public": public_dir, "store": f"sqlite:///{tmp_path / 'state.db'}", "fits_per_client": None}
    with ServerThread(create_app(replica_id="a", **options)) as a, \
            ServerThread(create_app(replica_id="b", **options)) as b:
        on_a, on_b = httpx.Client(base_url=a.url, timeout=60), httpx.Client(base_url=b.url, timeout=60)
        session = open_fit(on_a, keys, fingerprint(on_a)).json()["session_id"]
        response = on_b.post(f"/v1/fit/sessions/{session}/parts/0/chunks/0", content=b"x")
        assert response.status_code == 409 and code(response) == "fit_session_lost"
        assert "DELETE" in json_error(response.content)["message"]
        assert open_fit(on_b, keys, fingerprint(on_b)).status_code == 429  # one slot per client, across replicas
        assert on_b.delete(f"/v1/fit/sessions/{session}").status_code == 204
        response = on_a.post(f"/v1/fit/sessions/{session}/parts/0/chunks/0", content=b"x")
        assert response.status_code == 404  # closed on b: a drops its accumulators too
        assert open_fit(on_b, keys, fingerprint(on_b)).status_code == 201
