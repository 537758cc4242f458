"""The ablation runner on a synthetic pair with a known linear relation (target = A·source + b + noise).

Synthetic states are written straight into the state cache for two tiny models, so the runner's public
sets are filled from cached rows (`prefill_states`) and nothing runs through a model.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from datamodules.cache import StateCache, atomic_save_npy, ensure_writable, shard_name
from datamodules.extraction import ExtractionConfig, extract, finalise, resolve, shard_ranges
from datamodules.dedupe import normalize_text
from datamodules.public_set import parse_mix
from datamodules.forward import extract_views
from datamodules.states import LabelledStatesDataModule
from lightning_modules.experiments.ablation import run_ablation
from lightning_modules.experiments.ablation_config import AblationConfig, AblationError, parse_view
from lightning_modules.experiments.ablation_report import markdown_report
from lightning_modules.experiments.ablation_settings import broad_mix
from lightning_modules.settings import AdaptationSettings, FitSettings, HeadSettings, Recipe

from tests.datamodules.test_public_set import sentences, write_lines

D = 32  # the tiny models' hidden size
RNG = np.random.default_rng(0)
A = RNG.normal(size=(D, D)) / np.sqrt(D)
B = RNG.normal(size=D)
MEANS = RNG.normal(size=(3, D)) * 0.35


def source_state(text: str, label: int | None) -> np.ndarray:
    rng = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))
    x = rng.normal(size=D)
    return x if label is None else MEANS[label] + x


def target_state(text: str, x: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(int(hashlib.sha256(b"t" + text.encode()).hexdigest()[:12], 16))
    return A @ x + B + 0.5 * rng.normal(size=D)


def write_states(model, data, labelled: bool, role: str, shift: np.ndarray | None = None) -> None:
    """Cache synthetic states; `shift` is added to the target's states of this dataset (a planted mean shift)."""
    job = resolve(ExtractionConfig(model=str(model), data=str(data), label_column="label" if labelled else None))
    labels = job.labels if labelled else [None] * len(job.texts)
    xs = np.stack([source_state(t, y) for t, y in zip(job.texts, labels)])
    states = xs if role == "source" else np.stack([target_state(t, x) for t, x in zip(job.texts, xs)])
    if shift is not None and role == "target":
        states = states + shift
    ensure_writable(job.directory)
    shards = shard_ranges(len(job.texts), 2048)
    for i, (a, b) in enumerate(shards):
        atomic_save_npy(job.directory / shard_name(i), states[a:b].astype(np.float32))
    finalise(job, shards)


@pytest.fixture
def synthetic(tmp_path, tiny_models):
    task = tmp_path / "task.csv"
    texts = sentences(600, 10, "t")
    task.write_text("text,label\n" + "".join(f"\"{t}\",c{i % 3}\n" for i, t in enumerate(texts)))
    cached = write_lines(tmp_path / "cached.jsonl", sentences(1200, 11, "p"))
    source, target = tiny_models["llama"], tiny_models["gpt2"]
    for model, role in ((source, "source"), (target, "target")):
        write_states(model, task, True, role)
        write_states(model, cached, False, role)
    # The public source: those texts and 300 more with no cached states (over a budget of 0).
    public = write_lines(tmp_path / "public.jsonl", sentences(1200, 11, "p") + sentences(300, 12, "q"))
    return dict(source=str(source), target=str(target), task=str(task), public=str(public))


