"""MemoryLMConfig: a decoder-only transformer whose configured layers use a product-key memory as FFN."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig


class MemoryLMConfig(PreTrainedConfig):
    model_type = "memfit-memory-lm"
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 8192  # byte-level BPE trained on the offline corpus
    hidden_size: int = 256  # d_model; also the memory value dim (values are added to the residual)
    num_hidden_layers: int = 6  # the prototype reached 96% probe recall with 6 layers at d=256
    num_attention_heads: int = 8  # head dim 32 at d=256
    intermediate_size: int = 1024  # dense FFN width of the non-memory layers (4 x d)
    max_position_embeddings: int = 512  # rotary positions; the corpus is chunked to <= this
    rope_theta: float = 10000.0  # standard RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon as in Llama
    memory_layers: list[int] | None = None  # which layers' FFN is a memory; None -> the middle one
    memory_size: int = 65536  # N slots; a perfect square (product keys: sqrt(N) x sqrt(N))
    memory_heads: int = 4  # query heads, all reading one shared value table (paper: 4)
    memory_topk: int = 32  # slots read per head and token (paper: k = 32)
    memory_key_dim: int = 128  # full query/key dim per head; each sub-key has half of it
    memory_gate: bool = True  # Memory+ gate: out = (y * silu(x W1)) W2
    memory_query_norm: bool = True  # RMS-normalise each head's query before scoring
    # BatchNorm over the query features (Lample et al. 2019: memory usage 26% -> 80% at 1M slots); batch
    # statistics only while pretraining (ProductKeyMemory.bn_update), running statistics everywhere else,
    # so that a sparse update or a served request never changes what a query reads
    memory_query_bn: bool = False
    memory_parallel_ffn: bool = False  # keep a dense FFN beside the memory (used by retrofit)
    initializer_range: float = 0.02  # std of the normal init of linear layers
    use_cache: bool = True  # generate() keeps a KV cache
    tie_word_embeddings: bool = True  # share input embeddings and the LM head (small models)
    pad_token_id: int | None = 1  # tokenizer's <|pad|>
    bos_token_id: int | None = 0  # tokenizer's <|endoftext|>
    eos_token_id: int | None = 0  # tokenizer's <|endoftext|>

    def __post_init__(self, **kwargs) -> None:
        if self.memory_layers is None:
            self.memory_layers = [self.num_hidden_layers // 2]
        self.memory_layers = [int(i) for i in self.memory_layers]
        h, n = self.hidden_size, self.num_attention_heads
        if h % n:
            raise ValueError(f"hidden size {h} is not a multiple of {n} heads")
        self.head_dim = h // n
        root = math.isqrt(self.memory_size)
        if root * root != self.memory_size:
            raise ValueError(f"memory size {self.memory_size} is not a perfect square (product keys)")
        self.memory_subkeys = root
        if self.memory_key_dim % 2:
            raise ValueError(f"memory key dim {self.memory_key_dim} must be even (two sub-keys)")
        if self.memory_topk > root:
            raise ValueError(f"memory top-k {self.memory_topk} exceeds the {root} sub-keys per half")
        for layer in self.memory_layers:
            if not 0 <= layer < self.num_hidden_layers:
                raise ValueError(f"memory layer {layer} outside 0..{self.num_hidden_layers - 1}")
        if len(set(self.memory_layers)) != len(self.memory_layers):
            raise ValueError(f"memory layers {self.memory_layers} repeat a layer")
        super().__post_init__(**kwargs)
