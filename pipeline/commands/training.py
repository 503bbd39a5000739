"""``ssnarec train``: one stage-two (or end-to-end baseline) run from the cached embeddings."""

from __future__ import annotations

from typing import Annotated

import typer

from pipeline.commands.evaluation import TIE_RULES
from train.config import TrainConfig

_DEFAULTS = TrainConfig()
_PAPER = "default: the paper's Tables S1–S3 for this dataset × LLM"
# Options `train` and `sweep` share, declared once (sweep applies each to every run of its grid)
Loss = Annotated[str, typer.Option("--loss", help="inbatch (Eq. 8) or full (softmax over all items).")]
GruOrder = Annotated[str, typer.Option("--gru-order", help="SSNA's integration order: top_down (Eq. 4) or "
                                       "bottom_up; the other methods have no GRU and ignore it.")]
ItemIds = Annotated[bool, typer.Option("--item-ids/--text-only", help="Add a learned ID embedding to each item's "
                                       "text embedding (UniSRec's transductive setting; not in the paper).")]
HistoryBias = Annotated[bool, typer.Option("--history-bias/--no-history-bias", help="Learn one score added to every "
                                           "item of the history the model reads, in training and ranking (how "
                                           "likely a repeat is; not in the paper).")]
MaxEpochs = Annotated[int, typer.Option("--max-epochs", help="Hard cap on epochs.")]
Patience = Annotated[int, typer.Option("--patience", help="Epochs without a better validation R@10 before "
                                       "stopping.")]
LrDecays = Annotated[int, typer.Option("--lr-decays", help="Times running out of patience restarts from the best "
                                       "checkpoint at a lower rate instead of stopping (0: constant rate, the "
                                       "paper).")]
LrDecayFactor = Annotated[float, typer.Option("--lr-decay-factor", help="Learning-rate multiplier of each "
                                              "--lr-decays restart.")]
GradCheckpointing = Annotated[bool, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Recompute "
                                                 "the item encoder's activations in backward (the LLM's layers, or "
                                                 "the adapters and GRU): less memory, more time, same gradients.")]
MaxSteps = Annotated[int | None, typer.Option("--max-steps", show_default="unbounded", help="Stop after this many "
                                              "optimiser steps (a bounded run: its epoch time is extrapolated and "
                                              "flagged).")]
LimitUsers = Annotated[int | None, typer.Option("--limit-users", show_default="all users", help="Train and "
                                                "evaluate on the first N users only (a bounded run).")]
Autocast = Annotated[str, typer.Option("--autocast", help="off, bf16, or auto (bf16 where the hardware supports "
                                       "it).")]
Threads = Annotated[int | None, typer.Option("--threads", show_default="torch's choice", help="Torch CPU threads.")]


