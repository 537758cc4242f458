"""Private fit kernel: Enc(Ẑ_A) in chunks of rows, Enc(G) out with G = Ẑ_Aᵀ Ẑ_B, for each part of the public set.

Each public row i travels as one ring-LWE ciphertext (`encrypted.rlwe`) of its d_A client values, scaled by
2^value_bits: b_i = -a_i·s + m_i + e_i at positions 0..d_A-1, with a_i expanded from the chunk's seed (only b
crosses). The provider holds P = round(2^value_bits Ẑ_B) and forms P_kᵀ [b | a] for every target column k: one
exact BLAS product per chunk over the ciphertexts' components, accumulated mod q (Bae, Cheon, Hanrot, Park &
Stehlé's plaintext-matrix x ciphertext-matrix product). Before it answers, it re-randomises every answer with
a fresh encryption of zero under the key (p_B, p_A): p_A is expanded from the provider's own seed, so the mask
Σ P a_i is hidden by u·p_A + e whatever p_B the client chose; a p_B that is not -p_A·s + e only changes which
linear function of Ẑ_B the client decrypts (Z_Bᵀ X for some X of its choosing, as the fit allows). The answer
is then switched down to fewer bits; only the d_A positions of c0 the client may read are sent.

Client: ``keys = FitKeys.generate(plan)``; send ``keys.public_bytes()``; per chunk ``encrypt_chunk(keys, plan,
part, chunk, Z)``; ``decrypt_gram(keys, plan, part, results)``. Provider: ``key = read_fit_key(data, plan)``;
``acc = GramAccumulator(plan, part, target_states)``; ``acc.add(message, chunk, key)`` for chunks 0, 1, ...;
``acc.results(key)`` once ``acc.complete``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import gram_wire, rlwe
from .errors import EncryptedError, InvalidKeys, ParameterMismatch
from .gram_plan import GramPlan
from .rlwe import (RING_DEGREE, SEED_BYTES, centre, mask, matmul_mod, noise, ring_multiply, secret_matrix,
                   switch_modulus, ternary, uniform)

KEY_DOMAIN = b"xsilo/fit/key"
MASK_DOMAIN = b"xsilo/fit/mask"


def _check_plan(plan: Any) -> GramPlan:
    if not isinstance(plan, GramPlan):
        raise EncryptedError(f"plan must be a GramPlan (GramPlan.from_dict(...)), got {type(plan).__name__}")
    return plan


def key_mask(plan: GramPlan, bits: int) -> np.ndarray:
    """p_A, the uniform half of the re-randomisation key, from the provider's seed, mod 2^bits."""
    return uniform(plan.key_seed, KEY_DOMAIN, (RING_DEGREE,), plan.key_bits) & mask(bits)


def chunk_masks(plan: GramPlan, part: int, chunk: int, seed: bytes) -> np.ndarray:
    """The a_i of a chunk's rows, (rows, N), expanded from the client's seed for exactly this plan, part and chunk."""
    domain = MASK_DOMAIN + plan.fingerprint + part.to_bytes(2, "little") + chunk.to_bytes(4, "little")
    return uniform(seed, domain, (plan.rows(part, chunk), RING_DEGREE), plan.modulus_bits(part))


@dataclass
class FitKeys:
    """The client's secret (one ternary polynomial per block of N source columns) and its public half p_B."""

    plan: GramPlan
    secret: np.ndarray = field(repr=False)  # (plan.secrets, N) in {-1, 0, 1}
    public: np.ndarray = field(repr=False)  # (plan.secrets, N): p_B = -p_A·s + e mod 2^key_bits
    matrix: np.ndarray = field(repr=False)  # (N, source_dim) int8: (a @ matrix)[t] = (a·s)[t] at message positions

    @classmethod
    def generate(cls, plan: GramPlan) -> "FitKeys":
        plan = _check_plan(plan)
        secret = ternary((plan.secrets, RING_DEGREE))
        bits = plan.key_bits
        public = (noise(secret.shape) - ring_multiply(secret, key_mask(plan, bits), bits)) & mask(bits)
        return cls(plan, secret, public, secret_matrix(secret, plan.source_dim))

    def public_bytes(self) -> bytes:
        return gram_wire.write_key(self.plan, self.public)


def check_fit_key(key: Any, plan: GramPlan) -> np.ndarray:
    """`key` if it is a fit key for `plan` as `read_fit_key` returns it, else InvalidKeys."""
    if not (isinstance(key, np.ndarray) and key.dtype == np.int64 and key.shape == (plan.secrets, RING_DEGREE)
            and key.min(initial=0) >= 0 and key.max(initial=0) < 1 << plan.key_bits):
        raise InvalidKeys("the fit key must be what read_fit_key(data, plan) returned for this plan")
    return key


