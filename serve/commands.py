"""`xsilo serve` and `xsilo query`: typed functions whose signatures are their options (see
`lightning_modules.cli`). Importing this module loads no torch: the server and the client are imported when a
command runs."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Any, Iterator

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
    from serve.running import run

    if settings.api_key is None and os.environ.get("XSILO_API_KEY") is not None:
        settings = replace(settings, api_key=os.environ["XSILO_API_KEY"])
    run(export, heads=[heads] if isinstance(heads, str) else heads or (), public=public, host=host, port=port,
        log_level=log_level, **asdict(settings))


def query(*, server: str = "http://127.0.0.1:8000", text: list[str] | str | None = None, file: str | None = None,
          text_column: str = "text", id_column: str | None = None, format: str | None = None,
          out: str | None = None, summary: str | None = None, batch_size: int | None = None,
          head: str | None = None, aligner: str | None = None, api_key: str | None = None,
          client_model: str | None = None, threads: int | None = None, timeout: float = 60.0,
          cache: bool = True, probabilities: bool = False) -> None:
    """Classify texts through an encrypted server; write one JSON line per row.

    Extraction, encryption and decryption run here: the server sees public keys and ciphertexts only. Each line
    holds the row's id, label, probabilities, logits, ood and ood_score (null without a detector) and the timings of
    the batch it was sent in (a layer served with --answers label gives the label only: probabilities and logits
    are null); stderr gets a summary (rows, rows/s, median and p90 per stage, traffic). The session
    lasts: keys, session id and the provider's detector are kept under $XSILO_HOME/client/sessions, so the next
    run uploads no keys and fetches no detector.

    Args:
        server: server base URL.
        text: a text, or a list: --text '["first text", "second text"]' (ids 1, 2, ...; each line holds its text).
        file: rows to classify: a .txt file (one text per line; id: the line number), .csv/.tsv (--text_column,
            optional --id_column; id default: the data row number) or .jsonl (one object per line); - for stdin.
        text_column: the text column of a CSV/TSV/JSONL file.
        id_column: the id column of a CSV/TSV/JSONL file (unique values), copied to each output line.
        format: txt, csv, tsv or jsonl (default: from the file's suffix; txt for stdin).
        out: write the JSON lines to this file (written whole at the end; default stdout, one batch at a time).
        summary: also write the summary as JSON to this file.
        batch_size: rows per batch (rounded up to whole ciphertexts; default 16).
        head: split mode: the served head to query (its name in the server's /v1/model "heads"); needs --aligner.
        aligner: split mode: this client's map folder (`xsilo align --out DIR`), applied here before encryption.
        api_key: the server's API key (default $XSILO_API_KEY).
        client_model: local copy of the client model (default: the model the server names).
        threads: torch threads for extraction.
        timeout: seconds per HTTP request.
        cache: reuse (and keep) the session across runs; false: a fresh session, deleted at the end.
        probabilities: require probabilities and logits in every line: a label-only layer is then refused with an
            error that names its mode.
    """
    from datamodules.commands import quiet
    from serve.client import Client, ServeError
    from serve.client_label import label_only_error
    from serve.query_file import QueryInputError, input_rows, run_query

    try:
        rows, with_text = input_rows(text, file, text_column, id_column, format)
    except QueryInputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    quiet()
    try:
        with Client(server, api_key=api_key or os.environ.get("XSILO_API_KEY"), timeout=timeout, head=head,
                    aligner=aligner, client_model=client_model, threads=threads, cache=cache) as client:
            if probabilities and client.model_info().argmax is not None:
                raise label_only_error("--probabilities true")
            run_query(rows, with_text, client, out, batch_size, summary)
    except (ServeError, QueryInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def keys_add(name: str, *, rows_per_client: int | None = None, fits_per_client: int | None = None,
             store: str | None = None) -> None:
    """Issue an API key NAME: one identity with its own budgets, kept in the server's store (print it once).

    Servers started with --api_keys true accept it at once, on every replica that shares the store; only its
    sha256 is stored, so a lost key cannot be shown again: revoke it and issue another.

    Args:
        name: the key's name (letters, digits, '.', '_' or '-'): the identity its budgets count against.
        rows_per_client: this key's query budget per layer (default: the server's --rows_per_client).
        fits_per_client: this key's private fits (default: the server's --fits_per_client).
        store: the server's store, as `xsilo serve --store` (default: sqlite under $XSILO_HOME).
    """
    import secrets
    import time

    from serve.identity import check_key_name, key_digest
    from serve.store import ApiKeyRecord

    for flag, value in (("rows_per_client", rows_per_client), ("fits_per_client", fits_per_client)):
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be a positive count, got {value}; leave it out for the server's default")
    key = "xsk_" + secrets.token_urlsafe(32)
    with opened_store(store) as state:
        state.add_api_key(ApiKeyRecord(check_key_name(name), key_digest(key.encode("utf-8")), rows_per_client,
                                       fits_per_client, time.time()))
        where = state.url
    print(f"issued API key {name!r} in {where}; give it to its client (it is not stored and cannot be shown "
          "again):", file=sys.stderr)
    print(key)


def keys_revoke(name: str, *, store: str | None = None) -> None:
    """Revoke the API key NAME: every server on the store refuses it from its next request (its budget is kept).

    Args:
        name: the key's name, as `xsilo keys list` shows it.
        store: the server's store, as `xsilo serve --store` (default: sqlite under $XSILO_HOME).
    """
    with opened_store(store) as state:
        if not state.revoke_api_key(name):
            raise ValueError(f"no API key named {name[:80]!r} in {state.url}; `xsilo keys list` shows the names")
    print(f"revoked API key {name!r}", file=sys.stderr)


def keys_list(*, store: str | None = None) -> None:
    """List the issued API keys (names, budgets, state; never the keys), one JSON line each.

    Args:
        store: the server's store, as `xsilo serve --store` (default: sqlite under $XSILO_HOME).
    """
    with opened_store(store) as state:
        for record in state.list_api_keys():
            print(json.dumps({"name": record.name, "rows_per_client": record.rows_per_client,
                              "fits_per_client": record.fits_per_client, "created": round(record.created, 3),
                              "revoked": record.revoked}))


@contextmanager
def opened_store(store: str | None) -> Iterator[Any]:
    """The store a server started with --store `store` opens (a serve.store.StateStore), closed on exit."""
    from serve.settings import store_url
    from serve.store import open_store

    state = open_store(store_url(replace(ServerSettings(), store=store)))
    try:
        yield state
    finally:
        state.close()
