"""The live engine's consistency rule: a request is served entirely by the version it was admitted
with, even when a hot swap happens between two of its decoding steps (it continues on a row overlay);
a pinned older version reads exactly as that version."""

from __future__ import annotations

import torch

from memfit.config import Settings
from memlm.delta import LayerDelta, SlotDelta
from model_store import Store
from service.engine import Engine
from service.generation import SamplingParams

PROMPT = "Question: What is the capital of Armenia?\nAnswer:"


def noisy_version(store: Store, n_slots: int = 512) -> int:
    parent = store.active()
    gen = torch.Generator().manual_seed(0)
    layers = {}
    for layer, info in store.table_info.items():
        idx = torch.arange(min(n_slots, info["rows"]), dtype=torch.int64)
        old = store.rows_at(parent, {layer: idx})[layer]
        noise = torch.randn(old.shape, generator=gen) * 50.0 * old.std()  # far outside the rows' scale
        layers[layer] = LayerDelta(idx, old + noise, old)
    return store.publish(SlotDelta(layers), parent, documents=[])


def test_swap_mid_stream_keeps_the_admitted_version(tiny_model_dir, tmp_path):
    store = Store.init(tmp_path / "store", tiny_model_dir)
    engine = Engine.from_store(store, Settings(model=tiny_model_dir, store=tmp_path / "store"))
    try:
        params = SamplingParams(max_new_tokens=12)
        at_a = engine.complete(engine.prepare(PROMPT, params))
        b = noisy_version(store)  # published and active in the store; the engine still serves a
        req = engine.prepare(PROMPT, params)
        assert req.version == at_a.version == 0
        stream = engine.stream(req)
        pieces = [next(stream).text]
        engine.switch_to(b)  # hot swap between two decoding steps
        pieces += [d.text for d in stream if not d.done]
        assert "".join(pieces) == at_a.text
        at_b = engine.complete(engine.prepare(PROMPT, params))
        assert at_b.version == b and at_b.text != at_a.text  # the swap did change the live model
        pinned = engine.complete(engine.prepare(PROMPT, params, version=0))  # overlay of version 0
        assert pinned.version == 0 and pinned.text == at_a.text
    finally:
        engine.close()


def test_batched_decoding_matches_one_by_one(tiny_model_dir, tmp_path):
    import queue

    store = Store.init(tmp_path / "store", tiny_model_dir)
    settings = Settings(
        model=tiny_model_dir, store=tmp_path / "store", generation_workers=1, max_batch_size=8
    )
    engine = Engine.from_store(store, settings)
    prompts = [
        "Question: What is the capital of Armenia?\nAnswer:",
        "The capital of France is",
        "Hello",
        "Question: What is the capital of Belarus?\nAnswer:",
    ]
    try:
        params = [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=4, stop=[" "]),
                  SamplingParams(max_new_tokens=6, temperature=0.8, seed=3), SamplingParams(max_new_tokens=10)]  # fmt: skip
        alone = [engine.complete(engine.prepare(p, sp)) for p, sp in zip(prompts, params)]
        assert engine.wait_idle()  # the last wave may still look for requests to join
        waves = engine.waves
        # queue all four before the decoding thread looks: they share one wave
        queues = [queue.Queue() for _ in prompts]
        with engine._pending_cond:
            for p, sp, q in zip(prompts, params, queues):
                engine._pending.append((engine.prepare(p, sp), q.put))
            engine._pending_cond.notify_all()
        together = []
        for q in queues:
            parts, final = [], None
            while final is None:
                d = q.get(timeout=60)
                assert not isinstance(d, BaseException), d
                if d.done:
                    final = d
                else:
                    parts.append(d.text)
            together.append(("".join(parts), final.finish_reason, final.completion_tokens))
        assert engine.waves == waves + 1
        assert together == [(c.text, c.finish_reason, c.completion_tokens) for c in alone]
    finally:
        engine.close()


