"""The public-set builder: split exclusion (with duplicates and variants), dedup, the mix, the manifest; and
filling state caches from cached rows of the same texts."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.encoder import StateEncoder
from datamodules.extraction import ExtractionConfig, extract, resolve
from datamodules.dedupe import normalize_text
from datamodules.prefill import ExtractionBudgetError, prefill_states
from datamodules.public_set import (PublicSetError, build_public_set, mix_rows, parse_mix, parse_task, read_manifest,
                                    task_heldout)
from datamodules.recipes import in_domain_recipe, leave_task_out_recipe, registry_sources, task_specs
from datamodules.states import LabelledStatesDataModule
from datamodules.text import dataset_fingerprint, load_texts

from tests.tiny import WORDS


def sentences(n: int, seed: int, tag: str) -> list[str]:
    rng = random.Random(seed)
    return [f"{' '.join(rng.choice(WORDS) for _ in range(rng.randrange(3, 9)))} {tag}{i}" for i in range(n)]


def write_task(path, n: int = 90, seed: int = 0):
    texts = sentences(n, seed, "task")
    path.write_text("text,label\n" + "".join(f"\"{t}\",c{i % 3}\n" for i, t in enumerate(texts)))
    return path


def write_lines(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def heldout_texts(task, model, **split) -> set[str]:
    """Validation and test texts as the DataModule that evaluates the task splits them."""
    dm = LabelledStatesDataModule(model=str(model), data=str(task), **split)
    texts = dm.job.texts
    return {texts[i] for name in ("val", "test") for i in dm.split_index[name]}


def variants(text: str) -> list[str]:
    return [text, f"  {text.upper()} ", text.replace(" ", "\t  "), text.replace(" ", "\n")]


def built_texts(path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_no_heldout_text_of_a_task_ever_appears_even_as_a_variant(tmp_path, tiny_models):
    task = write_task(tmp_path / "task.csv")
    for split in ({}, {"val_fraction": 0.2, "test_fraction": 0.25, "seed": 3}):
        held = heldout_texts(task, tiny_models["llama"], **split)
        # Another source repeats every task text in four spellings; the task is also a source itself.
        others = write_lines(tmp_path / "others.jsonl",
                             [v for t in load_texts(str(task))["text"] for v in variants(t)] + sentences(50, 1, "o"))
        kwargs = dict(val_fraction=split.get("val_fraction", 0.15), test_fraction=split.get("test_fraction", 0.15),
                      split_seed=split.get("seed", 0))
        for sources in ([str(task), str(others)], [str(others)]):
            path = build_public_set(sources, exclude_tasks=[str(task)], out=str(tmp_path / "pub"), **kwargs)
            keys = {normalize_text(t) for t in built_texts(path)}
            assert not keys & {normalize_text(t) for t in held}
            train = {normalize_text(t) for t in load_texts(str(task))["text"]} - {normalize_text(t) for t in held}
            assert train <= keys  # the task's training texts stay (labels dropped)
            manifest = read_manifest(path)
            assert manifest["excluded"]["tasks"][0]["held_out_texts"] == len(held)


def test_a_labelled_source_excludes_its_own_heldout_texts_by_default(tmp_path, tiny_models):
    task = write_task(tmp_path / "task.csv")
    held = {normalize_text(t) for t in heldout_texts(task, tiny_models["llama"])}
    path = build_public_set([str(task)], out="own")
    assert path.parent.parent.name == "public" and path.name == "own.jsonl"
    keys = {normalize_text(t) for t in built_texts(path)}
    assert keys and not keys & held
    assert len(keys) == 90 - len(held)
    # A task evaluated on a row limit is split on that sample: "name@limit".
    held_60 = {normalize_text(t) for t in heldout_texts(task, tiny_models["llama"], limit=60)}
    keys = {normalize_text(t) for t in built_texts(build_public_set([str(task)], exclude_tasks=[f"{task}@60"],
                                                                    exclude_source_tasks=False, out="lim"))}
    assert not keys & held_60 and keys & held - held_60


def test_dedup_within_and_across_sources_and_excluded_datasets(tmp_path):
    base = sentences(40, 2, "d")
    a = write_lines(tmp_path / "a.jsonl", [v for t in base[:30] for v in variants(t)] + ["", "   "])
    b = write_lines(tmp_path / "b.jsonl", base[20:] + base[20:])
    ood = write_lines(tmp_path / "ood.jsonl", base[:5])
    path = build_public_set([str(a), str(b)], exclude_datasets=[str(ood)], out="dedup")
    texts = built_texts(path)
    keys = [normalize_text(t) for t in texts]
    assert len(keys) == len(set(keys)) == 35
    assert set(keys) == {normalize_text(t) for t in base[5:]}
    sources = {s["name"]: s for s in read_manifest(path)["sources"]}
    assert sources[str(a)]["empty"] == 2 and sources[str(a)]["excluded"] == 20
    assert sources[str(a)]["selected"] == 25 and sources[str(b)]["selected"] == 10
    assert sources[str(b)]["duplicates"] == 30  # 10 already in a, then all 20 repeated


def test_mix_proportions_size_and_shortfall(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", sentences(500, 3, "a"))
    b = write_lines(tmp_path / "b.jsonl", sentences(300, 4, "b"))
    c = write_lines(tmp_path / "c.jsonl", sentences(20, 5, "c"))
    source_of = lambda p: [json.loads(line)["source"] for line in p.read_text().splitlines()]  # noqa: E731
    path = build_public_set(mix=f"{a}:0.7,{b}:0.3", size=200, out="mix")
    assert sorted(source_of(path)).count(str(a)) == 140 and source_of(path).count(str(b)) == 60
    path = build_public_set(mix={str(a): 5, str(b): 3, str(c): 2}, size=101, out="mix3")
    counts = [source_of(path).count(str(s)) for s in (a, b, c)]
    assert sum(counts) == 101 and counts[2] == 20  # c has 20 rows only (wanted 20.2)
    path = build_public_set(mix={str(a): 0.5, str(c): 0.5}, size=100, out="short")
    assert [source_of(path).count(str(s)) for s in (a, c)] == [80, 20]  # c's shortfall goes to a
    assert read_manifest(path)["shortfall"] == {str(c): 30}
    with pytest.raises(PublicSetError, match="cannot meet"):
        build_public_set(mix={str(a): 0.5, str(c): 0.5}, size=100, strict=True, out="strict")
    # No size: the largest set that meets the mix exactly; no mix: everything.
    assert len(built_texts(build_public_set(mix={str(a): 0.5, str(c): 0.5}, out="max"))) == 40
    assert len(built_texts(build_public_set([str(a), str(b)], out="all"))) == 800
    # Nested: a smaller set with the same mix and seed is a subset of a larger one.
    small = set(built_texts(build_public_set(mix=f"{a}:0.7,{b}:0.3", size=50, out="s")))
    assert small <= set(built_texts(build_public_set(mix=f"{a}:0.7,{b}:0.3", size=200, out="l")))


def test_output_is_a_cached_dataset_with_a_manifest_and_is_idempotent(tmp_path, isolated_home):
    a = write_lines(tmp_path / "a.jsonl", sentences(60, 6, "a"))
    path = build_public_set([str(a)], size=30, seed=1)
    manifest = read_manifest(path)
    assert path.parent == isolated_home / "public" / manifest["name"] and manifest["rows"] == 30
    ds = load_texts(str(path))
    assert ds.column_names == ["text"] and dataset_fingerprint(ds) == manifest["fingerprint"]
    mtime = path.stat().st_mtime_ns
    assert build_public_set([str(a)], size=30, seed=1) == path and path.stat().st_mtime_ns == mtime
    assert set(built_texts(build_public_set([str(a)], size=30, seed=2))) != set(built_texts(path))
    assert not list(path.parent.glob(".tmp-*"))


def test_parsers():
    assert parse_mix("movie-dialog:0.5,bbc:0.3,vader-movies:0.2") == pytest.approx(
        {"movie-dialog": 0.5, "bbc": 0.3, "vader-movies": 0.2})
    assert parse_mix("a:2, b") == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    assert parse_task("vader-movies@3000") == ("vader-movies", 3000) and parse_task("bbc") == ("bbc", None)
    for bad in ("a:-1", "a:0", "a:1,a:2"):
        with pytest.raises(PublicSetError):
            parse_mix(bad)
    with pytest.raises(PublicSetError, match="no weight"):
        build_public_set(["x"], mix="y:1")


def test_one_mix_syntax_and_a_one_line_error_for_the_old_plus_form(tmp_path):
    assert mix_rows(parse_mix("movie-dialog:1200,bbc:200"), 1400) == {"movie-dialog": 1200, "bbc": 200}
    assert mix_rows(parse_mix("a,b,c"), 10) == {"a": 4, "b": 3, "c": 3}  # largest remainders, in order
    for old, fix in (("movie-dialog:1200+bbc:200", "'movie-dialog:1200,bbc:200', with 1400 rows"),
                     ("a+b", "'a,b'")):
        with pytest.raises(PublicSetError) as e:
            build_public_set(mix=old)
        assert "old 'a:N+b:M' form" in str(e.value) and fix in str(e.value) and "\n" not in str(e.value)
    plus = tmp_path / "c+d.csv"  # a file whose name has a '+' is a source, not the old form
    plus.write_text("text\nhello there\nhow are you\n")
    assert parse_mix(str(plus)) == {str(plus): 1.0}


def test_prefill_reuses_cached_rows_and_extracts_only_new_texts(tmp_path, tiny_models):
    model = str(tiny_models["llama"])
    a = write_lines(tmp_path / "a.jsonl", sentences(40, 7, "a"))
    full = extract(ExtractionConfig(model=model, data=str(a), label_column=None), progress=False)
    path = build_public_set([str(a)], size=25, out="sub")
    config = ExtractionConfig(model=model, data=str(path), label_column=None)
    result = prefill_states(config, max_extract=0)
    assert (result.hit, result.reused, result.extracted) == (False, 25, 0)
    again = extract(config, progress=False)
    assert again.hit and again.path == result.path
    from datamodules.cache import StateCache

    texts = load_texts(str(a), label_column=None)["text"]
    rows = [texts.index(t) for t in built_texts(path)]
    assert np.array_equal(StateCache(result.path).all(), StateCache(full.path).rows(rows))
    # One new text: over a budget of 0 it refuses; otherwise only that text runs through the model.
    b = write_lines(tmp_path / "b.jsonl", [*built_texts(path)[:5], "a brand new line"])
    config = ExtractionConfig(model=model, data=str(b), label_column=None)
    with pytest.raises(ExtractionBudgetError) as info:
        prefill_states(config, max_extract=0)
    assert info.value.missing == 1 and not resolve(config).directory.joinpath("manifest.json").exists()
    result = prefill_states(config, max_extract=1)
    assert (result.reused, result.extracted) == (5, 1)
    fresh = StateEncoder(model)(["a brand new line"])
    assert torch.allclose(torch.from_numpy(StateCache(result.path).rows([5])), torch.from_numpy(fresh), atol=1e-5)


def test_public_set_configs_name_builder_arguments():
    import inspect

    import yaml

    allowed = set(inspect.signature(build_public_set).parameters) | {"name", "models", "threads"}
    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "public").glob("*.yaml"))
    assert configs
    for path in configs:
        config = yaml.safe_load(path.read_text())
        assert set(config) <= allowed, path
        mix = parse_mix(config["mix"])
        assert set(mix) <= set(config["sources"]) and sum(mix.values()) == pytest.approx(1)
        assert {parse_task(t)[0] for t in config["exclude_tasks"]} >= set(config["sources"]) - {"movie-dialog"}


# --- the study's regimes: leave-task-out and in-domain recipes -----------------------------------------

STUDY_TASKS = ["bbc", "vader-movies", "trec", "rotten"]


def test_the_regime_recipes_reproduce_the_pre_extracted_sets_arguments():
    exclude = task_specs(STUDY_TASKS, 1500)
    assert exclude == ["bbc@1500", "vader-movies@1500", "trec@1500", "rotten@1500"]
    assert task_specs(["bbc"], None) == ["bbc"]
    r = in_domain_recipe("trec", exclude)
    assert (r.name, r.sources, parse_mix(r.mix), r.size, list(r.exclude_tasks), r.exclude_datasets) == (
        "study-in-domain-trec", ("movie-dialog", "trec"), {"movie-dialog": 0.5, "trec": 0.5}, 2000, exclude, ())
    pool = ["movie-dialog", "bbc", "vader-movies", "vader-tweets", "vader-nyt", "vader-amazon", "trec", "rotten"]
    assert sorted(registry_sources()) == sorted(pool) and registry_sources()[0] == "movie-dialog"
    r = leave_task_out_recipe("trec", exclude)
    assert sorted(r.sources) == sorted(set(pool) - {"trec"}) and r.size == 3500 and r.exclude_datasets == ("trec",)
    assert parse_mix(r.mix) == pytest.approx({s: 1 / 7 for s in r.sources})
    assert leave_task_out_recipe("trec", exclude, size=None).mix is None  # every eligible row of every source
    with pytest.raises(PublicSetError, match="no source is left"):
        leave_task_out_recipe("a", [], sources=["a"])


def test_a_leave_task_out_set_holds_no_text_of_the_task_and_is_found_again(tmp_path):
    task = write_task(tmp_path / "task.csv")
    other = write_task(tmp_path / "other.csv", seed=7)
    echo = write_lines(tmp_path / "echo.jsonl", [v for t in load_texts(str(task))["text"] for v in variants(t)[1:]]
                       + sentences(80, 8, "e"))
    dialog = write_lines(tmp_path / "dialog.jsonl", sentences(300, 9, "d"))
    sources = [str(dialog), str(echo), str(task), str(other)]
    recipe = leave_task_out_recipe(str(task), [str(task), str(other)], size=150, sources=sources, name="lto")
    assert str(task) not in recipe.sources
    path = recipe.build()
    keys = {normalize_text(t) for t in built_texts(path)}
    assert len(keys) == 150 and not keys & {normalize_text(t) for t in load_texts(str(task))["text"]}
    assert not keys & task_heldout(str(other)).keys
    counts = {s["name"]: s["selected"] for s in read_manifest(path)["sources"]}
    assert counts == {str(dialog): 50, str(echo): 50, str(other): 50}  # equal weights
    # the same arguments find the set already built (no rewrite); other arguments build anew
    mtime = path.stat().st_mtime_ns
    assert recipe.built() == path and recipe.build() == path and path.stat().st_mtime_ns == mtime
    bigger = leave_task_out_recipe(str(task), [str(task), str(other)], size=200, sources=sources, name="lto")
    assert bigger.built() is None and len(built_texts(bigger.build())) == 200
    # no size: every eligible row of every source
    every = leave_task_out_recipe(str(task), [str(task), str(other)], size=None, sources=sources, name="all")
    m = read_manifest(every.build())
    assert m["rows"] == sum(s["eligible"] for s in m["sources"]) > 200


def test_public_set_build_leave_out_flag(tmp_path, capsys, monkeypatch):
    from lightning_modules.cli import main

    for conflict in (["--sources", "[movie-dialog]"], ["--mix", "movie-dialog:1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["public-set", "build", "--leave_out", "trec", *conflict])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--leave_out trec draws from every registry dataset but trec" in err
        assert "drop --sources and --mix" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # every registry dataset but the task: a user registry replaces each built-in dataset with a small file
    names = registry_sources()
    lines = ["datasets:"]
    for i, name in enumerate(names):
        file = (write_task(tmp_path / f"{name}.csv", seed=i) if name == "trec" else
                write_lines(tmp_path / f"{name}.jsonl", sentences(40, 20 + i, name)))
        lines += [f"  {name}:", f"    file: {file}"]
    registry = tmp_path / "registry.yaml"
    registry.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("XSILO_REGISTRY", str(registry))
    main(["public-set", "build", "--leave_out", "trec", "--size", "70", "--name", "cli-lto"])
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    m = read_manifest(path)
    assert m["excluded"]["datasets"] == {"trec": 90} and m["rows"] == 70
    assert [s["name"] for s in m["sources"]] == [n for n in names if n != "trec"]
    assert {s["selected"] for s in m["sources"]} == {10}
    assert not {normalize_text(t) for t in built_texts(path)} & {normalize_text(t) for t in load_texts("trec")["text"]}


# --- a user's file with its own column names (issue 22: found while trying a user's CSV) ----------------

def write_topics(path, n: int = 90, seed: int = 0):
    """A user's CSV: `id`, `body` (the texts) and `topic` (the labels); no `text` or `label` column."""
    texts = sentences(n, seed, "topic")
    path.write_text("id,body,topic\n" + "".join(f"{i},\"{t}\",t{i % 3}\n" for i, t in enumerate(texts)))
    return path


