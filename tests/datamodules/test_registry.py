"""The asset registry: package data, a user's registry file on top, one schema, one-line errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules import assets
from datamodules.assets import is_prepared, model_dir, resolve_model, use_registry
from datamodules.registry import (READER_NAMES, AssetError, DataFiles, builtin_registry, get_asset, load_registry,
                                  parse_registry, xsilo_home)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_user_registry(monkeypatch):
    monkeypatch.delenv("XSILO_REGISTRY", raising=False)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_builtin_registry_is_package_data_and_configs_is_lightning_only():
    assert (ROOT / "datamodules" / "registry.yaml").is_file()
    assert not (ROOT / "configs" / "registry.yaml").exists()
    registry = builtin_registry()
    assert {"minilm", "smollm2", "gemma3", "bbc", "movie-dialog"} <= set(registry)
    assert all(a.is_builtin and a.packages for a in registry.values())
    gemma = registry["gemma3"]
    assert gemma.gguf == "gemma-3-270m-q4_k_m.gguf" and len(gemma.parts) == 4 and gemma.sha256sums


def test_reader_names_match_the_readers_of_text():
    from datamodules.text import READERS

    assert set(READERS) == set(READER_NAMES)


def test_user_registry_adds_and_overrides_entries(tmp_path, monkeypatch):
    write(tmp_path / "data" / "sms.csv", "message,spam\nhello,0\nwin cash,1\n")
    (tmp_path / "my-model").mkdir()
    registry_file = write(tmp_path / "mine.yaml", """
models:
  minilm:                       # overrides the built-in entry by name
    folder: my-model
    description: my own MiniLM checkpoint
datasets:
  sms:
    file: data/sms.csv
    text_column: message
    label_column: spam
""")
    assert "sms" not in load_registry()
    monkeypatch.setenv("XSILO_REGISTRY", str(registry_file))
    registry = load_registry()
    assert set(builtin_registry()) | {"sms"} == set(registry)
    assert registry["minilm"].origin == str(registry_file.resolve()) and not registry["minilm"].packages
    assert model_dir("minilm") == (tmp_path / "my-model").resolve() and is_prepared("minilm")
    assert resolve_model("minilm") == str((tmp_path / "my-model").resolve())
    assert get_asset("sms", "dataset").data_files() == DataFiles(
        files={"train": (tmp_path / "data" / "sms.csv").resolve()}, format="csv", text_column="message",
        label_column="spam")
    assert is_prepared("sms")


def test_use_registry_reaches_child_processes(tmp_path, monkeypatch):
    write(tmp_path / "t.jsonl", '{"text": "a", "label": "x"}\n')
    registry_file = write(tmp_path / "r.yaml", "datasets:\n  mine:\n    file: t.jsonl\n")
    monkeypatch.setenv("XSILO_REGISTRY", "")  # set, so monkeypatch restores it after use_registry
    assert "mine" in use_registry(registry_file)
    assert os.environ["XSILO_REGISTRY"] == str(registry_file.resolve())
    child = subprocess.run([sys.executable, "-c", "from datamodules.registry import get_asset; "
                            "print(get_asset('mine').data_files().format)"], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "jsonl"


def test_use_registry_refuses_a_bad_file_before_using_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XSILO_REGISTRY", "")
    with pytest.raises(AssetError, match=r"registry file '.*nope.yaml' does not exist; pass an existing YAML"):
        use_registry(tmp_path / "nope.yaml")
    assert os.environ["XSILO_REGISTRY"] == ""


@pytest.mark.parametrize("name,fmt", [("a.csv", "csv"), ("a.tsv", "tsv"), ("a.jsonl", "jsonl"),
                                      ("a.json", "json"), ("a.parquet", "parquet"), ("saved", "datasets")])
def test_format_is_inferred_from_the_file(tmp_path, name, fmt):
    (tmp_path / name).mkdir() if fmt == "datasets" else write(tmp_path / name, "x")
    parsed = parse_registry(f"datasets:\n  d:\n    file: {name}\n    label_column: null\n", "r.yaml", tmp_path)
    files = parsed["d"].data_files()
    assert files.format == fmt and files.label_column is None and files.files == {"train": (tmp_path / name).resolve()}


def test_split_files_and_split_fractions(tmp_path):
    for split in ("train", "test"):
        write(tmp_path / f"{split}.tsv", "text\tlabel\n")
    parsed = parse_registry("""
datasets:
  by-files:
    splits: {train: train.tsv, test: test.tsv}
  by-fractions:
    file: train.tsv
    splits: {train: 0.8, val: 0.1, test: 0.1}
