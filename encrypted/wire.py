"""Byte formats: a small versioned container around SEAL blobs, and SEAL save/load with validation.

Container (little-endian)::

    offset  size  field
    0       4     magic b"XSHE"
    4       1     format version (1)
    5       1     kind: 1 public keys, 2 secret keys, 3 query, 4 reply, 5 fit chunk, 6 fit key, 7 fit result
    6       2     section count
    8       32    profile fingerprint (CkksProfile.fingerprint; a private fit's messages: GramPlan.fingerprint)
    40      ...   sections, each: tag (4 ASCII bytes), payload length (u32), payload

Tags: PROF (profile JSON), STEP (rotation steps JSON), META (JSON), GALK (SEAL Galois keys),
PUBK (SEAL public key), SECK (SEAL secret key), CTXT (SEAL ciphertext; a reply has one per output block).
A private fit's messages (`encrypted.gram_wire`) carry SEED (32 bytes) and packed integers: BODY (a chunk), PKEY
(a fit key), CT_0 and CT_1 (a fit result).

Bounds, checked before any parser or SEAL sees a section: at most MAX_SECTIONS sections (or the fewer a reader
expects, e.g. a fit chunk's groups + 1); a JSON section
holds at most MAX_JSON_BYTES bytes nested at most MAX_JSON_DEPTH levels (strict JSON: no NaN/Infinity,
no repeated keys); a SEAL blob may inflate only to the size its expected parameters allow (zlib and zstd
streams are measured from their headers, zstd windows and declared content sizes included).
"""
from __future__ import annotations

import atexit
import enum
import itertools
import json
import os
import shutil
import struct
import tempfile
import threading
import zlib
from typing import Any

MAGIC = b"XSHE"
FORMAT_VERSION = 1
HEADER = struct.Struct("<4sBBH32s")
SECTION = struct.Struct("<4sI")
MAX_SECTIONS = 64
MAX_JSON_BYTES = 4096  # PROF, STEP and META are each well under 1 kB
MAX_JSON_DEPTH = 4  # PROF nests 2 levels ({"coeff_modulus_bits": [...]}), STEP and META 1


class Kind(enum.IntEnum):
    PUBLIC_KEYS = 1
    SECRET_KEYS = 2
    QUERY = 3
    REPLY = 4
    CHUNK = 5
    FIT_KEY = 6
    FIT_RESULT = 7


KIND_NAMES = {Kind.PUBLIC_KEYS: "public keys", Kind.SECRET_KEYS: "secret keys", Kind.QUERY: "query",
              Kind.REPLY: "reply", Kind.CHUNK: "fit chunk", Kind.FIT_KEY: "fit key", Kind.FIT_RESULT: "fit result"}
FIX_HINTS = {
    Kind.PUBLIC_KEYS: "send the bytes of ClientKeys.public_bytes()",
    Kind.SECRET_KEYS: "load the bytes that ClientKeys.to_bytes() wrote",
    Kind.QUERY: "send the bytes that encrypted.encrypt(keys, layout, X) returns",
    Kind.REPLY: "pass the bytes that EncryptedLinear.apply returned",
    Kind.CHUNK: "send the bytes that encrypted.encrypt_chunk(keys, plan, part, chunk, Z) returns (or a fit chunk "
                "as docs/protocol.md section 6 defines it)",
    Kind.FIT_KEY: "send the bytes of FitKeys.public_bytes() for the plan the server published (docs/protocol.md "
                  "section 6)",
    Kind.FIT_RESULT: "pass the bytes that GramAccumulator.results returned, for this plan and part",
}


def pack(kind: Kind, fingerprint: bytes, sections: list[tuple[bytes, bytes]]) -> bytes:
    parts = [HEADER.pack(MAGIC, FORMAT_VERSION, int(kind), len(sections), fingerprint)]
    for tag, payload in sections:
        parts.append(SECTION.pack(tag, len(payload)))
        parts.append(payload)
    return b"".join(parts)


