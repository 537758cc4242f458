"""The private-fit routes and the public-states reader: order, caps, budget, refusals before costly work, progress,
resuming after a lost answer, metrics and logs, hostile messages, fuzz."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import time
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import serve.fit_service as fit_service
from encrypted import FitKeys, GramPlan, encrypt_chunk, gram_wire, plan_gram, wire
from encrypted.rlwe import NOISE_ETA, RING_DEGREE, SEED_BYTES, mask
from serve.fit_client import PrivateFitClient
from serve.http_client import ServeError
from serve.observability import session_tag
from serve.formats.folders import ExportError
from serve.fit_stats import range_scale
from serve.observability import JsonFormatter
from serve.formats.digests import texts_fingerprint
from serve.formats.public_states import load_public_states
from serve.formats.splits import public_split
from serve.harness import ServerThread
from serve.server import create_app

from tests.serve.serve_support import json_error, small_texts, write_small_head, write_small_public_states

pytestmark = [pytest.mark.network, pytest.mark.he]

D_A, D_B = 6, 12
ALLOWED = {200, 201, 204, 400, 401, 404, 405, 408, 409, 413, 422, 429, 503}


@pytest.fixture(scope="module")
def public_dir(tmp_path_factory):
    return write_small_public_states(tmp_path_factory.mktemp("fit-routes") / "public", n=40, d=D_B)


@pytest.fixture(scope="module")
def public(public_dir):
    return load_public_states(public_dir)


@pytest.fixture(scope="module")
def plan_and_keys(public_dir):
    app = create_app(public=public_dir)
    plan = app.state.service.fit.plan(D_A)
    return plan, FitKeys.generate(plan)


def chunk(keys, plan: GramPlan, part: int, index: int = 0, seed: int = 0) -> bytes:
    rows = plan.rows(part, index)
    return encrypt_chunk(keys, plan, part, index, np.random.default_rng(seed).normal(0, 1, (rows, D_A)))


def open_fit(http: httpx.Client, keys, fingerprint: str, source_dim: int = D_A) -> httpx.Response:
    return http.post("/v1/fit/sessions", params={"source_dim": source_dim, "fingerprint": fingerprint},
                     content=keys if isinstance(keys, bytes) else keys.public_bytes())


def reframed(message: bytes, **change) -> bytes:
    """A chunk message rebuilt with some sections' bytes changed (a section's lower-case tag -> a function)."""
    kind, fingerprint, sections = wire.unpack(message, wire.Kind.CHUNK, ValueError, max_sections=3)
    return wire.pack(kind, fingerprint, [(tag, change.get(tag.decode().lower(), bytes)(bytes(payload)))
                                         for tag, payload in sections])


class Spy:
    """Counts how often the server reads fit keys or builds accumulators (the costly state)."""

    def __init__(self, monkeypatch):
        self.keys = self.accumulators = 0
        real_keys, real_accumulator = fit_service.read_fit_key, fit_service.GramAccumulator
        spy = self

        def read_key(*args, **kwargs):
            spy.keys += 1
            return real_keys(*args, **kwargs)

        def accumulator(*args, **kwargs):
            spy.accumulators += 1
            return real_accumulator(*args, **kwargs)

        monkeypatch.setattr(fit_service, "read_fit_key", read_key)
        monkeypatch.setattr(fit_service, "GramAccumulator", accumulator)


def small_chunks(monkeypatch, rows: int = 8) -> None:
    """The server plans its fits with `rows` rows per chunk (512 by default): several chunks per part here."""
    monkeypatch.setattr(fit_service, "plan_gram", functools.partial(fit_service.plan_gram, chunk_rows=rows))


def test_refusals_come_before_any_costly_state(public_dir, public, plan_and_keys, monkeypatch):
    _, keys = plan_and_keys
    spy = Spy(monkeypatch)
    app = create_app(public=public_dir, max_fit_source_dim=64, fits_per_client=1)
    big_body = b"\0" * (20 << 20)  # larger than any key upload: refused requests never read it
    with ServerThread(app, max_lifetime_s=120) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        for source_dim in (65, 10 ** 9, 0):
            response = http.post("/v1/fit/sessions", params={"source_dim": source_dim,
                                                             "fingerprint": public.fingerprint}, content=big_body)
            assert response.status_code in (400, 422), response.text
            assert http.get("/v1/fit/plan", params={"source_dim": source_dim}).status_code in (400, 422)
        error = json_error(http.post("/v1/fit/sessions", params={"source_dim": 65, "fingerprint": public.fingerprint},
                                     content=big_body).content)
        assert error["code"] == "invalid_source_dim" and "1 to 64" in error["message"]
        mismatch = http.post("/v1/fit/sessions", params={"source_dim": D_A, "fingerprint": "0" * 64}, content=big_body)
        assert mismatch.status_code == 409
        error = json_error(mismatch.content)
        assert error["code"] == "public_set_mismatch" and public.fingerprint in error["message"] and "0" * 64 in \
            error["message"] and "GET /v1/public-set/texts" in error["message"]
        assert (spy.keys, spy.accumulators) == (0, 0)
        # bad key bytes are refused without charging the budget; then one fit is allowed, the next is 429
        refused = http.post("/v1/fit/sessions", params={"source_dim": D_A, "fingerprint": public.fingerprint},
                            content=keys.public_bytes()[:-100])
        assert refused.status_code == 400 and (spy.keys, spy.accumulators) == (1, 0)
        assert json_error(refused.content)["code"] == "invalid_keys"
        assert open_fit(http, keys, public.fingerprint).status_code == 201
        assert (spy.keys, spy.accumulators) == (2, 1)
        spent = open_fit(http, keys, public.fingerprint)
        assert spent.status_code == 429 and json_error(spent.content)["code"] == "budget_exhausted"
        assert "fits_per_client" in json_error(spent.content)["message"]
        assert (spy.keys, spy.accumulators) == (2, 1)


def test_chunks_go_in_order_and_results_once(public_dir, public, plan_and_keys):
    plan, keys = plan_and_keys
    with ServerThread(create_app(public=public_dir), max_lifetime_s=120) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        opened = open_fit(http, keys, public.fingerprint)
        assert opened.status_code == 201
        body = opened.json()
        assert GramPlan.from_dict(body["plan"]) == plan and body["stats"]["parts"][0]["rows"] == public.part_rows[0]
        base = f"/v1/fit/sessions/{body['session_id']}"
        early = http.get(f"{base}/parts/0/result/0")
        assert early.status_code == 409 and json_error(early.content)["code"] == "part_incomplete"
        later = http.post(f"{base}/parts/1/chunks/0", content=chunk(keys, plan, 1))
        assert later.status_code == 409 and "part 0 is being uploaded" in json_error(later.content)["message"]
        past = http.post(f"{base}/parts/0/chunks/{plan.chunks(0)}", content=b"x")
        assert past.status_code == 404 and json_error(past.content)["code"] == "no_such_chunk"
        garbage = http.post(f"{base}/parts/0/chunks/0", content=b"XSHE" + b"\0" * 100)
        assert garbage.status_code == 400
        wrong = http.post(f"{base}/parts/0/chunks/0", content=chunk(keys, plan, 1))  # part 1's chunk sent as part 0's
        assert wrong.status_code in (400, 422)
        # well-formed containers that do not fit the plan: refused before any arithmetic, and they change nothing
        real = chunk(keys, plan, 0)
        short = http.post(f"{base}/parts/0/chunks/0", content=reframed(real, body=lambda b: b[:-1]))
        assert short.status_code == 400 and json_error(short.content)["code"] == "invalid_ciphertext"
        assert "BODY" in json_error(short.content)["message"]
        other = plan_gram(D_A + 1, plan.target_dim, plan.part_rows, plan.key_seed)  # another client's plan
        foreign = encrypt_chunk(FitKeys.generate(other), other, 0, 0, np.zeros((other.rows(0, 0), D_A + 1)))
        mismatch = http.post(f"{base}/parts/0/chunks/0", content=foreign)
        assert mismatch.status_code == 422 and json_error(mismatch.content)["code"] == "parameter_mismatch"
        assert http.get(base).json()["next_chunk"] == 0  # nothing was added
        done = http.post(f"{base}/parts/0/chunks/0", content=real)
        assert done.status_code == 200 and done.json()["part_complete"] and done.json()["next"] == {"part": 1,
                                                                                                   "chunk": 0}
        again = http.post(f"{base}/parts/0/chunks/0", content=chunk(keys, plan, 0))
        assert again.status_code == 409 and json_error(again.content)["code"] == "out_of_order"
        assert http.get(f"{base}/parts/0/result/0").status_code == 200
        twice = http.get(f"{base}/parts/0/result/0")
        assert twice.status_code == 409 and json_error(twice.content)["code"] == "result_fetched"
        assert http.get(f"{base}/parts/0/result/{plan.groups}").status_code == 404
        assert http.get(f"{base}/parts/2/result/0").status_code == 404
        assert http.delete(base).status_code == 204
        gone = http.post(f"{base}/parts/1/chunks/0", content=b"x")
        assert gone.status_code == 404 and json_error(gone.content)["code"] == "fit_session_not_found"


def test_fit_sessions_are_capped_not_evicted(public_dir, public, plan_and_keys):
    _, keys = plan_and_keys
    with ServerThread(create_app(public=public_dir, max_fit_sessions=1, fits_per_client=None, fit_slots_per_client=2),
                      max_lifetime_s=120) \
            as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        first = open_fit(http, keys, public.fingerprint)
        assert first.status_code == 201
        busy = open_fit(http, keys, public.fingerprint)
        assert busy.status_code == 503 and busy.headers["retry-after"] and json_error(busy.content)["code"] == "busy"
        # the running fit was not evicted for the newcomer
        base = f"/v1/fit/sessions/{first.json()['session_id']}"
        assert http.get(f"{base}/parts/0/result/0").status_code == 409
        assert http.delete(base).status_code == 204
        assert open_fit(http, keys, public.fingerprint).status_code == 201


def test_a_fit_session_expires(public_dir, public, plan_and_keys):
    _, keys = plan_and_keys
    app = create_app(public=public_dir, fit_session_ttl_s=0.5)
    with ServerThread(app, max_lifetime_s=120) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        session = open_fit(http, keys, public.fingerprint).json()["session_id"]
        time.sleep(0.8)
        assert http.get(f"/v1/fit/sessions/{session}/parts/0/result/0").status_code == 404
        assert len(app.state.service.fit) == 0


def test_without_a_public_set_the_fit_routes_say_so(tmp_path):
    head = write_small_head(tmp_path / "head", d=D_B, k=2)
    with ServerThread(create_app(heads=[head]), max_lifetime_s=60) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        for response in (http.get("/v1/fit/plan", params={"source_dim": 4}), http.get("/v1/public-set/texts"),
                         http.post("/v1/fit/sessions", params={"source_dim": 4, "fingerprint": "x"}, content=b"k")):
            assert response.status_code == 404 and json_error(response.content)["code"] == "no_public_set"


def test_anchors_are_the_fits_third_part_and_their_texts_are_paged(tmp_path, public_dir):
    """A set with anchors publishes them in /v1/model, pages their texts, and plans a third part; a set without
    answers their route with 404 `no_anchors`, and its fits keep two parts."""
    folder = write_small_public_states(tmp_path / "public", n=40, d=D_B, anchors=7)
    anchors = load_public_states(folder).anchors
    with ServerThread(create_app(public=folder, max_public_texts=3), max_lifetime_s=60) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http, PrivateFitClient(srv.url) as client:
        assert http.get("/v1/model").json()["public_set"]["anchors"] == {"rows": 7,
                                                                          "fingerprint": anchors.fingerprint}
        first = http.get("/v1/public-set/anchors").json()
        assert first == {"texts": anchors.texts[:3], "offset": 0, "next": 3}
        assert http.get("/v1/public-set/anchors", params={"offset": 8}).status_code == 400
        assert client.anchor_texts() == anchors.texts and client.fit_part_rows()[2:] == [7]
        assert http.get("/v1/fit/plan", params={"source_dim": 4}).json()["part_rows"][2] == 7
        fingerprint = load_public_states(folder).fingerprint
        for anchors in (None, "f" * 64):  # a fit opened on other anchors (or none) is refused before its keys
            params = {"source_dim": 4, "fingerprint": fingerprint, **({"anchors": anchors} if anchors else {})}
            refused = http.post("/v1/fit/sessions", params=params, content=b"keys")
            assert refused.status_code == 409 and json_error(refused.content)["code"] == "anchors_mismatch"
        with pytest.raises(ServeError, match="anchors"):  # two parts for a three-part fit: refused before any work
            client.fit([np.zeros((30, 4)), np.zeros((10, 4))], load_public_states(folder).fingerprint)
    with ServerThread(create_app(public=public_dir), max_lifetime_s=60) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http, PrivateFitClient(srv.url) as client:
        missing = http.get("/v1/public-set/anchors")
        assert missing.status_code == 404 and json_error(missing.content)["code"] == "no_anchors"
        refused = http.post("/v1/fit/sessions", content=b"keys", params={
            "source_dim": 4, "fingerprint": load_public_states(public_dir).fingerprint, "anchors": "f" * 64})
        assert refused.status_code == 409 and json_error(refused.content)["code"] == "anchors_mismatch"
        assert client.anchor_texts() == [] and len(client.fit_part_rows()) == 2


def served_plan(http: httpx.Client) -> tuple[GramPlan, FitKeys]:
    plan = GramPlan.from_dict(http.get("/v1/fit/plan", params={"source_dim": D_A}).json())
    return plan, FitKeys.generate(plan)


def test_extreme_but_well_formed_messages_are_evaluated_not_failed_midway(public_dir, public, plan_and_keys):
    """Where SEAL could refuse a well-formed but degenerate ciphertext mid-evaluation (a transparent one), every bit
    pattern of a plan's exact lengths is a ring-LWE ciphertext here, so the hostile case is the extreme one: a fit
    key whose every coefficient is q - 1, chunks of all q - 1 (and all 0) under an all-0xff (and all-0) mask seed.
    The products are exact mod q (no float overflow), so each chunk is added (200, no 500, no broken part) and the
    results come back of the plan's exact sizes; an honest fit after it is unaffected."""
    plan, keys = plan_and_keys
    top = np.full((plan.secrets, RING_DEGREE), mask(plan.key_bits), dtype=np.int64)
    with ServerThread(create_app(public=public_dir, fits_per_client=None), max_lifetime_s=120) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        opened = open_fit(http, gram_wire.write_key(plan, top), public.fingerprint)
        assert opened.status_code == 201, opened.text
        base = f"/v1/fit/sessions/{opened.json()['session_id']}"
        for part in range(len(plan.part_rows)):
            for c in range(plan.chunks(part)):
                value = mask(plan.modulus_bits(part)) if part == 0 else 0
                b = np.full((plan.rows(part, c), D_A), value, dtype=np.int64)
                seed = b"\xff" * SEED_BYTES if part == 0 else bytes(SEED_BYTES)
                added = http.post(f"{base}/parts/{part}/chunks/{c}", content=gram_wire.write_chunk(plan, part, c,
                                                                                                   seed, b))
                assert added.status_code == 200, added.text
            for group in range(plan.groups):
                result = http.get(f"{base}/parts/{part}/result/{group}")
                assert result.status_code == 200
                c0, c1 = gram_wire.read_result(result.content, plan, part, group)
                assert c0.shape == (plan.group_rows(group), D_A) and c1.shape == (plan.group_rows(group), RING_DEGREE)
        assert http.delete(base).status_code in (204, 404)  # every result fetched may already have closed it
        honest = open_fit(http, keys, public.fingerprint)
        base = f"/v1/fit/sessions/{honest.json()['session_id']}"
        assert http.post(f"{base}/parts/0/chunks/0", content=chunk(keys, plan, 0)).status_code == 200


