"""The study's regimes on tiny random models: an in-domain and a leave-task-out public set per task, one table
per regime, collapse flags, and the report that renders them."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

import datamodules.recipes
import lightning_modules.evaluation.evaluate
from datamodules.dedupe import normalize_text
from datamodules.public_set import task_heldout
from datamodules.synthetic import SyntheticTextSettings
from datamodules.text import load_texts
from lightning_modules.models.classifier import LinearClassifier
from lightning_modules.evaluation.evaluate import classification_scores
from lightning_modules.experiments.study import Native, run_study, Study, StudyConfig, StudyError
from lightning_modules.experiments.study_report import collapse
from lightning_modules.reporting.report import write_demo_report
from lightning_modules.settings import FitSettings, HeadSettings

from tests.tiny import WORDS, write_tiny_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _lines(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def regimes(tiny_models, tmp_path_factory):
    """Two models, two tasks, both per-task regimes; a third source repeats every text of task A in new spellings."""
    root = tmp_path_factory.mktemp("regimes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XSILO_HOME", str(root / "home"))
        task_a = write_tiny_csv(root / "task-a.csv", n=90, seed=3)
        task_b = write_tiny_csv(root / "task-b.csv", n=90, seed=5, n_classes=2)
        rng = np.random.default_rng(0)
        dialog = _lines(root / "dialog.jsonl", [" ".join(rng.choice(WORDS, 6)) + f" d{i}" for i in range(150)])
        echo = _lines(root / "echo.jsonl", [f"  {t.upper()} " for t in load_texts(str(task_a))["text"]]
                      + [" ".join(rng.choice(WORDS, 5)) + f" e{i}" for i in range(60)])
        cfg = StudyConfig(models=[str(tiny_models["llama"]), str(tiny_models["gpt2"])],
                          tasks=[str(task_a), str(task_b)], regimes=["in-domain", "leave-task-out", "two-party"],
                          in_domain_size=80, leave_task_out_size=120, public_base=str(dialog),
                          public_sources=[str(dialog), str(echo), str(task_a), str(task_b)],
                          head=HeadSettings(epochs=5), fit=FitSettings(lambdas=(1e-3, 1e-2, 1e-1, 1.0)), bootstrap=50,
                          disclosures=[8],
                          synthetic={str(t): SyntheticTextSettings(prompts=("write about {topic}",), rows=6,
                                                                   model=str(tiny_models["llama"]), min_chars=1,
                                                                   max_new_tokens=6, batch_size=4, max_batches=20)
                                     for t in (task_a, task_b)})
        public_extractions = []
        original = lightning_modules.evaluation.evaluate.extract

        def counted(config, *args, **kwargs):
            if str(config.data).endswith(".jsonl"):
                public_extractions.append(config.data)
            return original(config, *args, **kwargs)

        mp.setattr(lightning_modules.evaluation.evaluate, "extract", counted)
        results = run_study(cfg, out=root / "out")
        # each public set's states were filled from cached rows (and a few new ones) before its maps were
        # fitted: the DataModules then hit those caches and extract nothing
        assert public_extractions == []
        assert all(p["states_reused"] + p["states_extracted"] == 2 * p["rows"]
                   for r in results["regimes"].values() for p in r["public"].values())
        return root, cfg, results


def test_each_regime_gives_a_table_and_a_lambda_path_plot(regimes):
    root, cfg, results = regimes
    assert list(results["regimes"]) == ["in-domain", "leave-task-out", "two-party", "two-party-disclosed-8"]
    md = (root / "out" / "study.md").read_text()
    for regime in ("in-domain", "leave-task-out", "two-party", "two-party-disclosed-8"):
        assert f"lambda-path-{regime}.png" in md
        assert (root / "out" / f"lambda-path-{regime}.png").read_bytes()[:8] == PNG_MAGIC
    tables = [block for block in md.split("## Regime: ")[1:]]
    assert len(tables) == 4
    for block in tables:
        rows = [line for line in block.split("\n## ")[0].splitlines() if line.startswith("| ") and "---" not in line]
        assert len(rows) == 1 + len(cfg.tasks) * 2  # header, then (task, pair) rows
    # each pair's map is fitted once per (regime, task); each (model, task) head once; two-party reuses the
    # leave-task-out sets
    assert results["fits"] == {"classifiers": 4, "detectors": 0, "aligners": 16, "public_sets": 4}
    for name, regime in results["regimes"].items():
        # the study knows the head: auto = head, except on a leave-task-out set, where it is gcv
        expected = "gcv" if name.startswith(("leave-task-out", "two-party")) else "head"
        for pair in regime["pairs"].values():
            for task in cfg.tasks:
                view = pair["tasks"][task]
                path = view["lambda_path"]
                assert [p["lambda"] for p in path["points"]] == list(cfg.fit.lambdas)
                assert view["criterion"] == path["criterion"] == expected
                assert set(path["chosen"]) >= {"gcv", "val_mse", "head"}
                # the path's map at the chosen λ is the study's map: the same λ, the same accuracy
                chosen = path["chosen"][expected]
                assert chosen["lambda"] == view["chosen_lambda"]
                scored = view["adaptation"]["unadapted"] if name.startswith("two-party") else view["mapped"]
                assert chosen["accuracy"] == pytest.approx(scored["accuracy"])
    assert {"in-domain-accuracy-task-a", "leave-task-out-drop-task-b"} <= set(results["heatmaps"])


def test_the_leave_task_out_set_never_holds_a_text_of_the_task_nor_any_heldout_text(regimes):
    _, cfg, results = regimes
    heldout = set().union(*(task_heldout(t, cfg.task_limit).keys for t in cfg.tasks))
    for task in cfg.tasks:
        for regime in ("in-domain", "leave-task-out"):
            public = results["regimes"][regime]["public"][task]
            texts = {normalize_text(t) for t in load_texts(public["path"])["text"]}
            assert public["rows"] == len(texts) and not texts & heldout
        public = results["regimes"]["leave-task-out"]["public"][task]
        own = {normalize_text(t) for t in load_texts(task)["text"]}
        texts = {normalize_text(t) for t in load_texts(public["path"])["text"]}
        assert not texts & own and task not in public["selected"]
        assert list(public["recipe"]["exclude_datasets"]) == [task]
    # the echo source repeats task A's texts in new spellings: dropped from A's leave-task-out set, kept for B's
    a, b = cfg.tasks
    echo = cfg.public_sources[1]
    assert results["regimes"]["leave-task-out"]["public"][a]["selected"][echo] <= 60
    in_domain = results["regimes"]["in-domain"]["public"][a]
    assert set(in_domain["selected"]) == {cfg.public_base, a} and in_domain["selected"][a] > 0


def test_study_json_carries_every_score_and_interval(regimes):
    root, cfg, _ = regimes
    saved = json.loads((root / "out" / "study.json").read_text())
    for model in cfg.models:
        for task in cfg.tasks:
            native = saved["native"][model][task]
            assert native["macro_f1_ci"][0] <= native["macro_f1"] <= native["macro_f1_ci"][1]
    for regime in saved["regimes"].values():
        for pair in regime["pairs"].values():
            for view in pair["tasks"].values():
                m = view["mapped"]
                assert 0 < m["majority_rate"] <= 1 and 0 < m["top_prediction_share"] <= 1
                assert m["macro_f1_ci"][0] <= m["macro_f1"] <= m["macro_f1_ci"][1]
                assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1]
                assert isinstance(view["collapse"], bool) and (view["collapse_reason"] is None) != view["collapse"]
                assert np.isfinite(view["alignment"]["r2"])


def _head(weight: torch.Tensor, bias: torch.Tensor) -> LinearClassifier:
    head = LinearClassifier(weight.shape[1], weight.shape[0]).eval()
    with torch.no_grad():
        head.linear.weight.copy_(weight)
        head.linear.bias.copy_(bias)
    return head


def test_a_collapsed_head_is_flagged_and_a_healthy_one_is_not(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(90) % 3
    x = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.3 * torch.randn(90, 3, generator=g)
    healthy = _head(torch.eye(3), torch.zeros(3))
    collapsed = _head(torch.zeros(3, 3), torch.tensor([0.0, 5.0, 0.0]))  # every prediction: class 1
    study = Study(StudyConfig(models=["a", "b"], tasks=["t"], bootstrap=20), tmp_path)
    identity = torch.nn.Identity()
    with torch.no_grad():
        native = classification_scores(healthy(x), y, 3)
        correct = (healthy(x).argmax(1) == y).numpy().astype(float)
        src = Native(healthy, x, y, correct=correct, checkpoint=None)
        good = study.mapped_views(identity, identity, src, src)["mapped"]
        bad = study.mapped_views(identity, identity, src, Native(collapsed, x, y, correct=correct, checkpoint=None))
    assert collapse(good, native) == (False, None) and good["top_prediction_share"] == pytest.approx(1 / 3)
    flagged, reason = collapse(bad["mapped"], native)
    assert flagged and bad["mapped"]["top_prediction_share"] == 1.0 and bad["mapped"]["majority_rate"] < 0.9
    assert "one class" in reason and "macro-F1" in reason
    assert bad["mapped_drop"] == pytest.approx(1 - 1 / 3)


def test_collapse_rules_respect_the_majority_rate_and_the_f1_ratio():
    native = {"macro_f1": 0.9}
    skewed = {"top_prediction_share": 0.95, "majority_rate": 0.95, "macro_f1": 0.85}  # the truth is this skewed
    assert collapse(skewed, native) == (False, None)
    weak = {"top_prediction_share": 0.5, "majority_rate": 0.5, "macro_f1": 0.71}  # 0.71 < 0.8 × 0.9
    flagged, reason = collapse(weak, native)
    assert flagged and "macro-F1" in reason and "one class" not in reason


def test_bad_regimes_name_the_fix():
    for regimes in (["table-3"], [], ["in-domain", "in-domain"]):
        with pytest.raises(StudyError, match="regimes must name each of"):
            StudyConfig(models=["a", "b"], tasks=["t"], regimes=regimes).validate()
    with pytest.raises(StudyError, match="leave_task_out_size must be at least 2"):
        StudyConfig(models=["a", "b"], tasks=["t"], leave_task_out_size=1).validate()
    with pytest.raises(StudyError, match="two-party regime adapts a ridge map"):  # before any extraction
        StudyConfig(models=["a", "b"], tasks=["t"], regimes=["two-party"],
                    fit=FitSettings(estimator="procrustes")).validate()


def test_the_study_command_takes_the_regimes_and_refuses_a_bad_one_in_one_line(capsys):
    from lightning_modules.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--models", "[a,b]", "--tasks", "[t]", "--regimes", "[in-domain,table-3]"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "regimes must name each of" in err and "table-3" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_report_renders_the_regime_tables_beside_the_paper_and_the_lambda_path(regimes):
    root, cfg, results = regimes
    run = root / "out"
    md = write_demo_report(run).read_text()
    body, figures = md.split("## Figures", 1)
    assert "Notes:" not in md and md.startswith("# xsilo study report")
    assert not re.findall(r"\d+\.\d+", "\n".join(line for line in body.splitlines() if not line.startswith("#")))
    for regime in ("in-domain", "leave-task-out", "two-party"):
        assert f"](lambda-path-{regime}.png)" in body
    assert "Table 1" in figures and "Table 2" in figures and "| TREC | — | 95.4 | 57.6 | PAPER_NOTES.md |" in figures
    # every regime row names its source in study.json, and its mapped accuracy is the one stored there
    rows = [line for line in figures.splitlines() if "study.json#/regimes/" in line]
    assert len(rows) == len(results["regimes"]) * len(cfg.tasks) * 2
    for line in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        pointer = cells[-1].split("#", 1)[1]
        view = results
        for part in pointer.split("/")[1:]:
            view = view[part.replace("~1", "/").replace("~0", "~")]
        assert cells[4].startswith(f"{view['mapped']['accuracy']:.3f} [")
        pair = results["regimes"][pointer.split("/")[2]]["pairs"][pointer.split("/")[4].replace("~1", "/")]
        task = pointer.split("/")[6].replace("~1", "/").replace("~0", "~")
        assert cells[3] == f"{results['native'][pair['source']][task]['accuracy']:.3f}"  # the linear ceiling
        assert ("COLLAPSE" in cells[-2]) == view["collapse"]


def test_the_default_public_set_is_built_per_task_from_every_other_source(regimes, monkeypatch):
    """`public.data` leave-task-out (the default): evaluate's public set is every registry source but the task
    and the OOD sets, with no text of the task, whatever its spelling."""
    from lightning_modules.evaluation.evaluate import PairConfig, task_public
    from lightning_modules.settings import LEAVE_TASK_OUT, PublicSetSettings

    root, cfg, _ = regimes
    monkeypatch.setenv("XSILO_HOME", str(root / "home"))
    dialog, echo, task_a, task_b = cfg.public_sources
    monkeypatch.setattr(datamodules.recipes, "registry_sources", lambda: [dialog, echo, task_a, task_b])
    pair = PairConfig(cfg.models[0], cfg.models[1], task_a, public=PublicSetSettings(limit=60))
    assert pair.public.data == LEAVE_TASK_OUT
    public = task_public(pair, cfg.models, leave_out=[task_b])
    rows = [json.loads(line) for line in open(public.data)]
    assert len(rows) == 60 and {r["source"] for r in rows} == {dialog, echo}
    held = {normalize_text(t) for t in load_texts(task_a)["text"]}
    assert not held & {normalize_text(r["text"]) for r in rows}
    assert task_public(pair, cfg.models, leave_out=[task_b]).data == public.data  # built once, then found


def test_the_two_party_regime_adapts_each_leave_task_out_map_on_the_tasks_unlabelled_train_texts(regimes):
    root, cfg, results = regimes
    two, leave = results["regimes"]["two-party"], results["regimes"]["leave-task-out"]
    assert two["public"] == leave["public"]  # the same public sets: no text of the task
    for key, pair in two["pairs"].items():
        for task in cfg.tasks:
            view, plain = pair["tasks"][task], leave["pairs"][key]["tasks"][task]
            record = view["adaptation"]
            # the client's texts are the task's train split (its labels unused); the plain map is the leave-task-out one
            assert record["private_rows"] == results["rows"][task]["train"]
            assert record["lambda"] == view["chosen_lambda"] == plain["chosen_lambda"]
            assert record["unadapted"]["accuracy"] == pytest.approx(plain["mapped"]["accuracy"])
            assert {"collapse", "collapse_reason"} <= set(view) and "macro_f1" in view["mapped"]
            # the product's last step: the head's predicted shares on the client's texts follow the priors
            matched = record["prior_matching"]
            assert len(matched["shares_after"]) == len(matched["offsets"]) and matched["offset_error"] < 1e-6
            assert sum(matched["shares_after"]) == pytest.approx(1.0)


def test_a_disclosure_regime_anchors_the_two_party_fit_on_the_clients_chosen_texts_instead(regimes):
    root, cfg, results = regimes
    two, shown = results["regimes"]["two-party"], results["regimes"]["two-party-disclosed-8"]
    assert shown["public"] == two["public"] and results["config"]["disclosures"] == [8]
    moved = 0
    for key, pair in shown["pairs"].items():
        for task in cfg.tasks:
            view, plain = pair["tasks"][task], two["pairs"][key]["tasks"][task]
            record = view["adaptation"]
            assert record["anchor_rows"] == 8 and record["anchor_weight"] == cfg.adaptation.anchor_weight
            assert plain["adaptation"]["anchor_rows"] == cfg.synthetic[task].rows  # the default's written anchors
            assert record["unadapted"] == plain["adaptation"]["unadapted"]  # the same public map before both
            moved += view["alignment"]["r2"] != plain["alignment"]["r2"]
    assert moved == len(shown["pairs"]) * len(cfg.tasks)  # the disclosed pairs change every map
    with pytest.raises(StudyError, match="disclosures"):
        StudyConfig(models=["a", "b"], tasks=["t"], regimes=["two-party"], disclosures=[8, 8]).validate()


def test_each_regime_is_summed_up_against_the_linear_ceiling(regimes):
    root, cfg, results = regimes
    md = (root / "out" / "study.md").read_text()
    for name, regime in results["regimes"].items():
        passing, gaps = 0, []
        for pair in regime["pairs"].values():
            for task, view in pair["tasks"].items():
                ends = [results["native"][pair[end]][task] for end in ("source", "target")]
                passing += (not view["collapse"]
                            and view["mapped"]["macro_f1"] >= 0.9 * min(e["macro_f1"] for e in ends))
                gaps.append(min(e["accuracy"] for e in ends) - view["mapped"]["accuracy"])
        summary = regime["ceiling"]
        assert (summary["passing"], summary["rows"]) == (passing, len(cfg.tasks) * 2)
        assert summary["mean_gap_points"] == pytest.approx(100 * np.mean(gaps), abs=0.01)
        assert f"**{passing} of {len(gaps)} rows** free of collapse" in md


def test_the_two_party_regime_takes_the_synthetic_set_as_anchors_as_align_does(regimes, monkeypatch):
    """`synthetic` is the provider's written set: the two-party regime is then the product's default recipe, each
    map anchored on it; without it (a user's task with no writer config) the regime adapts without anchors."""
    root, cfg, results = regimes
    two = results["regimes"]["two-party"]
    for pair in two["pairs"].values():
        for task in cfg.tasks:
            record = pair["tasks"][task]["adaptation"]
            assert record["anchor_rows"] == cfg.synthetic[task].rows
            assert record["anchor_weight"] == cfg.adaptation.anchor_weight
    monkeypatch.setenv("XSILO_HOME", str(root / "home"))  # the fixture's caches: nothing is extracted again
    bare = run_study(replace(cfg, tasks=cfg.tasks[:1], regimes=["two-party"], disclosures=(), synthetic=None))
    for key, pair in bare["regimes"]["two-party"]["pairs"].items():
        view, anchored = pair["tasks"][cfg.tasks[0]], two["pairs"][key]["tasks"][cfg.tasks[0]]
        assert view["adaptation"]["anchor_rows"] == 0
        assert view["adaptation"]["unadapted"] == anchored["adaptation"]["unadapted"]  # the same public map
        assert view["alignment"]["r2"] != anchored["alignment"]["r2"]  # the anchors change the map
    with pytest.raises(StudyError, match="synthetic must give settings for each task"):
        StudyConfig(models=["a", "b"], tasks=["t", "u"], regimes=["two-party"],
                    synthetic={"t": SyntheticTextSettings(prompts=("about {topic}",))}).validate()
    with pytest.raises(StudyError, match="add two-party to --regimes"):
        StudyConfig(models=["a", "b"], tasks=["t"], regimes=["leave-task-out"],
                    synthetic={"t": SyntheticTextSettings(prompts=("about {topic}",))}).validate()


def test_disclosing_more_texts_than_the_task_has_is_refused_before_any_map_is_fitted(regimes, monkeypatch):
    root, cfg, _ = regimes
    monkeypatch.setenv("XSILO_HOME", str(root / "home"))  # the fixture's caches: nothing is extracted again
    fitted = []
    monkeypatch.setattr(Study, "fit_map", lambda self, *a, **k: fitted.append(a))
    too_many = replace(cfg, tasks=cfg.tasks[:1], regimes=["two-party"], disclosures=[10_000], synthetic=None)
    with pytest.raises(StudyError, match="cannot disclose 10000 texts of .*training texts; lower --disclosures"):
        run_study(too_many)
    assert fitted == []
