"""The client's everyday use (issue 27): a warm client against today's per-process query, in the same run.

    .venv/bin/python bench/client.py [--heads DIR --head NAME --aligner DIR] [--queries 30] [--batch 400]

Starts `xsilo serve --heads DIR` (default: the demo's provider head, runs/demo/two-party/provider/heads/bbc) in a
subprocess on a free loopback port, and measures with the demo's client map (runs/demo/two-party/client/aligner,
SmolLM2; models from $XSILO_HOME):

1. today's per-process query: `xsilo query --text T --cache false` (a process that loads the model, makes and
   uploads keys, fetches the provider's detector, and deletes its session), wall time and traffic;
2. a warm per-process query: the same command after one run filled the session cache (no keys, no detector);
3. a running `Client`: one text per `classify`, end to end (extraction included), median and p90 over --queries;
4. a batch of --batch texts of about 60 words (BBC, cut to 60 words) through one `Client.classify`.

Each is printed with its ratio against today's per-process query. The last line is JSON holding
`warm_query_ms_median`, `warm_query_traffic_bytes` (one warm `xsilo query --text`, every byte in and out) and
`batch_400_s`, with the targets (<= 200 ms, <= 300 KB, <= 30 s).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "demo" / "two-party"
TEXT = "Shares in the bank rose after record profits"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default=str(DEMO / "provider" / "heads" / "bbc"), help="the provider's head folder")
    parser.add_argument("--head", default=None, help="its served name (default: the folder's name)")
    parser.add_argument("--aligner", default=str(DEMO / "client" / "aligner"), help="the client's map folder")
    parser.add_argument("--queries", type=int, default=30, help="single-text queries through a running Client")
    parser.add_argument("--processes", type=int, default=2, help="runs of each per-process query")
    parser.add_argument("--batch", type=int, default=400, help="texts in the batch")
    parser.add_argument("--data", default="bbc", help="the batch's texts: a registry dataset")
    parser.add_argument("--words", type=int, default=60, help="words per batch text")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the client (and OMP threads)")
    parser.add_argument("--batch-threads", type=int, default=None,
                        help="also time the batch with this many torch threads (default: only --threads)")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(heads: str, home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    from serve.harness import wait_for_server

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lightning_modules.cli", "serve", "--heads", heads, "--port",
                                str(port), "--log_level", "warning", "--store", "memory://"],
                               cwd=ROOT, env={**env, "XSILO_HOME": str(home)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, process, timeout_s=120)
    except RuntimeError as exc:
        process.kill()
        raise SystemExit(f"error: xsilo serve did not start ({exc}); run it by hand to see why") from None
    return process, url


def per_process(url: str, head: str, aligner: str, env: dict[str, str], threads: int, cache: bool,
                summary: Path) -> dict:
    """One `xsilo query --text` process: its wall time and its --summary."""
    command = [sys.executable, "-m", "lightning_modules.cli", "query", "--server", url, "--head", head, "--aligner",
               aligner, "--text", TEXT, "--threads", str(threads), "--cache", str(cache).lower(),
               "--summary", str(summary)]
    t0 = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"error: xsilo query failed: {result.stderr[-2000:]}")
    report = json.loads(summary.read_text())
    traffic = report["traffic"]
    return {"wall_s": wall, "bytes": traffic["bytes_sent"] + traffic["bytes_received"],
            "bytes_sent": traffic["bytes_sent"], "bytes_received": traffic["bytes_received"],
            "keys_uploaded": report["session"]["keys_uploaded"], "detector": report["session"]["detector_fetched"],
            "total_ms": report["per_batch"]["total_ms"]["median_ms"]}


def forget_entries(url: str) -> None:
    """Drop the session-cache entries the per-process queries left for this run's server (it is gone)."""
    import shutil

    from serve.client_cache import SessionCache, read_meta

    for _, folder in SessionCache().entries():
        if (read_meta(folder) or {}).get("server") == url:
            shutil.rmtree(folder, ignore_errors=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def batch_texts(data: str, n: int, words: int) -> list[str]:
    from datamodules.text import load_texts

    texts = [" ".join(t.split()[:words]) for t in load_texts(data)["text"] if len(t.split()) >= words]
    if len(texts) < n:
        raise SystemExit(f"error: {data} has {len(texts)} texts of at least {words} words, fewer than --batch {n}")
    return texts[:n]


def main() -> None:
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    head = args.head or Path(args.heads).name
    for folder in (args.heads, args.aligner):
        if not Path(folder).is_dir():
            raise SystemExit(f"error: {folder} is missing; run the demo (make demo) or pass --heads/--aligner")
    from serve.client import Client

    with tempfile.TemporaryDirectory(prefix="xsilo-client-bench-") as tmp:
        work = Path(tmp)
        server, url = start_server(args.heads, work / "provider-home", env)
        try:
            # 1. today's per-process query: new keys, key upload, detector download, session deleted
            today = [per_process(url, head, args.aligner, env, args.threads, False, work / f"today{i}.json")
                     for i in range(args.processes)]
            # 2. a warm per-process query: one run fills the session cache, the next reuse it
            per_process(url, head, args.aligner, env, args.threads, True, work / "prime.json")
            warm = [per_process(url, head, args.aligner, env, args.threads, True, work / f"warm{i}.json")
                    for i in range(args.processes)]
            # 3. a running Client, one text per classify; 4. a batch
            texts = batch_texts(args.data, max(args.batch, args.queries), args.words)
            with Client(server=url, head=head, aligner=args.aligner, threads=args.threads,
                        cache=work / "sessions") as client:
                client.classify([TEXT])  # loads the model, opens the session
                latencies, traffic = [], []
                for text in [TEXT] + texts[:args.queries - 1]:
                    before = client.traffic.bytes_sent + client.traffic.bytes_received
                    t0 = time.perf_counter()
                    client.classify([text])
                    latencies.append((time.perf_counter() - t0) * 1000)
                    traffic.append(client.traffic.bytes_sent + client.traffic.bytes_received - before)
                stage_ms = {k: statistics.median(client.classify([t])[0]["timings"][k] for t in texts[:5])
                            for k in ("extract_ms", "encrypt_ms", "http_ms", "server_ms", "decrypt_ms")}
                t0 = time.perf_counter()
                answers = client.classify(texts[:args.batch])  # one batch: sorted by length, packed into lanes
                batch_s = time.perf_counter() - t0
                batch_timings = dict(client.last_timings)
                batch_more = None
                if args.batch_threads and args.batch_threads != args.threads:
                    import torch

                    torch.set_num_threads(args.batch_threads)
                    t0 = time.perf_counter()
                    client.classify(texts[:args.batch])
                    batch_more = time.perf_counter() - t0
                    torch.set_num_threads(args.threads)
        finally:
            server.terminate()
            server.wait(timeout=30)
            forget_entries(url)
    today_s = statistics.median(r["wall_s"] for r in today)
    today_bytes = statistics.median(r["bytes"] for r in today)
    warm_s = statistics.median(r["wall_s"] for r in warm)
    warm_bytes = int(statistics.median(r["bytes"] for r in warm))
    median_ms = statistics.median(latencies)
    print(f"today's per-process query (--cache false, {args.processes} runs, median): {today_s:.2f} s, "
          f"{today_bytes / 1e6:.2f} MB ({today[0]['bytes_sent']:,} B up incl. keys, {today[0]['bytes_received']:,} B "
          f"down incl. the detector)")
    print(f"warm per-process query (cached session): {warm_s:.2f} s ({today_s / warm_s:.2f}x faster), {warm_bytes:,} B "
          f"({today_bytes / warm_bytes:.1f}x less traffic; keys uploaded {warm[0]['keys_uploaded']}, detector fetched "
          f"{warm[0]['detector']})")
    print(f"running Client, one text per query ({len(latencies)} queries): median {median_ms:.1f} ms, p90 "
          f"{percentile(latencies, 90):.1f} ms end to end ({today_s * 1000 / median_ms:.0f}x faster than today's "
          f"per-process query), {statistics.median(traffic):,.0f} B per query; stages (median of 5): "
          + ", ".join(f"{k[:-3]} {v:.1f} ms" for k, v in stage_ms.items()))
    print(f"batch of {len(answers)} texts of {args.words} words: {batch_s:.1f} s ({len(answers) / batch_s:.1f} texts/s;"
          f" {len(answers) * today_s / batch_s:.0f}x faster than {len(answers)} per-process queries); extraction "
          f"{batch_timings['extract_ms'] / 1000:.1f} s, encryption {batch_timings['encrypt_ms'] / 1000:.2f} s, HTTP "
          f"{batch_timings['http_ms'] / 1000:.2f} s (server HE {batch_timings['server_ms'] / 1000:.2f} s), decryption "
          f"{batch_timings['decrypt_ms'] / 1000:.2f} s, {int(batch_timings['ciphertexts'])} ciphertexts")
    if batch_more is not None:
        print(f"the same batch with {args.batch_threads} torch threads: {batch_more:.1f} s")
    figures = {"warm_query_ms_median": round(median_ms, 1), "warm_query_ms_p90": round(percentile(latencies, 90), 1),
               "warm_query_traffic_bytes": warm_bytes, "batch_400_s": round(batch_s, 2),
               "batch_texts": len(answers), "today_query_s": round(today_s, 2), "today_query_traffic_bytes":
               int(today_bytes), "warm_process_query_s": round(warm_s, 2),
               "ratio_query_today_over_warm_client": round(today_s * 1000 / median_ms, 1),
               "ratio_traffic_today_over_warm": round(today_bytes / warm_bytes, 1),
               "targets": {"warm_query_ms_median": 200, "warm_query_traffic_bytes": 300_000, "batch_400_s": 30},
               "threads": args.threads, "batch_threads": args.batch_threads,
               "batch_400_s_more_threads": None if batch_more is None else round(batch_more, 2)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
