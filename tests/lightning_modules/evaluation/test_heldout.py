"""The held-out-style check: a new user's own model folder and CSV (other column names) through `xsilo evaluate`.

The CSV's columns are named by flags alone (`--extraction.text_column/--extraction.label_column`), or by a
user registry entry (XSILO_REGISTRY); the model folder is a tiny random BERT with a sentence-transformers
`1_Pooling/config.json`, whose pooling the extraction takes.
"""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch

from tests.datamodules.test_extraction import sentence_transformers_folder
from tests.tiny import WORDS, write_tiny_csv


def sms_csv(path, n: int = 120, copies: int = 15):
    """`sms`/`spam` columns; the first `copies` texts occur twice, as in the real SMS collection."""
    rng = random.Random(0)
    rows = []
    for i in range(n - copies):
        spam = i % 2 == 1
        words = [WORDS[(7 * spam + rng.randrange(12)) % len(WORDS)] for _ in range(rng.randrange(3, 12))]
        rows.append((f"{' '.join(words)} {i}", "spam" if spam else "ham"))
    rows += rows[:copies]
    path.write_text("id,sms,spam\n" + "".join(f'{i},"{t}",{y}\n' for i, (t, y) in enumerate(rows)))
    return path


def test_a_local_model_folder_and_a_csv_with_other_columns_through_evaluate(tiny_models, tmp_path, monkeypatch, capsys):
    from lightning_modules.cli import main

    model = sentence_transformers_folder(tiny_models, tmp_path, "pooling_mode_cls_token", max_positions=64)
    sms = sms_csv(tmp_path / "sms.csv")
    public = write_tiny_csv(tmp_path / "public.csv", n=160, seed=5)
    (tmp_path / "registry.yaml").write_text(f"datasets:\n  sms:\n    file: {sms}\n    text_column: sms\n"
                                            "    label_column: spam\n")
    monkeypatch.setenv("XSILO_REGISTRY", str(tmp_path / "registry.yaml"))
    out = tmp_path / "run"
    main(["evaluate", "--source", str(model), "--target", str(tiny_models["llama"]), "--task", "sms",
          "--public.data", str(public), "--public.limit", "160", "--head.epochs", "5", "--out", str(out)])
    err = capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["ham", "spam"] and metrics["rows"]["task_test"] == round(60 * 0.15) * 2
    assert "sms: dropped duplicate texts of the test (or val) split" in err
    states = torch.load(out / "classifier-source.ckpt", weights_only=False)["xsilo"]["states"]
    assert states["pooling"] == "first" and states["defaults_from"]["pooling"] == "1_Pooling/config.json"
    for name in ("native_target", "native_source", "mapped"):
        assert 0 <= metrics["classification"][name]["accuracy"] <= 1


