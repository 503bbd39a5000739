"""The paper's Tables 2–8 from the results store, as markdown and as plain text.

For every (dataset, LLM, method) the reported configuration is the one with the best mean validation R@10
over its seeds (the paper's protocol: grid search, select on validation R@10); its test metrics are the mean
over those seeds, shown with the seed count, e.g. ``0.1123 (3)``. A missing cell shows "—", never a value.

- Tables 2–4 (one per LLM): methods LoRA, ADA, Full, TMLP, TMoE, SSNA × datasets × R@10, R@50, N@10, N@50;
  best of each row in bold, second underlined.
- Table 5: SSNA's improvement over each baseline in %, averaged over datasets, starred when a paired t-test
  over users (per-user test metrics averaged over matched seeds, users pooled across datasets) gives
  p < 0.15 for a positive improvement (the paper's 85% confidence level).
- Tables 6–7: seconds per epoch (``†`` = extrapolated from a bounded run) and peak memory, best in bold.
- Table 8: MEAN, WEIGHTED and SSNA, best in bold.

A bounded run (``max_steps`` or ``limit_users`` set) was not trained to early stop: its time and memory count in
Tables 6–7, its metrics nowhere (a method with bounded runs only shows "—" in Tables 2–5 and 8, with a note).

The tables compare runs trained with one loss (default the paper's in-batch Eq. 8): a method trained with the
full softmax is not a better configuration of the same experiment, so the two never share a table. Likewise
runs whose items carry a learned ID embedding (``item_ids``) never share a table with text-only runs (default), and
runs that learned a score for history items (``history_bias``) never share one with runs that did not (default).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from evaluate import DEFAULT_TIES, METRIC_NAMES
from evaluate.results import CHOSEN_UNDER, read_per_user, write_text_atomic
from evaluate.stats import (
    SIGNIFICANCE_ALPHA,
    improvement_pct,
    is_significant,
    pair_users,
    paired_test_by_metric,
)

MISSING = "—"
EXTRAPOLATED_MARK = "†"
MAIN_METHODS: tuple[str, ...] = ("lora", "adalora", "full", "tmlp", "tmoe", "ssna")
BASELINES: tuple[str, ...] = ("lora", "adalora", "full", "tmlp", "tmoe")
INTEGRATION_METHODS: tuple[str, ...] = ("mean", "weighted", "ssna")
METHOD_ORDER: tuple[str, ...] = ("lora", "adalora", "full", "tmlp", "tmoe", "mean", "weighted", "ssna")
METHOD_LABELS: dict[str, str] = {
    "lora": "LoRA", "adalora": "ADA", "full": "Full", "tmlp": "TMLP", "tmoe": "TMoE",
    "mean": "MEAN", "weighted": "WEIGHTED", "ssna": "SSNA",
}
DATASET_ORDER: tuple[str, ...] = ("sci", "pantry", "tools", "toys", "ins")
DATASET_LABELS: dict[str, str] = {"sci": "Sci", "pantry": "Pantry", "tools": "Tools", "toys": "Toys", "ins": "Ins"}
LLM_ORDER: tuple[str, ...] = ("distilbert", "distilroberta", "bertmedium")
LLM_LABELS: dict[str, str] = {"distilbert": "DistilBERT", "distilroberta": "DistilRoBERTa", "bertmedium": "BERTMedium"}
PAPER_TABLE_NUMBER: dict[str, int] = {"distilbert": 2, "distilroberta": 3, "bertmedium": 4}
GROUP_KEYS: tuple[str, ...] = ("dataset", "llm", "method")
# hparams keys that identify a run or how it was executed, not the configuration whose seeds are averaged.
NON_CONFIG_KEYS: frozenset[str] = frozenset(
    {"seed", "run_id", "device", "threads", "eval_batch_size", "preload_features", "resume", "progress"})
# hparams keys that make a run bounded (not trained to early stop).
BOUNDING_KEYS: tuple[str, ...] = ("max_steps", "limit_users")
# Training losses (the ``loss`` hparam); runs recorded without one used the first, TrainConfig's default.
LOSS_LABELS: dict[str, str] = {"inbatch": "in-batch negatives (Eq. 8)", "full": "softmax over all items"}
DEFAULT_LOSS = "inbatch"
# Candidate protocols (the ``exclude_history`` hparam); a table holds runs evaluated under one of them only.
HISTORY_LABELS: dict[str, str] = {
    "keep": "items already in the history stay candidates (RecBole's and UniSRec's convention)",
    "exclude": "items already in the history are not candidates (MoRec's convention)",
}
DEFAULT_HISTORY = "keep"
# Tie rules (the ``ties`` hparam); a table holds runs ranked under one of them only.
TIES_LABELS: dict[str, str] = {
    "pessimistic": "a tie counts against the target (rank = 1 + the items scoring at least as high)",
    "expected": "a tie takes the expected rank of a random order among the tied items (mid-rank)",
    "index": "ties broken by item index, lower first (as evaluators built on a stable sort)",
}
PerUserLoader = Callable[[Path], pl.DataFrame]


@dataclass
class Cell:
    """One table cell: its text, the number used to rank it (None = missing), and its emphasis."""

    text: str
    value: float | None = None
    mark: int = 0  # 1 = best (bold), 2 = second best (underlined)


@dataclass
class Table:
    """A rendered-agnostic table: leading label columns are plain strings, the rest are cells."""

    key: str
    title: str
    header: list[str]
    rows: list[list[str | Cell]]
    notes: list[str] = field(default_factory=list)
    label_columns: int = 2  # leading columns aligned left; the rest (numbers) right


def ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    """The distinct ``values`` in the given canonical order, unknown ones after it alphabetically."""
    present = set(values)
    return [v for v in order if v in present] + sorted(present - set(order))


def dataset_label(name: str) -> str:
    """Display name of a dataset (Sci, Pantry, … or the name itself)."""
    return DATASET_LABELS.get(name, name)


def llm_label(name: str) -> str:
    """Display name of an LLM (DistilBERT, … or the name itself)."""
    return LLM_LABELS.get(name, name)


def method_label(name: str) -> str:
    """Display name of a method (LoRA, ADA, … or the name upper-cased)."""
    return METHOD_LABELS.get(name, name.upper())


def config_key(hparams_json: str | None) -> str:
    """A run's configuration: its hparams JSON with sorted keys, without the keys in NON_CONFIG_KEYS (seed,
    run id and execution settings that do not change the model), so that seeds of one setting group together."""
    try:
        params = json.loads(hparams_json) if hparams_json else {}
    except json.JSONDecodeError:
        return hparams_json or ""
    if isinstance(params, dict):
        params = {k: v for k, v in params.items() if k not in NON_CONFIG_KEYS}
    return json.dumps(params, sort_keys=True)


def is_bounded(key: str) -> bool:
    """Whether a configuration (``config_key``) bounds its runs by optimiser steps or users."""
    try:
        params = json.loads(key) if key else {}
    except json.JSONDecodeError:
        return False
    return isinstance(params, dict) and any(params.get(k) is not None for k in BOUNDING_KEYS)


def with_config_key(results: pl.DataFrame) -> pl.DataFrame:
    """Replace the hparams column by :func:`config_key` of it."""
    return results.with_columns(pl.col("hparams").map_elements(config_key, return_dtype=pl.String))


def summarise(results: pl.DataFrame) -> pl.DataFrame:
    """One row per (dataset, llm, method): the configuration with the best mean validation R@10, among the
    unbounded ones when there are any.

    Runs whose hparams differ only in NON_CONFIG_KEYS (seed, run_id, device, …) are seeds of one configuration.
    Columns: dataset, llm, method, hparams (the config key), bounded, n_seeds, seeds (list), run_dirs (list),
    valid_R@10, test_<metric> (means over seeds), seconds_per_epoch (mean), seconds_extrapolated (any),
    peak_memory_mb (mean), device (the first recorded). Ties on validation R@10 go to more seeds, then to the
    hparams string, so the choice is stable.
    """
    if results.is_empty():
        return results.select(*GROUP_KEYS, "hparams").with_columns(pl.lit(False).alias("bounded"),
                                                                    pl.lit(0).alias("n_seeds"))
    per_config = (
        with_config_key(results)
        .group_by(*GROUP_KEYS, "hparams")
        .agg(
            pl.len().alias("n_seeds"),
            pl.col("seed").alias("seeds"),
            pl.col("run_dir").alias("run_dirs"),
            pl.col("valid_R@10").mean(),
            *(pl.col(f"test_{m}").mean() for m in METRIC_NAMES),
            pl.col("seconds_per_epoch").mean(),
            pl.col("seconds_extrapolated").fill_null(False).any(),
            pl.col("peak_memory_mb").mean(),
            pl.col("device").drop_nulls().first(),
        )
        .with_columns(pl.col("hparams").map_elements(is_bounded, return_dtype=pl.Boolean).alias("bounded"))
        .sort(["bounded", "valid_R@10", "n_seeds", "hparams"], descending=[False, True, True, False],
              nulls_last=True)
    )
    return per_config.unique(subset=list(GROUP_KEYS), keep="first", maintain_order=True).sort(list(GROUP_KEYS))


def _lookup(summary: pl.DataFrame) -> dict[tuple[str, str, str], dict]:
    return {(r["dataset"], r["llm"], r["method"]): r for r in summary.iter_rows(named=True)}


def _quality_lookup(summary: pl.DataFrame) -> dict[tuple[str, str, str], dict]:
    """Like ``_lookup``, without bounded configurations: their metrics are not results."""
    return _lookup(summary.filter(~pl.col("bounded")))


def _bounded_note(summary: pl.DataFrame, llm: str, methods: Sequence[str]) -> list[str]:
    """A note naming the methods shown as "—" because they have bounded runs only."""
    part = summary.filter((pl.col("llm") == llm) & pl.col("method").is_in(list(methods)) & pl.col("bounded"))
    if part.is_empty():
        return []
    names = ", ".join(method_label(m) for m in ordered(part["method"].to_list(), METHOD_ORDER))
    return [f"{names}: bounded runs only (not trained to early stop), so no metrics here; their time and memory "
            "are in Tables 6–7."]


def mark_best(cells: Sequence[Cell], *, higher_is_better: bool = True, second: bool = True, digits: int = 4) -> None:
    """Mark the best cell(s) 1 and the second best 2, comparing values rounded to the shown precision.

    Nothing is marked when fewer than two cells have a value; equal values share a mark.
    """
    valued = [c for c in cells if c.value is not None]
    if len(valued) < 2:
        return
    distinct = sorted({round(c.value, digits) for c in valued}, reverse=higher_is_better)
    for c in valued:
        v = round(c.value, digits)
        if v == distinct[0]:
            c.mark = 1
        elif second and len(distinct) > 1 and v == distinct[1]:
            c.mark = 2


def _metric_cell(row: dict | None, metric: str) -> Cell:
    value = None if row is None else row.get(f"test_{metric}")
    if value is None:
        return Cell(MISSING)
    return Cell(f"{value:.4f} ({row['n_seeds']})", value)


def _performance_table(key: str, title: str, lookup: dict, llm: str, methods: Sequence[str], datasets: Sequence[str],
                       second: bool) -> Table:
    rows: list[list[str | Cell]] = []
    for ds in datasets:
        for i, m in enumerate(METRIC_NAMES):
            cells = [_metric_cell(lookup.get((ds, llm, meth)), m) for meth in methods]
            mark_best(cells, second=second)
            rows.append([dataset_label(ds) if i == 0 else "", m, *cells])
    return Table(key, title, ["Dataset", "Metric", *(method_label(x) for x in methods)], rows)


def _datasets_for(summary: pl.DataFrame, llm: str, methods: Sequence[str]) -> list[str]:
    part = summary.filter((pl.col("llm") == llm) & pl.col("method").is_in(list(methods)))
    return ordered(part["dataset"].to_list(), DATASET_ORDER)


def performance_tables(summary: pl.DataFrame) -> list[Table]:
    """Tables 2–4: one overall-performance table per LLM that has any main-method run."""
    lookup = _quality_lookup(summary)
    tables = []
    for llm in ordered(summary["llm"].to_list(), LLM_ORDER):
        datasets = _datasets_for(summary, llm, MAIN_METHODS)
        if not datasets:
            continue
        number = PAPER_TABLE_NUMBER.get(llm)
        title = f"Table {number}: Overall Performance ({llm_label(llm)})" if number else (
            f"Overall Performance ({llm_label(llm)}), layout of Tables 2–4")
        table = _performance_table(f"performance_{llm}", title, lookup, llm, MAIN_METHODS, datasets, second=True)
        table.notes.append("Test metrics of the configuration with the best validation R@10, mean over seeds (seed count).")
        table.notes += _bounded_note(summary, llm, MAIN_METHODS)
        tables.append(table)
    return tables


def integration_tables(summary: pl.DataFrame) -> list[Table]:
    """Table 8: MEAN, WEIGHTED and SSNA per LLM that has a MEAN or WEIGHTED run."""
    lookup = _quality_lookup(summary)
    tables = []
    for llm in ordered(summary["llm"].to_list(), LLM_ORDER):
        if summary.filter((pl.col("llm") == llm) & pl.col("method").is_in(["mean", "weighted"])).is_empty():
            continue
        datasets = _datasets_for(summary, llm, INTEGRATION_METHODS)
        table = _performance_table(f"integration_{llm}", f"Table 8: Comparison on Integration Strategy ({llm_label(llm)})",
                                   lookup, llm, INTEGRATION_METHODS, datasets, second=False)
        table.notes.append("Best of each row in bold.")
        table.notes += _bounded_note(summary, llm, INTEGRATION_METHODS)
        tables.append(table)
    return tables


def _per_user_by_seed(row: dict, loader: PerUserLoader) -> dict[int, pl.DataFrame] | None:
    """Per-user test metrics of every seed of a summarised configuration; None if any is missing."""
    out: dict[int, pl.DataFrame] = {}
    for seed, run_dir in zip(row["seeds"], row["run_dirs"], strict=True):
        if run_dir is None:
            return None
        try:
            out[int(seed)] = loader(Path(run_dir))
        except (FileNotFoundError, ValueError):
            return None
    return out


def _improvement_cells(lookup: dict, llm: str, base: str, datasets: Sequence[str],
                       per_user: Callable[[tuple[str, str, str]], dict[int, pl.DataFrame] | None]) -> tuple[dict[str, Cell], bool]:
    """One Table-5 column: per metric, SSNA's mean improvement over ``base`` across ``datasets``, starred
    when significant. Returns the cells and whether a t-test was possible (per-user files for every run)."""
    pairs = []
    for ds in datasets:
        ours, theirs = per_user((ds, llm, "ssna")), per_user((ds, llm, base))
        if ours is None or theirs is None:
            pairs = None
            break
        pairs.append(pair_users(ours, theirs))
    tests = paired_test_by_metric(pairs) if pairs else {}
    cells: dict[str, Cell] = {}
    for m in METRIC_NAMES:
        gains = [improvement_pct(lookup[(ds, llm, "ssna")][f"test_{m}"], lookup[(ds, llm, base)][f"test_{m}"])
                 for ds in datasets]
        gains = [g for g in gains if g is not None]
        if not gains:
            cells[m] = Cell(MISSING)
            continue
        gain = sum(gains) / len(gains)
        if m not in tests:
            suffix = " (no test)"
        else:
            diff, p = tests[m]
            suffix = "*" if is_significant(p, diff) and gain > 0 else ""
        cells[m] = Cell(f"{gain:.1f}{suffix}", gain)
    return cells, bool(tests)


def improvement_table(summary: pl.DataFrame, loader: PerUserLoader = read_per_user) -> Table | None:
    """Table 5: SSNA's improvement (%) over each baseline, per LLM and metric, averaged over datasets."""
    lookup = _quality_lookup(summary)
    llms = ordered([llm for _, llm, method in lookup if method == "ssna"], LLM_ORDER)
    if not llms:
        return None
    notes = [
        "Mean over datasets of (SSNA − baseline) / baseline × 100 on the seed-mean test metrics.",
        f"* = positive and significant at the paper's 85% level: paired two-sided t-test over users, p < {SIGNIFICANCE_ALPHA}"
        " (per-user metrics averaged over matched seeds, users of all datasets pooled).",
    ]
    cache: dict[tuple[str, str, str], dict[int, pl.DataFrame] | None] = {}

    def per_user(key: tuple[str, str, str]) -> dict[int, pl.DataFrame] | None:
        if key not in cache:
            cache[key] = _per_user_by_seed(lookup[key], loader)
        return cache[key]

    rows: list[list[str | Cell]] = []
    untested: list[str] = []
    for llm in llms:
        ssna_datasets = ordered([ds for ds, lm, method in lookup if lm == llm and method == "ssna"], DATASET_ORDER)
        columns: list[dict[str, Cell]] = []
        covered: dict[str, str] = {}
        for base in BASELINES:
            datasets = [ds for ds in ssna_datasets if (ds, llm, base) in lookup]
            cells, tested = _improvement_cells(lookup, llm, base, datasets, per_user)
            columns.append(cells)
            if datasets:
                covered[method_label(base)] = ", ".join(dataset_label(d) for d in datasets)
                if not tested:
                    untested.append(f"{llm_label(llm)}/{method_label(base)}")
        if len(set(covered.values())) == 1:
            notes.append(f"{llm_label(llm)}: averaged over {next(iter(covered.values()))}.")
        else:
            notes.extend(f"{llm_label(llm)} vs {b}: averaged over {d}." for b, d in covered.items())
        for i, m in enumerate(METRIC_NAMES):
            rows.append([llm_label(llm) if i == 0 else "", m, *(col[m] for col in columns)])
        notes += _bounded_note(summary, llm, BASELINES)
    if untested:
        notes.append(f"(no test): some run lacks test_per_user.parquet, so no t-test for {', '.join(untested)}.")
    return Table("improvement", "Table 5: Performance Improvement of SSNA (%)",
                 ["LLMs", "Metric", *(method_label(b) for b in BASELINES)], rows, notes)


