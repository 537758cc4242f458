"""Token positions paired across tokenizers, and per-position paired final states.

Two causal LMs that tokenise the same text differently have both "read the same prefix" at
every character offset where a token of each ends. `text_boundaries` finds the offsets
where a token ends cleanly (not inside a character another token finishes, not a special
token); `pair_positions` matches them by offset. `paired_batches` runs both models on a
batch of texts and yields the final hidden states at paired positions;
`lightning_modules.fitting.paired_stats` streams those into sufficient statistics and caches them.

`tokenizer_compatibility` measures, before any fit, how well two tokenizers line up: boundary
match, the exact-token-match rate (the paper's predictor of generation success) and the
overlap of the normalised vocabularies.

Nothing depends on token indices: special tokens (BOS) are skipped, and only END offsets
are compared, so tokenizers whose offsets include a token's leading space pair like those
whose offsets do not.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from datamodules.assets import resolve_model
from datamodules.registry import AssetError
from datamodules.encoder import DTYPES, load_tokenizer
from datamodules.models import is_causal_lm, model_identity


# --- models ---------------------------------------------------------------------------

@dataclass(eq=False)
class CausalLM:
    """A causal LM with its fast tokenizer. `identity` keys caches (None: never cached)."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    identity: str | None = None

    def __post_init__(self) -> None:
        if self.model.get_output_embeddings() is None:
            raise AssetError(f"model {self.name!r} has no LM head; cross-model generation needs causal LMs "
                             "(AutoModelForCausalLM, e.g. smollm2 or gemma3)")
        if not getattr(self.tokenizer, "is_fast", False):
            raise AssetError(f"model {self.name!r} has a slow tokenizer; token pairing needs a fast one "
                             "(offset mappings): save the model with its tokenizer.json")

    @property
    def hidden_size(self) -> int:
        return self.head.in_features

    @cached_property
    def parameters(self) -> int:
        """Parameter count (tied weights once): the paper's size threshold is on this."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def device(self) -> torch.device:
        """Where the model's weights (and its forward pass) are."""
        return self.head.weight.device

    @property
    def head(self) -> torch.nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def eos_ids(self) -> set[int]:
        ids = getattr(self.model.config.get_text_config(), "eos_token_id", None)
        ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def spec(self) -> dict:
        return {"model": self.name, "model_identity": self.identity, "hidden_size": self.hidden_size,
                "layer": -1, "states": "final hidden state (the LM head's input) at every token position"}

    def encode(self, text: str) -> list[int]:
        """Token ids as the model reads a text (with its special tokens, e.g. BOS)."""
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    @torch.inference_mode()
    def states(self, input_ids: Tensor, attention_mask: Tensor | None = None, cache=None, use_cache: bool = True
               ) -> tuple[Tensor, object]:
        """Final hidden states (B, T, D) float32 on the CPU and the KV cache (on the model's device);
        lm_head(states) are the logits."""
        device = self.device
        mask = None if attention_mask is None else attention_mask.to(device)
        out = self.model.base_model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=use_cache,
                                    **{self._cache_argument: cache})
        return out.last_hidden_state.float().cpu(), getattr(out, self._cache_argument)

    @cached_property
    def _cache_argument(self) -> str:
        """The KV cache's name: `cache` in current transformers (5.x deprecates `past_key_values`)."""
        import inspect

        return "cache" if "cache" in inspect.signature(self.model.base_model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def logits(self, states: Tensor) -> Tensor:
        """The LM head's logits (float32, on the CPU) of states on any device."""
        head = self.head
        return head(states.to(head.weight.device, head.weight.dtype)).float().cpu()

    @cached_property
    def text_token_mask(self) -> Tensor:
        """Vocabulary ids a generator may emit: tokens that decode to whole text, plus EOS.

        Special tokens, and byte tokens that are only part of a character, are excluded: their
        text cannot be appended to a prompt and read back by another tokenizer.
        """
        n = self.head.out_features
        pieces = self.tokenizer.batch_decode([[i] for i in range(min(n, len(self.tokenizer)))],
                                             skip_special_tokens=True, clean_up_tokenization_spaces=False)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[:len(pieces)] = torch.tensor([bool(p) and "\ufffd" not in p for p in pieces])
        for i in self.eos_ids:
            if i < n:
                mask[i] = True
        return mask


def load_causal_lm(name: str, dtype: str = "float32", device: str = "cpu") -> CausalLM:
    """Load a registry name, folder or hub id as a causal LM (weights in `dtype`, on `device`: cpu, cuda, mps)
    with a clear error for anything else."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in DTYPES:
        raise AssetError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    path = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise AssetError(f"cannot read a model config from {name!r}: {e}") from e
    if not is_causal_lm(config):
        archs = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise AssetError(f"model {name!r} ({archs}) is not a causal LM with an LM head; cross-model "
                         "generation needs two causal LMs, e.g. --source smollm2 --target gemma3")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval().requires_grad_(False)
    return CausalLM(model, load_tokenizer(path), name, model_identity(path))


# --- boundaries and pairing -------------------------------------------------------------

def text_boundaries(offsets: Sequence[tuple[int, int]], special: Sequence[int] | None = None
                    ) -> dict[int, int]:
    """{end character offset: token position} for tokens that end a clean text prefix.

    Skipped: special tokens and empty spans (BOS has (0, 0)); a token whose end lies inside a
    later token's span (a byte-level token holding part of a multi-byte character ends where
    the next token, which finishes the character, ends as well).
    """
    special = special or [0] * len(offsets)
    spans = [(p, s, e) for p, ((s, e), sp) in enumerate(zip(offsets, special)) if not sp and e > s]
    out: dict[int, int] = {}
    last_end = 0
    for k, (pos, _, end) in enumerate(spans):
        if (k + 1 < len(spans) and spans[k + 1][1] < end) or end <= last_end:
            continue
        out[end], last_end = pos, end
    return out


def pair_positions(source: dict[int, int], target: dict[int, int]) -> tuple[list[int], list[int]]:
    """(source positions, target positions) at the end offsets both share, in text order."""
    shared = sorted(source.keys() & target.keys())
    return [source[e] for e in shared], [target[e] for e in shared]


def whole_token_spans(boundaries: dict[int, int], first_text_position: int) -> dict[int, int]:
    """{end offset: start offset} of the boundaries that close exactly one token.

    A token's span runs from the previous clean boundary (0 for the first) to its own end, so a
    leading space counts with the token whichever way a tokenizer reports offsets. A boundary
    that closes several tokens (the bytes of one character) has no whole-token span.
    """
    spans: dict[int, int] = {}
    prev_end, prev_pos = 0, first_text_position - 1
    for end in sorted(boundaries):
        pos = boundaries[end]
        if pos == prev_pos + 1:
            spans[end] = prev_end
        prev_end, prev_pos = end, pos
    return spans


@dataclass
class TokenizedText:
    """One text as one model reads it: ids (truncated to max_length), its clean boundaries and the
    spans of the boundaries that close one whole token."""

    ids: list[int]
    boundaries: dict[int, int]  # end offset -> position, positions < len(ids) only
    spans: dict[int, int] = field(default_factory=dict)  # end offset -> start offset (`whole_token_spans`)


def tokenized_from_offsets(ids: Sequence[int], offsets: Sequence[tuple[int, int]], special: Sequence[int],
                           max_length: int) -> TokenizedText:
    """A `TokenizedText` from a full tokenisation's ids, offsets and special-token mask, truncated."""
    ids = list(ids)[:max_length]
    bounds = {e: p for e, p in text_boundaries(offsets, special).items() if p < len(ids)}
    first = next((p for p, ((s, e), sp) in enumerate(zip(offsets, special)) if not sp and e > s), 0)
    return TokenizedText(ids, bounds, whole_token_spans(bounds, first))


