"""Replicas on one Redis store, a replica restarted mid-run, every answer checked; and the store's overhead.

    .venv/bin/python bench/serve_replicas.py [--clients 16] [--seconds 60] [--dim 576] [--overhead-queries 200]

Everything runs on this machine, in the same run:

1. **Overhead.** One client sends `--overhead-queries` queries one after another to one replica, for each store:
   memory:// (the in-memory baseline), the default SQLite file, and Redis, with the same identity (its address, no
   API key). Reports each median and p90, and the median's rise over memory://.
2. **One replica** on Redis: `--clients` client threads × `--seconds`, each with its own API key (issued in the
   store), its own session and `lanes`-row queries encrypted once and reused (so the load generator leaves the cores
   to the servers). Two of the keys carry a small row budget.
3. **Two replicas** on the same Redis, round-robin per request, replica 2 stopped with SIGTERM (drained) halfway and
   started again. A client retries a transient failure (connection refused or reset, 503) on the next replica.

Every 200 reply is decrypted and compared with the plaintext logits; for every key the rows the store charged must
equal the rows answered, and a budgeted key must be answered exactly its budget. The last line is JSON.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of each load phase")
    parser.add_argument("--dim", type=int, default=576, help="input dim of the random export")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--budgeted-queries", type=int, default=40, help="queries the two budgeted keys may send")
    parser.add_argument("--overhead-queries", type=int, default=200)
    parser.add_argument("--server-workers", type=int, default=2, help="HE threads per replica (max_concurrency)")
    return parser.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"  # before numpy is imported

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encrypted import ClientKeys, LinearLayout, decrypt, encrypt  # noqa: E402
from serve.formats.exports import load_export  # noqa: E402
from serve.harness import wait_for_server  # noqa: E402
from serve.identity import key_digest  # noqa: E402
from serve.store import ApiKeyRecord, open_store  # noqa: E402
from tests.serve.serve_support import free_port, write_small_export  # noqa: E402
from tests.serve.store.redis_server import RedisServer  # noqa: E402

TRANSIENT = (httpx.TransportError,)


class Replica:
    """`xsilo serve`'s `run` in a subprocess on a fixed port; `start` waits for /readyz, `stop` sends SIGTERM."""

    def __init__(self, export: Path, store: str, name: str, port: int | None = None, api_keys: bool = True):
        self.export, self.store, self.name, self.api_keys = export, store, name, api_keys
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Replica":
        code = (f"from serve.running import run; run({str(self.export)!r}, port={self.port}, store={self.store!r}, "
                f"api_keys={self.api_keys}, replica_id={self.name!r}, "
                f"max_concurrency={ARGS.server_workers}, max_sessions=256, log_level='warning')")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                        stderr=subprocess.DEVNULL)
        try:
            wait_for_server(self.url, self.process, timeout_s=120, path="/readyz")
        except RuntimeError as exc:
            raise SystemExit(f"replica {self.name} did not start: {exc}") from None
        return self

    def stop(self) -> float:
        """SIGTERM (drain), wait; the seconds it took to exit."""
        start = time.monotonic()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return time.monotonic() - start


@dataclass
class LoadClient:
    """One application: its key, its session, its encrypted queries and what it was answered."""

    name: str
    key: str
    keys: ClientKeys
    queries: list[bytes]
    expected: list[np.ndarray]
    session: str = ""
    answered: int = 0
    refused: int = 0  # 429 budget_exhausted
    retries: int = 0
    wrong: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def make_clients(export: Path, layout: LinearLayout, store_url: str) -> list[LoadClient]:
    fused = load_export(export)
    store = open_store(store_url)
    clients = []
    for i in range(ARGS.clients):
        rng = np.random.default_rng(i)
        name, key = f"load-{i:02d}", f"xsk_bench_{i:02d}_{rng.integers(1 << 62)}"
        rows = ARGS.budgeted_queries * layout.lanes if i < 2 else None
        store.add_api_key(ApiKeyRecord(name, key_digest(key.encode()), rows, None, time.time()))
        keys = ClientKeys.generate(layout.profile, layout.rotation_steps)
        X = [rng.normal(0, 1, (layout.lanes, fused.input_dim)) for _ in range(4)]
        clients.append(LoadClient(name, key, keys, [encrypt(keys, layout, x)[0] for x in X],
                                  [x @ fused.weight.T + fused.bias for x in X]))
    store.close()
    return clients