def read_fit_key(data: Any, plan: GramPlan) -> np.ndarray:
    """The provider's view of a client's fit key: p_B, validated for `plan` (InvalidKeys otherwise)."""
    return gram_wire.read_key(data, _check_plan(plan))


def encrypt_chunk(keys: FitKeys, plan: GramPlan, part: int, chunk: int, Z: Any) -> bytes:
    """Encrypt the client's normalised states of chunk `chunk` of part `part`, Z of shape
    (plan.rows(part, chunk), source_dim), into one chunk message."""
    _check_plan(plan)
    if not isinstance(keys, FitKeys):
        raise EncryptedError(f"keys must be FitKeys (FitKeys.generate(plan)), got {type(keys).__name__}")
    if keys.plan != plan:
        raise ParameterMismatch("the keys were made for another fit plan; FitKeys.generate(plan) for this one")
    rows, bits = plan.rows(part, chunk), plan.modulus_bits(part)
    try:
        Z = np.asarray(Z, dtype=np.float64)
    except (TypeError, ValueError):
        raise EncryptedError(f"states must be numbers, got {type(Z).__name__}") from None
    if Z.shape != (rows, plan.source_dim):
        raise ParameterMismatch(f"chunk {chunk} of part {part} must be ({rows}, {plan.source_dim}) states, got "
                                f"shape {Z.shape}")
    bound = 2.0 ** (bits - plan.value_bits - 3)
    if not np.all(np.abs(Z) < bound):
        raise EncryptedError(f"normalised states must be finite and below {bound:g} in magnitude; normalise them "
                             "with the train part's mean and std first")
    seed = rlwe.random_bytes(SEED_BYTES)
    a = chunk_masks(plan, part, chunk, seed)
    a_s = matmul_mod(keys.matrix.T, a.T, bits, 1).T
    m = np.rint(Z * 2.0 ** plan.value_bits).astype(np.int64)
    b = (m + noise(m.shape) - a_s) & mask(bits)
    return gram_wire.write_chunk(plan, part, chunk, seed, b)


def decrypt_gram(keys: FitKeys, plan: GramPlan, part: int, results: list[bytes]) -> np.ndarray:
    """G = Ẑ_Aᵀ Ẑ_B of one part, (source_dim, target_dim), from its `plan.groups` results in group order."""
    _check_plan(plan)
    plan.check_part(part)
    if not isinstance(keys, FitKeys) or keys.plan != plan:
        raise ParameterMismatch("decrypt with the FitKeys made for this plan (FitKeys.generate(plan))")
    if not isinstance(results, (list, tuple)) or len(results) != plan.groups:
        got = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
        raise EncryptedError(f"a part's result is a list of {plan.groups} messages (one per group, in order), "
                             f"got {got}")
    bits, b0, b1 = plan.modulus_bits(part), plan.c0_bits(part), plan.c1_bits(part)
    secret = keys.matrix
    shift = 2.0 ** plan.target_shifts[part]
    rows = []
    for group, data in enumerate(results):
        c0, c1 = gram_wire.read_result(data, plan, part, group)
        c1_s = matmul_mod(secret.T, c1.T, b1, 1).T  # (c1·s) mod 2^b1, then lifted to the part's modulus
        value = ((c0 & mask(b0)) << (bits - b0)) + ((c1_s & mask(b1)) << (bits - b1))
        rows.append(centre(value, bits))
    return (np.concatenate(rows, axis=0).astype(np.float64) * shift / 2.0 ** (2 * plan.value_bits)).T


