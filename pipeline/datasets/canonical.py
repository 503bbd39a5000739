"""The canonical dataset format: one folder per dataset with items.parquet, sequences.parquet, meta.json.

- items.parquet: item_idx (int32, dense 0..n-1, sorted), item_id (string, source id such as an ASIN), text.
- sequences.parquet: user_idx (int32, dense 0..m-1, sorted), user_id (string), items (list<int32>, chronological,
  full length, at least ``MIN_USER_ITEMS``).
- meta.json: source, filters, counts, sha256 of every input file, ``format_version``. Written last: a folder
  without it is not a dataset.

A folder is written whole into a temporary sibling and renamed into place, so a killed writer never leaves a
file that a reader would take for a dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
MIN_USER_ITEMS = 3
ITEMS_FILE = "items.parquet"
SEQUENCES_FILE = "sequences.parquet"
META_FILE = "meta.json"

ITEMS_SCHEMA = pa.schema([("item_idx", pa.int32()), ("item_id", pa.string()), ("text", pa.string())])
SEQUENCES_SCHEMA = pa.schema(
    [("user_idx", pa.int32()), ("user_id", pa.string()), ("items", pa.list_(pa.int32()))]
)


class DatasetError(RuntimeError):
    """Input that cannot become a dataset, or a dataset folder that cannot be read; the message says the fix."""


class DatasetMissing(DatasetError):
    """The canonical folder does not exist yet; the message names the ``ssnarec data prepare`` to run."""


@dataclass(frozen=True)
class Dataset:
    """One prepared dataset: items with text, and one chronological item sequence per user."""

    name: str
    path: Path
    items: pl.DataFrame
    sequences: list[np.ndarray]
    user_ids: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        """Number of items (rows of items.parquet)."""
        return self.items.height

    @property
    def n_users(self) -> int:
        """Number of users (sequences)."""
        return len(self.sequences)

    @property
    def n_interactions(self) -> int:
        """Total length of all sequences."""
        return int(sum(len(s) for s in self.sequences))

    def stats(self) -> dict[str, Any]:
        """The paper's Table-1 row: users, items, interactions, and the two ratios to one decimal."""
        return table1_row(self.n_users, self.n_items, self.n_interactions)


def table1_row(users: int, items: int, interactions: int) -> dict[str, Any]:
    """users, items, interactions, per_user and per_item (rounded to one decimal, as in Table 1)."""
    return {
        "users": users,
        "items": items,
        "interactions": interactions,
        "per_user": round(interactions / users, 1) if users else 0.0,
        "per_item": round(interactions / items, 1) if items else 0.0,
    }


def validate(items: pl.DataFrame, sequences: list[np.ndarray], user_ids: list[str], where: str) -> None:
    """Raise DatasetError (naming WHERE) unless the three parts obey the canonical invariants."""
    n = items.height
    if n == 0 or not sequences:
        raise DatasetError(f"{where}: nothing left (items: {n}, users: {len(sequences)}); an empty dataset is "
                           "never written. Fix: check the input files and the filters.")
    idx = items["item_idx"].to_numpy()
    if not np.array_equal(idx, np.arange(n)):
        raise DatasetError(f"{where}: item_idx must be 0..{n - 1} in order")
    if items["item_id"].null_count() or items["item_id"].n_unique() != n:
        raise DatasetError(f"{where}: item_id must be present and unique")
    if items["text"].null_count():
        raise DatasetError(f"{where}: every item needs a text")
    if len(user_ids) != len(sequences) or len(set(user_ids)) != len(user_ids):
        raise DatasetError(f"{where}: user_id must be unique, one per sequence")
    for user, seq in enumerate(sequences):
        if len(seq) < MIN_USER_ITEMS:
            raise DatasetError(f"{where}: user {user_ids[user]!r} has {len(seq)} items; at least "
                               f"{MIN_USER_ITEMS} are needed for a leave-one-out split")
        if seq.min() < 0 or seq.max() >= n:
            raise DatasetError(f"{where}: user {user_ids[user]!r} has an item_idx outside 0..{n - 1}")


def _sequences_table(sequences: list[np.ndarray], user_ids: list[str]) -> pa.Table:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(sequences).astype(np.int32, copy=False)
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))
    return pa.Table.from_arrays(
        [pa.array(np.arange(len(sequences), dtype=np.int32)), pa.array(user_ids, type=pa.string()), lists],
        schema=SEQUENCES_SCHEMA,
    )