def run_load(clients: list[LoadClient], replicas: list[Replica], layout: LinearLayout,
             restart: Replica | None) -> dict:
    """All clients for ARGS.seconds, round-robin over `replicas`; `restart` is stopped and started halfway."""
    stop_at = time.monotonic() + ARGS.seconds
    barrier = threading.Barrier(len(clients) + 1)

    def loop(client: LoadClient, offset: int) -> None:
        https = [httpx.Client(base_url=r.url, timeout=60, headers={"X-API-Key": client.key}) for r in replicas]
        try:
            opened = https[0].post("/v1/sessions", content=client.keys.public_bytes())
            opened.raise_for_status()
            client.session = opened.json()["session_id"]
        except Exception as exc:  # reported
            client.errors.append(f"open: {exc}")
        barrier.wait()
        turn, q = offset, 0
        while time.monotonic() < stop_at and client.session:
            http = https[turn % len(https)]
            turn += 1
            start = time.perf_counter()
            try:
                response = http.post(f"/v1/sessions/{client.session}/infer", content=client.queries[q % 4])
            except TRANSIENT:
                client.retries += 1
                time.sleep(0.05)
                continue
            if response.status_code == 503:
                client.retries += 1
                time.sleep(0.05)
                continue
            if response.status_code == 429:
                client.refused += 1
                time.sleep(0.2)
                continue
            if response.status_code != 200:
                client.errors.append(f"{response.status_code} {response.text[:200]}")
                continue
            client.latencies.append((time.perf_counter() - start) * 1000)
            got = decrypt(client.keys, layout, [response.content], layout.lanes)
            if not np.allclose(got, client.expected[q % 4], atol=1e-2):
                client.wrong += 1
            client.answered += 1
            q += 1
        for http in https:
            http.close()

    threads = [threading.Thread(target=loop, args=(c, i), daemon=True) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.monotonic()
    restart_s = None
    if restart is not None:
        time.sleep(ARGS.seconds / 2)
        t = time.monotonic()
        drained_s = restart.stop()
        restart.start()
        restart_s = {"drain_s": round(drained_s, 2), "down_s": round(time.monotonic() - t, 2)}
    for thread in threads:
        thread.join(ARGS.seconds + 120)
    elapsed = time.monotonic() - start
    latencies = [x for c in clients for x in c.latencies]
    answered = sum(c.answered for c in clients)
    return {"replicas": len(replicas), "seconds": round(elapsed, 1), "answered": answered,
            "queries_per_s": round(answered / elapsed, 2),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1), "p90_ms": round(float(np.percentile(latencies, 90)), 1),
            "p99_ms": round(float(np.percentile(latencies, 99)), 1),
            "wrong": sum(c.wrong for c in clients), "errors": sum(len(c.errors) for c in clients),
            "error_samples": [e for c in clients for e in c.errors][:3],
            "retries": sum(c.retries for c in clients), "budget_refusals": sum(c.refused for c in clients),
            "restart": restart_s}


def budgets_exact(clients: list[LoadClient], store_url: str, lanes: int) -> dict:
    store = open_store(store_url)
    charged = {c.name: store.used(f"rows:name:{c.name}|fused") for c in clients}
    store.close()
    mismatched = [c.name for c in clients if charged[c.name] != c.answered * lanes]
    budgeted = [c.answered for c in clients[:2]]
    return {"exact": not mismatched and all(a == ARGS.budgeted_queries for a in budgeted),
            "mismatched": mismatched, "budgeted_answered": budgeted, "budgeted_limit": ARGS.budgeted_queries}