def unpack(data: Any, kind: Kind, error: type[Exception],
           max_sections: int = MAX_SECTIONS) -> tuple[Kind, bytes, list[tuple[bytes, memoryview]]]:
    """Split a container into (kind, fingerprint, sections); raise `error` naming the problem and the fix.

    `max_sections` lowers (or, for a fit chunk of many groups, raises) the section bound for this read."""
    what, fix = KIND_NAMES[kind], FIX_HINTS[kind]
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise error(f"{what} must be bytes, got {type(data).__name__}; {fix}")
    try:
        view = memoryview(data).cast("B")
    except TypeError:  # a non-contiguous view
        raise error(f"{what} must be contiguous bytes; {fix}") from None
    if len(view) < HEADER.size:
        raise error(f"{what} is truncated: {len(view)} bytes, shorter than the {HEADER.size}-byte header; {fix}")
    magic, version, got_kind, count, fingerprint = HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise error(f"{what} does not start with the xsilo magic {MAGIC!r} (got {bytes(magic)!r}); {fix}")
    if version != FORMAT_VERSION:
        raise error(f"{what} has container version {version}, this code reads version {FORMAT_VERSION}; "
                    "upgrade the older side so both speak the same version")
    try:
        got_kind = Kind(got_kind)
    except ValueError:
        raise error(f"{what} has unknown kind byte {got_kind}; {fix}") from None
    if count > max_sections:
        raise error(f"{what} declares {count} sections (at most {max_sections}); {fix}")
    sections = []
    pos = HEADER.size
    for i in range(count):
        if pos + SECTION.size > len(view):
            raise error(f"{what} is truncated in the header of section {i + 1} of {count}; {fix}")
        tag, length = SECTION.unpack_from(view, pos)
        pos += SECTION.size
        if pos + length > len(view):
            raise error(f"{what} is truncated: section {bytes(tag)!r} declares {length} bytes, "
                        f"{len(view) - pos} remain; {fix}")
        sections.append((bytes(tag), view[pos:pos + length]))
        pos += length
    if pos != len(view):
        raise error(f"{what} has {len(view) - pos} trailing bytes after its last section; {fix}")
    return got_kind, bytes(fingerprint), sections


def section_map(sections: list[tuple[bytes, memoryview]], allowed: dict[bytes, tuple[int, int]],
                what: str, error: type[Exception]) -> dict[bytes, list[memoryview]]:
    """Group sections by tag; `allowed` maps tag -> (min count, max count). Unknown tags are refused."""
    grouped: dict[bytes, list[memoryview]] = {}
    for tag, payload in sections:
        if tag not in allowed:
            raise error(f"{what} carries an unexpected section {tag!r}; allowed: {sorted(allowed)}")
        grouped.setdefault(tag, []).append(payload)
    for tag, (lo, hi) in allowed.items():
        n = len(grouped.get(tag, []))
        if not lo <= n <= hi:
            raise error(f"{what} has {n} {tag!r} sections, expected between {lo} and {hi}")
    return grouped


def open_container(data: Any, kind: Kind, fingerprint: bytes, tags: dict[bytes, tuple[int, int]],
                   error: type[Exception], mismatch: type[Exception], mismatch_message: str,
                   max_sections: int = MAX_SECTIONS) -> tuple[dict, dict[bytes, list[memoryview]]]:
    """A message of `kind`: its container, kind, fingerprint (`mismatch(mismatch_message)` when not
    `fingerprint`), sections (`tags`, as `section_map` takes them) and META, a JSON object; (META, sections)."""
    what, fix = KIND_NAMES[kind], FIX_HINTS[kind]
    got_kind, got_fingerprint, sections = unpack(data, kind, error, max_sections=max_sections)
    if got_kind != kind:
        raise error(f"expected a {what}, got {KIND_NAMES[got_kind]}; {fix}")
    if got_fingerprint != fingerprint:
        raise mismatch(mismatch_message)
    grouped = section_map(sections, tags, what, error)
    meta = load_json(grouped[b"META"][0], what, error)
    if not isinstance(meta, dict):
        raise error(f"{what}: META section must be a JSON object; {fix}")
    return meta, grouped


