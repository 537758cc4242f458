"""Output noise against model extraction: accuracy cost and extraction error, against zero noise in the same run.

    .venv/bin/python bench/extraction_attack.py [--states DIR] [--noise 0,0.01,0.03,0.1,0.3] [--queries Q]

Data: cached SmolLM2 BBC hidden states (`--states`, default the smollm2 bbc-train cache under $XSILO_HOME:
real states of real texts, d=576, 5 classes) with a ridge head fitted here on 70% of the rows and scored on
the rest; without a cache, synthetic Gaussian class clusters (the output says which). For each noise scale
the real server (`create_app(output_noise=σ)`, loopback HTTP, real keys and ciphertexts) answers:

* the held-out rows: encrypted accuracy, and its change against σ = 0;
* an honest-looking attacker with Q queries (default ceil((d+1)/lanes), the fewest that determine W): probes
  b and the unit vectors, repeats them while queries remain, averages, and solves for W and b. Its relative
  error ||W' - W|| / ||W|| is reported for unit probes and for probes scaled by `--probe-scale` (the server
  cannot bound ||x|| under encryption, so scaled probes divide additive noise by the scale).

The last line is JSON with every figure.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", help="a state-cache folder (shard-*.npy, labels.npy, manifest.json)")
    parser.add_argument("--noise", default="0,0.01,0.03,0.1,0.3", help="output noise std values (0 first)")
    parser.add_argument("--queries", type=int, default=None, help="attacker's queries (default ceil((d+1)/lanes))")
    parser.add_argument("--probe-scale", type=float, default=100.0, help="scale of the attacker's scaled probes")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)  # before numpy is imported

import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encrypted import ClientKeys, LinearLayout, decrypt, encrypt  # noqa: E402
from serve.harness import ServerThread  # noqa: E402
from serve.server import create_app  # noqa: E402


def default_states() -> Path | None:
    home = Path(os.environ.get("XSILO_HOME", Path.home() / ".cache" / "xsilo")) / "states"
    found = sorted(home.glob("smollm2--bbc-train--*/manifest.json"))
    return found[0].parent if found else None


def load_data(folder: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(states (n, d) float64, labels (n,), description)."""
    if folder is not None and (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text())
        X = np.concatenate([np.load(folder / s["file"]) for s in manifest["shards"]]).astype(np.float64)
        y = np.load(folder / "labels.npy").astype(int)[:len(X)]
        return X, y, f"real {manifest.get('model')} {manifest.get('data')} {manifest.get('split')} states ({folder.name})"
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (5, 576))
    y = rng.integers(0, 5, 1000)
    return centres[y] + rng.normal(0, 3, (1000, 576)), y, "synthetic Gaussian clusters (no state cache found)"


