"""Label-only answers: the argmax of masked logits, computed by two parties, so that the client learns the class and
nothing else of the logits and the provider learns nothing of the query or its result (docs/protocol.md, section 8).

The cryptography is TNO MPC Lab's: Paillier and DGK (`tno.mpc.encryption_schemes`) and the DGK-based secure
comparison of Nateghizad et al. (`tno.mpc.protocols.secure_comparison`, its steps called one by one). This module
schedules those steps, does the selections with Paillier's additive homomorphism, and moves ciphertexts as bytes.

The provider's CKKS reply carried a = z + r: the client holds a, the provider the masks r. Per answered row:
1. the client sends [[round(a_j 2^f)]] under its own Paillier key, j < k;
2. the provider forms [[v_j]] = [[(round(z_j 2^f) + 2^(L+f)) 2^s + j]] (the class index j in the low s bits
   breaks ties and travels with the value), shuffles the k values and runs a knockout tournament: each match is a
   comparison [[v_a <= v_b]] and a selection v_a + δ (v_b - v_a), for which the client multiplies the
   difference, masked statistically (2^-κ), by δ. The client learns each δ: over the provider's secret shuffle
   their distribution is the same for any logits without ties;
3. the provider sends the winner masked above its low s bits; the client reads the class from them.
Every match of a round, over every row, travels in one message: ceil(log2 k) rounds of three round trips.
"""
from __future__ import annotations

import math
import secrets
from typing import Any

import numpy as np

from .argmax_keys import ArgmaxKeys, ArgmaxPublicKeys
from .argmax_spec import ArgmaxSpec
from .errors import EncryptedError, InvalidCiphertext

from tno.mpc.encryption_schemes.dgk import DGKCiphertext  # noqa: E402  (argmax_keys stubs TNO's torch plugin)
from tno.mpc.encryption_schemes.paillier import PaillierCiphertext  # noqa: E402
from tno.mpc.protocols.secure_comparison import Initiator, KeyHolder  # noqa: E402

def _width(modulus: int) -> int:
    return (modulus.bit_length() + 7) // 8


def pack(values: list[int], modulus: int) -> bytes:
    width = _width(modulus)
    return b"".join(int(v).to_bytes(width, "big") for v in values)


def unpack(blob: bytes, count: int, modulus: int, what: str) -> list[int]:
    """`count` units of Z_modulus (ciphertexts), each in the modulus's byte width; anything else is refused."""
    width = _width(modulus)
    if not isinstance(blob, (bytes, bytearray)) or len(blob) != count * width:
        raise InvalidCiphertext(f"{what}: expected {count} ciphertexts of {width} bytes ({count * width} bytes), got "
                                f"{len(blob) if isinstance(blob, (bytes, bytearray)) else type(blob).__name__}; "
                                "send the message this step asks for")
    values = [int.from_bytes(blob[i:i + width], "big") for i in range(0, len(blob), width)]
    if any(not 0 < v < modulus or math.gcd(v, modulus) != 1 for v in values):
        raise InvalidCiphertext(f"{what}: a ciphertext is not a unit modulo the key's modulus; send ciphertexts "
                                "under the keys this answer was started with")
    return values


def message_bytes(stage: str, matches: int, rows: int, spec: ArgmaxSpec, keys: ArgmaxPublicKeys) -> int:
    """The exact size of the client's message at `stage` (a server bounds the request body by it)."""
    pw, dw = _width(keys.paillier.public_key.n_squared), _width(keys.dgk.public_key.n)
    return {"values": rows * spec.classes * pw, "bits": matches * (1 + spec.value_bits) * dw,
            "zetas": matches * 3 * pw, "select": matches * pw, "done": 0}[stage]


