"""Every stage-two method in one registry: an item encoder over cached LLM layers + the shared SASRec model.

A method is only its item encoder — how the top LLM layers of an item become its embedding v*:

| name     | reads        | encoder                                                                 |
|----------|--------------|-------------------------------------------------------------------------|
| ssna     | top-a layers | a MoE adapters, integrated by a GRU (Eq. 4), top layer first by default |
| mean     | top-a layers | a MoE adapters, mean of their outputs (Table 8)                         |
| weighted | top-a layers | a MoE adapters, learned softmax weights over them (Table 8)             |
| tmoe     | top layer    | one MoE adapter (UniSRec)                                               |
| tmlp     | top layer    | an n_l-layer MLP (MoRec)                                                |
| lora     | item texts   | the LLM with PEFT LoRA in its attention, run in the loop (train.e2e)    |
| adalora  | item texts   | the LLM with PEFT AdaLoRA, run in the loop (train.e2e)                  |
| full     | item texts   | the LLM with its top n_t layers trainable, run in the loop (train.e2e)  |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.config import TrainConfig
from train.modules import MLPAdapter, MoEAdapters


class FeatureTable:
    """The store's top layers of every item, ``[n_items, a, hidden]`` in item_idx order (``[:, 0]`` = top).

    Rows are gathered per batch from the memory-mapped store (or from a RAM copy when ``preload``) and cast to
    the compute dtype on the way; the LLM is never run.
    """

    def __init__(self, layers: np.ndarray, preload: bool = True, device: torch.device | str = "cpu"):
        self.n_items, self.n_layers, self.hidden = layers.shape
        self.device = torch.device(device)
        self._array = layers
        self._tensor = torch.from_numpy(np.ascontiguousarray(layers)).to(self.device) if preload else None

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` in the compute dtype: bf16 under bf16 autocast (the adapters' GEMMs and input dropout
        then read them without another cast), else float32."""
        dtype = (torch.get_autocast_dtype(self.device.type) if torch.is_autocast_enabled(self.device.type)
                 else torch.float32)
        if self._tensor is not None:
            return self._tensor.index_select(0, idx.to(self.device)).to(dtype)
        rows = np.asarray(self._array[np.sort(idx.cpu().numpy())], dtype=np.float32)
        order = torch.argsort(torch.argsort(idx.cpu()))  # gathered sorted (fast on a memmap); restore order
        return torch.from_numpy(rows)[order].to(self.device, dtype)