def dump_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _json_depth(payload: bytes) -> int:
    """Deepest nesting of arrays and objects in JSON text, counted outside strings, in one pass."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in payload:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} overflows a float")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("an object repeats a key")
    return obj


def load_json(payload: memoryview, what: str, error: type[Exception]) -> Any:
    """Parse a JSON section, bounded in size and nesting depth before the parser runs (no recursion errors)."""
    if len(payload) > MAX_JSON_BYTES:
        raise error(f"{what}: JSON section of {len(payload)} bytes exceeds {MAX_JSON_BYTES}; "
                    "the bytes are corrupt or were not made by this library")
    text = bytes(payload)
    # the bracket count bounds the depth, so only a payload with many brackets needs the scan
    if text.count(b"[") + text.count(b"{") > MAX_JSON_DEPTH and (depth := _json_depth(text)) > MAX_JSON_DEPTH:
        raise error(f"{what}: JSON section nests arrays/objects {depth} levels deep, at most {MAX_JSON_DEPTH} "
                    "are allowed; the bytes are corrupt or were not made by this library")
    try:
        return json.loads(text.decode("utf-8"), parse_constant=_no_constants, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{what}: JSON section is malformed ({str(exc)[:200]})") from None


# --- SEAL blobs -------------------------------------------------------------------------------------

SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, reserved, total size
SEAL_MAGIC = 0xA15E
ZSTD_MAGIC = 0xFD2FB528
ZSTD_MAX_BLOCK = 128 * 1024


def _zstd_output_bound(data: memoryview, limit: int) -> int:
    """Upper bound of what a zstd stream decompresses to, from its frame and block headers alone.

    SEAL inflates into a growing buffer, so a tiny hostile stream could otherwise ask for gigabytes.
    """
    pos, total = 0, 0

    def need(n: int) -> None:
        if pos + n > len(data):
            raise ValueError("zstd stream is truncated")

    while pos < len(data):
        need(4)
        magic = int.from_bytes(data[pos:pos + 4], "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
            need(8)
            pos += 8 + int.from_bytes(data[pos + 4:pos + 8], "little")
            continue
        if magic != ZSTD_MAGIC:
            raise ValueError("bad zstd frame magic")
        pos += 4
        need(1)
        descriptor = data[pos]
        pos += 1
        if descriptor & 0x08:
            raise ValueError("zstd reserved bit set")
        single_segment = (descriptor >> 5) & 1
        fcs_size = (single_segment, 2, 4, 8)[descriptor >> 6]
        need((0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3] + fcs_size)
        if not single_segment:  # the decoder allocates the declared window up front
            exponent, mantissa = data[pos] >> 3, data[pos] & 7
            window = (1 << (10 + exponent)) + ((1 << (10 + exponent)) >> 3) * mantissa
            if window > 2 * limit:
                raise ValueError(f"zstd window of {window} bytes exceeds {2 * limit}")
            pos += 1
        pos += (0, 1, 2, 4)[descriptor & 3]
        if fcs_size:
            content = int.from_bytes(data[pos:pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
            if content > limit:
                raise ValueError(f"zstd frame declares {content} bytes, beyond {limit}")
        pos += fcs_size
        while True:
            need(3)
            header = int.from_bytes(data[pos:pos + 3], "little")
            pos += 3
            block_type, block_size = (header >> 1) & 3, header >> 3
            if block_type == 0:
                total, pos = total + block_size, pos + block_size
            elif block_type == 1:
                total, pos = total + block_size, pos + 1
            elif block_type == 2:
                total, pos = total + ZSTD_MAX_BLOCK, pos + block_size
            else:
                raise ValueError("reserved zstd block type")
            if block_size > ZSTD_MAX_BLOCK or total > limit:
                raise ValueError(f"zstd stream would inflate beyond {limit} bytes")
            if header & 1:
                break
        if (descriptor >> 2) & 1:
            pos += 4
    if pos != len(data):
        raise ValueError("zstd stream is truncated")
    return total


def check_seal_blob(blob: memoryview, max_raw_bytes: int, what: str, error: type[Exception]) -> None:
    """Validate a SEAL blob's header and bound its decompressed size before SEAL touches it."""
    if len(blob) < SEAL_HEADER.size:
        raise error(f"{what}: SEAL blob is truncated ({len(blob)} bytes)")
    magic, header_size, major, _minor, compression, _reserved, size = SEAL_HEADER.unpack_from(blob, 0)
    if magic != SEAL_MAGIC or header_size != SEAL_HEADER.size:
        raise error(f"{what}: not a SEAL object (bad SEAL header)")
    if major != 4:
        raise error(f"{what}: SEAL format version {major}.x, expected 4.x; both sides must use TenSEAL 0.3.x")
    if size != len(blob):
        raise error(f"{what}: SEAL header declares {size} bytes but {len(blob)} are present (truncated or padded)")
    body = blob[SEAL_HEADER.size:]
    try:
        if compression == 0:
            raw = len(body)
        elif compression == 1:
            inflater = zlib.decompressobj()
            raw = len(inflater.decompress(bytes(body), max_raw_bytes + 1))
            if raw > max_raw_bytes or not inflater.eof:
                raise ValueError(f"zlib stream would inflate beyond {max_raw_bytes} bytes or is truncated")
        elif compression == 2:
            # a compressed block counts as a full 128 KiB, so allow one block of slack over the real bound
            _zstd_output_bound(body, max_raw_bytes + ZSTD_MAX_BLOCK)
            raw = 0
        else:
            raise ValueError(f"unknown compression mode {compression}")
    except (ValueError, zlib.error) as exc:
        raise error(f"{what}: {exc}; the bytes are corrupt or were not made by this library") from None
    if raw > max_raw_bytes:
        raise error(f"{what}: SEAL object of {raw} bytes exceeds the {max_raw_bytes} bytes these parameters allow; "
                    "the bytes are corrupt or were made for other parameters")


