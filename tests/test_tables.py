"""Tables 2–8, significance marks, figures, the report page and the eval/report commands, on synthetic runs.

Every run here is built by ``fake_run``: clearly synthetic rows and run folders, used only to test rendering.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import typer
from typer.testing import CliRunner

from evaluate import METRIC_NAMES, TIE_MODES
from evaluate.plots import fig3_points, plot_efficiency, plot_fig3, plot_learning_curves
from evaluate.report import write_report
from evaluate.results import RESULTS_FILE, append_result, load_results, write_parquet_atomic, write_per_user
from evaluate.stats import improvement_pct, is_significant, pair_users, paired_ttest
from evaluate.tables import (
    MISSING,
    TIES_LABELS,
    Cell,
    build_tables,
    mark_best,
    render_markdown,
    render_text,
    summarise,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(home: Path, run_id: str, *, dataset: str = "sci", llm: str = "tiny", method: str = "ssna", seed: int = 0,
             hparams: dict | None = None, per_user: dict[str, np.ndarray] | None = None, test: float | None = None,
             valid: float = 0.1, seconds: float | None = 10.0, extrapolated: bool = False, memory_mb: float | None = 512.0,
             curve: list[float] | None = None) -> None:
    """Write a synthetic run folder and append its row to ``home``/results.parquet.

    Test metrics are the means of ``per_user`` when given, else every metric equals ``test``.
    """
    run_dir = home / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    if per_user is not None:
        write_per_user(run_dir, np.arange(len(per_user["R@10"])), per_user)
        means = {m: float(np.mean(per_user[m])) for m in METRIC_NAMES}
    else:
        means = {m: test for m in METRIC_NAMES}
    if curve is not None:
        write_parquet_atomic(pl.DataFrame({
            "epoch": list(range(1, len(curve) + 1)), "train_loss": [1.0] * len(curve), "seconds": [1.0] * len(curve),
            **{f"valid_{m}": curve for m in METRIC_NAMES}}), run_dir / "epochs.parquet")
    row = {"run_id": run_id, "dataset": dataset, "llm": llm, "method": method, "seed": seed,
           "hparams": hparams or {"a": 3}, "valid_R@10": valid, **{f"test_{m}": v for m, v in means.items()},
           "epochs": 5, "best_epoch": 3, "seconds_per_epoch": seconds, "seconds_extrapolated": extrapolated,
           "peak_memory_mb": memory_mb, "device": "cpu", "run_dir": str(run_dir)}
    append_result(home / RESULTS_FILE, row)


def per_user_hits(hits: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user metrics of users whose target sits at rank 1 (hit) or beyond 50 (miss)."""
    h = hits.astype(np.float64)
    return {m: h for m in METRIC_NAMES}


def table(tables, key: str):
    found = [t for t in tables if t.key == key]
    assert found, f"no table {key} among {[t.key for t in tables]}"
    return found[0]


def test_mark_best_bold_second_and_ties() -> None:
    cells = [Cell("a", 0.2), Cell("b", 0.3), Cell(MISSING), Cell("c", 0.1), Cell("d", 0.3)]
    mark_best(cells)
    assert [c.mark for c in cells] == [2, 1, 0, 0, 1]
    low = [Cell("x", 5.0), Cell("y", 1.0), Cell("z", 2.0)]
    mark_best(low, higher_is_better=False, second=False)
    assert [c.mark for c in low] == [0, 1, 0]
    single = [Cell("x", 5.0), Cell(MISSING)]
    mark_best(single)
    assert [c.mark for c in single] == [0, 0]


def test_performance_table_missing_cells_means_and_marks(home: Path) -> None:
    fake_run(home, "s0", method="ssna", seed=0, test=0.30)
    fake_run(home, "s1", method="ssna", seed=1, test=0.20)
    fake_run(home, "t0", method="tmoe", seed=0, test=0.20)
    fake_run(home, "m0", method="tmlp", seed=0, test=0.10)
    tables = build_tables(load_results(home / RESULTS_FILE))
    perf = table(tables, "performance_tiny")
    assert perf.header == ["Dataset", "Metric", "LoRA", "ADA", "Full", "TMLP", "TMoE", "SSNA"]
    md = render_markdown(perf)
    first = md.splitlines()[4]
    assert first == f"| Sci | R@10 | {MISSING} | {MISSING} | {MISSING} | 0.1000 (1) | <u>0.2000 (1)</u> | **0.2500 (2)** |"
    assert len(perf.rows) == len(METRIC_NAMES)
    txt = render_text(perf)
    assert "0.2500 (2) ▲" in txt and "0.2000 (1) △" in txt and MISSING in txt
    assert {t.key for t in tables} == {"performance_tiny", "improvement", "runtime", "memory", "seeds"}  # no Table 8 yet


