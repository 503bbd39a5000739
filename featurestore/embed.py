"""Stage one: stream item texts through a frozen LLM once and store every layer's [CLS] state (``embed_items``), or
with ``--llm NAME:mean`` the mean of its token states.

Speed: texts are tokenised once per chunk (one fast-tokenizer call), sorted by token length and batched by a
token budget (``len(batch) * longest <= batch_tokens``: little padding), run under ``torch.inference_mode`` with
bf16 autocast where the hardware supports it. bf16 is checked on the run's first batch (its first 16 texts
also run in fp32: per-layer cosine >= 0.999, else the run falls back to fp32); the measured cosine goes
into the manifest. Tokenisation and writes are not overlapped with compute: on CPU they take a few percent of
the time (measured in benchmarks/bench_stage1.py), so a second thread would only compete with torch's.

Work is done chunk by chunk (``chunk_items`` texts); each finished chunk is written atomically under
``.partial/``, so a killed run resumes at the chunk it was in; a finished shard replaces its chunks. See
``featurestore.store`` for the layout, the update policy and integrity checks.

Under torchrun (several processes, GPUs or machines) the same store is built by all ranks together: the chunks
still to embed are dealt round-robin to the ranks, each rank writes its chunk files, and after a barrier the
shards are assembled (shard k by rank k mod world) and rank 0 commits the manifest. Chunk files are named by
their shard and rows, not by rank, so the shards and values are those of a single-process run, and a killed
job resumes from every chunk any rank finished (with any number of processes, one included).
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from featurestore.distributed import (
    DistributedError,
    all_gather_objects,
    barrier,
    broadcast_object,
    check_shared_folder,
    init_from_env,
    is_main,
    local_device,
    rank,
    world_size,
)
from featurestore.llms import ResolvedLLM, llm_slug, load_llm, pool, resolve_llm, split_pooling
from featurestore.store import (
    DTYPES,
    FORMAT_VERSION,
    LOCK,
    PARTIAL,
    SHARDS,
    Store,
    StoreCorrupt,
    StoreError,
    StoreMissing,
    commit_manifest,
    json_sha256,
    load_store,
    map_dataset,
    now_iso,
    read_h5_attrs,
    read_manifest,
    rows_sha256,
    text_sha256,
    verify_file,
    write_h5,
    write_index,
)
from featurestore.wheels import sha256_file

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 64
DEFAULT_BATCH_TOKENS = 8192
DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_CHUNK_ITEMS = 2048
COSINE_FLOOR = 0.999
CHECK_ROWS = 16  # texts of the first batch also run in fp32 to check bf16
PRECISIONS = ("auto", "bf16", "fp32")
KEYED_LIBRARIES = ("torch", "transformers", "tokenizers")
RECORDED_LIBRARIES = (*KEYED_LIBRARIES, "numpy", "h5py", "pyarrow", "polars")


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of NAMES (from package metadata: no import)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; anything else is passed through."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def bf16_supported(device: str) -> bool:
    """Whether DEVICE runs bf16 matmuls natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX via oneDNN)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def token_budget_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Positions grouped into batches sorted by length (longest first) with ``len * longest <= batch_tokens``."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, current, longest = [], [], 0
    for pos in order:
        width = max(longest, int(lengths[pos]))
        if current and width * (len(current) + 1) > batch_tokens:
            batches.append(np.array(current))
            current, width = [], int(lengths[pos])
        current.append(pos)
        longest = width
    if current:
        batches.append(np.array(current))
    return batches


