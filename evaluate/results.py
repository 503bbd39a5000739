"""The results store (one Parquet table, one row per finished run) and reading a run folder.

A run folder ``runs/<run_id>/`` holds config.json, epochs.parquet (epoch, train_loss, seconds, valid_R@10 …),
test_per_user.parquet (user_idx, R@10, R@50, N@10, N@50) and result.json (the store row). The store lives at
``<home>/results.parquet``; :func:`append_result` adds a row under a file lock and rewrites the file
atomically (temp file in the same folder, then ``os.replace``), so concurrent runs never lose rows and a
killed writer never leaves a half-written table.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from filelock import FileLock

from evaluate import METRIC_NAMES

RESULTS_FILE = "results.parquet"
CONFIG_FILE = "config.json"
EPOCHS_FILE = "epochs.parquet"
PER_USER_FILE = "test_per_user.parquet"
RESULT_FILE = "result.json"
# hparam of a run re-evaluated under the other candidate protocol (``ssnarec retest``): the protocol its best
# epoch was chosen under
CHOSEN_UNDER = "epoch_chosen_under"

RESULTS_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "dataset": pl.String(),
    "llm": pl.String(),
    "method": pl.String(),
    "hparams": pl.String(),
    "seed": pl.Int64(),
    **{f"valid_{m}": pl.Float64() for m in METRIC_NAMES},
    **{f"test_{m}": pl.Float64() for m in METRIC_NAMES},
    "epochs": pl.Int64(),
    "best_epoch": pl.Int64(),
    "seconds_per_epoch": pl.Float64(),
    "seconds_extrapolated": pl.Boolean(),
    "peak_memory_mb": pl.Float64(),
    "device": pl.String(),
    "git_commit": pl.String(),
    "finished_at": pl.String(),
    "run_dir": pl.String(),
}
REQUIRED_KEYS: tuple[str, ...] = ("run_id", "dataset", "llm", "method", "seed")
EPOCH_COLUMNS: tuple[str, ...] = ("epoch", "train_loss", "seconds", *(f"valid_{m}" for m in METRIC_NAMES))
PER_USER_COLUMNS: tuple[str, ...] = ("user_idx", *METRIC_NAMES)


def empty_results() -> pl.DataFrame:
    """An empty results table with the store's schema."""
    return pl.DataFrame(schema=RESULTS_SCHEMA)


def normalise_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Check a result row against the schema and fill absent optional columns with null.

    ``hparams`` may be a dict (serialised as sorted-key JSON) or a JSON string. Unknown keys are an error:
    settings belong inside ``hparams``.
    """
    missing = [k for k in REQUIRED_KEYS if row.get(k) is None]
    if missing:
        raise ValueError(f"result row lacks required keys {missing} (row keys: {sorted(row)})")
    unknown = sorted(set(row) - set(RESULTS_SCHEMA))
    if unknown:
        raise ValueError(f"result row has unknown keys {unknown}; put settings inside 'hparams' (allowed: {list(RESULTS_SCHEMA)})")
    out = {k: row.get(k) for k in RESULTS_SCHEMA}
    hp = out["hparams"]
    if hp is None:
        out["hparams"] = "{}"
    elif isinstance(hp, str):
        try:
            json.loads(hp)
        except json.JSONDecodeError as err:
            raise ValueError(f"result row 'hparams' is not valid JSON: {err}") from err
    else:
        out["hparams"] = json.dumps(hp, sort_keys=True, default=str)
    if out["run_dir"] is not None:
        out["run_dir"] = str(out["run_dir"])
    return out


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write to; renamed onto ``path`` when the block succeeds, removed if not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)            # what a plain open() would give, not mkstemp's 0600
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_parquet_atomic(df: pl.DataFrame, path: Path) -> None:
    """Write ``df`` to ``path`` atomically."""
    with atomic_target(path) as tmp:
        df.write_parquet(tmp)


def write_text_atomic(text: str, path: Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON through a temp file in the same folder and ``os.replace``."""
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def _read_store(results_path: Path) -> pl.DataFrame:
    try:
        df = pl.read_parquet(results_path)
    except Exception as err:  # polars raises several error types for a damaged file
        raise ValueError(
            f"{results_path}: cannot read the results store ({err}); move the file away to start a new one"
        ) from err
    missing = [c for c in RESULTS_SCHEMA if c not in df.columns]
    if missing:
        df = df.with_columns(pl.lit(None, dtype=RESULTS_SCHEMA[c]).alias(c) for c in missing)
    return df.select(pl.col(c).cast(t) for c, t in RESULTS_SCHEMA.items())


