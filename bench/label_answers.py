"""What a label-only answer costs against a logits answer, per row, in the same run.

    .venv/bin/python bench/label_answers.py [--classes 2,5,20] [--dim 640] [--rows 3] [--key-bits 2048]

For a random head d -> k per class count k, one row per query (the label mode charges and answers the rows a query
declares; a logits reply answers every lane):
* logits mode: the server's evaluation (default profile), the query and reply bytes;
* label mode: the server's masked evaluation (profile n8192-label, circuit-private), then the provider's share of the
  secure argmax (`encrypted.argmax.ProviderArgmax`), the client's share, the argmax messages' bytes and round trips;
* the same row end to end through a live server (loopback HTTP, `serve.client.Client.label_states`).
Provider and client time are measured in this process, one thread, median of --rows rows. The client's argmax keys
(--key-bits, 2,048 by default: about a minute to make) are the client's cached ones ($XSILO_HOME/client/
argmax-keys.json), made on first use. The last line is JSON with every figure; `provider_s_label_k20` and
`extra_bytes_k20` are the issue's targets (at most 1 s and 1 MB per query beyond a logits query).
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", default="2,5,20")
    parser.add_argument("--dim", type=int, default=640, help="the head's input dimension (Gemma-3-270m: 640)")
    parser.add_argument("--rows", type=int, default=3, help="rows timed per class count (median)")
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)  # before numpy is imported

import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encrypted import (DEFAULT_PROFILE, N8192_LABEL, ArgmaxKeys, ArgmaxSpec, ClientArgmax, ClientKeys,  # noqa: E402
                       EncryptedLinear, ProviderArgmax, PublicKeys, decrypt, encrypt)
from serve.client_label import default_keys_path, load_or_make_keys  # noqa: E402


def argmax_keys() -> ArgmaxKeys:
    if ARGS.key_bits == 2048:
        return load_or_make_keys(default_keys_path())
    return ArgmaxKeys.generate(ARGS.key_bits)


def one_row(k: int, keys: ArgmaxKeys, rng: np.random.Generator) -> dict[str, float]:
    W, b = rng.normal(0, 1 / np.sqrt(ARGS.dim), (k, ARGS.dim)), rng.normal(0, 0.1, k)
    logits_layer = EncryptedLinear(W, b, DEFAULT_PROFILE)
    label_layer = EncryptedLinear(W, b, N8192_LABEL, circuit_privacy=30)
    spec = ArgmaxSpec(k)
    out: dict[str, list[float]] = {}
    for _ in range(ARGS.rows):
        x = rng.normal(0, 1, (1, ARGS.dim))
        for name, layer in (("logits", logits_layer), ("label", label_layer)):
            ckks = ClientKeys.generate(layer.layout.profile, layer.layout.rotation_steps)
            public = PublicKeys.from_bytes(ckks.public_bytes(), layer.layout)
            [query] = encrypt(ckks, layer.layout, x)
            start = time.perf_counter()
            if name == "logits":
                reply = layer.apply(query, public)
                out.setdefault("provider_s_logits", []).append(time.perf_counter() - start)
                out.setdefault("bytes_logits", []).append(len(query) + len(reply))
                continue
            reply, masks, count = layer.apply_masked(query, public, spec.fraction_bits)
            provider_s = time.perf_counter() - start
            provider, client = ProviderArgmax(keys.public(), spec, masks[:count]), None
            start = time.perf_counter()
            client = ClientArgmax(keys, spec, decrypt(ckks, layer.layout, [reply], 1))
            message: bytes | None = client.first_message()
            client_s, argmax_bytes, trips = time.perf_counter() - start, 0, 0
            while message is not None:
                start = time.perf_counter()
                answer = provider.handle(message)
                provider_s += time.perf_counter() - start
                start = time.perf_counter()
                argmax_bytes, trips = argmax_bytes + len(message) + len(answer), trips + 1
                message = client.handle(answer)
                client_s += time.perf_counter() - start
            assert client.labels[0] == int(np.argmax(layer.plain(x)[0])) or np.sort(layer.plain(x)[0])[-2:].ptp() < .1
            out.setdefault("provider_s_label", []).append(provider_s)
            out.setdefault("client_s_label", []).append(client_s)
            out.setdefault("bytes_label", []).append(len(query) + len(reply) + 4 + len(keys.public_bytes())
                                                     + argmax_bytes)
            out.setdefault("round_trips_label", []).append(1 + trips)
    return {key: statistics.median(values) for key, values in out.items()}


def live_row(keys: ArgmaxKeys, k: int) -> float:
    """Seconds for one row's label through a live server, end to end (the session already open)."""
    from serve.client import Client
    from serve.formats.heads import write_head_export
    from serve.formats.maps import write_map_folder
    from serve.harness import ServerThread
    from serve.server import create_app

    rng = np.random.default_rng(1)
    spec = {"model": "m", "model_identity": "b" * 64, "pooling": "last", "layer": -1, "max_length": 32,
            "dtype": "float32", "hidden_size": ARGS.dim}
    with tempfile.TemporaryDirectory() as tmp:
        head = write_head_export(Path(tmp) / "head", rng.normal(0, 0.04, (k, ARGS.dim)), np.zeros(k), target=spec,
                                 label_names=[f"c{i}" for i in range(k)], metrics={})
        amap = write_map_folder(Path(tmp) / "map", np.eye(ARGS.dim), np.zeros(ARGS.dim),
                                {"estimator": "ridge", "lambdas": [1.0], "chosen_lambda": 1.0,
                                 "lambda_path": [[1.0, 0.5]], "center": True, "standardize": True, "source": spec,
                                 "target": spec, "metrics": {}})
        app = create_app(heads=[head], answers="label", store="memory://")
        with ServerThread(app, max_lifetime_s=600) as srv, Client(srv.url, head="head", aligner=amap, cache=False,
                                                                  argmax_keys=keys) as client:
            client.label_states(rng.normal(0, 1, (1, ARGS.dim)))  # opens the session
            start = time.perf_counter()
            for _ in range(ARGS.rows):
                client.label_states(rng.normal(0, 1, (1, ARGS.dim)))
            return (time.perf_counter() - start) / ARGS.rows


