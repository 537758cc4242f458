"""Cross-model generation on tiny models: token pairing, the streamed fit, the generation loop, metrics.

The source is the target with an orthogonal rotation after its final norm, so source state =
Q · target state: the fitted map must be Qᵀ and mapped generation must equal the target's own.
"""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import pytest
import torch

from datamodules.registry import AssetError
from datamodules.tokens import (
    CausalLM,
    load_causal_lm,
    pair_positions,
    split_texts,
    text_boundaries,
    token_bytes,
    token_scheme,
    tokenize_text,
    tokenizer_compatibility,
)
from lightning_modules.cli import main
from serve.formats.folders import ExportError
from lightning_modules.generation.maps import fit_generation_map, load_generation_map, save_generation_map
from lightning_modules.generation.report import compare_generation, paper_prediction
from lightning_modules.generation.run import GenerationEvalConfig, evaluate_generation, public_texts
from lightning_modules.generation.sampling import GenerationError, Sampling, generate, stream_generate
from lightning_modules.fitting.paired_stats import paired_stats, reversed_stats
from lightning_modules.fitting.affine_map import AffineMap
from lightning_modules.settings import PublicSetSettings

from tests.tiny import WORDS, build_tiny_model, make_tokenizer, write_tiny_csv

D = 32


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 12))) for _ in range(n)]


def tiny_llama(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)
    return LlamaForCausalLM(config).eval()


class RotatedNorm(torch.nn.Module):
    """The final norm followed by an orthogonal rotation: h ↦ Q h."""

    def __init__(self, norm: torch.nn.Module, q: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("q", q)

    def forward(self, hidden):
        return self.norm(hidden) @ self.q.T


def bpe_tokenizer(scheme: str, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if scheme == "byte_level":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "<eos>"])
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def rotation() -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    return q.float()


@pytest.fixture(scope="module")
def pair(rotation) -> tuple[CausalLM, CausalLM]:
    tokenizer = make_tokenizer()
    target = CausalLM(tiny_llama(len(tokenizer), seed=1), tokenizer, "tiny-target", "id-target")
    rotated = copy.deepcopy(target.model)
    rotated.model.norm = RotatedNorm(rotated.model.norm, rotation)
    return CausalLM(rotated, tokenizer, "tiny-rotated", "id-rotated"), target


@pytest.fixture(scope="module")
def fitted(pair):
    source, target = pair
    texts = sentences(80)
    splits = split_texts(len(texts), 0.2, 0.0, seed=0)
    stats = paired_stats(source, target, texts, "sentences", 32, None, splits, 0.2, 0.0, 0, use_cache=False)
    return stats, fit_generation_map(stats, "ridge")


# --- pairing ---------------------------------------------------------------------------------

def test_boundaries_skip_special_empty_and_partial_character_tokens():
    # BOS (0, 0); a byte-level emoji split in two tokens, both ending at 7; then " café"
    offsets = [(0, 0), (0, 5), (5, 7), (6, 7), (7, 12)]
    assert text_boundaries(offsets, [1, 0, 0, 0, 0]) == {5: 1, 7: 3, 12: 4}
    # offsets with and without the leading space pair at the same end offsets
    with_space, without = {5: 0, 11: 1}, text_boundaries([(0, 5), (6, 11)])
    assert pair_positions(with_space, without) == ([0, 1], [0, 1])


def test_offset_pairing_between_word_and_character_tokenizers():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(WORDS)) | {" "})
    vocab = {c: i for i, c in enumerate(["[PAD]", "[BOS]", *chars])}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[PAD]"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    raw.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    char_tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", bos_token="[BOS]")
    text = "the cat sat"
    words, chars_ = tokenize_text(make_tokenizer(), text, 64), tokenize_text(char_tok, text, 64)
    assert chars_.ids[0] == 1 and len(chars_.ids) == 12  # BOS + 11 characters
    assert sorted(words.boundaries) == [3, 7, 11]
    assert pair_positions(words.boundaries, chars_.boundaries) == ([0, 1, 2], [3, 7, 11])
    # truncation drops boundaries past max_length on either side
    assert pair_positions(words.boundaries, tokenize_text(char_tok, text, 8).boundaries) == ([0, 1], [3, 7])
    report = tokenizer_compatibility(make_tokenizer(), char_tok, [text, "a dog"], 64)
    assert report.source_boundary_match == 1.0 and report.matched_boundaries == 5
    assert report.target_boundaries == 11 + 5  # every character, spaces included


