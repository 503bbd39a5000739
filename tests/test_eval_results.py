"""The results store: schema, atomic append under a lock (also from concurrent processes), run-folder reading."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from evaluate import METRIC_NAMES
from evaluate.results import (
    RESULTS_FILE,
    RESULTS_SCHEMA,
    append_result,
    load_results,
    read_config,
    read_per_user,
    write_per_user,
)


def synthetic_row(run_id: str, **overrides) -> dict:
    """A clearly synthetic result row (for testing the store only)."""
    row = {"run_id": run_id, "dataset": "toy", "llm": "tiny", "method": "ssna", "seed": 0,
           "hparams": {"a": 3, "batch_size": 64}, "test_R@10": 0.5, "valid_R@10": 0.4, "epochs": 3, "best_epoch": 2,
           "seconds_per_epoch": 1.5, "seconds_extrapolated": False, "peak_memory_mb": 100.0, "device": "cpu"}
    row.update(overrides)
    return row


def test_absent_store_is_empty_with_schema(home: Path) -> None:
    df = load_results(home / RESULTS_FILE)
    assert df.is_empty()
    assert dict(df.schema) == RESULTS_SCHEMA


def test_append_and_reload(home: Path) -> None:
    path = home / RESULTS_FILE
    append_result(path, synthetic_row("r1"))
    append_result(path, synthetic_row("r2", seed=1, run_dir="runs/r2"))
    df = load_results(path)
    assert df["run_id"].to_list() == ["r1", "r2"]
    assert json.loads(df["hparams"][0]) == {"a": 3, "batch_size": 64}
    assert df["test_R@50"].to_list() == [None, None]  # absent optional columns are null, not invented
    assert df["run_dir"][1] == str(home.resolve() / "runs" / "r2")  # relative run_dir resolved against home
    append_result(path, synthetic_row("r1", seed=5))  # same run_id replaces its row
    df = load_results(path)
    assert df.height == 2 and df.filter(pl.col("run_id") == "r1")["seed"].to_list() == [5]
    assert not list(home.glob("*.tmp")) and not list(home.glob(".*.tmp"))
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # readable as any new file, not mkstemp's 0600


def test_bad_rows_are_rejected(home: Path) -> None:
    path = home / RESULTS_FILE
    with pytest.raises(ValueError, match="required keys"):
        append_result(path, {"run_id": "x", "dataset": "toy"})
    with pytest.raises(ValueError, match="unknown keys.*'lr'"):
        append_result(path, synthetic_row("x", lr=0.1))
    with pytest.raises(ValueError, match="not valid JSON"):
        append_result(path, synthetic_row("x", hparams="{a:"))
    assert not path.exists()


def test_damaged_store_names_the_file(home: Path) -> None:
    home.mkdir(parents=True)
    path = home / RESULTS_FILE
    path.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=str(path)):
        load_results(path)


def _append_many(path: str, worker: int, n: int) -> None:
    for i in range(n):
        append_result(Path(path), synthetic_row(f"w{worker}-{i}", seed=i))


def test_concurrent_appends_lose_no_rows(home: Path) -> None:
    path = home / RESULTS_FILE
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 8)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    df = load_results(path)
    assert sorted(df["run_id"].to_list()) == sorted(f"w{w}-{i}" for w in range(3) for i in range(8))


def test_per_user_round_trip_and_errors(home: Path) -> None:
    run_dir = home / "runs" / "r1"
    per_user = {m: np.linspace(0, 1, 5) * (i + 1) / 4 for i, m in enumerate(METRIC_NAMES)}
    write_per_user(run_dir, np.arange(5), per_user)
    df = read_per_user(run_dir)
    assert df.columns == ["user_idx", *METRIC_NAMES]
    np.testing.assert_allclose(df["N@10"].to_numpy(), per_user["N@10"])
    with pytest.raises(FileNotFoundError, match="test_per_user.parquet"):
        read_per_user(home / "runs" / "missing")
    pl.DataFrame({"user_idx": [0], "R@10": [1.0]}).write_parquet(run_dir / "test_per_user.parquet")
    with pytest.raises(ValueError, match=r"missing columns \['R@50'"):
        read_per_user(run_dir)
    (run_dir / "config.json").write_text('{"method": "ssna",\n "a": }')
    with pytest.raises(ValueError, match="line 2"):
        read_config(run_dir)