def test_best_config_is_chosen_on_validation(home: Path) -> None:
    fake_run(home, "a2", hparams={"a": 2, "seed": 0}, valid=0.30, test=0.10)
    fake_run(home, "a2s1", hparams={"a": 2, "seed": 1, "run_id": "a2s1", "device": "cuda"}, seed=1,
             valid=0.28, test=0.20)  # another seed of the same configuration, not a new one
    fake_run(home, "a3", hparams={"a": 3}, valid=0.25, test=0.90)
    summary = summarise(load_results(home / RESULTS_FILE))
    assert summary.height == 1
    assert summary["n_seeds"][0] == 2 and summary["test_R@10"][0] == pytest.approx(0.15)
    points = fig3_points(load_results(home / RESULTS_FILE))
    assert points["a"].to_list() == [2, 3] and points["mean"].to_list() == pytest.approx([0.15, 0.90])


def test_improvement_percent_and_significance(home: Path) -> None:
    rng = np.random.default_rng(0)
    base_hits = rng.random(2000) < 0.10
    better = base_hits | (rng.random(2000) < 0.10)  # a clear shift: extra hits, none lost
    fake_run(home, "ssna", method="ssna", per_user=per_user_hits(better))
    fake_run(home, "tmoe", method="tmoe", per_user=per_user_hits(base_hits))
    fake_run(home, "tmlp", method="tmlp", per_user=per_user_hits(better))  # identical to SSNA
    fake_run(home, "lora", method="lora", test=0.05)  # no per-user file: no test possible
    close = better.copy()  # SSNA wins on 3 users and loses on 2: a positive gain that is not significant
    close[np.flatnonzero(better)[:3]] = False
    close[np.flatnonzero(~better)[:2]] = True
    fake_run(home, "ada", method="adalora", per_user=per_user_hits(close))
    imp = table(build_tables(load_results(home / RESULTS_FILE)), "improvement")
    assert imp.header == ["LLMs", "Metric", "LoRA", "ADA", "Full", "TMLP", "TMoE"]
    r10 = imp.rows[0]
    expected = (better.mean() - base_hits.mean()) / base_hits.mean() * 100
    assert r10[6].text == f"{expected:.1f}*"
    assert r10[5].text == "0.0"
    assert r10[3].text == f"{(better.mean() - close.mean()) / close.mean() * 100:.1f}" and r10[3].value > 0
    assert r10[4].text == MISSING
    assert r10[2].text == f"{(better.mean() - 0.05) / 0.05 * 100:.1f} (no test)"
    assert any("no t-test" in n and "LoRA" in n for n in imp.notes)


def test_stats_formulas() -> None:
    assert improvement_pct(0.12, 0.10) == pytest.approx(20.0)
    assert improvement_pct(0.1, 0.0) is None and improvement_pct(None, 0.1) is None
    assert is_significant(0.10, 1.0) and not is_significant(0.20, 1.0) and not is_significant(0.01, -1.0)
    same = np.array([0.0, 1.0, 0.5, 0.25])
    assert math.isnan(paired_ttest(same, same))
    shift = np.linspace(0, 1, 50)
    assert paired_ttest(shift + 0.1 + 0.01 * np.sin(np.arange(50)), shift) < 1e-6


def test_pair_users_averages_matched_seeds() -> None:
    def frame(values: list[float]) -> pl.DataFrame:
        return pl.DataFrame({"user_idx": [0, 1], **{m: values for m in METRIC_NAMES}})

    ours = {0: frame([1.0, 1.0]), 1: frame([0.0, 1.0])}
    base = {1: frame([0.0, 0.0]), 2: frame([1.0, 1.0])}
    pair = pair_users(ours, base)
    assert pair.seeds_ours == (1,) and pair.seeds_base == (1,)
    assert pair.ours["R@10"].to_list() == [0.0, 1.0] and pair.base["R@10"].to_list() == [0.0, 0.0]
    unmatched = pair_users({0: frame([1.0, 0.0]), 1: frame([0.0, 0.0])}, {2: frame([1.0, 1.0])})
    assert unmatched.ours["R@10"].to_list() == [0.5, 0.0]


