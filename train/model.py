"""The sequential recommender every method shares: item encoder → SASRec → cosine scores (Eq. 5–8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.config import TrainConfig
from train.data import Batch
from train.modules import SASRec


class SequentialRecommender(nn.Module):
    """Scores r = cos(u, v*) with u = SASRec(adapted history); trained with Eq. 8.

    Per batch only the unique items the batch touches (histories and targets) are encoded, then gathered.
    """

    def __init__(self, item_encoder: nn.Module, cfg: TrainConfig, n_items: int):
        super().__init__()
        self.item_encoder = item_encoder
        self.user_encoder = SASRec(cfg.d, cfg.n_layers, cfg.n_heads, cfg.inner_size, cfg.hidden_dropout,
                                   cfg.attn_dropout, cfg.max_len)
        self.n_items, self.temperature, self.loss_kind = n_items, cfg.temperature, cfg.loss
        if cfg.loss not in ("inbatch", "full"):
            raise ValueError(f"loss must be inbatch or full, got {cfg.loss!r}")

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """User intents ``[B, d]`` and target embeddings ``[B, d]`` (both unnormalised)."""
        real = batch.real()
        touched = torch.cat([batch.history[real], batch.targets])
        unique, inverse = torch.unique(touched, return_inverse=True)
        vectors = self.item_encoder(unique)
        n_hist = touched.shape[0] - len(batch)
        users = self.user_encoder(vectors[inverse[:n_hist]], batch.lengths)
        return users, vectors[inverse[n_hist:]]

    def loss(self, batch: Batch) -> torch.Tensor:
        users, targets = self(batch)
        # cosines are scaled by 1/τ ≈ 14: keep them in fp32 even under bf16 autocast
        users, targets = F.normalize(users.float(), dim=-1), targets.float()
        if self.loss_kind == "full":
            logits = users @ F.normalize(self.item_vectors(), dim=-1).T / self.temperature
            return F.cross_entropy(logits, batch.targets)
        logits = users @ F.normalize(targets, dim=-1).T / self.temperature
        # Another sequence whose target is this sequence's positive is not a negative: mask it out.
        duplicate = batch.targets[:, None] == batch.targets[None, :]
        duplicate.fill_diagonal_(False)
        logits = logits.masked_fill(duplicate, float("-inf"))
        labels = torch.arange(len(batch), device=logits.device)
        return F.cross_entropy(logits, labels)

    def item_vectors(self, chunk: int = 2048) -> torch.Tensor:
        """Embeddings v* of every item ``[n_items, d]``, unnormalised (with grad when training)."""
        device = next(self.parameters()).device
        parts = [self.item_encoder(torch.arange(s, min(s + chunk, self.n_items), device=device))
                 for s in range(0, self.n_items, chunk)]
        return torch.cat(parts)

    @torch.no_grad()
    def predict(self, batch: Batch, vectors: torch.Tensor) -> torch.Tensor:
        """L2-normalised user intents ``[B, d]`` given every item's ``item_vectors()``; score items with
        ``predict(...) @ F.normalize(vectors).T`` (= cos, Eq. 7)."""
        return F.normalize(self.user_encoder(vectors[batch.history[batch.real()]], batch.lengths), dim=-1)
