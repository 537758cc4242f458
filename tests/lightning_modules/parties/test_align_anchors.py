"""A public set with anchors (`xsilo public-set export --anchors`): texts outside the split that every client's
private fit weighs at a share it chooses (`--adaptation.anchor_weight`), on tiny random models, two homes.

The two-party map equals the lab's `adapt(..., anchors=...)`, and the provider receives the same plaintext bytes
whatever share the client chose: the weight is applied after decryption. The fit's randomness is fixed as in
`test_align_private`, so any byte the weight touched would show as a difference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lightning_modules.cli import main
from lightning_modules.fitting.adaptation import TaskStatistics, adapt, with_anchors
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.fitting.prior_matching import match_priors
from lightning_modules.fitting.solvers import solve
from lightning_modules.settings import AdaptationSettings, FitSettings
from serve.formats.exports import load_export
from serve.formats.public_states import load_public_states
from serve.formats.splits import public_split
from serve.harness import ServerThread
from serve.server import create_app

from tests.lightning_modules.parties.test_align_private import (LAMBDA_FLAG, LAMBDAS, Recorder, fixed_fit_randomness,
                                                                fixed_seal_randomness, private_texts, stats_of)
from tests.tiny import write_tiny_csv

pytestmark = [pytest.mark.network, pytest.mark.he]

ANCHOR_TEXTS = [f"written example {i} about {topic}" for i, topic in
                enumerate(["sport and games", "money and markets", "films and music"] * 8)]


@pytest.fixture(scope="module")
def anchored(tiny_models, tmp_path_factory):
    """The provider's public set with 24 anchors and its head; the client aligns with --private at the default
    anchor weight, at 0.6, and with no --private at all."""
    root = tmp_path_factory.mktemp("align-anchors")
    provider, client = str(tiny_models["gpt2"]), str(tiny_models["llama"])
    public = write_tiny_csv(root / "public.csv", n=120, seed=8)
    task = write_tiny_csv(root / "task.csv", n=90, seed=9)
    anchors = root / "synthetic.jsonl"
    anchors.write_text("".join(json.dumps({"text": t, "class": i % 3}) + "\n" for i, t in enumerate(ANCHOR_TEXTS)))
    mine = root / "mine.jsonl"
    mine.write_text("".join(json.dumps({"text": t}) + "\n" for t in private_texts(60, 1)))
    runs = {"default": ["--private", str(mine)],
            "heavier": ["--private", str(mine), "--adaptation.anchor_weight", "0.6"],
            "plain": []}
    logs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSILO_HOME", str(root / "provider-home"))
        main(["public-set", "export", "--model", provider, "--data", str(public), "--anchors", str(anchors),
              "--out", str(root / "pub"), "--accelerator", "cpu"])
        main(["head", "fit", "--model", provider, "--task", str(task), "--out", str(root / "heads" / "topics"),
              "--head.epochs", "10", "--publish_ood", "true", "--accelerator", "cpu"])
        mp.setenv("XSILO_HOME", str(root / "client-home"))
        fixed_seal_randomness(mp)
        for name, flags in runs.items():
            fixed_fit_randomness(mp)
            app = create_app(heads=[root / "heads" / "topics"], public=root / "pub", publish_val_logits=True,
                             store="memory://")
            app.add_middleware(Recorder, log=logs.setdefault(name, []))
            with ServerThread(app, max_lifetime_s=300) as srv:
                main(["align", "--server", srv.url, "--model", client, "--out", str(root / f"map-{name}"),
                      "--head", "topics", "--fit.lambdas", LAMBDA_FLAG, "--accelerator", "cpu", *flags])
    return {"root": root, "client": client, "logs": logs, "mine": mine, "anchors": anchors}


def metrics(anchored, name: str) -> dict:
    return json.loads((anchored["root"] / f"map-{name}" / "config.json").read_text())["metrics"]["private_fit"]


def test_the_export_holds_the_anchors_outside_the_split(anchored):
    pub = load_public_states(anchored["root"] / "pub")
    assert pub.anchors is not None and pub.anchors.texts == ANCHOR_TEXTS
    assert pub.anchors.states.shape == (len(ANCHOR_TEXTS), pub.hidden_size) and pub.rows == 120
    assert not set(ANCHOR_TEXTS) & set(pub.texts) and sum(pub.part_rows) == 120
    assert pub.info()["anchors"] == {"rows": 24, "fingerprint": pub.anchors.fingerprint}


def test_the_provider_never_learns_the_anchor_weight(anchored):
    """Two clients that weigh the anchors differently send the provider the same plaintext bytes."""
    logs = anchored["logs"]
    # the same requests; every byte of the public set's and the fit's the same (route, query, body size, sha256)
    assert [r[:3] for r in logs["default"]] == [r[:3] for r in logs["heavier"]]
    fit = [r for r in logs["default"] if r[1].startswith(("/v1/fit", "/v1/public-set"))]
    assert fit == [r for r in logs["heavier"] if r[1].startswith(("/v1/fit", "/v1/public-set"))]
    # only the head probe's CKKS queries differ: their rows follow the anchored map's path, encrypted (under SEAL's
    # compression even a ciphertext's size varies with what it holds, as with any two queries)
    differ = {r[1] for r, s in zip(logs["default"], logs["heavier"]) if r != s}
    assert differ == {"/v1/sessions/{id}/infer"}
    routes = [route for _, route, *_ in logs["default"]]
    assert "/v1/public-set/anchors" in routes and "/v1/fit/sessions/{id}/parts/2/chunks/0" in routes
    a, b = (metrics(anchored, name) for name in ("default", "heavier"))
    assert a["anchors"] == {"rows": 24, "weight": 0.3} and b["anchors"] == {"rows": 24, "weight": 0.6}
    assert a["rows"] == {"train": 105, "val": 15, "anchor": 24}  # rows sent, not the weighted counts
    assert (a["adaptation"]["anchor_rows"], b["adaptation"]["anchor_weight"]) == (24, 0.6)
    w_a, w_b = (AffineMap.from_pretrained(anchored["root"] / f"map-{n}").weight for n in ("default", "heavier"))
    assert float((w_a - w_b).abs().max()) > 1e-3 * float(w_a.abs().max())  # the weight did change the map
    assert metrics(anchored, "plain")["anchors"] == {"rows": 24, "weight": 0.3}  # anchors without --private too


def test_the_two_party_anchored_map_equals_the_labs(anchored):
    """The lab with both parties' states: λ through the head on the anchored statistics, then `adapt` with the
    anchors as pairs, gives the two parties' map to the README's 1e-4 of its largest weight."""
    from datamodules.cache import StateCache
    from datamodules.extraction import ExtractionConfig, resolve
    from lightning_modules.parties.private_fit import public_texts_file

    root, client = anchored["root"], anchored["client"]
    pub = load_public_states(root / "pub")
    with pytest.MonkeyPatch.context() as mp:  # the client's own caches, as `xsilo align` filled them
        mp.setenv("XSILO_HOME", str(root / "client-home"))

        def states(texts: list[str], fingerprint: str) -> np.ndarray:
            job = resolve(ExtractionConfig(model=client, data=str(public_texts_file(texts, fingerprint)),
                                           label_column=None))
            return StateCache(job.directory).rows(np.arange(len(texts))).astype(np.float64)

        x = states(pub.texts, pub.fingerprint)
        x_anchor = states(pub.anchors.texts, pub.anchors.fingerprint)
        job = resolve(ExtractionConfig(model=client, data=str(anchored["mine"]), label_column=None))
        x_private = StateCache(job.directory).rows(np.arange(len(job.texts))).astype(np.float64)
    train_idx, val_idx = public_split(pub.rows, float(pub.manifest["val_fraction"]), int(pub.manifest["seed"]))
    y_train, y_val = (p.astype(np.float64) for p in pub.parts)
    pairs = (torch.from_numpy(x_anchor), torch.from_numpy(pub.anchors.states.astype(np.float64)))
    head = load_export(root / "heads" / "topics", "head")
    head_map = AffineMap(torch.from_numpy(head.weight.astype(np.float64)),
                         torch.from_numpy(head.bias.astype(np.float64)))
    fit, settings = FitSettings(lambdas=LAMBDAS), AdaptationSettings()
    train = stats_of(x[train_idx], y_train)
    _, lam, _ = solve(with_anchors(train, pairs, settings.anchor_weight), stats_of(x[val_idx], y_val),
                      fit.estimator, fit.lambdas, fit.center, fit.standardize, criterion="head", head=head_map,
                      head_val=stats_of(x[val_idx], y_val @ head.weight.T.astype(np.float64) + head.bias))
    ood = head.feature_ood
    task = TaskStatistics.from_arrays(ood.means, ood.precision, ood.priors)
    lab = adapt(train, torch.from_numpy(x_private), task, lam, fit, settings, anchors=pairs).map
    lab, _ = match_priors(lab, head_map, torch.from_numpy(x_private), task.priors)  # with the real head
    assert metrics(anchored, "default")["adaptation"]["lambda"] == lam
    two_party = AffineMap.from_pretrained(root / "map-default")
    w, w_lab = two_party.weight.double(), lab.weight.double()
    assert float((w - w_lab).abs().max()) <= 1e-4 * float(w_lab.abs().max())
    xp = torch.from_numpy(x_private)  # prior matching: the same logits, the intercept to the probe's noise
    logits, logits_lab = head_map(two_party.to(torch.float64)(xp)), head_map(lab(xp))
    assert float((logits - logits_lab).abs().max()) <= 1e-4 * float(logits_lab.abs().max())
    b, b_lab = two_party.bias.double(), lab.bias.double()
    assert float((b - b_lab).abs().max()) <= 1e-3 * max(float(b_lab.abs().max()), 1.0)
