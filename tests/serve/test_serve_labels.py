"""Label-only answers on a live server (`xsilo serve --answers label`): the client gets the argmax class and no
logits, each answered row is charged, the runs are bounded, and hostile bytes at every route get 4xx answers."""
from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from encrypted import ArgmaxKeys, ClientArgmax, ClientKeys, LinearLayout, ArgmaxSpec, decrypt, encrypt
from serve.client import Client, LabelOnly, ServeError
from serve.formats.exports import load_export
from serve.harness import ServerThread
from serve.protocol import label_request
from serve.server import create_app

from tests.serve.serve_support import (LEAKS, PROVIDER_SPEC, json_error, write_small_head, write_small_map,
                                       write_small_public_states)

pytestmark = [pytest.mark.network, pytest.mark.he]

D, K, D_CLIENT = 16, 4, 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    return {"topics": write_small_head(root / "heads" / "topics", d=D, k=K, seed=1),
            "plain": write_small_head(root / "heads" / "plain", d=D, k=K, seed=2),
            "map": write_small_map(root / "map", D_CLIENT, D)}


@pytest.fixture(scope="module")
def argmax_keys() -> ArgmaxKeys:
    return ArgmaxKeys.generate(512)  # the protocol is the same at the clients' default 2,048 bits


def plain_logits(folder, X: np.ndarray) -> np.ndarray:
    head = load_export(folder, "head")
    return X @ head.weight.T.astype(np.float64) + head.bias.astype(np.float64)


def start(http: httpx.Client, argmax_keys: ArgmaxKeys, X: np.ndarray, head: str = "topics",
          **headers: str) -> tuple[httpx.Response, ClientKeys, LinearLayout]:
    """A new session for `head` and one label request of X in it."""
    info = http.get("/v1/model").json()["heads"][head]
    layout = LinearLayout.from_dict(info["layout"])
    keys = ClientKeys.generate(layout.profile, layout.rotation_steps)
    opened = http.post("/v1/sessions", params={"head": head}, content=keys.public_bytes(), headers=headers)
    assert opened.status_code == 201, opened.text
    [blob] = encrypt(keys, layout, X)
    response = http.post(f"/v1/sessions/{opened.json()['session_id']}/label",
                         content=label_request(argmax_keys.public_bytes(), blob), headers=headers)
    return response, keys, layout


def test_a_label_only_head_answers_the_argmax_and_no_logits(folders, argmax_keys):
    app = create_app(heads=[folders["topics"], folders["plain"]], answers={"topics": "label"}, rows_per_client=110,
                     store="memory://")
    X = np.random.default_rng(0).normal(size=(9, D_CLIENT))
    with ServerThread(app, max_lifetime_s=180) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        info = http.get("/v1/model").json()["heads"]
        assert info["topics"]["answers"] == "label" and info["plain"]["answers"] == "logits"
        assert info["topics"]["argmax"]["classes"] == K and 0 < info["topics"]["label_margin"] < 0.5
        assert info["topics"]["layout"]["profile"]["name"] == "n8192-label"
        with Client(srv.url, head="topics", aligner=folders["map"], cache=False, argmax_keys=argmax_keys) as client:
            logits = plain_logits(folders["topics"], client.map_states(X))
            labels = client.label_states(X)
            assert client.last_timings["ciphertexts"] == 1
            top = np.sort(logits, axis=1)
            clear = top[:, -1] - top[:, -2] > info["topics"]["label_margin"]
            np.testing.assert_array_equal(labels[clear], logits[clear].argmax(1))
            assert client.traffic.rows_charged == 9  # the rows answered, not every lane
            many = np.random.default_rng(5).normal(size=(90, D_CLIENT))  # more rows than one label query takes
            logits = plain_logits(folders["topics"], client.map_states(many))
            top = np.sort(logits, axis=1)
            clear = top[:, -1] - top[:, -2] > info["topics"]["label_margin"]
            np.testing.assert_array_equal(client.label_states(many)[clear], logits[clear].argmax(1))
            assert client.last_timings["ciphertexts"] == 2
            with pytest.raises(LabelOnly, match="--answers label"):
                client.infer_states(X)
        response, keys, layout = start(http, argmax_keys, np.ones((1, D)))
        assert response.status_code == 200 and response.headers["X-Xsilo-Label-Stage"] == "values"
        assert response.headers["X-Xsilo-Budget-Remaining"] == str(110 - 9 - 90 - 1)  # one row declared, one charged
        opened = http.post("/v1/sessions", params={"head": "topics"}, content=keys.public_bytes()).json()
        [blob] = encrypt(keys, layout, np.ones((1, D)))
        refused = http.post(f"/v1/sessions/{opened['session_id']}/infer", content=blob)
        assert refused.status_code == 409 and json_error(refused.content)["code"] == "label_only"
        plain = start(http, argmax_keys, np.ones((1, D)), head="plain")[0]
        assert plain.status_code == 409 and json_error(plain.content)["code"] == "logits_layer"
    app = create_app(heads=[folders["plain"]], store="memory://")
    with ServerThread(app, max_lifetime_s=180) as srv:  # a logits head answers logits, as before
        with Client(srv.url, head="plain", aligner=folders["map"], cache=False) as client:
            mapped = client.map_states(X)
            np.testing.assert_allclose(client.infer_states(X), plain_logits(folders["plain"], mapped), atol=1e-3)
            np.testing.assert_array_equal(client.label_states(X), client.infer_states(X).argmax(1))