# Settings named in the seeds table's configuration column (with their short names), besides any that differ.
SETTING_LABELS: dict[str, str] = {"a": "a", "batch_size": "b", "n_l": "n_l", "p": "p", "n_t": "n_t",
                                  CHOSEN_UNDER: "epoch chosen under"}


def config_label(key: str, varying: Iterable[str] = ()) -> str:
    """Short text of a configuration key: the SETTING_LABELS settings it sets, then the ``varying`` ones."""
    params = json.loads(key) if key else {}
    names = [k for k in SETTING_LABELS if params.get(k) is not None]
    names += sorted(k for k in varying if k not in SETTING_LABELS)
    return ", ".join(f"{SETTING_LABELS.get(k, k)} = {params.get(k)}" for k in names) or "defaults"


def _spread_cell(mean: float | None, sd: float | None, n: int) -> str:
    if mean is None:
        return MISSING
    return f"{mean:.4f} ± {sd:.4f}" if n > 1 and sd is not None else f"{mean:.4f}"


def seeds_table(results: pl.DataFrame, summary: pl.DataFrame) -> Table | None:
    """Every configuration trained to early stop, its seeds and its test metrics as mean ± sample SD over them;
    ✓ marks the configuration the other tables report (best mean validation R@10: ``summary``, from
    :func:`summarise` of the same results)."""
    runs = with_config_key(results)
    runs = runs.filter(~pl.col("hparams").map_elements(is_bounded, return_dtype=pl.Boolean)) if runs.height else runs
    if runs.is_empty():
        return None
    per_config = (runs.group_by(*GROUP_KEYS, "hparams")
                  .agg(pl.col("seed").sort().alias("seeds"), pl.col("valid_R@10").mean(),
                       *(pl.col(f"test_{m}").mean() for m in METRIC_NAMES),
                       *(pl.col(f"test_{m}").std().alias(f"sd_{m}") for m in METRIC_NAMES)))
    reported = {(r["dataset"], r["llm"], r["method"], r["hparams"]) for r in summary.iter_rows(named=True)}
    # a method's label names the settings that differ between any two of its configurations in the whole table,
    # so that a configuration shown alone under one LLM still says how it differs from those under another
    varying: dict[str, set[str]] = {}
    for meth in set(per_config["method"].to_list()):
        params = [json.loads(k) if k else {} for k in per_config.filter(pl.col("method") == meth)["hparams"].to_list()]
        varying[meth] = {k for p in params for k in p if len({json.dumps(q.get(k)) for q in params}) > 1}
    rows: list[list[str | Cell]] = []
    for ds in ordered(per_config["dataset"].to_list(), DATASET_ORDER):
        for llm in ordered(per_config.filter(pl.col("dataset") == ds)["llm"].to_list(), LLM_ORDER):
            part = per_config.filter((pl.col("dataset") == ds) & (pl.col("llm") == llm))
            for meth in ordered(part["method"].to_list(), METHOD_ORDER):
                configs = part.filter(pl.col("method") == meth).sort(["valid_R@10", "hparams"], descending=[True, False],
                                                                     nulls_last=True)
                for r in configs.iter_rows(named=True):
                    n = len(r["seeds"])
                    mark = "✓" if (ds, llm, meth, r["hparams"]) in reported else ""
                    rows.append([dataset_label(ds), llm_label(llm), method_label(meth),
                                 config_label(r["hparams"], varying[meth]), mark, ", ".join(map(str, r["seeds"])),
                                 f"{r['valid_R@10']:.4f}" if r["valid_R@10"] is not None else MISSING,
                                 *(_spread_cell(r[f"test_{m}"], r[f"sd_{m}"], n) for m in METRIC_NAMES)])
    return Table("seeds", "Seeds: every configuration trained to early stop",
                 ["Dataset", "LLM", "Method", "Configuration", "Reported", "Seeds", "Valid R@10",
                  *(f"Test {m}" for m in METRIC_NAMES)], rows,
                 ["Test metrics as mean ± sample standard deviation over the seeds (one seed: the value alone).",
                  "✓ = the configuration the tables above report (best mean validation R@10)."], label_columns=6)