def main() -> None:
    keys = argmax_keys()
    rng = np.random.default_rng(0)
    results: dict[str, object] = {"dim": ARGS.dim, "key_bits": ARGS.key_bits, "rows": ARGS.rows}
    print(f"d={ARGS.dim}, {ARGS.key_bits}-bit Paillier/DGK keys, one row per query, median of {ARGS.rows} rows")
    print(f"{'k':>3} | {'provider s: logits':>18} {'label':>7} {'ratio':>6} | {'client s':>8} | "
          f"{'bytes: logits':>13} {'label':>9} {'extra':>9} | trips")
    for k in [int(v) for v in ARGS.classes.split(",")]:
        row = one_row(k, keys, rng)
        extra = row["bytes_label"] - row["bytes_logits"]
        print(f"{k:>3} | {row['provider_s_logits']:>18.3f} {row['provider_s_label']:>7.3f} "
              f"{row['provider_s_label'] / row['provider_s_logits']:>5.0f}x | {row['client_s_label']:>8.3f} | "
              f"{row['bytes_logits']:>13,.0f} {row['bytes_label']:>9,.0f} {extra:>9,.0f} | "
              f"{row['round_trips_label']:.0f}")
        results[f"k{k}"] = {**{key: round(value, 4) for key, value in row.items()}, "extra_bytes": extra}
    largest = max(int(v) for v in ARGS.classes.split(","))
    results["live_s_per_row"] = round(live_row(keys, largest), 3)
    print(f"live server, k={largest}: {results['live_s_per_row']:.3f} s per row end to end (loopback HTTP)")
    top = results[f"k{largest}"]
    results.update(provider_s_label_k20=top["provider_s_label"], extra_bytes_k20=top["extra_bytes"])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