def test_a_whole_server_in_label_mode_and_settings_that_name_nothing_are_refused(folders, argmax_keys):
    app = create_app(heads=[folders["plain"]], answers="label", store="memory://")
    assert app.state.service.info["heads"]["plain"]["answers"] == "label"
    with pytest.raises(ValueError, match="'logits' or 'label'"):
        create_app(heads=[folders["plain"]], answers="labels", store="memory://")
    with pytest.raises(ValueError, match="does not serve"):
        create_app(heads=[folders["plain"]], answers={"topic": "label"}, store="memory://")


def finish(http: httpx.Client, run: str, client: ClientArgmax, **headers: str) -> np.ndarray:
    message = client.first_message()
    while message is not None:
        reply = http.post(f"/v1/label-runs/{run}", content=message, headers=headers)
        assert reply.status_code == 200, reply.text
        message = client.handle(reply.content)
    return client.labels


def test_runs_are_bounded_per_client_and_per_replica_and_idle_out(folders, argmax_keys):
    app = create_app(heads=[folders["topics"]], answers="label", label_runs_per_client=1, max_label_runs=2,
                     label_run_ttl_s=1.0, rows_per_client=100, trusted_proxies=["127.0.0.1"], store="memory://")
    spec = ArgmaxSpec(K)
    X = np.random.default_rng(1).normal(size=(2, D))
    alice, bob, carol = ({"X-Forwarded-For": a} for a in ("203.0.113.1", "203.0.113.2", "203.0.113.3"))
    with ServerThread(app, max_lifetime_s=180) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        first, keys, layout = start(http, argmax_keys, X, **alice)
        assert first.status_code == 200
        run = first.headers["X-Xsilo-Label-Run"]
        second = start(http, argmax_keys, X, **alice)[0]
        assert second.status_code == 429 and json_error(second.content)["code"] == "label_runs_exhausted"
        assert start(http, argmax_keys, X, **bob)[0].status_code == 200  # the replica's second run
        full = start(http, argmax_keys, X, **carol)[0]
        assert full.status_code == 503 and full.headers["Retry-After"] == "1"
        stranger = http.post(f"/v1/label-runs/{run}", content=b"\0" * 10, headers=bob)
        assert stranger.status_code == 404  # a run answers only the client that opened it
        client = ClientArgmax(argmax_keys, spec, decrypt(keys, layout, [first.content], 2))
        labels = finish(http, run, client, **alice)
        logits = plain_logits(folders["topics"], X)
        assert labels.tolist() == logits.argmax(1).tolist()
        assert http.post(f"/v1/label-runs/{run}", content=b"x", headers=alice).status_code == 404  # finished
        time.sleep(1.2)  # bob's run idles out, so carol fits now
        assert start(http, argmax_keys, X, **carol)[0].status_code == 200
    state = app.state.service.store
    assert state.used("rows:addr:203.0.113.1|head:topics") == 2  # the refused start was refunded
    assert state.used("rows:addr:203.0.113.3|head:topics") == 2