def _efficiency_table(summary: pl.DataFrame, key: str, title: str, column: str,
                      fmt: Callable[[dict], str]) -> Table | None:
    part = summary.filter(pl.col(column).is_not_null())
    if part.is_empty():
        return None
    lookup = _lookup(part)
    datasets = ordered(part["dataset"].to_list(), DATASET_ORDER)
    rows: list[list[str | Cell]] = []
    for llm in ordered(part["llm"].to_list(), LLM_ORDER):
        methods = ordered(part.filter(pl.col("llm") == llm)["method"].to_list(), METHOD_ORDER)
        grid = [[Cell(fmt(r), r[column]) if (r := lookup.get((ds, llm, meth))) else Cell(MISSING) for ds in datasets]
                for meth in methods]
        for j in range(len(datasets)):
            mark_best([grid[i][j] for i in range(len(methods))], higher_is_better=False, second=False, digits=6)
        for i, meth in enumerate(methods):
            rows.append([llm_label(llm) if i == 0 else "", method_label(meth), *grid[i]])
    devices = sorted({d for d in summary_devices(part) if d})
    notes = ["Best (lowest) of each LLM and dataset in bold."]
    if devices:
        notes.append(f"Measured on: {', '.join(devices)}.")
    return Table(key, title, ["LLMs", "Method", *(dataset_label(d) for d in datasets)], rows, notes)


