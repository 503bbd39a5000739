"""The sequential recommender every method shares: item encoder → SASRec → cosine scores (Eq. 5–8)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from train.config import TrainConfig
from train.data import Batch
from train.modules import SASRec

# gather(*tensors) -> (each tensor's rows from every rank in rank order, where this rank's rows start)
RowGather = Callable[..., tuple[list[torch.Tensor], int]]


class SequentialRecommender(nn.Module):
    """Scores r = cos(u, v*) with u = SASRec(adapted history); trained with Eq. 8.

    Per batch only the unique items the batch touches (histories and targets) are encoded, then gathered.
    With ``cfg.item_ids`` an item's embedding is its adapted text embedding plus a learned ID embedding
    (UniSRec's transductive setting), for history and candidates alike. With ``cfg.history_bias`` a learned
    scalar b is added to the score cos(u, v) of every item in the sequence's history (the items the model reads),
    so its logit is (cos + b)/τ: how much less (b < 0) or more likely a repeat is than its cosine says, in training
    and in ranking alike. It lives on the cosine scale so that Adam's steps (about lr each) move it as fast as the
    cosines move; on the logit scale it would need 1/τ times as many.
    """

    def __init__(self, item_encoder: nn.Module, cfg: TrainConfig, n_items: int):
        super().__init__()
        self.item_encoder = item_encoder
        self.user_encoder = SASRec(cfg.d, cfg.n_layers, cfg.n_heads, cfg.inner_size, cfg.hidden_dropout,
                                   cfg.attn_dropout, cfg.max_len)
        self.id_embedding = nn.Embedding(n_items, cfg.d) if cfg.item_ids else None
        if self.id_embedding is not None:
            nn.init.normal_(self.id_embedding.weight, std=0.02)   # SASRec's (and UniSRec's) embedding init
        self.history_bias = nn.Parameter(torch.zeros(())) if cfg.history_bias else None
        self.n_items, self.temperature, self.loss_kind = n_items, cfg.temperature, cfg.loss
        if cfg.loss not in ("inbatch", "full"):
            raise ValueError(f"loss must be inbatch or full, got {cfg.loss!r}")

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """User intents ``[B, d]`` and target embeddings ``[B, d]`` (both unnormalised)."""
        touched = batch.touched()
        unique, inverse = torch.unique(touched, return_inverse=True)
        vectors = self.encode_items(unique)
        n_hist = touched.shape[0] - len(batch)
        users = self.user_encoder(vectors[inverse[:n_hist]], batch.lengths)
        return users, vectors[inverse[n_hist:]]

    def loss(self, batch: Batch, gather: RowGather | None = None) -> torch.Tensor:
        """Eq. 8 averaged over the batch's sequences: each one's target against the other targets of the batch
        (``inbatch``) or against every item (``full``).

        With GATHER (``train.distributed.gather_rows``, under DDP) the negatives are the targets of the whole
        global batch, every rank's share: the loss of this share equals its rows' terms of the single-process
        loss on the global batch, and gradients reach the ranks that encoded the gathered targets.
        """
        users, targets = self(batch)
        # cosines are scaled by 1/τ ≈ 14: keep them in fp32 even under bf16 autocast
        users, targets = F.normalize(users.float(), dim=-1), targets.float()
        if self.loss_kind == "full":
            logits = users @ F.normalize(self.item_vectors(), dim=-1).T / self.temperature
            return F.cross_entropy(self._with_history_bias(logits, batch), batch.targets)
        negatives, negative_ids, offset = F.normalize(targets, dim=-1), batch.targets, 0
        if gather is not None:
            (negatives, negative_ids), offset = gather(negatives, negative_ids)
        logits = self._with_history_bias(users @ negatives.T / self.temperature, batch, negative_ids)
        rows = torch.arange(len(batch), device=logits.device)
        labels = rows + offset
        # Another sequence whose target is this sequence's positive is not a negative: mask it out.
        duplicate = batch.targets[:, None] == negative_ids[None, :]
        duplicate[rows, labels] = False
        return F.cross_entropy(logits.masked_fill(duplicate, float("-inf")), labels)

    def _with_history_bias(self, logits: torch.Tensor, batch: Batch,
                           candidates: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` [B, C] over every item (or over the item ids ``candidates`` [C]) plus b/τ where the item is in
        the row's history; unchanged without a history bias."""
        if self.history_bias is None:
            return logits
        seen = batch.history_mask(self.n_items)
        return logits + self.history_bias / self.temperature * (seen if candidates is None else seen[:, candidates])

    def history_score(self) -> float | None:
        """The learned history bias b (added to the cosine of the items of a history), or None without one."""
        return None if self.history_bias is None else float(self.history_bias.detach())

    def encode_items(self, item_idx: torch.Tensor) -> torch.Tensor:
        """Item embeddings v* ``[U, d]`` of ``item_idx`` (the item encoder's, plus the ID embedding if any)."""
        vectors = self.item_encoder(item_idx)
        if self.id_embedding is not None:
            vectors = vectors + self.id_embedding(item_idx)
        return vectors

    def item_vectors(self, chunk: int = 2048, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Embeddings v* of items ``start … stop − 1`` (default: every item) ``[stop − start, d]``, unnormalised
        (with grad when training)."""
        device = next(self.parameters()).device
        stop = self.n_items if stop is None else stop
        parts = [self.encode_items(torch.arange(s, min(s + chunk, stop), device=device))
                 for s in range(start, stop, chunk)]
        return torch.cat(parts)

    @torch.no_grad()
    def predict(self, batch: Batch, vectors: torch.Tensor) -> torch.Tensor:
        """L2-normalised user intents ``[B, d]`` given every item's ``item_vectors()``; score items with
        ``predict(...) @ F.normalize(vectors).T`` (= cos, Eq. 7)."""
        return F.normalize(self.user_encoder(vectors[batch.history[batch.real()]], batch.lengths), dim=-1)
