"""UniSRec processed folders → canonical dataset, so that the derived leave-one-out split equals theirs.

A folder holds ``<P>.train.inter``, ``<P>.valid.inter``, ``<P>.test.inter`` (RecBole atomic: user_id,
item_id_list, item_id; ids are the dense indices), ``<P>.text`` (ASIN → text), ``<P>.item2index`` and
``<P>.user2index`` (source id → index). Histories are cut to the last W items (W = 50), so each user's full
sequence is rebuilt by chaining the train rows (history + target gives the next row's history), then the
valid target, then the test target; the valid and test histories are checked against the result.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from featurestore.wheels import sha256_file
from pipeline.datasets.canonical import MIN_USER_ITEMS, DatasetError, InputReport, Prepared

log = logging.getLogger(__name__)

PARTS = ("train.inter", "valid.inter", "test.inter", "text", "item2index", "user2index")
_INTER_COLUMNS = ["user_id", "item_id_list", "item_id"]

Row = tuple[int, list[int], int]  # (line number, history, target)


def find_prefix(folder: Path, preferred: str | None = None) -> str | None:
    """The file prefix P of the UniSRec folder FOLDER (from ``P.item2index``), or None if it is not one."""
    prefixes = sorted(p.name[: -len(".item2index")] for p in folder.glob("*.item2index"))
    if preferred in prefixes:
        return preferred
    if len(prefixes) > 1:
        raise DatasetError(f"{folder}: several UniSRec datasets ({', '.join(prefixes)}). Fix: give a folder "
                           "with one, or use the registered name whose prefix matches.")
    return prefixes[0] if prefixes else None


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc})") from exc


def read_index(path: Path) -> dict[str, int]:
    """``id<TAB>index`` lines → {id: index}; indices must be dense 0..n-1 and ids unique."""
    index: dict[str, int] = {}
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip().isdigit():
            raise DatasetError(f"{path}:{number}: expected 'id<TAB>index', got {line[:80]!r}")
        if fields[0] in index:
            raise DatasetError(f"{path}:{number}: id {fields[0]!r} listed twice")
        index[fields[0]] = int(fields[1])
    if sorted(index.values()) != list(range(len(index))):
        raise DatasetError(f"{path}: indices are not 0..{len(index) - 1} each once. Fix: use the folder's "
                           "original index file.")
    return index


def read_text(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """``item_id:token<TAB>text:token_seq`` file → ({ASIN: text, whitespace stripped}, {ASIN: line}).

    The first line of an ASIN wins.
    """
    texts: dict[str, str] = {}
    where: dict[str, int] = {}
    lines = _lines(path)
    if not lines or not lines[0].startswith("item_id"):
        raise DatasetError(f"{path}:1: expected the header 'item_id:token<TAB>text:token_seq'")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t", 1)
        if len(fields) != 2:
            raise DatasetError(f"{path}:{number}: expected 'ASIN<TAB>text', got {line[:80]!r}")
        if fields[0] not in texts:
            texts[fields[0]] = fields[1].strip()
            where[fields[0]] = number
    return texts, where


def read_inter(path: Path, n_items: int, n_users: int) -> dict[int, list[Row]]:
    """{user index: [(line, history, target), ...]} in file order; every id must be in the index files."""
    lines = _lines(path)
    header = [h.split(":")[0] for h in lines[0].split("\t")] if lines else []
    if header != _INTER_COLUMNS:
        raise DatasetError(f"{path}:1: header {header} is not {_INTER_COLUMNS} (RecBole atomic, tab-separated)")
    rows: dict[int, list[Row]] = defaultdict(list)
    for number, line in enumerate(tqdm(lines[1:], desc=f"read {path.name}", leave=False), start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise DatasetError(f"{path}:{number}: expected 3 tab-separated fields, found {len(fields)}")
        user = _index(fields[0], n_users, path, number, "user", "user2index")
        history = [_index(t, n_items, path, number, "item", "item2index") for t in fields[1].split()]
        target = _index(fields[2], n_items, path, number, "item", "item2index")
        rows[user].append((number, history, target))
    return rows


def _index(token: str, size: int, path: Path, number: int, what: str, index_file: str) -> int:
    value = int(token) if token.strip().isdigit() else -1
    if not 0 <= value < size:
        raise DatasetError(f"{path}:{number}: {what} {token!r} is not in {index_file} (indices 0..{size - 1}). "
                           f"Fix: use the .inter files that belong to this folder's {index_file}.")
    return value


def chain_train(rows: list[Row], window: int, path: Path) -> list[int]:
    """The training part of one user's sequence from their prefix rows (any order, histories cut to WINDOW)."""
    start = min(rows, key=lambda r: len(r[1]))
    if len(start[1]) >= window:
        raise DatasetError(f"{path}:{start[0]}: the user's shortest history is already cut to {window} "
                           "items, so the start of the sequence is unknown")
    by_history: dict[tuple[int, ...], list[Row]] = defaultdict(list)
    for row in rows:
        by_history[tuple(row[1])].append(row)
    sequence: list[int] = []
    history = tuple(start[1])
    sequence.extend(history)
    for _ in range(len(rows)):
        candidates = by_history.get(history)
        if not candidates:
            left = next(r for group in by_history.values() for r in group)
            raise DatasetError(f"{path}:{left[0]}: this row does not continue the user's other rows "
                               f"(no row has the history that should follow {list(history[-5:])}...)")
        row = candidates.pop()
        if not candidates:
            del by_history[history]
        sequence.append(row[2])
        history = tuple(sequence[-window:])
    return sequence


