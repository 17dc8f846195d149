"""MemoryLMForCausalLM: a Llama-style decoder (RMSNorm, rotary attention, SwiGLU FFN) whose configured
layers replace the FFN by a product-key memory (memlm.memory). Works with `generate()` and its KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import MemoryLMConfig
from .memory import ProductKeyMemory

# {layer_idx: (sorted slot ids (m,), rows (m, d))}: rows that replace the value table for one call
MemoryOverlay = dict[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class MemoryLMOutput(CausalLMOutputWithPast):
    memory_indices: tuple[torch.Tensor, ...] | None = None  # one (B, T, H, k) per memory layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE tables computed per call: no buffer, so loading a checkpoint (meta-device init) cannot leave
    them uninitialised."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = (
            torch.arange(0, self.head_dim, 2, dtype=torch.float, device=position_ids.device) / self.head_dim
        )
        inv_freq = 1.0 / (self.theta**exponent)  # (hs/2,)
        freqs = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: MemoryLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.num_attention_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)  # (B, 1, T, hs)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, nh, S, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.o_proj(y)


class DenseFFN(nn.Module):
    def __init__(self, config: MemoryLMConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_up = nn.Linear(d, 2 * f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, config: MemoryLMConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_memory = layer_idx in config.memory_layers
        if self.is_memory:
            self.memory = ProductKeyMemory(config)
            self.ffn = DenseFFN(config) if config.memory_parallel_ffn else None
        else:
            self.ffn = DenseFFN(config)

    def forward(self, x, rope, mask, cache, overlay=None):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        h = self.ffn_norm(x)
        if not self.is_memory:
            return x + self.ffn(h), None
        mem = self.memory(h, overlay)
        out = mem.out if self.ffn is None else mem.out + self.ffn(h)
        return x + out, mem.indices


class MemoryLMPreTrainedModel(PreTrainedModel):
    config_class = MemoryLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, ProductKeyMemory):
            module.reset_subkeys(std=1.0 / module.half_dim**0.5)
            nn.init.normal_(module.values.weight, std=module.values.weight.shape[1] ** -0.5)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class MemoryLMModel(MemoryLMPreTrainedModel):
    def __init__(self, config: MemoryLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        memory_overlay: MemoryOverlay | None = None,
    ):
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        x, rope, mask = self._inputs(input_ids, attention_mask, position_ids, cache)
        indices = []
        for i, block in enumerate(self.layers):
            ov = memory_overlay.get(i) if memory_overlay else None
            x, idx = block(x, rope, mask, cache, ov)
            if idx is not None:
                indices.append(idx)
        return self.norm(x), cache, tuple(indices)

    def _inputs(self, input_ids, attention_mask, position_ids, cache):
        """The token embeddings, rotary tables and attention mask (B, 1, T, S) of a forward."""
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        S = past + T
        if attention_mask is None:
            attention_mask = torch.ones(B, S, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            # left padding: positions count only real tokens
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        keep = attention_mask[:, -S:].bool()  # (B, S) keys that are real tokens
        causal = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(diagonal=past)  # (T, S)
        mask = causal.unsqueeze(0) & keep.unsqueeze(1)  # (B, T, S)
        mask = mask | ~mask.any(-1, keepdim=True)  # rows of pure padding attend everywhere (no NaN)
        mask = mask.unsqueeze(1)  # (B, 1, T, S)

        x = self.embed_tokens(input_ids)
        return x, self.rotary(position_ids, x.dtype), mask

    @torch.no_grad()
    def frozen_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
        """Everything a values-only update cannot change, for one batch: the blocks below the first memory
        layer, that block's attention, and its memory's query, slot indices and weights (all functions of
        frozen weights). `from_prefix` runs the rest with any value rows; its result equals `forward`'s."""
        first = min(self.config.memory_layers)
        x, rope, mask = self._inputs(input_ids, attention_mask, None, None)
        for block in self.layers[:first]:
            x, _ = block(x, rope, mask, None)
        block = self.layers[first]
        x = x + block.attn(block.attn_norm(x), rope, mask, None)
        h = block.ffn_norm(x)
        indices, weights = block.memory.select(h)
        ffn = block.ffn(h) if block.ffn is not None else None
        return {"layer": first, "x": x, "h": h, "indices": indices, "weights": weights, "ffn": ffn,
                "rope": rope, "mask": mask}  # fmt: skip

    def from_prefix(self, prefix: dict, memory_overlay: MemoryOverlay | None = None) -> torch.Tensor:
        """The final normed hidden states (B, T, d) of the batch of `prefix` (frozen_prefix) with the
        value rows of `memory_overlay`: the first memory layer's read, then every block above it."""
        first = prefix["layer"]
        block = self.layers[first]
        ov = memory_overlay.get(first) if memory_overlay else None
        out = block.memory.read(prefix["h"], prefix["indices"], prefix["weights"], ov)
        if prefix["ffn"] is not None:
            out = out + prefix["ffn"]
        x = prefix["x"] + out
        for i in range(first + 1, len(self.layers)):
            ov = memory_overlay.get(i) if memory_overlay else None
            x, _ = self.layers[i](x, prefix["rope"], prefix["mask"], None, ov)
        return self.norm(x)


class MemoryLMForCausalLM(MemoryLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MemoryLMConfig):
        super().__init__(config)
        self.model = MemoryLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def memory_modules(self) -> dict[int, ProductKeyMemory]:
        """{layer_idx: memory} for every memory layer, in `config.memory_layers` order."""
        return {i: self.model.layers[i].memory for i in self.config.memory_layers}

    def value_tables(self) -> dict[int, torch.Tensor]:
        """{layer_idx: (N, d) value table} — the only tensors a sparse update may change."""
        return {i: m.values.weight for i, m in self.memory_modules().items()}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        memory_overlay: MemoryOverlay | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MemoryLMOutput:
        return lm_forward(
            self.model,
            self.lm_head,
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            memory_overlay=memory_overlay,
        )


def lm_forward(
    body: nn.Module,
    lm_head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Cache | None = None,
    labels: torch.Tensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int = 0,
    memory_overlay: MemoryOverlay | None = None,
) -> MemoryLMOutput:
    """Body -> logits (the last `logits_to_keep` positions, 0: all) -> next-token loss where labels
    are given: the causal-LM head every memory model shares (native and retrofitted)."""
    h, cache, indices = body(
        input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=bool(use_cache),
        memory_overlay=memory_overlay,
    )
    if logits_to_keep:
        h = h[:, -logits_to_keep:]
    logits = lm_head(h)
    loss = None
    if labels is not None:
        # labels are the input ids (shifted here); -100 marks positions that carry no loss
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=-100,
        )
    return MemoryLMOutput(loss=loss, logits=logits, cache=cache, memory_indices=indices)
