"""Encrypted serving over real loopback HTTP: uvicorn in a background thread, httpx clients."""
from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from encrypted import ClientKeys, CkksProfile, EncryptedLinear, encrypt
from serve.client import Client, ModelMismatch, ServeError, ServerReplyError
from serve.harness import ServerThread
from serve.server import create_app

from tests.tiny import WORDS

pytestmark = [pytest.mark.network, pytest.mark.he]

D_TARGET, K = 16, 3
LABELS = ["business", "sport", "tech"]
OOD = {"detector": "energy", "threshold": -1.0, "tpr": 0.95, "all": {"msp": -0.6, "max_logit": -1.0, "energy": -1.0},
       "checkpoints": {"aligner": "/server/only/aligner.ckpt"}}
ERROR_STATUSES = {400, 413, 422}


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 14))) for _ in range(n)]


def assert_error(response: httpx.Response, statuses: set[int] | int) -> dict:
    """A JSON error body {"error": {"code", "message"}} and no traceback or internals."""
    statuses = {statuses} if isinstance(statuses, int) else statuses
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"] and body["error"]["code"]
    for leak in ("Traceback", 'File "', "site-packages", "line "):
        assert leak not in response.text, response.text
    return body["error"]


# --- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(tiny_models, tmp_path_factory):
    """A fused export whose client model is the tiny Llama (identity computed), with random map and head."""
    from datamodules.models import model_identity
    from lightning_modules.parties.export import write_export

    root = tmp_path_factory.mktemp("serve-export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSILO_HOME", str(root / "home"))
        identity = model_identity(str(tiny_models["llama"]))
    rng = np.random.default_rng(0)
    d = 32
    source = {"model": str(tiny_models["llama"]), "model_identity": identity, "pooling": "last", "layer": -1,
              "max_length": 32, "dtype": "float32", "hidden_size": d, "cache": "/server/only/path"}
    return write_export(root / "export", rng.normal(0, 1 / np.sqrt(d), (D_TARGET, d)), rng.normal(0, 0.1, D_TARGET),
                        rng.normal(0, 1, (K, D_TARGET)), rng.normal(0, 0.1, K), source=source,
                        target={"model": "server-model"}, label_names=LABELS, ood=OOD)


@pytest.fixture(scope="module")
def fused(export_dir):
    from serve.formats.exports import load_export

    return load_export(export_dir)


def plain(fused, X) -> np.ndarray:
    return np.asarray(X, np.float64) @ fused.weight.T.astype(np.float64) + fused.bias


@pytest.fixture(scope="module")
def server(export_dir):
    with ServerThread(create_app(export_dir), max_lifetime_s=300) as srv:
        yield srv


@pytest.fixture(scope="module")
def layout(server):
    from encrypted import LinearLayout

    return LinearLayout.from_dict(httpx.get(f"{server.url}/v1/model").json()["layout"])


@pytest.fixture(scope="module")
def keys(layout):
    return ClientKeys.generate(layout.profile, layout.rotation_steps)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def open_session(http: httpx.Client, keys: ClientKeys) -> str:
    response = http.post("/v1/sessions", content=keys.public_bytes())
    assert response.status_code == 201, response.text
    return response.json()["session_id"]


def check_still_serving(url: str, fused, n: int = 3, seed: int = 0) -> None:
    X = np.random.default_rng(seed).normal(0, 1, (n, fused.input_dim))
    with Client(url) as client:
        np.testing.assert_allclose(client.infer_states(X), plain(fused, X), atol=1e-3)


# --- model info, docs ---------------------------------------------------------------------------------------

