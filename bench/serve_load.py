"""Encrypted serving over loopback HTTP: load test, and end-to-end latency with a real client model.

    .venv/bin/python bench/serve_load.py [--export DIR] [--clients 4] [--seconds 10] [--states 1]
    .venv/bin/python bench/serve_load.py --client-model smollm2 [--export DIR] [--queries 20] [--data bbc]

Both modes start `serve.running.run` in a subprocess on a free loopback port (from --export, or a
random-weight export built here: d=576, k=5 by default, or the client model's hidden size).

Load mode: N client threads, each with its own session, send `--states` random hidden states per
request for T seconds. Reports throughput, p50/p99 latency, and the ratio of p50 to the server's HE
time alone (the layer applied in this process, no HTTP), measured in the same run.

End-to-end mode: one text per query through `Client.classify`: extract (client model), encrypt,
HTTP + server, decrypt, each timed; medians over M queries (target: median total <= 300 ms). The
baseline is the plaintext pipeline on the same texts (the same extraction, then the numpy head).

The last line is JSON with the figures.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", help="export directory to serve (default: a random-weight export built here)")
    parser.add_argument("--dim", type=int, default=576, help="input dim of the random export (load mode)")
    parser.add_argument("--classes", type=int, default=5, help="outputs of the random export")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads (load mode)")
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration")
    parser.add_argument("--states", type=int, default=1, help="hidden states per request (load mode)")
    parser.add_argument("--client-model", help="end-to-end mode: registry name, folder or hub id of the client model")
    parser.add_argument("--queries", type=int, default=20, help="end-to-end queries (one text each)")
    parser.add_argument("--data", default="bbc", help="end-to-end texts: a registry dataset")
    parser.add_argument("--server-workers", type=int, default=2, help="server HE threads (max_concurrency)")
    parser.add_argument("--threads", type=int, default=1, help="torch / BLAS threads in this process")
    return parser.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)  # before numpy is imported

import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(ARGS.threads)

from encrypted import ClientKeys, EncryptedLinear, PublicKeys, encrypt  # noqa: E402
from lightning_modules.parties.export import write_export
from serve.formats.exports import load_export  # noqa: E402
from serve.harness import wait_for_server  # noqa: E402
from serve.client import Client  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def random_export(out: Path, d: int, k: int, source: dict) -> Path:
    rng = np.random.default_rng(0)
    t = 64
    return write_export(out, rng.normal(0, 1 / np.sqrt(d), (t, d)), rng.normal(0, 0.1, t),
                        rng.normal(0, 1 / np.sqrt(t), (k, t)), rng.normal(0, 0.1, k), source=source,
                        target={"model": "random"}, label_names=[f"class{i}" for i in range(k)])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`serve.running.run` in a subprocess, stopped on exit."""

    def __init__(self, export: Path, workers: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = (f"from serve.running import run; run({str(export)!r}, host='127.0.0.1', port={self.port}, "
                f"max_concurrency={workers}, max_sessions=256, log_level='warning')")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)

    def __enter__(self) -> "ServerProcess":
        try:
            wait_for_server(self.url, self.proc, timeout_s=120)
        except RuntimeError as exc:
            self.proc.kill()
            raise SystemExit(f"server did not start: {exc}") from None
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def he_alone_ms(export: Path, reps: int = 20) -> float:
    """Median server-side HE time of one query ciphertext, in this process, no HTTP."""
    fused = load_export(export)
    layer = EncryptedLinear(fused.weight, fused.bias)
    keys = ClientKeys.generate(layer.layout.profile, layer.rotation_steps)
    public = PublicKeys.from_bytes(keys.public_bytes(), layer.profile)
    query = encrypt(keys, layer.layout, np.ones((1, layer.input_dim)))[0]
    layer.apply(query, public)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        layer.apply(query, public)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def load_mode(export: Path) -> dict:
    fused = load_export(export)
    d = fused.input_dim
    baseline_ms = he_alone_ms(export)
    latencies: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    ready = threading.Barrier(ARGS.clients + 1)
    stop_at = [float("inf")]  # the clients run until the main thread sets the end, once all are ready

    def client_loop(i: int) -> None:
        rng = np.random.default_rng(i)
        try:
            with Client(server.url, timeout=120, cache=False) as client:  # a session of its own
                client.infer_states(rng.normal(0, 1, (ARGS.states, d)))  # session + warm-up
                ready.wait()
                while time.perf_counter() < stop_at[0]:
                    X = rng.normal(0, 1, (ARGS.states, d))
                    t = time.perf_counter()
                    client.infer_states(X)
                    with lock:
                        latencies.append((time.perf_counter() - t) * 1000)
                        server_ms.append(client.last_timings["server_ms"])
        except Exception as exc:  # reported in the summary
            errors.append(f"{type(exc).__name__}: {exc}")
            ready.abort()

    with ServerProcess(export, ARGS.server_workers) as server:
        threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(ARGS.clients)]
        for t in threads:
            t.start()
        try:
            ready.wait(timeout=300)
        except threading.BrokenBarrierError:
            raise SystemExit(f"clients failed to start: {errors[:3]}")
        start = time.perf_counter()
        stop_at[0] = start + ARGS.seconds
        for t in threads:
            t.join(ARGS.seconds + 300)
        elapsed = time.perf_counter() - start
    n = len(latencies)
    p50 = percentile(latencies, 50)
    figures = {
        "mode": "load", "input_dim": d, "output_dim": fused.output_dim, "clients": ARGS.clients,
        "states_per_request": ARGS.states, "seconds": round(elapsed, 2), "requests": n, "errors": len(errors),
        "requests_per_s": round(n / elapsed, 2), "states_per_s": round(n * ARGS.states / elapsed, 2),
        "p50_ms": round(p50, 2), "p99_ms": round(percentile(latencies, 99), 2),
        "server_he_p50_ms": round(percentile(server_ms, 50), 2), "he_alone_ms": round(baseline_ms, 2),
        "p50_over_he_alone": round(p50 / baseline_ms, 2), "server_workers": ARGS.server_workers,
    }
    print(f"load: {ARGS.clients} clients x {ARGS.seconds:.0f}s, d={d} k={fused.output_dim}, "
          f"{ARGS.states} state(s)/request: {n} requests, {figures['requests_per_s']} req/s "
          f"({figures['states_per_s']} states/s), p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
          f"{len(errors)} errors")
    print(f"baseline: HE alone in-process {baseline_ms:.2f} ms/query; server HE under load p50 "
          f"{figures['server_he_p50_ms']} ms; p50 / HE alone = {figures['p50_over_he_alone']}x")
    return figures


