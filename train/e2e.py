"""The end-to-end multi-layer-tuning baselines: LoRA, AdaLoRA (both through PEFT) and Full (top n_t layers).

Unlike every store-based method, these run the LLM inside the training loop. The item encoder is

    item_idx → pre-tokenised text → LLM (adapted) → top layer's [CLS] → Linear(hidden → d)

- Texts are tokenised once, up front (fast tokenizer, ``cfg.max_tokens``, [CLS] first as the tokenizer puts
  it); each call pads only to the longest of the requested items. Requested items are sorted by length and run
  in micro-batches (``TRAIN_CHUNK`` with gradients, ``EVAL_CHUNK`` without), so little compute goes to padding
  and encoding every item for evaluation stays in bounded memory.
- ``lora``: ``peft.LoraConfig`` on the attention query/value projections named by the LLM spec.
- ``adalora``: ``peft.AdaLoraConfig`` on the same projections. Its schedule comes from the run's plan
  (``ItemInputs.total_steps``, set by ``train.fit``: the optimiser steps of ``adalora_epochs`` epochs, else of
  ``max_epochs``): ``tinit`` = 10 % and ``tfinal`` = 30 % of them (the budget falls cubically in between),
  re-allocation every step (``deltaT`` = 1). PEFT adds the orthogonal regulariser only when the model returns
  ``.loss``, which a bare encoder never does, so the encoder's ``training_hooks.extra_loss()`` returns it for the
  loop to add, and ``after_step(step)`` runs ``update_and_allocate``. The rank allocator's state travels in the
  encoder's state dict (exact resume).
- ``full``: everything frozen, then the top ``n_t`` transformer layers (found by module name) unfrozen.

Checkpoints hold the trainable weights only: the frozen LLM weights are left out of the state dict and, on
load, kept as they are (they come from the pinned, hash-checked LLM files and are never changed by training).
bf16 autocast is the loop's business (``cfg.autocast``); nothing here duplicates it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from featurestore import load_llm
from featurestore.llms import pool, split_pooling
from train.config import TrainConfig
from train.methods import ItemInputs

KINDS = ("lora", "adalora", "full")
TRAIN_CHUNK = 64       # items per LLM forward when gradients are on (length-sorted, so padding stays small)
EVAL_CHUNK = 256       # items per LLM forward without gradients (evaluation encodes every item)
ADALORA_TINIT = 0.1    # fraction of the planned steps before AdaLoRA starts pruning ranks
ADALORA_TFINAL = 0.3   # fraction of the planned steps after the budget reaches target_r (ranks then fixed)


def tokenize_items(tokenizer: Any, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All item texts as ``[n_items, T]`` token ids (right-padded, T = the longest) and their lengths ``[n_items]``."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens={max_tokens}: need at least 2 ([CLS] and one more token)")
    enc = tokenizer(list(texts), truncation=True, max_length=max_tokens, padding="longest",
                    return_attention_mask=True, return_token_type_ids=False, return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].sum(dim=1).long()


def find_layer_list(llm: nn.Module, n_layers: int) -> str:
    """The module name of the LLM's transformer-layer list (e.g. ``encoder.layer`` for BERT/RoBERTa,
    ``transformer.layer`` for DistilBERT): the one ``nn.ModuleList`` of length ``n_layers``."""
    names = [name for name, module in llm.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == n_layers]
    if len(names) != 1:
        raise ValueError(f"cannot tell the transformer layers of {type(llm).__name__} by name: "
                         f"{len(names)} module lists of length {n_layers} ({names})")
    return names[0]


def unfreeze_top_layers(llm: nn.Module, n_layers: int, n_t: int) -> list[str]:
    """Make the parameters of the top ``n_t`` transformer layers trainable; return those layers' module names."""
    if not 1 <= n_t <= n_layers:
        raise ValueError(f"n_t={n_t}: Full fine-tunes between 1 and the LLM's {n_layers} layers "
                         f"(paper: 2, 4 or 6). Fix: pass --n-t within that range.")
    base = find_layer_list(llm, n_layers)
    top = [f"{base}.{i}" for i in range(n_layers - n_t, n_layers)]
    for name in top:
        llm.get_submodule(name).requires_grad_(True)
    return top


