"""``ssnarec eval`` (the paper's tables from the results store) and ``ssnarec report`` (one markdown page).

The evaluate package (scipy, matplotlib) is imported inside the commands so that ``ssnarec --help`` and the
other commands start fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from evaluate import DEFAULT_TIES
from pipeline import workspace

if TYPE_CHECKING:
    import polars as pl

DATASET_HELP = "Only these datasets (comma-separated, e.g. sci,ins); empty = all in the results store."
LLM_HELP = "Only these LLMs (comma-separated, e.g. minilm,distilbert); empty = all in the results store."
RESULTS_HELP = "Results store to read; empty = $SSNAREC_HOME/results.parquet."
LOSS_HELP = ("Only runs trained with this loss: inbatch (the paper's Eq. 8) or full (softmax over all items); "
             "the two never share a table.")
HISTORY_HELP = ("Only runs evaluated under this candidate protocol: keep (history items stay candidates, RecBole's "
                "convention) or exclude (MoRec's; `train --exclude-history`, or `ssnarec retest`); the two never "
                "share a table.")
TIE_RULES = ("pessimistic (a tie counts against the target), expected (the mid-rank of a random order among the "
             "tied items) or index (lower item index first)")
TIES_HELP = (f"Only runs ranked under this tie rule: {TIE_RULES}; `ssnarec retest --ties` re-ranks finished runs. "
             "The rules never share a table.")
ITEM_IDS_HELP = ("Only runs whose items carried a learned ID embedding (train --item-ids), or only text-only "
                 "runs (the paper's); the two never share a table.")
HISTORY_BIAS_HELP = ("Only runs that learned a score for the items of a history (train --history-bias), or only "
                     "runs without (the paper's); the two never share a table.")

# the filters shared by eval, report and retest, declared once (each command gives its default)
DatasetFilter = Annotated[str, typer.Option("--dataset", help=DATASET_HELP, show_default="all")]
LLMFilter = Annotated[str, typer.Option("--llm", help=LLM_HELP, show_default="all")]
ResultsPath = Annotated[str, typer.Option("--results", help=RESULTS_HELP,
                                          show_default="$SSNAREC_HOME/results.parquet")]
LossFilter = Annotated[str, typer.Option("--loss", help=LOSS_HELP, show_default=True)]
ItemIdsFilter = Annotated[bool, typer.Option("--item-ids/--text-only", help=ITEM_IDS_HELP, show_default=True)]
HistoryBiasFilter = Annotated[bool, typer.Option("--history-bias/--no-history-bias", help=HISTORY_BIAS_HELP,
                                                 show_default=True)]
HistoryFilter = Annotated[str, typer.Option("--history", help=HISTORY_HELP, show_default=True)]
TiesFilter = Annotated[str, typer.Option("--ties", help=TIES_HELP, show_default=True)]


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


def _check_filters(loss: str | None = None, history: str | None = None, ties: str | None = None) -> None:
    """Exit 2 with evaluate's message when --loss names no training loss, --history no candidate protocol or
    --ties no tie rule (before any table is built or run evaluated); None is not checked."""
    from evaluate.tables import check_history, check_loss, check_ties

    for flag, check, value in (("--loss", check_loss, loss), ("--history", check_history, history),
                               ("--ties", check_ties, ties)):
        if value is None:
            continue
        try:
            check(value)
        except ValueError as err:
            typer.echo(f"error: {flag}: {err}", err=True)
            raise typer.Exit(code=2) from err


def _results_path(value: str) -> Path:
    from evaluate.results import RESULTS_FILE

    return Path(value).expanduser() if value else workspace.home() / RESULTS_FILE


def eval_command(
    dataset: DatasetFilter = "",
    llm: LLMFilter = "",
    results: ResultsPath = "",
    loss: LossFilter = "inbatch",
    item_ids: ItemIdsFilter = False,
    history_bias: HistoryBiasFilter = False,
    history: HistoryFilter = "keep",
    ties: TiesFilter = DEFAULT_TIES,
    markdown: bool = typer.Option(False, "--markdown/--text", help="Print markdown instead of plain text.", show_default=True),
) -> None:
    """Print the paper's tables (2–8) from whatever runs exist and write them under reports/."""
    from evaluate.tables import build_tables, render_markdown, render_text, write_tables

    path, frame = _load(results)
    _check_filters(loss, history, ties)
    tables = build_tables(frame, datasets=_split(dataset), llms=_split(llm), loss=loss, item_ids=item_ids,
                          history=history, ties=ties, history_bias=history_bias)
    if not tables:
        typer.echo(f"No finished runs in {path}" + (" for that filter" if frame.height else "")
                   + "; train some first, e.g. `make train METHOD=ssna DATASET=sci LLM=minilm`.")
        raise typer.Exit(code=0)
    render = render_markdown if markdown else render_text
    typer.echo("\n".join(render(t) for t in tables))
    md_path, txt_path = write_tables(tables, workspace.reports_dir())
    typer.echo(f"Wrote {md_path} and {txt_path}")


def report_command(
    dataset: DatasetFilter = "",
    llm: LLMFilter = "",
    results: ResultsPath = "",
    loss: LossFilter = "inbatch",
    item_ids: ItemIdsFilter = False,
    history_bias: HistoryBiasFilter = False,
    history: HistoryFilter = "keep",
    ties: TiesFilter = DEFAULT_TIES,
) -> None:
    """Write reports/report.md with the tables and the figures (Fig. 3, learning curves, efficiency)."""
    from evaluate.report import write_report

    path, frame = _load(results)
    _check_filters(loss, history, ties)
    report = write_report(frame, workspace.reports_dir(), datasets=_split(dataset), llms=_split(llm), loss=loss,
                          item_ids=item_ids, history=history, ties=ties, history_bias=history_bias,
                          source=str(path))
    typer.echo(str(report))