def _collect(q):
    parts, final = [], None
    while final is None:
        d = q.get(timeout=60)
        assert not isinstance(d, BaseException), d
        if d.done:
            final = d
        else:
            parts.append(d.text)
    return "".join(parts), final.finish_reason, final.completion_tokens


def test_requests_join_a_running_batch(tiny_model_dir, tmp_path):
    """Continuous batching: requests that arrive while a batch decodes join it between two steps
    (one wave, fewer forward passes than one by one) and give the text they give alone."""
    import queue

    store = Store.init(tmp_path / "store", tiny_model_dir)
    settings = Settings(
        model=tiny_model_dir, store=tmp_path / "store", generation_workers=1, max_batch_size=8
    )
    engine = Engine.from_store(store, settings)
    prompts = [
        "Question: What is the capital of Armenia?\nAnswer:",
        "The capital of France is",
        "Hello there, this is a much longer prompt than the others, to pad the batch",
        "Question: What is the capital of Belarus?\nAnswer:",
    ]
    params = [SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=4, stop=[" "]),
              SamplingParams(max_new_tokens=6, temperature=0.8, seed=3), SamplingParams(max_new_tokens=10)]  # fmt: skip
    try:
        alone = [engine.complete(engine.prepare(p, sp)) for p, sp in zip(prompts, params)]
        assert engine.wait_idle()
        calls_alone = engine.forward_calls
        waves, joined, calls = engine.waves, engine.joined, engine.forward_calls
        first = queue.Queue()
        engine.submit(engine.prepare(prompts[0], params[0]), first.put)
        head = first.get(timeout=60)  # the first request is decoding now
        assert not isinstance(head, BaseException)
        queues = [queue.Queue() for _ in prompts[1:]]
        with engine._pending_cond:  # all three wait together: they join in one prefill
            for p, sp, q in zip(prompts[1:], params[1:], queues):
                engine._pending.append((engine.prepare(p, sp), q.put))
            engine._pending_cond.notify_all()
        rest = [_collect(q) for q in queues]
        text0, reason0, n0 = _collect(first)
        together = [(head.text + text0, reason0, n0), *rest]
        assert together == [(c.text, c.finish_reason, c.completion_tokens) for c in alone]
        assert engine.waves == waves + 1  # no second wave: they joined the running one
        assert engine.joined == joined + 3
        assert engine.forward_calls - calls < calls_alone  # shared decoding steps
        assert engine.decode_rows > engine.decode_steps  # some steps decoded several rows
    finally:
        engine.close()


def test_other_version_waiting_drains_the_batch(tiny_model_dir, tmp_path):
    """A request pinned to another version is never mixed into a running batch: the batch stops
    admitting, drains, and the next wave serves it (by its own version's rows)."""
    import queue

    store = Store.init(tmp_path / "store", tiny_model_dir)
    settings = Settings(
        model=tiny_model_dir, store=tmp_path / "store", generation_workers=1, max_batch_size=8
    )
    engine = Engine.from_store(store, settings)
    try:
        params = SamplingParams(max_new_tokens=12)
        at0 = engine.complete(engine.prepare(PROMPT, params))
        b = noisy_version(store)
        engine.switch_to(b)
        at_b = engine.complete(engine.prepare(PROMPT, params))
        assert at_b.text != at0.text
        assert engine.wait_idle()
        waves = engine.waves
        q1, q2, q3 = queue.Queue(), queue.Queue(), queue.Queue()
        engine.submit(engine.prepare(PROMPT, params), q1.put)  # version b
        head = q1.get(timeout=60)
        with engine._pending_cond:
            engine._pending.append((engine.prepare(PROMPT, params, version=0), q2.put))
            engine._pending.append((engine.prepare(PROMPT, params), q3.put))  # b, behind the pinned one
            engine._pending_cond.notify_all()
        t1, t2, t3 = _collect(q1), _collect(q2), _collect(q3)
        assert head.text + t1[0] == at_b.text
        assert t2[0] == at0.text and t3[0] == at_b.text
        assert engine.waves == waves + 3
    finally:
        engine.close()
