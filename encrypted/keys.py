"""Client key material: the secret key stays on the client; public keys (Galois keys and a public encryption key) go to the server."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import tenseal.sealapi as seal

from . import wire
from .errors import EncryptedError, InvalidKeys, ParameterMismatch
from .layout import LinearLayout
from .profiles import PROFILES, CkksProfile, galois_element, seal_context
from .wire import Kind

MAX_ROTATION_STEPS = 64
_SLACK = 4096  # bytes of SEAL metadata around the polynomial data


def galois_keys_max_bytes(profile: CkksProfile, n_keys: int) -> int:
    n, primes = profile.poly_modulus_degree, len(profile.coeff_modulus_bits)
    return n_keys * (primes - 1) * 2 * primes * n * 8 + _SLACK * (n_keys + 1)


def secret_key_max_bytes(profile: CkksProfile) -> int:
    return len(profile.coeff_modulus_bits) * profile.poly_modulus_degree * 8 + _SLACK


def public_key_max_bytes(profile: CkksProfile) -> int:
    """A public encryption key: two polynomials over every prime of the (server's) profile."""
    return 2 * len(profile.coeff_modulus_bits) * profile.poly_modulus_degree * 8 + _SLACK


def public_bytes_max(layout: LinearLayout) -> int:
    """Upper bound of `ClientKeys.public_bytes()` for `layout`: the container, PROF/STEP JSON, the Galois keys for
    the layout's steps and the public key, uncompressed. A server caps the upload body with it."""
    profile, sections = layout.profile, 4
    return (wire.HEADER.size + sections * wire.SECTION.size + 2 * wire.MAX_JSON_BYTES
            + galois_keys_max_bytes(profile, len(layout.rotation_steps)) + public_key_max_bytes(profile))


def _check_steps(steps: Any, profile: CkksProfile, error: type[Exception]) -> tuple[int, ...]:
    if isinstance(steps, LinearLayout):
        steps = steps.rotation_steps
    try:
        steps = list(steps)
    except TypeError:
        raise error(f"rotation_steps must be a list of ints (layer.rotation_steps), got {steps!r:.100}") from None
    if len(steps) > MAX_ROTATION_STEPS:
        raise error(f"{len(steps)} rotation steps requested, at most {MAX_ROTATION_STEPS} are allowed")
    for s in steps:
        if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s < profile.slots:
            raise error(f"rotation step {s!r} must be an int in [1, {profile.slots}); use layer.rotation_steps")
    if len(set(steps)) != len(steps):
        raise error(f"rotation steps {steps} contain duplicates")
    return tuple(sorted(steps))


def _seed_words(seed: int | bytes | str) -> list[int]:
    if isinstance(seed, int) and not isinstance(seed, bool):
        material = seed.to_bytes((seed.bit_length() + 8) // 8 or 1, "little", signed=True)
    elif isinstance(seed, str):
        material = seed.encode()
    elif isinstance(seed, (bytes, bytearray)):
        material = bytes(seed)
    else:
        raise EncryptedError(f"seed must be an int, str or bytes, got {type(seed).__name__}")
    digest = hashlib.sha512(b"xsilo-encrypted-secret-key\0" + material).digest()
    return [int.from_bytes(digest[i:i + 8], "little") for i in range(0, 64, 8)]


@dataclass
class ClientKeys:
    """The client's CKKS secret key, the seeded Galois keys for exactly `rotation_steps`, and a seeded public
    encryption key (PUBK) with which a server re-randomises circuit-private replies."""

    profile: CkksProfile
    rotation_steps: tuple[int, ...]
    secret_key: Any = field(repr=False)  # seal.SecretKey
    galois_blob: bytes = field(repr=False)  # seeded SEAL GaloisKeys, as sent to the server
    public_key_blob: bytes = field(default=b"", repr=False)  # seeded SEAL PublicKey, as sent to the server
    _tools: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def generate(cls, profile: CkksProfile, rotation_steps: Iterable[int] | LinearLayout,
                 seed: int | bytes | str | None = None) -> "ClientKeys":
        """Make a secret key and Galois keys for `rotation_steps` (e.g. `layer.rotation_steps`).

        With `seed`, the secret key is reproducible from it (keep the seed as secret as the key). The
        Galois keys always draw fresh OS randomness: SEAL's seeded PRNG factory would give every key
        the same mask and error, which leaks the secret key.
        """
        steps = _check_steps(rotation_steps, profile, EncryptedError)
        context = profile.context()
        if seed is None:
            secret_key = seal.KeyGenerator(context).secret_key()
        else:
            seeded = seal_context(profile.poly_modulus_degree, profile.coeff_modulus_bits, _seed_words(seed))
            secret_key = seal.KeyGenerator(seeded).secret_key()
        keygen = seal.KeyGenerator(context, secret_key)
        elements = [galois_element(s, profile.poly_modulus_degree) for s in steps]
        galois_blob = wire.seal_to_bytes(keygen.create_galois_keys(elements)) if elements else b""
        # A public key is a symmetric encryption of zero at the key level (what KeyGenerator.create_public_key
        # does); made this way it saves seeded, at half the bytes, which sealapi does not offer for PublicKey.
        public_key = seal.Encryptor(context, secret_key).encrypt_zero_symmetric(context.key_parms_id())
        return cls(profile, steps, secret_key, galois_blob, wire.seal_to_bytes(public_key))

    def public_bytes(self) -> bytes:
        """Parameters, rotation steps, Galois keys and the public key: everything the server needs, no secret key."""
        sections = [(b"PROF", wire.dump_json(self.profile.to_dict())),
                    (b"STEP", wire.dump_json(list(self.rotation_steps)))]
        if self.galois_blob:
            sections.append((b"GALK", self.galois_blob))
        if self.public_key_blob:
            sections.append((b"PUBK", self.public_key_blob))
        return wire.pack(Kind.PUBLIC_KEYS, self.profile.fingerprint, sections)

    def to_bytes(self) -> bytes:
        """Everything including the secret key: store it on the client only, never send it."""
        sections = [(b"PROF", wire.dump_json(self.profile.to_dict())),
                    (b"STEP", wire.dump_json(list(self.rotation_steps))),
                    (b"SECK", wire.seal_to_bytes(self.secret_key))]
        if self.galois_blob:
            sections.append((b"GALK", self.galois_blob))
        if self.public_key_blob:
            sections.append((b"PUBK", self.public_key_blob))
        return wire.pack(Kind.SECRET_KEYS, self.profile.fingerprint, sections)

    @classmethod
    def from_bytes(cls, data: bytes, expected: LinearLayout | CkksProfile | None = None) -> "ClientKeys":
        """Load `to_bytes()` output. `expected` (the layout or profile the keys are for) is required unless
        they use a built-in profile; every section is checked as data before a SEAL object is built."""
        kind, fingerprint, sections = wire.unpack(data, Kind.SECRET_KEYS, InvalidKeys)
        if kind != Kind.SECRET_KEYS:
            raise InvalidKeys(f"expected secret keys (ClientKeys.to_bytes()), got {wire.KIND_NAMES[kind]}")
        grouped = wire.section_map(sections, {b"PROF": (1, 1), b"STEP": (1, 1), b"SECK": (1, 1), b"GALK": (0, 1),
                                              b"PUBK": (0, 1)}, "secret keys", InvalidKeys)
        profile, steps = _read_profile_and_steps(grouped, fingerprint, "secret keys", expected)
        galois = bytes(grouped[b"GALK"][0]) if b"GALK" in grouped else b""
        if bool(galois) != bool(steps):
            raise InvalidKeys("secret keys: Galois key section does not match the rotation steps")
        if galois:
            wire.check_seal_blob(memoryview(galois), galois_keys_max_bytes(profile, len(steps)), "Galois keys",
                                 InvalidKeys)
        wire.check_seal_blob(grouped[b"SECK"][0], secret_key_max_bytes(profile), "secret key", InvalidKeys)
        secret_key = wire.seal_from_bytes(seal.SecretKey(), profile.context(), grouped[b"SECK"][0],
                                          secret_key_max_bytes(profile), "secret key", InvalidKeys)
        public_key = bytes(grouped[b"PUBK"][0]) if b"PUBK" in grouped else b""
        if public_key:
            wire.check_seal_blob(memoryview(public_key), public_key_max_bytes(profile), "public key", InvalidKeys)
        return cls(profile, steps, secret_key, galois, public_key)

    def tool(self, name: str):
        """The SEAL `encoder`, `encryptor` or `decryptor` for these keys, built once (the context is costly)."""
        if name not in self._tools:
            context = self.profile.context()
            self._tools["encoder"] = seal.CKKSEncoder(context)
            self._tools["encryptor"] = seal.Encryptor(context, self.secret_key)
            self._tools["decryptor"] = seal.Decryptor(context, self.secret_key)
        return self._tools[name]


def _expectation(expected: Any) -> tuple[CkksProfile | None, tuple[int, ...] | None]:
    """(profile, rotation steps) that key bytes must match: a layout fixes both, a profile only the parameters."""
    if expected is None:
        return None, None
    if isinstance(expected, LinearLayout):
        return expected.profile, tuple(expected.rotation_steps)
    if isinstance(expected, CkksProfile):
        return expected, None
    raise EncryptedError(f"expected must be a LinearLayout (the layer's layout) or a CkksProfile, "
                         f"got {type(expected).__name__}")


def _read_profile_and_steps(grouped: dict, fingerprint: bytes, what: str,
                            expected: Any) -> tuple[CkksProfile, tuple[int, ...]]:
    """The PROF and STEP sections, compared with what the caller expects as plain data.

    The profile returned is always one that code chose (`expected`'s, or a built-in one), never one
    built from the bytes, so no SEAL context is ever made for parameters a client picked.
    """
    want_profile, want_steps = _expectation(expected)
    if want_profile is not None and fingerprint != want_profile.fingerprint:
        raise ParameterMismatch(f"{what} were made for other CKKS parameters than profile {want_profile.describe()}; "
                                "generate them with ClientKeys.generate(layout.profile, layout.rotation_steps)")
    prof = wire.load_json(grouped[b"PROF"][0], f"{what}: PROF section", InvalidKeys)
    if want_profile is not None:
        if prof != want_profile.to_dict():
            raise ParameterMismatch(f"{what}: PROF section {_summary(prof)} is not the expected profile "
                                    f"{want_profile.describe()}; generate keys with "
                                    "ClientKeys.generate(layout.profile, layout.rotation_steps)")
        profile = want_profile
    else:
        profile = next((p for p in PROFILES.values() if p.to_dict() == prof), None)
        if profile is None:
            raise ParameterMismatch(f"{what}: PROF section {_summary(prof)} is not a built-in profile "
                                    f"({sorted(PROFILES)}); pass the layout the keys were made for "
                                    "(from_bytes(data, layout))")
        if profile.fingerprint != fingerprint:
            raise InvalidKeys(f"{what}: header fingerprint does not match the PROF section (corrupted bytes)")
    steps = _check_steps(wire.load_json(grouped[b"STEP"][0], f"{what}: STEP section", InvalidKeys), profile,
                         InvalidKeys)
    if want_steps is not None and steps != want_steps:
        extra, missing = sorted(set(steps) - set(want_steps)), sorted(set(want_steps) - set(steps))
        raise InvalidKeys(f"{what}: rotation steps must be exactly the layout's {list(want_steps)} "
                          f"(extra {extra}, missing {missing}); generate keys with "
                          "ClientKeys.generate(layout.profile, layout.rotation_steps)")
    return profile, steps


def _summary(prof: Any) -> str:
    """A bounded description of a PROF section read from bytes, for error messages."""
    if isinstance(prof, dict):
        n, bits = prof.get("poly_modulus_degree"), prof.get("coeff_modulus_bits")
        return f"(N={n!r:.20}, primes {bits!r:.120})"
    return f"({type(prof).__name__}, not a profile object)"


@dataclass(frozen=True)
class PublicKeys:
    """A client's public material loaded on the server: deserialise once per session, reuse per request."""

    profile: CkksProfile
    rotation_steps: tuple[int, ...]
    galois_keys: Any = field(repr=False)  # seal.GaloisKeys
    nbytes: int
    public_key: Any = field(default=None, repr=False)  # seal.PublicKey (PUBK), for circuit-private replies

    @classmethod
    def from_bytes(cls, data: bytes, expected: LinearLayout | CkksProfile | None = None) -> "PublicKeys":
        """Parse and check a client's public bytes. A server passes the `layout` it serves: the profile and
        the rotation steps must then equal the layout's, and Galois keys may inflate only to the size of
        the layout's keys; anything else is refused before SEAL sees it. A `CkksProfile` fixes only the
        parameters; with neither, only built-in profiles are accepted."""
        kind, fingerprint, sections = wire.unpack(data, Kind.PUBLIC_KEYS, InvalidKeys)
        if kind == Kind.SECRET_KEYS or any(tag == b"SECK" for tag, _ in sections):
            raise InvalidKeys("these bytes carry a secret key, which must never leave the client; "
                              "send ClientKeys.public_bytes() instead and treat this key as compromised")
        if kind != Kind.PUBLIC_KEYS:
            raise InvalidKeys(f"expected public keys (ClientKeys.public_bytes()), got {wire.KIND_NAMES[kind]}")
        grouped = wire.section_map(sections, {b"PROF": (1, 1), b"STEP": (1, 1), b"GALK": (0, 1), b"PUBK": (0, 1)},
                                   "public keys", InvalidKeys)
        profile, steps = _read_profile_and_steps(grouped, fingerprint, "public keys", expected)
        galois_keys = seal.GaloisKeys()
        if steps:
            if b"GALK" not in grouped:
                raise InvalidKeys(f"public keys list rotation steps {list(steps)} but carry no Galois keys; "
                                  "send ClientKeys.public_bytes()")
            wire.seal_from_bytes(galois_keys, profile.context(), grouped[b"GALK"][0],
                                 galois_keys_max_bytes(profile, len(steps)), "Galois keys", InvalidKeys)
            n = profile.poly_modulus_degree
            missing = [s for s in steps if not galois_keys.has_key(galois_element(s, n))]
            if missing or galois_keys.size() != len(steps):
                raise InvalidKeys(f"Galois keys do not match the listed rotation steps {list(steps)} "
                                  f"(missing {missing}, {galois_keys.size()} keys present); regenerate them with "
                                  "ClientKeys.generate(profile, layer.rotation_steps)")
            zero = [s for s in steps if any(pk.data().is_transparent() for pk in galois_keys.key(galois_element(s, n)))]
            if zero:  # a real key's second polynomial is uniformly random, never zero
                raise InvalidKeys(f"Galois keys for rotation steps {zero} are zero (transparent) and rotate nothing; "
                                  "regenerate them with ClientKeys.generate(profile, layer.rotation_steps)")
        elif b"GALK" in grouped:
            raise InvalidKeys("public keys carry Galois keys but list no rotation steps")
        public_key = None
        if b"PUBK" in grouped:  # bounded by the expected profile, loaded only after every check above
            public_key = wire.seal_from_bytes(seal.PublicKey(), profile.context(), grouped[b"PUBK"][0],
                                              public_key_max_bytes(profile), "public key", InvalidKeys)
            if public_key.parms_id() != profile.context().key_parms_id():
                raise InvalidKeys("public key (PUBK) is not at the key level of the profile; "
                                  "send ClientKeys.public_bytes()")
            if public_key.data().is_transparent():  # a zero mask would leave replies un-re-randomised
                raise InvalidKeys("public key (PUBK) is zero (transparent) and re-randomises nothing; "
                                  "send ClientKeys.public_bytes()")
        return cls(profile, steps, galois_keys, len(data), public_key)

    def require(self, layout: LinearLayout) -> None:
        """Raise unless these keys were made for exactly `layout`'s profile and rotation steps."""
        if self.profile != layout.profile:
            raise ParameterMismatch(f"public keys use profile {self.profile.describe()} but the layer uses "
                                    f"{layout.profile.describe()}; generate keys with layer.layout.profile")
        missing = sorted(set(layout.rotation_steps) - set(self.rotation_steps))
        if missing:
            raise InvalidKeys(f"public keys lack Galois keys for rotation steps {missing}; generate them with "
                              "ClientKeys.generate(layout.profile, layer.rotation_steps)")
        extra = sorted(set(self.rotation_steps) - set(layout.rotation_steps))
        if extra:
            raise InvalidKeys(f"public keys carry Galois keys for rotation steps {extra} that the layer does not "
                              "use; generate them with ClientKeys.generate(layout.profile, layer.rotation_steps)")


def load_public_keys(data: bytes, expected: LinearLayout | CkksProfile | None = None) -> PublicKeys:
    return PublicKeys.from_bytes(data, expected)
