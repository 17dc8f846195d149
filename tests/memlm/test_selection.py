import math

import pytest
import torch

from memlm.selection import count_accesses, select_slots, tfidf_scores


def test_tfidf_formula_hand_computed():
    # 4 slots, 9 background documents. c = [3, 1, 0, 4] (sum 8); df = [0, 8, 2, 9]
    counts = torch.tensor([3, 1, 0, 4])
    df = torch.tensor([0, 8, 2, 9])
    scores = tfidf_scores(counts, df, num_docs=9)
    expected = [
        3 / 8 * math.log(10 / 1),
        1 / 8 * math.log(10 / 9),
        0.0,
        4 / 8 * math.log(10 / 10),  # read by every background document: generic, score 0
    ]
    assert scores.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # top-2 by TF-IDF: slot 0 then slot 1 (slot 3 has the most accesses but idf 0)
    assert select_slots(counts, df, 9, t=2, method="tfidf").tolist() == [0, 1]
    # top-2 by TF only: slots 3 and 0
    assert select_slots(counts, df, 9, t=2, method="tf").tolist() == [0, 3]


def test_only_accessed_slots_are_candidates():
    counts = torch.tensor([0, 2, 0, 1, 0])
    df = torch.zeros(5, dtype=torch.long)
    for method in ("tfidf", "tf", "random"):
        chosen = select_slots(counts, df, 10, t=4, method=method, generator=torch.Generator().manual_seed(0))
        assert chosen.tolist() == [1, 3], method
    assert select_slots(counts, None, 0, t=1, method="all").tolist() == [1, 3]


def test_random_draws_t_accessed_slots_sorted():
    counts = torch.zeros(100, dtype=torch.long)
    counts[::3] = 1
    chosen = select_slots(counts, None, 0, t=10, method="random", generator=torch.Generator().manual_seed(1))
    assert chosen.numel() == 10
    assert torch.equal(chosen, chosen.sort().values)
    assert bool((counts[chosen] > 0).all())
    again = select_slots(counts, None, 0, t=10, method="random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(chosen, again)


def test_count_accesses_excludes_padding():
    # B=2, T=3, H=2, k=2; the second row's last position is padding
    indices = torch.tensor(
        [
            [[[0, 1], [1, 2]], [[3, 3], [0, 0]], [[4, 1], [2, 2]]],
            [[[5, 5], [5, 5]], [[1, 0], [0, 1]], [[7, 7], [7, 7]]],
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    counts = count_accesses(indices, mask, num_slots=8)
    assert counts.dtype == torch.long
    assert counts.tolist() == [5, 5, 3, 2, 1, 4, 0, 0]  # slot 7 only at the padded position
    assert int(counts.sum()) == int(mask.sum()) * 2 * 2  # every (token, head, top-k) once
    assert count_accesses(indices, None, 8)[7] == 4


def test_ties_are_deterministic_and_errors_name_values():
    counts = torch.tensor([1, 1, 1, 1])
    assert select_slots(counts, torch.zeros(4, dtype=torch.long), 3, t=2).tolist() == [0, 1]
    with pytest.raises(ValueError, match="unknown selection method 'idf'"):
        select_slots(counts, None, 0, t=1, method="idf")
    with pytest.raises(ValueError, match="background df"):
        select_slots(counts, None, 0, t=1, method="tfidf")


def test_stop_slots_are_never_selected():
    # slot 0 has the highest TF-IDF but is read by 3 of 10 background documents: above max_df = 0.2
    counts = torch.tensor([50, 2, 1, 0, 3])
    df = torch.tensor([3, 0, 1, 0, 2])
    assert select_slots(counts, df, 10, t=2, method="tfidf").tolist() == [0, 1]
    assert select_slots(counts, df, 10, t=2, method="tfidf", max_df=0.2).tolist() == [1, 4]
    # fewer eligible slots than t: only those
    assert select_slots(counts, df, 10, t=5, method="tfidf", max_df=0.1).tolist() == [1, 2]
    with pytest.raises(ValueError, match="max_df"):
        select_slots(counts, df, 10, t=2, method="tfidf", max_df=1.5)
