"""Raw Amazon Review 2018 files → canonical dataset, the way UniSRec builds its Amazon datasets.

Reviews: JSON lines (optionally .gz) with reviewerID, asin, unixReviewTime, or the ratings-only CSV
``item,user,rating,timestamp``. Meta: JSON lines (or, in old dumps, Python dict literals, read with
ast.literal_eval) with asin, title, category list, brand. Item text "title. categories. brand." with HTML
unescaped and tags removed; items without meta or without title are dropped; duplicate (user, item, time)
events are kept once; then an iterative k-core until stable; events sorted by time, stably for ties.

Big files are read in chunks of lines: polars parses a clean chunk in one go, and a chunk it refuses (or that
has gaps) is re-read line by line so that every problem is reported with its file and line.
"""

from __future__ import annotations

import ast
import gzip
import html
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import polars as pl
from tqdm import tqdm

from featurestore.wheels import sha256_file
from pipeline.datasets.canonical import MIN_USER_ITEMS, DatasetError, InputReport, Prepared
from pipeline.datasets.registry import AMAZON_PAGE, UNISREC_TEXT

log = logging.getLogger(__name__)

CHUNK_LINES = 200_000
MAX_FIELD_CHARS = 2000  # UniSRec blanks a cleaned field this long
EVENT_SCHEMA = {"user_id": pl.Utf8, "item_id": pl.Utf8, "time": pl.Int64, "line": pl.Int64}
_JSON_SCHEMA = {"reviewerID": pl.Utf8, "asin": pl.Utf8, "unixReviewTime": pl.Int64}
_CSV_SCHEMA = {"item_id": pl.Utf8, "user_id": pl.Utf8, "rating": pl.Float64, "time": pl.Int64}
_TAG = re.compile(r"<[^>]*>")
_DROP_CHARS = re.compile(r'["\n\r]')

ChunkParser = Callable[[Path, int, list[bytes], InputReport], pl.DataFrame]


# ---------------------------------------------------------------------------------------------- files

def review_candidates(category: str) -> list[str]:
    """Review file names for CATEGORY, in order of preference (ratings CSV, full reviews, 5-core reviews)."""
    return [f"{category}.csv", f"{category}.csv.gz", f"{category}.json.gz", f"{category}.json",
            f"{category}_5.json.gz", f"{category}_5.json"]


def meta_candidates(category: str) -> list[str]:
    """Meta file names for CATEGORY, in order of preference."""
    return [f"meta_{category}.json.gz", f"meta_{category}.json"]


def guess_category(folder: Path) -> str | None:
    """The category of the single meta_<Category>.json[.gz] in FOLDER, if exactly one."""
    found = {re.sub(r"\.json(\.gz)?$", "", p.name)[len("meta_"):] for p in folder.glob("meta_*.json*")}
    return found.pop() if len(found) == 1 else None


def find_raw_files(folder: Path, category: str) -> tuple[Path, Path] | None:
    """(reviews, meta) for CATEGORY in FOLDER or FOLDER/CATEGORY, or None when either is absent."""
    for place in (folder, folder / category):
        reviews = next((place / n for n in review_candidates(category) if (place / n).is_file()), None)
        meta = next((place / n for n in meta_candidates(category) if (place / n).is_file()), None)
        if reviews is not None and meta is not None:
            return reviews, meta
    return None


def missing_files_message(name: str, category: str, folder: Path, unisrec_hint: str | None = None,
                          unisrec_prefix: str | None = None) -> str:
    """The error for absent raw files: which files to put where, and where the public dump is."""
    lines = [
        f"dataset {name!r}: no raw Amazon 2018 files for {category} in {folder}.",
        f"Put into {folder}/ a review file: {category}.json.gz (all reviews), or {category}_5.json.gz "
        f"(5-core reviews), or the ratings-only {category}.csv; and the meta file meta_{category}.json.gz.",
        f"The public dump is published at {AMAZON_PAGE}",
    ]
    if unisrec_prefix:
        example = unisrec_hint or f"path/to/{unisrec_prefix}-folder"
        lines.append(
            f"Or import a UniSRec processed folder ({unisrec_prefix}.train.inter, .valid.inter, .test.inter, "
            f".text, .item2index, .user2index): ssnarec data prepare {name} --from {example}"
        )
    return "\n".join(lines)


