"""The stages wired together through the CLI on a tiny dataset and a tiny random-init LLM: prepare → embed →
train → eval → recommend, and stage two never loading the LLM."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import pipeline.stages
from pipeline import workspace
from pipeline.cli import app
from pipeline.datasets.canonical import write_dataset
from tests.tinymodels import make_tiny_llm

N_ITEMS = 30
TINY = ["--a", "2", "--batch-size", "16", "--max-epochs", "2", "--threads", "1", "--no-progress"]


@pytest.fixture
def prepared(home, tmp_path):
    """A canonical dataset 'toy' and a stage-one store of it from a tiny BERT."""
    return make_toy(tmp_path, [f"item number {i} of kind {i % 4}" for i in range(N_ITEMS)])


@pytest.fixture
def twins(home, tmp_path):
    """Like ``prepared``, but items 2j and 2j + 1 share one text, so their scores tie exactly."""
    return make_toy(tmp_path, [f"item number {i // 2} of kind {i // 2 % 4}" for i in range(N_ITEMS)])


def make_toy(tmp_path, texts):
    rng = np.random.default_rng(0)
    items = pl.DataFrame({"item_idx": np.arange(N_ITEMS), "item_id": [f"I{i:03d}" for i in range(N_ITEMS)],
                          "text": texts})
    sequences = [((rng.integers(N_ITEMS) + np.arange(rng.integers(4, 9))) % N_ITEMS).astype(np.int32)
                 for _ in range(40)]
    write_dataset(workspace.data_dir() / "toy", items, sequences, [f"U{u}" for u in range(40)], {"source": "test"})
    llm = make_tiny_llm("bert", tmp_path / "tiny-bert")
    result = CliRunner().invoke(app, ["embed", "--dataset", "toy", "--llm", str(llm), "--no-progress"])
    assert result.exit_code == 0, result.output
    return llm


def train(llm, *extra):
    return CliRunner().invoke(app, ["train", "--dataset", "toy", "--llm", str(llm), *TINY, *extra])


def test_train_eval_recommend(prepared, monkeypatch):
    import featurestore.llms

    def no_llm(*args, **kwargs):
        raise AssertionError("stage two loaded the LLM")

    monkeypatch.setattr(featurestore.llms, "load_llm", no_llm)
    result = train(prepared, "--method", "ssna", "--run-id", "toy-ssna")
    assert result.exit_code == 0, result.output
    assert "test  R@10" in result.output
    assert train(prepared, "--method", "tmoe").exit_code == 0
    again = train(prepared, "--method", "ssna", "--run-id", "toy-ssna")
    assert again.exit_code == 0 and "already finished" in again.output

    results = pl.read_parquet(workspace.home() / "results.parquet")
    assert sorted(results["method"].to_list()) == ["ssna", "tmoe"]
    assert results["git_commit"].null_count() == 0

    evaluated = CliRunner().invoke(app, ["eval", "--dataset", "toy"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "SSNA" in evaluated.output.upper()
    full_only = CliRunner().invoke(app, ["eval", "--dataset", "toy", "--loss", "full"])
    assert full_only.exit_code == 0 and "No finished runs" in full_only.output
    wrong = CliRunner().invoke(app, ["eval", "--loss", "softmax"])
    assert wrong.exit_code == 2 and "inbatch, full" in wrong.output

    rec = CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--history", "I001 I002,I003", "-k", "5"])
    assert rec.exit_code == 0, rec.output
    lines = rec.output.strip().splitlines()
    assert len(lines) == 5 and not any(f" I00{i} " in line for line in lines for i in (1, 2, 3))
    bad = CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--history", "I001 NOPE ALSO-NOPE"])
    assert bad.exit_code == 1 and "NOPE, ALSO-NOPE" in bad.output

    real_load_run = pipeline.stages.load_run

    def reads_one_item(run_id):               # the model reads only the last item; exclusion takes all three
        model, data, cfg = real_load_run(run_id)
        return model, data, dataclasses.replace(cfg, max_len=1)

    monkeypatch.setattr(pipeline.stages, "load_run", reads_one_item)
    every = CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--history", "I001 I002 I003", "-k", "30"])
    assert every.exit_code == 0, every.output
    shown = every.output.strip().splitlines()
    assert len(shown) == N_ITEMS - 3 and not any(f" I00{i} " in line for line in shown for i in (1, 2, 3))


def test_recommend_to_dataset_users(prepared, tmp_path):
    assert train(prepared, "--method", "ssna", "--run-id", "toy-ssna").exit_code == 0
    out = tmp_path / "recs" / "all.parquet"
    written = CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--users", "all", "-k", "5",
                                       "--out", str(out), "--no-progress"])
    assert written.exit_code == 0, written.output
    recs = pl.read_parquet(out)
    assert recs.columns == ["user_id", "rank", "item_id", "score"] and recs.height == 40 * 5
    assert not list(out.parent.glob(".*.tmp"))
    sequences = pl.read_parquet(workspace.data_dir() / "toy" / "sequences.parquet")
    bought = {u: {f"I{i:03d}" for i in items} for u, items in sequences.select("user_id", "items").iter_rows()}
    for user, part in recs.group_by("user_id", maintain_order=True):
        assert part["rank"].to_list() == [1, 2, 3, 4, 5]
        assert part["score"].to_list() == sorted(part["score"].to_list(), reverse=True)
        assert not set(part["item_id"]) & bought[user[0]]          # the whole sequence is excluded

    # batched over users of different lengths, each user gets what their sequence alone gets (compared item by
    # item over the whole catalogue: the tiny model's scores are too close for their order to be stable)
    chunked = pipeline.stages.recommend_users("toy-ssna", ["U7", "U3", "U12"], k=N_ITEMS, batch_size=2)
    for user in ("U7", "U3", "U12"):
        items = sequences.filter(pl.col("user_id") == user)["items"][0].to_list()
        alone = {r["item_id"]: r["score"] for r in pipeline.stages.recommend("toy-ssna", [f"I{i:03d}" for i in items],
                                                                             k=N_ITEMS)}
        mine = dict(chunked.filter(pl.col("user_id") == user).select("item_id", "score").iter_rows())
        assert sorted(mine) == sorted(alone) and len(alone) == N_ITEMS - len(set(items))
        np.testing.assert_allclose([mine[i] for i in alone], list(alone.values()), rtol=1e-5, atol=1e-6)
    assert chunked["user_id"].unique(maintain_order=True).to_list() == ["U7", "U3", "U12"]

    kept = CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--users", "U3", "-k", str(N_ITEMS),
                                    "--keep-history", "--no-progress"])
    assert kept.exit_code == 0 and len(kept.output.strip().splitlines()) == N_ITEMS

    twice = CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--users", "U3, U3,", "-k", "2",
                                     "--no-progress"])
    assert twice.exit_code == 0 and len(twice.output.strip().splitlines()) == 2
    assert CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--users", " , "]).exit_code == 2
    unknown = CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--users", "U3,NOBODY"])
    assert unknown.exit_code == 1 and "NOBODY" in unknown.output and "sequences.parquet" in unknown.output
    both = CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--users", "all", "--history", "I001"])
    assert both.exit_code == 2 and "exactly one" in both.output
    stray = CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--history", "I001", "--out", str(out)])
    assert stray.exit_code == 2
    folder = CliRunner().invoke(app, ["recommend", "--run", "toy-ssna", "--users", "U3", "--out", str(tmp_path),
                                      "--no-progress"])
    assert folder.exit_code == 1 and "recs.parquet" in folder.output


def test_missing_store_names_the_command(prepared):
    result = train("some-other-llm", "--method", "ssna")
    assert result.exit_code == 1
    assert "make embeddings DATASET=toy LLM=some-other-llm" in result.output


def test_train_options_reach_the_run_config(prepared):
    result = train(prepared, "--method", "tmoe", "--run-id", "toy-tuned", "--temperature", "0.1", "--lr", "1e-3",
                   "--weight-decay", "1e-5", "--hidden-dropout", "0.1", "--attn-dropout", "0.2",
                   "--adapter-dropout", "0.3")
    assert result.exit_code == 0, result.output
    config = json.loads((workspace.runs_dir() / "toy-tuned" / "config.json").read_text())
    wanted = {"temperature": 0.1, "lr": 1e-3, "weight_decay": 1e-5, "hidden_dropout": 0.1, "attn_dropout": 0.2,
              "adapter_dropout": 0.3}
    assert {k: config[k] for k in wanted} == wanted
    bad = train(prepared, "--method", "tmoe", "--hidden-dropout", "1.0")
    assert bad.exit_code == 1 and "hidden_dropout = 1.0" in bad.output and "--hidden-dropout" in bad.output


def test_mean_pooled_store_trains_its_own_runs(prepared):
    """`embed --llm X:mean` writes a second store; `train --llm X:mean` reads it (never the LLM) under its own run
    id, and the paper's tables still give its settings."""
    mean = f"{prepared}:mean"
    embedded = CliRunner().invoke(app, ["embed", "--dataset", "toy", "--llm", mean, "--no-progress"])
    assert embedded.exit_code == 0, embedded.output
    plain, pooled = train(prepared, "--method", "ssna"), train(mean, "--method", "ssna")
    assert plain.exit_code == 0 and pooled.exit_code == 0, pooled.output
    runs = {p.name: json.loads((p / "config.json").read_text()) for p in workspace.runs_dir().iterdir()}
    assert len(runs) == 2 and sum("+mean_ssna" in name for name in runs) == 1
    mean_run = next(c for name, c in runs.items() if "+mean" in name)
    assert mean_run["llm"] == mean and mean_run["defaults_from"] == next(
        c for name, c in runs.items() if "+mean" not in name)["defaults_from"]
    assert sorted(pl.read_parquet(workspace.home() / "results.parquet")["llm"]) == [str(prepared), mean]


