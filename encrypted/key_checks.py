"""What a circuit-private server checks of a client's public key (PUBK) before it re-randomises replies with it.

A circuit-private reply is c + Enc_pk(0) + flood (`EncryptedLinear.add_noise`), where c, the evaluated
ciphertext, depends on W beyond the outputs. With an honest key pk = (-(a s + e), a), a uniform, the encryption
of zero (u p0 + e0, u p1 + e1) is pseudorandom in both parts and hides c. A crafted key need not: the PUBK
(0, 1) gives (e0, u + e1), so c1 shows through, and one reply tells two weight matrices apart; p0 = 0 lets c0
show through the flood, whose std (2^λ B) is far below the modulus.

`check_rerandomiser` draws one encryption of zero with the key at the reply level and refuses the key unless both
parts look uniform modulo every RNS prime, in NTT form and in coefficient form: nearly all coefficients distinct,
and each of `BINS` equal intervals of [0, q) holding its share within `SIGMAS` standard deviations (an honest key
fails with probability far below 2^-40). That refuses degenerate keys (zero, constant, small, sparse, short of
entropy). It does not prove the key well formed: a client may hold a trapdoor for a key that looks uniform.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from .errors import InvalidKeys
from .profiles import CkksProfile

BINS = 16
SIGMAS = 8.0
MIN_DISTINCT = 0.98  # share of distinct coefficients per prime; uniform draws collide at most ~N/2q (< 1e-4 here)
FIX = "send the public key that ClientKeys.generate made (ClientKeys.public_bytes())"


def coefficients(ct: Any) -> np.ndarray:
    """A SEAL ciphertext's words as (polynomials, primes, N) uint64 (SEAL's own order)."""
    shape = (ct.size(), ct.coeff_modulus_size(), ct.poly_modulus_degree())
    total = math.prod(shape)
    return np.fromiter((ct[i] for i in range(total)), dtype=np.uint64, count=total).reshape(shape)


def uniformity_problem(values: np.ndarray, q: int) -> str | None:
    """Why `values` (N residues mod q) do not look uniform on [0, q), or None when they do."""
    n = values.size
    distinct = np.unique(values).size
    if distinct < MIN_DISTINCT * n:
        return f"only {distinct} distinct values of {n}"
    edges = (np.arange(1, BINS, dtype=np.float64) * (q / BINS))
    counts = np.bincount(np.searchsorted(edges, values.astype(np.float64), side="right"), minlength=BINS)
    expected = n / BINS
    spread = SIGMAS * math.sqrt(expected * (1 - 1 / BINS))
    worst = int(np.argmax(np.abs(counts - expected)))
    if abs(counts[worst] - expected) > spread:
        return f"{counts[worst]} of {n} values in interval {worst + 1} of {BINS} of [0, q) (uniform: {expected:.0f})"
    return None


def check_rerandomiser(profile: CkksProfile, public_key: Any, parms_id: Any) -> None:
    """Raise InvalidKeys unless an encryption of zero under `public_key` at `parms_id` looks uniform in both parts,
    per prime, in NTT and in coefficient form (what hides a reply's W-dependent ciphertext)."""
    context = profile.context()
    zero = seal.Ciphertext()
    try:
        seal.Encryptor(context, public_key).encrypt_zero(parms_id, zero)
    except Exception as exc:  # SEAL refuses keys it cannot use
        raise InvalidKeys(f"public key (PUBK) cannot encrypt ({str(exc)[:200]}); {FIX}") from None
    moduli = [m.value() for m in context.get_context_data(parms_id).parms().coeff_modulus()]
    check_uniform(coefficients(zero), moduli, "NTT form")
    seal.Evaluator(context).transform_from_ntt_inplace(zero)  # not transparent: its NTT form passed
    check_uniform(coefficients(zero), moduli, "coefficient form")


def check_uniform(words: np.ndarray, moduli: list[int], form: str) -> None:
    """Raise InvalidKeys unless every part of an encryption of zero, (parts, primes, N), looks uniform per prime."""
    for part in range(words.shape[0]):
        for prime, q in enumerate(moduli):
            problem = uniformity_problem(words[part, prime], q)
            if problem is not None:
                raise InvalidKeys(f"public key (PUBK) does not re-randomise replies: an encryption of zero under it "
                                  f"is not uniform-looking (part {part}, prime {prime}, {form}: {problem}), so a "
                                  f"reply would show its W-dependent ciphertext; a real key's parts are uniform "
                                  f"modulo every prime: {FIX}")