def test_efficiency_and_integration_tables(home: Path) -> None:
    fake_run(home, "ssna", method="ssna", seconds=5.0, memory_mb=1024.0, test=0.3)
    fake_run(home, "lora", method="lora", seconds=500.0, extrapolated=True, memory_mb=20480.0, test=0.2)
    fake_run(home, "mean", method="mean", seconds=4.0, test=0.25)
    tables = build_tables(load_results(home / RESULTS_FILE))
    runtime = render_markdown(table(tables, "runtime"))
    assert "| tiny | LoRA | 500.0† |" in runtime and "|  | SSNA | 5.0 |" in runtime and "|  | MEAN | **4.0** |" in runtime
    assert "LoRA 100.0×" in runtime
    memory = render_markdown(table(tables, "memory"))
    assert "| tiny | LoRA | 20.00 |" in memory and "|  | SSNA | 1.00 |" in memory and "|  | MEAN | **0.50** |" in memory
    integration = table(tables, "integration_tiny")
    assert integration.header == ["Dataset", "Metric", "MEAN", "WEIGHTED", "SSNA"]
    md = render_markdown(integration)
    assert f"| Sci | R@10 | 0.2500 (1) | {MISSING} | **0.3000 (1)** |" in md and "<u>" not in md


def test_bounded_runs_count_for_time_and_memory_only(home: Path) -> None:
    """A LoRA run bounded by --max-steps has an (extrapolated) epoch time and a peak memory, but its metrics after a
    few steps are not a result: Tables 2 and 5 show "—" for it, with a note, and never pick it over a full run."""
    fake_run(home, "ssna", method="ssna", seconds=5.0, test=0.3, per_user=per_user_hits(np.array([1, 0, 1, 1])))
    fake_run(home, "lora-bounded", method="lora", hparams={"p": 0.1, "max_steps": 8}, seconds=500.0,
             extrapolated=True, memory_mb=4096.0, valid=0.9, test=0.01, per_user=per_user_hits(np.array([0, 0, 0, 0])))
    fake_run(home, "tmoe-bounded", method="tmoe", hparams={"limit_users": 150}, valid=0.9, test=0.9)
    fake_run(home, "tmoe", method="tmoe", valid=0.1, test=0.2)
    tables = build_tables(load_results(home / RESULTS_FILE))
    performance = render_markdown(table(tables, "performance_tiny"))
    assert f"| Sci | R@10 | {MISSING} | {MISSING} | {MISSING} | {MISSING} | <u>0.2000 (1)</u> | **0.7500 (1)** |" in performance
    assert "LoRA: bounded runs only" in performance and "TMoE: bounded" not in performance
    improvement = render_markdown(table(tables, "improvement"))
    assert f"| tiny | R@10 | {MISSING} | {MISSING} | {MISSING} | {MISSING} | 275.0" in improvement
    assert "LoRA: bounded runs only" in improvement
    runtime = render_markdown(table(tables, "runtime"))
    assert "| tiny | LoRA | 500.0† |" in runtime and "LoRA 100.0×" in runtime
    assert "| tiny | LoRA | 4.00 |" in render_markdown(table(tables, "memory"))


def test_filters_select_datasets_and_llms(home: Path) -> None:
    fake_run(home, "a", dataset="sci", llm="tiny", test=0.3)
    fake_run(home, "b", dataset="ins", llm="other", test=0.2)
    results = load_results(home / RESULTS_FILE)
    keys = {t.key for t in build_tables(results, llms=["other"])}
    assert "performance_other" in keys and "performance_tiny" not in keys
    assert build_tables(results, datasets=["pantry"]) == []
    perf = table(build_tables(results), "performance_other")
    assert perf.rows[0][0] == "Ins"


def test_losses_never_share_a_table(home: Path) -> None:
    """A full-softmax run is another experiment, not a better configuration: the default tables (the paper's
    in-batch loss, also for rows recorded without a loss) never pick it, and --loss full shows only it."""
    fake_run(home, "inbatch", method="tmoe", hparams={"loss": "inbatch"}, valid=0.1, test=0.2)
    fake_run(home, "legacy", method="ssna", hparams={"a": 3}, valid=0.1, test=0.3)
    fake_run(home, "full", method="tmoe", hparams={"loss": "full"}, valid=0.9, test=0.4)
    results = load_results(home / RESULTS_FILE)
    default = render_markdown(table(build_tables(results), "performance_tiny"))
    assert "| Sci | R@10 | — | — | — | — | <u>0.2000 (1)</u> | **0.3000 (1)** |" in default
    assert "loss inbatch" in default
    full = render_markdown(table(build_tables(results, loss="full"), "performance_tiny"))
    assert "| Sci | R@10 | — | — | — | — | 0.4000 (1) | — |" in full and "loss full" in full
    with pytest.raises(ValueError, match="unknown loss 'softmax'"):
        build_tables(results, loss="softmax")