class StoreItemEncoder(nn.Module):
    """Base of the store-based encoders: ``forward(item_idx) -> [U, d]`` via the feature table.

    With ``checkpointing`` (``--grad-checkpointing``) a training forward keeps only its output ``[U, d]`` for
    backward and runs ``encode`` again there (dropout and routing noise replayed from the saved RNG state), as
    Hugging Face's gradient checkpointing does for the LLM of the end-to-end baselines: the same gradients, less
    memory, one more forward pass of the encoder.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features: FeatureTable | None = None
        self.checkpointing = False

    def attach(self, features: FeatureTable, checkpointing: bool = False) -> StoreItemEncoder:
        self.features, self.checkpointing = features, checkpointing
        return self

    def forward(self, item_idx: torch.Tensor) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("attach a FeatureTable before encoding items")
        rows = self.features.gather(item_idx)
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self.encode, rows, use_reentrant=False)
        return self.encode(rows)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """``h [U, a, hidden]`` (``[:, 0]`` = top layer) to item embeddings ``[U, d]``."""
        raise NotImplementedError


class SSNAEncoder(StoreItemEncoder):
    """SSNA: adapters on the top-a layers, sequentially integrated by a GRU from a zero state (Eq. 4)."""

    def __init__(self, cfg: TrainConfig, hidden: int):
        super().__init__()
        if cfg.gru_order not in ("top_down", "bottom_up"):
            raise ValueError(f"gru_order must be top_down or bottom_up, got {cfg.gru_order!r}")
        self.adapters = MoEAdapters(cfg.a, hidden, cfg.d, cfg.n_experts, cfg.adapter_dropout, cfg.gate_noise)
        self.gru = nn.GRU(cfg.d, cfg.d, batch_first=True)
        self.bottom_up = cfg.gru_order == "bottom_up"

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        z = self.adapters(h)                        # [U, a, d]; z[:, m] adapts layer n − m
        if self.bottom_up:
            z = z.flip(1)
        _, last = self.gru(z)                       # h_0 = 0 (GRU default)
        return last[-1]


class MeanEncoder(StoreItemEncoder):
    """MEAN (Table 8): mean of the a adapter outputs."""

    def __init__(self, cfg: TrainConfig, hidden: int):
        super().__init__()
        self.adapters = MoEAdapters(cfg.a, hidden, cfg.d, cfg.n_experts, cfg.adapter_dropout, cfg.gate_noise)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapters(h).mean(dim=1)


class WeightedEncoder(StoreItemEncoder):
    """WEIGHTED (Table 8): learned softmax weights over the a adapter outputs (equal at start)."""

    def __init__(self, cfg: TrainConfig, hidden: int):
        super().__init__()
        self.adapters = MoEAdapters(cfg.a, hidden, cfg.d, cfg.n_experts, cfg.adapter_dropout, cfg.gate_noise)
        self.layer_logits = nn.Parameter(torch.zeros(cfg.a))

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.layer_logits, dim=0)
        return torch.einsum("uad,a->ud", self.adapters(h), weights)


class TMoEEncoder(StoreItemEncoder):
    """TMoE (UniSRec): one MoE adapter on the top layer."""

    def __init__(self, cfg: TrainConfig, hidden: int):
        super().__init__()
        self.adapter = MoEAdapters(1, hidden, cfg.d, cfg.n_experts, cfg.adapter_dropout, cfg.gate_noise)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter(h[:, :1])[:, 0]


class TMLPEncoder(StoreItemEncoder):
    """TMLP (MoRec): an n_l-layer MLP on the top layer."""

    def __init__(self, cfg: TrainConfig, hidden: int):
        super().__init__()
        self.mlp = MLPAdapter(hidden, cfg.d, cfg.n_l, cfg.adapter_dropout)

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h[:, 0])


@dataclass
class ItemInputs:
    """What a method may read about the items: the stage-one store's layers, or the texts and the LLM itself
    (only the end-to-end baselines do the latter)."""

    n_items: int
    layers: Callable[[int], np.ndarray] | None = None   # a -> [n_items, a, hidden], [:, 0] = top (store.top_layers)
    texts: list[str] | None = None                      # item texts in item_idx order
    llm: str | None = None                              # registry name or model folder (featurestore.load_llm)
    cache_dir: Path | None = None                       # where load_llm keeps downloaded weights
    preload: bool = True                                # copy store rows into RAM instead of gathering from the mmap
    total_steps: int | None = None                      # optimiser steps the run plans (set by fit; AdaLoRA's schedule)


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[TrainConfig, ItemInputs, torch.device], nn.Module]   # -> item encoder: item_idx -> [U, d]
    summary: str
    uses_llm: bool = False      # runs the LLM in the training loop (LoRA, AdaLoRA, Full)


def store_method(encoder: Callable[[TrainConfig, int], StoreItemEncoder], layers: Callable[[TrainConfig], int]):
    """A build function for an encoder over the top ``layers(cfg)`` store layers."""

    def build(cfg: TrainConfig, inputs: ItemInputs, device: torch.device) -> nn.Module:
        if inputs.layers is None:
            raise ValueError(f"method {cfg.method} reads the stage-one store; no store layers were given")
        features = inputs.layers(layers(cfg))
        return encoder(cfg, features.shape[-1]).attach(FeatureTable(features, inputs.preload, device),
                                                       checkpointing=cfg.grad_checkpointing)

    return build


def llm_method(kind: str):
    """A build function for an end-to-end baseline (the LLM runs inside the training loop; see train.e2e)."""

    def build(cfg: TrainConfig, inputs: ItemInputs, device: torch.device) -> nn.Module:
        from train.e2e import build_llm_encoder  # imports PEFT; only these methods pay for it

        return build_llm_encoder(kind, cfg, inputs, device)

    return build


def _top_a(cfg: TrainConfig) -> int:
    if not cfg.a or cfg.a < 1:
        raise ValueError(f"method {cfg.method} needs a >= 1, got {cfg.a}")
    return cfg.a


METHODS: dict[str, Method] = {
    m.name: m for m in (
        Method("ssna", store_method(SSNAEncoder, _top_a), "top-a MoE adapters integrated by a GRU"),
        Method("mean", store_method(MeanEncoder, _top_a), "top-a MoE adapters, mean pooled"),
        Method("weighted", store_method(WeightedEncoder, _top_a), "top-a MoE adapters, learned layer weights"),
        Method("tmoe", store_method(TMoEEncoder, lambda cfg: 1), "one MoE adapter on the top layer"),
        Method("tmlp", store_method(TMLPEncoder, lambda cfg: 1), "an n_l-layer MLP on the top layer"),
        Method("lora", llm_method("lora"), "LoRA (PEFT) inside the LLM, end to end", uses_llm=True),
        Method("adalora", llm_method("adalora"), "AdaLoRA (PEFT) inside the LLM, end to end", uses_llm=True),
        Method("full", llm_method("full"), "fine-tune the LLM's top n_t layers, end to end", uses_llm=True),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; stage-two methods: {', '.join(METHODS)}")
    return METHODS[name]
