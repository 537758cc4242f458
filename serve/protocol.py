"""Wire contract shared by the server and the client: routes, headers and error codes.

Imports nothing heavy, so the client does not pull in FastAPI and the server does not pull in httpx.
"""
from __future__ import annotations

API_PREFIX = "/v1"
OCTET_STREAM = "application/octet-stream"
API_KEY_HEADER = "X-API-Key"
SERVER_TIMING_HEADER = "Server-Timing"  # "he;dur=<ms>": server-side HE time of one reply
BUDGET_HEADER = "X-Xsilo-Budget-Remaining"  # rows the session/client may still be answered, or "unlimited"
LABEL_RUN_HEADER = "X-Xsilo-Label-Run"  # the run a label request opened: POST /v1/label-runs/{run} its messages
LABEL_STAGE_HEADER = "X-Xsilo-Label-Stage"  # the stage the run waits for next, or "done" with the labels

# Error codes in {"error": {"code": ..., "message": ...}}.
SESSION_NOT_FOUND = "session_not_found"  # the client re-opens a session and retries once
REOPEN_HINT = "open a new session (POST /v1/sessions with your public keys)"
FIT_SESSION_LOST = "fit_session_lost"  # the fit's accumulators are on another replica, or were lost: start again

LABEL_KEYS_PREFIX_BYTES = 4  # a label request: 4-byte big-endian length of the argmax keys, the keys, one query


def label_request(argmax_keys: bytes, query: bytes) -> bytes:
    """The body of POST /v1/sessions/{id}/label: the client's argmax public keys, then one query."""
    return len(argmax_keys).to_bytes(LABEL_KEYS_PREFIX_BYTES, "big") + argmax_keys + query
