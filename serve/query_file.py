"""`xsilo query` for programs: rows in (txt, CSV/TSV or JSONL, a text column and an optional id column), one JSON
line out per row (id, label, probabilities, logits, OOD flag and score, the timings of its batch), rows packed into
the layout's lanes batch by batch, and a summary on stderr (rows, rows/s, median and p90 per stage, traffic).

Torch-free: the client model is loaded by `serve.client.Client` when the first batch runs."""
from __future__ import annotations

import csv
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

from .formats.folders import UMASK

FORMATS = {".txt": "txt", ".text": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
STAGE_NAMES = {"extract_ms": "extraction", "map_ms": "map", "encrypt_ms": "encryption",
               "http_ms": "HTTP round trips (server HE included)", "server_ms": "server HE",
               "decrypt_ms": "decryption", "total_ms": "batch total"}
RECORD_FIELDS = ("id", "label", "probabilities", "logits", "ood", "ood_score", "timings")


class QueryInputError(ValueError):
    """The rows to classify cannot be read as asked; the message names the row or column and the fix."""


@dataclass(frozen=True)
class Row:
    id: Any  # the id column's value, else the row's number in the file (1-based)
    text: str


def file_format(path: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in set(FORMATS.values()):
            raise QueryInputError(f"--format must be one of txt, csv, tsv, jsonl, got {fmt!r}")
        return fmt
    if path == "-":
        return "txt"
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise QueryInputError(f"cannot tell the format of {path} from its suffix {suffix or '(none)'!r}; name it "
                              "with --format txt, csv, tsv or jsonl")
    return FORMATS[suffix]


def read_rows(path: str, text_column: str = "text", id_column: str | None = None,
              fmt: str | None = None) -> list[Row]:
    """The rows of `path` ('-' for stdin): a txt file's non-blank lines (id: the line number), a CSV/TSV file's
    `text_column` (id: `id_column`, else the data row number, 1 = the first row under the header), a JSONL file's
    objects (id: `id_column`, else the line number). Ids must be unique; texts must be non-empty strings."""
    kind = file_format(path, fmt)
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise QueryInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise QueryInputError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if kind == "txt":
        if id_column is not None:
            raise QueryInputError("a txt file has no columns: drop --id_column (a row's id is its line number), or "
                                  "use a CSV or JSONL file")
        rows = [Row(number, line) for number, line in enumerate(content.splitlines(), 1) if line.strip()]
    elif kind in ("csv", "tsv"):
        rows = _table_rows(path, content, "\t" if kind == "tsv" else ",", text_column, id_column)
    else:
        rows = _jsonl_rows(path, content, text_column, id_column)
    if not rows:
        raise QueryInputError(f"{path} holds no rows to classify")
    seen: dict[Any, int] = {}
    for index, row in enumerate(rows):
        if row.id in seen:
            raise QueryInputError(f"{path}: id {row.id!r} appears twice (rows {seen[row.id] + 1} and {index + 1}); "
                                  f"ids in --id_column {id_column!r} must be unique")
        seen[row.id] = index
    return rows


def _table_rows(path: str, content: str, delimiter: str, text_column: str, id_column: str | None) -> list[Row]:
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter=delimiter)
    columns = reader.fieldnames or []
    for flag, column in (("--text_column", text_column), ("--id_column", id_column)):
        if column is not None and column not in columns:
            raise QueryInputError(f"{path} has no column {column!r}; its columns are {columns}: name one with {flag}")
    rows = []
    try:
        for number, record in enumerate(reader, 1):
            rows.append(_row(path, f"row {number}", record, text_column, id_column, number))
    except csv.Error as exc:
        raise QueryInputError(f"{path} is not valid {'TSV' if delimiter == chr(9) else 'CSV'} near row "
                              f"{reader.line_num}: {exc}") from None
    return rows


def _jsonl_rows(path: str, content: str, text_column: str, id_column: str | None) -> list[Row]:
    rows = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise QueryInputError(f"{path} line {number} is not JSON ({exc}); write one object per line") from None
        if not isinstance(record, dict):
            raise QueryInputError(f"{path} line {number} is not a JSON object; write {{\"{text_column}\": ...}} "
                                  "per line")
        for flag, column in (("--text_column", text_column), ("--id_column", id_column)):
            if column is not None and column not in record:
                raise QueryInputError(f"{path} line {number} has no key {column!r} (it has {sorted(record)[:20]}); "
                                      f"name the key with {flag}")
        rows.append(_row(path, f"line {number}", record, text_column, id_column, number))
    return rows


def _row(path: str, where: str, record: dict, text_column: str, id_column: str | None, number: int) -> Row:
    text = record.get(text_column)
    if not isinstance(text, str) or not text.strip():
        raise QueryInputError(f"{path} {where}: {text_column!r} is {'empty' if isinstance(text, str) else 'not text'}"
                              f" ({str(text)[:40]!r}); every row needs a text: drop the row or fill it in")
    if id_column is None:
        return Row(number, text)
    value = record.get(id_column)
    if value is None or isinstance(value, (dict, list)) or value == "":
        raise QueryInputError(f"{path} {where}: id {id_column!r} is {'empty' if value in (None, '') else 'not a '}"
                              f"{'' if value in (None, '') else 'string or number'}; every row needs an id")
    return Row(value, text)


# --- output ------------------------------------------------------------------------------------------------

def record(row_id: Any, result: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    """One output line: every field always present (null when it does not apply), so that
    `pandas.read_json(lines=True)` reads the same columns from every line."""
    timings = {k: round(float(v), 3) for k, v in result["timings"].items() if k.endswith("_ms")}
    timings.update(rows=int(result["timings"].get("rows", 1)), ciphertexts=int(result["timings"]["ciphertexts"]))
    out = {"id": row_id, "label": result["label"], "probabilities": result.get("probabilities"),
           "logits": result.get("logits"), "ood": result.get("ood"), "ood_score": result.get("ood_score"),
           "timings": timings}
    if text is not None:
        out["text"] = text
    return out


class Output:
    """JSON lines to stdout (flushed per batch) or to a file (written to a temp file, renamed into place when all
    rows are written: a failed run leaves no partial file)."""

    def __init__(self, path: str | None):
        self.path = None if path in (None, "-") else Path(path)
        self.tmp: str | None = None
        if self.path is None:
            self.stream: IO[str] = sys.stdout
            return
        if self.path.is_dir():
            raise QueryInputError(f"--out {self.path} is a folder; name a file, e.g. {self.path / 'answers.jsonl'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".tmp-{self.path.name}-", dir=self.path.parent)
            os.fchmod(fd, 0o666 & ~UMASK)  # an answers file, as open() would make it (mkstemp's is 0600)
        except OSError as exc:
            raise QueryInputError(f"cannot write --out {self.path}: {exc.strerror or exc}") from None
        self.stream = os.fdopen(fd, "w", encoding="utf-8")

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self.stream.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.stream.flush()

    def commit(self) -> None:
        if self.tmp is not None:
            os.fsync(self.stream.fileno())
            self.stream.close()
            os.replace(self.tmp, self.path)
            self.tmp = None

    def discard(self) -> None:
        if self.tmp is not None:
            self.stream.close()
            os.unlink(self.tmp)
            self.tmp = None


# --- the summary -------------------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(batches: list[dict[str, float]], rows: int, seconds: float, traffic: dict[str, Any],
              session: dict[str, Any], stages: dict[str, float]) -> dict[str, Any]:
    """What a run did, as JSON: rows, seconds, rows/s, per stage the median and p90 over its batches, traffic."""
    per_stage = {k: {"median_ms": round(statistics.median(b[k] for b in batches), 3),
                     "p90_ms": round(percentile([b[k] for b in batches], 90), 3)}
                 for k in STAGE_NAMES if batches and all(k in b for b in batches)}
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds, 3) if seconds > 0 else None,
            "batches": len(batches), "batch_rows": max((int(b.get("rows", 0)) for b in batches), default=0),
            "per_batch": per_stage, "traffic": traffic, "session": session,
            "stages_s": {k: round(v, 3) for k, v in stages.items()}}


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The summary for a person, each figure named as what it is."""
    lines = [f"query: {summary['rows']} rows in {summary['seconds']:.1f} s, "
             f"{summary['rows_per_s'] or 0:.1f} rows/s, in {summary['batches']} batches of up to "
             f"{summary['batch_rows']} rows"]
    if summary["per_batch"]:
        lines.append(f"per batch of up to {summary['batch_rows']} rows, median / p90: " + ", ".join(
            f"{STAGE_NAMES[k]} {v['median_ms']:.1f} / {v['p90_ms']:.1f} ms" for k, v in summary["per_batch"].items()))
    session, traffic = summary["session"], summary["traffic"]
    lines.append(f"session: {session['how']}; {traffic['requests']} requests, {traffic['queries']} encrypted "
                 f"queries ({traffic['rows_charged']} rows charged), sent {traffic['bytes_sent']:,} B, received "
                 f"{traffic['bytes_received']:,} B")
    lines.append("time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in summary["stages_s"].items()))
    return lines


# --- the command -------------------------------------------------------------------------------------------

def input_rows(text: list[str] | str | None, file: str | None, text_column: str, id_column: str | None,
               fmt: str | None) -> tuple[list[Row], bool]:
    """(rows, from --text?) of the query command's inputs."""
    texts = [text] if isinstance(text, str) else list(text or [])
    if texts and file:
        raise QueryInputError("pass --text or --file, not both")
    if file:
        return read_rows(file, text_column, id_column, fmt), False
    if not texts:
        raise QueryInputError("nothing to classify; pass --text or --file")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise QueryInputError("every --text must be a non-empty string")
    return [Row(i, t) for i, t in enumerate(texts, 1)], True


