"""The on-disk embedding store of one (dataset, LLM): HDF5 shards, a Parquet index, a JSON manifest.

Layout of ``<store_root>/<dataset>/<llm slug>/``::

    manifest.json                  the commit point: key, shapes, shard list with sha256s, index file + sha256
    index-<hash>.parquet           item_idx, item_id, text_sha256, n_tokens, shard, row (one row per item)
    shards/shard-<k>-<hash>.h5     dataset "emb" [rows, n_layers, hidden] (+ "n_tokens" [rows])
    .partial/<shard>/chunk-*.h5    finished chunks of a shard being built (resume after a kill); under torchrun
                                   any rank may write any chunk: names depend on the rows, not the rank
    .lock                          file lock held by a writer (under torchrun: by rank 0 for the whole job)

Row layout: shard k holds the contiguous item_idx range [start_k, start_k + rows_k), in item_idx order, and the
layers of one item are stored **top first**: ``emb[r, m]`` is layer n - m (m = 0 is the top layer, the paper's
``h^n``; m = n is the embedding output, layer 0). So the top-a layers of all items are ``emb[:, :a]``, a
positive-stride view, and ``emb[i, :a]`` (what a training batch gathers) is one contiguous block. "emb" is an
uncompressed, contiguous HDF5 dataset, so the reader maps it with ``np.memmap`` at its file offset: no read.

Updates: shard files are immutable and named by a hash of their content (the store key plus the item ids and
text sha256s of their rows). When texts change, only the changed items are embedded; every affected shard is
**re-written whole** (unchanged rows copied from the old shard, new rows embedded) under a new name, then the
manifest is replaced atomically and unreferenced files are deleted. Re-writing costs one sequential copy of at
most one shard (<= shard_bytes) and keeps the invariant above, so a one-shard store stays zero-copy after any
update. A store with several shards is read as a copy of only the top-a layers (one contiguous array).

Integrity: every shard and the index carry a sha256 in the manifest, checked on open (a flipped byte is a
``StoreCorrupt`` naming the file and the fix). Files are written to a temporary name in the same folder,
fsynced, then ``os.replace``d. Readers never take the lock; a reader racing a writer's clean-up can see a
shard vanish, which is a ``StoreError`` (open again).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import polars as pl

from featurestore.llms import llm_slug
from featurestore.wheels import sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
PARTIAL = ".partial"
LOCK = ".lock"
DTYPES: dict[str, np.dtype] = {"fp16": np.dtype("<f2"), "fp32": np.dtype("<f4")}


class StoreError(RuntimeError):
    """A store cannot be used as asked."""


class StoreMissing(StoreError):
    """No committed store for this (dataset, LLM) yet."""


class StoreCorrupt(StoreError):
    """A store file does not match its manifest."""


def store_path(store_root: Path, dataset: str, llm: str) -> Path:
    """The folder of the store for DATASET embedded by LLM (a registry name, hub id or folder)."""
    return Path(store_root) / dataset / llm_slug(llm)


def text_sha256(text: str) -> str:
    """sha256 of an item text (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_sha256(value: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def rows_sha256(key_sha: str, item_ids: list[str], text_shas: list[str]) -> str:
    """sha256 naming a block of rows: the store key plus each row's item id and text sha256, in order."""
    digest = hashlib.sha256(key_sha.encode())
    for item_id, sha in zip(item_ids, text_shas, strict=True):
        digest.update(f"\n{item_id}\t{sha}".encode())
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask_mode() -> int:
    """The mode a plain ``open()`` gives a new file under this process's umask (mkstemp's temp files are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path next to TARGET; on success fsync it and ``os.replace`` it onto TARGET."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_h5(path: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any] | None = None) -> None:
    """Write ARRAYS as contiguous, uncompressed HDF5 datasets (memory-mappable), atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        for name, array in arrays.items():
            handle.create_dataset(name, data=np.ascontiguousarray(array))
        for key, value in (attrs or {}).items():
            handle.attrs[key] = value


def read_h5_attrs(path: Path) -> dict[str, Any]:
    """The root attributes of an HDF5 file ({} if it cannot be read)."""
    try:
        with h5py.File(path, "r") as handle:
            return {key: (value.decode() if isinstance(value, bytes) else value)
                    for key, value in handle.attrs.items()}
    except (OSError, KeyError):
        return {}


def map_dataset(path: Path, name: str = "emb") -> np.ndarray:
    """Memory-map dataset NAME of an HDF5 file (copy-on-write: writable, never written back).

    Falls back to reading it when the layout does not allow mapping (chunked, compressed, not allocated).
    """
    with h5py.File(path, "r") as handle:
        if name not in handle:
            raise StoreCorrupt(f"{path}: no dataset {name!r}. Fix: delete this store folder and embed again.")
        dataset = handle[name]
        offset = dataset.id.get_offset()
        if dataset.chunks is not None or dataset.compression is not None or offset is None:
            return dataset[()]
        shape, dtype = dataset.shape, dataset.dtype
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=shape)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The committed manifest of the store in FOLDER; StoreMissing if there is none."""
    path = folder / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise StoreMissing(f"no store at {folder} (no {MANIFEST}). Fix: run `ssnarec embed` for this dataset "
                           f"and LLM first.") from exc
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreCorrupt(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}). Fix: delete {folder} and embed "
                           f"again.") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise StoreError(f"{path}: store format {manifest.get('format')!r}, this code reads {FORMAT_VERSION}. "
                         f"Fix: delete {folder} and embed again.")
    return manifest


def verify_file(path: Path, sha256: str, what: str) -> None:
    """Raise StoreCorrupt unless PATH exists with the given sha256."""
    if not path.exists():
        raise StoreCorrupt(f"{path}: {what} listed in the manifest is missing. Fix: run `ssnarec embed` again "
                           f"(it rebuilds what is missing) or delete {path.parent}.")
    actual = sha256_file(path)
    if actual != sha256:
        raise StoreCorrupt(f"{path}: {what} is corrupted (sha256 {actual[:16]}…, the manifest says "
                           f"{sha256[:16]}…). Fix: run `ssnarec embed` again to re-embed it, or delete the store "
                           f"folder {path.parent if what == 'index' else path.parent.parent}.")


class Store:
    """A committed store, read-only. Embeddings are memory-mapped, not read."""

    def __init__(self, folder: Path, manifest: dict[str, Any], index: pl.DataFrame, shards: list[np.ndarray]):
        self.folder = folder
        self.manifest = manifest
        self.index = index
        self._shards = shards
        self.run_stats: dict[str, Any] | None = None  # set by embed_items: cache_hit, embedded, seconds, ...

    @property
    def n_items(self) -> int:
        return int(self.manifest["n_items"])

    @property
    def n_layers(self) -> int:
        """Stored layers: the LLM's transformer layers + 1 (the embedding output is layer 0)."""
        return int(self.manifest["n_layers"])

    @property
    def hidden(self) -> int:
        return int(self.manifest["hidden"])

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def item_ids(self) -> list[str]:
        """Item ids in item_idx (row) order."""
        return self.index["item_id"].to_list()

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the shards and the index."""
        return int(sum(s["bytes"] for s in self.manifest["shards"]) + self.manifest["index"]["bytes"])

    def shard_views(self) -> list[np.ndarray]:
        """The memory-mapped [rows, n_layers, hidden] array of each shard, in item_idx order."""
        return list(self._shards)

    def top_layers(self, a: int) -> np.ndarray:
        """[n_items, a, hidden]: ``[:, m]`` is layer n - m (``[:, 0]`` the top layer); rows in item_idx order.

        Zero-copy (a view of the copy-on-write memory map, strided: ``np.ascontiguousarray`` makes a packed
        copy; ``torch.from_numpy`` accepts it as is) when the store is one shard, else a copy of only those
        layers.
        """
        if not 1 <= a <= self.n_layers:
            raise ValueError(f"a={a}: must be between 1 and the stored layer count {self.n_layers}")
        if len(self._shards) == 1:
            return self._shards[0][:, :a]
        out = np.empty((self.n_items, a, self.hidden), dtype=self.dtype)
        start = 0
        for shard in self._shards:
            out[start:start + len(shard)] = shard[:, :a]
            start += len(shard)
        return out

    def __repr__(self) -> str:
        return (f"Store({self.manifest['dataset']!r}, {self.manifest['llm']!r}: {self.n_items} items × "
                f"{self.n_layers} layers × {self.hidden}, {self.manifest['dtype']}, {len(self._shards)} shard(s))")


def load_store(folder: Path, manifest: dict[str, Any] | None = None, *, verify: bool = True) -> Store:
    """Open the committed store in FOLDER, checking every file's sha256 when VERIFY."""
    manifest = manifest if manifest is not None else read_manifest(folder)
    index_path = folder / manifest["index"]["file"]
    if verify:
        verify_file(index_path, manifest["index"]["sha256"], "index")
        for shard in manifest["shards"]:
            verify_file(folder / SHARDS / shard["file"], shard["sha256"], f"shard {shard['file']}")
    try:
        index = pl.read_parquet(index_path)
        shards = [map_dataset(folder / SHARDS / s["file"]) for s in manifest["shards"]]
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise StoreError(f"{folder}: cannot read the store ({exc}). Fix: open it again (a writer may have "
                         f"replaced it), or delete the folder and embed again.") from exc
    expected = (manifest["n_layers"], manifest["hidden"])
    rows = 0
    for shard, array in zip(manifest["shards"], shards, strict=True):
        if array.shape[1:] != expected or len(array) != shard["rows"] or array.dtype != DTYPES[manifest["dtype"]]:
            raise StoreCorrupt(f"{folder / SHARDS / shard['file']}: shape {array.shape} {array.dtype} does not "
                               f"match the manifest. Fix: delete {folder} and embed again.")
        rows += len(array)
    if rows != manifest["n_items"] or index.height != rows or not index["item_idx"].equals(
            pl.Series("item_idx", np.arange(rows, dtype=np.int64))):
        raise StoreCorrupt(f"{index_path}: {index.height} index rows, {rows} shard rows, manifest says "
                           f"{manifest['n_items']}. Fix: delete {folder} and embed again.")
    return Store(folder, manifest, index, shards)


def open_store(store_root: Path, dataset: str, llm: str, *, verify: bool = True) -> Store:
    """Open the store of DATASET embedded by LLM under STORE_ROOT (StoreMissing when absent).

    VERIFY checks each shard's and the index's sha256 against the manifest (reads the files once).
    """
    return load_store(store_path(store_root, dataset, llm), verify=verify)


def list_stores(store_root: Path) -> list[dict[str, Any]]:
    """One summary per committed store under STORE_ROOT: dataset, llm, layers, hidden, items, dtype, bytes,
    shards, created, updated."""
    out = []
    for path in sorted(Path(store_root).glob(f"*/*/{MANIFEST}")):
        try:
            manifest = read_manifest(path.parent)
        except StoreError:
            continue
        out.append({
            "dataset": manifest["dataset"], "llm": manifest["llm"], "layers": manifest["n_layers"],
            "hidden": manifest["hidden"], "items": manifest["n_items"], "dtype": manifest["dtype"],
            "bytes": sum(s["bytes"] for s in manifest["shards"]) + manifest["index"]["bytes"],
            "shards": len(manifest["shards"]), "created": manifest["created"], "updated": manifest["updated"],
            "path": str(path.parent),
        })
    return out


def write_index(folder: Path, index: pl.DataFrame) -> dict[str, Any]:
    """Write the Parquet index atomically under a content-hashed name; return its manifest entry."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".index.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        index.write_parquet(tmp, statistics=False)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        sha = sha256_file(tmp)
        target = folder / f"index-{sha[:16]}.parquet"
        os.chmod(tmp, umask_mode())
        os.replace(tmp, target)
        _fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": target.name, "sha256": sha, "bytes": target.stat().st_size}


def commit_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Atomically replace the manifest (the commit point), then delete files it no longer references."""
    with atomic_path(folder / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    keep = {s["file"] for s in manifest["shards"]}
    for path in (folder / SHARDS).glob("*.h5"):
        if path.name not in keep:
            path.unlink(missing_ok=True)
    for path in folder.glob("index-*.parquet"):
        if path.name != manifest["index"]["file"]:
            path.unlink(missing_ok=True)


def now_iso() -> str:
    """The current UTC time, ISO 8601, seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
