"""Error types. All are ValueError subclasses, so a server can map them to 4xx replies."""
from __future__ import annotations


class EncryptedError(ValueError):
    """Base class: bad input to the encrypted layer (bytes, keys, shapes, parameters)."""


class InvalidCiphertext(EncryptedError):
    """A query or reply blob is malformed, truncated, or not a ciphertext this layer accepts."""


class InvalidKeys(EncryptedError):
    """Key material is malformed, incomplete, or carries a secret key where only public keys belong."""


class ParameterMismatch(EncryptedError):
    """Bytes were made for other CKKS parameters or another layout than the one in use."""


class InsecureParameters(EncryptedError):
    """A CKKS profile fails SEAL's 128-bit security check, or cannot run the layer."""


class InvalidLayout(EncryptedError):
    """A layout dict is malformed, or a layer cannot be laid out in one profile."""


def published_dict(data: object, what: str, version: int) -> dict:
    """`data` as a dict a server published for this `version` of `what` (e.g. "a fit plan"), else InvalidLayout."""
    if not isinstance(data, dict):
        raise InvalidLayout(f"{what} must be a dict, got {type(data).__name__}")
    if data.get("version") != version:
        raise InvalidLayout(f"{what} has version {data.get('version')!r:.20}, not {version}; fetch it again from a "
                            "server running the same xsilo version")
    return data


class IntegrityError(EncryptedError):
    """An exported file does not match the sha256 its manifest records."""