def test_the_progress_route_follows_every_chunk(public_dir, public, monkeypatch):
    """GET /v1/fit/sessions/{id}: the part and chunk the server expects next, rows done of all rows, the rate and
    the time left, after every chunk; 404 for a session it does not hold."""
    small_chunks(monkeypatch)
    with ServerThread(create_app(public=public_dir), max_lifetime_s=120) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http:
        plan, keys = served_plan(http)
        assert [plan.chunks(p) for p in (0, 1)] == [4, 2]  # 30 train rows: 8, 8, 8, 6; 10 val rows: 8, 2
        base = f"/v1/fit/sessions/{open_fit(http, keys, public.fingerprint).json()['session_id']}"
        assert http.get(base).json() == {"part": 0, "next_chunk": 0, "rows_done": 0, "rows_total": 40,
                                         "rows_per_s": 0.0, "eta_s": None}
        done = 0
        for part in range(2):
            for c in range(plan.chunks(part)):
                assert http.post(f"{base}/parts/{part}/chunks/{c}", content=chunk(keys, plan, part, c)).status_code \
                    == 200
                done += plan.rows(part, c)
                state = http.get(base).json()
                if c + 1 < plan.chunks(part):
                    expected = (part, c + 1)
                else:
                    expected = (1, 0) if part == 0 else (2, None)  # the next part, or none left
                assert (state["part"], state["next_chunk"]) == expected, state
                assert (state["rows_done"], state["rows_total"]) == (done, 40)
                assert state["rows_per_s"] > 0  # eta_s: the rows left at that rate, both rounded to 0.1
                assert state["eta_s"] == pytest.approx((40 - done) / state["rows_per_s"], rel=0.01, abs=0.06)
        assert state["eta_s"] == 0
        assert http.delete(base).status_code == 204
        for gone in (base, "/v1/fit/sessions/no-such-fit"):
            missing = http.get(gone)
            assert missing.status_code == 404 and json_error(missing.content)["code"] == "fit_session_not_found"