def open_binary(path: Path) -> IO[bytes]:
    """PATH opened for reading bytes, gunzipped when it ends in .gz."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_chunks(path: Path, size: int = CHUNK_LINES) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the chunk's first line, its lines) over PATH, with a progress bar."""
    with open_binary(path) as handle, tqdm(desc=f"read {path.name}", unit=" lines", unit_scale=True,
                                           leave=False) as bar:
        chunk: list[bytes] = []
        start = 1
        for line in handle:
            chunk.append(line)
            if len(chunk) >= size:
                yield start, chunk
                bar.update(len(chunk))
                start += len(chunk)
                chunk = []
        if chunk:
            yield start, chunk
            bar.update(len(chunk))


def parse_record(raw: bytes) -> Any:
    """One JSON line, or a Python dict literal as in old dumps (ast.literal_eval, never eval)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as json_error:
        text = raw.decode("utf-8", errors="replace").strip()
        if text.startswith("{"):
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
        raise ValueError(f"malformed JSON ({json_error})") from None


def iter_records(path: Path, start: int, lines: list[bytes], report: InputReport) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a chunk that parses to an object; the rest is reported
    as malformed (and raises under --strict, through the report)."""
    for offset, raw in enumerate(lines):
        number = start + offset
        if not raw.strip():
            continue
        try:
            record = parse_record(raw)
        except ValueError as exc:
            report.bad_line("malformed", path, number, str(exc))
            continue
        if not isinstance(record, dict):
            report.bad_line("malformed", path, number, "malformed JSON (not an object)")
            continue
        yield number, record


# ---------------------------------------------------------------------------------------------- reviews

def _line_numbers(start: int, lines: list[bytes]) -> list[int] | None:
    """Line numbers of the non-blank lines, or None when there is none."""
    numbers = [start + i for i, line in enumerate(lines) if line.strip()]
    return numbers or None


def _fast_frame(frame: pl.DataFrame, numbers: list[int] | None) -> pl.DataFrame | None:
    """FRAME with its line numbers, if polars read every non-blank line and no field is missing."""
    if numbers is None or frame.height != len(numbers) or frame.null_count().sum_horizontal().item():
        return None
    return frame.with_columns(pl.Series("line", numbers, dtype=pl.Int64))


def parse_json_chunk(path: Path, start: int, lines: list[bytes], report: InputReport) -> pl.DataFrame:
    """Review events (user_id, item_id, time, line) of one chunk of JSON lines."""
    numbers = _line_numbers(start, lines)
    try:
        frame = pl.read_ndjson(io.BytesIO(b"".join(lines)), schema=_JSON_SCHEMA).rename(
            {"reviewerID": "user_id", "asin": "item_id", "unixReviewTime": "time"})
        fast = _fast_frame(frame, numbers)
    except (pl.exceptions.PolarsError, ValueError, TypeError):
        fast = None
    if fast is not None:
        return fast
    rows: list[tuple[str, str, int, int]] = []
    for number, record in iter_records(path, start, lines, report):
        user, item, when = record.get("reviewerID"), record.get("asin"), record.get("unixReviewTime")
        missing = [key for key, value in (("reviewerID", user), ("asin", item), ("unixReviewTime", when))
                   if value is None or value == ""]
        if missing:
            report.bad_line("missing_field", path, number, f"missing field {', '.join(missing)}")
            continue
        try:
            rows.append((str(user), str(item), int(when), number))
        except (TypeError, ValueError):
            report.bad_line("missing_field", path, number, f"unixReviewTime {when!r} is not an integer")
    return pl.DataFrame(rows, schema=EVENT_SCHEMA, orient="row")


