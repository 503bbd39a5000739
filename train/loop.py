"""Training a stage-two method to early stop, with atomic per-epoch checkpoints and exact resume.

Reproducibility: parameters are initialised from ``seed``; epoch e re-seeds torch (dropout, gating noise) and
the shuffling generator from (seed, e), so a run resumed from the checkpoint of epoch e − 1 continues exactly
as the uninterrupted run would have (on the same device and thread count).

Under torchrun (``WORLD_SIZE`` > 1) the same ``fit`` trains with DistributedDataParallel: ``batch_size`` stays
the global batch, each rank takes a contiguous share of it (``Examples.batches(rank=, world=)``), and with
``gather_negatives`` (the default) the in-batch negatives are gathered from every rank with gradients, each
rank's loss scaled by ``world × share / global batch`` so that DDP's gradient average is the gradient of the
single-process loss on the global batch. Validation and test users are split over the ranks and their
per-user metrics gathered, so every rank takes the same early-stopping decisions. Only rank 0 writes the run
folder and the results row. The run folder must be on a filesystem every rank sees (checked).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from evaluate import DEFAULT_TIES, TIE_MODES
from evaluate.metrics import METRIC_NAMES, full_ranking, mean_metrics
from evaluate.results import (
    CHOSEN_UNDER,
    CONFIG_FILE,
    EPOCHS_FILE,
    RESULT_FILE,
    append_result,
    atomic_target,
    read_config,
    read_result,
    write_json_atomic,
    write_parquet_atomic,
    write_per_user,
)
from featurestore.embed import bf16_supported
from train import distributed as dist
from train.config import APPLIES_TO, TrainConfig
from train.data import Batch, Examples, Split
from train.hparams import method_defaults
from train.methods import ItemInputs, get_method
from train.model import RowGather, SequentialRecommender

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
SELECT_METRIC = "R@10"
FUSED_ADAM_DEVICES = ("cpu", "cuda")


class RunStateError(RuntimeError):
    """A run folder is in a state the request does not fit (e.g. interrupted, and --resume not given)."""


@dataclass
class RunResult:
    run_dir: Path
    row: dict[str, Any]            # the results-store row (also result.json)
    resumed_from: int = 0          # epochs already done when this process started
    skipped: bool = False          # the run had finished before; nothing was trained


# Settings whose bad values would train silently into nonsense: [low, high).
RANGES = {"lr": (1e-12, math.inf), "weight_decay": (0.0, math.inf), "temperature": (1e-6, math.inf),
          "hidden_dropout": (0.0, 1.0), "attn_dropout": (0.0, 1.0), "adapter_dropout": (0.0, 1.0),
          "lr_decays": (0, math.inf), "lr_decay_factor": (1e-12, 1.0)}


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, str]:
    """Fill unset fields (batch size, a, n_l) from the paper's tables and reset the settings the method does not
    read (``APPLIES_TO``) to their defaults; return the config and the tables' source."""
    picks, source = method_defaults(cfg.method, cfg.llm, cfg.dataset)
    values = cfg.to_dict()
    for key, value in picks.items():
        if key in values and values[key] is None:
            values[key] = value
    for key, (low, high) in RANGES.items():
        if not low <= values[key] < high:
            raise ValueError(f"{key} = {values[key]} is out of range: it must be in [{low}, {high}). Fix: pass "
                             f"--{key.replace('_', '-')} within that range.")
    if values["ties"] not in TIE_MODES:
        raise ValueError(f"ties = {values['ties']!r} is not a tie rule. Fix: pass --ties with one of "
                         f"{', '.join(TIE_MODES)}.")
    defaults = TrainConfig().to_dict()
    for key, methods in APPLIES_TO.items():
        if cfg.method not in methods:
            values[key] = defaults[key]
    if values["lr_decays"] == 0:   # a factor that is never applied names no other run
        values["lr_decay_factor"] = defaults["lr_decay_factor"]
    return TrainConfig.from_dict(values), source


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``: current resident set, ``VmHWM``: its peak) in MiB; NaN
    where the file or the field is absent (not Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU; otherwise this process's peak resident set size (VmHWM: unlike getrusage's
    ru_maxrss it does not inherit the peak of a parent that exec'ed this process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = proc_status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if math.isnan(peak) else peak


def phase_best_file(phase: int) -> str:
    """The best checkpoint of learning-rate phase ``phase`` (0: the initial rate), kept when ``lr_decays``
    starts the next phase."""
    return f"best.phase{phase}.pt"


def save_atomic(obj: Any, path: Path) -> None:
    with atomic_target(path) as tmp:
        torch.save(obj, tmp)


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when asked (``auto``: where the device runs bf16 matmuls natively), else a no-op."""
    if cfg.autocast not in ("off", "bf16", "auto"):
        raise ValueError(f"autocast must be off, bf16 or auto, got {cfg.autocast!r}")
    use = cfg.autocast == "bf16" or (cfg.autocast == "auto" and bf16_supported(str(device)))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


@torch.no_grad()
def evaluate_examples(model: SequentialRecommender, examples: Examples, cfg: TrainConfig,
                      device: torch.device) -> dict[str, np.ndarray]:
    """Full-ranking per-user metrics of ``examples`` (one per user) under the model in eval mode.

    Under torchrun each rank encodes a share of the items and ranks a share of the users; the item vectors
    and the per-user metrics are gathered, so every rank returns the metrics of all users, in order.
    """
    model.eval()
    world = dist.world_size()
    if world > 1:
        start, stop = dist.split_bounds(model.n_items, dist.rank(), world)
        mine = (model.item_vectors(start=start, stop=stop) if stop > start
                else torch.zeros(0, model.user_encoder.position.embedding_dim, device=device)).float()
        vectors = dist.gather_rows(mine)[0][0]
        examples = examples.shard(dist.rank(), world)
    else:
        vectors = model.item_vectors().float()
    # SASRec runs on modest user batches (its attention layout is [B, L, 3d]); ranking takes large ones
    users = torch.cat([model.predict(batch.to(device), vectors) for batch in examples.batches(512)]
                      or [vectors.new_zeros(0, vectors.shape[1])])
    targets = torch.from_numpy(examples.targets())
    bonus = model.history_score()
    per_user = full_ranking(users, torch.nn.functional.normalize(vectors, dim=-1), targets,
                            histories=examples.histories() if cfg.exclude_history else None,
                            exclude_history=cfg.exclude_history, ties=cfg.ties, batch_size=cfg.eval_batch_size,
                            history_bonus=None if bonus is None else (examples.inputs(), bonus))
    if world == 1:
        return per_user
    names = list(per_user)
    table = torch.from_numpy(np.stack([per_user[m] for m in names], axis=1)).to(vectors.device)
    table = dist.gather_rows(table)[0][0].cpu().numpy()
    return {m: table[:, i] for i, m in enumerate(names)}


def planned_steps(cfg: TrainConfig, per_epoch: int) -> int:
    """The optimiser steps a run plans (AdaLoRA's rank schedule spans them), given its batches per epoch."""
    steps_per_epoch = -(-per_epoch // cfg.grad_accum)
    return min(cfg.max_steps or 1 << 62, steps_per_epoch * (cfg.adalora_epochs or cfg.max_epochs))


def load_best(run_dir: Path, cfg: TrainConfig, split: Split, inputs: ItemInputs,
              device: torch.device) -> SequentialRecommender:
    """A run's model rebuilt from ``cfg`` and its best checkpoint, with the step count its training planned
    (AdaLoRA's rank schedule needs it to rebuild)."""
    inputs.total_steps = planned_steps(cfg, split.train.n_batches(cfg.batch_size))
    model = build_model(cfg, inputs, device)
    model.load_state_dict(torch.load(run_dir / BEST_FILE, map_location=device, weights_only=True))
    return model


def build_model(cfg: TrainConfig, inputs: ItemInputs, device: torch.device) -> SequentialRecommender:
    """The method's item encoder plus SASRec, initialised from cfg.seed (cfg already resolved)."""
    torch.manual_seed(cfg.seed)
    encoder = get_method(cfg.method).build(cfg, inputs, device)
    return SequentialRecommender(encoder, cfg, inputs.n_items).to(device)


class _LossForward(torch.nn.Module):
    """The model's training loss as a ``forward``: DistributedDataParallel hooks ``forward`` calls only."""

    def __init__(self, model: SequentialRecommender, gather: RowGather | None):
        super().__init__()
        self.model, self.gather = model, gather

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model.loss(batch, self.gather)


def _epoch_seed(cfg: TrainConfig, epoch: int, rank: int) -> int:
    """The torch seed of an epoch (dropout, gating noise); other ranks draw their own streams from it."""
    seed = cfg.seed * 1_000_003 + epoch
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def fit(cfg: TrainConfig, split: Split, inputs: ItemInputs, runs_root: Path, *, results_path: Path | None = None,
        resume: bool = False, restart: bool = False, record: dict[str, Any] | None = None,
        progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
        gather_negatives: bool = True) -> RunResult:
    """Train ``cfg`` on ``split`` with the items described by ``inputs`` (store layers, or texts and the LLM
    for the end-to-end baselines), evaluate the best epoch on the test set, write the run folder and append
    the results row. ``on_epoch`` sees each epoch's record after its checkpoint is safely on disk.

    Under torchrun this is data-parallel training (module docstring). ``gather_negatives=False`` keeps each
    rank's in-batch negatives to its own share of the batch: a different objective, so the run id and the
    recorded hyper-parameters say so; with gathered negatives (default) the run is the single-process run.
    """
    cfg, source = resolve(cfg)
    try:
        dist.init_from_env(cfg.device)
    except dist.DistributedError as exc:
        raise RunStateError(str(exc)) from None
    world, rank, main = dist.world_size(), dist.rank(), dist.is_main()
    local_negatives = world > 1 and not gather_negatives and cfg.loss == "inbatch"
    device = pick_device(dist.local_device(cfg.device))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = runs_root / (cfg.run_id or cfg.run_key() + (f"_local{world}" if local_negatives else ""))
    if world > 1:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            dist.check_shared_folder(run_dir, "the run folder")
        except dist.DistributedError as exc:
            raise RunStateError(str(exc)) from None
    if restart and run_dir.exists() and main:
        for name in (CHECKPOINT_FILE, BEST_FILE, EPOCHS_FILE, RESULT_FILE):
            (run_dir / name).unlink(missing_ok=True)
    dist.barrier()
    if (run_dir / RESULT_FILE).exists():
        return RunResult(run_dir, read_result(run_dir), skipped=True)
    if (run_dir / CHECKPOINT_FILE).exists() and not resume:
        raise RunStateError(f"{run_dir} holds an interrupted run; pass --resume to continue it or --restart to "
                            "start it over")
    run_dir.mkdir(parents=True, exist_ok=True)

    per_epoch = split.train.n_batches(cfg.batch_size, world)   # (global) batches in a full epoch
    inputs.total_steps = planned_steps(cfg, per_epoch)
    model = build_model(cfg, inputs, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # PyTorch's fused Adam (one kernel over all parameters) where it exists: on CPU its step takes a fifth of the
    # per-parameter loop's time for SSNA's parameters. A resumed run keeps the implementation it was started with
    # (the optimiser's saved param_groups carry it).
    def adam(lr: float) -> torch.optim.Adam:
        return torch.optim.Adam(trainable, lr=lr, weight_decay=cfg.weight_decay,
                                fused=device.type in FUSED_ADAM_DEVICES)

    optimizer = adam(cfg.lr)
    hooks = getattr(model.item_encoder, "training_hooks", None)   # e.g. AdaLoRA's regulariser and rank update
    history: list[dict[str, Any]] = []
    best, best_epoch, stale, start, step, decays = -1.0, 0, 0, 0, 0, 0
    if (run_dir / CHECKPOINT_FILE).exists():
        state = torch.load(run_dir / CHECKPOINT_FILE, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, best_epoch, stale, start, step = (
            state[k] for k in ("history", "best", "best_epoch", "stale", "epoch", "step"))
        decays = state.get("decays", 0)

    forward: Callable[[Batch], torch.Tensor] = model.loss
    ddp: DistributedDataParallel | None = None
    if world > 1:   # every rank built and loaded the same model; DDP also broadcasts rank 0's weights
        ddp = DistributedDataParallel(_LossForward(model, None if local_negatives else dist.gather_rows),
                                      device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)   # buffers (token ids) never change
        forward = ddp
    if main:
        extra = {"world_size": world, "negatives": "local" if local_negatives else "global"} if world > 1 else {}
        write_json_atomic({**cfg.to_dict(), "defaults_from": source,
                           "n_params": sum(p.numel() for p in model.parameters()),
                           "n_train_examples": len(split.train), **extra}, run_dir / CONFIG_FILE)

    bar = tqdm(total=cfg.max_epochs, initial=start, desc=f"{cfg.method} {cfg.dataset}", unit="epoch",
               disable=not progress or not main)
    for epoch in range(start + 1, cfg.max_epochs + 1):
        if stale >= cfg.patience and decays < cfg.lr_decays:
            # instead of stopping: back to the best weights, a fresh Adam at a lower rate, patience anew. The
            # best checkpoint of the phase that ends stays beside best.pt, so the phases can be compared.
            decays, stale = decays + 1, 0
            if main:
                with atomic_target(run_dir / phase_best_file(decays - 1)) as tmp:
                    shutil.copyfile(run_dir / BEST_FILE, tmp)
            model.load_state_dict(torch.load(run_dir / BEST_FILE, map_location=device, weights_only=True))
            optimizer = adam(cfg.lr * cfg.lr_decay_factor ** decays)
        if stale >= cfg.patience or (cfg.max_steps is not None and step >= cfg.max_steps):
            break
        torch.manual_seed(_epoch_seed(cfg, epoch, rank))
        rng = np.random.default_rng([cfg.seed, epoch])      # the same order on every rank
        model.train()
        tick, total, batches, epoch_steps = time.perf_counter(), 0.0, 0, 0
        optimizer.zero_grad(set_to_none=True)
        for batch in split.train.batches(cfg.batch_size, rng, bucket=cfg.bucket_by_length, rank=rank, world=world):
            syncs = (batches + 1) % cfg.grad_accum == 0 or batches + 1 == per_epoch
            with nullcontext() if ddp is None or syncs else ddp.no_sync():   # all-reduce once per step
                with _autocast(cfg, device):
                    loss = forward(batch.to(device))
                    if world > 1:   # DDP averages over ranks: weight this share by its part of the batch
                        loss = loss * (world * len(batch) / batch.total)
                    if hooks is not None:
                        loss = loss + hooks.extra_loss()
                (loss / cfg.grad_accum).backward()
            total, batches = total + float(loss.detach()), batches + 1
            if batches % cfg.grad_accum == 0 or batches == per_epoch:
                optimizer.step()
                step, epoch_steps = step + 1, epoch_steps + 1
                if hooks is not None:
                    hooks.after_step(step)          # before zero_grad: AdaLoRA scores use the gradients
                optimizer.zero_grad(set_to_none=True)
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
        seconds = dist.max_across(time.perf_counter() - tick)
        total = dist.sum_across(total) / world if world > 1 else total   # the global batches' mean loss
        complete = batches == per_epoch
        valid = mean_metrics(evaluate_examples(model, split.valid, cfg, device))
        history.append({"epoch": epoch, "train_loss": total / max(batches, 1), "seconds": seconds,
                        # a bounded (partial) epoch is scaled to a full one, and says so
                        "epoch_seconds": seconds if complete else seconds / max(batches, 1) * per_epoch,
                        "extrapolated": not complete, "batches": batches, "lr": optimizer.param_groups[0]["lr"],
                        **{f"valid_{m}": valid[m] for m in METRIC_NAMES}})
        # every rank has the same metrics, so takes the same decisions; rank 0 writes
        if valid[SELECT_METRIC] > best:
            best, best_epoch, stale = valid[SELECT_METRIC], epoch, 0
            if main:
                save_atomic(model.state_dict(), run_dir / BEST_FILE)
        else:
            stale += 1
        if main:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "history": history,
                         "best": best, "best_epoch": best_epoch, "stale": stale, "epoch": epoch, "step": step,
                         "decays": decays},
                        run_dir / CHECKPOINT_FILE)
            write_parquet_atomic(pl.DataFrame(history), run_dir / EPOCHS_FILE)
        bar.update(1)
        if on_epoch is not None and main:
            on_epoch(history[-1])
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", R10=f"{valid[SELECT_METRIC]:.4f}",
                        best=f"{best:.4f}@{best_epoch}", s=f"{seconds:.1f}")
    bar.close()

    dist.barrier()                                   # rank 0's best.pt is on disk
    model.load_state_dict(torch.load(run_dir / BEST_FILE, map_location=device, weights_only=True))
    test = evaluate_examples(model, split.test, cfg, device)
    if main:
        write_per_user(run_dir, split.test.users, test)
    test_mean = mean_metrics(test)
    best_row = next(h for h in history if h["epoch"] == best_epoch)
    hparams = cfg.hparams()
    if local_negatives:
        hparams["negatives"] = f"local/{world}"
    row = {
        "run_id": run_dir.name, "dataset": cfg.dataset, "llm": cfg.llm, "method": cfg.method,
        "hparams": json.dumps(hparams, sort_keys=True), "seed": cfg.seed,
        **{f"valid_{m}": best_row[f"valid_{m}"] for m in METRIC_NAMES},
        **{f"test_{m}": test_mean[m] for m in METRIC_NAMES},
        "epochs": len(history), "best_epoch": best_epoch,
        "seconds_per_epoch": float(np.median([h["epoch_seconds"] for h in history])),
        "seconds_extrapolated": any(h["extrapolated"] for h in history),
        "peak_memory_mb": dist.max_across(peak_memory_mb(device)),
        "device": str(device) if world == 1 else f"{device.type} x{world}",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "run_dir": str(run_dir),
        **(record or {}),
    }
    if main:
        write_json_atomic(row, run_dir / RESULT_FILE)
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        if results_path is not None:
            append_result(results_path, row)
    return RunResult(run_dir, row, resumed_from=start)


def protocol(exclude_history: bool, ties: str = DEFAULT_TIES) -> str:
    """The evaluation protocol's name: the candidates, ``exclude_history`` (MoRec's) or ``keep_history``
    (RecBole's), then ``.ties_<rule>`` when ties are not counted against the target (the default rule)."""
    name = "exclude_history" if exclude_history else "keep_history"
    return name if ties == DEFAULT_TIES else f"{name}.ties_{ties}"


def load_config(run_dir: Path) -> TrainConfig:
    """The resolved configuration a run folder's config.json records (its extra keys, such as n_params, left
    out)."""
    saved = read_config(run_dir)
    return TrainConfig.from_dict({k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})


def retest(run_dir: Path, split: Split, inputs: ItemInputs, exclude_history: bool, *, ties: str = DEFAULT_TIES,
           results_path: Path | None = None, device: str = "cpu", record: dict[str, Any] | None = None,
           overwrite: bool = False) -> RunResult:
    """Evaluate a finished run's best checkpoint again under another protocol, without training.

    Validation and test metrics are recomputed with history items excluded from the candidates (MoRec) or kept
    (RecBole), and ties ranked by the rule ``ties`` (``evaluate.metrics``). The result goes to a sibling folder
    ``<run_id>.<protocol>/`` (config.json, test_per_user.parquet, result.json; ``protocol`` names both) and a
    results row of its own, whose hparams carry the new protocol and ``epoch_chosen_under``: the best epoch was
    chosen by the validation R@10 of the protocol the run trained with, so these rows never pool with runs
    trained under the new protocol. The training figures (epochs, seconds per epoch, peak memory) are the
    source run's. Idempotent: a folder with a result.json is returned as it is (``skipped``) unless
    ``overwrite``, which evaluates again and replaces the folder's files and the results row (after a change to
    the evaluator, or to repair a damaged folder).
    """
    if ties not in TIE_MODES:
        raise ValueError(f"ties = {ties!r} is not a tie rule; use one of {', '.join(TIE_MODES)}")
    if not (run_dir / RESULT_FILE).is_file() or not (run_dir / BEST_FILE).is_file():
        raise RunStateError(f"{run_dir} is not a finished run (result.json and best.pt are written when training "
                            "ends); finish it with `ssnarec train ... --resume` first")
    source = read_result(run_dir)
    hparams = json.loads(source["hparams"])
    if CHOSEN_UNDER in hparams:
        raise RunStateError(f"{run_dir} is itself a re-evaluation (its config.json names the run under retest_of); "
                            "retest that run instead")
    cfg = load_config(run_dir)
    chosen_under, wanted = protocol(cfg.exclude_history, cfg.ties), protocol(exclude_history, ties)
    if chosen_under == wanted:
        raise RunStateError(f"{run_dir.name} was already evaluated with {wanted}: its own result.json holds those "
                            "metrics")
    target = run_dir.parent / f"{run_dir.name}.{wanted}"
    if (target / RESULT_FILE).exists() and not overwrite:
        return RunResult(target, read_result(target), skipped=True)
    cfg = dataclasses.replace(cfg, exclude_history=exclude_history, ties=ties, device=device)
    dev = pick_device(device)
    model = load_best(run_dir, cfg, split, inputs, dev)
    valid = mean_metrics(evaluate_examples(model, split.valid, cfg, dev))
    test = evaluate_examples(model, split.test, cfg, dev)
    test_mean = mean_metrics(test)
    hparams.update(exclude_history=exclude_history, ties=ties, **{CHOSEN_UNDER: chosen_under})
    if ties == DEFAULT_TIES:
        del hparams["ties"]  # as TrainConfig.hparams() records it (a setting added later, at its old value)
    target.mkdir(parents=True, exist_ok=True)
    write_json_atomic({**cfg.to_dict(), "retest_of": run_dir.name, CHOSEN_UNDER: chosen_under},
                      target / CONFIG_FILE)
    write_per_user(target, split.test.users, test)
    row = {**source, "run_id": target.name, "hparams": json.dumps(hparams, sort_keys=True),
           **{f"valid_{m}": valid[m] for m in METRIC_NAMES}, **{f"test_{m}": test_mean[m] for m in METRIC_NAMES},
           "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "run_dir": str(target), **(record or {})}
    write_json_atomic(row, target / RESULT_FILE)
    if results_path is not None:
        append_result(results_path, row)
    return RunResult(target, row)