class LosesOnce(httpx.HTTPTransport):
    """Real HTTP, except that chosen chunk POSTs (path suffix -> how) fail once as a reset connection does:
    "answer" after the server took the chunk (its answer is lost), "request" before the server saw it."""

    def __init__(self, lose: dict[str, str]):
        super().__init__()
        self.lose, self.seen = dict(lose), []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.seen.append((request.method, path))
        key = next((k for k in self.lose if request.method == "POST" and path.endswith(k)), None)
        how = self.lose.pop(key) if key else None
        if how == "request":
            raise httpx.WriteError("connection reset while the chunk was sent", request=request)
        response = super().handle_request(request)
        if how == "answer":
            response.read()  # the server has added the chunk
            response.close()
            raise httpx.ReadError("connection reset before the answer arrived", request=request)
        return response


def test_a_client_whose_chunk_answer_is_lost_resumes(public_dir, public, monkeypatch):
    """A chunk POST is not repeated blindly (the server refuses a repeat): the client asks the progress route and
    resends only a chunk that never arrived. Lost answers mid-part, at a part's last chunk and at the fit's last
    chunk, and one lost request: the fit completes, each chunk is added once, and it equals plaintext."""
    small_chunks(monkeypatch)
    transport = LosesOnce({"/parts/0/chunks/1": "answer", "/parts/0/chunks/2": "request",
                           "/parts/0/chunks/3": "answer", "/parts/1/chunks/1": "answer"})
    rng = np.random.default_rng(3)
    Z = rng.normal(0, 1, (public.rows, D_A)) * 3 + 5
    train, val = public_split(public.rows, public.manifest["val_fraction"], public.manifest["seed"])
    parts, ticks = [Z[train], Z[val]], []
    with ServerThread(create_app(public=public_dir), max_lifetime_s=120) as srv, \
            PrivateFitClient(srv.url, transport=transport) as fits:
        reply = fits.fit(parts, public.fingerprint, progress=lambda done, total: ticks.append((done, total)))
    assert transport.lose == {}  # every planned loss happened
    assert ticks == [(0, 40), (8, 40), (16, 40), (24, 40), (30, 40), (38, 40), (40, 40)]
    posts = [path.split("/parts/")[1] for method, path in transport.seen if method == "POST" and "/chunks/" in path]
    assert posts == ["0/chunks/0", "0/chunks/1", "0/chunks/2", "0/chunks/2", "0/chunks/3", "1/chunks/0",
                     "1/chunks/1"]  # only the chunk whose request was lost went twice
    asked = [path for method, path in transport.seen if method == "GET" and "/fit/sessions/" in path
             and "/parts/" not in path]
    assert len(asked) == 4  # the progress route, once per loss
    plan = GramPlan.from_dict(reply.plan)
    targets = [np.asarray(p, dtype=np.float64) for p in public.parts]
    mu_b, s_b = targets[0].mean(0), np.asarray(reply.stats["s_B"])
    scale_a = range_scale(parts[0].std(0))
    for p, (x, y, got) in enumerate(zip(parts, targets, reply.cross)):
        expected = (x - reply.client_shift).T @ (y - mu_b)
        error = np.abs(got - expected) / (scale_a[:, None] * s_b[None, :])  # in units of the normalised Gram
        # the kernel's precision: 2^-output_bits, plus the encryption noise σ·sqrt(rows)/2^value_bits (as in
        # test_fit_client.gram_tolerance), six times over
        noise = math.sqrt(NOISE_ETA / 2) * math.sqrt(plan.part_rows[p]) / 2.0 ** plan.value_bits
        assert error.max() <= 6 * (2.0 ** -plan.output_bits + noise) * 2.0 ** plan.target_shifts[p], error.max()


def metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_metrics_count_fit_rows_and_the_log_names_a_fit_without_its_session_id(public_dir, public, monkeypatch,
                                                                                caplog):
    """xsilo_fit_rows_total grows by each chunk's rows; each chunk logs one JSON line whose `fit` field (digest id,
    part, next chunk, rows, rate, time left) never holds the session id, which is the client's capability."""
    small_chunks(monkeypatch)
    with ServerThread(create_app(public=public_dir), max_lifetime_s=120) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as http, caplog.at_level(logging.INFO, logger="serve"):
        plan, keys = served_plan(http)
        session = open_fit(http, keys, public.fingerprint).json()["session_id"]
        assert metric(http, "xsilo_fit_rows_total") == 0
        done = []
        for part in range(2):
            for c in range(plan.chunks(part)):
                before = metric(http, "xsilo_fit_rows_total")
                response = http.post(f"/v1/fit/sessions/{session}/parts/{part}/chunks/{c}",
                                     content=chunk(keys, plan, part, c))
                assert response.status_code == 200
                assert metric(http, "xsilo_fit_rows_total") == before + plan.rows(part, c)
                done.append(sum(done[-1:]) + plan.rows(part, c))
        refused = http.post(f"/v1/fit/sessions/{session}/parts/0/chunks/0", content=chunk(keys, plan, 0))
        assert refused.status_code == 409 and metric(http, "xsilo_fit_rows_total") == 40  # refusals count nothing
    records = [r for r in caplog.records if hasattr(r, "fit")]
    lines = [JsonFormatter().format(r) for r in records]
    assert len(lines) == len(done) == 6
    tag = hashlib.sha256(session.encode()).hexdigest()[:12]
    assert session_tag(session) == tag
    requests = [JsonFormatter().format(r) for r in caplog.records if hasattr(r, "path")]
    assert len(requests) >= 7  # every request line names the session by its tag, never by its id
    assert all(session not in text for text in requests)
    assert any(f"/sessions/{tag}/parts/0/chunks/0" in json.loads(text)["path"] for text in requests)
    for text, rows in zip(lines, done):
        line = json.loads(text)
        assert session not in text and "\n" not in text
        assert line["fit"]["id"] == tag and tag in line["msg"]
        assert set(line["fit"]) == {"id", "part", "next_chunk", "rows_done", "rows_total", "rows_per_s", "eta_s"}
        assert (line["fit"]["rows_done"], line["fit"]["rows_total"]) == (rows, 40)
    assert json.loads(lines[-1])["fit"]["next_chunk"] is None and json.loads(lines[-1])["fit"]["eta_s"] == 0


