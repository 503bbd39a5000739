"""``ssnarec eval`` (the paper's tables from the results store) and ``ssnarec report`` (one markdown page).

The evaluate package (scipy, matplotlib) is imported inside the commands so that ``ssnarec --help`` and the
other commands start fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from pipeline import workspace

if TYPE_CHECKING:
    import polars as pl

DATASET_HELP = "Only these datasets (comma-separated, e.g. sci,ins); empty = all in the results store."
LLM_HELP = "Only these LLMs (comma-separated, e.g. minilm,distilbert); empty = all in the results store."
RESULTS_HELP = "Results store to read; empty = $SSNAREC_HOME/results.parquet."
LOSS_HELP = ("Only runs trained with this loss: inbatch (the paper's Eq. 8) or full (softmax over all items); "
             "the two never share a table.")
ITEM_IDS_HELP = ("Only runs whose items carried a learned ID embedding (train --item-ids), or only text-only "
                 "runs (the paper's); the two never share a table.")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _load(value: str) -> tuple[Path, pl.DataFrame]:
    """The results store at --results (or the workspace's); a damaged store exits with its message."""
    from evaluate.results import load_results

    path = _results_path(value)
    try:
        return path, load_results(path)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from err


def _check_loss(value: str) -> None:
    """Exit 2 with evaluate's message when --loss names no training loss (before any table is built)."""
    from evaluate.tables import check_loss

    try:
        check_loss(value)
    except ValueError as err:
        typer.echo(f"error: --loss: {err}", err=True)
        raise typer.Exit(code=2) from err


def _results_path(value: str) -> Path:
    from evaluate.results import RESULTS_FILE

    return Path(value).expanduser() if value else workspace.home() / RESULTS_FILE


def eval_command(
    dataset: str = typer.Option("", "--dataset", help=DATASET_HELP, show_default="all"),
    llm: str = typer.Option("", "--llm", help=LLM_HELP, show_default="all"),
    results: str = typer.Option("", "--results", help=RESULTS_HELP, show_default="$SSNAREC_HOME/results.parquet"),
    loss: str = typer.Option("inbatch", "--loss", help=LOSS_HELP, show_default=True),
    item_ids: bool = typer.Option(False, "--item-ids/--text-only", help=ITEM_IDS_HELP, show_default=True),
    markdown: bool = typer.Option(False, "--markdown/--text", help="Print markdown instead of plain text.", show_default=True),
) -> None:
    """Print the paper's tables (2–8) from whatever runs exist and write them under reports/."""
    from evaluate.tables import build_tables, render_markdown, render_text, write_tables

    path, frame = _load(results)
    _check_loss(loss)
    tables = build_tables(frame, datasets=_split(dataset), llms=_split(llm), loss=loss, item_ids=item_ids)
    if not tables:
        typer.echo(f"No finished runs in {path}" + (" for that filter" if frame.height else "")
                   + "; train some first, e.g. `make train METHOD=ssna DATASET=sci LLM=minilm`.")
        raise typer.Exit(code=0)
    render = render_markdown if markdown else render_text
    typer.echo("\n".join(render(t) for t in tables))
    md_path, txt_path = write_tables(tables, workspace.reports_dir())
    typer.echo(f"Wrote {md_path} and {txt_path}")


def report_command(
    dataset: str = typer.Option("", "--dataset", help=DATASET_HELP, show_default="all"),
    llm: str = typer.Option("", "--llm", help=LLM_HELP, show_default="all"),
    results: str = typer.Option("", "--results", help=RESULTS_HELP, show_default="$SSNAREC_HOME/results.parquet"),
    loss: str = typer.Option("inbatch", "--loss", help=LOSS_HELP, show_default=True),
    item_ids: bool = typer.Option(False, "--item-ids/--text-only", help=ITEM_IDS_HELP, show_default=True),
) -> None:
    """Write reports/report.md with the tables and the figures (Fig. 3, learning curves, efficiency)."""
    from evaluate.report import write_report

    path, frame = _load(results)
    _check_loss(loss)
    report = write_report(frame, workspace.reports_dir(), datasets=_split(dataset),
                          llms=_split(llm), loss=loss, item_ids=item_ids, source=str(path))
    typer.echo(str(report))


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``report`` to the top-level app."""
    app.command("eval")(eval_command)
    app.command("report")(report_command)
