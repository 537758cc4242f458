"""The private fit end to end over loopback HTTP: PrivateFitClient against a server holding a public set."""
from __future__ import annotations

import functools
import json
import math

import httpx
import numpy as np
import pytest

import serve.fit_service as fit_service
from encrypted import GramPlan
from encrypted.rlwe import NOISE_ETA
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
CHUNK_ROWS = 128  # the server's chunks here (512 by default): more than one chunk per part on a small set


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    rng = np.random.default_rng(0)
    states = rng.normal(0, 1, (N, D_B)) * rng.uniform(0.5, 3, D_B) + rng.normal(0, 2, D_B)
    states[:, 3] = 1.5  # a constant (dead) dimension: scaled by 1, not blown up
    folder = write_small_public_states(tmp_path_factory.mktemp("fit") / "public", states=states, seed=7)
    with pytest.MonkeyPatch.context() as mp:  # the server plans its fits with CHUNK_ROWS rows per chunk
        mp.setattr(fit_service, "plan_gram", functools.partial(fit_service.plan_gram, chunk_rows=CHUNK_ROWS))
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


def gram_error(cross: np.ndarray, expected: np.ndarray, train: np.ndarray, s_b) -> float:
    """The largest error of a decrypted cross product in units of the normalised Gram Ẑ_Aᵀ Ẑ_B the kernel computes
    (each entry divided by the client's and the provider's range scales)."""
    scale = np.outer(range_scale(np.asarray(train, dtype=np.float64).std(0)), np.asarray(s_b, dtype=np.float64))
    return float((np.abs(cross - expected) / scale).max())


def gram_tolerance(plan: GramPlan, part: int) -> float:
    """What the kernel promises for a part's normalised Gram: 2^-output_bits from the answer's modulus switch, plus
    the encryption noise σ·sqrt(rows)/2^value_bits, each about 2^-10 at the default plan, times the provider's
    2^shift; six times that is far beyond noise yet far below any wrong bit."""
    noise = math.sqrt(NOISE_ETA / 2) * math.sqrt(plan.part_rows[part]) / 2.0 ** plan.value_bits
    return 6 * (2.0 ** -plan.output_bits + noise) * 2.0 ** plan.target_shifts[part]


def test_the_decrypted_cross_products_and_stats_equal_numpy(provider):
    srv, public, states = provider
    parts, _ = client_parts(public)
    ticks = []
    with PrivateFitClient(srv.url) as fits:
        texts = fits.public_texts()
        assert texts == small_texts(N, 7) and texts_fingerprint(texts) == fits.public_set()["fingerprint"]
        reply = fits.fit(parts, fits.public_set()["fingerprint"],
                         progress=lambda done, total: ticks.append((done, total)))
    assert ticks == [(0, 300), (128, 300), (225, 300), (300, 300)]  # the start, then rows sent after each chunk
    targets = [states[index] for index in public.indices]
    mu_b, s_b = targets[0].mean(0), range_scale(targets[0].std(0))
    np.testing.assert_allclose(reply.client_shift, parts[0].mean(0))
    np.testing.assert_allclose(reply.stats["mu_B"], mu_b, rtol=1e-12)
    np.testing.assert_allclose(reply.stats["s_B"], s_b, rtol=1e-12)
    assert reply.stats["s_B"][3] == 1.0
    plan = GramPlan.from_dict(reply.plan)
    for p, (x, y) in enumerate(zip(parts, targets)):
        expected = (x - reply.client_shift).T @ (y - mu_b)
        assert reply.cross[p].shape == (D_A, D_B)
        assert gram_error(reply.cross[p], expected, parts[0], s_b) <= gram_tolerance(plan, p)
        published = reply.stats["parts"][p]
        assert published["rows"] == len(y)
        np.testing.assert_allclose(published["sum_y"], y.sum(0), rtol=1e-12)
        assert published["trace"] == pytest.approx(float((y * y).sum()), rel=1e-12)
        if p == 0:
            np.testing.assert_allclose(published["yty_diag"], (y * y).sum(0), rtol=1e-12)
        else:
            assert published["yty_diag"] is None
    assert reply.plan["part_rows"] == [225, 75] and reply.plan["chunks"] == [2, 1]
    # every ciphertext byte is counted: the key and chunks up, results down
    assert plan.upload_bytes < reply.bytes_sent < plan.upload_bytes + 20_000
    assert plan.download_bytes < reply.bytes_received < plan.download_bytes + 200_000
    assert reply.provider_ms > 0 and reply.client_ms > 0


def test_memory_mapped_parts_give_the_same_fit(provider, tmp_path):
    """The client reads its parts a chunk at a time: float32 parts memory-mapped from disk fit like the arrays."""
    srv, public, states = provider
    parts, _ = client_parts(public, seed=2)
    mapped = []
    for p, part in enumerate(parts):
        np.save(tmp_path / f"part{p}.npy", part.astype(np.float32))
        mapped.append(np.load(tmp_path / f"part{p}.npy", mmap_mode="r"))
    assert all(isinstance(m, np.memmap) and m.dtype == np.float32 for m in mapped)
    with PrivateFitClient(srv.url) as fits:
        reply = fits.fit(mapped, public.fingerprint)
    exact = [m.astype(np.float64) for m in mapped]
    targets = [states[index] for index in public.indices]
    mu_b = targets[0].mean(0)
    np.testing.assert_allclose(reply.client_shift, exact[0].mean(0), rtol=1e-12)
    plan = GramPlan.from_dict(reply.plan)
    for p, (x, y, got) in enumerate(zip(exact, targets, reply.cross)):
        expected = (x - reply.client_shift).T @ (y - mu_b)
        assert gram_error(got, expected, exact[0], reply.stats["s_B"]) <= gram_tolerance(plan, p)


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


def test_a_non_finite_val_part_is_refused_before_a_fit_is_opened(tmp_path):
    folder = write_small_public_states(tmp_path / "public", n=40, d=D_B)
    small = load_public_states(folder)
    parts, _ = client_parts(small)
    bad_val = parts[1].copy()
    bad_val[3, 2] = np.inf
    with ServerThread(create_app(public=folder, fits_per_client=1), max_lifetime_s=120) as srv, \
            PrivateFitClient(srv.url) as fits:
        with pytest.raises(ServeError, match="NaN|inf|finite"):
            fits.fit([parts[0], bad_val], small.fingerprint)
        fits.fit(parts, small.fingerprint)  # the refused fit spent none of the client's one fit


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