_tmp_dir: str | None = None
_tmp_lock = threading.Lock()
_counter = itertools.count()


def scratch_dir() -> str:
    """This process's private (0700) scratch directory, on tmpfs when there is one, made on first use and
    removed at exit: sealapi saves and loads only files."""
    global _tmp_dir
    with _tmp_lock:
        if _tmp_dir is None or not os.path.isdir(_tmp_dir):
            base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            _tmp_dir = tempfile.mkdtemp(prefix="xsilo-he-", dir=base)
            atexit.register(shutil.rmtree, _tmp_dir, True)
        return _tmp_dir


def _scratch_path() -> str:
    """A fresh file path in `scratch_dir()`."""
    return os.path.join(scratch_dir(), f"{os.getpid()}-{threading.get_ident()}-{next(_counter)}.bin")


def seal_to_bytes(obj: Any) -> bytes:
    """Serialise a SEAL object (or a seeded Serializable) to bytes."""
    path = _scratch_path()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def seal_from_bytes(obj: Any, context: Any, blob: memoryview, max_raw_bytes: int, what: str,
                    error: type[Exception]) -> Any:
    """Load `blob` into the empty SEAL object `obj`; any failure becomes `error`, never a SEAL exception."""
    check_seal_blob(blob, max_raw_bytes, what, error)
    path = _scratch_path()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        obj.load(context, path)
    except Exception as exc:  # SEAL raises RuntimeError/ValueError for data it rejects
        raise error(f"{what}: SEAL rejected the data ({exc}); it is corrupt or made with other parameters") from None
    finally:
        os.unlink(path)
    return obj