@pytest.mark.parametrize("trained_with", ["--keep-history", "--exclude-history"])
def test_retest_equals_a_run_trained_under_the_other_protocol(prepared, trained_with):
    """With one epoch the best epoch is the same whichever protocol chooses it, so re-evaluating a run under the
    other protocol must give exactly the metrics of the same run trained under that one."""
    other = "--exclude-history" if trained_with == "--keep-history" else "--keep-history"
    one = ["--method", "ssna", "--max-epochs", "1"]
    assert train(prepared, *one, trained_with, "--run-id", "source").exit_code == 0
    assert train(prepared, *one, other, "--run-id", "native").exit_code == 0
    result = CliRunner().invoke(app, ["retest", "source", other, "--no-progress"])
    assert result.exit_code == 0, result.output
    protocol = other.removeprefix("--").replace("-", "_")
    retested_dir, native_dir = workspace.runs_dir() / f"source.{protocol}", workspace.runs_dir() / "native"
    retested, native, source = (json.loads((d / "result.json").read_text())
                                for d in (retested_dir, native_dir, workspace.runs_dir() / "source"))
    assert any(source[f"test_{m}"] != native[f"test_{m}"] for m in ("R@10", "N@10")), "the protocols must differ here"
    for m in ("R@10", "R@50", "N@10", "N@50"):
        assert retested[f"test_{m}"] == native[f"test_{m}"] and retested[f"valid_{m}"] == native[f"valid_{m}"]
    assert pl.read_parquet(retested_dir / "test_per_user.parquet").equals(
        pl.read_parquet(native_dir / "test_per_user.parquet"))
    assert json.loads(retested["hparams"])["epoch_chosen_under"] == trained_with.removeprefix("--").replace("-", "_")

    again = CliRunner().invoke(app, ["retest", "source", other, "--no-progress"])
    assert again.exit_code == 0 and "done before" in again.output
    same = CliRunner().invoke(app, ["retest", "source", trained_with, "--no-progress"])
    assert same.exit_code == 1 and "source" in same.output
    (retested_dir / "result.json").write_text("{")
    damaged = CliRunner().invoke(app, ["retest", "source", other, "--no-progress"])
    assert damaged.exit_code == 1 and f"{retested_dir / 'result.json'}: line 1" in damaged.output
    repaired = CliRunner().invoke(app, ["retest", "source", other, "--overwrite", "--no-progress"])
    assert repaired.exit_code == 0 and "done before" not in repaired.output, repaired.output
    assert json.loads((retested_dir / "result.json").read_text())["test_N@10"] == native["test_N@10"]
    rows = pl.read_parquet(workspace.home() / "results.parquet").filter(pl.col("run_id") == retested_dir.name)
    assert rows.height == 1 and rows["test_N@10"][0] == native["test_N@10"]
    short = "exclude" if other == "--exclude-history" else "keep"
    shown = CliRunner().invoke(app, ["eval", "--dataset", "toy", "--history", short])
    assert shown.exit_code == 0 and "epoch chosen under" in shown.output
    wrong = CliRunner().invoke(app, ["eval", "--history", "drop"])
    assert wrong.exit_code == 2 and "keep, exclude" in wrong.output