def write_dataset(dest: Path, items: pl.DataFrame, sequences: list[np.ndarray], user_ids: list[str],
                  meta: dict[str, Any]) -> Path:
    """Validate, then write DEST/{items,sequences}.parquet and meta.json atomically (whole-folder rename).

    ``meta`` gets ``format_version`` and ``counts`` filled in. An existing DEST is replaced only once the new
    folder is complete.
    """
    items = items.select(
        pl.col("item_idx").cast(pl.Int32), pl.col("item_id").cast(pl.Utf8), pl.col("text").cast(pl.Utf8)
    ).sort("item_idx")
    validate(items, sequences, user_ids, str(dest))
    counts = table1_row(len(sequences), items.height, int(sum(len(s) for s in sequences)))
    meta = {"format_version": FORMAT_VERSION, "name": dest.name, **meta,
            "counts": {**meta.get("counts", {}), **counts}}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; a dataset folder is ordinary data
        pq.write_table(items.to_arrow().cast(ITEMS_SCHEMA), tmp / ITEMS_FILE)
        pq.write_table(_sequences_table(sequences, user_ids), tmp / SEQUENCES_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished TMP folder to DEST; an old DEST is moved aside first and removed after."""
    old: Path | None = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
        os.replace(dest, old / dest.name)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a dataset folder; DatasetMissing when there is none (an unfinished folder has none)."""
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DatasetMissing(f"{path}: no {META_FILE}, so no prepared dataset here")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{meta_path}: not valid JSON ({exc}). Fix: prepare the dataset again.") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetError(f"{meta_path}: format_version {version!r}, this code reads {FORMAT_VERSION}. "
                           "Fix: prepare the dataset again.")
    return meta


def read_dataset(path: Path, name: str | None = None) -> Dataset:
    """Read a canonical folder (meta.json first: a folder without it is not a dataset) and check invariants."""
    meta = read_meta(path)
    try:
        items = pl.read_parquet(path / ITEMS_FILE).sort("item_idx")
        table = pq.read_table(path / SEQUENCES_FILE).sort_by("user_idx")
    except (OSError, pl.exceptions.PolarsError, pa.ArrowException) as exc:
        raise DatasetError(f"{path}: cannot read the dataset files ({exc}). Fix: prepare it again.") from exc
    column = table.column("items").combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = column.offsets.to_numpy()
    sequences = [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    user_ids = table.column("user_id").to_pylist()
    user_idx = table.column("user_idx").to_numpy()
    if not np.array_equal(user_idx, np.arange(len(user_idx))):
        raise DatasetError(f"{path / SEQUENCES_FILE}: user_idx must be 0..{len(user_idx) - 1}")
    validate(items, sequences, user_ids, str(path))
    return Dataset(name=name or meta.get("name", path.name), path=path, items=items, sequences=sequences,
                   user_ids=user_ids, meta=meta)


@dataclass
class Prepared:
    """What a source reader hands to ``write_dataset``: the canonical parts plus meta (source, filters, ...)."""

    items: pl.DataFrame
    sequences: list[np.ndarray]
    user_ids: list[str]
    meta: dict[str, Any]


# What each kind of input problem means, for the summary line.
PROBLEM_TEXT = {
    "malformed": "malformed lines skipped",
    "missing_field": "lines with a missing or invalid field skipped",
    "duplicate": "duplicate (user, item, time) events kept once",
    "no_meta": "events of items with no meta dropped",
    "empty_title": "items with an empty title dropped (with their events)",
    "meta_repeat": "repeated meta lines for one item ignored (the first is kept)",
}


class InputReport:
    """Counts skipped input by kind, remembering the first occurrence as ``file:line: detail``.

    Format problems (malformed line, missing field) stop at the first one in strict mode; the others are
    ordinary filtering and are only counted and summarised.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.problems: dict[str, dict[str, Any]] = {}

    def bad_line(self, kind: str, path: Path, line: int, detail: str) -> None:
        """A line that cannot be read: DatasetError when strict, else skipped and counted."""
        if self.strict:
            raise DatasetError(f"{path}:{line}: {detail}. Fix: correct or delete that line, or run without "
                               "--strict to skip such lines (they are counted and summarised).")
        self.note(kind, path, line, detail)

    def note(self, kind: str, path: Path, line: int, detail: str, count: int = 1) -> None:
        """Count COUNT occurrences of KIND; the first one seen is kept as the example."""
        if count <= 0:
            return
        entry = self.problems.setdefault(kind, {"count": 0, "first": f"{path}:{line}: {detail}"})
        entry["count"] += count

    def summary(self) -> list[str]:
        """One line per kind: count, meaning, and the first occurrence."""
        return [f"{entry['count']} {PROBLEM_TEXT.get(kind, kind)} (first at {entry['first']})"
                for kind, entry in self.problems.items()]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The counts and first occurrences, for meta.json."""
        return {kind: dict(entry) for kind, entry in self.problems.items()}
