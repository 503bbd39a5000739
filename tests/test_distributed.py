"""Scaling out with torchrun on CPU (gloo, 2 processes): the sharded stage-one store equals the single-process
store and resumes from the chunks any rank finished; DDP steps with gathered negatives give the parameters,
loss and metrics of the single process on the same global batches (SSNA and LoRA); the batch split, the
gathered loss's gradient, and the make targets.

The two multi-process tests start ``torchrun --standalone --nproc-per-node=2`` on this file, which then runs
as a worker (``__main__`` at the bottom); each writes what it saw to JSON files the test reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from synthetic import catalogue_walks
from tinymodels import WORDS, make_tiny_llm

from featurestore import open_store
from train import ItemInputs, TrainConfig, fit, leave_one_out
from train.distributed import gather_rows, rank, split_bounds, world_size
from train.loop import BEST_FILE, build_model, resolve

REPO = Path(__file__).resolve().parents[1]
N_ITEMS, N_LAYERS, HIDDEN = 40, 4, 24
EMBED = {"max_length": 16, "batch_tokens": 64, "dtype": "fp32", "precision": "fp32", "progress": False,
         "chunk_items": 5, "shard_bytes": 3 * 32 * 4 * 16}   # tiny BERT rows are 3 × 32 fp32: 16 rows a shard


# ---------------------------------------------------------------- shared by the test and the workers
def make_texts(n: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 20)))) + f" {i}." for i in range(n)]
    return [f"item{i:03d}" for i in range(n)], texts


def make_sequences() -> list[np.ndarray]:
    return catalogue_walks(50, N_ITEMS, 4, 10)


def train_jobs(llm: Path) -> list[dict[str, Any]]:
    """Configurations without randomness in the forward (no dropout, no gating noise), so that one process and
    two processes can agree to float tolerance. 15 examples a batch: the ranks' shares are 8 and 7."""
    common = dict(dataset="toy", d=16, inner_size=32, n_experts=4, a=2, batch_size=15, max_epochs=1, max_steps=3,
                  lr=1e-2, hidden_dropout=0.0, attn_dropout=0.0, adapter_dropout=0.0, gate_noise=False,
                  eval_batch_size=64, threads=1, device="cpu")
    ssna = dict(common, method="ssna", llm="tiny")
    lora = dict(common, method="lora", llm=str(llm), n_layers=1, n_heads=1, max_len=10, max_tokens=16, lora_r=2,
                p=0.0, grad_accum=2, max_steps=2)
    return [{"cfg": dict(ssna, run_id="ssna"), "gather": True},
            {"cfg": dict(ssna, run_id="ssna-local"), "gather": False},
            {"cfg": dict(lora, run_id="lora"), "gather": True}]


class RecordingAdam(torch.optim.Adam):
    """Adam that keeps the gradients it is given at its first step (under DDP: after the all-reduce)."""

    first: list[torch.Tensor] | None = None

    def step(self, closure: Any = None) -> Any:
        if RecordingAdam.first is None:
            RecordingAdam.first = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                                   for group in self.param_groups for p in group["params"]]
        return super().step(closure)


def run_jobs(root: Path, llm: Path, features: np.ndarray) -> dict[str, list[torch.Tensor]]:
    """Fit every job of ``train_jobs`` into ROOT/runs (one process, or every rank of a torchrun job); return
    each job's gradients of its first optimiser step."""
    texts = make_texts(N_ITEMS)[1]
    grads = {}
    adam = torch.optim.Adam
    torch.optim.Adam = RecordingAdam            # train.loop builds its optimiser as torch.optim.Adam(...)
    try:
        for job in train_jobs(llm):
            cfg = TrainConfig(**job["cfg"])
            split = leave_one_out(make_sequences(), N_ITEMS, cfg.max_len)
            if cfg.method == "lora":
                inputs = ItemInputs(N_ITEMS, texts=texts, llm=cfg.llm, cache_dir=root / "cache")
            else:
                inputs = ItemInputs(N_ITEMS, layers=lambda a: features[:, :a])
            RecordingAdam.first = None
            fit(cfg, split, inputs, root / "runs", results_path=root / "results.parquet", progress=False,
                gather_negatives=job["gather"])
            grads[cfg.run_id] = RecordingAdam.first
    finally:
        torch.optim.Adam = adam
    return grads


def torchrun(scenario: str, args: dict[str, Any], out: Path) -> subprocess.CompletedProcess:
    """Run this file as SCENARIO on 2 CPU processes under torchrun; each rank writes OUT/rank<r>.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps({**args, "out": str(out)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(Path(__file__).resolve()), scenario, str(out / "args.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def ranks_output(out: Path) -> list[dict[str, Any]]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A tiny BERT without dropout: LoRA training is then deterministic, whatever the split of the batch."""
    folder = make_tiny_llm("bert", tmp_path_factory.mktemp("llm") / "bert", n_layers=2, hidden=32)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------- in one process
