"""MovieLens-100k, the embedded default: read out of the pinned recbole==1.2.1 wheel (never installed).

Files ``ml-100k.inter`` (user_id, item_id, rating, timestamp) and ``ml-100k.item`` (item_id, movie_title,
release_year, class), RecBole atomic format. Text "title (year). genres"; 5-core; events by time, ties in file
order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl

from featurestore.wheels import WheelError, fetch_wheel, read_member, sha256_file
from pipeline.datasets.amazon import filter_events, nothing_left, to_sequences
from pipeline.datasets.canonical import MIN_USER_ITEMS, DatasetError, InputReport, Prepared
from pipeline.datasets.registry import MOVIELENS_TEXT

log = logging.getLogger(__name__)

WHEEL_NAME = "recbole"
WHEEL_VERSION = "1.2.1"
WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
MEMBER_DIR = "recbole/dataset_example/ml-100k"
INTER_FILE = "ml-100k.inter"
ITEM_FILE = "ml-100k.item"
_UNKNOWN = {"", "unknown", "unkonwn"}  # ml-100k spells one missing title "unkonwn"


def movie_text(title: str, year: str, genres: str) -> str:
    """ "title (year). genres" with genres comma-separated; an unknown year or genre is left out."""
    head = title.strip()
    if year.strip().isdigit():
        head = f"{head} ({year.strip()})"
    kinds = [g for g in genres.split() if g.lower() not in _UNKNOWN]
    return f"{head}. {', '.join(kinds)}." if kinds else f"{head}."


def _read_atomic(data: bytes, source: str, columns: list[str]) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a RecBole atomic file whose header must start with COLUMNS."""
    lines = data.decode("utf-8").splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")] if lines else []
    if header[: len(columns)] != columns:
        raise DatasetError(f"{source}:1: header {header} does not start with {columns}. Fix: use the "
                           f"ml-100k files from recbole=={WHEEL_VERSION}.")
    return [(number, line.split("\t")) for number, line in enumerate(lines[1:], start=2) if line.strip()]


def parse_items(data: bytes, source: str, report: InputReport) -> tuple[dict[str, str], dict[str, int]]:
    """({item_id: text}, {item_id: line of an unknown title}) from ml-100k.item bytes."""
    texts: dict[str, str] = {}
    no_title: dict[str, int] = {}
    for number, fields in _read_atomic(data, source, ["item_id", "movie_title", "release_year", "class"]):
        if len(fields) != 4:
            report.bad_line("malformed", Path(source), number, f"expected 4 tab-separated fields, found {len(fields)}")
            continue
        item, title, year, genres = fields
        if title.strip().lower() in _UNKNOWN:
            no_title[item] = number
            report.note("empty_title", Path(source), number, f"item {item} has no title ({title!r})")
            continue
        texts[item] = movie_text(title, year, genres)
    return texts, no_title


def parse_inter(data: bytes, source: str, report: InputReport) -> pl.DataFrame:
    """Events (user_id, item_id, time, line) from ml-100k.inter bytes."""
    rows: list[tuple[str, str, int, int]] = []
    for number, fields in _read_atomic(data, source, ["user_id", "item_id", "rating", "timestamp"]):
        if len(fields) != 4 or not fields[0] or not fields[1]:
            report.bad_line("malformed", Path(source), number, f"expected 4 tab-separated fields, found {len(fields)}")
            continue
        try:
            rows.append((fields[0], fields[1], int(float(fields[3])), number))
        except ValueError:
            report.bad_line("missing_field", Path(source), number, f"timestamp {fields[3]!r} is not a number")
    return pl.DataFrame(rows, schema={"user_id": pl.Utf8, "item_id": pl.Utf8, "time": pl.Int64, "line": pl.Int64},
                        orient="row")


def load_files(cache: Path, from_dir: Path | None) -> tuple[bytes, bytes, dict[str, str], dict[str, Any]]:
    """(inter bytes, item bytes, {input: sha256}, source) from FROM_DIR, or from the pinned wheel in CACHE."""
    if from_dir is not None:
        inter, item = from_dir / INTER_FILE, from_dir / ITEM_FILE
        absent = [p.name for p in (inter, item) if not p.is_file()]
        if absent:
            raise DatasetError(f"{from_dir}: no {' or '.join(absent)}. Fix: point --from at a folder holding "
                               f"{INTER_FILE} and {ITEM_FILE}, or leave --from out to use the recbole wheel.")
        hashes = {str(inter): sha256_file(inter), str(item): sha256_file(item)}
        return inter.read_bytes(), item.read_bytes(), hashes, {"kind": "movielens", "dir": str(from_dir)}
    try:
        wheel = fetch_wheel(WHEEL_NAME, WHEEL_VERSION, WHEEL_SHA256, cache)
        inter_bytes = read_member(wheel, f"{MEMBER_DIR}/{INTER_FILE}")
        item_bytes = read_member(wheel, f"{MEMBER_DIR}/{ITEM_FILE}")
    except WheelError as exc:
        raise DatasetError(f"ml100k: {exc}") from exc
    hashes = {str(wheel): WHEEL_SHA256}
    source = {"kind": "movielens", "wheel": f"{WHEEL_NAME}=={WHEEL_VERSION}", "path": str(wheel),
              "members": [f"{MEMBER_DIR}/{INTER_FILE}", f"{MEMBER_DIR}/{ITEM_FILE}"]}
    return inter_bytes, item_bytes, hashes, source


def prepare_movielens(name: str, cache: Path, k: int, from_dir: Path | None = None,
                      strict: bool = False) -> Prepared:
    """MovieLens-100k as canonical parts: text "title (year). genres", k-core, chronological sequences."""
    inter_bytes, item_bytes, hashes, source = load_files(cache, from_dir)
    if "dir" in source:
        inter_name, item_name = str(Path(source["dir"]) / INTER_FILE), str(Path(source["dir"]) / ITEM_FILE)
    else:
        inter_name, item_name = (f"{source['path']}!{member}" for member in source["members"])
    report = InputReport(strict)
    texts, no_title = parse_items(item_bytes, item_name, report)
    events = parse_inter(inter_bytes, inter_name, report)
    events, counts = filter_events(events, texts, no_title, k, Path(inter_name), Path(item_name), report)
    for line in report.summary():
        log.warning("%s: %s", name, line)
    if events.height == 0:
        raise nothing_left(name, counts, k, [Path(inter_name), Path(item_name)])
    items, sequences, user_ids = to_sequences(events, texts)
    meta = {
        "source": source,
        "inputs": hashes,
        "filters": {"k_core": k, "min_user_items": max(k, MIN_USER_ITEMS), "dedup": "user, item, time",
                    "drop": "items without a title", "text": MOVIELENS_TEXT},
        "counts": {**counts, "skipped": report.as_dict()},
    }
    return Prepared(items, sequences, user_ids, meta)
