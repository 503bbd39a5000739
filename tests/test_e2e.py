"""The end-to-end baselines (train.e2e): LoRA / AdaLoRA through PEFT and Full top-n_t, on tiny random-init LLMs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tinymodels import WORDS, make_tiny_llm

import train.loop as loop
from featurestore import load_llm
from train import ItemInputs, TrainConfig, fit, leave_one_out
from train.e2e import LLMItemEncoder, build_llm_encoder, tokenize_items
from train.loop import BEST_FILE, RunStateError, build_model, resolve

N_ITEMS, N_USERS = 30, 24


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine thread hand-offs cost 5x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llms")
    return {family: make_tiny_llm(family, root / family, n_layers=2, hidden=32)
            for family in ("bert", "distilbert", "roberta")}


def item_texts(n: int = N_ITEMS, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 12))) for _ in range(n)]


def sequences(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, N_ITEMS, size=rng.integers(4, 9)) for _ in range(N_USERS)]


def config(kind: str, llm: Path, **kw) -> TrainConfig:
    base = dict(method=kind, dataset="synthetic", llm=str(llm), d=16, n_layers=1, n_heads=1, inner_size=16,
                max_len=10, batch_size=8, grad_accum=2, max_epochs=2, patience=5, max_tokens=16, lora_r=2,
                adalora_init_r=4, p=0.1, n_t=1, device="cpu", eval_batch_size=64)
    return TrainConfig(**{**base, **kw})


def inputs(llm: Path, home: Path, total_steps: int | None = None) -> ItemInputs:
    return ItemInputs(N_ITEMS, texts=item_texts(), llm=str(llm), cache_dir=home / "cache", total_steps=total_steps)


def train_steps(kind: str, llm: Path, home: Path, steps: int, **kw):
    """A SequentialRecommender trained by hand for STEPS optimiser steps (hooks called as the loop does)."""
    cfg, _ = resolve(config(kind, llm, **kw))
    split = leave_one_out(sequences(), N_ITEMS, cfg.max_len)
    model = build_model(cfg, inputs(llm, home, total_steps=steps), torch.device("cpu"))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    hooks = model.item_encoder.training_hooks
    rng = np.random.default_rng(0)
    budgets, grads = [], set()
    model.train()
    for step in range(1, steps + 1):
        batch = next(split.train.batches(cfg.batch_size, rng))
        loss = model.loss(batch) + (hooks.extra_loss() if hooks is not None else 0.0)
        loss.backward()
        grads |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        if hooks is not None:
            hooks.after_step(step)
            budgets.append(hooks.rank_budget())
        optimizer.zero_grad(set_to_none=True)
    return model, initial, grads, budgets


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_tokenised_once_and_pooling_matches_the_plain_llm(tiny_llms, home, pooling):
    """Per-call padding, length sorting and eval micro-batches give each item its own [CLS] state, or with
    ``LLM:mean`` the mean of its own token states (padding left out)."""
    llm = tiny_llms["bert"]
    name = f"{llm}:mean" if pooling == "mean" else str(llm)
    cfg, _ = resolve(config("full", name, n_t=1))
    encoder = build_llm_encoder("full", cfg, inputs(name, home), "cpu")
    assert isinstance(encoder, LLMItemEncoder) and encoder.training_hooks is None
    assert encoder.token_ids.shape[0] == N_ITEMS and int(encoder.token_lengths.max()) <= cfg.max_tokens
    encoder.eval_chunk = 7                                   # several micro-batches, unequal lengths
    plain, tokenizer, _ = load_llm(str(llm), home / "cache")
    idx = torch.tensor([5, 0, 29, 5, 12, 3, 17, 8, 21, 2, 11])
    with torch.no_grad():
        got = encoder.eval().embed(idx)
        for row, i in zip(got, idx.tolist(), strict=True):
            enc = tokenizer(item_texts()[i], truncation=True, max_length=cfg.max_tokens, return_tensors="pt")
            assert enc["input_ids"][0, 0] == tokenizer.cls_token_id
            states = plain(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state[0]
            want = states[0] if pooling == "cls" else states.mean(0)
            torch.testing.assert_close(row, want, rtol=1e-4, atol=1e-5)
        assert encoder(idx).shape == (len(idx), cfg.d)
    ids, lengths = tokenize_items(tokenizer, ["glue", "a saw blade of steel"], max_tokens=4)
    assert lengths.tolist() == [3, 4] and ids.shape == (2, 4)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_lora_targets_the_attention_projections_by_name(tiny_llms, home, family):
    cfg, _ = resolve(config("lora", tiny_llms[family]))
    encoder = build_llm_encoder("lora", cfg, inputs(tiny_llms[family], home), "cpu")
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    targets = ("q_lin", "v_lin") if family == "distilbert" else ("query", "value")
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable if "lora_" in n}
    assert adapted == set(targets)
    assert sum("lora_A" in n for n in trainable) == 2 * 2      # 2 layers × 2 projections
    assert trainable - {n for n in trainable if "lora_" in n} == {"proj.weight", "proj.bias"}
    assert encoder.training_hooks is None


@pytest.mark.parametrize("kind", ["lora", "adalora", "full"])
def test_only_adapters_or_top_layers_learn_and_the_rest_is_bit_identical(tiny_llms, home, kind):
    llm = tiny_llms["distilbert" if kind == "full" else "bert"]
    model, initial, grads, _ = train_steps(kind, llm, home, steps=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder_trainable = {n for n in trainable if n.startswith("item_encoder.")}
    if kind == "full":
        assert encoder_trainable == {n for n, _ in model.named_parameters()
                                     if n.startswith(("item_encoder.llm.transformer.layer.1.", "item_encoder.proj."))}
    else:
        assert all(".lora_" in n or n.startswith("item_encoder.proj.") for n in encoder_trainable)
    assert grads <= trainable
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), initial[n])}
    assert changed <= trainable
    # everything trainable moved, except that AdaLoRA may prune a whole lora_E (initially 0) back to zero
    assert all("lora_E" in n for n in trainable - changed) if kind == "adalora" else changed == trainable
    assert {n for n in grads if n.startswith("item_encoder.llm.")}, "no LLM-side gradient at all"

    on_disk = load_file(llm / "model.safetensors")           # the LLM's weights as shipped
    frozen = model.item_encoder.frozen
    llm_params = dict(model.item_encoder.llm.named_parameters())
    assert frozen == {n for n, p in llm_params.items() if not p.requires_grad}
    base = {plain_name(n) for n in frozen if "ranknum" not in n}
    assert base <= on_disk.keys() and (kind == "full") == (base != on_disk.keys())
    for name in frozen - {n for n in frozen if "ranknum" in n}:
        assert torch.equal(llm_params[name], on_disk[plain_name(name)]), f"frozen {name} changed"


def plain_name(peft_name: str) -> str:
    """The LLM's own parameter name of a (possibly PEFT-wrapped) frozen parameter."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def test_adalora_regulariser_is_peft_s_and_in_the_loss(tiny_llms, home, monkeypatch):
    model, _, _, _ = train_steps("adalora", tiny_llms["bert"], home, steps=2)
    hooks = model.item_encoder.training_hooks
    reg = hooks.extra_loss()
    assert reg.requires_grad and float(reg.detach()) > 0
    # PEFT's own computation, as AdaLoraModel.forward does it when the wrapped model returns a .loss
    tuner = hooks.tuner

    class Out:
        loss = torch.zeros(())

    monkeypatch.setattr(tuner.model, "forward", lambda *a, **k: Out())
    torch.testing.assert_close(tuner.forward().loss, reg.detach(), rtol=1e-5, atol=1e-6)
    assert hooks.config.orth_reg_weight > 0

    # The loop adds it to every batch's loss and calls the rank update after every optimiser step.
    calls: dict[str, list] = {"extra": [], "after": []}
    extra, after = type(hooks).extra_loss, type(hooks).after_step

    def spy_extra(self):
        value = extra(self)
        calls["extra"].append(float(value.detach()))
        return value

    def spy_after(self, step):
        calls["after"].append(step)
        return after(self, step)

    monkeypatch.setattr(type(hooks), "extra_loss", spy_extra)
    monkeypatch.setattr(type(hooks), "after_step", spy_after)
    cfg = config("adalora", tiny_llms["bert"], max_epochs=1)
    split = leave_one_out(sequences(), N_ITEMS, cfg.max_len)
    result = fit(cfg, split, inputs(tiny_llms["bert"], home), home / "runs", progress=False)
    batches = -(-len(split.train) // cfg.batch_size)
    assert len(calls["extra"]) == batches and all(v > 0 for v in calls["extra"])
    assert calls["after"] == list(range(1, -(-batches // cfg.grad_accum) + 1))
    history = json.loads((result.run_dir / "result.json").read_text())
    assert history["method"] == "adalora"


def test_adalora_rank_budget_shrinks_to_target(tiny_llms, home):
    steps = 12
    model, _, _, budgets = train_steps("adalora", tiny_llms["bert"], home, steps=steps)
    hooks = model.item_encoder.training_hooks
    n_matrices = 2 * 2
    init, target = 4 * n_matrices, 2 * n_matrices             # adalora_init_r=4, lora_r=2
    assert hooks.config.total_step == steps and hooks.config.tinit < steps - hooks.config.tfinal
    assert budgets[0] == init > budgets[-1] == target
    assert all(a >= b for a, b in zip(budgets, budgets[1:], strict=False))
    assert len(set(budgets)) > 2                             # it moves through intermediate budgets
    live = sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)
    assert live <= target


@pytest.mark.parametrize("kind", ["lora", "adalora", "full"])
def test_fit_end_to_end(tiny_llms, home, kind):
    llm = tiny_llms["roberta" if kind == "lora" else "bert"]
    cfg = config(kind, llm, max_epochs=2)
    split = leave_one_out(sequences(), N_ITEMS, cfg.max_len)
    result = fit(cfg, split, inputs(llm, home), home / "runs", results_path=home / "results.parquet",
                 progress=False)
    row = result.row
    assert row["method"] == kind and row["epochs"] == 2 and not row["seconds_extrapolated"]
    assert 0.0 <= row["test_R@10"] <= 1.0 and row["seconds_per_epoch"] > 0 and row["peak_memory_mb"] > 0
    best = torch.load(result.run_dir / BEST_FILE, weights_only=True)
    model = build_model(resolve(cfg)[0], inputs(llm, home, total_steps=2), torch.device("cpu"))
    # checkpoints hold the trainable weights (and SASRec), not the frozen LLM
    frozen = {f"item_encoder.llm.{n}" for n in model.item_encoder.frozen}
    assert frozen and not frozen & set(best)
    assert {n for n, p in model.named_parameters() if p.requires_grad} <= set(best)
    model.load_state_dict(best)                             # strict: the frozen weights are kept as loaded


def test_bounded_run_is_extrapolated(tiny_llms, home):
    cfg = config("lora", tiny_llms["bert"], max_epochs=3, max_steps=1)
    split = leave_one_out(sequences(), N_ITEMS, cfg.max_len)
    row = fit(cfg, split, inputs(tiny_llms["bert"], home), home / "runs", progress=False).row
    assert row["epochs"] == 1 and row["seconds_extrapolated"]


@pytest.mark.parametrize("kind", ["adalora", "full"])
def test_resume_equals_an_uninterrupted_run(tiny_llms, home, monkeypatch, kind):
    """Killed after epoch 1's checkpoint, then resumed: the final weights (AdaLoRA's rank-allocator state
    included) and every epoch's figures equal the uninterrupted run's."""
    llm = tiny_llms["bert"]
    split = leave_one_out(sequences(), N_ITEMS, 10)
    cfg = {"grad_accum": 1, "max_epochs": 3}     # 10 steps an epoch; AdaLoRA still pruning after the kill
    save, last, kill = loop.save_atomic, {}, {"armed": True}

    class Killed(Exception):
        pass

    def record(obj, path):
        save(obj, path)
        if path.name == loop.CHECKPOINT_FILE:
            last[path.parent.name] = torch.load(path, weights_only=False)
            if path.parent.name == "killed" and kill["armed"]:
                kill["armed"] = False
                raise Killed

    monkeypatch.setattr(loop, "save_atomic", record)
    whole = fit(config(kind, llm, run_id="whole", **cfg), split, inputs(llm, home), home / "runs", progress=False)
    with pytest.raises(Killed):
        fit(config(kind, llm, run_id="killed", **cfg), split, inputs(llm, home), home / "runs", progress=False)
    with pytest.raises(RunStateError):
        fit(config(kind, llm, run_id="killed", **cfg), split, inputs(llm, home), home / "runs", progress=False)
    resumed = fit(config(kind, llm, run_id="killed", **cfg), split, inputs(llm, home), home / "runs", resume=True,
                  progress=False)
    assert resumed.resumed_from == 1 and last["whole"]["epoch"] == last["killed"]["epoch"] == 3
    a, b = last["whole"], last["killed"]
    assert [{k: v for k, v in h.items() if k not in ("seconds", "epoch_seconds")} for h in a["history"]] == \
        [{k: v for k, v in h.items() if k not in ("seconds", "epoch_seconds")} for h in b["history"]]
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["model"][key]), key
    if kind == "adalora":
        extra = a["model"]["item_encoder._extra_state"]["adalora"]
        assert extra["rank_pattern"] and extra["rank_pattern"] == b["model"]["item_encoder._extra_state"]["adalora"][
            "rank_pattern"]
        for name, tensor in extra["exp_avg_ipt"].items():
            assert torch.equal(tensor, b["model"]["item_encoder._extra_state"]["adalora"]["exp_avg_ipt"][name])
    for key in ("valid_R@10", "test_R@10", "test_N@10", "best_epoch", "epochs"):
        assert resumed.row[key] == whole.row[key], key


def test_grad_checkpointing_gives_the_same_gradients(tiny_llms, home):
    llm = tiny_llms["bert"]
    split = leave_one_out(sequences(), N_ITEMS, 10)
    batch = next(split.train.batches(8))
    grads = []
    for checkpointing in (False, True):
        cfg, _ = resolve(config("lora", llm, grad_checkpointing=checkpointing))
        model = build_model(cfg, inputs(llm, home), torch.device("cpu")).train()
        torch.manual_seed(1)
        model.loss(batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_bad_inputs_are_refused_with_the_fix(tiny_llms, home):
    llm = tiny_llms["bert"]
    cfg, _ = resolve(config("full", llm, n_t=3))
    with pytest.raises(ValueError, match="n_t=3"):
        build_llm_encoder("full", cfg, inputs(llm, home), "cpu")
    with pytest.raises(ValueError, match="texts"):
        build_llm_encoder("lora", cfg, ItemInputs(N_ITEMS, llm=str(llm), cache_dir=home), "cpu")
    with pytest.raises(ValueError, match="one per item"):
        build_llm_encoder("lora", cfg, ItemInputs(N_ITEMS, texts=["x"], llm=str(llm), cache_dir=home), "cpu")
    with pytest.raises(ValueError, match="total_steps"):
        build_llm_encoder("adalora", cfg, inputs(llm, home), "cpu")
    with pytest.raises(ValueError, match="at least 2"):                # PEFT would fail at step 1
        build_llm_encoder("adalora", cfg, inputs(llm, home, total_steps=1), "cpu")
    with pytest.raises(ValueError, match="unknown end-to-end method"):
        build_llm_encoder("bitfit", cfg, inputs(llm, home), "cpu")


class _Planned(Exception):
    """Raised by a stand-in build_model once fit has planned the run."""


@pytest.mark.parametrize("adalora_epochs", [None, 3])
def test_adalora_schedule_spans_adalora_epochs_else_max_epochs(tiny_llms, home, monkeypatch, adalora_epochs):
    planned = []

    def stop_at_build(cfg, inputs, device):
        planned.append(inputs.total_steps)
        raise _Planned

    monkeypatch.setattr(loop, "build_model", stop_at_build)
    cfg = config("adalora", tiny_llms["bert"], max_epochs=20, adalora_epochs=adalora_epochs)
    split = leave_one_out(sequences(), N_ITEMS, cfg.max_len)
    with pytest.raises(_Planned):
        fit(cfg, split, inputs(tiny_llms["bert"], home), home / "runs", progress=False)
    batches = -(-len(split.train) // cfg.batch_size)
    steps_per_epoch = -(-batches // cfg.grad_accum)
    assert planned == [steps_per_epoch * (adalora_epochs or cfg.max_epochs)]
