"""Text dataset loading: registry readers on synthetic files, local files, bad input."""

from __future__ import annotations

import bz2

import pytest

from datamodules import text
from datamodules.registry import AssetError, get_asset, load_registry
from datamodules.text import dataset_fingerprint, label_names, load_texts


def test_registry_names_every_required_asset():
    names = set(load_registry())
    assert {"minilm", "smollm2", "gemma3"} <= names
    assert {"vader-movies", "vader-tweets", "vader-nyt", "vader-amazon", "trec", "bbc", "rotten",
            "movie-dialog"} <= names


def test_unknown_asset_lists_the_known_ones():
    with pytest.raises(AssetError, match=r"unknown dataset asset 'bbcc'; known: .*bbc.*trec"):
        get_asset("bbcc", "dataset")


def test_vader_reader_drops_neutral_and_binarises(tmp_path):
    f = tmp_path / "v.txt"
    f.write_text("id\tsentiment\ttext\n1\t2.5\tgreat film\n2\t0\tneutral\n3\t-1.2\tawful ''plot''\n")
    ds = text._read_vader(f)
    assert ds["text"] == ["great film", "awful ''plot''"] and ds["label"] == [1, 0]
    assert label_names(ds) == ["negative", "positive"]


def test_trec_reader_deduplicates_and_keeps_coarse_label(tmp_path):
    f = tmp_path / "q.txt"
    f.write_text("DESC:manner How did it go ?\nLOC:city Where is Paris ?\nDESC:manner How did it go ?\n")
    ds = text._read_trec(f)
    assert ds["text"] == ["How did it go ?", "Where is Paris ?"]
    assert [label_names(ds)[i] for i in ds["label"]] == ["DESC", "LOC"]


def test_label_folder_and_rotten_and_dialog_readers(tmp_path):
    for label, body in (("sport", "a goal"), ("tech", "a chip")):
        (tmp_path / "bbc" / label).mkdir(parents=True)
        (tmp_path / "bbc" / label / "001.txt").write_bytes(body.encode("latin-1") + b" \xa3")
    ds = text._read_label_folders(tmp_path / "bbc")
    assert ds["text"] == ["a goal £", "a chip £"] and label_names(ds) == ["sport", "tech"]

    with bz2.open(tmp_path / "r.csv.bz2", "wt") as f:
        f.write('category,text,movie_name\nfresh,"fun, fast",x\nplot,"a man",y\n')
    ds = text._read_rotten(tmp_path / "r.csv.bz2")
    assert ds["text"] == ["fun, fast", "a man"] and label_names(ds) == ["fresh", "plot"]

    (tmp_path / "d.txt").write_text("hi there\thello.\nhello.\tbye\n")
    assert text._read_dialog(tmp_path / "d.txt")["text"] == ["hi there", "hello.", "bye"]


def test_local_csv_with_string_labels_and_limit(tiny_csv, tmp_path):
    ds = load_texts(str(tiny_csv), limit=7)
    assert len(ds) == 7 and label_names(ds) == ["c0", "c1", "c2"]
    full = load_texts(str(tiny_csv))["text"]
    assert [full.index(t) for t in ds["text"]] == sorted(full.index(t) for t in ds["text"])  # file order
    # a label-sorted file still gives every class under a limit
    sorted_file = tmp_path / "sorted.csv"
    sorted_file.write_text("text,label\n" + "".join(f"t{i},{'a' if i < 90 else 'b'}\n" for i in range(100)))
    assert set(load_texts(str(sorted_file), limit=30)["label"]) == {0, 1}
    assert dataset_fingerprint(ds) == dataset_fingerprint(load_texts(str(tiny_csv), limit=7))
    assert dataset_fingerprint(ds) != dataset_fingerprint(load_texts(str(tiny_csv), limit=8))


@pytest.mark.parametrize("kwargs,message", [
    ({"text_column": "body"}, "no text column 'body'"),
    ({"limit": 0}, "limit must be a positive"),
])
def test_bad_dataset_arguments(tiny_csv, kwargs, message):
    with pytest.raises(AssetError, match=message):
        load_texts(str(tiny_csv), **kwargs)


def test_missing_dataset_path(tmp_path):
    with pytest.raises(AssetError, match="does not exist"):
        load_texts(str(tmp_path / "nope.csv"))


# --- the user's own data: formats, columns, registry entries, duplicates between splits ---------------

