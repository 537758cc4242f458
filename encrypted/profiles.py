"""CKKS parameter profiles: small frozen records, checked as data on construction.

A profile is plain data until `context()` builds its SEALContext (which runs SEAL's own 128-bit check).
Contexts are costly (N=32768 with 16 primes holds ~320 MB), so they are built only for profiles that
code chose (a server's layer, a client's keys), never for parameters read from bytes: parsers compare
those with the expected profile as data first. The cache of built contexts is bounded.
"""
from __future__ import annotations

import hashlib
import json
import operator
import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import tenseal.sealapi as seal

from .errors import InsecureParameters, InvalidLayout

MAX_CACHED_CONTEXTS = 4  # distinct parameter sets whose SEALContext stays built (least recently used go first)
MIN_PRIME_BITS, MAX_PRIME_BITS = 20, 60  # SEAL's CoeffModulus.Create takes at most 60-bit primes
MIN_PRIMES, MAX_PRIMES = 3, 16

_CONTEXTS: OrderedDict[tuple[int, tuple[int, ...]], Any] = OrderedDict()
_CONTEXTS_LOCK = threading.Lock()
_built = 0  # contexts constructed by this process, for tests and diagnostics


def context_stats() -> dict[str, int]:
    """How many SEALContexts this process built, and how many the bounded cache holds now."""
    with _CONTEXTS_LOCK:
        return {"built": _built, "cached": len(_CONTEXTS), "max_cached": MAX_CACHED_CONTEXTS}


def seal_context(poly_modulus_degree: int, coeff_modulus_bits: tuple[int, ...], random_seed: list[int] | None = None):
    """A SEALContext checked against 128-bit security. Unseeded contexts are cached (LRU, bounded) and shared.

    Pass only parameters that code chose (CkksProfile.context()); never parameters read from a client.
    """
    key = (poly_modulus_degree, tuple(coeff_modulus_bits))
    if random_seed is None:
        with _CONTEXTS_LOCK:
            if key in _CONTEXTS:
                _CONTEXTS.move_to_end(key)
                return _CONTEXTS[key]
    params = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    params.set_poly_modulus_degree(poly_modulus_degree)
    try:
        params.set_coeff_modulus(seal.CoeffModulus.Create(poly_modulus_degree, list(coeff_modulus_bits)))
    except Exception as exc:  # SEAL cannot find primes of these sizes for this degree
        raise InsecureParameters(
            f"SEAL cannot build coefficient modulus {list(coeff_modulus_bits)} at N={poly_modulus_degree}: {exc}; "
            f"use prime sizes between {MIN_PRIME_BITS} and {MAX_PRIME_BITS} bits"
        ) from None
    if random_seed is not None:
        params.set_random_generator(seal.Blake2xbPRNGFactory(random_seed))
    context = seal.SEALContext(params, True, seal.SEC_LEVEL_TYPE.TC128)
    global _built
    with _CONTEXTS_LOCK:
        _built += 1
    if not context.parameters_set():
        raise InsecureParameters(
            f"CKKS parameters N={poly_modulus_degree}, modulus {list(coeff_modulus_bits)} "
            f"({sum(coeff_modulus_bits)} bits) fail SEAL's 128-bit check: {context.parameters_error_message()}; "
            f"at N={poly_modulus_degree} the total modulus may be at most {max_modulus_bits(poly_modulus_degree)} "
            "bits: use fewer or smaller primes, or a larger N"
        )
    if random_seed is None:
        with _CONTEXTS_LOCK:
            context = _CONTEXTS.setdefault(key, context)
            _CONTEXTS.move_to_end(key)
            while len(_CONTEXTS) > MAX_CACHED_CONTEXTS:
                _CONTEXTS.popitem(last=False)
    return context


def max_modulus_bits(poly_modulus_degree: int) -> int:
    """SEAL's bound on the total coefficient modulus at 128-bit security (a table lookup, builds nothing)."""
    return seal.CoeffModulus.MaxBitCount(poly_modulus_degree, seal.SEC_LEVEL_TYPE.TC128)