def train_cmd(
    method: str = typer.Option(_DEFAULTS.method, "--method", "-m", help="ssna, tmoe, tmlp, mean, weighted, lora, "
                               "adalora or full."),
    dataset: str = typer.Option(_DEFAULTS.dataset, "--dataset", "-d", help="Prepared dataset name."),
    llm: str = typer.Option(_DEFAULTS.llm, "--llm", "-l", help="LLM whose stored layers (or weights) are used; "
                             "NAME:mean for its mean-pooled store (see `ssnarec embed --help`)."),
    a: int | None = typer.Option(None, "--a", show_default="paper table", help=f"Top LLM layers adapted (ssna/mean/weighted); {_PAPER}."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", show_default="paper table", help=f"Training batch size; {_PAPER}."),
    n_l: int | None = typer.Option(None, "--n-l", show_default="paper table", help=f"TMLP layers; {_PAPER}."),
    p: float | None = typer.Option(None, "--p", show_default="paper table", help=f"LoRA/AdaLoRA dropout; {_PAPER}."),
    n_t: int | None = typer.Option(None, "--n-t", show_default="paper table", help=f"Full: top layers fine-tuned; {_PAPER}."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", show_default="8 for lora/adalora/full, else 1", help="Batches per optimiser step (the "
                                          "paper's 8 for the end-to-end baselines)."),
    adalora_epochs: int | None = typer.Option(None, "--adalora-epochs", show_default="--max-epochs", help="Epochs "
                                              "AdaLoRA's rank schedule spans; set it near where the run will "
                                              "early-stop, or the rank budget is barely pruned by then."),
    gru_order: GruOrder = _DEFAULTS.gru_order,
    item_ids: ItemIds = _DEFAULTS.item_ids,
    history_bias: HistoryBias = _DEFAULTS.history_bias,
    loss: Loss = _DEFAULTS.loss,
    lr: float = typer.Option(_DEFAULTS.lr, "--lr", help="Adam learning rate."),
    weight_decay: float = typer.Option(_DEFAULTS.weight_decay, "--weight-decay", help="Adam weight decay."),
    temperature: float = typer.Option(_DEFAULTS.temperature, "--temperature", help="τ of the loss (Eq. 8)."),
    hidden_dropout: float = typer.Option(_DEFAULTS.hidden_dropout, "--hidden-dropout", help="SASRec dropout on "
                                         "embeddings and sub-layer outputs."),
    attn_dropout: float = typer.Option(_DEFAULTS.attn_dropout, "--attn-dropout", help="SASRec dropout on "
                                       "attention weights."),
    adapter_dropout: float = typer.Option(_DEFAULTS.adapter_dropout, "--adapter-dropout", help="Adapter dropout "
                                          "on the LLM layer before the whitening shift."),
    max_epochs: MaxEpochs = _DEFAULTS.max_epochs,
    patience: Patience = _DEFAULTS.patience,
    lr_decays: LrDecays = _DEFAULTS.lr_decays,
    lr_decay_factor: LrDecayFactor = _DEFAULTS.lr_decay_factor,
    grad_checkpointing: GradCheckpointing = _DEFAULTS.grad_checkpointing,
    max_steps: MaxSteps = None,
    limit_users: LimitUsers = None,
    seed: int = typer.Option(_DEFAULTS.seed, "--seed", help="Random seed."),
    bucket: bool = typer.Option(_DEFAULTS.bucket_by_length, "--bucket/--no-bucket", help="Batch histories of "
                                "similar length together."),
    exclude_history: bool = typer.Option(_DEFAULTS.exclude_history, "--exclude-history/--keep-history",
                                         help="MoRec's protocol (seen items are not candidates) or RecBole's."),
    ties: str = typer.Option(_DEFAULTS.ties, "--ties", help=f"Tie rule in validation and test ranking: {TIE_RULES}."),
    device: str = typer.Option(_DEFAULTS.device, "--device", help="auto, cpu, cuda or cuda:N."),
    autocast: Autocast = _DEFAULTS.autocast,
    threads: Threads = None,
    run_id: str | None = typer.Option(None, "--run-id", show_default="derived from the settings", help="Run folder name."),
    resume: bool = typer.Option(False, "--resume", show_default="off", help="Continue an interrupted run from its last checkpoint."),
    restart: bool = typer.Option(False, "--restart", show_default="off", help="Discard the run's previous state and start over."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    gather_negatives: bool = typer.Option(True, "--gather-negatives/--local-negatives", help="Under torchrun: "
                                          "in-batch negatives from the whole global batch (the single-process "
                                          "objective) or only from each process's share."),
) -> None:
    """Train one method; writes runs/<run-id>/ and appends a row to the results store.

    Under torchrun (`make train NPROC=N`) each process trains on its share of every batch (DDP); only rank 0
    writes and prints."""
    from pipeline.datasets import DatasetError
    from pipeline.stages import StageError, run_training
    from train.distributed import is_main
    from train.loop import RunStateError

    cfg = TrainConfig(method=method, dataset=dataset, llm=llm, a=a, batch_size=batch_size, n_l=n_l, p=p, n_t=n_t,
                      grad_accum=grad_accum, adalora_epochs=adalora_epochs, gru_order=gru_order, item_ids=item_ids,
                      history_bias=history_bias, loss=loss, lr=lr, weight_decay=weight_decay,
                      temperature=temperature, hidden_dropout=hidden_dropout, attn_dropout=attn_dropout,
                      adapter_dropout=adapter_dropout, max_epochs=max_epochs, patience=patience, max_steps=max_steps,
                      lr_decays=lr_decays, lr_decay_factor=lr_decay_factor, grad_checkpointing=grad_checkpointing,
                      limit_users=limit_users, seed=seed,
                      bucket_by_length=bucket, exclude_history=exclude_history, ties=ties, device=device,
                      autocast=autocast, threads=threads, run_id=run_id)
    try:
        result = run_training(cfg, resume=resume, restart=restart, progress=progress,
                              gather_negatives=gather_negatives)
    except (DatasetError, StageError, RunStateError, KeyError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    if not is_main():
        return
    row = result.row
    state = "already finished; nothing trained (use --restart to train again)" if result.skipped else "finished"
    metrics = "  ".join(f"{m} {row[f'test_{m}']:.4f}" for m in ("R@10", "R@50", "N@10", "N@50"))
    extrapolated = " (extrapolated from a bounded run)" if row.get("seconds_extrapolated") else ""
    typer.echo(f"{row['run_id']}: {state}\n  test  {metrics}\n  best epoch {row['best_epoch']} of "
               f"{row['epochs']}, {row['seconds_per_epoch']:.2f} s per epoch{extrapolated}, peak memory "
               f"{row['peak_memory_mb']:.0f} MiB\n  {result.run_dir}")




# The paper's search spaces (Hyper-parameter Tuning section); "" on the command line = the paper's best value.
PAPER_GRID = {"batch_size": (32, 64, 128, 256), "a": (2, 3), "n_l": (1, 2, 3), "p": (0.1, 0.2, 0.3), "n_t": (2, 4, 6)}
GRID_FIELDS = {"ssna": ("batch_size", "a"), "mean": ("batch_size", "a"), "weighted": ("batch_size", "a"),
               "tmoe": ("batch_size",), "tmlp": ("batch_size", "n_l"), "lora": ("p",), "adalora": ("p",),
               "full": ("n_t",)}
# Settings every method reads (adapter_dropout: the store methods; train.config.APPLIES_TO resets it for the
# others), searchable as comma lists; empty = the default.
SHARED_GRID = ("lr", "temperature", "weight_decay", "hidden_dropout", "attn_dropout", "adapter_dropout")


def _values(text: str, cast):
    return [cast(v) for v in text.replace(",", " ").split()] or [None]


def sweep_cmd(
    methods: str = typer.Option("ssna,tmoe,tmlp,mean,weighted", "--methods", help="Methods, comma-separated."),
    datasets: str = typer.Option("sci", "--datasets", help="Datasets, comma-separated."),
    llms: str = typer.Option("minilm", "--llms", help="LLMs, comma-separated."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Seeds, comma-separated."),
    batch_sizes: str = typer.Option("", "--batch-sizes", help="b values; empty = the paper's best per method."),
    a_values: str = typer.Option("", "--a", show_default="paper table", help="a values (ssna/mean/weighted); empty = the paper's best."),
    n_l_values: str = typer.Option("", "--n-l", help="TMLP depths; empty = the paper's best."),
    p_values: str = typer.Option("", "--p", help="LoRA/AdaLoRA dropouts; empty = the paper's best."),
    n_t_values: str = typer.Option("", "--n-t", help="Full's top layers; empty = the paper's best."),
    paper_grid: bool = typer.Option(False, "--paper-grid", show_default="off", help="Search the paper's whole spaces: b in 32..256, "
                                    "a in {2,3}, n_l in {1,2,3}, p in {.1,.2,.3}, n_t in {2,4,6}."),
    loss: Loss = _DEFAULTS.loss,
    gru_order: GruOrder = _DEFAULTS.gru_order,
    item_ids: ItemIds = _DEFAULTS.item_ids,
    history_bias: HistoryBias = _DEFAULTS.history_bias,
    lr: str = typer.Option(str(_DEFAULTS.lr), "--lr", help="Adam learning rates, comma-separated."),
    temperature: str = typer.Option(str(_DEFAULTS.temperature), "--temperature", help="Loss temperatures τ."),
    weight_decay: str = typer.Option(str(_DEFAULTS.weight_decay), "--weight-decay", help="Adam weight decays."),
    hidden_dropout: str = typer.Option(str(_DEFAULTS.hidden_dropout), "--hidden-dropout", help="SASRec hidden "
                                       "dropouts."),
    attn_dropout: str = typer.Option(str(_DEFAULTS.attn_dropout), "--attn-dropout", help="SASRec attention "
                                     "dropouts."),
    adapter_dropout: str = typer.Option(str(_DEFAULTS.adapter_dropout), "--adapter-dropout", help="Adapter "
                                        "dropouts (store methods)."),
    max_epochs: MaxEpochs = _DEFAULTS.max_epochs,
    patience: Patience = _DEFAULTS.patience,
    lr_decays: LrDecays = _DEFAULTS.lr_decays,
    lr_decay_factor: LrDecayFactor = _DEFAULTS.lr_decay_factor,
    grad_checkpointing: GradCheckpointing = _DEFAULTS.grad_checkpointing,
    max_steps: MaxSteps = None,
    limit_users: LimitUsers = None,
    autocast: Autocast = _DEFAULTS.autocast,
    threads: Threads = None,
    dry_run: bool = typer.Option(False, "--dry-run", show_default="off", help="List the runs without training."),
) -> None:
    """Run a grid; runs already finished (result.json in their folder) are skipped, so a rerun resumes it."""
    import itertools

    from pipeline.datasets import DatasetError
    from pipeline.stages import StageError, resolved, run_training
    from train.loop import RunStateError

    given = {"batch_size": _values(batch_sizes, int), "a": _values(a_values, int), "n_l": _values(n_l_values, int),
             "p": _values(p_values, float), "n_t": _values(n_t_values, int)}
    shared_given = {"lr": lr, "temperature": temperature, "weight_decay": weight_decay,
                    "hidden_dropout": hidden_dropout, "attn_dropout": attn_dropout, "adapter_dropout": adapter_dropout}
    shared = [[v if v is not None else getattr(_DEFAULTS, f) for v in _values(shared_given[f], float)]
              for f in SHARED_GRID]
    plan = []
    for method, dataset, llm, seed in itertools.product(_values(methods, str), _values(datasets, str),
                                                        _values(llms, str), _values(seeds, int)):
        fields = GRID_FIELDS.get(method)
        if fields is None:
            typer.echo(f"error: unknown method {method!r}; known: {', '.join(GRID_FIELDS)}", err=True)
            raise typer.Exit(code=1)
        spaces = [PAPER_GRID[f] if paper_grid else given[f] for f in fields] + shared
        for combo in itertools.product(*spaces):
            plan.append(TrainConfig(method=method, dataset=dataset, llm=llm, seed=seed, loss=loss, gru_order=gru_order,
                                    item_ids=item_ids, history_bias=history_bias, max_epochs=max_epochs,
                                    patience=patience, max_steps=max_steps,
                                    lr_decays=lr_decays, lr_decay_factor=lr_decay_factor,
                                    grad_checkpointing=grad_checkpointing, limit_users=limit_users, autocast=autocast, threads=threads,
                                    **dict(zip(fields + SHARED_GRID, combo, strict=True))))
    # settings a method does not read are reset (train.config.APPLIES_TO), so some combinations are one run
    runs: dict[str, TrainConfig] = {}
    for cfg in plan:
        runs.setdefault(resolved(cfg).run_key(), cfg)
    typer.echo(f"{len(runs)} runs")
    for i, (key, cfg) in enumerate(runs.items(), 1):
        if dry_run:
            typer.echo(f"[{i}/{len(runs)}] {key}")
            continue
        try:
            result = run_training(cfg, resume=True)
        except (DatasetError, StageError, RunStateError, KeyError, ValueError) as exc:
            typer.echo(f"[{i}/{len(runs)}] {key}: error: {exc}", err=True)
            continue
        state = "skipped (finished before)" if result.skipped else "done"
        typer.echo(f"[{i}/{len(runs)}] {result.row['run_id']}: {state}, test R@10 {result.row['test_R@10']:.4f}")


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``sweep`` to the top-level app."""
    app.command("train")(train_cmd)
    app.command("sweep")(sweep_cmd)
