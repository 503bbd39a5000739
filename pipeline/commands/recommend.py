"""``ssnarec recommend``: the top-k items a trained run recommends after a given history."""

from __future__ import annotations

import typer


def recommend_cmd(
    run: str = typer.Option(..., "--run", help="Run id (a folder under $SSNAREC_HOME/runs with best.pt)."),
    history: str = typer.Option(..., "--history", help="Item ids the user interacted with, oldest first, "
                                "separated by spaces or commas."),
    k: int = typer.Option(10, "-k", "--top-k", help="How many items to recommend.", show_default=True),
    exclude_history: bool = typer.Option(True, "--exclude-history/--keep-history", help="Leave out items the "
                                         "user already has.", show_default=True),
) -> None:
    """Print the top-k items with their scores and texts."""
    from pipeline.datasets import DatasetError
    from pipeline.stages import StageError, recommend

    items = [part for part in history.replace(",", " ").split() if part]
    try:
        rows = recommend(run, items, k, exclude_history)
    except (StageError, DatasetError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    for rank, row in enumerate(rows, 1):
        typer.echo(f"{rank:>3}  {row['score']:.4f}  {row['item_id']}  {row['text']}")


def register(app: typer.Typer) -> None:
    """Add ``recommend`` to the top-level app."""
    app.command("recommend")(recommend_cmd)
