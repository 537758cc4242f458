"""The head-aware λ of a private fit (`xsilo align --head`): its extra cost against the private fit itself, and its
λ path against the lab's (the head in hand), in the same run.

    .venv/bin/python bench/head_probe.py [--rows 1024] [--source-dim 384] [--target-dim 576] [--classes 5]

A provider (`serve.server.create_app` in a thread of this process) serves a random head (classes x target_dim) and
a public set of random target states Z_B, with --publish_val_logits; the client holds Z_A, correlated with Z_B.
The baseline is the private fit (`PrivateFitClient.fit` + `fit_private`, λ by GCV). The head-aware part is what
`--head` adds: the published val logits (`PrivateFitClient.val_logits`), the r + 2 encrypted probe rows
(`private_fit.query_head`) and the solve with the head criterion. Reported: its wall time and the ratio to the
baseline's, rows probed and charged, queries, and the largest relative difference between the head criterion's
scores and the lab's (plaintext head and states), with both λ.

The last line is JSON with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="public rows (split train/val 7:1)")
    parser.add_argument("--source-dim", type=int, default=384, help="client model width (MiniLM: 384)")
    parser.add_argument("--target-dim", type=int, default=576, help="provider model width (SmolLM2: 576)")
    parser.add_argument("--classes", type=int, default=5, help="the head's outputs (BBC: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS threads in this process")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from serve.formats.heads import write_head_export
    from lightning_modules.parties.head_probe import head_val_stats
    from lightning_modules.parties.private_fit import fit_private, part_stats, query_head
    from serve.formats.public_states import write_public_states
    from lightning_modules.settings import FitSettings
    from lightning_modules.fitting.affine_map import AffineMap
    from lightning_modules.fitting.solvers import solve
    from lightning_modules.fitting.stats import SufficientStats
    from serve.fit_client import PrivateFitClient
    from serve.formats.public_states import load_public_states
    from serve.formats.splits import SPLIT
    from serve.harness import ServerThread
    from serve.server import create_app

    rng = np.random.default_rng(args.seed)
    n, da, db, k = args.rows, args.source_dim, args.target_dim, args.classes
    z_a = rng.standard_normal((n, da)) * rng.uniform(0.5, 3.0, da) + rng.normal(0, 2, da)
    mix = rng.standard_normal((da, db)) / np.sqrt(da)
    z_b = (z_a @ mix + 0.5 * rng.standard_normal((n, db)) + rng.normal(0, 1, db)).astype(np.float32)
    w_h, b_h = rng.normal(0, 1 / np.sqrt(db), (k, db)), rng.normal(0, 0.1, k)
    spec = {"model": "bench-provider", "model_identity": "b" * 64, "hidden_size": db}
    fit = FitSettings()

    def stats_of(x: np.ndarray, y: np.ndarray) -> SufficientStats:
        return SufficientStats.zeros(x.shape[1], y.shape[1], full_yty=False).update(
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)),
            torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64)))

    with tempfile.TemporaryDirectory() as tmp:
        public_dir = write_public_states(Path(tmp) / "public", [f"public row {i}" for i in range(n)], z_b,
                                         model=spec, val_fraction=SPLIT.public_val_fraction, seed=args.seed,
                                         name="bench")
        head_dir = write_head_export(Path(tmp) / "heads" / "topics", w_h, b_h, target=spec,
                                     label_names=[f"c{i}" for i in range(k)], metrics={})
        public = load_public_states(public_dir)
        parts = [z_a[i] for i in public.indices]
        head = AffineMap(torch.from_numpy(w_h.astype(np.float32).astype(np.float64)),
                         torch.from_numpy(b_h.astype(np.float32).astype(np.float64)))
        y_train, y_val = (p.astype(np.float64) for p in public.parts)
        lab_logits = y_val @ head.weight.numpy().T + head.bias.numpy()
        _, lab_lam, lab_path = solve(stats_of(parts[0], y_train), stats_of(parts[1], y_val), fit.estimator,
                                     fit.lambdas, fit.center, fit.standardize, criterion="head", head=head,
                                     head_val=stats_of(parts[1], lab_logits))

        app = create_app(heads=[head_dir], public=public_dir, publish_val_logits=True, store="memory://")
        with ServerThread(app, max_lifetime_s=1800) as server, PrivateFitClient(server.url, timeout=600) as client:
            info = client.public_set()
            t0 = time.perf_counter()
            reply = client.fit(parts, info["fingerprint"])
            stats = part_stats(parts, reply)
            fit_private(parts, reply, fit, source_spec={}, public_set=info, stats=stats)
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            val_logits = client.val_logits("topics")
            surrogate, cost = query_head(server.url, "topics", stats[0], fit, timeout=600)
            result = fit_private(parts, reply, fit, source_spec={}, public_set=info, stats=stats, head=surrogate,
                                 head_val=head_val_stats(parts[1], val_logits))
            head_s = time.perf_counter() - t0
    ours = result.metrics["lambda_path"]["scores"]["head"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(ours, lab_path.scores["head"]))
    figures = {"rows": n, "source_dim": da, "target_dim": db, "classes": k, "threads": args.threads,
               "private_fit_s": round(fit_s, 2), "head_aware_extra_s": round(head_s, 2),
               "extra_vs_fit": round(head_s / fit_s, 3), **cost,
               "head_score_max_rel_diff": rel, "lambda_two_party": result.metrics["chosen_lambda"],
               "lambda_lab": lab_lam, "lambda_gcv": result.metrics["chosen"].get("gcv")}
    print(f"private fit of {n} rows, {da} -> {db}: {fit_s:.1f} s; the head-aware λ adds {head_s:.1f} s "
          f"({figures['extra_vs_fit']:.2f}x): {cost['probe_rows']} probe rows in {cost['ciphertexts']} encrypted "
          f"queries ({cost['rows_charged']} rows charged) and {len(val_logits)} published val logits (charged "
          "as rows too)")
    print(f"head criterion's scores vs the lab's: max relative difference {rel:.1e}; λ two-party "
          f"{figures['lambda_two_party']}, lab {lab_lam} (GCV alone: {figures['lambda_gcv']})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
