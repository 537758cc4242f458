"""Demo check: send test texts to a running server one encrypted query at a time, and compare the decrypted
predictions with the plaintext pipeline.

    # fused mode: the server holds map and head
    python -m serve.demo_check --url http://127.0.0.1:8765 --export runs/demo/export --data bbc --n 100 \
        --out runs/demo/serve.json
    # split mode: the client maps with its own aligner, the server applies head NAME only
    python -m serve.demo_check --url URL --head bbc --aligner aligner/ --reference provider/heads/bbc ...
    # ... and the public-set map alone (`xsilo align` without --private) scored in plaintext beside
    python -m serve.demo_check ... --aligner aligner/ --public-aligner aligner/public-map/ ...

A head served label-only (`xsilo serve --answers label`) answers labels without logits: the check then compares
the labels with the plaintext argmax and fails only on rows whose top two logits are further apart than the
head's published `label_margin`.

The texts are the first N rows of the task's test split (the stratified split `xsilo evaluate` uses).
The plaintext reference loads the served weights locally (the export, or in split mode the provider's head
folder): only this check does that; a real client never sees them. Exits with status 1 if any encrypted
prediction differs from the plaintext one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from serve.formats.splits import SPLIT, stratified_split
from serve.harness import wait_for_server

STAGES = ("extract_ms", "encrypt_ms", "http_ms", "server_ms", "decrypt_ms", "total_ms")


def wait_until_up(url: str, timeout_s: float) -> None:
    try:
        wait_for_server(url, timeout_s=timeout_s)
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}; is `xsilo serve` running?") from None


def load_test_split(data: str, n: int, seed: int = SPLIT.seed, limit: int | None = None
                    ) -> tuple[list[str], list[str]]:
    """First n rows of the test split (of the task's seeded `limit`-row sample), with their label names."""
    from datamodules.text import label_names, load_texts

    ds = load_texts(data, limit=limit)
    labels = np.asarray(ds["label"])
    test = stratified_split(labels, SPLIT.val_fraction, SPLIT.test_fraction, seed)[2][:n]
    names = label_names(ds) or [str(i) for i in range(labels.max() + 1)]
    return [ds[int(i)]["text"] for i in test], [names[labels[int(i)]] for i in test]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8765")
    parser.add_argument("--export", default=None, help="fused mode: the served export, for the plaintext reference")
    parser.add_argument("--head", default=None, help="split mode: the served head's name")
    parser.add_argument("--aligner", default=None, help="split mode: the client's map folder (`xsilo align --out`)")
    parser.add_argument("--reference", default=None, help="split mode: the provider's head folder, for the reference")
    parser.add_argument("--public-aligner", default=None,
                        help="split mode: another map of the same client model (the unadapted public-set map of "
                             "`xsilo align` without --private), whose plaintext accuracy on the same texts is reported "
                             "beside (accuracy_public_map)")
    parser.add_argument("--data", default="bbc")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="the task_limit the export was evaluated with")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for extraction")
    parser.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for the server to start")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file (atomically)")
    parser.add_argument("--wait-only", action="store_true", help="only wait until the server answers /healthz")
    args = parser.parse_args()
    if args.wait_only:
        wait_until_up(args.url, args.wait_s)
        return
    split = args.head is not None
    if split != (args.aligner is not None) or split != (args.reference is not None) or split == (args.export is not None):
        parser.error("pass --export (fused mode), or --head, --aligner and --reference (split mode)")
    if args.public_aligner is not None and not split:
        parser.error("--public-aligner is a second map of split mode: pass it with --head, --aligner and --reference")

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from datamodules.progress import Progress
    from serve.client import Client, ServeError
    from serve.formats.exports import LinearExport, load_export

    wait_until_up(args.url, args.wait_s)
    texts, truth = load_test_split(args.data, args.n, limit=args.limit)
    public_of = None
    if split:
        mapping, head = LinearExport.from_pretrained(args.aligner, "map"), load_export(args.reference, "head")
        reference_of = lambda states: head(mapping(states))  # noqa: E731
        if args.public_aligner is not None:
            public_map = LinearExport.from_pretrained(args.public_aligner, "map")
            view = lambda m: {k: (m.manifest.get("source") or {}).get(k)  # noqa: E731
                              for k in ("model_identity", "pooling", "layer", "max_length", "dtype")}
            if view(public_map) != view(mapping):
                raise SystemExit(f"error: --public-aligner {args.public_aligner} reads another model's states than "
                                 f"--aligner {args.aligner}; pass two maps of the same client model")
            public_of = lambda states: head(public_map(states))  # noqa: E731
    else:
        reference_of = load_export(args.export)
    options = {"head": args.head, "aligner": args.aligner} if split else {}
    try:
        with Client(args.url, api_key=args.api_key, threads=args.threads, **options) as client:
            client.classify(texts[:1])  # loads the client model, checks its identity, opens a session
            progress = Progress("encrypted queries", len(texts), unit="queries")
            results = []
            for text in texts:
                results.append(client.classify([text])[0])
                progress.update()
            progress.close()
            states = np.asarray(client.encoder(texts), dtype=np.float64)
            reference = reference_of(states)
            info = client.model_info()
            published = client.connection.json("GET", "/v1/model")
            entry = published["heads"][args.head] if split else published
            traffic = client.traffic.as_dict()
    except ServeError as exc:
        raise SystemExit(f"error: {exc}") from None

    label_only = info.argmax is not None
    predicted = [r["label"] for r in results]
    names = info.label_names
    plain_labels = [names[i] for i in reference.argmax(1)]
    agree = sum(a == b for a, b in zip(predicted, plain_labels))
    top = np.sort(reference, axis=1)
    margin = float(entry.get("label_margin") or 0.0)
    clear = top[:, -1] - top[:, -2] > margin  # rows a label-only answer must get right
    must_agree = int(clear.sum()) if label_only else len(texts)
    agree_required = sum(a == b for a, b, c in zip(predicted, plain_labels, clear) if c or not label_only)
    medians = {k: statistics.median(r["timings"][k] for r in results) for k in STAGES}
    p90 = float(np.percentile([r["timings"]["total_ms"] for r in results], 90))
    encrypted = None if label_only else np.array([r["logits"] for r in results])
    figures = {"mode": ("split" if split else "fused") + ("-label" if label_only else ""), "queries": len(texts),
               "agree": agree, "label_margin": margin if label_only else None,
               "rows_within_margin": int((~clear).sum()) if label_only else None,
               "bytes_sent": traffic["bytes_sent"], "bytes_received": traffic["bytes_received"],
               "max_abs_logit_diff": None if encrypted is None else float(np.abs(encrypted - reference).max()),
               "accuracy_encrypted": float(np.mean([p == t for p, t in zip(predicted, truth)])),
               "accuracy_plaintext": float(np.mean([p == t for p, t in zip(plain_labels, truth)])),
               **{f"median_{k}": round(v, 2) for k, v in medians.items()}, "p90_total_ms": round(p90, 2)}
    if public_of is not None:
        public_labels = [names[i] for i in public_of(states).argmax(1)]
        figures["accuracy_public_map"] = float(np.mean([p == t for p, t in zip(public_labels, truth)]))
    compared = (f"labels only, within the margin {margin:.3f} on {figures['rows_within_margin']} rows" if label_only
                else f"max |logit diff| {figures['max_abs_logit_diff']:.2e}")
    print(f"{len(texts)} encrypted {args.data} test queries ({figures['mode']} mode): encrypted == plaintext argmax on {agree}/{len(texts)}, "
          f"{compared}; accuracy {figures['accuracy_encrypted']:.3f} "
          f"(plaintext {figures['accuracy_plaintext']:.3f})"
          + (f"; the public-set map alone {figures['accuracy_public_map']:.3f} (plaintext)" if public_of else ""))
    print("latency per query, median: " + ", ".join(f"{k[:-3]} {v:.1f} ms" for k, v in medians.items())
          + f"; p90 total {p90:.1f} ms")
    print(json.dumps(figures))
    if args.out:
        from datamodules.cache import atomic_write_json

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(args.out), figures)
    if agree_required != must_agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