def heldout_of_topics(csv, model, **split) -> set[str]:
    """The val/test texts of the user's CSV as the DataModule that evaluates it splits them (its own columns)."""
    dm = LabelledStatesDataModule(model=str(model), data=str(csv), text_column="body", label_column="topic", **split)
    return {normalize_text(dm.job.texts[i]) for name in ("val", "test") for i in dm.split_index[name]}


def test_a_labelled_source_file_with_its_own_columns_has_its_heldout_texts_removed(tmp_path, tiny_models, capsys):
    """`public-set build --sources [dialog, my.csv] --text_column body --label_column topic`: the CSV is labelled, so
    its validation and test texts (the DataModules' split) are removed, as a registry task's are."""
    from lightning_modules.cli import main

    csv = write_topics(tmp_path / "my.csv")
    dialog = tmp_path / "dialog.jsonl"
    dialog.write_text("".join(json.dumps({"body": t}) + "\n" for t in sentences(60, 11, "d")))
    held = heldout_of_topics(csv, tiny_models["llama"])
    main(["public-set", "build", "--sources", f"[{dialog},{csv}]", "--text_column", "body", "--label_column", "topic",
          "--name", "topics"])
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {normalize_text(t) for t in built_texts(path)}
    assert held and not keys & held and len(keys) == 60 + 90 - len(held)
    m = read_manifest(path)
    assert [(t["task"], t["text_column"], t["label_column"], t["held_out_texts"]) for t in m["excluded"]["tasks"]] \
        == [(str(csv), "body", "topic", len(held))]
    assert {s["name"]: s["labels_dropped"] for s in m["sources"]} == {str(dialog): False, str(csv): True}
    # Without --label_column the CSV has no `label` column, so it reads as unlabelled: said, never silent.
    main(["public-set", "build", "--sources", f"[{dialog},{csv}]", "--text_column", "body", "--name", "silent"])
    err = capsys.readouterr().err
    assert f"read as unlabelled, so no held-out text of theirs was removed: {dialog}, {csv}" in err
    assert "--label_column" in err
    # A label column no source has (a typo) is refused, not read as "every source unlabelled".
    with pytest.raises(SystemExit):
        main(["public-set", "build", "--sources", f"[{dialog},{csv}]", "--text_column", "body", "--label_column",
              "topik", "--name", "typo"])
    err = capsys.readouterr().err
    assert "no source or task has the label column 'topik'" in err and len(err.strip().splitlines()) == 1


