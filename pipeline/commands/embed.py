"""``ssnarec embed`` (stage one: fill the embedding store) and ``ssnarec store ls`` (what is cached)."""

from __future__ import annotations

import logging
import time

import polars as pl
import typer

from featurestore import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_MAX_LENGTH,
    LLMS,
    LLMUnavailable,
    StoreError,
    embed_items,
    list_stores,
)
from featurestore.distributed import is_main
from featurestore.embed import DEFAULT_SHARD_BYTES, PRECISIONS
from featurestore.wheels import WheelError
from pipeline import workspace
from pipeline.datasets import DatasetError, load

store_app = typer.Typer(help="The stage-one embedding store: list what is cached.", no_args_is_help=True)


def split_list(value: str) -> list[str]:
    """'a, b,c' → ['a', 'b', 'c'] (order kept, duplicates and blanks dropped)."""
    return list(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def embed_cmd(
    dataset: str = typer.Option("sci", "--dataset", "-d", help="Prepared dataset name(s), comma-separated.",
                                show_default=True),
    llm: str = typer.Option("minilm", "--llm", "-l", help=f"LLM(s), comma-separated: {', '.join(LLMS)}, a Hugging "
                            "Face id, or a local model folder; with ':mean' appended (minilm:mean) each layer is "
                            "the mean over the text's tokens instead of its [CLS] state.", show_default=True),
    max_length: int = typer.Option(DEFAULT_MAX_LENGTH, "--max-length", help="Tokens per text, [CLS] and [SEP] "
                                   "included; longer texts are cut on the right.", show_default=True),
    batch_tokens: int = typer.Option(DEFAULT_BATCH_TOKENS, "--batch-tokens", help="Token budget of one batch "
                                     "(texts sorted by length; batch size x longest text <= this).",
                                     show_default=True),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N.",
                               show_default=True),
    dtype: str = typer.Option("fp16", "--dtype", help="Stored dtype: fp16 or fp32.", show_default=True),
    precision: str = typer.Option("auto", "--precision", help=f"Compute precision: {', '.join(PRECISIONS)} (auto: "
                                  "bf16 where supported and within cosine 0.999 of fp32).", show_default=True),
    shard_mib: int = typer.Option(DEFAULT_SHARD_BYTES >> 20, "--shard-mib", help="Largest shard file, MiB.",
                                  show_default=True),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.",
                                  show_default=True),
) -> None:
    """Stage one: store every layer's [CLS] (or, with LLM:mean, mean-pooled) embedding of every item text (a cache
    hit when nothing changed).

    Under torchrun (`make embeddings NPROC=N`) the processes share the items; only rank 0 prints."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    store_root, cache_dir = workspace.store_dir(), workspace.cache_dir()
    for name in split_list(dataset):
        try:
            data = load(name)
        except DatasetError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        items = data.items
        item_ids = items["item_id"].cast(pl.Utf8).to_list()
        texts = items["text"].fill_null("").to_list()
        for model in split_list(llm):
            started = time.perf_counter()
            try:
                store = embed_items(store_root, data.name, item_ids, texts, model, cache_dir=cache_dir,
                                    max_length=max_length, batch_tokens=batch_tokens, device=device, dtype=dtype,
                                    precision=precision, shard_bytes=shard_mib << 20, progress=progress)
            except (StoreError, LLMUnavailable, WheelError, ValueError) as exc:
                typer.echo(f"error: {data.name}/{model}: {exc}", err=True)
                raise typer.Exit(code=1) from None
            if not is_main():
                continue
            stats = store.run_stats or {}
            what = ("cache hit" if stats.get("cache_hit") else
                    f"embedded {stats.get('embedded', 0)}, resumed {stats.get('resumed', 0)}, "
                    f"reused {stats.get('reused', 0)}")
            typer.echo(f"{data.name}/{model}: {store.n_items} items × {store.n_layers} layers × {store.hidden} "
                       f"{store.manifest['dtype']}, {human_bytes(store.nbytes)} in {store.folder} — {what}, "
                       f"{time.perf_counter() - started:.1f} s")


@store_app.command("ls")
def store_ls() -> None:
    """List cached stores: dataset, llm, layers, hidden, items, dtype, bytes, shards, created."""
    rows = list_stores(workspace.store_dir())
    if not rows:
        typer.echo(f"no stores under {workspace.store_dir()} (run `ssnarec embed` first)")
        return
    header = ("dataset", "llm", "layers", "hidden", "items", "dtype", "bytes", "shards", "created")
    table = [header] + [(r["dataset"], r["llm"], str(r["layers"]), str(r["hidden"]), str(r["items"]), r["dtype"],
                         human_bytes(r["bytes"]), str(r["shards"]), r["created"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def register(app: typer.Typer) -> None:
    """Add ``embed`` and the ``store`` group to the top-level app."""
    app.command("embed")(embed_cmd)
    app.add_typer(store_app, name="store")