def retest_command(
    runs: list[str] | None = typer.Argument(None, help="Run ids to re-evaluate.", show_default="every finished "
                                            "run that matches the filters"),
    dataset: DatasetFilter = "",
    llm: LLMFilter = "",
    method: str = typer.Option("", "--method", help="Only these methods (comma-separated).", show_default="all"),
    exclude_history: bool = typer.Option(True, "--exclude-history/--keep-history", help="The protocol to "
                                         "evaluate under: MoRec's (history items are not candidates) or "
                                         "RecBole's (they are).", show_default=True),
    ties: str = typer.Option(DEFAULT_TIES, "--ties", help=f"The tie rule to rank under: {TIE_RULES}.",
                             show_default=True),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.", show_default=True),
    overwrite: bool = typer.Option(False, "--overwrite", help="Evaluate runs re-evaluated before again (after a "
                                   "change to the evaluator, or to repair a damaged folder), replacing their "
                                   "files and results rows.", show_default=True),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Evaluate finished runs again under another protocol (candidates, tie rule), without training: their best
    checkpoint is scored on validation and test, and each result is recorded as runs/<run-id>.<protocol>/ and a
    results row (shown by `ssnarec eval --history exclude|keep --ties RULE`). Runs already re-evaluated are
    skipped unless --overwrite."""
    from tqdm.auto import tqdm

    from evaluate.results import CHOSEN_UNDER
    from evaluate.tables import filter_results, hparam, run_history, run_ties
    from pipeline.datasets import DatasetError
    from pipeline.stages import StageError, run_retest
    from train.loop import RunStateError

    _check_filters(ties=ties)
    wanted = ("exclude" if exclude_history else "keep", ties)
    _, frame = _load("")
    frame = filter_results(frame, _split(dataset), _split(llm), loss=None, item_ids=None, history=None, ties=None,
                           history_bias=None)
    if method:
        frame = frame.filter(frame["method"].is_in(_split(method)))
    frame = frame.filter(frame["hparams"].map_elements(
        lambda h: hparam(h, CHOSEN_UNDER) is None and (run_history(h), run_ties(h)) != wanted, return_dtype=bool))
    chosen = frame["run_id"].to_list()
    if runs:
        unknown = [r for r in runs if r not in chosen]
        if unknown:
            typer.echo(f"error: not finished runs evaluated under another protocol (matching the filters): "
                       f"{', '.join(unknown)}. `ssnarec eval` lists the finished runs.", err=True)
            raise typer.Exit(code=1)
        chosen = list(runs)
    if not chosen:
        typer.echo("No finished runs to re-evaluate for that filter.")
        raise typer.Exit(code=0)
    failed = []
    for run_id in tqdm(chosen, desc="retest", unit="run", disable=not progress):
        try:
            result = run_retest(run_id, exclude_history, device, overwrite=overwrite, ties=ties)
        except (DatasetError, StageError, RunStateError, KeyError, ValueError) as exc:
            tqdm.write(f"error: {run_id}: {exc}", file=sys.stderr)
            failed.append(run_id)
            continue
        row = result.row
        metrics = "  ".join(f"{m} {row[f'test_{m}']:.4f}" for m in ("R@10", "R@50", "N@10", "N@50"))
        state = " (done before)" if result.skipped else ""
        tqdm.write(f"{row['run_id']}{state}: test {metrics}")
    if failed:
        typer.echo(f"error: {len(failed)} of {len(chosen)} run(s) not re-evaluated: {', '.join(failed)}", err=True)
        raise typer.Exit(code=1)


def references_command(
    dataset: str = typer.Option("sci", "--dataset", help="Prepared dataset name.", show_default=True),
    llm: str = typer.Option("", "--llm", help="Stage-one store for the last-item neighbour (NAME or NAME:mean); "
                            "empty = popularity only.", show_default="none"),
    layer: int = typer.Option(0, "--layer", help="Stored layer the neighbour reads: 0 = top, 1 = one below, …",
                              show_default=True),
    exclude_history: bool = typer.Option(False, "--exclude-history/--keep-history", help="MoRec's protocol "
                                         "(history items are not candidates) or RecBole's.", show_default=True),
    split: str = typer.Option("test", "--split", help="test or valid.", show_default=True),
    ties: str = typer.Option(DEFAULT_TIES, "--ties", help=f"Tie rule: {TIE_RULES}.", show_default=True),
) -> None:
    """Training-free reference points on the runs' split and protocol: item popularity and the nearest
    neighbour of the last item (a trained text model that does not clearly beat the latter has a bug)."""
    from evaluate import METRIC_NAMES
    from pipeline.datasets import DatasetError
    from pipeline.stages import StageError, reference_points

    try:
        rows = reference_points(dataset, llm or None, layer, exclude_history, split, ties)
    except (DatasetError, StageError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    protocol = "history excluded (MoRec)" if exclude_history else "history kept (RecBole)"
    typer.echo(f"{dataset}, {split} split, full ranking, {protocol}, ties {ties}")
    typer.echo(f"| reference | {' | '.join(METRIC_NAMES)} |\n|---|{'---:|' * len(METRIC_NAMES)}")
    for row in rows:
        typer.echo(f"| {row['reference']} | {' | '.join(f'{row[m]:.4f}' for m in METRIC_NAMES)} |")


def register(app: typer.Typer) -> None:
    """Add ``eval``, ``report``, ``retest`` and ``references`` to the top-level app."""
    app.command("eval")(eval_command)
    app.command("report")(report_command)
    app.command("retest")(retest_command)
    app.command("references")(references_command)