def test_vocabulary_overlap_normalises_space_markers():
    assert token_bytes("Ġworld", "byte_level") == token_bytes("▁world", "metaspace") == b" world"
    assert token_bytes("Ã©", "byte_level") == "é".encode()
    assert token_bytes("<0xE2>", "metaspace") == b"\xe2"
    texts = sentences(200, seed=3)
    byte_level, metaspace = bpe_tokenizer("byte_level", texts), bpe_tokenizer("metaspace", texts)
    assert (token_scheme(byte_level), token_scheme(metaspace)) == ("byte_level", "metaspace")
    from tokenizers import decoders  # Gemma's style: ▁ replaced by a space inside a decoder sequence

    metaspace.backend_tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                             decoders.Fuse()])
    assert token_scheme(metaspace) == "metaspace"
    report = tokenizer_compatibility(byte_level, metaspace, texts[:20], 64)
    assert report.shared_vocab > 20 and 0 < report.vocab_jaccard < 1
    assert report.target_boundary_match > 0.9  # the coarser (metaspace) ends are word ends, which match


# --- the fit -----------------------------------------------------------------------------------

def test_fit_recovers_the_rotation(fitted, rotation):
    stats, fit = fitted
    assert stats.train.count > 300 and stats.val.count > 50
    assert torch.allclose(fit.amap.weight, rotation.T, atol=2e-3)
    assert fit.amap.bias.abs().max() < 2e-3
    procrustes = fit_generation_map(stats, "procrustes").amap
    assert torch.allclose(procrustes.weight, rotation.T, atol=1e-4)
    # the null map, fitted on shuffled pairs, is nowhere near the rotation
    assert (fit.null.weight - rotation.T).abs().max() > 0.3


def test_paired_stats_are_cached_once_for_both_directions(pair, tmp_path):
    source, target = pair
    texts = sentences(30, seed=5)
    splits = split_texts(len(texts), 0.2, 0.1, seed=0)
    args = (texts, "sentences", 16, None, splits, 0.2, 0.1, 0)
    first = paired_stats(source, target, *args, cache_root=tmp_path)
    assert not first.hit and len(list(tmp_path.iterdir())) == 1
    again = paired_stats(source, target, *args, cache_root=tmp_path)
    back = paired_stats(target, source, *args, cache_root=tmp_path)
    assert again.hit and back.hit and len(list(tmp_path.iterdir())) == 1
    for a, b in zip(again.train.tensors(), first.train.tensors()):
        assert torch.equal(a, b)
    for a, b in zip(back.train.tensors(), reversed_stats(first.train).tensors()):
        assert torch.equal(a, b)
    other = paired_stats(source, target, texts, "sentences", 8, None, splits, 0.2, 0.1, 0, cache_root=tmp_path)
    assert not other.hit and len(list(tmp_path.iterdir())) == 2  # max_length is part of the key


def test_map_round_trip_and_mismatch_errors(pair, fitted, tmp_path):
    source, target = pair
    amap = fitted[1].amap
    save_generation_map(tmp_path / "run" / "map", amap, source, target, max_length=32)
    loaded = load_generation_map(tmp_path / "run", source, target)  # the parent folder works too
    assert torch.allclose(loaded.weight, amap.weight) and torch.allclose(loaded.bias, amap.bias)
    with pytest.raises(ExportError, match="fitted for source"):
        load_generation_map(tmp_path / "run", target, source)
    small = CausalLM(tiny_llama(len(target.tokenizer), seed=3), target.tokenizer, "other")
    small.model.lm_head = torch.nn.Linear(D, len(target.tokenizer))
    wrong = AffineMap(torch.zeros(D, 16), torch.zeros(D))
    with pytest.raises(ExportError, match="16-d states to 32-d"):
        generate(target, "the cat", source=small, amap=wrong)


# --- generation ----------------------------------------------------------------------------------

