"""`xsilo serve` and `xsilo query`: typed functions whose signatures are their options (see
`lightning_modules.cli`). Importing this module loads no torch: the server and the client are imported when a
command runs."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

from serve.settings import ServerSettings


def serve(*, export: str | None = None, heads: list[str] | str | None = None, public: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, settings: ServerSettings = ServerSettings(),
          log_level: str = "info") -> None:
    """Serve linear layers under CKKS encryption over HTTP, and private fits (API docs at /docs).

    The server evaluates W h + b on encrypted hidden states: it never sees texts, states or logits. Pass at least
    one of --export, --heads and --public.

    Args:
        export: a fused export directory (from `xsilo export`).
        heads: a head folder (from `xsilo head fit`) or a list, --heads '[heads/bbc,heads/trec]'; each is served
            under its folder's name for split-mode clients.
        public: a public-states folder (from `xsilo public-set export`): offers private fits (`xsilo align`).
        host: interface to bind (0.0.0.0 for all).
        port: TCP port.
        settings: every server setting (--api_key, --max_sessions, --rows_per_client, --output_noise, ...).
        log_level: log level of uvicorn and the request log.
    """
    from serve.server import run

    if settings.api_key is None and os.environ.get("XSILO_API_KEY") is not None:
        settings = replace(settings, api_key=os.environ["XSILO_API_KEY"])
    run(export, heads=[heads] if isinstance(heads, str) else heads or (), public=public, host=host, port=port,
        log_level=log_level, **asdict(settings))


def query(*, server: str = "http://127.0.0.1:8000", text: list[str] | str | None = None, file: str | None = None,
          head: str | None = None, aligner: str | None = None, api_key: str | None = None,
          client_model: str | None = None, threads: int | None = None, timeout: float = 60.0) -> None:
    """Classify texts through an encrypted server; print one JSON line per text.

    Extraction, encryption and decryption run here: the server sees public keys and ciphertexts only.

    Args:
        server: server base URL.
        text: a text, or a list: --text '["first text", "second text"]'.
        file: a file with one text per line (- for stdin).
        head: split mode: the served head to query (its name in the server's /v1/model "heads"); needs --aligner.
        aligner: split mode: this client's map folder (`xsilo align --out DIR`), applied here before encryption.
        api_key: the server's API key (default $XSILO_API_KEY).
        client_model: local copy of the client model (default: the model the server names).
        threads: torch threads for extraction.
        timeout: seconds per HTTP request.
    """
    from datamodules.commands import quiet
    from serve.client import Client, ServeError

    texts = [text] if isinstance(text, str) else list(text or [])
    if file:
        lines = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
        texts += [line for line in lines.splitlines() if line.strip()]
    if not texts:
        print("error: nothing to classify; pass --text or --file", file=sys.stderr)
        raise SystemExit(2)
    quiet()
    try:
        with Client(server, api_key=api_key or os.environ.get("XSILO_API_KEY"), timeout=timeout, head=head,
                    aligner=aligner, client_model=client_model, threads=threads) as client:
            results = client.classify(texts)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for t, r in zip(texts, results):
        line = {"text": t[:60], "label": r["label"],
                "probabilities": {k: round(v, 4) for k, v in r["probabilities"].items()}}
        if "ood" in r:
            line["ood"] = r["ood"]
        print(json.dumps(line))
    timings = results[0]["timings"]
    print(", ".join(f"{k[:-3]} {timings[k]:.1f} ms" for k in ("extract_ms", "encrypt_ms", "http_ms", "server_ms",
                                                               "decrypt_ms", "total_ms")), file=sys.stderr)