@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_make_up_the_single_process_batch(world, bucket):
    split = leave_one_out(make_sequences(), N_ITEMS)
    train = split.train
    size = 16
    assert world <= len(train) % size < size         # a short last batch, kept
    whole = list(train.batches(size, np.random.default_rng([0, 1]), bucket=bucket))
    shares = [list(train.batches(size, np.random.default_rng([0, 1]), bucket=bucket, rank=r, world=world))
              for r in range(world)]
    assert len(whole) == train.n_batches(size) and all(len(s) == train.n_batches(size, world) for s in shares)
    for k, batch in enumerate(whole):
        parts = [s[k] for s in shares]
        assert [p.total for p in parts] == [len(batch)] * world
        assert sorted(len(p) for p in parts)[-1] - sorted(len(p) for p in parts)[0] <= 1
        for name in ("targets", "users", "lengths"):
            assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(batch, name))
    with pytest.raises(ValueError, match="rank"):
        next(train.batches(size, rank=world, world=world))


def test_a_last_batch_smaller_than_the_world_is_dropped():
    split = leave_one_out(make_sequences(), N_ITEMS)
    size = len(split.train) - 1                       # the last global batch has one example
    assert split.train.n_batches(size) == 2 and split.train.n_batches(size, world=2) == 1
    assert len(list(split.train.batches(size, rank=1, world=2))) == 1
    assert len(list(split.train.batches(size, world=1))) == 2


def test_split_bounds_and_shards_follow_array_split():
    split = leave_one_out(make_sequences(), N_ITEMS)
    for n, world in ((10, 3), (2, 4), (50, 2)):
        sizes = [len(part) for part in np.array_split(np.arange(n), world)]
        expected = [(sum(sizes[:r]), sum(sizes[:r + 1])) for r in range(world)]
        assert [split_bounds(n, r, world) for r in range(world)] == expected
    shards = [split.valid.shard(r, 3) for r in range(3)]
    assert np.concatenate([s.users for s in shards]).tolist() == split.valid.users.tolist()
    assert (rank(), world_size()) == (0, 1)         # no process group here: the helpers answer rank 0 of 1
    x = torch.ones(2, 3)
    assert gather_rows(x) == ([x], 0)


