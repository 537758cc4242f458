"""CKKS parameter profiles: small frozen records that SEAL checks for 128-bit security on construction."""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import tenseal.sealapi as seal

from .errors import InsecureParameters, InvalidLayout

_CONTEXTS: dict[tuple[int, tuple[int, ...]], Any] = {}
_CONTEXTS_LOCK = threading.Lock()


def seal_context(poly_modulus_degree: int, coeff_modulus_bits: tuple[int, ...], random_seed: list[int] | None = None):
    """A SEALContext checked against 128-bit security. Unseeded contexts are cached and shared."""
    key = (poly_modulus_degree, tuple(coeff_modulus_bits))
    if random_seed is None and key in _CONTEXTS:
        return _CONTEXTS[key]
    params = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    params.set_poly_modulus_degree(poly_modulus_degree)
    try:
        params.set_coeff_modulus(seal.CoeffModulus.Create(poly_modulus_degree, list(coeff_modulus_bits)))
    except Exception as exc:  # SEAL cannot find primes of these sizes for this degree
        raise InsecureParameters(
            f"SEAL cannot build coefficient modulus {list(coeff_modulus_bits)} at N={poly_modulus_degree}: {exc}; "
            "use prime sizes between 20 and 60 bits"
        ) from None
    if random_seed is not None:
        params.set_random_generator(seal.Blake2xbPRNGFactory(random_seed))
    context = seal.SEALContext(params, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        max_bits = seal.CoeffModulus.MaxBitCount(poly_modulus_degree, seal.SEC_LEVEL_TYPE.TC128)
        raise InsecureParameters(
            f"CKKS parameters N={poly_modulus_degree}, modulus {list(coeff_modulus_bits)} "
            f"({sum(coeff_modulus_bits)} bits) fail SEAL's 128-bit check: {context.parameters_error_message()}; "
            f"at N={poly_modulus_degree} the total modulus may be at most {max_bits} bits: "
            "use fewer or smaller primes, or a larger N"
        )
    if random_seed is None:
        with _CONTEXTS_LOCK:
            context = _CONTEXTS.setdefault(key, context)
    return context


@dataclass(frozen=True)
class CkksProfile:
    """CKKS parameters for the encrypted layer.

    `coeff_modulus_bits` is (q0, q1, ..., special): queries are encrypted over all but the special prime;
    the server multiplies once and rescales, so the reply lives over all but the last two primes.
    """

    name: str
    poly_modulus_degree: int
    coeff_modulus_bits: tuple[int, ...]
    scale_bits: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_modulus_bits", tuple(int(b) for b in self.coeff_modulus_bits))
        n = self.poly_modulus_degree
        if not isinstance(n, int) or n < 2048 or n > 32768 or n & (n - 1):
            raise InsecureParameters(f"poly_modulus_degree must be a power of two in [2048, 32768], got {n!r}")
        bits = self.coeff_modulus_bits
        if len(bits) < 3:
            raise InsecureParameters(
                f"profile {self.name!r} needs at least 3 primes (q0, q1, special) for one multiply and rescale, "
                f"got {list(bits)}; e.g. use (60, 40, 60)"
            )
        if not 20 <= self.scale_bits < bits[0]:
            raise InsecureParameters(
                f"scale_bits={self.scale_bits} must be at least 20 and below the first prime's {bits[0]} bits "
                "(the reply's headroom is q0 / scale)"
            )
        seal_context(n, bits)  # raises InsecureParameters

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def context(self):
        return seal_context(self.poly_modulus_degree, self.coeff_modulus_bits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_modulus_bits": list(self.coeff_modulus_bits),
            "scale_bits": self.scale_bits,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "CkksProfile":
        fields = {"name": str, "poly_modulus_degree": int, "coeff_modulus_bits": list, "scale_bits": int}
        if not isinstance(data, dict) or set(data) != set(fields):
            raise InvalidLayout(f"a profile dict needs exactly the keys {sorted(fields)}, got {data!r:.200}")
        for key, typ in fields.items():
            if not isinstance(data[key], typ) or isinstance(data[key], bool):
                raise InvalidLayout(f"profile field {key!r} must be {typ.__name__}, got {data[key]!r:.100}")
        bits = data["coeff_modulus_bits"]
        if not 3 <= len(bits) <= 16 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bits):
            raise InvalidLayout(f"profile coeff_modulus_bits must be 3 to 16 ints, got {bits!r:.100}")
        return cls(data["name"], data["poly_modulus_degree"], tuple(bits), data["scale_bits"])

    @cached_property
    def fingerprint(self) -> bytes:
        """32 bytes naming these parameters (degree, primes, scale) in every blob made with them."""
        body = {k: v for k, v in self.to_dict().items() if k != "name"}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()


def galois_element(step: int, poly_modulus_degree: int) -> int:
    """SEAL's Galois element for a left rotation of the slot vector by `step` (3^step mod 2N)."""
    return pow(3, step % (poly_modulus_degree // 2), 2 * poly_modulus_degree)


N8192 = CkksProfile("n8192", 8192, (60, 40, 60), 40)
"""Default: 4096 slots (d <= 4096), 160-bit modulus (SEAL allows 218 at N=8192), reply headroom 2^20."""

N16384 = CkksProfile("n16384", 16384, (60, 40, 60), 40)
"""8192 slots, for hidden states wider than 4096; about twice the cost of N8192 per operation."""

DEFAULT_PROFILE = N8192
PROFILES: dict[str, CkksProfile] = {p.name: p for p in (N8192, N16384)}


def get_profile(name: str) -> CkksProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InvalidLayout(f"unknown CKKS profile {name!r}; choose one of {sorted(PROFILES)}") from None
