"""Wire contract shared by the server and the client: routes, headers, error codes, body caps.

Imports nothing heavy, so the client does not pull in FastAPI and the server does not pull in httpx.
"""
from __future__ import annotations

from typing import Any

API_PREFIX = "/v1"
OCTET_STREAM = "application/octet-stream"
API_KEY_HEADER = "X-API-Key"
SERVER_TIMING_HEADER = "Server-Timing"  # "he;dur=<ms>": server-side HE time of one reply
BUDGET_HEADER = "X-Xsilo-Budget-Remaining"  # rows the session/client may still be answered, or "unlimited"

# Error codes in {"error": {"code": ..., "message": ...}}.
SESSION_NOT_FOUND = "session_not_found"  # the client re-opens a session and retries once
REOPEN_HINT = "open a new session (POST /v1/sessions with your public keys)"

_HEADROOM = 64 * 1024  # container headers, META JSON and SEAL metadata around the polynomial data


def max_public_key_bytes(layout_dict: dict[str, Any]) -> int:
    """Upper bound of a client's public-key upload: Galois keys for the layout's rotation steps, uncompressed.

    One Galois key holds (primes - 1) key-switching pairs of `primes` polynomials of N 8-byte words.
    """
    profile = layout_dict["profile"]
    n, primes = profile["poly_modulus_degree"], len(profile["coeff_modulus_bits"])
    return len(layout_dict["rotation_steps"]) * (primes - 1) * 2 * primes * n * 8 + _HEADROOM


def max_query_bytes(layout_dict: dict[str, Any]) -> int:
    """Upper bound of one query: a 2-polynomial ciphertext over all but the special prime, uncompressed."""
    profile = layout_dict["profile"]
    n, primes = profile["poly_modulus_degree"], len(profile["coeff_modulus_bits"])
    return 2 * (primes - 1) * n * 8 + _HEADROOM
