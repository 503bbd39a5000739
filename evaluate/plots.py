"""The paper's Fig. 3, learning curves and efficiency bars as PNG files (matplotlib, Agg canvas, no pyplot).

Every function takes the results store (a polars DataFrame) and an output path, writes the PNG atomically and
returns its path, or returns None when the results hold nothing to plot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from evaluate.results import atomic_target, read_epochs
from evaluate.tables import (
    DATASET_ORDER,
    LLM_ORDER,
    METHOD_ORDER,
    dataset_label,
    hparam,
    llm_label,
    method_label,
    ordered,
    summarise,
    with_config_key,
)


def _new_figure(n_panels: int, width: float = 4.0, height: float = 3.2, max_cols: int = 4) -> tuple[Figure, list]:
    """A constrained-layout figure on an Agg canvas with ``n_panels`` axes in a grid of at most max_cols columns."""
    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _group_key(dataset: str, llm: str) -> tuple:
    """Sort key for (dataset, LLM) panels: the paper's dataset order, then the LLM order."""
    d = DATASET_ORDER.index(dataset) if dataset in DATASET_ORDER else len(DATASET_ORDER)
    m = LLM_ORDER.index(llm) if llm in LLM_ORDER else len(LLM_ORDER)
    return (d, dataset, m, llm)


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically; the canvas grows to fit titles wider than the axes."""
    path = Path(path)
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def fig3_points(results: pl.DataFrame, method: str = "ssna") -> pl.DataFrame:
    """Per (dataset, llm, a): mean and std over seeds of test R@10 for the best-validation config with that a."""
    part = results.filter(pl.col("method") == method)
    if part.is_empty():
        return pl.DataFrame(schema={"dataset": pl.String, "llm": pl.String, "a": pl.Int64,
                                    "mean": pl.Float64, "std": pl.Float64, "n": pl.Int64})
    part = with_config_key(part).with_columns(pl.col("hparams").map_elements(lambda h: hparam(h, "a"), return_dtype=pl.Int64).alias("a"))
    part = part.filter(pl.col("a").is_not_null())
    best = (
        part.group_by("dataset", "llm", "a", "hparams")
        .agg(pl.col("valid_R@10").mean().alias("valid"), pl.col("test_R@10").mean().alias("mean"),
             pl.col("test_R@10").std().fill_null(0.0).alias("std"), pl.len().alias("n"))
        .sort(["valid", "n", "hparams"], descending=[True, True, False], nulls_last=True)
        .unique(subset=["dataset", "llm", "a"], keep="first", maintain_order=True)
    )
    return best.select("dataset", "llm", "a", "mean", "std", "n").sort("dataset", "llm", "a")


def plot_fig3(results: pl.DataFrame, path: Path) -> Path | None:
    """Fig. 3: SSNA test R@10 against a (number of adapted top layers), one panel per dataset, a line per LLM."""
    points = fig3_points(results)
    if points.is_empty():
        return None
    datasets = ordered(points["dataset"].to_list(), DATASET_ORDER)
    fig, axes = _new_figure(len(datasets))
    for ax, ds in zip(axes, datasets, strict=True):
        sub = points.filter(pl.col("dataset") == ds)
        for llm in ordered(sub["llm"].to_list(), LLM_ORDER):
            line = sub.filter(pl.col("llm") == llm).sort("a")
            ax.errorbar(line["a"].to_numpy(), line["mean"].to_numpy(), yerr=line["std"].to_numpy(),
                        marker="o", capsize=3, label=llm_label(llm))
        ax.set_title(dataset_label(ds))
        ax.set_xlabel("a (adapted top layers)")
        ax.set_ylabel("test R@10")
        ax.set_xticks(sorted(set(sub["a"].to_list())))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Fig. 3: SSNA over the number of layers to adapt")
    return save_figure(fig, path)


def plot_learning_curves(results: pl.DataFrame, path: Path,
                         epochs_loader: Callable[[Path], pl.DataFrame] = read_epochs) -> Path | None:
    """Validation R@10 per epoch per method (mean over the seeds of each reported config), a panel per
    (dataset, LLM). Runs whose epochs.parquet is missing are skipped."""
    summary = summarise(results)
    curves: dict[tuple[str, str], dict[str, pl.DataFrame]] = {}
    for row in summary.iter_rows(named=True):
        frames = []
        for run_dir in row["run_dirs"]:
            if run_dir is None:
                continue
            try:
                frames.append(epochs_loader(Path(run_dir)).select(pl.col("epoch").cast(pl.Int64), pl.col("valid_R@10").cast(pl.Float64)))
            except (FileNotFoundError, ValueError):
                continue
        if frames:
            curve = pl.concat(frames).group_by("epoch").agg(pl.col("valid_R@10").mean()).sort("epoch")
            curves.setdefault((row["dataset"], row["llm"]), {})[row["method"]] = curve
    if not curves:
        return None
    keys = sorted(curves, key=lambda k: _group_key(*k))
    fig, axes = _new_figure(len(keys))
    for ax, (ds, llm) in zip(axes, keys, strict=True):
        for meth in ordered(curves[(ds, llm)], METHOD_ORDER):
            c = curves[(ds, llm)][meth]
            ax.plot(c["epoch"].to_numpy(), c["valid_R@10"].to_numpy(), marker=".", label=method_label(meth))
        ax.set_title(f"{dataset_label(ds)} / {llm_label(llm)}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation R@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Learning curves")
    return save_figure(fig, path)


def plot_efficiency(results: pl.DataFrame, path: Path) -> Path | None:
    """Seconds per epoch and peak memory per method (log scale), grouped by (dataset, LLM).

    Hatched bars are extrapolated from bounded runs.
    """
    summary = summarise(results)
    if summary.is_empty() or summary.filter(pl.col("seconds_per_epoch").is_not_null() | pl.col("peak_memory_mb").is_not_null()).is_empty():
        return None
    groups = sorted({(r["dataset"], r["llm"]) for r in summary.iter_rows(named=True)}, key=lambda k: _group_key(*k))
    methods = ordered(summary["method"].to_list(), METHOD_ORDER)
    lookup = {(r["dataset"], r["llm"], r["method"]): r for r in summary.iter_rows(named=True)}
    fig, axes = _new_figure(2, width=min(16.0, 3.0 + 0.18 * len(groups) * len(methods)), height=3.4, max_cols=1)
    width = 0.8 / len(methods)
    x = np.arange(len(groups))
    panels = (("seconds_per_epoch", 1.0, "seconds per epoch"), ("peak_memory_mb", 1 / 1024, "peak memory (GB)"))
    for ax, (column, scale, label) in zip(axes, panels, strict=True):
        for i, meth in enumerate(methods):
            vals, hatches = [], []
            for ds, llm in groups:
                r = lookup.get((ds, llm, meth))
                v = None if r is None else r[column]
                vals.append(math.nan if v is None or v <= 0 else v * scale)
                hatches.append("//" if column == "seconds_per_epoch" and r is not None and r["seconds_extrapolated"] else "")
            bars = ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=method_label(meth))
            for bar, hatch in zip(bars, hatches, strict=True):
                bar.set_hatch(hatch)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(x, [f"{dataset_label(ds)}\n{llm_label(llm)}" for ds, llm in groups])
        ax.set_ylabel(label + " (log)")
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Training efficiency (hatched: extrapolated from a bounded run)")
    return save_figure(fig, path)
