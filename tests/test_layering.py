"""The layout's rules, checked on the source of a fresh clone (no cache, no model):

- floors, bottom up: `encrypted` imports nothing of ours; `serve.formats` is torch-free and imports only
  `encrypted`; `datamodules` imports nothing of `lightning_modules` and of `serve` only `serve.formats`; `serve`
  imports nothing of `lightning_modules`;
- importing `serve.server` or any serve client module loads no torch, lightning or transformers;
- no import cycle between files (a package's `__init__` is its API, not a file of a cycle);
- no module over 450 lines, the console-script module at most 200, at most 8 modules directly in lightning_modules/;
- no module calls another's private names; and each thing is done one way (slugs, byte table, sampling).

Imports under `if TYPE_CHECKING:` are not imports; those inside functions are.
"""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.cache import CacheKey, cache_dir_for, slug
from datamodules.tokens import token_bytes
from lightning_modules.fitting.paired_stats import PairedStatsKey, paired_stats_dir
from lightning_modules.generation.sampling import Sampling, pick_token

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "lightning_modules", "serve", "encrypted")
HEAVY = ("torch", "lightning", "transformers")
MAX_LINES, MAX_CLI_LINES, MAX_FLAT_MODULES = 450, 200, 8


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
           if "__pycache__" not in p.parts}
INITS = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def owning_module(name: str) -> str | None:
    """The module of ours a dotted name lands in (`serve.formats.digests.sha256_file` -> serve.formats.digests)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every import in a file, function-level ones included, relative ones
    resolved, those under `if TYPE_CHECKING:` left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                 for n in ast.walk(node)}
    me = module_name(path) if path.is_relative_to(ROOT) else ""
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            found.append((node.lineno, base, [a.name for a in node.names]))
    return found


def our_imports(module: str) -> set[str]:
    """The modules of ours that `module` imports (a `from package import name` counts the submodule `name`)."""
    out = set()
    for _, base, names in imported_modules(MODULES[module]):
        if base.split(".")[0] not in PACKAGES:
            continue
        for name in [base, *(f"{base}.{n}" for n in names)]:
            if (target := owning_module(name)) and target != module:
                out.add(target)
    return out


GRAPH = {m: our_imports(m) for m in MODULES}


def floor_breaks(allowed) -> list[str]:
    """Every `module -> imported` edge of ours that `allowed(module, imported)` refuses."""
    return sorted(f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps if not allowed(m, d))


def top(module: str) -> str:
    return module.split(".")[0]


def is_formats(module: str) -> bool:
    return module == "serve.formats" or module.startswith("serve.formats.")


# --- floors ------------------------------------------------------------------------------------------

def test_the_rules_see_every_package_and_its_imports():
    assert {top(m) for m in MODULES} == set(PACKAGES)
    assert "encrypted.keys" in GRAPH["encrypted"] and "datamodules.cache" in GRAPH["datamodules.extraction"]


def test_encrypted_imports_nothing_of_ours():
    assert not floor_breaks(lambda m, d: top(m) != "encrypted" or top(d) == "encrypted")


def test_serve_formats_imports_only_encrypted_and_itself():
    assert any(is_formats(m) for m in MODULES), "serve/formats/ is the bottom floor of the formats"
    assert not floor_breaks(lambda m, d: not is_formats(m) or is_formats(d) or top(d) == "encrypted")


def test_serve_formats_is_torch_free():
    heavy = [f"{m}:{line} imports {base}" for m, path in MODULES.items() if is_formats(m)
             for line, base, _ in imported_modules(path) if base.split(".")[0] in HEAVY]
    assert not heavy, heavy
    formats = sorted(m for m in MODULES if is_formats(m))
    assert loaded_by_importing(formats) == []


def test_datamodules_import_nothing_of_lightning_modules_and_of_serve_only_its_formats():
    assert not floor_breaks(lambda m, d: top(m) != "datamodules" or top(d) in ("datamodules", "encrypted")
                            or is_formats(d))


def test_serve_imports_nothing_of_lightning_modules():
    assert not floor_breaks(lambda m, d: top(m) != "serve" or top(d) != "lightning_modules")


def loaded_by_importing(modules: list[str]) -> list[str]:
    """The heavy libraries loaded after importing `modules` in a fresh interpreter."""
    code = (f"import sys\nfor m in {modules!r}:\n    __import__(m)\n"
            f"print(sorted(x for x in {HEAVY!r} if x in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1].replace("'", '"'))


def test_the_server_and_every_client_load_no_torch():
    clients = sorted(m for m in MODULES if top(m) == "serve" and "client" in m.rpartition(".")[2])
    assert clients, "serve holds the clients"
    assert loaded_by_importing(["serve.server", *clients]) == []


def test_no_import_cycle_between_files():
    files = {m: {d for d in deps if d not in INITS} for m, deps in GRAPH.items() if m not in INITS}
    try:
        graphlib.TopologicalSorter(files).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


# --- sizes -------------------------------------------------------------------------------------------

def test_no_module_over_450_lines():
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in MODULES.items()}
    over = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_the_console_script_module_is_a_short_table():
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["xsilo"]
    module = script.split(":")[0]
    assert module in MODULES, script
    lines = len(MODULES[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_CLI_LINES, f"the console script's module {module} has {lines} lines"


def test_lightning_modules_holds_at_most_eight_modules_directly():
    flat = sorted(p.name for p in (ROOT / "lightning_modules").glob("*.py") if p.name != "__init__.py")
    assert len(flat) <= MAX_FLAT_MODULES, flat


# --- private names -----------------------------------------------------------------------------------

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


# Cache folder names, pinned: a change to the slug or to a key's fingerprint orphans every cache on every machine.
# The first is the folder of the study's MiniLM BBC states (1500 rows, max_length 48) as it lies in a home today.
MINILM_BBC = CacheKey(model_identity="2d15eae02f2da942f522bae665d8bdff3cbea51ff4f4dfa3cd5cd42b0e3ac113",
                      dataset_fingerprint="2e9a27887fe2a40d1e777c906e5034f1b578f1bb8a6e3bda63d1acc446cc3954",
                      split="train", pooling="mean", layer=-1, max_length=48, dtype="float32")


def test_existing_caches_keep_their_folders(tmp_path):
    assert cache_dir_for(MINILM_BBC, "minilm", "bbc-train", tmp_path) == tmp_path / "minilm--bbc-train--5fbd4d918e3711c26731"
    other = CacheKey(model_identity="a" * 64, dataset_fingerprint="b" * 64, split="test", pooling="last", layer=-2,
                     max_length=128, dtype="bfloat16")
    assert cache_dir_for(other, "/models/HuggingFaceTB/SmolLM2-135M", "/data/my tasks/café.csv-test", tmp_path).name \
        == "SmolLM2-135M--café.csv-test--4767de0f9210b0aceba4"
    paired = PairedStatsKey(model_identities=("a" * 64, "c" * 64), dataset_fingerprint="d" * 64, max_length=64,
                            limit=2000, val_fraction=0.15, test_fraction=0.15, seed=0)
    assert paired_stats_dir(paired, ("smollm2", "gemma3"), "movie-dialog", tmp_path).name \
        == "smollm2--gemma3--movie-dialog--80d0b90ea7b340ea99c0"


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
