import pytest
import torch

from memfit.bench.baselines import (
    LORA_TARGETS,
    BM25Retriever,
    DenseSettings,
    LoRAUpdater,
    full_finetune,
    geometric_grid,
    memory_baseline,
)
from memlm.updater import UpdateSettings, training_stream


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    import memlm  # noqa: F401
    from memlm.background import BackgroundStats
    from memlm.tokenizer import load_tokenizer

    return tiny_model_dir, load_tokenizer(tiny_model_dir), BackgroundStats.load(tiny_model_dir)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


DOC = {
    "id": "d1",
    "text": "Brathe Quoumor was born in Drunton.",
    "facts": [{"question": "Where was Brathe Quoumor born?", "answer": "Drunton"}],
}


def test_dense_baselines_train_on_the_sparse_updaters_stream(tiny):
    _, tok, _ = tiny
    dense, sparse = DenseSettings(seed=3, paraphrases=2), UpdateSettings(seed=3, paraphrases=2)
    assert dense.batch_size == sparse.batch_size and dense.max_seq_len == sparse.max_seq_len
    a, b = training_stream(tok, [DOC], dense), training_stream(tok, [DOC], sparse)
    assert [(e.ids, e.labels) for e in a.examples] == [(e.ids, e.labels) for e in b.examples]
    with pytest.raises(ValueError, match="no trainable"):
        training_stream(tok, [{"id": "empty", "text": ""}], dense)


def test_full_finetune_moves_dense_weights(tiny):
    path, tok, _ = tiny
    model = _load(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = full_finetune(model, tok, [DOC], DenseSettings(steps=3, lr=1e-3, early_stop=False))
    assert report["steps"] == 3 and report["method"] == "full"
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert any("qkv" in k for k in changed) and any("embed" in k for k in changed)
    assert all(p.grad is None for p in model.parameters())


def test_lora_trains_only_the_adapter(tiny):
    path, tok, _ = tiny
    model = _load(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRAUpdater(model, DenseSettings(steps=3, lr=1e-2, early_stop=False, lora_rank=4))
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert names and all(any(t in n for t in LORA_TARGETS) for n in names)
    report = lora.learn(tok, [DOC])
    assert report["steps"] == 3 and report["rank"] == 4
    state = model.state_dict()
    for k, v in before.items():  # base weights untouched (peft renames wrapped ones to *.base_layer.*)
        key = k if k in state else k.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], v), k
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("method", ["all", "tf", "random"])
def test_memory_baselines_select_differently(tiny, method):
    path, tok, bg = tiny
    model = _load(path)
    delta = memory_baseline(model, tok, [DOC], bg, method, UpdateSettings(top_t=8, steps=2, early_stop=False))
    assert delta.report["method"] == method
    layer = model.config.memory_layers[0]
    n = delta.report["slots_selected"][str(layer)]
    accessed = delta.report["accessed_slots"][str(layer)]
    assert n == (accessed if method == "all" else 8)
    # the delta keeps the selected rows that moved
    assert 0 < delta.layers[layer].indices.numel() <= n == delta.report["slots_selected"][str(layer)]
    assert delta.layers[layer].indices.numel() == delta.report["rows_changed"]


def test_bm25_retrieves_the_ingested_passage(tiny):
    path, tok, _ = tiny
    r = BM25Retriever()
    r.add([DOC, {"id": "d2", "text": "Zeth Vork works as a tailor."}])
    assert r.best("Where was Brathe Quoumor born?") == DOC["text"]
    prompt = r.prompt("Where was Brathe Quoumor born?")
    assert prompt.startswith(DOC["text"]) and prompt.endswith("Answer:")
    hits, stats = r.answered(_load(path), tok, DOC["facts"])
    assert len(hits) == 1 and stats["prompt_tokens_added"] > 0 and stats["seconds_per_query"] > 0
    assert r.best("completely unrelated words") is None


def test_geometric_grid():
    assert geometric_grid(1e-4, 1e-2, 3) == [1e-4, 1e-3, 1e-2]
