"""Encrypted affine layer over CKKS (TenSEAL / SEAL). Math over arrays and keys only: imports no other xsilo package.

Server: ``layer = EncryptedLinear(W, b)``; publish ``layer.layout.to_dict()``; per session
``keys = PublicKeys.from_bytes(client_public_bytes, layer.layout)`` (anything not made for exactly that layout
is refused before SEAL sees it); per request ``layer.apply(query, keys)``.
Client: ``keys = ClientKeys.generate(layout.profile, layout.rotation_steps)``; send ``keys.public_bytes()``;
``queries = encrypt(keys, layout, X)``; ``Y = decrypt(keys, layout, replies, len(X))``.
Private fit (Enc(Z_A) in, Enc(Z_Aᵀ Z_B) out): see `encrypted.gram` (`plan_gram`, `FitKeys`, `encrypt_chunk`,
`GramAccumulator`, `decrypt_gram`), a ring-LWE kernel of its own (`encrypted.rlwe`).
Label-only answers: ``EncryptedLinear.apply_masked`` (CKKS reply of z + r), then the secure argmax of
`encrypted.argmax` (``ProviderArgmax`` / ``ClientArgmax`` under the client's ``ArgmaxKeys``, TNO's Paillier, DGK
and comparison).
"""
import importlib
from typing import Any

from .argmax_spec import ArgmaxSpec
from .client import decode_slots, decrypt, encrypt
from .errors import (EncryptedError, InsecureParameters, IntegrityError, InvalidCiphertext, InvalidKeys,
                     InvalidLayout, ParameterMismatch)
from .gram import FitKeys, GramAccumulator, decrypt_gram, encrypt_chunk, read_fit_key
from .gram_plan import GramPlan, key_seed_for, plan_gram
from .keys import ClientKeys, PublicKeys, load_public_keys, public_bytes_max
from .layout import LinearLayout, plan_layout
from .linear import EncryptedLinear
from .messages import query_max_bytes, query_rows
from .profiles import DEFAULT_PROFILE, N8192, N8192_LABEL, N8192_PRIVATE, N16384, PROFILES, CkksProfile, get_profile

__all__ = [
    "ArgmaxKeys", "ArgmaxPublicKeys", "ArgmaxSpec", "ClientArgmax", "ProviderArgmax", "CkksProfile", "ClientKeys",
    "DEFAULT_PROFILE", "EncryptedError", "EncryptedLinear", "FitKeys", "GramAccumulator",
    "GramPlan", "InsecureParameters", "IntegrityError", "InvalidCiphertext", "InvalidKeys", "InvalidLayout",
    "LinearLayout", "N16384", "N8192", "N8192_LABEL", "N8192_PRIVATE", "PROFILES", "ParameterMismatch", "PublicKeys",
    "decode_slots", "decrypt", "decrypt_gram", "encrypt", "encrypt_chunk", "get_profile", "key_seed_for",
    "load_public_keys", "plan_gram", "read_fit_key", "plan_layout", "public_bytes_max", "query_max_bytes", "query_rows",
]

# The secure argmax's names load TNO's packages (Paillier, DGK, the comparison; half a second of imports) only when
# first used, so that a logits-only server or client never pays for them.
LAZY = {"ArgmaxKeys": "argmax_keys", "ArgmaxPublicKeys": "argmax_keys", "ClientArgmax": "argmax",
        "ProviderArgmax": "argmax"}


def __getattr__(name: str) -> Any:
    if name in LAZY:
        return getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
