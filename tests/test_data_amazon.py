"""Raw Amazon 2018 ingestion on the hand-written fixtures in tests/fixtures/amazon (see its README)."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.datasets import DatasetError, DatasetMissing, amazon, load, prepare
from pipeline.datasets.canonical import InputReport

FIXTURES = Path(__file__).parent / "fixtures" / "amazon"
KCORE = FIXTURES / "kcore"
REVIEWS = KCORE / "Industrial_and_Scientific.json.gz"
META = KCORE / "meta_Industrial_and_Scientific.json"

EXPECTED_ITEMS = ["A", "B", "D", "C", "E"]
EXPECTED_USERS = ["U1", "U2", "U3", "U4", "U5"]
EXPECTED_SEQUENCES = [[0, 1, 2, 3, 4], [4, 3, 1, 0, 2], [0, 1, 3, 2, 4], [0, 1, 3, 2, 4], [0, 1, 3, 2, 4]]
EXPECTED_TEXT = {
    "A": "Widget & Co Pro. Industrial & Scientific Tools. ACME.",
    "B": "Beaker 250 ml. Industrial & Scientific Lab Supplies. Pyrex.",
    "C": "Caliper6 inch. Industrial & Scientific Measurement. Mitutoyo.",
    "D": "Dial Indicator. Industrial & Scientific Measurement.",
    "E": "Bob's Gauge. Industrial & Scientific Measurement. Zed.",
}


def _check_kcore_result(path: Path) -> None:
    ds = load(str(path))
    assert ds.items["item_id"].to_list() == EXPECTED_ITEMS
    assert ds.user_ids == EXPECTED_USERS
    assert [s.tolist() for s in ds.sequences] == EXPECTED_SEQUENCES
    assert dict(zip(ds.items["item_id"], ds.items["text"], strict=True)) == EXPECTED_TEXT
    assert ds.stats() == {"users": 5, "items": 5, "interactions": 25, "per_user": 5.0, "per_item": 5.0}


def test_kcore_fixture_needs_several_rounds_and_reports_every_bad_line(home, caplog):
    with caplog.at_level(logging.WARNING):
        out = prepare("sci", from_dir=KCORE)
    assert out == home.resolve() / "data" / "sci"
    _check_kcore_result(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["kcore_rounds"] == 3
    assert meta["filters"]["k_core"] == 5
    assert set(meta["inputs"]) == {str(REVIEWS.resolve()), str(META.resolve())}
    skipped = meta["counts"]["skipped"]
    expected_first = {
        "duplicate": f"{REVIEWS.resolve()}:38",
        "malformed": f"{REVIEWS.resolve()}:39",
        "missing_field": f"{REVIEWS.resolve()}:40",
        "no_meta": f"{REVIEWS.resolve()}:41",
        "empty_title": f"{META.resolve()}:10",
        "meta_repeat": f"{META.resolve()}:11",
    }
    assert set(skipped) == set(expected_first)
    for kind, where in expected_first.items():
        assert skipped[kind]["first"].startswith(where + ":"), (kind, skipped[kind])
    assert skipped["no_meta"]["count"] == 5
    assert all(skipped[k]["count"] == 1 for k in expected_first if k != "no_meta")
    logged = caplog.text
    assert f"{REVIEWS.resolve()}:39" in logged and "1 malformed lines skipped" in logged


def test_single_pass_is_not_enough():
    events, texts, no_title = _fixture_events()
    one_pass = events.filter((pl.len().over("user_id") >= 5) & (pl.len().over("item_id") >= 5))
    assert one_pass.height != 25  # a one-pass filter keeps U7 and F
    stable, rounds = amazon.kcore(events, 5, 5)
    assert stable.height == 25 and rounds == 3
    assert sorted(stable["user_id"].unique()) == EXPECTED_USERS


def _fixture_events() -> tuple[pl.DataFrame, dict[str, str], dict[str, int]]:
    report = InputReport()
    events = amazon.drop_duplicates(amazon.read_reviews(REVIEWS, report), REVIEWS, report)
    texts, no_title = amazon.read_meta(META, set(events["item_id"]), report)
    return events.filter(pl.col("item_id").is_in(list(texts))), texts, no_title


def test_strict_stops_at_the_first_malformed_line(home):
    with pytest.raises(DatasetError, match=rf"{REVIEWS.name}:39: malformed JSON"):
        prepare("sci", from_dir=KCORE, strict=True)
    assert not (home / "data" / "sci").exists()


def test_strict_missing_field_names_file_and_line(home, tmp_path):
    lines = gzip.decompress(REVIEWS.read_bytes()).splitlines(keepends=True)
    folder = tmp_path / "raw"
    folder.mkdir()
    del lines[38]  # drop the malformed line 39: the missing-field line becomes line 39
    (folder / "Industrial_and_Scientific.json").write_bytes(b"".join(lines))
    shutil.copy(META, folder)
    with pytest.raises(DatasetError, match=r"Industrial_and_Scientific.json:39: missing field unixReviewTime"):
        prepare("sci", from_dir=folder, strict=True)


def test_ratings_csv_gives_the_same_dataset(home, tmp_path):
    folder = tmp_path / "Industrial_and_Scientific"
    folder.mkdir()
    shutil.copy(FIXTURES / "ratings" / "Industrial_and_Scientific.csv", folder)
    shutil.copy(META, folder)
    out = prepare(str(folder))  # a path: named by its basename, k from the registered category
    assert out.name == "Industrial_and_Scientific"
    _check_kcore_result(out)


def test_fast_and_line_by_line_parsers_agree(monkeypatch):
    fast = amazon.read_reviews(FIXTURES / "ratings" / "Industrial_and_Scientific.csv", InputReport())
    clean = b"".join(gzip.decompress(REVIEWS.read_bytes()).splitlines(keepends=True)[:37])
    fast_json = amazon.parse_json_chunk(REVIEWS, 1, clean.splitlines(keepends=True), InputReport())

    def refuse(*args, **kwargs):
        raise pl.exceptions.ComputeError("forced slow path")

    monkeypatch.setattr(amazon.pl, "read_ndjson", refuse)
    monkeypatch.setattr(amazon.pl, "read_csv", refuse)
    slow = amazon.read_reviews(FIXTURES / "ratings" / "Industrial_and_Scientific.csv", InputReport())
    slow_json = amazon.parse_json_chunk(REVIEWS, 1, clean.splitlines(keepends=True), InputReport())
    assert fast.equals(slow) and fast.height == 48
    assert fast_json.equals(slow_json) and fast_json.height == 37
    assert fast_json["line"].to_list() == list(range(1, 38))


def test_chunks_keep_line_numbers_across_chunk_borders(monkeypatch):
    monkeypatch.setattr(amazon, "CHUNK_LINES", 7)
    report = InputReport()
    events = amazon.read_reviews(REVIEWS, report)
    assert events["line"].to_list() == [n for n in range(1, 51) if n not in (39, 40)]
    assert report.problems["malformed"]["first"].startswith(f"{REVIEWS}:39:")


def test_clean_text_follows_unisrec():
    assert amazon.clean_text("A &amp; B <br/>C...") == "A & B C."
    assert amazon.clean_text(["Tools &amp; Home", "Power Tools"]) == "Tools & Home Power Tools."
    assert amazon.clean_text('say "hi"') == "say hi."
    assert amazon.clean_text("<span></span>") == ""
    assert amazon.clean_text("x" * 2500) == ""
    assert amazon.item_text({"title": "", "category": ["c"], "brand": "b"}) == ("", "c. b.")


def test_dict_literal_meta_is_read_safely():
    record = amazon.parse_record(b"{'asin': 'E', 'title': \"Bob's\", 'price': None}\n")
    assert record == {"asin": "E", "title": "Bob's", "price": None}
    with pytest.raises(ValueError, match="malformed JSON"):
        amazon.parse_record(b"{'asin': __import__('os').getcwd()}\n")


def test_nothing_left_is_an_error_not_an_empty_folder(home):
    with pytest.raises(DatasetError, match="nothing left after filtering"):
        prepare("pantry", from_dir=FIXTURES / "tiny")
    assert not (home / "data" / "pantry").exists()


def test_absent_raw_files_name_the_files_and_the_dump(home):
    with pytest.raises(DatasetMissing) as info:
        prepare("toys")
    message = str(info.value)
    raw = home.resolve() / "raw" / "Toys_and_Games"
    for needle in (str(raw), "Toys_and_Games.json.gz", "Toys_and_Games_5.json.gz", "Toys_and_Games.csv",
                   "meta_Toys_and_Games.json.gz", "Amazon Review Data (2018)", "nijianmo.github.io/amazon"):
        assert needle in message
    with pytest.raises(DatasetMissing, match=r"--from \.\./shared/data/amazon-sci-unisrec"):
        prepare("sci")


def test_raw_files_are_found_under_the_workspace(home):
    target = home / "raw" / "Industrial_and_Scientific"
    target.mkdir(parents=True)
    for path in (REVIEWS, META):
        shutil.copy(path, target)
    out = prepare("sci")
    _check_kcore_result(out)
    assert np.all([len(s) >= 3 for s in load("sci").sequences])