def parse_csv_chunk(path: Path, start: int, lines: list[bytes], report: InputReport) -> pl.DataFrame:
    """Review events of one chunk of the ratings-only CSV ``item,user,rating,timestamp`` (no header)."""
    numbers = _line_numbers(start, lines)
    try:
        frame = pl.read_csv(io.BytesIO(b"".join(lines)), has_header=False, schema=_CSV_SCHEMA)
        fast = _fast_frame(frame, numbers)
    except (pl.exceptions.PolarsError, ValueError, TypeError):
        fast = None
    if fast is not None:
        return fast.select("user_id", "item_id", "time", "line")
    rows: list[tuple[str, str, int, int]] = []
    for offset, raw in enumerate(lines):
        number = start + offset
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        fields = [f.strip() for f in text.split(",")]
        if len(fields) != 4:
            report.bad_line("malformed", path, number, f"expected 4 comma-separated fields "
                            f"(item,user,rating,timestamp), found {len(fields)}")
            continue
        item, user, _, when = fields
        if not item or not user or not when:
            report.bad_line("missing_field", path, number, "empty item, user or timestamp")
            continue
        try:
            rows.append((user, item, int(float(when)), number))
        except ValueError:
            if number == 1 and when.lower() == "timestamp":
                continue  # a header line
            report.bad_line("missing_field", path, number, f"timestamp {when!r} is not a number")
    return pl.DataFrame(rows, schema=EVENT_SCHEMA, orient="row")


def read_reviews(path: Path, report: InputReport) -> pl.DataFrame:
    """All review events of PATH (JSON lines or ratings CSV, optionally .gz) as user_id, item_id, time, line."""
    parser: ChunkParser = parse_csv_chunk if ".csv" in path.suffixes else parse_json_chunk
    frames = [parser(path, start, lines, report) for start, lines in iter_chunks(path)]
    return pl.concat(frames) if frames else pl.DataFrame(schema=EVENT_SCHEMA)


# ---------------------------------------------------------------------------------------------- meta / text

def clean_text(raw: Any) -> str:
    """UniSRec's clean_text: lists joined by spaces, HTML unescaped, tags and quotes removed, one final '.'.

    Returns "" when nothing is left (or the field is 2000 characters or longer, as UniSRec does).
    """
    if isinstance(raw, list):
        text = " ".join(clean_part for part in raw if (clean_part := _flatten(part)))
    else:
        text = _flatten(raw)
    text = _TAG.sub(" ", html.unescape(text))
    text = " ".join(_DROP_CHARS.sub("", text).split()).rstrip(".").strip()
    if not text or len(text) + 1 >= MAX_FIELD_CHARS:
        return ""
    return text + "."


