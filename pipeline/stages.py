"""Orchestration of stage two: dataset + store (or texts and the LLM) → ``train.fit`` → run folder + results row.

The CLI, ``sweep`` and ``demo`` all go through ``run_training`` so a run is started the same way everywhere.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from evaluate import DEFAULT_TIES
from evaluate.results import RESULT_FILE, RESULTS_FILE
from featurestore import StoreMissing, open_store
from pipeline import workspace
from pipeline.datasets import Dataset, load
from train import ItemInputs, RunResult, Split, TrainConfig, fit, get_method, leave_one_out, resolve

if TYPE_CHECKING:
    import polars as pl

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
        texts = data.items["text"].fill_null("").to_list()
        return ItemInputs(data.n_items, texts=texts, llm=cfg.llm, cache_dir=workspace.cache_dir(),
                          preload=cfg.preload_features)
    store = dataset_store(data, cfg.llm)
    return ItemInputs(data.n_items, layers=store.top_layers, preload=cfg.preload_features)


def dataset_store(data: Dataset, llm: str):
    """The stage-one store of ``data`` and ``llm``, checked to hold exactly the dataset's items in order."""
    try:
        store = open_store(workspace.store_dir(), data.name, llm)
    except StoreMissing:
        raise StageError(f"no embedding store for dataset {data.name!r} and LLM {llm!r}. Fix: run "
                         f"`make embeddings DATASET={data.name} LLM={llm}`") from None
    if store.item_ids != data.items["item_id"].to_list():
        raise StageError(f"the store at {store.folder} does not match dataset {data.name!r} (items differ: the "
                         f"dataset was prepared again). Fix: run `make embeddings DATASET={data.name} LLM={llm}` "
                         "(only changed items are re-embedded)")
    return store


def run_training(cfg: TrainConfig, *, resume: bool = False, restart: bool = False,
                 progress: bool = True, gather_negatives: bool = True) -> RunResult:
    """Train one configuration end to end and record it in the results store.

    Under torchrun every rank calls this; ``train.fit`` does the data-parallel part (``gather_negatives``:
    in-batch negatives from the whole global batch, or from each rank's share only)."""
    data = load(cfg.dataset)
    cfg = replace(cfg, dataset=data.name)
    split = _split_of(cfg, data)
    inputs = item_inputs(cfg, data)
    return fit(cfg, split, inputs, workspace.runs_dir(), results_path=results_path(), resume=resume,
               restart=restart, record={"git_commit": git_commit()}, progress=progress,
               gather_negatives=gather_negatives)


def resolved(cfg: TrainConfig) -> TrainConfig:
    """The configuration with the paper's defaults filled in (for display before a run)."""
    return resolve(cfg)[0]


def _run_dir(run_id: str, need: str) -> Path:
    """The folder of a run that has ``need`` (a file name), or a StageError listing the runs that do."""
    run_dir = workspace.runs_dir() / run_id
    if not (run_dir / need).is_file():
        root = workspace.runs_dir()
        known = sorted(p.name for p in root.iterdir() if (p / need).is_file()) if root.is_dir() else []
        raise StageError(f"no such run {run_id!r} under {root} (it needs {need}); runs that have one: "
                         f"{', '.join(known) or 'none (train one with `make train`)'}")
    return run_dir


def _split_of(cfg: TrainConfig, data: Dataset) -> Split:
    """The run's leave-one-out split (its first ``limit_users`` users when bounded)."""
    sequences: list[np.ndarray] = data.sequences
    if cfg.limit_users is not None:
        sequences = sequences[: cfg.limit_users]
    return leave_one_out(sequences, data.n_items, cfg.max_len)


