"""The head-aware λ of a two-party fit: the client chooses λ through the provider's head (queried under HE on the
directions the path's maps write into, plus the provider's published val logits) exactly as the lab does with the
head in hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_modules.parties.head_probe import HeadProbeError, check_budgets, head_val_stats, probe
from lightning_modules.parties.private_fit import PrivateFitError, fit_private, part_stats, query_head
from lightning_modules.settings import FitSettings
from lightning_modules.fitting.affine_map import AffineMap, compose
from lightning_modules.fitting.estimators import path_factors
from lightning_modules.fitting.solvers import solve
from lightning_modules.fitting.stats import SufficientStats
from serve.client import ServeError
from serve.formats.exports import load_export
from serve.fit_client import PrivateFitClient
from serve.formats.public_states import load_public_states
from serve.formats.splits import public_split
from serve.harness import ServerThread
from serve.server import create_app

from tests.serve.serve_support import PROVIDER_SPEC, write_small_head, write_small_public_states

D_A, D_B, N = 10, 14, 160
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def stats_of(x: np.ndarray, y: np.ndarray) -> SufficientStats:
    x, y = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)) for a in (x, y))
    return SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=False).update(x, y)


def head_map(folder) -> AffineMap:
    head = load_export(folder, "head")
    return AffineMap(torch.from_numpy(head.weight.astype(np.float64)), torch.from_numpy(head.bias.astype(np.float64)))


@pytest.fixture(scope="module")
def two_parties(tmp_path_factory):
    """Client states X (n, d_A) and provider states Y = a noisy linear image of X, written as the provider's public
    set, and a provider head that reads Y."""
    root = tmp_path_factory.mktemp("align-head")
    rng = np.random.default_rng(11)
    x = rng.normal(0, 1, (N, D_A)) @ rng.normal(0, 1, (D_A, D_A)) + rng.normal(0, 2, D_A)
    y = x @ rng.normal(0, 0.5, (D_A, D_B)) + rng.normal(0, 1.5, (N, D_B)) + 3.0
    public = write_small_public_states(root / "public", states=y.astype(np.float32), val_fraction=0.25, seed=3)
    head = write_small_head(root / "heads" / "topics", d=D_B, k=3, seed=5)
    return {"x": x, "public": public, "head": head, "root": root}


def lab_fit(two_parties, fit: FitSettings):
    """The lab: both parties' plaintext states and the head itself."""
    public = load_public_states(two_parties["public"])
    train_idx, val_idx = public_split(public.rows, float(public.manifest["val_fraction"]), int(public.manifest["seed"]))
    x = two_parties["x"].astype(np.float32).astype(np.float64)
    y_train, y_val = (p.astype(np.float64) for p in public.parts)
    head = head_map(two_parties["head"])
    logits_val = y_val @ head.weight.numpy().T + head.bias.numpy()
    return solve(stats_of(x[train_idx], y_train), stats_of(x[val_idx], y_val), fit.estimator, fit.lambdas,
                 fit.center, fit.standardize, criterion="head", head=head,
                 head_val=stats_of(x[val_idx], logits_val)), head