class LayerEmbedder:
    """Per-layer text embeddings of a loaded model, top layer first: ``[n, n_layers + 1, hidden]`` float32; each
    the [CLS] state or, with ``pooling="mean"``, the mean of the token states (``featurestore.llms.pool``)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int, device: str, precision: str,
                 pooling: str = "cls"):
        if tokenizer.cls_token_id is None:
            raise StoreError(f"{type(tokenizer).__name__}: the tokenizer has no [CLS] token to prefix")
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.device, self.precision, self.pooling = max_length, device, precision, pooling
        self.tokenizer.truncation_side = "right"
        self.min_cosine: float | None = None

    def tokenize(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids ([CLS] first, truncated on the right to max_length) and each text's untruncated length."""
        full = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        lengths = np.fromiter((len(ids) for ids in full), dtype=np.int32, count=len(full))
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        if all(ids and ids[0] == cls and ids[-1] == sep for ids in full):
            ids = [x if len(x) <= self.max_length else x[: self.max_length - 1] + [sep] for x in full]
        else:  # an unusual template: let the tokenizer truncate
            ids = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length,
                                 verbose=False)["input_ids"]
            if any(not x or x[0] != cls for x in ids):
                raise StoreError(f"{type(self.tokenizer).__name__}: does not put [CLS] first; cannot take the "
                                 f"[CLS] state as the text embedding")
        return ids, lengths

    def _tensors(self, ids: list[list[int]]) -> tuple[Any, Any]:
        import torch

        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        return (torch.from_numpy(input_ids).to(self.device, non_blocking=True),
                torch.from_numpy(mask).to(self.device, non_blocking=True))

    def forward(self, input_ids: Any, attention_mask: Any, precision: str | None = None) -> Any:
        """[B, n_layers + 1, hidden] float32 tensor of the texts' embeddings, top layer first."""
        import torch

        bf16 = (precision or self.precision) == "bf16"
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return torch.stack([pool(h, attention_mask, self.pooling) for h in reversed(out.hidden_states)], dim=1).float()

    def _checked_forward(self, input_ids: Any, attention_mask: Any) -> Any:
        """Forward; on the first bf16 batch, its first CHECK_ROWS texts are also run in fp32 and compared.

        Below COSINE_FLOOR the embedder switches to fp32 for good (this batch included).
        """
        import torch

        result = self.forward(input_ids, attention_mask)
        if self.precision == "bf16" and self.min_cosine is None:
            rows = min(CHECK_ROWS, len(input_ids))
            width = int(attention_mask[:rows].sum(1).max())
            reference = self.forward(input_ids[:rows, :width], attention_mask[:rows, :width], "fp32")
            cosine = torch.nn.functional.cosine_similarity(result[:rows], reference, dim=-1, eps=1e-12)
            self.min_cosine = float(cosine.min())
            if self.min_cosine < COSINE_FLOOR:
                log.warning("bf16 embedding cosine vs fp32 is %.5f < %s: falling back to fp32", self.min_cosine,
                            COSINE_FLOOR)
                self.precision = "fp32"
                return self.forward(input_ids, attention_mask)
        return result

    def embed_ids(self, ids: list[list[int]], batch_tokens: int, bar: Any = None) -> np.ndarray:
        """Embed pre-tokenised texts (sorted and batched by BATCH_TOKENS); rows in input order."""
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        out: np.ndarray | None = None
        for batch in token_budget_batches(lengths, batch_tokens):
            input_ids, mask = self._tensors([ids[i] for i in batch])
            states = self._checked_forward(input_ids, mask).cpu().numpy()
            if out is None:
                out = np.empty((len(ids), *states.shape[1:]), dtype=np.float32)
            out[batch] = states
            if bar is not None:
                bar.update(len(batch))
        assert out is not None, "embed_ids needs at least one text"
        return out


