"""The private fit's client-side math, without encryption: the reply's cross products plus the published
statistics rebuild exactly the plaintext fit's sufficient statistics, so the same map and the same λ."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pytest
import torch

from datamodules.states import random_split
from lightning_modules.parties.private_fit import PrivateFitError, fit_private, part_stats
from lightning_modules.settings import FitSettings
from lightning_modules.fitting.solvers import solve
from lightning_modules.fitting.stats import SufficientStats

D_A, D_B, N = 12, 9, 240
LAMBDAS = (1e-4, 1e-2, 1.0, 100.0)


@dataclass
class Reply:
    """The fields of `serve.fit_client.GramReply` that the client-side math reads."""

    cross: list[np.ndarray]
    client_shift: np.ndarray
    stats: dict[str, Any]
    plan: dict[str, Any] = field(default_factory=dict)
    bytes_sent: int = 1
    bytes_received: int = 2
    provider_ms: float = 3.0
    client_ms: float = 4.0


def states(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Paired states with offsets, unequal scales and noise (a dead target dim too): a plausible public set."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D_A)) * rng.uniform(0.1, 20, D_A) + rng.normal(0, 50, D_A)
    y = x @ rng.normal(size=(D_A, D_B)) / 5 + rng.normal(0, 3, (N, D_B)) + rng.normal(0, 30, D_B)
    y[:, 3] = 7.0
    return x.astype(np.float32), y.astype(np.float32)


def split(z: np.ndarray) -> list[np.ndarray]:
    return [z[idx] for idx in random_split(N, 0.25, 0)]


def plaintext_reply(x_parts: list[np.ndarray], y_parts: list[np.ndarray]) -> Reply:
    """What the provider's encrypted kernel returns, decrypted and unscaled, computed in plaintext."""
    a = x_parts[0].astype(np.float64).mean(0)
    mu_b = y_parts[0].astype(np.float64).mean(0)
    cross = [(x.astype(np.float64) - a).T @ (y.astype(np.float64) - mu_b) for x, y in zip(x_parts, y_parts)]
    parts = []
    for p, y in enumerate(y_parts):
        y64 = y.astype(np.float64)
        parts.append({"rows": len(y), "sum_y": y64.sum(0).tolist(),
                      "yty_diag": (y64 ** 2).sum(0).tolist() if p == 0 else None, "trace": float((y64 ** 2).sum())})
    return Reply(cross, a, {"mu_B": mu_b.tolist(), "s_B": y_parts[0].std(0).tolist(), "parts": parts})


def plaintext_stats(x: np.ndarray, y: np.ndarray) -> SufficientStats:
    return SufficientStats.zeros(D_A, D_B, full_yty=False).update(torch.from_numpy(x), torch.from_numpy(y))