def _flatten(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(_flatten(v) for v in value if v)
    return str(value)


def item_text(record: dict[str, Any]) -> tuple[str, str]:
    """(cleaned title, full text "title. categories. brand.") of one meta record; title "" if none."""
    title = clean_text(record.get("title"))
    category = record.get("category")
    if category is None:
        category = record.get("categories")  # 2014 dumps: a list of category paths
    parts = [title, clean_text(category), clean_text(record.get("brand"))]
    return title, " ".join(p for p in parts if p)


def read_meta(path: Path, wanted: set[str], report: InputReport) -> tuple[dict[str, str], dict[str, int]]:
    """Texts of the WANTED items from a meta file: ({asin: text}, {asin: line of an empty title}).

    The first line of an item counts; repeats are noted. Malformed lines follow the report's strictness.
    """
    texts: dict[str, str] = {}
    no_title: dict[str, int] = {}
    for start, lines in iter_chunks(path):
        for number, record in iter_records(path, start, lines, report):
            asin = record.get("asin")
            if not asin or not isinstance(asin, str):
                report.bad_line("missing_field", path, number, "missing field asin")
                continue
            if asin not in wanted:
                continue
            if asin in texts or asin in no_title:
                report.note("meta_repeat", path, number, f"item {asin} already described")
                continue
            title, text = item_text(record)
            if title:
                texts[asin] = text
            else:
                no_title[asin] = number
                report.note("empty_title", path, number, f"item {asin} has an empty title")
    return texts, no_title


# ---------------------------------------------------------------------------------------------- filtering

def drop_duplicates(events: pl.DataFrame, path: Path, report: InputReport) -> pl.DataFrame:
    """Keep the first of each (user, item, time) event; note how many repeats went."""
    repeat = ~pl.struct("user_id", "item_id", "time").is_first_distinct()
    repeats = events.filter(repeat)
    if repeats.height:
        first = repeats.row(0, named=True)
        report.note("duplicate", path, first["line"],
                    f"user {first['user_id']} item {first['item_id']} time {first['time']} seen before",
                    repeats.height)
    return events.filter(~repeat)


def kcore(events: pl.DataFrame, k_user: int, k_item: int) -> tuple[pl.DataFrame, int]:
    """Keep users with >= K_USER and items with >= K_ITEM events, repeated until nothing changes.

    Each round drops, at once, every user and item below its threshold (UniSRec's order). Returns the
    events left and the number of rounds that removed something.
    """
    rounds = 0
    while events.height:
        kept = events.filter((pl.len().over("user_id") >= k_user) & (pl.len().over("item_id") >= k_item))
        if kept.height == events.height:
            break
        events, rounds = kept, rounds + 1
    return events, rounds


def to_sequences(events: pl.DataFrame, texts: dict[str, str]) -> tuple[pl.DataFrame, list[np.ndarray], list[str]]:
    """Chronological sequences from filtered events (user_id, item_id, time, line).

    Users are numbered by first appearance in the input, items by first appearance in the users' sequences
    (UniSRec's convention); events of one user are sorted by time, ties kept in input order.
    """
    ordered = events.with_columns(pl.col("line").min().over("user_id").alias("_first")).sort(
        ["_first", "time", "line"])
    item_ids = ordered["item_id"].unique(maintain_order=True)
    index = pl.DataFrame({"item_id": item_ids, "item_idx": np.arange(len(item_ids), dtype=np.int32)})
    ordered = ordered.join(index, on="item_id", how="left", maintain_order="left")
    users = ordered.group_by("_first", maintain_order=True).agg(pl.col("user_id").first(), pl.len())
    values = ordered["item_idx"].to_numpy().astype(np.int32)
    bounds = np.cumsum(users["len"].to_numpy())[:-1]
    sequences = np.split(values, bounds)
    items = index.with_columns(pl.col("item_id").replace_strict(texts, return_dtype=pl.Utf8).alias("text"))
    return items.select("item_idx", "item_id", "text"), sequences, users["user_id"].to_list()


def filter_events(events: pl.DataFrame, texts: dict[str, str], no_title: dict[str, int], k: int,
                  review_path: Path, meta_path: Path, report: InputReport) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Duplicates, items without meta or title, then the k-core; returns the events left and the counts."""
    counts: dict[str, Any] = {"events_read": events.height}
    events = drop_duplicates(events, review_path, report)
    no_meta = events.filter(~pl.col("item_id").is_in(list(texts)) & ~pl.col("item_id").is_in(list(no_title)))
    if no_meta.height:
        first = no_meta.row(0, named=True)
        report.note("no_meta", review_path, first["line"],
                    f"item {first['item_id']} is not in {meta_path.name}", no_meta.height)
    events = events.filter(pl.col("item_id").is_in(list(texts)))
    counts["events_with_text"] = events.height
    events, rounds = kcore(events, max(k, MIN_USER_ITEMS), k)
    counts["kcore_rounds"] = rounds
    return events, counts


def nothing_left(name: str, counts: dict[str, Any], k: int, sources: list[Path]) -> DatasetError:
    """The error for a source that filters down to nothing."""
    return DatasetError(
        f"dataset {name!r}: nothing left after filtering {', '.join(map(str, sources))} "
        f"({counts.get('events_read', 0)} events read, {counts.get('events_with_text', 0)} of items with a "
        f"title, 0 after the {k}-core). No files were written. Fix: check that the review and meta files belong "
        "to the same category, and that the data is large enough for this k."
    )


def prepare_amazon(name: str, reviews: Path, meta: Path, k: int, strict: bool = False) -> Prepared:
    """Read one review file and its meta file into canonical parts (text recipe, k-core, chronology)."""
    report = InputReport(strict)
    events = read_reviews(reviews, report)
    texts, no_title = read_meta(meta, set(events["item_id"].unique().to_list()), report)
    events, counts = filter_events(events, texts, no_title, k, reviews, meta, report)
    for line in report.summary():
        log.warning("%s: %s", name, line)
    if events.height == 0:
        raise nothing_left(name, counts, k, [reviews, meta])
    items, sequences, user_ids = to_sequences(events, texts)
    meta_info = {
        "source": {"kind": "amazon2018", "reviews": str(reviews), "meta": str(meta)},
        "inputs": {str(reviews): sha256_file(reviews), str(meta): sha256_file(meta)},
        "filters": {"k_core": k, "min_user_items": max(k, MIN_USER_ITEMS), "dedup": "user, item, time",
                    "drop": "items without meta or title", "text": UNISREC_TEXT},
        "counts": {**counts, "skipped": report.as_dict()},
    }
    return Prepared(items, sequences, user_ids, meta_info)
