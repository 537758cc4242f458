"""Server side: Enc(x) -> Enc(Wx + b) with W's diagonals encoded once at load."""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from . import messages
from .errors import EncryptedError, InvalidKeys, InvalidLayout
from .key_checks import check_rerandomiser
from .keys import PublicKeys
from .layout import LinearLayout, plan_layout
from .profiles import DEFAULT_PROFILE, CkksProfile

# Bound on the W-dependent noise of a reply, as the 2-norm of its coefficients (docs/protocol.md, "Circuit
# privacy"): rescale rounding and key switching, NOISE_ABS * N * sqrt(1 + rotations) (measured at most
# N * 2^5.6 at N=8192, d=4096), plus float64 encoding error, FLOAT_REL * scale * (|W row| |x| + |b|)
# (measured 2^-55). Both carry a margin of about 8x.
NOISE_ABS = 64.0
FLOAT_REL = 2.0**-52
MAX_FLOOD_STD = 1.0  # refuse a flood that adds more than this std to every output


def gaussian(n: int) -> np.ndarray:
    """n independent N(0, 1) samples from the OS's cryptographic RNG (Box-Muller over 53-bit uniforms)."""
    m = (n + 1) // 2
    u = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(2, m) >> np.uint64(11)
    radius = np.sqrt(-2.0 * np.log((u[0] + 1.0) * 2.0**-53))
    angle = 2.0 * np.pi * u[1] * 2.0**-53
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


