"""The demo's two-party figures beside the one-machine lab and fused serving, and a check that the homes stay apart.

    python -m lightning_modules.reporting.two_party_report RUN PROVIDER_HOME CLIENT_HOME

Reads RUN/bbc (the lab's `xsilo evaluate`: mapped accuracy and its map folder), RUN/serve.json (fused mode),
RUN/two-party.json (split mode, from `serve.demo_check`), RUN/two-party/client/aligner (the map the client
queries with: adapted to its private texts by `xsilo align --private`) and RUN/two-party/client/aligner/public-map (the
same private fit without --private: the public-set map, which must equal the lab's; a run without it compares the
queried map), and when present RUN/two-party-anchors.json with RUN/two-party/client/aligner-anchored (the same
align against the public set with anchors).
Prints one table, writes RUN/two-party-summary.json, and exits 1 when either home holds the other party's model
or states (a model folder, or a state cache of the other's model identity).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.cache import atomic_write_json
from serve.formats.exports import LinearExport


def home_models(home: Path) -> dict[str, Any]:
    """What a home holds: its model folders, and its state caches with their model identities."""
    manifests = sorted(home.glob("states/*/manifest.json"))
    identities = {str((json.loads(m.read_text()).get("key") or {}).get("model_identity")) for m in manifests}
    folders = {p.name for p in (home / "models").iterdir()} if (home / "models").is_dir() else set()
    return {"model_folders": folders, "state_identities": identities, "state_caches": len(manifests)}


def isolation(provider_home: Path, client_home: Path) -> tuple[dict[str, Any], list[str]]:
    provider, client = home_models(provider_home), home_models(client_home)
    problems = []
    for name, mine, theirs in (("client", client, provider), ("provider", provider, client)):
        shared_folders = mine["model_folders"] & theirs["model_folders"]
        shared_states = mine["state_identities"] & theirs["state_identities"]
        if shared_folders:
            problems.append(f"the {name}'s home holds the other party's model folder(s) {sorted(shared_folders)}")
        if shared_states:
            problems.append(f"the {name}'s home holds states of the other party's model ({len(shared_states)} cache(s))")
    summary = {name: {"model_folders": sorted(h["model_folders"]), "state_caches": h["state_caches"],
                      "models_of_states": len(h["state_identities"])}
               for name, h in (("provider", provider), ("client", client))}
    return summary, problems


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def main(run: Path, provider_home: Path, client_home: Path) -> int:
    lab = json.loads((run / "bbc" / "metrics.json").read_text())
    fused = json.loads((run / "serve.json").read_text())
    split = json.loads((run / "two-party.json").read_text())
    labels_file = run / "two-party-labels.json"
    labels = json.loads(labels_file.read_text()) if labels_file.is_file() else None
    anchors_file = run / "two-party-anchors.json"
    anchored = json.loads(anchors_file.read_text()) if anchors_file.is_file() else None
    private_dir, public_dir = run / "two-party" / "client" / "aligner", run / "two-party" / "client" / "aligner" / "public-map"
    lab_map, private_map = LinearExport.from_pretrained(run / "bbc" / "map"), LinearExport.from_pretrained(private_dir)
    public_map = LinearExport.from_pretrained(public_dir) if public_dir.is_dir() else private_map
    private_fit = private_map.manifest.get("metrics", {}).get("private_fit", {})
    adaptation = private_fit.get("adaptation")
    figures = {
        "lab_mapped_accuracy": lab["classification"]["mapped"]["accuracy"],
        "lab_native_accuracy": lab["classification"]["native_target"]["accuracy"],
        "lab_test_docs": lab["rows"]["task_test"],
        "fused_accuracy": fused["accuracy_encrypted"], "fused_queries": fused["queries"],
        "split_accuracy": split["accuracy_encrypted"], "split_queries": split["queries"],
        "split_agree": split["agree"], "split_median_total_ms": split["median_total_ms"],
        "split_median_server_ms": split["median_server_ms"],
        "public_map_accuracy": split.get("accuracy_public_map"),  # the unadapted map on the same texts (plaintext)
        "map_weight_rel_error_vs_lab": relative_error(public_map.weight, lab_map.weight),  # the public-set map's
        "map_bias_rel_error_vs_lab": relative_error(public_map.bias, lab_map.bias),
        "lambda_lab": lab_map.manifest.get("chosen_lambda"), "lambda_private": public_map.manifest.get("chosen_lambda"),
        "adaptation": None if not adaptation else {
            k: adaptation.get(k) for k in ("private_rows", "weight", "rounds", "em_iterations", "class_shares",
                                           "val_r2", "priors")},
        "private_fit": {k: private_fit.get(k) for k in ("bytes_sent", "bytes_received", "provider_ms", "client_ms")},
        "label_only": None if labels is None else {
            k: labels.get(k) for k in ("queries", "agree", "rows_within_margin", "label_margin", "accuracy_encrypted",
                                       "accuracy_plaintext", "median_total_ms", "median_server_ms", "bytes_sent",
                                       "bytes_received")},
        "anchored": None if anchored is None else {
            "accuracy_encrypted": anchored["accuracy_encrypted"], "queries": anchored["queries"],
            "agree": anchored["agree"], "accuracy_public_map": anchored.get("accuracy_public_map"),
            "anchors": LinearExport.from_pretrained(run / "two-party" / "client" / "aligner-anchored").manifest.get(
                "metrics", {}).get("private_fit", {}).get("anchors")},
    }
    homes, problems = isolation(provider_home, client_home)
    figures["homes"], figures["home_problems"] = homes, problems
    print(f"{'mode':44s} {'accuracy':>8s}  texts")
    print(f"{'one machine (lab: xsilo evaluate, mapped)':44s} {figures['lab_mapped_accuracy']:8.3f}  "
          f"{figures['lab_test_docs']} test docs (native Gemma-3 {figures['lab_native_accuracy']:.3f})")
    print(f"{'fused serving (provider holds map + head)':44s} {figures['fused_accuracy']:8.3f}  "
          f"first {figures['fused_queries']}")
    adapted = figures["adaptation"]
    two = "two parties (private fit" + (f", adapted to {adapted['private_rows']} private texts" if adapted else "")
    print(f"{two + ', split queries)':44s} {figures['split_accuracy']:8.3f}  "
          f"first {figures['split_queries']} (encrypted = plaintext on {figures['split_agree']})")
    label_only = figures["label_only"]
    if label_only is not None:
        print(f"{'two parties, the head served label-only':44s} {label_only['accuracy_encrypted']:8.3f}  "
              f"first {label_only['queries']} (label = plaintext argmax on {label_only['agree']}; "
              f"{label_only['rows_within_margin']} within the margin)")
    if figures["public_map_accuracy"] is not None:
        print(f"{'  the public-set map alone (no --private)':44s} {figures['public_map_accuracy']:8.3f}  "
              f"first {figures['split_queries']} (plaintext)")
    anchored = figures["anchored"]
    if anchored is not None:
        rows = (anchored["anchors"] or {}).get("rows")
        print(f"{f'two parties, the public set with {rows} anchors':44s} {anchored['accuracy_encrypted']:8.3f}  "
              f"first {anchored['queries']} (encrypted = plaintext on {anchored['agree']}; its public-set map alone "
              f"{anchored['accuracy_public_map']:.3f})")
    pf = figures["private_fit"]
    print(f"private public-set map vs the lab's: weight rel. error {figures['map_weight_rel_error_vs_lab']:.1e}, bias "
          f"{figures['map_bias_rel_error_vs_lab']:.1e}; λ {figures['lambda_private']} (lab {figures['lambda_lab']}); "
          f"fit traffic {((pf['bytes_sent'] or 0) + (pf['bytes_received'] or 0)) / 1e6:.1f} MB, provider "
          f"{(pf['provider_ms'] or 0) / 1000:.1f} s")
    print(f"split query median {figures['split_median_total_ms']:.0f} ms end to end, "
          f"{figures['split_median_server_ms']:.1f} ms on the server")
    if label_only is not None:
        print(f"label-only query median {label_only['median_total_ms']:.0f} ms end to end, "
              f"{label_only['median_server_ms']:.1f} ms of the provider's time; "
              f"{(label_only['bytes_sent'] + label_only['bytes_received']) / 1e6 / label_only['queries']:.2f} MB "
              "per text (keys and session included)")
    for name, h in homes.items():
        print(f"{name} home: model folders {h['model_folders']}, {h['state_caches']} state cache(s) of "
              f"{h['models_of_states']} model(s)")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    atomic_write_json(run / "two-party-summary.json", figures)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python -m lightning_modules.reporting.two_party_report RUN PROVIDER_HOME CLIENT_HOME")
    raise SystemExit(main(*(Path(a) for a in sys.argv[1:])))