def summary_devices(summary: pl.DataFrame) -> list[str]:
    """Devices recorded for the summarised runs (needs a 'device' column; empty if absent)."""
    return summary["device"].drop_nulls().unique().to_list() if "device" in summary.columns else []


def runtime_table(summary: pl.DataFrame) -> Table | None:
    """Table 6: seconds per epoch, ``†`` when extrapolated from a bounded run."""
    table = _efficiency_table(
        summary, "runtime", "Table 6: Comparison on Runtime per Epoch (second)", "seconds_per_epoch",
        lambda r: f"{r['seconds_per_epoch']:.1f}{EXTRAPOLATED_MARK if r['seconds_extrapolated'] else ''}",
    )
    if table is not None:
        table.notes.append(f"{EXTRAPOLATED_MARK} = extrapolated from the measured steps of a bounded run.")
        table.notes.extend(speedup_notes(summary))
    return table


def memory_table(summary: pl.DataFrame) -> Table | None:
    """Table 7: peak memory in GB (CUDA max allocated on GPU, process peak RSS on CPU)."""
    table = _efficiency_table(
        summary, "memory", "Table 7: Comparison on Peak Memory Usage (GB)", "peak_memory_mb",
        lambda r: f"{r['peak_memory_mb'] / 1024:.2f}",
    )
    if table is not None:
        table.notes.append("GB = MiB / 1024: CUDA max allocated on GPU, process peak RSS on CPU.")
    return table


