"""Product-key memory layer (Lample et al. 2019; Berges et al. 2024, "Memory Layers at Scale").

    x (B,T,d) -> query per head -> two half-queries scored against sqrt(N) sub-keys each
    -> top-k per half -> top-k over the k x k cartesian sums (never the N full keys)
    -> softmax over the k scores -> weighted sum of value rows (an embedding bag; one table, all heads)
    -> optional Memory+ gate: out = (y * silu(x W1)) W2

The layer keeps no state between calls: `forward` returns the slot indices it read, and a row overlay
(`overlay=(indices, rows)`) replaces selected value rows for this call only. The overlay serves two
needs: a request pinned to an older version (rows differ from the live table) and sparse training
(rows are a trainable tensor; gradients reach only them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .config import MemoryLMConfig


@dataclass
class MemoryOutput:
    out: torch.Tensor  # (B, T, d)
    indices: torch.Tensor  # (B, T, H, k) int64 slot ids
    weights: torch.Tensor  # (B, T, H, k) softmax weights


def overlay_rows(
    values: torch.Tensor, indices: torch.Tensor, overlay: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Gather value rows for `indices`, taking rows from `overlay` where it has them.

    values: (N, d); indices: (...,) int64; overlay: (sorted slot ids (m,), rows (m, d)) -> (..., d)
    """
    ov_idx, ov_rows = overlay
    rows = F.embedding(indices, values)  # (..., d)
    if ov_idx.numel() == 0:
        return rows
    pos = torch.searchsorted(ov_idx, indices).clamp_(max=ov_idx.numel() - 1)  # (...,)
    hit = ov_idx[pos] == indices  # (...,)
    return torch.where(hit.unsqueeze(-1), ov_rows[pos].to(rows.dtype), rows)


class ProductKeyMemory(nn.Module):
    def __init__(self, config: MemoryLMConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.memory_heads
        self.topk = config.memory_topk
        self.num_subkeys = config.memory_subkeys
        self.num_slots = config.memory_size
        self.half_dim = config.memory_key_dim // 2
        self.query_norm = config.memory_query_norm
        self.eps = config.rms_norm_eps

        self.query = nn.Linear(d, self.num_heads * config.memory_key_dim, bias=False)
        self.query_bn = (
            nn.BatchNorm1d(self.num_heads * config.memory_key_dim) if config.memory_query_bn else None
        )
        self.bn_update = False  # pretraining sets it: batch statistics and running-statistic updates
        # (H, 2, sqrt(N), key_dim/2): per head, two sub-key tables
        self.subkeys = nn.Parameter(torch.empty(self.num_heads, 2, self.num_subkeys, self.half_dim))
        self.values = nn.Embedding(self.num_slots, d)
        self.gate = config.memory_gate
        if self.gate:
            self.gate_proj = nn.Linear(d, d, bias=False)  # W1
            self.out_proj = nn.Linear(d, d, bias=False)  # W2

    def reset_subkeys(self, std: float) -> None:
        nn.init.normal_(self.subkeys, std=std)

    def half_queries(self, x: torch.Tensor, update_bn: bool = False) -> torch.Tensor:
        """(n, d) hidden states -> (n, H, 2, dk/2): each head's two half-queries, the vectors scored
        against the sub-keys. update_bn: BatchNorm from this batch's statistics (and update the running
        ones) instead of the running statistics."""
        q = self.query(x)  # (n, H * dk)
        if self.query_bn is not None:
            bn = self.query_bn
            q = F.batch_norm(
                q,
                bn.running_mean,
                bn.running_var,
                bn.weight,
                bn.bias,
                training=update_bn,
                momentum=bn.momentum,
                eps=bn.eps,
            )
        q = q.view(x.shape[0], self.num_heads, 2, self.half_dim)
        if self.query_norm:
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + self.eps)
        return q

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k slots and their softmax weights per head: both (B, T, H, k)."""
        B, T, _ = x.shape
        k, n = self.topk, self.num_subkeys
        q = self.half_queries(x.reshape(B * T, -1), update_bn=self.bn_update and self.training)
        q = q.view(B, T, self.num_heads, 2, self.half_dim)  # (B, T, H, 2, dk/2)
        # sub-scores against each half's sub-keys: (B, T, H, 2, n)
        sub = torch.einsum("bthcd,hcnd->bthcn", q, self.subkeys.to(q.dtype))
        s1, i1 = sub[..., 0, :].topk(k, dim=-1)  # (B, T, H, k)
        s2, i2 = sub[..., 1, :].topk(k, dim=-1)  # (B, T, H, k)
        cart = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (B, T, H, k*k)
        scores, flat = cart.topk(k, dim=-1)  # (B, T, H, k)
        row = torch.div(flat, k, rounding_mode="floor")
        col = flat % k
        indices = i1.gather(-1, row) * n + i2.gather(-1, col)  # (B, T, H, k) slot ids in [0, N)
        weights = F.softmax(scores.float(), dim=-1).to(x.dtype)
        return indices, weights

    def forward(
        self, x: torch.Tensor, overlay: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> MemoryOutput:
        indices, weights = self.select(x)
        return MemoryOutput(out=self.read(x, indices, weights, overlay), indices=indices, weights=weights)

    def read(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        overlay: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The memory's output (B, T, d) for slots `indices` read with `weights` (both (B, T, H, k), from
        `select(x)`), the value rows taken from `overlay` where it has them."""
        B, T, d = x.shape
        if overlay is None:
            bags = indices.reshape(B * T, -1)  # (B*T, H*k): one bag per token, all heads
            if fused.wanted(self.values.weight):  # opt-in Triton kernel (CUDA, inference only)
                y = fused.bag(bags, self.values.weight, weights.reshape(B * T, -1)).view(B, T, d)
            else:
                # values.sparse (set by pretraining): a sparse gradient that holds only the rows read
                y = F.embedding_bag(
                    bags,
                    self.values.weight,
                    per_sample_weights=weights.reshape(B * T, -1),
                    mode="sum",
                    sparse=self.values.sparse,
                ).view(B, T, d)
        else:
            rows = overlay_rows(self.values.weight, indices, overlay)  # (B, T, H, k, d)
            y = (weights.unsqueeze(-1) * rows).sum(dim=(2, 3))  # (B, T, d)
        if self.gate:
            y = self.out_proj(y * F.silu(self.gate_proj(x)))
        return y
