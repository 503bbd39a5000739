"""Datasets: registered names (or folders) → the canonical folder ``$SSNAREC_HOME/data/<name>/``.

    prepare("sci", from_dir=Path("../shared/data/amazon-sci-unisrec"))  # writes data/sci/, returns it
    ds = load("sci")                                                      # Dataset; ds.stats() is Table 1

Sources: raw Amazon Review 2018 files (``$SSNAREC_HOME/raw/<Category>/`` or ``--from``), UniSRec processed
folders (``--from``), and MovieLens-100k out of the pinned recbole wheel (ml100k).
"""

from __future__ import annotations

import re
from pathlib import Path

from filelock import FileLock

from pipeline import workspace
from pipeline.datasets.amazon import find_raw_files, guess_category, missing_files_message, prepare_amazon
from pipeline.datasets.canonical import (
    META_FILE,
    Dataset,
    DatasetError,
    DatasetMissing,
    Prepared,
    read_dataset,
    write_dataset,
)
from pipeline.datasets.movielens import prepare_movielens
from pipeline.datasets.registry import DATASETS, DEFAULT_K, DatasetSpec, spec_for_category
from pipeline.datasets.unisrec import find_prefix, prepare_unisrec

__all__ = ["DATASETS", "Dataset", "DatasetError", "DatasetMissing", "DatasetSpec", "load", "prepare",
           "resolve"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve(name_or_path: str) -> tuple[str, Path | None]:
    """(dataset name, source folder or None): a registered name wins; otherwise a folder, named by its basename."""
    if name_or_path in DATASETS:
        return name_or_path, None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path.resolve()
        if not _NAME.match(path.name):
            raise DatasetError(f"{path}: the folder name {path.name!r} cannot name a dataset (letters, digits, "
                               "'.', '_', '-'). Fix: rename the folder.")
        return path.name, path
    if _NAME.match(name_or_path) and "/" not in name_or_path:
        return name_or_path, None
    raise DatasetError(f"{name_or_path!r} is neither a registered dataset ({', '.join(DATASETS)}) nor a folder")


def _from_folder(name: str, folder: Path, spec: DatasetSpec | None, strict: bool) -> Prepared:
    """Read FOLDER as a UniSRec processed folder or raw Amazon 2018 files, whichever it holds."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder. Fix: give --from an existing folder.")
    if spec is not None and spec.kind == "movielens":
        return prepare_movielens(name, workspace.cache_dir(), spec.k, from_dir=folder, strict=strict)
    prefix = find_prefix(folder, spec.unisrec_prefix if spec else None)
    if prefix is not None:
        return prepare_unisrec(name, folder, prefix, strict)
    category = spec.category if spec and spec.category else guess_category(folder)
    found = find_raw_files(folder, category) if category else None
    if found is None:
        if spec is not None and spec.category:
            raise DatasetMissing(missing_files_message(name, spec.category, folder, spec.unisrec_hint,
                                                       spec.unisrec_prefix))
        raise DatasetError(
            f"{folder}: holds neither a UniSRec processed folder (<P>.train.inter, .valid.inter, .test.inter, "
            ".text, .item2index, .user2index) nor raw Amazon 2018 files (<Category>.json.gz, <Category>_5.json.gz "
            "or <Category>.csv, with meta_<Category>.json.gz)."
        )
    known = spec or spec_for_category(category)
    return prepare_amazon(name, *found, k=known.k if known else DEFAULT_K, strict=strict)


def prepare(name_or_path: str, from_dir: Path | None = None, strict: bool = False) -> Path:
    """Write the canonical folder ``$SSNAREC_HOME/data/<name>/`` from its source and return it.

    A registered name reads FROM_DIR if given, else its default place (raw/<Category>/ for Amazon names, the
    recbole wheel for ml100k). A folder path is read as its own source and named by its basename. STRICT
    stops at the first malformed line instead of skipping and counting.
    """
    name, folder = resolve(name_or_path)
    spec = DATASETS.get(name)
    source = Path(from_dir).expanduser().resolve() if from_dir is not None else folder
    if source is None and spec is None:
        raise DatasetError(f"{name!r} is not a registered dataset ({', '.join(DATASETS)}). Fix: give --from "
                           "a folder, or pass a folder path instead of a name.")
    dest = workspace.data_dir() / name
    with FileLock(str(workspace.data_dir() / f".{name}.lock")):
        if source is not None:
            prepared = _from_folder(name, source, spec, strict)
        elif spec.kind == "movielens":
            prepared = prepare_movielens(name, workspace.cache_dir(), spec.k, strict=strict)
        else:
            raw = workspace.raw_dir() / spec.category
            found = find_raw_files(raw, spec.category)
            if found is None:
                raise DatasetMissing(missing_files_message(name, spec.category, raw, spec.unisrec_hint,
                                                           spec.unisrec_prefix))
            prepared = prepare_amazon(name, *found, k=spec.k, strict=strict)
        return write_dataset(dest, prepared.items, prepared.sequences, prepared.user_ids, prepared.meta)


def prepare_command(name: str) -> str:
    """The ``ssnarec data prepare`` line that makes dataset NAME."""
    spec = DATASETS.get(name)
    if spec is not None and spec.unisrec_hint:
        return f"ssnarec data prepare {name} --from {spec.unisrec_hint}"
    if spec is not None:
        return f"ssnarec data prepare {name}"
    return f"ssnarec data prepare path/to/{name}"


def load(name_or_path: str) -> Dataset:
    """The prepared dataset NAME (or the canonical folder at a path); DatasetMissing says what to prepare."""
    path = Path(name_or_path).expanduser()
    if name_or_path not in DATASETS and (path / META_FILE).is_file():
        return read_dataset(path.resolve())
    name, _ = resolve(name_or_path)
    folder = workspace.data_dir() / name
    if not (folder / META_FILE).is_file():
        raise DatasetMissing(f"dataset {name!r} is not prepared ({folder} has no {META_FILE}). "
                             f"Fix: run `{prepare_command(name)}`.")
    return read_dataset(folder, name)