""", "r.yaml", tmp_path)
    by_files = parsed["by-files"].data_files()
    assert by_files.format == "tsv" and not by_files.fractions
    assert by_files.files == {s: (tmp_path / f"{s}.tsv").resolve() for s in ("train", "test")}
    by_fractions = parsed["by-fractions"].data_files()
    assert by_fractions.files == {"train": (tmp_path / "train.tsv").resolve()}
    assert by_fractions.fractions == {"train": 0.8, "val": 0.1, "test": 0.1}


def test_a_reader_entry_has_no_data_files():
    with pytest.raises(AssetError, match="read by xsilo's 'label_folders' reader"):
        builtin_registry()["bbc"].data_files()


@pytest.mark.parametrize("text,message", [
    ("tasks:\n  x: {}\n", r"unknown section 'tasks'; entries go under 'models:' .* or 'datasets:'"),
    ("models: [a]\n", r"section 'models' must map names to entries"),
    ("- a\n", r"must be a mapping with 'models:' and/or 'datasets:'"),
    ("models:\n  m: {folder: m, colour: red}\n", r"model 'm', key 'colour' is not a known key; use only "),
    ("datasets:\n  d: {file: missing.csv}\n",
     r"dataset 'd', key 'file' names file '.*missing.csv', which does not exist; fix the path"),
    ("models:\n  m: {folder: nowhere}\n", r"model 'm', key 'folder' names folder .* does not exist"),
    ("models:\n  m: {description: x}\n", r"model 'm' needs exactly one of 'folder' and 'gguf'"),
    ("models:\n  m: {folder: m, gguf: m.gguf}\n", r"needs exactly one of 'folder' and 'gguf'"),
    ("models:\n  m: {gguf: m.bin}\n", r"key 'gguf' must name a .gguf file"),
    ("models:\n  m: {gguf: j.gguf, parts: [p0]}\n", r"key 'sha256' must be given .*add sha256: <64 hex"),
    ("models:\n  m: {gguf: j.gguf, parts: [p0], sha256: ABC}\n", r"key 'sha256' must be 64 lowercase hex"),
    ("models:\n  m: {gguf: a/j.gguf, parts: [p0], sha256: x}\n", r"key 'gguf' names the joined file .*bare"),
    ("models:\n  m: {folder: m, packages: [pkg]}\n", r"key 'packages' entry 'pkg' is not pinned; pin it as"),
    ("models:\n  a/b: {folder: m}\n", r"model 'a/b' is not a valid name; use letters"),
    ("models:\n  m: folder\n", r"model 'm' must be a mapping of keys, got str"),
    ("datasets:\n  d: {reader: csv, file: x, packages: [p==1]}\n", r"key 'reader' 'csv' is not a built-in reader"),
    ("datasets:\n  d: {file: ok.csv, format: xlsx}\n", r"key 'format' 'xlsx' is not a known format; use one of"),
    ("datasets:\n  d: {file: ok.xlsx}\n", r"key 'format' cannot be inferred from 'ok.xlsx'; add format"),
    ("datasets:\n  d: {file: m/plain}\n", r"key 'format' cannot be inferred from 'plain'; add format"),
    ("datasets:\n  d: {file: ok.csv, splits: {train: 0.8, test: 0.3}}\n", r"fractions must each be in \(0, 1\) and sum"),
    ("datasets:\n  d: {file: ok.csv, splits: {train: 0.5, test: ok.csv}}\n", r"key 'splits' mixes files and fractions"),
    ("datasets:\n  d: {splits: {test: ok.csv}}\n", r"key 'splits' has no 'train' split"),
    ("datasets:\n  d: {file: ok.csv, splits: {train: ok.csv}}\n", r"key 'file' is needed for one file"),
    ("datasets:\n  d: {file: ok.csv, text_column: ''}\n", r"key 'text_column' must be a non-empty string"),
    ("models:\n  x: {folder: m}\ndatasets:\n  x: {file: ok.csv}\n", r"'x' is both a model and a dataset"),
    ("models:\n  m: {folder: [\n", r"is not valid YAML at line \d+: .*; fix its syntax"),
])
def test_bad_entries_get_one_line_errors(tmp_path, text, message):
    (tmp_path / "m").mkdir()
    write(tmp_path / "ok.csv", "text,label\n")
    write(tmp_path / "m" / "plain", "text\n")
    with pytest.raises(AssetError, match=message) as error:
        parse_registry(text, "mine.yaml", tmp_path)
    assert str(error.value).startswith("registry mine.yaml") and "\n" not in str(error.value)


def split_model(tmp_path: Path, order=(0, 1, 2)) -> tuple[Path, bytes]:
    """A user's model in three part files, listed in `order`, with the digest of the right join."""
    blob = os.urandom(3000)
    parts = [write(tmp_path / f"m.gguf.part{i:02d}", "") for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(blob[i * 1000:(i + 1) * 1000])
    listed = ", ".join(parts[i].name for i in order)
    registry = write(tmp_path / "r.yaml", f"models:\n  mine:\n    gguf: mine.gguf\n    parts: [{listed}]\n"
                                          f"    sha256: {hashlib.sha256(blob).hexdigest()}\n")
    return registry, blob


def test_split_archive_model_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    registry, blob = split_model(tmp_path)
    monkeypatch.setenv("XSILO_REGISTRY", str(registry))
    asset = get_asset("mine", "model")
    assert not is_prepared("mine")
    joined = assets._join_gguf_parts(asset, log=lambda _: None)
    assert joined.read_bytes() == blob and joined.name == "mine.gguf"
    before = model_dir("mine")
    assert joined.parent.name == before.name == f"mine-{asset.fingerprint}"
    # an edited entry never reuses the old entry's conversion
    write(registry, registry.read_text().replace("mine.gguf\n", "mine2.gguf\n", 1))
    assert get_asset("mine").gguf == "mine2.gguf" and model_dir("mine") != before


def test_split_archive_in_the_wrong_order_is_refused(tmp_path, monkeypatch):
    registry, _ = split_model(tmp_path, order=(1, 0, 2))
    monkeypatch.setenv("XSILO_REGISTRY", str(registry))
    with pytest.raises(AssetError, match=r"joined mine.gguf of 'mine' has sha256 \w+, expected \w+; check the parts'"):
        assets.prepare(["mine"], log=lambda _: None)
    assert not list((xsilo_home() / "gguf").rglob("*.gguf*"))  # no half-written file left


def test_sha256sums_file_picks_the_line_of_the_joined_file(tmp_path):
    write(tmp_path / "p0", "x")
    write(tmp_path / "SUMS", f"{'a' * 64}  other.gguf\n{'b' * 64} *j.gguf\n")
    parsed = parse_registry("models:\n  m: {gguf: j.gguf, parts: [p0], sha256sums: SUMS}\n", "r.yaml", tmp_path)
    assert assets._expected_sha256(parsed["m"]) == "b" * 64
