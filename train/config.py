"""The one typed configuration of a stage-two run: one field per setting, each with its type and meaning.

Fields left as ``None`` are filled from the paper's best hyper-parameters (``train.hparams``, Tables S1–S3) for
the run's dataset × LLM, or from ``FALLBACK`` where the paper has no row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from evaluate import DEFAULT_TIES

# Settings that change how a run executes or is named, never its result.
EXECUTION_FIELDS = frozenset({"run_id", "device", "threads", "eval_batch_size", "preload_features", "extra"})
IDENTITY_FIELDS = frozenset({"method", "dataset", "llm", "seed"})
# Settings added after runs had been recorded, each with the value every earlier run had: while a run keeps that
# value the setting is left out of its id and its recorded hparams, so that adding a setting renames no run and
# splits no group of seeds.
ADDED_LATER: dict[str, Any] = {"adalora_epochs": None, "item_ids": False, "ties": DEFAULT_TIES, "lr_decays": 0,
                               "lr_decay_factor": 0.1, "history_bias": False}
# Settings only some methods read: for the others train.loop.resolve resets them to their default, so that giving
# one (say --gru-order to TMoE) neither renames the run nor splits its seeds.
APPLIES_TO: dict[str, frozenset[str]] = {
    "gru_order": frozenset({"ssna"}), "adalora_epochs": frozenset({"adalora"}),
    "adapter_dropout": frozenset({"ssna", "tmoe", "tmlp", "mean", "weighted"}),
}


@dataclass
class TrainConfig:
    # --- what is trained
    method: str = "ssna"              # registry name: ssna | tmoe | tmlp | mean | weighted (train.methods.METHODS)
    dataset: str = "sci"              # canonical dataset name (pipeline.datasets)
    llm: str = "minilm"               # stage-one store key (featurestore.LLMS name, hub id or model folder; ":mean"
    #                                   appended: layers mean-pooled over tokens instead of [CLS])
    seed: int = 0                     # seeds parameter init, dropout, gating noise and shuffling

    # --- item side (adapters over frozen LLM layers)
    a: int | None = None              # number of top LLM layers adapted (SSNA/MEAN/WEIGHTED; paper: {2, 3})
    n_experts: int = 8                # n_p, projection heads per adapter (paper: 8)
    adapter_dropout: float = 0.2      # dropout on h before the whitening shift (UniSRec's adaptor_dropout_prob)
    gate_noise: bool = True           # Gaussian routing noise in training (Eq. 2–3); never at evaluation
    gru_order: str = "top_down"       # SSNA integration order: top_down (Eq. 4: z^0 = top layer first) | bottom_up
    n_l: int | None = None            # TMLP depth (paper: {1, 2, 3})
    item_ids: bool = False            # add a learned ID embedding to every item's adapted text embedding (UniSRec's
    #                                   transductive setting; beyond the paper, whose methods are text-only)

    # --- end-to-end baselines (LLM in the loop)
    p: float | None = None            # LoRA / AdaLoRA dropout (paper: {0.1, 0.2, 0.3})
    n_t: int | None = None            # Full: top transformer layers fine-tuned (paper: {2, 4, 6})
    lora_r: int = 8                   # LoRA rank; AdaLoRA's target average rank
    lora_alpha: int = 16              # LoRA scaling numerator (scale = alpha / r)
    adalora_init_r: int = 12          # AdaLoRA starting rank per matrix, pruned towards lora_r
    adalora_epochs: int | None = None  # epochs AdaLoRA's rank schedule spans (None: max_epochs; set it near the
    #                                    epochs the run will early-stop at, or the budget is barely pruned by then)
    max_tokens: int = 64              # item text length in tokens for the in-loop LLM (as stage one)

    # --- user side (SASRec)
    d: int = 256                      # item / user embedding size (paper: 256)
    n_layers: int = 2                 # self-attention layers (paper: 2)
    n_heads: int = 2                  # attention heads (paper: 2)
    inner_size: int = 256             # feed-forward width inside each Transformer layer (RecBole default)
    hidden_dropout: float = 0.5       # dropout on embeddings and sub-layer outputs (UniSRec default)
    attn_dropout: float = 0.5         # dropout on attention weights (UniSRec default)
    max_len: int = 50                 # history length fed to SASRec: the last 50 items (paper)

    # --- objective
    temperature: float = 0.07         # τ in Eq. 8
    loss: str = "inbatch"             # inbatch (Eq. 8: other sequences' targets are negatives) | full (softmax over all items)
    history_bias: bool = False        # learn one score added to the cosine of every item the history holds (how much
    #                                   less, or more, likely a repeat is than its cosine says; beyond the paper)

    # --- optimisation
    lr: float = 3e-4                  # Adam learning rate (paper)
    weight_decay: float = 0.0         # Adam weight decay
    batch_size: int | None = None     # b, training examples per step (paper: {32, 64, 128, 256})
    grad_accum: int | None = None     # batches per optimiser step (paper: 8 for LoRA/AdaLoRA/Full, else 1)
    max_steps: int | None = None      # stop after this many optimiser steps in all (bounded run; epoch time extrapolated)
    limit_users: int | None = None    # train and evaluate on the first N users only (bounded run)
    max_epochs: int = 300             # hard cap on epochs
    patience: int = 10                # epochs without a better validation R@10 before stopping
    lr_decays: int = 0                # times a stop for patience instead restarts Adam from the best checkpoint at
    #                                   lr × lr_decay_factor (0: constant lr, the paper; beyond the paper)
    lr_decay_factor: float = 0.1      # learning-rate multiplier of each such restart
    bucket_by_length: bool = False    # batch examples of similar history length together (less padding)
    preload_features: bool = True     # copy the top-a layers into RAM (else gather rows from the memory map per batch)
    grad_checkpointing: bool = False  # recompute the item encoder's activations in backward (the LLM's layers, or
    #                                   the adapters and GRU of the store methods): less memory, more time, the
    #                                   same gradients

    # --- evaluation
    exclude_history: bool = False     # MoRec's protocol: items in the history are not candidates (default: RecBole's)
    ties: str = DEFAULT_TIES          # tied scores: pessimistic (count against the target) | expected (mid-rank) | index
    eval_batch_size: int = 4096       # users scored at once in full ranking

    # --- execution
    device: str = "auto"              # auto (cuda when present) | cpu | cuda | cuda:N
    autocast: str = "off"             # off | bf16 | auto (bf16 autocast where the GPU/CPU runs bf16 matmuls natively)
    threads: int | None = None        # torch intra-op threads on CPU (None: torch's default)
    run_id: str | None = None         # folder name under runs/; default derived from the settings (see run_key)

    extra: dict[str, Any] = field(default_factory=dict)  # free-form tags recorded with the run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; valid fields: {sorted(names)}")
        return cls(**data)

    def _recorded(self) -> dict[str, Any]:
        """Every field, less the ADDED_LATER ones still at the value earlier runs had."""
        return {k: v for k, v in self.to_dict().items() if k not in ADDED_LATER or v != ADDED_LATER[k]}

    def hparams(self) -> dict[str, Any]:
        """Every setting that can change a run's result, without the run's identity (method, dataset, LLM,
        seed): what groups seeds of one configuration in the results store."""
        return {k: v for k, v in self._recorded().items() if k not in EXECUTION_FIELDS | IDENTITY_FIELDS}

    def run_key(self) -> str:
        """A stable run id: dataset, LLM, method, seed and a short hash of every result-changing setting."""
        payload = {k: v for k, v in sorted(self._recorded().items()) if k not in EXECUTION_FIELDS}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]
        llm = self.llm.replace("/", "_").replace(":", "+")
        return f"{self.dataset}_{llm}_{self.method}_s{self.seed}_{digest}"
