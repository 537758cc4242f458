"""The exact-token-match rate (the paper's predictor of generation success) on hand-built tokenizations."""

from __future__ import annotations

import random

import pytest

from datamodules.tokens import TokenizerCompatibility, tokenize_text, tokenized_from_offsets, tokenizer_compatibility

from tests.tiny import WORDS, make_tokenizer


def compare(source, target) -> TokenizerCompatibility:
    report = TokenizerCompatibility()
    report.add(source, target)
    return report


def offsets_text(offsets, special=None, max_length: int = 64):
    special = special or [0] * len(offsets)
    return tokenized_from_offsets(list(range(len(offsets))), offsets, special, max_length)


def test_identical_tokenizers_match_every_token():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 10))) for _ in range(30)]
    report = tokenizer_compatibility(make_tokenizer(), make_tokenizer(), texts, 64)
    assert report.matched_boundaries == report.source_boundaries > 30
    assert report.exact_token_match == report.source_exact_match == report.target_exact_match == 1.0
    assert report.as_dict()["exact_token_match"] == 1.0


def test_disjoint_boundaries_and_same_ends_over_different_tokens_match_nothing():
    # "abcd" as ab|cd and as a|bc|d read to 2 tokens: no end offset in common
    disjoint = compare(offsets_text([(0, 2), (2, 4)]), offsets_text([(0, 1), (1, 3), (3, 4)], max_length=2))
    assert disjoint.matched_boundaries == 0 and disjoint.exact_token_match == 0.0
    # "the cat" as words and as characters: every word end is shared, but no token is the same
    words, chars = offsets_text([(0, 3), (3, 7)]), offsets_text([(i, i + 1) for i in range(7)])
    report = compare(words, chars)
    assert report.source_boundary_match == 1.0 and report.exact_token_match == 0.0


def test_planted_partial_match_equals_the_hand_count():
    # "ab cd ef": source BOS|ab| cd| ef, target ab| |cd|ef reporting " ef" without its space (6, 8).
    # Shared ends 2, 5, 8; identical tokens "ab" and " ef" (the span runs from the previous end), not " cd".
    source = offsets_text([(0, 0), (0, 2), (2, 5), (5, 8)], [1, 0, 0, 0])
    target = offsets_text([(0, 2), (2, 3), (3, 5), (6, 8)])
    report = compare(source, target)
    assert (report.matched_boundaries, report.exact_tokens) == (3, 2)
    assert report.exact_token_match == pytest.approx(2 / 3)
    assert report.source_exact_match == pytest.approx(2 / 3) and report.target_exact_match == pytest.approx(2 / 4)
    # "ab€": the source spells € as two byte tokens ending at 3, the target as one: only "ab" is identical
    split_char = compare(offsets_text([(0, 2), (2, 3), (2, 3)]), offsets_text([(0, 2), (2, 3)]))
    assert (split_char.matched_boundaries, split_char.exact_tokens) == (2, 1)
    # truncation drops the tokens past max_length on either side
    cut = compare(offsets_text([(0, 0), (0, 2), (2, 5), (5, 8)], [1, 0, 0, 0], max_length=3), target)
    assert (cut.matched_boundaries, cut.exact_tokens) == (2, 1)


def test_a_tokenizers_spans_run_from_the_previous_end_whatever_its_space_convention():
    # the word-level tokenizer reports "cat" as (4, 7), without its space; its span is (3, 7) all the same
    assert tokenize_text(make_tokenizer(), "the cat sat", 64).spans == {3: 0, 7: 3, 11: 7}