def tokenize_text(tokenizer, text: str, max_length: int) -> TokenizedText:
    """Tokenise in full (so the boundary test sees the token after the cut), then truncate."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    return tokenized_from_offsets(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], max_length)


# --- vocabulary overlap ------------------------------------------------------------------

@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte table: byte-level BPE characters back to bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_scheme(tokenizer) -> str:
    """How vocabulary strings spell text: byte_level (Ġ), metaspace (▁) or plain."""
    try:
        decoder = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"), ensure_ascii=False)
    except (AttributeError, ValueError):
        decoder = ""
    if '"ByteLevel"' in decoder:
        return "byte_level"
    if "\u2581" in decoder or '"Metaspace"' in decoder:
        return "metaspace"
    return "plain"


def token_bytes(token: str, scheme: str) -> bytes:
    """A vocabulary string as the bytes of text it stands for (Ġ and ▁ become a space)."""
    if scheme == "byte_level":
        table = _byte_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
    if scheme == "metaspace":
        match = _BYTE_TOKEN.fullmatch(token)
        if match:
            return bytes([int(match.group(1), 16)])
        token = token.replace("\u2581", " ")
    return token.encode("utf-8")


def normalised_vocabulary(tokenizer) -> set[bytes]:
    scheme = token_scheme(tokenizer)
    special = set(tokenizer.all_special_tokens)
    return {token_bytes(t, scheme) for t in tokenizer.get_vocab() if t not in special}


@dataclass
class TokenizerCompatibility:
    """How well two tokenizers line up, measured before anything is fitted.

    Token positions are clean token ends (`text_boundaries`); the aligned (paired) positions are
    the end offsets both tokenizers share: the rows the generation map is fitted on.

    The exact-token-match rate (the paper's predictor of generation success, r = 0.898; pairs
    that work have >= 0.67) is read here as: of the aligned positions, the share where source
    and target each read one whole token over the very same character span -- the same
    token string, up to how each vocabulary spells a space (`whole_token_spans`). It is
    `exact_token_match`; `source_exact_match` and `target_exact_match` divide the same count by
    each side's token positions instead (the share of all of its tokens the other also has).
    """

    source_boundaries: int = 0
    target_boundaries: int = 0
    matched_boundaries: int = 0
    exact_tokens: int = 0
    texts: int = 0
    source_vocab: int = 0
    target_vocab: int = 0
    shared_vocab: int = 0

    @property
    def source_boundary_match(self) -> float:
        """Fraction of the source's token end offsets that the target also has."""
        return self.matched_boundaries / max(self.source_boundaries, 1)

    @property
    def target_boundary_match(self) -> float:
        return self.matched_boundaries / max(self.target_boundaries, 1)

    @property
    def exact_token_match(self) -> float:
        """Share of aligned positions where both read one identical token (0 when none align)."""
        return self.exact_tokens / max(self.matched_boundaries, 1)

    @property
    def source_exact_match(self) -> float:
        return self.exact_tokens / max(self.source_boundaries, 1)

    @property
    def target_exact_match(self) -> float:
        return self.exact_tokens / max(self.target_boundaries, 1)

    @property
    def vocab_jaccard(self) -> float:
        return self.shared_vocab / max(self.source_vocab + self.target_vocab - self.shared_vocab, 1)

    @property
    def source_vocab_shared(self) -> float:
        return self.shared_vocab / max(self.source_vocab, 1)

    def add(self, source: TokenizedText, target: TokenizedText) -> None:
        self.texts += 1
        self.source_boundaries += len(source.boundaries)
        self.target_boundaries += len(target.boundaries)
        self.matched_boundaries += len(source.boundaries.keys() & target.boundaries.keys())
        self.exact_tokens += sum(1 for end, start in source.spans.items() if target.spans.get(end) == start)

    def as_dict(self) -> dict:
        return {**asdict(self), "source_boundary_match": self.source_boundary_match,
                "target_boundary_match": self.target_boundary_match, "exact_token_match": self.exact_token_match,
                "source_exact_match": self.source_exact_match, "target_exact_match": self.target_exact_match,
                "vocab_jaccard": self.vocab_jaccard,
                "source_vocab_shared": self.source_vocab_shared}


