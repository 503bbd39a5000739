"""One markdown page (report.md) that shows the tables and links the figures, written under a reports folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from evaluate.plots import plot_efficiency, plot_fig3, plot_learning_curves
from evaluate.results import read_epochs, read_per_user, write_text_atomic
from evaluate.tables import (
    DEFAULT_HISTORY,
    DEFAULT_LOSS,
    DEFAULT_TIES,
    HISTORY_LABELS,
    LOSS_LABELS,
    TIES_LABELS,
    PerUserLoader,
    build_tables,
    filter_results,
    render_markdown,
    write_tables,
)

FIGURES: tuple[tuple[str, str], ...] = (
    ("fig3_layers.png", "Fig. 3: SSNA test R@10 against the number of adapted layers a"),
    ("learning_curves.png", "Learning curves: validation R@10 per epoch"),
    ("efficiency.png", "Efficiency: seconds per epoch and peak memory (log scale)"),
)


def write_report(results: pl.DataFrame, reports_dir: Path, *, datasets: Sequence[str] | None = None,
                 llms: Sequence[str] | None = None, loss: str = DEFAULT_LOSS, item_ids: bool = False,
                 history: str = DEFAULT_HISTORY, ties: str = DEFAULT_TIES, history_bias: bool = False,
                 per_user_loader: PerUserLoader = read_per_user,
                 epochs_loader: Callable[[Path], pl.DataFrame] = read_epochs, source: str | None = None) -> Path:
    """Write tables.md/.txt, the three figures and report.md into ``reports_dir``; return report.md's path.

    Figures with nothing to plot are listed as missing rather than drawn empty; a stale PNG from an earlier
    report is removed so the page never links an outdated figure.
    """
    reports_dir = Path(reports_dir)
    results = filter_results(results, datasets, llms, loss, item_ids, history, ties, history_bias)
    tables = build_tables(results, loss=loss, item_ids=item_ids, history=history, ties=ties,
                          history_bias=history_bias, per_user_loader=per_user_loader)
    write_tables(tables, reports_dir)
    makers = {
        "fig3_layers.png": lambda p: plot_fig3(results, p),
        "learning_curves.png": lambda p: plot_learning_curves(results, p, epochs_loader),
        "efficiency.png": lambda p: plot_efficiency(results, p),
    }
    now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    n_runs = results.height
    lines = [
        "# ssnarec report",
        "",
        f"Generated {now} from {n_runs} finished run(s)" + (f" in `{source}`" if source else "")
        + f" trained with the loss {loss} ({LOSS_LABELS[loss]})"
        + (", items with a learned ID embedding (--item-ids)" if item_ids else "")
        + (", a learned score for history items (--history-bias)" if history_bias else "")
        + f"; candidates: every item, {HISTORY_LABELS[history]}"
        + ("." if ties == DEFAULT_TIES else f"; ties: {TIES_LABELS[ties]}."),
    ]
    if n_runs:
        lines.append(
            f"Datasets: {', '.join(sorted(set(results['dataset'].to_list())))}; "
            f"LLMs: {', '.join(sorted(set(results['llm'].to_list())))}; "
            f"methods: {', '.join(sorted(set(results['method'].to_list())))}."
        )
    lines += ["", "Plain-text tables: [tables.txt](tables.txt); markdown only: [tables.md](tables.md).", "", "## Figures", ""]
    for name, caption in FIGURES:
        target = reports_dir / name
        made = makers[name](target)
        if made is None:
            if target.exists():
                os.remove(target)
            lines += [f"- {caption}: no runs to plot yet.", ""]
        else:
            lines += [f"![{caption}]({name})", "", f"*{caption}.*", ""]
    lines += ["## Tables", ""]
    if tables:
        lines += [render_markdown(t) for t in tables]
    else:
        lines.append("No finished runs yet: train some (`make train`) and rerun `ssnarec report`.")
    path = reports_dir / "report.md"
    write_text_atomic("\n".join(lines).rstrip() + "\n", path)
    return path