def test_retest_ranks_ties_by_the_rule_asked(twins):
    """Re-ranking a run under another tie rule gives the metrics of the same run trained under that rule; with
    every item tied to its twin the rules must differ, and `eval --ties` tables each apart."""
    one = ["--method", "tmoe", "--max-epochs", "1"]
    assert train(twins, *one, "--run-id", "source").exit_code == 0
    assert train(twins, *one, "--ties", "expected", "--run-id", "native").exit_code == 0
    result = CliRunner().invoke(app, ["retest", "source", "--keep-history", "--ties", "expected", "--no-progress"])
    assert result.exit_code == 0, result.output
    retested, native, source = (json.loads((workspace.runs_dir() / name / "result.json").read_text())
                                for name in ("source.keep_history.ties_expected", "native", "source"))
    assert source["test_N@10"] < native["test_N@10"], "twins tie: counting ties against the target must cost"
    for m in ("R@10", "R@50", "N@10", "N@50"):
        assert retested[f"test_{m}"] == native[f"test_{m}"] and retested[f"valid_{m}"] == native[f"valid_{m}"]
    hparams = json.loads(retested["hparams"])
    assert hparams["ties"] == "expected" and hparams["epoch_chosen_under"] == "keep_history"
    both = CliRunner().invoke(app, ["retest", "source", "--ties", "expected", "--no-progress"])
    assert both.exit_code == 0 and "source.exclude_history.ties_expected" in both.output, both.output
    same = CliRunner().invoke(app, ["retest", "native", "--keep-history", "--ties", "expected", "--no-progress"])
    assert same.exit_code == 1 and "native" in same.output
    tables = {rule: CliRunner().invoke(app, ["eval", "--dataset", "toy", "--ties", rule])
              for rule in ("pessimistic", "expected")}
    assert all(t.exit_code == 0 for t in tables.values())
    assert "mid-rank" in tables["expected"].output and "mid-rank" not in tables["pessimistic"].output
    assert f"{source['test_R@50']:.4f}" in tables["pessimistic"].output
    wrong = CliRunner().invoke(app, ["eval", "--ties", "optimistic"])
    assert wrong.exit_code == 2 and "pessimistic, expected, index" in wrong.output
    bad = train(twins, *one, "--ties", "optimistic")
    assert bad.exit_code == 1 and "--ties" in bad.output


