"""The two parties' commands and the public set they share: `public-set build`, `public-set export`, `head fit`,
`align` and `export`. Each is a typed function whose signature is its options (see `lightning_modules.cli`); the
drivers are imported when a command runs."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from datamodules.commands import quiet
from lightning_modules.settings import (AdaptationSettings, DeviceSettings, ExtractionSettings, FitSettings,
                                       HeadSettings)
from serve.formats.splits import SPLIT


def public_set_build(
    *,
    sources: list[str] | None = None,
    mix: str | None = None,
    leave_out: str | None = None,
    size: int | None = None,
    exclude_tasks: list[str] | None = None,
    exclude_datasets: list[str] | None = None,
    name: str | None = None,
    models: list[str] | None = None,
    val_fraction: float = SPLIT.val_fraction,
    test_fraction: float = SPLIT.test_fraction,
    split_seed: int = SPLIT.seed,
    seed: int = 0,
    strict: bool = False,
    view: ExtractionSettings = ExtractionSettings(),
    device: DeviceSettings = DeviceSettings(),
) -> None:
    """Compose the shared public set from unlabelled sources; it never holds a task's validation or test texts.

    Writes $XSILO_HOME/public/NAME/NAME.jsonl and manifest.json and prints the .jsonl path: pass it as
    --public to evaluate, evaluate_ood or study (or as data: in configs/data/public.yaml).

    Args:
        sources: datasets to draw from (registry names, local .csv/.jsonl/.txt files, hub ids); labels are dropped.
        mix: domain weights, e.g. movie-dialog:0.5,bbc:0.5 (names not in --sources are added).
        leave_out: a task whose domain the set must not know: every registry dataset but it, in equal weights,
            with every text of it removed (the study's leave-task-out regime; not with --sources or --mix).
        size: rows in the set (default: every eligible row; with a mix, the largest set that meets it).
        exclude_tasks: tasks whose validation and test texts are removed, as NAME or NAME@LIMIT (the task_limit
            the task is evaluated with), read with --text_column and --label_column; labelled sources are always
            added (a file source is labelled when it has the --label_column column).
        exclude_datasets: datasets whose every text is removed (e.g. OOD test sets).
        name: the set's name under $XSILO_HOME/public/ (or a folder path); default public-<fingerprint>.
        models: fill these models' state caches from rows already cached for the same texts (rows cached for
            all of them are drawn first); only texts no cache holds run through a model.
        val_fraction: the tasks' validation fraction (the one split spec's, serve.formats.splits).
        test_fraction: the tasks' test fraction.
        split_seed: the tasks' split seed.
        seed: sampling seed.
        strict: fail instead of redistributing when the size or mix cannot be met.
        view: the states of the --models caches (--pooling, --layer, --max_length, --dtype, --batch_size; use the
            ones you evaluate with; null max_length: each model's own limit, capped, as `evaluate` reads it by
            default) and the columns of file and hub sources and of the tasks (--text_column, --label_column; with
            --leave_out, the task's alone: the registry sources keep their own).
        device: where any extraction for --models runs (--accelerator, --devices, --threads); --precision sets
            the dtype (bf16-* is bfloat16, 16-* float16; the dtype is part of the cache key).
    """
    from datamodules.extraction import ExtractionConfig
    from datamodules.prefill import cached_texts, prefill_states
    from datamodules.public_set import PublicSetError, build_public_set, read_manifest
    from datamodules.recipes import leave_task_out_recipe
    from datamodules.registry import is_registered

    quiet()
    columns = (view.text_column, view.label_column)
    sources_read = dict(text_column=view.text_column, label_column=view.label_column)
    if leave_out is not None:
        if sources or mix:
            raise PublicSetError(f"--leave_out {leave_out} draws from every registry dataset but {leave_out} in "
                                 "equal weights; drop --sources and --mix, or drop --leave_out")
        recipe = leave_task_out_recipe(leave_out, exclude_tasks or [], size)
        sources, mix = list(recipe.sources), recipe.mix
        exclude_datasets = [*(exclude_datasets or ()), *recipe.exclude_datasets]
        sources_read = {}  # registry sources, read with their own columns
    view = replace(view, dtype=device.forward_dtype(view.dtype))
    prefer = cached_texts(models, view.pooling, view.layer, view.max_length, view.dtype) if models else None
    path = build_public_set(sources or (), size=size, mix=mix, exclude_tasks=exclude_tasks, out=name,
                            exclude_datasets=exclude_datasets or (), val_fraction=val_fraction,
                            test_fraction=test_fraction, split_seed=split_seed, seed=seed, **sources_read,
                            task_columns=columns, prefer=prefer, strict=strict)
    m = read_manifest(path)
    parts = ", ".join(f"{s['name']} {s['selected']}" for s in m["sources"])
    print(f"{m['rows']} rows ({parts}); excluded {m['excluded']['rows_total']} held-out/excluded texts of "
          f"{', '.join(t['task'] for t in m['excluded']['tasks']) or 'no task'}", file=sys.stderr)
    unlabelled = [s["name"] for s in m["sources"]
                  if not s["labels_dropped"] and not is_registered(s["name"], "dataset")]
    if unlabelled:
        print(f"read as unlabelled, so no held-out text of theirs was removed: {', '.join(unlabelled)}; if one holds a "
              f"task's labels, name their column with --label_column (no column {view.label_column!r} was found)",
              file=sys.stderr)
    for model in models or ():
        r = prefill_states(ExtractionConfig(model=model, data=str(path), pooling=view.pooling, layer=view.layer,
                                            max_length=view.max_length, dtype=view.dtype, batch_size=view.batch_size,
                                            label_column=None),
                           **device.extraction_kwargs())
        print(f"{model}: {'cache hit' if r.hit else f'{r.reused} rows reused, {r.extracted} extracted'}",
              file=sys.stderr)
    print(path)


def public_set_export(
    *,
    model: str,
    data: str,
    out: str,
    limit: int | None = None,
    val_fraction: float = SPLIT.public_val_fraction,
    seed: int = SPLIT.public_seed,
    name: str | None = None,
    anchors: str | None = None,
    extraction: ExtractionSettings = ExtractionSettings(),
    overwrite: bool = False,
    device: DeviceSettings = DeviceSettings(),
) -> None:
    """Provider: write the public-states folder a private fit needs (`xsilo serve --public DIR`).

    It holds the public texts, their fingerprint, the train/val split and MODEL's states on each part; only the
    texts, the fingerprint and the split are ever published. A recipe file sets the extraction settings:
    --config configs/recipe/bbc.yaml (its other sections are skipped).

    Args:
        model: the provider's model (registry name, folder or hub id).
        data: the public set: a registry dataset, a file, or a set from `xsilo public-set build` (its .jsonl).
        out: output folder (must be empty or missing unless --overwrite).
        limit: keep N rows (a seeded random sample).
        val_fraction: share of rows held out to choose the client's ridge λ (the one split spec's public split).
        seed: split seed.
        name: the set's published name (default: the data's file name).
        anchors: texts every client's fit gives a weight of its choosing (default 30%), outside the split: a
            synthetic set from `xsilo public-set synthesize` (its .jsonl), or any file of texts you may publish.
        extraction: how MODEL's states are read (pooling, layer, max_length, dtype, batch_size).
        overwrite: replace an existing folder.
        device: where any extraction runs (--accelerator, --devices, --threads; --precision sets the dtype).
    """
    from lightning_modules.parties.public_states import export_public_states

    quiet()
    extraction = replace(extraction, dtype=device.forward_dtype(extraction.dtype))
    path = export_public_states(model, data, out, limit=limit, val_fraction=val_fraction, seed=seed, name=name,
                                anchors=anchors, extraction=extraction, device=device, overwrite=overwrite)
    manifest = json.loads((path / "manifest.json").read_text())
    anchored = f", {manifest['anchors']['rows']} anchors" if manifest.get("anchors") else ""
    print(f"{manifest['rows']} rows ({manifest['parts']['train']} train, {manifest['parts']['val']} val{anchored}) "
          f"of {manifest['hidden_size']}-d states, fingerprint {manifest['fingerprint'][:16]}", file=sys.stderr)
    print(path)


def head_fit(
    *,
    model: str,
    task: str,
    out: str,
    publish_ood: bool = False,
    ood_tpr: float = 0.95,
    mahalanobis_shrinkage: float = 1e-2,
    task_limit: int | None = None,
    extraction: ExtractionSettings = ExtractionSettings(),
    head: HeadSettings = HeadSettings(),
    seed: int = 0,
    overwrite: bool = False,
    device: DeviceSettings = DeviceSettings(),
) -> None:
    """Provider: fit a task head on MODEL's own states and write a head export (`xsilo serve --heads DIR`).

    No client model is involved. A recipe file sets the extraction and head settings: --config
    configs/recipe/bbc.yaml (its other sections are skipped).

    Args:
        model: the provider's model (registry name, folder or hub id).
        task: labelled dataset (stratified train/val/test split), as in `xsilo evaluate`.
        out: the head's folder; it is served under the folder's name (must be empty or missing unless --overwrite).
        publish_ood: also publish a feature-space Mahalanobis detector (class means and shared precision of
            MODEL's states, and the class priors: it reveals them), thresholded on the val split, that split-mode
            clients run and `xsilo align --private` adapts its map with.
        ood_tpr: share of val states the detector's threshold keeps.
        mahalanobis_shrinkage: shrinkage of the shared covariance towards a scaled identity.
        task_limit: keep N task rows (a seeded random sample).
        extraction: how states are read (pooling, layer, max_length, dtype, columns of a user's file).
        head: the logistic-regression head.
        seed: split and training seed (recorded in the manifest's metrics).
        overwrite: replace an existing folder.
        device: where it runs (--accelerator, --devices, --precision of fitting, --threads).
    """
    from lightning_modules.parties.heads import HeadConfig, fit_head

    quiet()
    cfg = HeadConfig(model=model, task=task, task_limit=task_limit, extraction=extraction, head=head, device=device,
                     seed=seed, publish_ood=publish_ood, ood_tpr=ood_tpr, mahalanobis_shrinkage=mahalanobis_shrinkage)
    result = fit_head(cfg, out, overwrite=overwrite)
    m = result["metrics"]
    ood = result["feature_ood"]
    print(f"{len(result['label_names'])} classes; native accuracy val {m['native_val']['accuracy']:.3f}, test "
          f"{m['native_test']['accuracy']:.3f}" + (f"; feature OOD threshold {ood['threshold']:.4g} at tpr "
                                                   f"{ood['tpr']}" if ood else ""), file=sys.stderr)
    print(out)


def align(
    *,
    server: str,
    model: str,
    out: str,
    head: str | None = None,
    private: str | None = None,
    private_limit: int | None = None,
    extraction: ExtractionSettings = ExtractionSettings(),
    fit: FitSettings = FitSettings(),
    adaptation: AdaptationSettings = AdaptationSettings(),
    api_key: str | None = None,
    timeout: float = 300.0,
    device: DeviceSettings = DeviceSettings(),
) -> None:
    """Client: fit the map from MODEL into a provider's states by a private fit, and save it as a map folder.

    The provider sends its public texts; MODEL's states on them are encrypted here, the provider multiplies them
    by its own under CKKS, and only this client decrypts the products and solves the ridge map. Neither side
    sees the other's states; the map stays here (`xsilo query --head NAME --aligner OUT`). A recipe file sets
    the extraction and fit settings: --config configs/recipe/bbc.yaml (its other sections are skipped).

    Args:
        server: the provider's base URL (it serves --public DIR).
        model: the client's model (registry name, folder or hub id).
        out: the map folder to write.
        head: a head the provider serves: choose λ by the logit error through it on the public val rows
            (criterion auto = head; the provider must serve --publish_val_logits true; costs one encrypted query
            per direction the maps can reach, at most min(d_A, d_B) + 2 rows, plus the public val rows' logits,
            each charged as a row of the head's budget). Default: λ by GCV.
        private: the client's own unlabelled texts (a registry name or a txt/csv/jsonl/... file; its text column
            is --extraction.text_column; labels are never read): the map saved is the public map adapted to them
            with the class statistics head NAME publishes (needs --head; the provider must run `xsilo head fit
            --publish_ood true`), then matched to its class priors (--adaptation.match_priors; the probe then
            also reads the head on the class means' directions, at most k rows more). The texts and their states
            stay here: the provider receives the same requests whatever they are.
        private_limit: adapt on a seeded sample of this many private texts.
        extraction: how MODEL's states are read (pooling, layer, max_length, dtype; the text column of --private).
        fit: how the map is solved (estimator, λ path and its criterion, centring, standardisation).
        adaptation: how --private adapts the map (weight of the private texts, rounds, EM iterations, shrinkage),
            and the share of the fit's weight the public set's anchors carry when it has them (anchor_weight; the
            provider never learns it).
        api_key: the server's API key (default $XSILO_API_KEY).
        timeout: seconds per HTTP request.
        device: where the extraction runs (--accelerator, --devices, --threads for extraction, key generation
            and encryption; --precision sets the extraction's dtype).
    """
    from datamodules.progress import StageTimes
    from lightning_modules.parties.private_fit import align as run_align
    from serve.client import ServeError
    from serve.http_client import mb

    quiet()
    last, began = [0.0], [time.monotonic()]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0:  # the encrypted upload starts (after extraction): its rate counts from here
            began[0] = last[0] = now
        elif done == total or now - last[0] > float(os.environ.get("XSILO_PROGRESS_S", "10")):
            last[0] = now
            rate = done / max(now - began[0], 1e-9)
            print(f"fit: {done}/{total} public rows sent, {rate:.0f} rows/s, {(total - done) / rate:.0f} s left",
                  file=sys.stderr)

    if private_limit is not None and private is None:
        raise ValueError("--private_limit samples the texts of --private DATA; pass --private, or drop --private_limit")
    extraction = replace(extraction, dtype=device.forward_dtype(extraction.dtype))
    with StageTimes() as times:
        try:
            result = run_align(server, model, out, fit=fit, extraction=extraction, device=device,
                               api_key=api_key or os.environ.get("XSILO_API_KEY"), timeout=timeout, progress=progress,
                               head=head, private=private, private_limit=private_limit, adaptation=adaptation)
        except ServeError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    m = result.metrics
    lam = "none" if m["chosen_lambda"] is None else f"{m['chosen_lambda']:.0e}"
    r2 = "n/a" if m["val_r2"] is None else f"{m['val_r2']:.3f}"
    if m["chosen"]:
        lam += f" by {m['criterion']} (" + ", ".join(f"{k} {v:.0e}" for k, v in m["chosen"].items()) + ")"
    print(f"private fit on {m['rows']['train']} + {m['rows']['val']} public rows: λ {lam}, val R² {r2}; its "
          f"encrypted fit sent {mb(m['bytes_sent'])}, received {mb(m['bytes_received'])}; provider "
          f"{m['provider_ms'] / 1000:.1f} s, client {m['client_ms'] / 1000:.1f} s", file=sys.stderr)
    if "head" in m:
        probed = m["head"]
        print(f"head {probed['name']!r} probed on {probed['probe_rows']} encrypted rows ({probed['ciphertexts']} "
              f"queries) and read on {probed.get('val_rows', 0)} public val rows: {probed['rows_charged']} rows of "
              "the provider's budget", file=sys.stderr)
    if "adaptation" in m:
        a = m["adaptation"]
        shares = ", ".join(f"{v:.2f}" for v in a["class_shares"] or [])
        print(f"adapted to {a['private_rows']} private texts at λ {a['lambda']:.0e} (weight {a['weight']}, "
              f"{a['rounds']} rounds, {a['priors']} priors): class shares [{shares}]; public val R² "
              f"{'n/a' if a['val_r2'] is None else format(a['val_r2'], '.3f')} (unadapted {r2})", file=sys.stderr)
        if "prior_matching" in a:
            before, after = (", ".join(f"{v:.2f}" for v in a["prior_matching"][k]) for k in ("shares_before",
                                                                                               "shares_after"))
            print(f"matched to the head's priors: its predicted shares on the private texts [{before}] -> [{after}]",
                  file=sys.stderr)
    t = m["traffic"]
    print(f"align in all: {t['requests']} requests, {t['queries']} encrypted queries ({t['rows_charged']} rows of the "
          f"provider's budget), sent {t['bytes_sent']:,} B ({mb(t['bytes_sent'])}), received {t['bytes_received']:,} B "
          f"({mb(t['bytes_received'])}); " + "; ".join(
              f"{kind} {v['requests']}x {mb(v['bytes_sent'])} up / {mb(v['bytes_received'])} down"
              for kind, v in t["by_kind"].items()), file=sys.stderr)
    print(times.summary(), file=sys.stderr)
    print(out)


def export(
    *,
    aligner: str,
    classifier: str,
    out: str,
    metrics: str | None = None,
    ood: str | None = None,
    overwrite: bool = False,
) -> None:
    """Fuse an aligner and a target classifier into one linear layer (safetensors + ONNX + manifest).

    Also writes the map alone and the head alone, for split mode.

    Args:
        aligner: the map: an AffineAligner checkpoint (.ckpt), a map folder (`save_pretrained`, e.g.
            `xsilo evaluate --out DIR`'s DIR/map) or a hub id.
        classifier: LinearClassifier checkpoint trained on the aligner's target states.
        out: export directory (must be empty or missing unless --overwrite).
        metrics: a metrics.json to record in the manifest.
        ood: an ood-threshold.json from `xsilo evaluate_ood`, applied by clients to decrypted logits.
        overwrite: replace an existing export.
    """
    from lightning_modules.parties.export import export_checkpoints

    recorded = json.loads(Path(metrics).read_text()) if metrics else None
    thresholds = json.loads(Path(ood).read_text()) if ood else None
    path = export_checkpoints(aligner, classifier, out, metrics=recorded, ood=thresholds, overwrite=overwrite)
    print(path)
