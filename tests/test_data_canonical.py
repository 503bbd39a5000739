"""The canonical folder: round trip, atomic writes, missing datasets, and the ``ssnarec data`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from pipeline.commands import data as data_cmd
from pipeline.datasets import DatasetError, DatasetMissing, canonical, load, prepare

KCORE = Path(__file__).parent / "fixtures" / "amazon" / "kcore"


def _parts(n_items: int = 4) -> tuple[pl.DataFrame, list[np.ndarray], list[str]]:
    items = pl.DataFrame({"item_idx": list(range(n_items)), "item_id": [f"i{i}" for i in range(n_items)],
                          "text": [f"text {i}" for i in range(n_items)]})
    return items, [np.array([0, 1, 2], dtype=np.int32), np.array([3, 2, 1, 0], dtype=np.int32)], ["u0", "u1"]


def test_round_trip_and_schema(tmp_path):
    items, seqs, users = _parts()
    out = canonical.write_dataset(tmp_path / "toy", items, seqs, users, {"source": {"kind": "test"}})
    assert sorted(p.name for p in out.iterdir()) == ["items.parquet", "meta.json", "sequences.parquet"]
    assert str(pq.read_schema(out / "sequences.parquet").field("items").type) == "list<element: int32>"
    assert str(pq.read_schema(out / "items.parquet").field("item_idx").type) == "int32"
    ds = canonical.read_dataset(out)
    assert ds.name == "toy" and ds.user_ids == users and ds.n_items == 4 and ds.n_users == 2
    assert [s.tolist() for s in ds.sequences] == [[0, 1, 2], [3, 2, 1, 0]]
    assert all(s.dtype == np.int32 for s in ds.sequences)
    assert ds.items["item_idx"].dtype == pl.Int32 and ds.items["text"].to_list()[1] == "text 1"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format_version"] == canonical.FORMAT_VERSION and meta["counts"]["interactions"] == 7
    assert ds.stats() == {"users": 2, "items": 4, "interactions": 7, "per_user": 3.5, "per_item": 1.8}


@pytest.mark.parametrize("broken", ["short_user", "item_out_of_range", "gap_in_items", "empty"])
def test_invariants_are_enforced_before_writing(tmp_path, broken):
    items, seqs, users = _parts()
    if broken == "short_user":
        seqs[0] = seqs[0][:2]
    elif broken == "item_out_of_range":
        seqs[1] = np.array([0, 1, 4], dtype=np.int32)
    elif broken == "gap_in_items":
        items = items.with_columns(pl.Series("item_idx", [0, 1, 2, 5]))
    else:
        seqs, users = [], []
    with pytest.raises(DatasetError, match=str(tmp_path / "toy")):
        canonical.write_dataset(tmp_path / "toy", items, seqs, users, {})
    assert list(tmp_path.iterdir()) == []


def test_a_killed_write_leaves_no_readable_dataset_and_keeps_the_old_one(tmp_path, monkeypatch):
    items, seqs, users = _parts()
    dest = tmp_path / "toy"
    real_write = canonical.pq.write_table
    calls = []

    def dies_on_second_file(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_write(table, where, **kwargs)

    monkeypatch.setattr(canonical.pq, "write_table", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        canonical.write_dataset(dest, items, seqs, users, {})
    assert list(tmp_path.iterdir()) == []  # no dest, no temp folder left behind

    monkeypatch.setattr(canonical.pq, "write_table", real_write)
    canonical.write_dataset(dest, items, seqs, users, {"source": {"kind": "first"}})
    monkeypatch.setattr(canonical.pq, "write_table", dies_on_second_file)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        canonical.write_dataset(dest, items.with_columns(pl.lit("new").alias("text")), seqs, users, {})
    assert [p.name for p in tmp_path.iterdir()] == ["toy"]
    kept = canonical.read_dataset(dest)
    assert kept.meta["source"]["kind"] == "first" and kept.items["text"][0] == "text 0"


def test_a_folder_without_meta_is_not_a_dataset(home):
    items, seqs, users = _parts()
    out = canonical.write_dataset(home / "data" / "toy", items, seqs, users, {})
    (out / "meta.json").unlink()
    with pytest.raises(DatasetMissing, match=r"ssnarec data prepare path/to/toy"):
        load("toy")
    with pytest.raises(DatasetMissing, match=r"ssnarec data prepare sci --from \.\./shared/data/amazon-sci-unisrec"):
        load("sci")


def test_unknown_name_and_bad_folder(home, tmp_path):
    with pytest.raises(DatasetError, match="not a registered dataset"):
        prepare("nosuch")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"empty: holds neither a UniSRec processed folder .* nor raw Amazon 2018 files"):
        prepare(str(empty))


def _app() -> typer.Typer:
    app = typer.Typer()
    data_cmd.register(app)
    return app


def test_cli_prepare_then_stats(home):
    runner = CliRunner()
    result = runner.invoke(_app(), ["data", "prepare", "sci", "--from", str(KCORE)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(_app(), ["data", "stats", "sci"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].split("\t") == ["sci", "5", "5", "25", "5.0", "5.0"]
    assert "per_user" in result.output.splitlines()[-2]


def test_cli_errors_are_one_clear_line(home):
    runner = CliRunner()
    result = runner.invoke(_app(), ["data", "stats", "ins"])
    assert result.exit_code == 1
    assert "ssnarec data prepare ins --from ../shared/data/amazon-ins-mql4grec" in result.output
    result = runner.invoke(_app(), ["data", "prepare", "sci", "--from", str(KCORE), "--strict"])
    assert result.exit_code == 1 and "Industrial_and_Scientific.json.gz:39" in result.output


def test_cli_options_have_help_and_defaults():
    result = CliRunner().invoke(_app(), ["data", "prepare", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    assert "[default: ($SSNAREC_HOME/raw/<Category>/; the recbole wheel for ml100k)]" in text
    assert "[default: no-strict]" in text