class ProviderArgmax:
    """The provider's side of one label-only answer for `rows` rows (one per answered query lane)."""

    def __init__(self, keys: ArgmaxPublicKeys, spec: ArgmaxSpec, masks: np.ndarray):
        masks = np.asarray(masks)
        if masks.ndim != 2 or masks.shape[1] != spec.classes or masks.shape[0] < 1:
            raise EncryptedError(f"masks must have shape (rows, {spec.classes}), got {masks.shape}")
        self.keys, self.spec = keys, spec
        self.masks = [[int(v) for v in row] for row in masks]  # fixed-point integers, as spec.fixed_point gives
        self.rows = len(self.masks)
        self.stage = "values"
        self._candidates: list[list[PaillierCiphertext]] = []
        self._matches: list[dict[str, Any]] = []

    @property
    def done(self) -> bool:
        return self.stage == "done"

    def expected_bytes(self) -> int:
        return message_bytes(self.stage, len(self._matches), self.rows, self.spec, self.keys)

    def handle(self, message: bytes) -> bytes:
        """The reply to the client's message at the current stage (InvalidCiphertext for any other bytes)."""
        if self.stage == "done":
            raise EncryptedError("this label-only answer is complete; send a new query")
        try:
            return getattr(self, f"_on_{self.stage}")(message)
        except (ArithmeticError, AssertionError) as exc:  # TNO's arithmetic on values no honest client sends
            raise InvalidCiphertext(f"the {self.stage} message could not be used ({type(exc).__name__}); send the "
                                    "messages ClientArgmax makes") from None

    # --- stages -------------------------------------------------------------------------------------------------

    def _paillier(self, values: list[int]) -> list[PaillierCiphertext]:
        return [PaillierCiphertext(v, self.keys.paillier) for v in values]

    def _on_values(self, message: bytes) -> bytes:
        scheme, spec = self.keys.paillier, self.spec
        n = scheme.public_key.n
        raw = self._paillier(unpack(message, self.rows * spec.classes, scheme.public_key.n_squared, "masked logits"))
        offset = 1 << (spec.logit_bits + spec.fraction_bits)
        for row in range(self.rows):
            values = []
            for j in range(spec.classes):
                shift = (offset - self.masks[row][j]) % n
                value = (raw[row * spec.classes + j] + self._encrypt(shift)) * (1 << spec.label_bits)
                values.append(value + self._encrypt(j))
            order = list(range(spec.classes))
            for i in range(len(order) - 1, 0, -1):  # Fisher-Yates with the OS's randomness
                swap = secrets.randbelow(i + 1)
                order[i], order[swap] = order[swap], order[i]
            self._candidates.append([values[i] for i in order])
        return self._start_round()

    def _encrypt(self, value: int) -> PaillierCiphertext:
        return self.keys.paillier.unsafe_encrypt(value % self.keys.paillier.public_key.n, apply_encoding=False)

    def _start_round(self) -> bytes:
        l, scheme = self.spec.value_bits, self.keys.paillier
        self._matches, out = [], []
        for row, candidates in enumerate(self._candidates):
            for a in range(0, len(candidates) - 1, 2):
                z, r = Initiator.step_1(candidates[a], candidates[a + 1], l, scheme)
                z.randomize()
                self._matches.append({"row": row, "a": a, "r": r})
                out.append(z.get_value())
        self.stage = "bits"
        return pack(out, scheme.public_key.n_squared)

    def _on_bits(self, message: bytes) -> bytes:
        l, pai, dgk = self.spec.value_bits, self.keys.paillier, self.keys.dgk
        values = unpack(message, len(self._matches) * (1 + l), dgk.public_key.n, "comparison bits")
        out = []
        for index, match in enumerate(self._matches):
            chunk = [DGKCiphertext(v, dgk) for v in values[index * (1 + l):(index + 1) * (1 + l)]]
            d_enc, bits = chunk[0], chunk[1:]
            r = match["r"]
            alpha = Initiator.step_3(r, l)
            d_enc = Initiator.step_4c(d_enc, r, dgk, pai)
            xors = Initiator.step_4d(alpha, bits)
            w, alpha_tilde = Initiator.step_4e(r, alpha, xors, d_enc, pai)
            w = Initiator.step_4f(w)
            s, delta_a = Initiator.step_4g()
            c = Initiator.step_4h(s, alpha, alpha_tilde, d_enc, bits, w, delta_a, dgk)
            for ciphertext in Initiator.step_4i(c, dgk, do_shuffle=True):
                ciphertext.randomize()
                out.append(ciphertext.get_value())
            match["delta_a"] = delta_a
        self.stage = "zetas"
        return pack(out, dgk.public_key.n)

    def _on_zetas(self, message: bytes) -> bytes:
        l, pai = self.spec.value_bits, self.keys.paillier
        values = self._paillier(unpack(message, 3 * len(self._matches), pai.public_key.n_squared, "comparison ends"))
        out = []
        for index, match in enumerate(self._matches):
            zeta_1, zeta_2, delta_b = values[3 * index:3 * index + 3]
            below = Initiator.step_6(match["delta_a"], delta_b)
            result = Initiator.step_7(zeta_1, zeta_2, match["r"], l, below, pai)  # [[δ]] = [[v_a <= v_b]]
            candidates = self._candidates[match["row"]]
            # w = v_b - v_a + ρ with ρ in [2^64, 2^mask_bits) is positive and hides v_b - v_a to 2^-κ; the client
            # gets δ + 2w in one ciphertext (no wrap: 2^(mask_bits + 2) is far below n)
            mask = (1 << 64) + secrets.randbelow((1 << self.spec.mask_bits) - (1 << 64))
            shown = result + (candidates[match["a"] + 1] - candidates[match["a"]] + self._encrypt(mask)) * 2
            shown.randomize()
            out.append(shown.get_value())
            match.update(result=result, mask=mask)
        self.stage = "select"
        return pack(out, pai.public_key.n_squared)

    def _on_select(self, message: bytes) -> bytes:
        pai = self.keys.paillier
        products = self._paillier(unpack(message, len(self._matches), pai.public_key.n_squared, "selections"))
        winners: list[list[PaillierCiphertext]] = [[] for _ in range(self.rows)]
        for match, product in zip(self._matches, products):  # v_a + δ w - δ ρ = v_a + δ (v_b - v_a)
            low = self._candidates[match["row"]][match["a"]]
            winners[match["row"]].append(low + product - match["result"] * match["mask"])
        for row, candidates in enumerate(self._candidates):
            if len(candidates) % 2:
                winners[row].append(candidates[-1])  # the odd one out waits for the next round
        self._candidates = winners
        if len(winners[0]) > 1:
            return self._start_round()
        spec, out = self.spec, []
        high = 1 << spec.mask_bits
        for (winner,) in winners:
            masked = winner + self._encrypt(secrets.randbelow(high) << spec.label_bits)
            masked.randomize()
            out.append(masked.get_value())
        self.stage, self._matches = "done", []
        return pack(out, pai.public_key.n_squared)


