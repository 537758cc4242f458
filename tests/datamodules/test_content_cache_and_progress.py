"""Issue 27: the state cache is content-addressed (the same rows under two names, splits or labels are extracted
once); extraction's time left comes from the work done per second in the order it runs; long commands end with a
time per stage; xsilo's commands print no Lightning banners."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datamodules.cache import StateCache
from datamodules.extraction import ExtractionConfig, extract, resolve
from datamodules.progress import Progress, ProgressLines, StageTimes, record_stage

from tests.tiny import write_tiny_csv

ROOT = Path(__file__).resolve().parents[2]


def test_the_same_rows_under_another_name_are_extracted_once(tiny_models, tmp_path):
    model = str(tiny_models["llama"])
    first = write_tiny_csv(tmp_path / "mytask.csv", n=40)
    other = tmp_path / "elsewhere" / "renamed.csv"
    other.parent.mkdir()
    other.write_bytes(first.read_bytes())
    a = extract(ExtractionConfig(model=model, data=str(first)), threads=1, progress=False)
    b = extract(ExtractionConfig(model=model, data=str(other)), threads=1, progress=False)
    assert not a.hit and b.hit and b.computed_shards == 0 and b.path != a.path  # its own folder, no forward pass
    np.testing.assert_array_equal(StateCache(b.path, verify=True).all(), StateCache(a.path).all())
    # the texts alone decide: the same rows read without their labels reuse them too, with their own (no) labels
    c = extract(ExtractionConfig(model=model, data=str(other), label_column=None), threads=1, progress=False)
    assert c.hit and StateCache(c.path).labels is None and StateCache(b.path).labels is not None
    manifest = (c.path / "manifest.json").read_text()
    assert '"texts_sha256"' in manifest
    # another view of the same rows is not the same states
    d = extract(ExtractionConfig(model=model, data=str(other), max_length=8), threads=1, progress=False)
    assert not d.hit and d.computed_shards == 1
    # different rows are never taken for the same ones
    write_tiny_csv(tmp_path / "changed.csv", n=41)
    assert not extract(ExtractionConfig(model=model, data=str(tmp_path / "changed.csv")), threads=1,
                       progress=False).hit


def test_a_registry_name_and_its_file_share_one_extraction(tiny_models, tmp_path, monkeypatch, isolated_home):
    model = str(tiny_models["llama"])
    data = write_tiny_csv(tmp_path / "mytask.csv", n=30)
    registry = tmp_path / "registry.yaml"
    registry.write_text(f"datasets:\n  mytask:\n    file: {data}\n")
    monkeypatch.setenv("XSILO_REGISTRY", str(registry))
    by_file = extract(ExtractionConfig(model=model, data=str(data)), threads=1, progress=False)
    by_name = extract(ExtractionConfig(model=model, data="mytask"), threads=1, progress=False)
    assert not by_file.hit and by_name.hit and resolve(ExtractionConfig(model=model, data="mytask")).directory \
        != by_file.path


def test_time_left_follows_the_work_done_not_the_rows():
    """Rows sorted longest first: after the first quarter of the rows (half the work) in 10 s, 10 s are left."""
    out = io.StringIO()
    progress = Progress("extract", total=100, stream=out, every_s=3600, work=200.0)
    progress.last -= 3601
    progress.t0 -= 10
    progress.update(25, work=100.0)
    assert re.search(r"25/100 rows \(25%\), 2\.5 rows/s, ~10s left", out.getvalue()), out.getvalue()
    rows_only = Progress("extract", total=100, stream=io.StringIO(), every_s=3600)
    rows_only.t0 -= 10
    rows_only.done = 25
    assert rows_only.seconds_left(10.0) == pytest.approx(30.0)  # without costs: the rows left at rows/s


def test_extraction_weighs_its_batches_by_padded_tokens_in_the_order_they_run(tiny_models, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setenv("XSILO_PROGRESS_S", "0")
    rows = ["text,label"] + [f"\"{' '.join(['good film'] * (1 + i % 7))} {i}\",c{i % 2}" for i in range(64)]
    data = tmp_path / "mixed.csv"
    data.write_text("\n".join(rows) + "\n")
    seen: list[list[float]] = []
    original = ProgressLines.on_predict_start

    def spy(self, trainer, module):
        original(self, trainer, module)
        seen.append(list(self.costs))

    monkeypatch.setattr(ProgressLines, "on_predict_start", spy)
    extract(ExtractionConfig(model=str(tiny_models["llama"]), data=str(data), batch_size=8), threads=1)
    (costs,) = seen
    assert len(costs) == 8 and costs == sorted(costs, reverse=True) and costs[0] > costs[-1]
    lines = [line for line in capsys.readouterr().err.splitlines() if " left" in line]
    assert lines and all("rows/s" in line for line in lines)


def test_stage_times_add_up_and_extraction_reports_into_the_active_one():
    with StageTimes() as times:
        with times.stage("fetch"):
            pass
        record_stage("extract m d:train", 12.0)
        record_stage("extract m d:train", 3.0)
    record_stage("outside", 1.0)  # no active StageTimes: ignored
    line = times.summary()
    assert line.startswith("time per stage: fetch ") and "extract m d:train 15s" in line and "outside" not in line
    assert line.rstrip().split("; total ")[1]


def test_xsilo_commands_print_no_lightning_banners(tiny_models, tmp_path):
    data = write_tiny_csv(tmp_path / "rows.csv", n=20)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "XSILO_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-m", "lightning_modules.cli", "extract", "--model",
                             str(tiny_models["llama"]), "--data", str(data), "--threads", "1"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for banner in ("GPU available", "TPU available", "litlogger", "💡"):
        assert banner not in result.stderr, result.stderr
    assert "computed 1 shard(s)" in result.stderr