def test_model_info_health_and_docs(server, http, fused):
    info = http.get("/v1/model").json()
    assert info["label_names"] == LABELS and (info["input_dim"], info["output_dim"]) == (32, K)
    assert info["client"]["pooling"] == "last" and info["client"]["max_length"] == 32
    assert info["client"]["model_identity"] == fused.manifest["source"]["model_identity"]
    assert "cache" not in info["client"]  # server-local paths stay private
    assert info["ood"] == {k: OOD[k] for k in ("detector", "threshold", "tpr", "all")}
    assert info["export_sha256"] == fused.manifest["files"]["fused.safetensors"]["sha256"]
    assert info["layout"]["profile"]["poly_modulus_degree"] == 8192
    assert info["rotation_steps"] == info["layout"]["rotation_steps"] and info["lanes"] >= 1
    assert "weight" not in json.dumps(info)  # nothing of W or b
    assert http.get("/healthz").json()["status"] == "ok"
    schema = http.get("/openapi.json").json()["paths"]
    for path in ("/v1/sessions", "/v1/sessions/{session_id}/infer"):
        body = schema[path]["post"]["requestBody"]
        assert body["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    infer_ok = schema["/v1/sessions/{session_id}/infer"]["post"]["responses"]["200"]
    assert "application/octet-stream" in infer_ok["content"]
    assert http.get("/docs").status_code == 200


# --- end to end ---------------------------------------------------------------------------------------------

def test_classify_matches_plaintext_end_to_end(server, fused):
    from datamodules.encoder import StateEncoder

    batch = texts(150)  # more than one ciphertext's lanes
    with Client(server.url, ood=0.5) as client:
        results = client.classify(batch)
        assert client.last_timings["ciphertexts"] == client.layout.ciphertexts_for(150) >= 2
        single = client.classify(batch[0])
    reference = plain(fused, StateEncoder(fused.manifest["source"]["model"], pooling="last", max_length=32)(batch))
    logits = np.array([r["logits"] for r in results])
    np.testing.assert_allclose(logits, reference, atol=1e-3 * max(1.0, np.abs(reference).max()))
    assert [r["label"] for r in results] == [LABELS[i] for i in reference.argmax(1)]
    assert single[0]["label"] == results[0]["label"]
    with Client(server.url, ood=lambda states, logits: np.linalg.norm(states, axis=1) > 1e9) as client:
        assert [r["ood"] for r in client.classify(batch[:3])] == [False] * 3
    from serve.ood_client import ood_from_logits

    with Client(server.url) as client:  # default: the detector calibrated in the export's manifest
        calibrated = client.classify(batch[:20])
    scores, flags = ood_from_logits(reference[:20], OOD)
    assert [r["ood"] for r in calibrated] == flags.tolist()
    np.testing.assert_allclose([r["ood_score"] for r in calibrated], scores, atol=1e-3)
    r = results[0]
    assert set(r) == {"label", "probabilities", "logits", "ood", "timings"}
    assert abs(sum(r["probabilities"].values()) - 1) < 1e-9
    assert r["ood"] == (max(r["probabilities"].values()) < 0.5)
    assert {"extract_ms", "encrypt_ms", "http_ms", "server_ms", "decrypt_ms", "total_ms"} <= set(r["timings"])


def test_client_refuses_another_client_model(server, tiny_models):
    with Client(server.url, client_model=str(tiny_models["gpt2"])) as client:
        with pytest.raises(ModelMismatch, match="identity"):
            client.classify(["good film"])
    with Client(server.url, client_model=str(tiny_models["gpt2"]), identity_check="warn") as client:
        with pytest.warns(UserWarning, match="identity"):
            assert len(client.classify(["good film"])) == 1
    from datamodules.encoder import StateEncoder

    with Client(server.url) as client:
        with pytest.raises(ModelMismatch, match="pooling"):
            mean_pooled = StateEncoder(str(tiny_models["llama"]), pooling="mean", max_length=32)
            client.classify(["good film"], encoder=mean_pooled)
        with pytest.raises(ModelMismatch, match=r"shape \(n, 32\)"):
            client.infer_states(np.zeros((2, 31)))


def test_sixteen_concurrent_clients(server, fused):
    results, errors = {}, []
    barrier = threading.Barrier(16)

    def work(i: int) -> None:
        try:
            X = np.random.default_rng(100 + i).normal(0, 1, (1 + i % 3, fused.input_dim))
            with Client(server.url) as client:
                client.open_session()
                barrier.wait(timeout=60)
                results[i] = (client.infer_states(X), plain(fused, X))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 16
    for got, want in results.values():
        np.testing.assert_allclose(got, want, atol=1e-3)
        assert (got.argmax(1) == want.argmax(1)).all()


# --- malformed input ----------------------------------------------------------------------------------------

def flip(data: bytes, position: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 0xFF
    return bytes(out)


def cheap_malformations(valid: bytes, other: bytes, rng: np.random.Generator, n: int):
    """`n` bodies rejected before any HE work: random bytes, broken headers, truncations, other kinds."""
    makers = [
        lambda: rng.bytes(int(rng.integers(0, 4096))),  # random bytes (and empty bodies)
        lambda: valid[:40] + rng.bytes(int(rng.integers(0, 2048))),  # valid header, garbage sections
        lambda: valid[:int(rng.integers(1, 65536))],  # truncated
        lambda: valid[:int(rng.integers(65536, len(valid)) if rng.random() < 0.05 else rng.integers(1, 200))],
        # container header: magic, version, kind, section count, fingerprint, first tag and length
        lambda: flip(valid, int(rng.integers(0, 48))),
        lambda: b"XSHE" + rng.bytes(int(rng.integers(0, 512))),
        lambda: other[:int(rng.integers(1, 4096))],  # the other endpoint's bytes, truncated
    ]
    for i in range(n):
        yield makers[i % len(makers)]()


def test_thousand_malformed_session_bodies(server, http, keys, layout, fused):
    rng = np.random.default_rng(1)
    valid = keys.public_bytes()
    query = encrypt(keys, layout, np.zeros((1, layout.input_dim)))[0]
    statuses = {}
    for body in cheap_malformations(valid, query, rng, 985):
        response = http.post("/v1/sessions", content=body)
        assert_error(response, ERROR_STATUSES)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert statuses.get(400, 0) > 800 and statuses.get(422, 0) > 0, statuses
    # the other endpoint's whole bytes, and a few flips deep in the Galois keys (SEAL parses them: bounded count)
    assert_error(http.post("/v1/sessions", content=query), 400)
    for position in rng.integers(200, len(valid), 14):
        response = http.post("/v1/sessions", content=flip(valid, int(position)))
        assert response.status_code in {201} | ERROR_STATUSES, response.text[:200]
        if response.status_code != 201:
            assert_error(response, ERROR_STATUSES)
    check_still_serving(server.url, fused)


def test_thousand_malformed_query_bodies(server, http, keys, layout, fused):
    rng = np.random.default_rng(2)
    session = open_session(http, keys)
    X = rng.normal(0, 1, (2, layout.input_dim))
    valid = encrypt(keys, layout, X)[0]
    url = f"/v1/sessions/{session}/infer"
    for body in cheap_malformations(valid, keys.public_bytes(), rng, 980):
        assert_error(http.post(url, content=body), ERROR_STATUSES)
    # another layout's query (other input_dim) and a query made for other CKKS parameters
    other = EncryptedLinear(rng.normal(size=(2, 64)))
    other_keys = ClientKeys.generate(other.layout.profile, other.rotation_steps)
    assert assert_error(http.post(url, content=encrypt(other_keys, other.layout, np.ones((1, 64)))[0]), 422)["code"] \
        == "parameter_mismatch"
    small = CkksProfile("small", 4096, (40, 20, 40), 20)
    small_layer = EncryptedLinear(rng.normal(size=(2, 32)), profile=small)
    small_keys = ClientKeys.generate(small, small_layer.rotation_steps)
    assert_error(http.post(url, content=encrypt(small_keys, small_layer.layout, np.ones((1, 32)))[0]), 422)
    # whole public keys or a secret key sent as a query: over the query cap or the wrong kind
    assert_error(http.post(url, content=keys.public_bytes()), {400, 413})
    # flips inside the SEAL ciphertext data: SEAL may accept them (a valid-looking ciphertext); never a 5xx
    for position in rng.integers(300, len(valid), 17):
        response = http.post(url, content=flip(valid, int(position)))
        assert response.status_code in {200} | ERROR_STATUSES
        if response.status_code != 200:
            assert_error(response, ERROR_STATUSES)
    # the session still answers correctly
    from encrypted import decrypt

    reply = http.post(url, content=valid)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/octet-stream"
    np.testing.assert_allclose(decrypt(keys, layout, [reply.content], 2), plain(fused, X), atol=1e-3)
    check_still_serving(server.url, fused)


def test_another_sessions_ciphertext_is_useless_to_the_sender(server, http, keys, layout, fused):
    """A same-layout ciphertext of another session cannot be told apart (CKKS ciphertexts are IND-CPA), so it is
    evaluated with the wrong Galois keys: the reply decrypts to noise for its owner and nobody else holds the key."""
    from encrypted import decrypt

    mine, theirs = open_session(http, keys), open_session(http, ClientKeys.generate(layout.profile,
                                                                                     layout.rotation_steps))
    X = np.random.default_rng(3).normal(0, 1, (1, layout.input_dim))
    query = encrypt(keys, layout, X)[0]
    good = http.post(f"/v1/sessions/{mine}/infer", content=query).content
    stolen = http.post(f"/v1/sessions/{theirs}/infer", content=query)
    assert stolen.status_code == 200
    np.testing.assert_allclose(decrypt(keys, layout, [good], 1), plain(fused, X), atol=1e-3)
    assert np.abs(decrypt(keys, layout, [stolen.content], 1) - plain(fused, X)).max() > 1.0


def test_secret_key_material_is_refused(http, keys):
    error = assert_error(http.post("/v1/sessions", content=keys.to_bytes()), 400)
    assert error["code"] == "invalid_keys" and "secret key" in error["message"]
    import tenseal as ts

    context = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60])
    context.generate_galois_keys()
    private = context.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    assert_error(http.post("/v1/sessions", content=private), 400)


