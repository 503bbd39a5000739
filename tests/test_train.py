"""Stage two: every store-based method in the registry, the SASRec invariants, training and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.synthetic import catalogue_walks
from train import METHODS, ItemInputs, TrainConfig, fit, leave_one_out
from train.data import Batch
from train.hparams import method_defaults
from train.loop import build_model, resolve
from train.methods import SSNAEncoder
from train.modules import MixtureOfHeads, MoEAdapters, Packing, SASRec, seeded_dropout

STORE_METHODS = [name for name, m in METHODS.items() if not m.uses_llm]
N_ITEMS, N_LAYERS, HIDDEN = 40, 4, 24


def tiny_cfg(method: str = "ssna", **kw) -> TrainConfig:
    base = dict(method=method, dataset="toy", llm="tiny", d=16, inner_size=32, n_experts=4, a=2, n_l=2,
                batch_size=16, max_epochs=3, patience=5, eval_batch_size=64, threads=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((N_ITEMS, N_LAYERS, HIDDEN)).astype(np.float16)


@pytest.fixture(scope="module")
def sequences() -> list[np.ndarray]:
    return catalogue_walks(60, N_ITEMS, 4, 12)


def inputs_for(features: np.ndarray) -> ItemInputs:
    return ItemInputs(N_ITEMS, layers=lambda a: features[:, :a])


def make_batch(histories: list[list[int]], targets: list[int]) -> Batch:
    lengths = [len(h) for h in histories]
    padded = [h + [0] * (max(lengths) - len(h)) for h in histories]
    return Batch(torch.tensor(padded), torch.tensor(lengths), torch.tensor(targets), torch.arange(len(targets)))


# ---------------------------------------------------------------- split
def test_leave_one_out_by_hand():
    split = leave_one_out([np.array([5, 6, 7, 8, 9]), np.array([1, 2, 3])], n_items=10, max_len=2)
    train = split.train.batch(np.arange(len(split.train)))
    # user 0: targets 6 (hist [5]) and 7 (hist [5, 6]); user 1 has no training rows
    assert train.targets.tolist() == [6, 7]
    assert train.history.tolist() == [[5, 0], [5, 6]] and train.lengths.tolist() == [1, 2]
    valid = split.valid.batch(np.arange(2))
    assert valid.targets.tolist() == [8, 2] and valid.history.tolist() == [[6, 7], [1, 0]]
    test = split.test.batch(np.arange(2))
    assert test.targets.tolist() == [9, 3] and test.history.tolist() == [[7, 8], [1, 2]]   # cut to max_len
    # the candidates MoRec's protocol removes: the whole history, not only the max_len items the model reads
    assert [h.tolist() for h in split.test.histories()] == [[5, 6, 7, 8], [1, 2]]
    assert split.test.targets().tolist() == [9, 3]


def test_leave_one_out_rejects_short_users():
    with pytest.raises(ValueError, match="fewer than 3"):
        leave_one_out([np.array([1, 2])], n_items=5)


# ---------------------------------------------------------------- hyper-parameters as data
def test_paper_tables_fill_unset_fields():
    assert method_defaults("ssna", "distilbert", "sci")[0] == {"batch_size": 256, "a": 3, "grad_accum": 1}
    assert method_defaults("ssna", "distilroberta", "sci")[0]["batch_size"] == 64
    assert method_defaults("tmlp", "bertmedium", "ins")[0]["n_l"] == 3
    assert method_defaults("lora", "distilbert", "pantry")[0] == {"batch_size": 32, "grad_accum": 8, "p": 0.3}
    assert method_defaults("ssna", "minilm", "sci")[1].endswith("(alias of minilm)")
    assert "fallback" in method_defaults("ssna", "minilm", "ml100k")[1]
    cfg, _ = resolve(TrainConfig(method="ssna", llm="distilbert", dataset="tools", a=2))
    assert (cfg.a, cfg.batch_size) == (2, 256)     # a flag given by the user wins over the table


# ---------------------------------------------------------------- modules
def test_gating_noise_only_in_training():
    torch.manual_seed(0)
    adapters = MoEAdapters(2, HIDDEN, 8, n_experts=4, dropout=0.0)
    torch.nn.init.normal_(adapters.gate)          # non-zero B and U so the noise matters
    h = torch.randn(5, 2, HIDDEN)
    adapters.eval()
    assert torch.equal(adapters(h), adapters(h))
    adapters.train()
    assert not torch.allclose(adapters(h), adapters(h))
    adapters.noise = False
    assert torch.equal(adapters(h), adapters(h))


def test_adapter_matches_equations_1_to_3():
    torch.manual_seed(0)
    adapters = MoEAdapters(2, HIDDEN, 8, n_experts=3, dropout=0.0).eval()
    for p in adapters.parameters():
        torch.nn.init.normal_(p)
    h = torch.randn(4, 2, HIDDEN)
    out = adapters(h)
    for m in range(2):
        w = adapters.weight[m].view(HIDDEN, 3, 8)
        heads = torch.stack([(h[:, m] - adapters.shift[m, k]) @ w[:, k] for k in range(3)], dim=1)   # Eq. 1
        gates = torch.softmax(h[:, m] @ adapters.gate[m, :, :3], dim=-1)                             # Eq. 2-3
        torch.testing.assert_close(out[:, m], (gates[..., None] * heads).sum(1), rtol=1e-4, atol=1e-4)


def _mixture_by_autograd(x, weight, shift, gates, p, seed):
    """MixtureOfHeads written out with autograd's own ops (which keep the heads for backward): Eq. 1 per head."""
    n_experts = gates.shape[-1]
    dropped = seeded_dropout(x, p, seed)
    blocks = weight.unflatten(-1, (n_experts, -1))                               # [a, in, E, out]
    heads = torch.stack([(dropped - shift[:, k, None]) @ blocks[:, :, k] for k in range(n_experts)], dim=2)
    return (gates.unsqueeze(-1) * heads).sum(-2)