def overhead(export: Path, layout: LinearLayout, stores: dict[str, str]) -> dict:
    """Median and p90 of one client's sequential queries per store (same keys, same query)."""
    keys = ClientKeys.generate(layout.profile, layout.rotation_steps)
    fused = load_export(export)
    query = encrypt(keys, layout, np.ones((1, fused.input_dim)))[0]
    figures = {}
    for name, url in stores.items():
        replica = Replica(export, url, f"overhead-{name}", api_keys=False).start()  # the same identity: its address
        try:
            with httpx.Client(base_url=replica.url, timeout=60) as http:
                session = http.post("/v1/sessions", content=keys.public_bytes()).json()["session_id"]
                times = []
                for i in range(ARGS.overhead_queries + 10):
                    t = time.perf_counter()
                    response = http.post(f"/v1/sessions/{session}/infer", content=query)
                    assert response.status_code == 200, response.text
                    if i >= 10:  # warm-up
                        times.append((time.perf_counter() - t) * 1000)
        finally:
            replica.stop()
        figures[name] = {"median_ms": round(float(np.median(times)), 2),
                         "p90_ms": round(float(np.percentile(times, 90)), 2)}
    base = figures["memory"]["median_ms"]
    for name in figures:
        figures[name]["median_rise_ms"] = round(figures[name]["median_ms"] - base, 2)
    return figures


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="xsilo-replicas-") as tmp, RedisServer() as redis_server:
        tmp_path = Path(tmp)
        export = write_small_export(tmp_path / "export", d=ARGS.dim, k=ARGS.classes, seed=0)
        probe = Replica(export, "memory://", "probe", api_keys=False).start()
        layout = LinearLayout.from_dict(httpx.get(f"{probe.url}/v1/model").json()["layout"])
        probe.stop()

        print(f"overhead: {ARGS.overhead_queries} sequential queries per store, d={ARGS.dim}", flush=True)
        over = overhead(export, layout, {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'over.db'}",
                                         "redis": redis_server.url.replace("/0", "/1")})
        for name, f in over.items():
            print(f"  {name:7s} median {f['median_ms']:.2f} ms, p90 {f['p90_ms']:.2f} ms, "
                  f"median rise over memory {f['median_rise_ms']:+.2f} ms")

        results = {}
        for phase, count in (("one_replica", 1), ("two_replicas", 2)):
            redis = redis_server.url.replace("/0", f"/{2 + count}")
            clients = make_clients(export, layout, redis)
            replicas = [Replica(export, redis, f"r{i + 1}").start() for i in range(count)]
            try:
                figures = run_load(clients, replicas, layout, restart=replicas[1] if count == 2 else None)
            finally:
                for replica in replicas:
                    replica.stop()
            figures["budgets"] = budgets_exact(clients, redis, layout.lanes)
            results[phase] = figures
            print(f"{phase}: {ARGS.clients} clients x {ARGS.seconds:.0f} s: {figures['answered']} answered, "
                  f"{figures['queries_per_s']} queries/s, p50 {figures['p50_ms']} ms, p90 {figures['p90_ms']} ms, "
                  f"p99 {figures['p99_ms']} ms; wrong {figures['wrong']}, errors {figures['errors']}, "
                  f"retries {figures['retries']}, budget refusals {figures['budget_refusals']}, "
                  f"budgets exact: {figures['budgets']['exact']}"
                  + (f", restart {figures['restart']}" if figures["restart"] else ""), flush=True)
        ratio = results["two_replicas"]["queries_per_s"] / results["one_replica"]["queries_per_s"]
        print(f"throughput, two replicas over one (same run): {ratio:.2f}x")
        print(json.dumps({"bench": "serve_replicas", "clients": ARGS.clients, "seconds": ARGS.seconds,
                          "dim": ARGS.dim, "lanes": layout.lanes, "overhead": over, **results,
                          "throughput_ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
