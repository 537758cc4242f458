"""Synthetic sets: what a reply's lines keep, bad settings named, written once and atomically, found afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.synthetic import (SyntheticTextError, SyntheticTextSettings, kept_lines, load_settings, synthesize,
                                   synthetic_path)


def tiny(tiny_models, **overrides) -> SyntheticTextSettings:
    base = dict(prompts=("write about {topic}",), rows=5, model=str(tiny_models["llama"]), min_chars=1,
                max_new_tokens=6, batch_size=4, max_batches=20)
    return SyntheticTextSettings(**{**base, **overrides})


def test_a_reply_keeps_its_list_items_without_marks_quotes_or_lines_outside_the_bounds():
    settings = SyntheticTextSettings(prompts=("{topic}",), suffix="?", min_chars=10, max_chars=40)
    reply = ('Here are ten questions:\n1. What is the capital of Peru?\n2) "Who wrote Hamlet?"\n- Why?\n'
             "* How far away is the Moon from the Earth, in kilometres?\nQ: When did the war end?\n"
             "Q7. Who won in 1966?")
    assert kept_lines(reply, settings) == ["What is the capital of Peru?", "Who wrote Hamlet?",
                                           "When did the war end?", "Who won in 1966?"]


@pytest.mark.parametrize("bad, named", [
    ({"prompts": ("write questions",)}, "{topic}"), ({"prompts": ()}, "prompts"), ({"topics": ("",)}, "topics"),
    ({"rows": 0}, "rows"), ({"min_chars": 50, "max_chars": 10}, "min_chars"), ({"top_p": 0.0}, "top_p"),
    ({"max_batches": 0}, "max_batches"), ({"prompts": ("about {topic} for {reader}",)}, "no other"),
    ({"rows": "ten"}, "synthetic.rows must be a whole number"), ({"temperature": True}, "temperature must be a number"),
    ({"topics": ("maps", 3)}, "topics must be a list of texts")])
def test_bad_settings_are_refused_by_name_before_any_model_loads(bad, named):
    settings = SyntheticTextSettings(**{"prompts": ("about {topic}",), **bad})
    with pytest.raises(SyntheticTextError, match=named.replace("{", r"\{").replace("}", r"\}")):
        synthesize(settings)


def test_a_set_is_written_once_with_distinct_texts_then_found_without_loading_the_model(tiny_models, monkeypatch):
    settings = tiny(tiny_models)
    path = synthesize(settings)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(texts) == settings.rows == len(set(texts)) and all(texts)
    assert not list(path.parent.glob(".tmp-*"))  # the atomic writer left nothing behind

    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("a written set must not load the model again"))
    assert synthesize(settings) == path
    assert synthetic_path(tiny(tiny_models, rows=4)) != path  # every setting is in the key


def test_a_writer_that_keeps_too_few_texts_fails_by_name_and_writes_nothing(tiny_models):
    settings = tiny(tiny_models, suffix="never-ends-this-way", max_batches=2)
    with pytest.raises(SyntheticTextError, match="0 usable texts of the 5 asked in 2 batches; loosen synthetic.suffix"):
        synthesize(settings)
    assert not synthetic_path(settings).parent.exists() or not any(synthetic_path(settings).parent.iterdir())


def test_a_settings_file_is_read_from_its_synthetic_section_and_refused_by_name_when_malformed(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("synthetic:\n  rows: 12\n  suffix: '?'\n  prompts: ['Ask about {topic}.']\n  topics: [maps]\n")
    assert load_settings(good) == SyntheticTextSettings(prompts=("Ask about {topic}.",), topics=("maps",), rows=12,
                                                        suffix="?")
    for body, named in (("rows: 12\n", "synthetic:"),
                        ("synthetic:\n  prompts: ['x {topic}']\n  colour: red\n", "colour"),
                        ("synthetic:\n  prompts: [no field]\n", "{topic}"), (": : :\n", "cannot read"),
                        ("synthetic:\n  prompts: 'one {topic}'\n", "prompts must be a list of texts"),
                        ("synthetic:\n  prompts: ['x {topic}']\n  rows: many\n", "rows must be a whole number")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(body)
        with pytest.raises(SyntheticTextError, match=named.replace("{", r"\{").replace("}", r"\}")):
            load_settings(bad)


def test_the_command_prints_the_sets_path_and_a_second_run_finds_it(tiny_models, capsys):
    from lightning_modules.cli import main

    args = ["public-set", "synthesize", "--synthetic.prompts", '["write about {topic}"]', "--synthetic.rows", "3",
            "--synthetic.model", str(tiny_models["llama"]), "--synthetic.min_chars", "1",
            "--synthetic.max_new_tokens", "6", "--synthetic.batch_size", "4"]
    main(args)
    first = capsys.readouterr()
    path = first.out.strip().splitlines()[-1]
    assert path.endswith(".jsonl") and len(open(path).read().splitlines()) == 3 and "3 synthetic texts" in first.err
    main(args)
    assert capsys.readouterr().out.strip().splitlines()[-1] == path


@pytest.mark.integration
@pytest.mark.slow
def test_the_packaged_writer_follows_the_trec_config(prepared):
    from dataclasses import replace

    prepared("smollm2")
    config = Path(__file__).resolve().parents[2] / "configs" / "synthetic" / "trec.yaml"
    settings = replace(load_settings(config), rows=8, batch_size=4)
    texts = [json.loads(line)["text"] for line in synthesize(settings, threads=2).read_text().splitlines()]
    assert len(texts) == 8 == len(set(texts))
    assert all(t.endswith("?") and 10 <= len(t) <= 120 for t in texts)
