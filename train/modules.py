"""Building blocks of the stage-two models, each a small nn.Module with its own initialisation.

- ``MoEAdapters``: ``a`` independent mixture-of-experts adapters (paper Eq. 1–3, UniSRec's MoEAdaptorLayer
  semantics): the 8 whitening heads of an adapter are one GEMM, and their mixture (``MixtureOfHeads``) keeps
  only its inputs for backward.
- ``MLPAdapter``: TMLP's n_l-layer MLP on the top layer.
- ``SASRec``: the causal self-attention user encoder (Kang & McAuley 2018) used by every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class MoEAdapters(nn.Module):
    """``n_adapters`` MoE adapters; adapter m maps LLM layer n−m of each item to z^m.

    Head k of adapter m is parametric whitening ``(dropout(h) − b_k) W_k`` (Eq. 1), b_k = 0 and W_k ~ N(0, 0.02) at
    start. Routing weights are ``softmax(h B + ε · (softplus(h U) + 0.01))`` with ε ~ N(0, 1) in training only
    (Eq. 2–3), B = U = 0 at start, so every head starts with weight 1/n_experts. Input ``[N, a, in]``, output
    ``[N, a, out]``. The heads and their mixture are ``MixtureOfHeads``, which keeps less for backward than
    autograd would.
    """

    def __init__(self, n_adapters: int, in_dim: int, out_dim: int, n_experts: int = 8,
                 dropout: float = 0.2, noise: bool = True, noise_eps: float = 1e-2):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {dropout}")
        self.n_experts, self.p, self.noise, self.noise_eps = n_experts, dropout, noise, noise_eps
        # All heads of an adapter side by side: one [in, n_experts * out] matrix per adapter.
        self.weight = nn.Parameter(torch.empty(n_adapters, in_dim, n_experts * out_dim))
        self.shift = nn.Parameter(torch.zeros(n_adapters, n_experts, in_dim))
        # Gate mean (B) and noise scale (U) side by side: [in, 2 * n_experts] per adapter.
        self.gate = nn.Parameter(torch.zeros(n_adapters, in_dim, 2 * n_experts))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.transpose(0, 1)                                                   # [a, N, in]
        gate = torch.bmm(x, self.gate)                                          # [a, N, 2E]
        logits = gate[..., : self.n_experts]
        if self.training and self.noise:
            std = F.softplus(gate[..., self.n_experts:]) + self.noise_eps
            logits = logits + torch.randn_like(logits) * std
        weights = torch.softmax(logits, dim=-1)                                 # [a, N, E]
        # the dropout mask's seed, drawn from torch's generator: the mask is made again from it in backward
        seed = int(torch.randint(2**62, ())) if self.training and self.p > 0 else None
        z = MixtureOfHeads.apply(x, self.weight, self.shift, weights, self.p, seed)
        return z.transpose(0, 1)                                                # [N, a, out]


def seeded_dropout(x: torch.Tensor, p: float, seed: int | None) -> torch.Tensor:
    """``x`` with dropout p (kept entries scaled by 1/(1−p)), the mask drawn from a generator seeded with
    ``seed``: the same seed gives the same mask, so it can be made again instead of kept. ``None``: no dropout."""
    if seed is None:
        return x
    generator = torch.Generator(x.device).manual_seed(seed)
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p     # 2.5× faster than bernoulli_ here
    return (x * keep).mul_(1 / (1 - p))


class MixtureOfHeads(torch.autograd.Function):
    """Eq. 1's heads and their mixture: ``z[m] = Σ_k g[m, :, k] · (x'[m] − b[m, k]) W[m, k]``, every adapter's
    whitening heads on its dropped-out input, weighted by its gates and summed; ``x' = seeded_dropout(x, p, seed)``
    (no dropout when ``seed`` is None).

    Autograd would keep the heads (``[a, N, E·out]``, the adapters' largest activation: 12.6 MiB of SSNA's 56.5
    on the heaviest Sci batch) for the gates' gradient, and ``x'`` beside ``x`` (which the gates keep anyway).
    This keeps only ``x``, the parameters themselves and the gates, and makes ``x'`` and the heads again in
    backward: one more ``[N, in] × [in, E·out]`` product per adapter and step. It works one adapter at a time, so
    that no heads or gradient of them exist for all adapters at once. The shift enters as
    ``Σ_k g_k (b_k W_k)``, an ``[E, out]`` product per adapter rather than a pass over every item's heads, and
    its share of W's gradient (rank one per head) is added into that gradient in place, not built beside it.
    The products over items run in the dtype of ``x`` (bf16 under autocast, as the store rows arrive); those over
    parameters alone, and the gradients, in the parameters' own.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, gates: torch.Tensor, p: float,
                seed: int | None) -> torch.Tensor:
        """``x [a, N, in]``, ``weight [a, in, E·out]``, ``shift [a, E, in]``, ``gates [a, N, E]`` →
        ``[a, N, out]`` in x's dtype."""
        ctx.save_for_backward(x, weight, shift, gates)
        ctx.p, ctx.seed = p, seed
        n_adapters, n_items, n_experts = gates.shape
        z = x.new_empty(n_adapters, n_items, weight.shape[-1] // n_experts)
        with torch.autocast(x.device.type, enabled=False):
            g, dropped = gates.to(x.dtype), seeded_dropout(x, p, seed)
            for m in range(n_adapters):
                heads = dropped[m] @ weight[m].to(x.dtype)                                        # [N, E·out]
                torch.matmul(g[m].unsqueeze(-2), heads.unflatten(-1, (n_experts, -1)), out=z[m].unsqueeze(-2))
            ctx.shifted = MixtureOfHeads._shifted(weight, shift).to(x.dtype)               # [a, E, out], small
            z -= torch.bmm(g, ctx.shifted)
        return z

    @staticmethod
    def backward(ctx, dz: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, shift, gates = ctx.saved_tensors
        n_adapters, _, n_experts = gates.shape
        need_x, need_weight, need_shift, need_gates = ctx.needs_input_grad[:4]
        dx = torch.empty_like(x) if need_x else None
        dweight = torch.empty_like(weight) if need_weight else None
        dshift = dgates = None
        with torch.autocast(x.device.type, enabled=False):
            dz, g = dz.to(x.dtype), gates.to(x.dtype)
            if need_gates:                                                      # the shift term's part first
                dgates = torch.bmm(dz, ctx.shifted.transpose(1, 2)).to(gates.dtype).neg_()
            dropped = seeded_dropout(x, ctx.p, ctx.seed)                        # the forward's x', made again
            for m in range(n_adapters):
                w = weight[m].to(x.dtype)                                       # [in, E·out]
                if need_gates:
                    heads = (dropped[m] @ w).unflatten(-1, (n_experts, -1))     # [N, E, out], made again
                    dgates[m] += torch.matmul(heads, dz[m].unsqueeze(-1)).squeeze(-1)
                    del heads
                dheads = (g[m].unsqueeze(-1) * dz[m].unsqueeze(-2)).flatten(1)                  # [N, E·out]
                if need_weight:
                    dweight[m] = dropped[m].T @ dheads
                if need_x:
                    dx[m] = dheads @ w.T
            del dropped
            if need_x:
                dx = seeded_dropout(dx, ctx.p, ctx.seed)                        # through the same mask
            # Σ_n g_nk dz_n of every adapter and head: what −Σ_k g_k b_k W_k passes back to b_k and W_k
            mixed = torch.bmm(g.transpose(1, 2), dz).to(weight.dtype)          # [a, E, out]
            blocks = weight.view(n_adapters, -1, n_experts, mixed.shape[-1])    # W_mk = blocks[m, :, k]
            if need_weight:                                                     # rank one per head, in place
                dweight.view_as(blocks).addcmul_(shift.transpose(1, 2).unsqueeze(-1), mixed.unsqueeze(1), value=-1)
            if need_shift:
                dshift = torch.stack([torch.bmm(blocks[m].transpose(0, 1), mixed[m].unsqueeze(-1)).squeeze(-1)
                                      for m in range(n_adapters)]).neg_()
        return dx, dweight, dshift, dgates, None, None

    @staticmethod
    def _shifted(weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``b_k W_k`` of every adapter's heads, ``[a, E, out]``, from ``weight [a, in, E·out]`` and ``shift
        [a, E, in]``: one ``[E, in] × [in, out]`` product per adapter, on W's blocks as they lie (no copy)."""
        n_adapters, n_experts, in_dim = shift.shape
        blocks = weight.view(n_adapters, in_dim, n_experts, -1)
        return torch.stack([torch.bmm(shift[m].unsqueeze(1), blocks[m].transpose(0, 1)).squeeze(1)
                            for m in range(n_adapters)])


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


@dataclass
class AttentionGroup:
    """Histories of one length class, whose items are the packed rows ``rows``."""

    rows: slice
    lengths: torch.Tensor      # [B_g]
    real: torch.Tensor         # [B_g, L_g]: which padded positions hold an item
    full: bool                 # every history of the group has length L_g (no padding at all)


class Packing:
    """The layout of a batch of histories packed ``[T, d]`` in order of increasing length.

    Attention needs the padded ``[B, L]`` layout; padding every history to the batch's longest wastes most of
    the work when lengths are skewed (Sci: mean history 4, longest in a batch of 256 typically 37). So the
    sorted histories are split into groups of lengths in (2^(j−1), 2^j], each padded only to its own longest.
    Groups are contiguous in both sequence and packed-row order.
    """

    def __init__(self, lengths: torch.Tensor):
        """``lengths [B]``, non-decreasing."""
        sizes = lengths.tolist()
        if any(b < a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ValueError("Packing needs histories sorted by length")
        if sizes and sizes[0] < 1:
            raise ValueError("every history needs at least one item")
        self.last = torch.cumsum(lengths, 0) - 1                      # packed index of each history's last item
        self.groups: list[AttentionGroup] = []
        start, row = 0, 0
        while start < len(sizes):
            ceiling = 1 << (sizes[start] - 1).bit_length()            # next power of two ≥ this length
            stop = start
            while stop < len(sizes) and sizes[stop] <= ceiling:
                stop += 1
            n_rows = sum(sizes[start:stop])
            group_lengths = lengths[start:stop]
            longest = sizes[stop - 1]
            real = torch.arange(longest, device=lengths.device)[None, :] < group_lengths[:, None]
            self.groups.append(AttentionGroup(slice(row, row + n_rows), group_lengths, real, sizes[start] == longest))
            start, row = stop, row + n_rows


class SelfAttentionLayer(nn.Module):
    """One post-norm Transformer layer (as in SASRec/RecBole) over *packed* histories.

    Position-wise parts (projections, feed-forward, norms) run on the real items only, ``[T, d]``; only the
    attention scores use a right-padded layout with a causal mask, one length group at a time (``Packing``).
    With ``last_only`` the layer computes just each history's last position (all the model needs from its final
    layer).
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

    def forward(self, x: torch.Tensor, packing: Packing, last_only: bool = False) -> torch.Tensor:
        """``x [T, d]`` packed as ``packing`` says; returns ``[T, d]``, or ``[B, d]`` (each history's last
        position) with ``last_only``."""
        qkv = self.qkv(x)
        attended = torch.cat([self._attend(qkv[g.rows], g, last_only) for g in packing.groups])
        residual = x[packing.last] if last_only else x
        h = self.norm1(residual + self.dropout(self.out(attended)))
        return self.norm2(h + self.dropout(self.ff(h)))

    def _attend(self, qkv: torch.Tensor, group: AttentionGroup, last_only: bool) -> torch.Tensor:
        batch, length = group.real.shape
        d = qkv.shape[-1] // 3
        if group.full:
            padded = qkv.view(batch, length, 3 * d)
        else:
            padded = qkv.new_zeros(batch, length, 3 * d)
            padded[group.real] = qkv
        q, k, v = padded.view(batch, length, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        if last_only:
            q = q[torch.arange(batch, device=qkv.device), :, group.lengths - 1].unsqueeze(2)  # [B, h, 1, d/h]
            mask = None if group.full else group.real[:, None, None, :]                     # keys up to the last
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p).reshape(batch, d)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        attended = attended.transpose(1, 2).reshape(batch, length, d)
        return attended.reshape(batch * length, d) if group.full else attended[group.real]


class SASRec(nn.Module):
    """Causal self-attention over each history; the user intent is the output at the last real item.

    Takes the histories packed — ``items [T, d]``, the real items of a right-padded ``[B, L]`` batch in row-major
    order — and ``lengths [B]``. Learned position embeddings → LayerNorm → dropout → post-norm Transformer
    layers with a causal mask. Padding never enters the computation (the histories are re-packed by length so
    that attention pads each length group only to its own longest; see ``Packing``), and the last layer computes
    only the last position of each history.
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
        """``[B, d]``: the intent after each history, in the order of ``lengths``."""
        longest = int(lengths.max())
        if longest > self.max_len:
            raise ValueError(f"history of {longest} items exceeds max_len {self.max_len}")
        source_starts = torch.cumsum(lengths, 0) - lengths           # first packed row of each given history
        order = torch.argsort(lengths, stable=True)
        lengths = lengths[order]
        starts = torch.cumsum(lengths, 0) - lengths                  # … and of each history in sorted order
        positions = torch.arange(len(items), device=items.device) - torch.repeat_interleave(starts, lengths)
        items = items[torch.repeat_interleave(source_starts[order], lengths) + positions]
        x = self.dropout(self.norm(items + self.position(positions)))
        packing = Packing(lengths)
        for i, layer in enumerate(self.layers):
            x = layer(x, packing, last_only=i == len(self.layers) - 1)
        return x[torch.argsort(order)]
