"""``ssnarec data prepare NAME`` and ``ssnarec data stats NAME``: datasets into the canonical format."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer

from pipeline.datasets import DATASETS, DatasetError, load, prepare

data_app = typer.Typer(help="Datasets: prepare the canonical format, print statistics.", no_args_is_help=True)

_NAME_HELP = f"A registered dataset ({', '.join(DATASETS)}) or a folder (named by its basename)."
_COLUMNS = ("users", "items", "interactions", "per_user", "per_item")


def table1_lines(name: str, stats: dict) -> list[str]:
    """The Table-1 header and row, tab-separated, plain integers and one decimal for the ratios."""
    row = [name, str(stats["users"]), str(stats["items"]), str(stats["interactions"]),
           f"{stats['per_user']:.1f}", f"{stats['per_item']:.1f}"]
    return ["\t".join(("dataset", *_COLUMNS)), "\t".join(row)]


def _fail(exc: DatasetError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code=1)


@data_app.command("prepare")
def prepare_cmd(
    name: str = typer.Argument(..., help=_NAME_HELP),
    from_dir: Path | None = typer.Option(
        None, "--from", help="Source folder: a UniSRec processed folder, raw Amazon 2018 files, or (ml100k) "
        "ml-100k.inter + ml-100k.item.", show_default="$SSNAREC_HOME/raw/<Category>/; the recbole wheel for ml100k"),
    strict: bool = typer.Option(False, "--strict/--no-strict", help="Stop at the first malformed line or missing "
                                "field instead of skipping, counting and summarising them.", show_default=True),
) -> None:
    """Write $SSNAREC_HOME/data/NAME/ (items.parquet, sequences.parquet, meta.json) and print its Table-1 row."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    started = time.perf_counter()
    try:
        folder = prepare(name, from_dir=from_dir, strict=strict)
        dataset = load(str(folder))
    except DatasetError as exc:
        raise _fail(exc) from None
    typer.echo(f"wrote {folder} in {time.perf_counter() - started:.1f} s")
    for line in table1_lines(dataset.name, dataset.stats()):
        typer.echo(line)


@data_app.command("stats")
def stats_cmd(name: str = typer.Argument(..., help=_NAME_HELP)) -> None:
    """Print the paper's Table-1 row of a prepared dataset: users, items, interactions, per user, per item."""
    try:
        dataset = load(name)
    except DatasetError as exc:
        raise _fail(exc) from None
    for line in table1_lines(dataset.name, dataset.stats()):
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add the ``data`` command group to the top-level app."""
    app.add_typer(data_app, name="data")