def test_more_public_rows_lower_the_drop_and_nothing_runs_through_a_model(synthetic, tmp_path):
    cfg = AblationConfig(source=synthetic["source"], target=synthetic["target"], task=synthetic["task"],
                         base=Recipe(mix=f"{synthetic['public']}:1", size=1000), factors=["size", "standardize"],
                         sizes=[24, 80, 1000, 1400], bootstrap=50, head=HeadSettings(epochs=60), max_extract=0)
    results = run_ablation(cfg, out=tmp_path / "out")
    rows = {r["value"]: r for r in results["settings"] if r["factor"] == "size"}
    drops = [rows[f"{n} rows"]["mapped_drop"] for n in (24, 80, 1000)]
    assert drops[0] > drops[1] > drops[2] and drops[0] - drops[2] > 0.1
    assert drops[2] < 0.03  # enough public rows: within 3 points of native
    r2 = [rows[f"{n} rows"]["alignment_task_test"]["r2"] for n in (24, 80, 1000)]
    assert r2[0] < r2[1] < r2[2]
    skipped = rows["1400 rows"]
    assert skipped["status"] == "skipped" and "max_extract=0" in skipped["reason"]
    assert results["fits"]["forward_passes"] == 0
    assert results["fits"]["classifiers"] == 2  # one head per model, read by every setting
    assert {"ablation.json", "ablation.md", "ablation.png"} <= {p.name for p in (tmp_path / "out").iterdir()}
    md = (tmp_path / "out" / "ablation.md").read_text()
    assert "## size" in md and "## standardize" in md and "skipped" in md
    assert json.loads((tmp_path / "out" / "ablation.json").read_text())["settings"][0]["factor"] == "base"
    # No public set the runner built holds a validation or test text of the task.
    dm = LabelledStatesDataModule(model=synthetic["source"], data=synthetic["task"])
    held = {normalize_text(dm.job.texts[i]) for s in ("val", "test") for i in dm.split_index[s]}
    for r in results["settings"]:
        if r["status"] == "ok":
            lines = open(r["public"]["file"]).read().splitlines()
            assert not {normalize_text(json.loads(x)["text"]) for x in lines} & held


def test_mix_estimator_and_finetune_factors_run_and_reuse_results(synthetic):
    task_train = synthetic["task"]
    cfg = AblationConfig(source=synthetic["source"], target=synthetic["target"], task=task_train,
                         base=Recipe(mix=f"{synthetic['public']}:1", size=300),
                         factors=["mix", "estimator", "finetune", "seed"],
                         mixes=[f"{synthetic['public']}:1", f"{synthetic['public']}:0.5,{task_train}:0.5"],
                         fit=FitSettings(lambdas=(1e-3, 1.0)), estimators=["procrustes"], finetune=["mse", "task"],
                         finetune_epochs=2, public_seeds=[1], bootstrap=20, head=HeadSettings(epochs=30), max_extract=0)
    results = run_ablation(cfg)
    by = {(r["factor"], r["value"]): r for r in results["settings"]}
    assert all(r["status"] == "ok" for r in results["settings"])
    base = by["base", "base recipe"]
    assert by["mix", f"{synthetic['public']}:1"]["mapped"] == base["mapped"]  # the same recipe, not refitted
    mixed = by["mix", f"{synthetic['public']}:0.5,{task_train}:0.5"]
    assert mixed["public"]["mix_actual"][task_train] == pytest.approx(0.5, abs=0.01)
    assert by["estimator", "ridge λ=1"]["chosen_lambda"] == 1.0
    assert by["estimator", "procrustes"]["chosen_lambda"] is None
    assert by["finetune", "+ task fine-tuning"]["finetune_epochs_run"] is not None
    assert by["seed", "public-set sample seed 1"]["public"]["fingerprint"] != base["public"]["fingerprint"]
    with pytest.raises(AblationError, match="unknown factors"):
        run_ablation(AblationConfig(factors=["colour"]))


def test_extract_views_matches_extract_from_one_forward_pass(tmp_path, tiny_models):
    model = str(tiny_models["llama"])
    data = write_lines(tmp_path / "v.jsonl", sentences(20, 13, "v"))
    views = [("mean", -1), ("last", 1), ("mean", 0)]
    ran = extract_views(model, str(data), views, label_column=None, max_extract=100)
    assert ran == 20 and extract_views(model, str(data), views, label_column=None) == 0
    for pooling, layer in views:
        config = ExtractionConfig(model=model, data=str(data), pooling=pooling, layer=layer, label_column=None)
        views_cache = StateCache(resolve(config).directory).all()
        import shutil

        shutil.rmtree(resolve(config).directory)
        fresh = StateCache(extract(config, progress=False).path).all()
        np.testing.assert_allclose(views_cache, fresh, atol=1e-5)
    assert parse_view("mean@-1") == ("mean", -1, None) and parse_view("last@15/9") == ("last", 15, 9)
    with pytest.raises(AblationError):
        parse_view("mean@x")


