"""Client side: encrypt hidden states into query blobs, decrypt reply blobs into outputs."""
from __future__ import annotations

from typing import Any

import numpy as np
import tenseal.sealapi as seal

from . import messages, wire
from .errors import EncryptedError, ParameterMismatch
from .keys import ClientKeys
from .layout import LinearLayout


def _check(keys: Any, layout: Any) -> None:
    if not isinstance(keys, ClientKeys):
        raise EncryptedError(f"keys must be ClientKeys, got {type(keys).__name__}")
    if not isinstance(layout, LinearLayout):
        raise EncryptedError(f"layout must be a LinearLayout (LinearLayout.from_dict(...)), got {type(layout).__name__}")
    if keys.profile != layout.profile:
        raise ParameterMismatch(f"keys use profile {keys.profile.name!r} but the layout uses {layout.profile.name!r}; "
                                "generate keys with ClientKeys.generate(layout.profile, layout.rotation_steps)")


def encrypt(keys: ClientKeys, layout: LinearLayout, X: Any) -> list[bytes]:
    """Encrypt inputs X of shape (n, d) (or (d,)) into ceil(n / lanes) query blobs, `lanes` inputs each.

    Symmetric (secret-key) encryption with a seeded mask: the second polynomial travels as a seed,
    which halves the query.
    """
    _check(keys, layout)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2 or X.shape[1] != layout.input_dim or X.shape[0] == 0:
        raise ParameterMismatch(f"X must have shape (n, {layout.input_dim}) with n >= 1, got {X.shape}")
    if not np.all(np.isfinite(X)):
        raise EncryptedError("X contains NaN or infinity; clean the inputs before encrypting")
    limit = 2.0 ** (sum(layout.profile.coeff_modulus_bits[:-1]) - layout.profile.scale_bits - 2)
    if np.max(np.abs(X)) >= limit:
        raise EncryptedError(f"X has values of magnitude {np.max(np.abs(X)):.3g}, beyond what profile "
                             f"{layout.profile.name!r} can encode ({limit:.3g})")
    dp, stride, d = layout.padded_input, layout.stride, layout.input_dim
    encoder, encryptor = keys.tool("encoder"), keys.tool("encryptor")
    parms_id = messages.query_parms_id(layout.profile)
    blobs = []
    for start in range(0, X.shape[0], layout.lanes):
        chunk = X[start:start + layout.lanes]
        if layout.pairing == "inputs":  # lane q holds inputs q (real part) and q + Q (imaginary part)
            slots = np.zeros((dp, stride), dtype=np.complex128)
            slots[:d, :min(len(chunk), stride)] = chunk[:stride].T
            slots[:d, :max(0, len(chunk) - stride)] += 1j * chunk[stride:].T
        else:
            slots = np.zeros((dp, stride))
            slots[:d, :len(chunk)] = chunk.T  # slot i*Q + q holds x_q[i]
        plain = seal.Plaintext()
        encoder.encode(slots.ravel().tolist(), parms_id, layout.profile.scale, plain)
        blob = wire.seal_to_bytes(encryptor.encrypt_symmetric(plain))
        blobs.append(messages.write_query(layout, blob, chunk.shape[0]))
    return blobs


def decrypt(keys: ClientKeys, layout: LinearLayout, replies: list[bytes], n: int) -> np.ndarray:
    """Decrypt the replies to `encrypt(keys, layout, X)` with n = len(X) into an (n, k) array."""
    _check(keys, layout)
    if isinstance(replies, (bytes, bytearray, memoryview)):
        replies = [replies]
    if not isinstance(n, int) or n < 1 or len(replies) != layout.ciphertexts_for(n):
        raise EncryptedError(f"{n!r} inputs need {layout.ciphertexts_for(n) if isinstance(n, int) and n > 0 else '?'} "
                             f"replies (lanes={layout.lanes}), got {len(replies)}")
    encoder, decryptor = keys.tool("encoder"), keys.tool("decryptor")
    dp, stride, kp, kc, k = layout.padded_input, layout.stride, layout.block_rows, layout.complex_rows, layout.output_dim
    lanes = layout.lanes
    out = []
    for index, reply in enumerate(replies):
        cts, count = messages.read_reply(reply, layout)
        if count != min(lanes, n - index * lanes):
            raise ParameterMismatch(f"reply {index} answers {count} inputs, but input {index * lanes} onwards of "
                                    f"{n} should give {min(lanes, n - index * lanes)}; pass the replies in the order "
                                    "of the queries that encrypt() returned, with the same n")
        rows = []
        for ct in cts:
            plain = seal.Plaintext()
            decryptor.decrypt(ct, plain)
            slots = np.asarray(encoder.decode_complex(plain)).reshape(dp, stride)
            rows.append(slots[:kp])
        complex_rows = np.concatenate(rows)[:kc]  # (k', Q)
        if layout.pairing == "inputs":
            out.append(np.concatenate([complex_rows.real.T, complex_rows.imag.T]))
        else:
            y = np.empty((stride, k))
            y[:, :kc] = complex_rows.real.T
            y[:, kc:] = complex_rows[: k - kc].imag.T
            out.append(y)
    return np.concatenate(out)[:n]


def decode_slots(keys: ClientKeys, reply: bytes, layout: LinearLayout) -> np.ndarray:
    """All complex slots of every reply block, shape (blocks, slots): for audits of what a reply reveals."""
    _check(keys, layout)
    cts, _ = messages.read_reply(reply, layout)
    encoder, decryptor = keys.tool("encoder"), keys.tool("decryptor")
    result = []
    for ct in cts:
        plain = seal.Plaintext()
        decryptor.decrypt(ct, plain)
        result.append(np.asarray(encoder.decode_complex(plain)))
    return np.stack(result)