def suppressed(lm: CausalLM) -> list[int]:
    return [i for i, ok in enumerate(lm.text_token_mask.tolist()) if not ok]


@pytest.mark.parametrize("prompt", ["the cat sat on", "good movie"])
def test_mapped_generation_equals_the_target_greedy(pair, fitted, prompt):
    source, target = pair
    native = generate(target, prompt, max_new_tokens=12)
    mapped = generate(target, prompt, source=source, amap=fitted[1].amap, max_new_tokens=12)
    assert mapped.token_ids == native.token_ids and mapped.text == native.text
    assert len(native.token_ids) == 12 and native.stop_reason == "max_new_tokens"
    # the target alone is Hugging Face's greedy decoding with the same tokens suppressed
    ids = torch.tensor([target.encode(prompt)])
    hf = target.model.generate(ids, max_new_tokens=12, do_sample=False, suppress_tokens=suppressed(target),
                               pad_token_id=0)
    assert hf[0, ids.shape[1]:].tolist() == native.token_ids


def test_kv_cache_reuse_gives_the_same_output(pair, fitted):
    source, target = pair
    runs = {reuse: generate(target, "the film was", source=source, amap=fitted[1].amap, max_new_tokens=10,
                            reuse_cache=reuse) for reuse in (True, False)}
    assert runs[True].text == runs[False].text
    assert runs[True].cache_reused == 9 and runs[True].recomputed == 0
    assert runs[False].cache_reused == 0 and runs[False].recomputed == 9


def test_kv_cache_reuse_across_different_tokenizers():
    texts = sentences(200, seed=4)
    src_tok = bpe_tokenizer("byte_level", texts)
    source = CausalLM(tiny_llama(len(src_tok), seed=5), src_tok, "bpe-source")
    target = CausalLM(tiny_llama(len(make_tokenizer()), seed=6), make_tokenizer(), "word-target")
    amap = AffineMap(torch.randn(D, D, generator=torch.Generator().manual_seed(0)) * 3, torch.zeros(D))
    outs = [generate(target, "the cat", source=source, amap=amap, max_new_tokens=8, reuse_cache=r)
            for r in (True, False)]
    assert outs[0].text == outs[1].text and len(outs[0].token_ids) == 8
    assert outs[0].cache_reused + outs[0].recomputed == 7


def test_stop_strings_max_new_tokens_and_streaming(pair):
    _, target = pair
    full = generate(target, "the cat", max_new_tokens=10)
    pieces = list(stream_generate(target, "the cat", max_new_tokens=10))
    assert "".join(pieces) == full.text and len(pieces) >= 2
    assert len(generate(target, "the cat", max_new_tokens=3).token_ids) == 3
    # a stop string that straddles two pieces is never streamed, and the text ends before it
    stop = pieces[0][-2:] + pieces[1][:2]
    cut = full.text.index(stop)
    streamed: list[str] = []
    result = generate(target, "the cat", max_new_tokens=10, stop=["never there", stop], on_text=streamed.append)
    assert result.stop_reason == "stop_string" and result.text == full.text[:cut]
    assert "".join(streamed) == result.text and len(result.token_ids) == 2


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    _, target = pair
    hot = Sampling(temperature=5.0, seed=3)
    a, b = (generate(target, "the cat", max_new_tokens=8, sampling=hot).token_ids for _ in range(2))
    assert a == b
    assert generate(target, "the cat", max_new_tokens=8, sampling=Sampling(5.0, seed=4)).token_ids != a
    assert (generate(target, "the cat", max_new_tokens=8, sampling=Sampling(5.0, top_k=1)).token_ids
            == generate(target, "the cat", max_new_tokens=8).token_ids)
    assert len(generate(target, "the cat", max_new_tokens=8, sampling=Sampling(1.0, top_p=0.5)).token_ids) == 8