def tokenizer_compatibility(source_tokenizer, target_tokenizer, texts: Sequence[str], max_length: int
                            ) -> TokenizerCompatibility:
    """Boundary and exact-token match over `texts`, and the overlap of the normalised vocabularies."""
    src_vocab, tgt_vocab = normalised_vocabulary(source_tokenizer), normalised_vocabulary(target_tokenizer)
    report = TokenizerCompatibility(source_vocab=len(src_vocab), target_vocab=len(tgt_vocab),
                                    shared_vocab=len(src_vocab & tgt_vocab))
    for text in texts:
        report.add(tokenize_text(source_tokenizer, text, max_length),
                   tokenize_text(target_tokenizer, text, max_length))
    return report


# --- paired per-position states ------------------------------------------------------------

@dataclass
class PairedBatch:
    """Final states at paired positions of a batch of texts: row r of x and y read one prefix."""

    x: Tensor  # (m, d_source) float32
    y: Tensor  # (m, d_target) float32
    text: Tensor  # (m,) index of each row's text in the batch
    source_tokens: int
    target_tokens: int


def _pad_right(seqs: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right padding: a causal LM's states at real positions do not depend on it."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _final_states(lm: CausalLM, seqs: list[list[int]]) -> Tensor:
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids, mask = _pad_right(seqs, pad)
    return lm.states(ids, mask, use_cache=False)[0]


def paired_batches(source: CausalLM, target: CausalLM, texts: Sequence[str], max_length: int,
                   batch_size: int = 16) -> Iterator[PairedBatch]:
    """Run both models over `texts` and yield states at paired positions.

    Batches group texts of similar length (less padding); `PairedBatch.text` keeps each row's
    index into `texts`.
    """
    if max_length <= 0:
        raise AssetError(f"max_length must be a positive number of tokens, got {max_length}")
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        src = [tokenize_text(source.tokenizer, texts[i], max_length) for i in chunk]
        tgt = [tokenize_text(target.tokenizer, texts[i], max_length) for i in chunk]
        keep = [k for k, (s, t) in enumerate(zip(src, tgt)) if s.ids and t.ids]
        if not keep:
            continue
        hs = _final_states(source, [src[k].ids for k in keep])
        ht = _final_states(target, [tgt[k].ids for k in keep])
        xs, ys, rows = [], [], []
        for b, k in enumerate(keep):
            sp, tp = pair_positions(src[k].boundaries, tgt[k].boundaries)
            xs.append(hs[b, sp])
            ys.append(ht[b, tp])
            rows.append(torch.full((len(sp),), chunk[k], dtype=torch.long))
        yield PairedBatch(torch.cat(xs), torch.cat(ys), torch.cat(rows),
                          sum(len(src[k].ids) for k in keep), sum(len(tgt[k].ids) for k in keep))


def split_texts(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded text-level split: positions of one text never straddle train and held-out."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise AssetError(f"val_fraction + test_fraction must be in [0, 1), got {val_fraction} + {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n - n_val - n_test < 1 or (val_fraction > 0 and n_val < 1):
        raise AssetError(f"{n} texts are too few for val_fraction={val_fraction}, test_fraction={test_fraction}; "
                         "use more texts (raise the limit)")
    return {"train": np.sort(order[n_val + n_test:]), "val": np.sort(order[:n_val]),
            "test": np.sort(order[n_val:n_val + n_test])}