def test_item_id_runs_never_share_a_table_with_text_only_runs(home: Path) -> None:
    fake_run(home, "text", method="ssna", hparams={"a": 3}, valid=0.1, test=0.3)
    fake_run(home, "ids", method="ssna", hparams={"a": 3, "item_ids": True}, valid=0.9, test=0.5)
    results = load_results(home / RESULTS_FILE)
    default = render_markdown(table(build_tables(results), "performance_tiny"))
    assert "| Sci | R@10 | — | — | — | — | — | 0.3000 (1) |" in default and "text embedding only" in default
    ids = render_markdown(table(build_tables(results, item_ids=True), "performance_tiny"))
    assert "| Sci | R@10 | — | — | — | — | — | 0.5000 (1) |" in ids and "learned ID embedding" in ids


def test_history_bias_runs_never_share_a_table_with_runs_without(home: Path) -> None:
    fake_run(home, "plain", method="ssna", hparams={"a": 3}, valid=0.1, test=0.3)
    fake_run(home, "biased", method="ssna", hparams={"a": 3, "history_bias": True}, valid=0.9, test=0.5)
    results = load_results(home / RESULTS_FILE)
    default = render_markdown(table(build_tables(results), "performance_tiny"))
    assert "| Sci | R@10 | — | — | — | — | — | 0.3000 (1) |" in default and "history-bias" not in default
    biased = render_markdown(table(build_tables(results, history_bias=True), "performance_tiny"))
    assert "| Sci | R@10 | — | — | — | — | — | 0.5000 (1) |" in biased and "--history-bias" in biased


def test_candidate_protocols_never_share_a_table(home: Path) -> None:
    """Excluding history items only removes wrong candidates, so its metrics are never comparable with (and would
    always win against) RecBole's: the default tables keep the history, --history exclude shows the others, and
    a re-evaluated configuration says where its epoch was chosen."""
    fake_run(home, "kept", method="ssna", hparams={"a": 3}, valid=0.1, test=0.3)
    fake_run(home, "morec", method="ssna", hparams={"a": 3, "exclude_history": True}, valid=0.9, test=0.5)
    fake_run(home, "kept.exclude_history", method="tmoe", valid=0.8, test=0.4,
             hparams={"exclude_history": True, "epoch_chosen_under": "keep_history"})
    results = load_results(home / RESULTS_FILE)
    kept = render_markdown(table(build_tables(results), "performance_tiny"))
    assert "| Sci | R@10 | — | — | — | — | — | 0.3000 (1) |" in kept and "stay candidates" in kept
    tables = build_tables(results, history="exclude")
    excluded = render_markdown(table(tables, "performance_tiny"))
    assert "| Sci | R@10 | — | — | — | — | <u>0.4000 (1)</u> | **0.5000 (1)** |" in excluded
    assert "are not candidates" in excluded and "re-evaluated" in excluded
    assert "epoch chosen under = keep_history" in render_markdown(table(tables, "seeds"))
    with pytest.raises(ValueError, match="unknown candidate protocol 'drop'"):
        build_tables(results, history="drop")


def test_figures_and_report(home: Path) -> None:
    reports = home / "reports"
    empty = load_results(home / RESULTS_FILE)
    assert plot_fig3(empty, reports / "f.png") is None and plot_efficiency(empty, reports / "e.png") is None
    text = write_report(empty, reports).read_text()
    assert "No finished runs yet" in text and text.count("no runs to plot yet") == 3
    for a, value in ((1, 0.10), (2, 0.14), (3, 0.12)):
        fake_run(home, f"ssna-a{a}", hparams={"a": a}, valid=value, test=value, curve=[0.05, value])
    fake_run(home, "tmoe", method="tmoe", test=0.11, seconds=20.0, extrapolated=True, curve=[0.04, 0.1, 0.11])
    results = load_results(home / RESULTS_FILE)
    for plot in (plot_fig3, plot_learning_curves, plot_efficiency):
        path = plot(results, reports / f"{plot.__name__}.png")
        assert path is not None and path.read_bytes()[:8] == PNG_MAGIC
    report = write_report(results, reports)
    text = report.read_text()
    for name in ("fig3_layers.png", "learning_curves.png", "efficiency.png"):
        assert f"]({name})" in text and (reports / name).read_bytes()[:8] == PNG_MAGIC
    assert "Overall Performance" in text and "(tables.txt)" in text
    assert (reports / "tables.md").exists() and (reports / "tables.txt").exists()
    assert not list(reports.glob(".*.tmp"))


