"""The client's lasting session (issue 27): keys, session id and the published detector kept per server and layer
under $XSILO_HOME and reused by the next Client (or process) without an upload; a lost session re-opened with the
same keys; refused and reset connections and 503 answers retried, so a client survives replica restarts behind a
round-robin balancer; typed errors that name the fix."""
from __future__ import annotations

import os
import stat
import threading
import time

import httpx
import numpy as np
import pytest

from encrypted.wire import seal_to_bytes
from serve import Client
from serve.client import BudgetExhausted, ClientCacheError, ServerUnreachable, Unauthorized
from serve.client_cache import KEYS, SessionCache
from serve.formats.exports import LinearExport, load_export
from serve.harness import ServerThread
from serve.http_client import Retry
from serve.server import create_app

from tests.serve.client_support import BusyFirst, RoundRobin, provider_and_client

pytestmark = [pytest.mark.network, pytest.mark.he]

D_A = 32
FAST = Retry(attempts=8, backoff_s=0.05, max_wait_s=0.5, max_total_s=20)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_models):
    return provider_and_client(tmp_path_factory.mktemp("client-session"), tiny_models["llama"], d_in=D_A)


@pytest.fixture(scope="module")
def server(folders):
    with ServerThread(create_app(heads=[folders["topics"], folders["sentiment"]]), max_lifetime_s=600) as srv:
        yield srv


def expected(folders, X, head="topics"):
    amap, layer = LinearExport.from_pretrained(folders["map"], "map"), load_export(folders[head], "head")
    mapped = X @ amap.weight.T.astype(np.float64) + amap.bias
    return mapped @ layer.weight.T.astype(np.float64) + layer.bias


def states(n=3, seed=0):
    return np.random.default_rng(seed).normal(0, 1, (n, D_A))