class EncryptedLinear:
    """An affine layer y = W x + b evaluated on CKKS-encrypted x (see `encrypted.layout` for the method)."""

    def __init__(self, weight: Any, bias: Any = None, profile: CkksProfile = DEFAULT_PROFILE, *,
                 pairing: str = "outputs", max_galois_keys: int = 10, baby: int | None = None,
                 circuit_privacy: int | None = None, input_norm_bound: float = 256.0, output_noise: float = 0.0):
        """`pairing="outputs"` gives the lowest latency per query; `"inputs"` packs two inputs per slot,
        which doubles `lanes` for batches at a small cost per ciphertext (see `encrypted.layout`).

        `circuit_privacy=λ` makes every reply statistically independent of W beyond W x + b (distinguishing
        advantage at most 2^-λ for inputs with ||x|| <= `input_norm_bound`): the reply is re-randomised with
        an encryption of zero under the client's public key and flooded with Gaussian noise. Off (None) by
        default: it needs a profile with room for the flood (`N8192_PRIVATE`; at λ=30 each output then gets
        noise of std `flood_std` ~0.01) and a client that uploads an honest public key (`check_keys` refuses
        degenerate ones; a key that looks uniform is not proven honest). `output_noise=σ` adds fresh N(0, σ²)
        noise to every output of every reply, the same in each of its replica slots.

        `baby` fixes the baby-step count (default: the layout's cost model). A block of outputs whose weights are
        all zero is refused (a reply must depend on the query)."""
        W = np.asarray(weight, dtype=np.float64)
        if W.ndim != 2 or 0 in W.shape:
            raise EncryptedError(f"weight must be a non-empty (k, d) matrix, got shape {W.shape}")
        k, d = W.shape
        b = np.zeros(k) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
        if b.shape != (k,):
            raise EncryptedError(f"bias must have shape ({k},) to match weight {W.shape}, got {np.shape(bias)}")
        if not (np.all(np.isfinite(W)) and np.all(np.isfinite(b))):
            raise EncryptedError("weight or bias contains NaN or infinity")
        self.weight, self.bias, self.profile = W, b, profile
        self.layout: LinearLayout = plan_layout(profile, d, k, pairing=pairing, max_galois_keys=max_galois_keys,
                                                baby=baby)
        if not (isinstance(output_noise, (int, float)) and math.isfinite(output_noise) and output_noise >= 0):
            raise EncryptedError(f"output_noise must be a finite std >= 0, got {output_noise!r}")
        self.output_noise = float(output_noise)
        self.circuit_privacy = circuit_privacy
        self.noise_bound, self.flood_sigma, self.flood_std = self._flood(circuit_privacy, input_norm_bound)
        context = profile.context()
        self._evaluator = seal.Evaluator(context)
        self._encoder = seal.CKKSEncoder(context)
        self._diagonals, self._bias_plain = self._encode()

    # --- construction -------------------------------------------------------------------------------

    def _flood(self, bits: int | None, input_norm: float) -> tuple[float, float, float]:
        """(noise bound B, flood std per coefficient 2^λ B, resulting std per decoded output); zeros when off.

        Two replies whose noise differs by at most 2B have Gaussian-flooded coefficients within statistical
        distance 2B / (2 * 2^λ B) = 2^-λ (Pinsker). W's largest row norm enters B rounded up to a power of
        two, so the flood reveals that magnitude and nothing finer.
        """
        if bits is None:
            return 0.0, 0.0, 0.0
        if not isinstance(bits, int) or isinstance(bits, bool) or not 8 <= bits <= 64:
            raise EncryptedError(f"circuit_privacy must be None or a statistical security level in bits "
                                 f"(an int in [8, 64], e.g. 30), got {bits!r}")
        if not (isinstance(input_norm, (int, float)) and math.isfinite(input_norm) and input_norm > 0):
            raise EncryptedError(f"input_norm_bound must be a positive number, got {input_norm!r}")
        profile, n = self.profile, self.profile.poly_modulus_degree
        row = 2.0 ** math.ceil(math.log2(max(float(np.max(np.linalg.norm(self.weight, axis=1))), 2.0**-30)))
        bias = 2.0 ** math.ceil(math.log2(max(float(np.max(np.abs(self.bias))), 2.0**-30)))
        bound = (NOISE_ABS * n * math.sqrt(1 + self.layout.rotations)
                 + FLOAT_REL * profile.scale * (row * input_norm + bias))
        sigma = 2.0**bits * bound
        std = math.sqrt(n / 2) * sigma / profile.scale
        reply_bits = sum(profile.coeff_modulus_bits[:-2])
        if std > MAX_FLOOD_STD or math.log2(sigma) + 8 > reply_bits - 1:
            fix = ("a lower level (e.g. 30) or a smaller input_norm_bound" if profile.scale_bits >= 64 else
                   "the profile encrypted.profiles.N8192_PRIVATE (scale 2^64), a lower level or a smaller "
                   "input_norm_bound")
            raise InvalidLayout(f"circuit_privacy={bits} at profile {profile.describe()} would add noise of std "
                                f"{std:.3g} to every output (at most {MAX_FLOOD_STD:g}); use {fix}")
        return bound, sigma, std

    def _encode(self) -> tuple[list[list[list[tuple[int, Any]]]], list[Any]]:
        """Pre-rotated diagonals as NTT-form plaintexts at the query level; bias at the reply level.

        Returns diagonals[block][giant] = [(baby index j, plaintext)], skipping all-zero diagonals.
        """
        L, context = self.layout, self.profile.context()
        dp, stride, kp, kc, b, g = L.padded_input, L.stride, L.block_rows, L.complex_rows, L.baby, L.giant
        k, d = self.weight.shape
        rows = L.blocks * kp
        Wc = np.zeros((rows, dp), dtype=np.complex128)
        bc = np.zeros(rows, dtype=np.complex128)
        Wc[:kc, :d] = self.weight[:kc]
        bc[:kc] = self.bias[:kc]
        if L.pairing == "outputs":  # row r carries outputs r and r + k'
            Wc[: k - kc, :d] += 1j * self.weight[kc:]
            bc[: k - kc] += 1j * self.bias[kc:]
        else:  # both inputs of a slot get the bias
            bc *= 1 + 1j

        top = context.first_parms_id()
        low = messages.reply_parms_id(self.profile)
        # Encoding W at the scale of the prime that the rescale drops leaves the reply at the query's scale.
        weight_scale = float(context.first_context_data().parms().coeff_modulus()[-1].value())
        i = np.arange(dp)
        diagonals, bias_plain = [], []
        for block in range(L.blocks):
            Wb = Wc[block * kp:(block + 1) * kp]
            groups = []
            for gi in range(g):
                group = []
                for j in range(b):
                    t = gi * b + j
                    if t >= kp:
                        break
                    z = np.roll(Wb[i % kp, (i + t) % dp], gi * b)
                    if np.max(np.abs(z)) * weight_scale < 0.5:
                        continue  # an all-zero diagonal adds nothing (and SEAL refuses the product)
                    plain = seal.Plaintext()
                    if not np.any(z.imag):  # a real list encodes the same plaintext in about half the time
                        z = z.real
                    self._encoder.encode(np.repeat(z, stride).tolist(), top, weight_scale, plain)
                    group.append((j, plain))
                groups.append(group)
            if not any(groups):
                raise EncryptedError(f"weight rows of output block {block} are all zero; an encrypted reply must "
                                     "depend on the query: drop those outputs or use a nonzero weight")
            diagonals.append(groups)
            plain = seal.Plaintext()
            self._encoder.encode(np.repeat(bc[block * kp + i % kp], stride).tolist(), low, self.profile.scale, plain)
            bias_plain.append(plain)
        return diagonals, bias_plain

    # --- public properties -------------------------------------------------------------------------

    @property
    def rotation_steps(self) -> list[int]:
        return self.layout.rotation_steps

    @property
    def input_dim(self) -> int:
        return self.layout.input_dim

    @property
    def output_dim(self) -> int:
        return self.layout.output_dim

    @property
    def lanes(self) -> int:
        return self.layout.lanes

    # --- evaluation --------------------------------------------------------------------------------

    def plain(self, x: Any) -> np.ndarray:
        """Reference W x + b in float64, for x of shape (d,) or (n, d)."""
        return np.asarray(x, dtype=np.float64) @ self.weight.T + self.bias

    def apply(self, query: bytes, public_keys: PublicKeys) -> bytes:
        """Reply bytes for one query blob, using the client's public keys (loaded once per session)."""
        if not isinstance(public_keys, PublicKeys):
            raise InvalidKeys(f"public_keys must be PublicKeys (PublicKeys.from_bytes(client_bytes, layer.layout), "
                              f"once per session), got {type(public_keys).__name__}")
        public_keys.require(self.layout)
        if self.circuit_privacy is not None and public_keys.public_key is None:
            raise InvalidKeys("this server sends circuit-private replies, which need the client's public key "
                              "(a PUBK section); upload the bytes of ClientKeys.public_bytes() from this version")
        ciphertext, count = messages.read_query(query, self.layout)
        replies = self.evaluate(ciphertext, public_keys.galois_keys)
        self.add_noise(replies, public_keys.public_key)
        return messages.write_reply(self.layout, replies, count)

    def check_keys(self, public_keys: PublicKeys) -> None:
        """Raise InvalidKeys unless `public_keys` can be answered: made for this layout and, for a circuit-private
        layer, with a PUBK that re-randomises replies (`encrypted.key_checks`). A server calls it once, when the
        keys are uploaded (a few tens of ms); `apply` checks only that the PUBK is there."""
        if not isinstance(public_keys, PublicKeys):
            raise InvalidKeys(f"public_keys must be PublicKeys, got {type(public_keys).__name__}")
        public_keys.require(self.layout)
        if self.circuit_privacy is None:
            return
        if public_keys.public_key is None:
            raise InvalidKeys("this server sends circuit-private replies, which it re-randomises with the client's "
                              "public key, but these keys carry none (no PUBK section); upload the bytes of "
                              "ClientKeys.public_bytes() from an xsilo that sends it (this one does)")
        check_rerandomiser(self.profile, public_keys.public_key, messages.reply_parms_id(self.profile))

    def add_noise(self, replies: list[Any], public_key: Any = None) -> None:
        """In place: re-randomise and flood (circuit privacy) and add output noise, as this layer is set up."""
        if self.circuit_privacy is None and not self.output_noise:
            return
        parms_id = messages.reply_parms_id(self.profile)
        encryptor = seal.Encryptor(self.profile.context(), public_key) if self.circuit_privacy is not None else None
        noise = None
        if self.output_noise:  # every replica slot of an output gets the same value
            noise = self.output_slots(gaussian(self.layout.lanes * self.output_dim).reshape(self.layout.lanes, -1)
                                      * self.output_noise)
        for index, ct in enumerate(replies):
            slots = np.zeros(self.profile.slots, dtype=np.complex128)
            if encryptor is not None:
                zero = seal.Ciphertext()
                encryptor.encrypt_zero(parms_id, zero)
                zero.scale = ct.scale
                self._evaluator.add_inplace(ct, zero)
                # i.i.d. complex slots of this std are i.i.d. N(0, flood_sigma^2) coefficients once encoded
                z = gaussian(2 * self.profile.slots) * self.flood_std
                slots += z[0::2] + 1j * z[1::2]
            if noise is not None:
                slots += noise[index]
            self._add_slots(ct, slots)

    def _add_slots(self, ct: Any, slots: np.ndarray) -> None:
        plain = seal.Plaintext()
        self._encoder.encode(slots.tolist(), messages.reply_parms_id(self.profile), ct.scale, plain)
        self._evaluator.add_plain_inplace(ct, plain)

    def output_slots(self, values: np.ndarray) -> list[np.ndarray]:
        """Per reply block, the complex slot vector that puts values[lane, j] on every replica slot of output j of
        that lane (the inverse of `encrypted.client.decrypt`'s reading); other slots get 0."""
        L = self.layout
        k, kc, kp, stride = L.output_dim, L.complex_rows, L.block_rows, L.stride
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (L.lanes, k):
            raise EncryptedError(f"values must have shape (lanes, outputs) = ({L.lanes}, {k}), got {values.shape}")
        blocks = []
        for block in range(L.blocks):
            row = block * kp + np.arange(L.padded_input) % kp  # the complex output row each slot row carries
            slots = np.zeros((L.padded_input, stride), dtype=np.complex128)
            real = row < kc
            if L.pairing == "outputs":  # row c: output c (real part) and output kc + c (imaginary part)
                slots[real] = values[:, row[real]].T
                paired = row < k - kc
                slots[paired] += 1j * values[:, kc + row[paired]].T
            else:  # row c: output c of lane q (real part) and of lane q + stride (imaginary part)
                slots[real] = values[:stride, row[real]].T + 1j * values[stride:, row[real]].T
            blocks.append(slots.ravel())
        return blocks

    @property
    def mask_bits(self) -> int:
        """Masks of label-only answers are uniform in (-2^mask_bits, 2^mask_bits): as wide as the reply modulus
        leaves room for above the scale, with margin for the logits and the flood."""
        return sum(self.profile.coeff_modulus_bits[:-2]) - self.profile.scale_bits - 3

    def apply_masked(self, query: bytes, public_keys: PublicKeys, fraction_bits: int) -> tuple[bytes, np.ndarray, int]:
        """(reply, masks, answered rows) for a label-only answer: the circuit-private reply of `apply` with every
        output of every lane shifted by a fresh uniform mask r = R / 2^fraction_bits, R an integer the provider
        keeps (masks, shape (lanes, k)). The client decrypts z + r and learns nothing of z beyond |z| / 2^mask_bits
        per output; the masks then enter the secure argmax (`encrypted.argmax`)."""
        if self.circuit_privacy is None:
            raise EncryptedError("masked replies need a circuit-private layer (circuit_privacy=30): without the "
                                 "re-randomisation a reply's ciphertext gives W away whatever its plaintext holds")
        if self.mask_bits < 24:
            raise InvalidLayout(f"profile {self.profile.describe()} leaves room for masks of only 2^{self.mask_bits}; "
                                "use encrypted.profiles.N8192_LABEL")
        if not isinstance(public_keys, PublicKeys):
            raise InvalidKeys(f"public_keys must be PublicKeys, got {type(public_keys).__name__}")
        public_keys.require(self.layout)
        if public_keys.public_key is None:
            raise InvalidKeys("masked replies need the client's public key (a PUBK section); upload the bytes of "
                              "ClientKeys.public_bytes() from this version")
        ciphertext, count = messages.read_query(query, self.layout)
        replies = self.evaluate(ciphertext, public_keys.galois_keys)
        self.add_noise(replies, public_keys.public_key)
        span = 1 << (self.mask_bits + fraction_bits)
        draws = np.frombuffer(os.urandom(8 * self.layout.lanes * self.output_dim), dtype=np.uint64)
        masks = (draws % np.uint64(2 * span)).astype(np.int64).reshape(self.layout.lanes, -1) - span
        for ct, slots in zip(replies, self.output_slots(masks / 2.0**fraction_bits)):
            self._add_slots(ct, slots)
        return messages.write_reply(self.layout, replies, count), masks, count

    def evaluate(self, x: Any, galois_keys: Any) -> list[Any]:
        """Enc(x) -> [Enc(W'x + b') per block] on sealapi objects (no validation: use `apply` for bytes)."""
        return self.finish(self.accumulate(x, galois_keys), galois_keys)

    def accumulate(self, x: Any, galois_keys: Any, partials: list[list[Any]] | None = None) -> list[list[Any]]:
        """Add this layer's top-level products with Enc(x) into `partials` (a fresh set when None) and return it.

        partials[block][giant] = sum_j P_{block,giant,j} * rot(x, j * stride), before the rescale, or None while
        no term was added. The rest of the layer is linear and commutes with these sums, so the partials of many
        queries (each with its own layer of this layout) can be added up and finished once (`finish`).
        """
        L, ev = self.layout, self._evaluator
        if partials is None:
            partials = [[None] * L.giant for _ in range(L.blocks)]
        elif len(partials) != L.blocks or any(len(block) != L.giant for block in partials):
            raise EncryptedError(f"partials must be {L.blocks} blocks of {L.giant} giant steps, as accumulate "
                                 "returned them for a layer of the same layout")
        rotated = [x]
        for _ in range(1, L.baby):
            nxt = seal.Ciphertext()
            ev.rotate_vector(rotated[-1], L.stride, galois_keys, nxt)
            rotated.append(nxt)
        term = None
        for groups, block in zip(self._diagonals, partials):
            for gi, group in enumerate(groups):
                for j, plain in group:
                    if block[gi] is None:
                        block[gi] = seal.Ciphertext()
                        ev.multiply_plain(rotated[j], plain, block[gi])
                        continue
                    if term is None:
                        term = seal.Ciphertext()
                    ev.multiply_plain(rotated[j], plain, term)
                    ev.add_inplace(block[gi], term)
        return partials

    def finish(self, partials: list[list[Any]], galois_keys: Any, bias: bool = True) -> list[Any]:
        """Rescale, giant steps, fold and (with `bias`) the bias: one ciphertext per block. Consumes `partials`."""
        return finish_partials(self.layout, self._evaluator, partials, galois_keys,
                               self._bias_plain if bias else None)


