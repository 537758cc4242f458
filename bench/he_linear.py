"""Encrypted affine layer vs TenSEAL matmul, TenSEAL dot per class, and numpy.

    .venv/bin/python bench/he_linear.py [--quick] [--threads 1]

Reports server ms (median; the JSON also has the minimum, which load from other jobs inflates least),
client ms (encrypt + decrypt), query / reply / key bytes and ratios from one run,
the rotation lower bound at d=4096, and batch throughput at d=576, k=5 (pairing="inputs": two inputs
per slot, and the default pairing="outputs" for comparison), and the cost of circuit-private replies at
d=4096, k=20 (profile N8192_PRIVATE with circuit_privacy=30 against the default profile without it, and the
same profile without flooding, in server ms, reply and key bytes, and output error). TenSEAL matmul takes ~30 s
at d=4096, so each baseline runs once per (d, k); --quick keeps the TenSEAL baselines only at
d=4096, k=20 (dot also where k <= 20). The last line is JSON with the d=4096, k=20 figures.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="TenSEAL baselines only where cheap or needed")
    parser.add_argument("--threads", type=int, default=1, help="threads for numpy/OMP/torch/TenSEAL (default 1)")
    parser.add_argument("--dims", default="384,576,640,4096")
    parser.add_argument("--outputs", default="2,5,20,384")
    parser.add_argument("--batch-ciphertexts", type=int, default=40, help="full query ciphertexts in the batch test")
    return parser.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)  # before numpy is imported

import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tenseal as ts  # noqa: E402
import tenseal.sealapi as seal  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encrypted import ClientKeys, EncryptedLinear, PublicKeys, decrypt, encrypt  # noqa: E402
from encrypted import messages  # noqa: E402
from encrypted.profiles import N8192_PRIVATE  # noqa: E402

try:  # torch is not used here; pin its threads anyway so an import elsewhere cannot oversubscribe
    import torch

    torch.set_num_threads(ARGS.threads)
except ImportError:
    pass


def timings_ms(fn, reps: int) -> list[float]:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def median_ms(fn, reps: int) -> float:
    return statistics.median(timings_ms(fn, reps))


def once_ms(fn):
    t = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t) * 1e3, out


def tenseal_context() -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60], n_threads=ARGS.threads)
    ctx.global_scale = 2.0**40
    ctx.generate_galois_keys()
    return ctx


def bench_ours(W: np.ndarray, b: np.ndarray, x: np.ndarray, **layer_args) -> dict:
    load_ms, layer = once_ms(lambda: EncryptedLinear(W, b, **layer_args))
    keys = ClientKeys.generate(layer.layout.profile, layer.rotation_steps)
    key_bytes = keys.public_bytes()
    public = PublicKeys.from_bytes(key_bytes)
    query = encrypt(keys, layer.layout, x[None])[0]
    reply = layer.apply(query, public)
    y = decrypt(keys, layer.layout, [reply], 1)[0]
    reps = 5 if layer.layout.block_rows * layer.layout.blocks > 64 else 21
    server_times = timings_ms(lambda: layer.apply(query, public), reps)
    server = statistics.median(server_times)
    enc = median_ms(lambda: encrypt(keys, layer.layout, x[None]), reps)
    dec = median_ms(lambda: decrypt(keys, layer.layout, [reply], 1), reps)
    ref = layer.plain(x)
    errors = np.concatenate([decrypt(keys, layer.layout, [layer.apply(query, public)], 1)[0] - ref for _ in range(5)])
    return {"abs_err_std": float(errors.std()), "flood_std": layer.flood_std, "server_ms": server, "server_min_ms": min(server_times), "client_ms": enc + dec, "query_bytes": len(query), "reply_bytes": len(reply),
            "key_bytes": len(key_bytes), "keys": len(layer.rotation_steps), "rotations": layer.layout.rotations,
            "load_ms": load_ms, "rel_err": float(np.linalg.norm(y - ref) / np.linalg.norm(ref)), "lanes": layer.lanes,
            "_layer": layer, "_public": public, "_keys": keys}


def bench_tenseal(ctx: ts.Context, W: np.ndarray, b: np.ndarray, x: np.ndarray, method: str) -> dict:
    enc_x = ts.ckks_vector(ctx, x.tolist())
    ref = W @ x + b
    if method == "matmul":
        server, out = once_ms(lambda: enc_x.matmul(W.T.tolist()) + b.tolist())
        replies = [out]
    else:
        server, replies = once_ms(lambda: [enc_x.dot(row.tolist()) + float(c) for row, c in zip(W, b)])
    t = time.perf_counter()
    ts.ckks_vector(ctx, x.tolist()).serialize()
    y = np.concatenate([np.atleast_1d(r.decrypt()) for r in replies])[: len(ref)]
    client = (time.perf_counter() - t) * 1e3
    return {"server_ms": server, "client_ms": client, "query_bytes": len(enc_x.serialize()),
            "reply_bytes": sum(len(r.serialize()) for r in replies),
            "rel_err": float(np.linalg.norm(y - ref) / np.linalg.norm(ref))}


def rotation_lower_bound_ms(ours: dict, d: int) -> dict:
    """One plaintext multiply plus log2(d) rotations: of a query-level ciphertext (the HE_NOTES bound),
    and, stricter, all at the cheaper level after the rescale, where this layer runs most of its rotations."""
    layer, public = ours["_layer"], ours["_public"]
    query = encrypt(ours["_keys"], layer.layout, np.ones((1, d)))[0]
    ct, _ = messages.read_query(query, layer.layout)
    context = layer.layout.profile.context()
    ev = seal.Evaluator(context)
    out, low = seal.Ciphertext(), seal.Ciphertext()
    step = layer.rotation_steps[0]
    # a plaintext encoded as the layer encodes its diagonals (query level, the dropped prime's scale) costs what
    # one of them costs
    encoder, plain = seal.CKKSEncoder(context), seal.Plaintext()
    weight_scale = float(context.first_context_data().parms().coeff_modulus()[-1].value())
    encoder.encode([1.0] * encoder.slot_count(), context.first_parms_id(), weight_scale, plain)
    ev.multiply_plain(ct, plain, low)
    ev.rescale_to_next_inplace(low)
    rot = median_ms(lambda: ev.rotate_vector(ct, step, public.galois_keys, out), 30)
    rot_low = median_ms(lambda: ev.rotate_vector(low, step, public.galois_keys, out), 30)
    mul = median_ms(lambda: ev.multiply_plain(ct, plain, out), 30)
    log_d = math.ceil(math.log2(d))
    return {"rotate_ms": rot, "rotate_low_ms": rot_low, "multiply_ms": mul, "bound_ms": mul + log_d * rot,
            "strict_bound_ms": mul + log_d * rot_low}


_BATCH: dict = {}


def _batch_worker(indices: list[int]) -> int:
    layer, public, queries = _BATCH["layer"], _BATCH["public"], _BATCH["queries"]
    for i in indices:
        layer.apply(queries[i], public)
    return len(indices)


def batch_throughput(d: int, k: int, ciphertexts: int, pairing: str) -> dict:
    rng = np.random.default_rng(5)
    layer = EncryptedLinear(rng.normal(0, 1 / np.sqrt(d), (k, d)), rng.normal(0, 1, k), pairing=pairing)
    keys = ClientKeys.generate(layer.layout.profile, layer.rotation_steps)
    public = PublicKeys.from_bytes(keys.public_bytes())
    n = ciphertexts * layer.lanes
    X = rng.normal(0, 1, (n, d))
    t = time.perf_counter()
    queries = encrypt(keys, layer.layout, X)
    encrypt_s = time.perf_counter() - t
    _BATCH.update(layer=layer, public=public, queries=queries)
    layer.apply(queries[0], public)
    t = time.perf_counter()
    replies = [layer.apply(q, public) for q in queries]
    one_core = time.perf_counter() - t
    t = time.perf_counter()
    Y = decrypt(keys, layer.layout, replies, n)
    decrypt_s = time.perf_counter() - t
    err = float(np.linalg.norm(Y - layer.plain(X)) / np.linalg.norm(layer.plain(X)))
    two = None
    if hasattr(os, "fork"):  # workers inherit the encoded layer and keys by fork
        with multiprocessing.get_context("fork").Pool(2) as pool:
            pool.map(_batch_worker, [[0], [1]])
            t = time.perf_counter()
            pool.map(_batch_worker, [list(range(0, len(queries), 2)), list(range(1, len(queries), 2))])
            two = time.perf_counter() - t
    return {"queries": n, "lanes": layer.lanes, "server_qps_1proc": n / one_core,
            "server_qps_2proc": n / two if two else None, "client_encrypt_qps": n / encrypt_s,
            "client_decrypt_qps": n / decrypt_s, "rel_err": err}


def main() -> None:
    dims = [int(v) for v in ARGS.dims.split(",")]
    outputs = [int(v) for v in ARGS.outputs.split(",")]
    print(f"threads={ARGS.threads} quick={ARGS.quick} cpus={os.cpu_count()} load={os.getloadavg()[0]:.2f}")
    t = time.perf_counter()
    ctx = tenseal_context()
    ctx_bytes = len(ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=True,
                                  save_relin_keys=True))
    print(f"TenSEAL context with all Galois keys: {ctx_bytes / 1e6:.1f} MB, made in {time.perf_counter() - t:.1f} s")
    header = (f"{'d':>5} {'k':>4} | {'ours ms':>8} {'client':>7} {'query KB':>8} {'reply KB':>8} {'keys MB':>7} "
              f"{'rot':>3} {'err':>8} | {'numpy ms':>8} | {'matmul ms':>10} {'x':>7} | {'dot ms':>9} {'x':>6}")
    print(header)
    print("-" * len(header))
    rng = np.random.default_rng(0)
    summary = {}
    for d in dims:
        for k in outputs:
            W = rng.normal(0, 1 / np.sqrt(d), (k, d))
            b = rng.normal(0, 0.5, k)
            x = rng.normal(0, 1, d)
            ours = bench_ours(W, b, x)
            numpy_ms = median_ms(lambda: W @ x + b, 200)
            key = d == 4096 and k == 20
            matmul = bench_tenseal(ctx, W, b, x, "matmul") if (not ARGS.quick or key) else None
            dot = bench_tenseal(ctx, W, b, x, "dot") if (not ARGS.quick or key or k <= 20) else None
            cell = lambda r: (f"{r['server_ms']:10.0f} {r['server_ms'] / ours['server_ms']:7.0f}" if r
                              else f"{'-':>10} {'-':>7}")
            cell_dot = lambda r: (f"{r['server_ms']:9.0f} {r['server_ms'] / ours['server_ms']:6.1f}" if r
                                  else f"{'-':>9} {'-':>6}")
            print(f"{d:5d} {k:4d} | {ours['server_ms']:8.1f} {ours['client_ms']:7.1f} {ours['query_bytes'] / 1e3:8.1f} "
                  f"{ours['reply_bytes'] / 1e3:8.1f} {ours['key_bytes'] / 1e6:7.2f} {ours['rotations']:3d} "
                  f"{ours['rel_err']:8.1e} | {numpy_ms:8.4f} | {cell(matmul)} | {cell_dot(dot)}", flush=True)
            if key:
                bound = rotation_lower_bound_ms(ours, d)
                summary = {
                    "d": d, "k": k, "server_ms": round(ours["server_ms"], 2),
                    "server_min_ms": round(ours["server_min_ms"], 2), "client_ms": round(ours["client_ms"], 2),
                    "query_bytes": ours["query_bytes"], "reply_bytes": ours["reply_bytes"],
                    "key_bytes": ours["key_bytes"], "galois_keys": ours["keys"], "rotations": ours["rotations"],
                    "rel_err": ours["rel_err"], "numpy_ms": round(numpy_ms, 4),
                    "tenseal_matmul_ms": round(matmul["server_ms"], 1),
                    "tenseal_matmul_query_bytes": matmul["query_bytes"],
                    "tenseal_matmul_reply_bytes": matmul["reply_bytes"],
                    "tenseal_dot_ms": round(dot["server_ms"], 1), "tenseal_dot_reply_bytes": dot["reply_bytes"],
                    "tenseal_key_bytes": ctx_bytes,
                    "speedup_vs_matmul": round(matmul["server_ms"] / ours["server_ms"], 1),
                    "speedup_vs_dot": round(dot["server_ms"] / ours["server_ms"], 1),
                    "rotate_ms": round(bound["rotate_ms"], 3), "rotate_low_ms": round(bound["rotate_low_ms"], 3),
                    "multiply_ms": round(bound["multiply_ms"], 3),
                    "lower_bound_ms": round(bound["bound_ms"], 2),
                    "ratio_to_lower_bound": round(ours["server_ms"] / bound["bound_ms"], 2),
                    "strict_lower_bound_ms": round(bound["strict_bound_ms"], 2),
                    "ratio_to_strict_lower_bound": round(ours["server_ms"] / bound["strict_bound_ms"], 2),
                }
    privacy = {}
    if summary:
        rng = np.random.default_rng(0)
        W, b, x = rng.normal(0, 1 / np.sqrt(4096), (20, 4096)), rng.normal(0, 0.5, 20), rng.normal(0, 1, 4096)
        base = bench_ours(W, b, x)  # measured again here, so all three come from the same minutes
        plain_private = bench_ours(W, b, x, profile=N8192_PRIVATE)
        private = bench_ours(W, b, x, profile=N8192_PRIVATE, circuit_privacy=30)
        privacy = {
            "private_server_ms": round(private["server_ms"], 2), "private_base_server_ms": round(base["server_ms"], 2),
            "private_noflood_server_ms": round(plain_private["server_ms"], 2),
            "private_server_ratio": round(private["server_ms"] / base["server_ms"], 2),
            "private_reply_bytes": private["reply_bytes"], "private_base_reply_bytes": base["reply_bytes"],
            "private_key_bytes": private["key_bytes"], "private_base_key_bytes": base["key_bytes"],
            "private_query_bytes": private["query_bytes"], "private_base_query_bytes": base["query_bytes"],
            "private_err_std": private["abs_err_std"], "private_base_err_std": base["abs_err_std"],
            "private_flood_std": round(private["flood_std"], 5), "private_bits": 30,
        }
        print(f"circuit privacy d=4096 k=20 (N8192_PRIVATE, 30 bits): server {private['server_ms']:.1f} ms vs "
              f"{base['server_ms']:.1f} ms default ({privacy['private_server_ratio']:.2f}x; the profile alone "
              f"{plain_private['server_ms']:.1f} ms), reply {private['reply_bytes'] / 1e3:.0f} vs "
              f"{base['reply_bytes'] / 1e3:.0f} kB, keys {private['key_bytes'] / 1e6:.2f} vs "
              f"{base['key_bytes'] / 1e6:.2f} MB, output error std {private['abs_err_std']:.2g} vs "
              f"{base['abs_err_std']:.2g} (flood std {private['flood_std']:.3g})")
    batches = {}
    for pairing in ("inputs", "outputs"):
        batch = batches[pairing] = batch_throughput(576, 5, ARGS.batch_ciphertexts, pairing)
        two = f"{batch['server_qps_2proc']:.0f}" if batch["server_qps_2proc"] else "n/a"
        print(f"batch d=576 k=5, pairing={pairing}: {batch['queries']} queries in "
              f"{batch['queries'] // batch['lanes']} ciphertexts ({batch['lanes']} lanes): server "
              f"{batch['server_qps_1proc']:.0f} queries/s on 1 process, {two} on 2; client encrypt "
              f"{batch['client_encrypt_qps']:.0f}/s, decrypt {batch['client_decrypt_qps']:.0f}/s, "
              f"err {batch['rel_err']:.1e}")
    batch = batches["inputs"]
    if summary:
        print(f"d=4096 k=20: rotation lower bound {summary['lower_bound_ms']:.1f} ms (multiply {summary['multiply_ms']:.2f} "
              f"+ 12 x rotate {summary['rotate_ms']:.2f}); ours is {summary['ratio_to_lower_bound']:.2f}x that bound "
              f"and {summary['ratio_to_strict_lower_bound']:.2f}x the strict one (12 x {summary['rotate_low_ms']:.2f} "
              f"ms rotations after the rescale: {summary['strict_lower_bound_ms']:.1f} ms)")
        summary["batch_qps_d576_k5"] = round(batch["server_qps_1proc"], 1)
        summary["batch_qps_d576_k5_2proc"] = round(batch["server_qps_2proc"], 1) if batch["server_qps_2proc"] else None
        summary["batch_qps_d576_k5_outputs_pairing"] = round(batches["outputs"]["server_qps_1proc"], 1)
        summary.update(privacy)
        summary["load_avg"] = round(os.getloadavg()[0], 2)
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
