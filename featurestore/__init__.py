"""Stage one: the on-disk store of per-layer embeddings ([CLS] or mean-pooled) of every item text (HDF5 + Parquet +
manifest).

Public API: ``embed_items`` (write or update a store), ``open_store`` (read it: ``Store.top_layers(a)``),
``LLMS``/``load_llm`` (the LLM registry and the one model loader), and the errors.
"""

from featurestore.embed import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_LENGTH, embed_items
from featurestore.llms import LLMS, LLMSpec, LLMUnavailable, llm_slug, load_llm, resolve_llm
from featurestore.store import (
    Store,
    StoreCorrupt,
    StoreError,
    StoreMissing,
    list_stores,
    open_store,
    store_path,
)

__all__ = [
    "DEFAULT_BATCH_TOKENS", "DEFAULT_MAX_LENGTH", "LLMS", "LLMSpec", "LLMUnavailable", "Store", "StoreCorrupt",
    "StoreError", "StoreMissing", "embed_items", "list_stores", "llm_slug", "load_llm", "open_store",
    "resolve_llm", "store_path",
]