def test_adalora_run_reloads_for_retest_and_recommend(prepared):
    """AdaLoRA's rank schedule needs the run's planned steps even to rebuild the model from its checkpoint."""
    trained = train(prepared, "--method", "adalora", "--max-steps", "2", "--batch-size", "8", "--grad-accum", "1",
                    "--run-id", "ada")
    assert trained.exit_code == 0, trained.output
    retested = CliRunner().invoke(app, ["retest", "ada", "--no-progress"])
    assert retested.exit_code == 0 and "ada.exclude_history" in retested.output, retested.output
    rec = CliRunner().invoke(app, ["recommend", "--run", "ada", "--history", "I001", "-k", "3"])
    assert rec.exit_code == 0 and len(rec.output.strip().splitlines()) == 3, rec.output


def test_references_command(prepared):
    shown = CliRunner().invoke(app, ["references", "--dataset", "toy", "--llm", str(prepared)])
    assert shown.exit_code == 0, shown.output
    rows = [line for line in shown.output.splitlines() if line.startswith("| popularity") or "neighbour" in line]
    assert len(rows) == 2 and all(0.0 <= float(v) <= 1.0 for row in rows for v in row.strip("| ").split(" | ")[1:])
    missing = CliRunner().invoke(app, ["references", "--dataset", "toy", "--llm", "other-llm"])
    assert missing.exit_code == 1 and "make embeddings DATASET=toy LLM=other-llm" in missing.output
    deep = CliRunner().invoke(app, ["references", "--dataset", "toy", "--llm", str(prepared), "--layer", "99"])
    assert deep.exit_code == 1 and "layer 99" in deep.output


