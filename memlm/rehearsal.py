"""Rehearsal in an update: texts whose next-token predictions the update keeps where they were.

`ReplayKL` is the KL(before || now) term over a replay batch; `replay_batch` builds that batch from
served-format background texts (UpdateSettings.replay) and given texts; `reached_replay` chooses the
texts after selection: only those that read a selected slot can change at all (memlm.reach).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .prefix import Batch, FrozenPrefixes, Overlay, hidden_states, to_device


class ReplayKL:
    """Rehearsal: KL(model before the update || model now) on background sequences, summed over their
    real positions and averaged over sequences. Pulls the trained rows toward changes that leave
    other text alone (a row read by both the new fact and the replay text gets opposing gradients)."""

    def __init__(self, model, batch: Batch, device, prefixes: FrozenPrefixes | None = None) -> None:
        self.batch = to_device(batch, device)
        self.prefixes = prefixes
        self.mask = self.batch["attention_mask"].bool()
        with torch.no_grad():
            h = hidden_states(model, self.batch, None, prefixes)
            self.base = F.log_softmax(model.lm_head(h[self.mask]).float(), dim=-1)  # (n, V)

    def loss(self, model, overlay: Overlay) -> torch.Tensor:
        h = hidden_states(model, self.batch, overlay, self.prefixes)
        logp = F.log_softmax(model.lm_head(h[self.mask]).float(), dim=-1)  # (n, V)
        base = self.base
        kl = (base.exp() * (base - logp)).sum(-1)  # (n,)
        return kl.sum() / self.batch["input_ids"].shape[0]


def replay_batch(tokenizer, s, rehearse: Sequence[str] = ()) -> Batch:
    """`s.replay` background texts in the served formats (invented entities of their own seed, never a
    benchmark's or the probe's), a different draw per update seed, then the `rehearse` texts (e.g. the
    served QA texts of facts learned before: their predictions are held where they are)."""
    import random

    from .augment import IGNORE, Example, collate
    from .pretrain import format_matched_background

    texts: list[str] = []
    if s.replay > 0:
        pool = format_matched_background(max(64, s.replay), seed=7)
        texts = random.Random(s.seed).sample(pool, s.replay)
    examples = []
    for text in [*texts, *rehearse]:
        ids = tokenizer(text)["input_ids"][: s.max_seq_len]
        examples.append(Example(ids, [IGNORE] * len(ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return collate(examples, pad)


def reached_replay(tokenizer, s, texts, reads, record: dict):
    """The replay function of `learn_documents(rehearse_reads=...)`: given the selected slots, the replay
    batch of the texts that read one of them (None when there are none and no background replay);
    record["texts"] says how many."""
    from .reach import reached

    def replay(selected: dict[int, torch.Tensor]) -> Batch | None:
        hit = reached(reads, selected) if texts else []
        chosen = [t for t, h in zip(texts, hit) if h]
        record["texts"] = len(chosen)
        return replay_batch(tokenizer, s, chosen) if chosen or s.replay > 0 else None

    return replay