@pytest.mark.parametrize("p, seed", [(0.0, None), (0.3, 7)])
def test_mixture_of_heads_gradients(p, seed):
    """The hand-made backward (heads and dropout mask made again) against finite differences and autograd."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.double, requires_grad=True)
    weight = torch.randn(2, 6, 3 * 4, dtype=torch.double, requires_grad=True)
    shift = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)
    gates = torch.softmax(torch.randn(2, 5, 3, dtype=torch.double), -1).requires_grad_()
    inputs = (x, weight, shift, gates)
    assert torch.autograd.gradcheck(lambda *t: MixtureOfHeads.apply(*t, p, seed), inputs)
    out = MixtureOfHeads.apply(*inputs, p, seed)
    ref = _mixture_by_autograd(*inputs, p, seed)
    torch.testing.assert_close(out, ref)
    dz = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, inputs, dz), torch.autograd.grad(ref, inputs, dz))


def test_seeded_dropout_replays_its_mask():
    x = torch.ones(200, 300)
    first, again, other = seeded_dropout(x, 0.2, 1), seeded_dropout(x, 0.2, 1), seeded_dropout(x, 0.2, 2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert set(first.unique().tolist()) == {0.0, 1.25}
    assert abs(float((first == 0).float().mean()) - 0.2) < 0.01      # 60,000 draws: σ ≈ 0.0016
    assert seeded_dropout(x, 0.2, None) is x


def test_adapters_keep_no_heads_for_backward():
    """What a training forward of the adapters keeps for backward (parameters aside): the input rows, gates and
    routing scores, nothing of the [a, N, E·out] heads nor a second (dropped-out) copy of the rows."""
    torch.manual_seed(0)
    a, n, hidden, out, experts = 3, 64, 24, 16, 8
    adapters = MoEAdapters(a, hidden, out, experts, dropout=0.2).train()
    params = {q.untyped_storage().data_ptr() for q in adapters.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    h = torch.randn(n, a, hidden)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = adapters(h)
    heads_bytes = a * n * experts * out * 4
    routing_bytes = a * n * 2 * experts * 4                         # the gate product, and what it becomes
    assert sum(kept.values()) < h.nbytes + 4 * routing_bytes < heads_bytes
    z.sum().backward()                                              # and backward still works from what was kept
    assert all(q.grad is not None for q in adapters.parameters())


def test_gru_order_option(features):
    h = torch.from_numpy(features[:6, :3]).float()
    torch.manual_seed(0)
    top_down = SSNAEncoder(tiny_cfg(a=3), HIDDEN).eval()
    bottom_up = SSNAEncoder(tiny_cfg(a=3, gru_order="bottom_up"), HIDDEN).eval()
    bottom_up.load_state_dict(top_down.state_dict())
    assert not torch.allclose(top_down.encode(h), bottom_up.encode(h))
    # bottom-up = the GRU fed z^{a-1} first: the same as top-down over the reversed adapter outputs
    z = top_down.adapters(h)
    _, last = top_down.gru(z.flip(1))
    torch.testing.assert_close(bottom_up.encode(h), last[-1])
    with pytest.raises(ValueError, match="gru_order"):
        SSNAEncoder(tiny_cfg(gru_order="sideways"), HIDDEN)


def test_sasrec_has_no_padding_or_future_leak():
    torch.manual_seed(0)
    sasrec = SASRec(16, 2, 2, 32, 0.0, 0.0, max_len=10).eval()
    seq = torch.randn(2, 6, 16)
    lengths = torch.tensor([3, 6])
    packed = seq[torch.arange(6)[None, :] < lengths[:, None]]
    out = sasrec(packed, lengths)
    # the first user, alone and without any padding, gets the same intent: padding never leaks in
    torch.testing.assert_close(out[0], sasrec(seq[0, :3], torch.tensor([3]))[0], rtol=1e-5, atol=1e-5)
    # the intent after 3 items does not depend on items 4..6 of the same history: no future leak
    cut = sasrec(seq[1, :3], torch.tensor([3]))[0]
    changed = seq[1].clone()
    changed[3:] = torch.randn(3, 16)
    assert torch.allclose(cut, sasrec(changed[:3], torch.tensor([3]))[0])
    assert not torch.allclose(out[1], sasrec(changed, torch.tensor([6]))[0])


def test_last_position_shortcut_equals_full_layer():
    torch.manual_seed(0)
    sasrec = SASRec(16, 2, 2, 32, 0.0, 0.0, max_len=10).eval()
    lengths = torch.tensor([1, 2, 2, 5])
    packing = Packing(lengths)
    x = torch.randn(int(lengths.sum()), 16)
    full = sasrec.layers[0](x, packing)[packing.last]
    torch.testing.assert_close(sasrec.layers[0](x, packing, last_only=True), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sorted"):
        Packing(torch.tensor([3, 1]))


def test_length_groups_give_each_history_its_own_intent():
    """Histories in any order, of lengths spanning several attention groups (and groups without padding): each
    intent equals the one computed for that history alone, in the caller's order."""
    torch.manual_seed(0)
    sasrec = SASRec(16, 2, 2, 32, 0.0, 0.0, max_len=20).eval()
    lengths = torch.tensor([5, 1, 3, 8, 2, 2, 16, 4, 1])
    assert len(Packing(lengths.sort().values).groups) == 5
    histories = [torch.randn(int(n), 16) for n in lengths]
    together = sasrec(torch.cat(histories), lengths)
    alone = torch.cat([sasrec(h, torch.tensor([len(h)])) for h in histories])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- every method in the registry