def test_wrong_parameters_are_refused(http, layout):
    small = CkksProfile("small", 4096, (40, 20, 40), 20)
    error = assert_error(http.post("/v1/sessions", content=ClientKeys.generate(small, [1, 2]).public_bytes()), 422)
    assert error["code"] == "parameter_mismatch"
    missing = ClientKeys.generate(layout.profile, layout.rotation_steps[:-1])
    error = assert_error(http.post("/v1/sessions", content=missing.public_bytes()), 400)
    assert "rotation steps" in error["message"]


def test_body_caps_answer_413(server, http, keys, fused):
    info = http.get("/v1/model").json()["limits"]
    session = open_session(http, keys)
    routes = (("/v1/sessions", info["max_key_bytes"]), (f"/v1/sessions/{session}/infer", info["max_query_bytes"]))
    for url, cap in routes:
        # declared by Content-Length: refused before the body is read
        assert_error(http.post(url, content=b"\0" * (cap + 1)), 413)

        def chunks(total: int = cap + 200_000, size: int = 65536):  # no Content-Length: counted while streaming
            for start in range(0, total, size):
                yield b"\0" * min(size, total - start)

        assert_error(http.post(url, content=chunks()), 413)
    assert_error(http.post("/v1/sessions", content=b""), 400)
    check_still_serving(server.url, fused)