@dataclass
class _Run:
    """State of one embed_items call that has work to do."""

    folder: Path
    llm: str
    cache_dir: Path
    key_sha: str
    dtype: np.dtype
    max_length: int
    batch_tokens: int
    device: str
    precision: str
    chunk_items: int
    row_shape: tuple[int, int]  # (stored layers, hidden)
    embedder: LayerEmbedder | None = None
    count_resumed: bool = True  # False once the ranks of a torchrun job have written every chunk themselves
    stats: dict[str, int] = field(default_factory=lambda: {"embedded": 0, "resumed": 0, "reused": 0,
                                                            "kept_shards": 0, "written_shards": 0})

    def get_embedder(self) -> LayerEmbedder:
        """Load the model on first need (a cache hit never gets here)."""
        if self.embedder is None:
            device = resolve_device(local_device(self.device))
            precision = self.precision
            if precision == "auto":
                precision = "bf16" if bf16_supported(device) else "fp32"
            model, tokenizer, _ = load_llm(self.llm, self.cache_dir, device)
            self.embedder = LayerEmbedder(model, tokenizer, max_length=self.max_length, device=device,
                                          precision=precision, pooling=split_pooling(self.llm)[1])
        return self.embedder


def _check_inputs(dataset: str, item_ids: list[str], texts: list[str], dtype: str, precision: str,
                  max_length: int, batch_tokens: int) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", dataset):
        raise ValueError(f"dataset {dataset!r}: use letters, digits, '.', '_' or '-' only")
    if len(item_ids) != len(texts):
        raise ValueError(f"{len(item_ids)} item ids but {len(texts)} texts: one text per item")
    if not item_ids:
        raise ValueError("no items to embed")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("item ids are not unique")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ValueError(f"text of item {item_ids[bad]!r} (position {bad}) is {type(texts[bad]).__name__}, "
                         f"not str")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if max_length < 2:
        raise ValueError(f"max_length {max_length}: needs room for [CLS] and at least one more token")
    if batch_tokens < max_length:
        raise ValueError(f"batch_tokens {batch_tokens} < max_length {max_length}: one text must fit a batch")


def store_key(resolved: ResolvedLLM, *, max_length: int, dtype: str, precision: str) -> dict[str, Any]:
    """Everything that determines the stored values; a change in any of it re-embeds every item."""
    return {
        "format": FORMAT_VERSION,
        "llm": resolved.fingerprint,
        "tokenizer": {"max_length": max_length, "truncation_side": "right", "cls_prefix": True,
                      "padding_side": "right"},
        "dtype": dtype,
        "precision": precision,
        "libraries": library_versions(KEYED_LIBRARIES),
    }


def _old_rows(folder: Path, old: dict[str, Any] | None, key_sha: str) -> tuple[dict[tuple[str, str], tuple[str, int]],
                                                                            dict[str, np.ndarray]]:
    """Rows of the previous store that can be reused: (item_id, text_sha) → (shard file, row), and the
    verified shards' memory maps. Shards that fail their sha256 are left out (their items are re-embedded)."""
    if old is None or old.get("key_sha256") != key_sha:
        return {}, {}
    try:
        verify_file(folder / old["index"]["file"], old["index"]["sha256"], "index")
        index = pl.read_parquet(folder / old["index"]["file"])
    except (StoreError, OSError):
        log.warning("%s: previous index unreadable; re-embedding everything", folder)
        return {}, {}
    arrays = {}
    for shard in old["shards"]:
        try:
            verify_file(folder / SHARDS / shard["file"], shard["sha256"], f"shard {shard['file']}")
            arrays[shard["file"]] = map_dataset(folder / SHARDS / shard["file"])
        except (StoreError, OSError) as exc:
            log.warning("%s Its items will be re-embedded.", exc)
    files = [s["file"] for s in old["shards"]]
    rows = {}
    for item_id, sha, shard, row in index.select("item_id", "text_sha256", "shard", "row").iter_rows():
        if files[shard] in arrays:
            rows[(item_id, sha)] = (files[shard], row)
    return rows, arrays