def run_query(rows: list[Row], with_text: bool, client: Any, out: str | None, batch_size: int | None,
              summary_path: str | None = None) -> dict[str, Any]:
    """Classify `rows` with `client` (a serve.client.Client) batch by batch, write the JSON lines, print the
    summary on stderr (and write it as JSON to `summary_path`); returns the summary."""
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    client.model_info()
    client.encoder  # noqa: B018 - loads the model, checks its identity
    stages["load model"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    client.ensure_session()
    stages["open session"] = time.perf_counter() - t1
    how = ("cached keys and session reused: no key upload" if client.session_reused else
           f"keys uploaded ({client.traffic.kinds.get('keys', [0, 0])[1]:,} B)")
    from datamodules.progress import Progress  # the client model is loaded: its imports cost nothing more

    output = Output(out)
    progress = Progress("query", len(rows))  # a line every $XSILO_PROGRESS_S s when stderr is not a terminal
    t2 = time.perf_counter()
    batches: list[dict[str, float]] = []
    done = 0
    try:
        for results in client.classify_batches([r.text for r in rows], batch_size=batch_size):
            part = rows[done:done + len(results)]
            output.write([record(row.id, result, row.text if with_text else None)
                          for row, result in zip(part, results)])
            batches.append(results[0]["timings"])
            done += len(results)
            progress.update(len(results))
        output.commit()
    finally:
        output.discard()
    progress.close()
    stages["classify"] = time.perf_counter() - t2
    if client.reopened:
        how += f"; re-opened {client.reopened} time(s) after the server lost it"
    detector = client.traffic.count("detector")
    session = {"how": how, "keys_uploaded": client.keys_uploaded, "reused": client.session_reused,
               "reopened": client.reopened, "detector_fetched": bool(detector)}
    summary = summarise(batches, len(rows), stages["classify"], client.traffic.as_dict(), session, stages)
    for line in summary_lines(summary):
        print(line, file=sys.stderr)
    if summary_path:
        from .client_cache import write_private

        target = Path(summary_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_private(target, (json.dumps(summary, indent=1) + "\n").encode(), mode=0o644)
    return summary