# --- sessions: eviction, TTL, re-open ------------------------------------------------------------------------

def test_sessions_evicted_by_count_lru_and_by_ttl(export_dir, keys, layout, fused):
    X = np.zeros((1, layout.input_dim))
    query = encrypt(keys, layout, X)[0]
    with ServerThread(create_app(export_dir, max_sessions=2, session_ttl_s=0.6), max_lifetime_s=60) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        s1, s2 = open_session(http, keys), open_session(http, keys)
        assert http.post(f"/v1/sessions/{s1}/infer", content=query).status_code == 200  # s1 is now the most recent
        s3 = open_session(http, keys)  # evicts s2, the least recently used
        error = assert_error(http.post(f"/v1/sessions/{s2}/infer", content=query), 404)
        assert error["code"] == "session_not_found" and "open a new session" in error["message"]
        for s in (s1, s3):
            assert http.post(f"/v1/sessions/{s}/infer", content=query).status_code == 200
        time.sleep(0.8)
        expired = assert_error(http.post(f"/v1/sessions/{s1}/infer", content=query), 404)
        assert "open a new session" in expired["message"]
        assert http.get("/healthz").json()["sessions"] == 0
        s4 = open_session(http, keys)
        assert http.delete(f"/v1/sessions/{s4}").status_code == 204
        assert_error(http.delete(f"/v1/sessions/{s4}"), 404)