@pytest.mark.parametrize("method", STORE_METHODS)
def test_shapes_and_determinism(method, features):
    cfg, _ = resolve(tiny_cfg(method))
    batch = make_batch([[1, 2, 3], [4], [5, 6]], [7, 8, 9])
    model = build_model(cfg, inputs_for(features), torch.device("cpu"))
    again = build_model(cfg, inputs_for(features), torch.device("cpu"))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))
    users, targets = model(batch)
    assert users.shape == (3, cfg.d) and targets.shape == (3, cfg.d)
    loss = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    model.eval()
    vectors = model.item_vectors()
    assert vectors.shape == (N_ITEMS, cfg.d)
    intents = model.predict(batch, vectors)
    assert intents.shape == (3, cfg.d)
    torch.testing.assert_close(intents.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("method", STORE_METHODS)
def test_only_the_needed_layers_are_read(method, features):
    asked = []

    def layers(a):
        asked.append(a)
        return features[:, :a]

    cfg, _ = resolve(tiny_cfg(method, a=3))
    build_model(cfg, ItemInputs(N_ITEMS, layers=layers), torch.device("cpu"))
    assert asked == [3 if method in ("ssna", "mean", "weighted") else 1]


@pytest.mark.parametrize("loss", ["inbatch", "full"])
@pytest.mark.parametrize("method", STORE_METHODS)
def test_grad_checkpointing_gives_the_same_gradients_and_saves_less(method, loss, features):
    batch = make_batch([[1, 2, 3], [4], [5, 6]], [7, 8, 9])
    runs = []
    for checkpointing in (False, True):
        cfg, _ = resolve(tiny_cfg(method, loss=loss, grad_checkpointing=checkpointing))
        model = build_model(cfg, inputs_for(features), torch.device("cpu")).train()
        saved = []                    # bytes autograd keeps for backward, the parameters aside
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t, saved=saved, params=params):
            if t.untyped_storage().data_ptr() not in params:
                saved.append(t.untyped_storage().nbytes())
            return t

        torch.manual_seed(1)          # dropout and routing noise, replayed by the recomputation
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_value = model.loss(batch)
        loss_value.backward()
        runs.append((loss_value.detach(), sum(saved),
                     {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain_loss, plain_saved, plain_grads), (ckpt_loss, ckpt_saved, ckpt_grads) = runs
    torch.testing.assert_close(ckpt_loss, plain_loss, rtol=0, atol=0)
    assert ckpt_grads.keys() == plain_grads.keys() and any(n.startswith("item_encoder.") for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=0)
    assert ckpt_saved < plain_saved


@pytest.mark.parametrize("loss", ["inbatch", "full"])
def test_item_ids_add_a_trained_id_embedding(loss):
    twins = np.zeros((N_ITEMS, N_LAYERS, HIDDEN), dtype=np.float16)   # every item has the same text
    cfg, _ = resolve(tiny_cfg("tmoe", item_ids=True, loss=loss))
    model = build_model(cfg, inputs_for(twins), torch.device("cpu"))
    assert build_model(resolve(tiny_cfg("tmoe"))[0], inputs_for(twins), torch.device("cpu")).id_embedding is None
    model.eval()
    idx = torch.tensor([3, 5])
    torch.testing.assert_close(model.encode_items(idx), model.item_encoder(idx) + model.id_embedding(idx))
    vectors = model.item_vectors()
    assert not torch.allclose(vectors[3], vectors[5])                  # the ID tells text twins apart
    model.train()
    model.loss(make_batch([[1, 2], [3]], [4, 6])).backward()
    grad = model.id_embedding.weight.grad
    assert grad[[1, 2, 3, 4, 6]].abs().sum(dim=1).gt(0).all()
    if loss == "inbatch":                                              # untouched items get no gradient
        assert grad[[0, 5, 7]].abs().sum() == 0


@pytest.mark.parametrize("loss", ["inbatch", "full"])
def test_history_bias_adds_one_learned_score_to_history_items(loss, features):
    batch = make_batch([[1, 2, 2], [3], [4, 6]], [2, 4, 9])           # row 0 repeats its item 2
    plain = build_model(resolve(tiny_cfg("tmoe", loss=loss))[0], inputs_for(features), torch.device("cpu")).eval()
    cfg, _ = resolve(tiny_cfg("tmoe", loss=loss, history_bias=True))
    model = build_model(cfg, inputs_for(features), torch.device("cpu")).eval()
    assert plain.history_bias is None and plain.history_score() is None and model.history_score() == 0.0
    assert model.loss(batch).item() == plain.loss(batch).item()        # b starts at 0: the same model
    with torch.no_grad():
        model.history_bias.fill_(-0.3)
    users, targets = model(batch)
    u = torch.nn.functional.normalize(users, dim=-1)
    if loss == "full":
        logits = u @ torch.nn.functional.normalize(model.item_vectors(), dim=-1).T / cfg.temperature
        for row, seen in enumerate([[1, 2], [3], [4, 6]]):
            logits[row, seen] -= 0.3 / cfg.temperature                 # once per item, though row 0 has 2 twice
        labels = batch.targets
    else:   # candidates are the batch's targets 2, 4, 9: 2 is in row 0's history (its own target), 4 in row 2's
        logits = u @ torch.nn.functional.normalize(targets, dim=-1).T / cfg.temperature
        logits[[0, 2], [0, 1]] -= 0.3 / cfg.temperature
        labels = torch.arange(3)
    expected = torch.nn.functional.cross_entropy(logits, labels)
    loss_value = model.loss(batch)
    torch.testing.assert_close(loss_value, expected)
    loss_value.backward()
    p = torch.softmax(logits, dim=1)
    if loss == "full":   # dL/db = mean over rows of (the history items' probability − [target in history]) / τ
        seen_mass = p[0, [1, 2]].sum() + p[1, 3] + p[2, [4, 6]].sum()
        grad = (seen_mass - 1) / 3 / cfg.temperature                   # row 0's target 2 is in its history
    else:
        grad = (p[0, 0] - 1 + p[2, 1]) / 3 / cfg.temperature
    torch.testing.assert_close(model.history_bias.grad, grad.detach())


@pytest.mark.parametrize(("repeat", "sign"), [(True, 1.0), (False, -1.0)])
def test_history_bias_learns_whether_users_repeat(repeat, sign, features):
    rng = np.random.default_rng(0)
    walks = [rng.choice(N_ITEMS, size=8, replace=False) for _ in range(60)]
    sequences = [np.repeat(w, 2) if repeat else w for w in walks]     # every other item repeats the last, or none
    cfg, _ = resolve(tiny_cfg("tmoe", loss="full", history_bias=True))
    model = build_model(cfg, inputs_for(features), torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    split = leave_one_out(sequences, N_ITEMS)
    for batch in split.train.batches(32, np.random.default_rng(0)):
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    assert model.history_score() * sign > 0


def test_ranking_adds_the_history_bias_to_the_items_the_model_read(features, sequences):
    from evaluate.metrics import full_ranking
    from train.loop import evaluate_examples

    cfg, _ = resolve(tiny_cfg("tmoe", history_bias=True, max_len=3))   # shorter than most histories
    split = leave_one_out(sequences, N_ITEMS, max_len=cfg.max_len)
    model = build_model(cfg, inputs_for(features), torch.device("cpu"))
    with torch.no_grad():
        model.history_bias.fill_(-0.5)
    got = evaluate_examples(model, split.test, cfg, torch.device("cpu"))
    inputs = split.test.inputs()
    assert all(len(i) == min(cfg.max_len, len(h)) for i, h in zip(inputs, split.test.histories(), strict=True))
    with torch.no_grad():
        vectors = model.item_vectors()
        users = torch.cat([model.predict(b, vectors) for b in split.test.batches(64)])
    items = torch.nn.functional.normalize(vectors, dim=-1)
    targets = torch.from_numpy(split.test.targets())
    expected = full_ranking(users, items, targets, history_bonus=(inputs, -0.5))
    plain = full_ranking(users, items, targets)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert not np.array_equal(got["N@50"], plain["N@50"])


def test_inbatch_loss_masks_duplicate_positives(features):
    cfg, _ = resolve(tiny_cfg("tmoe"))
    model = build_model(cfg, inputs_for(features), torch.device("cpu")).eval()
    batch = make_batch([[1, 2], [3], [4, 5]], [7, 7, 9])
    users, targets = model(batch)
    u = torch.nn.functional.normalize(users, dim=-1)
    v = torch.nn.functional.normalize(targets, dim=-1)
    logits = u @ v.T / cfg.temperature
    expected = torch.stack([
        -torch.log_softmax(logits[0, [0, 2]], 0)[0],          # row 0 ignores row 1's copy of item 7
        -torch.log_softmax(logits[1, [1, 2]], 0)[0],
        -torch.log_softmax(logits[2], 0)[2],
    ]).mean()
    torch.testing.assert_close(model.loss(batch), expected)


@pytest.mark.parametrize("loss", ["inbatch", "full"])
def test_loss_falls_on_a_tiny_synthetic_set(loss, features, sequences):
    cfg, _ = resolve(tiny_cfg("ssna", loss=loss, hidden_dropout=0.0, attn_dropout=0.0, adapter_dropout=0.0))
    split = leave_one_out(sequences, N_ITEMS)
    model = build_model(cfg, inputs_for(features), torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    everything = split.train.batch(np.arange(len(split.train)))
    first = model.loss(everything).item()
    for _ in range(40):
        for batch in split.train.batches(32, np.random.default_rng(0)):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
    assert model.loss(everything).item() < 0.7 * first


# ---------------------------------------------------------------- the loop
def test_new_runs_use_fused_adam_and_resumed_runs_keep_their_own(tmp_path, features, sequences, monkeypatch):
    fused_at_step: list[object] = []

    class Spy(torch.optim.Adam):
        def step(self, closure=None):
            fused_at_step.append(self.param_groups[0]["fused"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    split = leave_one_out(sequences, N_ITEMS)
    cfg = tiny_cfg("tmoe", max_epochs=2, patience=10)

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, split, inputs_for(features), tmp_path, progress=False, on_epoch=stop_after_first)
    assert fused_at_step and set(fused_at_step) == {True}
    checkpoint = tmp_path / resolve(cfg)[0].run_key() / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    for group in state["optimizer"]["param_groups"]:   # as a checkpoint written before fused Adam was used
        group["fused"] = None
    torch.save(state, checkpoint)
    fused_at_step.clear()
    fit(cfg, split, inputs_for(features), tmp_path, progress=False, resume=True)
    assert fused_at_step and set(fused_at_step) == {None}


def kill_after(epoch: int, cfg: TrainConfig, split, features: np.ndarray, runs) -> None:
    """Train ``cfg`` into ``runs`` and kill it once the checkpoint of ``epoch`` is on disk."""
    class Killed(Exception):
        pass

    def die(record):
        if record["epoch"] == epoch:
            raise Killed

    with pytest.raises(Killed):
        fit(cfg, split, inputs_for(features), runs, progress=False, on_epoch=die)


def test_fit_writes_the_run_and_resumes_exactly(tmp_path, features, sequences):
    split = leave_one_out(sequences, N_ITEMS)
    cfg = tiny_cfg("ssna", max_epochs=3, patience=10)
    whole = fit(cfg, split, inputs_for(features), tmp_path / "a", results_path=tmp_path / "a.parquet",
                progress=False)
    kill_after(2, cfg, split, features, tmp_path / "b")
    run_dir = tmp_path / "b" / resolve(cfg)[0].run_key()
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "result.json").exists()
    with pytest.raises(RuntimeError, match="--resume"):
        fit(cfg, split, inputs_for(features), tmp_path / "b", progress=False)
    resumed = fit(cfg, split, inputs_for(features), tmp_path / "b", progress=False, resume=True)
    assert resumed.resumed_from == 2
    for key in ("test_R@10", "test_N@50", "valid_R@10", "best_epoch", "epochs"):
        assert resumed.row[key] == whole.row[key], key
    import polars as pl
    a = pl.read_parquet(whole.run_dir / "epochs.parquet").drop("seconds", "epoch_seconds")
    b = pl.read_parquet(resumed.run_dir / "epochs.parquet").drop("seconds", "epoch_seconds")
    assert a.equals(b)
    assert json.loads((whole.run_dir / "result.json").read_text())["run_id"] == whole.row["run_id"]
    assert pl.read_parquet(tmp_path / "a.parquet").height == 1
    again = fit(cfg, split, inputs_for(features), tmp_path / "a", progress=False)
    assert again.skipped and again.row["test_R@10"] == whole.row["test_R@10"]


def test_lr_decays_restart_from_the_best_checkpoint_and_resume_exactly(tmp_path, features, sequences):
    import polars as pl

    split = leave_one_out(sequences, N_ITEMS)
    # a rate too small to move validation: every epoch after the first is stale, so patience 1 runs out at once
    cfg = tiny_cfg("mean", lr=1e-9, patience=1, max_epochs=8, lr_decays=1, lr_decay_factor=0.5)
    plain = fit(tiny_cfg("mean", lr=1e-9, patience=1, max_epochs=8), split, inputs_for(features), tmp_path / "p",
                progress=False)
    assert plain.row["epochs"] == 2
    whole = fit(cfg, split, inputs_for(features), tmp_path / "a", progress=False)
    epochs = pl.read_parquet(whole.run_dir / "epochs.parquet")
    assert epochs["lr"].to_list() == [1e-9, 1e-9, 5e-10] and whole.row["epochs"] == 3
    assert (whole.run_dir / "best.phase0.pt").is_file() and whole.row["best_epoch"] == 1
    assert whole.run_dir.name != plain.run_dir.name
    kill_after(3, cfg, split, features, tmp_path / "b")
    resumed = fit(cfg, split, inputs_for(features), tmp_path / "b", progress=False, resume=True)
    assert resumed.resumed_from == 3 and resumed.row["epochs"] == 3
    for key in ("test_R@10", "test_N@50", "valid_R@10", "best_epoch"):
        assert resumed.row[key] == whole.row[key], key
    with pytest.raises(ValueError, match="--lr-decay-factor"):
        resolve(tiny_cfg("mean", lr_decays=1, lr_decay_factor=1.5))


def test_trained_model_beats_chance(tmp_path, features, sequences):
    split = leave_one_out(sequences, N_ITEMS)
    cfg = tiny_cfg("tmoe", max_epochs=15, patience=15, hidden_dropout=0.1, attn_dropout=0.1, lr=3e-3)
    row = fit(cfg, split, inputs_for(features), tmp_path, progress=False).row
    assert row["test_R@10"] > 2 * 10 / N_ITEMS      # chance is 10 / 40


def test_bounded_run_extrapolates_and_says_so(tmp_path, features, sequences):
    split = leave_one_out(sequences, N_ITEMS)
    cfg = tiny_cfg("tmlp", batch_size=8, max_steps=3, max_epochs=5)
    row = fit(cfg, split, inputs_for(features), tmp_path, progress=False).row
    assert row["seconds_extrapolated"] is True and row["epochs"] == 1


def test_a_setting_a_method_does_not_read_leaves_its_run_id():
    for method, name, value in (("tmoe", "gru_order", "bottom_up"), ("lora", "adalora_epochs", 5)):
        cfg = resolve(tiny_cfg(method, **{name: value}))[0]
        assert getattr(cfg, name) != value and cfg.run_key() == resolve(tiny_cfg(method))[0].run_key()
    for method, name, value in (("ssna", "gru_order", "bottom_up"), ("adalora", "adalora_epochs", 5)):
        cfg = resolve(tiny_cfg(method, **{name: value}))[0]
        assert getattr(cfg, name) == value and cfg.run_key() != resolve(tiny_cfg(method))[0].run_key()


def test_a_setting_added_later_renames_no_run_and_splits_no_seeds():
    import hashlib
    from dataclasses import replace

    from train.config import ADDED_LATER, EXECUTION_FIELDS

    cfg = TrainConfig(method="adalora", dataset="sci", llm="minilm", seed=0, p=0.1, batch_size=32, grad_accum=8)
    # the id an earlier version (without the ADDED_LATER fields) gave this configuration
    before = {k: v for k, v in sorted(cfg.to_dict().items()) if k not in EXECUTION_FIELDS | set(ADDED_LATER)}
    digest = hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:8]
    assert cfg.run_key() == f"sci_minilm_adalora_s0_{digest}"
    assert not set(ADDED_LATER) & set(cfg.hparams())
    for name, value in (("adalora_epochs", 80), ("item_ids", True), ("ties", "expected"), ("lr_decays", 1),
                        ("lr_decay_factor", 0.5), ("history_bias", True)):
        changed = replace(cfg, **{name: value})
        assert changed.run_key() != cfg.run_key() and changed.hparams()[name] == value
