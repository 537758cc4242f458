"""What a client can learn of a served head, and what it is charged (issue 25's audit): every row of a head's
outputs counts against one budget whatever route it leaves by, the budget follows an issued API key across sessions
and addresses, and a circuit-private server refuses at upload the keys it could not answer privately."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from encrypted import ClientKeys, LinearLayout, decrypt, encrypt
from serve.formats.exports import load_export
from serve.formats.public_states import load_public_states
from serve.harness import ServerThread
from serve.server import create_app
from serve.store import open_store

from tests.encrypted.crafted_keys import public_key_blob, with_public_key
from tests.serve.serve_support import json_error, write_small_head, write_small_public_states

pytestmark = [pytest.mark.network, pytest.mark.he]

D, K, VAL = 16, 3, 8  # the public set: 30 rows, 8 of them val


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("extraction")
    return {"head": write_small_head(root / "heads" / "topics", d=D, k=K, seed=1),
            "public": write_small_public_states(root / "public", n=30, d=D)}


def head_rows(folders, X: np.ndarray) -> np.ndarray:
    head = load_export(folders["head"], "head")
    return X @ head.weight.T.astype(np.float64) + head.bias.astype(np.float64)


def layout_and_keys(url: str, headers: dict | None = None) -> tuple[LinearLayout, ClientKeys]:
    info = httpx.get(f"{url}/v1/model", headers=headers or {}).json()["heads"]["topics"]
    layout = LinearLayout.from_dict(info["layout"])
    return layout, ClientKeys.generate(layout.profile, layout.rotation_steps)


def query(http: httpx.Client, keys: ClientKeys, layout: LinearLayout, X: np.ndarray, **headers: str) -> httpx.Response:
    """A new session for head topics and one query of X in it."""
    opened = http.post("/v1/sessions", params={"head": "topics"}, content=keys.public_bytes(), headers=headers)
    assert opened.status_code == 201, opened.text
    [blob] = encrypt(keys, layout, X)
    return http.post(f"/v1/sessions/{opened.json()['session_id']}/infer", content=blob, headers=headers)


def test_val_logits_rows_are_charged_to_the_heads_budget_as_queries_are(folders):
    """The audit read the public val states exactly (a private fit with one-hot columns), then their logits for free:
    now every val row is a row of the head's per-client budget, counted with the query rows, refetches included."""
    lanes = create_app(heads=[folders["head"]], store="memory://").state.service.info["heads"]["topics"]["lanes"]
    budget = lanes + 5
    app = create_app(heads=[folders["head"]], public=folders["public"], publish_val_logits=True,
                     rows_per_client=budget, max_public_texts=3, store="memory://")
    store = app.state.service.store
    val_states = load_public_states(folders["public"]).parts[1].astype(np.float64)
    with ServerThread(app, max_lifetime_s=120) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        page = http.get("/v1/public-set/val-logits", params={"head": "topics"})  # rows 0-2
        assert page.status_code == 200 and page.headers["X-Xsilo-Budget-Remaining"] == str(budget - 3)
        np.testing.assert_allclose(page.json()["logits"], head_rows(folders, val_states[:3]), rtol=1e-12)
        again = http.get("/v1/public-set/val-logits", params={"head": "topics"})  # no page memory: charged again
        assert again.status_code == 200 and again.headers["X-Xsilo-Budget-Remaining"] == str(budget - 6)
        assert store.used("rows:addr:127.0.0.1|head:topics") == 6
        layout, keys = layout_and_keys(srv.url)
        refused = query(http, keys, layout, val_states[:1])  # lanes more would pass the budget
        assert refused.status_code == 429 and json_error(refused.content)["code"] == "budget_exhausted"
        end = http.get("/v1/public-set/val-logits", params={"head": "topics", "offset": VAL})  # an empty page
        assert end.status_code == 200 and end.json()["logits"] == [] and end.headers["X-Xsilo-Budget-Remaining"] == \
            str(budget - 6)
    fresh = create_app(heads=[folders["head"]], public=folders["public"], publish_val_logits=True,
                       rows_per_client=budget, max_public_texts=3, store="memory://")
    with ServerThread(fresh, max_lifetime_s=120) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        layout, keys = layout_and_keys(srv.url)
        answered = query(http, keys, layout, val_states[:1])
        assert answered.status_code == 200 and answered.headers["X-Xsilo-Budget-Remaining"] == "5"
        pages = [http.get("/v1/public-set/val-logits", params={"head": "topics", "offset": offset})
                 for offset in (0, 3)]
        assert [p.status_code for p in pages] == [200, 429]  # 3 rows fit, the next 3 would not: no partial page
        error = json_error(pages[1].content)
        assert error["code"] == "budget_exhausted" and "val logits" in error["message"]
        assert pages[1].headers["X-Xsilo-Budget-Remaining"] == "0"
        assert fresh.state.service.store.used("rows:addr:127.0.0.1|head:topics") == lanes + 3  # one counter


