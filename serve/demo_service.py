"""The demo's look at the provider as a service: its metrics, readiness and the budgets its store kept across a
restart (`scripts/demo.sh`, stage 6).

    python -m serve.demo_service URL BEFORE.json --key NAME [--out FILE]

BEFORE.json is `snapshot(URL)` taken before the restart. Run with the provider's XSILO_HOME (its default store).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .formats.folders import atomic_write_bytes
from .settings import ServerSettings, store_url
from .store import open_store


def requests_by_route(url: str) -> dict[str, float]:
    """`xsilo_requests_total` summed by "METHOD route" (this process's counts: they start at zero on restart)."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        if family.name == "xsilo_requests":
            for sample in family.samples:
                if sample.name == "xsilo_requests_total":
                    key = f"{sample.labels['method']} {sample.labels['route']}"
                    counts[key] = counts.get(key, 0) + sample.value
    return counts


def snapshot(url: str) -> dict[str, Any]:
    return {"health": httpx.get(f"{url}/healthz", timeout=10).json(), "requests": requests_by_route(url)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("before", help="snapshot(URL) taken before the restart (JSON)")
    parser.add_argument("--key", required=True, help="the issued API key's name whose budget to show")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    before = json.loads(Path(args.before).read_text())
    after = snapshot(args.url)
    ready = httpx.get(f"{args.url}/readyz", timeout=10).status_code == 200
    with open_store(store_url(ServerSettings())) as store:
        heads = after["health"]["heads"]
        rows = {head: store.used(f"rows:name:{args.key}|head:{head}") for head in heads}
        fits = store.used(f"fits:name:{args.key}")
        sessions = store.count_sessions()
    key_uploads = after["requests"].get("POST /v1/sessions", 0)
    result = {"ready_after_restart": ready, "sessions_in_store": sessions, "rows_charged": rows,
              "fits_charged": fits, "requests_before_restart": before["requests"],
              "requests_after_restart": after["requests"], "key_uploads_after_restart": key_uploads}
    print(f"provider after restart: ready {ready}; {sessions} session(s) kept in its store; {args.key!r} charged "
          + ", ".join(f"{n} rows on head {h}" for h, n in rows.items()) + f" and {fits} private fit(s), kept across "
          f"the restart; since the restart: "
          + ", ".join(f"{int(n)} {route}" for route, n in sorted(after["requests"].items()) if route != "GET /metrics")
          + f" (key uploads: {int(key_uploads)})")
    if args.out:
        atomic_write_bytes(Path(args.out), (json.dumps(result, indent=2) + "\n").encode())


if __name__ == "__main__":
    main()
