"""The layout's rules, checked on the source: datamodules/ imports nothing from lightning_modules/, and no
module calls another's private names; and each thing is done one way (slugs, byte table, sampling)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REAL_XSILO_HOME
from datamodules.cache import CacheKey, cache_dir_for, slug
from datamodules.tokens import token_bytes
from lightning_modules.generation import Sampling, pick_token
from lightning_modules.paired_stats import PairedStatsKey, paired_stats_dir

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "lightning_modules", "serve", "encrypted")


def imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in a file, function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def test_datamodules_import_nothing_from_lightning_modules():
    files = sorted((ROOT / "datamodules").glob("*.py"))
    assert len(files) > 5
    bad = [f"{f.name}:{line} imports {module}" for f in files for line, module, _ in imported_modules(f)
           if module.split(".")[0] == "lightning_modules"]
    assert not bad, bad


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    uses = []
    for line, module, names in imported_modules(path):
        if module.split(".")[0] not in PACKAGES:
            continue
        modules.add(module.split(".")[-1] if not names else "")
        uses += [f"{line}: from {module} import {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    for node in ast.walk(tree):  # module._name, and a.b._name on anything but self/cls
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id not in ("self", "cls") and (
                    base.id in modules or base.id[0].islower()):
                uses.append(f"{node.lineno}: {base.id}.{node.attr}")
    return uses


def test_no_module_calls_another_modules_private_names():
    bad = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if uses := _private_uses(path):
                bad[rel] = uses
    assert not bad, bad


# --- one slugifier: today's cache folder names are kept ------------------------------------------

def _slug_before(s: str, n: int) -> str:
    """The slugifier cache.py and tokens.py each carried before there was one."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(s).name)[:n] or "x"


@pytest.mark.parametrize("name", ["smollm2", "bbc-train", "movie-dialog:300+bbc:50", "movie-dialog:300,bbc:50",
                                  "/root/.cache/xsilo/public/_extra/1da68a81d0a35b3f.jsonl-train",
                                  "HuggingFaceTB/SmolLM2-135M", "café crème.csv-test", "", "///", "a" * 80,
                                  "C:\\data\\x.csv", "~/models/all-mpnet-base-v2"])
def test_the_one_slug_gives_todays_names(name):
    assert slug(name) == _slug_before(name, 40)
    assert slug(name, 30) == _slug_before(name, 30)


def test_slug_without_suffix_names_files_after_a_paths_stem():
    assert slug("/tmp/data/sms.csv", suffix=False) == "sms"
    assert slug("gemma-3.1", suffix=False) == "gemma-3.1"  # a registry name is kept whole
    assert slug("vader-movies", suffix=False) == "vader-movies"


def test_existing_caches_keep_their_folders():
    """Every finished cache under the real XSILO_HOME is found again where it lies (skipped when there is none)."""
    home, checked = Path(REAL_XSILO_HOME), 0
    for manifest in sorted(home.glob("states/*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("complete"):
            key = CacheKey(**m["key"])
            assert cache_dir_for(key, m["model"], f"{m['data']}-{m['split']}", home / "states") == manifest.parent
            checked += 1
    for manifest in sorted(home.glob("paired-positions/*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("complete"):
            key = PairedStatsKey(**{**m["key"], "model_identities": tuple(m["key"]["model_identities"])})
            names = (m["source"]["model"], m["target"]["model"])
            assert paired_stats_dir(key, names, m["data"], home / "paired-positions") == manifest.parent
            checked += 1
    if not checked:
        pytest.skip(f"no finished cache under {home}")


# --- transformers' GPT-2 byte table ------------------------------------------------------------

def _gpt2_table_before() -> dict[int, str]:
    """The byte table tokens.py wrote out by hand before it used transformers' `bytes_to_unicode`."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def test_byte_level_tokens_decode_every_byte_as_before():
    table = _gpt2_table_before()
    assert len(table) == 256
    for b, c in table.items():
        assert token_bytes(c, "byte_level") == bytes([b])
    word = "".join(table[b] for b in " naïve".encode())
    assert token_bytes(word, "byte_level") == " naïve".encode()


# --- transformers' logits warpers ----------------------------------------------------------------

def _pick_before(logits: torch.Tensor, allowed: torch.Tensor, s: Sampling, generator: torch.Generator) -> int:
    """The hand-written temperature / top-k / top-p sampler that transformers' warpers replaced."""
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[0]:
        kth = logits.topk(s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(0).cumsum(0)
        drop = cumulative - sorted_logits.softmax(0) >= s.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(0), 1, generator=generator))


@pytest.mark.parametrize("sampling", [Sampling(0.0), Sampling(1.0), Sampling(0.7, top_k=5), Sampling(1.3, top_p=0.9),
                                      Sampling(0.8, top_k=40, top_p=0.5), Sampling(2.0, top_k=1),
                                      Sampling(1.0, top_k=10_000, top_p=1.0)], ids=repr)
def test_seeded_samples_draw_the_same_tokens_as_before(sampling):
    rng = np.random.default_rng(0)
    vocab = 1000
    allowed = torch.from_numpy(rng.random(vocab) > 0.1)
    new_gen, old_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    new, old = [], []
    for _ in range(200):
        logits = torch.from_numpy(rng.normal(0, 3, vocab)).float()
        new.append(pick_token(logits, allowed, sampling, new_gen))
        old.append(_pick_before(logits, allowed, sampling, old_gen))
    assert new == old
    assert all(allowed[t] for t in new)