def test_the_budget_follows_an_issued_key_across_sessions_and_addresses(folders, tmp_path, capsys):
    """With --api_keys true the identity is the key: new sessions and another (forwarded) address spend the same
    budget, on queries and val logits alike; another key has its own."""
    from serve.commands import keys_add

    url = f"sqlite:///{tmp_path / 'state.db'}"
    lanes = create_app(heads=[folders["head"]], store="memory://").state.service.info["heads"]["topics"]["lanes"]
    keys_add("alice", rows_per_client=lanes + VAL, store=url)
    alice = {"Authorization": f"Bearer {capsys.readouterr().out.strip()}"}
    keys_add("bob", store=url)
    bob = {"X-API-Key": capsys.readouterr().out.strip()}
    app = create_app(heads=[folders["head"]], public=folders["public"], publish_val_logits=True, store=url,
                     api_keys=True, trusted_proxies=["127.0.0.1"], rows_per_client=4 * lanes)
    X = np.random.default_rng(2).normal(size=(1, D))
    with ServerThread(app, max_lifetime_s=120) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        layout, keys = layout_and_keys(srv.url, alice)
        first = query(http, keys, layout, X, **alice, **{"X-Forwarded-For": "203.0.113.1"})
        assert first.status_code == 200 and first.headers["X-Xsilo-Budget-Remaining"] == str(VAL)
        np.testing.assert_allclose(decrypt(keys, layout, [first.content], 1), head_rows(folders, X), atol=1e-3)
        page = http.get("/v1/public-set/val-logits", params={"head": "topics"},
                        headers={**alice, "X-Forwarded-For": "198.51.100.7"})  # another address, same key
        assert page.status_code == 200 and page.headers["X-Xsilo-Budget-Remaining"] == "0"
        for address in ("203.0.113.2", None):  # a new session from a third address, or from the proxy itself
            forwarded = {"X-Forwarded-For": address} if address else {}
            refused = query(http, keys, layout, X, **alice, **forwarded)
            assert refused.status_code == 429 and json_error(refused.content)["code"] == "budget_exhausted"
            assert "client" in json_error(refused.content)["message"]
        assert query(http, keys, layout, X, **bob, **{"X-Forwarded-For": "203.0.113.1"}).status_code == 200
    with open_store(url) as state:
        assert state.used("rows:name:alice|head:topics") == lanes + VAL
        assert state.used("rows:name:bob|head:topics") == lanes
        for address in ("203.0.113.1", "203.0.113.2", "198.51.100.7", "127.0.0.1"):
            assert state.used(f"rows:addr:{address}|head:topics") == 0


def test_a_circuit_private_server_refuses_at_upload_the_keys_it_cannot_answer_privately(folders):
    """The audit: the PUBK (0, 1) was accepted (one reply then told two weight matrices apart), and keys without a
    PUBK opened a session (201) whose every query was refused. Both are 400 invalid_keys at upload now."""
    app = create_app(heads=[folders["head"]], circuit_privacy=30, store="memory://")
    with ServerThread(app, max_lifetime_s=120) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        assert http.get("/v1/model").json()["circuit_privacy"] == 30
        layout, keys = layout_and_keys(srv.url)
        profile = layout.profile
        bodies = {"(0, 1)": with_public_key(keys.public_bytes(), public_key_blob(profile, np.uint64(0), np.uint64(1))),
                  "no PUBK": with_public_key(keys.public_bytes(), None)}
        for name, body in bodies.items():
            response = http.post("/v1/sessions", params={"head": "topics"}, content=body)
            error = json_error(response.content)
            assert response.status_code == 400 and error["code"] == "invalid_keys", (name, error)
            assert "ClientKeys.public_bytes()" in error["message"], name
        assert "re-randomise" in json_error(http.post("/v1/sessions", params={"head": "topics"},
                                                      content=bodies["(0, 1)"]).content)["message"]
        assert http.get("/healthz").json()["sessions"] == 0  # nothing was opened
        X = np.random.default_rng(3).normal(size=(2, D))
        answered = query(http, keys, layout, X)  # a real key: accepted, answered, privately
        assert answered.status_code == 200
        np.testing.assert_allclose(decrypt(keys, layout, [answered.content], 2), head_rows(folders, X), atol=0.2)
    plain = create_app(heads=[folders["head"]], store="memory://")  # without circuit privacy no PUBK is needed
    with ServerThread(plain, max_lifetime_s=60) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        layout, keys = layout_and_keys(srv.url)
        body = with_public_key(keys.public_bytes(), None)
        assert http.post("/v1/sessions", params={"head": "topics"}, content=body).status_code == 201