def _chunks(run: _Run, shard_stem: str, ids: list[str], shas: list[str],
            need: np.ndarray) -> list[tuple[Path, np.ndarray]]:
    """The chunk files (under .partial/) that rows NEED of one shard are embedded in, with each one's rows.

    A chunk's name depends only on its shard, position and rows, never on which process embeds it."""
    out = []
    for start in range(0, len(need), run.chunk_items):
        rows = need[start:start + run.chunk_items]
        name = f"chunk-{start // run.chunk_items:05d}-"
        name += rows_sha256(run.key_sha, [ids[r] for r in rows], [shas[r] for r in rows])[:16] + ".h5"
        out.append((run.folder / PARTIAL / shard_stem / name, rows))
    return out


def _chunk_done(run: _Run, path: Path) -> bool:
    """Whether chunk PATH was finished (by any process) under the current store key."""
    return path.exists() and read_h5_attrs(path).get("key_sha256") == run.key_sha


def _embed_chunk(run: _Run, path: Path, rows: np.ndarray, texts: list[str], bar: Any) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """Embed TEXTS (the texts of shard rows ROWS), write them as chunk PATH, return (states, token counts)."""
    embedder = run.get_embedder()
    token_ids, lengths = embedder.tokenize(texts)
    states = embedder.embed_ids(token_ids, run.batch_tokens, bar).astype(run.dtype)
    if not np.isfinite(states).all():
        raise StoreError(f"{run.folder}: some layer states overflow {run.dtype} (inf/nan). "
                         f"Fix: embed with --dtype fp32.")
    write_h5(path, {"emb": states, "n_tokens": lengths, "rows": rows.astype(np.int64)},
             {"key_sha256": run.key_sha})
    run.stats["embedded"] += len(rows)
    return states, lengths


def _embed_missing(run: _Run, shard_stem: str, ids: list[str], shas: list[str], texts: list[str],
                   need: np.ndarray, emb: np.ndarray, n_tokens: np.ndarray, bar: Any) -> None:
    """Fill rows NEED of one shard, chunk by chunk; finished chunks are kept under .partial/ for resume."""
    for path, rows in _chunks(run, shard_stem, ids, shas, need):
        if _chunk_done(run, path):
            emb[rows] = map_dataset(path, "emb")
            n_tokens[rows] = map_dataset(path, "n_tokens")
            if run.count_resumed:
                run.stats["resumed"] += len(rows)
            bar.update(len(rows))
            continue
        emb[rows], n_tokens[rows] = _embed_chunk(run, path, rows, [texts[r] for r in rows], bar)


def _embed_chunks_distributed(run: _Run, plan: list[tuple[str, int, int, str]], keep: list[bool],
                              item_ids: list[str], shas: list[str], texts: list[str],
                              old_rows: dict[tuple[str, str], tuple[str, int]], desc: str, progress: bool) -> None:
    """Under torchrun: embed every chunk the new shards need, the chunks dealt round-robin to the ranks.

    Rank 0 lists the chunks not yet finished (a killed job's finished chunks are kept, whichever rank wrote
    them) and every rank follows that list, so no chunk is embedded twice. Returns after all ranks are done.
    """
    work: list[tuple[Path, np.ndarray, int]] = []      # (chunk file, rows within its shard, shard start)
    for (name, start, end, _), is_kept in zip(plan, keep, strict=True):
        if is_kept:
            continue
        ids, text_shas = item_ids[start:end], shas[start:end]
        need = np.array([r for r, key in enumerate(zip(ids, text_shas, strict=True)) if key not in old_rows],
                        dtype=np.int64)
        work.extend((path, rows, start) for path, rows in _chunks(run, Path(name).stem, ids, text_shas, need))
    todo = None
    if is_main():
        todo = [i for i, (path, _, _) in enumerate(work) if not _chunk_done(run, path)]
        run.stats["resumed"] += sum(len(rows) for _, rows, _ in work) - sum(len(work[i][1]) for i in todo)
    mine = broadcast_object(todo)[rank()::world_size()]
    with tqdm(total=sum(len(work[i][1]) for i in mine), unit="item", desc=f"{desc} (rank 0 of {world_size()})",
              disable=not progress or not is_main(), dynamic_ncols=True, smoothing=0.1) as bar:
        for i in mine:
            path, rows, start = work[i]
            _embed_chunk(run, path, rows, [texts[start + r] for r in rows], bar)
    run.count_resumed = False
    barrier()