# --- fuzz ----------------------------------------------------------------------------------------------------

PER_ROUTE = 150
TIME_LIMIT_S = 90.0
HOSTILE = ["-1", "1e3", "0x10", "%00", "..", "%2e%2e", "9" * 40, "१२", " 1", "1 ", "null", "[]", "ä", "1;2", "+1",
           "", "3.0", "true", "\t"]


def hostile(rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return HOSTILE[rng.integers(len(HOSTILE))]
    return "".join(chr(c) for c in rng.integers(33, 0x2FF, rng.integers(1, 30)) if chr(c) not in "/?#")


def segment(rng: np.random.Generator) -> str:
    """A hostile path segment, percent-encoded as a client must send it (a raw '%' stays raw)."""
    return quote(hostile(rng), safe="%")


def checked(response: httpx.Response) -> int:
    assert response.status_code in ALLOWED, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        json_error(response.content)
    return response.status_code


def test_fuzzed_fit_and_public_routes_answer_only_4xx(public_dir, public, plan_and_keys, tmp_path):
    plan, keys = plan_and_keys
    head = write_small_head(tmp_path / "topics", d=D_B, k=3, feature_ood=True)
    app = create_app(heads=[head], public=public_dir, max_fit_sessions=4, fits_per_client=None, body_timeout_s=2,
                     header_timeout_s=2)
    rng = np.random.default_rng(0)
    start = time.monotonic()
    real = chunk(keys, plan, 0)
    counts: dict[str, int] = {}
    with ServerThread(app, max_lifetime_s=TIME_LIMIT_S + 60) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        session = open_fit(http, keys, public.fingerprint).json()["session_id"]

        def budget_left() -> bool:
            return time.monotonic() - start < TIME_LIMIT_S

        for i in range(PER_ROUTE):
            if not budget_left():
                break
            checked(http.get("/v1/fit/plan", params={"source_dim": hostile(rng)}))
            checked(http.get("/v1/public-set/texts", params={"offset": hostile(rng), "limit": hostile(rng)}))
            params = {"source_dim": rng.choice([hostile(rng), str(D_A)]),
                      "fingerprint": rng.choice([hostile(rng), public.fingerprint])}
            body = [b"", rng.bytes(int(rng.integers(1, 5000))), keys.public_bytes()[:int(rng.integers(1, 2000))]][i % 3]
            status = checked(http.post("/v1/fit/sessions", params=params, content=body))
            assert status != 201
            flipped = bytearray(real)
            for _ in range(int(rng.integers(1, 4))):
                flipped[int(rng.integers(0, 200))] ^= int(rng.integers(1, 256))  # the header and META
            target = rng.choice([f"/v1/fit/sessions/{session}/parts/{segment(rng)}/chunks/0",
                                 f"/v1/fit/sessions/{session}/parts/0/chunks/{segment(rng)}",
                                 f"/v1/fit/sessions/{segment(rng)}/parts/0/chunks/0",
                                 f"/v1/fit/sessions/{session}/parts/0/chunks/0"])
            checked(http.post(target, content=bytes(flipped) if i % 2 else rng.bytes(int(rng.integers(1, 3000)))))
            checked(http.get(f"/v1/fit/sessions/{session}/parts/{segment(rng)}/result/{segment(rng)}"))
            checked(http.delete(f"/v1/fit/sessions/{segment(rng)}"))
            checked(http.get(f"/v1/fit/sessions/{segment(rng)}"))
            checked(http.get(f"/v1/heads/{segment(rng)}/feature-ood"))
            checked(http.post("/v1/sessions", params={"head": hostile(rng)}, content=rng.bytes(64)))
            counts["rounds"] = i + 1
        # the session survived the fuzzing: its real chunk is accepted and the part completes
        accepted = http.post(f"/v1/fit/sessions/{session}/parts/0/chunks/0", content=real)
        assert checked(accepted) in (200, 400, 409)
    assert counts["rounds"] >= 50, counts


# --- the public-states reader ------------------------------------------------------------------------------

def test_the_reader_matches_the_writer_and_the_lab_split(public_dir, public):
    from datamodules.states import random_split

    assert public.rows == 40 and public.part_rows == (30, 10) and public.texts == small_texts(40, 0)
    for ours, theirs in zip(public_split(40, 0.25, 0), random_split(40, 0.25, 0)):
        np.testing.assert_array_equal(ours, theirs)
    from datasets import Dataset

    from datamodules.text import dataset_fingerprint

    label_free = Dataset.from_dict({"text": public.texts})
    assert texts_fingerprint(public.texts) == dataset_fingerprint(label_free) == public.fingerprint


def test_range_scale_keeps_every_std_but_zero():
    std = np.array([0.0, 1e-9, 0.5, 1.0, np.nan, 3e-4, 1e3])
    np.testing.assert_array_equal(range_scale(std), [1.0, 1e-9, 0.5, 1.0, 1.0, 3e-4, 1e3])


def edit(folder, name: str, change) -> None:
    """Change a file and re-record its checksum (a hostile or buggy writer), or leave the checksum stale."""
    import hashlib

    path = folder / name
    data = change(path.read_bytes())
    path.write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def manifest_edit(key: str, value):
    def change(data: bytes) -> bytes:
        doc = json.loads(data)
        doc[key] = value
        return json.dumps(doc).encode()
    return change


@pytest.mark.parametrize("case, match", [
    ("stale_texts", "texts.jsonl does not match its sha256"),
    ("texts_changed", "fingerprint is not the manifest's"),
    ("texts_missing_row", "holds 39 texts but the manifest says rows=40"),
    ("texts_not_json", "texts.jsonl:1 is not a JSON line"),
    ("rows", "do not add up to rows"),
    ("parts", "must be {\"train\": rows"),
    ("format", "is not an xsilo 'xsilo-public-states' file"),
    ("seed", "not the split of 40 rows"),
    ("states", "is unreadable"),
    ("anchors_changed", "anchors' fingerprint is not the manifest's"),
    ("anchors_missing_row", "holds 4 texts but the manifest says rows=5"),
    ("anchors_entry", "'anchors' must be absent or"),
    ("anchors_dropped", "must hold exactly"),
])
def test_a_broken_public_states_folder_is_refused_in_one_line(tmp_path, case, match):
    folder = write_small_public_states(tmp_path / "public", n=40, d=D_B, anchors=5)
    if case == "stale_texts":
        (folder / "texts.jsonl").write_text("{\"text\": \"x\"}\n" * 40)
    elif case == "texts_changed":
        edit(folder, "texts.jsonl", lambda data: data.replace(b"0 ", b"O ", 1))
    elif case == "texts_missing_row":
        edit(folder, "texts.jsonl", lambda data: b"".join(data.splitlines(keepends=True)[:-1]))
    elif case == "texts_not_json":
        edit(folder, "texts.jsonl", lambda data: b"not json\n" + data.split(b"\n", 1)[1])
    elif case == "states":
        edit(folder, "states.safetensors", lambda data: data[:50])
    elif case == "anchors_changed":
        edit(folder, "anchors.jsonl", lambda data: data.replace(b"anchor", b"Anchor", 1))
    elif case == "anchors_missing_row":
        edit(folder, "anchors.jsonl", lambda data: b"".join(data.splitlines(keepends=True)[:-1]))
    elif case == "anchors_entry":
        edit(folder, "manifest.json", manifest_edit("anchors", {"rows": 0, "fingerprint": "f" * 64}))
    elif case == "anchors_dropped":  # the manifest forgets its anchors, the states still hold them
        path = folder / "manifest.json"
        doc = json.loads(path.read_text())
        doc.pop("anchors")
        path.write_text(json.dumps(doc))
    else:
        value = {"rows": 41, "parts": {"val": 10, "train": 30}, "format": "xsilo-export", "seed": 3}[case]
        path = folder / "manifest.json"
        path.write_bytes(manifest_edit(case, value)(path.read_bytes()))
    with pytest.raises(ExportError, match=match) as caught:
        load_public_states(folder)
    assert "\n" not in str(caught.value)
    with pytest.raises(ExportError, match=match):
        create_app(public=folder)


# --- memory ---------------------------------------------------------------------------------------------------

def rss(pid: int) -> int:
    from pathlib import Path

    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs /proc")
def test_a_fit_session_holds_its_accumulators_and_nothing_per_chunk(tmp_path):
    """RSS does not grow with the chunks of a part (bodies and per-chunk products are dropped), nor with fits opened
    and closed one after another; a session holds at most its plan's accumulators beyond the first chunk."""
    import subprocess
    import sys

    from tests.serve.serve_support import ROOT, free_port

    folder = write_small_public_states(tmp_path / "public", n=4096, d=128, val_fraction=0.125)  # 7 train chunks
    port = free_port()
    code = (f"from serve.running import run; run(public={str(folder)!r}, port={port}, log_level='warning', "
            "max_fit_sessions=1, fits_per_client=None)")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url, mb = f"http://127.0.0.1:{port}", 1 << 20
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                fingerprint = httpx.get(f"{url}/v1/model", timeout=2).json()["public_set"]["fingerprint"]
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=60) as http:
            plan = GramPlan.from_dict(http.get("/v1/fit/plan", params={"source_dim": 32}).json())
            keys = FitKeys.generate(plan)
            rng = np.random.default_rng(0)
            messages = [encrypt_chunk(keys, plan, 0, c, rng.normal(0, 1, (plan.rows(0, c), 32)))
                        for c in range(plan.chunks(0))]
            assert len(messages) >= 5
            cycles = []
            for cycle in range(3):
                opened = open_fit(http, keys, fingerprint, source_dim=32)
                assert opened.status_code == 201, opened.text
                base = f"/v1/fit/sessions/{opened.json()['session_id']}"
                after = []
                for c, message in enumerate(messages[:-1]):  # the part stays open: its accumulators are held
                    assert http.post(f"{base}/parts/0/chunks/{c}", content=message).status_code == 200
                    after.append(rss(process.pid))
                per_chunk = (after[-1] - after[0]) / (len(after) - 1)
                assert per_chunk <= 1 * mb, f"RSS grows by {per_chunk / mb:.2f} MB per chunk"
                cycles.append(after[-1])
                assert http.delete(base).status_code == 204
            # a fit closed frees its state for the next one: the third cycle holds no more than the first
            held = cycles[2] - cycles[0]
            assert held <= plan.accumulator_bytes / 2 + 4 * mb, (held / mb, plan.accumulator_bytes / mb)
    finally:
        process.terminate()
        process.wait(15)


def test_the_split_route_lists_the_parts_rows_as_the_public_set_holds_them(public_dir, public):
    """A client in any language learns which public rows form each part from GET /v1/public-set/split (the val
    part's indices; train is every other row), the same split the provider's states are stored in."""
    with ServerThread(create_app(public=public_dir), max_lifetime_s=60) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        split = http.get("/v1/public-set/split").json()
    assert split["rows"] == public.rows and split["val"] == public.indices[1].tolist()
    train = sorted(set(range(public.rows)) - set(split["val"]))
    assert train == public.indices[0].tolist() and split["val"] == sorted(split["val"])
