"""Private fit over loopback HTTP against the plaintext fit on the same rows, in the same run.

    .venv/bin/python bench/private_fit.py [--rows 4096] [--source-dim 576] [--target-dim 640] [--threads 1]

A provider (`serve.server.create_app` with a public-states folder, in a thread of this process) holds
random target states Z_B (rows x target_dim); the client holds Z_A (rows x source_dim), correlated with Z_B
through a random linear map plus noise, so that the ridge path has a real optimum. The client runs
`PrivateFitClient.fit` (keys, Enc(Ẑ_A) in chunks, Enc(G) back, decryption) and `fit_private` (the solve);
the baseline streams both sides' plaintext rows into `SufficientStats` and solves with the same
`solvers.solve`. Reported: provider ms (the server's HE time, from Server-Timing), client ms (encryption,
decryption, HTTP), bytes each way, the map's relative error and both λ; then the ratio of the private fit's
wall time to the plaintext fit's. Targets at 4,096 rows, 576 -> 640: provider <= 60 s, traffic <= 80 MB.

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
    parser.add_argument("--rows", type=int, default=4096, help="public rows (split train/val 7:1)")
    parser.add_argument("--source-dim", type=int, default=576, help="client model width (SmolLM2: 576)")
    parser.add_argument("--target-dim", type=int, default=640, help="provider model width (Gemma-3: 640)")
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
    from lightning_modules.parties.private_fit import fit_private
    from serve.formats.public_states import write_public_states
    from lightning_modules.settings import FitSettings
    from lightning_modules.fitting.solvers import solve
    from lightning_modules.fitting.stats import SufficientStats
    from serve.fit_client import PrivateFitClient
    from serve.formats.public_states import load_public_states
    from serve.formats.splits import SPLIT
    from serve.harness import ServerThread
    from serve.server import create_app

    rng = np.random.default_rng(args.seed)
    n, da, db = args.rows, args.source_dim, args.target_dim
    z_a = rng.standard_normal((n, da)) * rng.uniform(0.5, 3.0, da) + rng.normal(0, 2, da)
    mix = rng.standard_normal((da, db)) / np.sqrt(da)
    z_b = (z_a @ mix + 0.5 * rng.standard_normal((n, db)) + rng.normal(0, 1, db)).astype(np.float32)
    texts = [f"public row {i}" for i in range(n)]
    fit = FitSettings()

    with tempfile.TemporaryDirectory() as tmp:
        public_dir = write_public_states(Path(tmp) / "public", texts, z_b, model={"model": "bench-provider",
                                         "hidden_size": db}, val_fraction=SPLIT.public_val_fraction,
                                         seed=args.seed, name="bench")
        public = load_public_states(public_dir)
        index = list(public.indices)
        parts = [z_a[i] for i in index]

        t0 = time.perf_counter()
        stats = [SufficientStats.zeros(da, db, full_yty=False).update(torch.from_numpy(z_a[i]),
                                                                        torch.from_numpy(z_b[i].astype(np.float64)))
                 for i in index]
        plain_map, plain_lam, _ = solve(stats[0], stats[1], fit.estimator, fit.lambdas, fit.center, fit.standardize)
        plain_s = time.perf_counter() - t0

        app = create_app(public=public_dir)
        with ServerThread(app, max_lifetime_s=1800) as server:
            client = PrivateFitClient(server.url, timeout=600)
            t0 = time.perf_counter()
            reply = client.fit(parts, client.public_set()["fingerprint"])
            result = fit_private(parts, reply, fit, source_spec={"model": "bench-client"},
                                 public_set=client.public_set())
            private_s = time.perf_counter() - t0
    weight = result.aligner.affine_map.weight.double()
    rel = float((weight - plain_map.weight).norm() / plain_map.weight.norm())
    lam = result.metrics["chosen_lambda"]
    traffic_mb = (reply.bytes_sent + reply.bytes_received) / 1e6
    figures = {
        "rows": n, "source_dim": da, "target_dim": db, "threads": args.threads,
        "provider_s": round(reply.provider_ms / 1000, 2), "client_s": round(reply.client_ms / 1000, 2),
        "private_fit_wall_s": round(private_s, 2), "plaintext_fit_s": round(plain_s, 3),
        "private_vs_plaintext": round(private_s / plain_s, 1),
        "bytes_sent": reply.bytes_sent, "bytes_received": reply.bytes_received, "traffic_mb": round(traffic_mb, 1),
        "map_rel_error": rel, "lambda_private": lam, "lambda_plaintext": plain_lam,
    }
    print(f"private fit of {n} rows, {da} -> {db}: provider {figures['provider_s']} s, client "
          f"{figures['client_s']} s, wall {figures['private_fit_wall_s']} s; sent {reply.bytes_sent / 1e6:.1f} MB, "
          f"received {reply.bytes_received / 1e6:.1f} MB")
    print(f"plaintext fit on the same rows: {plain_s:.2f} s; private / plaintext = {figures['private_vs_plaintext']}x")
    print(f"map relative error {rel:.2e}; λ private {lam}, plaintext {plain_lam}")
    for key, value, target in (("provider_s", figures["provider_s"], 60), ("traffic_mb", traffic_mb, 80),
                               ("map_rel_error", rel, 1e-4)):
        print(f"  target {key} <= {target:g}: {'met' if value <= target else 'MISSED'} ({value:.3g})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