def speedup_notes(summary: pl.DataFrame) -> list[str]:
    """Per LLM and dataset: each other method's seconds per epoch divided by SSNA's."""
    lookup = _lookup(summary)
    notes = []
    keys = [(ds, llm) for llm in ordered(summary["llm"].to_list(), LLM_ORDER)
            for ds in ordered(summary["dataset"].to_list(), DATASET_ORDER)]
    for ds, llm in keys:
        row = lookup.get((ds, llm, "ssna"))
        if row is None or not row["seconds_per_epoch"]:
            continue
        ratios = [
            f"{method_label(o)} {lookup[(ds, llm, o)]['seconds_per_epoch'] / row['seconds_per_epoch']:.1f}×"
            for o in METHOD_ORDER
            if o != "ssna" and (ds, llm, o) in lookup and lookup[(ds, llm, o)]["seconds_per_epoch"] is not None
        ]
        if ratios:
            notes.append(f"{dataset_label(ds)}/{llm_label(llm)}, time per epoch relative to SSNA: {', '.join(ratios)}.")
    return notes


def _one_of(value: str, labels: dict[str, str], what: str) -> str:
    """``value`` when it is a key of ``labels``; ValueError naming the choices otherwise."""
    if value not in labels:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(labels)}")
    return value


def check_loss(loss: str) -> str:
    return _one_of(loss, LOSS_LABELS, "loss")


