"""Split-mode serving: named heads, sessions bound to a head, the client's map, published feature-space OOD."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import httpx
import numpy as np
import pytest

from encrypted import ClientKeys, LinearLayout, decrypt, encrypt
from serve.client import Client, ModelMismatch, ServeError
from serve.formats.exports import LinearExport, load_export
from serve.formats.folders import ExportError
from serve.ood_client import mahalanobis_scores
from serve.harness import ServerThread
from serve.server import create_app

from tests.serve.serve_support import (PROVIDER_SPEC, json_error, write_small_export, write_small_head,
                                       write_small_map, write_small_public_states)

pytestmark = [pytest.mark.network, pytest.mark.he]

D_A, D_B = 20, 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {"topics": write_small_head(root / "heads" / "topics", d=D_B, k=3, seed=1, feature_ood=True),
            "sentiment": write_small_head(root / "heads" / "sentiment", d=D_B, k=2, seed=2,
                                          labels=["negative", "positive"]),
            "map": write_small_map(root / "aligner", D_A, D_B, seed=3),
            "export": write_small_export(root / "export", d=24, k=3),
            "public": write_small_public_states(root / "public", n=30, d=D_B),
            "root": root}


@pytest.fixture(scope="module")
def server(folders):
    app = create_app(folders["export"], heads=[folders["topics"], folders["sentiment"]], public=folders["public"])
    with ServerThread(app, max_lifetime_s=300) as srv:
        yield srv


def plain(head_dir, map_dir, X) -> np.ndarray:
    head, amap = load_export(head_dir, "head"), LinearExport.from_pretrained(map_dir, "map")
    mapped = X @ amap.weight.T.astype(np.float64) + amap.bias
    return mapped @ head.weight.T.astype(np.float64) + head.bias


def test_model_lists_every_head_the_fused_export_and_the_public_set(server, folders):
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["input_dim"] == 24 and info["export_sha256"]  # the fused export's fields, as before
    assert set(info["heads"]) == {"topics", "sentiment"}
    topics, sentiment = info["heads"]["topics"], info["heads"]["sentiment"]
    assert topics["label_names"] == ["h1c0", "h1c1", "h1c2"] and sentiment["label_names"] == ["negative", "positive"]
    assert (topics["input_dim"], topics["output_dim"], sentiment["output_dim"]) == (D_B, 3, 2)
    manifest = json.loads((folders["topics"] / "manifest.json").read_text())
    assert topics["sha256"] == manifest["files"]["head.safetensors"]["sha256"]
    assert topics["target"] == dict(PROVIDER_SPEC, hidden_size=D_B) and topics["metrics"] == {"val_accuracy": 0.5}
    npz = (folders["topics"] / "feature-ood.npz").read_bytes()
    assert topics["feature_ood"] == {"detector": "mahalanobis", "threshold": 4.0, "tpr": 0.95,
                                     "sha256": hashlib.sha256(npz).hexdigest()}
    assert sentiment["feature_ood"] is None
    assert LinearLayout.from_dict(topics["layout"]).output_dim == 3
    public = info["public_set"]
    assert public["rows"] == 30 and public["parts"] == {"train": 22, "val": 8} and public["hidden_size"] == D_B
    assert "states" not in json.dumps(public)
    health = httpx.get(f"{server.url}/healthz").json()
    assert health["heads"] == ["sentiment", "topics"] and health["public_set"] == public["fingerprint"]


@pytest.mark.parametrize("head", ["topics", "sentiment"])
def test_split_mode_logits_equal_the_head_on_the_mapped_states(server, folders, head):
    X = np.random.default_rng(4).normal(0, 1, (5, D_A))
    with Client(server.url, head=head, aligner=folders["map"]) as client:
        logits = client.infer_states(X)
        assert client.model_info().label_names == httpx.get(f"{server.url}/v1/model").json()["heads"][head][
            "label_names"]
    np.testing.assert_allclose(logits, plain(folders[head], folders["map"], X), atol=1e-3)


def test_fused_clients_keep_working_beside_heads(server, folders):
    fused = load_export(folders["export"])
    X = np.random.default_rng(5).normal(0, 1, (3, 24))
    with Client(server.url) as client:
        np.testing.assert_allclose(client.infer_states(X), X @ fused.weight.T.astype(np.float64) + fused.bias,
                                   atol=1e-3)


def test_an_unknown_head_is_404_naming_the_heads(server, folders):
    response = httpx.post(f"{server.url}/v1/sessions", params={"head": "nope"}, content=b"x" * 64)
    assert response.status_code == 404
    error = json_error(response.content)
    assert error["code"] == "head_not_found" and "sentiment" in error["message"] and "topics" in error["message"]
    assert json_error(httpx.get(f"{server.url}/v1/heads/nope/feature-ood").content)["code"] == "head_not_found"
    with Client(server.url, head="nope", aligner=folders["map"]) as client, \
            pytest.raises(ServeError, match="no head 'nope'"):
        client.model_info()


def test_a_session_is_bound_to_its_head(server, folders, tmp_path):
    info = httpx.get(f"{server.url}/v1/model").json()
    topics, sentiment = (LinearLayout.from_dict(info["heads"][name]["layout"]) for name in ("topics", "sentiment"))
    keys = ClientKeys.generate(topics.profile, topics.rotation_steps)
    head = load_export(folders["topics"], "head")
    x = np.random.default_rng(6).normal(0, 1, (1, D_B))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        opened = http.post("/v1/sessions", params={"head": "topics"}, content=keys.public_bytes())
        assert opened.status_code == 201 and opened.json()["head"] == "topics"
        session = opened.json()["session_id"]
        # whatever layout the client claims, the session evaluates its own head: the topics logits come back
        for layout in (topics, sentiment):
            reply = http.post(f"/v1/sessions/{session}/infer", content=encrypt(keys, layout, x)[0])
            assert reply.status_code == 200
            np.testing.assert_allclose(decrypt(keys, topics, [reply.content], 1),
                                       x @ head.weight.T.astype(np.float64) + head.bias, atol=1e-3)
    # a query made for a head of another input size is refused on this session, not evaluated by that head
    wide = write_small_head(tmp_path / "wide", d=D_B + 8, k=2)
    with ServerThread(create_app(heads=[folders["topics"], wide]), max_lifetime_s=60) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        wide_layout = LinearLayout.from_dict(http.get("/v1/model").json()["heads"]["wide"]["layout"])
        opened = http.post("/v1/sessions", params={"head": "topics"}, content=keys.public_bytes())
        wide_keys = ClientKeys.generate(wide_layout.profile, wide_layout.rotation_steps)
        query = encrypt(wide_keys, wide_layout, np.ones((1, 24)))[0]
        refused = http.post(f"/v1/sessions/{opened.json()['session_id']}/infer", content=query)
        assert refused.status_code in (400, 422) and json_error(refused.content)["code"] in (
            "parameter_mismatch", "invalid_ciphertext")
        # the topics keys do not open a session on the wide head: it needs another rotation step
        assert set(wide_layout.rotation_steps) != set(topics.rotation_steps)
        other = http.post("/v1/sessions", params={"head": "wide"}, content=keys.public_bytes())
        assert other.status_code in (400, 422)


def test_feature_ood_bytes_match_the_published_sha256_and_flag_far_states(server, folders):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        data = http.get("/v1/heads/topics/feature-ood").content
        assert hashlib.sha256(data).hexdigest() == http.get("/v1/model").json()["heads"]["topics"]["feature_ood"][
            "sha256"]
        missing = http.get("/v1/heads/sentiment/feature-ood")
        assert missing.status_code == 404 and json_error(missing.content)["code"] == "feature_ood_not_published"
    npz = np.load(io.BytesIO(data), allow_pickle=False)
    means, precision = npz["means"], npz["precision"]
    amap = LinearExport.from_pretrained(folders["map"], "map")
    # client states whose mapped images sit on a class mean (in distribution) and far away (out of distribution)
    target = np.vstack([means[0], means[1] + 0.1, 50 * np.ones(D_B)])
    X = np.linalg.lstsq(amap.weight.astype(np.float64), (target - amap.bias).T, rcond=None)[0].T
    with Client(server.url, head="topics", aligner=folders["map"]) as client:
        results = client.classify(["on a mean", "near a mean", "far away"], encoder=lambda texts: X)
    expected = mahalanobis_scores(X @ amap.weight.T.astype(np.float64) + amap.bias, means, precision)
    np.testing.assert_allclose([r["ood_score"] for r in results], expected, rtol=1e-9)
    assert [r["ood"] for r in results] == [False, False, True]
    assert expected[0] < 1e-6 and expected[2] > 4.0


def test_a_map_into_another_model_is_refused(server, folders):
    other = write_small_map(folders["root"] / "other-map", D_A, D_B,
                            target=dict(PROVIDER_SPEC, model_identity="c" * 64))
    with Client(server.url, head="topics", aligner=other) as client, \
            pytest.raises(ModelMismatch, match="model_identity"):
        client.infer_states(np.ones((1, D_A)))
    wide = write_small_map(folders["root"] / "wide-map", D_A, D_B + 1)
    with Client(server.url, head="topics", aligner=wide) as client, pytest.raises(ModelMismatch, match="17-d"):
        client.model_info()
    with pytest.raises(ValueError, match="both head= .* and aligner="):
        Client(server.url, head="topics")


# --- the readers and the configuration --------------------------------------------------------------------

def test_head_export_reader_checks_the_feature_ood_file(folders, tmp_path):
    head = load_export(folders["topics"], "head")
    assert head.feature_ood is not None and head.feature_ood.means.shape == (3, D_B)
    assert load_export(folders["sentiment"], "head").feature_ood is None
    tampered = tmp_path / "tampered"
    write_small_head(tampered, d=D_B, k=3, seed=1, feature_ood=True)
    with open(tampered / "feature-ood.npz", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01")
    with pytest.raises(ExportError, match="feature-ood.npz does not match its sha256"):
        load_export(tampered, "head")


def rewrite_npz(folder, arrays: dict, pickle: bool = False) -> None:
    """Replace feature-ood.npz and fix its checksum in the manifest (a provider's own hostile file)."""
    buffer = io.BytesIO()
    if pickle:
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, value in arrays.items():
                inner = io.BytesIO()
                np.save(inner, np.array([value], dtype=object), allow_pickle=True)
                archive.writestr(f"{name}.npy", inner.getvalue())
    else:
        np.savez(buffer, **arrays)
    data = buffer.getvalue()
    (folder / "feature-ood.npz").write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["feature-ood.npz"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("case, match", [
    ("shape", "needs \\(3, 16\\) and \\(16, 16\\)"),
    ("nan", "NaN or inf"),
    ("extra", "must hold \\['means.npy', 'precision.npy'\\]"),
    ("missing", "must hold \\['means.npy', 'precision.npy'\\]"),
    ("pickle", "not a readable npz"),
    ("priors_shape", "priors must be 3 floats"),
    ("priors_int", "priors must be 3 floats"),
    ("priors_sum", "sum to 0.9, not 1"),
    ("priors_zero", "in \\(0, 1\\]"),
    ("priors_nan", "in \\(0, 1\\]"),
])
def test_bad_feature_ood_arrays_are_refused(tmp_path, case, match):
    folder = write_small_head(tmp_path / "head", d=D_B, k=3, feature_ood=True)
    means, precision = np.zeros((3, D_B)), np.eye(D_B)
    arrays = {"shape": {"means": np.zeros((2, D_B)), "precision": precision},
              "nan": {"means": np.full((3, D_B), np.nan), "precision": precision},
              "extra": {"means": means, "precision": precision, "more": means},
              "missing": {"means": means, "priors": np.full(3, 1 / 3)},
              "pickle": {"means": means, "precision": precision},
              "priors_shape": {"means": means, "precision": precision, "priors": np.full(2, 0.5)},
              "priors_int": {"means": means, "precision": precision, "priors": np.array([1, 0, 0])},
              "priors_sum": {"means": means, "precision": precision, "priors": np.array([0.3, 0.3, 0.3])},
              "priors_zero": {"means": means, "precision": precision, "priors": np.array([0.5, 0.5, 0.0])},
              "priors_nan": {"means": means, "precision": precision, "priors": np.array([0.5, 0.5, np.nan])},
              }[case]
    rewrite_npz(folder, arrays, pickle=case == "pickle")
    with pytest.raises(ExportError, match=match):
        load_export(folder, "head")
    with pytest.raises(ExportError, match=match):
        create_app(heads=[folder])


def test_the_class_priors_are_optional_and_served_unchanged(tmp_path):
    """feature-ood.npz may carry the task's class priors (k,): read back and served as written; a head without them
    (published before priors were) still loads, with priors None."""
    folder = write_small_head(tmp_path / "head", d=D_B, k=3, feature_ood=True, priors=[0.5, 0.25, 0.25])
    assert load_export(folder, "head").feature_ood.priors.tolist() == [0.5, 0.25, 0.25]
    with np.load(folder / "feature-ood.npz") as z:
        assert sorted(z.files) == ["means", "precision", "priors"] and z["priors"].dtype == np.float64
    old = write_small_head(tmp_path / "old", d=D_B, k=3, feature_ood=True)
    assert load_export(old, "head").feature_ood.priors is None
    with ServerThread(create_app(heads=[folder, old]), max_lifetime_s=60) as srv:
        assert httpx.get(f"{srv.url}/v1/heads/head/feature-ood").content == (folder / "feature-ood.npz").read_bytes()
        for name, expected in (("head", [0.5, 0.25, 0.25]), ("old", None)):
            with Client(srv.url, head=name, aligner=write_small_map(tmp_path / f"map-{name}", D_A, D_B)) as client:
                published = client.feature_detector()
            assert (None if published.priors is None else published.priors.tolist()) == expected


def test_serving_configurations_are_checked(folders, tmp_path):
    with pytest.raises(ValueError, match="nothing to serve"):
        create_app()
    with pytest.raises(ExportError, match="is a head export; serve it with --heads"):
        create_app(folders["topics"])
    with pytest.raises(ExportError, match="is a fused export, not a head"):
        create_app(heads=[folders["export"]])
    twin = tmp_path / "a" / "topics"
    write_small_head(twin, d=D_B, k=3)
    with pytest.raises(ExportError, match="two head folders are named 'topics'"):
        create_app(heads=[folders["topics"], twin])
    wide = write_small_head(tmp_path / "wide", d=D_B + 2, k=3)
    with pytest.raises(ExportError, match="reads 18-d states but the public set holds 16-d"):
        create_app(heads=[wide], public=folders["public"])
    alien = write_small_head(tmp_path / "alien", d=D_B, k=3, target=dict(PROVIDER_SPEC, model_identity="d" * 64))
    with pytest.raises(ExportError, match="same model"):
        create_app(heads=[alien], public=folders["public"])
    only_heads = create_app(heads=[folders["sentiment"]])
    info = only_heads.state.service.info
    assert info["export_sha256"] is None and info["layout"] is None and info["public_set"] is None
    with ServerThread(only_heads, max_lifetime_s=60) as srv:
        response = httpx.post(f"{srv.url}/v1/sessions", content=b"x" * 64)
        assert response.status_code == 404 and json_error(response.content)["code"] == "no_fused_export"
        with Client(srv.url) as client, pytest.raises(ServeError, match="no fused export"):
            client.model_info()


def test_split_mode_classifies_texts_with_the_maps_source_model(server, folders, tiny_models, monkeypatch):
    """The client's own (tiny) model extracts per the map's source spec; the provider's head answers."""
    from datamodules.encoder import StateEncoder
    from datamodules.models import model_identity

    monkeypatch.setenv("XSILO_HOME", str(folders["root"] / "client-home"))
    llama = str(tiny_models["llama"])
    encoder = StateEncoder(llama, pooling="last", layer=-1, max_length=32, dtype="float32")
    d = encoder(["probe"]).shape[1]
    source = {"model": llama, "model_identity": model_identity(llama), "pooling": "last", "layer": -1,
              "max_length": 32, "dtype": "float32", "hidden_size": d}
    amap = write_small_map(folders["root"] / "llama-map", d, D_B, seed=8)
    config = json.loads((amap / "config.json").read_text())
    from serve.formats.maps import write_map_folder

    weights = LinearExport.from_pretrained(amap, "map")
    write_map_folder(amap, weights.weight, weights.bias, dict(config, source=source))
    texts = ["the film was good", "a bad movie", "it is"]
    with Client(server.url, head="topics", aligner=amap) as client:
        results = client.classify(texts)
        states = np.asarray(client.encoder(texts), dtype=np.float64)
    expected = plain(folders["topics"], amap, states)
    np.testing.assert_allclose([r["logits"] for r in results], expected, atol=1e-3)
    assert [r["label"] for r in results] == [["h1c0", "h1c1", "h1c2"][i] for i in expected.argmax(1)]
    assert all("ood" in r and "ood_score" in r for r in results)  # the head publishes a feature detector
    # a client model other than the map's source is refused by identity
    with Client(server.url, head="topics", aligner=amap, client_model=str(tiny_models["gpt2"])) as client, \
            pytest.raises(ModelMismatch, match="identity"):
        client.classify(texts)


def test_each_head_has_its_own_row_budget_per_client(folders):
    lanes = create_app(heads=[folders["topics"]]).state.service.info["heads"]["topics"]["lanes"]
    app = create_app(heads=[folders["topics"], folders["sentiment"]], rows_per_client=lanes)  # one query per head
    X = np.ones((1, D_A))
    with ServerThread(app, max_lifetime_s=60) as srv:
        with Client(srv.url, head="topics", aligner=folders["map"]) as client:
            client.infer_states(X)
            with pytest.raises(ServeError, match="budget_exhausted"):
                client.infer_states(X)
        with Client(srv.url, head="sentiment", aligner=folders["map"]) as client:
            assert client.infer_states(X).shape == (1, 2)  # another head's W: its own budget


@pytest.mark.parametrize("served, match", [(b"\0" * 10_000, "answered more than"),
                                           (b"PK" + b"\0" * 100, "does not match the sha256")])
def test_the_client_refuses_a_hostile_feature_ood_download(server, folders, served, match):
    info = httpx.get(f"{server.url}/v1/model").json()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/model":
            return httpx.Response(200, json=info)
        return httpx.Response(200, content=served)

    with Client("http://provider", head="topics", aligner=folders["map"], transport=httpx.MockTransport(handler)) \
            as client, pytest.raises(ServeError, match=match):
        client.feature_detector()


# --- the heads' published logits on the public val rows (the head-aware λ of `xsilo align --head`) -------------

def test_val_logits_are_off_by_default(server, folders):
    assert httpx.get(f"{server.url}/v1/model").json()["public_set"]["val_logits"] is False
    response = httpx.get(f"{server.url}/v1/public-set/val-logits", params={"head": "topics"})
    error = json_error(response.content)
    assert response.status_code == 404 and error["code"] == "val_logits_not_published"
    assert "--publish_val_logits true" in error["message"]
    from serve.fit_client import PrivateFitClient

    with PrivateFitClient(server.url) as fits, pytest.raises(ServeError, match="--publish_val_logits true"):
        fits.val_logits("topics")


def test_val_logits_page_and_equal_the_plaintext_head_on_the_public_val_states(folders):
    from serve.fit_client import PrivateFitClient
    from serve.formats.public_states import load_public_states

    app = create_app(heads=[folders["topics"], folders["sentiment"]], public=folders["public"],
                     publish_val_logits=True, max_public_texts=3)
    val_states = load_public_states(folders["public"]).parts[1].astype(np.float64)  # 8 rows
    with ServerThread(app, max_lifetime_s=60) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        assert http.get("/v1/model").json()["public_set"]["val_logits"] is True
        first = http.get("/v1/public-set/val-logits", params={"head": "topics", "limit": 100}).json()
        assert (first["rows"], first["offset"], first["next"], len(first["logits"])) == (8, 0, 3, 3)  # bounded
        last = http.get("/v1/public-set/val-logits", params={"head": "topics", "offset": 6}).json()
        assert (last["next"], len(last["logits"])) == (None, 2)
        past = http.get("/v1/public-set/val-logits", params={"head": "topics", "offset": 9})
        assert past.status_code == 400 and json_error(past.content)["code"] == "invalid_offset"
        unknown = http.get("/v1/public-set/val-logits", params={"head": "nope"})
        assert unknown.status_code == 404 and json_error(unknown.content)["code"] == "head_not_found"
        assert "topics" in json_error(unknown.content)["message"]
        missing = http.get("/v1/public-set/val-logits")
        assert missing.status_code == 422
        with PrivateFitClient(srv.url) as fits:
            for name in ("topics", "sentiment"):
                head = load_export(folders[name], "head")
                expected = val_states @ head.weight.T.astype(np.float64) + head.bias.astype(np.float64)
                np.testing.assert_allclose(fits.val_logits(name), expected, rtol=1e-12, atol=1e-12)
            with pytest.raises(ServeError, match="no head 'nope'.*--head"):
                fits.val_logits("nope")


def test_val_logits_refuse_a_head_that_does_not_record_the_public_sets_model(folders, tmp_path):
    anonymous = write_small_head(tmp_path / "anonymous", d=D_B, k=2, target=dict(PROVIDER_SPEC, model_identity=None))
    app = create_app(heads=[anonymous], public=folders["public"], publish_val_logits=True)
    with ServerThread(app, max_lifetime_s=60) as srv:
        response = httpx.get(f"{srv.url}/v1/public-set/val-logits", params={"head": "anonymous"})
        assert response.status_code == 409 and json_error(response.content)["code"] == "head_model_mismatch"
    heads_only = create_app(heads=[folders["topics"]], publish_val_logits=True)
    with ServerThread(heads_only, max_lifetime_s=60) as srv:
        response = httpx.get(f"{srv.url}/v1/public-set/val-logits", params={"head": "topics"})
        assert response.status_code == 404 and json_error(response.content)["code"] == "no_public_set"


@pytest.mark.parametrize("page, match", [
    ({"rows": 8, "offset": 0, "next": None, "logits": [[0.0, 1.0]] * 8}, "rows of 3 numbers"),
    ({"rows": 8, "offset": 0, "next": None, "logits": [[float("nan")] * 3] * 8}, "NaN"),
    ({"rows": 8, "offset": 0, "next": 0, "logits": [[0.0] * 3]}, "paging is inconsistent"),
    ({"rows": 8, "offset": 0, "next": None, "logits": [[0.0] * 3] * 5}, "sent 5 val logits"),
    ({"rows": 9, "offset": 0, "next": None, "logits": [[0.0] * 3] * 9}, "for the 8 val rows"),
])
def test_the_client_refuses_a_hostile_val_logits_page(folders, page, match):
    from serve.fit_client import PrivateFitClient

    info = create_app(heads=[folders["topics"]], public=folders["public"], publish_val_logits=True).state.service.info

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/model":
            return httpx.Response(200, json=info)
        return httpx.Response(200, content=json.dumps(page, allow_nan=True).encode())

    with PrivateFitClient("http://provider", transport=httpx.MockTransport(handler)) as fits, \
            pytest.raises(ServeError, match=match):
        fits.val_logits("topics")


def test_fuzzed_val_logits_queries_answer_only_json_4xx(folders):
    """Hostile head names, offsets and limits: 200 for a valid page, else a JSON 4xx; never a 5xx (bounded loop)."""
    import time

    from tests.serve.test_serve_fit import checked, hostile

    app = create_app(heads=[folders["topics"]], public=folders["public"], publish_val_logits=True)
    rng = np.random.default_rng(7)
    start, rounds = time.monotonic(), 0
    with ServerThread(app, max_lifetime_s=120) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        for _ in range(80):
            if time.monotonic() - start > 15:
                break
            params = {"head": rng.choice([hostile(rng), "topics"]), "offset": rng.choice([hostile(rng), "0", "8"]),
                      "limit": rng.choice([hostile(rng), "1", "100000"])}
            status = checked(http.get("/v1/public-set/val-logits", params=params))
            if status == 200:
                page = http.get("/v1/public-set/val-logits", params=params).json()
                assert len(page["logits"]) <= app.state.service.settings.max_public_texts
            rounds += 1
    assert rounds >= 50
