"""The private fit end to end over loopback HTTP: PrivateFitClient against a server holding a public set."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from serve.fit_client import PrivateFitClient
from serve.fit_stats import range_scale
from serve.http_client import ServeError, ServerReplyError
from serve.formats.digests import texts_fingerprint
from serve.formats.public_states import load_public_states
from serve.formats.splits import public_split
from serve.harness import ServerThread
from serve.server import create_app

from tests.serve.serve_support import small_texts, write_small_public_states

pytestmark = [pytest.mark.network, pytest.mark.he]

N, D_A, D_B = 300, 10, 12  # train 225 rows = 2 chunks of 128 (the last partial), val 75 = 1 chunk


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    rng = np.random.default_rng(0)
    states = rng.normal(0, 1, (N, D_B)) * rng.uniform(0.5, 3, D_B) + rng.normal(0, 2, D_B)
    states[:, 3] = 1.5  # a constant (dead) dimension: scaled by 1, not blown up
    folder = write_small_public_states(tmp_path_factory.mktemp("fit") / "public", states=states, seed=7)
    with ServerThread(create_app(public=folder, max_public_texts=64), max_lifetime_s=300) as srv:
        yield srv, load_public_states(folder), states.astype(np.float32).astype(np.float64)  # stored as float32


def client_parts(public, seed: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """The client's own raw states on the public rows (random, with an offset and a dead dimension), split as the
    provider's public set says."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(0, 1, (public.rows, D_A)) * 4 + 10
    Z[:, 0] = -2.0
    train, val = public_split(public.rows, public.manifest["val_fraction"], public.manifest["seed"])
    return [Z[train], Z[val]], Z


def test_the_decrypted_cross_products_and_stats_equal_numpy(provider):
    srv, public, states = provider
    parts, _ = client_parts(public)
    ticks = []
    with PrivateFitClient(srv.url) as fits:
        texts = fits.public_texts()
        assert texts == small_texts(N, 7) and texts_fingerprint(texts) == fits.public_set()["fingerprint"]
        reply = fits.fit(parts, fits.public_set()["fingerprint"],
                         progress=lambda done, total: ticks.append((done, total)))
    assert ticks == [(1, 3), (2, 3), (3, 3)]
    targets = [states[index] for index in public.indices]
    mu_b, s_b = targets[0].mean(0), range_scale(targets[0].std(0))
    np.testing.assert_allclose(reply.client_shift, parts[0].mean(0))
    np.testing.assert_allclose(reply.stats["mu_B"], mu_b, rtol=1e-12)
    np.testing.assert_allclose(reply.stats["s_B"], s_b, rtol=1e-12)
    assert reply.stats["s_B"][3] == 1.0
    for p, (x, y) in enumerate(zip(parts, targets)):
        expected = (x - reply.client_shift).T @ (y - mu_b)
        assert reply.cross[p].shape == (D_A, D_B)
        assert np.abs(reply.cross[p] - expected).max() <= 1e-4 * np.abs(expected).max()
        published = reply.stats["parts"][p]
        assert published["rows"] == len(y)
        np.testing.assert_allclose(published["sum_y"], y.sum(0), rtol=1e-12)
        assert published["trace"] == pytest.approx(float((y * y).sum()), rel=1e-12)
        if p == 0:
            np.testing.assert_allclose(published["yty_diag"], (y * y).sum(0), rtol=1e-12)
        else:
            assert published["yty_diag"] is None
    assert reply.plan["part_rows"] == [225, 75] and reply.plan["chunks"] == [2, 1]
    assert reply.bytes_sent > 100_000 and reply.bytes_received > 10_000 and reply.provider_ms > 0
    assert reply.client_ms > 0


def test_the_client_refuses_parts_that_do_not_fit_the_public_set(provider):
    srv, public, _ = provider
    parts, Z = client_parts(public)
    fingerprint = public.fingerprint
    with PrivateFitClient(srv.url) as fits:
        with pytest.raises(ServeError, match="split"):
            fits.fit([Z[:200], Z[200:]], fingerprint)
        with pytest.raises(ServeError, match="same number of columns"):
            fits.fit([parts[0], parts[1][:, :5]], fingerprint)
        with pytest.raises(ServeError, match="NaN"):
            fits.fit([np.full_like(parts[0], np.nan), parts[1]], fingerprint)
        with pytest.raises(ServerReplyError, match="public_set_mismatch") as caught:
            fits.fit(parts, texts_fingerprint(small_texts(N, 8)))
        assert caught.value.status == 409 and "GET /v1/public-set/texts" in caught.value.message


def test_public_texts_come_in_bounded_pages(provider):
    srv, public, _ = provider
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        page = http.get("/v1/public-set/texts", params={"offset": 250, "limit": 1000}).json()
        assert page["offset"] == 250 and len(page["texts"]) == 50 and page["next"] is None
        page = http.get("/v1/public-set/texts", params={"offset": 0, "limit": 1000}).json()
        assert len(page["texts"]) == 64 and page["next"] == 64  # capped by max_public_texts
        assert http.get("/v1/public-set/texts", params={"offset": 301}).status_code == 400
        assert http.get("/v1/public-set/texts", params={"offset": -1}).status_code == 422
        assert http.get("/v1/public-set/texts", params={"limit": 0}).status_code == 422


class HostileProvider(httpx.MockTransport):
    """A transport answering like a server that lies about its public set's texts."""

    def __init__(self, info: dict, texts: list[str]):
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/model":
                return httpx.Response(200, json=info)
            offset = int(request.url.params.get("offset", 0))
            return httpx.Response(200, json={"texts": texts[offset:offset + 10], "offset": offset,
                                             "next": offset + 10 if offset + 10 < len(texts) else None})
        super().__init__(handler)


def test_public_texts_that_do_not_match_the_fingerprint_are_refused(provider):
    srv, public, _ = provider
    info = httpx.get(f"{srv.url}/v1/model").json()
    texts = list(public.texts)
    with PrivateFitClient("http://provider", transport=HostileProvider(info, texts)) as fits:
        assert fits.public_texts() == texts
    texts[5] = "changed"
    with PrivateFitClient("http://provider", transport=HostileProvider(info, texts)) as fits, \
            pytest.raises(ServeError, match="do not match its own fingerprint"):
        fits.public_texts()
    with PrivateFitClient("http://provider", transport=HostileProvider(info, texts[:-1])) as fits, \
            pytest.raises(ServeError, match="299 public texts"):
        fits.public_texts()
    without = json.loads(json.dumps(info))
    without["public_set"] = None
    with PrivateFitClient("http://provider", transport=HostileProvider(without, texts)) as fits, \
            pytest.raises(ServeError, match="publishes no public set"):
        fits.public_texts()