def run_loss(hparams_json: str | None) -> str:
    """The loss a run trained with (its ``loss`` hparam; DEFAULT_LOSS when absent)."""
    return str(hparam(hparams_json, "loss") or DEFAULT_LOSS)


def check_history(history: str) -> str:
    return _one_of(history, HISTORY_LABELS, "candidate protocol")


def run_history(hparams_json: str | None) -> str:
    """A run's candidate protocol, keep or exclude (runs recorded without the setting kept the history)."""
    return "exclude" if hparam(hparams_json, "exclude_history") else "keep"


def check_ties(ties: str) -> str:
    return _one_of(ties, TIES_LABELS, "tie rule")


def run_ties(hparams_json: str | None) -> str:
    """A run's tie rule (its ``ties`` hparam; runs recorded without the setting counted ties against the target)."""
    return str(hparam(hparams_json, "ties") or DEFAULT_TIES)


def run_flag(hparams_json: str | None, name: str) -> bool:
    """A run's on/off model setting ``name`` (``item_ids``, ``history_bias``; False when absent: runs recorded
    before the setting existed had it off)."""
    return bool(hparam(hparams_json, name))


def filter_results(results: pl.DataFrame, datasets: Sequence[str] | None, llms: Sequence[str] | None,
                   loss: str | None = DEFAULT_LOSS, item_ids: bool | None = False,
                   history: str | None = DEFAULT_HISTORY, ties: str | None = DEFAULT_TIES,
                   history_bias: bool | None = False) -> pl.DataFrame:
    """Keep the rows of the given datasets and LLMs (all when None or empty) trained with ``loss``, with or
    without item ID embeddings and a learned history bias as ``item_ids`` and ``history_bias`` say, and evaluated
    under the candidate protocol ``history`` and the tie rule ``ties`` (each: any when None)."""
    for wanted, check, of_run in ((ties, check_ties, run_ties), (history, check_history, run_history),
                                  (loss, check_loss, run_loss)):
        if wanted is None:
            continue
        check(wanted)
        if not results.is_empty():
            results = results.filter(pl.col("hparams").map_elements(of_run, return_dtype=pl.String) == wanted)
    for name, wanted_flag in (("item_ids", item_ids), ("history_bias", history_bias)):
        if wanted_flag is not None and not results.is_empty():
            results = results.filter(pl.col("hparams").map_elements(lambda h, n=name: run_flag(h, n),
                                                                     return_dtype=pl.Boolean) == wanted_flag)
    if datasets:
        results = results.filter(pl.col("dataset").is_in(list(datasets)))
    if llms:
        results = results.filter(pl.col("llm").is_in(list(llms)))
    return results