class AdaLoRAHooks:
    """The two things the training loop must do for AdaLoRA that a bare encoder's forward cannot."""

    def __init__(self, peft_model: nn.Module):
        self.tuner = peft_model.base_model                   # peft AdaLoraModel
        self.adapter = self.tuner.trainable_adapter_name
        self.config = self.tuner.peft_config[self.adapter]

    def regulariser(self) -> torch.Tensor:
        """PEFT's orthogonal regulariser: mean over lora_A / lora_B of ‖P Pᵀ − I‖_F (A) or ‖Pᵀ P − I‖_F (B)
        (``AdaLoraModel.forward``), in float32 whatever the autocast."""
        terms = []
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            for name, p in self.tuner.model.named_parameters():
                if ("lora_A" in name or "lora_B" in name) and self.adapter in name:
                    p = p.float()
                    cov = p @ p.T if "lora_A" in name else p.T @ p
                    eye = torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)
                    terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
        if not terms:
            raise RuntimeError("AdaLoRA adapter has no lora_A/lora_B parameters")
        return torch.stack(terms).mean()

    def extra_loss(self) -> torch.Tensor:
        """``orth_reg_weight × regulariser``, to add to each batch's loss (PEFT would add it to ``.loss``)."""
        return self.config.orth_reg_weight * self.regulariser()

    def after_step(self, step: int) -> None:
        """Update importance scores and re-allocate the rank budget (after optimizer.step, before zero_grad)."""
        self.tuner.update_and_allocate(step)

    def rank_budget(self) -> int:
        """Ranks currently allocated over all adapted matrices (the initial budget before the first pruning)."""
        pattern = self.config.rank_pattern
        if pattern:
            return int(sum(sum(bool(x) for x in ranks) for ranks in pattern.values()))
        return int(self.tuner.rankallocator.init_bgt)

    def state(self) -> dict[str, Any]:
        """The rank allocator's running state (not in any parameter), for checkpoints."""
        alloc = self.tuner.rankallocator
        return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
                "rank_pattern": self.config.rank_pattern}

    def load_state(self, state: dict[str, Any], device: torch.device) -> None:
        alloc = self.tuner.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, key, {k: v.to(device) for k, v in state[key].items()})
        self.config.rank_pattern = state["rank_pattern"]