@pytest.mark.parametrize("store", ["memory://", None])
def test_client_survives_eviction_and_restart(export_dir, fused, store):
    """An evicted session is re-opened by the client; across a restart the default store keeps the session (no
    re-open, no key upload), while a memory:// store loses it and the client re-opens."""
    X = np.random.default_rng(4).normal(0, 1, (3, fused.input_dim))
    srv = ServerThread(create_app(export_dir, max_sessions=1, store=store), max_lifetime_s=60).start()
    port = srv.port
    try:
        with Client(srv.url) as a, Client(srv.url) as b:
            np.testing.assert_allclose(a.infer_states(X), plain(fused, X), atol=1e-3)
            b.open_session()  # evicts a's session
            np.testing.assert_allclose(a.infer_states(X), plain(fused, X), atol=1e-3)
            assert a.reopened == 1
            srv.stop()
            srv = ServerThread(create_app(export_dir, max_sessions=1, store=store), port=port,
                               max_lifetime_s=60).start()
            np.testing.assert_allclose(a.infer_states(X), plain(fused, X), atol=1e-3)
            assert a.reopened == (2 if store == "memory://" else 1)
    finally:
        srv.stop()


def test_client_refuses_a_restarted_server_with_another_export(export_dir, fused, tmp_path):
    from lightning_modules.parties.export import write_export

    rng = np.random.default_rng(5)
    other = write_export(tmp_path / "other", rng.normal(size=(D_TARGET, 32)), np.zeros(D_TARGET),
                         rng.normal(size=(K, D_TARGET)), np.zeros(K), source=fused.manifest["source"],
                         target={}, label_names=LABELS)
    X = np.ones((1, fused.input_dim))
    srv = ServerThread(create_app(export_dir), max_lifetime_s=60).start()
    port = srv.port
    try:
        with Client(srv.url) as client:
            client.infer_states(X)
            srv.stop()
            srv = ServerThread(create_app(other), port=port, max_lifetime_s=60).start()
            with pytest.raises(ServeError, match="another export"):
                client.infer_states(X)
    finally:
        srv.stop()


# --- API key, errors -----------------------------------------------------------------------------------------

def test_api_key_is_enforced(export_dir, fused):
    with ServerThread(create_app(export_dir, api_key="s3cret"), max_lifetime_s=60) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        assert assert_error(http.get("/v1/model"), 401)["code"] == "unauthorized"
        assert_error(http.get("/v1/model", headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(http.post("/v1/sessions", content=b"x" * 100, headers={"X-API-Key": "s3cre"}), 401)
        assert http.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert http.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        with Client(srv.url) as client, pytest.raises(ServerReplyError, match="401 unauthorized"):
            client.model_info()
        with Client(srv.url, api_key="s3cret") as client:
            X = np.ones((1, fused.input_dim))
            np.testing.assert_allclose(client.infer_states(X), plain(fused, X), atol=1e-3)


def test_unexpected_errors_are_500_without_internals(export_dir, keys, layout):
    app = create_app(export_dir)
    service = app.state.service

    def broken_apply(*args):
        raise KeyError("/secret/internal/path")

    with ServerThread(app, max_lifetime_s=60) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        session = open_session(http, keys)
        query = encrypt(keys, layout, np.zeros((1, layout.input_dim)))[0]
        service.apply = broken_apply
        response = http.post(f"/v1/sessions/{session}/infer", content=query)
        error = assert_error(response, 500)
        assert error["code"] == "internal" and "secret" not in response.text
        service.fused.layer.apply = lambda *a: (_ for _ in ()).throw(RuntimeError("result ciphertext is transparent"))
        del service.apply  # back to the real method, whose SEAL failure is the client's fault
        refused = assert_error(http.post(f"/v1/sessions/{session}/infer", content=query), 400)
        assert refused["code"] == "invalid_ciphertext"
        assert_error(http.get("/nowhere"), 404)
        assert_error(http.put("/healthz"), 405)
