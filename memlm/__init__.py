"""memlm: the ML core of memfit (memory-layer LM, sparse memory finetuning, evaluation).

Imports torch and transformers only; never the service stack (fastapi, celery, redis, prometheus).
Importing it registers the model with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .config import MemoryLMConfig
from .delta import LayerDelta, SlotDelta
from .memory import ProductKeyMemory
from .modeling import MemoryLMForCausalLM, MemoryLMOutput

AutoConfig.register(MemoryLMConfig.model_type, MemoryLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MemoryLMConfig, MemoryLMForCausalLM, exist_ok=True)

__all__ = [
    "LayerDelta",
    "MemoryLMConfig",
    "MemoryLMForCausalLM",
    "MemoryLMOutput",
    "ProductKeyMemory",
    "SlotDelta",
]