def test_bad_input_gets_a_clear_error(pair, tmp_path):
    _, target = pair
    with pytest.raises(GenerationError, match="prompt is empty"):
        generate(target, "  ")
    with pytest.raises(GenerationError, match="max_new_tokens must be >= 1"):
        generate(target, "the cat", max_new_tokens=0)
    with pytest.raises(GenerationError, match="temperature"):
        generate(target, "the cat", sampling=Sampling(temperature=-1))
    with pytest.raises(AssetError, match="not a causal LM"):
        load_causal_lm(str(build_tiny_model("bert", tmp_path / "bert")))
    with pytest.raises(AssetError, match="does not exist"):
        load_causal_lm("./no-such-model")
    loaded = load_causal_lm(str(build_tiny_model("llama", tmp_path / "llama")))
    assert loaded.identity and loaded.hidden_size == D


# --- evaluation ------------------------------------------------------------------------------------

def test_evaluate_generation_reports_identity_mapped_and_null(pair, tmp_path):
    source, target = pair
    public = write_tiny_csv(tmp_path / "public.csv", n=60, seed=2)
    cfg = GenerationEvalConfig(source="tiny-rotated", target="tiny-target", public=PublicSetSettings(str(public), limit=None),
                               max_length=32, val_fraction=0.2, test_fraction=0.2, n_prompts=2, max_new_tokens=5)
    results = evaluate_generation(cfg, out=tmp_path / "run", source=source, target=target)
    rows = results["rows"]
    assert rows["identity"]["top1"] == 1.0 and rows["identity"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows["mapped"]["top1"] > 0.95 and rows["mapped"]["kl"] < 1e-3
    assert rows["null"]["kl"] > 10 * rows["mapped"]["kl"]
    assert rows["mapped"]["positions"] == results["positions"]["test"] > 0
    assert rows["mapped"]["perplexity"] == pytest.approx(rows["identity"]["perplexity"], rel=1e-4)
    assert results["compatibility"]["source_boundary_match"] == 1.0
    assert [s["mapped"] for s in results["samples"]] == [s["identity"] for s in results["samples"]]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["rows"]["mapped"]["top1"] == rows["mapped"]["top1"]
    assert "null map (shuffled pairs)" in (tmp_path / "run" / "metrics.md").read_text()
    assert np.allclose(load_generation_map(tmp_path / "run", source, target).weight.numpy(),
                       torch.linalg.inv(source.model.model.norm.q).numpy(), atol=5e-3)
    # one tokenizer on both sides: every aligned token is identical; a tiny source is under 4B, yet it works
    assert results["compatibility"]["exact_token_match"] == 1.0
    assert results["models"]["source"]["parameters"] == sum(p.numel() for p in source.model.parameters())
    verdict = results["paper_prediction"]
    assert (verdict["predicted"], verdict["observed"], verdict["as_predicted"]) == ("fail", "works", False)
    report = (tmp_path / "run" / "metrics.md").read_text()
    assert "exact token match 100.0%" in report and "against the paper's prediction" in report

    # a second fit on more texts, compared with the first as its baseline
    bigger = write_tiny_csv(tmp_path / "bigger.csv", n=90, seed=3)
    cfg2 = GenerationEvalConfig(source="tiny-rotated", target="tiny-target", max_length=32, val_fraction=0.2,
                                test_fraction=0.2, n_prompts=1, max_new_tokens=3, baseline=str(tmp_path / "run"),
                                public=PublicSetSettings(str(bigger), limit=None))
    second = evaluate_generation(cfg2, out=tmp_path / "run2", source=source, target=target)
    comparison = second["comparison"]
    assert comparison["train_texts"] == [results["texts"]["train"], second["texts"]["train"]]
    assert comparison["top1_rise"] == pytest.approx(second["rows"]["mapped"]["top1"] - rows["mapped"]["top1"])
    assert "More public texts: From 36 to 54 training texts" in (tmp_path / "run2" / "metrics.md").read_text()
    with pytest.raises(GenerationError, match="cannot read generation metrics"):
        evaluate_generation(GenerationEvalConfig(source="a", target="b", baseline=str(tmp_path / "none.json")))


def generation_figures(pair: str = "smollm2 -> gemma3", parameters: int = 134_515_008, exact: float = 0.91,
                       top1: float = 0.12, null: float = 0.03, perplexity: float = 900.0) -> dict:
    """The part of evaluate_generation's metrics the verdict reads (the target's own greedy text: perplexity 5)."""
    return {"pair": pair, "models": {"source": {"name": pair.split()[0], "parameters": parameters}},
            "compatibility": {"exact_token_match": exact}, "texts": {"train": 1600},
            "positions": {"train": 17_000},
            "rows": {"identity": {"top1": 1.0, "perplexity": 5.0},
                     "mapped": {"top1": top1, "top5": 0.3, "kl": 4.0, "perplexity": perplexity},
                     "null": {"top1": null, "top5": 0.1, "kl": 6.0, "perplexity": 7000.0}}}


def test_the_verdict_follows_the_figures():
    small = paper_prediction(generation_figures())  # 135 M source, good tokenizers, low agreement
    assert (small["predicted"], small["observed"], small["as_predicted"]) == ("fail", "fails", True)
    assert small["reasons"] == ["the source has 134.5 M parameters, under 4 B"]
    assert small["lift_over_null"] == pytest.approx(0.09)
    assert "the paper predicts it fails" in small["text"] and "12.0%" in small["text"]
    assert "180.0x as perplexing as its own (900.0 vs 5.0)" in small["text"]
    assert small["text"].endswith("so it fails, as the paper predicts.")
    # high teacher-forced agreement with degenerate free-running text still fails
    degenerate = paper_prediction(generation_figures(top1=0.7))
    assert (degenerate["observed"], degenerate["as_predicted"]) == ("fails", True)
    mismatched = paper_prediction(generation_figures(parameters=7_000_000_000, exact=0.5, top1=0.6, perplexity=8.0))
    assert mismatched["reasons"] == ["exact token match 0.50, under 0.67"]
    assert (mismatched["observed"], mismatched["as_predicted"]) == ("works", False)
    assert mismatched["text"].endswith("so it works, against the paper's prediction.")
    large = paper_prediction(generation_figures(parameters=7_000_000_000, exact=0.8, top1=0.7, perplexity=6.0))
    assert (large["predicted"], large["observed"], large["as_predicted"]) == ("work", "works", True)
    assert "can work" in large["text"]
    assert not paper_prediction(generation_figures(parameters=7_000_000_000, exact=0.8, top1=0.2))["as_predicted"]


def test_compare_generation_reports_the_rise_of_the_same_pair():
    before, after = generation_figures(top1=0.10), generation_figures(top1=0.14)
    after["texts"]["train"], after["positions"]["train"] = 3200, 34_000
    comparison = compare_generation(before, after)
    assert comparison["top1_rise"] == pytest.approx(0.04) and comparison["train_positions"] == [17_000, 34_000]
    assert "10.0% -> 14.0% (+4.0%" in comparison["text"]
    with pytest.raises(GenerationError, match="same source -> target pair"):
        compare_generation(generation_figures(pair="gemma3 -> smollm2"), after)


def test_public_texts_mix_datasets_in_the_public_set_syntax(tmp_path):
    a, b = write_tiny_csv(tmp_path / "a.csv", n=20, seed=1), write_tiny_csv(tmp_path / "b.csv", n=20, seed=2)
    mixed = public_texts(f"{a}:5,{b}:3", limit=8)  # weights 5:3 of 8 rows: the old a:5+b:3
    assert mixed == public_texts(str(a), limit=5) + public_texts(str(b), limit=3)
    assert len(public_texts(str(a), limit=None)) == 20
    with pytest.raises(AssetError, match=r"old 'a:N\+b:M' form.*with 8 rows in all"):
        public_texts(f"{a}:5+{b}:3", limit=8)
    with pytest.raises(AssetError, match=r"--public\.limit N"):
        public_texts(f"{a}:5,{b}:3", limit=None)


def test_cli_generate_streams_the_mapped_text(tmp_path, capsys):
    path = build_tiny_model("llama", tmp_path / "llama")
    lm = load_causal_lm(str(path))
    save_generation_map(tmp_path / "map", AffineMap(torch.eye(D), torch.zeros(D)), lm, lm, max_length=32)
    expected = generate(lm, "the cat", max_new_tokens=6).text
    main(["generate", "--source", str(path), "--target", str(path), "--aligner", str(tmp_path / "map"),
          "--max_new_tokens", "6", "the cat"])
    assert capsys.readouterr().out == "the cat" + expected + "\n"
