import hashlib
from dataclasses import dataclass

import pytest
import torch

from memlm import MemoryLMConfig, MemoryLMForCausalLM, SlotDelta
from memlm.updater import UpdateSettings, count_batch_accesses, sparse_update

N = 1024


def tiny_random_model(seed: int = 0, memory_layers=(1,)) -> MemoryLMForCausalLM:
    torch.manual_seed(seed)
    cfg = MemoryLMConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        memory_size=N,
        memory_heads=2,
        memory_topk=4,
        memory_key_dim=16,
        memory_layers=list(memory_layers),
        pad_token_id=1,
    )
    return MemoryLMForCausalLM(cfg).eval()


@dataclass
class FakeBackground:
    df: dict
    num_docs: int
    unit: str = "sequence"


def fake_background(model, seed: int = 0) -> FakeBackground:
    g = torch.Generator().manual_seed(seed)
    return FakeBackground(
        {layer: torch.randint(0, 40, (N,), generator=g) for layer in model.config.memory_layers}, 50
    )


def random_batches(n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, 128, (3, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0  # padding at the end of row 1
        ids[1, 9:] = 1
        labels = ids.clone()
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def state_hashes(model, exclude: dict[int, torch.Tensor] | None = None) -> dict[str, str]:
    """sha256 of every state_dict tensor; for value tables, of the rows NOT in `exclude[layer]`."""
    tables = {f"model.layers.{i}.memory.values.weight": i for i in model.config.memory_layers}
    out = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu()
        if exclude is not None and name in tables:
            keep = torch.ones(t.shape[0], dtype=torch.bool)
            keep[exclude[tables[name]]] = False
            t = t[keep]
        out[name] = hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
    return out


def assert_only_selected_rows_changed(model, before: dict, delta: SlotDelta) -> None:
    selected = {layer: ld.indices for layer, ld in delta.layers.items()}
    after = state_hashes(model, exclude=selected)
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, f"tensors changed outside the selected rows: {changed}"


@pytest.mark.parametrize(
    "optimizer,method,lr",
    [
        ("sgd", "tfidf", 5.0),
        ("adam", "tfidf", 0.05),
        ("adam", "tf", 0.05),
        ("adam", "random", 0.05),
        ("sgd", "all", 5.0),
    ],
)
def test_everything_but_selected_rows_bit_identical(optimizer, method, lr):
    model = tiny_random_model(memory_layers=(0, 2))
    background = fake_background(model)
    batches = random_batches()
    settings = UpdateSettings(top_t=16, steps=4, lr=lr, optimizer=optimizer, method=method, early_stop=False)
    delta = sparse_update(model, batches, background, settings)
    selected = {layer: ld.indices for layer, ld in delta.layers.items()}
    # hashes of the untouched model with the same rows excluded
    fresh = tiny_random_model(memory_layers=(0, 2))
    assert_only_selected_rows_changed(model, state_hashes(fresh, exclude=selected), delta)
    for layer, ld in delta.layers.items():
        if method != "all":
            assert delta.report["slots_selected"][str(layer)] == 16
        assert ld.indices.numel() <= delta.report["slots_selected"][str(layer)]
        assert bool((ld.new_rows != ld.old_rows).any(-1).all()), "the delta holds only rows that moved"
        assert not torch.equal(ld.new_rows, ld.old_rows), "the update trained nothing"
        assert torch.equal(model.value_tables()[layer][ld.indices], ld.new_rows)
    assert all(p.requires_grad for p in model.parameters()), "requires_grad flags not restored"
    assert delta.report["steps"] == 4 and delta.report["method"] == method
    assert delta.report["loss_after"] < delta.report["loss_before"]


def test_selected_slots_are_accessed_and_ranked_by_tfidf():
    model = tiny_random_model()
    background = fake_background(model)
    batches = random_batches()
    counts = count_batch_accesses(model, batches)[1]
    delta = sparse_update(model, batches, background, UpdateSettings(top_t=8, steps=1, early_stop=False))
    idx = delta.layers[1].indices
    assert bool((counts[idx] > 0).all())
    from memlm.selection import select_slots

    expected = select_slots(counts, background.df[1], background.num_docs, 8, "tfidf")
    assert delta.report["slots_selected"]["1"] == 8 and idx.numel() > 0
    assert bool(torch.isin(idx, expected).all()), (idx, expected)  # the rows that moved are top-t rows


def test_padding_is_not_counted():
    model = tiny_random_model()
    b = random_batches(1)[0]
    counts = count_batch_accesses(model, [b])[1]
    H, k = model.config.memory_heads, model.config.memory_topk
    assert int(counts.sum()) == int(b["attention_mask"].sum()) * H * k
    # changing the padded tokens changes nothing
    b2 = {key: v.clone() for key, v in b.items()}
    b2["input_ids"][1, 9:] = 77
    assert torch.equal(counts, count_batch_accesses(model, [b2])[1])


def test_delta_revert_and_apply_exact():
    model = tiny_random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    delta = sparse_update(
        model, random_batches(), fake_background(model), UpdateSettings(top_t=12, steps=3, early_stop=False)
    )
    after = {k: v.clone() for k, v in model.state_dict().items()}
    delta.revert(model.value_tables())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    delta.apply(model.value_tables())
    assert all(torch.equal(after[k], v) for k, v in model.state_dict().items())


def test_masked_adamw_bug_is_caught():
    """A masked AdamW over the whole table (gradient zeroed outside the selection) still moves the
    unselected rows through weight decay; the bit-identity check must flag it."""
    model = tiny_random_model()
    before = state_hashes(model)
    delta = sparse_update(
        model, random_batches(), fake_background(model), UpdateSettings(top_t=8, steps=1, early_stop=False)
    )
    delta.revert(model.value_tables())
    table = model.value_tables()[1]
    opt = torch.optim.AdamW([table], lr=1e-3, weight_decay=0.01)
    table.grad = torch.zeros_like(table)
    table.grad[delta.layers[1].indices] = 1.0  # the mask: only selected rows carry gradient
    opt.step()
    with pytest.raises(AssertionError, match="values.weight"):
        assert_only_selected_rows_changed(
            model, state_hashes(tiny_random_model(), exclude={1: delta.layers[1].indices}), delta
        )
    assert before  # (hashes of the whole model computed before the update)


def test_early_stop_and_progress():
    model = tiny_random_model()
    calls, seen = [], []

    def stop_fn(m, overlay):
        calls.append({k: v[1].requires_grad for k, v in overlay.items()})
        return len(calls) == 2

    delta = sparse_update(
        model,
        random_batches(),
        fake_background(model),
        UpdateSettings(top_t=8, steps=50, check_every=3),
        stop_fn=stop_fn,
        progress=seen.append,
    )
    assert delta.report["steps"] == 6 and delta.report["stopped_early"]
    assert calls == [{1: False}, {1: False}]  # the overlay handed to stop_fn is detached
    assert [p["step"] for p in seen] == list(range(1, 7))


def test_settings_validate():
    with pytest.raises(ValueError, match="optimizer 'adamw'"):
        UpdateSettings(optimizer="adamw")
    with pytest.raises(ValueError, match="tfidf selection needs background"):
        model = tiny_random_model()
        sparse_update(model, random_batches(), None, UpdateSettings(steps=1))


def test_tiny_model_learns_a_new_fact_end_to_end(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from memlm.background import BackgroundStats
    from memlm.data import invented_facts
    from memlm.evaluation import answered
    from memlm.tokenizer import load_tokenizer
    from memlm.updater import learn_documents

    tok = load_tokenizer(tiny_model_dir)
    background = BackgroundStats.load(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    fact = invented_facts(1, seed=11)[0]
    assert answered(model, tok, [fact]) == [False]
    doc = {
        "id": fact["id"],
        "text": fact["text"],
        "facts": [{"question": fact["question"], "answer": fact["answer"]}],
    }
    before = state_hashes(model)
    snapshot = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    delta = learn_documents(model, tok, [doc], background, UpdateSettings())  # the defaults
    assert answered(model, tok, [fact]) == [True], delta.report
    assert delta.report["stopped_early"] and delta.report["facts"] == 1
    selected = {layer: ld.indices for layer, ld in delta.layers.items()}
    assert_only_selected_rows_changed(model, state_hashes(snapshot, exclude=selected), delta)
    delta.revert(model.value_tables())
    assert state_hashes(model) == before


def test_max_row_change_bounds_every_row_and_keeps_the_rest_identical():
    model = tiny_random_model(seed=3)
    snapshot = tiny_random_model(seed=3)
    settings = UpdateSettings(top_t=16, steps=5, lr=50.0, early_stop=False, max_row_change=0.25)
    delta = sparse_update(model, random_batches(), fake_background(model), settings)
    for ld in delta.layers.values():
        change = (ld.new_rows - ld.old_rows).norm(dim=-1)
        assert bool((change > 0).any()), "nothing trained"
        assert bool((change <= 0.25 * ld.old_rows.norm(dim=-1) * (1 + 1e-5)).all()), change
    selected = {layer: ld.indices for layer, ld in delta.layers.items()}
    assert_only_selected_rows_changed(model, state_hashes(snapshot, exclude=selected), delta)
    unbounded = tiny_random_model(seed=3)
    free = sparse_update(
        unbounded, random_batches(), fake_background(unbounded), settings.replace(max_row_change=None)
    )
    assert max(float((ld.new_rows - ld.old_rows).norm(dim=-1).max()) for ld in free.layers.values()) > max(
        float((ld.new_rows - ld.old_rows).norm(dim=-1).max()) for ld in delta.layers.values()
    )
    with pytest.raises(ValueError, match="max_row_change"):
        UpdateSettings(max_row_change=0)


def test_idf_lr_power_scales_each_rows_step_by_its_idf():
    """One SGD step: a row's change with idf_lr_power=1 is its plain change times idf/idf_max."""
    import math

    from memlm.selection import idf

    settings = UpdateSettings(top_t=16, steps=1, lr=50.0, early_stop=False, idf_lr_power=0.0)
    plain_model, soft_model = tiny_random_model(seed=4), tiny_random_model(seed=4)
    snapshot = tiny_random_model(seed=4)
    bg = fake_background(plain_model)
    plain = sparse_update(plain_model, random_batches(), bg, settings)
    soft = sparse_update(soft_model, random_batches(), bg, settings.replace(idf_lr_power=1.0))
    checked = 0
    for layer, ld in soft.layers.items():
        ref = plain.layers[layer]
        assert torch.equal(ld.indices, ref.indices)  # same rows move (no row has df = num_docs here)
        scale = (idf(bg.df[layer][ld.indices], bg.num_docs) / math.log(bg.num_docs + 1)).float()
        torch.testing.assert_close(ld.new_rows - ld.old_rows, (ref.new_rows - ref.old_rows) * scale[:, None])
        assert bool((scale < 0.99).any())  # the check can tell the two apart
        checked += ld.indices.numel()
    assert checked > 0
    selected = {layer: ld.indices for layer, ld in soft.layers.items()}
    assert_only_selected_rows_changed(soft_model, state_hashes(snapshot, exclude=selected), soft)
    with pytest.raises(ValueError, match="idf_lr_power"):
        UpdateSettings(idf_lr_power=-1)
    with pytest.raises(ValueError, match="background"):
        sparse_update(
            tiny_random_model(seed=4), random_batches(), None, settings.replace(method="tf", idf_lr_power=1)
        )


def test_replay_rehearsal_keeps_the_invariants(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from memlm.background import BackgroundStats
    from memlm.data import invented_facts
    from memlm.evaluation import answered
    from memlm.rehearsal import ReplayKL, replay_batch
    from memlm.tokenizer import load_tokenizer
    from memlm.updater import learn_documents

    tok = load_tokenizer(tiny_model_dir)
    background = BackgroundStats.load(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    settings = UpdateSettings(replay=8)
    batch = replay_batch(tok, settings)
    assert batch["input_ids"].shape[0] == 8 and bool((batch["labels"] == -100).all())
    # before any step the KL to the pre-update model is zero
    with torch.no_grad():
        kl = float(ReplayKL(model, batch, torch.device("cpu")).loss(model, {}))
    assert kl == pytest.approx(0.0, abs=1e-5)
    fact = invented_facts(1, seed=11)[0]
    doc = {
        "id": "r",
        "text": fact["text"],
        "facts": [{"question": fact["question"], "answer": fact["answer"]}],
    }
    snapshot = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    delta = learn_documents(model, tok, [doc], background, settings)
    assert delta.report["replay"] == 8
    assert answered(model, tok, [fact]) == [True], delta.report
    selected = {layer: ld.indices for layer, ld in delta.layers.items()}
    assert_only_selected_rows_changed(model, state_hashes(snapshot, exclude=selected), delta)


@pytest.mark.parametrize("memory_layers", [(1,), (0, 2)])
def test_frozen_prefix_path_equals_the_full_forward(memory_layers):
    """The update's cached path (memlm.updater.FrozenPrefixes: the first memory layer's inputs, slot
    indices and weights computed once per batch) gives the full forward's loss and value-row gradients:
    float64 exactly up to rounding, with the first memory layer below other blocks and a second memory
    layer above it."""
    from memlm.updater import FrozenPrefixes, batch_loss

    model = tiny_random_model(3, memory_layers).double()
    batch = random_batches(1, seed=5)[0]
    tables = model.value_tables()
    with torch.no_grad():
        reads = model(batch["input_ids"], attention_mask=batch["attention_mask"]).memory_indices
    slots = {layer: idx.flatten().unique()[::3] for layer, idx in zip(model.config.memory_layers, reads)}

    def loss_and_grads(prefixes):
        rows = {
            layer: tables[layer].detach()[idx].clone().requires_grad_(True) for layer, idx in slots.items()
        }
        overlay = {layer: (slots[layer], rows[layer]) for layer in slots}
        loss = batch_loss(model, batch, overlay, "sum", prefixes)
        loss.backward()
        return loss.detach(), {layer: r.grad for layer, r in rows.items()}

    for p in model.parameters():
        p.requires_grad_(False)
    full_loss, full_grads = loss_and_grads(None)
    prefixes = FrozenPrefixes(model)
    for _ in range(2):  # the second call reads the cached prefix
        loss, grads = loss_and_grads(prefixes)
        assert torch.allclose(loss, full_loss, rtol=0, atol=1e-12)
        for layer in slots:
            assert full_grads[layer].abs().sum() > 0
            assert torch.allclose(grads[layer], full_grads[layer], rtol=0, atol=1e-12)
    assert len(prefixes.cache) == 1


def test_compose_equals_applying_both_deltas_and_reverts_exactly():
    """memlm.delta.compose(a, b): applying it is applying a then b; reverting it restores the state before a."""
    from memlm.delta import LayerDelta, SlotDelta, compose

    g = torch.Generator().manual_seed(0)
    before = {2: torch.randn(10, 3, generator=g), 5: torch.randn(4, 3, generator=g)}

    def write(tables, layer, idx):
        idx = torch.tensor(idx)
        old = tables[layer][idx].clone()
        new = torch.randn(len(idx), 3, generator=g)
        tables[layer][idx] = new
        return LayerDelta(idx, new, old)

    state = {k: v.clone() for k, v in before.items()}
    a = SlotDelta({2: write(state, 2, [1, 4, 7])}, report={"seconds": 1.0})
    b = SlotDelta({2: write(state, 2, [0, 4, 9]), 5: write(state, 5, [3])})
    both = compose(a, b)
    assert both.layers[2].indices.tolist() == [0, 1, 4, 7, 9] and both.layers[5].indices.tolist() == [3]
    assert both.report == {"seconds": 1.0}
    replay = {k: v.clone() for k, v in before.items()}
    both.apply(replay)
    assert all(torch.equal(replay[k], state[k]) for k in state)
    both.revert(replay)
    assert all(torch.equal(replay[k], before[k]) for k in before)
