"""Orchestration of stage two: dataset + store (or texts and the LLM) → ``train.fit`` → run folder + results row.

The CLI, ``sweep`` and ``demo`` all go through ``run_training`` so a run is started the same way everywhere.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np

from evaluate.results import RESULTS_FILE
from featurestore import StoreMissing, open_store
from pipeline import workspace
from pipeline.datasets import Dataset, load
from train import ItemInputs, RunResult, TrainConfig, fit, get_method, leave_one_out, resolve

REPO = Path(__file__).resolve().parents[1]


class StageError(RuntimeError):
    """Stage two cannot start: a missing or stale input, said with the command that fixes it."""


def results_path() -> Path:
    return workspace.home() / RESULTS_FILE


def git_commit() -> str:
    """The checkout's commit (with '+dirty' when it has uncommitted changes), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def item_inputs(cfg: TrainConfig, data: Dataset) -> ItemInputs:
    """What the method reads: the stage-one store (checked against the dataset), or texts for the LLM."""
    method = get_method(cfg.method)
    if method.uses_llm:
        texts = data.items.sort("item_idx")["text"].fill_null("").to_list()
        return ItemInputs(data.n_items, texts=texts, llm=cfg.llm, cache_dir=workspace.cache_dir(),
                          preload=cfg.preload_features)
    try:
        store = open_store(workspace.store_dir(), data.name, cfg.llm)
    except StoreMissing:
        raise StageError(f"no embedding store for dataset {data.name!r} and LLM {cfg.llm!r}. Fix: run "
                         f"`make embeddings DATASET={data.name} LLM={cfg.llm}`") from None
    if store.item_ids != data.items.sort("item_idx")["item_id"].to_list():
        raise StageError(f"the store at {store.folder} does not match dataset {data.name!r} (items differ: the "
                         f"dataset was prepared again). Fix: run `make embeddings DATASET={data.name} LLM={cfg.llm}` "
                         "(only changed items are re-embedded)")
    return ItemInputs(data.n_items, layers=store.top_layers, preload=cfg.preload_features)


def run_training(cfg: TrainConfig, *, resume: bool = False, restart: bool = False,
                 progress: bool = True) -> RunResult:
    """Train one configuration end to end and record it in the results store."""
    data = load(cfg.dataset)
    cfg = replace(cfg, dataset=data.name)
    sequences: list[np.ndarray] = data.sequences
    if cfg.limit_users is not None:
        sequences = sequences[: cfg.limit_users]
    split = leave_one_out(sequences, data.n_items, cfg.max_len)
    inputs = item_inputs(cfg, data)
    return fit(cfg, split, inputs, workspace.runs_dir(), results_path=results_path(), resume=resume,
               restart=restart, record={"git_commit": git_commit()}, progress=progress)


def resolved(cfg: TrainConfig) -> TrainConfig:
    """The configuration with the paper's defaults filled in (for display before a run)."""
    return resolve(cfg)[0]