@pytest.fixture
def shifted(tmp_path, tiny_models):
    """The synthetic pair, but the target's task states sit away from where the public-set map sends the
    source's: mapped task states land on class 0's side of the target head (a mean-shift collapse)."""
    task = tmp_path / "task.csv"
    texts = sentences(600, 10, "t")
    task.write_text("text,label\n" + "".join(f"\"{t}\",c{i % 3}\n" for i, t in enumerate(texts)))
    public = write_lines(tmp_path / "public.jsonl", sentences(1200, 11, "p"))
    source, target = tiny_models["llama"], tiny_models["gpt2"]
    shift = -4.0 * A @ (MEANS[0] - MEANS.mean(0))  # the true task states move away from class 0 ...
    for model, role in ((source, "source"), (target, "target")):
        write_states(model, task, True, role, shift=shift)
        write_states(model, public, False, role)
    return dict(source=str(source), target=str(target), task=str(task), public=str(public))


def test_recenter_fixes_a_planted_mean_shift_collapse_and_rows_carry_the_collapse_metrics(shifted):
    cfg = AblationConfig(source=shifted["source"], target=shifted["target"], task=shifted["task"],
                         base=Recipe(mix=f"{shifted['public']}:1", size=1000), factors=["recenter"], bootstrap=20,
                         max_extract=0)
    rows = {r["value"]: r for r in run_ablation(cfg)["settings"]}
    plain, fixed = rows["not recentred"], rows["recentred on the target's task-train mean"]
    for r in (plain, fixed):
        assert {"macro_f1", "majority_rate", "top_prediction_share"} <= set(r["mapped"])
        assert r["native_target_macro_f1"] > 0.6 and r["mapped"]["majority_rate"] == pytest.approx(1 / 3, abs=0.02)
    # ... so the map, right on the public set, sends every task state to class 0: collapse, flagged.
    assert plain["mapped"]["top_prediction_share"] >= 0.9 and plain["collapse"]
    assert "one class" in plain["collapse_reason"] and "macro-F1" in plain["collapse_reason"]
    # Moving the mapped task-train mean onto the target's own undoes it.
    assert not fixed["collapse"] and fixed["collapse_reason"] is None
    assert fixed["mapped_drop"] < 0.05 and fixed["mapped"]["top_prediction_share"] < 0.5
    # The shift is the task's, not the public set's: task states align better, public rows worse.
    assert fixed["alignment_task_test"]["r2"] > plain["alignment_task_test"]["r2"] + 0.3
    assert fixed["alignment_public"]["r2"] < plain["alignment_public"]["r2"]


