"""Extraction under DDP on CPU: 2 spawned processes write exactly the cache 1 process writes."""

from __future__ import annotations

import pytest

from datamodules.cache import StateCache
from datamodules.extraction import ExtractionConfig, extract

from tests.tiny import write_tiny_csv


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_process_group")
def test_ddp_spawn_two_processes_equal_one(tiny_models, tmp_path):
    data = write_tiny_csv(tmp_path / "rows.csv", n=83)  # 6 shards of 16 rows, uneven across ranks
    cfg = ExtractionConfig(model=str(tiny_models["llama"]), data=str(data), batch_size=5)
    single = extract(cfg, cache_root=tmp_path / "one", shard_size=16, progress=False)
    double = extract(cfg, cache_root=tmp_path / "two", shard_size=16, progress=False,
                     devices=2, strategy="ddp_spawn", threads=1)
    one, two = StateCache(single.path, verify=True), StateCache(double.path, verify=True)
    assert one.n_rows == two.n_rows == 83
    assert [s["sha256"] for s in one.manifest["shards"]] == [s["sha256"] for s in two.manifest["shards"]]
    assert (one.all() == two.all()).all()
    assert (one.labels == two.labels).all()
