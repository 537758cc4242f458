"""The demo's two-party figures: the queried map is adapted to the client's private texts (`xsilo align --private`),
the public-set map alone (`xsilo align` without it) is the one held against the lab's."""

from __future__ import annotations

import json

from datamodules.cache import atomic_write_json
from lightning_modules.reporting.two_party_report import main
from serve.formats.exports import LinearExport
from serve.formats.maps import write_map_folder

from tests.serve.serve_support import write_small_map


def write_run(run, adapted: bool):
    (run / "bbc").mkdir(parents=True)
    atomic_write_json(run / "bbc" / "metrics.json", {
        "classification": {"mapped": {"accuracy": 0.6}, "native_target": {"accuracy": 0.85}}, "rows": {"task_test": 60}})
    atomic_write_json(run / "serve.json", {"accuracy_encrypted": 0.8, "queries": 30})
    split = {"accuracy_encrypted": 0.9, "queries": 60, "agree": 60, "median_total_ms": 200.0, "median_server_ms": 11.0}
    atomic_write_json(run / "two-party.json", {**split, **({"accuracy_public_map": 0.6} if adapted else {})})
    write_small_map(run / "bbc" / "map", 6, 4, seed=1)  # the lab's map
    client = run / "two-party" / "client"
    if not adapted:  # a run from before --private: the queried map is the private fit's own
        write_small_map(client / "aligner", 6, 4, seed=1)
        return
    other = LinearExport.from_pretrained(write_small_map(client / "aligner", 6, 4, seed=2), "map")
    config = json.loads((client / "aligner" / "config.json").read_text())
    config["metrics"] = {"private_fit": {"bytes_sent": 1, "adaptation": {
        "private_rows": 278, "weight": 0.3, "rounds": 5, "em_iterations": 5, "class_shares": [0.2] * 5,
        "val_r2": 0.4, "priors": "published"}}}
    write_map_folder(client / "aligner", other.weight, other.bias, config)
    write_small_map(client / "aligner" / "public-map", 6, 4, seed=1)  # the private fit alone equals the lab's


def test_the_public_map_is_held_against_the_lab_and_the_adapted_one_is_queried(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, adapted=True)
    (tmp_path / "p").mkdir(), (tmp_path / "c").mkdir()
    assert main(run, tmp_path / "p", tmp_path / "c") == 0
    figures = json.loads((run / "two-party-summary.json").read_text())
    assert figures["map_weight_rel_error_vs_lab"] < 1e-6 and figures["lambda_private"] == 1.0
    assert (figures["split_accuracy"], figures["public_map_accuracy"]) == (0.9, 0.6)
    assert figures["adaptation"]["private_rows"] == 278 and figures["private_fit"]["bytes_sent"] == 1
    out = capsys.readouterr().out
    assert "adapted to 278 private texts" in out and "the public-set map alone (no --private)" in out


def test_a_run_without_private_texts_reports_as_before(tmp_path):
    run = tmp_path / "run"
    write_run(run, adapted=False)
    (tmp_path / "p").mkdir(), (tmp_path / "c").mkdir()
    assert main(run, tmp_path / "p", tmp_path / "c") == 0
    figures = json.loads((run / "two-party-summary.json").read_text())
    assert figures["map_weight_rel_error_vs_lab"] < 1e-6 and figures["adaptation"] is None
    assert figures["public_map_accuracy"] is None


def test_the_anchored_align_gets_its_own_line(tmp_path, capsys):
    """With RUN/two-party-anchors.json (the align against the public set with anchors), the report prints its
    accuracy and the anchors the map records; the public-set map held against the lab's stays the unanchored one."""
    run = tmp_path / "run"
    write_run(run, adapted=True)
    anchored = run / "two-party" / "client" / "aligner-anchored"
    other = LinearExport.from_pretrained(write_small_map(anchored, 6, 4, seed=3), "map")
    config = json.loads((anchored / "config.json").read_text())
    config["metrics"] = {"private_fit": {"anchors": {"rows": 48, "weight": 0.3}}}
    write_map_folder(anchored, other.weight, other.bias, config)
    atomic_write_json(run / "two-party-anchors.json", {"accuracy_encrypted": 0.95, "queries": 20, "agree": 20,
                                                       "accuracy_public_map": 0.7})
    (tmp_path / "p").mkdir(), (tmp_path / "c").mkdir()
    assert main(run, tmp_path / "p", tmp_path / "c") == 0
    figures = json.loads((run / "two-party-summary.json").read_text())
    assert figures["anchored"] == {"accuracy_encrypted": 0.95, "queries": 20, "agree": 20,
                                   "accuracy_public_map": 0.7, "anchors": {"rows": 48, "weight": 0.3}}
    assert figures["map_weight_rel_error_vs_lab"] < 1e-6  # still the unanchored public map against the lab's
    assert "the public set with 48 anchors" in capsys.readouterr().out