def load_texts_for(n: int) -> list[str]:
    from datamodules.text import load_texts

    ds = load_texts(ARGS.data)
    order = np.random.default_rng(0).permutation(len(ds))[:n]
    return [ds[int(i)]["text"] for i in order]


def e2e_mode(export: Path | None, workdir: Path) -> dict:
    from datamodules.encoder import StateEncoder
    from datamodules.models import model_identity

    if export is None:
        encoder = StateEncoder(ARGS.client_model, threads=ARGS.threads)
        source = {"model": ARGS.client_model, "model_identity": model_identity(encoder.model_path),
                  "pooling": encoder.pooling, "layer": -1, "max_length": encoder.max_length, "dtype": "float32",
                  "hidden_size": encoder.hidden_size}
        export = random_export(workdir / "export", encoder.hidden_size, ARGS.classes, source)
    fused = load_export(export)
    texts = load_texts_for(ARGS.queries + 1)
    baseline_he = he_alone_ms(export)
    rows: list[dict] = []
    plain_ms: list[float] = []
    agree = 0
    with ServerProcess(export, ARGS.server_workers) as server, \
            Client(server.url, client_model=ARGS.client_model, threads=ARGS.threads) as client:
        client.classify(texts[:1])  # loads the model, checks its identity, opens the session
        for text in texts[1:]:
            result = client.classify([text])[0]
            rows.append(result["timings"])
            t = time.perf_counter()  # plaintext pipeline on the same text: extraction, then the numpy head
            logits = fused(client.encoder([text]))
            plain_ms.append((time.perf_counter() - t) * 1000)
            agree += int(np.argmax(logits[0]) == np.argmax(result["logits"]))
    med = {key: statistics.median(r[key] for r in rows) for key in
           ("extract_ms", "encrypt_ms", "http_ms", "server_ms", "decrypt_ms", "total_ms")}
    plain = statistics.median(plain_ms)
    figures = {"mode": "e2e", "client_model": ARGS.client_model, "queries": len(rows),
               "input_dim": fused.input_dim, "output_dim": fused.output_dim,
               **{k: round(v, 2) for k, v in med.items()}, "plaintext_ms": round(plain, 2),
               "total_over_plaintext": round(med["total_ms"] / plain, 3), "he_alone_ms": round(baseline_he, 2),
               "argmax_agreement": agree / len(rows), "target_total_ms": 300,
               "meets_target": med["total_ms"] <= 300}
    print(f"e2e ({ARGS.client_model}, {len(rows)} queries, one text each, medians): extract "
          f"{med['extract_ms']:.1f} ms, encrypt {med['encrypt_ms']:.1f} ms, HTTP+server {med['http_ms']:.1f} ms "
          f"(server HE {med['server_ms']:.1f} ms), decrypt {med['decrypt_ms']:.1f} ms, total {med['total_ms']:.1f} ms "
          f"(target <= 300 ms: {'met' if figures['meets_target'] else 'NOT met'})")
    print(f"baseline: plaintext pipeline (same extraction + numpy head) {plain:.1f} ms; encrypted / plaintext = "
          f"{figures['total_over_plaintext']}x; HE alone in-process {baseline_he:.2f} ms; "
          f"encrypted and plaintext argmax agree on {agree}/{len(rows)}")
    return figures


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="xsilo-serve-bench-") as tmp:
        workdir = Path(tmp)
        export = Path(ARGS.export) if ARGS.export else None
        if ARGS.client_model:
            figures = e2e_mode(export, workdir)
        else:
            if export is None:
                export = random_export(workdir / "export", ARGS.dim, ARGS.classes, {"model": "random"})
            figures = load_mode(export)
    figures["threads"] = ARGS.threads
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
