"""Building blocks of the stage-two models, each a small nn.Module with its own initialisation.

- ``MoEAdapters``: ``a`` independent mixture-of-experts adapters (paper Eq. 1–3, UniSRec's MoEAdaptorLayer
  semantics), evaluated together: the 8 whitening heads of every adapter are one batched GEMM.
- ``MLPAdapter``: TMLP's n_l-layer MLP on the top layer.
- ``SASRec``: the causal self-attention user encoder (Kang & McAuley 2018) used by every method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MoEAdapters(nn.Module):
    """``n_adapters`` MoE adapters; adapter m maps LLM layer n−m of each item to z^m.

    Head k of adapter m is parametric whitening ``(dropout(h) − b_k) W_k`` (Eq. 1), b_k = 0 and W_k ~ N(0, 0.02) at
    start. Routing weights are ``softmax(h B + ε · (softplus(h U) + 0.01))`` with ε ~ N(0, 1) in training only
    (Eq. 2–3), B = U = 0 at start, so every head starts with weight 1/n_experts. Input ``[N, a, in]``, output
    ``[N, a, out]``.
    """

    def __init__(self, n_adapters: int, in_dim: int, out_dim: int, n_experts: int = 8,
                 dropout: float = 0.2, noise: bool = True, noise_eps: float = 1e-2):
        super().__init__()
        self.n_adapters, self.in_dim, self.out_dim, self.n_experts = n_adapters, in_dim, out_dim, n_experts
        self.noise, self.noise_eps = noise, noise_eps
        self.dropout = nn.Dropout(dropout)
        # All heads of an adapter side by side: one [in, n_experts * out] matrix per adapter.
        self.weight = nn.Parameter(torch.empty(n_adapters, in_dim, n_experts * out_dim))
        self.shift = nn.Parameter(torch.zeros(n_adapters, n_experts, in_dim))
        # Gate mean (B) and noise scale (U) side by side: [in, 2 * n_experts] per adapter.
        self.gate = nn.Parameter(torch.zeros(n_adapters, in_dim, 2 * n_experts))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n_items = h.shape[0]
        x = h.transpose(0, 1)                                                   # [a, N, in]
        heads = torch.bmm(self.dropout(x), self.weight)                         # [a, N, E*out]
        heads = heads.view(self.n_adapters, n_items, self.n_experts, self.out_dim)
        w = self.weight.view(self.n_adapters, self.in_dim, self.n_experts, self.out_dim)
        shift = torch.einsum("aei,aieo->aeo", self.shift, w)                   # b_k W_k, once per batch
        heads = heads - shift.unsqueeze(1)
        gate = torch.bmm(x, self.gate)                                          # [a, N, 2E]
        logits = gate[..., : self.n_experts]
        if self.training and self.noise:
            std = F.softplus(gate[..., self.n_experts:]) + self.noise_eps
            logits = logits + torch.randn_like(logits) * std
        weights = torch.softmax(logits, dim=-1)                                 # [a, N, E]
        z = torch.einsum("ane,aneo->ano", weights, heads)
        return z.transpose(0, 1)                                                # [N, a, out]


class MLPAdapter(nn.Module):
    """TMLP: ``n_layers`` linear layers (GELU between) from the top LLM layer to the item embedding.

    PyTorch's default (Kaiming-uniform) weights with zero biases: with N(0, 0.02) weights the pre-activations are
    so small that GELU(x) ≈ x/2 + 0.4x² adds a shared positive component to every item, and at initialisation
    the MLP scored test R@10 0.007 on Sci/MiniLM against 0.083 with this init (the untrained TMoE: 0.090).
    """

    def __init__(self, in_dim: int, out_dim: int, n_layers: int, dropout: float = 0.2):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"TMLP needs n_l >= 1, got {n_layers}")
        layers: list[nn.Module] = [nn.Dropout(dropout), nn.Linear(in_dim, out_dim)]
        for _ in range(n_layers - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.net = nn.Sequential(*layers)
        for module in self.net:
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class SelfAttentionLayer(nn.Module):
    """One post-norm Transformer layer (as in SASRec/RecBole) over *packed* histories.

    Position-wise parts (projections, feed-forward, norms) run on the real items only, ``[T, d]``; only the
    attention scores use the right-padded ``[B, L]`` layout, with a causal mask. With ``last_only`` the layer
    computes just each sequence's last position (all the model needs from its final layer).
    """

    def __init__(self, d: int, n_heads: int, inner_size: int, hidden_dropout: float, attn_dropout: float):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"d = {d} is not divisible by n_heads = {n_heads}")
        self.n_heads, self.attn_dropout = n_heads, attn_dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm1 = nn.LayerNorm(d, eps=1e-12)
        self.ff = nn.Sequential(nn.Linear(d, inner_size), nn.GELU(), nn.Linear(inner_size, d))
        self.norm2 = nn.LayerNorm(d, eps=1e-12)
        self.dropout = nn.Dropout(hidden_dropout)

    def forward(self, x: torch.Tensor, real: torch.Tensor, last: torch.Tensor | None = None) -> torch.Tensor:
        """``x [T, d]`` packed (row-major over ``real [B, L]``); returns ``[T, d]``, or ``[B, d]`` at the packed
        indices ``last`` when given."""
        batch, length = real.shape
        d = x.shape[-1]
        heads = self.n_heads
        qkv = self.qkv(x)
        padded = qkv.new_zeros(batch, length, 3 * d)
        padded[real] = qkv
        q, k, v = padded.view(batch, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # [B, h, L, d/h] each
        p = self.attn_dropout if self.training else 0.0
        if last is None:
            attended = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            attended = attended.transpose(1, 2).reshape(batch, length, d)[real]
            residual = x
        else:
            lengths = real.sum(1)
            q = q[torch.arange(batch, device=x.device), :, lengths - 1].unsqueeze(2)       # [B, h, 1, d/h]
            mask = real[:, None, None, :]                                                 # keys up to the last item
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p).reshape(batch, d)
            residual = x[last]
        h = self.norm1(residual + self.dropout(self.out(attended)))
        return self.norm2(h + self.dropout(self.ff(h)))


class SASRec(nn.Module):
    """Causal self-attention over each history; the user intent is the output at the last real item.

    Takes the histories packed — ``items [T, d]``, the real items of a right-padded ``[B, L]`` batch in row-major
    order — and ``lengths [B]``. Learned position embeddings → LayerNorm → dropout → post-norm Transformer
    layers with a causal mask. Padding never enters the computation, and the last layer computes only the
    last position of each history.
    """

    def __init__(self, d: int, n_layers: int, n_heads: int, inner_size: int, hidden_dropout: float,
                 attn_dropout: float, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.position = nn.Embedding(max_len, d)
        self.norm = nn.LayerNorm(d, eps=1e-12)
        self.dropout = nn.Dropout(hidden_dropout)
        self.layers = nn.ModuleList(SelfAttentionLayer(d, n_heads, inner_size, hidden_dropout, attn_dropout)
                                    for _ in range(n_layers))
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        length = int(lengths.max())
        if length > self.max_len:
            raise ValueError(f"history of {length} items exceeds max_len {self.max_len}")
        steps = torch.arange(length, device=items.device)
        real = steps[None, :] < lengths[:, None]
        positions = steps.expand(len(lengths), length)[real]
        x = self.dropout(self.norm(items + self.position(positions)))
        last = torch.cumsum(lengths, 0) - 1                      # packed index of each history's last item
        for i, layer in enumerate(self.layers):
            x = layer(x, real, last if i == len(self.layers) - 1 else None)
        return x
