"""Private fit over loopback HTTP at several pool sizes, against the plaintext fit on the same rows, same run.

    .venv/bin/python bench/private_fit.py [--rows 1000 4096 16384 50000] [--source-dim 576] [--target-dim 640]

For each N, a provider (`xsilo serve`'s app in a child process, one thread) holds random target states Z_B
(N x target_dim); the client (this process, one thread) holds Z_A (N x source_dim) memory-mapped, correlated
with Z_B through a random linear map plus noise, so that the ridge path has a real optimum. The client runs
`PrivateFitClient.fit` (key, Enc(Ẑ_A) streamed in chunks, Enc(G) back, decryption) and `fit_private` (the
solve); the baseline streams both sides' plaintext rows into `SufficientStats` and solves with the same
`solvers.solve`. Reported per N: provider s (the server's Server-Timing), client s, bytes each way, peak RSS of
each process during the fit, the map's relative error, the ratio of the private fit's wall time to the
plaintext fit's, and the ratio of the provider's time to one float64 product Z_Bᵀ Z_A of the same shape (the
yardstick of Bae et al.). Targets (one thread): 4,096 rows: provider <= 5 s, traffic <= 25 MB, map error <= 1e-4;
50,000 rows: provider <= 60 s, RSS <= 1 GB each side, traffic <= 300 MB; provider <= 50x the float64 product.

The last line is JSON with the figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVER = """
import sys, time
from serve.harness import ServerThread
from serve.server import create_app
with ServerThread(create_app(public=sys.argv[1], store="memory://"), max_lifetime_s=3600) as server:
    print(server.url, flush=True)
    sys.stdin.read()
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4096], help="public rows (split train/val 7:1)")
    parser.add_argument("--source-dim", type=int, default=576, help="client model width (SmolLM2: 576)")
    parser.add_argument("--target-dim", type=int, default=640, help="provider model width (Gemma-3: 640)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def peak_rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid: int | str = "self") -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def make_states(folder: Path, n: int, da: int, db: int, seed: int):
    """Z_A (n x da, float32 memmap) and Z_B (n x db, float32), written 4,096 rows at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scale, offset = rng.uniform(0.5, 3.0, da), rng.normal(0, 2, da)
    mix, shift = rng.standard_normal((da, db)) / np.sqrt(da), rng.normal(0, 1, db)
    z_a = np.lib.format.open_memmap(folder / "z_a.npy", mode="w+", dtype=np.float32, shape=(n, da))
    z_b = np.empty((n, db), dtype=np.float32)
    for lo in range(0, n, 4096):
        rows = min(4096, n - lo)
        a = rng.standard_normal((rows, da)) * scale + offset
        z_a[lo:lo + rows] = a
        z_b[lo:lo + rows] = a @ mix + 0.5 * rng.standard_normal((rows, db)) + shift
    z_a.flush()
    return z_a, z_b


def run(n: int, args: argparse.Namespace, tmp: Path) -> dict:
    import numpy as np
    import torch

    from lightning_modules.fitting.solvers import solve
    from lightning_modules.fitting.stats import SufficientStats
    from lightning_modules.parties.private_fit import fit_private
    from lightning_modules.settings import FitSettings
    from serve.fit_client import PrivateFitClient
    from serve.formats.public_states import load_public_states, write_public_states
    from serve.formats.splits import SPLIT

    da, db = args.source_dim, args.target_dim
    z_a, z_b = make_states(tmp, n, da, db, args.seed)
    texts = [f"public row {i}" for i in range(n)]
    public_dir = write_public_states(tmp / f"public-{n}", texts, z_b, model={"model": "bench-provider",
                                     "hidden_size": db}, val_fraction=SPLIT.public_val_fraction, seed=args.seed,
                                     name="bench")
    index = [np.asarray(i) for i in load_public_states(public_dir).indices]
    order = np.concatenate(index)
    # the client's parts, memory-mapped in the public set's order (rows of part 0, then part 1)
    parts_file = np.lib.format.open_memmap(tmp / "parts.npy", mode="w+", dtype=np.float32, shape=(n, da))
    for lo in range(0, n, 4096):
        parts_file[lo:lo + 4096] = z_a[order[lo:lo + 4096]]
    parts_file.flush()
    del parts_file
    mapped = np.load(tmp / "parts.npy", mmap_mode="r")
    parts = [mapped[:len(index[0])], mapped[len(index[0]):]]
    fit = FitSettings()

    t0 = time.perf_counter()
    stats = [SufficientStats.zeros(da, db, full_yty=False) for _ in index]
    for s, rows in zip(stats, index):
        for lo in range(0, len(rows), 4096):
            block = rows[lo:lo + 4096]
            s.update(torch.from_numpy(np.asarray(z_a[block], dtype=np.float64)),
                     torch.from_numpy(z_b[block].astype(np.float64)))
    plain_map, plain_lam, _ = solve(stats[0], stats[1], fit.estimator, fit.lambdas, fit.center, fit.standardize)
    plain_s = time.perf_counter() - t0

    left, right = np.random.default_rng(1).standard_normal((db, n)), np.random.default_rng(2).standard_normal((n, da))
    t0 = time.perf_counter()
    left @ right
    product_s = time.perf_counter() - t0
    del left, right, z_a, z_b, stats
    gc.collect()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(public_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        url = server.stdout.readline().strip()
        if not url.startswith("http"):
            raise SystemExit(f"the provider did not start (exit {server.poll()})")
        with PrivateFitClient(url, timeout=1800) as client:
            public = client.public_set()
            reset_peak_rss()
            reset_peak_rss(server.pid)
            t0 = time.perf_counter()
            reply = client.fit(parts, public["fingerprint"])
            result = fit_private(parts, reply, fit, source_spec={"model": "bench-client"}, public_set=public)
            private_s = time.perf_counter() - t0
            client_rss, provider_rss = peak_rss_mb(), peak_rss_mb(server.pid)
    finally:
        server.stdin.close()
        server.wait(30)
    weight = result.aligner.affine_map.weight.double()
    rel = float((weight - plain_map.weight).norm() / plain_map.weight.norm())
    provider_s = reply.provider_ms / 1000
    return {"rows": n, "source_dim": da, "target_dim": db, "provider_s": round(provider_s, 2),
            "client_s": round(reply.client_ms / 1000, 2), "private_fit_wall_s": round(private_s, 2),
            "plaintext_fit_s": round(plain_s, 3), "private_vs_plaintext": round(private_s / plain_s, 1),
            "float64_product_s": round(product_s, 4), "provider_vs_product": round(provider_s / product_s, 1),
            "mb_sent": round(reply.bytes_sent / 1e6, 2), "mb_received": round(reply.bytes_received / 1e6, 2),
            "traffic_mb": round((reply.bytes_sent + reply.bytes_received) / 1e6, 2),
            "client_peak_rss_mb": round(client_rss), "provider_peak_rss_mb": round(provider_rss),
            "map_rel_error": rel, "lambda_private": result.metrics["chosen_lambda"], "lambda_plaintext": plain_lam}


def main() -> None:
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    import torch

    torch.set_num_threads(1)
    figures = []
    for n in args.rows:
        with tempfile.TemporaryDirectory() as tmp:
            f = run(n, args, Path(tmp))
        figures.append(f)
        print(f"{n} rows, {f['source_dim']} -> {f['target_dim']}: provider {f['provider_s']} s "
              f"({f['provider_vs_product']}x a float64 product of {f['float64_product_s']} s), client "
              f"{f['client_s']} s, wall {f['private_fit_wall_s']} s vs plaintext fit {f['plaintext_fit_s']} s "
              f"({f['private_vs_plaintext']}x); sent {f['mb_sent']} MB, received {f['mb_received']} MB; peak RSS "
              f"client {f['client_peak_rss_mb']} MB, provider {f['provider_peak_rss_mb']} MB; map error "
              f"{f['map_rel_error']:.1e}, λ {f['lambda_private']} (plaintext {f['lambda_plaintext']})", flush=True)
        targets = {4096: (5, 25, None), 50000: (60, 300, 1024)}.get(n)
        checks = [("map_rel_error", f["map_rel_error"], 1e-4), ("provider_vs_product", f["provider_vs_product"], 50)]
        if targets:
            checks += [("provider_s", f["provider_s"], targets[0]), ("traffic_mb", f["traffic_mb"], targets[1])]
            if targets[2]:
                checks += [("client_peak_rss_mb", f["client_peak_rss_mb"], targets[2]),
                           ("provider_peak_rss_mb", f["provider_peak_rss_mb"], targets[2])]
        for key, value, target in checks:
            print(f"  target {key} <= {target:g}: {'met' if value <= target else 'MISSED'} ({value:.3g})")
    print(json.dumps({"bench": "private_fit", "runs": figures}))


if __name__ == "__main__":
    main()