def test_flags_alone_name_the_columns_of_a_csv(tiny_models, tmp_path, capsys):
    """No registry entry: the task is the CSV itself and two flags name its columns."""
    from lightning_modules.cli import main

    model = sentence_transformers_folder(tiny_models, tmp_path, "pooling_mode_mean_tokens", max_positions=64)
    sms = sms_csv(tmp_path / "sms.csv")
    public = write_tiny_csv(tmp_path / "public.csv", n=160, seed=5)  # the public set keeps its own `text` column
    out = tmp_path / "run"
    main(["evaluate", "--source", str(model), "--target", str(tiny_models["llama"]), "--task", str(sms),
          "--extraction.text_column", "sms", "--extraction.label_column", "spam",
          "--public.data", str(public), "--public.limit", "160", "--head.epochs", "5", "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["ham", "spam"]
    assert "dropped duplicate texts of the test (or val) split" in capsys.readouterr().err
    states = torch.load(out / "classifier-source.ckpt", weights_only=False)["xsilo"]["states"]
    assert (states["pooling"], states["text_column"], states["label_column"]) == ("mean", "sms", "spam")


# --- issue 22: a user's CSV with the default public set, a task_limit, and the collapse flag -------------------

def topics_csv(path, n: int = 90):
    """A user's CSV whose columns are `id`, `body` and `topic` (no `text`, no `label`)."""
    rng = random.Random(1)
    rows = [(f"{' '.join(WORDS[(5 * (i % 3) + rng.randrange(10)) % len(WORDS)] for _ in range(rng.randrange(3, 10)))} "
             f"row{i}", f"t{i % 3}") for i in range(n)]
    path.write_text("id,body,topic\n" + "".join(f'{i},"{t}",{y}\n' for i, (t, y) in enumerate(rows)))
    return path


def test_the_readmes_csv_form_runs_with_the_default_leave_task_out_public_set_and_prints_the_collapse_flag(
        tiny_models, tmp_path, monkeypatch, capsys):
    """`xsilo evaluate --task my.csv --extraction.text_column body --extraction.label_column topic` (no --public.data):
    the leave-task-out builder reads the CSV with its own columns and leaves every text of it out; the printed
    summary, metrics.json and metrics.md carry the study's collapse verdict."""
    import datamodules.recipes
    from datamodules.dedupe import normalize_text
    from datamodules.text import load_texts
    from lightning_modules.cli import main
    from lightning_modules.experiments.study_report import collapse

    csv = topics_csv(tmp_path / "my.csv")
    echo = tmp_path / "echo.jsonl"  # an unlabelled source that repeats the task's texts, in another case
    texts = load_texts(str(csv), text_column="body", label_column="topic")["text"]
    echo.write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in texts))
    dialog = write_tiny_csv(tmp_path / "dialog.csv", n=150, seed=9)
    monkeypatch.setattr(datamodules.recipes, "registry_sources", lambda: [str(dialog), str(echo)])
    out = tmp_path / "run"
    main(["evaluate", "--source", str(tiny_models["llama"]), "--target", str(tiny_models["gpt2"]), "--task", str(csv),
          "--extraction.text_column", "body", "--extraction.label_column", "topic", "--public.limit", "60",
          "--head.epochs", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    counts = metrics["rows"]
    assert metrics["labels"] == ["t0", "t1", "t2"] and counts["public_train"] + counts["public_heldout"] == 60
    public = metrics["extraction"]["public_source"]["data"]
    rows = [json.loads(line) for line in open(public)]
    assert {r["source"] for r in rows} <= {str(dialog), str(echo)}
    assert not {normalize_text(r["text"]) for r in rows} & {normalize_text(t) for t in texts}
    c = metrics["classification"]
    flagged, reason = collapse(c["mapped"], c["native_target"])
    assert (metrics["collapse"], metrics["collapse_reason"]) == (flagged, reason)
    line = f"**Collapse**: {reason}." if flagged else "Collapse: no ("
    assert line in printed and line in (out / "metrics.md").read_text()
    from lightning_modules.evaluation.evaluate import markdown_report  # the other verdict's line

    other = markdown_report({**metrics, "collapse": not flagged, "collapse_reason": None if flagged else "planted"})
    assert ("Collapse: no (" if flagged else "**Collapse**: planted.") in other


def test_a_public_set_built_for_another_split_of_the_task_is_refused_before_any_work(tiny_models, tmp_path,
                                                                                      monkeypatch, capsys):
    """`--task_limit 60` against a public set built for the task's full split: some of the 60-row split's val/test
    texts are the full split's training texts, so they are in the set. Refused with the count and the fix, before
    any extraction or fit; the set built for this split (`--exclude_tasks my.csv@60`) passes."""
    from datamodules.dedupe import normalize_text
    from datamodules.public_set import PublicSetError, build_public_set
    from datamodules.states import LabelledStatesDataModule
    from lightning_modules.cli import main
    from lightning_modules.evaluation import evaluate
    from lightning_modules.settings import ExtractionSettings, PublicSetSettings

    csv = topics_csv(tmp_path / "my.csv")
    columns = dict(text_column="body", label_column="topic")
    full = build_public_set([str(csv)], exclude_tasks=[str(csv)], out="full", **columns)
    dm = LabelledStatesDataModule(model=str(tiny_models["llama"]), data=str(csv), limit=60, **columns)
    held = {normalize_text(dm.job.texts[i]) for part in ("val", "test") for i in dm.split_index[part]}
    leaked = held & {normalize_text(json.loads(line)["text"]) for line in full.read_text().splitlines()}
    assert leaked  # the silent leak of the issue: held-out rows of the evaluated split in the public set

    def no_work(*args, **kwargs):
        raise AssertionError("extraction or fitting ran before the public set was checked")

    monkeypatch.setattr(evaluate, "prepare_states", no_work)
    monkeypatch.setattr(evaluate, "fit_classifier", no_work)
    monkeypatch.setattr(evaluate, "fit_aligner", no_work)
    cfg = evaluate.PairConfig(str(tiny_models["llama"]), str(tiny_models["gpt2"]), str(csv), task_limit=60,
                              public=PublicSetSettings(str(full), limit=None), extraction=ExtractionSettings(**columns))
    with pytest.raises(PublicSetError) as e:
        evaluate.evaluate_pair(cfg)
    assert f"holds {len(leaked)} of the {len(held)} validation/test texts" in str(e.value)
    assert f"--exclude_tasks {csv}@60 --text_column body --label_column topic" in str(e.value)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--source", str(tiny_models["llama"]), "--target", str(tiny_models["gpt2"]),
              "--task", str(csv), "--task_limit", "60", "--extraction.text_column", "body", "--extraction.label_column", "topic",
              "--public.data", str(full), "--public.limit", "null", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and f"holds {len(leaked)} of" in err
    assert not (tmp_path / "run").exists()
    # The full split's own set is fine at the full split, and the set built for this split is fine here.
    right = build_public_set([str(csv)], exclude_tasks=[f"{csv}@60"], exclude_source_tasks=False, out="at-60",
                             **columns)
    public = evaluate.public_datamodule(replace(cfg, public=PublicSetSettings(str(right), limit=None)), cfg.source,
                                        cfg.target)
    evaluate.check_no_heldout(cfg, public, dm)
    whole = replace(cfg, task_limit=None)
    evaluate.check_no_heldout(whole, evaluate.public_datamodule(whole, cfg.source, cfg.target),
                              evaluate.task_datamodule(whole, cfg.target, cfg.task))
