"""Background statistics: df per slot counts documents, padding never counts, save/load keeps them."""

from __future__ import annotations

import types

import pytest
import torch

from memlm.background import (
    BACKGROUND_FILE,
    BackgroundStats,
    compute_background,
    count_accesses,
    model_base_id,
)


def test_count_accesses_by_hand():
    # B=2 sequences, T=3 tokens, H=1 head, k=2 slots; N=6. Row 1's last token is padding.
    indices = torch.tensor(
        [
            [[[0, 1]], [[1, 2]], [[0, 2]]],
            [[[3, 3]], [[4, 1]], [[5, 5]]],
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    df, docs = count_accesses(indices, mask, 6, "sequence")
    assert docs == 2
    assert df.tolist() == [1, 2, 1, 1, 1, 0]  # slot 5 read only at padding; slot 1 by both rows
    df, docs = count_accesses(indices, mask, 6, "batch")
    assert docs == 1
    assert df.tolist() == [1, 1, 1, 1, 1, 0]


class _SlotModel(torch.nn.Module):
    """Stand-in memory model: token t reads slots (t % N) and ((t + 1) % N) on one head."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(memory_layers=[0])

    def memory_modules(self):
        return {0: types.SimpleNamespace(num_slots=self.n)}

    def forward(self, input_ids, attention_mask=None, **kw):
        idx = torch.stack([input_ids % self.n, (input_ids + 1) % self.n], dim=-1).unsqueeze(2)  # (B,T,1,2)
        return types.SimpleNamespace(memory_indices=(idx,))


class _Tok:
    pad_token_id = 9  # reads slots 9 and 0 in the stand-in: they must not count

    def encode(self, text, add_special_tokens=False):
        return [int(c) for c in text]


def test_compute_background_excludes_padding():
    texts = ["12", "3", "1"]  # token ids from digits; batch of 3 pads rows 2 and 3 with id 9
    stats = compute_background(_SlotModel(12), _Tok(), texts, unit="sequence", batch_size=3, seq_len=8)
    df = stats.df[0].tolist()
    # docs: {1,2,3} , {3,4}, {1,2}
    assert stats.num_docs == 3
    assert df[1] == 2 and df[2] == 2 and df[3] == 2 and df[4] == 1
    assert df[9] == 0 and df[10] == 0 and df[0] == 0
    assert stats.meta["num_tokens"] == 4
    by_batch = compute_background(_SlotModel(12), _Tok(), texts, unit="batch", batch_size=2, seq_len=8)
    assert by_batch.num_docs == 2  # batches {"12","3"} and {"1"}
    assert by_batch.df[0].tolist()[1:5] == [2, 2, 1, 1]


def test_long_texts_are_cut_into_sequences():
    stats = compute_background(_SlotModel(12), _Tok(), ["1234567"], unit="sequence", batch_size=4, seq_len=3)
    assert stats.num_docs == 3  # 123 / 456 / 7


def test_save_load_roundtrip(tmp_path):
    stats = BackgroundStats(
        df={3: torch.tensor([0, 2, 5], dtype=torch.long)},
        num_docs=5,
        unit="batch",
        base_id="abc",
        meta={"seq_len": 64},
    )
    path = stats.save(tmp_path)
    assert path == tmp_path / BACKGROUND_FILE
    back = BackgroundStats.load(tmp_path, expected_base_id="abc")
    assert back.num_docs == 5 and back.unit == "batch" and back.base_id == "abc"
    assert back.meta["seq_len"] == 64
    assert torch.equal(back.df[3], stats.df[3])
    assert torch.allclose(back.idf(3), torch.log(torch.tensor(6.0) / torch.tensor([1.0, 3.0, 6.0])))
    with pytest.raises(ValueError, match="belong to base"):
        BackgroundStats.load(tmp_path, expected_base_id="other")


def test_invalid_stats():
    with pytest.raises(ValueError, match="unit"):
        BackgroundStats(df={}, num_docs=1, unit="token")
    with pytest.raises(ValueError, match="reaches"):
        BackgroundStats(df={0: torch.tensor([3])}, num_docs=2)


def test_tiny_model_background(tiny_model_dir):
    from transformers import AutoConfig

    import memlm  # noqa: F401

    stats = BackgroundStats.load(tiny_model_dir, expected_base_id=model_base_id(tiny_model_dir))
    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    assert list(stats.df) == config.memory_layers
    for df in stats.df.values():
        assert df.shape == (config.memory_size,)
        assert 0 < int(df.max()) <= stats.num_docs
    assert stats.unit in ("sequence", "batch")


def test_recomputing_the_background_reproduces_pretrain(tiny_model_copy):
    """`memfit background` (compute_for_model_dir) counts the same texts `memfit pretrain` did."""
    import torch

    from memlm.background import compute_for_model_dir

    before = BackgroundStats.load(tiny_model_copy)
    after = compute_for_model_dir(tiny_model_copy, progress=False)
    assert after.num_docs == before.num_docs and after.unit == before.unit
    for layer, df in before.df.items():
        assert torch.equal(after.df[layer], df), layer