def test_references_rank_ties_by_the_rule_asked(twins):
    """Every target ties its twin under the neighbour, and items of equal count tie on popularity: the expected
    rank puts a tied target higher than the pessimistic rule, so N@50 (every rank counts) must rise."""
    shown = {rule: CliRunner().invoke(app, ["references", "--dataset", "toy", "--llm", str(twins), "--ties", rule])
             for rule in ("pessimistic", "expected")}
    assert all(r.exit_code == 0 and "ties" in r.output for r in shown.values()), shown
    rows = {rule: [[float(v) for v in line.strip("| ").split(" | ")[1:]] for line in r.output.splitlines()
                   if line.startswith("| popularity") or "neighbour" in line] for rule, r in shown.items()}
    for low, high in zip(rows["pessimistic"], rows["expected"], strict=True):
        assert low[3] < high[3] and low[1] <= high[1]


def test_interrupted_run_needs_resume(prepared):
    from train.loop import CHECKPOINT_FILE

    assert train(prepared, "--method", "tmlp", "--run-id", "cut").exit_code == 0
    run_dir = workspace.runs_dir() / "cut"
    (run_dir / "result.json").unlink()
    (run_dir / CHECKPOINT_FILE).write_bytes(b"")   # an interrupted run's leftovers
    result = train(prepared, "--method", "tmlp", "--run-id", "cut")
    assert result.exit_code == 1 and "--resume" in result.output
    assert train(prepared, "--method", "tmlp", "--run-id", "cut", "--restart").exit_code == 0


def test_sweep_dry_run_lists_the_paper_grid(prepared):
    result = CliRunner().invoke(app, ["sweep", "--methods", "ssna,tmlp", "--datasets", "toy", "--llms", "x",
                                      "--seeds", "0,1", "--paper-grid", "--dry-run"])
    assert result.exit_code == 0, result.output
    # ssna: 4 batch sizes × 2 a; tmlp: 4 batch sizes × 3 depths; each for 2 seeds
    assert result.output.splitlines()[0] == f"{(8 + 12) * 2} runs"


def sweep_keys(methods: str, *extra: str) -> list[str]:
    """The run ids `ssnarec sweep --dry-run` lists for METHODS on the toy dataset, seed 0."""
    result = CliRunner().invoke(app, ["sweep", "--methods", methods, "--datasets", "toy", "--llms", "x",
                                      "--seeds", "0", "--dry-run", *extra])
    assert result.exit_code == 0, result.output
    return [line.split("] ", 1)[1] for line in result.output.splitlines()[1:]]


def test_sweep_loss_option_names_other_runs(prepared):
    """--loss full is part of each run's identity: the same grid lists other run folders than the in-batch one."""
    def keys(*extra):
        return sweep_keys("tmoe", *extra)
    assert len(keys()) == len(keys("--loss", "full")) == 1
    assert keys() != keys("--loss", "full") and keys() == keys("--loss", "inbatch")


def test_sweep_gru_order_renames_only_ssna_runs(prepared):
    def keys(*extra):
        return sweep_keys("ssna,tmoe", *extra)
    (ssna, tmoe), (ssna_up, tmoe_up) = keys(), keys("--gru-order", "bottom_up")
    assert ssna != ssna_up and tmoe == tmoe_up
    assert set(keys("--item-ids")).isdisjoint(keys())


