"""Read dataset files (JSON, JSONL, CSV, Parquet, or a folder of them) into a validated `Dataset` of examples.

`load_dataset` detects or applies a format (`nomoat.data.formats`) and records each file's SHA-256 for provenance;
`read_records` yields the raw records of one file. Every problem names its place: `file:line` for JSONL, CSV (the
header is line 1) and JSON arrays (the line where the record starts), `file row N` (0-based) for Parquet; up to
`max_errors` problems are collected before giving up, so one run shows several of them.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nomoat.data.formats import (
    FORMATS,
    DataError,
    Example,
    FormatSpec,
    Preference,
    RecordError,
    Source,
    detect_format,
    parse_record,
)
from nomoat.util.files import sha256_file

__all__ = ["SUFFIXES", "Dataset", "load_dataset", "read_records"]

log = logging.getLogger(__name__)
_DETECT_RECORDS = 20  # records looked at by --format auto

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Keys under which a JSON object may hold its list of records ({"data": [...]}).
_WRAPPER_KEYS = ("data", "train", "examples", "records", "rows", "instances")


@dataclass
class Dataset:
    """Examples read from one or more files.

    Attributes:
        examples: The parsed examples, in file order.
        format: The format name they were parsed with.
        files: One `{"path", "sha256", "records"}` dict per file read (records = records seen, valid or not).
        warnings: Non-fatal problems (e.g. a preference pair whose answers are identical), located.
    """

    examples: list[Example]
    format: str
    files: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


def _expand(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Turn the argument into a list of files; a folder gives its supported files (recursively, sorted)."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise DataError("no dataset file given")
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise DataError(f"{p}: folder has no data files (looked for {', '.join(SUFFIXES)})")
            files += found
        elif not p.exists():
            raise DataError(f"{p}: file not found. Check the path (relative paths start from {Path.cwd()}).")
        elif p.suffix.lower() not in SUFFIXES:
            raise DataError(f"{p}: unsupported file type {p.suffix or '(no extension)'!r}; nomoat reads "
                            f"{', '.join(SUFFIXES)}. Convert the file, e.g. to JSONL with one record per line.")
        else:
            files.append(p)
    return files


# ------------------------------------------------------------------------------------------------- readers
# Each reader yields (source, record) pairs; a record it cannot decode is yielded as a RecordError instead.
Item = tuple[Source, Any]


def _jsonl(path: Path, text: str) -> Iterator[Item | RecordError]:
    if text.lstrip().startswith("["):  # a whole JSON array (pretty-printed or on one line) named .jsonl
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            raise DataError(f"{path.name}: this is one JSON array, not JSON Lines (one object per line): name it "
                            f"{path.with_suffix('.json').name}, or write one record per line")  # fmt: skip
    # Split on "\n" only: str.splitlines would also cut at U+2028 and friends, which JSON strings may hold raw.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield Source(path.name, n), json.loads(line)
        except json.JSONDecodeError as e:
            yield RecordError(None, f"{path.name}:{n}: not valid JSON: {e.msg} (column {e.colno}). "
                                    "Each line must hold one complete JSON object.")


def _json(path: Path, text: str) -> Iterator[Item | RecordError]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line saved as .json (what `datasets` writes): read as JSONL
            yield from _jsonl(path, text)
            return
        raise DataError(f"{path.name}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno}).") from None
    if isinstance(data, Mapping):
        key = next((k for k in _WRAPPER_KEYS if isinstance(data.get(k), list)), None)
        if key is None:  # a single record
            yield Source(path.name, 1), data
            return
        for i, record in enumerate(data[key], start=1):
            yield Source(path.name, i, f"{key} record"), record
        return
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a list of records (or one record per line), got {type(data).__name__}")
    # Find the line each element starts on by decoding the array element by element.
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    for record in data:
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        yield Source(path.name, text.count("\n", 0, pos) + 1), record
        pos = end


def _csv(path: Path, text: str) -> Iterator[Item | RecordError]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return
    start = reader.line_num + 1
    for row in reader:
        if not any(cell.strip() for cell in row):
            start = reader.line_num + 1
            continue
        if len(row) > len(header):
            yield RecordError(None, f"{path.name}:{start}: has {len(row)} cells but the header has {len(header)} "
                                    "columns. Quote cells that contain commas.")
        else:
            yield Source(path.name, start), dict(zip(header, row))
        start = reader.line_num + 1


def _parquet(path: Path) -> Iterator[Item | RecordError]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path.name}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path.name}: not a readable Parquet file ({e})") from None
    row = 0
    for batch in pfile.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield Source(path.name, row, "row"), record
            row += 1


def read_records(path: Path) -> Iterator[Item | RecordError]:
    """Yield `(source, record)` for each record of a file (or a `RecordError` for one that cannot be decoded).

    Raises:
        DataError: The file cannot be read at all (encoding, broken JSON document, bad Parquet).
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet(path)
        return
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # bytes decoded as they are: "\r\n" inside CSV cells stays
    except UnicodeDecodeError as e:
        start = e.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # the offset counts from after a BOM
        line = raw.count(b"\n", 0, start) + 1
        column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        raise DataError(f"{path.name}:{line}: not UTF-8 text (byte 0x{raw[start]:02x} at column {column}, byte "
                        f"{start} of the file). Save the file as UTF-8.") from None
    yield from {".jsonl": _jsonl, ".json": _json, ".csv": _csv}[suffix](path, text)


