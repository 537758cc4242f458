"""`xsilo query --file` for programs (issue 27): txt, CSV and JSONL rows in, one JSON line per row out (id, label,
probabilities, logits, OOD flag and score, the timings of its batch), rows packed into lanes, a summary on stderr;
and a warm second run that uploads no keys and fetches no detector."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pandas as pd
import pytest

from lightning_modules.cli import main
from serve.harness import ServerThread
from serve.query_file import RECORD_FIELDS, QueryInputError, read_rows
from serve.server import create_app

from tests.serve.client_support import plaintext, provider_and_client

pytestmark = [pytest.mark.network, pytest.mark.he]

TEXTS = ["good film, great actor", "the bank lost money", "a \"quoted\" sad story", "fast red cat; slow blue dog",
         "news of the team game win", "love and hate in the plot", "dull music", "bright happy market",
         "the actor was awful", "sport news: team win"]


@pytest.fixture(scope="module")
def provider(tmp_path_factory, tiny_models):
    folders = provider_and_client(tmp_path_factory.mktemp("query-file"), tiny_models["llama"])
    app = create_app(heads=[folders["topics"], folders["sentiment"]])
    with ServerThread(app, max_lifetime_s=600) as srv:
        yield {**folders, "url": srv.url}


def query(provider, *args: str, head: str = "topics") -> None:
    main(["query", "--server", provider["url"], "--head", head, "--aligner", str(provider["map"]), *args])


def test_csv_with_ids_round_trips_through_pandas_and_every_field_is_the_heads(provider, tmp_path, capsys):
    ids = [f"doc-{i:02d}" for i in range(len(TEXTS))]
    pd.DataFrame({"doc": ids, "body": TEXTS, "other": range(len(TEXTS))}).to_csv(tmp_path / "rows.csv", index=False)
    out, summary = tmp_path / "answers.jsonl", tmp_path / "summary.json"
    capsys.readouterr()
    query(provider, "--file", str(tmp_path / "rows.csv"), "--text_column", "body", "--id_column", "doc",
          "--out", str(out), "--summary", str(summary), "--batch_size", "3")
    err = capsys.readouterr().err
    frame = pd.read_json(out, lines=True)
    assert list(frame.columns) == list(RECORD_FIELDS) and len(frame) == len(TEXTS)
    assert frame["id"].tolist() == ids
    logits, scores = plaintext(provider, TEXTS)
    labels = ["business", "sport", "tech"]
    got = np.array(frame["logits"].tolist())
    np.testing.assert_allclose(got, logits, atol=1e-3 * max(1.0, np.abs(logits).max()))
    assert frame["label"].tolist() == [labels[i] for i in logits.argmax(1)]
    for p, row in zip(frame["probabilities"], logits):
        assert list(p) == labels and abs(sum(p.values()) - 1) < 1e-9
        expected = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        np.testing.assert_allclose([p[k] for k in labels], expected, atol=1e-4)
    np.testing.assert_allclose(frame["ood_score"].to_numpy(float), scores, rtol=1e-3, atol=1e-3)
    assert frame["ood"].tolist() == (scores > 4.0).tolist()  # the published threshold
    lanes = httpx.get(f"{provider['url']}/v1/model").json()["heads"]["topics"]["lanes"]
    report = json.loads(summary.read_text())
    assert report["batch_rows"] == len(TEXTS) and report["batches"] == -(-len(TEXTS) // max(lanes, 3))
    for t in frame["timings"]:
        assert {"extract_ms", "map_ms", "encrypt_ms", "http_ms", "server_ms", "decrypt_ms", "total_ms", "rows",
                "ciphertexts"} == set(t)
        assert t["total_ms"] >= t["extract_ms"] and t["http_ms"] >= t["server_ms"] >= 0
        assert t["ciphertexts"] == -(-t["rows"] // lanes)  # the batch's rows packed into whole ciphertexts
    lines = err.strip().splitlines()
    assert any(line.startswith(f"query: {len(TEXTS)} rows in ") and "rows/s" in line for line in lines), err
    stages = next(line for line in lines if line.startswith("per batch of up to"))
    for name in ("extraction", "encryption", "HTTP round trips (server HE included)", "server HE", "decryption",
                 "batch total"):
        assert f"{name} " in stages and " / " in stages
    assert report["rows"] == len(TEXTS) and report["rows_per_s"] > 0
    assert report["traffic"]["queries"] == report["batches"] * frame["timings"][0]["ciphertexts"]
    assert set(report["per_batch"]["extract_ms"]) == {"median_ms", "p90_ms"}


def test_txt_and_jsonl_inputs_give_the_same_answers_and_stdin_works(provider, tmp_path, capsys, monkeypatch):
    (tmp_path / "rows.txt").write_text("\n".join(TEXTS[:4]) + "\n\n")  # a blank line is no row
    with open(tmp_path / "rows.jsonl", "w") as f:
        for i, text in enumerate(TEXTS[:4]):
            f.write(json.dumps({"text": text, "n": 10 + i}) + "\n")
    capsys.readouterr()
    query(provider, "--file", str(tmp_path / "rows.txt"))
    txt = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    query(provider, "--file", str(tmp_path / "rows.jsonl"), "--id_column", "n")
    jsonl = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in txt] == [1, 2, 3, 4] and [r["id"] for r in jsonl] == [10, 11, 12, 13]
    assert [r["label"] for r in txt] == [r["label"] for r in jsonl]
    np.testing.assert_allclose([r["logits"] for r in txt], [r["logits"] for r in jsonl], atol=1e-3)
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(TEXTS[:2]).encode())))
    query(provider, "--file", "-", "--head", "sentiment", head="sentiment")
    piped = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["label"] in ("negative", "positive") for r in piped] == [True, True]
    assert all(r["ood"] is None and r["ood_score"] is None for r in piped)  # this head publishes no detector


def test_a_warm_second_run_uploads_no_keys_and_fetches_no_detector(provider, tmp_path, capsys):
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    query(provider, "--text", "good film great actor", "--summary", str(first))
    query(provider, "--text", "good film great actor", "--summary", str(second))
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out[0]["text"] == "good film great actor" and out[0]["id"] == 1
    cold, warm = json.loads(first.read_text()), json.loads(second.read_text())
    assert cold["session"]["keys_uploaded"] == 1 and cold["session"]["detector_fetched"]
    assert warm["session"] == {"how": "cached keys and session reused: no key upload", "keys_uploaded": 0,
                               "reused": True, "reopened": 0, "detector_fetched": False}
    assert set(warm["traffic"]["by_kind"]) == {"model info", "query"}
    assert warm["traffic"]["bytes_sent"] + warm["traffic"]["bytes_received"] <= 300_000
    assert cold["traffic"]["bytes_sent"] > 10 * warm["traffic"]["bytes_sent"]  # the keys
    query(provider, "--text", "good film great actor", "--cache", "false", "--summary", str(second))
    assert json.loads(second.read_text())["session"]["keys_uploaded"] == 1


@pytest.mark.parametrize("content, name, args, message", [
    ("text,label\nhello,a\n", "rows.csv", ["--text_column", "body"], "no column 'body'; its columns are"),
    ("text,doc\nhello,1\nbye,1\n", "rows.csv", ["--id_column", "doc"], "id '1' appears twice"),
    ("text,doc\nhello,1\n,2\n", "rows.csv", ["--id_column", "doc"], "row 2: 'text' is empty"),
    ('{"text": "a"}\nnot json\n', "rows.jsonl", [], "line 2 is not JSON"),
    ('{"body": "a"}\n', "rows.jsonl", [], "has no key 'text'"),
    ("hello\n", "rows.xlsx", [], "name it with --format"),
    ("hello\n", "rows.txt", ["--id_column", "x"], "a txt file has no columns"),
    ("\n\n", "rows.txt", [], "holds no rows"),
])
def test_bad_inputs_are_one_line_errors_that_name_the_fix(tmp_path, capsys, content, name, args, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SystemExit) as stopped:
        main(["query", "--server", "http://127.0.0.1:9", "--file", str(path), *args])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_text_and_file_together_or_neither_are_refused(tmp_path):
    with pytest.raises(QueryInputError, match="not both"):
        from serve.query_file import input_rows

        input_rows("a", str(tmp_path / "x.txt"), "text", None, None)
    with pytest.raises(QueryInputError, match="nothing to classify"):
        input_rows(None, None, "text", None, None)
    (tmp_path / "x.tsv").write_text("id\ttext\n7\tα β\n")
    assert read_rows(str(tmp_path / "x.tsv"), id_column="id")[0].text == "α β"


def test_an_unreachable_server_is_one_line(tmp_path, capsys):
    (tmp_path / "rows.txt").write_text("hello\n")
    with pytest.raises(SystemExit):
        main(["query", "--server", "http://127.0.0.1:9", "--file", str(tmp_path / "rows.txt"), "--timeout", "2"])
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the server at http://127.0.0.1:9") and err.count("\n") == 1


def test_a_label_only_head_prints_the_label_the_same_way_and_refuses_probabilities(provider, capsys):
    """`xsilo serve --answers label`: the same JSON line with the label, probabilities and logits null; asking for
    probabilities is one line of error that names the mode. The client's argmax keys live under its home (small
    ones here; `xsilo query` makes 2,048-bit ones on first use)."""
    from encrypted import ArgmaxKeys
    from serve.client_label import default_keys_path

    ArgmaxKeys.generate(512).save(default_keys_path())
    app = create_app(heads=[provider["topics"]], answers={"topics": "label"}, store="memory://")
    with ServerThread(app, max_lifetime_s=300) as srv:
        label_provider = {**provider, "url": srv.url}
        capsys.readouterr()
        query(label_provider, "--text", json.dumps(TEXTS[:3]), "--cache", "false")
        lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        logits, _ = plaintext(provider, TEXTS[:3])
        top = np.sort(logits, axis=1)
        assert [line["id"] for line in lines] == [1, 2, 3] and list(lines[0]) == list(RECORD_FIELDS) + ["text"]
        for line, row, gap in zip(lines, logits, top[:, -1] - top[:, -2]):
            assert line["probabilities"] is None and line["logits"] is None
            if gap > 0.2:
                assert line["label"] == ["business", "sport", "tech"][int(row.argmax())]
        with pytest.raises(SystemExit) as stopped:
            query(label_provider, "--text", "good film", "--probabilities", "true", "--cache", "false")
        assert stopped.value.code == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines()
               if not line.startswith("{")]  # the in-process server's JSON log, when a test before set it up
        assert len(err) == 1 and err[0].startswith("error: ") and "--answers label" in err[0]