@pytest.mark.parametrize("history_bias", [False, True])
def test_gathered_negatives_loss_has_the_global_batch_gradient(history_bias):
    """The DDP objective, emulated in one process: each share's loss with the other shares' targets gathered,
    weighted by world × share / batch and averaged over ranks, has the gradient of the single-process loss
    (with a history bias too: each row's history marks the gathered targets it holds)."""
    features = np.random.default_rng(0).standard_normal((N_ITEMS, N_LAYERS, HIDDEN)).astype(np.float32)
    cfg, _ = resolve(TrainConfig(**{**train_jobs(Path("unused"))[0]["cfg"], "method": "tmoe",
                                    "history_bias": history_bias}))
    model = build_model(cfg, ItemInputs(N_ITEMS, layers=lambda a: features[:, :a]), torch.device("cpu")).train()
    if history_bias:
        with torch.no_grad():
            model.history_bias.fill_(-0.3)
    split = leave_one_out(make_sequences(), N_ITEMS)
    index, twins = np.arange(15), np.array([0, 14])      # in different shares, both with target 7
    split.train.items[split.train.offsets[split.train.users[twins]] + split.train.positions[twins]] = 7
    batch = split.train.batch(index)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(model.loss(batch), params)

    world = 2
    shares = [split.train.batch(part) for part in np.array_split(index, world)]
    targets = [torch.nn.functional.normalize(model(s)[1].float(), dim=-1) for s in shares]

    def fake_gather(r):
        def gather(own_targets, own_ids):
            rows = [own_targets if q == r else targets[q] for q in range(world)]
            return [torch.cat(rows), torch.cat([s.targets for s in shares])], sum(len(s) for s in shares[:r])
        return gather

    total = sum(model.loss(s, fake_gather(r)) * world * len(s) / len(batch) for r, s in enumerate(shares)) / world
    got = torch.autograd.grad(total, params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    local = sum(model.loss(s) * len(s) / len(batch) for s in shares)   # negatives from the own share only
    assert not torch.allclose(local, model.loss(batch), rtol=1e-3)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_targets_launch_torchrun_when_asked():
    def dry(*args: str) -> str:
        out = subprocess.run(["make", "-n", "-s", "-o", ".venv/.installed", *args], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout
        return out.strip().splitlines()[-1]

    assert dry("train").startswith(".venv/bin/ssnarec train --method ssna")
    assert dry("embeddings", "NPROC=2") == (".venv/bin/torchrun --nproc-per-node=2 --standalone -m pipeline.cli "
                                            "embed --dataset sci --llm minilm")
    multi = dry("train", "METHOD=lora", "NPROC=1", "TORCHRUN_ARGS=--nnodes=2 --rdzv-endpoint=h:29400")
    assert multi.startswith(".venv/bin/torchrun --nproc-per-node=1 --nnodes=2 --rdzv-endpoint=h:29400 -m "
                            "pipeline.cli train --method lora")


# ---------------------------------------------------------------- two processes
def test_sharded_store_equals_single_process_store_and_resumes(home, tiny_bert):
    from featurestore import embed_items

    ids, texts = make_texts(N_ITEMS)
    single = embed_items(home / "single", "toy", ids, texts, str(tiny_bert), cache_dir=home / "cache", **EMBED)
    assert len(single.manifest["shards"]) == 3

    out = home / "embed-job"
    done = torchrun("embed", {"store": str(home / "sharded"), "cache": str(home / "cache"),
                              "llm": str(tiny_bert)}, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    first, second = ranks_output(out)
    # the interrupted job had written all 10 chunks (shards of 16, 16, 8 rows; chunks of 5), dealt to both ranks
    assert first["chunks_after_kill"] == 10 and first["embedded_before_kill"] + second["embedded_before_kill"] == 40
    assert min(first["embedded_before_kill"], second["embedded_before_kill"]) >= 15
    # the resumed job embedded only the chunks deleted in between, and every rank opened the committed store
    stats = first["run_stats"]
    assert stats["embedded"] == first["deleted_rows"] > 0 and stats["resumed"] == 40 - first["deleted_rows"]
    assert stats["world_size"] == 2 and second["run_stats"]["embedded"] == stats["embedded"]
    assert first["n_items"] == second["n_items"] == 40

    sharded = open_store(home / "sharded", "toy", str(tiny_bert))
    assert not (sharded.folder / ".partial").exists()
    assert [s["file"] for s in sharded.manifest["shards"]] == [s["file"] for s in single.manifest["shards"]]
    assert sharded.index.equals(single.index)        # item ids, text hashes, token counts, shard and row
    np.testing.assert_allclose(sharded.top_layers(3), single.top_layers(3), rtol=1e-5, atol=1e-6)
    again = embed_items(home / "sharded", "toy", ids, texts, str(tiny_bert), cache_dir=home / "cache", **EMBED)
    assert again.run_stats["cache_hit"] is True          # one process takes the sharded store as its own


def test_ddp_steps_equal_single_process(home, tiny_bert):
    import polars as pl

    features = np.random.default_rng(0).standard_normal((N_ITEMS, N_LAYERS, HIDDEN)).astype(np.float16)
    home.mkdir(parents=True, exist_ok=True)
    np.save(home / "features.npy", features)
    grads_one = run_jobs(home / "one", tiny_bert, features)
    out = home / "train-job"
    done = torchrun("train", {"root": str(home / "two"), "llm": str(tiny_bert),
                              "features": str(home / "features.npy")}, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    grads_two = torch.load(out / "grads.pt", weights_only=True)

    def state(root: Path, run: str) -> dict[str, torch.Tensor]:
        saved = torch.load(root / "runs" / run / BEST_FILE, weights_only=True)
        return {k: v for k, v in saved.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}

    def result(root: Path, run: str) -> dict[str, Any]:
        return json.loads((root / "runs" / run / "result.json").read_text())

    def epochs(root: Path, run: str) -> pl.DataFrame:
        return pl.read_parquet(root / "runs" / run / "epochs.parquet")

    for run in ("ssna", "lora"):
        # the first step's gradient (lora: 2 accumulated batches) is the single process's, parameter by parameter
        assert len(grads_two[run]) == len(grads_one[run]) > 10
        for got, expected in zip(grads_two[run], grads_one[run], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=run)
        assert sum(bool(g.abs().sum() > 0) for g in grads_one[run]) > 10
        # so are the parameters after the last step, to float tolerance: Adam turns a gradient entry near 0
        # into a step of ±lr, so a rare entry may differ by up to 2·lr·steps (a rank's share is also laid out for
        # attention by its own length groups, so sums run in another order: ~0.7% of LoRA's entries move > 2e-5)
        one, two = state(home / "one", run), state(home / "two", run)
        initial = torch.load(out / f"{run}-initial.pt", weights_only=True)
        assert one.keys() == two.keys() and len(one) > 10
        assert sum(not torch.equal(one[k], initial[k]) for k in one if k in initial) > 10
        diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
        assert float((diff > 2e-5).float().mean()) < 0.02 and float(diff.max()) <= 2 * 1e-2 * 3
        assert epochs(home / "two", run)["train_loss"][0] == pytest.approx(epochs(home / "one", run)["train_loss"][0],
                                                                          rel=1e-5)
        a, b = result(home / "one", run), result(home / "two", run)
        for metric in ("valid_R@10", "valid_N@50", "test_R@10", "test_N@50"):
            assert b[metric] == pytest.approx(a[metric], abs=1e-9), (run, metric)
        assert b["device"] == "cpu x2" and a["device"] == "cpu"
        assert "world_size" not in json.loads((home / "one" / "runs" / run / "config.json").read_text())
        assert json.loads((home / "two" / "runs" / run / "config.json").read_text())["world_size"] == 2
    # negatives from each rank's share only: another objective, another gradient, and the run records it
    assert any(not torch.allclose(g, e, rtol=1e-2, atol=1e-4)
               for g, e in zip(grads_two["ssna-local"], grads_one["ssna-local"], strict=True))
    assert json.loads(result(home / "two", "ssna-local")["hparams"])["negatives"] == "local/2"
    results = pl.read_parquet(home / "two" / "results.parquet")
    assert sorted(results["run_id"].to_list()) == ["lora", "ssna", "ssna-local"]
    assert [r["results_rows"] for r in ranks_output(out)] == [3, 3]   # every rank saw the same 3 finished runs


# ---------------------------------------------------------------- the torchrun workers
class _Killed(Exception):
    """Stands for a kill after every chunk was written and before any shard was assembled."""


def _embed_worker(args: dict[str, Any]) -> dict[str, Any]:
    """Embed into args['store'] twice: first killed before assembly, then (after rank 0 deletes two chunks,
    one of each rank) to completion; report what this rank embedded and saw."""
    import h5py

    import featurestore.embed as fe
    from featurestore.distributed import barrier, is_main

    ids, texts = make_texts(N_ITEMS)
    call = dict(cache_dir=Path(args["cache"]), **EMBED)
    embedded = [0]
    real_chunk, real_build = fe._embed_chunk, fe._build_shard

    def counting(run: Any, path: Path, rows: np.ndarray, *a: Any, **k: Any) -> Any:
        embedded[0] += len(rows)
        return real_chunk(run, path, rows, *a, **k)

    def killed(*a: Any, **k: Any) -> None:
        raise _Killed

    fe._embed_chunk, fe._build_shard = counting, killed
    try:
        fe.embed_items(Path(args["store"]), "toy", ids, texts, args["llm"], **call)
    except _Killed:
        pass
    fe._build_shard = real_build
    report: dict[str, Any] = {"embedded_before_kill": embedded[0]}
    barrier()
    partial = sorted((Path(args["store"]) / "toy").glob("*/.partial/*/chunk-*.h5"))
    report["chunks_after_kill"] = len(partial)
    if is_main():                                 # shard 0's first two chunks: one of each rank
        report["deleted_rows"] = 0
        for path in partial[:2]:
            with h5py.File(path) as handle:
                report["deleted_rows"] += len(handle["rows"])
            path.unlink()
    barrier()
    store = fe.embed_items(Path(args["store"]), "toy", ids, texts, args["llm"], **call)
    report.update(run_stats=store.run_stats, n_items=store.n_items)
    return report


def _train_worker(args: dict[str, Any]) -> dict[str, Any]:
    """Run ``run_jobs`` on this rank; rank 0 also keeps each model's initial weights for the test."""
    import polars as pl

    import train.loop as loop
    from featurestore.distributed import barrier, is_main

    root, real_build = Path(args["root"]), loop.build_model

    def build_and_keep_initial(cfg: TrainConfig, inputs: ItemInputs, device: torch.device):
        model = real_build(cfg, inputs, device)
        if is_main():
            torch.save(model.state_dict(), Path(args["out"]) / f"{cfg.run_id}-initial.pt")
        return model

    loop.build_model = build_and_keep_initial
    grads = run_jobs(root, Path(args["llm"]), np.load(args["features"]))
    if is_main():
        torch.save(grads, Path(args["out"]) / "grads.pt")
    barrier()
    return {"results_rows": pl.read_parquet(root / "results.parquet").height}


if __name__ == "__main__":
    torch.set_num_threads(1)
    scenario, args_path = sys.argv[1], Path(sys.argv[2])
    arguments = json.loads(args_path.read_text())
    from featurestore.distributed import init_from_env

    init_from_env("cpu")
    answer = _embed_worker(arguments) if scenario == "embed" else _train_worker(arguments)
    (Path(arguments["out"]) / f"rank{rank()}.json").write_text(json.dumps(answer, default=str))