def embed_items(store_root: Path, dataset: str, item_ids: list[str], texts: list[str], llm: str, *,
                cache_dir: Path, max_length: int = DEFAULT_MAX_LENGTH, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                device: str = "auto", dtype: str = "fp16", precision: str = "auto",
                shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_items: int = DEFAULT_CHUNK_ITEMS,
                progress: bool = True) -> Store:
    """Embed ITEM_IDS/TEXTS (item_idx order) with LLM into the store of DATASET and return it, opened.

    Per layer (embedding output = layer 0) the [CLS] state of each text (with ``LLM:mean``, the mean of its
    token states) is stored in DTYPE. With unchanged inputs this is a cache hit that loads no model; changed
    texts re-embed only those items; a killed run resumes; concurrent runs on one store wait for each other
    (file lock). PRECISION is the compute precision:
    'auto' uses bf16 where supported and accurate (cosine >= 0.999 vs fp32 on the first batch), else fp32.
    """
    started = time.perf_counter()
    _check_inputs(dataset, item_ids, texts, dtype, precision, max_length, batch_tokens)
    try:
        init_from_env(device)                  # under torchrun: join the job (a no-op otherwise)
        folder = Path(store_root) / dataset / llm_slug(llm)
        (folder / SHARDS).mkdir(parents=True, exist_ok=True)
        check_shared_folder(folder, "the embedding store")
    except DistributedError as exc:
        raise StoreError(str(exc)) from None
    lock = FileLock(str(folder / LOCK)) if is_main() else None   # rank 0 locks for the whole job
    if lock is not None:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("%s: another run holds the lock; waiting for it", folder)
            lock.acquire()
    barrier()
    try:
        return _embed_locked(folder, dataset, list(item_ids), list(texts), llm, started, cache_dir=cache_dir,
                             max_length=max_length, batch_tokens=batch_tokens, device=device, dtype=dtype,
                             precision=precision, shard_bytes=shard_bytes, chunk_items=chunk_items,
                             progress=progress)
    finally:
        if lock is not None:
            lock.release()