def build_tables(results: pl.DataFrame, *, datasets: Sequence[str] | None = None, llms: Sequence[str] | None = None,
                 loss: str = DEFAULT_LOSS, item_ids: bool = False, history: str = DEFAULT_HISTORY,
                 ties: str = DEFAULT_TIES, history_bias: bool = False,
                 per_user_loader: PerUserLoader = read_per_user) -> list[Table]:
    """All tables that the runs trained with ``loss`` (and ``item_ids``, ``history_bias``) and evaluated under
    ``history`` and ``ties`` support, filtered to ``datasets`` / ``llms`` when given."""
    results = filter_results(results, datasets, llms, loss, item_ids, history, ties, history_bias)
    summary = summarise(results)
    if summary.is_empty():
        return []
    tables = performance_tables(summary)
    items = ("text embedding + a learned ID embedding (--item-ids, not in the paper)" if item_ids
             else "text embedding only (the paper)")
    retested = any(hparam(key, CHOSEN_UNDER) for key in summary["hparams"].to_list())
    for table in tables:
        table.notes.append(f"Every run here trained with the loss {loss}: {LOSS_LABELS[loss]}; items: {items}.")
        table.notes.append(f"Candidates: every item; {HISTORY_LABELS[history]}.")
        if history_bias:
            table.notes.append("Scores: the cosine plus a score each model learned for the items of the history it "
                               "reads (--history-bias, not in the paper).")
        if ties != DEFAULT_TIES:
            table.notes.append(f"Ties: {TIES_LABELS[ties]}.")
        if retested:
            table.notes.append(f"Some configurations were trained under another protocol (candidates or tie "
                               f"rule) and re-evaluated (`ssnarec retest`, hparam {CHOSEN_UNDER}): their best epoch "
                               "was chosen by that protocol's validation R@10.")
    tables += [t for t in (improvement_table(summary, per_user_loader), runtime_table(summary), memory_table(summary)) if t]
    tables += integration_tables(summary)
    seeds = seeds_table(results, summary)
    if seeds is not None:
        tables.append(seeds)
    return tables