def test_the_probed_head_composes_as_the_real_one_on_every_map_of_the_path(two_parties):
    public = load_public_states(two_parties["public"])
    train_idx, _ = public_split(public.rows, 0.25, 3)
    train = stats_of(two_parties["x"][train_idx], public.parts[0].astype(np.float64))
    head = head_map(two_parties["head"])
    for standardize in (False, True):
        rows = probe(train, True, standardize)
        assert rows.basis.shape == (D_B, D_A) and rows.rows.shape == (D_A + 2, D_B)  # r + 2 rows, r = min(d_A, d_B)
        logits = rows.rows @ head.weight.numpy().T + head.bias.numpy()  # the answers a server gives in plaintext
        surrogate = rows.head(logits)
        factors = path_factors(train, True, standardize)
        for lam in LAMBDAS:
            real, probed = compose(head, factors.map(lam)), compose(surrogate, factors.map(lam))
            torch.testing.assert_close(probed.weight, real.weight, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(probed.bias, real.bias, rtol=1e-9, atol=1e-10)
        assert not torch.allclose(surrogate.weight, head.weight, atol=1e-3)  # only its span is known, not all of W_h


@pytest.mark.network
@pytest.mark.he
def test_two_party_head_criterion_equals_the_lab(two_parties):
    fit = FitSettings(lambdas=LAMBDAS, standardize=True)
    (lab_map, lab_lam, lab_path), _ = lab_fit(two_parties, fit)
    app = create_app(heads=[two_parties["head"]], public=two_parties["public"], publish_val_logits=True)
    x = two_parties["x"].astype(np.float32)
    with ServerThread(app, max_lifetime_s=300) as srv, PrivateFitClient(srv.url) as client:
        public = client.public_set()
        parts = [x[idx] for idx in public_split(public["rows"], public["val_fraction"], public["seed"])]
        reply = client.fit(parts, public["fingerprint"])
        stats = part_stats(parts, reply)
        surrogate, cost = query_head(srv.url, "topics", stats[0], fit)
        head_val = head_val_stats(parts[1], client.val_logits("topics"))
    result = fit_private(parts, reply, fit, source_spec={}, public_set=public, head=surrogate, head_val=head_val,
                         stats=stats)
    m = result.metrics
    assert m["criterion"] == lab_path.criterion == "head" and m["chosen"]["head"] == lab_lam == m["chosen_lambda"]
    assert set(m["chosen"]) == {"gcv", "val_mse", "head"}  # the path records every criterion's λ
    assert lab_lam not in (min(LAMBDAS), max(LAMBDAS))  # the criterion really chose: not an end of the grid
    np.testing.assert_allclose(m["lambda_path"]["scores"]["head"], lab_path.scores["head"], rtol=1e-3)
    w, w_lab = result.aligner.affine_map.weight.double(), lab_map.weight.double()
    assert float((w - w_lab).abs().max()) <= 1e-4 * float(w_lab.abs().max())
    b, b_lab = result.aligner.affine_map.bias.double(), lab_map.bias.double()
    assert float((b - b_lab).abs().max()) <= 1e-4 * max(float(b_lab.abs().max()), 1.0)
    assert cost["probe_rows"] == D_A + 2 and cost["rows_charged"] >= D_A + 2


@pytest.mark.network
@pytest.mark.he
def test_a_row_budget_too_small_for_the_probe_names_the_flag(two_parties):
    app = create_app(heads=[two_parties["head"]], public=two_parties["public"], publish_val_logits=True,
                     rows_per_session=4)
    lanes = app.state.service.info["heads"]["topics"]["lanes"]
    with pytest.raises(HeadProbeError, match=r"--rows_per_session is 4; .* at least"):
        check_budgets(D_A + 2, {"lanes": lanes}, app.state.service.info["limits"], "topics")
    assert check_budgets(D_A + 2, {"lanes": lanes}, {"rows_per_client": lanes}, "topics") == lanes
    public = load_public_states(two_parties["public"])
    train_idx, _ = public_split(public.rows, 0.25, 3)
    train = stats_of(two_parties["x"][train_idx], public.parts[0].astype(np.float64))
    with ServerThread(app, max_lifetime_s=60) as srv, pytest.raises(HeadProbeError, match="--rows_per_session"):
        query_head(srv.url, "topics", train, FitSettings(lambdas=LAMBDAS))


@pytest.mark.network
@pytest.mark.he
def test_align_with_head_needs_the_published_logits_and_a_head(two_parties, tmp_path):
    from lightning_modules.parties.private_fit import align

    with pytest.raises(PrivateFitError, match="--head NAME"):
        align("http://127.0.0.1:9", "m", tmp_path / "map", fit=FitSettings(criterion="head"))
    with pytest.raises(PrivateFitError, match="estimator procrustes takes none"):
        align("http://127.0.0.1:9", "m", tmp_path / "map", fit=FitSettings(estimator="procrustes"), head="topics")
    app = create_app(heads=[two_parties["head"]], public=two_parties["public"])  # val logits not published
    with ServerThread(app, max_lifetime_s=60) as srv:
        with pytest.raises(ServeError, match="--publish_val_logits true"):
            align(srv.url, "m", tmp_path / "map", head="topics")
        with pytest.raises(ServeError, match="no head 'nope'"):
            align(srv.url, "m", tmp_path / "map", head="nope")
    assert not (tmp_path / "map").exists()


@pytest.mark.network
@pytest.mark.he
def test_xsilo_align_head_on_tiny_models_equals_the_lab(tiny_models, tmp_path, monkeypatch, capsys):
    """Two homes, two tiny models: `xsilo align --head topics` against `xsilo serve --publish_val_logits true`
    gives the map and λ of the lab's head criterion on the same rows (1e-4), and its folder records every criterion."""
    from datamodules.cache import StateCache
    from datamodules.extraction import ExtractionConfig, resolve
    from lightning_modules.models.aligner import AffineAligner
    from lightning_modules.cli import main
    from lightning_modules.parties.private_fit import public_texts_file

    from tests.tiny import write_tiny_csv

    provider, client = str(tiny_models["gpt2"]), str(tiny_models["llama"])
    public_csv = write_tiny_csv(tmp_path / "public.csv", n=120, seed=8)
    task = write_tiny_csv(tmp_path / "task.csv", n=90, seed=9)
    monkeypatch.setenv("XSILO_HOME", str(tmp_path / "provider-home"))
    main(["public-set", "export", "--model", provider, "--data", str(public_csv), "--out", str(tmp_path / "pub"),
          "--accelerator", "cpu"])
    main(["head", "fit", "--model", provider, "--task", str(task), "--out", str(tmp_path / "heads" / "topics"),
          "--head.epochs", "10", "--accelerator", "cpu"])
    lambdas = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    monkeypatch.setenv("XSILO_HOME", str(tmp_path / "client-home"))
    app = create_app(heads=[tmp_path / "heads" / "topics"], public=tmp_path / "pub", publish_val_logits=True)
    with ServerThread(app, max_lifetime_s=300) as srv:
        capsys.readouterr()
        main(["align", "--server", srv.url, "--model", client, "--out", str(tmp_path / "map"), "--head", "topics",
              "--fit.lambdas", "[" + ",".join(map(str, lambdas)) + "]", "--accelerator", "cpu"])
        err = capsys.readouterr().err
        with PrivateFitClient(srv.url) as fits:
            texts, public = fits.public_texts(), fits.public_set()
    assert "by head (gcv " in err and "head 'topics' probed on" in err
    config = json.loads((tmp_path / "map" / "config.json").read_text())
    private_fit = config["metrics"]["private_fit"]
    assert private_fit["criterion"] == "head" and set(private_fit["chosen"]) == {"gcv", "val_mse", "head"}
    assert private_fit["head"]["name"] == "topics" and private_fit["head"]["probe_rows"] >= 3

    # the lab: the client's states (its own cache) and the provider's (its public folder), the head in hand
    job = resolve(ExtractionConfig(model=client, data=str(public_texts_file(texts, public["fingerprint"])),
                                   label_column=None))
    x = StateCache(job.directory).rows(np.arange(public["rows"])).astype(np.float64)
    pub = load_public_states(tmp_path / "pub")
    train_idx, val_idx = public_split(pub.rows, float(pub.manifest["val_fraction"]), int(pub.manifest["seed"]))
    head = head_map(tmp_path / "heads" / "topics")
    y_train, y_val = (p.astype(np.float64) for p in pub.parts)
    fit = FitSettings(lambdas=lambdas)
    lab_map, lab_lam, lab_path = solve(stats_of(x[train_idx], y_train), stats_of(x[val_idx], y_val), fit.estimator,
                                       fit.lambdas, fit.center, fit.standardize, criterion="head", head=head,
                                       head_val=stats_of(x[val_idx], y_val @ head.weight.numpy().T + head.bias.numpy()))
    private = AffineAligner.from_pretrained(tmp_path / "map")
    assert private_fit["chosen_lambda"] == lab_lam and private_fit["chosen"] == lab_path.chosen
    w, w_lab = private.affine_map.weight.double(), lab_map.weight.double()
    assert float((w - w_lab).abs().max()) <= 1e-4 * float(w_lab.abs().max())
    b, b_lab = private.affine_map.bias.double(), lab_map.bias.double()
    assert float((b - b_lab).abs().max()) <= 1e-4 * max(float(b_lab.abs().max()), 1.0)


def test_align_head_and_serve_publish_val_logits_parse_beside_a_recipe():
    """`--head NAME` is align's head name even with a recipe whose `head:` section holds head-fit settings."""
    from pathlib import Path

    from lightning_modules.cli import build_parser

    recipe = str(Path(__file__).resolve().parents[3] / "configs" / "recipe" / "bbc.yaml")
    parser = build_parser()
    for argv in (["align", "--config", recipe, "--server", "s", "--model", "m", "--out", "o", "--head", "topics",
                  "--fit.criterion", "head"], ["serve", "--public", "pub", "--publish_val_logits", "true"]):
        cfg = parser.instantiate(parser.parse_args(argv))[argv[0]]
        if argv[0] == "align":
            assert (cfg.head, cfg.fit.criterion, cfg.fit.standardize) == ("topics", "head", True)
        else:
            assert cfg.publish_val_logits is True
    cfg = parser.instantiate(parser.parse_args(["serve", "--public", "pub"]))["serve"]
    assert cfg.publish_val_logits is False  # off by default
