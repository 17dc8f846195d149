"""memlm: the ML core of memfit (memory-layer LM, sparse memory finetuning, evaluation).

Imports torch and transformers only; never the service stack (fastapi, celery, redis, prometheus).
Importing it registers the model with transformers' Auto classes.

This module is the core's public face: every name another package (model_store, workers, service,
memfit) uses is exported here, whether it imports it from here or from the module that defines it
(tests/memlm/test_public_api.py checks both). The model classes load at import; the rest loads on
first use, so `import memlm` does not pull in the corpus, the tokenizer trainer or the evaluation
code. `memlm.data` (the offline corpus) and `memlm.fused` (the optional Triton kernel) are public
submodules; `memlm.pretrain.pretrain` and `memlm.retrofit.retrofit` are reached through their modules,
whose names they share.
"""

from __future__ import annotations

import importlib
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM

from .config import MemoryLMConfig
from .delta import LayerDelta, SlotDelta
from .memory import ProductKeyMemory
from .modeling import DenseFFN, MemoryLMForCausalLM, MemoryLMOutput

AutoConfig.register(MemoryLMConfig.model_type, MemoryLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MemoryLMConfig, MemoryLMForCausalLM, exist_ok=True)

# name -> (module, attribute): loaded on first access (PEP 562)
_LAZY: dict[str, tuple[str, str]] = {
    "load": ("loading", "load"),
    # where models and stores live
    "default_model_dir": ("paths", "default_model_dir"),
    "default_store_dir": ("paths", "default_store_dir"),
    "memfit_home": ("paths", "memfit_home"),
    # tokenizer and pretraining
    "load_tokenizer": ("tokenizer", "load_tokenizer"),
    "PRESETS": ("presets", "PRESETS"),
    "preset_with": ("presets", "preset_with"),
    "update_defaults": ("presets", "update_defaults"),  # a model directory's update_defaults.json
    "report_summary": ("pretrain", "_summary"),  # the headline figures of a training_report.json
    "served_background": ("pretrain", "served_background"),  # served-format QA texts of unused entities
    # background statistics (the IDF side)
    "BACKGROUND_FILE": ("background", "BACKGROUND_FILE"),
    "DEFAULT_SEQ_LEN": ("background", "DEFAULT_SEQ_LEN"),
    "BackgroundStats": ("background", "BackgroundStats"),
    "compute_background": ("background", "compute_background"),
    "compute_for_model_dir": ("background", "compute_for_model_dir"),
    "model_base_id": ("background", "model_base_id"),
    "weight_files": ("background", "weight_files"),
    # training streams and the sparse updater
    "TRAINING_QUESTION_TEMPLATES": ("augment", "TRAINING_QUESTION_TEMPLATES"),
    "document_facts": ("augment", "document_facts"),
    "UpdateSettings": ("updater", "UpdateSettings"),
    "batch_loss": ("updater", "batch_loss"),
    "facts_stop_fn": ("updater", "facts_stop_fn"),
    "learn_documents": ("updater", "learn_documents"),
    "sparse_update": ("updater", "sparse_update"),
    "training_stream": ("updater", "training_stream"),
    # evaluation (defined once: docs/contracts.md "Evaluation")
    "EvalBudget": ("evaluation", "EvalBudget"),
    "answered": ("evaluation", "answered"),
    "evaluate_update": ("evaluation", "evaluate_update"),
    "format_question": ("evaluation", "format_question"),
    "greedy_complete": ("evaluation", "greedy_complete"),
    "is_answered": ("evaluation", "is_answered"),
    "perplexity": ("evaluation", "perplexity"),
    "perplexity_with_overlay": ("evaluation", "perplexity_with_overlay"),
    # reach of an update
    "delta_rows": ("reach", "delta_rows"),
    "merge_reads": ("reach", "merge_reads"),
    "probe_reads": ("reach", "probe_reads"),
    "protected_slots": ("reach", "protected_slots"),
    "protection_mask": ("reach", "protection_mask"),
    "reach_report": ("reach", "reach_report"),
    "reached": ("reach", "reached"),
    "text_reads": ("reach", "text_reads"),
    # repair: keeping what earlier updates taught
    "Learned": ("repair", "Learned"),
    "compose": ("delta", "compose"),
    "one_fact_documents": ("repair", "one_fact_documents"),
    "repair_update": ("repair", "repair_update"),
    "served_text": ("repair", "served_text"),
    # memory usage of a built model
    "answer_key_overlap": ("usage", "answer_key_overlap"),
    "answer_key_sharing": ("usage", "answer_key_sharing"),
    "memory_usage": ("usage", "memory_usage"),
    # memory layers added to a Hugging Face checkpoint
    "RetrofitSpec": ("retrofit", "RetrofitSpec"),
    "RetrofittedLM": ("retrofit", "RetrofittedLM"),
    "decoder_blocks": ("retrofit", "decoder_blocks"),
    "is_retrofitted": ("retrofit", "is_retrofitted"),
    "load_memory_model": ("retrofit", "load_memory_model"),
    "memory_modules": ("retrofit", "memory_modules"),
    "save_retrofitted": ("retrofit", "save_retrofitted"),
    "warmup": ("retrofit", "warmup"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "DenseFFN",
    "LayerDelta",
    "MemoryLMConfig",
    "MemoryLMForCausalLM",
    "MemoryLMOutput",
    "ProductKeyMemory",
    "SlotDelta",
    *_LAZY,
]