def _int_tuple(values: Any) -> tuple[int, ...] | None:
    """`values` as a tuple of ints (numpy ints too), or None if any is not an integer (or is a bool)."""
    try:
        items = list(values)
        if any(isinstance(v, bool) for v in items):
            return None
        return tuple(operator.index(v) for v in items)
    except TypeError:
        return None


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
        """Check the parameters as data (SEAL's rules for 128-bit CKKS); build no SEAL object."""
        if not isinstance(self.name, str):
            raise InvalidLayout(f"profile name must be a str, got {type(self.name).__name__}")
        n = self.poly_modulus_degree
        if not isinstance(n, int) or isinstance(n, bool) or n < 2048 or n > 32768 or n & (n - 1):
            raise InsecureParameters(f"poly_modulus_degree must be a power of two in [2048, 32768], got {n!r}")
        bits = _int_tuple(self.coeff_modulus_bits)
        if bits is None:
            raise InsecureParameters(f"coeff_modulus_bits must be a sequence of ints, "
                                     f"got {self.coeff_modulus_bits!r:.100}")
        object.__setattr__(self, "coeff_modulus_bits", bits)
        if len(bits) < MIN_PRIMES:
            raise InsecureParameters(
                f"profile {self.name!r} needs at least {MIN_PRIMES} primes (q0, q1, special) for one multiply and "
                f"rescale, got {list(bits)}; e.g. use (60, 40, 60)"
            )
        if len(bits) > MAX_PRIMES or not all(MIN_PRIME_BITS <= b <= MAX_PRIME_BITS for b in bits):
            raise InsecureParameters(f"profile {self.name!r} needs {MIN_PRIMES} to {MAX_PRIMES} primes of "
                                     f"{MIN_PRIME_BITS} to {MAX_PRIME_BITS} bits, got {list(bits)}")
        if sum(bits) > max_modulus_bits(n):
            raise InsecureParameters(
                f"CKKS parameters N={n}, modulus {list(bits)} ({sum(bits)} bits) fail the 128-bit bound: at N={n} "
                f"the total modulus may be at most {max_modulus_bits(n)} bits: use fewer or smaller primes, or a "
                "larger N"
            )
        s = self.scale_bits
        reply_bits = sum(bits[:-2])  # the reply lives over all but the last two primes
        if not isinstance(s, int) or isinstance(s, bool) or not MIN_PRIME_BITS <= s < reply_bits:
            raise InsecureParameters(
                f"scale_bits={s!r} must be at least {MIN_PRIME_BITS} and below the reply modulus's {reply_bits} bits "
                "(the reply's headroom is (q0 ... q_{L-1}) / scale)"
            )

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def context(self):
        """The SEALContext (built on first use, then cached); raises InsecureParameters if SEAL refuses it."""
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
        """A profile from `to_dict()` output, checked as data only (no SEAL context is built)."""
        fields = {"name": str, "poly_modulus_degree": int, "coeff_modulus_bits": list, "scale_bits": int}
        if not isinstance(data, dict) or set(data) != set(fields):
            raise InvalidLayout(f"a profile dict needs exactly the keys {sorted(fields)}, got {data!r:.200}")
        for key, typ in fields.items():
            if not isinstance(data[key], typ) or isinstance(data[key], bool):
                raise InvalidLayout(f"profile field {key!r} must be {typ.__name__}, got {data[key]!r:.100}")
        bits = data["coeff_modulus_bits"]
        if not MIN_PRIMES <= len(bits) <= MAX_PRIMES or not all(isinstance(b, int) and not isinstance(b, bool)
                                                                 for b in bits):
            raise InvalidLayout(f"profile coeff_modulus_bits must be {MIN_PRIMES} to {MAX_PRIMES} ints, "
                                f"got {bits!r:.100}")
        return cls(data["name"], data["poly_modulus_degree"], tuple(bits), data["scale_bits"])

    def describe(self) -> str:
        """One line for error messages: 'n8192 (N=8192, primes [60, 40, 60], scale 2^40)'."""
        return (f"{self.name} (N={self.poly_modulus_degree}, primes {list(self.coeff_modulus_bits)}, "
                f"scale 2^{self.scale_bits})")

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

N8192_PRIVATE = CkksProfile("n8192-private", 8192, (60, 30, 60, 60), 64)
"""For circuit-private replies (EncryptedLinear(..., circuit_privacy=30)): scale 2^64 over a 90-bit reply modulus
and W encoded at a 60-bit prime, so the flooding noise costs little precision (210 bits; SEAL allows 218)."""

N8192_LABEL = CkksProfile("n8192-label", 8192, (60, 40, 58, 60), 64)
"""For label-only answers: circuit-private like N8192_PRIVATE, over a 100-bit reply modulus, so that each output can
carry a uniform mask of up to 2^33 (`EncryptedLinear.apply_masked`) with no error beyond the flood's (218 bits)."""

DEFAULT_PROFILE = N8192
PROFILES: dict[str, CkksProfile] = {p.name: p for p in (N8192, N16384, N8192_PRIVATE, N8192_LABEL)}


def get_profile(name: str) -> CkksProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InvalidLayout(f"unknown CKKS profile {name!r}; choose one of {sorted(PROFILES)}") from None