def finish_partials(layout: LinearLayout, evaluator: Any, partials: list[list[Any]], galois_keys: Any,
                    biases: list[Any] | None = None) -> list[Any]:
    """`EncryptedLinear.finish` for any layer of `layout`: it needs no weights, only the accumulated partials.

    Rescales the partials in place and empties `partials`, so a second finish of the same partials is refused.
    """
    L, ev = layout, evaluator
    if len(partials) != L.blocks or any(len(block) != L.giant for block in partials):
        raise EncryptedError(f"partials must be {L.blocks} blocks of {L.giant} giant steps, as "
                             "EncryptedLinear.accumulate returned them for this layout")
    giant_step = L.baby * L.stride
    replies = []
    for index, block in enumerate(partials):
        acc = None
        for gi in reversed(range(L.giant)):  # Horner: acc = rot(acc, b) + P_gi
            if acc is not None:
                ev.rotate_vector_inplace(acc, giant_step, galois_keys)
            part = block[gi]
            if part is None:
                continue
            ev.rescale_to_next_inplace(part)
            if acc is None:
                acc = part
            else:
                ev.add_inplace(acc, part)
        block[:] = [None] * L.giant
        if acc is None:
            raise EncryptedError(f"block {index} holds no accumulated products (already finished, or no query "
                                 "was accumulated); accumulate at least one query first")
        for step, radix in L.fold:  # sum of rot(acc, m*step), m < radix, by Horner's rule
            base, cur = acc, acc
            for _ in range(radix - 1):
                nxt = seal.Ciphertext()
                ev.rotate_vector(cur, step, galois_keys, nxt)
                ev.add_inplace(nxt, base)
                cur = nxt
            acc = cur
        if biases is not None:
            ev.add_plain_inplace(acc, biases[index])
        replies.append(acc)
    return replies