class ClientArgmax:
    """The client's side: from its decrypted masked logits (rows, k) to the rows' classes (`labels`)."""

    def __init__(self, keys: ArgmaxKeys, spec: ArgmaxSpec, masked: np.ndarray):
        masked = np.asarray(masked, dtype=np.float64)
        if masked.ndim != 2 or masked.shape[1] != spec.classes or not np.all(np.isfinite(masked)):
            raise EncryptedError(f"masked logits must be a finite (rows, {spec.classes}) array, got {masked.shape}")
        self.keys, self.spec, self.rows = keys, spec, masked.shape[0]
        self._masked = masked
        self._round = 0
        self._state: list[dict[str, Any]] = []
        self.stage = "values"
        self.labels: np.ndarray | None = None
        # every value this client decrypts, by kind, for audits of what an answer reveals beyond its label
        self.seen: dict[str, list[int]] = {"comparison": [], "zero_found": [], "delta": [], "difference": [],
                                           "label_value": []}

    def _matches(self) -> int:
        return self.rows * (self.spec.rounds()[self._round] // 2)

    def first_message(self) -> bytes:
        pai = self.keys.paillier
        n = pai.public_key.n
        out = []
        for value in self.spec.fixed_point(self._masked):
            ciphertext = pai.unsafe_encrypt(value % n, apply_encoding=False)
            ciphertext.randomize()
            out.append(ciphertext.get_value())
        self.stage = "z"
        return pack(out, pai.public_key.n_squared)

    def handle(self, reply: bytes) -> bytes | None:
        """The next message for the provider's `reply`, or None once `labels` is set (InvalidCiphertext for bytes
        no honest provider sends)."""
        if self.stage == "done":
            raise EncryptedError("this label-only answer is complete")
        try:
            return getattr(self, f"_on_{self.stage}")(reply)
        except (ArithmeticError, AssertionError) as exc:  # TNO's arithmetic on values no honest provider sends
            raise InvalidCiphertext(f"the provider's {self.stage} message could not be used ({type(exc).__name__}); "
                                    "the answer cannot be trusted") from None

    def _on_z(self, reply: bytes) -> bytes:
        l, pai, dgk = self.spec.value_bits, self.keys.paillier, self.keys.dgk
        zs = unpack(reply, self._matches(), pai.public_key.n_squared, "comparison masks")
        self._state, out = [], []
        for value in zs:
            z, beta = KeyHolder.step_2(PaillierCiphertext(value, pai), l, pai)
            self.seen["comparison"].append(z)
            d_enc = KeyHolder.step_4a(z, dgk, pai, l)
            bits = KeyHolder.step_4b(beta, l, dgk)
            for ciphertext in [d_enc, *bits]:
                ciphertext.randomize()
                out.append(ciphertext.get_value())
            self._state.append({"z": z})
        self.stage = "c"
        return pack(out, dgk.public_key.n)

    def _on_c(self, reply: bytes) -> bytes:
        l, pai, dgk = self.spec.value_bits, self.keys.paillier, self.keys.dgk
        values = unpack(reply, self._matches() * (l + 1), dgk.public_key.n, "comparison terms")
        out = []
        for index, state in enumerate(self._state):
            chunk = [DGKCiphertext(v, dgk) for v in values[index * (l + 1):(index + 1) * (l + 1)]]
            delta_b = KeyHolder.step_4j(chunk, dgk)
            self.seen["zero_found"].append(delta_b)
            for ciphertext in KeyHolder.step_5(state["z"], l, delta_b, pai):
                ciphertext.randomize()
                out.append(ciphertext.get_value())
        self.stage = "delta"
        return pack(out, pai.public_key.n_squared)

    def _on_delta(self, reply: bytes) -> bytes:
        pai, spec = self.keys.paillier, self.spec
        n = pai.public_key.n
        values = unpack(reply, self._matches(), pai.public_key.n_squared, "selections")
        out = []
        for value in values:
            shown = int(pai.decrypt(PaillierCiphertext(value, pai), apply_encoding=False))
            delta, difference = shown & 1, shown >> 1
            self.seen["delta"].append(delta)
            self.seen["difference"].append(difference)
            if difference >= 1 << (spec.mask_bits + 1):
                raise InvalidCiphertext("the provider sent a selection out of range; the answer cannot be trusted")
            product = pai.unsafe_encrypt(delta * difference % n, apply_encoding=False)
            product.randomize()
            out.append(product.get_value())
        self._round += 1
        self.stage = "z" if self._round < len(spec.rounds()) else "label"
        return pack(out, pai.public_key.n_squared)

    def _on_label(self, reply: bytes) -> None:
        pai = self.keys.paillier
        values = unpack(reply, self.rows, pai.public_key.n_squared, "labels")
        self.seen["label_value"] = [int(pai.decrypt(PaillierCiphertext(v, pai), apply_encoding=False)) for v in values]
        labels = [value % (1 << self.spec.label_bits) for value in self.seen["label_value"]]
        if any(label >= self.spec.classes for label in labels):
            raise InvalidCiphertext(f"the provider's answer decodes to a class beyond the head's {self.spec.classes}; "
                                    "the answer cannot be trusted")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.stage = "done"
        return None