def test_the_adaptation_factor_rows_each_variant_with_intervals_and_its_record(synthetic):
    """The two-party adaptation (the source's unlabelled task-train states, the target's published class statistics)
    as a factor: the plain map, the default adaptation and each variant, each a row with intervals."""
    cfg = AblationConfig(source=synthetic["source"], target=synthetic["target"], task=synthetic["task"],
                         base=Recipe(mix=f"{synthetic['public']}:1", size=1000), factors=["adaptation"], bootstrap=20,
                         max_extract=0)
    rows = [r for r in run_ablation(cfg)["settings"] if r["factor"] == "adaptation"]
    assert [r["value"] for r in rows] == [
        "not adapted (leave-task-out map)",
        "adapted: weight 0.3, 5 rounds, 5 EM steps (1 component per 5 texts), shrinkage Ledoit-Wolf",
        "adapted: weight 0.1, 5 rounds, 5 EM steps (1 component per 5 texts), shrinkage Ledoit-Wolf",
        "adapted: weight 0.5, 5 rounds, 5 EM steps (1 component per 5 texts), shrinkage Ledoit-Wolf",
        "adapted: weight 0.3, 1 round, 5 EM steps (1 component per 5 texts), shrinkage Ledoit-Wolf",
        "adapted: weight 0.3, 5 rounds, 0 EM steps (1 component per 5 texts), shrinkage Ledoit-Wolf",
        "adapted: weight 0.3, 5 rounds, 5 EM steps (1 component per 5 texts), shrinkage 0"]
    plain, adapted = rows[0], rows[1]
    assert "adaptation" not in plain and adapted["adaptation"]["weight"] == 0.3
    assert adapted["adaptation"]["private_rows"] == 420  # the task's train split: 0.7 of its 600 rows
    assert adapted["adaptation"]["lambda"] == plain["chosen_lambda"]  # refitted at the public fit's λ
    assert adapted["alignment_task_test"]["r2"] != plain["alignment_task_test"]["r2"]
    for row in rows:
        low, high = row["mapped"]["accuracy_ci"]
        assert low <= row["mapped"]["accuracy"] <= high
    with pytest.raises(AblationError, match="ridge base recipe"):
        run_ablation(AblationConfig(factors=["adaptation"], base=Recipe(estimator="procrustes")))


def test_synthetic_anchors_enter_every_adapted_setting_at_its_weight(synthetic, tiny_models, tmp_path):
    """--synthetic: a set the tiny writer writes, extracted by both models, is the anchors of every adapted setting
    (as `xsilo align` weighs a public set's anchors); a setting of another anchor weight fits another map."""
    settings = tmp_path / "synthetic.yaml"
    settings.write_text(f"synthetic:\n  prompts: ['write about {{topic}}']\n  rows: 6\n  model: {synthetic['source']}\n"
                        "  min_chars: 1\n  max_new_tokens: 6\n  batch_size: 4\n  max_batches: 20\n")
    cfg = AblationConfig(source=synthetic["source"], target=synthetic["target"], task=synthetic["task"],
                         base=Recipe(mix=f"{synthetic['public']}:1", size=1000), factors=["adaptation"], bootstrap=20,
                         max_extract=0, synthetic=str(settings),
                         adaptations=[AdaptationSettings(anchor_weight=0.6)])
    results = run_ablation(cfg)
    rows = [r for r in results["settings"] if r["factor"] == "adaptation"]
    assert [r["value"].rsplit(", ", 1)[-1] for r in rows[1:]] == ["shrinkage Ledoit-Wolf", "anchors 0.6"]
    assert [(r["adaptation"]["anchor_rows"], r["adaptation"]["anchor_weight"]) for r in rows[1:]] == [(6, 0.3),
                                                                                                      (6, 0.6)]
    assert rows[1]["alignment_task_test"]["r2"] != rows[2]["alignment_task_test"]["r2"]
    assert "synthetic set of" in markdown_report(results)
    with pytest.raises(AblationError, match="not both"):
        run_ablation(AblationConfig(factors=["view", "adaptation"], synthetic=str(settings)))


