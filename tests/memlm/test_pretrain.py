"""Tiny pretraining writes a complete, loadable model directory with its report and probe set."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import memlm  # noqa: F401  (registers the model)
from memlm import presets, training
from memlm import pretrain as pretrain_mod
from memlm.evaluation import format_question

FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "probe.json",
         "splits.json", "training_report.json", "background.safetensors"]  # fmt: skip


def test_model_dir_is_complete(tiny_model_dir):
    for name in FILES:
        assert (tiny_model_dir / name).exists(), name


def test_loads_and_generates(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert model.config.vocab_size == len(tok)
    assert tok.pad_token_id == model.config.pad_token_id == 1
    assert tok.eos_token_id == model.config.eos_token_id == 0
    ids = tok(format_question("What is the capital of France?"), return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0, ids.shape[1] :]), str)


def test_report_and_probe(tiny_model_dir):
    report = json.loads((tiny_model_dir / "training_report.json").read_text())
    for key in ["preset", "params_total", "params_memory", "seconds_total", "tokens_seen", "final_loss",
                "probe_accuracy", "probe_accuracy_heldout", "heldout_perplexity", "generation_tokens_per_s",
                "sample_generation"]:  # fmt: skip
        assert key in report, key
    assert report["preset"] == "tiny"
    assert 0 < report["params_memory"] < report["params_total"]
    assert report["probe_accuracy"] >= 0.3  # the tiny model knows some of its 40 facts
    assert report["heldout_perplexity"] < 1000
    probe = json.loads((tiny_model_dir / "probe.json").read_text())
    assert len(probe["facts"]) == 40
    assert all(f["question"] and f["heldout_question"] and f["answer"] for f in probe["facts"])
    assert probe["heldout_texts"]
    splits = json.loads((tiny_model_dir / "splits.json").read_text())
    assert {"pretrain", "background", "evaluation"} <= set(splits)


def test_row_sampler_starts_rows_at_documents():
    wiki = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    facts = [[20, 21], [22, 23, 24]]
    s = training.RowSampler(wiki, facts, eos=0, seq_len=4, seed=0)
    batch = s.batch(64, fact_fraction=0.5)
    assert batch.shape == (64, 4)
    assert set(batch[:, 0].tolist()) <= {5, 9, 12, 20, 22}
    assert {20, 22} & set(batch[:, 0].tolist()) and {5, 9, 12} & set(batch[:, 0].tolist())


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("crash during training")

    monkeypatch.setattr(pretrain_mod, "_build", boom)
    with pytest.raises(RuntimeError):
        pretrain_mod.pretrain("tiny", tmp_path / "model", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_pretrain_skips_existing(tiny_model_dir, capsys):
    from memfit.cli import main

    assert main(["pretrain", "--preset", "tiny", "--out", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "already exists" in out and str(tiny_model_dir) in out


def test_cli_background_to_redis(tiny_model_copy, monkeypatch, capsys):
    from memfit.cli import main

    calls = []
    fake = types.ModuleType("workers.background_redis")
    fake.seed = lambda url, stats: calls.append((url, stats))
    monkeypatch.setitem(sys.modules, "workers.background_redis", fake)
    (tiny_model_copy / "background.safetensors").unlink()
    assert (
        main(["background", "--model", str(tiny_model_copy), "--unit", "batch", "--to-redis", "redis://x"])
        == 0
    )
    assert (tiny_model_copy / "background.safetensors").exists()
    assert calls and calls[0][0] == "redis://x" and calls[0][1].unit == "batch"
    assert torch.is_tensor(next(iter(calls[0][1].df.values())))


def test_cli_background_without_workers(tiny_model_copy, monkeypatch):
    from memfit.cli import main

    monkeypatch.setitem(sys.modules, "workers.background_redis", None)  # import fails
    with pytest.raises(SystemExit, match="distributed mode"):
        main(["background", "--model", str(tiny_model_copy), "--to-redis", "redis://x"])


def test_thread_tuner_keeps_the_faster_setting(monkeypatch):
    monkeypatch.setattr(training.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    seconds = {1: 1.0, 2: 3.0}  # as measured on a busy 2-core machine: one thread wins
    before = torch.get_num_threads()
    try:
        tuner = training.ThreadTuner(2, every=10)
        assert tuner.current == 2
        trials = 0
        for step in range(60):
            tuner.before_step(step)
            trials += tuner.trial is not None
            tuner.after_step(seconds[torch.get_num_threads()])
        assert tuner.current == 1
        assert trials <= 6  # a lost trial stops after one step and backs off
    finally:
        torch.set_num_threads(before)


def test_preset_overrides_are_typed_and_named():
    p = presets.preset_with("tiny", ["memory_size=4096", "fact_fraction=1", "probe_cities=20"])
    assert (p.memory_size, p.fact_fraction, p.probe_cities) == (4096, 1.0, 20)
    assert p.hidden_size == presets.PRESETS["tiny"].hidden_size  # untouched fields stay
    assert presets.preset_with("tiny", []) is presets.PRESETS["tiny"]
    with pytest.raises(ValueError, match="bogus"):
        presets.preset_with("tiny", ["bogus=1"])
    with pytest.raises(ValueError, match="memory_size"):
        presets.preset_with("tiny", ["memory_size=big"])
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        presets.preset_with("tiny", ["memory_size"])


def test_memory_layer_field_places_the_memory():
    assert presets.PRESETS["tiny"].model_config().memory_layers == [1]  # unset: the middle of 2
    assert presets.PRESETS["default"].model_config().memory_layers == [3]  # the last of 4
    p = presets.preset_with("default", ["memory_layer=2"])
    assert p.memory_layer == 2 and p.model_config().memory_layers == [2]
    for bad in ("memory_layer=true", "memory_layer=last"):
        with pytest.raises(ValueError, match="memory_layer"):
            presets.preset_with("default", [bad])
    with pytest.raises(ValueError, match="memory layer 4"):  # the config names the bad layer
        presets.preset_with("default", ["memory_layer=4"]).model_config()


def test_cli_pretrain_set_builds_the_overridden_preset(tmp_path, capsys):
    from memfit.cli import main

    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "m"), "--set", "oops=1"]) == 2
    assert "oops" in capsys.readouterr().out and not (tmp_path / "m").exists()
    out = tmp_path / "m"
    assert main(["pretrain", "--preset", "tiny", "--out", str(out), "--set", "max_steps=5"]) == 0
    report = json.loads((out / "training_report.json").read_text())
    assert report["preset_settings"]["max_steps"] == 5
    # the build ran in a child process whose glibc keeps freed memory (memfit.commands.pretrain)
    from memfit.commands.pretrain import ALLOCATOR_ENV

    assert report["malloc_env"] == ALLOCATOR_ENV


def test_clip_grad_norm_matches_torch_on_dense_and_counts_sparse_rows_once():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(4))
    a.grad, b.grad = torch.randn(5, 3) * 10, torch.randn(4) * 10
    a2, b2 = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    a2.grad, b2.grad = a.grad.clone(), b.grad.clone()
    total = training.clip_grad_norm([a, b], 1.0)
    ref = torch.nn.utils.clip_grad_norm_([a2, b2], 1.0)
    assert total == pytest.approx(float(ref), rel=1e-5)
    assert torch.allclose(a.grad, a2.grad, atol=1e-6) and torch.allclose(b.grad, b2.grad, atol=1e-6)
    # a sparse gradient with a repeated row: its norm is that of the summed (dense) gradient
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([2, 2, 7])).sum().backward()
    dense_norm = float(torch.linalg.vector_norm(emb.weight.grad.to_dense()))
    assert training.clip_grad_norm([emb.weight], 100.0) == pytest.approx(dense_norm, rel=1e-6)


def test_sparse_values_train_only_the_rows_read(tmp_path):
    """With sparse_values, a pretraining step leaves every value row no token read bit-identical, and
    the rows that were read move (SparseAdam is lazy)."""
    import dataclasses

    from memlm.modeling import MemoryLMForCausalLM

    p = dataclasses.replace(presets.PRESETS["tiny"], sparse_values=True, memory_size=4096)
    torch.manual_seed(0)
    model = MemoryLMForCausalLM(p.model_config())
    opt = training.Optimizers(model, p)
    assert opt.sparse is not None
    for g in opt.param_groups:
        g["lr"] = 1e-2 * g["lr_mult"]
    ((layer, mem),) = model.memory_modules().items()
    before = mem.values.weight.detach().clone()
    x = torch.randint(2, p.vocab_size, (2, 16))
    out = model(input_ids=x, labels=x)
    read = torch.unique(out.memory_indices[0])
    opt.zero_grad()
    out.loss.backward()
    assert mem.values.weight.grad.is_sparse
    training.clip_grad_norm(model.parameters(), 1.0)
    opt.step()
    after = mem.values.weight.detach()
    untouched = torch.ones(p.memory_size, dtype=torch.bool)
    untouched[read] = False
    assert torch.equal(after[untouched], before[untouched])
    assert not torch.equal(after[read], before[read])


def test_invented_pretraining_facts_are_their_own_and_unmeasured():
    from memlm.data.invented import measured_names

    texts = pretrain_mod.invented_pretraining_texts(30, seed=0)
    assert len(texts) >= 30 * 2  # statements and the QA form of each fact
    assert not set(texts) & set(pretrain_mod.format_matched_background(400, seed=0))
    assert pretrain_mod.invented_pretraining_texts(0, seed=0) == []
    import re

    measured = re.compile(r"\b(" + "|".join(map(re.escape, measured_names())) + r")\b")
    assert not [t for t in texts if measured.search(t)]


def test_answer_positions_mark_the_token_before_the_answer(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    texts = ["Question: What is the capital of France?\nAnswer: Paris\n", "France is in Europe."]
    marks = training.answer_positions(tok, texts)
    ids = tok(texts[0], add_special_tokens=False).input_ids
    assert len(marks[0]) == 1 and marks[1] == []
    assert tok.decode(ids[: marks[0][0] + 1]).endswith("\nAnswer:")
    assert tok.decode(ids[marks[0][0] + 1 :]).strip().startswith("Paris")


def test_row_sampler_marks_follow_packed_facts():
    facts = [[20, 21, 22], [30, 31]]
    marks = [[1], [0]]  # token 21 in the first fact, token 30 in the second
    s = training.RowSampler([[5, 6, 7, 8, 9]], facts, eos=0, seq_len=8, seed=0, fact_marks=marks)
    x, mask = s.batch_marked(32, fact_fraction=1.0)
    assert mask.any()
    assert set(x[mask].tolist()) == {21, 30}
    assert not (mask & ~torch.isin(x, torch.tensor([21, 30]))).any()


def test_read_sharing_penalty_is_one_for_shared_queries_and_trains_them_apart():
    from memlm.config import MemoryLMConfig
    from memlm.memory import ProductKeyMemory

    torch.manual_seed(0)
    cfg = MemoryLMConfig(hidden_size=32, memory_size=256, memory_heads=2, memory_topk=4, memory_key_dim=16)
    mem = ProductKeyMemory(cfg)
    mem.reset_subkeys(0.1)
    same = torch.randn(1, 1, 32).expand(2, 3, 32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert training.read_sharing_penalty(mem, same, mask).item() == pytest.approx(1.0, abs=1e-5)
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 2] = True
    assert training.read_sharing_penalty(mem, same, one).item() == 0  # no pair to compare
    h = (torch.randn(1, 1, 32) + 0.2 * torch.randn(2, 3, 32)).requires_grad_()
    opt = torch.optim.Adam(mem.query.parameters(), lr=0.05)
    first = training.read_sharing_penalty(mem, h, mask).item()
    for _ in range(50):
        opt.zero_grad()
        training.read_sharing_penalty(mem, h, mask).backward()
        opt.step()
    assert training.read_sharing_penalty(mem, h, mask).item() < 0.5 * first


def test_preset_rejects_a_bad_penalty_scope_or_weight():
    assert (
        presets.preset_with("tiny", ["answer_read_penalty_scope=model"]).answer_read_penalty_scope == "model"
    )
    with pytest.raises(ValueError, match="answer_read_penalty_scope"):
        presets.preset_with("tiny", ["answer_read_penalty_scope=everything"])
    with pytest.raises(ValueError, match="answer_read_penalty"):
        presets.preset_with("tiny", ["answer_read_penalty=-1"])


def test_usage_balance_penalty_is_large_on_a_hub_and_training_spreads_the_reads():
    from memlm.config import MemoryLMConfig
    from memlm.memory import ProductKeyMemory

    torch.manual_seed(0)
    cfg = MemoryLMConfig(hidden_size=32, memory_size=256, memory_heads=2, memory_topk=4, memory_key_dim=16)
    mem = ProductKeyMemory(cfg)
    mem.reset_subkeys(0.1)
    hub = torch.randn(1, 1, 32).expand(4, 16, 32)  # every position reads the same k slots per head
    spread = torch.randn(4, 16, 32)
    on_hub = training.usage_balance_penalty(mem, hub).item()
    # every position picks the same k = 4 of the 16 sub-keys per half: near n / k = 4 (p is a softmax
    # over all 16, so a little less than 4); spread positions: lower
    assert 2.0 < on_hub <= 4.0 + 1e-4
    assert training.usage_balance_penalty(mem, spread).item() < 0.6 * on_hub
    h = (torch.randn(1, 1, 32) + 0.3 * torch.randn(4, 16, 32)).requires_grad_()
    opt = torch.optim.Adam(list(mem.query.parameters()) + [mem.subkeys], lr=0.05)
    first = training.usage_balance_penalty(mem, h).item()
    for _ in range(60):
        opt.zero_grad()
        training.usage_balance_penalty(mem, h).backward()
        opt.step()
    assert training.usage_balance_penalty(mem, h).item() < 0.7 * first
    with pytest.raises(ValueError, match="usage_balance_penalty"):
        presets.preset_with("tiny", ["usage_balance_penalty=-0.1"])
