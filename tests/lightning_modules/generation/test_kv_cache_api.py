"""Generation reuses the KV cache through transformers' current API: no deprecation warnings (issue 17)."""

from __future__ import annotations

import warnings

import torch

from datamodules.tokens import load_causal_lm
from lightning_modules.generation.sampling import Reader


def test_reading_with_the_kv_cache_warns_nothing_and_matches_a_full_pass(tiny_models):
    lm = load_causal_lm(str(tiny_models["llama"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning about `past_key_values` would fail here
        reader = Reader(lm, "the film was good")
        reader.read_token(5)
        reader.read_token(7)
    assert reader.reused == 2 and reader.recomputed == 0
    full, _ = lm.states(torch.tensor([reader.ids]), use_cache=False)
    torch.testing.assert_close(reader.state, full[0, -1], atol=1e-5, rtol=1e-4)
