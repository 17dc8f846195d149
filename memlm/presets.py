"""Pretraining presets: the model shape, corpus mix, penalties and schedule of a build, and
`preset_with`, which overrides fields from "FIELD=VALUE" strings (`memfit pretrain --set`)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .background import DEFAULT_UNIT
from .config import MemoryLMConfig


@dataclass(frozen=True)
class Preset:
    name: str
    # model
    vocab_size: int = 8192  # byte-level BPE size
    hidden_size: int = 256
    num_hidden_layers: int = 4  # memory in layer 2; 6 layers learn more slowly per CPU second
    num_attention_heads: int = 8
    intermediate_size: int = 1024
    # the block whose FFN is the memory (None: the middle one, layer 2 of 4). A later block's query has
    # passed more attention layers, so it carries more of the context (the entity) at the answer position
    memory_layer: int | None = None
    memory_size: int = 65536  # 256 x 256 product keys
    memory_heads: int = 4
    memory_topk: int = 32
    memory_key_dim: int = 128
    memory_query_norm: bool = True  # RMS norm of each head's query
    memory_query_bn: bool = False  # BatchNorm over the query features (spreads slot usage)
    max_position_embeddings: int = 512
    # data
    max_wiki: int | None = None  # Wikipedia leads kept (None: all)
    max_probe: int | None = None  # probe facts kept (None: all)
    probe_cities: int = 0  # large-city facts added to the capitals in the probe set (0..150)
    fact_fraction: float = 0.5  # share of training rows packed from fact texts
    seq_len: int = 128
    batch_size: int = 16
    # optimisation
    max_steps: int = 2000
    time_budget_s: float | None = 16 * 60  # training stops here at the latest (evaluation comes after)
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.1  # on dense matrices only (not on memory values, embeddings, norms)
    memory_value_lr_mult: float = 30.0  # value rows are read sparsely; at 1x they barely left their init
    # (row norm 1.01 after the 16-minute build) and updates had to move them far enough to break every
    # fact sharing their slots; at 30x (tiny preset, 6 invented facts, t=64, Adam lr 1) learning went
    # 0% -> 100% at 7% forgetting
    # train the value tables with sparse gradients and a lazy Adam that touches only the rows a batch read
    # (torch.optim.SparseAdam); the dense AdamW step over a 262,144 x 256 table is what made larger memories
    # several times slower per step. False: the dense AdamW of the first default builds.
    sparse_values: bool = False
    # served-format prompts of further invented facts in the background ("Question: {rewrite}\nAnswer: {a}",
    # the rewrites the updater trains on): slots every question reads at its fixed prefix get the df of
    # the served format's real share instead of the few hundred QA forms above (see served_background)
    background_served_facts: int = 0
    # facts about invented entities (several attributes' relations, every corpus wording of each) added
    # to the pretraining facts: a memory that must hold many entities' facts has to key its slots on the
    # entity, not on the question format (knowledge augmentation: Allen-Zhu & Li, arXiv 2309.14316).
    # Never an entity of a measured stream; never in the probe.
    pretrain_invented_facts: int = 0
    # weight of a read-sharing penalty at the answer position of the QA form ("...\nAnswer:" predicts the
    # first answer token): the mean squared cosine between the half-queries of two different facts in a
    # batch, per head and half. Two queries that point apart read different slots, so a question's reads
    # there are keyed by its entity rather than by the shared format (0: off, the plain LM loss)
    answer_read_penalty: float = 0.0
    # what the penalty trains: "query" (the memory's query projection and BatchNorm only; the hidden state
    # it reads is detached, so the layers below keep training on the LM loss alone) or "model" (the
    # gradient also reaches every layer below the memory)
    answer_read_penalty_scope: str = "query"
    # weight of a sub-key usage balance loss at every position (usage_balance_penalty below: 1 when every
    # sub-key is picked equally often, larger as reads pile onto a few hub slots; the Switch Transformer's
    # load-balancing loss, Fedus et al., arXiv 2101.03961, on each head's two sub-key choices). Trains
    # what answer_read_penalty_scope says (0: off)
    usage_balance_penalty: float = 0.0
    background_matched_facts: int = 400  # invented-entity facts in the pretraining templates added to the
    # background text, so slots read by the question/statement templates get a high df (low IDF)
    grad_clip: float = 1.0
    bf16: bool = True  # bf16 autocast where the CPU/GPU supports it (about 2x on AVX512-BF16 CPUs)
    # torch threads for the build (None: all cores, or one when that is faster on a busy machine, chosen
    # by measured step times). The count changes float summation order, so only a fixed count makes the
    # same machine build the same weights every time
    threads: int | None = None
    # the update settings chosen for this model on the tuning stream (benchmarks/tune_sparse.py), written
    # into the model directory as update_defaults.json (memlm.update_defaults) for the service to start
    # from: SGD lr and t (None: memlm.updater's defaults), and whether updates keep the slots of known
    # facts (preserve) and of N served-format texts (shield) out of selection (workers/preservation.py)
    update_lr: float | None = None
    update_top_t: int | None = None
    update_preserve: bool = False
    update_shield: int = 0
    # after an update, the facts earlier updates taught that read a row it wrote and are lost are
    # trained again beside it (memlm.repair; workers/repairing.py)
    update_repair: bool = False
    # the service gate's thresholds this model was measured to support (forgetting of the gate's probe vs
    # the parent and vs the base, relative held-out perplexity rise vs the parent; None: the service's
    # loose house thresholds, workers.gate.HOUSE_THRESHOLDS), written beside the update defaults
    gate_max_forgetting: float | None = None
    gate_max_forgetting_base: float | None = None
    gate_max_ppl_increase: float | None = None
    # evaluation
    eval_texts: int = 200  # held-out texts for perplexity (also stored in probe.json)
    background_unit: str = DEFAULT_UNIT

    def __post_init__(self) -> None:
        if self.answer_read_penalty_scope not in ("query", "model"):
            raise ValueError(
                f"answer_read_penalty_scope: expected 'query' or 'model', got {self.answer_read_penalty_scope!r}"
            )
        if self.answer_read_penalty < 0:
            raise ValueError(f"answer_read_penalty: must be >= 0, got {self.answer_read_penalty}")
        if self.usage_balance_penalty < 0:
            raise ValueError(f"usage_balance_penalty: must be >= 0, got {self.usage_balance_penalty}")

    def model_config(self) -> MemoryLMConfig:
        return MemoryLMConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            memory_layers=None if self.memory_layer is None else [self.memory_layer],
            memory_size=self.memory_size,
            memory_heads=self.memory_heads,
            memory_topk=self.memory_topk,
            memory_key_dim=self.memory_key_dim,
            memory_query_norm=self.memory_query_norm,
            memory_query_bn=self.memory_query_bn,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=0,
        )


PRESETS: dict[str, Preset] = {
    # tests: well under a minute on 2 cores; knows a few dozen capitals
    "tiny": Preset(
        name="tiny",
        vocab_size=640,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        memory_size=1024,  # 32 x 32
        memory_heads=2,
        memory_topk=8,
        memory_key_dim=32,
        max_wiki=400,
        max_probe=40,
        probe_cities=150,
        fact_fraction=0.5,
        seq_len=64,
        batch_size=16,
        max_steps=300,
        time_budget_s=None,  # step-bound and one thread: the same tiny model every time
        threads=1,
        lr=5e-3,
        warmup_steps=20,
        eval_texts=40,
    ),
    # the default model (model "M1M2" of docs/internals.md, session 10): 1,048,576 memory slots (1024^2
    # product keys, the paper's size) trained with sparse value gradients, query BatchNorm, the memory in
    # the last of 4 blocks, served-format questions in the background, a read-sharing penalty at the
    # answer position and a sub-key usage balance loss; 1,126 steps (~26 minutes on 2 CPU cores with
    # evaluation and background statistics, step-bound so every machine builds the same recipe). The
    # update defaults are the ones chosen for it on the tuning stream (benchmarks/tune_sparse.py)
    "default": Preset(
        name="default",
        memory_size=1048576,
        memory_layer=3,
        memory_query_norm=False,
        memory_query_bn=True,
        sparse_values=True,
        probe_cities=150,
        background_served_facts=4000,
        answer_read_penalty=1.0,
        answer_read_penalty_scope="query",
        usage_balance_penalty=3.0,
        max_steps=1126,
        time_budget_s=None,
        update_lr=1000.0,
        update_preserve=True,
        update_shield=30,
        update_repair=True,
        # 30 single-fact jobs through the pipeline (docs/internals.md, session 10): forgetting vs the
        # parent at most 1.6% (1 of 64), vs the base 4.7% after 30, perplexity vs the parent +0.10% at most
        gate_max_forgetting=0.05,
        gate_max_forgetting_base=0.15,
        gate_max_ppl_increase=0.02,
    ),
}


# the type a field whose default is None takes when set (--set memory_layer=3)
_NONE_DEFAULT_TYPES: dict[str, type] = {
    "memory_layer": int,
    "max_wiki": int,
    "max_probe": int,
    "update_lr": float,
    "update_top_t": int,
    "gate_max_forgetting": float,
    "gate_max_forgetting_base": float,
    "gate_max_ppl_increase": float,
    "threads": int,
}

UPDATE_DEFAULTS_FILE = "update_defaults.json"
GATE_FIELDS = ("gate_max_forgetting", "gate_max_forgetting_base", "gate_max_ppl_increase")


def update_defaults_of(p: Preset) -> dict:
    """The preset's update defaults as update_defaults.json holds them: {"lr", "top_t"} and the gate's
    thresholds {"gate_max_forgetting", "gate_max_forgetting_base", "gate_max_ppl_increase"} where set,
    and {"preserve", "shield", "repair"}."""
    out: dict = {"lr": p.update_lr, "top_t": p.update_top_t, **{k: getattr(p, k) for k in GATE_FIELDS}}
    out = {k: v for k, v in out.items() if v is not None}
    return {**out, "preserve": p.update_preserve, "shield": p.update_shield, "repair": p.update_repair}


def update_defaults(model_dir) -> dict:
    """A model directory's update_defaults.json ({} when absent: memlm's and the service's own defaults
    apply). Raises ValueError naming the file for malformed content."""
    from pathlib import Path

    path = Path(model_dir) / UPDATE_DEFAULTS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None
    kinds = {"lr": (int, float), "top_t": int, "preserve": bool, "shield": int, "repair": bool}
    kinds.update(dict.fromkeys(GATE_FIELDS, (int, float)))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key, value in data.items():
        if key not in kinds:
            raise ValueError(f"{path}: unknown field {key!r} (fields: {', '.join(kinds)})")
        if not isinstance(value, kinds[key]) or (kinds[key] is not bool and isinstance(value, bool)):
            raise ValueError(f"{path}: {key}: bad value {value!r}")
        if kinds[key] is not bool and key != "gate_max_ppl_increase" and value < 0:
            raise ValueError(f"{path}: {key}: bad value {value!r}")
    return data


def preset_with(name: str, assignments: list[str]) -> Preset:
    """The preset `name` with fields overridden by "FIELD=VALUE" strings (VALUE parsed as JSON, else
    taken as a string): one command line reproduces an experiment's model. Unknown fields or values of
    the wrong type raise ValueError naming the field."""
    import dataclasses

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[name]
    fields = {f.name: f for f in dataclasses.fields(Preset)}
    changes: dict = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        if key not in fields or key == "name":
            raise ValueError(
                f"--set {key}: not a preset field (fields: {', '.join(k for k in fields if k != 'name')})"
            )
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        current = getattr(base, key)
        expected = type(current) if current is not None else _NONE_DEFAULT_TYPES.get(key)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        wrong_bool = expected is int and isinstance(value, bool)
        if expected is not None and value is not None and (wrong_bool or not isinstance(value, expected)):
            raise ValueError(f"--set {key}: expected {expected.__name__}, got {raw!r}")
        changes[key] = value
    return dataclasses.replace(base, **changes) if changes else base