def test_sweep_lr_decays_names_other_runs(prepared):
    plain, decayed = sweep_keys("tmoe"), sweep_keys("tmoe", "--lr-decays", "1")
    assert plain != decayed and plain == sweep_keys("tmoe", "--lr-decays", "0", "--lr-decay-factor", "0.5")
    assert decayed != sweep_keys("tmoe", "--lr-decays", "1", "--lr-decay-factor", "0.5")


def test_grad_checkpointing_trains_the_same_model_in_its_own_run(prepared):
    """--grad-checkpointing changes memory and time, not the result: its own run folder and results row (the
    time and memory they record differ), the same metrics."""
    plain = train(prepared, "--method", "ssna")
    checkpointed = train(prepared, "--method", "ssna", "--grad-checkpointing")
    assert plain.exit_code == 0 and checkpointed.exit_code == 0, checkpointed.output
    rows = pl.read_parquet(workspace.home() / "results.parquet").sort("run_id")
    assert rows.height == 2 and rows["run_id"].n_unique() == 2
    assert sorted(json.loads(h).get("grad_checkpointing", False) for h in rows["hparams"]) == [False, True]
    for metric in ("valid_R@10", "test_R@10", "test_N@10", "test_R@50", "test_N@50"):
        assert rows[metric][0] == rows[metric][1], metric


def test_history_bias_trains_into_its_own_tables_and_ranks_what_the_model_read(prepared, monkeypatch):
    import torch

    assert train(prepared, "--method", "ssna").exit_code == 0
    biased = train(prepared, "--method", "ssna", "--history-bias", "--run-id", "toy-hb")
    assert biased.exit_code == 0, biased.output
    rows = pl.read_parquet(workspace.home() / "results.parquet")
    assert sorted(json.loads(h).get("history_bias", False) for h in rows["hparams"]) == [False, True]
    for flag, rows_shown in (("--no-history-bias", 1), ("--history-bias", 1)):
        shown = CliRunner().invoke(app, ["eval", "--dataset", "toy", flag])
        assert shown.exit_code == 0 and shown.output.count("(1)") == 4 * rows_shown, shown.output
    assert "--history-bias" in CliRunner().invoke(app, ["eval", "--dataset", "toy", "--history-bias"]).output

    real_load_run = pipeline.stages.load_run

    def with_bias(value):
        def load(run_id):
            model, data, cfg = real_load_run(run_id)
            with torch.no_grad():
                model.history_bias.fill_(value)       # cosines lie in [-1, 1]: ±5 puts history items first or last
            return model, data, dataclasses.replace(cfg, max_len=2)
        return load

    def top(*extra):
        out = CliRunner().invoke(app, ["recommend", "--run", "toy-hb", "--history", "I001 I002 I003", *extra])
        assert out.exit_code == 0, out.output
        return [line.split()[2] for line in out.output.strip().splitlines()]   # rank, score, item id, text

    monkeypatch.setattr(pipeline.stages, "load_run", with_bias(5.0))
    assert sorted(top("-k", "2", "--keep-history")) == ["I002", "I003"]    # the two items the model reads
    assert not {"I001", "I002", "I003"} & set(top("-k", "5"))               # exclusion still removes them all
    monkeypatch.setattr(pipeline.stages, "load_run", with_bias(-5.0))
    assert sorted(top("-k", str(N_ITEMS), "--keep-history")[-2:]) == ["I002", "I003"]


def test_sweep_searches_the_shared_settings(prepared):
    """--lr/--temperature/… take comma lists and multiply the grid; their defaults name the default runs."""
    plain = sweep_keys("tmoe,lora")
    grid = sweep_keys("tmoe,lora", "--lr", "3e-4,1e-3", "--temperature", "0.07,0.1", "--hidden-dropout", "0.5")
    assert len(plain) == 2 and len(grid) == 2 * 2 * 2
    assert set(plain) <= set(grid)
    # LoRA reads no adapter: a grid over adapter dropout lists its run once, and TMoE's twice
    adapters = sweep_keys("tmoe,lora", "--adapter-dropout", "0.1,0.2")
    assert len(set(adapters)) == len(adapters) == 3 and sum("lora" in key for key in adapters) == 1
