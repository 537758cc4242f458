"""The client's side of label-only answers (`xsilo serve --answers label`): its argmax keys, kept on disk, and one
query's run of the secure argmax against the server (`encrypted.argmax.ClientArgmax`, docs/protocol.md section 8).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from encrypted import ArgmaxSpec, ClientKeys, LinearLayout, decrypt

from .formats.folders import xsilo_home
from .http_client import NO_RETRY, Connection, ServeError, server_ms
from .protocol import API_PREFIX, LABEL_RUN_HEADER, label_request

if TYPE_CHECKING:  # the secure argmax loads TNO's packages: only a label query needs them
    from encrypted import ArgmaxKeys


class LabelOnly(ServeError):
    """The layer answers labels only: logits and probabilities are not available."""


def label_only_error(what: str) -> LabelOnly:
    return LabelOnly(f"{what} needs logits, but this layer answers labels only (the provider serves it with "
                     "--answers label); ask for labels (classify, label_states) or use a layer that answers logits")


def default_keys_path() -> Path:
    return xsilo_home() / "client" / "argmax-keys.json"


def load_or_make_keys(path: Path) -> "ArgmaxKeys":
    """The client's argmax keys at `path`, made (about a minute at 2,048 bits) and saved (0600) on first use."""
    from encrypted import ArgmaxKeys

    if path.is_file():
        try:
            return ArgmaxKeys.load(path)
        except ValueError as exc:  # a damaged file is the user's to fix: one line, not a traceback
            raise ServeError(str(exc)) from None
    print(f"making this client's argmax keys (2,048-bit Paillier and DGK, about a minute, once): {path}",
          file=sys.stderr)
    keys = ArgmaxKeys.generate()
    keys.save(path)
    return keys


def label_query(connection: Connection, session_id: str, keys: ClientKeys, layout: LinearLayout, spec: ArgmaxSpec,
                argmax_keys: "ArgmaxKeys", query: bytes, rows: int) -> tuple[np.ndarray, float]:
    """(labels of the query's `rows` rows, the provider's ms over every message): the masked reply, then every
    message of the argmax.
    The argmax messages are not retried: each moves the run on, so a lost one means sending the query again."""
    from encrypted import ClientArgmax

    response = connection.request("POST", f"{API_PREFIX}/sessions/{session_id}/label",
                                  content=label_request(argmax_keys.public_bytes(), query))
    run = response.headers.get(LABEL_RUN_HEADER)
    if not run:
        raise ServeError(f"the server's label answer names no run ({LABEL_RUN_HEADER}); is it an xsilo server?")
    provider_ms = server_ms(response)
    try:
        argmax = ClientArgmax(argmax_keys, spec, decrypt(keys, layout, [response.content], rows))
        message: bytes | None = argmax.first_message()
        while message is not None:
            reply = connection.request("POST", f"{API_PREFIX}/label-runs/{run}", content=message, retry=NO_RETRY,
                                       idempotent=False)
            provider_ms += server_ms(reply)
            message = argmax.handle(reply.content)
    except ValueError as exc:  # the provider's messages are the other party's: checked, never trusted
        raise ServeError(f"the server's label answer could not be used: {exc}") from None
    assert argmax.labels is not None
    return argmax.labels, provider_ms