class LLMItemEncoder(nn.Module):
    """``forward(item_idx [U]) -> [U, d]``: the (adapted) LLM on the items' pre-tokenised texts, top-layer
    [CLS] (or the mean of its token states, ``pooling="mean"``), then a trainable projection hidden → d."""

    def __init__(self, llm: nn.Module, token_ids: torch.Tensor, lengths: torch.Tensor, hidden: int, d: int,
                 hooks: AdaLoRAHooks | None = None, train_chunk: int = TRAIN_CHUNK, eval_chunk: int = EVAL_CHUNK,
                 pooling: str = "cls"):
        super().__init__()
        self.llm, self.pooling = llm, pooling
        self.proj = nn.Linear(hidden, d)
        self.register_buffer("token_ids", token_ids, persistent=False)
        self.register_buffer("token_lengths", lengths, persistent=False)
        self.training_hooks = hooks
        self.train_chunk, self.eval_chunk = train_chunk, eval_chunk
        self.frozen = {name for name, p in llm.named_parameters() if not p.requires_grad}
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_keep_frozen)

    def embed(self, item_idx: torch.Tensor) -> torch.Tensor:
        """Top-layer text embeddings ``[U, hidden]`` of the items, in the order given."""
        idx = item_idx.to(self.token_ids.device)
        lengths = self.token_lengths[idx]
        order = torch.argsort(lengths, stable=True)
        chunk = self.train_chunk if torch.is_grad_enabled() else self.eval_chunk
        parts = []
        for start in range(0, len(order), chunk):
            sel = order[start:start + chunk]
            width = int(lengths[sel].max())
            ids = self.token_ids[idx[sel], :width]
            mask = (torch.arange(width, device=ids.device)[None, :] < lengths[sel, None]).long()
            parts.append(pool(self.llm(input_ids=ids, attention_mask=mask).last_hidden_state, mask, self.pooling))
        return torch.cat(parts)[torch.argsort(order)]

    def forward(self, item_idx: torch.Tensor) -> torch.Tensor:
        if item_idx.numel() == 0:
            return self.proj.weight.new_zeros(0, self.proj.out_features)
        return self.proj(self.embed(item_idx))

    def get_extra_state(self) -> dict[str, Any]:
        return {"adalora": self.training_hooks.state() if self.training_hooks is not None else None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if self.training_hooks is not None and state.get("adalora") is not None:
            self.training_hooks.load_state(state["adalora"], self.token_ids.device)


def _drop_frozen(module: LLMItemEncoder, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for name in module.frozen:
        state_dict.pop(f"{prefix}llm.{name}", None)


def _keep_frozen(module: LLMItemEncoder, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    params = dict(module.llm.named_parameters())
    for name in module.frozen:
        state_dict.setdefault(f"{prefix}llm.{name}", params[name])


def _peft(get_peft_model: Any, model: nn.Module, config: Any) -> nn.Module:
    """``get_peft_model``, without the FutureWarning PEFT triggers by reading a renamed transformers property."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def _check_inputs(kind: str, cfg: TrainConfig, inputs: ItemInputs) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown end-to-end method {kind!r}; choose one of {', '.join(KINDS)}")
    if inputs.texts is None or inputs.llm is None or inputs.cache_dir is None:
        raise ValueError(f"method {kind} runs the LLM on item texts: ItemInputs needs texts, llm and cache_dir "
                         f"(got texts={'set' if inputs.texts is not None else None}, llm={inputs.llm!r}, "
                         f"cache_dir={inputs.cache_dir!r})")
    if len(inputs.texts) != inputs.n_items:
        raise ValueError(f"method {kind}: {len(inputs.texts)} item texts for {inputs.n_items} items; "
                         "texts must be in item_idx order, one per item")
    if kind in ("lora", "adalora") and (cfg.p is None or not 0.0 <= cfg.p < 1.0):
        raise ValueError(f"method {kind}: dropout p={cfg.p} must be in [0, 1) (paper: 0.1, 0.2, 0.3)")
    if kind == "full" and cfg.n_t is None:
        raise ValueError("method full needs n_t, the number of top layers to fine-tune (paper: 2, 4, 6)")
    if kind == "adalora" and not inputs.total_steps:
        raise ValueError("method adalora needs the run's planned optimiser steps (ItemInputs.total_steps; "
                         "train.fit sets it) for its rank schedule")
    if kind == "adalora" and inputs.total_steps < 2:
        raise ValueError(f"method adalora: {inputs.total_steps} planned optimiser step; its rank allocation needs "
                         "at least 2. Fix: raise --max-steps (or the epochs) to 2 or more.")


def build_llm_encoder(kind: str, cfg: TrainConfig, inputs: ItemInputs, device: torch.device | str) -> nn.Module:
    """The item encoder of end-to-end baseline ``kind`` (lora | adalora | full); see the module docstring."""
    _check_inputs(kind, cfg, inputs)
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    device = torch.device(device)
    model, tokenizer, spec = load_llm(inputs.llm, inputs.cache_dir, str(device))
    token_ids, lengths = tokenize_items(tokenizer, inputs.texts, cfg.max_tokens)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None     # unused (we pool the top layer ourselves); random-init when the weights lack it
    if cfg.grad_checkpointing:
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False      # no decoding cache in an encoder; transformers warns of it otherwise
        enable = getattr(model, "activation_checkpointing_enable", None)   # transformers >= 5.x name
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hooks = None
    if kind == "lora":
        model = _peft(get_peft_model, model, LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.p, target_modules=list(spec.lora_targets),
            bias="none"))
    elif kind == "adalora":
        total = int(inputs.total_steps)
        model = _peft(get_peft_model, model, AdaLoraConfig(
            init_r=cfg.adalora_init_r, target_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.p,
            target_modules=list(spec.lora_targets), total_step=total, tinit=int(ADALORA_TINIT * total),
            # PEFT scores importance only before step total − tfinal, and allocates the final budget at that
            # step from those scores: at least one step must come before it
            tfinal=min(int(ADALORA_TFINAL * total), total - 2), deltaT=1))
        hooks = AdaLoRAHooks(model)
    else:
        unfreeze_top_layers(model, spec.n_layers, cfg.n_t)
    encoder = LLMItemEncoder(model, token_ids, lengths, spec.hidden, cfg.d, hooks,
                             pooling=split_pooling(inputs.llm)[1])
    return encoder.to(device)