def test_eval_and_report_commands(home: Path) -> None:
    from pipeline.commands import evaluation

    app = typer.Typer()
    evaluation.register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 0 and "No finished runs" in result.output
    fake_run(home, "s", test=0.3)
    fake_run(home, "t", method="tmoe", test=0.2)
    result = runner.invoke(app, ["eval", "--llm", "tiny"])
    assert result.exit_code == 0, result.output
    assert "Overall Performance (tiny)" in result.output and "0.3000 (1) ▲" in result.output
    assert (home / "reports" / "tables.md").exists()
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip()) == home.resolve() / "reports" / "report.md"
    (home / RESULTS_FILE).write_bytes(b"damaged")
    result = runner.invoke(app, ["eval"])
    assert result.exit_code == 1 and "results.parquet" in result.output and "Traceback" not in result.output
    help_text = runner.invoke(app, ["eval", "--help"]).output
    assert "--dataset" in help_text and "comma-separated" in help_text


def test_seeds_table_mean_and_sample_sd_per_configuration(home: Path) -> None:
    """Each unbounded configuration gets one row: its seeds, and mean ± sample SD (n − 1) of the test metrics;
    the reported configuration (best mean validation R@10) is ticked; bounded runs are left out."""
    fake_run(home, "a3s0", method="ssna", seed=0, hparams={"a": 3, "batch_size": 256}, valid=0.10, test=0.10)
    fake_run(home, "a3s1", method="ssna", seed=1, hparams={"a": 3, "batch_size": 256}, valid=0.12, test=0.20)
    fake_run(home, "a3s2", method="ssna", seed=2, hparams={"a": 3, "batch_size": 256}, valid=0.14, test=0.30)
    fake_run(home, "a2s0", method="ssna", seed=0, hparams={"a": 2, "batch_size": 256}, valid=0.11, test=0.50)
    fake_run(home, "bounded", method="lora", hparams={"p": 0.1, "max_steps": 8}, valid=0.9, test=0.9)
    seeds = table(build_tables(load_results(home / RESULTS_FILE)), "seeds")
    assert [row[:6] for row in seeds.rows] == [["Sci", "tiny", "SSNA", "a = 3, b = 256", "✓", "0, 1, 2"],
                                               ["Sci", "tiny", "SSNA", "a = 2, b = 256", "", "0"]]
    sd = np.sqrt(((0.1 - 0.2) ** 2 + 0 + (0.3 - 0.2) ** 2) / 2)
    assert seeds.rows[0][6:] == ["0.1200", *[f"0.2000 ± {sd:.4f}"] * len(METRIC_NAMES)]
    assert seeds.rows[1][6:] == ["0.1100", *["0.5000"] * len(METRIC_NAMES)]
    assert "| Sci | tiny | SSNA | a = 3, b = 256 | ✓ | 0, 1, 2 | 0.1200 | 0.2000 ± 0.1000 |" in render_markdown(seeds)


def test_seeds_table_labels_a_lone_configuration_by_what_differs_under_another_llm(home: Path) -> None:
    """A setting that varies between a method's configurations anywhere in the table is named in every one of its
    labels, also where an LLM has a single configuration of that method."""
    fake_run(home, "td", llm="tiny", hparams={"a": 3, "gru_order": "top_down"}, valid=0.1, test=0.1)
    fake_run(home, "bu", llm="tiny", hparams={"a": 3, "gru_order": "bottom_up"}, valid=0.2, test=0.2)
    fake_run(home, "mean", llm="tiny:mean", hparams={"a": 3, "gru_order": "bottom_up"}, valid=0.3, test=0.3)
    labels = {(row[1], row[3]) for row in table(build_tables(load_results(home / RESULTS_FILE)), "seeds").rows}
    assert labels == {("tiny", "a = 3, gru_order = bottom_up"), ("tiny", "a = 3, gru_order = top_down"),
                      ("tiny:mean", "a = 3, gru_order = bottom_up")}


def test_every_tie_rule_has_a_table_label():
    assert tuple(TIES_LABELS) == TIE_MODES