def load_run(run_id: str):
    """A finished run's model (best checkpoint, eval mode), its dataset and config."""
    from train.loop import BEST_FILE, load_best, load_config, pick_device

    run_dir = _run_dir(run_id, BEST_FILE)
    cfg = load_config(run_dir)
    data = load(cfg.dataset)
    device = pick_device("cpu" if cfg.device == "auto" else cfg.device)
    model = load_best(run_dir, cfg, _split_of(cfg, data), item_inputs(cfg, data), device)
    return model.eval(), data, cfg


def run_retest(run_id: str, exclude_history: bool, device: str = "cpu", overwrite: bool = False,
               ties: str = DEFAULT_TIES) -> RunResult:
    """Re-evaluate a finished run's best checkpoint under another protocol, candidates and tie rule
    (``train.loop.retest``), and record it in the results store."""
    from train.loop import load_config, retest

    run_dir = _run_dir(run_id, RESULT_FILE)
    cfg = load_config(run_dir)
    data = load(cfg.dataset)
    return retest(run_dir, _split_of(cfg, data), item_inputs(cfg, data), exclude_history, ties=ties,
                  results_path=results_path(), device=device, record={"git_commit": git_commit()},
                  overwrite=overwrite)


def recommend(run_id: str, history: list[str], k: int = 10, exclude_history: bool = True) -> list[dict]:
    """Top-k items for a history of item ids (oldest first): item_id, score (the cosine; for the items the model
    read, plus the run's learned history bias if it has one), text."""
    model, data, cfg = load_run(run_id)
    ids = data.items
    index = dict(zip(ids["item_id"].to_list(), ids["item_idx"].to_list(), strict=True))
    _check_known(history, index, "item", data, "items.parquet")
    if not history:
        raise StageError("the history is empty: give at least one item id")
    scores, top = top_items(model, item_vectors(model), [np.array([index[item] for item in history])], cfg.max_len,
                            k, exclude_history)
    texts, item_ids = ids["text"].to_list(), ids["item_id"].to_list()
    return [{"item_id": item_ids[i], "score": float(v), "text": texts[i]}
            for v, i in zip(scores[0].tolist(), top[0].tolist(), strict=True) if v != float("-inf")]


def recommend_users(run_id: str, users: list[str] | None = None, k: int = 10, exclude_history: bool = True,
                    batch_size: int = 512, progress: bool = False) -> pl.DataFrame:
    """Next-item recommendations for the dataset's users (``users`` None: all of them), each after the user's
    whole sequence, the test item included: what the user would be shown next. One row per user and rank:
    user_id, rank (1 = best), item_id, score (cosine), users in the order asked (the dataset's for all)."""
    import polars as pl
    from tqdm.auto import tqdm

    model, data, cfg = load_run(run_id)
    if users is None:
        chosen = np.arange(data.n_users)
    else:
        where = {user: u for u, user in enumerate(data.user_ids)}
        _check_known(users, where, "user", data, "sequences.parquet", ", or --users all")
        chosen = np.array([where[user] for user in users], dtype=np.int64)
    item_ids = np.array(data.items["item_id"].to_list(), dtype=object)
    user_ids = np.array(data.user_ids, dtype=object)
    vectors, parts = item_vectors(model), []
    for start in tqdm(range(0, len(chosen), batch_size), desc="recommend", unit="batch", disable=not progress):
        rows = chosen[start:start + batch_size]
        best = top_items(model, vectors, [data.sequences[u] for u in rows], cfg.max_len, k, exclude_history)
        scores, top = best.values.numpy(), best.indices.numpy()
        kept = np.isfinite(scores)
        ranks = np.broadcast_to(np.arange(1, scores.shape[1] + 1), scores.shape)
        parts.append(pl.DataFrame({
            "user_id": np.repeat(user_ids[rows], kept.sum(axis=1)).tolist(),
            "rank": ranks[kept].astype(np.int32),
            "item_id": item_ids[top[kept]].tolist(),
            "score": scores[kept].astype(np.float32)}))
    schema = {"user_id": pl.String, "rank": pl.Int32, "item_id": pl.String, "score": pl.Float32}
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