# -------------------------------------------------------------------------------------------------- loading
def _detect(head: Sequence[Item | RecordError], columns: Mapping[str, str] | None) -> FormatSpec | None:
    """The format of the first record whose keys fit one (the first record's keys are reported when none does).

    Returns None when there is no record object to look at (the loop then reports what the items are).
    """
    items = [i for i in head if not isinstance(i, RecordError)]
    records = [(src, rec) for src, rec in items if isinstance(rec, Mapping)]
    if not records:
        return None
    for source, record in records:
        try:
            name = detect_format(record, columns)
        except DataError:
            continue
        log.info("detected dataset format %r from %s", name, source)
        return FORMATS[name]
    source, record = records[0]
    try:
        detect_format(record, columns)
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    raise AssertionError("unreachable")


def load_dataset(
    path_or_paths: str | Path | Sequence[str | Path],
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    max_errors: int = 10,
) -> Dataset:
    """Read and validate a dataset.

    Args:
        path_or_paths: A file, a folder (all its .jsonl/.json/.csv/.parquet files), or a list of them.
        format: A name from `FORMATS`, or "auto" to detect it from the keys of the first records (the first
            of the first 20 records whose keys fit a format decides).
        columns: `{format field: file column}` renames, e.g. `{"instruction": "question", "output": "answer"}`.
        limit: Keep at most this many examples (reading stops there).
        max_errors: Stop after this many bad records and report them together.

    Returns:
        The dataset.

    Raises:
        DataError: A missing/empty/unsupported file, an unknown format, or bad records (up to `max_errors` of
            them, each with file, line or row, field, what is wrong and what to do).
    """
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; choose one of: auto, {', '.join(FORMATS)}")
    spec = None if format == "auto" else FORMATS[format]
    files = _expand(path_or_paths)
    examples: list[Example] = []
    errors: list[str] = []
    info: list[dict[str, Any]] = []
    warnings: list[str] = []
    for path in files:
        if limit is not None and len(examples) >= limit:
            break
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
        count = 0
        items: Iterator[Item | RecordError] = read_records(path)
        if spec is None:
            head = list(itertools.islice(items, _DETECT_RECORDS))
            spec = _detect(head, columns)
            items = itertools.chain(head, items)
        for item in items:
            if limit is not None and len(examples) >= limit:
                break
            count += 1
            if isinstance(item, RecordError):
                errors.append(item.problem)
            else:
                source, record = item
                if spec is None and isinstance(record, Mapping):
                    spec = _detect([item], columns)
                try:
                    example = parse_record(spec, record, source, columns)
                except RecordError as e:
                    errors.append(e.problem)
                else:
                    examples.append(example)
                    if isinstance(example, Preference) and example.chosen == example.rejected:
                        warnings.append(f"{source}: chosen and rejected are identical; the pair teaches nothing")
            if len(errors) >= max_errors:
                raise DataError(errors, more=True)
        if count == 0:
            raise DataError(f"{path}: no records in the file" + (" (only a header)" if path.suffix == ".csv" else ""))
        info.append({"path": str(path), "sha256": sha256_file(path), "records": count})
    if errors:
        raise DataError(errors)
    for w in warnings:
        log.warning(w)
    assert spec is not None
    return Dataset(examples, spec.name, info, warnings)
