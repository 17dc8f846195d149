"""Retrofitting a memory layer onto local Llama / Qwen2 / GPT-2 models (tiny random configs, no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from memlm.retrofit import (
    RetrofitSpec,
    collect_memory_indices,
    load_retrofitted,
    memory_modules,
    retrofit,
    save_retrofitted,
)


def tiny(family: str):
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return LlamaForCausalLM(cfg)
    if family == "qwen2":
        cfg = Qwen2Config(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        return Qwen2ForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg)


SPEC = dict(layer=1, memory_size=64, memory_heads=2, memory_topk=4, memory_key_dim=16)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_parallel_retrofit_is_identity_and_reads_slots(family):
    model = tiny(family).eval()
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(x).logits
        retrofit(model, RetrofitSpec(mode="parallel", **SPEC))
        with collect_memory_indices(model) as got:
            after = model(x).logits
    assert torch.equal(before, after)
    assert got[1][0].shape == (2, 10, 2, 4)
    # training the values changes the output: the memory is really on the path
    with torch.no_grad():
        memory_modules(model)[1].values.weight.fill_(0.5)
        assert not torch.allclose(model(x).logits, before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_replace_retrofit_and_round_trip(family, tmp_path):
    model = retrofit(tiny(family), RetrofitSpec(mode="replace", **SPEC)).eval()
    x = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = model(x).logits
    save_retrofitted(model, tmp_path)
    loaded = load_retrofitted(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref)


def test_refuses_bad_layer_and_mode():
    with pytest.raises(ValueError, match="outside 0..1"):
        retrofit(tiny("llama"), RetrofitSpec(layer=5))
    with pytest.raises(ValueError, match="not 'parallel' or 'replace'"):
        retrofit(tiny("llama"), RetrofitSpec(layer=0, mode="sideways"))


# ---- the `memfit retrofit` command over a local checkpoint ------------------------------------

TEXTS = [
    "The river runs past the old mill and under the stone bridge.",
    "A small town keeps its market on the square every Saturday morning.",
    "The library opens at nine and closes at six on weekdays.",
    "Trains leave the station for the coast twice an hour.",
] * 4


def gpt2_dir(tmp_path, shard: bool = False):
    """A tiny random GPT-2 with a byte-level BPE tokenizer, saved as a local checkpoint (no download)."""
    from memlm.tokenizer import build_tokenizer

    tok = build_tokenizer(TEXTS, vocab_size=300, model_max_length=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=64, eos_token_id=0)
    ).eval()
    src = tmp_path / "gpt2"
    model.save_pretrained(src, max_shard_size="100KB" if shard else "5GB")
    tok.save_pretrained(src)
    return src, model


def run_cli(*argv: str) -> int:
    from memfit.cli import main

    return main(["retrofit", *argv])


def base_state(model) -> dict[str, torch.Tensor]:
    """The base model's weights under their original names (a parallel retrofit wraps the MLP)."""
    return {k.replace(".mlp.mlp.", ".mlp."): v for k, v in model.state_dict().items() if ".memory." not in k}


def test_cli_parallel_retrofit_round_trips_to_the_same_outputs(tmp_path, capsys):
    src, original = gpt2_dir(tmp_path, shard=True)
    assert len(list(src.glob("*.safetensors"))) > 1  # a sharded checkpoint loads too
    out = tmp_path / "out"
    assert run_cli("--from", str(src), "--out", str(out), "--layers", "0,2", "--slots", "64",
                   "--heads", "2", "--topk", "4", "--key-dim", "16") == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "largest logit change on random ids: 0" in printed and f"wrote {out}" in printed
    loaded = load_retrofitted(out).eval()
    assert sorted(memory_modules(loaded)) == [0, 2]
    x = torch.randint(0, original.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, original(x).logits)  # identity until trained
    assert (out / "tokenizer.json").exists()