def test_hostile_label_bodies_get_clear_4xx_answers_and_drop_the_run(folders, argmax_keys):
    app = create_app(heads=[folders["topics"]], answers="label", store="memory://")
    X = np.random.default_rng(2).normal(size=(1, D))
    with ServerThread(app, max_lifetime_s=180) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        response, keys, layout = start(http, argmax_keys, X)
        run = response.headers["X-Xsilo-Label-Run"]
        session = http.post("/v1/sessions", params={"head": "topics"}, content=keys.public_bytes()).json()
        [blob] = encrypt(keys, layout, X)
        url = f"/v1/sessions/{session['session_id']}/label"
        bodies = {"empty length": b"\0\0\0\0" + blob, "short": b"\0\0", "keys only": label_request(
            argmax_keys.public_bytes(), b""), "bad keys": label_request(b"XSAK1" + b"\0" * 40, blob),
                  "bad query": label_request(argmax_keys.public_bytes(), b"\x01" * 300)}
        for name, body in bodies.items():
            answer = http.post(url, content=body)
            assert 400 <= answer.status_code < 500, (name, answer.status_code)
            assert not any(leak in answer.text for leak in LEAKS), name
            assert json_error(answer.content)["code"] in ("invalid_label_request", "invalid_keys",
                                                          "invalid_ciphertext", "invalid_input"), (name, answer.text)
        most = ArgmaxSpec(K).rows_per_query(layout.lanes)
        assert most == 256 // (K - 1) < layout.lanes
        [many] = encrypt(keys, layout, np.ones((most + 1, D)))  # more comparisons than one query may ask for
        answer = http.post(url, content=label_request(argmax_keys.public_bytes(), many))
        assert answer.status_code == 400 and f"at most {most} rows" in json_error(answer.content)["message"]
        client = ClientArgmax(argmax_keys, ArgmaxSpec(K), decrypt(keys, layout, [response.content], 1))
        message = client.first_message()
        too_long = http.post(f"/v1/label-runs/{run}", content=message + b"\0")
        assert too_long.status_code == 413
        garbage = http.post(f"/v1/label-runs/{run}", content=b"\0" * len(message))
        assert garbage.status_code == 400 and json_error(garbage.content)["code"] == "invalid_ciphertext"
        assert http.post(f"/v1/label-runs/{run}", content=message).status_code == 404  # the run is over
        assert http.post("/v1/label-runs/" + "x" * 300, content=b"").status_code in (404, 422)


def test_a_label_only_heads_logits_leave_by_no_route(tmp_path):
    """The val-logits route would hand out a head's logits on the public rows: a label-only head refuses it."""
    public = write_small_public_states(tmp_path / "public", n=30, d=D)
    identity = json.loads((public / "manifest.json").read_text())["model"].get("model_identity")
    head = write_small_head(tmp_path / "heads" / "topics", d=D, k=K, seed=1,
                            target={**PROVIDER_SPEC, "model_identity": identity})
    app = create_app(heads=[head], public=public, publish_val_logits=True, answers="label", store="memory://")
    with ServerThread(app, max_lifetime_s=60) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        page = http.get("/v1/public-set/val-logits", params={"head": "topics"})
        assert page.status_code == 409 and json_error(page.content)["code"] == "label_only"


def test_a_damaged_argmax_key_file_is_one_clear_error(folders, tmp_path):
    """The client's keys file is its own to fix: a damaged one gets a ServeError naming the fix (one line in
    `xsilo query`), never a traceback, and nothing is sent for it."""
    damaged = tmp_path / "argmax-keys.json"
    damaged.write_text('{"version": 1, "paillier": {}}')
    app = create_app(heads=[folders["topics"]], answers="label", store="memory://")
    with ServerThread(app, max_lifetime_s=60) as srv, \
            Client(srv.url, head="topics", aligner=folders["map"], cache=False, argmax_keys=damaged) as client:
        with pytest.raises(ServeError, match="delete it and generate new keys"):
            client.label_states(np.ones((1, D_CLIENT)))
        assert client.traffic.count("label query") == 0