@pytest.mark.parametrize("center, standardize", [(True, True), (True, False), (False, True), (False, False)])
def test_private_fit_equals_the_plaintext_fit(center, standardize):
    x, y = states()
    xs, ys = split(x), split(y)
    fit = FitSettings(lambdas=LAMBDAS, center=center, standardize=standardize)
    result = fit_private(xs, plaintext_reply(xs, ys), fit, source_spec={"model": "smollm2"},
                         public_set={"model": {"model": "gemma3", "hidden_size": D_B}, "fingerprint": "f" * 64,
                                     "name": "dialog", "rows": N, "val_fraction": 0.25, "seed": 0})
    want, want_lam, want_path = solve(plaintext_stats(xs[0], ys[0]), plaintext_stats(xs[1], ys[1]), "ridge",
                                      LAMBDAS, center, standardize)
    got = result.aligner.affine_map  # float32 parameters: equal to float32 rounding (float64: the next test)
    scale = float(want.weight.abs().max())
    torch.testing.assert_close(got.weight.double(), want.weight, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(got.bias.double(), want.bias, rtol=1e-6, atol=1e-5)
    assert float(result.aligner.chosen_lambda) == want_lam and want_lam in LAMBDAS
    assert result.aligner.lambda_path.keys() == want_path.keys()
    for lam, mse in want_path.items():
        assert result.aligner.lambda_path[lam] == pytest.approx(mse, rel=1e-10)
    assert result.aligner.target_spec == {"model": "gemma3", "hidden_size": D_B, "public_set_fingerprint": "f" * 64}
    assert result.aligner.source_spec == {"model": "smollm2"}
    assert result.metrics["rows"] == {"train": len(xs[0]), "val": len(xs[1])} and result.metrics["bytes_sent"] == 1
    assert result.metrics["val_r2"] > 0.5 and result.metrics["chosen_lambda"] == want_lam


def test_rebuilt_statistics_equal_the_streamed_ones_to_1e_10():
    """The map above is stored in float32; the statistics it is solved from agree in float64."""
    x, y = states(1)
    xs, ys = split(x), split(y)
    got = part_stats(xs, plaintext_reply(xs, ys))
    for p, stats in enumerate(got):
        want = plaintext_stats(xs[p], ys[p])
        for name in ("n", "sum_x", "sum_y", "xtx", "xty"):
            a, b = getattr(stats, name), getattr(want, name)
            assert float((a - b).abs().max()) <= 1e-10 * max(float(b.abs().max()), 1.0), name
        if p == 0:
            torch.testing.assert_close(stats.yty, want.yty, rtol=1e-10, atol=0)
        else:  # only the trace is published for val
            assert float(stats.yty.sum()) == pytest.approx(float(want.yty.sum()), rel=1e-12)
    # solving from the rebuilt statistics gives the same map as from the streamed ones, in float64
    fit = FitSettings(lambdas=LAMBDAS)
    a, lam_a, _ = solve(got[0], got[1], "ridge", LAMBDAS, fit.center, fit.standardize)
    b, lam_b, _ = solve(plaintext_stats(xs[0], ys[0]), plaintext_stats(xs[1], ys[1]), "ridge", LAMBDAS,
                        fit.center, fit.standardize)
    assert lam_a == lam_b
    assert float((a.weight - b.weight).abs().max()) <= 1e-10 * float(b.weight.abs().max())
    assert float((a.bias - b.bias).abs().max()) <= 1e-10 * float(b.bias.abs().max())


def test_other_estimators_ignore_lambda():
    x, y = states(2)
    xs, ys = split(x), split(y)
    result = fit_private(xs, plaintext_reply(xs, ys), FitSettings(estimator="lstsq"), source_spec={},
                         public_set={"model": {}, "fingerprint": "0" * 64})
    want, lam, _ = solve(plaintext_stats(xs[0], ys[0]), None, "lstsq", (), True, True)
    assert lam is None and np.isnan(float(result.aligner.chosen_lambda)) and result.metrics["chosen_lambda"] is None
    torch.testing.assert_close(result.aligner.affine_map.weight.double(), want.weight, rtol=1e-6, atol=1e-6)


def bad_cases():
    x, y = states(3)
    xs, ys = split(x), split(y)
    good = plaintext_reply(xs, ys)
    stats = good.stats
    yield "rows differ", xs, replace(good, stats={**stats, "parts": [{**stats["parts"][0], "rows": 10},
                                                                      stats["parts"][1]]}), "train part has 10 rows"
    yield "wrong d_A", [p[:, :5] for p in xs], good, "client_shift"
    yield "cross shape", xs, replace(good, cross=[c[:, :4] for c in good.cross]), "cross products has shape"
    yield "one part missing", xs[:1], good, "published 2 parts but the client has 1"
    yield "nan cross", xs, replace(good, cross=[good.cross[0] * np.nan, good.cross[1]]), "NaN/inf"
    yield "train lacks yty", xs, replace(good, stats={**stats, "parts": [{**stats["parts"][0], "yty_diag": None},
                                                                          stats["parts"][1]]}), "lacks yty_diag"
    yield "sum_y length", xs, replace(good, stats={**stats, "parts": [stats["parts"][0], {**stats["parts"][1],
                                                                       "sum_y": [1.0]}]}), "val sum_y has shape"
    yield "no parts", xs, replace(good, stats={"mu_B": stats["mu_B"]}), "must list 1 to 3 parts"
    yield "val dims", [xs[0], xs[1][:, :3]], good, "val states must be (rows, 12)"


@pytest.mark.parametrize("case", list(bad_cases()), ids=lambda c: c[0])
def test_bad_inputs_get_a_clear_error(case):
    _, parts, reply, message = case
    with pytest.raises(PrivateFitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit_private(parts, reply, FitSettings(lambdas=LAMBDAS), source_spec={}, public_set={"model": {}})


def test_the_texts_file_is_named_by_a_checked_fingerprint(isolated_home):
    from lightning_modules.parties.private_fit import public_texts_file

    path = public_texts_file(["a", "b\nc"], "ab" * 32)
    assert path.parent == isolated_home / "public" / "remote" and path.read_text().count("\n") == 2
    assert public_texts_file(["a", "b\nc"], "ab" * 32) == path
    with pytest.raises(PrivateFitError, match="not 64 hex digits"):
        public_texts_file(["a"], "../../etc/" + "a" * 54)