def test_a_leave_task_out_set_for_a_file_task_reads_it_with_its_own_columns(tmp_path):
    """The recipe behind `evaluate`'s default public set, for a user's CSV (`body`/`topic`): built with no text of
    it (whatever its spelling in another source), found again with the same columns, rebuilt with others."""
    csv = write_topics(tmp_path / "my.csv")
    echo = write_lines(tmp_path / "echo.jsonl", [v for t in load_texts(str(csv), text_column="body")["text"]
                                                  for v in variants(t)[1:]] + sentences(80, 8, "e"))
    dialog = write_lines(tmp_path / "dialog.jsonl", sentences(200, 9, "d"))
    sources = [str(dialog), str(echo)]
    recipe = leave_task_out_recipe(str(csv), task_specs([str(csv)], 60), 100, sources, name="lto-file",
                                   task_columns=("body", "topic"))
    path = recipe.build()
    keys = {normalize_text(t) for t in built_texts(path)}
    assert len(keys) == 100 and not keys & {normalize_text(t) for t in load_texts(str(csv), text_column="body")["text"]}
    task = read_manifest(path)["excluded"]["tasks"][0]
    assert (task["task"], task["limit"], task["text_column"], task["label_column"]) == (str(csv), 60, "body", "topic")
    assert recipe.built() == path
    other = leave_task_out_recipe(str(csv), task_specs([str(csv)], 60), 100, sources, name="lto-file",
                                  task_columns=("body", "id"))
    assert other.built() is None