def test_estimator_criterion_and_whitening_factors(synthetic):
    cfg = AblationConfig(source=synthetic["source"], target=synthetic["target"], task=synthetic["task"],
                         base=Recipe(mix=f"{synthetic['public']}:1", size=1000),
                         factors=["estimator", "criterion", "whiten_target"],
                         fit=FitSettings(lambdas=(1e-3, 1e-1, 10.0)),
                         estimators=["reduced_rank", "cca"], ranks=["k-1", 8, 64],
                         whiten_estimators=["ridge", "reduced_rank"], bootstrap=20, max_extract=0)
    results = run_ablation(cfg)
    by = {(r["factor"], r["value"]): r for r in results["settings"]}
    for r in results["settings"]:
        if r["status"] == "ok":
            assert {"macro_f1", "majority_rate", "top_prediction_share"} <= set(r["mapped"])
            assert isinstance(r["collapse"], bool)
    # "k-1" is 2 for the three-class task; a rank above min(d_x, d_y) = 32 is skipped with the reason.
    assert by["estimator", "reduced_rank rank 2 λ by auto"]["status"] == "ok"
    assert by["estimator", "cca rank 8 λ by auto"]["status"] == "ok"
    skipped = by["estimator", "cca rank 64 λ by auto"]
    assert skipped["status"] == "skipped" and "rank must be an integer in 1..min(d_x, d_y)=32" in skipped["reason"]
    # Rank r keeps the map's r directions of most (fitted) target variance, which need not hold the classes' (weak)
    # directions: fewer directions, less of the target and a lower mapped accuracy than the full ridge map.
    ridge = by["estimator", "ridge λ by auto"]
    r2 = [by["estimator", f"reduced_rank rank {r} λ by auto"]["alignment_task_test"]["r2"] for r in (2, 8)]
    assert r2[0] < r2[1] < ridge["alignment_task_test"]["r2"]
    assert by["estimator", "reduced_rank rank 2 λ by auto"]["mapped"]["accuracy"] < ridge["mapped"]["accuracy"] - 0.1
    # Each criterion is recorded as the one that chose λ, from the same path.
    for crit in ("gcv", "val_mse", "head"):
        row = by["criterion", f"λ by {crit}"]
        assert row["lambda_path"]["criterion"] == crit and row["chosen_lambda"] in (1e-3, 1e-1, 10.0)
        # The path's mapped test scores at every λ agree with the row's own map at the λ it chose.
        points = {p["lambda"]: p for p in row["lambda_path"]["points"]}
        assert set(points) == {1e-3, 1e-1, 10.0}
        assert points[row["chosen_lambda"]]["accuracy"] == pytest.approx(row["mapped"]["accuracy"], abs=0.02)
    assert "Best on the path in hindsight" in markdown_report(results)
    # Whitening is a no-op for ridge (same predictions), and changes the rank-constrained map.
    raw, white = by["whiten_target", "ridge, raw target"], by["whiten_target", "ridge, whitened target"]
    assert white["mapped"]["accuracy"] == raw["mapped"]["accuracy"]
    assert white["alignment_task_test"]["r2"] == pytest.approx(raw["alignment_task_test"]["r2"], abs=1e-6)
    rr_raw = by["whiten_target", "reduced_rank rank 2, raw target"]
    rr_white = by["whiten_target", "reduced_rank rank 2, whitened target"]
    assert rr_white["alignment_task_test"]["r2"] != pytest.approx(rr_raw["alignment_task_test"]["r2"], abs=1e-4)
    with pytest.raises(AblationError, match="ranks must be positive integers"):
        run_ablation(AblationConfig(ranks=[0]))
    with pytest.raises(AblationError, match="unknown criteria"):
        run_ablation(AblationConfig(criteria=["aic"]))


def test_the_broad_mix_is_every_registry_source_but_the_task_and_drops_the_tasks_texts(synthetic, monkeypatch):
    from datamodules.recipes import registry_sources
    from lightning_modules.experiments import ablation

    mix = parse_mix(broad_mix("bbc", ["vader-tweets"]))
    assert set(mix) == set(registry_sources()) - {"bbc", "vader-tweets"} and "movie-dialog" in mix
    assert set(mix.values()) == {1 / len(mix)}
    calls = []
    monkeypatch.setattr(ablation, "build_public_set", lambda **kw: calls.append(kw) or "built.jsonl")
    monkeypatch.setattr(ablation.Ablation, "_cached_texts", lambda self: set())
    run = ablation.Ablation(AblationConfig(task="bbc", ood=["vader-tweets"], base=Recipe(mix="broad")), work=None)
    assert run.public_set(run.cfg.base) == "built.jsonl"
    assert calls[0]["mix"] == broad_mix("bbc", ["vader-tweets"])
    assert set(calls[0]["exclude_datasets"]) == {"bbc", "vader-tweets"}