class GramAccumulator:
    """Provider side of one part: adds each chunk's product as it arrives; answers once, re-randomised.

    Memory: `plan.accumulator_bytes` of sums plus one chunk, whatever the rows; freed when `results` returns.
    `target_states` is read, never copied (the provider's states may be memory-mapped). Thread-safe: chunks are
    taken one at a time, in order."""

    def __init__(self, plan: GramPlan, part: int, target_states: Any):
        self.plan, self.part = _check_plan(plan), plan.check_part(part)
        states = np.asarray(target_states)
        shape = (plan.part_rows[part], plan.target_dim)
        if states.shape != shape or not np.issubdtype(states.dtype, np.number):
            raise EncryptedError(f"target states of part {part} must be numbers of shape {shape}, got "
                                 f"{states.dtype} {states.shape}")
        norms = np.zeros(plan.target_dim)
        for lo in range(0, shape[0], 4096):  # one pass, a block at a time (the states may be memory-mapped)
            block = np.asarray(states[lo:lo + 4096], dtype=np.float64)
            if not np.all(np.isfinite(block)):
                raise EncryptedError("target states contain NaN or infinity; clean and normalise them first")
            norms += (block * block).sum(axis=0)
        if plan.column_shift(part, norms) > plan.target_shifts[part]:
            raise EncryptedError(f"part {part}'s target states need a shift of {plan.column_shift(part, norms)} "
                                 f"but the plan has {plan.target_shifts[part]}; plan with target_shifts from these "
                                 "states (GramPlan.column_shift)")
        self._states: np.ndarray | None = states  # not copied: the provider's states are shared by every fit
        self._sums: np.ndarray | None = np.zeros((plan.target_dim, plan.source_dim + RING_DEGREE), dtype=np.int64)
        self._next = 0
        self._state = "open"  # open -> finished (results taken) or broken (an internal failure)
        self._lock = threading.Lock()

    @property
    def next_chunk(self) -> int:
        return self._next

    @property
    def chunks(self) -> int:
        return self.plan.chunks(self.part)

    @property
    def complete(self) -> bool:
        return self._next == self.chunks

    def _usable(self) -> None:
        if self._state == "finished":
            raise EncryptedError(f"part {self.part}'s results were already returned and its memory freed; "
                                 "start a new fit session to fit again")
        if self._state == "broken":
            raise EncryptedError(f"part {self.part}'s accumulator failed internally and holds no usable sums; "
                                 "start a new fit session")

    def add(self, data: Any, chunk: int, key: np.ndarray) -> None:
        """Validate and add chunk `chunk` (it must be `next_chunk`); a refused message changes nothing. `key` is
        the session's fit key (checked here, used by `results`)."""
        with self._lock:
            self._usable()
            check_fit_key(key, self.plan)
            if not isinstance(chunk, int) or isinstance(chunk, bool):
                raise ParameterMismatch(f"chunk index must be an int, got {chunk!r:.20}")
            if self.complete:
                raise ParameterMismatch(f"part {self.part} already holds all {self.chunks} chunks; chunk {chunk} is "
                                        "past the end: fetch the results")
            if chunk != self._next:
                raise ParameterMismatch(f"chunk {chunk} of part {self.part} arrived out of order: chunk {self._next} "
                                        f"is next; send chunks 0..{self.chunks - 1} in order, each once")
            seed, b = gram_wire.read_chunk(data, self.plan, self.part, chunk)
            plan, bits = self.plan, self.plan.modulus_bits(self.part)
            start = chunk * plan.chunk_rows
            try:
                components = np.concatenate([b, chunk_masks(plan, self.part, chunk, seed)], axis=1)
                weights = np.rint(np.asarray(self._states[start:start + len(b)], dtype=np.float64).T
                                  * 2.0 ** (plan.value_bits - plan.target_shifts[self.part])).astype(np.int64)
                self._sums += matmul_mod(weights, components, bits, int(np.abs(weights).max(initial=1)))
                self._sums &= mask(bits)
            except BaseException:
                self._state, self._sums = "broken", None
                raise
            self._next += 1
            if self.complete:
                self._states = None

    def results(self, key: np.ndarray) -> list[bytes]:
        """One result message per group (decrypt_gram reads them in this order); only once, when `complete`."""
        with self._lock:
            self._usable()
            check_fit_key(key, self.plan)
            if not self.complete:
                raise EncryptedError(f"part {self.part} has {self._next} of its {self.chunks} chunks; send the rest "
                                     "before fetching results")
            plan, part, bits = self.plan, self.part, self.plan.modulus_bits(self.part)
            d = plan.source_dim
            try:
                p_a, p_b = key_mask(plan, bits), key & mask(bits)
                blobs = []
                for group in range(plan.groups):
                    lo = group * plan.result_rows
                    rows = plan.group_rows(group)
                    u = ternary((rows, RING_DEGREE))
                    u_b = np.concatenate([ring_multiply(u, p, bits) for p in p_b], axis=1)[:, :d]
                    c0 = self._sums[lo:lo + rows, :d] + u_b + noise((rows, d))
                    c1 = self._sums[lo:lo + rows, d:] + ring_multiply(u, p_a, bits) + noise((rows, RING_DEGREE))
                    blobs.append(gram_wire.write_result(
                        plan, part, group, switch_modulus(c0 & mask(bits), bits, plan.c0_bits(part)),
                        switch_modulus(c1 & mask(bits), bits, plan.c1_bits(part))))
            except BaseException:
                self._state, self._sums = "broken", None
                raise
            self._state, self._sums = "finished", None
            return blobs