def _embed_locked(folder: Path, dataset: str, item_ids: list[str], texts: list[str], llm: str, started: float, *,
                  cache_dir: Path, max_length: int, batch_tokens: int, device: str, dtype: str, precision: str,
                  shard_bytes: int, chunk_items: int, progress: bool) -> Store:
    resolved = resolve_llm(llm, Path(cache_dir))
    key = store_key(resolved, max_length=max_length, dtype=dtype, precision=precision)
    key_sha = json_sha256(key)
    shas = [text_sha256(t) for t in texts]
    items_sha = rows_sha256(key_sha, item_ids, shas)
    try:
        old: dict[str, Any] | None = read_manifest(folder)
    except StoreMissing:
        old = None
    except StoreError as exc:
        log.warning("%s Rebuilding the store.", exc)
        old = None
    if old is not None and old.get("key_sha256") == key_sha and old.get("items_sha256") == items_sha:
        try:
            store = load_store(folder, old)
            store.run_stats = {"cache_hit": True, "embedded": 0, "seconds": time.perf_counter() - started}
            return store
        except StoreCorrupt as exc:
            log.warning("%s Re-embedding the affected items.", exc)

    n_layers, hidden = resolved.spec.n_layers + 1, resolved.spec.hidden
    run = _Run(folder, llm, Path(cache_dir), key_sha, DTYPES[dtype], max_length, batch_tokens, device, precision,
               chunk_items, (n_layers, hidden))
    old_rows, old_arrays = _old_rows(folder, old, key_sha)
    same_key = old is not None and old.get("key_sha256") == key_sha
    old_files = {s["file"]: s for s in old["shards"]} if same_key else {}
    rows_per_shard = max(1, shard_bytes // (n_layers * hidden * run.dtype.itemsize))
    plan = []
    for k, start in enumerate(range(0, len(item_ids), rows_per_shard)):
        end = min(start + rows_per_shard, len(item_ids))
        content = rows_sha256(key_sha, item_ids[start:end], shas[start:end])
        plan.append((f"shard-{k:05d}-{content[:16]}.h5", start, end, content))

    def kept(name: str, content: str) -> bool:
        if name in old_files:
            return name in old_arrays
        attrs = read_h5_attrs(folder / SHARDS / name)  # a shard finished by a killed run
        return attrs.get("content_sha256") == content and attrs.get("key_sha256") == key_sha

    keep = [kept(name, content) for name, _, _, content in plan]
    desc, world, me = f"embed {dataset}/{llm_slug(llm)}", world_size(), rank()
    if world > 1:
        _embed_chunks_distributed(run, plan, keep, item_ids, shas, texts, old_rows, desc, progress)
        missing = 0                                # every chunk is on disk: assembling shards embeds nothing
    else:
        missing = sum(sum((item_ids[i], shas[i]) not in old_rows for i in range(start, end))
                      for (_, start, end, _), k in zip(plan, keep, strict=True) if not k)
    built: dict[int, tuple[dict[str, Any], np.ndarray]] = {}   # shard k → (manifest entry, token counts)
    with tqdm(total=missing, unit="item", desc=desc, disable=not progress or world > 1, dynamic_ncols=True,
              smoothing=0.1) as bar:
        for k, ((name, start, end, content), is_kept) in enumerate(zip(plan, keep, strict=True)):
            if k % world != me:                    # under torchrun shard k is assembled by rank k mod world
                continue
            path = folder / SHARDS / name
            if is_kept:
                run.stats["kept_shards"] += 1
                n_tokens = np.asarray(map_dataset(path, "n_tokens"))
                sha = old_files[name]["sha256"] if name in old_files else sha256_file(path)
            else:
                n_tokens = _build_shard(run, path, content, start, item_ids[start:end], shas[start:end],
                                        texts[start:end], old_rows, old_arrays, bar)
                sha = sha256_file(path)
            built[k] = ({"file": name, "start": start, "rows": end - start, "sha256": sha,
                         "bytes": path.stat().st_size}, n_tokens)
    last_run = _merge_ranks(run, built)
    if not is_main():
        manifest = broadcast_object(None)          # rank 0 commits; then every rank opens the same store
        store = load_store(folder, manifest, verify=False)
        store.run_stats = {"cache_hit": False, **manifest["last_run"]}
        return store
    entries, index_parts = [], []
    for k in range(len(plan)):
        entry, n_tokens = built[k]
        entries.append(entry)
        index_parts.append(pl.DataFrame({"shard": np.full(entry["rows"], k, dtype=np.int32),
                                         "row": np.arange(entry["rows"], dtype=np.int32),
                                         "n_tokens": n_tokens.astype(np.int32)}))
    index = pl.concat(index_parts).with_columns(
        pl.Series("item_idx", np.arange(len(item_ids), dtype=np.int64)), pl.Series("item_id", item_ids),
        pl.Series("text_sha256", shas)).select("item_idx", "item_id", "text_sha256", "n_tokens", "shard", "row")
    seconds = time.perf_counter() - started
    manifest = {
        "format": FORMAT_VERSION, "dataset": dataset, "llm": llm, "llm_slug": llm_slug(llm),
        "llm_spec": {"family": resolved.spec.family, "source": resolved.spec.source, "ref": resolved.spec.ref,
                     "transformer_layers": resolved.spec.n_layers},
        "key": key, "key_sha256": key_sha, "items_sha256": items_sha,
        "n_items": len(item_ids), "n_layers": n_layers, "hidden": hidden, "dtype": dtype,
        "layer_order": "top_first: emb[:, m] is layer n - m; emb[:, n] is the embedding output (layer 0)",
        "tokenizer": key["tokenizer"], "libraries": library_versions(RECORDED_LIBRARIES),
        "shard_bytes_limit": shard_bytes, "shards": entries, "index": write_index(folder, index),
        "truncated_fraction": float((index["n_tokens"] > max_length).mean()),
        "created": (old or {}).get("created", now_iso()), "updated": now_iso(),
        "last_run": {**last_run, "seconds": round(seconds, 3), "batch_tokens": batch_tokens,
                     "chunk_items": chunk_items,
                     "host": {"machine": platform.machine(), "processor": platform.processor()}},
    }
    commit_manifest(folder, manifest)
    shutil.rmtree(folder / PARTIAL, ignore_errors=True)
    broadcast_object(manifest)
    store = load_store(folder, manifest, verify=False)
    store.run_stats = {"cache_hit": False, **manifest["last_run"]}
    return store


def _merge_ranks(run: _Run, built: dict[int, tuple[dict[str, Any], np.ndarray]]) -> dict[str, Any]:
    """Merge every rank's shards into BUILT (in place) and return the run's statistics for the manifest
    (counts summed over ranks; the device of the first rank that embedded; the lowest bf16 cosine)."""
    embedder = run.embedder
    mine = {"stats": run.stats, "device": embedder.device if embedder else None,
            "precision": embedder.precision if embedder else None,
            "cosine": embedder.min_cosine if embedder else None}
    if world_size() == 1:
        return {**run.stats, "device": mine["device"], "precision_used": mine["precision"],
                "bf16_min_cosine_vs_fp32": mine["cosine"]}
    parts = all_gather_objects((built, mine))
    for shards, _ in parts:
        built.update(shards)
    infos = [info for _, info in parts]
    precisions = sorted({i["precision"] for i in infos if i["precision"]})
    cosines = [i["cosine"] for i in infos if i["cosine"] is not None]
    return {**{key: sum(i["stats"][key] for i in infos) for key in run.stats},
            "device": next((i["device"] for i in infos if i["device"]), None),
            "precision_used": ",".join(precisions) or None,
            "bf16_min_cosine_vs_fp32": min(cosines) if cosines else None, "world_size": len(infos)}


def _build_shard(run: _Run, path: Path, content: str, start: int, ids: list[str], shas: list[str],
                 texts: list[str], old_rows: dict[tuple[str, str], tuple[str, int]],
                 old_arrays: dict[str, np.ndarray], bar: Any) -> np.ndarray:
    """Write one shard: rows whose (item id, text) the old store holds are copied, the rest embedded.
    Returns the rows' token counts."""
    emb = np.empty((len(ids), *run.row_shape), dtype=run.dtype)
    n_tokens = np.zeros(len(ids), dtype=np.int32)
    need: list[int] = []
    by_file: dict[str, tuple[list[int], list[int]]] = {}  # old shard → (rows here, rows there)
    for r, key in enumerate(zip(ids, shas, strict=True)):
        hit = old_rows.get(key)
        if hit is None:
            need.append(r)
        else:
            here, there = by_file.setdefault(hit[0], ([], []))
            here.append(r)
            there.append(hit[1])
    for file, (here, there) in by_file.items():
        emb[here] = old_arrays[file][there]
        n_tokens[here] = np.asarray(map_dataset(run.folder / SHARDS / file, "n_tokens"))[there]
    run.stats["reused"] += len(ids) - len(need)
    if need:
        _embed_missing(run, path.stem, ids, shas, texts, np.array(need, dtype=np.int64), emb, n_tokens, bar)
    write_h5(path, {"emb": emb, "n_tokens": n_tokens}, {"key_sha256": run.key_sha, "content_sha256": content,
                                                        "start": start})
    shutil.rmtree(run.folder / PARTIAL / path.stem, ignore_errors=True)
    run.stats["written_shards"] += 1
    return n_tokens
