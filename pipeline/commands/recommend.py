"""``ssnarec recommend``: the top-k items a trained run recommends after a given history, or to the dataset's
users after their whole sequences (printed, or written to a Parquet file)."""

from __future__ import annotations

from pathlib import Path

import typer


def recommend_cmd(
    run: str = typer.Option(..., "--run", help="Run id (a folder under $SSNAREC_HOME/runs with best.pt)."),
    history: str = typer.Option("", "--history", help="Item ids the user interacted with, oldest first, "
                                "separated by spaces or commas.", show_default="none"),
    users: str = typer.Option("", "--users", help="Instead of --history: user ids of the run's dataset "
                              "(comma-separated) or 'all'; each gets the items that would come after their "
                              "whole sequence (the test item included).", show_default="none"),
    k: int = typer.Option(10, "-k", "--top-k", help="How many items to recommend.", show_default=True),
    exclude_history: bool = typer.Option(True, "--exclude-history/--keep-history", help="Leave out items the "
                                         "user already has.", show_default=True),
    out: str = typer.Option("", "--out", help="With --users: write the recommendations to this Parquet file "
                            "(user_id, rank, item_id, score; written whole or not at all) instead of printing "
                            "them.", show_default="print"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (--users).",
                                  show_default=True),
) -> None:
    """Print the top-k items with their scores and texts, after a history or for the dataset's users."""
    from pipeline.datasets import DatasetError
    from pipeline.stages import StageError, recommend, recommend_users

    if bool(history) == bool(users):
        typer.echo("error: give exactly one of --history (item ids) and --users (user ids or 'all')", err=True)
        raise typer.Exit(code=2)
    if out and not users:
        typer.echo("error: --out writes the recommendations of --users; with --history they are printed", err=True)
        raise typer.Exit(code=2)
    if k < 1:
        typer.echo(f"error: --top-k must be at least 1, got {k}", err=True)
        raise typer.Exit(code=2)
    try:
        if history:
            items = [part for part in history.replace(",", " ").split() if part]
            for rank, row in enumerate(recommend(run, items, k, exclude_history), 1):
                typer.echo(f"{rank:>3}  {row['score']:.4f}  {row['item_id']}  {row['text']}")
            return
        wanted = None if users.strip() == "all" else list(dict.fromkeys(u.strip() for u in users.split(",")
                                                                          if u.strip()))
        if wanted == []:
            typer.echo("error: --users names no user; give user ids (comma-separated) or 'all'", err=True)
            raise typer.Exit(code=2)
        table = recommend_users(run, wanted, k, exclude_history, progress=progress)
    except (StageError, DatasetError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    if out:
        from featurestore.store import atomic_path

        target = Path(out).expanduser()
        try:
            if target.is_dir():
                raise IsADirectoryError(f"{target} is a folder; give a file name such as {target / 'recs.parquet'}")
            with atomic_path(target) as tmp:
                table.write_parquet(tmp)
        except OSError as exc:
            typer.echo(f"error: cannot write {target}: {exc}", err=True)
            raise typer.Exit(code=1) from None
        typer.echo(f"Wrote {table.height} recommendations for {table['user_id'].n_unique()} users to {target}")
        return
    for row in table.iter_rows(named=True):
        typer.echo(f"{row['user_id']}  {row['rank']:>3}  {row['score']:.4f}  {row['item_id']}")


def register(app: typer.Typer) -> None:
    """Add ``recommend`` to the top-level app."""
    app.command("recommend")(recommend_cmd)