def test_cli_warmup_trains_only_the_memory(tmp_path, capsys):
    src, original = gpt2_dir(tmp_path)  # GPT-2's dropout is on while the memory trains
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:4]))
    common = ("--from", str(src), "--slots", "64", "--heads", "2", "--topk", "4", "--key-dim", "16")
    warm = ("--warmup-texts", str(texts), "--warmup-steps", "30", "--warmup-lr", "0.01")
    assert run_cli(*common, "--out", str(tmp_path / "cold")) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert run_cli(*common, "--out", str(out), *warm) == 0
    printed = capsys.readouterr().out
    # the same command prints the same losses and writes the same memory (seeded by --seed)
    assert run_cli(*common, "--out", str(tmp_path / "again"), *warm) == 0
    assert capsys.readouterr().out.replace(str(tmp_path / "again"), str(out)) == printed
    cold, again = load_retrofitted(tmp_path / "cold"), load_retrofitted(tmp_path / "again")
    memory = {k: v for k, v in load_retrofitted(out).state_dict().items() if ".memory." in k}
    assert {k.rsplit(".memory.", 1)[1] for k in memory} >= {"query.weight", "subkeys", "values.weight"}
    for k, v in memory.items():  # query, sub-keys and values all trained, reproducibly
        assert torch.equal(v, again.state_dict()[k]), k
        assert not torch.equal(v, cold.state_dict()[k]), f"{k} did not train"
    assert "warm-up: 30 steps on 4 texts" in printed and "step 30/30" in printed
    first, last = (float(x) for x in printed.split("warm-up loss ")[1].split()[0:3:2])
    assert last < first, printed
    loaded = load_retrofitted(out).eval()
    (layer,) = memory_modules(loaded)
    assert layer == 1  # the middle of 3 blocks by default
    assert memory_modules(loaded)[1].values.weight.abs().sum() > 0  # the memory learned
    want, got = base_state(original), base_state(loaded)
    assert want.keys() == got.keys()
    for k in want:  # every base weight bit-identical
        assert torch.equal(want[k], got[k]), k


def test_cli_refuses_bad_input(tmp_path, capsys):
    src, _ = gpt2_dir(tmp_path)
    assert run_cli("--from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")) == 2
    assert run_cli("--from", str(src), "--out", str(tmp_path / "o"), "--layers", "7") == 2
    assert "outside 0..2" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert run_cli("--from", str(src), "--out", str(busy)) == 2
    assert "not empty" in capsys.readouterr().err


# ---- the native interface that serving and updates use (RetrofittedLM) -------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_wrapper_left_padding_cache_and_overlay(family):
    from transformers.cache_utils import DynamicCache

    from memlm.retrofit import RetrofittedLM

    hf = retrofit(tiny(family).eval(), RetrofitSpec(mode="parallel", **SPEC))
    with torch.no_grad():
        memory_modules(hf)[1].values.weight.normal_()
    m = RetrofittedLM(hf).eval()
    assert list(m.value_tables()) == m.config.memory_layers == [1] and m.config.memory_size == 64
    a, b = torch.randint(2, 128, (1, 4)), torch.randint(2, 128, (1, 7))
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])  # row 0 left padded
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        out = m(ids, attention_mask=mask)
        assert out.memory_indices[0].shape == (2, 7, 2, 4)
        cache = DynamicCache(config=m.config)  # the engine's prefill + one decoding step
        first = m(ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        nxt = first.argmax(-1, keepdim=True)
        step = m(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), cache=cache, use_cache=True)
        for row, prompt in enumerate([a, b]):  # the same as the row alone, unpadded, without a cache
            alone = m(torch.cat([prompt, nxt[row : row + 1]], 1)).logits[0, -1]
            assert torch.allclose(step.logits[row, -1], alone, atol=1e-5)
        # an overlay replaces rows for this call only
        base = m(b).logits
        zero = {1: (torch.arange(64), torch.zeros(64, 32))}
        with_overlay = m(b, memory_overlay=zero).logits
        assert not torch.allclose(with_overlay, base)
        assert torch.equal(m(b).logits, base)
        table = m.value_tables()[1]
        saved = table.clone()
        table.zero_()
        assert torch.equal(m(b).logits, with_overlay)
        table.copy_(saved)


def test_cli_probe_facts_and_background_command(tmp_path, capsys):
    from memfit.cli import main

    src, _ = gpt2_dir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "A"}\n{"question": "no answer"}\n')
    assert run_cli("--from", str(src), "--out", str(tmp_path / "x"), "--probe-facts", str(bad)) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"question": "When does the library open?", "answer": "at nine"}\n')
    out = tmp_path / "out"
    assert run_cli("--from", str(src), "--out", str(out), "--slots", "64", "--heads", "2", "--topk", "4",
                   "--key-dim", "16", "--probe-facts", str(facts)) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "background: 24 texts from the built-in generic text + 1 served-format facts" in printed
    assert "probe set: 1 facts, the model answers 0 of them" in printed
    probe = json.loads((out / "probe.json").read_text())
    assert probe["facts"] == [{"question": "When does the library open?", "answer": "at nine"}]
    assert probe["heldout_texts"]
    # `memfit background` reads a retrofitted model's statistics, and will not recount them
    assert main(["background", "--model", str(out)]) == 0
    assert "layer 1: " in capsys.readouterr().out
    assert main(["background", "--model", str(out), "--unit", "batch"]) == 2
    assert "memfit retrofit --background-texts" in capsys.readouterr().err