def ridge_head(X: np.ndarray, y: np.ndarray, k: int, lam: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-all ridge on standardised states (dead dimensions left unscaled), the standardisation folded
    into (W, b)."""
    import torch

    from lightning_modules.fitting.standardize import safe_scale

    mu, sd = X.mean(0), safe_scale(torch.from_numpy(X.std(0))).numpy()  # the project's one zero-variance rule
    Z = (X - mu) / sd
    T = np.eye(k)[y] - 1.0 / k
    V = np.linalg.solve(Z.T @ Z + lam * np.eye(Z.shape[1]), Z.T @ T)  # (d, k)
    W = (V / sd[:, None]).T
    return W, np.full(k, 1.0 / k) - W @ mu


def write_export(out: Path, W: np.ndarray, b: np.ndarray) -> Path:
    from lightning_modules.parties.export import write_export as write

    d = W.shape[1]
    source = {"model": "smollm2", "model_identity": None, "pooling": "last", "layer": -1, "max_length": 128,
              "dtype": "float32", "hidden_size": d}
    return write(out, np.eye(d), np.zeros(d), W, b, source=source, target={}, label_names=None)


def ask(http: httpx.Client, session: str, keys: ClientKeys, layout: LinearLayout, rows: np.ndarray) -> np.ndarray:
    [query] = encrypt(keys, layout, rows)
    response = http.post(f"/v1/sessions/{session}/infer", content=query)
    response.raise_for_status()
    return decrypt(keys, layout, [response.content], len(rows))


def extract(http, session, keys, layout, d: int, queries: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Probe rows [0; scale * e_i] round-robin for `queries` queries; average repeats; solve for (W, b)."""
    probes = np.vstack([np.zeros((1, d)), scale * np.eye(d)])
    sums, counts = np.zeros((d + 1, 0)), np.zeros(d + 1)
    order = [i % (d + 1) for i in range(queries * layout.lanes)]
    for start in range(0, len(order), layout.lanes):
        index = order[start:start + layout.lanes]
        Y = ask(http, session, keys, layout, probes[index])
        if sums.shape[1] == 0:
            sums = np.zeros((d + 1, Y.shape[1]))
        np.add.at(sums, index, Y)
        np.add.at(counts, index, 1)
    mean = sums / counts[:, None]
    return ((mean[1:] - mean[0]) / scale).T, mean[0]


def main() -> None:
    folder = Path(ARGS.states) if ARGS.states else default_states()
    X, y, described = load_data(folder)
    n, d = X.shape
    k = int(y.max()) + 1
    rng = np.random.default_rng(1)
    order = rng.permutation(n)
    train, test = order[:int(0.7 * n)], order[int(0.7 * n):]
    W, b = ridge_head(X[train], y[train], k)
    plain_accuracy = float(np.mean((X[test] @ W.T + b).argmax(1) == y[test]))
    noise = [float(v) for v in ARGS.noise.split(",")]
    if noise[0] != 0.0:
        noise = [0.0] + noise
    print(f"data: {described}; d={d}, k={k}, {len(train)} train / {len(test)} held-out rows; "
          f"plaintext accuracy {plain_accuracy:.3f}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        export = write_export(Path(tmp) / "export", W, b)
        W32, b32 = W.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
        for sigma in noise:
            start = time.perf_counter()
            with ServerThread(create_app(export, output_noise=sigma, store="memory://"), max_lifetime_s=900) as srv, \
                    httpx.Client(base_url=srv.url, timeout=60) as http:
                layout = LinearLayout.from_dict(http.get("/v1/model").json()["layout"])
                keys = ClientKeys.generate(layout.profile, layout.rotation_steps)
                session = http.post("/v1/sessions", content=keys.public_bytes()).json()["session_id"]
                logits = np.vstack([ask(http, session, keys, layout, X[test][i:i + layout.lanes])
                                    for i in range(0, len(test), layout.lanes)])
                accuracy = float(np.mean(logits.argmax(1) == y[test]))
                queries = ARGS.queries or math.ceil((d + 1) / layout.lanes)
                errors = {}
                for name, scale in (("unit", 1.0), ("scaled", ARGS.probe_scale)):
                    W_rec, b_rec = extract(http, session, keys, layout, d, queries, scale)
                    errors[name] = float(np.linalg.norm(W_rec - W32) / np.linalg.norm(W32))
            results.append({"noise": sigma, "accuracy": accuracy, "lanes": layout.lanes, "queries": queries,
                            "extraction_rel_error_unit_probes": errors["unit"],
                            "extraction_rel_error_scaled_probes": errors["scaled"],
                            "seconds": round(time.perf_counter() - start, 1)})
    base = results[0]
    print(f"{'noise':>6} {'accuracy':>9} {'change':>8} {'W error (unit probes)':>22} {'vs 0':>8} "
          f"{'W error (x' + format(ARGS.probe_scale, 'g') + ' probes)':>24} {'vs 0':>8}")
    for r in results:
        r["accuracy_change"] = r["accuracy"] - base["accuracy"]
        r["error_ratio_vs_zero_noise_unit"] = r["extraction_rel_error_unit_probes"] / base["extraction_rel_error_unit_probes"]
        r["error_ratio_vs_zero_noise_scaled"] = (r["extraction_rel_error_scaled_probes"]
                                                 / base["extraction_rel_error_scaled_probes"])
        print(f"{r['noise']:>6g} {r['accuracy']:>9.3f} {r['accuracy_change']:>+8.3f} "
              f"{r['extraction_rel_error_unit_probes']:>22.2e} {r['error_ratio_vs_zero_noise_unit']:>7.0f}x "
              f"{r['extraction_rel_error_scaled_probes']:>24.2e} {r['error_ratio_vs_zero_noise_scaled']:>7.0f}x")
    print(json.dumps({"data": described, "d": d, "k": k, "test_rows": len(test), "plaintext_accuracy": plain_accuracy,
                      "probe_scale": ARGS.probe_scale, "results": results}))


if __name__ == "__main__":
    main()