def append_result(results_path: Path, row: Mapping[str, Any]) -> None:
    """Append one finished run's row to the results store (a row with the same run_id is replaced).

    Concurrency-safe: read-modify-write happens under ``<results_path>.lock`` and the new table replaces
    the old one atomically.
    """
    results_path = Path(results_path)
    new = pl.DataFrame([normalise_row(row)], schema=RESULTS_SCHEMA)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(results_path) + ".lock"):
        old = _read_store(results_path) if results_path.exists() else empty_results()
        old = old.filter(pl.col("run_id") != new["run_id"][0])
        write_parquet_atomic(pl.concat([old, new], how="vertical"), results_path)


def load_results(results_path: Path) -> pl.DataFrame:
    """The results store as a polars DataFrame; an empty frame with the schema if the file is absent.

    A relative ``run_dir`` is resolved against the store's folder (the workspace root), so a workspace
    can be moved as a whole.
    """
    results_path = Path(results_path)
    if not results_path.exists():
        return empty_results()
    base = results_path.resolve().parent
    return _read_store(results_path).with_columns(
        pl.col("run_dir").map_elements(lambda d: str(base / d), return_dtype=pl.String)
    )


def _read_run_parquet(path: Path, columns: tuple[str, ...], writer_hint: str) -> pl.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; {writer_hint}")
    try:
        df = pl.read_parquet(path)
    except Exception as err:
        raise ValueError(f"{path}: unreadable Parquet ({err}); {writer_hint}") from err
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (has {df.columns}); {writer_hint}")
    return df


def read_per_user(run_dir: Path) -> pl.DataFrame:
    """A run's per-user test metrics: columns user_idx, R@10, R@50, N@10, N@50 (one row per test user)."""
    path = Path(run_dir) / PER_USER_FILE
    df = _read_run_parquet(path, PER_USER_COLUMNS, "the training run writes it when it finishes; rerun it")
    return df.select(pl.col("user_idx").cast(pl.Int64), *(pl.col(m).cast(pl.Float64) for m in METRIC_NAMES))


def read_epochs(run_dir: Path) -> pl.DataFrame:
    """A run's per-epoch log: epoch, train_loss, seconds, valid_R@10, valid_R@50, valid_N@10, valid_N@50."""
    path = Path(run_dir) / EPOCHS_FILE
    return _read_run_parquet(path, ("epoch", "valid_R@10"), "the training run writes it after every epoch")


def _read_run_json(path: Path, written: str, fix: str = "") -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path}: missing; the training run writes it {written}") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: invalid JSON ({err.msg}){fix}") from err


def read_config(run_dir: Path) -> dict[str, Any]:
    """A run's config.json as a dict."""
    return _read_run_json(Path(run_dir) / CONFIG_FILE, "when it starts")


def read_result(run_dir: Path) -> dict[str, Any]:
    """A finished run's result.json (its results-store row) as a dict."""
    return _read_run_json(Path(run_dir) / RESULT_FILE, "when it finishes",
                          "; delete the file and rerun the run (or `ssnarec retest` for a re-evaluation) to write it "
                          "again")


def write_per_user(run_dir: Path, user_idx: np.ndarray, per_user: Mapping[str, np.ndarray]) -> Path:
    """Write a run's per-user test metrics (from :func:`evaluate.metrics.full_ranking`) atomically."""
    missing = [m for m in METRIC_NAMES if m not in per_user]
    if missing:
        raise ValueError(f"per-user metrics lack {missing}; evaluate with ks=(10, 50)")
    df = pl.DataFrame(
        {"user_idx": np.asarray(user_idx, dtype=np.int64), **{m: np.asarray(per_user[m], np.float64) for m in METRIC_NAMES}}
    )
    path = Path(run_dir) / PER_USER_FILE
    write_parquet_atomic(df, path)
    return path