def _check_known(ids: list[str], known: dict, kind: str, data: Dataset, source: str, also: str = "") -> None:
    """StageError naming the ``kind`` ids (the first 20) that ``known`` lacks, and the dataset file listing them."""
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise StageError(f"{len(unknown)} {kind} id(s) not in dataset {data.name!r}: {', '.join(unknown[:20])}"
                         f"{' …' if len(unknown) > 20 else ''}. Fix: use {kind}_id values from "
                         f"{data.path / source}{also}")


def item_vectors(model):
    """Every item's vector under a loaded run's model (fp32), once for all the users one ranks."""
    import torch

    with torch.no_grad():
        return model.item_vectors().float()


def top_items(model, vectors, histories: list[np.ndarray], max_len: int, k: int, exclude_history: bool):
    """Scores and item indices ([U, min(k, n_items)] each, best first) under ``model`` and its ``vectors``
    (:func:`item_vectors`) after each history of item indices
    (oldest first; the model reads the last ``max_len``); with ``exclude_history`` every item of a history
    scores -inf for its user, as evaluation does, so a short catalogue can leave -inf entries at the end."""
    import torch

    from evaluate.metrics import add_to_histories, exclude_histories, flatten_histories
    from train.data import Batch

    read = [h[max(len(h) - max_len, 0):] for h in histories]      # what the model reads of each history
    lengths = np.array([len(r) for r in read], dtype=np.int64)
    padded = np.zeros((len(histories), int(lengths.max())), dtype=np.int64)
    for row, items in enumerate(read):
        padded[row, : len(items)] = items
    none = torch.zeros(len(histories), dtype=torch.int64)
    batch = Batch(torch.from_numpy(padded), torch.from_numpy(lengths), none, none)
    with torch.no_grad():
        scores = model.predict(batch, vectors).float() @ torch.nn.functional.normalize(vectors, dim=-1).T
    bonus = model.history_score()
    if bonus is not None:       # the model's learned score for the items it read
        add_to_histories(scores, *flatten_histories(read, scores.shape[1]), bonus)
    if exclude_history:
        exclude_histories(scores, *flatten_histories(histories, scores.shape[1]))
    return torch.topk(scores, min(k, scores.shape[1]))


def reference_points(dataset: str, llm: str | None, layer: int = 0, exclude_history: bool = False,
                     split: str = "test", ties: str = DEFAULT_TIES) -> list[dict]:
    """Popularity and (with LLM) the nearest neighbour of the last item on the store's layer ``layer`` (0 = top)
    over the leave-one-out ``split`` (test or valid), ties ranked by the rule ``ties``: one row each, name plus
    mean R@10 … N@50."""
    from evaluate import METRIC_NAMES
    from evaluate.references import last_item_neighbour, popularity, train_part_counts

    if split not in ("test", "valid"):
        raise StageError(f"split must be test or valid, got {split!r}")
    data = load(dataset)
    examples = getattr(leave_one_out(data.sequences, data.n_items), split)
    targets, histories = examples.targets(), examples.histories()
    counts = train_part_counts(data.sequences, data.n_items)
    rows = [("popularity (training-part counts)", popularity(counts, targets, histories,
                                                              exclude_history=exclude_history, ties=ties))]
    if llm:
        store = dataset_store(data, llm)
        if not 0 <= layer < store.n_layers:
            raise StageError(f"layer {layer} is not in the store: it holds layers 0 (top) to {store.n_layers - 1}")
        vectors = np.asarray(store.top_layers(layer + 1)[:, layer], dtype=np.float32)
        name = f"nearest neighbour of the last item ({llm}, layer {'top' if layer == 0 else f'top − {layer}'})"
        rows.append((name, last_item_neighbour(vectors, targets, histories, exclude_history=exclude_history,
                                                      ties=ties)))
    return [{"reference": name, **{m: float(np.mean(per_user[m])) for m in METRIC_NAMES}} for name, per_user in rows]