def rebuild_sequences(train: dict[int, list[Row]], valid: dict[int, list[Row]], test: dict[int, list[Row]],
                      window: int, paths: dict[str, Path]) -> dict[int, list[int]]:
    """{user: full chronological sequence}; the valid and test rows must agree with the train rows."""
    users = sorted(set(valid) | set(test) | set(train))
    sequences: dict[int, list[int]] = {}
    for user in tqdm(users, desc="rebuild sequences", leave=False):
        for part, rows in (("valid.inter", valid), ("test.inter", test)):
            got = rows.get(user, [])
            if len(got) != 1:
                where = f"{paths[part]}:{got[1][0]}" if got else str(paths[part])
                raise DatasetError(f"{where}: user index {user} has {len(got)} rows here; leave-one-out "
                                   "needs exactly one")
        (v_line, v_history, v_target), = valid[user]
        (t_line, t_history, t_target), = test[user]
        if user in train:
            head = chain_train(train[user], window, paths["train.inter"])
        elif len(v_history) < window:
            head = list(v_history)
        else:
            raise DatasetError(f"{paths['valid.inter']}:{v_line}: user index {user} has no train rows and a "
                               f"history cut to {window} items, so the sequence start is unknown")
        if v_history != head[-window:]:
            raise DatasetError(f"{paths['valid.inter']}:{v_line}: history does not match the user's train rows")
        if t_history != (head + [v_target])[-window:]:
            raise DatasetError(f"{paths['test.inter']}:{t_line}: history does not match the train and valid rows")
        sequences[user] = head + [v_target, t_target]
    return sequences


def prepare_unisrec(name: str, folder: Path, prefix: str, strict: bool = False) -> Prepared:
    """Import the UniSRec folder FOLDER/PREFIX.* as canonical parts (item_idx = their item index)."""
    paths = {part: folder / f"{prefix}.{part}" for part in PARTS}
    absent = [p.name for p in paths.values() if not p.is_file()]
    if absent:
        raise DatasetError(f"{folder}: a UniSRec folder needs {', '.join(p.name for p in paths.values())}; "
                           f"missing {', '.join(absent)}")
    report = InputReport(strict)
    item2index = read_index(paths["item2index"])
    user2index = read_index(paths["user2index"])
    texts, text_lines = read_text(paths["text"])
    asins = sorted(item2index, key=item2index.__getitem__)
    missing_text = [a for a in asins if a not in texts]
    if missing_text:
        raise DatasetError(f"{paths['text']}: no text for {len(missing_text)} items of {paths['item2index'].name}, "
                           f"e.g. {missing_text[0]!r}. Fix: use the .text file that belongs to this folder.")
    parts = {part: read_inter(paths[part], len(item2index), len(user2index))
             for part in ("train.inter", "valid.inter", "test.inter")}
    window = max(len(row[1]) for rows in parts.values() for user_rows in rows.values() for row in user_rows)
    by_user = rebuild_sequences(parts["train.inter"], parts["valid.inter"], parts["test.inter"], window, paths)
    reviewer = {index: rid for rid, index in user2index.items()}
    users = sorted(by_user)
    for asin in asins:
        if not texts[asin]:
            report.note("empty_title", paths["text"], text_lines[asin], f"item {asin} has an empty text (kept)")
    for line in report.summary():
        log.warning("%s: %s", name, line)
    items = pl.DataFrame({"item_idx": np.arange(len(asins), dtype=np.int32), "item_id": asins,
                          "text": [texts[a] for a in asins]})
    short = [u for u in users if len(by_user[u]) < MIN_USER_ITEMS]
    if short:
        raise DatasetError(f"{folder}: user index {short[0]} has fewer than {MIN_USER_ITEMS} items")
    meta: dict[str, Any] = {
        "source": {"kind": "unisrec", "dir": str(folder), "prefix": prefix},
        "inputs": {str(p): sha256_file(p) for p in paths.values()},
        "filters": {"k_core": "as processed upstream", "history_window": window,
                    "item_idx": f"{prefix}.item2index", "user_idx": f"{prefix}.user2index order"},
        "counts": {"skipped": report.as_dict()},
    }
    return Prepared(items, [np.asarray(by_user[u], dtype=np.int32) for u in users],
                    [reviewer[u] for u in users], meta)