def _cell_text(cell: str | Cell, markdown: bool) -> str:
    if isinstance(cell, str):
        return cell
    if markdown:
        return f"**{cell.text}**" if cell.mark == 1 else f"<u>{cell.text}</u>" if cell.mark == 2 else cell.text
    return cell.text + (" ▲" if cell.mark == 1 else " △" if cell.mark == 2 else "")


def render_markdown(table: Table) -> str:
    """The table as GitHub markdown: a heading, a pipe table (bold best, underlined second), notes."""
    lines = [f"### {table.title}", "", "| " + " | ".join(table.header) + " |",
             "|" + "|".join("---" if i < table.label_columns else "---:" for i in range(len(table.header))) + "|"]
    lines += ["| " + " | ".join(_cell_text(c, True) for c in row) + " |" for row in table.rows]
    if table.notes:
        lines += [""] + [f"{n}  " for n in table.notes]
    return "\n".join(lines) + "\n"


def render_text(table: Table) -> str:
    """The table as aligned plain text; best marked ▲, second △."""
    body = [table.header] + [[_cell_text(c, False) for c in row] for row in table.rows]
    widths = [max(len(r[i]) for r in body) for i in range(len(table.header))]

    def line(r: list[str]) -> str:
        return "  ".join(v.ljust(w) if i < table.label_columns else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    out = [table.title, line(body[0]), "-" * len(line(body[0]))] + [line(r) for r in body[1:]]
    marks = any(isinstance(c, Cell) and c.mark for row in table.rows for c in row)
    notes = table.notes + (["▲ best, △ second best."] if marks else [])
    return "\n".join(out + notes) + "\n"


def write_tables(tables: Sequence[Table], out_dir: Path) -> list[Path]:
    """Write all tables to ``out_dir``/tables.md and tables.txt (atomically); return both paths."""
    out_dir = Path(out_dir)
    md = "\n".join(render_markdown(t) for t in tables)
    txt = "\n".join(render_text(t) for t in tables)
    paths = [out_dir / "tables.md", out_dir / "tables.txt"]
    write_text_atomic(md, paths[0])
    write_text_atomic(txt, paths[1])
    return paths


def hparam(hparams_json: str | None, name: str) -> object:
    """One hyper-parameter from a row's JSON ``hparams`` string (None if absent or unparsable)."""
    if not hparams_json:
        return None
    try:
        return json.loads(hparams_json).get(name)
    except (json.JSONDecodeError, AttributeError):
        return None