def test_exclude_tasks_reads_a_file_task_with_its_label_column_and_never_advises_dropping_it(tmp_path, tiny_models,
                                                                                              capsys):
    """`--exclude_tasks my.csv --text_column body` refused with "has no labels" and advised excluding the whole
    dataset; `--label_column topic` names the labels, and the refusal names that flag instead."""
    from lightning_modules.cli import main

    csv = write_topics(tmp_path / "my.csv")
    echo = tmp_path / "echo.jsonl"  # every task text in four spellings, under the same column name
    echo.write_text("".join(json.dumps({"body": v}) + "\n" for t in load_texts(str(csv), text_column="body")["text"]
                            for v in variants(t)))
    capsys.readouterr()  # what reading the files printed so far
    with pytest.raises(SystemExit) as info:
        main(["public-set", "build", "--sources", f"[{echo}]", "--exclude_tasks", f"[{csv}]", "--text_column", "body",
              "--name", "refused"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "no label column 'label'" in err and "--label_column" in err and "exclude_datasets" not in err
    for limit in (None, 60):
        spec = str(csv) if limit is None else f"{csv}@{limit}"
        main(["public-set", "build", "--sources", f"[{echo}]", "--exclude_tasks", f"[{spec}]",
              "--text_column", "body", "--label_column", "topic", "--name", f"excluded-{limit}"])
        path = Path(capsys.readouterr().out.strip().splitlines()[-1])
        held = heldout_of_topics(csv, tiny_models["llama"], limit=limit)
        keys = {normalize_text(t) for t in built_texts(path)}
        every = {normalize_text(t) for t in load_texts(str(csv), text_column="body")["text"]}
        assert not keys & held and keys == every - held
    with pytest.raises(PublicSetError, match="no label column 'label'") as e:
        task_heldout(str(csv), text_column="body")
    assert "exclude_datasets" not in str(e.value)
