"""The held-out-style check: a new user's own model folder and CSV (other column names) through `xsilo evaluate`.

The CSV's columns are named by flags alone (`--extraction.text_column/--extraction.label_column`), or by a
user registry entry (XSILO_REGISTRY); the model folder is a tiny random BERT with a sentence-transformers
`1_Pooling/config.json`, whose pooling the extraction takes.
"""

from __future__ import annotations

import json
import random

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