SMS = {"sms": ["hi there", "win cash now", "call me", "free prize", "see you"], "spam": [False, True, False, True, False]}


def write_formats(folder):
    """The same rows as CSV, TSV, JSONL, Parquet and a save_to_disk folder."""
    import datasets
    import pandas as pd

    df = pd.DataFrame(SMS)
    paths = {"csv": folder / "sms.csv", "tsv": folder / "sms.tsv", "jsonl": folder / "sms.jsonl",
             "parquet": folder / "sms.parquet", "datasets": folder / "sms-saved"}
    df.to_csv(paths["csv"], index=False)
    df.to_csv(paths["tsv"], sep="\t", index=False)
    df.to_json(paths["jsonl"], orient="records", lines=True)
    df.to_parquet(paths["parquet"])
    datasets.Dataset.from_pandas(df).save_to_disk(str(paths["datasets"]))
    return paths


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "datasets"])
def test_every_format_loads_with_its_own_column_names(tmp_path, fmt):
    ds = load_texts(str(write_formats(tmp_path)[fmt]), text_column="sms", label_column="spam")
    assert ds["text"] == SMS["sms"]
    assert [label_names(ds)[i] for i in ds["label"]] == [str(v).lower() for v in SMS["spam"]]


@pytest.mark.parametrize("kwargs,message", [
    ({"text_column": "body", "label_column": "spam"}, r"no text column 'body'; its columns are \['sms', 'spam'\]: pass --text_column"),
    ({"text_column": "sms", "label_column": "is_spam"}, r"no label column 'is_spam'; its columns are \['sms', 'spam'\]: pass --label_column"),
])
def test_a_missing_column_is_one_line_listing_the_columns(tmp_path, kwargs, message):
    with pytest.raises(AssetError, match=message) as info:
        load_texts(str(write_formats(tmp_path)["parquet"]), **kwargs)
    assert "\n" not in str(info.value)


def test_column_choice_enters_the_fingerprint(tmp_path):
    path = tmp_path / "two.csv"
    path.write_text("sms,spam,topic\nhi,no,a\nwin,yes,a\nbye,no,b\n")
    by_spam = load_texts(str(path), text_column="sms", label_column="spam")
    by_topic = load_texts(str(path), text_column="sms", label_column="topic")
    assert dataset_fingerprint(by_spam) != dataset_fingerprint(by_topic)


def use_user_registry(monkeypatch, folder, body: str):
    registry = folder / "registry.yaml"
    registry.write_text(body)
    monkeypatch.setenv("XSILO_REGISTRY", str(registry))


def test_registry_entry_with_split_files_drops_train_texts_also_in_test(tmp_path, monkeypatch, capsys):
    (tmp_path / "train.csv").write_text("message,spam\nwin cash,yes\nhello,no\nCall  me,no\nfree prize,yes\n")
    (tmp_path / "test.csv").write_text("message,spam\ncall me,no\nwin big,yes\n")
    use_user_registry(monkeypatch, tmp_path, "datasets:\n  sms:\n    splits: {train: train.csv, test: test.csv}\n"
                                             "    text_column: message\n    label_column: spam\n")
    train = load_texts("sms", "train")
    assert train["text"] == ["win cash", "hello", "free prize"]  # "Call  me" is test's "call me"
    assert "sms:train: dropped 1 text(s) that also appear in test" in capsys.readouterr().err
    assert load_texts("sms", "test")["text"] == ["call me", "win big"]
    assert len(load_texts("sms", "train", dedupe=False)) == 4
    with pytest.raises(AssetError, match=r"dataset 'sms' has no split 'val'; its splits are \['train', 'test'\]"):
        load_texts("sms", "val")


def test_registry_entry_carved_by_fractions(tmp_path, monkeypatch):
    (tmp_path / "all.jsonl").write_text("".join(
        f'{{"body": "text {i}", "y": "{"ab"[i % 2]}"}}\n' for i in range(100)))
    use_user_registry(monkeypatch, tmp_path, "datasets:\n  mine:\n    file: all.jsonl\n    text_column: body\n"
                                             "    label_column: y\n    splits: {train: 0.8, test: 0.2}\n")
    train, test = load_texts("mine", "train"), load_texts("mine", "test")
    assert (len(train), len(test)) == (80, 20) and not set(train["text"]) & set(test["text"])
    assert sorted(test["label"]).count(0) == 10  # stratified