def entries(home):
    root = home / "client" / "sessions"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_a_second_client_reuses_the_keys_the_session_and_the_detector(server, folders, isolated_home):
    X = states()
    with Client(server=server.url, head="topics", aligner=folders["map"]) as first:
        np.testing.assert_allclose(first.infer_states(X), expected(folders, X), atol=1e-3)
        first.feature_detector()
        sent = dict(first.traffic.kinds)
        public = first._keys.public_bytes()
        secret, secret_key = first._keys.to_bytes(), seal_to_bytes(first._keys.secret_key)
    assert first.keys_uploaded == 1 and not first.session_reused
    assert sent["keys"][:2] == [1, len(public)] and sent["detector"][0] == 1
    (entry,) = entries(isolated_home)
    key_file = entry / KEYS
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(entry.stat().st_mode) == 0o700
    assert key_file.read_bytes() == secret and secret_key[len(secret_key) // 2:][:64] in secret
    assert secret_key[len(secret_key) // 2:][:64] not in public  # the secret key stays on disk, never sent

    with Client(server=server.url, head="topics", aligner=folders["map"]) as second:
        np.testing.assert_allclose(second.infer_states(X), expected(folders, X), atol=1e-3)
        detector = second.feature_detector()
        assert second.session_id == first.session_id and second.session_reused and second.keys_uploaded == 0
    assert set(second.traffic.kinds) == {"model info", "query"}  # no keys, no detector
    assert detector.sha256 == httpx.get(f"{server.url}/v1/model").json()["heads"]["topics"]["feature_ood"]["sha256"]
    assert httpx.get(f"{server.url}/healthz").json()["sessions"] >= 1  # closing kept the session for the next one


def test_a_lost_session_is_reopened_with_the_same_keys(server, folders, isolated_home):
    X = states(2, seed=1)
    with Client(server.url, head="topics", aligner=folders["map"]) as client:
        client.infer_states(X)
        lost = client.session_id
    key_bytes = (entries(isolated_home)[0] / KEYS).read_bytes()
    assert httpx.delete(f"{server.url}/v1/sessions/{lost}").status_code == 204  # expired, evicted or restarted
    with Client(server.url, head="topics", aligner=folders["map"]) as client:
        np.testing.assert_allclose(client.infer_states(X), expected(folders, X), atol=1e-3)
        assert client.reopened == 1 and client.keys_uploaded == 1 and client.session_id != lost
    assert (entries(isolated_home)[0] / KEYS).read_bytes() == key_bytes  # the same keys, uploaded again
    with Client(server.url, head="topics", aligner=folders["map"]) as client:  # the re-opened one is cached
        client.infer_states(X)
        assert client.keys_uploaded == 0 and client.reopened == 0


def test_each_layer_and_api_key_has_its_entry_and_the_cache_is_bounded(server, folders, isolated_home, tmp_path):
    X = states(1)
    for head in ("topics", "sentiment"):
        with Client(server.url, head=head, aligner=folders["map"]) as client:
            client.infer_states(X)
    assert len(entries(isolated_home)) == 2
    root = tmp_path / "small-cache"
    for head, key in (("topics", None), ("sentiment", None), ("topics", "k1")):
        with Client(server.url, head=head, aligner=folders["map"], api_key=key, cache=root) as client:
            client.model_info()
            SessionCache(root, max_entries=2).entry(client.url, key, head, client.model_info().export_sha256,
                                                    client.layout)
    assert len([p for p in root.iterdir() if p.is_dir()]) == 2  # the least recently used went
    assert not any("k1" in p.read_text() for p in root.rglob("session.json"))  # the API key is never written


def test_a_key_file_others_can_read_is_refused_and_a_corrupt_one_replaced(server, folders, isolated_home):
    with Client(server.url, head="topics", aligner=folders["map"]) as client:
        client.infer_states(states(1))
    key_file = entries(isolated_home)[0] / KEYS
    os.chmod(key_file, 0o644)
    with Client(server.url, head="topics", aligner=folders["map"]) as client:
        with pytest.raises(ClientCacheError, match=r"readable by others \(mode 0644\).*Delete .* to make new keys"):
            client.infer_states(states(1))
    key_file.write_bytes(b"not keys")
    os.chmod(key_file, 0o600)
    with Client(server.url, head="topics", aligner=folders["map"]) as client:
        with pytest.warns(UserWarning, match="cached client keys .* are unusable"):
            np.testing.assert_allclose(client.infer_states(states(1)), expected(folders, states(1)), atol=1e-3)
        assert client.keys_uploaded == 1


def test_without_the_cache_a_session_is_deleted_on_close(server, folders, isolated_home):
    before = httpx.get(f"{server.url}/healthz").json()["sessions"]
    with Client(server.url, head="topics", aligner=folders["map"], cache=False) as client:
        client.infer_states(states(1))
        assert httpx.get(f"{server.url}/healthz").json()["sessions"] == before + 1
    assert httpx.get(f"{server.url}/healthz").json()["sessions"] == before
    assert entries(isolated_home) == []


def test_a_client_survives_replica_restarts_behind_a_round_robin_balancer(folders, tmp_path):
    """Two replicas on one store, no stickiness: a replica that restarts refuses connections for a while (retried,
    landing on the other); a session the store lost is re-opened with the same keys."""
    store = f"sqlite:///{tmp_path / 'state.db'}"
    app = lambda: create_app(heads=[folders["topics"]], store=store)  # noqa: E731
    a, b = ServerThread(app(), max_lifetime_s=120).start(), ServerThread(app(), max_lifetime_s=120).start()
    balancer = RoundRobin([a.url, b.url])
    restarted: list[ServerThread] = []
    try:
        X = states(2, seed=3)
        with Client("http://balancer.invalid", head="topics", aligner=folders["map"], transport=balancer,
                    retry=FAST) as client:
            for _ in range(3):
                np.testing.assert_allclose(client.infer_states(X), expected(folders, X), atol=1e-3)
            assert set(balancer.sent_to) == {0, 1} and client.keys_uploaded == 1  # either replica answers it
            port = b.port
            b.stop()  # replica b restarts: down for a second
            threading.Timer(1.0, lambda: restarted.append(ServerThread(app(), port=port).start())).start()
            for _ in range(4):
                np.testing.assert_allclose(client.infer_states(X), expected(folders, X), atol=1e-3)
            assert client.connection.retried >= 1
            deadline = time.monotonic() + 30
            while not restarted and time.monotonic() < deadline:
                time.sleep(0.1)
            for _ in range(2):  # both replicas answer again
                np.testing.assert_allclose(client.infer_states(X), expected(folders, X), atol=1e-3)
            assert client.keys_uploaded == client.reopened + 1
            httpx.delete(f"{a.url}/v1/sessions/{client.session_id}")  # the store loses it (expiry, a wipe)
            np.testing.assert_allclose(client.infer_states(X), expected(folders, X), atol=1e-3)
            assert client.reopened >= 1 and client.keys_uploaded == client.reopened + 1
    finally:
        a.stop()
        b.stop()
        for srv in restarted:
            srv.stop()


def test_busy_answers_are_retried_after_retry_after(server, folders):
    front = BusyFirst(times=2)
    with Client(server.url, head="topics", aligner=folders["map"], transport=front, retry=FAST) as client:
        np.testing.assert_allclose(client.infer_states(states(1)), expected(folders, states(1)), atol=1e-3)
        assert front.refused == 2 and client.connection.retried == 2
    with Client(server.url, head="topics", aligner=folders["map"], transport=BusyFirst(times=99),
                retry=Retry(attempts=2, backoff_s=0.01)) as client:
        with pytest.raises(Exception, match="busy.*retry later") as caught:
            client.infer_states(states(1))
        assert type(caught.value).__name__ == "ServerBusy"


def test_errors_are_typed_and_name_the_fix(folders, isolated_home):
    with ServerThread(create_app(heads=[folders["topics"]], api_key="s3cret", rows_per_session=4),
                      max_lifetime_s=60) as srv:
        with Client(srv.url, head="topics", aligner=folders["map"]) as client:
            with pytest.raises(Unauthorized, match="--api_key, or \\$XSILO_API_KEY"):
                client.model_info()
        with Client(srv.url, api_key="s3cret", head="topics", aligner=folders["map"]) as client:
            with pytest.raises(BudgetExhausted, match="429"):
                client.infer_states(states(1))  # one ciphertext is a full `lanes` rows, over the 4 allowed
    with Client("http://127.0.0.1:9", head="topics", aligner=folders["map"],
                retry=Retry(attempts=2, backoff_s=0.01)) as client:
        with pytest.raises(ServerUnreachable, match="cannot reach the server at http://127.0.0.1:9.*after 2 retries"):
            client.model_info()


def test_classify_packs_batches_into_lanes_and_times_each(server, folders, isolated_home):
    texts = [f"good film {i}" for i in range(7)]
    with Client(server=server.url, head="topics", aligner=folders["map"]) as client:
        lanes = client.layout.lanes
        one = client.classify(texts)
        batched = [b for b in client.classify_batches(texts, batch_size=1)]
    assert one[0]["timings"]["rows"] == 7 and one[0]["timings"]["ciphertexts"] == -(-7 // lanes)
    assert [len(b) for b in batched] == [min(lanes, 7 - i) for i in range(0, 7, lanes)]
    assert [r["label"] for b in batched for r in b] == [r["label"] for r in one]
    assert {"extract_ms", "map_ms", "encrypt_ms", "http_ms", "server_ms", "decrypt_ms", "total_ms"} <= set(
        one[0]["timings"]) and "ood" in one[0] and "ood_score" in one[0]
    with pytest.raises(ValueError, match="batch_size must be a positive number of rows"):
        next(client.classify_batches(texts, batch_size=0))


def test_the_map_alone_is_one_call_in_a_users_own_pipeline(folders):
    """`AffineMap.from_pretrained(DIR)(states)` maps states as the Client does before encrypting them."""
    import torch

    from lightning_modules.fitting.affine_map import AffineMap

    X = states(4, seed=7)
    mapped = AffineMap.from_pretrained(folders["map"])(torch.from_numpy(X)).double().numpy()
    with Client(server="http://127.0.0.1:9", head="topics", aligner=folders["map"], cache=False) as client:
        np.testing.assert_allclose(mapped, client.map_states(X), rtol=1e-5, atol=1e-5)
